"""Following the host's IPv4 addresses (rtnetlink) in a network namespace of the test's own."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from netboot.servers.interfaces import Addresses, InterfaceWatcher, first_address
from netboot.wire import rtnetlink
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]


def test_the_kernels_dump_parses_to_the_addresses_ip_shows(namespace: str) -> None:
    """The codec against the kernel's own bytes: the namespace's loopback addresses."""

    async def scenario() -> list[rtnetlink.Message]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.bind((0, 0))
            sock.send(rtnetlink.dump_request(1))
            got: list[rtnetlink.Message] = []
            while not any(isinstance(m, rtnetlink.Done) for m in got):
                got += rtnetlink.parse(sock.recv(65536))
            return got

    messages = in_namespace(namespace, scenario)
    found = [(m.name, m.address, m.prefixlen) for m in messages
             if isinstance(m, rtnetlink.AddressMessage)]
    assert found == [("lo", "127.0.0.1", 8), ("lo", "192.0.2.1", 32), ("lo", "192.0.2.10", 32),
                     ("lo", "192.0.2.60", 32)]


def test_an_address_added_and_removed_is_told_at_once(namespace: str) -> None:
    """Subscribers hear of an address within milliseconds of `ip addr add` (no rescan
    period), and of its removal; the primary address is what SIOCGIFADDR would read."""

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True,
                       timeout=20)

    async def scenario() -> tuple[Addresses, list[Addresses], float, float]:
        watcher = InterfaceWatcher()
        await watcher.start()
        seen: list[Addresses] = []
        changed = asyncio.Event()

        def told(addresses: Addresses) -> None:
            seen.append(addresses)
            changed.set()

        watcher.subscribe(told)
        loop = asyncio.get_running_loop()
        try:
            at_start = watcher.addresses()
            # Named (ip -n), never this thread's namespace by inheritance: only the test's.
            ip("link", "add", "nbw0", "type", "veth", "peer", "name", "nbw1")
            ip("addr", "add", "198.51.100.1/24", "dev", "nbw0")
            ip("addr", "add", "198.51.100.2/24", "dev", "nbw0")
            started = loop.time()
            while first_address(watcher.addresses(), "nbw0") is None:
                changed.clear()
                await asyncio.wait_for(changed.wait(), 2)
            added = loop.time() - started
            ip("link", "del", "nbw0")
            started = loop.time()
            while any(a.name == "nbw0" for a in watcher.addresses()):
                changed.clear()
                await asyncio.wait_for(changed.wait(), 2)
            removed = loop.time() - started
        finally:
            watcher.close()
        return at_start, seen, added, removed

    at_start, seen, added, removed = in_namespace(namespace, scenario)
    assert first_address(at_start, "lo") == "127.0.0.1"
    assert added < 0.5 and removed < 0.5, (added, removed)
    both = [a for a in seen if sum(e.name == "nbw0" for e in a) == 2]
    assert both, seen
    # The second address on a network is a secondary: the first stays the primary.
    assert first_address(both[0], "nbw0") == "198.51.100.1"
    assert not any(e.name == "nbw0" for e in seen[-1])
