"""TFTP on loopback: netboot beside tftpd-hpa, atftpd and dnsmasq in the same run.

    python benchmarks/tftp_throughput.py single   [--size 20000000] [--windows 1,4,8]
                                                  [--placements free,split,shared]
    python benchmarks/tftp_throughput.py lockstep [--clients 50] [--size 1048576]
    python benchmarks/tftp_throughput.py loss     [--clients 10] [--size 1048576]
                                                  [--loss 0.01] [--windows 1,8] [--cap 150]
    python benchmarks/tftp_throughput.py starts   [--clients 16] [--size 4096] [--pairs 3000]
                                                  [--windows 4]

``single``    one transfer at a time of ``--size`` bytes at each windowsize: MiB/s, per
              placement of the server and the client on the CPUs (``--placements``):
              ``free`` the scheduler's choice (the row every earlier run printed),
              ``split`` the server on CPU 0 and the client on CPU 1, ``shared`` both on
              CPU 0 (sched_setaffinity on every thread of the server, taskset for the
              client). A windowed transfer is a ping-pong of two wake-ups per window, so
              where the two land sets its pace: unpinned on 2 CPUs the same code measured
              0.84x and 1.76x atftpd in one session, pinned one CPU each 1.39-1.86x,
              sharing one 2.5-2.7x. The pinned rows say where an unpinned figure stands.
              The server's CPU ms/MiB is over all rounds, not the median round's (a clock
              tick is 0.52 ms/MiB of one 19 MiB transfer).
``lockstep``  ``--clients`` transfers at once, each from its own loopback address (servers
              limit transfers per address; a storm comes from many), windowsize 1: MiB/s
              over all, and the server's CPU time per MiB (user + system, children
              included: tftpd-hpa forks a process per transfer; see CpuMeter).
``loss``      ``--clients`` transfers at once through a client that drops ``--loss`` of the
              datagrams each way (a seeded RNG, the same pattern for every server) and, like
              U-Boot and RFC 1350 clients, ACKs every duplicate and resends its last ACK
              after 1 s without DATA: wall time until all are done, failures, and what was
              moved when ``--cap`` seconds ran out. ``--clients 1 --size 10485760 --loss
              0.1`` is the issue's "10 MiB lock-step with 10 % loss".
``starts``    what starting and ending a transfer costs: ``--pairs`` times what EDK2 does
              per file (a size probe, RRQ ``tsize 0 blksize 1468``, its OACK answered with
              ERROR 8; then from a new port the download, ``blksize 1468 windowsize W``) of
              a small file (``--size``, 4 KiB: one window) named ``--name``
              (``snponly.efi``, a loader's name, which netboot resolves once at start, as
              storm.py's devices ask; ``file.bin`` is looked up per request), ``--clients``
              devices at a time, each pair from another loopback address (the Python
              client: a pair is a handful of datagrams). Prints pairs/s and the server's
              CPU µs per pair (two transfers started and ended), every round's and the
              median. netboot runs here as ``netboot serve`` (loopback, DHCP off, log level
              info into a file, as a storm runs it): the content layer's lookup, the
              metrics and the log line of each transfer are counted, not only the TFTP
              server's own work.

blksize 1468 throughout (OVMF's; an Ethernet MTU). The client is ``tftp_client.c``, compiled
with gcc into a temporary directory at the start of the run and used for every server alike
(``--client python`` for the former Python client, also the fallback without gcc): a windowed
transfer is a ping-pong (RFC 7440 §4), so the slower end sets its pace, and the Python client
was slower per window than the servers it measured. It compares every payload with the file
(memcmp), and before the timed runs one transfer from each server is written out and its
SHA-256 compared with the file's. Its own CPU per MiB is printed beside the server's: a
client that spends far less per MiB than a server is not what that server's figure measures.
``--baseline TREE`` also runs the netboot of another checkout (e.g. /work/main) as
``baseline``, for an A/B in the same run; ``--mypyc`` also this tree's netboot with the
modules setup.py compiles under ``NETBOOT_MYPYC=1`` (the TFTP codec and sender among them),
built in a copy of the tree at the start of the run, as ``netboot-mypyc``. Each server runs
in its own process, so the client does not share its GIL; servers are started with their
defaults and stopped by their own PID. tftpd-hpa and atftpd cannot both be installed from
Debian (the packages conflict): point ``--in-tftpd`` at an ``in.tftpd`` unpacked from the
.deb if it is not on PATH. A server that is not installed is left out and said so.
dnsmasq's TFTP listens on port 69 only. Either client is one process driving every
transfer from one epoll loop; every receive is bounded in time, every loop in count. Not
part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import inspect
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from peers import stop, wait_for_udp_answer

HOST = "127.0.0.1"
BLKSIZE = 1468
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
PROBE = b"\x00\x01no-such-file\x00octet\x00"  # answered with an ERROR by every server
LOADER = "snponly.efi"  # starts: what a storm's devices ask for (storm.py)
# --placements: (the server's CPUs, the client's CPUs); None = unpinned.
PLACEMENTS: dict[str, tuple[set[int], set[int]] | None] = {
    "free": None, "split": ({0}, {1}), "shared": ({0}, {0})}


@dataclass(frozen=True)
class Peer:
    name: str
    start: Callable[[Path, str], contextlib.AbstractContextManager[tuple[int, int]]]
    binary: str | None = None  # needed on PATH; the peer is left out without it


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def netboot_server(root: Path, binary: str) -> Iterator[tuple[int, int]]:
    """``binary``: "" for this tree's netboot, "uvloop" for it under uvloop, or the path of
    another checkout (``--baseline``) whose netboot is served by this file's ``serve``."""
    env = {**os.environ}
    tree = REPO
    if binary == "uvloop":
        env["NETBOOT_LOOP"] = "uvloop"
    elif binary:
        tree = Path(binary)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--tree", str(tree)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints its port once it is bound
        if not line.strip().isdigit():
            raise RuntimeError(f"server did not start: {line!r}")
        yield int(line), proc.pid
    finally:
        stop(proc)  # type: ignore[arg-type]


@contextlib.contextmanager
def netboot_serve(root: Path, binary: str) -> Iterator[tuple[int, int]]:
    """``netboot serve`` of this tree (``binary`` "") or of another checkout, serving
    ``root`` as its assets on HOST (the ``starts`` mode: the whole per-transfer path)."""
    tree = Path(binary) if binary and binary not in ("uvloop", "mypyc") else REPO
    with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
        work = Path(tmp)
        tftp_port = _free_udp_port()
        with socket.socket() as s:
            s.bind((HOST, 0))
            http_port = int(s.getsockname()[1])
        conf = work / "netboot.yaml"
        conf.write_text(
            f"server: {{data_dir: {work / 'data'}, log_level: info}}\n"
            f"http: {{listen: {HOST}, port: {http_port}}}\n"
            f"https: {{enabled: false}}\ndhcp: {{mode: 'off'}}\ndns: {{enabled: false}}\n"
            f"tftp: {{port: {tftp_port}}}\nassets: {{dirs: [{root}]}}\n")
        log = (work / "netboot.log").open("wb")
        # Started in the run's directory: -m puts the working directory first on sys.path.
        proc = subprocess.Popen([sys.executable, "-m", "netboot", "serve", "--config", str(conf)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=work, env={**os.environ, "PYTHONPATH": str(tree)})
        try:
            if not wait_for_udp_answer(HOST, tftp_port, PROBE, tries=300):
                raise RuntimeError(f"netboot serve did not start: "
                                   f"{(work / 'netboot.log').read_text()[-2000:]}")
            yield tftp_port, proc.pid
        finally:
            stop(proc)  # type: ignore[arg-type]
            log.close()


def mypyc_tree(work: Path) -> Path:
    """A copy of this tree with setup.py's ``NETBOOT_MYPYC=1`` modules built in place (as
    tests/test_compiled.py does), for the ``netboot-mypyc`` row."""
    copy = work / "mypyc"
    copy.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, copy / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("netboot", "templates", "boot_assets"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                   env={**os.environ, "NETBOOT_MYPYC": "1", "PYTHONPATH": str(copy)},
                   check=True, capture_output=True, timeout=900)
    if not list((copy / "netboot" / "wire").glob("tftp.*.so")):
        raise RuntimeError("NETBOOT_MYPYC=1 built no netboot/wire/tftp: is it in setup.py?")
    return copy


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], port: int) -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Ready once a request gets an answer (an ERROR for a file that is not there).
        wait_for_udp_answer(HOST, port, PROBE)
        yield port, proc.pid
    finally:
        stop(proc)


@contextlib.contextmanager
def tftpd_hpa_server(root: Path, binary: str) -> Iterator[tuple[int, int]]:
    port = _free_udp_port()
    with _process([binary, "--listen", "--foreground", "--address", f"{HOST}:{port}",
                   "--secure", "--user", "root", str(root)], port) as p:
        yield p


@contextlib.contextmanager
def atftpd_server(root: Path, binary: str) -> Iterator[tuple[int, int]]:
    port = _free_udp_port()
    with _process([binary, "--daemon", "--no-fork", "--port", str(port), "--bind-address",
                   HOST, "--user", "root", "--group", "root", "--logfile", "/dev/null",
                   "--maxthread", "200", str(root)], port) as p:
        yield p


@contextlib.contextmanager
def dnsmasq_server(root: Path, binary: str) -> Iterator[tuple[int, int]]:
    # dnsmasq's TFTP listens on port 69 only; bound to loopback alone. Its default of 50
    # concurrent transfers is raised so that every client of a run is served.
    with _process([binary, "--keep-in-foreground", "--port=0", "--enable-tftp",
                   f"--tftp-root={root}", f"--listen-address={HOST}", "--tftp-max=500",
                   "--bind-interfaces", "--conf-file=/dev/null", "--user=root",
                   "--pid-file="], 69) as p:
        yield p


PEERS = [
    Peer("netboot", netboot_server),
    Peer("tftpd-hpa", tftpd_hpa_server, "in.tftpd"),
    Peer("atftpd", atftpd_server, "atftpd"),
    Peer("dnsmasq", dnsmasq_server, "dnsmasq"),
]


def serve(root: Path, tree: Path) -> None:
    """Child process: the netboot of ``tree`` on HOST:0 until SIGTERM."""
    sys.path.insert(0, str(tree))
    from netboot.files import FileTree
    from netboot.model import Blob
    from netboot.servers.tftp import TftpServer

    class Files:
        def __init__(self) -> None:
            self.tree = FileTree([root])

        async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
            return self.tree.blob(path)

    async def main() -> None:
        min_rto = os.environ.get("NETBOOT_MIN_RTO")  # seconds; "none" = the fixed timer
        # Seconds a lone window's ACK is busy-waited for (0: off); the tree's default unset,
        # and only for a tree whose server has the option (a --baseline may predate it).
        spin = os.environ.get("NETBOOT_ACK_SPIN")
        extra = ({"ack_spin": float(spin)} if spin is not None and "ack_spin"
                 in inspect.signature(TftpServer.__init__).parameters else {})
        server = TftpServer(Files(), host=HOST, port=0, max_transfers=256,
                            min_rto=None if min_rto == "none" else float(min_rto or 0.005),
                            gso=os.environ.get("NETBOOT_GSO") != "0", **extra)
        await server.start()
        print(server.port, flush=True)
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await stopped.wait()
        await server.close()

    if os.environ.get("NETBOOT_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _ticks(pid: int) -> tuple[int, int]:
    """User and system clock ticks of ``pid``, its threads, ended ones included."""
    with contextlib.suppress(OSError, ValueError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]), int(fields[12])
    return 0, 0


def _threads_ns(pid: int) -> dict[int, int]:
    """Nanoseconds each live thread of ``pid`` has run (schedstat: the scheduler's own
    clock, not ticks); an ended thread is not there any more."""
    out = {}
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                out[int(task)] = int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text()
                                     .split()[0])
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads and children started later inherit
    it: atftpd's thread and tftpd-hpa's process per transfer)."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cpus)


class CpuMeter:
    """CPU seconds of a server and of its children while they live: tftpd-hpa forks one per
    transfer and lets the kernel reap it (SIGCHLD ignored), so its children's time never
    reaches its own counters. Children are sampled every 10 ms, in nanoseconds (schedstat:
    a child's ticks are rounded down, and a 1 MiB transfer's child runs about 1 ms, under
    one tick); a child's last 10 ms may be missed (a small under-count, in tftpd-hpa's
    favour).

    The server's own time is in nanoseconds (schedstat, summed over its threads) when the
    same threads ran from start to stop (netboot, dnsmasq, tftpd-hpa's listener): /proc's
    user and system times are clock ticks, 10 ms, and a lock-step round of 50 MiB costs
    about 100 ms, so a tick was a tenth of the figure and the median round's CPU moved by
    whole ticks. When threads came or went (atftpd's thread per transfer) the ticks are
    used, which count ended threads too. ``user`` and ``system`` (ticks, children
    included) say where the time went."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid = pid
        self.ticks0 = _ticks(pid)
        self.ns0 = _threads_ns(pid)
        self.seen = set(self.ns0)
        self.children: dict[int, tuple[int, int, int]] = {}  # ticks and ns, by PID
        self.user = self.system = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.seen.update(_threads_ns(self.pid))
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{self.pid}/task"):
                    with contextlib.suppress(OSError):
                        kids = Path(f"/proc/{self.pid}/task/{task}/children").read_text()
                        for child in map(int, kids.split()):
                            ns = sum(_threads_ns(child).values())
                            if ns >= self.children.get(child, (0, 0, 0))[2]:
                                self.children[child] = (*_ticks(child), ns)

    def stop(self) -> float:
        ns1 = _threads_ns(self.pid)
        ticks1 = _ticks(self.pid)
        self._stop.set()
        self._thread.join(timeout=5)
        user = ticks1[0] - self.ticks0[0] + sum(u for u, _, _ in self.children.values())
        system = ticks1[1] - self.ticks0[1] + sum(s for _, s, _ in self.children.values())
        self.user, self.system = user / CLK_TCK, system / CLK_TCK
        kids = sum(ns for _, _, ns in self.children.values()) / 1e9
        if ns1 and set(ns1) == set(self.ns0) == self.seen:
            return sum(ns1[t] - self.ns0[t] for t in ns1) / 1e9 + kids
        return sum(ticks1) / CLK_TCK - sum(self.ticks0) / CLK_TCK + kids


# --- the client --------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One RFC 7440 receiver (windowsize 1 = RFC 1350 lock-step) on its own socket."""

    sock: socket.socket
    server: tuple[str, int]
    rrq: bytes
    size: int
    loss: float
    rng: random.Random
    client_timeout: float = 1.0
    tid: tuple[str, int] | None = None
    blksize: int = 512
    window: int = 1
    expected: int = 1
    since_ack: int = 0
    received: int = 0
    last_heard: float = 0.0
    done: bool = False
    error: str = ""
    duplicates: int = 0
    dropped: int = 0

    def finished(self) -> int:
        """1 if the transfer is over (done or failed), for the count of active ones."""
        return int(self.done)

    def start(self, now: float) -> None:
        self.last_heard = now
        self.sock.sendto(self.rrq, self.server)

    def _ack(self, block: int) -> None:
        self.since_ack = 0
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        assert self.tid is not None
        self.sock.sendto(struct.pack("!HH", 4, block & 0xFFFF), self.tid)

    def tick(self, now: float) -> None:
        if now - self.last_heard >= self.client_timeout:
            self.last_heard = now
            if self.tid is None:
                self.sock.sendto(self.rrq, self.server)
            else:
                self._ack(self.expected - 1)

    def datagram(self, data: bytearray, size: int, src: tuple[str, int], now: float) -> None:
        """``data[:size]`` arrived from ``src`` (a buffer reused for every datagram)."""
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        if self.tid is None:
            self.tid = src
        elif src != self.tid:
            return
        self.last_heard = now
        opcode = data[1] if size >= 4 else 0
        if opcode == 6:  # OACK
            if self.expected == 1:
                fields = bytes(data[2:size]).split(b"\x00")
                granted = dict(zip(fields[0::2], fields[1::2], strict=False))
                self.blksize = int(granted.get(b"blksize", 512))
                self.window = int(granted.get(b"windowsize", 1))
                self._ack(0)
            return
        if opcode == 5:
            self.done = True
            self.error = bytes(data[4:size]).split(b"\x00")[0].decode(errors="replace")
            return
        if opcode != 3:
            return
        block = (data[2] << 8) | data[3]
        if block != self.expected & 0xFFFF:
            self.duplicates += 1
            self._ack(self.expected - 1)  # RFC 1350 clients answer every duplicate
            return
        payload = size - 4
        self.received += payload
        self.expected += 1
        self.since_ack += 1
        if payload < self.blksize:
            self._ack(self.expected - 1)
            self.done = True
            if self.received != self.size:
                self.error = f"got {self.received} bytes of {self.size}"
        elif self.since_ack >= self.window:
            self._ack(self.expected - 1)


@dataclass
class Run:
    seconds: float
    moved: int
    failures: int
    errors: list[str] = field(default_factory=list)
    duplicates: int = 0
    client_cpu: float | None = None  # seconds; measured by the C client only
    user: float = 0.0  # the server's user and system seconds (clock ticks, see CpuMeter)
    system: float = 0.0


def c_client(work: Path) -> Path | None:
    """tftp_client.c compiled into ``work``; None without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    binary = work / "tftp_client"
    subprocess.run([gcc, "-O2", "-o", str(binary), str(Path(__file__).with_name("tftp_client.c"))],
                   check=True, timeout=120)
    return binary


def c_transfers(client: Path, port: int, root: Path, name: str, size: int, clients: int,
                window: int, *, loss: float, seed: int, cap: float,
                copy: Path | None = None, cpus: set[int] | None = None) -> Run:
    """The C client's run (see tftp_client.c): the same workload as :func:`transfers`;
    ``cpus``: the CPUs it runs on (taskset), any without."""
    pinned = ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []
    argv = [*pinned, str(client), HOST, str(port), name, str(size), "-n", str(clients),
            "-w", str(window), "-b", str(BLKSIZE), "-l", str(loss), "-s", str(seed), "-c", str(cap),
            "-x", str(root / name)]
    if copy is not None:
        argv += ["-o", str(copy)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=cap + 30)
    run: Run | None = None
    errors = []
    for line in out.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "result":
            seconds, moved, failed, duplicates, cpu = rest.split()
            run = Run(float(seconds), int(moved), int(failed), duplicates=int(duplicates),
                      client_cpu=float(cpu))
        elif kind == "error":
            errors.append(rest.partition(" ")[2])
    if run is None:
        raise RuntimeError(f"the C client said nothing: {out.stderr.strip()}")
    run.errors = errors
    return run


def transfers(port: int, name: str, size: int, clients: int, window: int, *, loss: float,
              seed: int, cap: float) -> Run:
    """``clients`` downloads of ``name`` at once, each from 127.0.0.(10 + i): the Python
    client."""
    options = b"blksize\x00%d\x00" % BLKSIZE
    if window > 1:
        options += b"windowsize\x00%d\x00" % window
    rrq = b"\x00\x01" + name.encode() + b"\x00octet\x00" + options
    poller = select.epoll()
    by_fd: dict[int, Transfer] = {}
    for i in range(clients):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((f"127.0.0.{10 + i}", 0))
        sock.setblocking(False)
        rng = random.Random(seed * 1000 + i)  # a drop pattern, not security-relevant
        by_fd[sock.fileno()] = Transfer(sock, (HOST, port), rrq, size, loss, rng)
        poller.register(sock.fileno(), select.EPOLLIN)
    t0 = time.perf_counter()
    for t in by_fd.values():
        t.start(t0)
    active = len(by_fd)
    last_tick = t0
    # One receive buffer for every datagram, and the clock read once per poll: the client
    # takes every datagram of every window, and allocating a 70 kB bytes object for each
    # made it, not the servers, the bottleneck of a windowed transfer.
    buf = bytearray(70000)
    try:
        while active and time.perf_counter() - t0 < cap:
            events = poller.poll(0.05)
            heard = time.perf_counter()
            for fd, _ in events:
                t = by_fd[fd]
                receive = t.sock.recvfrom_into
                for _ in range(256):
                    try:
                        size, src = receive(buf)
                    except BlockingIOError:
                        break
                    if t.done:
                        continue
                    t.datagram(buf, size, src, heard)
                    active -= t.finished()
            now = time.perf_counter()
            if now - last_tick >= 0.05:
                last_tick = now
                for t in by_fd.values():
                    if not t.done:
                        t.tick(now)
        seconds = time.perf_counter() - t0
    finally:
        poller.close()
        for t in by_fd.values():
            t.sock.close()
    done = [t for t in by_fd.values() if t.done and not t.error]
    errors = [t.error for t in by_fd.values() if t.error]
    return Run(seconds, sum(t.received for t in by_fd.values()), clients - len(done), errors,
               sum(t.duplicates for t in by_fd.values()))


class Device:
    """One device slot of the ``starts`` mode: size probe, then download, then the next
    pair, each transfer from a new socket (as EDK2 opens one per transfer) and each pair
    from the next of 50,000 loopback addresses: netboot takes the same RRQ from the same
    (address, port) within 5 s for a late copy of an ended transfer's (_STALE_COPY), and
    the ports the kernel hands out to one address repeat within a few hundred binds."""

    def __init__(self, server: tuple[str, int], name: str, size: int, window: int,
                 poller: select.epoll, by_fd: dict[int, Device]) -> None:
        self.addr, self.server, self.size = "", server, size
        self.poller, self.by_fd = poller, by_fd
        self.probe_rrq = rrq_of(name, tsize=0, blksize=BLKSIZE)
        self.download_rrq = rrq_of(name, blksize=BLKSIZE, windowsize=window)
        self.sock: socket.socket | None = None
        self.probe = True
        self.tid: tuple[str, int] | None = None
        self.expected = 1
        self.since_ack = 0
        self.received = 0
        self.window = 1
        self.last_heard = 0.0
        self.tries = 0
        self.pairs = 0
        self.failures: list[str] = []

    def _open(self, rrq: bytes, now: float) -> None:
        self._close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((self.addr, 0))
        sock.setblocking(False)
        self.sock = sock
        self.by_fd[sock.fileno()] = self
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.tid, self.expected, self.since_ack, self.received = None, 1, 0, 0
        self.last_heard, self.tries = now, 0
        sock.sendto(rrq, self.server)

    def _close(self) -> None:
        if self.sock is not None:
            del self.by_fd[self.sock.fileno()]
            self.poller.unregister(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def begin(self, now: float, n: int) -> None:
        self.addr = f"127.{2 + n // 250 % 200}.{n // 50_000 % 5}.{1 + n % 250}"
        self.probe = True
        self._open(self.probe_rrq, now)

    def _fail(self, why: str) -> None:
        self.failures.append(why)
        self._close()

    def _ack(self, block: int) -> None:
        assert self.sock is not None and self.tid is not None
        self.since_ack = 0
        self.sock.sendto(struct.pack("!HH", 4, block & 0xFFFF), self.tid)

    def tick(self, now: float) -> None:
        """Lost datagrams: the RRQ or the last ACK again after 1 s, 5 times at most."""
        if self.sock is None or now - self.last_heard < 1.0:
            return
        self.tries += 1
        if self.tries > 5:
            self._fail("timed out")
            return
        self.last_heard = now
        if self.tid is None:
            self.sock.sendto(self.probe_rrq if self.probe else self.download_rrq, self.server)
        else:
            self._ack(self.expected - 1)

    def datagram(self, data: bytes, src: tuple[str, int], now: float) -> bool:
        """True when the pair is done (or failed): the caller starts the next one."""
        if self.tid is None:
            self.tid = src
        elif src != self.tid:
            return False
        self.last_heard = now
        opcode = data[1] if len(data) >= 4 else 0
        if opcode == 5:
            self._fail(data[4:].split(b"\x00")[0].decode(errors="replace"))
            return True
        if opcode == 6:
            fields = data[2:].split(b"\x00")
            granted = dict(zip(fields[0::2], fields[1::2], strict=False))
            if self.probe:
                if int(granted.get(b"tsize", -1)) != self.size:
                    self._fail(f"tsize {granted.get(b'tsize')!r}")
                    return True
                assert self.sock is not None
                self.sock.sendto(b"\x00\x05\x00\x08size probe\x00", src)  # EDK2's
                self.probe = False
                self._open(self.download_rrq, now)
                return False
            if self.expected == 1:
                self.window = int(granted.get(b"windowsize", 1))
                self._ack(0)
            return False
        if opcode != 3 or self.probe:
            return False
        block = data[2] << 8 | data[3]
        if block != self.expected & 0xFFFF:
            self._ack(self.expected - 1)
            return False
        payload = len(data) - 4
        self.received += payload
        self.expected += 1
        self.since_ack += 1
        if payload < BLKSIZE:
            self._ack(self.expected - 1)
            if self.received != self.size:
                self._fail(f"got {self.received} bytes of {self.size}")
                return True
            self.pairs += 1
            self._close()
            return True
        if self.since_ack >= self.window:
            self._ack(self.expected - 1)
        return False


def rrq_of(name: str, **options: int) -> bytes:
    return (b"\x00\x01" + name.encode() + b"\x00octet\x00"
            + b"".join(b"%s\x00%d\x00" % (k.encode(), v) for k, v in options.items()))


def starts(port: int, name: str, size: int, clients: int, window: int, pairs: int,
           cap: float) -> Run:
    """``pairs`` size probes and downloads of ``name``, ``clients`` devices at a time."""
    poller = select.epoll()
    by_fd: dict[int, Device] = {}
    devices = [Device((HOST, port), name, size, window, poller, by_fd)
               for _ in range(clients)]
    begun = 0
    t0 = time.perf_counter()
    for d in devices[:pairs]:
        d.begin(t0, begun)
        begun += 1
    last_tick = t0
    try:
        while by_fd and time.perf_counter() - t0 < cap:
            events = poller.poll(0.05)
            now = time.perf_counter()
            for fd, _ in events:
                d = by_fd.get(fd)
                if d is None or d.sock is None or d.sock.fileno() != fd:
                    continue
                for _ in range(64):
                    if d.sock is None or d.sock.fileno() != fd:
                        break
                    try:
                        data, src = d.sock.recvfrom(2048)
                    except BlockingIOError:
                        break
                    if d.datagram(data, src, now):
                        if begun < pairs:
                            d.begin(now, begun)
                            begun += 1
                        break
            if now - last_tick >= 0.05:
                last_tick = now
                for d in devices:
                    d.tick(now)
                    if d.sock is None and begun < pairs:
                        d.begin(now, begun)
                        begun += 1
        seconds = time.perf_counter() - t0
    finally:
        for d in devices:
            d._close()
        poller.close()
    done = sum(d.pairs for d in devices)
    errors = [e for d in devices for e in d.failures]
    return Run(seconds, done, pairs - done, errors)


# --- main -------------------------------------------------------------------------------------


def available(args: argparse.Namespace) -> list[tuple[Peer, str]]:
    out = []
    for peer in PEERS:
        if args.only and peer.name not in args.only.split(","):
            continue
        if peer.binary is None and args.mode == "starts":
            out.append((Peer("netboot", netboot_serve), ""))
            if args.baseline:
                out.append((Peer("baseline", netboot_serve), str(args.baseline)))
            continue
        if peer.binary is None:
            out.append((peer, ""))
            if args.mypyc:
                out.append((Peer("netboot-mypyc", netboot_server), "mypyc"))  # built in main
            if args.uvloop:
                out.append((Peer("netboot-uvloop", netboot_server), "uvloop"))
            if args.baseline:
                out.append((Peer("baseline", netboot_server), str(args.baseline)))
            continue
        binary = shutil.which(peer.binary) or ""
        if peer.name == "tftpd-hpa" and args.in_tftpd:
            binary = args.in_tftpd
        elif peer.name == "tftpd-hpa" and binary and Path(binary).resolve().name == "atftpd":
            # Debian's atftpd installs /usr/sbin/in.tftpd as a link to itself: measured as
            # "tftpd-hpa" it refuses tftpd-hpa's flags and every transfer times out.
            print(f"tftpd-hpa: {binary} is atftpd's; pass --in-tftpd with an unpacked "
                  "tftpd-hpa, left out")
            continue
        if binary:
            out.append((peer, binary))
        else:
            print(f"{peer.name}: {peer.binary} not installed, left out")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("single", "lockstep", "loss", "starts"),
                        default="single")
    parser.add_argument("--pairs", type=int, default=3000,
                        help="starts: size probes + downloads per run")
    parser.add_argument("--name", default=LOADER,
                        help="starts: the file asked for (file.bin: a name netboot looks up "
                             "per request, not pinned)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--windows", default=None)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--loss", type=float, default=0.01)
    parser.add_argument("--cap", type=float, default=150.0, help="seconds per run at most")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--placements", default=None,
                        help="single: where server and client run, comma-separated of "
                             f"{','.join(PLACEMENTS)} (default all; other modes: free)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated server names")
    parser.add_argument("--uvloop", action="store_true", help="also netboot under uvloop")
    parser.add_argument("--mypyc", action="store_true",
                        help="also netboot with its NETBOOT_MYPYC=1 modules compiled")
    parser.add_argument("--in-tftpd", default="", help="path of tftpd-hpa's in.tftpd")
    parser.add_argument("--baseline", type=Path, metavar="TREE",
                        help="also the netboot of another checkout, as 'baseline'")
    parser.add_argument("--client", choices=("c", "python"), default="c",
                        help="tftp_client.c compiled with gcc (default), or the Python one")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tree", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.tree)
        return
    mode = args.mode
    size = args.size or {"single": 20_000_000, "lockstep": MiB, "loss": MiB,
                         "starts": 4096}[mode]
    clients = args.clients or {"single": 1, "lockstep": 50, "loss": 10, "starts": 16}[mode]
    windows = [int(w) for w in (args.windows or {"single": "1,4,8", "lockstep": "1",
                                                  "loss": "1,8", "starts": "4"}[mode]).split(",")]
    placements = (args.placements or ("free,split,shared" if mode == "single" else "free")
                  ).split(",")
    for placement in placements:
        if placement not in PLACEMENTS:
            parser.error(f"--placements: {placement!r} is none of {', '.join(PLACEMENTS)}")
    if len(os.sched_getaffinity(0)) < 2 or 1 not in os.sched_getaffinity(0):
        placements = [p for p in placements if p != "split"]  # needs CPUs 0 and 1
    if mode == "starts":
        args.client = "python"
    if args.client == "python":
        placements = [p for p in placements if p == "free"]  # the client runs in-process
    args.placements = placements
    everywhere = os.sched_getaffinity(0)
    loss = args.loss if mode == "loss" else 0.0
    peers = available(args)
    results: dict[tuple[str, int, str], list[tuple[Run, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as work:
        root = Path(tmp)
        (root / "file.bin").write_bytes(os.urandom(size))
        # Dated an hour back, as a boot loader is: netboot keeps no prebuilt packets of a
        # file modified in the last 2 s (_PacketCache.SETTLE), so the first round's
        # transfers each built their own (50 MiB of copies, 65,000 page faults per round).
        stale = time.time() - 3600
        os.utime(root / "file.bin", (stale, stale))
        # starts: the same bytes under a loader's name, which netboot resolves once at start
        # (FileTree's pinned names) as in a storm, where every device asks for snponly.efi.
        os.link(root / "file.bin", root / LOADER)
        digest = hashlib.sha256((root / "file.bin").read_bytes()).hexdigest()
        os.chmod(tmp, 0o755)
        client = c_client(Path(work)) if args.client == "c" else None
        if any(b == "mypyc" for _, b in peers):
            compiled = str(mypyc_tree(Path(work)))
            peers = [(p, compiled if b == "mypyc" else b) for p, b in peers]
        if args.client == "c" and client is None:
            print("gcc not installed: the Python client instead")
        for rep in range(args.repeat):
            # Rotate the order so that no server always runs first.
            order = peers[rep % len(peers):] + peers[:rep % len(peers)]
            for peer, binary in order:
                with peer.start(root, binary) as (port, pid):
                    if client is not None and rep == 0:
                        check(client, port, root, Path(work), peer.name, size, windows,
                              digest, args.cap)
                    for window in windows:
                        if mode == "starts":
                            # Warmed first: modules imported, the packet cache built.
                            starts(port, args.name, size, clients, window, 4 * clients,
                                   args.cap)
                        # Rotated too: no placement always follows the same one.
                        for placement in (placements[rep % len(placements):]
                                          + placements[:rep % len(placements)]):
                            where = PLACEMENTS[placement]
                            pin(pid, where[0] if where else everywhere)
                            meter = CpuMeter(pid)
                            if mode == "starts":
                                run = starts(port, args.name, size, clients, window,
                                             args.pairs, args.cap)
                            elif client is not None:
                                run = c_transfers(client, port, root, "file.bin", size,
                                                  clients, window, loss=loss,
                                                  seed=args.seed + rep, cap=args.cap,
                                                  cpus=where[1] if where else None)
                            else:
                                run = transfers(port, "file.bin", size, clients, window,
                                                loss=loss, seed=args.seed + rep, cap=args.cap)
                            cpu = meter.stop()
                            run.user, run.system = meter.user, meter.system
                            results.setdefault((peer.name, window, placement), []).append(
                                (run, cpu))
    report(mode, size, clients, windows, loss, args, [p.name for p, _ in peers], results)


def check(client: Path, port: int, root: Path, work: Path, name: str, size: int,
          windows: list[int], digest: str, cap: float) -> None:
    """One untimed transfer per windowsize written out and its SHA-256 compared with the
    file's: the bytes every server sends are right, not only their count."""
    copy = work / "copy.bin"
    for window in windows:
        run = c_transfers(client, port, root, "file.bin", size, 1, window, loss=0.0, seed=0,
                          cap=cap, copy=copy)
        got = hashlib.sha256(copy.read_bytes()).hexdigest()
        verdict = "equal" if got == digest and not run.failures else f"DIFFERENT ({got[:16]})"
        print(f"check {name:<16} window {window:>3}: sha256 {verdict}"
              + (f"  errors: {run.errors}" if run.errors else ""), flush=True)
        copy.unlink(missing_ok=True)


def report(mode: str, size: int, clients: int, windows: list[int], loss: float,
           args: argparse.Namespace, names: list[str],
           results: dict[tuple[str, int, str], list[tuple[Run, float]]]) -> None:
    def median(key: tuple[str, int, str]) -> tuple[Run, float]:
        runs = sorted(results[key], key=lambda rc: rc[0].seconds)
        return runs[len(runs) // 2]

    if mode == "starts":
        report_starts(size, clients, windows, args, names, results)
        return

    placements = args.placements
    placed = placements != ["free"]
    print(f"TFTP {mode}: {clients} x {size / MiB:g} MiB, blksize {BLKSIZE}"
          + (f", {loss:.0%} loss each way" if loss else "")
          + f", median of {args.repeat}, {args.client if args.client == 'python' else 'C'} client"
          " (windowsize is what the client asked; a server may grant 1; client: the"
          " client's CPU ms per MiB; CPU ms/MiB: the median of the rounds'; user %: the"
          " server's user share of its CPU over every round; dup DATA: duplicate or"
          " out-of-order blocks the clients received"
          + ("; placed: free = unpinned, split = server CPU 0 and client CPU 1, shared = both"
             " CPU 0; spread: the rounds' fastest-slowest seconds" if placed else "") + ")")
    ours = [n for n in names if n.startswith("netboot")]
    print(f"{'server':<16}{'window':>7}" + (f"{'placed':>8}" if placed else "")
          + f"{'seconds':>9}{'MiB/s':>8}{'CPU ms/MiB':>12}{'user %':>8}"
          f"{'client':>8}{'failed':>8}{'dup DATA':>10}"
          + "".join(f"{'time ÷ ' + n:>24}" for n in ours)
          + (f"  {'spread':<11}" if placed else ""))
    for window in windows:
        for placement in placements:
            for name in names:
                key = (name, window, placement)
                run, _ = median(key)
                mib = run.moved / MiB
                # The median of the rounds' own, not the median round's (by seconds): on a
                # loaded machine a round's time and its CPU move apart.
                per_mib = statistics.median(c * 1000 / max(r.moved / MiB, 1e-9)
                                            for r, c in results[key])
                if mode == "single":
                    # Over every round, not the median round's: a tick (10 ms) is 0.52 ms/MiB
                    # of one 19 MiB transfer, and the median round's CPU moved by ticks.
                    per_mib = (sum(c for _, c in results[key]) * 1000
                               / max(sum(r.moved for r, _ in results[key]) / MiB, 1e-9))
                # > 1: that netboot variant was faster than this server (same run, same
                # client, same placement).
                ratios = "".join(
                    f"{run.seconds / median((n, window, placement))[0].seconds:>23.2f}x"
                    for n in ours if name not in ours)
                pad = " " * 24 * len(ours) if name in ours else ""
                # "-", not blank, where there is no figure: a blank shifted the columns
                # after it for a reader splitting the line (targets.py).
                client = ("-" if run.client_cpu is None
                          else f"{run.client_cpu * 1000 / max(mib, 1e-9):.2f}")
                seconds = sorted(r.seconds for r, _ in results[key])
                # Over every round: ticks, too coarse for one round's share.
                ticked = sum(r.user + r.system for r, _ in results[key])
                user = (f"{100 * sum(r.user for r, _ in results[key]) / ticked:.0f}"
                        if ticked else "-")
                spread = f"  {seconds[0]:.3f}-{seconds[-1]:.3f}" if placed else ""
                print(f"{name:<16}{window:>7}" + (f"{placement:>8}" if placed else "")
                      + f"{run.seconds:>9.2f}{mib / run.seconds:>8.1f}"
                      f"{per_mib:>12.2f}{user:>8}{client:>8}{run.failures:>8}"
                      f"{run.duplicates:>10}"
                      f"{ratios}{pad if placed else ''}{spread}"
                      + (f"  errors: {sorted(set(run.errors))}" if run.errors else "")
                      + (f"  ({run.moved / 1e3:,.0f} kB moved)" if run.failures else ""))


def report_starts(size: int, clients: int, windows: list[int], args: argparse.Namespace,
                  names: list[str],
                  results: dict[tuple[str, int, str], list[tuple[Run, float]]]
                  ) -> None:
    print(f"TFTP starts: {args.pairs} x (size probe + download of {size} bytes), {clients} "
          f"devices at a time, blksize {BLKSIZE}; per server every round (order rotated), "
          "then the median; CPU µs per pair = two transfers started and ended")
    print(f"{'server':<16}{'window':>7}{'pairs/s':>9}{'µs CPU/pair':>13}{'failed':>8}"
          f"  rounds (µs CPU/pair)")
    for window in windows:
        for name in names:
            runs = results[(name, window, "free")]
            per = sorted(cpu * 1e6 / max(run.moved, 1) for run, cpu in runs)
            rates = sorted(run.moved / run.seconds for run, _ in runs)
            failed = sum(run.failures for run, _ in runs)
            errors = sorted({e for run, _ in runs for e in run.errors})
            print(f"{name:<16}{window:>7}{rates[len(rates) // 2]:>9.0f}"
                  f"{per[len(per) // 2]:>13.0f}{failed:>8}  "
                  + " ".join(f"{cpu * 1e6 / max(run.moved, 1):.0f}" for run, cpu in runs)
                  + (f"  errors: {errors[:5]}" if errors else ""))


if __name__ == "__main__":
    main()
