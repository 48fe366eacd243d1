"""Runs netboot's DHCP server for tests/servers/test_dhcp_netns.py inside a network namespace.

Usage: ``ip netns exec NS python -m tests.servers.dhcp_netns_runner MODE INTERFACE
[RELAY_NETWORKS]``: INTERFACE ``each`` serves every interface with an IPv4 address (what
``serve`` does on a host without a default route); RELAY_NETWORKS, comma-separated, are
``dhcp.relay_networks``. Prints ``READY <advertised ip>`` on stdout once listening (``-`` when
the interface has no address yet), serves until stdin closes (the test closes it, or dies),
then shuts down cleanly. Logs go to stderr. ``DHCP_RUNNER_FIXED``, ``mac=ip`` comma-separated,
gives machines a ``fixed_ipv4``; ``DHCP_RUNNER_MACHINES``, ``mac+mac`` comma-separated, makes
NICs one machine's; ``DHCP_RUNNER_ADVERTISE`` is ``server.advertise`` (with
``each``: serve's listeners where an address is advertised and no interface named);
``DHCP_RUNNER_PING=1`` turns ``dhcp.ping_check`` on (off otherwise, as DhcpSettings');
``DHCP_RUNNER_POOL_END`` ends the pool elsewhere than 192.0.2.109. INTERFACE ``all``: one
socket for every interface (none named, not each: a library's use), answering with
``DHCP_RUNNER_ADVERTISE``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider


async def main(mode: str, interface: str, relay_networks: tuple[str, ...] = ()) -> None:
    if mode == "authoritative":
        settings = DhcpSettings(
            mode="authoritative", pool_start="192.0.2.100",
            pool_end=os.environ.get("DHCP_RUNNER_POOL_END") or "192.0.2.109",
            netmask="255.255.255.0", router="192.0.2.1", dns_servers=("192.0.2.1",),
            lease_seconds=600, ping_check=os.environ.get("DHCP_RUNNER_PING") == "1",
        )
    else:
        settings = DhcpSettings()
    each, everything = interface == "each", interface == "all"
    fixed = dict(pair.split("=") for pair in os.environ.get("DHCP_RUNNER_FIXED", "").split(",")
                 if pair)
    machines = tuple(tuple(group.split("+")) for group in
                     os.environ.get("DHCP_RUNNER_MACHINES", "").split(",") if group)
    server = DhcpServer(settings, TableDecider(fixed=fixed, machines=machines),
                        MemoryLeaseStore(),
                        interfaces=None if each or everything else [interface],
                        advertise=os.environ.get("DHCP_RUNNER_ADVERTISE") or None,
                        each_interface=each, relay_networks=relay_networks)
    await server.start()
    print("READY", next(iter(server.interfaces.values()), "-"), flush=True)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, sys.stdin.read)  # returns at EOF
    finally:
        await server.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], sys.argv[2],
                     tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ()))
