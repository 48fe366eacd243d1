"""asyncio DNS listeners (UDP and TCP on one port) and an asynchronous upstream forwarder.

Thin adapters around :mod:`netboot.names`: bytes in → :func:`~netboot.names.parse_query` →
:func:`~netboot.names.answer` against the current :class:`~netboot.names.Zone` snapshot →
bytes out. dnslib is only the codec: its own server is threaded and its resolvers block
(protocols.md §7.1), so nothing of it that does I/O is used here.

Names outside the zone go to the configured upstream resolvers: the client's raw query is sent
with only the ID rewritten to a fresh random one (so EDNS and DNSSEC bits survive), from a
connected UDP socket of its own (a random source port each, RFC 5452 §9.2); a reply counts
only if it comes from that upstream, carries the ID we chose and echoes the question byte for
byte. Each upstream gets ``timeout`` seconds, then the next one is tried, then the client gets
SERVFAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from netboot.errors import ConfigError, DecodeError
from netboot.logs import RateLimitedLog
from netboot.names import (
    DEFAULT_MAX_UDP,
    REFUSED,
    SERVFAIL,
    Answer,
    Forward,
    Ignore,
    Zone,
    answer,
    answer_plain,
    error_reply,
    fit_udp,
    formerr_for,
    parse_query,
)
from netboot.rrl import SEND, SLIP, Limits, ResponseRateLimiter, answer_token, slip_reply
from netboot.servers import sockets
from netboot.servers.udp import Address, BoundaryProtocol, Reply
from netboot.wire.dns import parse_plain_query

if TYPE_CHECKING:
    from netboot.config import DnsRateLimitConfig

_log = logging.getLogger(__name__)

_HEADER = 12  # RFC 1035 §4.1.1: fixed header size; nothing shorter is a DNS message
_PORT_ATTEMPTS = 10  # port 0: tries to find a number free for both UDP and TCP


class ZoneSource(Protocol):
    """Where the answer path gets the current snapshot; never awaits the inventory."""

    def zone(self) -> Zone: ...


def _question_of(data: bytes) -> tuple[int, bool, int, tuple[bytes, ...], int, int] | None:
    """ID, TC, RCODE and the (raw) question of a reply, without parsing its records.

    Only the header and question are needed to match a reply to its query; parsing the
    answer would make us drop replies whose record types dnslib does not know. (dnslib is
    imported here, by the forwarder: plain queries are answered without it.)
    """
    from dnslib import DNSBuffer, DNSError, DNSHeader, DNSQuestion

    try:
        buf = DNSBuffer(data)
        header = DNSHeader.parse(buf)
        if not header.qr or header.q != 1:
            return None
        q = DNSQuestion.parse(buf)
    except (DNSError, ValueError, IndexError):
        return None
    return header.id, bool(header.tc), int(header.rcode), tuple(q.qname.label), q.qtype, q.qclass


def cache_key(data: bytes) -> tuple[bytes, int] | None:
    """Key of a plain query for the answer cache, and where its question ends.

    Only a query with one question, no answer or authority records and at most one
    additional (the EDNS OPT) qualifies; the name is compared without case (RFC 4343) but
    its bytes are echoed from each query, so 0x20 case randomisation still works. The key
    keeps the flags (RD, CD), the counts, qtype/qclass and the OPT record as they came.
    """
    if len(data) < 17 or data[2] & 0x80 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    if data[10:12] not in (b"\x00\x00", b"\x00\x01"):
        return None
    i = 12
    while True:
        if i >= len(data):
            return None
        n = data[i]
        if n == 0:
            break
        if n & 0xC0:
            return None  # a compression pointer in a query: leave it to the full parser
        i += 1 + n
    qend = i + 5
    if qend > len(data):
        return None
    # Lower only the name: qtype/qclass bytes may fall in A-Z (type 65 is 0x0041).
    return data[2:12] + data[12:i].lower() + data[i:], qend


class _AnswerCache:
    """Packed answers by query shape, valid for one zone snapshot (DNS boot storms ask the
    same few names, a cluster endpoint above all). Bounded; emptied when the zone changes.
    Each answer is kept with its rate limiter's account (:func:`netboot.rrl.answer_token`),
    read once when it is made: a cached answer is limited without reading the reply."""

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._zone: object | None = None
        self._answers: dict[bytes, tuple[bytes, bytes]] = {}
        self.hits = 0

    def get(self, zone: object, key: bytes, data: bytes, qend: int) -> tuple[bytes, bytes] | None:
        if zone is not self._zone:
            self._zone = zone
            self._answers.clear()
            return None
        cached = self._answers.get(key)
        if cached is None:
            return None
        self.hits += 1
        reply, token = cached
        # The query's own ID and question bytes (same length: same name but for case).
        return data[:2] + reply[2:12] + data[12:qend] + reply[qend:], token

    def put(self, zone: object, key: bytes, reply: bytes, token: bytes) -> None:
        if zone is not self._zone:
            return
        if len(self._answers) >= self._limit:
            self._answers.clear()
        self._answers[key] = (reply, token)


class _Upstream:
    """One upstream resolver. Each query goes from a socket of its own, connected to it: the
    kernel picks a random source port for each (RFC 5452 §9.2; dnsmasq's default, where
    ``--query-port`` "makes dnsmasq less secure against DNS spoofing attacks"). With one
    socket for all, the port was fixed for the process's life, and a host that can forge the
    upstream's address had a random 16-bit ID alone to guess: every forged reply it sprayed
    at that port matched a query in flight with odds of (queries in flight)/65,536.

    A plain non-blocking socket and the loop's reader callback, not an asyncio transport:
    one query's socket lives for one round trip, and a transport's set-up costs more than
    the exchange (s45-attack measured both).
    """

    def __init__(self, addr: Address) -> None:
        self.addr = addr
        # What each query's socket connects to, resolved once by check() (a name given as
        # an upstream would otherwise be looked up, blocking, at every query).
        self._family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._target: Any = addr
        self._open: dict[int, asyncio.Future[bytes]] = {}  # fd -> its query's answer
        self.rejected = 0
        # A spoofing attempt is a flood of wrong replies: one line per window, not per packet.
        self._limited = RateLimitedLog(_log)

    def _reject(self, key: str, message: str, *args: Any) -> None:
        self.rejected += 1
        self._limited.log(logging.INFO, key, message, *args)

    async def check(self) -> None:
        """An upstream a socket cannot be connected to is a config error, said at start."""
        found = await asyncio.get_running_loop().getaddrinfo(*self.addr, type=socket.SOCK_DGRAM)
        family, _, _, _, target = found[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(target)
        self._family, self._target = family, target

    def close(self) -> None:
        for answered in list(self._open.values()):  # the server stopping: each query fails
            if not answered.done():
                answered.set_exception(ConnectionError("the forwarder was closed"))

    def _readable(self, sock: socket.socket, qid: int, question: tuple[Any, ...],
                  answered: asyncio.Future[bytes]) -> None:
        while not answered.done():
            try:
                # Connected: the kernel delivers the upstream's datagrams only (RFC 5452 §9.3
                # checks the source too), so what is checked here is the ID and question.
                data = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP unreachable: the next upstream is tried
                _log.debug("dns upstream %s:%d: socket error %s", *self.addr, exc)
                answered.set_exception(exc)
                return
            parsed = _question_of(data)
            if parsed is None:
                self._reject("malformed", "dns upstream %s:%d: malformed reply dropped",
                             *self.addr)
                continue
            rid, _tc, _rcode, *asked = parsed
            if rid != qid or tuple(asked) != question:
                # A spoofing attempt (or a reply the upstream sent twice): not an answer.
                self._reject("mismatch", "dns upstream %s:%d: reply id %d does not match "
                             "the query in flight", *self.addr, rid)
                continue
            answered.set_result(data)

    async def query(self, raw: bytes, question: tuple[Any, ...], timeout: float) -> bytes | None:
        loop = asyncio.get_running_loop()
        qid = secrets.randbelow(65536)
        answered: asyncio.Future[bytes] = loop.create_future()
        try:
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
        except OSError as exc:  # out of descriptors: this query fails, not the server
            self._limited.log(logging.WARNING, "socket", "dns upstream %s:%d: no socket for "
                              "a query: %s", *self.addr, exc)
            return None
        fd = sock.fileno()
        try:
            sock.setblocking(False)
            sock.connect(self._target)
            loop.add_reader(fd, self._readable, sock, qid, question, answered)
            self._open[fd] = answered
            sock.send(qid.to_bytes(2, "big") + raw[2:])
            return await asyncio.wait_for(answered, timeout)
        except (TimeoutError, OSError):
            return None
        finally:
            if self._open.pop(fd, None) is not None:
                loop.remove_reader(fd)
            sock.close()

    async def query_tcp(
        self, raw: bytes, question: tuple[Any, ...], timeout: float
    ) -> bytes | None:
        """RFC 7766 §5: a truncated UDP reply is retried over TCP (for our TCP clients)."""
        qid = secrets.randbelow(65536)
        message = qid.to_bytes(2, "big") + raw[2:]

        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(*self.addr)
            try:
                writer.write(len(message).to_bytes(2, "big") + message)
                await writer.drain()
                size = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(size)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

        try:
            data = await asyncio.wait_for(exchange(), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None
        parsed = _question_of(data)
        if parsed is None or parsed[0] != qid or tuple(parsed[3:]) != question:
            return None
        return data


class Forwarder:
    """Forwards raw queries to upstream resolvers, at most ``max_in_flight`` at a time."""

    def __init__(
        self, upstreams: Sequence[tuple[str, int]], *, timeout: float, max_in_flight: int
    ) -> None:
        self._upstreams = [_Upstream((host, port)) for host, port in upstreams]
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self.in_flight = 0
        self.failures = 0

    async def start(self) -> None:
        for upstream in self._upstreams:
            try:
                await upstream.check()
            except OSError as exc:
                raise ConfigError(
                    f"upstream {upstream.addr[0]}:{upstream.addr[1]} unusable: {exc}",
                    key="dns.upstreams", fix="an IP address and port of a resolver",
                ) from exc

    def close(self) -> None:
        for upstream in self._upstreams:
            upstream.close()

    def reserve(self) -> bool:
        """Take a slot synchronously (before a task exists), so a burst cannot overshoot."""
        if self.in_flight >= self._max_in_flight:
            return False
        self.in_flight += 1
        return True

    async def forward(self, raw: bytes, question: tuple[Any, ...], *, tcp: bool) -> bytes | None:
        """The upstream reply with the client's ID put back, or ``None`` (→ SERVFAIL).

        The caller has :meth:`reserve`\\ d a slot; it is released here whatever happens.
        """
        try:
            fallback: bytes | None = None
            for upstream in self._upstreams:
                reply = await upstream.query(raw, question, self._timeout)
                if reply is None:
                    continue
                parsed = _question_of(reply)
                if tcp and parsed is not None and parsed[1]:
                    reply = await upstream.query_tcp(raw, question, self._timeout)
                    if reply is None:
                        continue
                    parsed = _question_of(reply)
                if parsed is not None and parsed[2] in (SERVFAIL, REFUSED):
                    fallback = fallback or reply  # another upstream may do better
                    continue
                return raw[:2] + reply[2:]
            if fallback is not None:
                return raw[:2] + fallback[2:]
            self.failures += 1
            return None
        finally:
            self.in_flight -= 1


def rate_limiter(config: DnsRateLimitConfig) -> ResponseRateLimiter | None:
    """The rate limiter of ``dns.rate_limit`` (None: off), one for every listener of the
    process: a client that reaches two of its addresses has one account."""
    if not config.enabled:
        return None
    return ResponseRateLimiter(Limits(
        responses_per_second=config.responses_per_second,
        nodata_per_second=config.nodata_per_second,
        nxdomains_per_second=config.nxdomains_per_second,
        errors_per_second=config.errors_per_second, all_per_second=config.all_per_second,
        window=config.window, slip=config.slip,
        ipv4_prefix_length=config.ipv4_prefix_length,
        ipv6_prefix_length=config.ipv6_prefix_length, exempt_clients=config.exempt_clients))


class DnsServer:
    """Authoritative for the zone of ``zone_source``, forwarding the rest (when enabled).

    Constructing binds nothing; :meth:`start` binds UDP and TCP on the same port, and
    :attr:`port` is the bound number afterwards (tests pass port 0).
    """

    def __init__(
        self,
        zone_source: ZoneSource,
        *,
        host: str,
        port: int = 53,
        upstreams: Sequence[tuple[str, int]] = (),
        forward: bool = True,
        timeout: float = 2.0,
        max_in_flight: int = 256,
        max_udp: int = DEFAULT_MAX_UDP,
        max_connections: int = 64,
        max_connections_per_source: int = 16,
        tcp_idle_timeout: float = 10.0,
        max_queries_per_connection: int = 1000,
        forwards_for: Callable[[str], bool] | None = None,
        rate_limiter: ResponseRateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = zone_source
        # Whose names outside the zone are forwarded (a client address -> yes/no); None:
        # everyone's. The others get REFUSED, as BIND answers a client allow-recursion
        # leaves out; names in the zone are answered to anyone.
        self._forwards_for = forwards_for
        self._host = host
        self._port = port
        self._recursion = forward and bool(upstreams)
        self._forwarder = Forwarder(upstreams, timeout=timeout, max_in_flight=max_in_flight)
        self._max_udp = max_udp
        self._cache = _AnswerCache()
        self._max_connections = max_connections
        # One client address holding every connection (64 idle ones, each closed after
        # tcp_idle_timeout and opened again) left no TCP for anyone else, where a truncated
        # answer must be asked again (s45-attack); HTTP bounds each source likewise.
        self._per_source_limit = max_connections_per_source
        self._per_source: dict[str, int] = {}
        self._idle = tcp_idle_timeout
        self._max_queries = max_queries_per_connection
        self._limited = RateLimitedLog(_log)
        # Response-rate limiting of UDP answers (None: off): the zone's answers are bigger
        # than the queries, and a forged source on the VLAN could aim them at a victim.
        self.rrl = rate_limiter
        self._clock = clock  # seconds, for the rate limiter (tests hold it still)
        self._ticking: asyncio.TimerHandle | None = None
        # The forwarder's reservation is the real bound; the boundary's is a backstop above
        # it so it never drops a coroutine that already holds a slot.
        self._protocol = BoundaryProtocol(
            "dns", self._on_datagram, logger=_log, min_size=_HEADER,
            max_in_flight=2 * max_in_flight + 8,
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        # The open connections waiting for a query (none in hand), longest waiting first,
        # each with its source's address (_close_longest_waiting picks by source).
        self._waiting: dict[asyncio.StreamWriter, str] = {}
        self.connections_refused = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def forwarder(self) -> Forwarder:
        return self._forwarder

    async def start(self) -> None:
        if self._recursion:
            await self._forwarder.start()
        loop = asyncio.get_running_loop()
        attempts = _PORT_ATTEMPTS if self._port == 0 else 1
        for _ in range(attempts):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self._protocol, local_addr=(self._host, self._port)
                )
            except OSError as exc:
                self._forwarder.close()
                raise self._bind_error(exc, "UDP", self._port) from exc
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._on_connection, self._host, port, reuse_address=True
                )
            except OSError as exc:
                transport.close()
                if self._port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the UDP number we got is taken for TCP: draw another
                self._forwarder.close()
                raise self._bind_error(exc, "TCP", port) from exc
            self._udp = transport
            self._port = port
            self._tick()
            _log.info("dns: listening on %s:%d (udp+tcp), forwarding %s",
                      self._host, port, "on" if self._recursion else "off")
            return
        self._forwarder.close()
        raise ConfigError(f"no port free for both UDP and TCP on {self._host} after "
                          f"{attempts} attempts", key="dns.port", fix="set --dns-port")

    def _bind_error(self, exc: OSError, proto: str, port: int) -> ConfigError:
        return sockets.bind_error(
            exc, what="DNS", proto=proto, host=self._host, port=port, key="dns.port",
            flag="--dns-port", address_key="dns.listen", others="dnsmasq or systemd-resolved",
        )

    def _tick(self) -> None:
        """The rate limiter's clock: told 4 times a second (a second's accounts roll over
        within a quarter of a second of its end), so that no answer reads the clock."""
        if self.rrl is None:
            return
        self.rrl.tick(self._clock())
        self._ticking = asyncio.get_running_loop().call_later(0.25, self._tick)

    async def close(self) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            self._ticking = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None
        await self._protocol.drain()
        self._forwarder.close()

    # -- the query path ----------------------------------------------------------------

    def _on_datagram(
        self, data: bytes, peer: Address
    ) -> Iterable[Reply] | Coroutine[Any, Any, list[Reply]] | None:
        zone = self._source.zone()
        shape = cache_key(data)
        rrl = self.rrl
        if shape is not None:
            hit = self._cache.get(zone, shape[0], data, shape[1])
            if hit is not None:  # a storm's answer: the cache's, limited in line (no call)
                reply, token = hit
                if rrl is None:
                    return [(reply, peer)]
                verdict = rrl.check(peer[0], token, reply[3] & 0x0F)
                return [(reply, peer)] if verdict == SEND else self._rate_limited(
                    reply, verdict, peer)
        return self._udp_replies(data, peer, zone, shape)

    def _limit(self, replies: list[Reply], token: bytes) -> list[Reply] | None:
        """``replies`` (one answer) as the rate limiter has it: sent, dropped or slipped.
        ``token`` is its account (:func:`netboot.rrl.answer_token`; unread for an error)."""
        rrl = self.rrl
        if rrl is None:
            return replies
        reply, peer = replies[0]
        verdict = rrl.check(peer[0], token, reply[3] & 0x0F)
        return replies if verdict == SEND else self._rate_limited(reply, verdict, peer)

    def _rate_limited(self, reply: bytes, verdict: int, peer: Address) -> list[Reply] | None:
        """A limited answer dropped, or slipped as an empty TC answer (:mod:`netboot.rrl`);
        the first of its network in a window told."""
        assert self.rrl is not None
        if self.rrl.first_in_window(peer[0], self._clock()):
            limits = self.rrl.limits
            slip = ("each sent empty with TC set" if limits.slip == 1 else "all dropped"
                    if not limits.slip else f"every {limits.slip}th sent empty with TC set, "
                    "the others dropped")
            _log.warning("dns: rate limit: more answers to %s than dns.rate_limit allows (%d "
                         "a second of each answer, %d NODATA a name, %d NXDOMAIN a zone, %d "
                         "errors, %s in all): the rest are %s (a real client asks again over "
                         "TCP; past all_per_second, dropped); told once per %d s a network; "
                         "%d dropped and %d truncated so far", self.rrl.prefix(peer[0]),
                         limits.responses_per_second, limits.nodata_per_second,
                         limits.nxdomains_per_second, limits.errors_per_second,
                         limits.all_per_second or "no limit", slip, limits.window,
                         self.rrl.dropped, self.rrl.slipped)
        if verdict == SLIP:
            return [(slip_reply(reply), peer)]
        return None

    def _udp_replies(
        self, data: bytes, peer: Address, zone: Zone, shape: tuple[bytes, int] | None
    ) -> list[Reply] | Coroutine[Any, Any, list[Reply]] | None:
        """The reply to a query the answer cache did not hold."""
        if shape is not None:
            # A name asked for the first time: the wire codec answers what is ours without
            # building dnslib objects; everything else goes the full way below.
            plain = parse_plain_query(data)
            if plain is not None:
                fast = answer_plain(zone, data, plain, max_udp=self._max_udp,
                                    recursion=self._recursion)
                if fast is not None:
                    token = self._token(fast.data, shape)
                    self._cache.put(zone, shape[0], fast.data, token)
                    return self._limit(self._answered(fast, peer), token)
        try:
            request = parse_query(data)
        except DecodeError as exc:
            self._limited.log(logging.INFO, peer[0], "dns: malformed query from %s:%d: %s",
                              peer[0], peer[1], exc)
            formerr = formerr_for(data)
            return self._limit([(formerr, peer)], b"") if formerr is not None else None
        decision = answer(zone, request, max_udp=self._max_udp, recursion=self._recursion)
        if isinstance(decision, Answer):
            token = self._token(decision.data, shape)
            if shape is not None:
                self._cache.put(zone, shape[0], decision.data, token)
            return self._limit(self._answered(decision, peer), token)
        if isinstance(decision, Ignore):
            _log.debug("dns: %s:%d ignored: %s", peer[0], peer[1], decision.reason)
            return None
        result = self._forward(data, request, decision, peer, tcp=False)
        # REFUSED or SERVFAIL (an error: limited); a forwarded answer (a coroutine) is the
        # upstream's, not limited: it goes to this host's networks only.
        return self._limit(result, b"") if type(result) is list else result

    def _token(self, reply: bytes, shape: tuple[bytes, int] | None) -> bytes:
        """An answer's account (read when limiting is on): the question's lowercased name
        and type are the cache key's where the query had one."""
        if self.rrl is None:
            return b""
        return answer_token(reply, None if shape is None else shape[0][10:shape[1] - 4])

    @staticmethod
    def _answered(decision: Answer, peer: Address) -> list[Reply]:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("dns: %s:%d %r rcode %d%s", peer[0], peer[1], decision.qname,
                       decision.rcode, " truncated" if decision.truncated else "")
        return [(decision.data, peer)]

    def _forward(
        self, data: bytes, request: Any, decision: Forward, peer: Address, *, tcp: bool
    ) -> list[Reply] | Coroutine[Any, Any, list[Reply]]:
        if self._forwards_for is not None and not self._forwards_for(peer[0]):
            self._limited.log(logging.INFO, peer[0], "dns: %s is on none of the networks "
                              "whose names outside the zone are forwarded (this host's, "
                              "dhcp.relay_networks, dns.forward_networks): REFUSED for %r",
                              peer[0], decision.qname)
            return [(error_reply(request, REFUSED, recursion=True), peer)]
        if not self._forwarder.reserve():
            self._limited.log(logging.WARNING, "busy",
                              "dns: %d forwarded queries in flight; SERVFAIL to %s:%d for %r",
                              self._forwarder.in_flight, peer[0], peer[1], decision.qname)
            return [(error_reply(request, SERVFAIL, recursion=True), peer)]
        q = request.q
        question = (tuple(q.qname.label), q.qtype, q.qclass)
        return self._forwarded(data, request, question, decision.qname, peer, tcp=tcp)

    async def _forwarded(
        self, data: bytes, request: Any, question: tuple[Any, ...], qname: str, peer: Address,
        *, tcp: bool,
    ) -> list[Reply]:
        reply = await self._forwarder.forward(data, question, tcp=tcp)
        if reply is None:
            self._limited.log(logging.WARNING, "upstream",
                              "dns: no upstream answered %r for %s:%d; SERVFAIL",
                              qname, peer[0], peer[1])
            return [(error_reply(request, SERVFAIL, recursion=True), peer)]
        _log.debug("dns: %s:%d %r forwarded", peer[0], peer[1], qname)
        return [(reply if tcp else fit_udp(request, reply, max_udp=self._max_udp), peer)]

    # -- TCP (RFC 7766) ----------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        name = writer.get_extra_info("peername") or ("?", 0)
        peer: Address = (str(name[0]), int(name[1]))
        mine = self._per_source.get(peer[0], 0)
        if len(self._writers) >= self._max_connections and mine < self._per_source_limit \
                and self._waiting:
            # Full: the connection waiting longest for a query goes, as nginx reuses its idle
            # keep-alive connections when it runs out (ngx_drain_connections). A host with
            # four addresses held all 64 (16 each), one query a connection every few seconds,
            # and every truncated answer's TCP retry was refused (s47-attack).
            self._close_longest_waiting(peer)
        if len(self._writers) >= self._max_connections or mine >= self._per_source_limit:
            # RFC 7766 §6.2.2 lets a server close connections to protect its resources.
            self.connections_refused += 1
            self._limited.log(logging.WARNING, "tcp-busy",
                              "dns: %d TCP connections open, %d of them from %s; closing one "
                              "from %s:%d", len(self._writers), mine, peer[0], peer[0], peer[1])
            writer.close()
            return
        self._writers.add(writer)
        self._per_source[peer[0]] = mine + 1
        try:
            await self._serve_connection(reader, writer, peer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or went quiet: normal end of a connection
        except Exception:  # the boundary: a bug in one connection never stops the listener
            _log.exception("dns: bug while serving TCP client %s:%d", peer[0], peer[1])
        finally:
            self._writers.discard(writer)
            self._waiting.pop(writer, None)
            left = self._per_source.pop(peer[0]) - 1
            if left:
                self._per_source[peer[0]] = left
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _close_longest_waiting(self, newcomer: Address) -> None:
        """Close, for ``newcomer``, the connection waiting longest for a query of the source
        that holds the most open. The longest waiting of all was a lone client's whose query
        had not arrived within ~64 accepts (a host opening connections as fast as they are
        accepted closed 9 of 20 'dig' clients asking 50 ms after connecting, s48-attack):
        by source, such a host's newcomers close its own connections first."""
        counts = self._per_source
        oldest = max(self._waiting, key=lambda w: counts.get(self._waiting[w], 0))
        del self._waiting[oldest]
        self._writers.discard(oldest)  # its source's count goes when its task ends
        name = oldest.get_extra_info("peername") or ("?", 0)
        self._limited.log(logging.INFO, "tcp-full",
                          "dns: %d TCP connections open; closing the one waiting longest for "
                          "a query (%s:%d) for %s:%d", self._max_connections, name[0],
                          name[1], newcomer[0], newcomer[1])
        oldest.transport.abort()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Address
    ) -> None:
        # RFC 7766 §6.2.1: several queries per connection, each with a 2-byte length prefix;
        # answered in order. §6.2.3: idle connections are closed after a timeout.
        for _ in range(self._max_queries):
            self._waiting[writer] = peer[0]  # the newest waiting
            head = await asyncio.wait_for(reader.readexactly(2), self._idle)
            size = int.from_bytes(head, "big")
            if size < _HEADER:
                self._limited.log(logging.INFO, peer[0], "dns: %d-byte TCP message from %s:%d",
                                  size, peer[0], peer[1])
                return
            data = await asyncio.wait_for(reader.readexactly(size), self._idle)
            self._waiting.pop(writer, None)  # a query in hand: answered before it may go
            reply = await self._tcp_reply(data, peer)
            if reply is None:
                continue
            writer.write(len(reply).to_bytes(2, "big") + reply)
            await asyncio.wait_for(writer.drain(), self._idle)

    async def _tcp_reply(self, data: bytes, peer: Address) -> bytes | None:
        zone = self._source.zone()
        plain = parse_plain_query(data)
        fast = None if plain is None else answer_plain(zone, data, plain, max_udp=None,
                                                       recursion=self._recursion)
        if fast is not None:
            return self._answered(fast, peer)[0][0]
        try:
            request = parse_query(data)
        except DecodeError as exc:
            self._limited.log(logging.INFO, peer[0], "dns: malformed TCP query from %s:%d: %s",
                              peer[0], peer[1], exc)
            return formerr_for(data)
        decision = answer(zone, request, max_udp=None, recursion=self._recursion)
        if isinstance(decision, Answer):
            return self._answered(decision, peer)[0][0]
        if isinstance(decision, Ignore):
            return None
        result = self._forward(data, request, decision, peer, tcp=True)
        replies = result if isinstance(result, list) else await result
        return replies[0][0]
