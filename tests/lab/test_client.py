"""The lab's API client (what the e2e fixtures call) against a real netboot in a namespace
this test creates (tests.netns): its socket is made inside the namespace, and over HTTPS it
verifies netboot's own CA, as the lab uses it. Over plain HTTP, from netboot's address to
itself, it is "this host" to ``http.plain_api: loopback``.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netboot.config import load
from netboot.lab.client import ApiClient
from netboot.service import build
from tests.conftest import write_config
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]


def test_the_lab_client_reaches_the_api_over_https_with_netboots_ca(
        namespace: str, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        cfg = load(write_config(tmp_path), env={})
        cfg = replace(cfg, http=replace(cfg.http, listen="192.0.2.10"),
                      https=replace(cfg.https, listen="192.0.2.10"))
        service = await build(cfg)
        try:
            await service.start()
            admin = (cfg.data_dir / "admin.token").read_text().strip()
            ca = cfg.data_dir / "tls" / "ca.pem"
            plain = ApiClient(namespace, "192.0.2.10", service.http_port, token=admin)
            tls = ApiClient(namespace, "192.0.2.10", service.https_port, token=admin,
                            ca_file=ca)
            # The client connects from the host's own address to itself: "this host".
            local = await asyncio.to_thread(plain.get, "/api/v1/machines")
            health = await asyncio.to_thread(plain.get, "/healthz")
            listed = await asyncio.to_thread(tls.expect, "GET", "/api/v1/machines")
            return {"local": local.status, "health": health.status, "listed": listed}
        finally:
            await service.close()

    out = in_namespace(namespace, scenario)
    assert out["health"] == 200 and out["local"] == 200
    assert out["listed"]["total"] == 0
