"""DISCOVERs with made-up MACs against authoritative DHCP: CPU a DISCOVER while they fill the
address pool and once it is full (s35-attack).

Each DISCOVER carries a new chaddr, as a host that makes MACs up sends them, and goes through
``DhcpServer.handle`` (the parse, the pool, the inventory claim, the reply; no sockets, one
clock instant, an in-memory lease store). Run it from each tree to compare, e.g.::

    cd /work/wt/s35-base && PYTHONPATH=$PWD python /path/to/dhcp_pool_flood.py --pool 4094
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import time

from netboot.model import Lease
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt

SERVER = "10.0.0.250"
NOW = 1_000_000.0


class Leases:
    """The inventory's lease calls, in memory."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}

    async def list_leases(self) -> list[Lease]:
        return list(self.leases.values())

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        self.leases[lease.mac] = lease

    async def delete_lease(self, mac: str) -> None:
        self.leases.pop(mac, None)


class NoBoot:
    async def first_stage(self, request: object) -> None:  # not asked: no PXE option
        return None


def discover(i: int) -> bytes:
    return dhcp.encode(dhcp.Packet(
        op=Op.REQUEST, xid=i, chaddr=(0x020000000000 + i).to_bytes(6, "big"),
        options=(dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),)))


async def run(size: int, extra: int) -> tuple[float, float, int]:
    start = ipaddress.IPv4Address("10.1.0.1")
    settings = DhcpSettings(
        mode="authoritative", pool_start=str(start), pool_end=str(start + size - 1),
        netmask="255.0.0.0", router="10.0.0.254", dns_servers=(), domain="example",
        lease_seconds=3600, decline_seconds=600)
    server = DhcpServer(settings, NoBoot(), Leases(), interfaces=None,  # type: ignore[arg-type]
                        advertise=SERVER, clock=lambda: NOW)
    await server.load_pool([SERVER])
    peer = ("0.0.0.0", 68)
    began = time.process_time()
    for i in range(size):
        assert await server.handle(discover(i), peer, server_ip=SERVER, pxe_port=False)
    fill = (time.process_time() - began) / size
    began = time.process_time()
    answered = 0
    for i in range(size, size + extra):
        # Silence before s46-attack; since, the oldest offer's address, shared.
        answered += bool(await server.handle(discover(i), peer, server_ip=SERVER,
                                             pxe_port=False))
    return fill, (time.process_time() - began) / extra, answered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=1022, help="addresses in the pool")
    ap.add_argument("--extra", type=int, default=200, help="DISCOVERs on the full pool")
    args = ap.parse_args()
    fill, full, answered = asyncio.run(run(args.pool, args.extra))
    print(f"pool {args.pool}: {fill * 1e6:.0f} us CPU a DISCOVER while filling, "
          f"{full * 1e6:.0f} us on the full pool ({answered} of {args.extra} answered)")


if __name__ == "__main__":
    main()
