"""Authoritative DHCP's check that an address is free, against real hosts on a real link: a
host that holds a pool address by hand (it answers ping and ARP) and busybox's udhcpc.

Three namespaces this test creates (``nbt-<random>-s``/``-c``/``-h``): the server's holds a
bridge (192.0.2.1/24) with one veth to the client's namespace and one to the host's, whose
end has 192.0.2.100/24, the pool's first address, given by hand. Nothing is created in the
host namespace; everything is torn down in the fixture's finally; processes are ended by
their own PID (tests.servers.test_dhcp_netns.Server).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.servers.test_dhcp_netns import Link, Server, _udhcpc, ip

pytestmark = [
    pytest.mark.netns,
    pytest.mark.root,
    pytest.mark.requires("ip", "iproute2"),
    pytest.mark.requires("busybox", "busybox-static"),
]

BRIDGE = "nbbr0"
STATIC = "192.0.2.100"  # the pool's first address (dhcp_netns_runner: .100-.109)


@pytest.fixture
def lan() -> Iterator[Link]:
    """The server's bridge, the client's namespace and a host holding 192.0.2.100."""
    tag = secrets.token_hex(3)
    server, client, host = (f"nbt-{tag}-{end}" for end in "sch")
    created: list[str] = []
    try:
        for ns in (server, client, host):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", server, "link", "add", BRIDGE, "type", "bridge")
        for port, peer, ns in (("nbs0", "nbc0", client), ("nbs1", "nbh0", host)):
            ip("-n", server, "link", "add", port, "type", "veth", "peer", "name", peer,
               "netns", ns)
            ip("-n", server, "link", "set", port, "master", BRIDGE, "up")
            ip("-n", ns, "link", "set", peer, "up")
        ip("-n", server, "addr", "add", "192.0.2.1/24", "dev", BRIDGE)
        ip("-n", server, "link", "set", BRIDGE, "up")
        ip("-n", host, "addr", "add", f"{STATIC}/24", "dev", "nbh0")
        yield Link(server, client, server_if=BRIDGE, client_if="nbc0")
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _lease(out: str) -> str | None:
    """The address udhcpc leased last (after a decline, the second)."""
    leased = [line.split()[3] for line in out.splitlines()
              if line.startswith("udhcpc: lease of ") and " obtained from 192.0.2.1" in line]
    return leased[-1] if leased else None


def _lease_with(lan: Link, *udhcpc: str, ping: bool, wrap: tuple[str, ...] = (),
                clients: int = 1) -> tuple[list[str | None], str, str]:
    """The server on ``lan`` (``ping``: dhcp.ping_check), udhcpc run ``clients`` times one
    after the other: the address each leased last, what udhcpc printed, the server's log."""
    server = Server(lan, "authoritative", ping=ping, wrap=wrap)
    leased, out = [], ""
    try:
        for _ in range(clients):
            result, said = _udhcpc(lan, 5, *udhcpc)
            out += said
            assert result.returncode == 0, said
            leased.append(_lease(said))
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
    return leased, out, log


@pytest.mark.parametrize("sockets", ["raw", "ping"])
def test_an_address_a_host_holds_by_hand_is_not_offered(lan: Link, sockets: str) -> None:
    """A host on the link has 192.0.2.100 (the pool's first address) set by hand: the server
    offered it to udhcpc, and two hosts answered ARP for one address. Now the server pings it
    first, is answered, keeps it from clients and offers 192.0.2.101; said once, naming the
    address. Both sockets: raw (root, as here) and the unprivileged ping socket, where
    net.ipv4.ping_group_range lets the server's group open one (set in its namespace)."""
    if sockets == "ping":
        subprocess.run(["ip", "netns", "exec", lan.server_ns, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True, timeout=20)
    leased, out, log = _lease_with(lan, ping=True)
    assert leased == ["192.0.2.101"], out + log
    kind = "raw ICMP" if sockets == "raw" else "unprivileged ping"
    assert f"ping check on {BRIDGE}: {kind} socket" in log, log
    assert log.count(f"dhcp: {STATIC} answered a ping on {BRIDGE}: in use by a host that is "
                     "not in the lease table") == 1, log


def test_the_first_address_is_offered_when_nobody_answers(lan: Link) -> None:
    """Nobody holds 192.0.2.100 (the host's address removed): it is pinged, nothing answers
    within the wait, and it is what udhcpc leases, as without the check."""
    ip("-n", lan.server_ns.replace("-s", "-h"), "addr", "flush", "dev", "nbh0")
    leased, out, log = _lease_with(lan, ping=True)
    assert leased == [STATIC], out + log
    assert f"{STATIC} did not answer a ping on {BRIDGE}: offered" in log, log
    assert "answered a ping" not in log, log


def test_with_the_check_off_the_address_in_use_is_offered(lan: Link) -> None:
    """dhcp.ping_check false (dnsmasq's --no-ping): no ping, 192.0.2.100 offered and leased
    although a host has it, as before the check."""
    leased, out, log = _lease_with(lan, ping=False)
    assert leased == [STATIC], out + log
    assert "ping check on" not in log and "answered a ping" not in log, log


@pytest.mark.requires("setpriv", "util-linux")
def test_without_an_icmp_socket_the_check_is_off_and_said_once(lan: Link) -> None:
    """Neither socket opens (no CAP_NET_RAW; the group outside net.ipv4.ping_group_range,
    its default "1 0"): the check is off, said once at start with the fix, and the address in
    use is offered as without it; the server keeps serving (two clients, one line)."""
    leased, out, log = _lease_with(
        lan, ping=True, wrap=("setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"),
        clients=2)
    assert leased == [STATIC, STATIC], out + log
    assert log.count("ping check off: no ICMP socket opens") == 1, log
    assert "net.ipv4.ping_group_range" in log, log


def test_a_client_that_finds_its_offer_in_use_declines_it_and_gets_another(
        lan: Link) -> None:
    """RFC 2131 §4.4.1: a client checks the address it is offered (udhcpc -a: an ARP probe)
    and DECLINEs it when a host answers. The check off (nothing pinged), 192.0.2.100 is
    offered; udhcpc's ARP probe is answered by the host holding it; its DECLINE marks the
    address bad for decline_seconds (dnsmasq: 10 minutes), and its next DISCOVER is offered
    192.0.2.101, which it leases."""
    leased, out, log = _lease_with(lan, "-a", "-A", "1", ping=False)
    assert "declining" in out, out + log
    assert leased == ["192.0.2.101"], out + log
    assert f"declined {STATIC} (address in use?), marked bad for 600s" in log, log
