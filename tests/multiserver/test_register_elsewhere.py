"""A device whose server died for good after serving its config registers through the other.

Two real ``netboot serve`` processes, A (192.0.2.1) and B (192.0.2.2), on one PostgreSQL
(Debian's, tests/pg.py, over its Unix socket), in a network namespace of the test's own; the
device (192.0.2.60) in a second one, joined to the first by a veth pair made inside them.
Nothing touches the host's interfaces. No site setting names the servers: each records its
base URL in the inventory and learns the other's from it (netboot.inventory.peers). The
device fetches its install script and its k3OS config from A, A is killed with SIGKILL (its
own PID) and stays dead, and the device runs the config's register command under busybox
``sh`` with busybox ``wget`` (no curl): it is registered through B, in its cluster, with its
address. Before session 48 the config named A alone and the device retried A for an hour.

Cost: two servers started (5-30 s on a loaded 2-core machine), one register command (A's
refused connection, then B's answer: under a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests import pg
from tests.device import device_shell
from tests.multiserver.conftest import Inventory, server_config
from tests.multiserver.test_storm_kill import Host
from tests.netns import in_namespace, ip

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:48:0a:01"
DEVICE = "192.0.2.60"
# How long the servers may take to tell each other (a readiness bound, not a timed
# assertion: the record is read at B's start, and told to A by the change feed).
KNOWN_SECONDS = 60
IP = shutil.which("ip") or "ip"


@pytest.fixture
def link() -> Iterator[tuple[str, str]]:
    """The servers' namespace (192.0.2.1, 192.0.2.2) and the device's (192.0.2.60), one
    veth pair between them, made inside them."""
    with linked((("192.0.2.1/24", "192.0.2.2/24"), f"{DEVICE}/24")) as both:
        yield both


@contextlib.contextmanager
def linked(*links: tuple[tuple[str, ...], str]) -> Iterator[tuple[str, str]]:
    """The servers' namespace and the device's, one veth pair made inside them per link
    (``nbsN`` with the servers' addresses, ``nbdN`` with the device's), deleted after."""
    tag = secrets.token_hex(3)
    servers, device = f"nbt-{tag}-s", f"nbt-{tag}-d"
    made = []
    try:
        for ns in (servers, device):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for n, (nets, device_address) in enumerate(links):
            ip("-n", servers, "link", "add", f"nbs{n}", "type", "veth", "peer", "name",
               f"nbd{n}", "netns", device)
            for ns, dev, addresses in ((servers, f"nbs{n}", nets),
                                       (device, f"nbd{n}", (device_address,))):
                for address in addresses:
                    ip("-n", ns, "addr", "add", address, "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
        yield servers, device
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def first_server(mac: str, hostname: str, cluster: str = "edge",
                 profile: bool = True) -> list[tuple[str, dict[str, Any]]]:
    """The API's POSTs that enroll ``mac`` as managed cluster ``cluster``'s first server, with
    the k3OS profile (made first unless ``profile`` is False): what its config is made of."""
    return [*([("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                     "initrds": ["initrd.img"],
                                     "config_template": "k3os"})] if profile else []),
            ("/api/v1/clusters", {"name": cluster, "server_url": "managed"}),
            ("/api/v1/machines", {"mac": mac, "hostname": hostname, "cluster": cluster,
                                  "role": "server", "profile": "k3os"})]


async def started(a: Host, b: Host) -> dict[str, str]:
    """A started, then B with A's secrets key (as an operator copies it to the second
    host): the admin's Authorization header (the inventory's token, in A's data dir)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, a.start)
    b.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(a.data_dir / "secret.key", b.data_dir / "secret.key")
    await loop.run_in_executor(None, b.start)
    return {"Authorization": f"Bearer {(a.data_dir / 'admin.token').read_text().strip()}"}


async def stopped(a: Host, b: Host) -> str:
    """Both stopped (SIGTERM, each by its own PID; one already gone is left): their logs."""
    logs = f"--- a\n{a.log()}\n--- b\n{b.log()}"
    loop = asyncio.get_running_loop()
    await asyncio.gather(loop.run_in_executor(None, a.stop), loop.run_in_executor(None, b.stop))
    return logs


def caller(http: aiohttp.ClientSession, auth: dict[str, str],
           ) -> Callable[..., Awaitable[tuple[int, Any]]]:
    """``call(server, method, path, body=None, *, admin=True)``: the status and the JSON or
    text of a request to ``server`` (with the admin's ``auth`` unless ``admin`` is False)."""
    async def call(server: Host, method: str, path: str, body: Any = None,
                   *, admin: bool = True) -> tuple[int, Any]:
        async with http.request(method, server.base + path, json=body,
                                headers=auth if admin else {}) as resp:
            return resp.status, (await resp.json()
                                 if resp.content_type == "application/json"
                                 else await resp.text())
    return call


async def heard(a: Host, b: Host) -> bool:
    """Whether A learned of B from the inventory (B recorded itself at its start; A's change
    feed tells it), as A's log says, within KNOWN_SECONDS."""
    told = f"besides this one ({a.base}), which devices register through when it is gone: " \
           f"{b.base}"
    deadline = time.monotonic() + KNOWN_SECONDS
    while told not in a.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return told in a.log()


def server_at(tmp: Path, name: str, host: str, inventory: Inventory, ns: str) -> Host:
    """The pair's server ``name`` on ``host`` in the namespace ``ns``, advertising it. Its
    API answers plain HTTP from any peer: the test's calls come from the device's namespace,
    not loopback (the namespaces are the test's own; no other host can reach them)."""
    made = server_config(tmp, name, inventory)
    made.config.write_text(made.config.read_text()
                           .replace("  advertise: 192.0.2.10\n", f"  advertise: {host}\n")
                           .replace("  listen: 127.0.0.1\nhttps:",
                                    f"  listen: {host}\n  plain_api: allow\nhttps:"))
    return Host(name, made.config, made.data_dir, netns=ns, host=host)


def test_a_device_whose_server_died_after_its_config_registers_through_the_other(
        tmp_path: Path, postgres: pg.Cluster, link: tuple[str, str]) -> None:
    servers_ns, device_ns = link
    shell, env = device_shell(tmp_path)
    root = tmp_path / "device-root"

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        async with pg.fresh_schema(postgres) as dsn:
            shared = Inventory("postgresql", f"  backend: postgresql\n  dsn: {dsn!r}\n")
            a = server_at(tmp_path, "a", "192.0.2.1", shared, servers_ns)
            b = server_at(tmp_path, "b", "192.0.2.2", shared, servers_ns)
            try:
                auth = await started(a, b)
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=30)) as http:
                    call = caller(http, auth)
                    for path, body in first_server(MAC, "edge-s1"):
                        status, answer = await call(a, "POST", path, body)
                        assert status == 201, (path, status, answer)
                    out["a knew b"] = await heard(a, b)
                    # The device's install, from A: its script (the install token), its config.
                    status, script = await call(a, "GET", f"/ipxe?mac={MAC}&arch=x86_64",
                                                admin=False)
                    assert status == 200 and "?token=" in script, script
                    token = script.split("?token=", 1)[1].split()[0]
                    status, text = await call(a, "GET", f"/config/{MAC.replace(':', '-')}"
                                              f"?token={token}", admin=False)
                    assert status == 200, text
                    command = yaml.safe_load(text)["run_cmd"][0]
                    out["urls"] = (a.base, b.base, command)
                    # A dies for good: SIGKILL to its own PID, never started again.
                    assert a.proc is not None
                    out["a pid"] = a.proc.pid
                    a.proc.kill()
                    await loop.run_in_executor(None, a.proc.wait, 30)
                    # The installed system's first boot: the config's run_cmd, as served but
                    # for its root (the test's directory) and its waits (at most 5 tries of
                    # both servers, 1 s apart: one that never registers gives up).
                    command = (command.replace("/var/lib/netboot", str(root))
                               .replace("n=360", "n=5").replace("sleep 10", "sleep 1"))
                    proc = await asyncio.create_subprocess_exec(
                        IP, "netns", "exec", device_ns, *shell, command,
                        env=env, stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.STDOUT)
                    printed, _ = await asyncio.wait_for(proc.communicate(), 120)
                    out["run"] = (proc.returncode, printed.decode(errors="replace"))
                    out["machine"] = (await call(b, "GET", f"/api/v1/machines/{MAC}"))[1]
                    out["events"] = (await call(b, "GET",
                                                f"/api/v1/machines/{MAC}/events"))[1]
                    out["b health"] = await call(b, "GET", "/healthz", admin=False)
            finally:
                out["logs"] = await stopped(a, b)
        return out

    # The test's side (its API calls, the device's fetches) from the device's namespace.
    out = in_namespace(device_ns, scenario, seconds=300)
    logs = out["logs"]
    status, printed = out["run"]
    machine = out["machine"]
    # The outcome first: registered through B, in its cluster, with the device's address.
    assert machine["state"] == "registered", (machine, printed, logs)
    assert machine["cluster"] == "edge" and machine["ipv4"] == DEVICE, machine
    events = out["events"]
    events = events["events"] if isinstance(events, dict) else events
    registered = [e for e in events if e["kind"] == "registered"]
    assert len(registered) == 1 and registered[0]["data"]["peer"] == DEVICE, events
    assert status == 0, (printed, logs)
    assert (root / "registered").exists()
    assert (root / "machine-token").read_text().strip()
    assert out["b health"][0] == 200, out["b health"]
    # How: A knew B from the inventory, and the config names A (which rendered it), then B;
    # A's connection refused, B's taken.
    assert out["a knew b"], logs
    a_base, b_base, command = out["urls"]
    assert f"{a_base}/api/v1/register" in command and f"{b_base}/api/v1/register" in command
    assert command.index(a_base) < command.index(b_base), command
    assert "Connection refused" in printed, printed
