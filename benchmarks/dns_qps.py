"""Queries per second answered by netboot's DNS server from an inventory of 10,000 machines.

Loopback only. The server runs in its own process pinned to one core (``taskset -c 0``), the
load generator in this process pinned to the other: on one core, or one event loop, the
generator's own cost would be counted against the server. Targets: netboot (asyncio's loop,
and uvloop with ``--uvloop``, which ``netboot serve`` uses when installed) and dnsmasq
(Debian's ``dnsmasq-base``) serving the same names from a hosts file and SRV lines, with the
same client and query mix. Each run sends ``--queries`` queries (default 20,000) with
``--window`` outstanding, twice: the first pass meets every name for the first time
(``cold``), the second asks them again (``warm``: a storm asks the same names over and
over). Bounded: each pass stops after ``--max-seconds``; servers are stopped by their PID.
``--repeat`` runs rotate the order of the targets; each pass's median run by its own qps is
printed, with the server's CPU per query in that pass (``/proc/<pid>/stat``) and the ratios
to dnsmasq.
On a loaded machine qps follows the scheduler more than the server; CPU per query does not.

    python benchmarks/dns_qps.py [--queries 20000] [--window 64] [--repeat 3] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this tree's netboot, not an installed one

from dnslib import DNSHeader, DNSQuestion, DNSRecord  # noqa: E402
from peers import stop, wait_for_udp_answer  # noqa: E402

from netboot.model import Cluster, MacAddress, Machine, MachineState, Role  # noqa: E402
from netboot.names import Zone, ZoneHolder  # noqa: E402
from netboot.servers.dns import DnsServer  # noqa: E402

LOOPBACK = "127.0.0.1"
MACHINES = 10_000
SERVER_CPU, CLIENT_CPU = 0, 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def inventory(count: int = MACHINES) -> Zone:
    machines = [
        Machine(
            macs=(MacAddress(bytes([0x52, 0x54, 0, i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF])),),
            hostname=f"node{i}",
            ipv4=f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF}",
            cluster=f"c{i % 10}",
            role=Role.SERVER if i < 30 else Role.AGENT,  # 3 servers per cluster
            state=MachineState.REGISTERED,
        )
        for i in range(count)
    ]
    clusters = [Cluster(f"c{i}") for i in range(10)]
    return Zone.build(machines, clusters, zone="netboot.lan", server_addrs=["10.255.0.1"],
                      serial=1)


def queries(count: int, machines: int, seed: int = 7) -> list[bytes]:
    """A fixed mix: mostly A by hostname, some PTR, SRV, NXDOMAIN and NODATA."""
    rng = random.Random(seed)  # a benchmark workload, not security-relevant
    out = []
    for n in range(count):
        i = rng.randrange(machines)
        kind = n % 10
        if kind < 6:
            name, qtype = f"node{i}.netboot.lan", 1
        elif kind < 8:
            name, qtype = f"{i & 0xFF}.{i >> 8 & 0xFF}.{i >> 16 & 0xFF}.10.in-addr.arpa", 12
        elif kind == 8:
            name, qtype = f"_k3s._tcp.c{i % 10}.netboot.lan", 33
        else:
            name, qtype = f"missing{i}.netboot.lan", 1
        record = DNSRecord(DNSHeader(id=n & 0xFFFF, rd=1), questions=[DNSQuestion(name, qtype)])
        out.append(bytes(record.pack()))
    return out


@dataclass
class Result:
    target: str
    sent: int
    answered: int
    lost: int
    seconds: float

    @property
    def qps(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


def fire(port: int, payloads: list[bytes], *, window: int, max_seconds: float,
         target: str) -> Result:
    """Closed loop on a plain socket (cheaper than an event loop: the generator must cost
    less than the server): ``window`` queries outstanding, one sent per answer. A window
    that stays silent for 1 s is counted lost and refilled."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((LOOPBACK, port))
    sock.setblocking(False)
    sent = answered = lost = outstanding = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    try:
        while (sent < len(payloads) or outstanding) and time.perf_counter() < deadline:
            while outstanding < window and sent < len(payloads):
                sock.send(payloads[sent])
                sent += 1
                outstanding += 1
            ready, _, _ = select.select([sock], [], [], 1.0)
            if not ready:
                lost += outstanding  # dropped datagrams: give up on the window, refill
                outstanding = 0
                continue
            while True:
                try:
                    sock.recv(4096)
                except BlockingIOError:
                    break
                answered += 1
                outstanding -= 1
    finally:
        sock.close()
    return Result(target, sent, answered, lost, time.perf_counter() - start)


def serve_netboot(machines: int) -> None:
    """Child process: netboot's DNS server on loopback until SIGTERM; prints its port. With
    dns.rate_limit's defaults, as ``netboot serve`` runs it (since session 46): what it
    limited is said on stderr at the end (nothing, at this mix and rate)."""
    from netboot.config import DnsRateLimitConfig
    from netboot.servers.dns import rate_limiter

    async def main() -> None:
        limiter = rate_limiter(DnsRateLimitConfig())
        server = DnsServer(ZoneHolder(inventory(machines)), host=LOOPBACK, port=0, forward=False,
                           rate_limiter=limiter)
        await server.start()
        print(server.port, flush=True)
        done = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
        await done.wait()
        await server.close()
        if limiter is not None and (limiter.dropped or limiter.slipped):
            print(f"dns_qps: the rate limiter dropped {limiter.dropped} and truncated "
                  f"{limiter.slipped} answers", file=sys.stderr)

    if os.environ.get("NETBOOT_LOOP") == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


@contextmanager
def server(target: str, machines: int, probe: bytes) -> Iterator[tuple[int, int]]:
    """Start ``target`` pinned to SERVER_CPU; yields (port, pid)."""
    pin = ["taskset", "-c", str(SERVER_CPU)]
    with tempfile.TemporaryDirectory() as tmp:
        if target == "dnsmasq":
            hosts = os.path.join(tmp, "hosts")
            with open(hosts, "w") as fh:
                for i in range(machines):
                    fh.write(f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF} "
                             f"node{i}.netboot.lan\n")
            srv = [f"--srv-host=_k3s._tcp.c{c}.netboot.lan,node{s}.netboot.lan,6443"
                   for c in range(10) for s in range(c, 30, 10)]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as free:
                free.bind((LOOPBACK, 0))
                port = free.getsockname()[1]
            proc = subprocess.Popen(
                [*pin, "dnsmasq", "--keep-in-foreground", f"--port={port}",
                 f"--listen-address={LOOPBACK}", "--bind-interfaces", "--conf-file=/dev/null",
                 "--no-hosts", "--no-resolv", f"--addn-hosts={hosts}", "--local=/netboot.lan/",
                 "--domain=netboot.lan", "--user=root", "--pid-file=", *srv],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if target.endswith("uvloop"):
                env["NETBOOT_LOOP"] = "uvloop"
            proc = subprocess.Popen(
                [*pin, sys.executable, __file__, "--serve", "--machines", str(machines)],
                stdout=subprocess.PIPE, env=env)
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            if not ready:
                stop(proc)
                raise RuntimeError(f"{target} did not start")
            port = int(proc.stdout.readline())
        try:
            if not wait_for_udp_answer(LOOPBACK, port, probe):
                raise RuntimeError(f"{target} does not answer on {port}")
            yield port, proc.pid
        finally:
            stop(proc)


Run = tuple[Result, Result, float, float]  # cold pass, warm pass, CPU µs a query in each


def medians(runs: list[Run]) -> Run:
    """Each pass's median run, by its own qps, with that run's CPU per query. Before session
    34 the run of median warm qps gave both passes' figures: its cold pass was any of the
    runs', not the median (cold ÷ dnsmasq, the first answers the target names, moved with
    whichever run the warm passes picked)."""
    cold = sorted(runs, key=lambda r: r[0].qps)[len(runs) // 2]
    warm = sorted(runs, key=lambda r: r[1].qps)[len(runs) // 2]
    return cold[0], warm[1], cold[2], warm[3]


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--machines", type=int, default=MACHINES)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="also netboot under uvloop")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_netboot(args.machines)
        return

    os.sched_setaffinity(0, {CLIENT_CPU})
    payloads = queries(args.queries, args.machines)
    targets = ["netboot", *(["netboot-uvloop"] if args.uvloop else [])]
    targets += ["dnsmasq"] if shutil.which("dnsmasq") else []
    runs: dict[str, list[Run]] = {t: [] for t in targets}
    for rep in range(args.repeat):
        order = targets[rep % len(targets):] + targets[:rep % len(targets)]
        for target in order:
            with server(target, args.machines, payloads[0]) as (port, pid):
                cpu0 = cpu_seconds(pid)
                cold = fire(port, payloads, window=args.window, max_seconds=args.max_seconds,
                            target=target)
                cpu1 = cpu_seconds(pid)
                warm = fire(port, payloads, window=args.window, max_seconds=args.max_seconds,
                            target=target)
                cpu_warm = cpu_seconds(pid) - cpu1
                runs[target].append((cold, warm, (cpu1 - cpu0) / max(cold.answered, 1) * 1e6,
                                     cpu_warm / max(warm.answered, 1) * 1e6))
    med = {t: medians(r) for t, r in runs.items() if r}
    ref = med.get("dnsmasq")
    print(f"dns_qps: {args.machines} machines, {args.queries} queries x 2 passes, window "
          f"{args.window}; server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}; "
          f"medians of {args.repeat}, each pass by its own qps; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'target':<16}{'cold qps':>10}{'warm qps':>10}{'lost':>6}{'cold µs/q':>11}"
          f"{'warm µs/q':>11}{'cold ÷ dnsmasq':>16}{'warm ÷ dnsmasq':>16}")
    for t, (cold, warm, cpu_cold, cpu) in med.items():
        rc = f"{cold.qps / ref[0].qps:.2f}x" if ref else "-"
        rw = f"{warm.qps / ref[1].qps:.2f}x" if ref else "-"
        print(f"{t:<16}{cold.qps:>10,.0f}{warm.qps:>10,.0f}{cold.lost + warm.lost:>6}"
              f"{cpu_cold:>11.1f}{cpu:>11.1f}{rc:>16}{rw:>16}")


if __name__ == "__main__":
    main()
