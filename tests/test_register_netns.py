"""Registration over a real socket from 192.0.2.60, claiming a loopback address.

The aiohttp test client always connects from 127.0.0.1, which cannot show that the peer wins
over what a device claims. Here netboot's HTTP server and the "device" run in a network
namespace this test creates (tests.netns: 192.0.2.1 and 192.0.2.60 on its loopback
interface), entered by one thread. Nothing touches the host's interfaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netboot.config import load
from netboot.model import Cluster, MacAddress, Machine, Profile, Role
from netboot.service import build
from tests.conftest import write_config
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:00:60:01"


def test_register_from_192_0_2_60_claiming_loopback_records_192_0_2_60(
        namespace: str, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        service = await build(load(write_config(tmp_path), env={}))
        runner = web.AppRunner(service.app)
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t"))
            await store.put_profile(Profile(name="p", kernel="vmlinuz"))
            await store.create_machine(Machine(macs=(MacAddress.parse(MAC),), hostname="s1",
                                               cluster="edge", role=Role.SERVER, profile="p"))
            await runner.setup()
            site = web.TCPSite(runner, "192.0.2.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            service.base_url = f"http://192.0.2.1:{port}"
            base = service.base_url
            connector = aiohttp.TCPConnector(local_addr=("192.0.2.60", 0))
            async with aiohttp.ClientSession(connector=connector) as http:
                async with http.get(f"{base}/ipxe?mac={MAC}&arch=x86_64") as resp:
                    script = await resp.text()
                token = script.split("?token=", 1)[1].split()[0]
                body = {"mac": MAC, "token": token, "addresses": ["127.0.0.1"]}
                async with http.post(f"{base}/api/v1/register", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    answer: dict[str, Any] = await resp.json()
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            events = await store.list_events(stored.id)
            return {"answer": answer, "ipv4": stored.ipv4, "event": events[-1]}
        finally:
            await runner.cleanup()
            await service.boot.drain()
            await service.store.close()

    out = in_namespace(namespace, scenario)
    assert out["answer"]["ipv4"] == "192.0.2.60" and out["ipv4"] == "192.0.2.60"
    event = out["event"]
    assert event.kind == "registered" and event.data["peer"] == "192.0.2.60"
    assert event.data["refused"] == [{"address": "127.0.0.1", "reason": "loopback",
                                      "source": "reported"}]
