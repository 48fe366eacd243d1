"""The plain HTTP listener from a device's address (192.0.2.60) and from loopback, with
netboot's real listeners (plain and HTTPS) in a network namespace this test creates
(tests.netns).

The aiohttp test client always connects from 127.0.0.1, which the default policy
(``http.plain_api: loopback``) trusts; these tests show what a peer on the provisioning
network gets: firmware and installer routes over plain HTTP, the API and the dashboard only
over HTTPS, and a token sent in clear refused without being looked at.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netboot.config import load
from netboot.model import Cluster, MacAddress, Machine, Profile, Role
from netboot.service import Service, build
from tests.conftest import write_config
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:00:60:02"
DEVICE = "192.0.2.60"
SERVER = "192.0.2.10"  # the advertised address, which the certificate names


async def started(tmp_path: Path, http: str = "") -> tuple[Service, str]:
    """netboot's own listeners on every address of the namespace; its admin token."""
    cfg = load(write_config(tmp_path, http=http), env={})
    cfg = replace(cfg, https=replace(cfg.https, listen="0.0.0.0"))
    service = await build(cfg)
    try:
        await service.start()
    except BaseException:
        await service.close()
        raise
    service.base_url = f"http://{SERVER}:{service.http_port}"
    service.url_holder["https"] = f"https://{SERVER}:{service.https_port}"
    return service, (cfg.data_dir / "admin.token").read_text().strip()


def session(service: Service, source: str) -> aiohttp.ClientSession:
    """A client bound to ``source`` that trusts netboot's CA and follows no redirects."""
    assert service.tls is not None
    context = ssl.create_default_context(cadata=service.tls.ca_pem)
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=context)
    return aiohttp.ClientSession(connector=connector)


async def answer(resp: aiohttp.ClientResponse) -> tuple[int, Any]:
    if resp.content_type == "application/json":
        return resp.status, await resp.json()
    return resp.status, resp.headers.get("Location") or await resp.text()


def test_a_device_gets_firmware_routes_over_http_and_the_api_only_over_https(
        namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="netboot.http")

    async def scenario() -> dict[str, Any]:
        service, admin = await started(tmp_path)
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t"))
            await store.put_profile(Profile(name="p", kernel="vmlinuz"))
            await store.create_machine(Machine(macs=(MacAddress.parse(MAC),), hostname="d1",
                                               cluster="edge", role=Role.SERVER, profile="p"))
            plain = service.base_url
            https = service.url_holder["https"]
            bearer = {"Authorization": f"Bearer {admin}"}
            async with session(service, DEVICE) as http:
                get = {"allow_redirects": False}
                # What firmware and the installer use stays on plain HTTP.
                async with http.get(f"{plain}/healthz") as r:
                    out["healthz"] = r.status
                async with http.get(f"{plain}/boot.ipxe") as r:
                    out["boot.ipxe"] = r.status
                async with http.get(f"{plain}/assets/vmlinuz") as r:
                    out["kernel"] = r.status
                async with http.get(f"{plain}/metrics") as r:
                    out["metrics"] = r.status
                async with http.get(f"{plain}/ipxe?mac={MAC}&arch=x86_64") as r:
                    token = (await r.text()).split("?token=", 1)[1].split()[0]
                async with http.get(f"{plain}/config/{MAC.replace(':', '-')}?token={token}"
                                    ) as r:
                    out["config"] = r.status
                async with http.post(f"{plain}/api/v1/machines/{MAC}/events",
                                     json={"kind": "installing"},
                                     headers={"Authorization": f"Bearer {token}"}) as r:
                    out["event by install token"] = r.status
                # The API and the dashboard: refused, or sent to HTTPS.
                async with http.get(f"{plain}/api/v1/machines?state=booting") as r:
                    out["api, no token"] = await answer(r)
                async with http.get(f"{plain}/", **get) as r:
                    out["dashboard"] = await answer(r)
                async with http.get(f"{plain}/login?next=1", **get) as r:
                    out["login page"] = await answer(r)
                async with http.get(f"{plain}/api/v1/machines", headers=bearer) as r:
                    out["api, admin token"] = await answer(r)
                async with http.post(f"{plain}/api/v1/machines/{MAC}/events", headers=bearer,
                                     json={"kind": "failed"}) as r:
                    out["event by admin token"] = await answer(r)
                async with http.post(f"{plain}/api/v1/machines/{MAC}/events",
                                     headers={"Authorization": "Bearer not-its-token"},
                                     json={"kind": "failed"}) as r:
                    out["event by a wrong token"] = await answer(r)
                async with http.post(f"{plain}/login", data={"token": admin}, **get) as r:
                    out["login"] = await answer(r)
                async with http.get(f"{plain}/", cookies={"netboot_session": admin},
                                    **get) as r:
                    out["dashboard with a session cookie"] = await answer(r)
                out["token after plain"] = [t.last_used for t in await store.list_tokens()]
                async with http.get(f"{plain}/metrics") as r:
                    out["metrics text"] = await r.text()
                # Over HTTPS the same peer and token are served.
                async with http.get(f"{https}/api/v1/machines", headers=bearer) as r:
                    out["https api"] = r.status
                out["token after https"] = [t.last_used for t in await store.list_tokens()]
            local = f"http://127.0.0.1:{service.http_port}/api/v1/machines"
            async with session(service, "127.0.0.1") as http, http.get(
                    local, headers=bearer) as r:
                out["loopback api"] = r.status
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["state"] = stored.state
        finally:
            await service.close()
        out["https"] = https
        return out

    out = in_namespace(namespace, scenario)
    https = out["https"]
    assert out["healthz"] == out["boot.ipxe"] == out["kernel"] == out["metrics"] == 200
    assert out["config"] == 200 and out["event by install token"] == 201
    assert out["state"] == "installing"  # the installer's report was taken
    assert out["api, no token"] == (403, {
        "error": "the API over plain HTTP is refused (http.plain_api: loopback): use "
                 f"{https}/api/v1/machines?state=booting",
        "https_url": f"{https}/api/v1/machines?state=booting"})
    assert out["dashboard"] == (308, f"{https}/")
    assert out["login page"] == (308, f"{https}/login?next=1")
    for key, url in (("api, admin token", "/api/v1/machines"),
                     ("event by admin token", f"/api/v1/machines/{MAC}/events")):
        status, body = out[key]
        assert status == 403 and body["https_url"] == f"{https}{url}", out[key]
        assert "carrying an API token" in body["error"]
    # A bearer that is not an API token, on the device's own route: not this machine's
    # install token, so it would need an operator's token, which is taken over HTTPS only.
    status, body = out["event by a wrong token"]
    assert status == 403 and body["https_url"] == f"{https}/api/v1/machines/{MAC}/events"
    status, body = out["login"]
    assert status == 403 and "a dashboard login" in body["error"], out["login"]
    assert out["dashboard with a session cookie"] == (308, f"{https}/")
    # Never looked up: the admin token was not even marked as used until HTTPS.
    assert out["token after plain"] == [None]
    assert out["https api"] == 200 and out["token after https"][0] is not None
    assert out["loopback api"] == 200
    # Four credentials in clear (token twice, login, cookie): counted, and one log line.
    assert 'netboot_errors_total{kind="http_plaintext_credential"} 4.0' in out["metrics text"]
    leaks = [r.getMessage() for r in caplog.records if "over plain HTTP" in r.getMessage()]
    assert len(leaks) == 1 and DEVICE in leaks[0] and "revoke and replace it" in leaks[0]
    assert admin_not_in(leaks[0], tmp_path)


def test_a_loopback_https_url_sends_a_remote_client_to_the_address_it_reached(
        namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A host without a default route and no --advertise advertises 127.0.0.1: a device was
    # sent to https://127.0.0.1:8443/…, which on its side is itself (s35-user). It is sent to
    # the address it came in on; this host's own clients keep the configured URL.
    caplog.set_level(logging.WARNING, logger="netboot.http")

    async def scenario() -> dict[str, Any]:
        service, admin = await started(tmp_path)
        loopback = f"https://127.0.0.1:{service.https_port}"
        service.url_holder["https"] = loopback
        reached = f"https://{SERVER}:{service.https_port}"
        out: dict[str, Any] = {"reached": reached, "loopback": loopback}
        try:
            async with session(service, DEVICE) as http:
                plain = f"http://{SERVER}:{service.http_port}"
                async with http.get(f"{plain}/login?next=1", allow_redirects=False) as r:
                    out["page"] = await answer(r)
                async with http.get(f"{plain}/api/v1/machines") as r:
                    out["api"] = await answer(r)
                async with http.get(f"{plain}/api/v1/machines",
                                    headers={"Authorization": f"Bearer {admin}",
                                             "Host": "evil.example"}) as r:
                    out["api with a token"] = await answer(r)
                # Where it was sent is served: the certificate names the address.
                async with http.get(f"{reached}/healthz") as r:
                    out["there"] = r.status
        finally:
            await service.close()
        return out

    out = in_namespace(namespace, scenario)
    reached = out["reached"]
    assert out["page"] == (308, f"{reached}/login?next=1")
    status, body = out["api"]
    assert status == 403 and body["https_url"] == f"{reached}/api/v1/machines", body
    status, body = out["api with a token"]
    assert status == 403 and body["https_url"] == f"{reached}/api/v1/machines", body
    assert out["there"] == 200
    leaks = [r.getMessage() for r in caplog.records if "over plain HTTP" in r.getMessage()]
    assert len(leaks) == 1 and f"point the client at {reached}" in leaks[0], leaks


def admin_not_in(line: str, tmp_path: Path) -> bool:
    return (tmp_path / "data" / "admin.token").read_text().strip() not in line


@pytest.mark.parametrize(("mode", "local", "device"), [
    ("loopback", 200, 403),  # this host: 127.0.0.1, and its own address to itself
    ("refuse", 403, 403),
    ("allow", 200, 200),
])
def test_plain_api_setting(namespace: str, tmp_path: Path, mode: str, local: int,
                           device: int) -> None:
    async def scenario() -> dict[str, int]:
        service, admin = await started(tmp_path, http=f"  plain_api: {mode}\n")
        bearer = {"Authorization": f"Bearer {admin}"}
        out = {}
        try:
            for source, host in (("127.0.0.1", "127.0.0.1"), (SERVER, SERVER),
                                 (DEVICE, SERVER)):
                base = f"http://{host}:{service.http_port}"
                async with session(service, source) as http:
                    async with http.get(f"{base}/api/v1/machines", headers=bearer) as r:
                        out[source] = r.status
                    async with http.get(f"{base}/boot.ipxe") as r:
                        out[source + " boot.ipxe"] = r.status
        finally:
            await service.close()
        return out

    out = in_namespace(namespace, scenario)
    assert out == {"127.0.0.1": local, SERVER: local, DEVICE: device,
                   "127.0.0.1 boot.ipxe": 200, f"{SERVER} boot.ipxe": 200,
                   f"{DEVICE} boot.ipxe": 200}


def test_listen_on_every_ipv6_address_serves_ipv4_devices_too(
        namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``http.listen: "::"`` was IPv6 only (asyncio sets IPV6_V6ONLY whatever
    net.ipv6.bindv6only says): a device at 192.0.2.60 was refused. "::" now means every
    address, as nginx's ``listen [::]:80 ipv6only=off``: IPv4 and IPv6 clients are served
    on one port, and an IPv4 peer is its IPv4 address (192.0.2.60, not ::ffff:192.0.2.60)."""
    caplog.set_level(logging.INFO, logger="netboot.access")

    async def scenario() -> dict[str, Any]:
        service, _ = await started(tmp_path, http='  listen: "::"\n')
        out: dict[str, Any] = {"bound": sorted(s.getsockname()[0]
                                               for s in service.listeners[0].sockets)}
        try:
            port = service.http_port
            for source, server in ((DEVICE, SERVER), ("::1", "::1")):
                connector = aiohttp.TCPConnector(local_addr=(source, 0))
                async with aiohttp.ClientSession(connector=connector) as http:
                    url = f"http://{'[::1]' if ':' in server else server}:{port}/healthz"
                    try:
                        async with http.get(url) as resp:
                            out[server] = resp.status
                    except aiohttp.ClientError as exc:
                        out[server] = type(exc).__name__
        finally:
            await service.close()
        return out

    got = in_namespace(namespace, scenario)
    assert got == {"bound": ["0.0.0.0", "::"], SERVER: 200, "::1": 200}, got
    lines = [r.getMessage() for r in caplog.records if r.name == "netboot.access"]
    assert any(line.startswith(f"{DEVICE} GET /healthz 200") for line in lines), lines
