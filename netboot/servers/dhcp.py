"""asyncio adapter for DHCP: sockets on :67 and :4011, per interface, around the pure logic.

All decisions are made by :mod:`netboot.pxe` (what to answer) and :mod:`netboot.leases`
(which address); this module parses, asks the decider under a timeout, sends, and persists
lease changes in the background. Every datagram goes through :class:`BoundaryProtocol`, so a
malformed packet is a log line and the listener keeps serving (DESIGN.md §4.3).

Why the timeouts: iPXE moves on after about two seconds without a ProxyDHCP offer
(``DHCP_DISC_PROXY_TIMEOUT_SEC``, protocols.md §1.6). The decider and the lease store are
each given ``decide_timeout`` (1 s by default); when they do not answer in time the DHCP path
stays silent (proxy) or answers without a boot file / fixed address (authoritative).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import inspect
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast

from netboot import pxe
from netboot.errors import ConfigError, Conflict, DecodeError, NetbootError, StoreError
from netboot.leases import Changes, LeasePool, LeaseStore
from netboot.logs import RateLimitedLog, Summary, log_fields
from netboot.model import FirstStage, Lease
from netboot.pingcheck import PingChecks
from netboot.pxe import AddressGrant, BootDecider, Client, DhcpSettings, Unanswerable
from netboot.servers import sockets
from netboot.servers.interfaces import Addresses, InterfaceWatcher, first_address, network
from netboot.servers.udp import Address, BoundaryProtocol, Reply, open_datagram_endpoint
from netboot.wire import dhcp
from netboot.wire.dhcp import MIN_PACKET_SIZE, ZERO_IP, MessageType, Op, Opt

_log = logging.getLogger(__name__)

# Option 60 of the start-up probe: our own listener recognises and ignores it.
PROBE_VENDOR_CLASS = b"netboot-probe"
# Addresses an offer tries when the inventory says the previous ones are another server's.
CLAIM_ATTEMPTS = 8
# DHCP decisions waiting for the inventory at once, per listener (~10 KB each: the parsed
# request, its coroutines and task), and beyond them requests kept unhandled until one
# ends (~0.5-0.8 KB each: the datagram as it came; udp.BoundaryProtocol's waiting room). A
# decision ends within decide_timeout, so those in flight and waiting are the requests of
# about the last decide_timeout: a storm at start-up, while the inventory view loads,
# brought 1,500 DISCOVERs in 1 s, and those over the bound were dropped, answered only at
# their 4 s retransmission (benchmarks/README.md, s18-dhcpstart). Past both bounds, a
# flood: dropped and logged; ~6 MB per listener at most.
DECISIONS_IN_FLIGHT = 256
REQUESTS_WAITING = 4096
# Proxy answers kept per listener for repeats of their requests (_Answer): a storm's devices
# and their retransmissions, ~0.7 KB each.
ANSWERS_KEPT = 4096


@dataclass(frozen=True, slots=True)
class _Listener:
    interface: str | None
    server_ip: str
    pxe_port: bool


class _Open(NamedTuple):
    """The two listeners (:67, :4011) of one interface (or of every one: ``None``); a
    NamedTuple, not a dataclass: ~0.15 ms at import against ~0.7 (serve's ready time)."""

    server_ip: str
    endpoints: list[tuple[_Listener, asyncio.DatagramTransport, BoundaryProtocol, int]]


def relay_allowed(giaddr: str, networks: list[ipaddress.IPv4Network]) -> bool:
    """Whether a request relayed by ``giaddr`` is answered: the relay's address lies in a
    network served (dnsmasq answers a relayed request only when giaddr lies in a network it
    has a dhcp-range for, proxy or not). The reply goes to giaddr:67 (RFC 2131 §4.1), so
    answering any giaddr made netboot a reflector toward any address a host writes there."""
    try:
        address = ipaddress.IPv4Address(giaddr)
    except ValueError:
        return False
    return any(address in net for net in networks)


# A request as the answer cache keys it: where it came from, and its bytes without xid, secs
# and flags (4-12), which RFC 2131 lets a client vary between retransmissions (§4.1: a new
# xid per DISCOVER it sends, secs counting up) and which the answer only echoes.
_AnswerKey = tuple[Address, bytes]


class _Answer(NamedTuple):
    """A proxy reply sent to one request, for the requests whose bytes equal it but for
    xid, secs and flags (the same device asking again: retransmissions, the closed loops of
    a storm). ``holds`` is the decider's check (its ``repeat_guard``, pxe.BootDecider) that
    the decision and what it would record are still the same; the rest of the reply is a
    function of the request's bytes, the listener and the server's settings, which never
    change.

    A named tuple, not a frozen dataclass: that one's ``__init__`` stores each of its nine
    fields through ``object.__setattr__``, and making one was ~18,600 instructions of each
    decision whose answer is kept, this ~7,900 (callgrind, benchmarks/README.md
    s44-sighting)."""

    # The reply as first sent, but for its xid (4-8) and flags (10-12), which each repeat
    # puts in: joined from its pieces, one copy, not a bytearray's copy, two slice writes
    # and a bytes() copy back (~4,500 of a repeat's ~36,600 instructions; benchmarks/
    # README.md, s38-dhcprep).
    head: bytes  # 0-4: op, htype, hlen, hops
    secs: bytes  # 8-10, as first sent
    tail: bytes  # 12-: the addresses, chaddr, sname, file and options
    dest: Address
    holds: Callable[[], bool]
    pxe_port: bool
    kind: str  # summary line
    observed: tuple[str, str, str]  # DhcpObserver.dhcp_reply's arguments
    logged: tuple[Any, ...]  # the debug line's arguments after the xid and the peer



# A listener's kept answers, oldest first; an OrderedDict drops its oldest in O(1)
# (boot._keep says why).
_Answers = collections.OrderedDict[_AnswerKey, _Answer]


class _Repeats(BoundaryProtocol):
    """The boundary with a repeat's kept answer found and sent in ``datagram_received``'s
    own call: most datagrams of a storm are repeats (retransmissions, the closed loops of
    firmware), and the boundary's calls around the handler (``_handle`` and the handler)
    were ~2,100 of the ~28,700 instructions a datagram of the closed loop (callgrind,
    benchmarks/README.md s45-dhcp). A repeat is answered even while the listener's
    decisions in flight wait for the inventory (it needs none), where it waited its turn
    behind them. Anything else, and a kept answer that no longer holds, goes through the
    boundary as before (the handler finds no answer, decides, and keeps the new one)."""

    def __init__(self, name: str, handler: Any, answers: _Answers,
                 again: Callable[[_Answer, bytes, Address], Reply], **kwargs: Any) -> None:
        super().__init__(name, handler, **kwargs)
        self._kept = answers
        self._again = again

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The key as the handler makes it (its peer is (addr[0], addr[1]): addr itself for
        # the AF_INET sockets DHCP listens on). Equal to a kept request's bytes but for
        # xid, secs and flags, the datagram is as long as one the size check let through.
        key = (addr, data[:4] + data[12:])
        try:
            answer = self._kept.get(key)
            if answer is not None:
                if answer.holds():
                    self.received += 1
                    self._send((self._again(answer, data, addr),))
                    return
                del self._kept[key]
        except Exception as exc:  # inside the boundary, as the handler's own look-up was
            self.received += 1
            self._failed(exc, (addr[0], addr[1]))
            return
        super().datagram_received(data, addr)


class AddressProbe(Protocol):  # servers/ping.Pinger; tests give fakes
    """Whether an address answers on an interface: True in use, False not within the
    wait, None not checked."""

    async def answers(self, ip: str, interface: str | None) -> bool | None: ...
    def close(self) -> None: ...


# Echoes waiting at once (servers/ping.Pinger's bound: past it an offer goes unchecked, as
# dnsmasq stops pinging under load). A DISCOVER waiting for its echo holds one of its
# listener's decisions in flight the whole wait (1 s), so an authoritative listener that
# pings has this many more: with DECISIONS_IN_FLIGHT alone a storm of new devices got
# offers at ~256 a second, the rest waiting their turn (240 devices against 60 slots, the
# scale of 1,000 against 256: p50 3.0 s, max 4.1 s; benchmarks/README.md, s48-ping).
PINGS_IN_FLIGHT = 1024
# Pings one DISCOVER waits for at most (each up to the probe's wait) before it is left
# unanswered: its client sends it again (RFC 2131 §4.1) and the check goes on from the
# addresses found in use, which stay marked (LeasePool.in_use).
PINGS_PER_DISCOVER = 3


def _where(interface: str | None, relay: str | None) -> str:
    """Where a ping went, as said of it (DhcpServer._ping: a relayed DISCOVER's by routes)."""
    return (f" behind relay {relay}" if relay is not None
            else f" on {interface}" if interface is not None else "")


class DhcpObserver(Protocol):
    """Told of every reply sent (metrics): ``kind`` is OFFER, ACK, NAK."""

    def dhcp_reply(self, kind: str, firmware: str, arch: str) -> None: ...


_XID = struct.Struct("!I")
# Enum members every datagram reads, as module constants: on CPython 3.11 reading a member
# through its class costs ~870 instructions (~0.25 µs), and a first DISCOVER read six
# (benchmarks/README.md, s38-dhcp1st).
_BOOTREQUEST, _DISCOVER, _VENDOR_CLASS = Op.REQUEST, MessageType.DISCOVER, int(Opt.VENDOR_CLASS)
# A request's first flags byte with the broadcast bit set (RFC 2131 §2: bit 0 of flags), as
# the proxy reply on :67 sets it (pxe.proxy_reply): made once, not per repeat.
_BROADCAST = tuple(bytes((b | 0x80,)) for b in range(256))


def _about(data: bytes, peer: Address) -> dict[str, Any]:
    """The log context of a datagram (logs.log_fields: no None value). The xid by a
    Struct, not int.from_bytes of a slice (~1,100 instructions less a datagram)."""
    if len(data) >= 34:
        return {"peer": peer[0], "xid": _XID.unpack_from(data, 4)[0],
                "mac": data[28:34].hex(":")}
    return {"peer": peer[0]}


class _About(Mapping[str, Any]):
    """:func:`_about` of a datagram, made when a line logged while answering it reads it:
    most datagrams are answered without one (a proxy offer logs at DEBUG), and the dict, its
    xid's unpack and its chaddr's text were ~6,600 instructions of each datagram decided
    (callgrind, benchmarks/README.md s49-sighting, s50-sighting)."""

    __slots__ = ("_data", "_fields", "_peer")

    def __init__(self, data: bytes, peer: Address) -> None:
        self._data, self._peer = data, peer
        self._fields: dict[str, Any] | None = None

    def _made(self) -> dict[str, Any]:
        if self._fields is None:
            self._fields = _about(self._data, self._peer)
        return self._fields

    def __getitem__(self, key: str) -> Any:
        return self._made()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._made())

    def __len__(self) -> int:
        return len(self._made())

    def get(self, key: str, default: Any = None) -> Any:
        return self._made().get(key, default)


async def _awaited_in(pending: Awaitable[list[Reply]], fields: Mapping[str, Any]) -> list[Reply]:
    with log_fields(fields):
        return await pending


class _InContext:
    """``pending`` awaited under the datagram's log context. Closed unawaited (the listener
    drops a request when too many are in flight), it closes ``pending`` too, which would
    otherwise be reported as a coroutine never awaited."""

    __slots__ = ("_fields", "_pending")

    def __init__(self, pending: Awaitable[list[Reply]], fields: Mapping[str, Any]) -> None:
        self._pending, self._fields = pending, fields

    def __await__(self) -> Generator[Any, None, list[Reply]]:
        return _awaited_in(self._pending, self._fields).__await__()

    def close(self) -> None:
        close = getattr(self._pending, "close", None)
        if close is not None:
            close()


class DhcpServer:
    """proxyDHCP (default) or authoritative DHCP on :67, plus the PXE :4011 responder."""

    def __init__(
        self,
        settings: DhcpSettings,
        decider: BootDecider,
        leases: LeaseStore,
        *,
        interfaces: list[str] | None,
        advertise: str | None,
        host: str = "0.0.0.0",
        port: int = 67,
        pxe_port: int = 4011,
        decide_timeout: float = 1.0,
        broadcast_address: str = "255.255.255.255",
        client_port: int = 68,
        relay_port: int = 67,
        probe: bool = True,
        probe_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        summary_seconds: float = 60.0,
        observer: DhcpObserver | None = None,
        each_interface: bool = False,
        relay_networks: tuple[str, ...] = (),
        watcher: InterfaceWatcher | None = None,
        pinger: AddressProbe | None = None,
        in_use_told: Callable[[list[tuple[str, str, float]]], None] | None = None,
        ping_wait: float | None = None,
    ) -> None:
        self._settings = settings
        # Authoritative, dhcp.ping_check: an address is pinged before its first offer
        # (netboot.pingcheck decides which; the probe, servers/ping.Pinger, made at start()
        # unless given). ``in_use_told``: each address that answered and is kept from
        # clients now, with the line said of it (the operator's standing notices) and until
        # when, whenever that changes. ``ping_wait``: seconds an echo is waited for
        # (dhcp.ping_timeout_ms; None: servers/ping.PING_WAIT), for the probe made at start().
        self._checks = PingChecks() if settings.ping_check else None
        self._pinger = pinger
        self._own_pinger = False
        self._ping_wait = ping_wait
        # ip -> what was said of it, while the pool keeps it as in use (LeasePool's marks:
        # the one place that says until when; a mark reclaimed early ends its notice too).
        self._in_use: dict[str, str] = {}
        self._in_use_told = in_use_told
        self._told_no_link = False
        self._replies = pxe.ProxyReplies(settings)
        self._classifier = pxe.Classifier(settings)
        self._layouts = dhcp.RequestLayouts()
        self._decider = decider
        # A decider's first_stage_now (BootService's) answers a decision taken at once with
        # the value itself, not a future already done: no asyncio.get_running_loop() (a
        # getpid(2) call in Python 3.11) and no future for every DISCOVER decided from memory.
        self._first_stage: Callable[[Any], FirstStage | Awaitable[FirstStage | None] | None] = (
            getattr(decider, "first_stage_now", None) or decider.first_stage)
        # Deciders that can tell when their answer to a request still holds let repeats of
        # it be answered without parsing, classifying, deciding or encoding (_Answer).
        self._repeat_guard: Callable[[Any, FirstStage], Callable[[], bool] | None] | None = (
            getattr(decider, "repeat_guard", None))
        # Which machine a NIC is, for the authoritative pool, is the decider's to tell
        # (BootService's, from its view; pxe.BootDecider): ``fixed_address(mac)``, its
        # machine's fixed_ipv4 (_fixed), and ``same_machine(mac, other)``, whether two NICs
        # are one machine's (_sibling). A decider without them gives no fixed addresses.
        self._fixed_address: Callable[[str], Awaitable[str | None]] | None = (
            getattr(decider, "fixed_address", None))
        self._same_machine: Callable[[str, str], Awaitable[bool]] | None = (
            getattr(decider, "same_machine", None))
        # And ``fixed_moved(old, new, ipv4)``: the machine's event that its fixed address
        # moved from one NIC to another (_moved).
        self._fixed_moved: Callable[[str, str, str], Awaitable[None]] | None = (
            getattr(decider, "fixed_moved", None))
        self._answers: dict[_Listener, _Answers] = {}
        self.answered_again = 0  # repeats answered from a kept answer (tests, metrics)
        self._store = leases
        self._interfaces = list(interfaces or [])
        # Without interfaces named: each interface that has an IPv4 address, answering with
        # the advertised address or, none given, its own (service.dhcp_listeners).
        self._each = each_interface and not self._interfaces
        self._advertise = advertise
        try:
            self._relay_networks = [ipaddress.IPv4Network(text, strict=False)
                                    for text in relay_networks]
        except ValueError as exc:
            raise ConfigError(str(exc), key="dhcp.relay_networks",
                              fix="write IPv4 networks, e.g. [198.51.100.0/24]") from exc
        # Networks whose relays are answered: relay_networks, the served interfaces' own
        # and (authoritative) the pool's; made again whenever an address comes or goes.
        self._networks: list[ipaddress.IPv4Network] = list(self._relay_networks)
        self._watcher = watcher
        self._own_watcher = False
        self._open: dict[str | None, _Open] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._changed: asyncio.Event | None = None
        self._follower: asyncio.Task[None] | None = None
        self._host = host
        self._port = port
        self._pxe_port = pxe_port
        self._decide_timeout = decide_timeout
        self._broadcast = broadcast_address
        self._client_port = client_port
        self._relay_port = relay_port
        self._probe = probe
        self._probe_seconds = probe_seconds
        self._clock = clock
        self.pool: LeasePool | None = None
        # Authoritative: the interfaces with an address on the pool's network, where a
        # request that was not relayed is answered (LeasePool.links), and those others
        # whose request was dropped and said so (once each).
        self._pool_links: frozenset[str] = frozenset()
        self._told_no_pool: set[str] = set()
        self._pending: dict[str, Lease | None] = {}  # mac -> lease to put, None = delete
        # mac -> the MAC whose lease of the same address its pending put ends (a fixed
        # address moved between NICs: put_lease's ``ending``). Bounded as _pending is.
        self._ending: dict[str, str] = {}
        # Held while a flush writes: a flush asked (close, a test) while the background
        # writer has taken a lease out of _pending and is still writing it waits for that
        # write too; it returned at once and the lease was not yet in the store (CI, once).
        self._flushing = asyncio.Lock()
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._summarise: asyncio.Task[None] | None = None
        # Every broadcast on the segment reaches us: one INFO line per packet was 100 MB of
        # log in a storm. Per-packet lines are DEBUG; INFO gets a count per kind every
        # summary_seconds, and warnings about one MAC or peer are rate-limited.
        self.summary = Summary(_log, "dhcp", interval=summary_seconds)
        self._limited = RateLimitedLog(_log)
        self._observer = observer

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def ports(self) -> tuple[int, int]:
        """The (dhcp, pxe) ports actually bound by the first listener (useful with port 0)."""
        bound = [(lst, port) for o in self._open.values() for lst, _, _, port in o.endpoints]
        dhcp_port = next(p for lst, p in bound if not lst.pxe_port)
        pxe_port = next(p for lst, p in bound if lst.pxe_port)
        return dhcp_port, pxe_port

    @property
    def _protocols(self) -> list[BoundaryProtocol]:
        return [protocol for o in self._open.values() for _, _, protocol, _ in o.endpoints]

    @property
    def interfaces(self) -> dict[str | None, str]:
        """Where DHCP listens now: interface (None: all, one socket) -> address answered."""
        return {key: o.server_ip for key, o in self._open.items()}

    def _wanted(self, addresses: Addresses) -> dict[str | None, str]:
        """Which listeners there should be, by interface, and the address each answers
        with, given the host's addresses now."""
        if self._interfaces:
            wanted: dict[str | None, str] = {}
            for name in self._interfaces:
                ip = first_address(addresses, name)
                if ip is not None:
                    wanted[name] = self._advertise or ip
            return wanted
        if self._each:
            each: dict[str | None, str] = {}
            for entry in addresses:
                # Loopback too where an address is advertised, as the 0.0.0.0 socket heard
                # it (a relay on this host); never to answer with 127.0.0.1 itself.
                if entry.name not in each and (self._advertise is not None or not
                                               ipaddress.IPv4Address(entry.address)
                                               .is_loopback):
                    ip = first_address(addresses, entry.name)
                    if ip is not None:
                        each[entry.name] = self._advertise or ip
            return each
        ip = self._advertise or (self._host if self._host != "0.0.0.0" else None)
        if ip is None:
            raise ConfigError(
                "cannot tell which address to advertise in DHCP answers",
                key="server.advertise",
                fix="name the provisioning interface (--interface) or set --advertise",
            )
        return {None: ip}

    def _served_networks(self, addresses: Addresses) -> list[ipaddress.IPv4Network]:
        """relay_networks, the networks of the interfaces served (every interface's where
        one socket serves them all) and, authoritative, the pool's (its dhcp-range)."""
        nets = list(self._relay_networks)
        for entry in addresses:
            if self._interfaces and entry.name not in self._interfaces:
                continue
            net = network(entry)
            if not net.network_address.is_loopback and net not in nets:
                nets.append(net)
        if self._settings.mode == "authoritative" and self._settings.pool_start:
            pool = self._settings.network()
            if pool not in nets:
                nets.append(pool)
        return nets

    async def start(self) -> None:
        if self._watcher is None:
            self._watcher, self._own_watcher = InterfaceWatcher(), True
        try:
            if self._own_watcher:
                await self._watcher.start()
            addresses = self._watcher.addresses()
            targets = self._wanted(addresses)
            self._networks = self._served_networks(addresses)
            for name in self._interfaces:
                if name not in targets:
                    _log.warning("dhcp: interface %s has no IPv4 address (yet): served once "
                                 "it has one", name)
            if self._each and not targets:
                _log.warning("dhcp: no interface with an IPv4 address yet: each one is "
                             "served once it has one")
            if (self._settings.mode == "authoritative" and self._checks is not None
                    and self._pinger is None):
                from netboot.servers.ping import Pinger

                self._pinger, self._own_pinger = Pinger(
                    max_probes=PINGS_IN_FLIGHT,
                    **({} if self._ping_wait is None else {"wait": self._ping_wait})), True
            if self._settings.mode == "authoritative":
                # An interface's address is reserved while it is this host's (_reserve_host):
                # for good, it stayed out of the pool after the interface let go of it. Only
                # one given (--advertise) or bound to is reserved whatever the host has.
                here = {entry.address for entry in addresses}
                await self.load_pool([ip for ip in targets.values()
                                      if ip == self._advertise or ip not in here])
                self._reserve_host(addresses)
            self._wake = asyncio.Event()
            self._writer = asyncio.create_task(self._write_leases(), name="dhcp-lease-writer")
            self._summarise = asyncio.create_task(self._summaries(), name="dhcp-summary")
            for interface, server_ip in targets.items():
                await self._listen(interface, server_ip)
            prepare = getattr(self._pinger, "prepare", None)
            if prepare is not None and self._settings.mode == "authoritative":
                for interface in targets:
                    if interface is not None or self._pool_links:
                        prepare(interface)  # said now whether the ping check is on, how
        except BaseException:
            await self.close()
            raise
        if self._interfaces or self._each:
            # dnsmasq's --bind-dynamic: an interface that comes up later is served, one
            # that goes away is let go (netboot.servers.interfaces).
            self._changed = asyncio.Event()
            self._follower = asyncio.create_task(self._follow(), name="dhcp-interfaces")
        self._watcher.subscribe(self._on_addresses)
        if (now := self._watcher.addresses()) != addresses:
            # Changed while start() waited (the leases' load, the listens), before it
            # subscribed: the watcher tells only later changes (an address of this host
            # inside the pool went unreserved, and was leased).
            self._on_addresses(now)
        if self._settings.mode == "authoritative" and self._interfaces and self._probe:
            self._probe_task = asyncio.create_task(
                self._probe_for_servers(list(targets.items())), name="dhcp-probe"
            )

    async def _listen(self, interface: str | None, server_ip: str) -> None:
        """Both listeners of one interface, or none (a failure closes the first)."""
        opened = _Open(server_ip, [])
        try:
            for is_pxe, port, key, flag in (
                (False, self._port, "dhcp.port", "--dhcp-port"),
                (True, self._pxe_port, "dhcp.pxe_port", "--dhcp-pxe-port"),
            ):
                listener = _Listener(interface, server_ip, is_pxe)
                sock = self._bind(port, interface, key, flag)
                protocol = self._protocol(
                    listener,
                    f"dhcp{':' + interface if interface else ''}:{sock.getsockname()[1]}",
                    max_in_flight=DECISIONS_IN_FLIGHT + (
                        PINGS_IN_FLIGHT if self._pinging() else 0),
                    max_waiting=REQUESTS_WAITING,
                    # Kept longer, its answer (up to decide_timeout more) could come
                    # after iPXE's ~2 s wait for a proxy offer (protocols.md §1.6).
                    max_wait=self._decide_timeout,
                )
                transport = await open_datagram_endpoint(sock, protocol)
                opened.endpoints.append((listener, transport, protocol,
                                         sock.getsockname()[1]))
                _log.info(
                    "dhcp: %s mode listening on %s:%d%s, advertising %s",
                    self._settings.mode, self._host, sock.getsockname()[1],
                    f" ({interface})" if interface else "", server_ip,
                )
        except BaseException:
            self._let_go(opened)
            raise
        self._open[interface] = opened

    def _let_go(self, opened: _Open) -> None:
        for listener, transport, protocol, _ in opened.endpoints:
            transport.close()
            self._answers.pop(listener, None)
            task = asyncio.ensure_future(protocol.drain())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _reserve_host(self, addresses: Addresses) -> None:
        """This host's addresses kept out of the pool as they come and go (an interface's
        that came up later inside it: netboot leased its own address, s37-net's "left")."""
        if self.pool is None:
            return
        self._pool_links = self.pool.links((a.name, a.address) for a in addresses)
        self._told_no_pool -= self._pool_links
        for lease in self.pool.reserve_host(a.address for a in addresses):
            _log.warning("dhcp: %s is now an address of this host, and leased to %s until %s: "
                         "its renewal is refused and it is offered another address (as "
                         "dnsmasq does)", lease.ipv4, lease.mac,
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.expires)))

    def _on_addresses(self, addresses: Addresses) -> None:
        self._reserve_host(addresses)
        networks = self._served_networks(addresses)
        if networks != self._networks:
            self._networks = networks
            # A kept answer to a relayed request must not outlive its relay's network.
            for answers in self._answers.values():
                answers.clear()
            _log.info("dhcp: answering relays from %s",
                      ", ".join(map(str, networks)) or "no network")
        if self._changed is not None:
            self._changed.set()

    async def _follow(self) -> None:
        assert self._changed is not None and self._watcher is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._reconcile(self._watcher.addresses())

    async def _reconcile(self, addresses: Addresses) -> None:
        wanted = self._wanted(addresses)
        readdressed = False
        for interface, opened in list(self._open.items()):
            if wanted.get(interface) != opened.server_ip:
                del self._open[interface]
                self._let_go(opened)
                readdressed = readdressed or interface in wanted
                _log.info("dhcp: stopped listening on %s (%s)", interface,
                          "its address went away" if interface not in wanted
                          else f"its address is now {wanted[interface]}")
        if readdressed:
            # A transport closes its socket on the loop's next turn: without SO_REUSEADDR
            # (_bind) the same device's new listener binds only once the old one is shut.
            await asyncio.sleep(0)
        for interface, server_ip in wanted.items():
            if interface in self._open:
                continue
            try:
                await self._listen(interface, server_ip)
            except (ConfigError, OSError) as exc:
                self._limited.log(logging.WARNING, f"listen {interface}",
                                  "dhcp: cannot listen on %s: %s", interface, exc)
                continue
            if (self._settings.mode == "authoritative" and self._probe
                    and interface is not None):
                probe = asyncio.create_task(self._probe_for_servers([(interface, server_ip)]))
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.unsubscribe(self._on_addresses)
            if self._own_watcher:
                self._watcher.close()
                self._watcher, self._own_watcher = None, False
        for task in (self._follower, self._probe_task, *self._probes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._follower = self._probe_task = None
        if self._pinger is not None and self._own_pinger:
            # Probes still waiting end now (not in use): the offers they held are dropped
            # with the listeners below, not waited for.
            self._pinger.close()
            self._pinger, self._own_pinger = None, False
        protocols = self._protocols
        for opened in self._open.values():
            for _, transport, _, _ in opened.endpoints:
                transport.close()
        for protocol in protocols:
            await protocol.drain()
        for task in list(self._stopping):
            await task
        if self._summarise is not None:
            self._summarise.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._summarise
            self._summarise = None
        self.summary.flush()
        self._open.clear()
        self._answers.clear()
        if self._writer is not None:
            await self.flush_leases()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _summaries(self) -> None:
        # A quiet period after a burst still gets its summary line.
        while True:
            await asyncio.sleep(self.summary.interval)
            self.summary.flush()
            if self._in_use:  # a quiet VLAN's notices end too, not at the next DISCOVER
                self._tell_in_use(self._clock())

    def _bind(self, port: int, interface: str | None, key: str, flag: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if interface:
                # One socket per interface on 0.0.0.0 (broadcasts only reach a 0.0.0.0 bind),
                # SO_BINDTODEVICE so that we know the receiving interface and force the
                # egress one (protocols.md §1.5). Authoritative, no SO_REUSEADDR: Linux lets
                # UDP sockets bound to different devices share a port without it
                # (udp_lib_lport_inuse), so netboot's own listeners still bind, while a
                # second DHCP server on the same interface, or on every one (0.0.0.0
                # unbound), is refused at start instead of two servers splitting the
                # clients (dnsmasq: "failed to bind DHCP server socket: Address in use").
                # UDP has no TIME_WAIT to reuse. A proxyDHCP is made to run beside the
                # site's DHCP server, which may be on this host (libvirt's dnsmasq on
                # virbr0, a router's dnsmasq --bind-interfaces, systemd-networkd): both
                # with SO_REUSEADDR, each gets the broadcasts (dnsmasq's proxy mode binds
                # beside another the same way, bind-interfaces setting SO_REUSEADDR).
                if self._settings.mode == "proxy":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, interface.encode())
            sock.bind((self._host, port))
            sock.setblocking(False)
            sockets.grow_receive_buffer(sock)
        except OSError as exc:
            sock.close()
            if interface and exc.errno == errno.EADDRINUSE \
                    and self._settings.mode == "authoritative":
                raise ConfigError(
                    f"DHCP: UDP {self._host}:{port} on {interface} is already in use by "
                    "another DHCP server on this host (another netboot, dnsmasq, "
                    "systemd-networkd?): two DHCP servers on one network split its clients; "
                    f"see: ss -lupn '( sport = :{port} )'", key="server.interfaces",
                    fix=f"stop the other DHCP server on {interface}, or serve another "
                        "interface (server.interfaces, --interface)") from exc
            if exc.errno == errno.EADDRINUSE and self._settings.mode == "proxy" \
                    and key == "dhcp.port" and port == 67:
                # A proxyDHCP beside a DHCP server of this host: moving port 67 (the generic
                # error's fix) answers no client; sharing it per interface does.
                where = f"{self._host}:{port}" + (f" on {interface}" if interface else "")
                raise ConfigError(
                    f"DHCP: UDP {where} is already in use (a DHCP server on this host: "
                    f"dnsmasq, libvirt's, systemd-networkd?); see: ss -lupn '( sport = "
                    f":{port} )'", key="server.interfaces",
                    fix=("the DHCP server there does not share the port: run dnsmasq with "
                         "--bind-interfaces (libvirt's does), or run netboot on another host"
                         if interface else "name the provisioning interface (server."
                         "interfaces, --interface): a proxyDHCP shares port 67 per interface "
                         "with a DHCP server that allows it")) from exc
            raise sockets.bind_error(
                exc, what="DHCP", proto="UDP", host=self._host, port=port, key=key, flag=flag,
                interface=interface, interface_key="server.interfaces", others="dnsmasq",
            ) from exc
        return sock

    async def load_pool(self, server_ips: list[str]) -> None:
        """Build the pool and load the leases from the store (start() does this; public for
        socket-less tests)."""
        settings = self._settings
        assert settings.pool_start and settings.pool_end
        reserved = [*server_ips]
        if settings.router:
            reserved.append(settings.router)
        self.pool = LeasePool(
            settings.pool_start, settings.pool_end,
            lease_seconds=settings.lease_seconds, decline_seconds=settings.decline_seconds,
            offer_seconds=settings.offer_seconds, reserved=reserved, network=settings.network(),
            reserved_fixed=getattr(self._decider, "fixed_holder", None),
        )
        # Start-up may wait on the store; the DHCP path never does.
        leases = await self._store.list_leases()
        self.pool.load(leases, self._clock())
        _log.info("dhcp: loaded %d leases from the store", len(self.pool.leases()))

    # -- lease persistence (background) ------------------------------------------------------

    def _persist(self, changes: Changes) -> None:
        # Written in the order queued: deletes first, and a put queued again moved after
        # them, so that an address's new lease never meets the one it ended (Conflict).
        pending = self._pending
        for mac in changes.delete:
            pending[mac] = None
        for lease in changes.put:
            pending.pop(lease.mac, None)
            pending[lease.mac] = lease
        if (changes.put or changes.delete) and self._wake is not None:
            self._wake.set()

    async def flush_leases(self) -> None:
        async with self._flushing:
            while self._pending:
                mac, lease = next(iter(self._pending.items()))
                del self._pending[mac]
                ending = self._ending.pop(mac, None)
                try:
                    if lease is None:
                        await self._store.delete_lease(mac)
                        if ending is not None and ending not in self._pending and (
                                self.pool is None or self.pool.lease(ending) is None):
                            # The put that was to end it never written (mac let go first).
                            await self._store.delete_lease(ending)
                    else:
                        await self._store.put_lease(lease, ending=ending)
                except Exception:
                    # The in-memory pool stays right; the store catches up with the next
                    # change.
                    _log.exception("dhcp: %s: persisting the lease failed", mac)

    async def _write_leases(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush_leases()

    # -- the DHCP path -----------------------------------------------------------------------

    def _protocol(self, listener: _Listener, name: str, **limits: Any) -> BoundaryProtocol:
        """``listener``'s datagram protocol: the error boundary around :meth:`_handler`,
        with a repeat answered from its kept answer in the protocol's own call where the
        decider lets answers be kept (_Repeats)."""
        if self._repeat_guard is None:
            return BoundaryProtocol(name, self._handler(listener), logger=_log, min_size=1,
                                    max_size=4096, **limits)
        return _Repeats(name, self._handler(listener), self._answers[listener], self._again,
                        logger=_log, min_size=1, max_size=4096, **limits)

    def _handler(
        self, listener: _Listener
    ) -> Callable[[bytes, Address], list[Reply] | Awaitable[list[Reply]]]:
        answers = self._answers.setdefault(listener, collections.OrderedDict())
        # A decider that cannot tell when an answer holds gets none kept: no key made.
        caching = self._repeat_guard is not None

        def handle(data: bytes, peer: Address) -> list[Reply] | Awaitable[list[Reply]]:
            keep = None
            if caching:
                # A repeat of a request answered before, while its decision holds: the reply
                # sent then with this request's xid and flags; nothing parsed, decided,
                # encoded.
                key = (peer, data[:4] + data[12:])
                answer = answers.get(key)
                if answer is not None:
                    if answer.holds():
                        return [self._again(answer, data, peer)]
                    del answers[key]
                keep = (answers, key)
            # Who this datagram is about, for every line logged while answering it
            # (--log-format json): xid and chaddr at their fixed BOOTP offsets (RFC 2131 §2).
            fields = _About(data, peer)
            with log_fields(fields):
                result = self.respond(
                    data, peer, server_ip=listener.server_ip, pxe_port=listener.pxe_port,
                    interface=listener.interface, keep=keep,
                )
            # An answer known at once costs no coroutine; one that waits (the store) keeps
            # the same context for the lines it logs later.
            return result if isinstance(result, list) else _InContext(result, fields)

        return handle

    async def handle(
        self, data: bytes, peer: Address, *, server_ip: str, pxe_port: bool,
        interface: str | None = None,
    ) -> list[Reply]:
        """One datagram in, the replies out (payload, destination), as a listener answers
        it (repeats from the answer cache too). Raises DecodeError for a malformed packet
        (the boundary logs it)."""
        result = self._handler(_Listener(interface, server_ip, pxe_port))(data, peer)
        return result if isinstance(result, list) else await result

    def _again(self, answer: _Answer, data: bytes, peer: Address) -> Reply:
        """``answer`` to a repeat of its request (``data``): its xid, and its flags (with
        the broadcast bit on :67, as proxy_reply sets it)."""
        out = b"".join((answer.head, data[4:8], answer.secs,
                        data[10:12] if answer.pxe_port else _BROADCAST[data[10]] + data[11:12],
                        answer.tail))
        self.answered_again += 1
        self.summary.note(answer.kind)
        if self._observer is not None:
            self._observer.dhcp_reply(*answer.observed)
        if _log.isEnabledFor(logging.DEBUG):
            mac, *rest = answer.logged
            with log_fields(_about(data, peer)):
                _log.debug("dhcp: %s xid %#010x from %s: %s (%s, arch %s) file %r to %s:%d",
                           mac, int.from_bytes(data[4:8]), peer[0], *rest)
        return out, answer.dest

    def respond(
        self, data: bytes, peer: Address, *, server_ip: str, pxe_port: bool,
        interface: str | None = None,
        keep: tuple[_Answers, _AnswerKey] | None = None,
    ) -> list[Reply] | Awaitable[list[Reply]]:
        """:meth:`handle` without the coroutine: the replies themselves when the decider
        answers at once, an awaitable only when it has to wait (the store, the lease pool).
        ``keep``: where a proxy answer decided at once is kept for its repeats, and under
        which key."""
        packet = self._layouts.parse(data)
        if packet.op != _BOOTREQUEST:
            _log.debug("dhcp: xid %#010x from %s: a BOOTREPLY, not for us", packet.xid, peer[0])
            return []
        if packet.message_type is None:
            _log.debug("dhcp: xid %#010x from %s: plain BOOTP, ignored", packet.xid, peer[0])
            return []
        # The values' own get, not Request.option's Python call (parse_request's Request).
        if packet.values.get(_VENDOR_CLASS) == PROBE_VENDOR_CLASS:
            return []
        if (packet.giaddr != ZERO_IP and not pxe_port
                and not relay_allowed(packet.giaddr, self._networks)):
            # Answered, the reply would go to giaddr:67 (pxe.reply_destination): dropped
            # unless the relay is on a network served (relay_allowed). Logged under one
            # key, not per giaddr: a host writes any address there.
            self.summary.note("relay not allowed")
            self._limited.log(logging.WARNING, "relay",
                              "dhcp: xid %#010x from %s: relayed by %s, which is in no "
                              "network served nor in dhcp.relay_networks: dropped",
                              packet.xid, peer[0], packet.giaddr)
            return []
        # The link a machine was seen on is part of what discovery records.
        client = self._classifier.classify(packet, peer[0], interface)
        if pxe_port or self._settings.mode == "proxy":
            return self._proxy(packet, client, peer, server_ip, pxe_port, keep)
        if (interface is not None and packet.giaddr == ZERO_IP
                and interface not in self._pool_links):
            self._no_pool_here(interface)
            return []
        return self._authoritative(packet, client, peer, server_ip, interface)

    def _no_pool_here(self, interface: str) -> None:
        """A request that was not relayed, on an interface off the pool's network: dropped
        (LeasePool.links), said once per interface."""
        self.summary.note("no pool on the interface")
        if interface not in self._told_no_pool:
            self._told_no_pool.add(interface)
            _log.warning("dhcp: no address range available for DHCP request via %s: no "
                         "address of it is on the pool's network %s "
                         "(dhcp.authoritative.pool_start, netmask); its requests are not "
                         "answered (as dnsmasq). Name the provisioning interface "
                         "(server.interfaces) to listen there only", interface,
                         self._settings.network())

    async def _decide(self, client: Client, xid: int) -> FirstStage | None:
        try:
            decision = _settled(self._first_stage(client.request))
        except Exception as exc:
            self._decision_failed(exc, client, xid)
            return None
        if inspect.isawaitable(decision):
            return await self._settle(decision, client, xid)
        return decision

    async def _settle(
        self, decision: Awaitable[FirstStage | None], client: Client, xid: int
    ) -> FirstStage | None:
        """Wait for a decision that needs the store, at most ``decide_timeout``."""
        mac = client.request.mac
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the call in a second
            # task, which was a tenth of the cost of a proxy offer.
            async with asyncio.timeout(self._decide_timeout):
                return await decision
        except TimeoutError:
            self.summary.note("decision timed out")
            self._limited.log(
                logging.WARNING, "decide",
                "dhcp: %s xid %#010x: no boot decision within %.1fs, staying silent",
                mac, xid, self._decide_timeout,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this request's own task: the server is stopping
            # The decision ended cancelled though nobody cancelled this request (what a
            # shared store read did when its first caller timed out): a failed decision,
            # said as one, never a request dropped with nothing logged.
            self.summary.note("decision cancelled")
            _log.error("dhcp: %s xid %#010x: boot decision cancelled, staying silent", mac,
                       xid)
        except Exception as exc:
            self._decision_failed(exc, client, xid)
        return None

    def _decision_failed(self, exc: Exception, client: Client, xid: int) -> None:
        mac = client.request.mac
        if isinstance(exc, StoreError):  # the disk or the database, not a bug: no traceback
            self._limited.log(logging.WARNING, "store",
                              "dhcp: %s xid %#010x: no boot decision, inventory unavailable: %s",
                              mac, xid, exc)
        else:
            _log.error("dhcp: %s xid %#010x: boot decision failed", mac, xid, exc_info=exc)

    async def _fixed(self, mac: str, xid: int) -> str | None:
        fixed_address = self._fixed_address
        if fixed_address is None:
            return None
        try:
            return await asyncio.wait_for(fixed_address(mac), self._decide_timeout)
        except TimeoutError:
            self._limited.log(logging.WARNING, "fixed",
                              "dhcp: %s xid %#010x: fixed-address lookup timed out", mac, xid)
        except StoreError as exc:
            self._limited.log(logging.WARNING, "store",
                              "dhcp: %s xid %#010x: fixed-address lookup failed: %s", mac, xid,
                              exc)
        except Exception:
            _log.exception("dhcp: %s xid %#010x: fixed-address lookup failed", mac, xid)
        return None

    async def _sibling(self, mac: str, other: str | None) -> str | None:
        """``other`` if it is another NIC of ``mac``'s machine (the fixed address's taker:
        LeasePool.fixed_refused), else None. Which machine a NIC is, is the decider's to
        tell (BootService.same_machine, from its view), asked only when there is one."""
        same = self._same_machine
        if other is None or same is None:
            return None
        try:
            sibling = await asyncio.wait_for(same(mac, other), self._decide_timeout)
        except Exception as exc:  # refused as before: the warning names the holder
            _log.debug("dhcp: %s: which machine it is not known: %r", mac, exc)
            return None
        return other if sibling else None

    async def _moved(self, old: str, new: str, xid: int, ip: str) -> None:
        """``new``'s ACK of its machine's fixed address ``ip`` ended ``old``'s lease of it
        (one holder at a time: LeasePool.moved_from), whose renewal is NAKed from now on.
        Said once per move, in the log and as the machine's event: a NIC replaced or the
        machine booted from its other port, or a host that sent the machine's UUID."""
        self.summary.note("fixed address moved")
        # Limited per address: a host moving it back and forth is not a line a packet.
        self._limited.log(logging.WARNING, f"moved {ip}",
                          "dhcp: %s xid %#010x: fixed address %s moved from NIC %s to NIC %s (same "
                          "machine); %s's lease of it ended, its renewal is NAKed. Not a NIC of "
                          "this machine? A host sent its UUID", new, xid, ip, old, new, old)
        moved = self._fixed_moved
        if moved is None:
            return
        try:
            await asyncio.wait_for(moved(old, new, ip), self._decide_timeout)
        except Exception as exc:  # the ACK stands; the log line above said it
            _log.debug("dhcp: %s: the move's event not recorded: %r", new, exc)

    def _reply(
        self, packet: dhcp.Inbound, reply: dhcp.Packet, peer: Address, pxe_port: bool
    ) -> Reply:
        dest = pxe.reply_destination(
            packet, reply, peer, pxe_port=pxe_port, broadcast=self._broadcast,
            client_port=self._client_port, relay_port=self._relay_port,
        )
        return dhcp.encode(reply, pad_to=MIN_PACKET_SIZE), dest

    def _proxy(
        self, packet: dhcp.Inbound, client: Client, peer: Address, server_ip: str,
        pxe_port: bool, keep: tuple[_Answers, _AnswerKey] | None = None,
    ) -> list[Reply] | Awaitable[list[Reply]]:
        mac = client.request.mac
        if not pxe.proxy_should_answer(client, pxe_port=pxe_port, settings=self._settings):
            _log.debug(
                "dhcp: %s xid %#010x from %s: %s %r not a proxy request, ignored", mac,
                packet.xid, peer[0], _name(client.message_type), client.vendor_class,
            )
            return []
        decision: FirstStage | Awaitable[FirstStage | None] | None
        try:
            decision = _settled(self._first_stage(client.request))
        except Exception as exc:
            # The same boundary as an awaited decision: logged, silent, keep serving.
            self._decision_failed(exc, client, packet.xid)
            decision = None
        if decision is None or isinstance(decision, FirstStage):
            return self._proxy_answer(decision, packet, client, peer, server_ip, pxe_port,
                                      keep)
        return self._proxy_later(decision, packet, client, peer, server_ip, pxe_port, keep)

    async def _proxy_later(
        self, decision: Awaitable[FirstStage | None], packet: dhcp.Inbound, client: Client,
        peer: Address, server_ip: str, pxe_port: bool,
        keep: tuple[_Answers, _AnswerKey] | None = None,
    ) -> list[Reply]:
        stage = await self._settle(decision, client, packet.xid)
        # Kept too: the decider's guard for a decision that waited (a sync first) is the one
        # taken when it decided, not now (boot._Decided.later).
        return self._proxy_answer(stage, packet, client, peer, server_ip, pxe_port, keep)

    def _proxy_answer(
        self, stage: FirstStage | None, packet: dhcp.Inbound, client: Client, peer: Address,
        server_ip: str, pxe_port: bool,
        keep: tuple[_Answers, _AnswerKey] | None = None,
    ) -> list[Reply]:
        mac = client.request.mac
        if stage is None:
            self.summary.note("silent (no boot)")
            _log.debug("dhcp: %s xid %#010x from %s: no boot for %s, silent", mac, packet.xid,
                       peer[0], client.firmware)
            return []
        try:
            data, reply = self._replies.encode(packet, client, stage, server_ip=server_ip,
                                               pxe_port=pxe_port)
        except Unanswerable as exc:
            self.summary.note("unanswerable")
            self._limited.log(logging.WARNING, str(mac),
                              "dhcp: %s xid %#010x from %s: cannot answer: %s", mac,
                              packet.xid, peer[0], exc)
            return []
        out = data, pxe.reply_destination(
            packet, reply, peer, pxe_port=pxe_port, broadcast=self._broadcast,
            client_port=self._client_port, relay_port=self._relay_port)
        kind = _PROXY_KIND[client.message_type == _DISCOVER]
        self.summary.note(kind)
        observed = None
        if self._observer is not None:
            observed = (_name(reply.message_type), str(client.firmware),
                        str(client.request.arch))
            self._observer.dhcp_reply(*observed)
        if _log.isEnabledFor(logging.DEBUG):  # the arguments cost more than the call
            _log.debug(
                "dhcp: %s xid %#010x from %s: %s (%s, arch %s) file %r to %s:%d", mac,
                packet.xid, peer[0], kind, client.firmware, client.request.arch_code,
                reply.file_name, out[1][0], out[1][1],
            )
        if keep is not None and self._repeat_guard is not None:
            holds = self._repeat_guard(client.request, stage)
            if holds is not None:
                answers, key = keep
                if len(answers) >= ANSWERS_KEPT:
                    answers.popitem(last=False)  # the oldest: insertion order is age
                answers[key] = _Answer(
                    data[:4], data[8:10], data[12:], out[1], holds, pxe_port, kind,
                    observed or (_name(reply.message_type), str(client.firmware),
                                 str(client.request.arch)),
                    (mac, kind, client.firmware, client.request.arch_code, reply.file_name,
                     out[1][0], out[1][1]))
        return [out]

    async def _authoritative(
        self, packet: dhcp.Inbound, client: Client, peer: Address, server_ip: str,
        interface: str | None = None,
    ) -> list[Reply]:
        # Always a coroutine: the fixed address may wait for the decider's view to sync.
        pool = self.pool
        assert pool is not None
        mac = str(client.request.mac)
        xid = packet.xid
        now = self._clock()
        self._persist(pool.expire(now))
        if self._in_use and any(pool.marked_until(ip, now) is None for ip in self._in_use):
            self._tell_in_use(now)
        if packet.giaddr != ZERO_IP and not pool.on_network(packet.giaddr):
            # Allowed by dhcp.relay_networks, but the pool's addresses are of its own network
            # only: nothing to offer a client behind that relay.
            self.summary.note("relay off the pool's network")
            _log.debug("dhcp: %s xid %#010x: relayed from %s, not our network", mac, xid,
                       packet.giaddr)
            return []
        mt = client.message_type
        server_id = _ip_opt(packet.option(Opt.SERVER_ID))
        requested = _ip_opt(packet.option(Opt.REQUESTED_IP))

        if mt == MessageType.DECLINE:
            if server_id in (None, server_ip) and requested:
                changes = pool.decline(mac, requested, now)
                if changes is None:
                    # Not the address this server gave that client (LeasePool.decline):
                    # dropped, logged under one key, not per MAC (random MACs would each
                    # get a line).
                    self.summary.note("decline refused")
                    self._limited.log(logging.WARNING, "decline refused",
                                      "dhcp: %s xid %#010x from %s: DECLINE of %s dropped: not "
                                      "the address offered or leased to it (RFC 2131 §4.3.3)",
                                      mac, xid, peer[0], requested)
                    return []
                self._persist(changes)
                self.summary.note("declined")
                self._limited.log(logging.WARNING, mac,
                                  "dhcp: %s xid %#010x: declined %s (address in use?), marked "
                                  "bad for %ds", mac, xid, requested, pool.decline_seconds)
            return []
        if mt == MessageType.RELEASE:
            if server_id in (None, server_ip):
                self._persist(pool.release(mac, packet.ciaddr))
                self.summary.note("released")
                _log.debug("dhcp: %s xid %#010x: released %s", mac, xid, packet.ciaddr)
            return []
        if mt == MessageType.REQUEST and server_id is not None and server_id != server_ip:
            pool.not_selected(mac)  # RFC 2131 §4.3.2: the client chose another server
            return []
        if mt not in (MessageType.DISCOVER, MessageType.REQUEST, MessageType.INFORM):
            return []
        if (mt != MessageType.DISCOVER and packet.ciaddr != ZERO_IP
                and not pool.on_network(packet.ciaddr)):
            # The ACK would be unicast there (RFC 2131 §4.1): a client's own address is on
            # the network served (§4.3.5: an INFORM's is checked "for consistency"); another
            # is a host aiming the reply at someone else (s36-udp). (An OFFER is broadcast:
            # pxe.reply_destination.)
            _log.debug("dhcp: %s xid %#010x: ciaddr %s, not our network", mac, xid,
                       packet.ciaddr)
            return []

        stage_task = self._decide(client, xid) if client.pxe else _none()
        fixed, stage = await asyncio.gather(self._fixed(mac, xid), stage_task)
        if fixed is not None and (why := pool.fixed_refused(
                mac, fixed, now, await self._sibling(mac, pool.taker(fixed, mac, now)))) \
                is not None:
            # dnsmasq's "not using configured address": a pool address instead.
            self._limited.log(logging.WARNING, f"fixed {mac}",
                              "dhcp: %s xid %#010x: not using its fixed_ipv4 %s: %s; offered "
                              "an address of the pool instead (as dnsmasq does). Give the "
                              "machine another fixed_ipv4", mac, xid, fixed, why)
            fixed = None
        hostname = client.request.hostname
        if mt == MessageType.DISCOVER:
            ip = await self._offer(pool, mac, now, requested, fixed, hostname,
                                   interface=interface, xid=xid,
                                   relay=packet.giaddr if packet.giaddr != ZERO_IP else None)
            if ip == "":  # its pings all answered: silent, its next DISCOVER goes on
                self.summary.note("offer deferred (pings answered)")
                return []
            if ip is None and fixed is None:
                # No free address: one only offered to another client, held for neither
                # (LeasePool.shared_offer): DISCOVERs alone no longer exhaust the pool.
                ip = pool.shared_offer(mac, now)
                if ip is not None:
                    self.summary.note("shared offer")
            if ip is None:
                self.summary.note("pool exhausted")
                held = sum(1 for ip in self._in_use if pool.marked_until(ip, now) is not None)
                self._limited.log(logging.WARNING, "pool",
                                  "dhcp: %s xid %#010x: address pool exhausted, no offer%s",
                                  mac, xid, "" if not held else
                                  f"; {held} of its addresses answered a ping and answer "
                                  "still (see the address-in-use notices): a host answering "
                                  "for addresses it does not hold (proxy ARP, spoofed echo "
                                  "replies) shows one MAC for them all in 'ip neigh'; remove "
                                  "it, or set dhcp.ping_check: false")
                return []
            grant = AddressGrant(MessageType.OFFER, ip, pool.lease_seconds)
        elif mt == MessageType.INFORM:
            # RFC 2131 §4.3.5: configuration only; no yiaddr, no lease time, to ciaddr.
            grant = AddressGrant(MessageType.ACK, ZERO_IP, None)
        else:
            ip = requested or (packet.ciaddr if packet.ciaddr != ZERO_IP else None)
            if ip is None:
                return []
            holder = pool.holder(ip)
            held = holder is not None and holder != mac and pool.taker(ip, mac, now) == holder
            # An offer of it to another client that this REQUEST takes (a shared offer's
            # address): its claim in the inventory is this server's, taken over below.
            taken = pool.offered_elsewhere(ip, mac, now) if server_id is not None else None
            lease = pool.request(mac, ip, now, fixed=fixed, hostname=hostname,
                                 selecting=server_id is not None)
            if lease is None:
                grant = AddressGrant(MessageType.NAK, message=f"{ip} is not available")
            elif fixed is None and not await self._claim(
                    pool, lease, now, over=None if taken is None else taken.expires):
                # Another server sharing the inventory bound it first: the client starts
                # over (RFC 2131 §4.3.2) and is offered a free address.
                grant = AddressGrant(MessageType.NAK, message=f"{ip} is not available")
            else:
                # Claimed already, unless fixed or the inventory was away; written again in
                # the background all the same, after any change still queued for this MAC.
                # The lease this one ended (a fixed address another NIC of the machine held,
                # _sibling) ends in the same write (put_lease's ``ending``): the inventory
                # holds one lease an address, at every instant.
                if holder is not None and holder != mac and pool.lease(holder) is None:
                    self._ending[mac] = holder
                    self._pending.pop(holder, None)
                    if held and fixed is not None:  # a live lease of it: said
                        await self._moved(holder, mac, xid, ip)
                self._persist(Changes(put=(lease,)))
                grant = AddressGrant(MessageType.ACK, ip, pool.lease_seconds)
        boot = stage if grant.message_type != MessageType.NAK else None
        try:
            reply = pxe.authoritative_reply(
                packet, client, grant, boot, server_ip=server_ip, settings=self._settings
            )
        except Unanswerable as exc:
            self._limited.log(logging.WARNING, mac, "dhcp: %s xid %#010x: no boot file: %s",
                              mac, xid, exc)
            reply = pxe.authoritative_reply(
                packet, client, grant, None, server_ip=server_ip, settings=self._settings
            )
        out = self._reply(packet, reply, peer, False)
        self.summary.note(_name(grant.message_type))
        if self._observer is not None:
            self._observer.dhcp_reply(_name(grant.message_type), str(client.firmware),
                                      str(client.request.arch))
        _log.debug("dhcp: %s xid %#010x from %s: %s %s file %r to %s:%d", mac, xid, peer[0],
                  _name(grant.message_type), grant.yiaddr, reply.file_name, out[1][0], out[1][1])
        return [out]

    async def _offer(self, pool: LeasePool, mac: str, now: float, requested: str | None,
                     fixed: str | None, hostname: str | None, *,
                     interface: str | None = None, xid: int = 0,
                     relay: str | None = None) -> str | None:
        """An address for a DISCOVER, claimed in the inventory for the offer's lifetime
        before it is offered: servers sharing the inventory never offer one address to two
        clients. Refused (another server's), the next free address is tried. With the ping
        check, one not known free is pinged first (held as this client's offer meanwhile,
        so that no other client is offered it); answered, the next is tried. "" when
        PINGS_PER_DISCOVER answered: the DISCOVER is left unanswered. With no free address
        left, the address marked in use the longest ago is pinged again and, silent now,
        taken back (LeasePool.reclaimable, ISC dhcpd's reclaim of abandoned leases)."""
        pings = 0
        tried: list[str] = []  # addresses that answered this DISCOVER's pings
        checks = self._checks
        for _ in range(CLAIM_ATTEMPTS):
            ip = pool.offer(mac, now, requested=requested, fixed=fixed)
            if fixed is not None:
                return ip
            reclaiming = ip is None
            if ip is None:
                if checks is None or not self._pinging() or pings == PINGS_PER_DISCOVER:
                    return None
                ip = pool.reclaimable(mac, now, skip=tried)
                if ip is None:
                    return None
                tried.append(ip)
            if checks is not None and (reclaiming or checks.needed(
                    ip, now, lease=pool.lease(mac), fixed=fixed)):
                if pings == PINGS_PER_DISCOVER:
                    pool.not_selected(mac)  # the address is not held for an offer not made
                    return ""
                pings += 1
                answered = await self._ping(ip, interface, relay is not None)
                now = self._clock()
                if answered:
                    self._answered_ping(pool, mac, ip, now, xid, _where(interface, relay))
                    tried.append(ip)  # not pinged again for this DISCOVER, as a reclaim
                    continue
                if answered is not None:
                    checks.found_free(ip, now)
                    _log.debug("dhcp: %s xid %#010x: %s did not answer a ping%s: offered",
                               mac, xid, ip, _where(interface, relay))
                elif reclaiming:
                    continue  # not checked: a mark is taken back on a ping's word only
                if reclaiming:
                    self._reclaimed(pool, mac, ip, now, xid)
                if pool.offer(mac, now, requested=ip) != ip:
                    continue  # gone while it was pinged (the host's own address, a claim)
            current = pool.lease(mac)
            # Never shorten the client's own lease to the offer's lifetime.
            expires = max(now + pool.offer_seconds,
                          current.expires if current and current.ipv4 == ip else 0.0)
            if await self._claim(pool, Lease(mac, ip, expires, hostname), now):
                return ip
        return None

    def _reclaimed(self, pool: LeasePool, mac: str, ip: str, now: float, xid: int) -> None:
        """``ip``, marked in use and the pool's last hope, was silent when pinged again:
        taken back and said (the operator learns the pool is full)."""
        mark = pool.reclaim(ip, now)
        if mark is None:
            return  # another DISCOVER took it back meanwhile: pool.offer says who has it
        answered, since = mark
        self.summary.note("reclaimed")
        self._limited.log(
            logging.WARNING, f"reclaim {ip}",
            "dhcp: %s xid %#010x: no free address in the pool: %s, which %s %ds ago, did not "
            "answer a ping now and is offered again (the oldest such address, as ISC dhcpd "
            "reclaims abandoned leases). Widen the pool (dhcp.authoritative.pool_start/"
            "pool_end) or shorten dhcp.authoritative.lease_seconds", mac, xid, ip,
            "answered a ping" if answered else "a client declined", now - since)
        if ip in self._in_use:
            self._tell_in_use(now)

    def _pinging(self) -> bool:
        """Whether offers may wait for a ping (authoritative, dhcp.ping_check)."""
        return self._checks is not None and self._settings.mode == "authoritative"

    async def _ping(self, ip: str, interface: str | None, relayed: bool = False
                    ) -> bool | None:
        """Whether ``ip`` answers an echo; None when not checked.

        A DISCOVER that came in on an interface, not relayed: from that interface
        (SO_BINDTODEVICE), where the address is. A relayed one (giaddr): the address is on
        the relay's far network, which the kernel's routes reach (the OFFER goes to giaddr
        by the same routes), so from no interface in particular: bound to the DISCOVER's,
        a route to that network through another interface was not taken and the kernel,
        taking the address as on that link, ARPed for it where it is not (found free). The
        one socket for every interface (none named) does not tell which one a DISCOVER
        came in on: by the routes too, where the pool's network is one of this host's
        links (the route to a pool address is then that link's); otherwise not checked
        (said once)."""
        pinger = self._pinger
        if pinger is None:
            return None
        if relayed:
            interface = None
        elif interface is None and not self._pool_links:
            if not self._told_no_link:
                self._told_no_link = True
                _log.warning("dhcp: ping check off for requests that are not relayed: DHCP "
                             "listens on one socket for every interface, which does not tell "
                             "the link a DISCOVER came in on, and no interface of this host "
                             "has an address on the pool's network. Name the provisioning "
                             "interface (server.interfaces)")
            return None
        try:
            return await pinger.answers(ip, interface)
        except OSError as exc:
            _log.debug("dhcp: ping of %s on %s failed: %s", ip, interface, exc)
            return None

    def _answered_ping(self, pool: LeasePool, mac: str, ip: str, now: float, xid: int,
                       where: str) -> None:
        """``ip`` answered: kept from every client (LeasePool.in_use), said in the log,
        the summary and the operator's standing notices; its offer to ``mac`` withdrawn."""
        pool.in_use(ip, now)
        assert self._checks is not None
        self._checks.forget(ip)
        self.summary.note("in use (answered a ping)")
        text = (f"dhcp: {ip} answered a ping{where}: in "
                f"use by a host that is not in the lease table; not offered for "
                f"{pool.decline_seconds}s, or until no other address is free and it answers "
                "no more. Give that host an address outside the pool "
                "(dhcp.authoritative.pool_start/pool_end), or enroll it with its fixed_ipv4")
        self._limited.log(logging.WARNING, f"in use {ip}", "%s (xid %#010x from %s)", text,
                          xid, mac)
        self._in_use[ip] = text
        self._tell_in_use(now)

    def _tell_in_use(self, now: float) -> None:
        """The notices of the addresses the pool keeps as in use now (LeasePool's marks),
        told when they changed."""
        in_use, pool = self._in_use, self.pool
        kept = [] if pool is None else [(ip, text, pool.marked_until(ip, now))
                                        for ip, text in in_use.items()]
        for ip, _, until in kept:
            if until is None:
                del in_use[ip]
        if self._in_use_told is not None:
            self._in_use_told([(ip, text, until) for ip, text, until in kept
                               if until is not None])

    async def _claim(self, pool: LeasePool, lease: Lease, now: float, *,
                     over: float | None = None) -> bool:
        """Write ``lease`` to the inventory before answering; False if the inventory says
        another MAC holds the address (another server's client). ``over``: the end of this
        server's claim of the address for the offer to another client that the lease takes
        (LeasePool.offered_elsewhere), which may go then; a lease ending later may not."""
        try:
            await self._store.put_lease(lease, now=now if over is None else max(now, over))
        except Conflict:
            pool.held_elsewhere(lease.ipv4, now + pool.offer_seconds)
            _log.info("dhcp: %s: %s is held through another server; trying another",
                      lease.mac, lease.ipv4)
            return False
        except NetbootError as exc:
            # The inventory is away: answer from this server's pool (clients must get
            # addresses); a bound lease is written when it is back.
            self._limited.log(logging.WARNING, "store", "dhcp: %s: cannot claim %s in the "
                              "inventory (%s); answering from this server's pool",
                              lease.mac, lease.ipv4, exc)
        return True

    # -- start-up probe for other DHCP servers -----------------------------------------------

    async def _probe_for_servers(self, targets: list[tuple[str | None, str]]) -> None:
        for interface, server_ip in targets:
            if interface is None:
                continue
            try:
                others = await self.probe_interface(interface, server_ip)
            except OSError as exc:
                _log.info("dhcp: %s: could not probe for other DHCP servers: %s", interface, exc)
                continue
            for other in others:
                _log.warning(
                    "dhcp: %s: ANOTHER DHCP SERVER (%s) answers on this link; authoritative "
                    "mode will fight it. Use proxy mode (dhcp.mode: proxy) here.",
                    interface, other,
                )

    async def probe_interface(self, interface: str, server_ip: str) -> list[str]:
        """Broadcast one DISCOVER on ``interface`` and return the server ids of other servers
        that offer within ``probe_seconds``. Only called on an explicit start."""
        loop = asyncio.get_running_loop()
        chaddr = bytes([0x02]) + os.urandom(5)  # locally administered: never a real NIC
        xid = int.from_bytes(os.urandom(4), "big")
        probe = dhcp.Packet(
            op=Op.REQUEST, xid=xid, chaddr=chaddr, flags=dhcp.BROADCAST_FLAG,
            options=(
                dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),
                dhcp.Option(Opt.VENDOR_CLASS, PROBE_VENDOR_CLASS),
            ),
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        found: list[str] = []
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, interface.encode())
            sock.bind(("0.0.0.0", self._client_port))
            sock.setblocking(False)
            # A plain sendto: one datagram on a fresh socket does not block, and uvloop
            # has no loop.sock_sendto.
            sock.sendto(dhcp.encode(probe, pad_to=MIN_PACKET_SIZE), (self._broadcast, self._port))
            deadline = loop.time() + self._probe_seconds
            while (left := deadline - loop.time()) > 0 and len(found) < 16:
                try:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                except TimeoutError:
                    break
                try:
                    answer = dhcp.parse(data)
                except DecodeError:
                    continue
                if answer.xid != xid or answer.message_type != MessageType.OFFER:
                    continue
                other = _ip_opt(answer.option(Opt.SERVER_ID)) or answer.siaddr
                if other != server_ip and other not in found:
                    found.append(other)
        finally:
            sock.close()
        return found


# What a proxy reply is, by "answers a DISCOVER" (pxe.proxy_reply's rule).
_PROXY_KIND = {True: "proxy OFFER", False: "proxy ACK"}


# A message type's name by a dict: an enum member's ``name`` is a Python-level descriptor
# on 3.11 (enum.property), ~1 µs, and every answer decided names its type (the metrics'
# dhcp_reply; s38-dhcp1st).
_NAMES: dict[MessageType | None, str] = {None: "BOOTP", **{mt: mt.name for mt in MessageType}}


def _name(mt: MessageType | None) -> str:
    return _NAMES[mt]


def _settled(
    decision: FirstStage | Awaitable[FirstStage | None] | None,
) -> FirstStage | Awaitable[FirstStage | None] | None:
    """A future that is already done is its value (or raises its error): the decider knew
    the answer at once and wrapped it only for callers that await."""
    if isinstance(decision, asyncio.Future) and decision.done():
        return cast(FirstStage | None, decision.result())
    return decision


async def _none() -> None:
    return None


def _ip_opt(value: bytes | None) -> str | None:
    if value is None or len(value) != 4:
        return None
    return str(ipaddress.IPv4Address(value))
