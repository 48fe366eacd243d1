"""HTTP's listening sockets, accepting every connection that waits at each readiness, on
asyncio's loop and on uvloop alike.

uvloop's listeners take **one** connection per turn of the event loop: libuv 1.45 stopped
accepting in a loop (libuv/libuv#3696, "don't accept() connections in a loop"; uvloop 0.23
bundles libuv 1.52), leaving the rest to the next readiness, the next turn. In a storm a turn
of netboot's loop lasts 10-50 ms (a thousand sockets' ``sendfile``), so a pallet of devices
that finish TFTP together and open their connections within milliseconds waited seconds in
the kernel's accept queue (benchmarks/README.md, s44-storm: 678 of 1,000 not accepted 1.6 s
in, 143 still at 8.9 s; nginx's queue empty within 2-4 s; strace: one ``accept4`` between
two ``epoll_pwait``). asyncio's own listeners accept up to their backlog per readiness, and
nginx's worker with ``multi_accept on`` everything waiting. :class:`Listener` does that on
either loop: its sockets (:func:`bind`) are watched with ``add_reader``, each readiness
takes what waits (at most ``BATCH``) and hands each connection to the loop's
``connect_accepted_socket`` with the listener's TLS context, what ``create_server`` does
with its own.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# Connections taken at most per readiness, so that the loop's other work (the downloads under
# way) has its turn between batches; the kernel's queue holds the rest (backlog 4096, capped by
# net.core.somaxconn) for the next readiness, at once since epoll reports it level-triggered.
BATCH = 1024

# Out of descriptors or of kernel memory the connection stays in the kernel's queue and the
# listener is readable again at once: accepting again would spin. asyncio stops accepting for
# constants.ACCEPT_RETRY_DELAY (1 s) and logs; so does this.
RETRY_DELAY = 1.0
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind(hosts: Sequence[str], port: int, *, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``hosts`` resolve to, bound as
    ``create_server`` binds them: SO_REUSEADDR (a restart rebinds while the last run's
    connections are in TIME_WAIT), IPV6_V6ONLY on IPv6 (so that "0.0.0.0" and "::" share one
    port). OSError naming the address when one cannot be bound, every socket closed then."""
    # Each address once, in getaddrinfo's order ("localhost" may give 127.0.0.1 twice).
    addresses = dict.fromkeys(
        (family, kind, proto, address) for host in hosts
        for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    made: list[socket.socket] = []
    try:
        for family, kind, proto, address in addresses:
            sock = socket.socket(family, kind, proto)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:  # create_server's words: what bind_error() reads
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


class Listener(asyncio.AbstractServer):
    """The part of ``asyncio.Server`` that netboot and aiohttp's runner use (``sockets``,
    ``start_serving``, ``is_serving``, ``close``, ``wait_closed``) over :func:`bind`'s
    sockets; each connection is made by ``factory``'s protocol, over TLS with ``ssl_context``
    when given."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Any],
                 socks: list[socket.socket], *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._loop = loop
        self._factory = factory
        self._socks = socks
        self._ssl = ssl_context
        self._watching = False
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        # Connections handed to the loop whose making (a TLS handshake) is not over: held so
        # that their tasks are not collected meanwhile.
        self._making: set[asyncio.Task[Any]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else tuple(self._socks)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._watching or self._resume is not None

    async def start_serving(self) -> None:
        self._watch()
        # A turn of the loop before returning, as asyncio.Server.start_serving gives one: the
        # tasks started before run to their first wait meanwhile (a test of the guard's
        # timers counts the loop's timers from here on).
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        self._watch()
        await self._loop.create_future()  # until cancelled, as asyncio.Server's

    def close(self) -> None:
        """Stops accepting and closes the sockets (connections made go on, as
        ``asyncio.Server.close`` leaves them); a second call does nothing."""
        if self._closed:
            return
        self._unwatch()
        self._closed = True
        for sock in self._socks:
            sock.close()

    async def wait_closed(self) -> None:
        return None

    def _watch(self) -> None:
        if self._watching or self._closed:
            return
        self._resume = None
        self._watching = True
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._take, sock)

    def _unwatch(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._watching:
            self._watching = False
            for sock in self._socks:
                self._loop.remove_reader(sock.fileno())

    def _take(self, listening: socket.socket) -> None:
        """Every connection waiting on ``listening`` (at most ``BATCH``), each to the loop."""
        for _ in range(BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left, or the client reset it while it waited
            except OSError as exc:
                if exc.errno not in _EXHAUSTED:
                    raise
                log.error("http: accepting paused %.0f s on %s: %s", RETRY_DELAY,
                          listening.getsockname(), exc)
                self._unwatch()
                self._resume = self._loop.call_later(RETRY_DELAY, self._watch)
                return
            task = self._loop.create_task(
                self._loop.connect_accepted_socket(self._factory, conn, ssl=self._ssl))
            if not task.done():
                self._making.add(task)
                task.add_done_callback(self._made)

    def _made(self, task: asyncio.Task[Any]) -> None:
        self._making.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        # OSError: the client left, or failed its TLS handshake (ssl.SSLError), as
        # create_server's own connections end then: the connection is closed, not logged.
        if exc is not None and not isinstance(exc, OSError):
            log.error("http: a connection failed before its protocol had it: %r", exc)
