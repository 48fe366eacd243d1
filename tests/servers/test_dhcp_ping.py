"""Authoritative DHCP with dhcp.ping_check, decided without sockets: which offers wait for a
ping and which never do (renewals, INIT-REBOOT, a client's own lease, fixed addresses, proxy
mode), what an address that answered becomes, and the bound on pings per DISCOVER. The
probe is a table (``Probe``); the real one, on real sockets and hosts, is tested in
test_ping.py and test_dhcp_ping_netns.py."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import replace

import pytest

from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import PINGS_PER_DISCOVER, DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from netboot.wire.rtnetlink import AddressMessage
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
from tests.test_leases import Clock

SERVER = "10.20.0.1"
LINK = "nbs0"
# 1,017 addresses: a storm of a thousand clients. No packet is sent anywhere (handle()).
SETTINGS = DhcpSettings(mode="authoritative", pool_start="10.20.0.10", pool_end="10.20.3.250",
                        netmask="255.255.252.0", lease_seconds=3600, decline_seconds=600,
                        ping_check=True)
POOL = [str(ipaddress.IPv4Address("10.20.0.10") + i) for i in range(1017)]


class Probe:
    """An AddressProbe answered from a table: ``in_use`` answer; ``forbidden``: asking at all
    fails the test (the request that asked raises out of handle())."""

    def __init__(self, in_use: set[str] | None = None) -> None:
        self.in_use = in_use or set()
        self.asked: list[str] = []
        self.forbidden = False
        self.interface: str | None = LINK  # the one every ping must name

    async def answers(self, ip: str, interface: str | None) -> bool | None:
        assert not self.forbidden, f"{ip} pinged"
        assert interface == self.interface, (ip, interface)
        self.asked.append(ip)
        return ip in self.in_use

    def close(self) -> None:
        pass


def _fixed(i: int) -> str:
    return str(ipaddress.IPv4Address("10.20.4.1") + i)  # each machine's own


def _mac(i: int) -> bytes:
    return bytes.fromhex("525400") + i.to_bytes(3, "big")


def _packet(mtype: MessageType, mac: bytes, *, requested: str | None = None,
            server_id: str | None = None, ciaddr: str = "0.0.0.0",
            vendor: bytes | None = None, giaddr: str = "0.0.0.0") -> bytes:
    options = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((mtype,)))]
    if requested is not None:
        options.append(dhcp.Option(Opt.REQUESTED_IP, ipaddress.IPv4Address(requested).packed))
    if server_id is not None:
        options.append(dhcp.Option(Opt.SERVER_ID, ipaddress.IPv4Address(server_id).packed))
    if vendor is not None:  # and BIOS (option 93: 0)
        options += [dhcp.Option(Opt.VENDOR_CLASS, vendor), dhcp.Option(Opt.CLIENT_ARCH, b"\0\0")]
    return dhcp.encode(dhcp.Packet(op=Op.REQUEST, xid=0x9140, chaddr=mac, ciaddr=ciaddr,
                                   giaddr=giaddr, hops=1 if giaddr != "0.0.0.0" else 0,
                                   flags=dhcp.BROADCAST_FLAG, options=tuple(options)),
                       pad_to=dhcp.MIN_PACKET_SIZE)


class Env:
    def __init__(self, probe: Probe, *, fixed: dict[str, str] | None = None,
                 settings: DhcpSettings = SETTINGS) -> None:
        self.probe, self.clock = probe, Clock()
        self.told: list[list[tuple[str, str]]] = []
        self.server = DhcpServer(settings, TableDecider(fixed=fixed), MemoryLeaseStore(),
                                 interfaces=[LINK], advertise=None, probe=False,
                                 clock=self.clock, pinger=probe, in_use_told=self.told.append)

    async def start(self) -> None:
        await self.server.load_pool([SERVER])
        # As start() does from the watcher's table: LINK is on the pool's network (and
        # relays from it answered).
        self.server._on_addresses((AddressMessage(True, 2, LINK, SERVER, 22),))

    async def ask(self, data: bytes) -> dhcp.Packet | None:
        replies = await self.server.handle(data, ("0.0.0.0", 68), server_ip=SERVER,
                                           pxe_port=False, interface=LINK)
        return dhcp.parse(replies[0][0]) if replies else None

    async def offered(self, mac: bytes, **kw: str) -> str | None:
        reply = await self.ask(_packet(MessageType.DISCOVER, mac, **kw))
        assert reply is None or reply.message_type == MessageType.OFFER
        return None if reply is None else reply.yiaddr


async def test_a_storm_of_renewals_and_fixed_addresses_waits_for_no_ping() -> None:
    """A thousand clients lease (each address pinged once, before its first offer); then,
    past the 30 s a quiet ping holds, a thousand DISCOVERs of clients holding a lease (a
    reboot), a thousand renewals, a thousand INIT-REBOOTs and a thousand DISCOVERs of
    machines with a fixed address: not one ping (dnsmasq pings neither lease->addr nor a
    dhcp-host address), each answered at once."""
    probe = Probe()
    fixed = {":".join(f"{b:02x}" for b in _mac(5000 + i)): _fixed(i) for i in range(1000)}
    env = Env(probe, fixed=fixed)
    await env.start()
    for i in range(1000):
        ip = await env.offered(_mac(i))
        assert ip == POOL[i]
        ack = await env.ask(_packet(MessageType.REQUEST, _mac(i), requested=ip,
                                    server_id=SERVER))
        assert ack is not None and ack.message_type == MessageType.ACK
    assert probe.asked == POOL[:1000]
    env.clock.now += 120
    probe.forbidden = True
    for i in range(1000):
        assert await env.offered(_mac(i)) == POOL[i]
    for i in range(1000):
        renewed = await env.ask(_packet(MessageType.REQUEST, _mac(i), ciaddr=POOL[i]))
        rebooted = await env.ask(_packet(MessageType.REQUEST, _mac(i), requested=POOL[i]))
        assert renewed is not None and renewed.message_type == MessageType.ACK
        assert rebooted is not None and rebooted.message_type == MessageType.ACK
    for i in range(1000):
        assert await env.offered(_mac(5000 + i)) == _fixed(i)


async def test_an_address_that_answers_is_skipped_remembered_and_told() -> None:
    """The pool's first address answers: the DISCOVER is offered the next one; the first is
    kept from every client (not pinged again) for decline_seconds, and stands among the
    operator's notices meanwhile; then it is pinged again when it comes up."""
    first, second, third = POOL[:3]
    probe = Probe({first})
    env = Env(probe)
    await env.start()
    assert await env.offered(_mac(1)) == second
    assert probe.asked == [first, second]
    (notice,) = env.told[-1]
    assert notice[0] == first
    assert notice[1].startswith(f"dhcp: {first} answered a ping on {LINK}: in use by a host "
                                "that is not in the lease table; not offered for 600s")
    assert await env.offered(_mac(2)) == third
    assert probe.asked == [first, second, third]  # the first not pinged again
    env.clock.now += 601
    probe.in_use = set()
    assert await env.offered(_mac(3)) == first  # pinged again: gone, so offered
    assert env.told[-1] == []  # no longer kept: no longer told
    assert probe.asked[-1] == first


async def test_a_discover_waits_for_at_most_three_pings() -> None:
    """Every address answers: a DISCOVER is left unanswered after PINGS_PER_DISCOVER pings
    (its client sends it again), and the next goes on from the addresses not yet found in
    use; none is offered that answered."""
    probe = Probe(set(POOL[:4]))
    env = Env(probe)
    await env.start()
    assert await env.offered(_mac(1)) is None
    assert probe.asked == POOL[:PINGS_PER_DISCOVER]
    outcomes = env.server.summary.totals()
    assert outcomes["offer deferred (pings answered)"] == 1
    assert outcomes["in use (answered a ping)"] == PINGS_PER_DISCOVER
    assert await env.offered(_mac(1)) == POOL[4]
    assert probe.asked == POOL[:5]


async def test_an_address_found_free_is_not_pinged_again_for_30_seconds() -> None:
    """dnsmasq's PING_CACHE_TIME: a client that took another server's offer gives its offer
    back; the next client is offered that address without a second ping within 30 s, and
    after a new one."""
    probe = Probe()
    env = Env(probe)
    await env.start()
    assert await env.offered(_mac(1)) == POOL[0]
    await env.ask(_packet(MessageType.REQUEST, _mac(1), requested=POOL[5],
                          server_id="10.20.0.2"))  # took another server's offer
    assert await env.offered(_mac(2)) == POOL[0]
    assert probe.asked == [POOL[0]]
    await env.ask(_packet(MessageType.REQUEST, _mac(2), requested=POOL[5],
                          server_id="10.20.0.2"))
    env.clock.now += 31
    assert await env.offered(_mac(3)) == POOL[0]
    assert probe.asked == [POOL[0], POOL[0]]


async def test_with_the_check_off_or_in_proxy_mode_nothing_is_pinged() -> None:
    """dhcp.ping_check false: no probe asked, the first address offered though a host has
    it (as before the check). Proxy mode offers no address: never a ping."""
    probe = Probe({POOL[0]})
    probe.forbidden = True
    env = Env(probe, settings=replace(SETTINGS, ping_check=False))
    await env.start()
    assert await env.offered(_mac(1)) == POOL[0]
    proxy = Env(probe, settings=DhcpSettings(ping_check=True))
    reply = await proxy.ask(_packet(MessageType.DISCOVER, _mac(2),
                                    vendor=b"PXEClient:Arch:00000:UNDI:002001"))
    assert reply is not None and reply.yiaddr == "0.0.0.0"


async def test_with_no_free_address_the_oldest_in_use_is_pinged_again_and_taken_back(
        caplog: pytest.LogCaptureFixture) -> None:
    """A host answers every ping for a while (echo replies spoofed, a router's proxy ARP):
    each address it answered for was kept from every client for decline_seconds, and once
    those were the pool's last, no client got one for 10 minutes. Now, as ISC dhcpd
    reclaims its oldest abandoned lease when no other is free, the address marked the
    longest ago is pinged again and, silent now, offered (said); one a host still answers
    for stays kept, its notice standing, and is never offered."""
    caplog.set_level(logging.WARNING, logger="netboot.servers.dhcp")
    probe = Probe(set(POOL[:4]))  # everything answers
    env = Env(probe, settings=replace(SETTINGS, pool_start=POOL[0], pool_end=POOL[3]))
    await env.start()
    assert await env.offered(_mac(1)) is None  # .10-.12 answered: deferred
    assert await env.offered(_mac(1)) is None  # .13 answered; .10 and .11 again
    assert probe.asked == POOL[:4] + POOL[:2]
    assert sorted(ip for ip, *_ in env.told[-1]) == POOL[:4]
    assert "4 of its addresses answered a ping" in caplog.text
    probe.in_use = {POOL[1]}  # the spoofing ends; a host really holds .11
    env.clock.now += 5
    for i, ip in enumerate((POOL[2], POOL[3], POOL[0])):  # the oldest marks first
        assert await env.offered(_mac(10 + i)) == ip
        assert probe.asked[-1] == ip
        ack = await env.ask(_packet(MessageType.REQUEST, _mac(10 + i), requested=ip,
                                    server_id=SERVER))
        assert ack is not None and ack.message_type == MessageType.ACK
    assert await env.offered(_mac(20)) is None  # .11 answers still: kept
    assert probe.asked[-1] == POOL[1]
    assert [ip for ip, *_ in env.told[-1]] == [POOL[1]]  # the reclaimed ones' notices ended
    assert env.server.summary.totals()["reclaimed"] == 3
    assert (f"no free address in the pool: {POOL[2]}, which answered a ping 5s ago, did "
            "not answer a ping now and is offered again") in caplog.text


async def test_a_relayed_discover_is_pinged_by_the_routes_not_from_its_listener() -> None:
    """A DISCOVER relayed (giaddr) for the pool's network: the address is on the relay's
    far side, reached by the host's routes (the OFFER to giaddr takes them too), not on the
    link the relayed packet came in by: the ping names no interface. One that came in on
    the link itself is pinged from that link."""
    probe = Probe({POOL[0]})
    probe.interface = None
    env = Env(probe)
    await env.start()
    reply = await env.ask(_packet(MessageType.DISCOVER, _mac(1), giaddr="10.20.0.2"))
    assert reply is not None and reply.yiaddr == POOL[1]
    assert probe.asked == [POOL[0], POOL[1]]
    probe.interface = LINK
    assert await env.offered(_mac(2)) == POOL[2]
