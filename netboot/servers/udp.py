"""The per-datagram error boundary shared by the DHCP, TFTP and DNS listeners.

One bad datagram never stops a server (DESIGN.md §4.3): the size is checked first, then each
datagram is handled inside a boundary where "not for us" is a debug line, a malformed packet is
an info line naming the peer and reason (rate-limited per peer), and a bug is logged with its
traceback, after which the listener keeps serving. Handlers may be sync or async; async ones run
as tasks with a bound on how many are in flight, so a slow decision cannot pile up unbounded.
Past that bound a datagram is dropped, or, where the listener has a waiting room, kept as it
came (its bytes) until a task ends, dropped only when the room is full or it waited longer than
an answer would be of use.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import errno
import inspect
import logging
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from netboot.errors import DecodeError, NetbootError
from netboot.logs import RateLimitedLog
from netboot.servers.sockets import SO_TIMESTAMPNS

Address = tuple[str, int]
Reply = tuple[bytes, Address]
Handler = Callable[[bytes, Address], Iterable[Reply] | Awaitable[Iterable[Reply]] | None]


class BoundaryProtocol(asyncio.DatagramProtocol):
    """asyncio adapter: datagram in → handler → zero or more replies out, never crashing."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        logger: logging.Logger,
        max_size: int = 65535,
        min_size: int = 1,
        max_in_flight: int = 256,
        max_waiting: int = 0,
        max_wait: float = 1.0,
    ) -> None:
        """``max_in_flight``: async handlers running at once. ``max_waiting``: datagrams kept
        unhandled, in arrival order, while that many run (0: none, dropped at once, after
        their handler was called); each is handled when a task ends, unless it has waited
        more than ``max_wait`` seconds by then."""
        self.name = name
        self._handler = handler
        self._log = logger
        self._limited = RateLimitedLog(logger)
        self._max_size = max_size
        self._min_size = min_size
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._max_waiting = max_waiting
        self._max_wait = max_wait
        # (datagram, peer, loop time it came): ~0.5-0.8 KB each (a DHCP request's 300-600
        # bytes, the peer, the tuple), against ~10 KB for a DHCP decision waiting as a task.
        self._waiting: deque[tuple[bytes, Address, float]] = deque()
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self.received = 0
        self.waited = 0  # datagrams handled after a wait for a task to end (tests)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The loop's UDP transport does not subclass asyncio.DatagramTransport on CPython 3.11
        # (_SelectorDatagramTransport), so an isinstance check would refuse a working socket.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting.clear()
        for task in self._tasks:
            task.cancel()
        self.transport = None

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away: nothing to do but note it.
        self._log.debug("%s: socket error %s", self.name, exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        peer: Address = (addr[0], addr[1])
        self.received += 1
        if not self._min_size <= len(data) <= self._max_size:
            self.dropped += 1
            self._limited.log(
                logging.INFO, peer[0], "%s: dropped %d-byte datagram from %s:%d (size)",
                self.name, len(data), peer[0], peer[1],
            )
            return
        if self._max_waiting and (self._waiting or len(self._tasks) >= self._max_in_flight):
            # Every task taken: kept as it came, and not handled until one ends (its
            # decision not begun: no work for a request that may yet be dropped).
            if len(self._waiting) >= self._max_waiting:
                self.dropped += 1
                self._limited.log(
                    logging.WARNING, "busy", "%s: %d requests in flight and %d waiting, "
                    "dropping one from %s", self.name, len(self._tasks), len(self._waiting),
                    peer[0],
                )
                return
            self._waiting.append((data, peer, asyncio.get_running_loop().time()))
            return
        self._handle(data, peer)

    def _handle(self, data: bytes, peer: Address) -> None:
        try:
            result = self._handler(data, peer)
        except Exception as exc:  # the boundary: classify, log, keep serving
            self._failed(exc, peer)
            return
        if type(result) is list:  # the common answer, told apart cheaper than by isawaitable
            self._send(result)
        elif inspect.isawaitable(result):
            if len(self._tasks) >= self._max_in_flight:
                self.dropped += 1
                if hasattr(result, "close"):
                    result.close()
                self._limited.log(
                    logging.WARNING, "busy", "%s: %d requests in flight, dropping one from %s",
                    self.name, len(self._tasks), peer[0],
                )
                return
            task = asyncio.ensure_future(self._await(result, peer))
            self._tasks.add(task)
            task.add_done_callback(self._ended)
        elif result is not None:
            self._send(result)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A task ended: the datagrams waiting are handled, oldest first, until one of them
        takes its place; those that waited past ``max_wait`` are dropped."""
        self._tasks.discard(task)
        waiting = self._waiting
        if not waiting or self.transport is None:
            return
        now = asyncio.get_running_loop().time()
        while waiting and len(self._tasks) < self._max_in_flight:
            data, peer, came = waiting.popleft()
            if now - came > self._max_wait:
                self.dropped += 1
                self._limited.log(
                    logging.WARNING, "busy", "%s: %d requests in flight, dropping one from "
                    "%s that waited %.1fs for its turn", self.name, len(self._tasks),
                    peer[0], now - came,
                )
                continue
            self.waited += 1
            self._handle(data, peer)

    async def _await(self, result: Awaitable[Iterable[Reply] | None], peer: Address) -> None:
        try:
            replies = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc, peer)
            return
        if replies is not None:
            self._send(replies)

    def _send(self, replies: Iterable[Reply]) -> None:
        if self.transport is None:
            return
        for payload, dest in replies:
            try:
                self.transport.sendto(payload, dest)
            except OSError as exc:
                self._limited.log(
                    logging.WARNING, dest[0], "%s: send to %s:%d failed: %s",
                    self.name, dest[0], dest[1], exc,
                )

    def _failed(self, exc: Exception, peer: Address) -> None:
        self.dropped += 1
        if isinstance(exc, DecodeError):
            self._limited.log(
                logging.INFO, peer[0], "%s: malformed datagram from %s:%d: %s",
                self.name, peer[0], peer[1], exc,
            )
        elif isinstance(exc, NetbootError):
            self._limited.log(
                logging.INFO, peer[0], "%s: request from %s:%d refused: %s",
                self.name, peer[0], peer[1], exc,
            )
        else:
            self._log.exception(
                "%s: bug while handling a datagram from %s:%d", self.name, peer[0], peer[1]
            )

    async def drain(self) -> None:
        """Wait for in-flight handlers, and those of the datagrams waiting for them (used at
        shutdown and by tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def open_datagram_endpoint(
    sock: socket.socket, protocol: asyncio.DatagramProtocol
) -> asyncio.DatagramTransport:
    """``loop.create_datagram_endpoint(..., sock=sock)``, but on asyncio's own (selector)
    loop a :class:`DrainingTransport`: that loop reads one datagram per readiness event and
    goes round the whole loop for the next, ~90 µs per datagram on the 2-core benchmark
    machine against ~20 µs draining a burst per wake-up (benchmarks/README.md, proxyDHCP).
    uvloop's transport already reads in batches in C and is kept."""
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return DrainingTransport(loop, sock, protocol)
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    return transport


def open_stamped_endpoint(
    sock: socket.socket, protocol: asyncio.DatagramProtocol
) -> DrainingTransport:
    """A :class:`DrainingTransport` that reads each datagram with the kernel's receive time
    (``SO_TIMESTAMPNS``), kept in its ``arrived`` while the protocol handles it, on any loop
    (uvloop's own transport gives no ancillary data). For a listener that must tell a
    datagram queued before some event from one sent after it (TFTP's late RRQ copies); the
    others keep :func:`open_datagram_endpoint`'s plain reads."""
    return DrainingTransport(asyncio.get_running_loop(), sock, protocol, stamped=True)


# struct timespec of SCM_TIMESTAMPNS (SO_TIMESTAMPNS_OLD: time_t and long, native sizes).
_TIMESPEC = struct.Struct("@ll")
_STAMP_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


class DrainingTransport(asyncio.DatagramTransport):
    """A UDP transport that reads up to ``batch`` datagrams per wake-up and sends on the
    socket itself while nothing is queued.

    A send that would block is queued (in order, at most ``max_queued`` datagrams; beyond
    that ``sendto`` raises ENOBUFS, which the boundary logs) and flushed when the socket is
    writable. Receive errors (ICMP port unreachable reported on the socket) go to the
    protocol's ``error_received``, as asyncio's transport does. Owns ``sock``: closed with
    the transport.

    ``stamped`` (:func:`open_stamped_endpoint`): each datagram is read with ``recvmsg``, and
    while the protocol's ``datagram_received`` runs, ``arrived`` is its kernel receive time
    (``CLOCK_REALTIME`` nanoseconds, as ``time.time_ns()``; None where the kernel gives
    none). Unstamped, the read path is unchanged: DHCP and DNS pay nothing.
    """

    # Read whole datagrams: one larger than the protocol's limit must arrive whole to be
    # dropped (and counted) as oversized, not truncated into something that parses.
    READ_SIZE = 65536

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        protocol: asyncio.DatagramProtocol, *, batch: int = 64, max_queued: int = 1024,
        stamped: bool = False,
    ) -> None:
        super().__init__({"socket": sock})
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._batch = batch
        self._max_queued = max_queued
        self._queue: deque[tuple[bytes, Any]] = deque()
        self._closing = False
        self._stamp: list[tuple[int, int, bytes]] = []  # the datagram's ancillary data
        self._reader = self._read_ready
        if stamped:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                self._reader = self._read_stamped
            except OSError:
                pass  # no stamps: arrived is None, which its users must allow for
        sock.setblocking(False)
        protocol.connection_made(self)
        loop.add_reader(self._fd, self._reader)

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        for _ in range(self._batch):
            if self._closing:
                return
            try:
                data, addr = recvfrom(self.READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                continue
            self._protocol.datagram_received(data, addr)

    def _read_stamped(self) -> None:
        recvmsg = self._sock.recvmsg
        space = _STAMP_SPACE
        for _ in range(self._batch):
            if self._closing:
                return
            try:
                data, ancdata, _flags, addr = recvmsg(self.READ_SIZE, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._protocol.error_received(exc)
                continue
            self._stamp = ancdata  # made a number only if asked for (arrived): seldom
            self._protocol.datagram_received(data, addr)

    @property
    def arrived(self) -> int | None:
        """The kernel receive time of the datagram being handed over (``datagram_received``)
        in CLOCK_REALTIME nanoseconds, as ``time.time_ns()``; None if unstamped."""
        for level, kind, value in self._stamp:
            if (kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET
                    and len(value) >= _TIMESPEC.size):
                sec, nsec = _TIMESPEC.unpack_from(value)
                return int(sec) * 1_000_000_000 + int(nsec)
        return None

    def pause_reading(self) -> None:
        """Stop reading until :meth:`resume_reading`; datagrams queue in the socket."""
        if not self._closing:
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._closing:
            self._loop.add_reader(self._fd, self._reader)

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if self._closing:
            return
        if not self._queue:
            try:
                if addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._loop.add_writer(self._fd, self._write_ready)
        if len(self._queue) >= self._max_queued:
            raise OSError(errno.ENOBUFS, f"{len(self._queue)} datagrams queued to send")
        self._queue.append((bytes(data), addr))

    def _write_ready(self) -> None:
        while self._queue:
            data, addr = self._queue[0]
            try:
                if addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # this datagram cannot go; the next ones may
                self._protocol.error_received(exc)
            self._queue.popleft()
        self._loop.remove_writer(self._fd)

    def get_write_buffer_size(self) -> int:
        return len(self._queue)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._queue.clear()
        self._loop.call_soon(self._closed)

    def abort(self) -> None:
        self.close()

    def _closed(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            self._sock.close()
