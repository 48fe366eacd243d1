"""A storm through two netboot servers on one PostgreSQL, one of them killed (SIGKILL, its own
PID) while devices are mid-way: every device still ends installed and registered once, in its
cluster, and nothing a client was told is done is lost (issue 10 meets issue 13; s47-ha).

Two real ``netboot serve`` processes (A on 127.0.0.1, B on 127.0.0.2, each with its TFTP and
HTTP on its own address, as two hosts would be) share one inventory on Debian's PostgreSQL
(tests/pg.py). The devices are played here, each as real firmware, iPXE and k3OS do it:

- PXE: the DHCP answer names one server (boot file and next-server); a device takes A's or
  B's by its number, as firmware takes the first offer, and, A dead, only B answers. It
  fetches ``undionly.kpxe`` over TFTP (RFC 1350, 512-byte blocks); a block that does not
  come after 4 tries fails the boot (PXE-E32) and the machine boots again (the BIOS's boot
  order comes round to the NIC again).
- iPXE: DHCP again, ``/boot.ipxe`` from the answering server, whose retry loop chains
  ``/ipxe`` up to 10 times, then reboots (netboot's own bootstrap, content.py). The install
  script's ``kernel``/``initrd`` from the URL it names; one failing fails the script, which
  was ``chain --replace``d over the bootstrap: iPXE exits to the firmware, which boots again.
  A hold ("waiting for cluster") is slept on and ``/boot.ipxe`` chained again from the
  server that held it, as its script does (that failing fails the boot the same way).
- k3OS's installer fetches ``k3os.install.config_url`` (curl: a failure is a failed install;
  the machine boots again), the installed system's ``run_cmd`` registers at the URL its config
  names, every 10 s up to 360 times (netboot's config; k3OS runs ``run_cmd`` at every boot).
  Sleeps are scaled (``SCALE``, x0.02); counts are real. Each device TFTPs from a loopback
  address of its own and reports a documentation address in its registration (the peer,
  loopback, is not one a node could be joined at).

Where the config's URL names A and A is dead: half of those devices' register reaches B (the
site's virtual address moved to B, as keepalived moves it), the other half keep retrying A's
URL until A is started again. The kill happens when chosen devices of A are each at their
stage (gates, not timings): some in the middle of TFTP, some holding an install script from A
but not its config, some installed from A but not registered, some registered by A whose
answer was lost; then three register with A together and A is killed the moment it answers
the first (what it told that device done must be). The other devices run free throughout.
Cost: 6-55 s by the machine's load (two servers, A started again). benchmarks/pair_kill.py
runs the same storm at 1,000 devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from tests import pg
from tests.conftest import write_config
from tests.multiserver.conftest import Server
from tests.ports import reserved_port

# Per cluster: two k3s servers (the first of those to be planned initialises the cluster,
# the other is held until it can join) and agents.
AGENTS = 12  # per cluster; four clusters (the gates below need them), 56 devices
SCALE = 0.02  # real sleeps (iPXE's 5 s, a hold's 15 s, run_cmd's 10 s) times this
TFTP_FILE = b"UNDI" * 4096  # 16 KiB: 32 blocks of 512


def free_port(host: str, kind: int) -> int:
    """A TCP port reserved (tests/ports.py), a UDP one probed."""
    if kind == socket.SOCK_STREAM:
        return reserved_port(host)
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Host(Server):
    """A server on an address of its own, with its TFTP port."""

    host: str = "127.0.0.1"
    tftp: int = 0

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


def storm_server(tmp: Path, name: str, host: str, dsn: str) -> Host:
    where = tmp / name
    config = write_config(where, f"inventory:\n  backend: postgresql\n  dsn: {dsn!r}\n",
                          http=f"  listen: {host}\n")
    text = config.read_text()
    http, tftp = free_port(host, socket.SOCK_STREAM), free_port(host, socket.SOCK_DGRAM)
    # A loopback address advertised: TFTP listens on it only (service.this_host_only).
    text = text.replace("  advertise: 192.0.2.10\n", f"  advertise: {host}\n")
    text = text.replace("http:\n  port: 0\n", f"http:\n  port: {http}\n")
    text = text.replace("tftp:\n  enabled: false\n", f"tftp:\n  port: {tftp}\n")
    config.write_text(text)
    (where / "assets" / "undionly.kpxe").write_bytes(TFTP_FILE)
    return Host(name, config, where / "data", host=host, tftp=tftp)


class Failed(Exception):
    """A step of a boot failed: the machine boots again."""


class _Tftp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.got: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.put_nowait((data, addr))


@dataclass
class Device:
    index: int
    mac: str
    hostname: str
    cluster: str
    role: str
    home: str  # "a" or "b": whose DHCP answer it takes while both answer
    gate: str | None = None  # "tftp", "ipxe", "config": held there until A is killed
    after: int | None = None  # powered on once this device has its install script
    held_at: str | None = None  # its gate, kept
    late: bool = False  # powered on once every gate is reached (benchmarks/pair_kill.py)
    via_vip: bool = False  # its register reaches B once A is dead (the address moved)
    boots: int = 0
    config: dict[str, Any] | None = None  # the k3OS config it installed with
    config_from: str = ""
    register_answers: list[str] = field(default_factory=list)
    registered_via: str = ""
    machine_tokens: list[str] = field(default_factory=list)  # each 200's, lost or kept
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """What it reports as its address: documentation networks (RFC 5737, RFC 3849)."""
        nets = ("192.0.2.", "198.51.100.", "203.0.113.")
        if self.index < 250 * len(nets):
            return f"{nets[self.index // 250]}{self.index % 250 + 1}"
        return f"2001:db8::{self.index:x}"


@dataclass
class Storm:
    a: Host
    b: Host
    http: aiohttp.ClientSession
    admin: str
    killed: asyncio.Event = field(default_factory=asyncio.Event)
    restarted: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # the "acked" devices go
    gated: asyncio.Event = field(default_factory=asyncio.Event)  # every gate reached
    a_pid: int = 0
    scale: float = SCALE
    freeze: bool = False
    frozen: subprocess.Popen[bytes] | None = None
    marks: list[tuple[float, str]] = field(default_factory=list)  # the storm's phases
    at_gate: dict[int, asyncio.Event] = field(default_factory=dict)
    scripted: dict[int, asyncio.Event] = field(default_factory=dict)

    def by_name(self, name: str) -> Host:
        return self.a if name == "a" else self.b

    def answering(self, dev: Device) -> Host:
        """The server whose DHCP answer the device takes: its own while both answer."""
        if self.killed.is_set() and not self.restarted.is_set():
            return self.b
        return self.by_name(dev.home)

    def server_at(self, url: str) -> Host:
        return self.a if f"//{self.a.host}:" in url else self.b

    def kill_a(self) -> None:
        proc, self.a.proc = self.a.proc, None
        assert proc is not None
        self.a_pid = proc.pid
        if self.freeze:  # a host that hangs: its sessions stay open, its locks held
            proc.send_signal(signal.SIGSTOP)
            self.frozen = proc
        else:
            proc.kill()  # SIGKILL, to this process by its own handle
            proc.wait(timeout=30)
        self.killed.set()

    def end_frozen(self) -> None:
        proc, self.frozen = self.frozen, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=30)

    async def gate(self, dev: Device, stage: str) -> None:
        if dev.gate == stage and not self.killed.is_set():
            dev.gate = None
            self.at_gate[dev.index].set()
            await self.killed.wait()

    # -- the device's steps ----------------------------------------------------------------
    async def tftp(self, dev: Device, server: Host) -> None:
        loop = asyncio.get_running_loop()
        # An address of its own, as each device has: netboot's TFTP caps transfers per
        # client address (tftp.max_per_client, 64), which one shared address would reach.
        transport, proto = await loop.create_datagram_endpoint(
            _Tftp, local_addr=(f"127.1.{dev.index // 250}.{dev.index % 250 + 1}", 0))
        try:
            packet = b"\x00\x01undionly.kpxe\x00octet\x00"
            dest: tuple[str, int] = (server.host, server.tftp)
            want, got = 1, b""
            while True:
                for _ in range(4):  # the PXE ROM's retries, then PXE-E32
                    transport.sendto(packet, dest)
                    try:
                        data, addr = await asyncio.wait_for(proto.got.get(), 1)
                    except TimeoutError:
                        continue
                    op, block = struct.unpack("!HH", data[:4])
                    if op == 5:
                        raise Failed(f"tftp error {data[4:]!r}")
                    if op == 3 and block == want:
                        break
                else:
                    raise Failed(f"tftp: block {want} never came")
                got += data[4:]
                dest = addr  # the transfer's own port (RFC 1350 §4)
                if want == 3:
                    await self.gate(dev, "tftp")
                packet = struct.pack("!HH", 4, block)
                if len(data) - 4 < 512:
                    transport.sendto(packet, dest)
                    break
                want += 1
            assert got == TFTP_FILE, (dev.mac, len(got))
        finally:
            transport.close()

    async def get(self, url: str) -> str:
        try:
            async with self.http.get(url) as resp:
                body = await resp.read()
                text = body.decode(errors="replace")
                if resp.status != 200:
                    raise Failed(f"GET {url}: {resp.status} {text[:200]}")
                return text
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Failed(f"GET {url}: {exc!r}") from None

    async def ipxe(self, dev: Device, server: Host) -> str:
        """``/boot.ipxe`` and its chain loop: the install script, or Failed (reboot). A hold's
        script sleeps and chains ``/boot.ipxe`` again, from the URL it names: that failing
        fails the script, and iPXE gives the machine back to the firmware (it boots again)."""
        base = server.base
        holds = 0
        while True:
            bootstrap = await self.get(f"{base}/boot.ipxe")
            chain = re.search(r"chain --autofree --replace (\S+) ", bootstrap)
            assert chain is not None, bootstrap
            url = (chain.group(1).replace("${netX/mac:hexhyp}", dev.mac.replace(":", "-"))
                   .replace("${netboot-arch}", "x86_64"))
            url = re.sub(r"\$\{[^}]*\}", "", url)
            for tries in range(1, 11):
                try:
                    script = await self.get(url)
                    break
                except Failed as exc:
                    dev.log.append(str(exc))
                    if tries == 10:  # "giving up after 10 tries; rebooting"
                        raise
                    await asyncio.sleep(5 * self.scale)
            if "kernel " in script or "waiting" not in script:
                return script  # an install, or (registered) the local disk's exit
            holds += 1
            if holds == 1:
                dev.log.append(f"held by {server.name}: {script[:300]}")
            assert holds < 1000, (dev.mac, script)
            pause = re.search(r"^sleep (\d+)", script, re.M)
            again = re.search(r"^chain --autofree --replace (\S+)/boot\.ipxe$", script, re.M)
            assert pause and again, script
            await asyncio.sleep(int(pause.group(1)) * self.scale)
            base = again.group(1)

    async def install(self, dev: Device) -> None:
        """One boot after another until the machine is installed (its config fetched)."""
        while dev.config is None:
            dev.boots += 1
            assert dev.boots <= 20, (dev.mac, dev.log)
            server = self.answering(dev)
            try:
                await self.tftp(dev, server)
                server = self.answering(dev)  # iPXE's own DHCP
                script = await self.ipxe(dev, server)
                assert "kernel " in script, (dev.mac, script)
                self.scripted[dev.index].set()
                await self.gate(dev, "ipxe")
                kernel = re.search(r"^kernel (\S+) ", script, re.M)
                initrd = re.search(r"^initrd --name \S+ (\S+)", script, re.M)
                config_url = re.search(r"k3os\.install\.config_url=(\S+)", script)
                assert kernel and initrd and config_url, script
                await self.get(kernel.group(1))
                await self.get(initrd.group(1))
                text = await self.get(config_url.group(1))  # k3OS's installer
                dev.config = yaml.safe_load(text)
                dev.config_from = self.server_at(config_url.group(1)).name
            except Failed as exc:
                dev.log.append(f"boot {dev.boots} via {server.name}: {exc}")
                await asyncio.sleep(self.scale)

    async def register(self, dev: Device) -> None:
        """The installed system's run_cmd: POST to the URL its config names, every 10 s."""
        assert dev.config is not None
        line = next(c for c in dev.config["run_cmd"] if "/api/v1/register" in c)
        url = re.search(r"(http://\S+/api/v1/register)", line)
        token = re.search(r'"token":"([^"]+)"', line)
        assert url and token, line
        body = {"mac": dev.mac, "token": token.group(1), "keeps": "machine_token",
                "hostname": dev.hostname, "machine_id": f"{dev.index:032x}",
                "install_secret": f"secret-{dev.index}", "node_name": dev.hostname,
                # What the device says its address is (`netboot register` reports it): the
                # peer here is loopback, not an address a node could be joined at.
                "addresses": [dev.address]}
        await self.gate(dev, "config")
        if dev.gate == "acked":
            dev.gate = None
            self.at_gate[dev.index].set()
            await self.release.wait()
        for _ in range(360):
            target = self.server_at(url.group(1))
            if target is self.a and dev.via_vip and self.killed.is_set():
                target = self.b  # the site's address now answers on B
            try:
                async with self.http.post(f"{target.base}/api/v1/register",
                                          json=body) as resp:
                    text = await resp.text()
                    dev.register_answers.append(f"{target.name} {resp.status}")
                    if resp.status == 200:
                        dev.machine_tokens.append(json.loads(text)["machine_token"])
                        if dev.gate == "answer" and not self.killed.is_set():
                            # Committed by A, which died before the answer reached the
                            # device: curl saw the connection reset, run_cmd tries again.
                            dev.register_answers[-1] = f"{target.name} 200 lost"
                            await self.gate(dev, "answer")
                            continue
                        if dev.held_at == "acked" and target is self.a \
                                and not self.killed.is_set():
                            # The first answer A gives these devices is its last: killed
                            # at once, what it told them done must be.
                            self.kill_a()
                        dev.registered_via = target.name
                        return
                    dev.log.append(f"register via {target.name}: {resp.status} {text[:200]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                dev.register_answers.append(f"{target.name} down")
                dev.log.append(f"register via {target.name}: {exc!r}")
            await asyncio.sleep(10 * self.scale)
        raise AssertionError(f"{dev.mac} never registered: {dev.log}")

    async def run(self, dev: Device) -> None:
        if dev.late:
            await self.gated.wait()
        if dev.after is not None:
            await self.scripted[dev.after].wait()
        await self.install(dev)
        await self.register(dev)


def devices(clusters: int = 4, agents: int = AGENTS, *, late: bool = False) -> list[Device]:
    """Per cluster: its first server (on A), its second one powered on once the first has
    its install script (so that which one initialises is known: the race of two first
    servers is test_pair's), agents (held until the first server registers). ``late``: the
    clusters past the fourth (the gates') are powered on once every gate is reached."""
    assert clusters >= 4 and agents >= 12 and agents % 2 == 0  # the gates below fit
    out: list[Device] = []
    for c in range(clusters):
        cluster = f"c{c}"
        for j in range(2 + agents):
            i = len(out)
            out.append(Device(i, f"52:54:00:47:{c:02x}:{j:02x}", f"{cluster}-n{j}", cluster,
                              "server" if j < 2 else "agent", "a" if i % 2 == 0 else "b",
                              after=i - 1 if j == 1 else None, late=late and c >= 4))
    # Held at their stage until A is killed, all on A: mid-TFTP (agents); holding A's
    # install script but not its config (c1's first server: its cluster-init planned by A;
    # agents of c2); installed from A but not registered (c0's first server: every other
    # node of c0 is held until it registers; agents of c2); registered by A, whose answer
    # never reached them (agents of c3). Of those installed from A, alternately the register
    # reaches B (the site's address moved, as keepalived moves it) or keeps retrying A's
    # URL until A is back. c3's first server and the other nodes run free throughout.
    per = 2 + agents
    gates = {"tftp": [2, per + 4, 2 * per + 6, 3 * per + 8],
             "ipxe": [per, 2 * per + 2, 2 * per + 4],
             "config": [0, 2 * per + 8, 2 * per + 10],
             "answer": [3 * per + 2, 3 * per + 4],
             "acked": [3 * per + 6, 3 * per + 10, 3 * per + 12]}
    for stage, indices in gates.items():
        for k, i in enumerate(indices):
            assert out[i].home == "a"
            out[i].gate = out[i].held_at = stage
            out[i].via_vip = k % 2 == 0 or stage in ("answer", "acked")
    return out


@contextlib.asynccontextmanager
async def running_storm(tmp: Path, dsn: str) -> AsyncIterator[Storm]:
    """Servers A and B on the inventory ``dsn``, B given A's secrets key (as
    tests/multiserver/conftest.py's pair), both stopped at the end (A, if killed, is not)."""
    a = storm_server(tmp, "a", "127.0.0.1", dsn)
    b = storm_server(tmp, "b", "127.0.0.2", dsn)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, a.start)
    try:
        b.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (b.data_dir / "secret.key").write_bytes((a.data_dir / "secret.key").read_bytes())
        (b.data_dir / "secret.key").chmod(0o600)
        await loop.run_in_executor(None, b.start)
        admin = (a.data_dir / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            yield Storm(a, b, http, admin)
    finally:
        await asyncio.gather(loop.run_in_executor(None, a.stop),
                             loop.run_in_executor(None, b.stop))


@pytest.fixture
async def storm(tmp_path: Path, postgres: pg.Cluster) -> AsyncIterator[Storm]:
    async with pg.fresh_schema(postgres) as dsn, running_storm(tmp_path, dsn) as running:
        yield running


async def api(storm: Storm, server: Server, method: str, path: str, body: Any = None,
              status: int = 200) -> Any:
    async with storm.http.request(method, server.base + path, json=body,
                                  headers={"Authorization": f"Bearer {storm.admin}"}) as resp:
        out = await resp.json() if resp.content_type == "application/json" else await resp.text()
        assert resp.status == status, (server.name, method, path, resp.status, out)
        return out


async def healthz(storm: Storm, server: Server) -> tuple[int, str]:
    async with storm.http.get(server.base + "/healthz") as resp:
        return resp.status, await resp.text()


async def seed(storm: Storm, devs: list[Device]) -> None:
    """A profile, the devices' managed clusters, the devices enrolled in one import."""
    await api(storm, storm.a, "POST", "/api/v1/profiles", {
        "name": "k3os", "kernel": "vmlinuz", "initrds": ["initrd.img"],
        "config_template": "k3os"}, status=201)
    for cluster in sorted({d.cluster for d in devs}):
        await api(storm, storm.a, "POST", "/api/v1/clusters",
                  {"name": cluster, "server_url": "managed"}, status=201)
    await api(storm, storm.a, "POST", "/api/v1/machines:bulk", {"machines": [
        {"mac": d.mac, "hostname": d.hostname, "cluster": d.cluster, "role": d.role,
         "profile": "k3os"} for d in devs]}, status=201)
    for d in devs:
        storm.scripted[d.index] = asyncio.Event()
        if d.gate:
            storm.at_gate[d.index] = asyncio.Event()


async def kill_mid_way(storm: Storm, devs: list[Device], *, registered_first: int = 6,
                       bound: float = 60) -> list[tuple[int, str]]:
    """The storm: A killed once every gate is reached and ``registered_first`` devices are
    registered, A started again once all but those retrying its URL are; B's /healthz from
    the kill on."""
    a, b = storm.a, storm.b
    t0 = time.monotonic()

    def mark(what: str) -> None:  # the phases, for a failure's report (not asserted)
        storm.marks.append((time.monotonic() - t0, what))
        print(f"{time.monotonic() - t0:7.2f} s  {what}", flush=True)

    runs = [asyncio.ensure_future(storm.run(d)) for d in devs]
    watcher: asyncio.Future[None] | None = None
    b_health: list[tuple[int, str]] = []
    try:
        def failed() -> None:  # a device that gave up ends the storm at once
            for r in runs:
                if r.done() and r.exception() is not None:
                    r.result()

        for _ in range(int(20 * bound)):  # bounded: 2 x bound
            failed()
            if all(e.is_set() for e in storm.at_gate.values()):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("gates never all reached: " + "\n".join(
                f"{d.mac} gate={d.gate} boots={d.boots} {d.log[-3:]}" for d in devs
                if d.index in storm.at_gate and not storm.at_gate[d.index].is_set()))
        mark("every gate reached")
        storm.gated.set()
        # And the free devices mid-flow: some registered, others on their way.
        for _ in range(int(20 * bound)):  # bounded: 2 x bound
            failed()
            if sum(r.done() for r in runs) >= registered_first:
                break
            await asyncio.sleep(0.1)
        # The "acked" devices register with A; its first answer to one of them is its
        # last (Storm.kill_a): the others' requests are in flight.
        storm.release.set()
        mark(f"the acked devices register: {sum(r.done() for r in runs)} registered")
        await asyncio.wait_for(storm.killed.wait(), 60)
        mark(f"A killed: {sum(r.done() for r in runs)} devices registered")

        async def watch_b() -> None:
            while True:
                b_health.append(await healthz(storm, b))
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch_b())
        # Every device ends registered through B but those retrying A's own URL.
        def settled() -> bool:
            return all(r.done() or (d.config_from == "a" and not d.via_vip)
                       for d, r in zip(devs, runs, strict=True))

        # Bounded: ``bound`` s (the devices waiting for A retry for 3,600 s x scale: 72).
        for _ in range(int(10 * bound)):
            failed()
            if settled():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("never settled: " + "\n".join(
                f"{d.mac} boots={d.boots} from={d.config_from} {d.register_answers[-3:]} "
                f"{d.log[-2:]}" for d, r in zip(devs, runs, strict=True)
                if not r.done() and not (d.config_from == "a" and not d.via_vip)))
        for r in runs:
            if r.done():
                r.result()
        mark("settled")
        waited = [d.mac for d, r in zip(devs, runs, strict=True) if not r.done()]
        assert settled() and waited, waited
        # A started again: the devices retrying its URL register there.
        loop = asyncio.get_running_loop()
        storm.end_frozen()
        await loop.run_in_executor(None, a.start)
        storm.restarted.set()
        mark("A started again")
        await asyncio.wait_for(asyncio.gather(*runs), 4 * bound)
        mark("all registered")
    finally:
        if watcher is not None:
            watcher.cancel()
        for r in runs:
            r.cancel()
    assert storm.a_pid
    return b_health


async def test_a_storm_through_two_servers_one_killed_mid_way(storm: Storm) -> None:
    devs = devices()
    await seed(storm, devs)
    b_health = await kill_mid_way(storm, devs)
    await outcomes(storm, devs, b_health)


async def outcomes(storm: Storm, devs: list[Device], b_health: list[tuple[int, str]]) -> None:
    """What every device, both servers and the inventory say once the storm is over."""
    a, b = storm.a, storm.b
    logs = f"--- a\n{a.log()[-3000:]}\n--- b\n{b.log()[-3000:]}"
    clusters = sorted({d.cluster for d in devs})
    # B stayed healthy throughout.
    assert b_health and all(s == 200 for s, _ in b_health), b_health[:5]
    # Every device installed and registered, in its cluster; each cluster initialised once,
    # its servers and agents given the cluster's join secrets.
    for d in devs:
        assert d.config is not None and d.registered_via, (d.mac, d.log)
    for cluster in clusters:
        nodes = [d for d in devs if d.cluster == cluster]
        k3os = {d.index: d.config["k3os"] for d in nodes}  # type: ignore[index]
        inits = [d for d in nodes if "--cluster-init" in k3os[d.index]["k3s_args"]]
        assert len(inits) == 1, (cluster, [d.hostname for d in inits])
        # The others join the first server at the address it registered with, with the
        # cluster's secrets: one server token, one agent token, one CA hash in both.
        joined = {k3os[d.index].get("server_url") for d in nodes if d not in inits}
        at = inits[0].address
        assert joined == {f"https://{f'[{at}]' if ':' in at else at}:6443"}, (cluster, joined)
        servers = {k3os[d.index]["token"] for d in nodes if d.role == "server"}
        agents = {k3os[d.index]["token"] for d in nodes if d.role == "agent"}
        assert len(servers) == 1 and len(agents) == 1, (cluster, servers, agents)
        assert {t.split("::")[0] for t in servers | agents} != {""}, (servers, agents)
        assert len({t.split("::")[0] for t in servers | agents}) == 1, (servers, agents)
    tokens = {d.cluster: d.config["k3os"]["token"] for d in devs  # type: ignore[index]
              if d.role == "server"}
    assert len(set(tokens.values())) == len(clusters), tokens
    # No token minted by A refused by B: a refusal is anything but 200 or "down".
    refused = {d.mac: d.register_answers for d in devs
               if any(not x.endswith((" 200", " down", " 200 lost")) for x in d.register_answers)}
    assert not refused, refused
    through_b_from_a = [d.mac for d in devs if d.config_from == "a" and d.registered_via == "b"]
    assert through_b_from_a, [(d.mac, d.config_from, d.registered_via) for d in devs]

    # What the inventory says, through both servers (A restarted has caught up).
    for server in (a, b):
        status, text = await healthz(storm, server)
        assert status == 200, (server.name, text, logs)
        listed = await api(storm, server, "GET", f"/api/v1/machines?limit={len(devs)}")
        by_mac = {m["mac"]: m for m in listed["items"]}
        for d in devs:
            m = by_mac[d.mac]
            assert m["state"] == "registered" and m["cluster"] == d.cluster, (server.name, m)
        metrics = await api(storm, server, "GET", "/metrics")
        assert "netboot_inventory_up 1.0" in metrics, server.name
    per = sum(d.cluster == "c0" for d in devs)
    for d in devs:
        # Booted again, each boots its disk, through either server.
        for server in (a, b):
            script = await storm.get(f"{server.base}/ipxe?mac={d.mac}&arch=x86_64")
            assert "kernel " not in script and "exit" in script, (server.name, d.mac, script)

    # The events tell each machine's story: planned once, registered once; the first
    # server of c1, planned by A, was given the same install again by B.
    for d in devs:
        events = await api(storm, b, "GET", f"/api/v1/machines/{d.mac}/events")
        story = [(e["kind"], e["message"]) for e in events]
        plans = [m for k, m in story if k == "install-plan"]
        assert [k for k, _ in story].count("registered") == 1, (d.mac, story)
        assert len([m for m in plans if m.startswith("install profile ")]) == 1, (d.mac, story)
        if d.index == per:
            assert any(m.startswith("install script again") for m in plans), story
    # What A told done just before it died is done: the device's machine token from A is
    # taken by B (below), the machine registered (above).
    acked = [d for d in devs if d.held_at == "acked" and d.registered_via == "a"
             and len(d.machine_tokens) == 1]
    assert acked, [(d.mac, d.register_answers) for d in devs if d.held_at == "acked"]
    # A device whose answer from A was lost is registered once through B with the same
    # machine token; every device's machine token (what its next boots register with) is
    # taken by both servers.
    for d in devs:
        if d.register_answers[0] == "a 200 lost":
            assert d.register_answers[-1] == "b 200", d.register_answers
            assert len(set(d.machine_tokens)) == 1, (d.mac, d.machine_tokens)
        for server in (a, b):
            body = {"mac": d.mac, "machine_token": d.machine_tokens[-1],
                    "keeps": "machine_token", "addresses": [d.address]}
            async with storm.http.post(f"{server.base}/api/v1/register", json=body) as resp:
                assert resp.status == 200, (server.name, d.mac, await resp.text())
    # The audit log has each registration that was answered, the lost answers' too.
    audit = await api(storm, b, "GET", f"/api/v1/audit?limit={10 * len(devs)}")
    ids = {m["id"]: m["mac"] for m in listed["items"]}
    answered = Counter(ids[e["target"]] for e in audit
                       if e["action"] == "POST /api/v1/register" and e["outcome"] == "200")
    for d in devs:
        assert answered[d.mac] >= sum(x.startswith(("a 200", "b 200"))
                                      for x in d.register_answers), (d.mac, answered[d.mac])
    # No half-written machine: each row's columns agree with its data, its MAC is its key.
    conf = yaml.safe_load(b.config.read_text())
    conn = await asyncpg.connect(conf["inventory"]["dsn"])
    try:
        rows = await conn.fetch("SELECT id, mac, state, cluster, data FROM machines")
        keys = {(r["kind"], r["value"]): r["machine"]
                for r in await conn.fetch("SELECT kind, value, machine FROM machine_keys")}
    finally:
        await conn.close()
    assert len(rows) == len(devs)
    for row in rows:
        data = json.loads(row["data"])
        assert data.get("state", row["state"]) == row["state"], row
        assert row["state"] == "registered", row
        assert any(v == row["id"] and k[1] == row["mac"] for k, v in keys.items()), row
