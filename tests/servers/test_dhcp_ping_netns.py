"""Authoritative DHCP's check that an address is free, against real hosts on a real link: a
host that holds a pool address by hand (it answers ping and ARP) and busybox's udhcpc.

Three namespaces this test creates (``nbt-<random>-s``/``-c``/``-h``): the server's holds a
bridge (192.0.2.1/24) with one veth to the client's namespace and one to the host's, whose
end has 192.0.2.100/24, the pool's first address, given by hand. Nothing is created in the
host namespace; everything is torn down in the fixture's finally; processes are ended by
their own PID (tests.servers.test_dhcp_netns.Server).
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _namespaces(ends: str) -> Iterator[list[str]]:
    """One new namespace per letter of ``ends`` (``nbt-<random>-<letter>``, loopback up),
    deleted on the way out whatever happened."""
    tag = secrets.token_hex(3)
    created: list[str] = []
    try:
        for end in ends:
            ns = f"nbt-{tag}-{end}"
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        yield created
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _bridged(ns: str, ports: tuple[tuple[str, str, str], ...], address: str) -> None:
    """A bridge in ``ns`` with ``address``, one veth port to each (port, peer, namespace)."""
    ip("-n", ns, "link", "add", BRIDGE, "type", "bridge")
    for port, peer, other in ports:
        ip("-n", ns, "link", "add", port, "type", "veth", "peer", "name", peer, "netns", other)
        ip("-n", ns, "link", "set", port, "master", BRIDGE, "up")
        ip("-n", other, "link", "set", peer, "up")
    ip("-n", ns, "addr", "add", address, "dev", BRIDGE)
    ip("-n", ns, "link", "set", BRIDGE, "up")


@pytest.fixture
def lan() -> Iterator[Link]:
    """The server's bridge, the client's namespace and a host holding 192.0.2.100."""
    with _namespaces("sch") as (server, client, host):
        _bridged(server, (("nbs0", "nbc0", client), ("nbs1", "nbh0", host)), "192.0.2.1/24")
        ip("-n", host, "addr", "add", f"{STATIC}/24", "dev", "nbh0")
        yield Link(server, client, server_if=BRIDGE, client_if="nbc0")


def _lease(out: str) -> str | None:
    """The address udhcpc leased last (after a decline, the second), from the server
    (192.0.2.1 on the link, 198.51.100.1 across the relay)."""
    leased = [line.split()[3] for line in out.splitlines()
              if line.startswith("udhcpc: lease of ") and (" obtained from 192.0.2.1," in line
                                                          or " from 198.51.100.1," in line)]
    return leased[-1] if leased else None


def _lease_with(lan: Link, *udhcpc: str, ping: bool, wrap: tuple[str, ...] = (),
                clients: int = 1, **server: str) -> tuple[list[str | None], str, str]:
    """The server on ``lan`` (``ping``: dhcp.ping_check; ``server``: Server's other
    arguments), udhcpc run ``clients`` times one after the other: the address each leased
    last, what udhcpc printed, the server's log."""
    running = Server(lan, "authoritative", ping=ping, wrap=wrap, **server)
    leased, out = [], ""
    try:
        for _ in range(clients):
            result, said = _udhcpc(lan, 5, *udhcpc)
            out += said
            assert result.returncode == 0, said
            leased.append(_lease(said))
    finally:
        log = running.stop()
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


def test_on_one_socket_for_every_interface_the_address_in_use_is_found_by_the_routes(
        lan: Link) -> None:
    """DHCP on one socket for every interface (none named: a library's DhcpServer; serve
    listens per interface): it does not tell the link a DISCOVER came in on, and the check
    was off ("ping check off ... one socket for every interface"): udhcpc leased the address
    a host holds. The pool's network is one of this host's links (the bridge), so the
    route to a pool address is that link's: pinged by the routes, answered, .101 leased.
    (The one socket's broadcast OFFER leaves where the route to 255.255.255.255 goes: a
    default route through the bridge, as on a host whose only network is this one.)"""
    ip("-n", lan.server_ns, "route", "add", "default", "dev", BRIDGE)
    leased, out, log = _lease_with(lan, ping=True, interface="all", advertise="192.0.2.1")
    assert leased == ["192.0.2.101"], out + log
    assert "ping check on the interface the routes choose: raw ICMP socket" in log, log
    assert f"dhcp: {STATIC} answered a ping: in use by a host" in log, log
    assert "ping check off" not in log, log


def test_an_address_in_use_is_taken_back_when_no_other_is_free_and_it_answers_no_more(
        lan: Link) -> None:
    """A pool of one address, 192.0.2.100, which a host holds by hand: it answers the
    server's ping and udhcpc gets no offer (the pool has nothing else). The host lets go of
    it. Before, the address stayed kept from clients for decline_seconds (10 minutes) and
    udhcpc got nothing; now, with no other address free, it is pinged again (ISC dhcpd's
    reclaim of its oldest abandoned lease), answers no more, and udhcpc leases it, said."""
    server = Server(lan, "authoritative", ping=True, pool_end=STATIC)
    try:
        held, said = _udhcpc(lan, 2)
        assert held.returncode != 0 and "obtained" not in said, said
        ip("-n", lan.server_ns.replace("-s", "-h"), "addr", "flush", "dev", "nbh0")
        freed, out = _udhcpc(lan, 3)
    finally:
        log = server.stop()
    assert freed.returncode == 0 and _lease(out) == STATIC, out + log
    assert f"{STATIC} answered a ping on {BRIDGE}" in log, log
    assert "address pool exhausted, no offer; 1 of its addresses answered a ping" in log, log
    assert (f"no free address in the pool: {STATIC}, which answered a ping" in log
            and "did not answer a ping now and is offered again" in log), log
    assert "Traceback" not in log, log


@pytest.fixture
def relayed() -> Iterator[tuple[Link, str]]:
    """The pool's network (192.0.2.0/24) behind a router that relays DHCP (dnsmasq's
    --dhcp-relay, as a site's router or switch does): the server's namespace has
    198.51.100.1 and a route to 192.0.2.0/24 through the router's 198.51.100.2; the
    router's bridge (192.0.2.1, the relay's giaddr) joins the client's namespace and a
    host's, which holds 192.0.2.100 by hand (its default route through the router). Yields
    the server-to-client Link and the router's namespace."""
    with _namespaces("srch") as (server, router, client, host):
        ip("-n", server, "link", "add", "nbs0", "type", "veth", "peer", "name", "nbr0",
           "netns", router)
        ip("-n", server, "addr", "add", "198.51.100.1/24", "dev", "nbs0")
        ip("-n", server, "link", "set", "nbs0", "up")
        ip("-n", server, "route", "add", "192.0.2.0/24", "via", "198.51.100.2")
        ip("-n", router, "addr", "add", "198.51.100.2/24", "dev", "nbr0")
        ip("-n", router, "link", "set", "nbr0", "up")
        _bridged(router, (("nbrc", "nbc0", client), ("nbrh", "nbh0", host)), "192.0.2.1/24")
        subprocess.run(["ip", "netns", "exec", router, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, timeout=20)
        ip("-n", host, "addr", "add", f"{STATIC}/24", "dev", "nbh0")
        ip("-n", host, "route", "add", "default", "via", "192.0.2.1")
        yield Link(server, client, server_if="nbs0", client_if="nbc0"), router


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
@pytest.mark.parametrize("listener", ["interface", "one socket"])
def test_across_a_relay_the_address_a_far_host_holds_is_pinged_there_and_skipped(
        relayed: tuple[Link, str], listener: str) -> None:
    """A real relay (dnsmasq --dhcp-relay) between the server and the pool's network; a
    host there holds 192.0.2.100 by hand. udhcpc's DISCOVER comes relayed (giaddr
    192.0.2.1): the echo goes to the relay's network by the server's routes (from no
    particular link), the far host answers through the router, and udhcpc leases .101.
    The server listening on its interface (a relayed DISCOVER was pinged from that link,
    which held here: the route to 192.0.2.0/24 leaves by it) and on one socket for every
    interface (where main pinged nothing, and udhcpc leased .100)."""
    link, router = relayed
    relay = subprocess.Popen(
        ["ip", "netns", "exec", router, "dnsmasq", "--keep-in-foreground",
         "--conf-file=/dev/null", "--port=0", "--dhcp-relay=192.0.2.1,198.51.100.1",
         f"--interface={BRIDGE}", "--bind-interfaces", "--pid-file=", "--log-dhcp",
         "--log-facility=-"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        leased, out, log = _lease_with(
            link, ping=True, **({"interface": "all", "advertise": "198.51.100.1"}
                                if listener == "one socket" else {}))
    finally:
        relay.terminate()  # this dnsmasq only, by its own handle
        relayed_log = relay.communicate(timeout=20)[0].decode(errors="replace")
    assert "DHCP relay at 192.0.2.1 -> 198.51.100.1" in relayed_log, relayed_log
    assert leased == ["192.0.2.101"], out + log + relayed_log
    assert f"dhcp: {STATIC} answered a ping behind relay 192.0.2.1: in use" in log, log
    assert "ping check on the interface the routes choose" in log, log
