"""A boot storm end to end: N devices power on at once against netboot, then against dnsmasq
(proxyDHCP + TFTP) + nginx stand-ins serving the same bytes from static files.

    sudo python benchmarks/storm.py [--devices 50] [--within 1] [--enrolled N]
                                    [--kernel-size 8M] [--initrd-size 32M]
                                    [--loss 0.01] [--slow-acks MS] [--only netboot]
                                    [--inventory sqlite|postgresql|both] [--loaded]
                                    [--plain-switching] [--device-window 256K] [--diag]
                                    [--repeat 2] [--order standins-first] [--startup]
                                    [--quiet-standins] [--generators N]

Each device does what a UEFI PC chainloading iPXE does, and what its installer does after:

  dhcp_offer   broadcast DHCPDISCOVER to :67 (option 60 PXEClient, 93 arch 7, 97 UUID)
  pxe_ack      DHCPREQUEST to the server's :4011 (the PXE "boot server" step of EDK2)
  tftp_tsize   RRQ with tsize 0 + blksize, OACK, ERROR: EDK2 asks the size first
  tftp_loader  RRQ blksize 1468 windowsize 4 (OVMF's defaults), the first stage iPXE loader
  boot_ipxe    GET /boot.ipxe
  ipxe         GET /ipxe?mac=…&uuid=…&arch=x86_64…  (the machine's own script)
  kernel       GET the kernel URL of that script, every byte received and counted
  initrd       GET the initrd URL(s)
  config       GET the config URL of the script (its token is in the query)
  installing   POST /api/v1/machines/<mac>/events {"kind":"installing"}, Bearer <token>
  installed    POST … {"kind":"installed"}
  register     POST /api/v1/register {"mac","token","hostname","addresses","machine_id"}

Why network namespaces rather than loopback: proxyDHCP answers a DISCOVER from a client with
no address by broadcasting to 255.255.255.255:68, which on the host's own network stack would
leave through a real interface, and dnsmasq only does DHCP on an interface with an address in
its range. So the benchmark creates two namespaces joined by a veth pair (192.0.2.1 for the
server, 192.0.2.10-254 for the devices: a real storm comes from many addresses, and servers
limit transfers per address) for each target's run, runs the target's servers in the one and
fresh load generator processes in the other, and deletes both as the run ends. Nothing touches
the machine's own interfaces.

The load generator is ``--generators`` processes (default GENERATORS), each one bounded
asyncio program playing its share of the devices end to end: the devices of every N-th
client address, so that an address's connection pool and TFTP ports stay in one process.
All of them begin at one instant, each device at its place in ``--within``; their latencies
are merged (each stage's percentiles are of all devices), failures and CPU summed, the wall
is the last one's. A device's HTTP is benchmarks/device_http.py: a script, a config, an API
answer read and kept; a kernel's and an initrd's bytes received, acknowledged and counted by
the devices' kernel and dropped there (MSG_TRUNC), not copied into the generator
(``--copy-downloads``: copied, read into one buffer per process). One process on aiohttp,
the harness until session 30, spent 24-26 s of CPU in a 26-29 s storm: the wall was the
generator's (benchmarks/README.md, s30-storm).

Every target is run ``--repeat`` times (default 2; 1 with one target), the order reversed
each run, and the reading is the ratio of the targets' median walls: the target run second in
one namespace pair was 10-20 % slower (session 26), so one run's ratio carries its order.

netboot runs as ``netboot serve`` on a fresh data directory with ``--enrolled`` machines
imported by ``netboot import`` (clusters of 12,500 like the issue's fleet, one profile whose
kernel and initrd are files of the given sizes). The stand-ins get the same loader, kernel and
initrd; nginx serves one static iPXE script and one config per device, and answers the API
POSTs from a static ``return 200``. So the stand-ins show what the same storm costs when
nothing is decided: the floor netboot is measured against. Every server logs as it ships:
netboot at ``info`` (``--log-level``), dnsmasq a line per DHCP answer and TFTP transfer,
nginx an access line per request (``--quiet-standins``: the stand-ins log nothing, as before
s28-storm, while netboot wrote ~14 lines a device).

Each target's storm begins once its servers are idle after their first answer (settle():
their CPU below 5 % of a core for 1 s): dnsmasq and nginx have finished starting when they
first answer, netboot then still loads its inventory view (100,000 machines: ~1.5 s of CPU),
imports aiohttp and collects its heap, which a storm begun at its first answer counted in
netboot's wall alone (benchmarks/README.md, s28-storm). ``--startup`` begins at the first
answer (a storm at start-up, the default before s28-storm: decisions then read the database
until the view is in); ``--loaded`` also waits for "inventory view loaded" in netboot's log.
``--plain-switching`` runs netboot with the view loaded at Python's own switch interval
instead of ``service.brisk_switching``'s (the start-up storm's A/B, benchmarks/README.md
session 11).

``--inventory postgresql`` (or ``both``) runs netboot on a PostgreSQL inventory too: the
benchmark starts its own throwaway cluster with netboot.lab.pgcluster (Debian's binaries, a
unix socket in a private directory, no TCP; stopped by its own PID at the end), copies the
SQLite seed into it with ``netboot db copy``, and points ``inventory.dsn`` at it. The
database's own CPU (its backends serving netboot) is reported beside netboot's.

Each device's TCP receive buffer is iPXE's window, 256 KiB (``--device-window``; 0 leaves
Linux's autotuning, the harness before session 18): every device here shares one kernel and
its TCP memory with the server, and autotuned buffers filled it (see DEVICE_WINDOW).

Reported per target: p50/p95/p99/max per stage, when the devices' downloads began and ended
and their bulk rate (bulk_rate: the initrd stage's percentiles are not the rate the server
sent at), failures by stage and reason, wall time of the storm, server CPU seconds
(utime+stime from /proc/<pid>/stat of the server processes and their children), the load
generators' CPU (each process's) and loop lag, TCP segments the devices' kernel dropped and
the server's retransmission timeouts, each device slower than STRAGGLER seconds with its
stages and requests, the LAST_TRACED devices that ended last with their last stages (the
storm's tail: start, from the storm's start, and duration of each; their requests in the run
dir's last.json, to set beside the server's access log), each TFTP exchange slower than
SLOW_TFTP seconds with its address and port (to find it in netboot's log), the TFTP sockets
bound again to keep a port from another device (PORT_REUSE), and netboot ÷ stand-ins.
``--diag`` keeps nstat of both namespaces before and after and a capture of the HTTP
connections' SYN/FIN/RST packets in the run dir (with ``--keep``). Needs root (namespaces),
iproute2, dnsmasq and nginx (a target whose binary is missing is left out and said so).
Every wait is bounded; processes are stopped by their own PID; the namespaces are deleted in
a finally. Not part of pytest: speed is never asserted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import device_http
import peers
from device_http import DeviceHttp

if TYPE_CHECKING:
    from netboot.lab.pgcluster import Cluster

REPO = Path(__file__).resolve().parent.parent
SERVER_IP = "192.0.2.1"
CLIENT_IPS = [f"192.0.2.{i}" for i in range(10, 255)]
SERVER_IF, CLIENT_IF = "nbst0", "nbct0"
HTTP_PORT = 8080
PER_CLUSTER = 12_500  # the issue's fleet: 100,000 machines in 8 clusters
LOADER = "snponly.efi"  # what both servers hand a UEFI x86-64 PXE client
SO_BINDTODEVICE = 25
PG_TARGET = "netboot-pg"  # netboot on a PostgreSQL inventory; "netboot" is on SQLite
NETBOOT_TARGETS = ("netboot", PG_TARGET)
STAGES = ["dhcp_offer", "pxe_ack", "tftp_tsize", "tftp_loader", "boot_ipxe", "ipxe", "kernel",
          "initrd", "config", "installing", "installed", "register"]


def mac_of(i: int) -> str:
    return (0x02_00_00_00_00_00 + i).to_bytes(6, "big").hex(":")


def uuid_of(i: int) -> str:
    return f"{i:08x}-5354-4f52-8d00-{i:012x}"


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# --- the network: two namespaces and a veth pair ---------------------------------------------


def _ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30, input=stdin,
                   text=True)


def namespaces() -> contextlib.AbstractContextManager[tuple[str, str]]:
    return peers.veth_namespaces("nbstorm", SERVER_IF, CLIENT_IF, SERVER_IP, CLIENT_IPS)


def udp_drops(ns: str) -> int:
    """Datagrams the namespace's kernel dropped (UDP InErrors, which counts full receive
    buffers, plus SndbufErrors): tells a server or a load generator that did not keep up."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                          capture_output=True, text=True, timeout=30).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    udp = dict(zip(rows[0], rows[1], strict=False))
    return int(udp.get("InErrors", 0)) + int(udp.get("SndbufErrors", 0))


def tcp_ext(ns: str, key: str) -> int:
    """A TcpExt counter of the namespace's kernel (/proc/net/netstat)."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/netstat"], check=True,
                          capture_output=True, text=True, timeout=30).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("TcpExt:")]
    return int(dict(zip(rows[0], rows[1], strict=False)).get(key, 0))


def wire_counts(snmp: str, netstat: str) -> dict[str, int]:
    """A namespace's kernel counters of what crossed its stack (the texts of its
    /proc/net/snmp and /proc/net/netstat): TCP segments and bytes each way, retransmitted
    segments, UDP datagrams each way. What the server gave the devices' kernel to handle:
    the same bytes in more segments or datagrams cost that kernel (and the generator's system
    time, which a storm's wall follows on 2 cores) more, whoever sent them."""
    def table(text: str, name: str) -> dict[str, int]:
        rows = [line.split()[1:] for line in text.splitlines() if line.startswith(name + ":")]
        return {k: int(v) for k, v in zip(rows[0], rows[1], strict=False)} if rows else {}

    tcp, udp = table(snmp, "Tcp"), table(snmp, "Udp")
    ip_ext = table(netstat, "IpExt")
    return {"tcp_out": tcp.get("OutSegs", 0), "tcp_in": tcp.get("InSegs", 0),
            "tcp_resent": tcp.get("RetransSegs", 0), "udp_out": udp.get("OutDatagrams", 0),
            "udp_in": udp.get("InDatagrams", 0), "bytes_out": ip_ext.get("OutOctets", 0),
            "bytes_in": ip_ext.get("InOctets", 0)}


def wire(ns: str) -> dict[str, int]:
    """:func:`wire_counts` of the namespace ``ns`` now."""
    texts = [subprocess.run(["ip", "netns", "exec", ns, "cat", path], check=True,
                            capture_output=True, text=True, timeout=30).stdout
             for path in ("/proc/net/snmp", "/proc/net/netstat")]
    return wire_counts(*texts)


def wire_line(target: str, before: dict[str, int], after: dict[str, int]) -> str:
    """The server namespace's traffic during a storm, one line (:func:`wire_counts`)."""
    d = {k: after[k] - before.get(k, 0) for k in after}
    per = d["bytes_out"] / d["tcp_out"] / 1024 if d["tcp_out"] else 0.0
    return (f"{target}: the server's side of the wire: {d['tcp_out']} TCP segments out "
            f"({per:.1f} KiB each, {d['bytes_out'] >> 20} MiB with the UDP), {d['tcp_resent']} "
            f"sent again, {d['tcp_in']} in; UDP datagrams {d['udp_out']} out, {d['udp_in']} in")


def stage_shares(times: dict[str, list[float]]) -> dict[str, float]:
    """Each stage's share of the devices' time (its seconds summed over the devices, over
    their totals summed): which stages a storm's time is spent in, the downloads' mostly."""
    total = sum(times.get("total", []))
    return {s: sum(times[s]) / total for s in STAGES if times.get(s)} if total else {}


def listen_drops(ns: str) -> int:
    """Connections the namespace's kernel dropped at a full accept queue (TcpExt ListenDrops):
    a client then waits out SYN retransmissions (1, 2, 4, … s)."""
    return tcp_ext(ns, "ListenDrops")


def tcp_losses(server_ns: str, client_ns: str) -> tuple[int, int]:
    """Segments the devices' kernel dropped for want of receive memory (TCPRcvQDrop: the
    host's TCP memory under pressure, or a receive buffer full), and the server's
    retransmission timeouts (TCPTimeouts: each one doubles that connection's next wait)."""
    return tcp_ext(client_ns, "TCPRcvQDrop"), tcp_ext(server_ns, "TCPTimeouts")


def link_drops(ns: str, name: str) -> int:
    """Packets the veth end ``name`` dropped (rx + tx): a veth whose peer's queue is full
    drops silently, counted here and nowhere in /proc/net/snmp."""
    text = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", name],
                          check=True, capture_output=True, text=True, timeout=30).stdout
    stats = json.loads(text)[0].get("stats64", {})
    return sum(int(stats.get(way, {}).get("dropped", 0)) for way in ("rx", "tx"))


def leftovers(server_ns: str, client_ns: str) -> str:
    """What the namespaces still hold once a target's servers and generator are gone: its
    processes and its TCP sockets by state (TIME_WAIT ones last 60 s): what a next target in
    the same namespaces (--shared-namespaces) would meet."""
    said = []
    for ns, side in ((server_ns, "server"), (client_ns, "devices")):
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=30, check=False).stdout.split()
        states: dict[str, int] = {}
        for line in subprocess.run(["ip", "netns", "exec", ns, "ss", "-tanH"],
                                   capture_output=True, text=True, timeout=30,
                                   check=False).stdout.splitlines():
            state = line.split(None, 1)[0] if line.strip() else ""
            states[state] = states.get(state, 0) + 1
        said.append(f"{side} namespace {len(pids)} processes, TCP "
                    + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "none"))
    return "; ".join(said)


def backlog_drops() -> int:
    """Packets the kernel dropped at a full per-CPU input queue (netdev_max_backlog), all
    namespaces together: /proc/net/softnet_stat's second column, summed over CPUs."""
    return sum(int(line.split()[1], 16)
               for line in Path("/proc/net/softnet_stat").read_text().splitlines())


def machine_cpu() -> dict[str, float]:
    """The whole machine's CPU seconds so far by kind (/proc/stat's first line, every CPU and
    every process: other helpers' too): user, system, softirq (a veth's packets are carried
    there), iowait, steal, idle."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    ticks = dict(zip(names, (int(f) for f in fields), strict=False))
    ticks["user"] += ticks.pop("nice")
    ticks["system"] += ticks.pop("irq")
    return {k: v / CLK_TCK for k, v in ticks.items()}


def written_kib() -> int:
    """Page cache written back so far, machine-wide (/proc/vmstat nr_written, 4 KiB pages)."""
    rows = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return int(rows.get("nr_written", 0)) * 4


def disk_written_kib(sys_block: Path = Path("/sys/block")) -> int:
    """Bytes the machine's disks have written so far (KiB): the sectors written (the 7th
    field of /sys/block/DEV/stat, 512-byte units) of every block device that is a device
    (a ``device`` link: not a loop, RAM or device-mapper one, whose writes reach a disk
    counted here too). nr_written (written_kib) counts the page cache's pages, and a large
    folio (ext4's since Linux 6.16) is counted whole when one 4 KiB block of it was written:
    3,000 scattered 4 KiB writes into a clean 96 MiB copy count 82-83 MiB there, while 11
    MiB reach the disk (only the dirty blocks are written; s38-storm)."""
    total = 0
    for dev in sorted(sys_block.iterdir()) if sys_block.is_dir() else []:
        if (dev / "device").exists():
            fields = (dev / "stat").read_text().split()
            total += int(fields[6]) * 512 // 1024
    return total


def dirty_kib() -> int:
    """Page cache waiting to be written (/proc/meminfo Dirty + Writeback), KiB."""
    rows = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(rows[k].split()[0]) for k in ("Dirty", "Writeback"))


# --- CPU of a server and its children ----------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                out += [int(c) for c in text.split()]
    return out


def _family(pids: list[int]) -> list[int]:
    """``pids`` and their live descendants (at most 1,000)."""
    todo, seen = list(pids), list[int]()
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live descendants (nginx's workers), in seconds."""
    total = 0
    for p in _family([pid]):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def run_and_wait(pids: list[int]) -> tuple[float, float]:
    """Seconds the threads of ``pids`` and their live descendants have run on a CPU, and
    seconds they have waited for one while runnable (/proc/<pid>/task/<tid>/schedstat,
    the scheduler's run delay): a server whose answers are late because the machine gave
    it no CPU, not because its loop was busy, waited much."""
    ran = waited = 0
    for p in _family(pids):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError, ValueError):
                    on, wait = Path(f"/proc/{p}/task/{task}/schedstat").read_text().split()[:2]
                    ran, waited = ran + int(on), waited + int(wait)
    return ran / 1e9, waited / 1e9


def callgrind_control(*argv: str | int) -> None:
    """``callgrind_control`` on the server under --callgrind; bounded, and a failure said."""
    done = subprocess.run(["callgrind_control", *map(str, argv)], check=False,
                          capture_output=True, text=True, timeout=120)
    if done.returncode or "OK." not in done.stdout:
        print(f"callgrind_control {argv}: {done.stdout.strip()} {done.stderr.strip()}",
              flush=True)


# The system calls --syscalls counts (tracepoints: software events, which a VM without a PMU
# still has), the send threads' and the loop's: sendfile64's count is s49-attack's EAGAIN call.
SYSCALLS = ("sendfile64", "epoll_wait", "epoll_pwait", "epoll_ctl", "sendto", "sendmsg",
            "recvfrom", "recvmsg", "write", "writev", "read", "futex", "openat", "close")


def syscall_stat(pids: list[int], out: Path) -> subprocess.Popen[bytes]:
    """perf stat of the servers' system calls until SIGINT (every thread: -p names them at
    the start, and the send threads and executors are started before the storm)."""
    tids = [t for pid in pids for t in
            (int(x) for x in os.listdir(f"/proc/{pid}/task"))] + \
        [c for pid in pids for c in _children(pid)]
    events = ",".join(["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{n}" for n in SYSCALLS)])
    return subprocess.Popen(["perf", "stat", "-e", events, "-t", ",".join(map(str, tids)),
                             "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main_thread(pid: int) -> tuple[float, float]:
    """run_and_wait of ``pid``'s main thread alone (netboot's event loop, dnsmasq)."""
    with contextlib.suppress(OSError, ValueError):
        on, wait = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
        return int(on) / 1e9, int(wait) / 1e9
    return 0.0, 0.0


# A target's storm begins once its servers are idle: their CPU grew by less than IDLE_SHARE
# of a core in each of IDLE_LOOKS looks in a row, IDLE_LOOK seconds apart (settle()). dnsmasq
# and nginx have finished starting when they first answer; netboot answers first and then
# loads its inventory view (100,000 machines: ~1.5 s of CPU, GC included), imports aiohttp
# and collects its heap, which in a storm begun at its first answer ran inside netboot's
# measured wall and beside its devices (benchmarks/README.md, s28-storm). ``--startup``
# begins at the first answer (a storm at start-up, the default before s28-storm).
IDLE_LOOK = 0.5
IDLE_LOOKS = 2
IDLE_SHARE = 0.05
SETTLE_LIMIT = 120.0


def settle(cpu: Callable[[], float], *, look: float = IDLE_LOOK, looks: int = IDLE_LOOKS,
           share: float = IDLE_SHARE, limit: float = SETTLE_LIMIT,
           sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> tuple[float, bool]:
    """Until ``cpu()`` (the servers' CPU seconds so far) grows by less than ``share`` of a
    core over ``looks`` looks in a row ``look`` seconds apart; bounded by ``limit`` seconds.
    Returns the seconds waited and whether the servers went idle."""
    t0 = clock()
    quiet, last = 0, cpu()
    while quiet < looks:
        if clock() - t0 >= limit:
            return clock() - t0, False
        sleep(look)
        now = cpu()
        quiet = quiet + 1 if now - last < share * look else 0
        last = now
    return clock() - t0, True


# --- files both kinds of server serve ---------------------------------------------------------


def durable_copy(directory: Path) -> None:
    """Every file under ``directory`` written to disk now (fsync). A fresh copy of a
    100,000-machine inventory is ~92 MB of dirty page cache (1,000 machines: ~1 MB), which
    the kernel writes back 30 s after the copy at the latest, or netboot's first checkpoint
    (it syncs the database file): during the storm, work an inventory in use for a while
    does not bring (benchmarks/README.md, s36-storm)."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class Workload:
    root: Path
    devices: int
    enrolled: int
    kernel_size: int
    initrd_size: int
    managed: bool = False
    tree: Path = REPO  # the netboot whose server runs (--tree): another checkout's, for A/B
    # Each run's copy of the seeded inventory written to disk before its server starts
    # (--sync-inventory: durable_copy), as an inventory in use for a while is; by default
    # it is left in the page cache, written back during the storm.
    sync_copy: bool = False
    # How many clusters the fleet is in (0: one per PER_CLUSTER machines, the issue's 8);
    # ipxe_inproc.py --clusters: a fleet of hundreds.
    clusters: int = 0

    @property
    def cluster_count(self) -> int:
        return self.clusters or max(1, self.enrolled // PER_CLUSTER)

    @property
    def assets(self) -> Path:
        return self.root / "assets"

    def device_index(self, k: int) -> int:
        """Which enrolled machine storm device ``k`` is: spread over the whole inventory."""
        return k * max(1, self.enrolled // self.devices)

    def build(self) -> None:
        self.assets.mkdir(parents=True)
        system_loader = Path("/usr/lib/ipxe") / LOADER
        loader = (system_loader.read_bytes() if system_loader.is_file()
                  else os.urandom(173_792))  # Debian's snponly.efi is this size
        (self.assets / LOADER).write_bytes(loader)
        (self.assets / "storm").mkdir()
        for name, size in (("vmlinuz", self.kernel_size), ("initrd", self.initrd_size)):
            with open(self.assets / "storm" / name, "wb") as fh:
                chunk = os.urandom(min(size, 1 << 20))
                left = size
                while left > 0:
                    fh.write(chunk[:left])
                    left -= len(chunk)

    # netboot's inventory
    def netboot_seed(self, python: str, repo: Path | None = None) -> float:
        """Enroll the fleet in a fresh data dir with the CLI of ``repo`` (default: the tree
        whose server runs); returns the import's seconds."""
        data = self.root / "netboot-seed"
        data.mkdir()
        clusters = self.cluster_count
        env = {**os.environ, "PYTHONPATH": str(repo or self.tree)}

        def cli(*args: str) -> None:
            subprocess.run([python, "-m", "netboot", *args, "--data-dir", str(data)],
                           check=True, capture_output=True, timeout=600, env=env,
                           cwd=self.root)  # not the harness's: see start()

        for c in range(clusters):
            # A fixed server URL: every node installs at once (a managed cluster would hold
            # its agents until the first server registers, which a storm cannot show).
            # http_paths.py uses managed clusters: their join lookup is on the /ipxe path.
            url = "managed" if self.managed else f"https://192.0.2.{200 + c}:6443"
            cli("clusters", "add", f"line-{c}", "--server-url", url, "--token", f"storm-{c}")
        cli("profiles", "add", "storm", "--kernel", "storm/vmlinuz", "--initrd", "storm/initrd")
        rows = ["mac,hostname,serial,uuid,cluster,role,profile"]
        rows += [f"{mac_of(i)},edge-{i:06d},SN{i:07d},{uuid_of(i)},line-{i % clusters},agent,storm"
                 for i in range(self.enrolled)]
        csv = self.root / "fleet.csv"
        csv.write_text("\n".join(rows) + "\n")
        t0 = time.perf_counter()
        cli("import", str(csv))
        return time.perf_counter() - t0

    def netboot_copy_to(self, python: str, dsn: str) -> float:
        """Copy the seeded SQLite inventory into the PostgreSQL at ``dsn`` (`netboot db copy`,
        verified by counts and checksums); returns the copy's seconds."""
        dsn_file = self.root / "pg.dsn"  # a DSN on the command line would show in ps
        dsn_file.write_text(dsn)
        t0 = time.perf_counter()
        subprocess.run([python, "-m", "netboot", "db", "copy", "--from",
                        str(self.root / "netboot-seed" / "netboot.db"), "--to", f"@{dsn_file}"],
                       check=True, capture_output=True, timeout=600, cwd=self.root,
                       env={**os.environ, "PYTHONPATH": str(self.tree)})
        return time.perf_counter() - t0

    def netboot_config(self, run: Path, log_level: str, dsn: str | None = None) -> Path:
        """netboot's config for a run: its own limits, as a user runs it (tftp.max_transfers'
        default, 4,096, is above the --tftp-max dnsmasq is given: twice the devices)."""
        data = run / "data"
        shutil.copytree(self.root / "netboot-seed", data)
        if self.sync_copy:
            durable_copy(data)
        conf = run / "netboot.yaml"
        inventory = ({"backend": "postgresql", "dsn": dsn} if dsn
                     else {"backend": "sqlite"})
        conf.write_text(json.dumps({  # YAML is a superset of JSON
            "server": {"interfaces": [SERVER_IF], "advertise": SERVER_IP, "data_dir": str(data),
                       "log_level": log_level},
            "http": {"listen": SERVER_IP, "port": HTTP_PORT},
            "dhcp": {"mode": "proxy"},
            "tftp": {"port": 69},
            "dns": {"enabled": False},
            "assets": {"dirs": [str(self.assets)]},
            "discovery": {"policy": "ignore"},
            "inventory": inventory,
        }))
        return conf

    # the stand-ins' static files
    def static_site(self, run: Path) -> Path:
        www = run / "www"
        (www / "ipxe").mkdir(parents=True)
        (www / "config").mkdir()
        (www / "assets").symlink_to(self.assets)
        base = f"http://{SERVER_IP}:{HTTP_PORT}"
        boot = (REPO / "templates" / "ipxe" / "boot.ipxe").read_text()
        (www / "boot.ipxe").write_text(boot.replace("{{ base_url }}", base))
        for k in range(self.devices):
            i = self.device_index(k)
            hexhyp = mac_of(i).replace(":", "-")
            token = secrets.token_urlsafe(24)
            config_url = f"{base}/config/{hexhyp}?token={token}"
            (www / "ipxe" / f"{hexhyp}.ipxe").write_text(
                f"#!ipxe\n# netboot: install edge-{i:06d} with profile storm (stand-in)\n"
                f"echo installing edge-{i:06d}\n"
                f"kernel {base}/assets/storm/vmlinuz initrd=initrd k3os.mode=install "
                "k3os.install.silent=true k3os.install.device=/dev/sda "
                f"k3os.install.config_url={config_url} console=ttyS0 console=tty1\n"
                f"initrd --name initrd {base}/assets/storm/initrd\nboot\n")
            (www / "config" / hexhyp).write_text(
                f"hostname: edge-{i:06d}\nk3os:\n  server_url: https://192.0.2.200:6443\n"
                f"  token: storm-0\n  k3s_args: [agent, --node-name, edge-{i:06d}]\n")
        return www


# --- the servers ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()  # this process only, by its own handle
                self.popen.wait(timeout=15)


def start(name: str, ns: str, argv: list[str], log: Path, env: dict[str, str] | None = None
          ) -> Proc:
    # `ip netns exec` and `env` exec the program: the PID is the server's own. In the run's
    # directory: `python -m` puts its working directory first on sys.path, and run from a
    # checkout the server imported that checkout's netboot, not --tree's (PYTHONPATH): an
    # A/B started from a checkout ran that checkout's server on both sides (session 18).
    with log.open("ab") as out:
        popen = subprocess.Popen(["ip", "netns", "exec", ns, "env", *(f"{k}={v}" for k, v in
                                  (env or {}).items()), *argv],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=log.parent)
    return Proc(name, popen, log)


# `netboot serve` with its inventory view loaded at Python's own switch interval (5 ms), not
# service.brisk_switching's 0.5 ms: the other side of the start-up storm's A/B (--plain-switching).
PLAIN_SWITCHING = ("import contextlib, runpy, sys; import netboot.service as s; "
                   "s.brisk_switching = lambda *a, **k: contextlib.nullcontext(); "
                   "sys.argv[0] = 'netboot'; runpy.run_module('netboot', run_name='__main__')")


# --callgrind: the server runs under callgrind uninstrumented (start-up at valgrind's plain
# speed) and is instrumented from the storm's start to its end only (callgrind_control -i),
# so its counts are the storm's: instructions are what the VM can count (no PMU here), and
# walls on a shared machine are noise.
CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
             "--dump-instr=no")


def start_netboot(ns: str, run: Path, work: Workload, python: str, log_level: str,
                  dsn: str | None = None, plain_switching: bool = False,
                  loop_probe: bool = False, callgrind: bool = False) -> list[Proc]:
    conf = work.netboot_config(run, log_level, dsn)
    command = (["-c", PLAIN_SWITCHING] if plain_switching
               else [str(Path(__file__).with_name("storm_loop_probe.py"))] if loop_probe
               else ["-m", "netboot"])
    wrap = [*CALLGRIND, f"--callgrind-out-file={run / 'callgrind.out'}"] if callgrind else []
    return [start("netboot", ns, [*wrap, python, *command, "serve", "--config", str(conf)],
                  run / "netboot.log",
                  {"PYTHONPATH": str(work.tree), "PYTHONUNBUFFERED": "1"})]


def start_standins(ns: str, run: Path, work: Workload, quiet: bool = False) -> list[Proc]:
    """dnsmasq and nginx logging as they ship, as netboot does (its ``info``): dnsmasq a line
    for each DHCP answer and TFTP transfer, nginx an access line for each request, each into
    the run dir. ``quiet`` (--quiet-standins): neither logs any (the harness before s28-storm,
    while netboot logged ~14 lines a device)."""
    www = work.static_site(run)
    dnsmasq = start("dnsmasq", ns, [
        "dnsmasq", "--keep-in-foreground", "--port=0", f"--interface={SERVER_IF}",
        "--bind-interfaces", "--conf-file=/dev/null", "--user=root", "--pid-file=",
        f"--dhcp-leasefile={run / 'dnsmasq.leases'}", f"--dhcp-range={SERVER_IP},proxy",
        f"--pxe-service=x86-64_EFI,storm,{LOADER}", "--enable-tftp", f"--tftp-root={work.assets}",
        f"--tftp-max={max(50, work.devices * 2)}", "--log-facility=-",
        *(("--quiet-dhcp", "--quiet-tftp") if quiet else ()),
    ], run / "dnsmasq.log")
    (run / "nginx").mkdir()
    conf = run / "nginx" / "nginx.conf"
    tmp = run / "nginx"
    conf.write_text(f"""
daemon off;
user root root;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log {'off' if quiet else f'{tmp}/access.log'};
  sendfile on; tcp_nopush on; keepalive_requests 100000;
  default_type application/octet-stream;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen {SERVER_IP}:{HTTP_PORT} backlog=4096;
    root {www};
    disable_symlinks off;
    location = /ipxe {{ default_type text/plain; try_files /ipxe/$arg_mac.ipxe =404; }}
    location /config/ {{ default_type text/yaml; }}
    location /api/ {{ default_type application/json; return 200 '{{"ok":true}}\\n'; }}
  }}
}}
""")
    nginx = start("nginx", ns, ["nginx", "-c", str(conf), "-p", str(tmp)], run / "nginx.log")
    return [dnsmasq, nginx]


# --- the load generator (runs inside the client namespace) ----------------------------------


class Failed(Exception):
    pass


# --- a device's HTTP client: benchmarks/device_http.py (kept-alive connections per client
# address, reopened as iPXE reopens them, every byte read with recv_into) ----------------

# iPXE advertises at most a 256 KiB receive window (TCP_MAX_WINDOW_SIZE, src/include/ipxe/
# tcp.h) and keeps what it receives in its own memory. Linux sockets left to autotune grow
# their receive buffers to tcp_rmem's maximum (32 MiB here) whenever the load generator reads
# late, and all of them, the server's too, draw on the one host-wide TCP memory pool
# (net.ipv4.tcp_mem): in a 1,500-device storm of 5 MiB downloads that pool reached its
# pressure mark in every run, the devices' kernel then dropped 450-1,300 arriving segments
# (TcpExtTCPRcvQDrop), and the server's retransmissions backed off exponentially (TCPTimeouts):
# now and then one device waited 20-90 s for its initrd, something no real device's TCP
# would do. So each device connection's receive buffer is held to iPXE's window.
DEVICE_WINDOW = 256 << 10
# A device slower than this (seconds, power-on to register) is reported with its stages'
# start times and its requests (connection reused or new, local port, time to the response
# head): a straggler is found in the server's log and a capture by these.
STRAGGLER = 20.0
LAST_TRACED = 5  # the devices that ended last, each traced stage by stage (the storm's tail)
# Each device here shares its address with the devices ``len(CLIENT_IPS)`` apart, where a
# real device has one of its own. Two of them could be handed the same random TFTP port
# (~1 pair in 28,000): the later one's RRQ, byte for byte the earlier one's, came from the
# (address, port) of a transfer that had just ended, which netboot takes for a late copy of
# that transfer's request for 5 s (servers/tftp.py _STALE_COPY) and ignores: that device
# waited ~5 s (its 1 s retransmissions ignored until then), about one storm in six of
# 1,000 devices. A device's TFTP socket is therefore never given a port another device on
# its address closed less than PORT_REUSE seconds ago (benchmarks/README.md, s19-stall).
PORT_REUSE = 10.0
SLOW_TFTP = 2.0  # a TFTP exchange this slow is listed with its address and port


class _Done(Exception):
    """The device has done the last stage asked for (--until)."""


@dataclass
class Device:
    k: int
    index: int
    ip: str

    @property
    def mac(self) -> str:
        return mac_of(self.index)

    @property
    def hexhyp(self) -> str:
        return self.mac.replace(":", "-")

    @property
    def secret(self) -> str:
        """The install's secret its register command sends (a random UUID on a device)."""
        return f"{self.index:08x}-5345-4352-8554-{self.index:012x}"


@dataclass
class Spec:
    devices: int
    within: float
    enrolled: int
    kernel_size: int
    initrd_size: int
    loss: float
    slow_acks_ms: float
    device_timeout: float
    seed: int
    until: str | None = None
    device_window: int = DEVICE_WINDOW  # each device connection's receive buffer, 0: Linux's
    started: float = 0.0  # time.monotonic() when the server was started (one clock per host)
    share: int = 0  # which of the storm's ``shares`` generator processes this one is
    shares: int = 1
    copy_downloads: bool = False  # a download's bytes copied to the generator, not dropped


def share_of(spec: Spec) -> list[Device]:
    """The devices generator process ``spec.share`` of ``spec.shares`` plays: those of every
    ``shares``-th client address, so that each address's devices (its connection pool, its
    TFTP ports: PORT_REUSE) are in one process. Power-on times stay the storm's (``k``)."""
    step = max(1, spec.enrolled // spec.devices)
    return [Device(k, k * step, CLIENT_IPS[k % len(CLIENT_IPS)]) for k in range(spec.devices)
            if (k % len(CLIENT_IPS)) % spec.shares == spec.share]


class UdpSocket:
    """A non-blocking UDP socket whose every readiness drains the receive queue.

    asyncio's datagram transport reads one datagram per socket per loop iteration; with a
    thousand devices' sockets in one loop an iteration takes tens of milliseconds, so the
    shared :68 socket would hand out offers at a few dozen a second and the devices would time
    out with their answers queued in the kernel (seen on the wire: dnsmasq answered every
    DISCOVER within 16 ms). Here the load generator reads all that is queued at once."""

    def __init__(self, sock: socket.socket,
                 on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.on_datagram = on_datagram
        self.send_failed = 0  # datagrams the kernel refused (a full send buffer)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._ready)

    @classmethod
    def bound(cls, address: tuple[str, int],
              on_datagram: Callable[[bytes, tuple[str, int]], None]) -> UdpSocket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return cls(sock, on_datagram)

    def _ready(self) -> None:
        for _ in range(10_000):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error queued on the socket: the retry handles it
                continue
            self.on_datagram(data, (addr[0], addr[1]))

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, address)
        except OSError:  # the device's retransmission handles it, as a firmware's does
            self.send_failed += 1

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class TftpReceiver:
    """A TFTP read as a firmware does it, driven by callbacks (no await per packet: the load
    generator must stay cheaper than the servers it loads). ``loss`` drops received DATA and
    sent ACKs at random; ``slow`` delays every ACK. Retransmits after 1 s without progress,
    gives up after 6 tries (EDK2's MTFTP waits 4 s a try; iPXE 1-3 s)."""

    def __init__(self, done: asyncio.Future[int], rrq: bytes, probe: bool, loss: float,
                 slow: float, rng: random.Random) -> None:
        self.done, self.rrq, self.probe = done, rrq, probe
        self.loss, self.slow, self.rng = loss, slow, rng
        self.tid: tuple[str, int] | None = None
        self.blksize, self.window = 512, 1
        self.expected, self.last_acked, self.total, self.tries, self.packets = 1, 0, 0, 0, 0
        self.resent = 0  # requests and ACKs sent again at the 1 s timer, in all
        self.timer: asyncio.TimerHandle | None = None

    def start(self, transport: UdpSocket) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.transport.sendto(self.rrq, (SERVER_IP, 69))
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(1.0, self._timeout)

    def _finish(self, result: int | Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.done.done():
            if isinstance(result, Exception):
                self.done.set_exception(result)
            else:
                self.done.set_result(result)

    def _timeout(self) -> None:
        self.tries += 1
        self.resent += 1
        if self.tries > 6:
            self._finish(Failed("tftp timeout"))
            return
        if self.tid is None:
            self.transport.sendto(self.rrq, (SERVER_IP, 69))
        else:
            self._send_ack(self.last_acked)
        self._arm()

    def _ack(self, block: int) -> None:
        self.last_acked = block
        if self.slow:
            self.loop.call_later(self.slow, self._send_ack, block)
        else:
            self._send_ack(block)

    def _send_ack(self, block: int) -> None:
        if self.done.done() and block != self.last_acked:
            return
        if not (self.loss and self.rng.random() < self.loss) and self.tid is not None:
            self.transport.sendto(struct.pack("!HH", 4, block & 0xFFFF), self.tid)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done():
            return
        self.packets += 1
        if self.packets > 200_000:
            self._finish(Failed("tftp: too many packets"))
            return
        if self.loss and self.rng.random() < self.loss:
            return
        if self.tid is None:
            self.tid = addr
        elif addr != self.tid:
            return
        opcode = int.from_bytes(data[:2], "big")
        if opcode == 5:
            self._finish(Failed(f"tftp error {data[4:-1].decode(errors='replace')[:40]}"))
            return
        if opcode == 6:
            fields = data[2:].split(b"\0")
            got = {k.decode().lower(): v.decode()
                   for k, v in zip(fields[0::2], fields[1::2], strict=False) if k}
            if self.probe:
                # EDK2 ends the size probe with an ERROR once it has the OACK.
                self.transport.sendto(b"\x00\x05\x00\x08size probe\x00", self.tid)
                self._finish(int(got["tsize"]) if "tsize" in got
                             else Failed("no tsize in OACK"))
                return
            self.blksize = int(got.get("blksize", 512))
            self.window = int(got.get("windowsize", 1))
            self.tries = 0
            self._arm()
            self._ack(0)
            return
        if opcode != 3:
            self._finish(Failed(f"tftp opcode {opcode}"))
            return
        block = int.from_bytes(data[2:4], "big")
        if block != self.expected & 0xFFFF:
            if block != (self.expected - 1) & 0xFFFF:
                self._ack(self.expected - 1)  # a gap: ask for the rest of the window again
            return
        self.tries = 0
        self._arm()
        payload = len(data) - 4
        self.total += payload
        self.expected += 1
        last = payload < self.blksize
        if last or self.expected - 1 - self.last_acked >= self.window:
            self._ack(self.expected - 1)
        if last:
            self._finish(Failed("no OACK to the size probe") if self.probe else self.total)


# The devices' :68 port when several generator processes share it. Every process has its
# own :68 socket (SO_REUSEADDR), and the kernel gives each broadcast offer to every one of
# them: each process received every other's offers, and an offer one of them dropped (its
# receive buffer full) was a device answered only at its 4 s retransmission, the server's
# loss by every figure of the storm. So each process's devices draw their xids in its own
# residue class (xid_of), and a classic BPF filter on its socket (offer_filter) lets only
# those in; and a packet socket ahead of the UDP layer (OfferTap) sees each offer to the
# process's devices as it reaches their side of the veth: on the wire and not delivered is
# the generator's loss, not the server's. A filter's rejections count in the kernel's UDP
# InErrors and the socket's drops like a full buffer's (Linux's udp_queue_rcv_one_skb), so
# the devices' UDP drops are told without them (run_target).
SO_ATTACH_FILTER = 26
SO_MEMINFO, SK_MEMINFO_DROPS = 55, 8  # struct sk_meminfo's u32s; sk_drops is the 9th
SOL_PACKET, PACKET_STATISTICS, PACKET_IGNORE_OUTGOING = 263, 6, 23
SO_RCVBUFFORCE, SO_TIMESTAMPNS = 33, 35  # not in Python 3.11's socket module
ETH_P_IP = 0x0800
Bpf = list[tuple[int, int, int, int]]  # classic BPF: (code, jt, jf, k)


def xid_of(draw: int, share: int, shares: int) -> int:
    """A device's DHCP xid from a 32-bit ``draw``, in its generator process's class
    (``xid % shares == share``); with one process the draw itself, as before."""
    return draw % (2**32 // shares) * shares + share


def _xid_in_class(share: int, shares: int, load: tuple[int, int, int, int], drop: int) -> Bpf:
    # ``load`` puts the xid in A; ``drop``: the jump from the jeq to the program's ret 0.
    return [load, (0x94, 0, 0, shares),  # A %= shares (BPF_ALU|BPF_MOD|BPF_K)
            (0x15, 0, drop, share)]  # A == share? on, else to ret 0 (BPF_JMP|BPF_JEQ|BPF_K)


def offer_filter(share: int, shares: int) -> Bpf:
    """A UDP socket's filter: the datagrams whose xid is in ``share``'s class. A UDP
    socket's filter sees the datagram from its UDP header: the xid at 8 + 4."""
    return [*_xid_in_class(share, shares, (0x20, 0, 0, 12), 1),  # ld [12] (BPF_LD|BPF_W|BPF_ABS)
            (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0)]  # ret all; ret 0 (dropped)


def tap_filter(share: int, shares: int) -> Bpf:
    """A packet socket's (SOCK_DGRAM: from the IP header): UDP to port 68, unfragmented,
    its xid in ``share``'s class."""
    return [(0x30, 0, 0, 9),  # ldb [9]: the protocol
            (0x15, 0, 9, 17),  # UDP, else ret 0
            (0x28, 0, 0, 6),  # ldh [6]: flags and fragment offset
            (0x45, 7, 0, 0x1FFF),  # a fragment after the first: ret 0
            (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): X = the IP header's length
            (0x48, 0, 0, 2),  # ldh [x+2]: the destination port
            (0x15, 0, 4, 68),  # 68, else ret 0
            *_xid_in_class(share, shares, (0x40, 0, 0, 12), 1),  # ld [x+12]: the xid
            (0x06, 0, 0, 0xFFFFFFFF), (0x06, 0, 0, 0)]


def attach_filter(sock: socket.socket, program: Bpf) -> None:
    """SO_ATTACH_FILTER: ``program`` as a struct sock_fprog (the kernel copies it)."""
    import ctypes
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *insn) for insn in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(program), ctypes.addressof(code)))


def socket_drops(sock: socket.socket) -> int:
    """The datagrams the kernel dropped for ``sock`` (full buffer, or its filter's
    rejections): sk_drops, as /proc/net/udp's last column says it."""
    meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
    return int(struct.unpack_from("9I", meminfo)[SK_MEMINFO_DROPS])


class OfferTap:
    """The offers to one generator process's devices as they reach the devices' side of the
    veth: a packet socket on CLIENT_IF (tap_filter), read and closed once the process's
    devices are past their DHCP stage (its buffer holds every offer of a storm: ~2.3 KB
    each); until then its filter runs on every frame the devices receive. Each offer with
    its kernel receive time (SO_TIMESTAMPNS, CLOCK_REALTIME): when the server's answer was
    there, apart from when the device's coroutine had it."""

    BUFFER = 32 << 20

    def __init__(self, share: int, shares: int, interface: str = CLIENT_IF) -> None:
        # Protocol 0 until bound: no frame is queued before the filter is on.
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.BUFFER)
            attach_filter(self.sock, tap_filter(share, shares))
            # Not the devices' own frames going out (their ACKs: each one would be cloned
            # for the tap before its filter turned it away).
            self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.sock.bind((interface, ETH_P_IP))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def read(self) -> tuple[list[tuple[int, int]], int]:
        """(xid, kernel receive time in ns) of every offer seen, and how many the tap itself
        dropped (its buffer full: then what it saw is short)."""
        seen = []
        space = socket.CMSG_SPACE(16)
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(2048, space)
            except (BlockingIOError, InterruptedError):
                break
            header = (data[0] & 0x0F) * 4
            if len(data) < header + 12:
                continue
            stamp = next((struct.unpack("@ll", value[:16]) for level, kind, value in ancdata
                          if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS),
                         (0, 0))
            seen.append((int.from_bytes(data[header + 12:header + 16], "big"),
                         stamp[0] * 1_000_000_000 + stamp[1]))
        _packets, drops = struct.unpack("II", self.sock.getsockopt(
            SOL_PACKET, PACKET_STATISTICS, 8))
        return seen, drops

    def close(self) -> None:
        self.sock.close()


class DhcpPort:
    """The :68 socket of a generator process: proxy offers come back broadcast to it, and are
    handed to the device waiting for that xid. With several generator processes, only the
    offers to this process's devices come in (offer_filter)."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.sent: set[int] = set()  # the xids this process's devices sent
        self.late = 0  # offers that came after their device gave up
        self.sent_at: dict[int, int] = {}  # xid -> time.time_ns() its first DISCOVER left
        self.got: dict[int, int] = {}  # xid -> offers delivered to this socket
        self.got_at: dict[int, int] = {}  # xid -> time.time_ns() the first was handed over
        self.resumed_at: dict[int, int] = {}  # xid -> time.time_ns() its device had it

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 240 and data[0] == 2:
            xid = int.from_bytes(data[4:8], "big")
            if xid in self.sent:
                self.got[xid] = self.got.get(xid, 0) + 1
                self.got_at.setdefault(xid, time.time_ns())
            fut = self.waiting.get(xid)
            if fut is not None and not fut.done():
                fut.set_result(data)
            elif xid in self.sent:
                self.late += 1

    def against(self, seen: list[tuple[int, int]], retried: list[int]) -> dict[str, Any]:
        """What the offers ``seen`` on the devices' wire (OfferTap) say: the offers to this
        process's devices there, those its socket never delivered (the generator's loss),
        the ``retried`` devices' xids among them, and each answered device's DISCOVER →
        offer time split at the wire and in the generator (ms: the server's and the
        kernels' part; the generator's socket and loop until it read the offer; its loop
        until the device's coroutine had it)."""
        wire: dict[int, int] = {}
        first: dict[int, int] = {}
        for xid, at in seen:
            if xid in self.sent:
                wire[xid] = wire.get(xid, 0) + 1
                first.setdefault(xid, at)
        lost = {xid: n - self.got.get(xid, 0) for xid, n in wire.items()
                if n > self.got.get(xid, 0)}
        to_wire, to_read, to_device = [], [], []
        for xid, at in first.items():
            if xid in self.resumed_at and xid in self.got_at and xid in self.sent_at and at:
                to_wire.append((at - self.sent_at[xid]) / 1e6)
                to_read.append((self.got_at[xid] - at) / 1e6)
                to_device.append((self.resumed_at[xid] - self.got_at[xid]) / 1e6)
        return {"offers_on_wire": sum(wire.values()), "offers_delivered": sum(self.got.values()),
                "offers_lost_here": sum(lost.values()),
                "retried_lost_here": sum(1 for xid in retried if xid in lost),
                "offer_to_wire_ms": to_wire, "offer_wire_to_read_ms": to_read,
                "offer_read_to_device_ms": to_device}


class Generator:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        # A workload, not security-relevant. Each generator process draws its own xids and
        # losses (the first as one process did before session 30).
        self.rng = random.Random(spec.seed if spec.share == 0 else f"{spec.seed}/{spec.share}")
        self.times: dict[str, list[float]] = {s: [] for s in [*STAGES, "total"]}
        self.failures: dict[str, dict[str, int]] = {}
        self.base = f"http://{SERVER_IP}:{HTTP_PORT}"
        self.dhcp: DhcpPort | None = None
        self.dhcp_transport: UdpSocket | None = None
        # The offer tap (OfferTap) until the last device is past its DHCP stage, then what
        # it saw: (xid, receive time) and its own drops.
        self.tap: OfferTap | None = None
        self.in_dhcp = 0
        self.tapped: tuple[list[tuple[int, int]], int] = ([], 0)
        self.cpu0 = self.cpu0_system = 0.0
        self.lags: list[float] = []
        self.t0 = 0.0
        # Devices whose first DISCOVER got no offer: (index, xid, ms after the storm began
        # that it was first sent, ms to the offer).
        self.retried: list[tuple[int, int, float, float]] = []
        self.probe_ports: dict[int, int] = {}  # device index -> its size probe's port
        self.same_port = 0  # devices whose download came from their probe's port
        # (address, port) -> (device index, time.monotonic() its TFTP socket closed), and
        # the sockets bound again because another device had that port lately (PORT_REUSE).
        self.port_closed: dict[tuple[str, int], tuple[int, float]] = {}
        self.rebound = 0
        # TFTP exchanges slower than SLOW_TFTP: (device, address, port, "probe"/"download",
        # seconds, resent at the 1 s timer), to find them in netboot's log by address:port.
        self.slow_tftp: list[tuple[int, str, int, str, float, int]] = []
        self.slow: list[dict[str, Any]] = []
        # Every device that finished: (its end, from the storm's start, k, its stages, its
        # requests): the LAST_TRACED latest are returned (the storm's tail, traced).
        self.ended: list[tuple[float, int, list[Any], list[Any]]] = []
        # Each device's downloads: (kernel begun, initrd begun, initrd ended), seconds from
        # the storm's start (report(): the bulk phase's aggregate rate).
        self.downloads: list[tuple[float, float, float]] = []

    # -- DHCP -----------------------------------------------------------------------------
    def _packet(self, dev: Device, xid: int, mtype: int, extra: tuple[Any, ...] = (),
                ciaddr: str = "0.0.0.0") -> bytes:
        from netboot.wire import dhcp
        from netboot.wire.dhcp import MessageType, Op, Opt
        uuid = bytes.fromhex(uuid_of(dev.index).replace("-", ""))
        return dhcp.encode(dhcp.Packet(
            op=Op.REQUEST, xid=xid, chaddr=bytes.fromhex(dev.hexhyp.replace("-", "")),
            flags=dhcp.BROADCAST_FLAG, ciaddr=ciaddr, options=(
                dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType(mtype),))),
                dhcp.Option(Opt.MAX_MESSAGE_SIZE, struct.pack("!H", 1472)),
                dhcp.Option(Opt.PARAMETER_REQUEST_LIST,
                            bytes((1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42,
                                   43, 50, 51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131,
                                   132, 133, 134, 135))),
                dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x07"),
                dhcp.Option(Opt.CLIENT_NDI, b"\x01\x03\x00"),
                dhcp.Option(Opt.CLIENT_UUID, b"\x00" + uuid),
                dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003000"),
                *extra,
            )), pad_to=300)

    async def dhcp_offer(self, dev: Device, xid: int) -> bytes:
        assert self.dhcp is not None and self.dhcp_transport is not None
        loop = asyncio.get_running_loop()
        self.dhcp.sent.add(xid)
        payload = self._packet(dev, xid, 1)
        self.dhcp.sent_at[xid] = time.time_ns()
        first = time.perf_counter()
        try:
            # PXE retransmits its DISCOVER after 4, 8, 16, 32 s; the first two are enough here.
            for n, wait in enumerate((4.0, 8.0)):
                # A future a try, awaited under a timeout: the offer's datagram wakes the
                # device's coroutine in the loop's next round. wait_for(shield(one future))
                # took three rounds (the shield's callback, wait_for's, the task's), each
                # behind a storm's thousands of ready callbacks: ~1 s of the DHCP stage in
                # a whole storm with two generator processes (benchmarks/README.md, s31-dhcp).
                fut: asyncio.Future[bytes] = loop.create_future()
                self.dhcp.waiting[xid] = fut
                self.dhcp_transport.sendto(payload, ("255.255.255.255", 67))
                try:
                    async with asyncio.timeout(wait):
                        offer = await fut
                except TimeoutError:
                    continue
                if not n:
                    self.dhcp.resumed_at[xid] = time.time_ns()
                else:
                    now = time.perf_counter()
                    self.retried.append((dev.index, xid, (first - self.t0) * 1e3,
                                         (now - first) * 1e3))
                return offer
            raise Failed("no offer")
        finally:
            self.dhcp.waiting.pop(xid, None)
            self.in_dhcp -= 1
            if not self.in_dhcp:
                self._read_tap()

    def _read_tap(self) -> None:
        if self.tap is not None:
            self.tapped = self.tap.read()
            self.tap.close()
            self.tap = None

    async def pxe_ack(self, dev: Device, xid: int, offer: bytes) -> str:
        from netboot.wire import dhcp
        from netboot.wire.dhcp import Opt
        parsed = dhcp.parse(offer)
        server = parsed.option(Opt.SERVER_ID)
        server_ip = socket.inet_ntoa(server) if server and len(server) == 4 else parsed.siaddr
        extra: tuple[Any, ...] = ()
        # A boot menu in option 43 (dnsmasq's pxe-service) is answered with the PXE boot item
        # (suboption 71) of its first entry, as EDK2 does when there is no prompt.
        vendor = parsed.option(Opt.VENDOR_SPECIFIC) or b""
        i = 0
        while i + 1 < len(vendor) and vendor[i] != 255:
            code, length = vendor[i], vendor[i + 1]
            if code == 9 and length >= 3:
                item = vendor[i + 2:i + 4] + b"\x00\x00"
                extra = (dhcp.Option(Opt.VENDOR_SPECIFIC, bytes((71, 4)) + item + b"\xff"),)
                break
            i += 2 + length
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        transport = UdpSocket.bound((dev.ip, 0), lambda data, _: replies.put_nowait(data))
        try:
            payload = self._packet(dev, xid, 3, extra, ciaddr=dev.ip)
            for wait in (2.0, 4.0):
                transport.sendto(payload, (server_ip, 4011))
                deadline = loop.time() + wait
                while (left := deadline - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(left):  # not wait_for's task (above)
                            data = await replies.get()
                    except TimeoutError:
                        break
                    if data[4:8] == payload[4:8] and data[0] == 2:
                        ack = dhcp.parse(data)
                        name = ack.file_name or parsed.file_name
                        if not name:
                            raise Failed("no boot file")
                        return name
            raise Failed("no ack")
        finally:
            transport.close()

    # -- TFTP -----------------------------------------------------------------------------
    async def tftp(self, dev: Device, name: str, options: dict[str, str], *, probe: bool
                   ) -> int:
        """One RRQ. probe: read the OACK's tsize and abort (EDK2's size probe). Otherwise
        download, acking each window (RFC 7440), and return the byte count."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        opts = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())
        rrq = b"\x00\x01" + name.encode() + b"\x00octet\x00" + opts
        receiver = TftpReceiver(done, rrq, probe, self.spec.loss, self.spec.slow_acks_ms / 1000,
                                self.rng)
        transport = self._tftp_socket(dev, receiver.datagram_received)
        # The kernel may hand the download's socket the port the size probe's had (a random
        # choice: ~1 device in 28,000): counted, the case of session 15's one failed device.
        port = transport.sock.getsockname()[1]
        if probe:
            self.probe_ports[dev.index] = port
        elif self.probe_ports.pop(dev.index, None) == port:
            self.same_port += 1
        t0 = time.monotonic()
        receiver.start(transport)
        try:
            return await done
        finally:
            transport.close()
            now = time.monotonic()
            self.port_closed[(dev.ip, port)] = (dev.index, now)
            if now - t0 > SLOW_TFTP:
                self.slow_tftp.append((dev.index, dev.ip, port, "probe" if probe else "download",
                                       round(now - t0, 3), receiver.resent))

    def _tftp_socket(self, dev: Device,
                     on_datagram: Callable[[bytes, tuple[str, int]], None]) -> UdpSocket:
        """A TFTP socket on the device's address and a port the kernel picks, but never one
        that another device sharing this address closed less than PORT_REUSE seconds ago:
        bound again while the unwanted one stays open (at most 8 tries). See PORT_REUSE."""
        refused: list[UdpSocket] = []
        try:
            for _ in range(8):
                transport = UdpSocket.bound((dev.ip, 0), on_datagram)
                last = self.port_closed.get((dev.ip, transport.sock.getsockname()[1]))
                if (last is None or last[0] == dev.index
                        or time.monotonic() - last[1] >= PORT_REUSE):
                    return transport
                self.rebound += 1
                refused.append(transport)
            return refused.pop()  # (not met: 8 recent ports of one address in a row)
        finally:
            for other in refused:
                other.close()

    # -- one device --------------------------------------------------------------------------
    async def device(self, dev: Device, session: DeviceHttp) -> None:
        t_start = time.perf_counter()
        stage = "dhcp_offer"
        reqlog: list[Any] = []
        device_http.EVENTS.set(reqlog)
        stamps: list[Any] = []

        async def timed(name: str, coro: Any) -> Any:
            nonlocal stage
            stage = name
            t0 = time.perf_counter()
            result = await coro
            self.times[name].append(time.perf_counter() - t0)
            stamps.append((name, t0 - self.t0, time.perf_counter() - t0))
            if name == "initrd":
                kernel = next(at for stamp, at, _ in stamps if stamp == "kernel")
                self.downloads.append((kernel, t0 - self.t0, time.perf_counter() - self.t0))
            if name == self.spec.until:
                raise _Done
            return result

        async def get(url: str, expect: int | None = None) -> bytes:
            # A download (``expect``: its size) is read byte by byte and counted, not kept.
            resp = await device_http.request(session, "GET", url, keep=expect is None)
            if resp.status != 200:
                raise Failed(f"HTTP {resp.status}")
            if expect is not None and resp.size != expect:
                raise Failed(f"{resp.size} of {expect} bytes")
            return resp.body

        async def post(url: str, body: dict[str, Any], token: str) -> None:
            resp = await device_http.request(session, "POST", url, json_body=body,
                                             headers={"Authorization": f"Bearer {token}"})
            if resp.status // 100 != 2:
                raise Failed(f"HTTP {resp.status}")

        try:
            async with asyncio.timeout(self.spec.device_timeout):
                xid = xid_of(self.rng.getrandbits(32), self.spec.share, self.spec.shares)
                offer = await timed("dhcp_offer", self.dhcp_offer(dev, xid))
                loader = await timed("pxe_ack", self.pxe_ack(dev, xid, offer))
                size = await timed("tftp_tsize", self.tftp(
                    dev, loader, {"tsize": "0", "blksize": "1468"}, probe=True))
                got = await timed("tftp_loader", self.tftp(
                    dev, loader, {"blksize": "1468", "windowsize": "4"}, probe=False))
                if got != size:
                    raise Failed(f"loader {got} of {size} bytes")
                await timed("boot_ipxe", get(f"{self.base}/boot.ipxe"))
                query = (f"mac={dev.hexhyp}&uuid={uuid_of(dev.index)}&arch=x86_64&platform=efi"
                         f"&serial=SN{dev.index:07d}&manufacturer=QEMU&product=Standard%20PC"
                         "&asset=")
                script = (await timed("ipxe", get(f"{self.base}/ipxe?{query}"))).decode()
                kernel = re.search(r"^kernel (\S+)", script, re.M)
                initrds = re.findall(r"^initrd (?:--name \S+ )?(\S+)", script, re.M)
                config = re.search(r"config_url=(\S+)", script)
                token = re.search(r"[?&]token=([^\s&]+)", config.group(1)) if config else None
                if not (script.startswith("#!ipxe") and kernel and initrds and config and token):
                    raise Failed("script without kernel/initrd/config token")
                await timed("kernel", get(kernel.group(1), self.spec.kernel_size))

                async def all_initrds() -> None:
                    for url in initrds:
                        await get(url, self.spec.initrd_size)

                await timed("initrd", all_initrds())
                await timed("config", get(config.group(1)))
                events = f"{self.base}/api/v1/machines/{dev.hexhyp}/events"
                tok = token.group(1)
                await timed("installing", post(events, {"kind": "installing",
                                                        "message": "storm"}, tok))
                await timed("installed", post(events, {"kind": "installed",
                                                       "message": "storm"}, tok))
                # As the config's register command sends it (content.register_command): the
                # install's secret (a UUID kept in /var/lib/netboot) and the machine token
                # kept; without them every storm stood as "older registrations" (s45-review).
                await timed("register", post(f"{self.base}/api/v1/register", {
                    "mac": dev.mac, "token": tok, "hostname": f"edge-{dev.index:06d}",
                    "addresses": [dev.ip], "machine_id": f"{dev.index:032x}",
                    "keeps": "machine_token", "install_secret": dev.secret,
                    "node_name": f"edge-{dev.index:06d}"}, tok))
        except _Done:
            pass
        except Exception as exc:  # one failed device is a counted result, never the end
            reason = ("timeout" if isinstance(exc, TimeoutError)
                      else str(exc) if isinstance(exc, Failed) else type(exc).__name__)
            per = self.failures.setdefault(stage, {})
            per[reason] = per.get(reason, 0) + 1
            return
        total = time.perf_counter() - t_start
        self.times["total"].append(total)
        self.ended.append((time.perf_counter() - self.t0, dev.k, stamps, reqlog))
        if total > STRAGGLER:
            self.slow.append({"k": dev.k, "ip": dev.ip, "total": total, "stages": stamps,
                              "events": [(a - self.t0, b - a, e) for a, b, e in reqlog]})

    async def ready(self) -> float:
        """Until the server answers HTTP and TFTP (bounded: 120 s, a big inventory loads);
        returns the seconds from its start to its first ``/healthz`` 200 (polled every
        10 ms; the stand-ins have no /healthz: their first answer)."""
        import aiohttp
        deadline = time.monotonic() + 120
        probe = Device(-1, 0, CLIENT_IPS[self.spec.share])  # an address of its own share
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(f"{self.base}/healthz",
                                           timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status in (200, 404):
                            healthy = time.monotonic() - self.spec.started
                            break
                except (OSError, aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not answer HTTP within 120 s")
                await asyncio.sleep(0.01)
            while True:
                try:
                    async with session.get(f"{self.base}/boot.ipxe",
                                           timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            await asyncio.wait_for(self.tftp(probe, LOADER, {"tsize": "0"},
                                                             probe=True), 10)
                            return healthy
                except (OSError, aiohttp.ClientError, TimeoutError, Failed):
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become ready within 120 s")
                await asyncio.sleep(0.2)

    async def _lag(self) -> None:
        """How late the generator's own loop wakes up: when it lags, the client is the
        bottleneck and the figures say more about it than about the server."""
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - t0 - 0.01)

    async def run(self, start: float | None = None) -> dict[str, Any]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, CLIENT_IF.encode())
        spec = self.spec
        if spec.shares > 1:  # only the offers to this process's devices (offer_filter)
            attach_filter(sock, offer_filter(spec.share, spec.shares))
        sock.bind(("0.0.0.0", 68))
        self.dhcp = DhcpPort()
        self.dhcp_transport = UdpSocket(sock, self.dhcp.datagram_received)
        self.tap = OfferTap(spec.share, spec.shares)
        drops0 = socket_drops(sock)
        devices = share_of(spec)
        self.in_dhcp = len(devices)  # the tap is read as the last one leaves dhcp_offer
        # One connection pool per client address, as each device has its own TCP stack; one
        # read buffer for the process (device_http: each read is consumed before the next).
        buffer = memoryview(bytearray(device_http.READ_BUFFER))
        sessions = {ip: DeviceHttp(ip, spec.device_window, buffer, spec.copy_downloads)
                    for ip in {dev.ip for dev in devices}}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0, self.cpu0_system = usage.ru_utime + usage.ru_stime, usage.ru_stime
        # Every generator process of the storm counts from the same instant (CLOCK_MONOTONIC,
        # one clock for the host and its namespaces): ``start`` is given by the parent.
        t0 = self.t0 = start if start is not None else time.perf_counter()
        tasks = []
        lag = asyncio.create_task(self._lag())
        try:
            for dev in devices:
                # Power-on times spread evenly over --within seconds.
                delay = t0 + dev.k * spec.within / spec.devices - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.device(dev, sessions[dev.ip])))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
        finally:
            lag.cancel()
            for session in sessions.values():
                await session.close()
            socket_dropped = socket_drops(sock) - drops0
            self.dhcp_transport.close()
            self._read_tap()  # a storm whose devices all failed before their offer
        usage = resource.getrusage(resource.RUSAGE_SELF)
        seen, tap_drops = self.tapped
        wire = self.dhcp.against(seen, [xid for _, xid, _, _ in self.retried])
        retries = {k: sum(session.retries[k] for session in sessions.values())
                   for k in ("reopened", "retry_after")}
        return {"wall": wall, "times": self.times, "failures": self.failures,
                "generator_cpu": usage.ru_utime + usage.ru_stime - self.cpu0,
                "generator_cpus": [usage.ru_utime + usage.ru_stime - self.cpu0],
                "generator_system": usage.ru_stime - self.cpu0_system,
                "devices": len(devices),
                "late_offers": self.dhcp.late, "loop_lag": self.lags,
                "retried": self.retried, "dhcp_send_failed": self.dhcp_transport.send_failed,
                "same_port": self.same_port, "rebound": self.rebound,
                "slow_tftp": self.slow_tftp,
                "http_retries": retries,
                "slow": self.slow, "downloads": self.downloads,
                "last": [{"k": k, "end": end, "stages": stamps,
                          "events": [(a - t0, b - a, e) for a, b, e in reqlog]}
                         for end, k, stamps, reqlog in sorted(self.ended)[-LAST_TRACED:]],
                "t0_wall": time.time() - (time.perf_counter() - t0),
                **wire, "offer_tap_drops": tap_drops, "dhcp_socket_drops": socket_dropped}


def last_devices(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The LAST_TRACED devices that ended last in the storm (``data``: merge()'s, every
    process's latest), the last one last: each one's stages and requests, seconds from the
    storm's start, to read what the storm's tail waited for (benchmarks/README.md,
    s42-tail)."""
    return sorted(data.get("last", []), key=lambda d: d["end"])[-LAST_TRACED:]


def generate(spec_json: str) -> None:
    """Child process in the client namespace: wait for the server, say READY, wait for GO on
    stdin, run the storm (its share of the devices: ``spec.share``), print the result as one
    JSON line. ``GO <t>`` begins the storm at ``time.perf_counter()`` == t, the instant every
    generator process of the storm is given; a bare ``GO`` at once."""
    sys.path.insert(0, str(REPO))
    spec = Spec(**json.loads(spec_json))

    async def main() -> None:
        gen = Generator(spec)
        healthy = await gen.ready()
        print(f"READY {healthy:.3f}", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        words = line.split()
        result = await gen.run(float(words[1]) if len(words) > 1 else None)
        print(json.dumps(result), flush=True)

    asyncio.run(main())


# --- a run and the report -------------------------------------------------------------------


# The storm's generator processes begin this many seconds after they are told (GO): each
# reads its GO in turn from a pipe, and none may begin before the last has read it.
GO_AHEAD = 0.2
# Load generator processes by default (--generators). Measured on this 2-core VM
# (benchmarks/README.md, s30-storm): in the quietest round (load 4-9) one process gave walls
# of 14.2-15.9 s and a loop lag p99 of 118-357 ms, two 26.6-44.9 s and 679-1,042 ms (each
# took 16-17 ms of CPU a device against 13-15: the servers need the cores too); at load
# 11-18 the counts' walls did not separate. One process (its CPU halved since session 29).
GENERATORS = 1
# The generators' nice value (--generator-nice). A real device reads its own socket on its own
# CPU; here one process plays 1,000 and shares the machine with whatever else runs. At load
# 15-22 on this VM it got its fair share, 0.15-0.29 s of CPU a 2 s sample, and waited
# 1.5-1.9 s; more than half the devices' receive queues were full in most samples and whole
# storms failed by the devices' own timeouts for netboot and the stand-ins alike
# (benchmarks/README.md, s45-accept). A negative value gives the devices the CPU they ask
# before the machine's other load; the servers under test keep theirs. 0: as before.
GENERATOR_NICE = 0


def start_generators(client_ns: str, spec: Spec, count: int, run: Path, nice: int = 0
                     ) -> list[subprocess.Popen[str]]:
    """``count`` load generator processes in the client namespace, each playing its share of
    the devices (share_of), each saying READY and storming at GO (generate), at ``nice``."""
    gens = []
    niced = ["nice", "-n", str(nice)] if nice else []  # exec'd: the PID stays the generator's
    for share in range(count):
        part = Spec(**{**spec.__dict__, "share": share, "shares": count})
        gens.append(subprocess.Popen(
            ["ip", "netns", "exec", client_ns, *niced, sys.executable, __file__, "--generate",
             json.dumps(part.__dict__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(run / f"generator-{share}.log").open("wb"), text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}))
    return gens


# A generator's DHCP offers as its tap saw them (DhcpPort.against, OfferTap): summed, and
# the DISCOVER -> offer times at the wire, the union, by merge().
WIRE_COUNTS = ("offers_on_wire", "offers_delivered", "offers_lost_here", "retried_lost_here",
               "offer_tap_drops", "dhcp_socket_drops")
WIRE_TIMES = ("offer_to_wire_ms", "offer_wire_to_read_ms", "offer_read_to_device_ms")


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The storm's result from its generator processes' (each began at the same instant):
    every stage's latencies and the loop lags are the union of the processes' (a percentile
    is then one of the whole storm, not an average of the processes'), failures, retries and
    CPU seconds are summed, and the wall is the last process's."""
    if len(parts) == 1:
        return parts[0]
    times: dict[str, list[float]] = {}
    failures: dict[str, dict[str, int]] = {}
    for part in parts:
        for stage, values in part["times"].items():
            times.setdefault(stage, []).extend(values)
        for stage, reasons in part["failures"].items():
            per = failures.setdefault(stage, {})
            for reason, n in reasons.items():
                per[reason] = per.get(reason, 0) + n
    merged: dict[str, Any] = {
        "wall": max(part["wall"] for part in parts), "times": times, "failures": failures,
        "generator_cpus": [cpu for part in parts for cpu in part["generator_cpus"]],
        "http_retries": {k: sum(part["http_retries"][k] for part in parts)
                         for k in ("reopened", "retry_after")},
        "t0_wall": parts[0]["t0_wall"]}
    for key in ("generator_cpu", "generator_system", "devices", "late_offers",
                "dhcp_send_failed", "same_port", "rebound", *WIRE_COUNTS):
        merged[key] = sum(part.get(key, 0) for part in parts)
    for key in ("loop_lag", "retried", "slow_tftp", "slow", "downloads", "last", *WIRE_TIMES):
        merged[key] = [item for part in parts for item in part.get(key, [])]
    return merged




@dataclass
class Result:
    target: str
    wall: float = 0.0
    cpu: float = 0.0
    db_cpu: float = 0.0  # the PostgreSQL cluster's processes, for a netboot on PostgreSQL
    generator_cpu: float = 0.0  # the generator processes' CPU seconds, summed
    generator_cpus: list[float] = field(default_factory=list)  # each process's
    lag_p99: float = 0.0  # the generators' loop lag, p99 of all their samples (seconds)
    server_drops: int = 0
    client_drops: int = 0
    listen_drops: int = 0
    rcvq_drops: int = 0  # TCP segments the devices' kernel dropped (tcp_losses)
    rto: int = 0  # the server's TCP retransmission timeouts
    ready: float = 0.0  # seconds from the server's start to its first /healthz 200
    settled: float = 0.0  # seconds from its first answer until its servers were idle
    rss_mib: float = 0.0  # the server's resident memory after the storm (all processes)
    times: dict[str, list[float]] = field(default_factory=dict)
    # (kernel begun, initrd begun, initrd ended) a device, from the storm's start (Generator)
    downloads: list[tuple[float, float, float]] = field(default_factory=list)
    failures: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""
    load: float = 0.0  # the machine's 1-minute load average as the storm began
    dirty_kib: int = 0  # page cache waiting to be written as the storm began (dirty_kib)
    machine: dict[str, float] = field(default_factory=dict)  # machine_cpu() during the storm
    written_kib: int = 0  # page cache written back during the storm, machine-wide
    disk_kib: int = 0  # what reached the disks during the storm, machine-wide
    wire: dict[str, int] = field(default_factory=dict)  # the server namespace's (wire_counts)

    @property
    def failed(self) -> int:
        return sum(sum(v.values()) for v in self.failures.values())


def run_target(target: str, server_ns: str, client_ns: str, work: Workload, spec: Spec,
               args: argparse.Namespace, run: Path, database: Cluster | None = None
               ) -> Result:
    """``database``: the throwaway cluster (netboot.lab.pgcluster), for ``netboot-pg``."""
    run.mkdir()
    spec = Spec(**{**spec.__dict__, "started": time.monotonic()})
    on_pg = database if target == PG_TARGET else None
    counted = bool(args.callgrind) and target in NETBOOT_TARGETS
    procs = (start_netboot(server_ns, run, work, args.python, args.log_level,
                           on_pg.dsn() if on_pg else None, args.plain_switching,
                           args.loop_probe, counted)
             if target in NETBOOT_TARGETS
             else start_standins(server_ns, run, work, args.quiet_standins))
    db_pid = on_pg.process.pid if on_pg else None
    gens = start_generators(client_ns, spec, args.generators, run, args.generator_nice)
    result = Result(target)
    capture: subprocess.Popen[bytes] | None = None
    try:
        for n, gen in enumerate(gens):
            assert gen.stdout is not None
            line = gen.stdout.readline()
            if line.split()[:1] != ["READY"]:
                dead = [p.name for p in procs if p.popen.poll() is not None]
                said = (run / f"generator-{n}.log").read_text(errors="replace").strip()[-300:]
                raise RuntimeError(f"not ready ({said or line.strip()!r}; exited: {dead}); "
                                   f"see {run}")
            if n == 0:
                result.ready = float(line.split()[1])
        if args.loaded and target in NETBOOT_TARGETS:
            view_loaded(run / "netboot.log")
        if not args.startup:
            result.settled, idle = settle(lambda: sum(cpu_seconds(p.popen.pid) for p in procs))
            print(f"{target}: servers idle {result.settled:.1f} s after their first answer"
                  + ("" if idle else f" (not idle within {SETTLE_LIMIT:.0f} s: begun anyway)"),
                  flush=True)
        if counted:
            callgrind_control("-i", "on", procs[0].popen.pid)
        syscalls = (syscall_stat([p.popen.pid for p in procs], run / "syscalls.txt")
                    if args.syscalls else None)
        cpu0 = sum(cpu_seconds(p.popen.pid) for p in procs)
        sched0 = (run_and_wait([p.popen.pid for p in procs]),
                  run_and_wait([gen.pid for gen in gens]))
        db0 = cpu_seconds(db_pid) if db_pid else 0.0
        drops0 = udp_drops(server_ns), udp_drops(client_ns), listen_drops(server_ns)
        losses0 = tcp_losses(server_ns, client_ns)
        wire0 = wire(server_ns)
        kernel0 = link_drops(server_ns, SERVER_IF), link_drops(client_ns, CLIENT_IF), \
            backlog_drops()
        if args.capture:
            capture = subprocess.Popen(
                ["ip", "netns", "exec", server_ns, "tcpdump", "-i", SERVER_IF, "-B", "16384",
                 "-w", str(run / "dhcp.pcap"), "udp and (port 67 or port 68 or port 4011)"],
                stdout=subprocess.DEVNULL, stderr=(run / "tcpdump.log").open("wb"))
            time.sleep(1.0)  # until it listens
        if args.diag:
            for ns, side in ((server_ns, "s"), (client_ns, "c")):
                (run / f"nstat-{side}-before.txt").write_text(subprocess.run(
                    ["ip", "netns", "exec", ns, "nstat", "-az"], check=False, capture_output=True,
                    text=True, timeout=30).stdout)
            flags = subprocess.Popen(
                ["ip", "netns", "exec", server_ns, "tcpdump", "-i", SERVER_IF, "-n", "-B",
                 "16384", "-w", str(run / "flags.pcap"),
                 "tcp port 8080 and (tcp[tcpflags] & (tcp-syn|tcp-fin|tcp-rst) != 0)"],
                stdout=subprocess.DEVNULL, stderr=(run / "tcpdump-flags.log").open("wb"))
            time.sleep(1.0)
        result.load, result.dirty_kib, machine0 = os.getloadavg()[0], dirty_kib(), machine_cpu()
        written0, disk0 = written_kib(), disk_written_kib()
        # One instant for every generator process, a little ahead: each process's devices
        # power on at it plus their place in --within, as one process's did.
        start = time.perf_counter() + GO_AHEAD
        # The DHCP server's main thread (netboot's loop, dnsmasq) over the power-ons and a
        # second after: how much of it ran and how much it waited for a CPU while the
        # storm's DISCOVERs came.
        dhcp_pid = procs[0].popen.pid
        loop0 = main_thread(dhcp_pid)
        at_dhcp: list[tuple[float, float]] = []
        looked = threading.Timer(GO_AHEAD + spec.within + 1.0,
                                 lambda: at_dhcp.append(main_thread(dhcp_pid)))
        looked.start()
        for gen in gens:
            assert gen.stdin is not None
            gen.stdin.write(f"GO {start!r}\n")
            gen.stdin.flush()
        outs = [gen.stdout.readline() for gen in gens]  # type: ignore[union-attr]
        if counted:
            callgrind_control("-i", "off", procs[0].popen.pid)
            callgrind_control("-d", "storm", procs[0].popen.pid)
        if syscalls is not None:
            syscalls.send_signal(signal.SIGINT)
            syscalls.wait(timeout=30)
            print(f"{target}: the servers' system calls during the storm (perf stat):\n"
                  + (run / "syscalls.txt").read_text().strip(), flush=True)
        looked.join()
        if at_dhcp:
            print(f"{target}: the DHCP server's main thread ({procs[0].name}) in the storm's "
                  f"first {spec.within + 1.0:g} s: on a CPU {at_dhcp[0][0] - loop0[0]:.2f} s, "
                  f"waiting for one {at_dhcp[0][1] - loop0[1]:.2f} s")
        result.machine = {k: v - machine0[k] for k, v in machine_cpu().items()}
        result.written_kib = written_kib() - written0
        result.disk_kib = disk_written_kib() - disk0
        if args.diag:
            time.sleep(1.0)
            flags.send_signal(signal.SIGINT)
            flags.wait(timeout=30)
            for ns, side in ((server_ns, "s"), (client_ns, "c")):
                (run / f"nstat-{side}-after.txt").write_text(subprocess.run(
                    ["ip", "netns", "exec", ns, "nstat", "-az"], check=False, capture_output=True,
                    text=True, timeout=30).stdout)
        cpu1 = sum(cpu_seconds(p.popen.pid) for p in procs)
        sched = (run_and_wait([p.popen.pid for p in procs]),
                 run_and_wait([gen.pid for gen in gens]))
        print(f"{target}: on a CPU and waiting for one (runnable) during the storm: the servers "
              f"{sched[0][0] - sched0[0][0]:.2f} and {sched[0][1] - sched0[0][1]:.2f} s, the "
              f"generators {sched[1][0] - sched0[1][0]:.2f} and "
              f"{sched[1][1] - sched0[1][1]:.2f} s (the machine's share: a late answer of a "
              f"server that waited long is the machine's)")
        if capture is not None:
            time.sleep(1.0)  # until it has written what it saw
            capture.send_signal(signal.SIGINT)
            capture.wait(timeout=30)
            capture = None
        kernel = (link_drops(server_ns, SERVER_IF) - kernel0[0],
                  link_drops(client_ns, CLIENT_IF) - kernel0[1], backlog_drops() - kernel0[2])
        result.db_cpu = cpu_seconds(db_pid) - db0 if db_pid else 0.0
        result.rss_mib = sum(rss_kib(p.popen.pid) for p in procs) / 1024
        result.server_drops = udp_drops(server_ns) - drops0[0]
        result.client_drops = udp_drops(client_ns) - drops0[1]
        result.listen_drops = listen_drops(server_ns) - drops0[2]
        losses = tcp_losses(server_ns, client_ns)
        result.rcvq_drops, result.rto = losses[0] - losses0[0], losses[1] - losses0[1]
        wire1 = wire(server_ns)
        result.wire = {k: wire1[k] - wire0[k] for k in wire1}
        print(wire_line(target, wire0, wire1))
        if not all(out.strip() for out in outs):
            raise RuntimeError(f"{target}: a generator ended without a result; see {run}")
        data = merge([json.loads(out) for out in outs])
        result.wall, result.cpu = data["wall"], cpu1 - cpu0
        result.times, result.failures = data["times"], data["failures"]
        result.downloads = [tuple(d) for d in data.get("downloads", [])]
        result.generator_cpu = data["generator_cpu"]
        result.generator_cpus = data["generator_cpus"]
        lags = data["loop_lag"]
        result.lag_p99 = pct(lags, .99) if lags else 0.0
        (run / "slow.json").write_text(json.dumps({"t0_wall": data.get("t0_wall"),
                                                   "slow": data.get("slow", [])}, indent=1))
        last = last_devices(data)
        (run / "last.json").write_text(json.dumps({"t0_wall": data.get("t0_wall"),
                                                   "last": last}, indent=1))
        for d in last:
            print(f"{target}: LAST device {d['k']} ended {d['end']:.3f} s; " + ", ".join(
                f"{n}@{a:.3f}+{b * 1e3:.1f}ms" for n, a, b in d["stages"][-6:]))
        for d in data.get("slow", []):
            print(f"{target}: SLOW device {d['k']} {d['ip']} total {d['total']:.1f} s; "
                  + ", ".join(f"{n}@{a:.2f}+{b:.2f}" for n, a, b in d["stages"]))
            for a, b, e in d["events"]:
                print(f"    {a:8.2f} +{b:7.2f} {e}")
        busy = sum(v for k, v in result.machine.items() if k != "idle")
        print(f"{target}: load average {result.load:.2f} and {result.dirty_kib >> 10} MiB dirty "
              f"as it began, {result.written_kib >> 10} MiB written back during it "
              f"({result.disk_kib >> 10} MiB reached the disks: the page cache counts a large "
              f"folio whole); the "
              f"machine's CPU seconds during it: "
              + ", ".join(f"{k} {v:.1f}" for k, v in result.machine.items())
              + f"; busy beyond this target's server and generator: "
              f"{busy - result.cpu - result.generator_cpu:.1f}")
        devices = data.get("devices") or spec.devices
        print(f"{target}: {len(result.generator_cpus)} load generator process(es), CPU "
              + " + ".join(f"{c:.2f}" for c in result.generator_cpus)
              + f" s ({data.get('generator_system', 0.0):.2f} s of it in the kernel), "
              f"{result.generator_cpu / devices * 1e3:.1f} ms a device")
        print(f"{target}: load generator loop lag p50 {pct(lags, .5) * 1e3:.1f} ms, "
              f"p99 {pct(lags, .99) * 1e3:.1f} ms, max {max(lags, default=0) * 1e3:.0f} ms; "
              f"DHCP answers after their device gave up (or twice): {data['late_offers']}; "
              f"downloads from their size probe's port: {data['same_port']}; TFTP sockets "
              f"bound again (port of another device lately): {data.get('rebound', 0)}; "
              f"HTTP requests "
              f"asked again: {data['http_retries']['reopened']} on a pooled connection "
              f"closed before any byte, {data['http_retries']['retry_after']} after a 503")
        for k, ip, port, kind, took, resent in data.get("slow_tftp", []):
            print(f"{target}: SLOW TFTP device {k} {ip}:{port} {kind} {took:.2f} s, "
                  f"{resent} sent again at its 1 s timer")
        retried = data["retried"]
        print(f"{target}: devices offered only after a retransmitted DISCOVER: {len(retried)}"
              + "".join(f"; #{i} xid {xid:#010x} sent at {at:.0f} ms, offer after {took:.0f} ms"
                        for i, xid, at, took in retried[:20])
              + f"; DISCOVERs the kernel refused to send: {data['dhcp_send_failed']}; "
              f"veth drops s/c {kernel[0]}/{kernel[1]}, backlog drops {kernel[2]}")
        result.client_drops -= offers_said(target, data, len(gens))
    except RuntimeError as exc:
        result.error = str(exc)
    finally:
        if capture is not None:
            capture.send_signal(signal.SIGINT)
            capture.wait(timeout=30)
        for gen in gens:
            if gen.poll() is None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    gen.stdin.close()  # type: ignore[union-attr]
                try:
                    gen.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    gen.kill()  # this process only, by its own handle
                    gen.wait()
        t_stop = time.perf_counter()
        for p in procs:
            p.stop()
        print(f"{target}: stopped in {time.perf_counter() - t_stop:.2f} s; "
              f"{leftovers(server_ns, client_ns)}")
    if target in NETBOOT_TARGETS:
        print(f"{target}: {server_said(run / 'netboot.log')}")
        if args.loop_probe and (run / "probe.json").exists():
            from storm_loop_probe import summary

            print(f"{target}: {summary(run / 'probe.json')}")
    return result


def offers_said(target: str, data: dict[str, Any], generators: int) -> int:
    """Prints what the generators' offer taps saw (OfferTap, DhcpPort.against): the offers
    to the devices' :68 on the wire against those delivered (the generators' own loss, not
    the server's), and each first DISCOVER's time to its offer split at the wire. Returns
    the offers the generators' xid filters turned away (each offer reached every other
    process's socket), counted in the devices' UDP InErrors: not a loss."""
    wire = int(data.get("offers_on_wire", 0))
    turned_away = (generators - 1) * wire
    to_wire, to_read, to_device = (data.get(key, []) for key in WIRE_TIMES)
    print(f"{target}: DHCP offers to the devices' :68 seen on their side of the veth {wire} "
          f"(the taps missed {data.get('offer_tap_drops', 0)}), delivered to the generators "
          f"{data.get('offers_delivered', 0)}: **lost in the generators' own sockets "
          f"{data.get('offers_lost_here', 0)}** (devices offered only after a retransmission "
          f"for it: {data.get('retried_lost_here', 0)}); the :68 sockets' kernel drops "
          f"{data.get('dhcp_socket_drops', 0)}"
          + (f", {turned_away} of them offers to another process's devices turned away by the "
             f"xid filters (left out of the devices' UDP drops)" if turned_away else ""))
    if to_wire:
        print(f"{target}: DISCOVER -> offer, answered at once ({len(to_wire)}), split at the "
              f"devices' wire: to the offer there p50 {pct(to_wire, .5):.2f} p99 "
              f"{pct(to_wire, .99):.2f} max {max(to_wire):.2f} ms (the server and both "
              f"kernels), from there until the generator read it p50 {pct(to_read, .5):.2f} "
              f"p99 {pct(to_read, .99):.2f} max {max(to_read):.2f} ms, from the read to the "
              f"device's coroutine p50 {pct(to_device, .5):.2f} p99 {pct(to_device, .99):.2f} "
              f"max {max(to_device):.2f} ms (the generator's loop)")
    return turned_away


def server_said(log: Path) -> str:
    """netboot's DHCP summary lines (a count per kind of answer: "decision timed out",
    "silent (no boot)" …) and its warnings and errors, counted: a device answered only at
    its retransmission is told by these, or by nothing the server knew."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    summaries = ["last " + line.split("dhcp: last ", 1)[1] for line in lines
                 if "dhcp: last " in line]
    warned = [line for line in lines if " WARNING " in line or " ERROR " in line]
    first = f" (first: {warned[0][24:180]})" if warned else ""
    return (f"DHCP summary: {'; '.join(summaries) or 'none'}; "
            f"{len(warned)} warning or error lines{first}")


def view_loaded(log: Path, timeout: float = 600) -> None:
    """Until netboot says its inventory view is loaded (``--loaded``), bounded."""
    deadline = time.monotonic() + timeout
    while "inventory view loaded" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the inventory view did not load within {timeout:.0f} s")
        time.sleep(0.1)


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and its children (nginx's workers), KiB."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        todo += _children(p)
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: list[Result], spec: Spec) -> None:
    print(f"\nstorm: {spec.devices} devices powered on within {spec.within:g} s, "
          f"{spec.enrolled} machines enrolled, kernel {spec.kernel_size >> 10} KiB + "
          f"initrd {spec.initrd_size >> 10} KiB, loss {spec.loss:g}, "
          f"slow ACKs {spec.slow_acks_ms:g} ms, device TCP window "
          f"{f'{spec.device_window >> 10} KiB' if spec.device_window else 'autotuned'}")
    for r in results:
        if r.error:
            print(f"{r.target}: {r.error}")
    ok = [r for r in results if not r.error]
    if not ok:
        return
    print("\nper stage, milliseconds: p50 / p95 / p99 / max (n)")
    print(f"{'stage':<12}" + "".join(f"  {r.target:>34}" for r in ok))
    for stage in [*STAGES, "total"]:
        row = f"{stage:<12}"
        for r in ok:
            v = r.times.get(stage, [])
            cell = (f"{pct(v, .5) * 1e3:.1f} / {pct(v, .95) * 1e3:.1f} / {pct(v, .99) * 1e3:.1f}"
                    f" / {max(v) * 1e3:.1f} ({len(v)})" if v else "-")
            row += f"  {cell:>34}"
        print(row)
    print("\neach stage's share of the devices' time (stage_shares), %")
    print(f"{'stage':<12}" + "".join(f"  {r.target:>10}" for r in ok))
    shares = [stage_shares(r.times) for r in ok]
    for stage in STAGES:
        print(f"{stage:<12}" + "".join(f"  {sh.get(stage, 0.0) * 100:>10.2f}" for sh in shares))
    print("\ndownloads (kernel, then initrd), seconds from the storm's start: p1 / p50 / p99 "
          "of the devices' kernel begun, initrd begun, initrd ended; the bulk rate")
    for r in ok:
        if r.downloads:
            print(f"{r.target:<12} {downloads_line(r.downloads, spec)}; the wall's tail after "
                  f"the last download {tail_after_downloads(r.wall, r.downloads):.2f} s")
    print(f"\n{'target':<12} {'ready s':>8} {'RSS MiB':>8} {'wall s':>8} {'server CPU s':>13}"
          f" {'db CPU s':>9} {'client CPU s':>13} {'devices ok':>11} {'failed':>7}"
          f" {'UDP drops s/c':>14} {'TCP listen drops':>17} {'TCP rcvq drops/RTOs':>20}"
          f"  failures")
    for r in ok:
        fails = "; ".join(f"{s}: {', '.join(f'{k} x{n}' for k, n in v.items())}"
                          for s, v in r.failures.items())
        db = f"{r.db_cpu:.2f}" if r.target == PG_TARGET else "-"
        print(f"{r.target:<12} {r.ready:>8.2f} {r.rss_mib:>8.0f} {r.wall:>8.2f} {r.cpu:>13.2f}"
              f" {db:>9} {r.generator_cpu:>13.2f} "
              f"{len(r.times.get('total', [])):>11} {r.failed:>7} "
              f"{f'{r.server_drops}/{r.client_drops}':>14} {r.listen_drops:>17} "
              f"{f'{r.rcvq_drops}/{r.rto}':>20}  {fails}")
    by_target = {r.target: r for r in ok}
    si = by_target.get("standins")
    pairs = [(nb, si) for nb in (by_target.get(t) for t in NETBOOT_TARGETS) if nb and si]
    if PG_TARGET in by_target and "netboot" in by_target:
        pairs.append((by_target[PG_TARGET], by_target["netboot"]))
    for a, b in pairs:
        print(f"\n{a.target} ÷ {b.target}: "
              f"wall {ratio(a.wall, b.wall)}, server CPU {ratio(a.cpu + a.db_cpu, b.cpu)}"
              f"{' (netboot + database)' if a.target == PG_TARGET else ''}, "
              f"p99 per stage: " + ", ".join(
                  f"{s} {ratio(pct(a.times[s], .99), pct(b.times[s], .99))}"
                  for s in STAGES if a.times.get(s) and b.times.get(s))
              + (", the downloads' bulk rate (above 1: faster) "
                 + ratio(bulk_rate(a.downloads, spec), bulk_rate(b.downloads, spec))
                 if a.downloads and b.downloads else ""))
        if a.wire and b.wire:
            print("  the server's side of the wire: " + ", ".join(
                f"{name} {ratio(a.wire[key], b.wire[key])}" for name, key in (
                    ("bytes out", "bytes_out"), ("TCP segments out", "tcp_out"),
                    ("TCP segments in", "tcp_in"), ("UDP datagrams out", "udp_out"),
                    ("UDP datagrams in", "udp_in"))))
        if a.failed or b.failed:
            print("  (devices failed: wall time and CPU compare unequal work; the storm's "
                  "target is 0 failures)")


def bulk_rate(downloads: list[tuple[float, float, float]], spec: Spec) -> float:
    """The devices' kernels and initrds, bytes a second, from the first kernel begun to the
    last initrd ended: what the server sent them at, all at once. The initrd stage's own
    percentiles are not that rate: sharing the link fairly, the devices' downloads end
    together whatever the server, so a device's initrd takes as long as the time from its
    own start to that common end (the earlier a device reaches the initrd, the longer its
    stage), and a target whose earlier stages gather the devices sooner shows a longer initrd
    p99 at the same rate (benchmarks/README.md, s31-initrd). A rate of the whole storm where
    the downloads overlap (1,000 devices of 40 MiB); in a small storm whose devices download
    one after another it counts the gaps between them too."""
    begun = min(kernel for kernel, _, _ in downloads)
    ended = max(end for _, _, end in downloads)
    size = spec.kernel_size + spec.initrd_size  # the storm's script: one initrd a device
    return len(downloads) * size / (ended - begun) if ended > begun else 0.0


def tail_after_downloads(wall: float, downloads: list[tuple[float, float, float]]) -> float:
    """Seconds of the storm's wall after its last initrd ended: the last devices' config and
    installer POSTs, which nothing overlaps (every device's downloads end together: the link
    is shared fairly), so they add to the wall whole, where a stage before the downloads
    only moves when a device joins them."""
    return wall - max(end for _, _, end in downloads) if downloads else 0.0


def downloads_line(downloads: list[tuple[float, float, float]], spec: Spec) -> str:
    cols = []
    for i in range(3):
        v = [d[i] for d in downloads]
        cols.append(f"{pct(v, .01):.1f} / {pct(v, .5):.1f} / {pct(v, .99):.1f}")
    return (f"kernel begun {cols[0]}, initrd begun {cols[1]}, ended {cols[2]}; "
            f"{len(downloads)} devices' {(spec.kernel_size + spec.initrd_size) >> 20} MiB in "
            f"{max(d[2] for d in downloads) - min(d[0] for d in downloads):.1f} s: "
            f"{bulk_rate(downloads, spec) / (1 << 30):.2f} GiB/s")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def run_plan(targets: list[str], repeat: int) -> list[list[str]]:
    """The targets of each of ``repeat`` runs, in the order given and then reversed, in turn:
    each target is run first as often as last. One invocation's order biased its ratio
    (benchmarks/README.md, s27-storm): the target run second was 10-20 % slower."""
    return [list(targets) if r % 2 == 0 else targets[::-1] for r in range(repeat)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Summary:
    """Each target's runs (run number, its place in that run, the result) and their medians."""

    target: str
    runs: list[tuple[int, int, Result]]

    @property
    def walls(self) -> list[float]:
        return [r.wall for _, _, r in self.runs]

    @property
    def wall(self) -> float:
        return median(self.walls)

    @property
    def cpu(self) -> float:
        return median([r.cpu + r.db_cpu for _, _, r in self.runs])

    @property
    def failed(self) -> int:
        return sum(r.failed for _, _, r in self.runs)


def summarize(runs: list[list[Result]]) -> list[Summary]:
    """Per target, in the order first met: its runs that ended with a result."""
    by_target: dict[str, Summary] = {}
    for n, results in enumerate(runs, 1):
        for place, r in enumerate(results, 1):
            if not r.error:
                by_target.setdefault(r.target, Summary(r.target, [])).runs.append((n, place, r))
    return list(by_target.values())


def report_medians(runs: list[list[Result]], shared: bool = False) -> None:
    """Every run's order and each target's walls, medians and the ratios of medians: the
    reading to quote (the ratio within one run carries its order, run_plan)."""
    summaries = summarize(runs)
    print(f"\n{len(runs)} run(s), "
          f"{'in one namespace pair' if shared else 'each target in fresh namespaces'}; "
          "the order of each: "
          + "; ".join(f"{n}: {', '.join(r.target for r in rs)}" for n, rs in enumerate(runs, 1)))
    print(f"{'target':<12} {'median wall s':>14} {'median server CPU s':>20} {'failed':>7}"
          f" {'generator CPU s':>16} {'lag p99 ms':>11}  walls s (run.place)")
    for t in summaries:
        print(f"{t.target:<12} {t.wall:>14.2f} {t.cpu:>20.2f} {t.failed:>7}"
              f" {median([r.generator_cpu for _, _, r in t.runs]):>16.2f}"
              f" {median([r.lag_p99 for _, _, r in t.runs]) * 1e3:>11.0f}  "
              + ", ".join(f"{r.wall:.2f} ({n}.{place})" for n, place, r in t.runs))
    for t in summaries:
        first = [r.wall for _, place, r in t.runs if place == 1]
        later = [r.wall for _, place, r in t.runs if place > 1]
        if first and later:  # what the order of a run still does (it was 10-20 %, s27-storm)
            print(f"{t.target}: median wall run first {median(first):.2f} s, run after another "
                  f"target {median(later):.2f} s ({ratio(median(later), median(first))})")
    found = {t.target: t for t in summaries}
    pairs = [(a, "standins") for a in NETBOOT_TARGETS] + [(PG_TARGET, "netboot")]
    uneven = len(runs) % 2 == 1 and any(len(rs) > 1 for rs in runs)
    for a, b in pairs:
        if a in found and b in found:
            print(f"{a} ÷ {b}, medians: wall {ratio(found[a].wall, found[b].wall)}, "
                  f"server CPU {ratio(found[a].cpu, found[b].cpu)}"
                  + ("  (an odd number of runs: one order is run once more than the other)"
                     if uneven else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--within", type=float, default=1.0, help="seconds of power-on spread")
    parser.add_argument("--enrolled", type=int, help="machines in the inventory (≥ devices)")
    parser.add_argument("--kernel-size", type=size_arg, default=8 << 20)
    parser.add_argument("--initrd-size", type=size_arg, default=32 << 20)
    parser.add_argument("--loss", type=float, default=0.0,
                        help="probability that the devices' TFTP client drops a packet")
    parser.add_argument("--slow-acks", type=float, default=0.0, metavar="MS",
                        help="delay every TFTP ACK by MS milliseconds")
    parser.add_argument("--device-timeout", type=float, default=120.0)
    parser.add_argument("--device-window", type=size_arg, default=DEVICE_WINDOW,
                        help="each device connection's TCP receive buffer, SO_RCVBUF "
                             "(iPXE's window, 256K; 0: Linux's autotuning, as before s18)")
    parser.add_argument("--until", choices=STAGES,
                        help="each device stops after this stage (e.g. dhcp_offer)")
    parser.add_argument("--only", choices=["netboot", "standins"])
    parser.add_argument("--inventory", choices=["sqlite", "postgresql", "both"],
                        default="sqlite", help="netboot's inventory backend(s); postgresql "
                        "starts a throwaway cluster (Debian's postgresql package)")
    parser.add_argument("--order", choices=["netboot-first", "standins-first"],
                        default="netboot-first", help="the first run's order (the next runs "
                        "alternate it)")
    parser.add_argument("--repeat", type=int,
                        help="runs of every target, the order reversed each run (default 2: "
                             "each target once first, once last; 1 with one target); medians "
                             "are printed")
    parser.add_argument("--sequence",
                        help="targets run in this order in every run, comma-separated, a "
                             "target more than once too (e.g. standins,standins): for digging")
    parser.add_argument("--settle", type=float, default=0.0, metavar="S",
                        help="seconds to wait before each target but the first (an idle "
                             "pause: what a run leaves behind that time would clear)")
    parser.add_argument("--shared-namespaces", action="store_true",
                        help="one namespace pair for every run of the invocation (before "
                             "session 27), not a fresh pair for each target")
    parser.add_argument("--log-level", default="info", help="netboot's log level (info: as run)")
    parser.add_argument("--quiet-standins", action="store_true",
                        help="dnsmasq and nginx log nothing (before s28-storm), not a line "
                             "per answer and request as they ship and as netboot's info does")
    parser.add_argument("--python", default=sys.executable, help="interpreter for netboot")
    parser.add_argument("--callgrind", action="store_true",
                        help="netboot's server under callgrind, instrumented during the storm "
                             "only: the run dir's callgrind.out.1-NN (with --keep) are its "
                             "instructions, per thread (s50-bisect)")
    parser.add_argument("--syscalls", action="store_true",
                        help="count the servers' system calls during the storm (perf stat of "
                             "syscall tracepoints; s50-bisect)")
    parser.add_argument("--sync-inventory", action="store_true",
                        help="write each run's copy of the seeded inventory to disk (fsync) "
                             "before its server starts, not leave ~92 MB (100,000 machines) "
                             "of it to be written back during the storm (s36-storm)")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="the netboot checkout whose server runs (this harness's devices "
                             "against another tree's server: A/B)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--startup", action="store_true",
                        help="begin each storm as soon as the target answers (a storm at "
                             "start-up: netboot still loads its inventory view), not once its "
                             "servers are idle (the default since s28-storm)")
    parser.add_argument("--loaded", action="store_true",
                        help="start the storm once netboot's inventory view is loaded (a "
                             "running server), not as soon as it answers (a start-up storm)")
    parser.add_argument("--plain-switching", action="store_true",
                        help="netboot loads its inventory view at Python's switch interval, "
                             "not service.brisk_switching's (a start-up storm's A/B)")
    parser.add_argument("--loop-probe", action="store_true",
                        help="netboot runs under benchmarks/storm_loop_probe.py: its loop's "
                             "turns, TFTP wake-ups and sendfile steps per half second into "
                             "the run dir's probe.json (with --keep), a line of them printed")
    parser.add_argument("--capture", action="store_true",
                        help="tcpdump the DHCP traffic on the server's veth into the run "
                             "dir (with --keep)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--copy-downloads", action="store_true",
                        help="copy each kernel's and initrd's bytes into the load generator "
                             "(recv_into), not only count them (MSG_TRUNC: received, "
                             "acknowledged and counted by the devices' kernel, not copied)")
    parser.add_argument("--generators", type=int, default=GENERATORS, metavar="N",
                        help="load generator processes, each an asyncio program playing its "
                             "share of the devices (by client address) end to end; their "
                             f"latencies are merged (default {GENERATORS})")
    parser.add_argument("--generator-nice", type=int, default=GENERATOR_NICE, metavar="N",
                        help="the generators' nice value (e.g. -10: the devices read their "
                             "sockets before the machine's other load does, as real devices "
                             f"on their own CPUs; default {GENERATOR_NICE})")
    parser.add_argument("--diag", action="store_true",
                        help="nstat of both namespaces before/after and a pcap of the HTTP "
                             "SYN/FIN/RST packets into the run dir (with --keep)")
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates network namespaces")
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: servers stopped, namespaces deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    enrolled = max(args.enrolled or args.devices, args.devices)
    spec = Spec(args.devices, args.within, enrolled, args.kernel_size, args.initrd_size,
                args.loss, args.slow_acks, args.device_timeout, args.seed, args.until,
                args.device_window, copy_downloads=args.copy_downloads)
    netboot_targets = {"sqlite": ["netboot"], "postgresql": [PG_TARGET],
                       "both": ["netboot", PG_TARGET]}[args.inventory]
    targets = [*netboot_targets, "standins"]
    if args.order == "standins-first":
        targets.reverse()
    if args.only:
        targets = netboot_targets if args.only == "netboot" else ["standins"]
    if args.sequence:
        targets = args.sequence.split(",")
        unknown = set(targets) - {*NETBOOT_TARGETS, "standins"}
        if unknown:
            raise SystemExit(f"--sequence: unknown target(s) {sorted(unknown)}")
    for tool in ("dnsmasq", "nginx"):
        if "standins" in targets and shutil.which(tool) is None:
            print(f"stand-ins left out: {tool} is not installed "
                  "(apt-get install dnsmasq-base nginx-light)")
            targets = [t for t in targets if t != "standins"]
    repeat = max(1, args.repeat or (2 if len(targets) > 1 else 1))
    plan = [targets] * repeat if args.sequence else run_plan(targets, repeat)
    tmp = Path(tempfile.mkdtemp(prefix="netboot-storm-"))
    try:
        work = Workload(tmp, args.devices, enrolled, args.kernel_size, args.initrd_size,
                        tree=args.tree.resolve(), sync_copy=args.sync_inventory)
        print(f"netboot from {work.tree}; devices from {REPO}")
        work.build()
        with contextlib.ExitStack() as stack:
            database: Cluster | None = None
            if any(t in NETBOOT_TARGETS for t in targets):
                took = work.netboot_seed(args.python)
                print(f"netboot import of {enrolled} machines: {took:.1f} s")
            if PG_TARGET in targets:
                sys.path.insert(0, str(REPO))
                from netboot.lab import pgcluster

                try:
                    database = stack.enter_context(pgcluster.running())
                except pgcluster.ClusterError as exc:
                    raise SystemExit(f"netboot-pg: {exc}") from exc
                took = work.netboot_copy_to(args.python, database.dsn())
                print(f"netboot db copy of {enrolled} machines into PostgreSQL: {took:.1f} s")
            runs: list[list[Result]] = []
            shared = (stack.enter_context(namespaces()) if args.shared_namespaces else None)
            for n, order in enumerate(plan, 1):
                runs.append([])
                for place, target in enumerate(order, 1):
                    if args.settle and (n, place) != (1, 1):
                        time.sleep(args.settle)
                    # A fresh namespace pair for each target (unless --shared-namespaces):
                    # nothing of the one before (sockets in TIME_WAIT, neighbours, routes)
                    # is met by the next.
                    with (contextlib.nullcontext(shared) if shared else namespaces()
                          ) as (server_ns, client_ns):
                        print(f"run {n}.{place}: {target} (load average "
                              f"{os.getloadavg()[0]:.2f})", flush=True)
                        runs[-1].append(run_target(target, server_ns, client_ns, work, spec,
                                                   args, tmp / f"run-{n}.{place}-{target}",
                                                   database))
        for n, results in enumerate(runs, 1):
            if len(runs) > 1:
                print(f"\n=== run {n} of {len(runs)}: "
                      f"{', '.join(r.target for r in results)} ===")
            report(results, spec)
        report_medians(runs, args.shared_namespaces)
    finally:
        if args.keep:
            print(f"work dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
