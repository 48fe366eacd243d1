"""Authoritative mode: the pure lease pool, and the DHCP conversation through the handler."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.inventory.base import Store
from netboot.leases import Changes, LeasePool, LeaseStore
from netboot.model import Lease
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests import pg
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
from tests.pcap import capture, dhcp_datagrams

A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"
C = "52:54:00:00:00:0c"
T0 = 1_000_000.0


def pool(**kw: object) -> LeasePool:
    args: dict[str, object] = {"lease_seconds": 3600, "decline_seconds": 600,
                               "offer_seconds": 60}
    args.update(kw)
    return LeasePool("192.0.2.100", "192.0.2.102", **args)  # type: ignore[arg-type]


def test_allocation_is_stable_per_mac() -> None:
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    assert p.offer(B, T0) == "192.0.2.101"
    assert p.offer(A, T0 + 1) == "192.0.2.100"  # same client, same offer
    lease = p.request(A, "192.0.2.100", T0 + 2, selecting=True)
    assert lease == Lease(A, "192.0.2.100", T0 + 2 + 3600)
    assert p.offer(A, T0 + 10) == "192.0.2.100"  # existing binding first (RFC 2131 §4.3.1)


def test_requested_address_honoured_when_free() -> None:
    p = pool()
    assert p.offer(A, T0, requested="192.0.2.102") == "192.0.2.102"
    assert p.offer(B, T0, requested="192.0.2.102") == "192.0.2.100"  # held for A
    assert p.offer(C, T0, requested="198.51.100.7") == "192.0.2.101"  # not ours


def test_reserved_addresses_skipped() -> None:
    p = pool(reserved=["192.0.2.100"])
    assert p.offer(A, T0) == "192.0.2.101"
    assert p.size == 2


def test_an_address_that_becomes_the_hosts_is_not_offered_and_its_lease_moves() -> None:
    """An interface that comes up with an address inside the pool (rtnetlink, s38-net):
    not offered from then on, as dnsmasq never offers its interface's address; an offer of
    it withdrawn; a lease of it not offered to its client again and its renewal NAKed
    (dnsmasq's "address not available"), so the client moves; given back when the host lets
    go of it. Before, only the addresses known at start were reserved."""
    p = LeasePool("192.0.2.100", "192.0.2.104", lease_seconds=3600, decline_seconds=600,
                  offer_seconds=60, reserved=["192.0.2.1"])
    leased = p.request(A, "192.0.2.100", T0)
    assert leased is not None
    assert p.offer(B, T0) == "192.0.2.101"
    p.release(C, "192.0.2.102")  # nothing: C holds nothing
    # .100 (A's lease), .101 (B's offer) and .103 become this host's; .1 is outside the pool.
    held = p.reserve_host(["192.0.2.1", "192.0.2.100", "192.0.2.101", "192.0.2.103"])
    assert held == [leased]
    assert p.size == 2
    assert not p.in_pool("192.0.2.100") and not p.in_pool("192.0.2.103")
    assert p.offer(B, T0 + 1) == "192.0.2.102"  # its offer of .101 withdrawn
    assert p.request(A, "192.0.2.100", T0 + 2) is None  # a renewal: NAK
    assert p.offer(A, T0 + 3) == "192.0.2.104"  # another address, not its lease's
    assert p.request(A, "192.0.2.104", T0 + 4, selecting=True) is not None
    assert p.offer(C, T0 + 5) is None  # .102 offered to B, .104 A's: nothing else
    assert p.reserve_host(["192.0.2.1", "192.0.2.100", "192.0.2.101", "192.0.2.103"]) == []
    # .101 and .103 let go of: offered again, the lowest first.
    assert p.reserve_host(["192.0.2.100"]) == []
    assert p.offer(C, T0 + 6) == "192.0.2.101"
    assert p.in_pool("192.0.2.103") and p.size == 4


def test_an_address_given_back_then_made_the_hosts_is_not_offered() -> None:
    """An address among the pool's free candidates (released) that becomes the host's."""
    p = pool()
    assert p.request(A, "192.0.2.100", T0) is not None
    p.release(A, "192.0.2.100")
    p.reserve_host(["192.0.2.100"])
    assert p.offer(B, T0 + 1) == "192.0.2.101"


def test_renew_extends_lease() -> None:
    p = pool()
    p.offer(A, T0)
    p.request(A, "192.0.2.100", T0, selecting=True)
    renewed = p.request(A, "192.0.2.100", T0 + 1800)
    assert renewed is not None and renewed.expires == T0 + 1800 + 3600


def test_selecting_wrong_address_is_nak() -> None:
    p = pool()
    p.offer(A, T0)
    assert p.request(A, "192.0.2.101", T0, selecting=True) is None


def test_request_for_someone_elses_address_is_nak() -> None:
    p = pool()
    p.offer(A, T0)
    p.request(A, "192.0.2.100", T0, selecting=True)
    assert p.request(B, "192.0.2.100", T0) is None
    assert p.request(B, "192.0.2.150", T0) is None  # outside the pool


def test_expiry_frees_the_address() -> None:
    p = pool()
    p.offer(A, T0)
    p.request(A, "192.0.2.100", T0, selecting=True)
    assert p.expire(T0 + 3599).delete == ()
    changes = p.expire(T0 + 3600)
    assert changes.delete == (A,)
    assert p.lease(A) is None
    assert p.offer(B, T0 + 3601) == "192.0.2.100"


def test_offers_expire() -> None:
    p = pool()
    for mac in (A, B, C):
        assert p.offer(mac, T0) is not None
    assert p.offer("52:54:00:00:00:0d", T0 + 30) is None  # exhausted while offers are held
    assert p.offer("52:54:00:00:00:0d", T0 + 61) == "192.0.2.100"


def test_decline_marks_address_bad_for_a_while() -> None:
    p = pool()
    p.offer(A, T0)
    p.request(A, "192.0.2.100", T0, selecting=True)
    changes = p.decline(A, "192.0.2.100", T0 + 1)
    assert changes is not None and changes.delete == (A,)
    assert p.declined("192.0.2.100", T0 + 2)
    assert p.offer(A, T0 + 2) == "192.0.2.101"
    assert p.request(B, "192.0.2.100", T0 + 3) is None
    p.expire(T0 + 601)
    assert not p.declined("192.0.2.100", T0 + 601)


def test_a_decline_counts_only_from_the_client_given_that_address() -> None:
    """RFC 2131 §4.3.3: a DECLINE names the address this server offered or leased to that
    client. One from another MAC (any host on the link) marked any pool address bad: one
    another client holds (its renewal then NAKed), or each free one in turn. Refused now,
    nothing marked; the holder's own is honoured, for an offer as for a lease."""
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    assert p.request(A, "192.0.2.100", T0, selecting=True) is not None
    for ip in ("192.0.2.100", "192.0.2.101", "192.0.2.102"):  # A's lease, free ones
        assert p.decline(B, ip, T0 + 1) is None
        assert not p.declined(ip, T0 + 2)
    assert p.request(A, "192.0.2.100", T0 + 3) is not None  # A renews
    assert p.offer(B, T0 + 3) == "192.0.2.101"
    assert p.decline(B, "192.0.2.101", T0 + 4) == Changes()  # its offer: honoured
    assert p.declined("192.0.2.101", T0 + 5)
    assert p.decline(A, "192.0.2.100", T0 + 6) == Changes(delete=(A,))
    assert p.declined("192.0.2.100", T0 + 7)


def test_release() -> None:
    p = pool()
    p.offer(A, T0)
    p.request(A, "192.0.2.100", T0, selecting=True)
    assert p.release(B, "192.0.2.100").delete == ()  # not B's
    assert p.release(A, "192.0.2.101").delete == ()  # not that address
    assert p.release(A, "192.0.2.100").delete == (A,)
    assert p.lease(A) is None


def test_fixed_address_wins_even_outside_pool() -> None:
    p = pool()
    assert p.offer(A, T0, fixed="192.0.2.50") == "192.0.2.50"
    lease = p.request(A, "192.0.2.50", T0, fixed="192.0.2.50", selecting=True)
    assert lease is not None and lease.ipv4 == "192.0.2.50"
    # A client holding a pool address is moved to its fixed address: NAK, then rediscover.
    p.offer(B, T0)
    p.request(B, "192.0.2.100", T0, selecting=True)
    assert p.request(B, "192.0.2.100", T0 + 10, fixed="192.0.2.60") is None


def test_a_fixed_address_of_the_host_the_router_or_another_client_is_refused() -> None:
    """dnsmasq's "not using configured address": the server's and the router's addresses
    (in the pool or not), one leased or offered to another live client, one declined."""
    p = pool(reserved=["192.0.2.1"])  # the router (dhcp.router) or an advertised address
    p.reserve_host(["192.0.2.10", "198.51.100.10", "192.0.2.101"])
    for own in ("192.0.2.1", "192.0.2.10", "198.51.100.10", "192.0.2.101"):
        assert "in use by this server" in (p.fixed_refused(A, own, T0) or ""), own
    assert p.fixed_refused(A, "192.0.2.50", T0) is None
    assert p.offer(A, T0, fixed="192.0.2.50") == "192.0.2.50"
    assert p.fixed_refused(B, "192.0.2.50", T0) == f"it is offered to {A}"
    assert p.fixed_refused(A, "192.0.2.50", T0) is None  # its own
    p.request(A, "192.0.2.50", T0, fixed="192.0.2.50", selecting=True)
    assert p.fixed_refused(B, "192.0.2.50", T0) == f"it is leased to {A}"
    assert p.fixed_refused(B, "192.0.2.50", T0 + 3601) is None  # A's lease ran out
    p.reserve_host(["192.0.2.10"])  # 198.51.100.10 let go of
    assert p.fixed_refused(A, "198.51.100.10", T0) is None


def test_an_address_that_is_a_machines_fixed_ipv4_is_never_leased_to_another() -> None:
    """dnsmasq never offers a dynamic address a dhcp-host reserves: a machine's fixed_ipv4
    inside the pool is skipped, as it is set, changed or dropped (the view's index, asked of
    the candidate only); a lease of an address made fixed later is not offered to its client
    again and its renewal is NAKed, so the client moves and the machine gets its address."""
    fixed = {"192.0.2.100": "m1"}  # the view: fixed_ipv4 -> machine id
    p = pool(reserved_fixed=fixed.get)
    assert p.offer(A, T0) == "192.0.2.101"
    assert p.offer(B, T0, requested="192.0.2.100") == "192.0.2.102"  # not even asked for
    assert p.request(C, "192.0.2.100", T0) is None  # nor taken (init-reboot): NAK
    assert p.offer(C, T0) is None  # .101 and .102 offered: the pool is full
    del fixed["192.0.2.100"]  # the machine deleted, or given another address
    assert p.offer(C, T0) == "192.0.2.100"
    lease = p.request(C, "192.0.2.100", T0, selecting=True)
    assert lease is not None
    fixed["192.0.2.100"] = "m2"  # another machine given C's address as its fixed one
    assert p.request(C, "192.0.2.100", T0 + 30) is None  # its renewal: NAK
    assert p.offer(C, T0 + 31) is None  # not its lease again (.101, .102 offered)
    assert p.fixed_refused(A, "192.0.2.100", T0 + 31) == f"it is leased to {C}"
    p.not_selected(A)  # A took another server's offer
    assert p.offer(C, T0 + 32) == "192.0.2.101"  # C moves ...
    assert p.request(C, "192.0.2.101", T0 + 32, selecting=True) is not None
    # ... and the machine's own address is free for it.
    assert p.fixed_refused(A, "192.0.2.100", T0 + 33) is None
    assert p.offer(A, T0 + 33, fixed="192.0.2.100") == "192.0.2.100"


def test_exhaustion() -> None:
    p = pool()
    for i, mac in enumerate((A, B, C)):
        ip = p.offer(mac, T0)
        assert ip is not None
        assert p.request(mac, ip, T0, selecting=True) is not None, i
    assert p.offer("52:54:00:00:00:0d", T0 + 100) is None


def test_load_drops_expired() -> None:
    p = pool()
    p.load([Lease(A, "192.0.2.101", T0 + 10), Lease(B, "192.0.2.102", T0 - 1)], T0)
    assert p.lease(A) is not None and p.lease(B) is None
    assert p.offer(C, T0) == "192.0.2.100"
    assert p.offer(A, T0) == "192.0.2.101"


# -- the conversation through DhcpServer.handle (no sockets) ----------------------------------

SERVER = "192.0.2.1"
SETTINGS = DhcpSettings(
    mode="authoritative", pool_start="192.0.2.100", pool_end="192.0.2.109",
    netmask="255.255.255.0", router="192.0.2.1", dns_servers=("192.0.2.53",),
    domain="edge.example", lease_seconds=3600, decline_seconds=600,
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def make_server(store: LeaseStore, clock: Clock,
                      decider: TableDecider | None = None) -> DhcpServer:
    server = DhcpServer(SETTINGS, decider or TableDecider(), store, interfaces=None,
                        advertise=SERVER, clock=clock)
    await server.load_pool([SERVER])
    return server


def message(mtype: MessageType, mac: bytes, **kw: object) -> bytes:
    opts = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((mtype,)))]
    for code, value in kw.pop("opts", {}).items():  # type: ignore[attr-defined]
        opts.append(dhcp.Option(code, value))
    return dhcp.encode(dhcp.Packet(op=Op.REQUEST, xid=0x1234, chaddr=mac, options=tuple(opts),
                                   **kw))  # type: ignore[arg-type]


async def ask(server: DhcpServer, raw: bytes, peer: tuple[str, int] = ("0.0.0.0", 68)
              ) -> list[tuple[dhcp.Packet, tuple[str, int]]]:
    replies = await server.handle(raw, peer, server_ip=SERVER, pxe_port=False)
    return [(dhcp.parse(data), dest) for data, dest in replies]


MAC = bytes.fromhex("52540000000a")


def ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


async def test_discover_request_ack_and_persist() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    server = await make_server(store, clock)
    [(offer, dest)] = await ask(server, message(MessageType.DISCOVER, MAC, flags=0x8000))
    assert offer.message_type == MessageType.OFFER and offer.yiaddr == "192.0.2.100"
    assert dest == ("255.255.255.255", 68)
    assert offer.option(Opt.SUBNET_MASK) == ip("255.255.255.0")
    assert offer.option(Opt.ROUTER) == ip("192.0.2.1")
    assert offer.option(Opt.DNS_SERVERS) == ip("192.0.2.53")
    assert offer.option(Opt.DOMAIN_NAME) == b"edge.example"
    assert offer.option(Opt.LEASE_TIME) == (3600).to_bytes(4, "big")
    assert offer.option(Opt.SERVER_ID) == ip(SERVER)
    assert offer.file_name is None and offer.siaddr == "0.0.0.0"  # not a boot client
    raw = message(MessageType.REQUEST, MAC, opts={Opt.SERVER_ID: ip(SERVER),
                                                  Opt.REQUESTED_IP: ip("192.0.2.100")})
    [(ack, _)] = await ask(server, raw)
    assert ack.message_type == MessageType.ACK and ack.yiaddr == "192.0.2.100"
    await server.flush_leases()
    assert store.leases[A] == Lease(A, "192.0.2.100", T0 + 3600)


async def test_request_for_other_server_is_silent() -> None:
    server = await make_server(MemoryLeaseStore(), Clock())
    await ask(server, message(MessageType.DISCOVER, MAC))
    raw = message(MessageType.REQUEST, MAC, opts={Opt.SERVER_ID: ip("192.0.2.254"),
                                                  Opt.REQUESTED_IP: ip("192.0.2.100")})
    assert await ask(server, raw) == []


async def test_nak_for_wrong_address_is_broadcast() -> None:
    server = await make_server(MemoryLeaseStore(), Clock())
    raw = message(MessageType.REQUEST, MAC, opts={Opt.REQUESTED_IP: ip("198.51.100.9")})
    [(nak, dest)] = await ask(server, raw)
    assert nak.message_type == MessageType.NAK and nak.yiaddr == "0.0.0.0"
    assert dest == ("255.255.255.255", 68)
    assert not nak.has_option(Opt.LEASE_TIME)


async def test_restart_reloads_leases_from_store() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    first = await make_server(store, clock)
    await ask(first, message(MessageType.DISCOVER, MAC))
    await ask(first, message(MessageType.REQUEST, MAC, opts={
        Opt.SERVER_ID: ip(SERVER), Opt.REQUESTED_IP: ip("192.0.2.100")}))
    await first.flush_leases()
    clock.now += 100
    second = await make_server(store, clock)
    other = bytes.fromhex("52540000000b")
    [(offer, _)] = await ask(second, message(MessageType.DISCOVER, other))
    assert offer.yiaddr == "192.0.2.101"  # .100 is still A's after the restart
    # INIT-REBOOT: A asks for its old address without a server id and gets it.
    [(ack, _)] = await ask(second, message(MessageType.REQUEST, MAC, opts={
        Opt.REQUESTED_IP: ip("192.0.2.100")}))
    assert ack.message_type == MessageType.ACK and ack.yiaddr == "192.0.2.100"


async def test_decline_release_and_inform() -> None:
    store, clock = MemoryLeaseStore(), Clock()
    server = await make_server(store, clock)
    await ask(server, message(MessageType.DISCOVER, MAC))
    await ask(server, message(MessageType.REQUEST, MAC, opts={
        Opt.SERVER_ID: ip(SERVER), Opt.REQUESTED_IP: ip("192.0.2.100")}))
    assert await ask(server, message(MessageType.DECLINE, MAC, opts={
        Opt.SERVER_ID: ip(SERVER), Opt.REQUESTED_IP: ip("192.0.2.100")})) == []
    await server.flush_leases()
    assert A not in store.leases
    [(offer, _)] = await ask(server, message(MessageType.DISCOVER, MAC))
    assert offer.yiaddr == "192.0.2.101"  # .100 is marked bad
    await ask(server, message(MessageType.REQUEST, MAC, opts={
        Opt.SERVER_ID: ip(SERVER), Opt.REQUESTED_IP: ip("192.0.2.101")}))
    assert await ask(server, message(MessageType.RELEASE, MAC, ciaddr="192.0.2.101",
                                     opts={Opt.SERVER_ID: ip(SERVER)})) == []
    await server.flush_leases()
    assert A not in store.leases
    # INFORM: configuration only, no address, no lease time, unicast to ciaddr (§4.3.5).
    [(ack, dest)] = await ask(server, message(MessageType.INFORM, MAC, ciaddr="192.0.2.77"),
                              peer=("192.0.2.77", 68))
    assert ack.message_type == MessageType.ACK and ack.yiaddr == "0.0.0.0"
    assert not ack.has_option(Opt.LEASE_TIME) and ack.option(Opt.ROUTER) == ip("192.0.2.1")
    assert dest == ("192.0.2.77", 68)


async def test_fixed_address_from_the_decider() -> None:
    store = MemoryLeaseStore()
    server = await make_server(store, Clock(), TableDecider(fixed={A: "192.0.2.20"}))
    [(offer, _)] = await ask(server, message(MessageType.DISCOVER, MAC))
    assert offer.yiaddr == "192.0.2.20"


async def test_a_fixed_address_leased_to_another_nic_of_the_same_machine_is_given() -> None:
    """A machine with two NICs (A, B) and one fixed_ipv4: booted from A, then from B (A's
    PXE timed out, the firmware's boot order, a NIC swapped for its twin). B was refused the
    address as "leased to A" (s39-net's refusal) and installed with a pool address, not its
    own. dnsmasq refuses a configured address leased to another MAC only when that MAC is
    not in the same dhcp-host (rfc2131.c, config_has_mac); another machine's (C) still is."""
    fixed = "192.0.2.20"
    store = MemoryLeaseStore()
    server = await make_server(store, Clock(), TableDecider(
        fixed={A: fixed, B: fixed, C: fixed}, machines=((A, B),)))
    for mac in (A, B):
        raw = bytes.fromhex(mac.replace(":", ""))
        [(offer, _)] = await ask(server, message(MessageType.DISCOVER, raw))
        assert offer.yiaddr == fixed, mac
        [(ack, _)] = await ask(server, message(MessageType.REQUEST, raw, opts={
            Opt.SERVER_ID: ip(SERVER), Opt.REQUESTED_IP: ip(fixed)}))
        assert ack.message_type == MessageType.ACK and ack.yiaddr == fixed, mac
    [(offer, _)] = await ask(server, message(MessageType.DISCOVER, bytes.fromhex(
        C.replace(":", ""))))
    assert offer.yiaddr == "192.0.2.100"  # leased to B, of another machine
    await server.flush_leases()
    assert store.leases[B].ipv4 == fixed and A not in store.leases  # B's ended A's


def test_a_fixed_address_has_one_holder_the_newest_nic_offered_it() -> None:
    """The pool's rule (LeasePool.moved_from): a sibling NIC offered the machine's fixed
    address takes it, the other NIC's lease ending in the same step; that NIC's REQUEST
    for it (renewing, rebinding, INIT-REBOOT: no offer) is NAKed, and once offered it
    again (a DISCOVER), it takes it back. Never both leased."""
    fixed = "192.0.2.20"
    p = pool()
    assert p.offer(A, T0, fixed=fixed) == fixed
    assert p.request(A, fixed, T0, fixed=fixed, selecting=True) is not None
    assert p.offer(B, T0 + 1, fixed=fixed) == fixed  # offered while A's lease is live
    assert p.request(B, fixed, T0 + 2, fixed=fixed) is not None  # no server id: offered
    assert p.lease(A) is None and p.holder(fixed) == B
    assert p.request(A, fixed, T0 + 3, fixed=fixed) is None  # A renewing: NAK
    assert p.request(A, fixed, T0 + 4, fixed=fixed, selecting=True) is None  # not offered
    assert p.request(B, fixed, T0 + 5, fixed=fixed) is not None  # the holder renews
    assert p.offer(A, T0 + 6, fixed=fixed) == fixed
    assert p.request(A, fixed, T0 + 7, fixed=fixed, selecting=True) is not None
    assert p.lease(B) is None and [lease.mac for lease in p.leases()] == [A]
    assert p.request(B, fixed, T0 + 8, fixed=fixed) is None
    # Once the holder's lease has run out, any NIC of the machine may ask for it again.
    assert p.request(B, fixed, T0 + 7 + 3600, fixed=fixed) is not None


async def test_pool_exhaustion_means_no_offer() -> None:
    # Exhausted by leases (by offers alone, a DISCOVER is offered one of theirs since
    # s46-attack: test_a_client_is_given_an_address_after_discovers_alone_took_every_one).
    server = await make_server(MemoryLeaseStore(), Clock())
    for i in range(10):
        mac = bytes.fromhex("5254000001") + bytes((i,))
        [(offer, _)] = await ask(server, message(MessageType.DISCOVER, mac))
        assert offer.yiaddr == f"192.0.2.{100 + i}"
        [(ack, _)] = await ask(server, select(mac, offer.yiaddr))
        assert ack.message_type == MessageType.ACK
    assert await ask(server, message(MessageType.DISCOVER, bytes.fromhex("5254000002ff"))) == []


def uboot_discover() -> bytes:
    for d in dhcp_datagrams(capture("uboot-arm64")):
        if d.frame == 6:
            return d.payload
    raise LookupError


@pytest.mark.parametrize("frame_payload", [uboot_discover()])
async def test_uboot_gets_address_next_server_and_file_in_one_answer(
    frame_payload: bytes,
) -> None:
    server = await make_server(MemoryLeaseStore(), Clock())
    [(offer, _dest)] = await ask(server, frame_payload)
    assert offer.message_type == MessageType.OFFER and offer.yiaddr == "192.0.2.100"
    assert offer.siaddr == SERVER  # next-server: U-Boot TFTPs from here
    assert offer.file_name == "boot.scr.uimg"
    assert offer.option(Opt.BOOTFILE_NAME) == b"boot.scr.uimg\0"
    assert offer.option(Opt.SUBNET_MASK) is not None and offer.option(Opt.ROUTER) is not None
    assert not offer.has_option(Opt.VENDOR_SPECIFIC)
    assert len(dhcp.encode(offer)) >= 300


async def test_uefi_http_authoritative_answer_echoes_httpclient() -> None:
    payload = next(d.payload for d in dhcp_datagrams(capture("uefi-httpboot"))
                   if d.frame == 7)
    server = await make_server(MemoryLeaseStore(), Clock())
    [(offer, _)] = await ask(server, payload)
    assert offer.yiaddr == "192.0.2.100"
    assert offer.option(Opt.VENDOR_CLASS) == b"HTTPClient"
    assert offer.file_name == "http://192.0.2.1:8080/assets/ipxe.efi"


# -- cost whatever the pool's size: a flood of made-up MACs (s35-attack) ----------------------


def _counting(p: LeasePool) -> list[int]:
    """Counts the addresses ``p`` looks at (each is one _free_for)."""
    looked = [0]
    free_for = p._free_for

    def counted(ip: str, mac: str, now: float, **kw: str | None) -> bool:
        looked[0] += 1
        return free_for(ip, mac, now, **kw)

    p._free_for = counted  # type: ignore[method-assign]
    return looked


def _mac(i: int) -> str:
    return f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"


def test_discovers_from_many_macs_look_at_few_addresses_however_full_the_pool() -> None:
    # Before, each DISCOVER scanned the pool from its start: filling 4,094 addresses looked
    # at 8.4 million, and each DISCOVER on the full pool at all 4,094 (14 ms of the event
    # loop: a few dozen made-up MACs a second held it).
    p = LeasePool("10.0.0.1", "10.0.15.254", lease_seconds=3600, decline_seconds=600,
                  offer_seconds=60)
    looked = _counting(p)
    for i in range(p.size):
        p.expire(T0)
        assert p.offer(_mac(i), T0) is not None
    assert looked[0] <= 2 * p.size
    looked[0] = 0
    for i in range(p.size, p.size + 100):
        p.expire(T0 + 1)
        assert p.offer(_mac(i), T0 + 1) is None
    assert looked[0] <= 100
    # Given back (a release) or run out: found at once, the lowest first.
    p.request(_mac(7), "10.0.0.8", T0 + 2, selecting=True)
    p.release(_mac(7), "10.0.0.8")
    looked[0] = 0
    assert p.offer("52:54:00:00:00:01", T0 + 3) == "10.0.0.8"
    assert p.expire(T0 + 61) == Changes()
    assert p.offer("52:54:00:00:00:02", T0 + 61) == "10.0.0.1"
    assert looked[0] <= 4


def test_renewals_do_not_grow_the_pools_memory() -> None:
    p = pool()
    p.offer(A, T0)
    for i in range(10_000):
        assert p.request(A, "192.0.2.100", T0 + i) is not None
    assert len(p._ends) <= 64 + 2 * 1


def test_a_random_conversation_gets_the_lowest_address_no_live_client_holds() -> None:
    # The pool against a model of what it promised, expired before each packet as the DHCP
    # server does: every address it offers is the client's own or the lowest one no other
    # client holds and not declined, None only when there is none, and expire() names
    # exactly the leases that ran out.
    import random

    rng = random.Random(35)
    p = LeasePool("192.0.2.10", "192.0.2.17", lease_seconds=50, decline_seconds=30,
                  offer_seconds=10, reserved=["192.0.2.12"])
    addresses = [f"192.0.2.{i}" for i in range(10, 18) if i != 12]
    offers: dict[str, tuple[str, float]] = {}
    leases: dict[str, tuple[str, float]] = {}
    declined: dict[str, float] = {}
    macs = [_mac(i) for i in range(12)]
    now = T0

    def held(ip: str, by: str) -> bool:
        return (ip in declined or any(m != by and i == ip for m, (i, _t) in offers.items())
                or any(m != by and i == ip for m, (i, _t) in leases.items()))

    for _ in range(3000):
        now += rng.choice((0.0, 0.5, 1.0, 3.0, 11.0))
        ran_out = {m for m, (_i, t) in leases.items() if t <= now}
        assert set(p.expire(now).delete) == ran_out
        for held_by in (offers, leases):
            for m in [m for m, (_i, t) in held_by.items() if t <= now]:
                del held_by[m]
        for ip in [ip for ip, t in declined.items() if t <= now]:
            del declined[ip]
        mac = rng.choice(macs)
        action = rng.random()
        if action < 0.45:
            mine = leases.get(mac) or offers.get(mac)
            ip = p.offer(mac, now)
            if mine is not None and not held(mine[0], mac):
                assert ip == mine[0]
            else:
                free = [a for a in addresses if not held(a, mac)]
                assert ip == (free[0] if free else None)
            if ip is not None:
                offers[mac] = (ip, now + 10)
        elif action < 0.75 and mac in offers:
            ip = offers[mac][0]
            lease = p.request(mac, ip, now, selecting=True)
            assert lease is not None
            del offers[mac]
            leases[mac] = (ip, now + 50)
        elif action < 0.85 and mac in leases:
            p.release(mac, leases.pop(mac)[0])
        elif action < 0.95 and (mac in offers or mac in leases):
            ip = (offers.get(mac) or leases[mac])[0]
            if p.decline(mac, ip, now) is not None:
                declined[ip] = now + 30
                offers.pop(mac, None)
                if leases.get(mac, ("", 0.0))[0] == ip:
                    del leases[mac]


# -- several servers, one inventory: address claims (issue 13) --------------------------------


def test_an_address_held_elsewhere_is_not_offered_until_then() -> None:
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    p.held_elsewhere("192.0.2.100", T0 + 60)
    assert p.offer(A, T0) == "192.0.2.101"  # our offer of it is gone too
    assert p.offer(B, T0 + 61) == "192.0.2.100"  # asked again after that


def test_discovers_alone_leave_a_full_pools_offered_addresses_to_the_first_request() -> None:
    # Offers held every address for offer_seconds whoever asked: DISCOVERs with made-up
    # MACs left C no offer for a minute (s46-attack). The oldest offer's address is offered
    # to C too, and whichever REQUESTs it first gets it.
    p = pool()
    assert [p.offer(m, T0 + i) for i, m in enumerate((A, B, "02:00:00:00:00:01"))] == [
        "192.0.2.100", "192.0.2.101", "192.0.2.102"]
    assert p.offer(C, T0 + 5) is None  # no free address
    assert p.shared_offer(C, T0 + 5) == "192.0.2.100"  # A's, the oldest
    assert p.shared_offer(C, T0 + 5) == "192.0.2.100"  # nothing kept of it
    lease = p.request(C, "192.0.2.100", T0 + 6, selecting=True)
    assert lease is not None and lease.ipv4 == "192.0.2.100"
    assert p.request(A, "192.0.2.100", T0 + 7, selecting=True) is None  # C's now: NAK
    assert p.shared_offer(A, T0 + 8) == "192.0.2.101"  # B's is the oldest offer left
    # A lease is never taken this way, nor an address declined since.
    assert p.request(B, "192.0.2.100", T0 + 9, selecting=True) is None
    assert p.offered_elsewhere("192.0.2.100", B, T0 + 9) is None
    # Offers that ran out are no one's: free again, offered as before.
    assert p.shared_offer(B, T0 + 100) is None
    assert p.offer(B, T0 + 100) == "192.0.2.101"
    # A pool held by leases alone has nothing to share.
    full = pool()
    for m in (A, B, "02:00:00:00:00:01"):
        ip = full.offer(m, T0)
        assert ip is not None and full.request(m, ip, T0, selecting=True) is not None
    assert full.offer(C, T0) is None and full.shared_offer(C, T0) is None


def test_a_request_takes_another_clients_offer_only_when_no_address_is_free() -> None:
    # s46's shared offers let a selecting REQUEST take an address offered to another client
    # whatever the pool held: a host that read A's broadcast OFFER (iPXE sets the broadcast
    # flag) and REQUESTed its address from a made-up MAC was ACKed, A NAKed; each address
    # A was offered next went the same way, while free addresses remained (s47-attack).
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    assert p.offered_elsewhere("192.0.2.100", B, T0 + 1) is None
    assert p.request(B, "192.0.2.100", T0 + 1, selecting=True) is None  # NAK
    lease = p.request(A, "192.0.2.100", T0 + 2, selecting=True)
    assert lease is not None and lease.ipv4 == "192.0.2.100"
    # Nothing was taken from the free addresses by the look: they are offered in order.
    assert p.offer(B, T0 + 3) == "192.0.2.101"
    assert p.offer(C, T0 + 3) == "192.0.2.102"
    # A full pool's offers are still the first requester's (shared_offer's addresses).
    assert p.offer("02:00:00:00:00:01", T0 + 4) is None
    assert p.shared_offer("02:00:00:00:00:01", T0 + 4) == "192.0.2.101"
    taken = p.request("02:00:00:00:00:01", "192.0.2.101", T0 + 5, selecting=True)
    assert taken is not None and taken.ipv4 == "192.0.2.101"


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def shared(request: pytest.FixtureRequest,
                 tmp_path: Path) -> AsyncIterator[tuple[Store, DhcpServer, DhcpServer]]:
    """Two authoritative DHCP servers for one link, each with its own pool, one inventory."""
    async with contextlib.AsyncExitStack() as stack:
        stores = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack)
        clock = Clock()
        servers = [await make_server(s, clock) for s in stores]
        yield stores[0], servers[0], servers[1]


def discover(mac: bytes) -> bytes:
    return message(MessageType.DISCOVER, mac)


def select(mac: bytes, address: str) -> bytes:
    return message(MessageType.REQUEST, mac, opts={Opt.SERVER_ID: ip(SERVER),
                                                   Opt.REQUESTED_IP: ip(address)})


async def test_two_servers_never_hand_out_one_address(
        shared: tuple[Store, DhcpServer, DhcpServer]) -> None:
    store, a, b = shared
    first, second = bytes.fromhex("525400000101"), bytes.fromhex("525400000102")
    # A binds .100; B's pool has not heard of it, the inventory has.
    [(offer, _)] = await ask(a, discover(first))
    [(ack, _)] = await ask(a, select(first, offer.yiaddr))
    assert (ack.message_type, ack.yiaddr) == (MessageType.ACK, "192.0.2.100")
    [(offer, _)] = await ask(b, discover(second))
    assert offer.yiaddr == "192.0.2.101"  # .100 refused by the inventory: the next one
    [(ack, _)] = await ask(b, select(second, "192.0.2.101"))
    assert ack.message_type == MessageType.ACK
    # INIT-REBOOT of a third client asking B for A's address: NAK, not a second holder.
    third = bytes.fromhex("525400000103")
    [(nak, _)] = await ask(b, message(MessageType.REQUEST, third, opts={
        Opt.REQUESTED_IP: ip("192.0.2.100")}))
    assert nak.message_type == MessageType.NAK
    await a.flush_leases()
    await b.flush_leases()
    leases = await store.list_leases()
    assert sorted((lease.mac, lease.ipv4) for lease in leases) == [
        ("52:54:00:00:01:01", "192.0.2.100"), ("52:54:00:00:01:02", "192.0.2.101")]


async def test_concurrent_discovers_through_two_servers_get_distinct_offers(
        shared: tuple[Store, DhcpServer, DhcpServer]) -> None:
    store, a, b = shared
    clients = [bytes.fromhex(f"5254000002{i:02x}") for i in range(8)]
    answers = await asyncio.gather(*(ask(a if i % 2 else b, discover(c))
                                     for i, c in enumerate(clients)))
    offered = [offer.yiaddr for [(offer, _)] in answers]
    assert len(set(offered)) == len(offered) == 8
    acks = await asyncio.gather(*(ask(a if i % 2 else b, select(c, offered[i]))
                                  for i, c in enumerate(clients)))
    assert all(ack.message_type == MessageType.ACK for [(ack, _)] in acks)
    addresses = [lease.ipv4 for lease in await store.list_leases()]
    assert len(addresses) == len(set(addresses)) == 8


async def test_a_client_is_given_an_address_after_discovers_alone_took_every_one(
        shared: tuple[Store, DhcpServer, DhcpServer]) -> None:
    """DISCOVERs from ten made-up MACs (never a REQUEST) held the ten addresses of the pool
    for a minute, each claimed in the inventory: the next real client got no offer (s46-
    attack). Now it is offered the oldest offer's address and its REQUEST takes it over,
    the sprayed MAC's claim of it gone from the inventory; the sprayed MAC's own REQUEST of
    it is NAKed, and the other nine claims stay (a lease of another server is never taken)."""
    store, a, _b = shared
    for i in range(10):
        [(offer, _)] = await ask(a, discover(bytes.fromhex(f"0200000046{i:02x}")))
        assert offer.yiaddr == f"192.0.2.{100 + i}"
    real = bytes.fromhex("525400004601")
    [(offer, _)] = await ask(a, discover(real))
    assert (offer.message_type, offer.yiaddr) == (MessageType.OFFER, "192.0.2.100")
    [(ack, _)] = await ask(a, select(real, offer.yiaddr))
    assert (ack.message_type, ack.yiaddr) == (MessageType.ACK, "192.0.2.100")
    [(nak, _)] = await ask(a, select(bytes.fromhex("020000004600"), "192.0.2.100"))
    assert nak.message_type == MessageType.NAK
    await a.flush_leases()
    held = {lease.ipv4: lease.mac for lease in await store.list_leases()}
    assert held["192.0.2.100"] == "52:54:00:00:46:01"
    assert len(held) == 10 and "02:00:00:00:46:00" not in held.values()


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def inventory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """One inventory of each kind (an authoritative server's leases)."""
    async with contextlib.AsyncExitStack() as stack:
        [store] = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack,
                                                   count=1)
        yield store


class Snapshots:
    """A LeaseStore over ``store`` that reads the address's holders after every write: what
    a reader of the inventory (another server, the dashboard) can see between two writes."""

    def __init__(self, store: Store, address: str) -> None:
        self.store, self.address = store, address
        self.seen: list[list[str]] = []

    async def list_leases(self) -> list[Lease]:
        return await self.store.list_leases()

    async def _look(self) -> None:
        self.seen.append([lease.mac for lease in await self.store.list_leases()
                          if lease.ipv4 == self.address])

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        if ending is None:  # as a server that never ends another's lease in its write calls it
            await self.store.put_lease(lease, now=now)
        else:
            await self.store.put_lease(lease, now=now, ending=ending)
        await self._look()

    async def delete_lease(self, mac: str) -> None:
        await self.store.delete_lease(mac)
        await self._look()


async def test_a_fixed_address_moved_to_another_nic_leaves_one_holder(
        inventory: Store) -> None:
    """A two-NIC machine (A, B) with one fixed_ipv4, or a host that sent its UUID and was
    attached to it as B (s46-attack #4): B offered the address and ACKed while A's lease of
    it is live. A's lease ends in that write; A's renewal (RENEWING, then REBINDING and
    INIT-REBOOT: no server id, ciaddr or option 50) is NAKed, not ACKed beside B's (two
    hosts answering ARP for one address); A then discovers, is offered it and takes it back,
    ending B's: one holder at a time, the newest asker, as dnsmasq's dhcp-host with several
    MACs. Each move is told to the decider (the machine's event) naming both NICs."""
    fixed = "192.0.2.20"
    decider = TableDecider(fixed={A: fixed, B: fixed}, machines=((A, B),))
    snapshots = Snapshots(inventory, fixed)
    server = await make_server(snapshots, Clock(), decider)
    a, b = bytes.fromhex(A.replace(":", "")), bytes.fromhex(B.replace(":", ""))
    for raw in (a, b):
        [(offer, _)] = await ask(server, discover(raw))
        assert offer.yiaddr == fixed
        [(ack, _)] = await ask(server, select(raw, fixed))
        assert (ack.message_type, ack.yiaddr) == (MessageType.ACK, fixed)
    await server.flush_leases()
    assert [(lease.mac, lease.ipv4) for lease in await inventory.list_leases()] == [(B, fixed)]
    renewing = message(MessageType.REQUEST, a, ciaddr=fixed)
    rebooting = message(MessageType.REQUEST, a, opts={Opt.REQUESTED_IP: ip(fixed)})
    for raw in (renewing, rebooting):
        [(nak, _)] = await ask(server, raw, peer=(fixed, 68))
        assert nak.message_type == MessageType.NAK
    await server.flush_leases()
    assert [(lease.mac, lease.ipv4) for lease in await inventory.list_leases()] == [(B, fixed)]
    # B renews: still its own. A discovers again and takes it back: B's renewal is NAKed.
    [(ack, _)] = await ask(server, message(MessageType.REQUEST, b, ciaddr=fixed),
                           peer=(fixed, 68))
    assert ack.message_type == MessageType.ACK
    [(offer, _)] = await ask(server, discover(a))
    assert offer.yiaddr == fixed  # offered while B's lease is live: the ACK decides
    [(ack, _)] = await ask(server, select(a, fixed))
    assert ack.message_type == MessageType.ACK
    [(nak, _)] = await ask(server, message(MessageType.REQUEST, b, ciaddr=fixed),
                           peer=(fixed, 68))
    assert nak.message_type == MessageType.NAK
    assert decider.moves == [(A, B, fixed), (B, A, fixed)]
    await server.flush_leases()
    assert [(lease.mac, lease.ipv4) for lease in await inventory.list_leases()] == [(A, fixed)]
    # Each move was one write (put_lease's ``ending``): after every write the inventory
    # held the address for exactly one NIC, never for none in between (delete, then put).
    assert snapshots.seen and all(len(holders) == 1 for holders in snapshots.seen), \
        snapshots.seen
