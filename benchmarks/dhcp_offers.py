"""proxyDHCP offers per second and storm latency, netboot beside dnsmasq in the same run.

    sudo python benchmarks/dhcp_offers.py [--count 20000] [--outstanding 64]
                                          [--storm 1000] [--within 1] [--repeat 3]
                                          [--uvloop] [--baseline OTHER_CHECKOUT]
    python benchmarks/dhcp_offers.py --inproc [--count 20000] [--decider first]  # no root
    python benchmarks/dhcp_offers.py --inproc --instructions [--decider memory-full]
                                     [--count 3000] [--baseline TREE] [--repeat 3]  # no root
    python benchmarks/dhcp_offers.py --startup [--machines 100000] [--storm 1000]  # no root

Two measurements per target, each a UEFI x86-64 PXE DISCOVER (60 PXEClient, 93 arch 7,
97 UUID, 55 as EDK2 sends it) broadcast to :67, answered by a broadcast proxy OFFER to :68:

  offers/s    ``--count`` DISCOVERs with ``--outstanding`` in flight (a new one per answer),
              cycling over ``--macs`` MAC addresses; server CPU µs per offer from
              /proc/<pid>/stat.
  storm       ``--storm`` devices each send one DISCOVER, spread evenly over ``--within``
              seconds; p50/p99/max of DISCOVER → OFFER and how many were answered within 2 s
              (iPXE's proxy window, protocols.md §1.6), and the server's CPU µs per
              device (its answer and its record: what decides the p99 on a busy machine).

Targets: ``netboot`` answers from memory (a decider that returns the loader at once and, as
``netboot serve``'s does, lets a repeat of a request be answered from the server's kept
answer: the first DISCOVER of each MAC decided in full, its repeats by the answer cache and
the asyncio adapter); ``netboot+full`` is the same decider without the guard, every DISCOVER
parsed, classified, decided and encoded (what the codec, the classification, the reply and
the adapter cost: a first DISCOVER's datagram without the inventory; the ``netboot`` row up
to session 44); ``netboot+store`` is the
real ``BootService`` over SQLite with discovery policy ``hold`` and its view loaded (as
``netboot serve`` loads it), every MAC unknown: each DISCOVER is decided from the view and
a sighting is recorded in the background within the discovery budget; ``netboot+enrolled``
is the same server with every MAC the load sends enrolled (what most of a real storm is:
machines the inventory knows, whose steps are noted once); ``netboot+repeats`` is that
server measured on repeats alone: its warm-up DISCOVERs every MAC of the closed loop until
each one's record is written and its answer kept (``+enrolled``'s warm-up covers 200 of its
1,000 MACs, so 800 first sightings and what follows them are inside its measured count:
s42-dhcp; that row is kept as it is, to compare across sessions); ``dnsmasq`` is
``--dhcp-range=…,proxy`` with a ``pxe-service``. The difference between ``netboot`` and the
others is the share the inventory takes.

Why network namespaces rather than loopback: a proxy OFFER to a client without an address is
broadcast to 255.255.255.255:68, which on the host's own stack would leave through a real
interface, and dnsmasq only does DHCP on an interface with an address in its range. Two
namespaces joined by a veth pair are created (192.0.2.1 server, 192.0.2.2 client) and deleted
at the end; nothing touches the machine's interfaces. Every wait is bounded; servers are
stopped by their own PID. ``--inproc`` calls ``DhcpServer.handle`` in a loop instead: the
per-packet Python cost alone, and what to run under py-spy. ``--startup``: a storm at
start-up in process, ``--storm`` first DISCOVERs of enrolled machines (one in every
``--machines`` / ``--storm``) spread over ``--within`` seconds from the moment the view of
``--machines`` machines starts loading, as ``netboot serve`` starts it: how many were
answered within the DHCP server's ``decide_timeout`` (1 s) and how fast. Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peers
from peers import stop

REPO = Path(__file__).resolve().parent.parent
# This tree's netboot (or the one a baseline target names), not whichever one the
# interpreter has installed.
sys.path.insert(0, os.environ.get("NETBOOT_TREE", str(REPO)))
SERVER_IP, CLIENT_IP = "192.0.2.1", "192.0.2.2"
SERVER_IF, CLIENT_IF = "nbdo0", "nbdc0"
LOADER = "snponly.efi"
SO_BINDTODEVICE = 25
CLK_TCK = os.sysconf("SC_CLK_TCK")
PRL = bytes((1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58,
             59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135))


def discover(mac: bytes, xid: int) -> bytes:
    """A DISCOVER as OVMF sends it (the option order of EDK2's PxeBcDhcp4)."""
    uuid = b"\x00" + mac * 2 + mac[:4]
    opts = (
        b"\x35\x01\x01"
        + b"\x39\x02\x05\xc0"
        + bytes((55, len(PRL))) + PRL
        + b"\x5d\x02\x00\x07"
        + b"\x5e\x03\x01\x03\x00"
        + bytes((97, len(uuid))) + uuid
        + b"\x3c\x20PXEClient:Arch:00007:UNDI:003000"
        + b"\xff"
    )
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4),
                       bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"), b"", b"")
    return (head + b"\x63\x82\x53\x63" + opts).ljust(300, b"\0")


def mac_of(i: int) -> bytes:
    return bytes((0x52, 0x54)) + i.to_bytes(4, "big")


STORM_MAC0 = 100_000  # the storm's devices: MACs none of the closed loop's


# --- the servers ------------------------------------------------------------------------------


def _holds() -> bool:
    return True


class _Memory:
    """Answers from memory, at once (no awaitable): the per-packet cost of everything but
    the inventory, as a decider with an in-memory view of it would answer. Its answer
    never changes, so a repeat of a request answered before is answered from the DHCP
    server's kept answer, as ``netboot serve``'s decider (BootService.repeat_guard) lets
    it: without the guard this target parsed, classified, decided and encoded every
    repeat of the closed loop's 1,000 MACs, work the product does not do (the ``netboot``
    row read below ``+store`` up to session 44: benchmarks/README.md, s45-dhcp)."""

    def __init__(self) -> None:
        from netboot.model import FirstStage

        self.stage = FirstStage(LOADER, reason="benchmark")

    def first_stage(self, request: Any) -> Any:
        return self.stage

    def repeat_guard(self, request: Any, stage: Any) -> Any:
        return _holds


class _MemoryFull(_Memory):
    """The same decider without a guard: every DISCOVER parsed, classified, decided and
    its reply encoded (what a first DISCOVER's codec and adapter cost; the ``netboot``
    target before session 45)."""

    repeat_guard = None  # type: ignore[assignment]  # the server looks it up by getattr


class _MemoryAsync(_MemoryFull):
    """The same answer from a coroutine: what the asyncio task per decision costs."""

    async def first_stage(self, request: Any) -> Any:
        return self.stage


def enrolled_macs(macs: int, storm: int) -> list[bytes]:
    """Every MAC the load generator sends from: the closed loop's, then the storm's."""
    return [mac_of(i) for i in range(macs)] + [mac_of(STORM_MAC0 + i) for i in range(storm)]


async def make_server(kind: str, interface: str, root: Path, *,
                      enroll: list[bytes] = []) -> Any:  # noqa: B006 - never mutated
    """netboot's DHCP server in proxy mode with the ``memory`` decider, or the ``store``
    one (``BootService`` over SQLite; ``enroll``: these MACs enrolled first)."""
    from netboot.inventory.memory import MemoryStore
    from netboot.pxe import DhcpSettings
    from netboot.servers.dhcp import DhcpServer

    decider: Any
    store: Any
    if kind == "store":
        from netboot.boot import BootService, BootSettings, loader_aliases
        from netboot.enroll import Enroller
        from netboot.files import FileTree
        from netboot.inventory.base import Batch
        from netboot.inventory.sqlite import SqliteStore
        from netboot.model import MacAddress, Machine

        (root / "assets").mkdir()
        (root / "assets" / LOADER).write_bytes(b"loader")
        store = SqliteStore(root / "netboot.db")
        await store.open()
        if enroll:
            await store.apply_batch(Batch(create=tuple(
                Machine(macs=(MacAddress(mac),), hostname=f"bench{i}")
                for i, mac in enumerate(enroll))))
        # Loader names pinned at start, as `netboot serve` does (service.py).
        assets = FileTree([root / "assets"], pinned=loader_aliases())
        decider = BootService(store, assets, BootSettings(policy="hold"), Enroller(store))
        # `netboot serve` loads the whole inventory into the decider's view once it listens
        # (service.py); here before, so that every run measures the loaded view.
        await decider.load_view()
        # ... and then takes what it loaded out of the cyclic collector's reach, and what
        # outlives each full collection after (FrozenHeap; a --baseline tree from before
        # session 12 has freeze_heap, the view's freeze alone).
        from netboot import service

        if hasattr(service, "FrozenHeap"):
            service.FrozenHeap().start()
        else:
            service.freeze_heap()
    else:
        store = MemoryStore()
        decider = {"memory-async": _MemoryAsync, "memory-full": _MemoryFull}.get(
            kind, _Memory)()
    return DhcpServer(DhcpSettings(), decider, store,
                      interfaces=[interface] if interface else None, advertise=SERVER_IP,
                      host="0.0.0.0", port=67, pxe_port=4011)


def serve(kind: str, interface: str, enroll: list[bytes]) -> None:
    """Child process (inside the server namespace): netboot's DHCP server until SIGTERM."""
    import signal

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            server = await make_server(kind, interface, Path(tmp), enroll=enroll)
            await server.start()
            print("ready", flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            await server.close()

    if os.environ.get("NETBOOT_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def namespaces() -> contextlib.AbstractContextManager[tuple[str, str]]:
    return peers.veth_namespaces("nbdo", SERVER_IF, CLIENT_IF, SERVER_IP, [CLIENT_IP])


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    return 0.0


@contextlib.contextmanager
def target(name: str, ns: str, run: Path, baseline: Path | None = None,
           enroll: tuple[int, int] = (0, 0)) -> Iterator[int]:
    """Start one server in the server namespace; yields its PID (the server's own). Targets
    named ``baseline…`` run the netboot of the tree ``baseline`` under this benchmark's
    ``--serve`` (the same server set-up): before and after a change, in one run.
    ``enroll``: the load's (closed-loop MACs, storm devices), for ``+enrolled`` targets."""
    if name == "dnsmasq":
        argv = ["dnsmasq", "--keep-in-foreground", "--port=0", f"--interface={SERVER_IF}",
                "--bind-interfaces", "--conf-file=/dev/null", "--user=root", "--pid-file=",
                f"--dhcp-leasefile={run / 'dnsmasq.leases'}", f"--dhcp-range={SERVER_IP},proxy",
                f"--pxe-service=x86-64_EFI,bench,{LOADER}", "--log-facility=-", "--quiet-dhcp"]
        env: dict[str, str] = {}
    else:
        enrolled = "+enrolled" in name or "+repeats" in name
        kind = ("store" if "+store" in name or enrolled
                else "memory-full" if "+full" in name else "memory")
        tree = baseline if name.startswith("baseline") and baseline else REPO
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", kind,
                "--interface", SERVER_IF]
        if enrolled:
            argv += ["--enroll", f"{enroll[0]},{enroll[1]}"]
        env = {"NETBOOT_TREE": str(tree), "PYTHONUNBUFFERED": "1"}
        if "uvloop" in name:
            env["NETBOOT_LOOP"] = "uvloop"
    log = open(run / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "env", *(f"{k}={v}" for k, v in
                             env.items()), *argv], stdout=subprocess.PIPE, stderr=log)
    try:
        if name != "dnsmasq":
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            if not ready or proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{name} did not start, see {run / name}.log")
        else:
            time.sleep(0.5)
        yield proc.pid
    finally:
        stop(proc)
        log.close()


def said(log: Path) -> str:
    """What the server wrote (warnings: a decision that timed out, requests dropped as too
    many were in flight), the first line and how many: an unanswered DISCOVER is told."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"; the server said {len(lines)} lines, first: {lines[0][:160]}" if lines else ""


# --- the client (runs in the client namespace, a child process) --------------------------------


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, CLIENT_IF.encode())
    sock.bind(("0.0.0.0", 68))
    return sock


def offers(sock: socket.socket) -> Iterator[tuple[int, float]]:
    """The xid and arrival time of every BOOTREPLY queued on the non-blocking ``sock``."""
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        if len(data) >= 240 and data[0] == 2:
            yield int.from_bytes(data[4:8], "big"), time.perf_counter()


def offers_per_second(count: int, outstanding: int, macs: int) -> tuple[int, float]:
    """Closed loop: keep ``outstanding`` DISCOVERs in flight; returns (answered, seconds).
    A DISCOVER unanswered for 1 s is given up and replaced (bounded: 60 s in all)."""
    sock = client_socket()
    sock.setblocking(False)
    dest = ("255.255.255.255", 67)
    pending: dict[int, float] = {}
    sent = answered = 0
    xid0 = int.from_bytes(os.urandom(2), "big") << 16
    t0 = time.perf_counter()

    # Built once and patched with the xid: the load generator must cost less than a server.
    templates = [bytearray(discover(mac_of(i), 0)) for i in range(macs)]

    def send() -> None:
        nonlocal sent
        xid = xid0 + sent
        packet = templates[sent % macs]
        packet[4:8] = xid.to_bytes(4, "big")
        sock.sendto(packet, dest)
        pending[xid] = time.perf_counter()
        sent += 1

    while sent < min(outstanding, count):
        send()
    while pending and time.perf_counter() - t0 < 60:
        ready, _, _ = select.select([sock], [], [], 0.2)
        now = time.perf_counter()
        if not ready:
            for xid in [x for x, t in pending.items() if now - t > 1.0]:
                del pending[xid]
                if sent < count:
                    send()
            continue
        for xid, _ in offers(sock):
            if pending.pop(xid, None) is None:
                continue
            answered += 1
            if sent < count:
                send()
    seconds = time.perf_counter() - t0
    sock.close()
    return answered, seconds


def storm(devices: int, within: float) -> tuple[int, list[float]]:
    """Open loop: ``devices`` DISCOVERs spread evenly over ``within`` seconds; returns how many
    were answered within 2 s and each answer's latency in ms."""
    sock = client_socket()
    sock.setblocking(False)
    dest = ("255.255.255.255", 67)
    xid0 = int.from_bytes(os.urandom(2), "big") << 16
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < within + 2.0 and len(latencies) < devices:
        now = time.perf_counter()
        while i < devices and now >= t0 + within * i / devices:
            sock.sendto(discover(mac_of(STORM_MAC0 + i), xid0 + i), dest)
            sent_at[xid0 + i] = time.perf_counter()
            i += 1
        wait = max(0.0, t0 + within * i / devices - time.perf_counter()) if i < devices else 0.05
        ready, _, _ = select.select([sock], [], [], min(wait, 0.05))
        if not ready:
            continue
        for xid, now in offers(sock):
            start = sent_at.pop(xid, None)
            if start is not None and now - start <= 2.0:
                latencies.append((now - start) * 1000)
    sock.close()
    return len(latencies), latencies


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


# --- in-process: the Python cost per packet --------------------------------------------------


def inproc(count: int, kind: str, enroll: list[bytes], batch: int = 64) -> None:
    """Datagrams handed to the listener's protocol as the loop would (the error boundary,
    the log context, the decision, the reply), replies kept by a transport that only counts
    them: everything but the two system calls. ``batch`` datagrams per loop iteration (64:
    the closed loop's outstanding; 1: a storm's, one DISCOVER per wake-up). Also said: the
    cyclic collector's collections by generation, how many of them began inside a
    datagram's answer (the rest between answers), and the answers'
    own times (p99, max: what a collection inside one adds)."""
    import gc
    import logging

    from netboot.servers.dhcp import _Listener
    from netboot.servers.udp import BoundaryProtocol

    class Counting:
        sent = 0

        def sendto(self, data: bytes, addr: Any) -> None:
            self.sent += 1

    # (generation, began inside an answer) -> collections; generation -> their thread times
    collections: dict[tuple[int, bool], int] = {}
    took: dict[int, list[float]] = {0: [], 1: [], 2: []}
    inside = [False]
    began = [0.0]

    def probe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            key = (info["generation"], inside[0])
            collections[key] = collections.get(key, 0) + 1
            began[0] = time.thread_time()
        else:
            took[info["generation"]].append(time.thread_time() - began[0])

    async def run(root: Path) -> tuple[float, int, list[float]]:
        server = await make_server("store" if kind in ("enrolled", "first") else kind, "",
                                   root, enroll=enroll)
        # A tree before s31-dhcp has no collections between answers.
        between = getattr(server, "collections", None)
        listener = _Listener(None, SERVER_IP, False)
        protocol: Any
        if hasattr(server, "_protocol"):  # the listener's own protocol (since s45-dhcp)
            protocol = server._protocol(listener, "bench", max_in_flight=1 << 30)
        else:
            protocol = BoundaryProtocol("bench", server._handler(listener),
                                        logger=logging.getLogger("bench"),
                                        max_in_flight=1 << 30,
                                        **({"answered": between.answered} if between else {}))
        transport = Counting()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        # "first": each DISCOVER from a machine of its own, seen for the first time (what a
        # storm of enrolled machines is); else 1,000 MACs over and over.
        packets = [discover(mac_of(i), i) for i in range(count if kind == "first" else 1000)]
        answers: list[float] = []
        clock = time.perf_counter
        gc.callbacks.append(probe)
        counting = os.environ.get("NB_CALLGRIND") == "1"
        if counting:  # under callgrind (--instructions): the measured datagrams alone
            subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True,
                           capture_output=True)
        t0 = time.process_time()
        m0 = time.thread_time()
        for i in range(count):
            inside[0] = True
            began = clock()
            protocol.datagram_received(packets[i % len(packets)], ("0.0.0.0", 68))
            answers.append(clock() - began)
            inside[0] = False
            if i % batch == batch - 1:  # 64 outstanding, as the closed loop keeps them
                await protocol.drain()
                # One loop iteration per batch of datagrams, as the draining transport
                # reads them: background records run between batches, as when serving.
                await asyncio.sleep(0)
        await protocol.drain()
        drain = getattr(server._decider, "drain", None)
        if drain is not None:  # the store decider's background records, written
            await drain()
        seconds = time.process_time() - t0
        if counting:
            subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True,
                           capture_output=True)
        gc.callbacks.remove(probe)
        print(f"main thread {(time.thread_time() - m0) / count * 1e6:.1f} µs per DISCOVER")
        await server.close()
        return seconds, transport.sent, answers

    with tempfile.TemporaryDirectory() as tmp:
        seconds, sent, answers = asyncio.run(run(Path(tmp)))
    if sent < count:
        print(f"{count - sent} DISCOVERs unanswered (the decision timed out)")
    print(f"in-process, {kind} decider: {count} DISCOVERs, "
          f"{seconds / count * 1e6:.1f} µs CPU each, {count / seconds:,.0f}/s")
    said = ", ".join(f"{name} {sum(n for (g, _), n in collections.items() if g == gen)} "
                     f"({collections.get((gen, True), 0)} inside an answer; each "
                     f"{pct(took[gen], 0.5) * 1e6:.0f} µs, max {max(took[gen] or [0]) * 1e6:.0f})"
                     for gen, name in enumerate(("young", "middle", "full")))
    print(f"collections: {said}; an answer's time p50 {pct(answers, 0.5) * 1e6:.0f} µs, "
          f"p99 {pct(answers, 0.99) * 1e6:.0f} µs, p99.9 {pct(answers, 0.999) * 1e6:.0f} µs, "
          f"max {max(answers) * 1e6:.0f} µs ({batch} a loop iteration; load "
          f"{os.getloadavg()[0]:.1f})")


def instructions(count: int, kind: str, batch: int, trees: list[Path], rounds: int) -> None:
    """``--inproc`` of each tree under valgrind's callgrind, counting only the measured
    datagrams (the child's ``callgrind_control -i on`` / ``off``): the loop thread's
    instructions per DISCOVER and the other threads' (the store's writer), rounds in
    alternating order. The load does not move these counts."""
    per: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
    for r in range(rounds):
        for tree in trees if r % 2 == 0 else trees[::-1]:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "cg.out"
                subprocess.run(
                    ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                     "--separate-threads=yes", f"--callgrind-out-file={out}",
                     "--log-file=/dev/null", sys.executable, __file__, "--inproc",
                     "--decider", kind, "--count", str(count), "--batch", str(batch)],
                    check=True, capture_output=True, timeout=1800,
                    env={**os.environ, "NETBOOT_TREE": str(tree), "NB_CALLGRIND": "1"})
                threads = []
                for path in sorted(Path(tmp).glob("cg.out-*")):
                    totals = [line for line in path.read_text().splitlines()
                              if line.startswith("totals:")]
                    threads.append(int(totals[0].split()[1]) if totals else 0)
            per[tree].append((threads[0] / count, sum(threads[1:]) / count))
            print(f"round {r + 1} {tree}: loop {per[tree][-1][0]:,.0f}, other threads "
                  f"{per[tree][-1][1]:,.0f} instructions a DISCOVER", flush=True)
    first = sum(x for x, _ in per[trees[0]]) / rounds
    for tree in trees:
        loop = sum(x for x, _ in per[tree]) / rounds
        other = sum(y for _, y in per[tree]) / rounds
        print(f"{kind} decider, {count} DISCOVERs ({batch} a loop turn), {tree}: loop "
              f"{loop:,.0f} instructions a DISCOVER ({loop / first:.3f}x the first tree's), "
              f"other threads {other:,.0f} (means of {rounds})")


# --- in-process: a storm while the view loads ------------------------------------------------


def startup(machines: int, devices: int, within: float, plain: bool) -> None:
    """``devices`` first DISCOVERs of enrolled machines (spread over the inventory), one
    every ``within / devices`` seconds from the start of the view's load, each answered as
    the listener answers it (the server's decide_timeout included). The view loads as
    ``netboot serve`` loads it (service.brisk_switching, where the tree has it), or with
    Python's own switch interval (``plain``)."""
    import shutil

    from netboot import service
    from netboot.boot import BootService, BootSettings, loader_aliases
    from netboot.enroll import Enroller
    from netboot.files import FileTree
    from netboot.inventory.base import Batch
    from netboot.inventory.sqlite import SqliteStore
    from netboot.model import MacAddress, Machine
    from netboot.pxe import DhcpSettings
    from netboot.servers.dhcp import DhcpServer, _Listener

    async def seed(path: Path) -> None:
        store = SqliteStore(path)
        await store.open()
        for start in range(0, machines, 5000):
            await store.apply_batch(Batch(create=tuple(
                Machine(macs=(MacAddress(mac_of(i)),), hostname=f"bench{i}")
                for i in range(start, min(machines, start + 5000)))))
        await store.close()

    async def run(root: Path) -> None:
        (root / "assets").mkdir()
        (root / "assets" / LOADER).write_bytes(b"loader")
        store = SqliteStore(root / "netboot.db")
        await store.open()
        boot = BootService(store, FileTree([root / "assets"], pinned=loader_aliases()),
                           BootSettings(policy="hold"), Enroller(store))
        server = DhcpServer(DhcpSettings(), boot, store, interfaces=None, advertise=SERVER_IP,
                            host="127.0.0.1")
        handle = server._handler(_Listener(None, SERVER_IP, False))
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        brisk = getattr(service, "brisk_switching", None)
        switching = (contextlib.nullcontext() if plain or brisk is None else brisk())

        async def load() -> None:
            with switching:
                await boot.load_view()

        t0 = loop.time()
        loading = asyncio.ensure_future(load())

        async def one(i: int) -> None:
            start = loop.time()
            out = handle(discover(mac_of(i * (machines // devices)), i), ("0.0.0.0", 68))
            if not isinstance(out, list):
                out = await out
            if out:
                latencies.append((loop.time() - start) * 1000)

        sent = []
        for i in range(devices):
            delay = t0 + within * i / devices - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*sent)
        await loading
        loaded = loop.time() - t0
        await boot.drain()
        await store.close()
        print(f"storm of {devices} in {within:g} s at start-up, {machines:,} machines: "
              f"answered {len(latencies)}/{devices}, p50 {pct(latencies, 0.5):.1f} p99 "
              f"{pct(latencies, 0.99):.1f} ms; view loaded in {loaded:.2f} s; the server's "
              f"summary {dict(server.summary.counts)}, switch interval while loading "
              f"{'plain' if plain or brisk is None else 'brisk'} "
              f"(load {os.getloadavg()[0]:.1f})")

    with tempfile.TemporaryDirectory() as tmp:
        seeded = Path(tmp) / "seed.db"
        asyncio.run(seed(seeded))
        (Path(tmp) / "run").mkdir()
        shutil.copy(seeded, Path(tmp) / "run" / "netboot.db")  # closed: checkpointed
        asyncio.run(run(Path(tmp) / "run"))


# --- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--macs", type=int, default=1000)
    parser.add_argument("--storm", type=int, default=1000)
    parser.add_argument("--within", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated target names")
    parser.add_argument("--uvloop", action="store_true", help="also netboot under uvloop")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="also the netboot of another checkout (e.g. before a change), as "
                             "targets baseline, baseline+store (and -uvloop with --uvloop)")
    parser.add_argument("--inproc", action="store_true")
    parser.add_argument("--instructions", action="store_true",
                        help="with --inproc: instructions per DISCOVER under callgrind, this "
                             "tree and --baseline's, --repeat rounds in alternating order")
    parser.add_argument("--startup", action="store_true",
                        help="in process: --storm DISCOVERs while the view of --machines loads")
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--plain-switching", action="store_true",
                        help="with --startup: the view loads with Python's switch interval")
    parser.add_argument("--decider", default="memory",
                        choices=("memory", "memory-full", "memory-async", "store", "enrolled",
                                 "first"),
                        help="with --inproc (enrolled: the store's, with every MAC of the load "
                             "enrolled; first: --count enrolled machines, one DISCOVER each)")
    parser.add_argument("--batch", type=int, default=64,
                        help="with --inproc: datagrams a loop iteration (1: a storm's)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--interface", default="", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--enroll", default="0,0", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        macs, devices = map(int, args.enroll.split(","))
        serve(args.serve, args.interface, enrolled_macs(macs, devices))
        return
    if args.client == "offers":
        answered, seconds = offers_per_second(args.count, args.outstanding, args.macs)
        print(answered, seconds)
        return
    if args.client == "storm":
        answered, lat = storm(args.storm, args.within)
        print(answered, *lat)
        return
    if args.startup:
        startup(args.machines, args.storm, args.within, args.plain_switching)
        return
    if args.inproc and args.instructions:
        instructions(args.count, args.decider, args.batch,
                     [REPO, *([args.baseline.resolve()] if args.baseline else [])], args.repeat)
        return
    if args.inproc:
        inproc(args.count, args.decider,
               enrolled_macs(1000, 0) if args.decider == "enrolled"
               else enrolled_macs(args.count, 0) if args.decider == "first" else [],
               args.batch)
        return
    if os.geteuid() != 0:
        sys.exit("needs root for the network namespaces (or use --inproc)")
    names = ["netboot", "netboot+full", "netboot+store", "netboot+enrolled", "netboot+repeats",
             "dnsmasq"]
    if args.uvloop:
        names.insert(1, "netboot-uvloop")
        names.insert(3, "netboot+full-uvloop")
        names.insert(5, "netboot+store-uvloop")  # what `netboot serve` runs with uvloop
        names.insert(7, "netboot+enrolled-uvloop")
        names.insert(9, "netboot+repeats-uvloop")
    if args.baseline:
        names += [n.replace("netboot", "baseline") for n in names if n.startswith("netboot")]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if "dnsmasq" in names and not shutil.which("dnsmasq"):
        print("dnsmasq: not installed, left out")
        names.remove("dnsmasq")
    results: dict[str, list[tuple[float, float, int, float, float, float, float]]] = {
        n: [] for n in names}
    with namespaces() as (sns, cns), tempfile.TemporaryDirectory() as tmp:
        def client(*extra: str) -> list[str]:
            out = subprocess.run(["ip", "netns", "exec", cns, sys.executable, __file__, *extra],
                                 check=True, capture_output=True, text=True, timeout=120)
            return out.stdout.split()

        for rep in range(args.repeat):
            # Rotate the order so no target always runs first (a cold or warm machine).
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                with target(name, sns, Path(tmp), args.baseline,
                            (args.macs, args.storm)) as pid:
                    client("--client", "offers", "--count", "200", "--outstanding", "8")  # warm
                    if "+repeats" in name:
                        # Every MAC of the closed loop seen, its record written (paced, then
                        # the group commit), then seen again (the one full decision after
                        # the commit replaced its machine object): what is measured after
                        # is repeats alone.
                        client("--client", "offers", "--count", str(3 * args.macs),
                               "--outstanding", "8", "--macs", str(args.macs))
                        time.sleep(0.5)
                        client("--client", "offers", "--count", str(2 * args.macs),
                               "--outstanding", "8", "--macs", str(args.macs))
                    cpu0 = cpu_seconds(pid)
                    got = client("--client", "offers", "--count", str(args.count),
                                 "--outstanding", str(args.outstanding), "--macs", str(args.macs))
                    cpu1 = cpu_seconds(pid)
                    cpu = cpu1 - cpu0
                    answered, seconds = int(got[0]), float(got[1])
                    s = client("--client", "storm", "--storm", str(args.storm),
                               "--within", str(args.within))
                    time.sleep(0.5)  # the storm's records, written after its answers
                    storm_cpu = (cpu_seconds(pid) - cpu1) / args.storm * 1e6
                    lat = [float(x) for x in s[1:]]
                    results[name].append((answered / seconds, cpu / max(answered, 1) * 1e6,
                                          int(s[0]), pct(lat, 0.5), pct(lat, 0.99),
                                          max(lat or [0]), storm_cpu))
                rate, cpu_us, ans, p50, p99, mx, _ = results[name][-1]
                print(f"run {rep + 1} {name}: {rate:,.0f} offers/s, {cpu_us:.0f} µs, storm "
                      f"{ans}/{args.storm} p50 {p50:.2f} p99 {p99:.2f} max {mx:.2f} ms, "
                      f"{storm_cpu:.0f} µs per device (load {os.getloadavg()[0]:.1f})"
                      + said(Path(tmp) / f"{name}.log"), file=sys.stderr, flush=True)
    med = {n: sorted(r, key=lambda x: x[0])[len(r) // 2] for n, r in results.items()}
    ref = med.get("dnsmasq")
    print(f"proxyDHCP, UEFI x86-64 DISCOVER → broadcast OFFER, {args.count} with "
          f"{args.outstanding} outstanding; storm of {args.storm} in {args.within:g} s; "
          f"median of {args.repeat} by offers/s")
    print(f"{'target':<22}{'offers/s':>10}{'CPU µs/offer':>14}{'÷ dnsmasq':>11}"
          f"{'storm answered':>16}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'µs/device':>11}")
    for n, (rate, cpu, ans, p50, p99, mx, storm_cpu) in med.items():
        ratio = f"{rate / ref[0]:.2f}x" if ref else "-"
        print(f"{n:<22}{rate:>10,.0f}{cpu:>14.0f}{ratio:>11}{ans:>11}/{args.storm:<4}"
              f"{p50:>8.2f}{p99:>8.2f}{mx:>8.2f}{storm_cpu:>11.0f}")


if __name__ == "__main__":
    main()
