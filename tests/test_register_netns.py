"""Registration over a real socket from 192.0.2.60, claiming a loopback address.

The aiohttp test client always connects from 127.0.0.1, which cannot show that the peer wins
over what a device claims. Here netboot's HTTP server and the "device" run in a network
namespace this test creates (tests.netns: 192.0.2.1 and 192.0.2.60 on its loopback
interface), entered by one thread. Nothing touches the host's interfaces.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from netboot.config import load
from netboot.content import register_command
from netboot.model import Cluster, MacAddress, Machine, Profile, Role
from netboot.service import Service, build
from tests.conftest import write_config
from tests.device import device_shell
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:00:60:01"


async def _served(service: Service, runner: web.AppRunner) -> int:
    """Profile ``p`` and server MAC (s1, cluster edge) in the inventory, and netboot's HTTP
    on 192.0.2.1: its port."""
    await service.store.put_profile(Profile(name="p", kernel="vmlinuz"))
    await service.store.create_machine(Machine(macs=(MacAddress.parse(MAC),), hostname="s1",
                                               cluster="edge", role=Role.SERVER, profile="p"))
    await runner.setup()
    await web.TCPSite(runner, "192.0.2.1", 0).start()
    port: int = runner.addresses[0][1]
    service.base_url = f"http://192.0.2.1:{port}"
    return port


def test_register_from_192_0_2_60_claiming_loopback_records_192_0_2_60(
        namespace: str, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        service = await build(load(write_config(tmp_path), env={}))
        runner = web.AppRunner(service.app)
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t"))
            await _served(service, runner)
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
            service.content.close()
            await service.store.close()

    out = in_namespace(namespace, scenario)
    assert out["answer"]["ipv4"] == "192.0.2.60" and out["ipv4"] == "192.0.2.60"
    event = out["event"]
    assert event.kind == "registered" and event.data["peer"] == "192.0.2.60"
    assert event.data["refused"] == [{"address": "127.0.0.1", "reason": "loopback",
                                      "source": "reported"}]


def test_a_device_that_reported_its_new_lease_is_not_told_another_host_took_its_install(
        namespace: str, tmp_path: Path) -> None:
    """A device installs and registers at 192.0.2.60; its site DHCP lease gone, its installed
    OS reports 192.0.2.10 with its machine token ("address changed"). Each later network
    boot from there was told, in its script and a local-boot event, "its install was served
    to 192.0.2.60 ...: if this device never installed, another host took its install;
    'netboot machines reinstall ...'", an alarm whose advice installs a healthy node over
    (s47-review). The trace is for a boot from an address the machine never proved: from
    192.0.2.1 it is still said."""
    async def scenario() -> dict[str, Any]:
        service = await build(load(write_config(tmp_path), env={}))
        runner = web.AppRunner(service.app)
        try:
            await service.store.put_cluster(Cluster(name="edge", token="t"))
            await _served(service, runner)
            base = service.base_url

            async def at(source: str, path: str, body: Any = None) -> str:
                connector = aiohttp.TCPConnector(local_addr=(source, 0))
                async with aiohttp.ClientSession(connector=connector) as http, \
                        http.request("POST" if body else "GET", base + path,
                                     json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    return await resp.text()

            boot = f"/ipxe?mac={MAC}&arch=x86_64"
            token = (await at("192.0.2.60", boot)).split("?token=", 1)[1].split()[0]
            await at("192.0.2.60", f"/config/{MAC.replace(':', '-')}?token={token}")
            answer = json.loads(await at("192.0.2.60", "/api/v1/register", {
                "mac": MAC, "token": token, "keeps": "machine_token"}))
            await at("192.0.2.10", "/api/v1/register",
                     {"mac": MAC, "machine_token": answer["machine_token"]})
            scripts = [await at(source, boot) for source in ("192.0.2.10", "192.0.2.1")]
            await service.boot.drain()
            stored = await service.store.machine_by("mac", MAC)
            assert stored is not None
            events = await service.store.list_events(stored.id)
            return {"scripts": scripts, "ipv4": stored.ipv4,
                    "events": [(e.kind, e.message) for e in events]}
        finally:
            await _closed(service, runner, [])

    out = in_namespace(namespace, scenario)
    assert out["ipv4"] == "192.0.2.10"
    moved, stranger = out["scripts"]
    assert "served to" not in moved and moved.rstrip().endswith("exit"), moved
    said = ("its install was served to 192.0.2.60, this request came from 192.0.2.1: if this "
            "device never installed, another host took its install")
    assert said in stranger and stranger.rstrip().endswith("exit"), stranger
    kinds = [kind for kind, _ in out["events"]]
    assert kinds[-4:] == ["registered", "address changed", "local-boot", "local-boot"], kinds
    assert out["events"][-2] == ("local-boot", "registered: boot the local disk")
    assert said in out["events"][-1][1]


class _Proxy:
    """A TCP relay to netboot, from the device's address, that can lose a reply: the
    request reaches netboot whole and netboot answers (its commit is made), then the device's
    connection is closed without that answer, as a dropped link or a reset does."""

    def __init__(self, upstream: tuple[str, int], source: str, drop: int = 0) -> None:
        self.upstream, self.source, self.drop = upstream, source, drop
        self.answered: list[bytes] = []  # netboot's answers, dropped or not

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            *self.upstream, local_addr=(self.source, 0))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            up_writer.write(head + await reader.readexactly(length))
            await up_writer.drain()
            answer = await up_reader.read(1 << 16)  # one small JSON answer
            self.answered.append(answer)
            if self.drop > 0:
                self.drop -= 1  # lost: the device never sees it
            else:
                writer.write(answer)
                await writer.drain()
        finally:
            up_writer.close()
            writer.close()


def _statuses(answers: list[bytes]) -> list[bytes]:
    """The HTTP status of each answer a _Proxy passed back."""
    return [a.split(b" ", 2)[1] for a in answers]


async def _closed(service: Service, runner: web.AppRunner,
                  servers: list[asyncio.Server]) -> None:
    for server in servers:
        server.close()
    await runner.cleanup()
    await service.boot.drain()
    service.content.close()
    await service.store.close()


def _with_a_second_host(namespace: str,
                        scenario: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """``scenario`` run in ``namespace`` with 192.0.2.61 (a clone, a host on the VLAN) on
    its loopback beside tests.netns' three addresses."""
    subprocess.run(["ip", "-n", namespace, "addr", "add", "192.0.2.61/32", "dev", "lo"],
                   check=True)
    out: dict[str, Any] = in_namespace(namespace, scenario)
    return out


def _busybox_sh(tmp_path: Path) -> Callable[[str], Awaitable[tuple[int, bytes]]]:
    """A device's shell: busybox ``sh`` with only the applets the register command names
    (``wget``, no curl) on its PATH; what it prints and its status, bounded to 40 s."""
    shell, env = device_shell(tmp_path)

    async def run(command: str) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *shell, command, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        # communicate: until the pipe closes, so a later boot's background report is over too.
        out, _ = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode is not None
        return proc.returncode, out
    return run


def test_a_registration_whose_answer_is_lost_and_a_later_boots_new_lease(
        namespace: str, tmp_path: Path) -> None:
    """The register command netboot's templates emit, run by busybox sh (no curl) in a
    namespace: its first answer is lost after netboot committed; its retry, from the same
    address with the spent token, is answered as the first (200, the same machine token), so
    it keeps that token and stops. A later boot from a new lease (another address) reports it
    with the machine token: the machine's address and its cluster's DNS endpoint follow; a
    boot after that from the same address writes nothing. (Before s37-register the retry was
    a 409 for an hour and the new lease was never seen.)"""
    run = _busybox_sh(tmp_path)
    root = tmp_path / "root"

    async def scenario() -> dict[str, Any]:
        path = write_config(tmp_path / "cfg", "dns:\n  enabled: true\n  zone: netboot.lan\n")
        service = await build(load(path, env={}))
        runner = web.AppRunner(service.app)
        servers: list[asyncio.Server] = []
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t", server_url="managed"))
            port = await _served(service, runner)
            connector = aiohttp.TCPConnector(local_addr=("192.0.2.60", 0))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get(f"{service.base_url}/ipxe?mac={MAC}&arch=x86_64") as resp:
                script = await resp.text()
            token = script.split("?token=", 1)[1].split()[0]

            async def device_at(address: str, drop: int = 0) -> tuple[_Proxy, str]:
                proxy = _Proxy(("192.0.2.1", port), address, drop)
                server = await asyncio.start_server(proxy.handle, address, 0)
                servers.append(server)
                url = f"http://{address}:{server.sockets[0].getsockname()[1]}/api/v1/register"
                # As rendered, with the device's root in the test's directory and its waits
                # short: bounded to 5 tries of 1 s, so that a 409 gives up in seconds.
                command = (register_command(url, MAC, token, "s1")
                           .replace("/var/lib/netboot", str(root))
                           .replace("n=360", "n=5").replace("sleep 10", "sleep 1"))
                return proxy, command

            # First boot: the first answer is lost after netboot committed.
            proxy, command = await device_at("192.0.2.60", drop=1)
            out["first"] = await run(command)
            out["first answers"] = list(proxy.answered)
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["token"] = stored.install_token
            out["first ipv4"] = stored.ipv4
            out["first events"] = [e.kind for e in await store.list_events(stored.id)]
            # A later boot, from a new lease.
            proxy, command = await device_at("192.0.2.10")
            out["later"] = await run(command)
            out["later answers"] = list(proxy.answered)
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["later ipv4"] = stored.ipv4
            out["endpoint"] = (await service._build_zone()).endpoints.get("edge", ())
            out["later events"] = [e for e in await store.list_events(stored.id)]
            # And the boot after, from the same lease: nothing moves, no event.
            proxy, command = await device_at("192.0.2.10")
            out["again"] = await run(command)
            out["again answers"] = list(proxy.answered)
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["again events"] = len(await store.list_events(stored.id))
            out["again updated"] = stored.updated
            return out
        finally:
            for server in servers:
                server.close()
            await runner.cleanup()
            await service.boot.drain()
            service.content.close()
            await service.store.close()

    out = in_namespace(namespace, scenario)
    status, printed = out["first"]
    assert status == 0, printed
    answers = [a.split(b" ", 2)[1] for a in out["first answers"]]
    assert answers == [b"200", b"200"], out["first answers"]  # the lost one, its repeat
    assert (root / "registered").exists()
    assert (root / "machine-token").read_text() == out["token"] and out["token"]
    assert (root / "machine-token").stat().st_mode & 0o077 == 0
    assert out["first ipv4"] == "192.0.2.60"
    kinds = out["first events"]
    assert kinds.count("registered") == 1 and kinds[-1] == "registration repeated", kinds

    status, printed = out["later"]
    assert status == 0, printed
    assert [a.split(b" ", 2)[1] for a in out["later answers"]] == [b"200"]
    assert out["later ipv4"] == "192.0.2.10" and out["endpoint"] == ("192.0.2.10",)
    moved = out["later events"][-1]
    assert moved.kind == "address changed" and "192.0.2.60 -> 192.0.2.10" in moved.message
    assert [e.kind for e in out["later events"]].count("registered") == 1

    status, printed = out["again"]
    assert status == 0 and [a.split(b" ", 2)[1] for a in out["again answers"]] == [b"200"]
    assert out["again events"] == len(out["later events"])


def test_a_lost_answer_retried_from_a_new_lease_registers_there(
        namespace: str, tmp_path: Path) -> None:
    """The register command as rendered, under busybox sh + wget: its answer is lost after
    netboot committed, and the device's lease changes before it tries again (its retry, or
    k3OS's run_cmd at the next boot, from 192.0.2.10). Within the hour that is taken as the
    device: 200 with the machine token, which it keeps, and the machine, its DNS name and its
    cluster's endpoint move to 192.0.2.10. (Before s38-journey: 409s until a reinstall.)"""
    run = _busybox_sh(tmp_path)
    root = tmp_path / "root"
    machine_id = tmp_path / "machine-id"  # the device's /etc/machine-id, what it proves with
    machine_id.write_text("5f3a8c0e2b7d4e61a9c0d1e2f3a4b5c6\n")

    async def scenario() -> dict[str, Any]:
        path = write_config(tmp_path / "cfg", "dns:\n  enabled: true\n  zone: netboot.lan\n")
        service = await build(load(path, env={}))
        runner = web.AppRunner(service.app)
        servers: list[asyncio.Server] = []
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t", server_url="managed"))
            port = await _served(service, runner)
            connector = aiohttp.TCPConnector(local_addr=("192.0.2.60", 0))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get(f"{service.base_url}/ipxe?mac={MAC}&arch=x86_64") as resp:
                script = await resp.text()
            token = script.split("?token=", 1)[1].split()[0]

            async def device_at(address: str, drop: int = 0) -> tuple[_Proxy, str]:
                proxy = _Proxy(("192.0.2.1", port), address, drop)
                server = await asyncio.start_server(proxy.handle, address, 0)
                servers.append(server)
                url = f"http://{address}:{server.sockets[0].getsockname()[1]}/api/v1/register"
                # One try a run: the lease changes between the first and the next.
                command = (register_command(url, MAC, token, "s1")
                           .replace("/var/lib/netboot", str(root))
                           .replace("/etc/machine-id", str(machine_id))
                           .replace("n=360", "n=1").replace("sleep 10", "sleep 1"))
                return proxy, command

            proxy, command = await device_at("192.0.2.60", drop=1)
            out["first"] = await run(command)
            out["first answers"] = list(proxy.answered)
            out["kept after the first"] = (root / "machine-token").exists()
            proxy, command = await device_at("192.0.2.10")
            out["retry"] = await run(command)
            out["retry answers"] = list(proxy.answered)
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["token"] = stored.install_token
            out["ipv4"] = stored.ipv4
            out["endpoint"] = (await service._build_zone()).endpoints.get("edge", ())
            out["events"] = await store.list_events(stored.id)
            out["machine_id"] = stored.facts.get("machine_id")
            return out
        finally:
            for server in servers:
                server.close()
            await runner.cleanup()
            await service.boot.drain()
            service.content.close()
            await service.store.close()

    out = in_namespace(namespace, scenario)
    assert [a.split(b" ", 2)[1] for a in out["first answers"]] == [b"200"]  # lost
    assert not out["kept after the first"]
    status, printed = out["retry"]
    assert status == 0, printed
    assert [a.split(b" ", 2)[1] for a in out["retry answers"]] == [b"200"], out["retry answers"]
    assert (root / "machine-token").read_text() == out["token"] and out["token"]
    assert out["ipv4"] == "192.0.2.10" and out["endpoint"] == ("192.0.2.10",)
    kinds = [e.kind for e in out["events"]]
    assert kinds.count("registered") == 1 and kinds[-1] == "registration repeated", kinds
    assert "192.0.2.60 -> 192.0.2.10" in out["events"][-1].message
    assert out["machine_id"] == "5f3a8c0e2b7d4e61a9c0d1e2f3a4b5c6"


MAC2 = "52:54:00:00:60:02"


def test_an_installs_secret_proves_its_retries_and_a_clone_or_local_process_gets_nothing(
        namespace: str, tmp_path: Path) -> None:
    """The rendered register command under busybox sh + wget, two machines from one image
    (the same image-baked /etc/machine-id, s38-review2's case). The clone registers. The
    device's first answer is lost. Then, in this order: a local process on the device (no
    root: it cannot read the secret, the config's spent token it can) posts from the
    device's address; the clone, holding the device's spent token, runs the device's
    command with its own secret; the device reboots (k3OS: a new machine-id, /var kept) on
    a new lease and retries. The first two get 409s and no machine token (before
    s39-journey: the local process got it, 200); the device gets 200, keeps the token, and
    moves (before: a 409, its machine-id being the clone's too, until a reinstall)."""
    run = _busybox_sh(tmp_path)
    root, clone_root = tmp_path / "root", tmp_path / "clone"
    image_id, new_id = tmp_path / "machine-id", tmp_path / "machine-id-2"
    image_id.write_text("5f3a8c0e2b7d4e61a9c0d1e2f3a4b5c6\n")
    new_id.write_text("0a1b2c3d4e5f60718293a4b5c6d7e8f9\n")

    async def scenario() -> dict[str, Any]:
        service = await build(load(write_config(tmp_path / "cfg"), env={}))
        runner = web.AppRunner(service.app)
        servers: list[asyncio.Server] = []
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t", server_url="managed"))
            await store.put_cluster(Cluster(name="lab", token="u", server_url="managed"))
            port = await _served(service, runner)
            await store.create_machine(Machine(macs=(MacAddress.parse(MAC2),), hostname="s2",
                                               cluster="lab", role=Role.SERVER, profile="p"))
            tokens = {}
            for mac, at in ((MAC, "192.0.2.60"), (MAC2, "192.0.2.61")):
                connector = aiohttp.TCPConnector(local_addr=(at, 0))
                async with aiohttp.ClientSession(connector=connector) as http, \
                        http.get(f"{service.base_url}/ipxe?mac={mac}&arch=x86_64") as resp:
                    script = await resp.text()
                assert "?token=" in script, script
                tokens[mac] = script.split("?token=", 1)[1].split()[0]

            async def device_at(address: str, mac: str, token: str, home: Path,
                                machine_id: Path, drop: int = 0) -> tuple[_Proxy, str]:
                proxy = _Proxy(("192.0.2.1", port), address, drop)
                server = await asyncio.start_server(proxy.handle, address, 0)
                servers.append(server)
                url = f"http://{address}:{server.sockets[0].getsockname()[1]}/api/v1/register"
                command = (register_command(url, mac, token, "n")
                           .replace("/var/lib/netboot", str(home))
                           .replace("/etc/machine-id", str(machine_id))
                           .replace("n=360", "n=1").replace("sleep 10", "sleep 1"))
                return proxy, command

            proxy, command = await device_at("192.0.2.61", MAC2, tokens[MAC2], clone_root,
                                             image_id)
            out["clone registers"] = (await run(command), list(proxy.answered))
            proxy, command = await device_at("192.0.2.60", MAC, tokens[MAC], root, image_id,
                                             drop=1)
            out["first"] = (await run(command), list(proxy.answered))
            out["secret after the first"] = (root / "install-secret").read_text()
            # A local process at the device's address: the config's token, no secret.
            connector = aiohttp.TCPConnector(local_addr=("192.0.2.60", 0))
            async with aiohttp.ClientSession(connector=connector) as http, http.post(
                    f"{service.base_url}/api/v1/register",
                    json={"mac": MAC, "token": tokens[MAC], "keeps": "machine_token",
                          "machine_id": image_id.read_text().strip()}) as resp:
                out["local"] = (resp.status, await resp.text())
            # The clone with the device's spent token and its own secret (no machine token
            # of its own in the way: another directory holding only its secret).
            attack = tmp_path / "attack"
            attack.mkdir()
            (attack / "install-secret").write_bytes((clone_root / "install-secret").read_bytes())
            proxy, command = await device_at("192.0.2.61", MAC, tokens[MAC], attack, image_id)
            out["clone"] = (await run(command), list(proxy.answered))
            # The device's next boot: a new lease, a new machine-id, /var kept.
            proxy, command = await device_at("192.0.2.10", MAC, tokens[MAC], root, new_id)
            out["retry"] = (await run(command), list(proxy.answered))
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["token"], out["ipv4"] = stored.install_token, stored.ipv4
            out["events"] = await store.list_events(stored.id)
            return out
        finally:
            await _closed(service, runner, servers)

    out = _with_a_second_host(namespace, scenario)
    assert _statuses(out["clone registers"][1]) == [b"200"]
    assert _statuses(out["first"][1]) == [b"200"]  # lost
    secret = out["secret after the first"]
    assert len(secret.strip()) == 36 and (root / "install-secret").stat().st_mode & 0o077 == 0
    assert (clone_root / "install-secret").read_text() != secret
    assert out["local"][0] == 409 and "machine_token" not in out["local"][1], out["local"]
    (_, printed), answers = out["clone"]
    assert _statuses(answers) == [b"409"], (printed, answers)
    assert b"machine_token" not in b"".join(answers)
    assert not (tmp_path / "attack" / "machine-token").exists()
    (status, printed), answers = out["retry"]
    assert status == 0 and _statuses(answers) == [b"200"], (printed, answers)
    assert (root / "machine-token").read_text() == out["token"] and out["token"]
    assert (root / "install-secret").read_text() == secret  # the same one, every try
    assert out["ipv4"] == "192.0.2.10"
    event = out["events"][-1]
    assert event.kind == "registration repeated" and "192.0.2.60 -> 192.0.2.10" in event.message


def test_a_host_that_registered_first_is_told_and_the_device_given_the_machine_by_its_claim(
        namespace: str, tmp_path: Path) -> None:
    """A host on the VLAN (192.0.2.61) with the machine's install token runs its register
    command first: registered, its own secret kept. The real device (192.0.2.60), booting
    its install, runs the same command with its own secret: 409 at each try, and (before
    s40-sec) nothing recorded. Now a "registration contested" event names 192.0.2.60 and the
    claim, the sha256 of the secret the device's busybox made; the operator posts that claim
    (one step, no reinstall); the device's next boot is answered and registered there, and
    the host's later boot with its machine token is refused."""
    import hashlib

    run = _busybox_sh(tmp_path)
    device, host = tmp_path / "device", tmp_path / "host"
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("5f3a8c0e2b7d4e61a9c0d1e2f3a4b5c6\n")
    cfg = load(write_config(tmp_path / "cfg"), env={})

    async def scenario() -> dict[str, Any]:
        service = await build(cfg)
        runner = web.AppRunner(service.app)
        servers: list[asyncio.Server] = []
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t", server_url="managed"))
            port = await _served(service, runner)
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{service.base_url}/ipxe?mac={MAC}&arch=x86_64") as resp:
                script = await resp.text()
            token = script.split("?token=", 1)[1].split()[0]

            async def at(address: str, home: Path) -> tuple[_Proxy, str]:
                proxy = _Proxy(("192.0.2.1", port), address)
                server = await asyncio.start_server(proxy.handle, address, 0)
                servers.append(server)
                url = f"http://{address}:{server.sockets[0].getsockname()[1]}/api/v1/register"
                return proxy, (register_command(url, MAC, token, "n")
                               .replace("/var/lib/netboot", str(home))
                               .replace("/etc/machine-id", str(machine_id))
                               .replace("n=360", "n=2").replace("n=30;", "n=1;")
                               .replace("sleep 10", "sleep 1"))

            for name, address, home in (("host", "192.0.2.61", host),
                                        ("device", "192.0.2.60", device)):
                proxy, command = await at(address, home)
                out[name] = (await run(command), list(proxy.answered))
            out["device kept a token"] = (device / "machine-token").exists()
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["events"] = await store.list_events(stored.id)
            admin = (cfg.data_dir / "admin.token").read_text().strip()
            # What its command sends: $(cat $s), the UUID without its newline.
            claim = hashlib.sha256((device / "install-secret").read_text().strip().encode()
                                   ).hexdigest()
            async with aiohttp.ClientSession() as http, http.post(
                    f"{service.base_url}/api/v1/machines/{MAC}/claim", json={"claim": claim},
                    headers={"Authorization": f"Bearer {admin}"}) as resp:
                out["claim"] = (resp.status, await resp.text())
            for name, address, home in (("device again", "192.0.2.60", device),
                                        ("host again", "192.0.2.61", host)):
                proxy, command = await at(address, home)
                out[name] = (await run(command), list(proxy.answered))
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["token"], out["ipv4"] = stored.install_token, stored.ipv4
            out["claim_made"] = claim
            return out
        finally:
            await _closed(service, runner, servers)

    out = _with_a_second_host(namespace, scenario)
    assert _statuses(out["host"][1]) == [b"200"]
    assert _statuses(out["device"][1]) == [b"409", b"409"], out["device"]
    assert not out["device kept a token"]
    told = [e for e in out["events"] if e.kind == "registration contested"]
    assert len(told) == 1, out["events"]  # two tries from one place: told once
    assert told[0].data == {"peer": "192.0.2.60", "claim": out["claim_made"]}
    assert "192.0.2.61" in told[0].message and out["claim_made"] in told[0].message
    assert (device / "install-secret").read_text().strip() not in told[0].message
    assert out["claim"][0] == 200, out["claim"]
    (status, printed), answers = out["device again"]
    assert status == 0 and _statuses(answers) == [b"200"], (printed, answers)
    assert (device / "machine-token").read_text() == out["token"] and out["token"]
    assert out["ipv4"] == "192.0.2.60"
    assert (host / "machine-token").read_text() != out["token"]
    assert _statuses(out["host again"][1]) == [b"401"], out["host again"]


def _older_register_command(url: str, mac: str, token: str, node_name: str) -> str:
    """The register command netboot rendered before session 37 (content.register_texts at
    c7bd941^, as configs installed then still carry it): a marker file only, the answer
    printed (curl or wget to standard output: k3OS's run_cmd log, cloud-init's
    /var/log/cloud-init-output.log)."""
    marker = "/var/lib/netboot/registered"
    return (f"[ -f {marker} ] || {{ b='{{\"mac\":\"{mac}\",\"token\":\"{token}\","
            "\"hostname\":\"'\"$(hostname)\"'\",\"machine_id\":\"'\"$(cat /etc/machine-id "
            f"2>/dev/null)\"'\",\"node_name\":\"{node_name}\"}}'; i=0; while [ $i -lt 360 ]; do "
            "if command -v curl >/dev/null; "
            f"then curl -fsS -m 30 -H 'Content-Type: application/json' -d \"$b\" {url}; "
            f"else wget -q -O- --header 'Content-Type: application/json' --post-data \"$b\" "
            f"{url}; fi && {{ mkdir -p /var/lib/netboot && touch {marker}; break; }}; "
            "i=$((i+1)); sleep 10; done; }")


def test_an_older_netboots_register_command_stops_and_prints_no_secret(
        namespace: str, tmp_path: Path) -> None:
    """A machine whose config an older netboot rendered (the marker-only register command)
    registering with this one, under busybox sh + wget: its first answer lost, then its
    retry from the same address. Each answer is a 200, so it writes its marker and stops, and
    neither holds the machine token, which that command cannot keep and prints to its boot
    log (cloud-init-output.log is world-readable on most images; whoever reads it could move
    the machine's address). Its registration's event says its later boots will report nothing
    until a reinstall renders the current command. (Before s38-journey: the machine token in
    the printed answer, and nothing told the operator.)"""
    run = _busybox_sh(tmp_path)
    root = tmp_path / "root"

    async def scenario() -> dict[str, Any]:
        service = await build(load(write_config(tmp_path / "cfg"), env={}))
        runner = web.AppRunner(service.app)
        servers: list[asyncio.Server] = []
        out: dict[str, Any] = {}
        try:
            store = service.store
            await store.put_cluster(Cluster(name="edge", token="t"))
            port = await _served(service, runner)
            connector = aiohttp.TCPConnector(local_addr=("192.0.2.60", 0))
            async with aiohttp.ClientSession(connector=connector) as http, \
                    http.get(f"{service.base_url}/ipxe?mac={MAC}&arch=x86_64") as resp:
                script = await resp.text()
            token = script.split("?token=", 1)[1].split()[0]
            proxy = _Proxy(("192.0.2.1", port), "192.0.2.60", drop=1)
            server = await asyncio.start_server(proxy.handle, "192.0.2.60", 0)
            servers.append(server)
            url = f"http://192.0.2.60:{server.sockets[0].getsockname()[1]}/api/v1/register"
            command = (_older_register_command(url, MAC, token, "s1")
                       .replace("/var/lib/netboot", str(root)).replace("sleep 10", "sleep 1"))
            out["status"], out["printed"] = await run(command)
            out["answers"] = list(proxy.answered)
            stored = await store.machine_by("mac", MAC)
            assert stored is not None
            out["state"], out["machine token"] = stored.state, stored.install_token
            out["events"] = await store.list_events(stored.id)
            return out
        finally:
            for server in servers:
                server.close()
            await runner.cleanup()
            await service.boot.drain()
            service.content.close()
            await service.store.close()

    out = in_namespace(namespace, scenario)
    assert out["status"] == 0 and (root / "registered").exists(), out["printed"]
    assert [a.split(b" ", 2)[1] for a in out["answers"]] == [b"200", b"200"], out["answers"]
    assert out["state"] == "registered" and out["machine token"]
    assert b'"state": "registered"' in out["printed"]  # the repeat's answer, printed
    for answer in (out["printed"], *out["answers"]):
        assert out["machine token"].encode() not in answer and b"machine_token" not in answer
    registered = next(e for e in out["events"] if e.kind == "registered")
    assert "netboot machines reinstall" in registered.message, registered.message
