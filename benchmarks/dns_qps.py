"""Queries per second answered by netboot's DNS server from an inventory of 10,000 machines.

Loopback only. Sends a bounded number of queries (default 20,000) with a bounded window of
queries outstanding, stops after at most ``--max-seconds``, and prints one row per target.
Targets are listed in ``TARGETS`` so a peer (e.g. dnsmasq serving the same names from a hosts
file) can be added later as another row; the ratio column is relative to the first row.

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
async def netboot_server(zone: Zone) -> AsyncIterator[int]:
    server = DnsServer(ZoneHolder(zone), host=LOOPBACK, port=0, forward=False)
    await server.start()
    try:
        yield server.port
    finally:
        await server.close()


# name → factory of an async context manager yielding the port to query. A peer such as
# dnsmasq would start its process here (on loopback, by its own PID) and stop it on exit.
TARGETS: dict[str, Callable[[Zone], contextlib.AbstractAsyncContextManager[int]]] = {
    "netboot": netboot_server,
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
        async with factory(zone) as port:
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
