"""Shared fixtures: a real netboot service (SQLite file) behind aiohttp's test client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from netboot.config import Config, load
from netboot.service import Service, build

KERNEL = b"\x7fKERNEL" + bytes(range(256)) * 64  # 16 KiB + 7 bytes of not-quite-random data
INITRD = b"070701" + b"\x00" * 5000


def write_config(tmp: Path, extra: str = "") -> Path:
    assets = tmp / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)
    (assets / "snponly.efi").write_bytes(b"MZ" + b"\x00" * 300)
    (assets / "ipxe.efi").write_bytes(b"MZ" + b"\x01" * 300)
    path = tmp / "netboot.yaml"
    path.write_text(
        f"""server:
  advertise: 192.0.2.10
  data_dir: {tmp / "data"}
http:
  port: 0
dhcp:
  mode: "off"
tftp:
  enabled: false
assets:
  dirs: [{assets}]
{extra}""",
        encoding="utf-8",
    )
    return path


@dataclass
class Env:
    service: Service
    client: TestClient[Any, Any]
    admin: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}

    async def post(self, path: str, body: Any, *, status: int | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        resp = await self.client.post(path, json=body, headers=self.auth
                                      if headers is None else headers)
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        if status is not None:
            assert resp.status == status, (resp.status, data)
        return data

    async def get(self, path: str, *, status: int = 200) -> Any:
        resp = await self.client.get(path)
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        assert resp.status == status, (resp.status, data)
        return data

    async def seed(self, *, role: str = "agent", server_url: str = "https://192.0.2.50:6443",
                   cmdline: str | None = None) -> None:
        cluster: dict[str, Any] = {"name": "edge", "server_url": server_url,
                                   "labels": {"site": "lab"}}
        if server_url != "managed":
            cluster["token"] = "k3s-secret-token"
        await self.post("/api/v1/clusters", cluster, status=201)
        profile: dict[str, Any] = {"name": "k3os", "kernel": "vmlinuz",
                                   "initrds": ["initrd.img"], "config_template": "k3os"}
        if cmdline is not None:
            profile["cmdline"] = cmdline
        await self.post("/api/v1/profiles", profile, status=201)
        await self.post("/api/v1/groups", {"name": "all-x86", "selector": {"arch": ["x86_64"]},
                                           "profile": "k3os", "cluster": "edge", "role": role},
                        status=201)


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[EnvFactory]:
    services: list[Service] = []

    async def factory(extra: str = "", *, sub: str = "a") -> Env:
        cfg: Config = load(write_config(tmp_path / sub, extra), env={})
        service = await build(cfg)
        services.append(service)
        client = await aiohttp_client(service.app)
        token = service.new_admin_token or (cfg.data_dir / "admin.token").read_text().strip()
        service.url_holder["base"] = "http://192.0.2.10:8080"
        return Env(service, client, token)

    yield factory
    for service in services:
        await service.boot.drain()
        await service.store.close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()
