"""Queries per second answered by netboot's DNS server from an inventory of 10,000 machines.

Loopback only. Sends a bounded number of queries (default 20,000) with a bounded window of
queries outstanding, stops after at most ``--max-seconds``, and prints one row per target.
Targets are listed in ``TARGETS``: netboot, and dnsmasq (Debian's ``dnsmasq-base``) serving
the same names from a hosts file and SRV lines, side by side with the same client and query
mix; the ratio column is relative to the first row (netboot).

    python benchmarks/dns_qps.py [--queries 20000] [--window 64] [--max-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from dnslib import DNSHeader, DNSQuestion, DNSRecord
from peers import stop, wait_for_udp_answer

from netboot.model import Cluster, MacAddress, Machine, MachineState, Role
from netboot.names import Zone, ZoneHolder
from netboot.servers.dns import DnsServer

LOOPBACK = "127.0.0.1"
MACHINES = 10_000


def inventory(count: int = MACHINES) -> Zone:
    machines = [
        Machine(
            MacAddress(bytes([0x52, 0x54, 0, i >> 16 & 0xFF, i >> 8 & 0xFF, i & 0xFF])),
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


class _Client(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.put_nowait(data)


async def fire(port: int, payloads: list[bytes], *, window: int, max_seconds: float,
               target: str) -> Result:
    loop = asyncio.get_running_loop()
    client = _Client()
    transport, _ = await loop.create_datagram_endpoint(lambda: client,
                                                       remote_addr=(LOOPBACK, port))
    sent = answered = lost = 0
    outstanding = 0
    start = time.perf_counter()
    deadline = start + max_seconds
    try:
        while (sent < len(payloads) or outstanding) and time.perf_counter() < deadline:
            while outstanding < window and sent < len(payloads):
                transport.sendto(payloads[sent])
                sent += 1
                outstanding += 1
            try:
                await asyncio.wait_for(client.replies.get(), 1.0)
            except TimeoutError:
                lost += outstanding  # a dropped datagram: give up on the window, refill
                outstanding = 0
                continue
            answered += 1
            outstanding -= 1
    finally:
        transport.close()
    return Result(target, sent, answered, lost, time.perf_counter() - start)


@contextlib.asynccontextmanager
async def netboot_server(zone: Zone, machines: int) -> AsyncIterator[int]:
    server = DnsServer(ZoneHolder(zone), host=LOOPBACK, port=0, forward=False)
    await server.start()
    try:
        yield server.port
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def dnsmasq_server(zone: Zone, machines: int) -> AsyncIterator[int]:
    """dnsmasq on loopback answering the same inventory: A/PTR from a hosts file, the cluster
    SRV records as --srv-host, authoritative for the zone (--local), no upstreams."""
    import os
    import shutil
    import socket
    import subprocess
    import tempfile

    if shutil.which("dnsmasq") is None:
        raise FileNotFoundError("dnsmasq (Debian package dnsmasq-base) is not installed")
    count = machines
    with tempfile.TemporaryDirectory() as tmp:
        hosts = os.path.join(tmp, "hosts")
        with open(hosts, "w") as fh:
            for i in range(count):
                fh.write(f"10.{i >> 16 & 0xFF}.{i >> 8 & 0xFF}.{i & 0xFF} node{i}.netboot.lan\n")
        srv = [f"--srv-host=_k3s._tcp.c{c}.netboot.lan,node{s}.netboot.lan,6443"
               for c in range(10) for s in range(c, 30, 10)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((LOOPBACK, 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            ["dnsmasq", "--keep-in-foreground", f"--port={port}", f"--listen-address={LOOPBACK}",
             "--bind-interfaces", "--conf-file=/dev/null", "--no-hosts", "--no-resolv",
             f"--addn-hosts={hosts}", "--local=/netboot.lan/", "--domain=netboot.lan",
             "--user=root", "--pid-file=", *srv],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_udp_answer(LOOPBACK, port, queries(1, machines)[0])
            yield port
        finally:
            stop(proc)


# name → factory of an async context manager yielding the port to query.
TARGETS: dict[str, Callable[[Zone, int], contextlib.AbstractAsyncContextManager[int]]] = {
    "netboot": netboot_server,
    "dnsmasq": dnsmasq_server,
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--machines", type=int, default=MACHINES)
    args = parser.parse_args()

    t0 = time.perf_counter()
    zone = inventory(args.machines)
    build = time.perf_counter() - t0
    payloads = queries(args.queries, args.machines)
    print(f"zone: {args.machines} machines, {len(zone)} names, built in {build:.2f} s")
    results = []
    for name, factory in TARGETS.items():
        async with factory(zone, args.machines) as port:
            results.append(await fire(port, payloads, window=args.window,
                                      max_seconds=args.max_seconds, target=name))
    base = results[0].qps or 1.0
    print(f"{'target':<10} {'sent':>8} {'answered':>9} {'lost':>6} {'seconds':>8} "
          f"{'qps':>9} {'ratio':>6}")
    for r in results:
        print(f"{r.target:<10} {r.sent:>8} {r.answered:>9} {r.lost:>6} {r.seconds:>8.2f} "
              f"{r.qps:>9.0f} {r.qps / base:>6.2f}")


if __name__ == "__main__":
    asyncio.run(main())
