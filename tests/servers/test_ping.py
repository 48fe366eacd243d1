"""The ping check's probe (servers/ping.Pinger) on real ICMP sockets, in a network namespace
this test creates: loopback answers every echo; nbd0 (192.0.2.1/24) is one end of a veth
pair inside it whose other end (nbd1) has no address, so nobody answers ARP or echo for
192.0.2.77 there. No echo leaves the namespace."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from netboot.servers.ping import Pinger
from tests.netns import in_namespace, ip, namespace  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]


@pytest.fixture
def link(namespace: str) -> str:  # noqa: F811 (the fixture above)
    ip("-n", namespace, "link", "add", "nbd0", "type", "veth", "peer", "name", "nbd1")
    ip("-n", namespace, "addr", "add", "192.0.2.1/24", "dev", "nbd0")
    ip("-n", namespace, "link", "set", "nbd1", "up")
    ip("-n", namespace, "link", "set", "nbd0", "up")
    return namespace


def test_an_address_that_answers_is_in_use_and_asked_twice_is_pinged_once(
        link: str) -> None:
    """Two DISCOVERs wait on one address at once (a client's retransmission, or two clients
    while the pool holds it): one echo request, both told it is in use. The wait is long: an
    answer ends it, not the timer."""
    async def scenario() -> tuple[list[bool | None], int, int, str | None]:
        pinger = Pinger(wait=30.0)
        try:
            both = await asyncio.gather(pinger.answers("127.0.0.1", "lo"),
                                        pinger.answers("127.0.0.1", "lo"))
            return list(both), pinger.sent, pinger.answered, pinger.kind("lo")
        finally:
            pinger.close()

    both, sent, answered, kind = in_namespace(link, scenario)
    assert both == [True, True] and sent == 1 and answered == 1
    assert kind == "raw"  # root, and ping_group_range's default "1 0" holds no group


def test_nobody_answering_within_the_wait_is_free(link: str) -> None:
    async def scenario() -> tuple[bool | None, int, int]:
        pinger = Pinger(wait=0.2)
        try:
            return await pinger.answers("192.0.2.77", "nbd0"), pinger.sent, pinger.answered
        finally:
            pinger.close()

    assert in_namespace(link, scenario) == (False, 1, 0)


def test_the_unprivileged_ping_socket_where_the_group_may_open_one(link: str) -> None:
    subprocess.run(["ip", "netns", "exec", link, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=0 2147483647"], check=True, timeout=20)

    async def scenario() -> tuple[bool | None, bool | None, str | None]:
        pinger = Pinger(wait=0.2)
        try:
            return (await pinger.answers("127.0.0.1", "lo"),
                    await pinger.answers("192.0.2.77", "nbd0"), pinger.kind("lo"))
        finally:
            pinger.close()

    assert in_namespace(link, scenario) == (True, False, "ping")


def test_past_the_bound_of_probes_waiting_an_address_is_not_checked(link: str) -> None:
    async def scenario() -> list[bool | None]:
        pinger = Pinger(wait=0.2, max_probes=1)
        try:
            return list(await asyncio.gather(pinger.answers("192.0.2.77", "nbd0"),
                                             pinger.answers("192.0.2.78", "nbd0")))
        finally:
            pinger.close()

    assert in_namespace(link, scenario) == [False, None]


def test_closed_while_a_probe_waits_it_ends_not_in_use(link: str) -> None:
    async def scenario() -> bool | None:
        pinger = Pinger(wait=30.0)
        waiting = asyncio.ensure_future(pinger.answers("192.0.2.77", "nbd0"))
        while pinger.sent == 0:
            await asyncio.sleep(0)
        pinger.close()
        return await waiting

    assert in_namespace(link, scenario) is False


def test_asked_again_as_its_probe_ends_no_second_echo_is_sent(link: str) -> None:
    """A DISCOVER sent again just as the probe of its address ended (before the first
    waiter recorded the answer) is told that answer: in a storm of 240 devices, 10 were sent
    a second echo and kept waiting another second (benchmarks/README.md, s48-ping)."""
    async def scenario() -> tuple[bool | None, bool | None, int]:
        pinger = Pinger(wait=0.2)
        try:
            first = await pinger.answers("192.0.2.77", "nbd0")
            return first, await pinger.answers("192.0.2.77", "nbd0"), pinger.sent
        finally:
            pinger.close()

    assert in_namespace(link, scenario) == (False, False, 1)
