"""The DHCP server over real UDP sockets on 127.0.0.1 (ports chosen by the kernel)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from netboot.errors import ConfigError
from netboot.model import BootRequest, FirstStage
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Opt
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
from tests.pcap import capture, dhcp_datagrams
from tests.servers.udp_io import recvfrom

LOOPBACK = "127.0.0.1"


def payload(name: str, number: int) -> bytes:
    return next(d.payload for d in dhcp_datagrams(capture(name)) if d.frame == number)


class Client:
    """A UDP socket standing in for the firmware (its "port 68")."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    async def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, (LOOPBACK, port))  # one datagram: never blocks here

    async def receive(self) -> tuple[dhcp.Packet, tuple[str, int]]:
        data, addr = await asyncio.wait_for(recvfrom(self.sock, 4096), 5)
        return dhcp.parse(data), addr

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    c.close()


@pytest.fixture
async def server(client: Client) -> AsyncIterator[DhcpServer]:
    # Broadcast replies go to the test client on loopback, never to 255.255.255.255.
    s = DhcpServer(
        DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None, advertise=None,
        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK, client_port=client.port,
    )
    await s.start()
    yield s
    await s.close()


async def test_discover_gets_proxy_offer(server: DhcpServer, client: Client) -> None:
    dhcp_port, _ = server.ports
    await client.send(payload("uefi-edk2pxe", 8), dhcp_port)
    offer, source = await client.receive()
    assert source == (LOOPBACK, dhcp_port)
    assert offer.message_type == MessageType.OFFER
    assert offer.yiaddr == "0.0.0.0" and offer.siaddr == LOOPBACK
    assert offer.file_name == "snponly.efi"
    assert offer.option(Opt.VENDOR_SPECIFIC) is None


async def test_4011_request_gets_ack_from_4011(server: DhcpServer, client: Client) -> None:
    _, pxe_port = server.ports
    await client.send(payload("uefi-edk2pxe", 19), pxe_port)
    ack, source = await client.receive()
    assert source == (LOOPBACK, pxe_port)  # iPXE drops proxy replies not from port 4011
    assert ack.message_type == MessageType.ACK and ack.file_name == "snponly.efi"
    assert ack.ciaddr == "192.0.2.151"


async def test_malformed_datagram_dropped_server_keeps_answering(
    server: DhcpServer, client: Client
) -> None:
    dhcp_port, _ = server.ports
    good = payload("bios-ipxe", 14)
    for junk in (b"\x01", good[:200], good[:236] + b"\0\0\0\0" + good[240:],
                 good[:243] + b"\x3c\xff"):
        await client.send(junk, dhcp_port)
    await client.send(good, dhcp_port)
    offer, _ = await client.receive()
    assert offer.xid == dhcp.parse(good).xid
    assert offer.file_name == f"http://{LOOPBACK}:8080/boot.ipxe"


async def test_non_pxe_and_request_on_67_are_ignored(
    server: DhcpServer, client: Client
) -> None:
    dhcp_port, _ = server.ports
    await client.send(payload("bios-ipxe", 70), dhcp_port)  # busybox udhcpc
    await client.send(payload("bios-ipxe", 17), dhcp_port)  # REQUEST to the site server
    marker = payload("uefi-edk2pxe", 8)
    await client.send(marker, dhcp_port)
    offer, _ = await client.receive()  # the first answer is to the marker: others were silent
    assert offer.xid == dhcp.parse(marker).xid


async def test_slow_decider_means_silence() -> None:
    c = Client()
    s = DhcpServer(
        DhcpSettings(), TableDecider(delay=30), MemoryLeaseStore(), interfaces=None,
        advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK,
        client_port=c.port, decide_timeout=0.05,
    )
    await s.start()
    try:
        replies = await s.handle(payload("uefi-edk2pxe", 8), ("0.0.0.0", 68),
                                 server_ip=LOOPBACK, pxe_port=False)
        assert replies == []
    finally:
        await s.close()
        c.close()


class CancelledDecider:
    """A decision that ends cancelled by something other than the request's own task (what
    a store read shared with a request that timed out used to do)."""

    def __init__(self) -> None:
        self.pending: list[asyncio.Future[FirstStage | None]] = []

    def first_stage(self, request: BootRequest) -> asyncio.Future[FirstStage | None]:
        self.pending.append(asyncio.get_running_loop().create_future())
        return self.pending[-1]


async def test_a_decision_ended_cancelled_is_logged_and_the_listener_keeps_serving(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    decider = CancelledDecider()
    s = DhcpServer(
        DhcpSettings(), decider, MemoryLeaseStore(), interfaces=None, advertise=LOOPBACK,
        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK,
        client_port=client.port,
    )
    await s.start()
    try:
        answer = asyncio.ensure_future(s.handle(payload("uefi-edk2pxe", 8), ("0.0.0.0", 68),
                                                server_ip=LOOPBACK, pxe_port=False))
        while not decider.pending:
            await asyncio.sleep(0)
        decider.pending[0].cancel()
        assert await answer == []
        assert s.summary.counts["decision cancelled"] == 1
        assert any("boot decision cancelled" in r.getMessage() and r.levelno == logging.ERROR
                   for r in caplog.records)
    finally:
        await s.close()


class GatedDecider:
    """Answers at once, but for the MACs in ``gated``, whose decisions wait for ``gate``
    (a store read under way); its answers hold until ``holding`` is cleared (a decider's
    repeat_guard, pxe.BootDecider)."""

    def __init__(self, gated: set[str]) -> None:
        self.gated = gated
        self.gate = asyncio.Event()
        self.holding = True
        self.decided: list[str] = []

    async def _waited(self) -> FirstStage:
        await self.gate.wait()
        return FirstStage("snponly.efi", reason="waited")

    def first_stage(self, request: BootRequest) -> object:
        self.decided.append(str(request.mac))
        if str(request.mac) in self.gated:
            return self._waited()
        return FirstStage("snponly.efi", reason="at once")

    def repeat_guard(self, request: BootRequest, stage: FirstStage) -> object:
        return lambda: self.holding


def _from(data: bytes, mac: bytes, xid: int) -> bytes:
    """``data`` as another device would send it: its chaddr and xid."""
    return data[:4] + xid.to_bytes(4, "big") + data[8:28] + mac + data[34:]


async def test_a_repeat_is_answered_from_its_kept_answer_while_decisions_wait(
        client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device asking again is answered at once from the answer it was given, even while
    the listener's decisions in flight wait for the inventory and new requests wait their
    turn (servers/udp.py's waiting room): its answer needs no decision. It waited behind
    them, up to decide_timeout, before s45-dhcp. An answer that no longer holds is decided
    again, in its turn."""
    from netboot.servers import dhcp as dhcp_server

    monkeypatch.setattr(dhcp_server, "DECISIONS_IN_FLIGHT", 1)
    decider = GatedDecider({"52:54:00:00:00:0b", "52:54:00:00:00:0c"})
    s = DhcpServer(
        DhcpSettings(), decider, MemoryLeaseStore(), interfaces=None, advertise=LOOPBACK,
        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK,
        client_port=client.port, decide_timeout=30,
    )
    await s.start()
    try:
        dhcp_port, _ = s.ports
        discover = payload("uefi-edk2pxe", 8)
        a, b, c = (bytes.fromhex(f"5254000000{n}") for n in ("0a", "0b", "0c"))
        await client.send(_from(discover, a, 1), dhcp_port)
        first, _ = await client.receive()
        assert first.xid == 1 and first.file_name == "snponly.efi"
        await client.send(_from(discover, b, 2), dhcp_port)  # in flight, waiting
        await client.send(_from(discover, c, 3), dhcp_port)  # waiting for its turn
        await client.send(_from(discover, a, 4), dhcp_port)  # a's repeat
        again, _ = await client.receive()
        assert again.xid == 4 and again.file_name == "snponly.efi"
        assert again.chaddr[:6] == a and s.answered_again == 1
        assert decider.decided == ["52:54:00:00:00:0a", "52:54:00:00:00:0b"]
        decider.gate.set()
        assert sorted([(await client.receive())[0].xid for _ in range(2)]) == [2, 3]
        decider.holding = False  # a's answer no longer holds: decided again
        await client.send(_from(discover, a, 5), dhcp_port)
        fresh, _ = await client.receive()
        assert fresh.xid == 5 and s.answered_again == 1
        assert decider.decided[-1] == "52:54:00:00:00:0a" and len(decider.decided) == 4
    finally:
        await s.close()


async def test_a_kept_answers_check_that_fails_is_a_logged_bug_and_the_listener_serves_on(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """The repeat's look-up runs in the listener protocol's own call (_Repeats), still
    inside the error boundary: a guard that raises is logged with its traceback, that
    datagram dropped, and the next request answered."""
    decider = GatedDecider(set())
    broken = [False]

    def guard(request: BootRequest, stage: FirstStage) -> object:
        def holds() -> bool:
            if broken[0]:
                raise RuntimeError("guard broke")
            return True
        return holds

    decider.repeat_guard = guard  # type: ignore[method-assign]
    s = DhcpServer(
        DhcpSettings(), decider, MemoryLeaseStore(), interfaces=None, advertise=LOOPBACK,
        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK,
        client_port=client.port,
    )
    await s.start()
    try:
        dhcp_port, _ = s.ports
        discover = payload("uefi-edk2pxe", 8)
        a, b = bytes.fromhex("52540000000a"), bytes.fromhex("52540000000b")
        await client.send(_from(discover, a, 1), dhcp_port)
        assert (await client.receive())[0].xid == 1
        broken[0] = True
        await client.send(_from(discover, a, 2), dhcp_port)  # its check raises: dropped
        await client.send(_from(discover, b, 3), dhcp_port)
        answer, _ = await client.receive()
        assert answer.xid == 3 and answer.chaddr[:6] == b
        assert any("bug while handling a datagram" in r.getMessage() and r.exc_info
                   for r in caplog.records)
    finally:
        await s.close()


async def test_port_in_use_is_a_config_error() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((LOOPBACK, 0))
    try:
        port = holder.getsockname()[1]
        s = DhcpServer(DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None,
                       advertise=None, host=LOOPBACK, port=port, pxe_port=0)
        with pytest.raises(ConfigError) as err:
            await s.start()
        assert err.value.key == "dhcp.port" and "--dhcp-port" in str(err.value)
        assert str(port) in str(err.value)
    finally:
        holder.close()


async def test_no_address_to_advertise_is_a_config_error() -> None:
    s = DhcpServer(DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None,
                   advertise=None, port=0, pxe_port=0)
    with pytest.raises(ConfigError) as err:
        await s.start()
    assert err.value.key == "server.advertise"


async def test_per_packet_lines_are_debug_and_info_is_a_summary(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """200 DISCOVERs: no INFO line per packet; one summary line counts them at close."""
    caplog.set_level(logging.INFO, logger="netboot.servers.dhcp")
    s = DhcpServer(
        DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None, advertise=None,
        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK, client_port=client.port,
        summary_seconds=3600,
    )
    await s.start()
    try:
        dhcp_port, _ = s.ports
        for _ in range(200):
            await client.send(payload("uefi-edk2pxe", 8), dhcp_port)
            await client.receive()
        assert s.summary.counts["proxy OFFER"] == 200
    finally:
        await s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "netboot.servers.dhcp"]
    assert not [line for line in lines if "proxy OFFER (" in line], lines[:3]
    summaries = [line for line in lines if "last" in line]
    assert len(summaries) == 1 and "200 proxy OFFER" in summaries[0], lines
    assert len(lines) < 10, lines


async def test_a_request_dropped_unawaited_closes_what_it_waited_for() -> None:
    """The listener closes an answer it drops (too many in flight, servers/udp.py): the
    store's coroutine inside is closed too, not reported as never awaited; one that is
    awaited gives its answer under the datagram's log context."""
    import inspect
    import warnings

    from netboot.servers.dhcp import _InContext

    async def pending() -> list[object]:
        return []

    dropped = pending()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _InContext(dropped, {"xid": "0x1"}).close()
    assert inspect.getcoroutinestate(dropped) == inspect.CORO_CLOSED
    assert await _InContext(pending(), {"xid": "0x2"}) == []


AGENT_INFO = bytes((1, 6)) + b"Gi0/12" + bytes((2, 6)) + bytes.fromhex("0050569a0b0c")


def _relayed(mtype: MessageType, *, giaddr: str, xid: int, **options: bytes) -> bytes:
    """A PXE request as a relay forwards it: giaddr, hops 1 and option 82 (RFC 3046) last."""
    opts = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((mtype,))),
            dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x00"),
            dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes((1, 3, 43, 60, 66, 67)))]
    opts += [dhcp.Option(Opt[name], value) for name, value in options.items()]
    opts.append(dhcp.Option(82, AGENT_INFO))
    return dhcp.encode(dhcp.Packet(op=dhcp.Op.REQUEST, xid=xid, hops=1, giaddr=giaddr,
                                   chaddr=bytes.fromhex("525400000082"),
                                   options=tuple(opts)), pad_to=300)


@pytest.mark.parametrize("mode", ["proxy", "authoritative"])
async def test_a_relayed_requests_agent_information_is_echoed_last(mode: str) -> None:
    """RFC 3046 §2.2: a server echoes the Relay Agent Information option (82) of a relayed
    request verbatim, as the last option of its reply; a relay that inserted it (a switch's
    DHCP snooping, the defence against pool exhaustion) may drop a reply without it, and
    needs it to tell which port the client is on. netboot left it out. Real UDP: a relay's
    socket on loopback sends the request and gets the reply on its port 67 (here its own)."""
    relay = Client()
    settings = (DhcpSettings() if mode == "proxy" else DhcpSettings(
        mode="authoritative", pool_start="127.0.0.100", pool_end="127.0.0.109",
        netmask="255.0.0.0"))
    server = DhcpServer(settings, TableDecider(), MemoryLeaseStore(), interfaces=None,
                        advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0,
                        broadcast_address=LOOPBACK, client_port=9, relay_port=relay.port,
                        probe=False,
                        # A relay is answered on a network served (dhcp.relay_networks; the
                        # authoritative pool's network is one by itself).
                        relay_networks=("127.0.0.0/8",) if mode == "proxy" else ())
    await server.start()
    try:
        dhcp_port, _ = server.ports
        await relay.send(_relayed(MessageType.DISCOVER, giaddr=LOOPBACK, xid=0x82), dhcp_port)
        offer, _ = await relay.receive()
        replies = [offer]
        if mode == "authoritative":
            await relay.send(_relayed(MessageType.REQUEST, giaddr=LOOPBACK, xid=0x83,
                                      SERVER_ID=bytes((127, 0, 0, 1)),
                                      REQUESTED_IP=bytes((127, 0, 0, 100))), dhcp_port)
            ack, _ = await relay.receive()
            assert ack.message_type == MessageType.ACK
            replies.append(ack)
        # Not relayed: nobody to echo it to (the reply is the client's).
        [(data, _)] = await server.handle(
            _relayed(MessageType.DISCOVER, giaddr="0.0.0.0", xid=0x84), ("0.0.0.0", 68),
            server_ip=LOOPBACK, pxe_port=False)
        assert not dhcp.parse(data).has_option(82)
    finally:
        relay.close()
        await server.close()
    for reply in replies:
        assert reply.option(82) == AGENT_INFO
        assert [o.code for o in reply.options if o.code not in (0, 255)][-1] == 82


def test_a_relay_is_allowed_on_the_networks_served_only() -> None:
    from ipaddress import IPv4Network

    from netboot.servers.dhcp import relay_allowed

    nets = [IPv4Network("192.0.2.0/24"), IPv4Network("198.51.100.0/25")]
    assert relay_allowed("192.0.2.200", nets) and relay_allowed("198.51.100.127", nets)
    assert not relay_allowed("198.51.100.128", nets)
    assert not relay_allowed("203.0.113.1", [])
    assert not relay_allowed("not an address", nets)


async def test_an_unlisted_relay_is_dropped_with_a_line_and_an_outcome(
        caplog: pytest.LogCaptureFixture) -> None:
    """Proxy mode on loopback: a DISCOVER relayed by 203.0.113.9 (in no network served, none
    listed) was answered to 203.0.113.9:67 (s36-attack's ~1x reflection). Dropped: warnings
    rate-limited under one key (any giaddr: a host writes what it likes there), each
    counted as "relay not allowed" (the outcome netboot_dhcp_outcomes_total reads)."""
    server = DhcpServer(DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None,
                        advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0, probe=False)
    await server.start()
    try:
        for xid in range(20):
            data = _relayed(MessageType.DISCOVER, giaddr=f"203.0.113.{xid}", xid=0x90 + xid)
            assert await server.handle(data, ("203.0.113.9", 67), server_ip=LOOPBACK,
                                       pxe_port=False) == []
        # On :4011 the answer goes back to the sender (no giaddr aiming): answered.
        replies = await server.handle(
            _relayed(MessageType.REQUEST, giaddr="203.0.113.9", xid=0x99),
            ("203.0.113.9", 4011), server_ip=LOOPBACK, pxe_port=True)
        assert [dest for _, dest in replies] == [("203.0.113.9", 4011)]
    finally:
        await server.close()
    assert server.summary.totals()["relay not allowed"] == 20
    lines = [r for r in caplog.records if "relayed by 203.0.113." in r.getMessage()]
    assert len(lines) == 5 and {r.levelno for r in lines} == {logging.WARNING}
def test_a_datagrams_log_context_names_its_peer_xid_and_chaddr() -> None:
    """Every line logged while a datagram is answered names its peer, its xid (a number) and
    its chaddr as text, read at their BOOTP offsets; a datagram too short for them, its peer
    only: no None value (logs.log_fields takes the dict as it is)."""
    from netboot.servers.dhcp import _about

    data = bytes(4) + (0xE25D9B73).to_bytes(4, "big") + bytes(20) \
        + bytes.fromhex("525400000011") + bytes(266)
    assert _about(data, ("192.0.2.9", 68)) == {
        "peer": "192.0.2.9", "xid": 0xE25D9B73, "mac": "52:54:00:00:00:11"}
    assert _about(data[:34], ("192.0.2.9", 68))["mac"] == "52:54:00:00:00:11"
    assert _about(data[:33], ("192.0.2.9", 68)) == {"peer": "192.0.2.9"}


def test_a_datagrams_log_context_is_made_when_a_line_reads_it() -> None:
    """The handler's context (_About) is _about's dict, made at the first read only (most
    datagrams log nothing above DEBUG), read as a mapping by the formatter's get and by a
    context nested inside another (logs._LogContext's merge)."""
    from netboot.logs import JsonFormatter, log_context, log_fields
    from netboot.servers.dhcp import _About, _about

    data = bytes(4) + (0xE25D9B73).to_bytes(4, "big") + bytes(20) \
        + bytes.fromhex("525400000011") + bytes(266)
    peer = ("192.0.2.9", 68)
    for sent in (data, data[:33]):
        about = _About(sent, peer)
        assert about._fields is None
        assert dict(about) == _about(sent, peer) and len(about) == len(_about(sent, peer))
        assert about.get("xid") == _about(sent, peer).get("xid")
    record = logging.LogRecord("netboot.servers.dhcp", logging.WARNING, __file__, 1, "m",
                               None, None)
    with log_context(path="/x"), log_fields(_About(data, peer)):
        line = json.loads(JsonFormatter().format(record))
    assert (line["peer"], line["xid"], line["mac"], line["path"]) == (
        "192.0.2.9", 0xE25D9B73, "52:54:00:00:00:11", "/x")


def test_a_message_types_name_is_its_members_name() -> None:
    """The names logged and counted (the metrics' dhcp_reply) come from a dict, not the
    member's ``name`` descriptor (s38-dhcp1st): the same text for every type, and BOOTP for
    none."""
    from netboot.servers.dhcp import _name

    for mt in MessageType:
        assert _name(mt) == mt.name
    assert _name(None) == "BOOTP"


async def test_an_address_the_host_takes_while_the_server_starts_is_not_leased() -> None:
    """Authoritative mode keeps this host's addresses inside the pool out of it as the
    watcher reports them (s38-net: dnsmasq never offers the address of the interface a
    request came in on). start() took the addresses before it loaded the leases from the
    store and listened, both of which wait, and subscribed after: an address an interface
    got meanwhile (netboot started as the network comes up) was never reserved, as the
    watcher tells only later changes, and the pool offered this host's own address."""
    from netboot.leases import Lease
    from netboot.wire.rtnetlink import AddressMessage

    class Watcher:
        """An InterfaceWatcher whose table changes while the leases load: it tells no
        subscriber, as the real one tells none of a change before they subscribe."""

        def __init__(self) -> None:
            self.table: tuple[AddressMessage, ...] = (
                AddressMessage(True, 1, "lo", LOOPBACK, 8),)

        def addresses(self) -> tuple[AddressMessage, ...]:
            return self.table

        def subscribe(self, callback: object) -> None:
            pass

        def unsubscribe(self, callback: object) -> None:
            pass

    watcher = Watcher()

    class Leases(MemoryLeaseStore):
        async def list_leases(self) -> list[Lease]:
            await asyncio.sleep(0)
            # The pool's first address becomes this host's while the store answers.
            watcher.table += (AddressMessage(True, 2, "eth0", "127.0.0.100", 8, True),)
            return await super().list_leases()

    settings = DhcpSettings(mode="authoritative", pool_start="127.0.0.100",
                            pool_end="127.0.0.109", netmask="255.0.0.0")
    server = DhcpServer(settings, TableDecider(), Leases(), interfaces=None,
                        advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0,
                        broadcast_address=LOOPBACK, client_port=9, probe=False,
                        watcher=watcher)  # type: ignore[arg-type]
    await server.start()
    try:
        assert server.pool is not None
        assert not server.pool.in_pool("127.0.0.100")
        assert server.pool.offer("52:54:00:00:00:01", 1000.0) == "127.0.0.101"
    finally:
        await server.close()


async def test_an_interfaces_address_it_lets_go_of_is_offered_again() -> None:
    """The address a named interface had at start is the listener's (it answers with it)
    and was reserved in the pool for good (load_pool's server addresses): readdressed, the
    interface's new address was reserved as it came (s38-net), but the old one, no longer
    this host's, was never offered again until a restart, where dnsmasq (which reads the
    interfaces' addresses per packet) offers it. An address given (--advertise) stays
    reserved whatever the interfaces say."""
    from netboot.wire.rtnetlink import AddressMessage

    class Watcher:
        def __init__(self) -> None:
            self.table = (AddressMessage(True, 1, "lo", "127.0.0.100", 8),
                          AddressMessage(True, 1, "lo", LOOPBACK, 8, True))

        def addresses(self) -> tuple[AddressMessage, ...]:
            return self.table

        def subscribe(self, callback: object) -> None:
            pass

        def unsubscribe(self, callback: object) -> None:
            pass

    watcher = Watcher()
    settings = DhcpSettings(mode="authoritative", pool_start="127.0.0.100",
                            pool_end="127.0.0.109", netmask="255.0.0.0")
    server = DhcpServer(settings, TableDecider(), MemoryLeaseStore(), interfaces=["lo"],
                        advertise=None, host=LOOPBACK, port=0, pxe_port=0,
                        broadcast_address=LOOPBACK, client_port=9, probe=False,
                        watcher=watcher)  # type: ignore[arg-type]
    await server.start()
    try:
        assert server.pool is not None
        assert not server.pool.in_pool("127.0.0.100")  # the interface's: its listener's
        watcher.table = (AddressMessage(True, 1, "lo", LOOPBACK, 8),)  # .100 removed
        server._on_addresses(watcher.table)
        assert server.pool.in_pool("127.0.0.100")
        assert server.pool.offer("52:54:00:00:00:01", 1000.0) == "127.0.0.100"
    finally:
        await server.close()
