"""Following the host's IPv4 addresses (rtnetlink) in a network namespace of the test's own."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from netboot.servers.interfaces import (
    Addresses,
    InterfaceWatcher,
    Ipv6Networks,
    first_address,
    ipv6_networks,
)
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
    """Subscribers hear of an address at once after `ip addr add` (no rescan period), and
    of its removal; the primary address is what SIOCGIFADDR would read. "At once" is
    counted in turns of the event loop, not seconds: the kernel queues its notification
    before `ip` returns, so the watcher has it within a turn or two. (It was "within 0.5 s",
    a time a loaded CI machine can take between two turns.)"""

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", namespace, *args], check=True, capture_output=True,
                       timeout=20)

    async def turns_until(told: Callable[[], bool]) -> int:
        """The event loop's turns until ``told()``: bounded in turns (a rescan period would
        take its own time, ever more turns), and in time (60 s, in_namespace's), a hang."""
        turns = 0
        while not told() and turns < 1000:
            await asyncio.sleep(0)
            turns += 1
        return turns

    async def scenario() -> tuple[Addresses, list[Addresses], int, int]:
        watcher = InterfaceWatcher()
        await watcher.start()
        seen: list[Addresses] = []
        changed = asyncio.Event()

        def told(addresses: Addresses) -> None:
            seen.append(addresses)
            changed.set()

        watcher.subscribe(told)
        try:
            at_start = watcher.addresses()
            # Named (ip -n), never this thread's namespace by inheritance: only the test's.
            ip("link", "add", "nbw0", "type", "veth", "peer", "name", "nbw1")
            ip("addr", "add", "198.51.100.1/24", "dev", "nbw0")
            ip("addr", "add", "198.51.100.2/24", "dev", "nbw0")
            added = await turns_until(
                lambda: first_address(watcher.addresses(), "nbw0") is not None)
            ip("link", "del", "nbw0")
            removed = await turns_until(
                lambda: not any(a.name == "nbw0" for a in watcher.addresses()))
        finally:
            watcher.close()
        return at_start, seen, added, removed

    at_start, seen, added, removed = in_namespace(namespace, scenario)
    assert first_address(at_start, "lo") == "127.0.0.1"
    assert added <= 5 and removed <= 5, (added, removed)  # turns of the loop
    both = [a for a in seen if sum(e.name == "nbw0" for e in a) == 2]
    assert both, seen
    # The second address on a network is a secondary: the first stays the primary.
    assert first_address(both[0], "nbw0") == "198.51.100.1"
    assert not any(e.name == "nbw0" for e in seen[-1])


IF_INET6_TEXT = """\
00000000000000000000000000000001 01 80 10 80       lo
20010db8000a00000000000000000010 05 40 00 80       va
20010db8000a00000000000000000011 05 40 00 80       va
fe800000000000000000000000000010 05 40 20 80       va
fd000000000000000000000000000002 04 30 00 82     eth0
not a line
"""


def test_ipv6_networks_of_proc_net_if_inet6() -> None:
    """s46-dns: the host's IPv6 on-link networks, loopback and link-local left out (a
    link-local source is on-link by definition), each network once."""
    assert [str(n) for n in ipv6_networks(IF_INET6_TEXT)] == ["2001:db8:a::/64", "fd00::/48"]


def test_ipv6_networks_are_read_again_for_an_address_none_holds_at_most_once_a_second(
        tmp_path: Path) -> None:
    path = tmp_path / "if_inet6"
    path.write_text(IF_INET6_TEXT)
    now = [100.0]
    nets = Ipv6Networks(str(path), clock=lambda: now[0])
    assert nets.holds(ipaddress.IPv6Address("2001:db8:a::60"))
    path.write_text(IF_INET6_TEXT + "20010db8000b00000000000000000010 06 40 00 80 vb\n")
    assert not nets.holds(ipaddress.IPv6Address("2001:db8:b::60"))  # read at 100.0
    now[0] = 101.5
    assert nets.holds(ipaddress.IPv6Address("2001:db8:b::60"))  # a second later: read again
    assert not Ipv6Networks(str(tmp_path / "absent")).holds(ipaddress.IPv6Address("fd00::1"))
