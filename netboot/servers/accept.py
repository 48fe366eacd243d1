"""A TCP listener that accepts every connection waiting at each readiness, on any loop.

uvloop's listeners (libuv >= 1.45, libuv/libuv#3696) accept **one** connection per turn of
the event loop and wait for the next readiness for the next. A storm's loop is busy: with
1,000 devices downloading their kernels and initrds a turn of netboot's loop lasts 10-50 ms,
so a pallet of devices that opened their connections together waited in the kernel's accept
queue for seconds (benchmarks/bigfiles_storm.py, s44-storm: 695 connections not accepted
1.7 s into a 1,000-device start, 254 still at 5.9 s, the last after ~8 s; nginx's queue
empty within 1-2 s; strace: one accept4 between two epoll_pwait). asyncio's own listeners
accept up to their backlog per readiness; nginx accepts until its worker's connections are
used (``multi_accept`` aside, each accept event). This server does as asyncio's does on
both loops: its sockets are its own, watched with ``add_reader``, and each readiness
accepts until the queue is empty (at most ``ACCEPT_BATCH``), each connection handed to
``loop.connect_accepted_socket`` with the listener's TLS context, as ``create_server``'s
own would be.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# Connections accepted at most per readiness before the loop's other work has its turn
# (asyncio's own listeners take up to their backlog; the kernel's queue holds 4,096).
ACCEPT_BATCH = 1024

# Seconds without accepting after the process ran out of descriptors or memory (asyncio's
# constants.ACCEPT_RETRY_DELAY): the queue waits in the kernel meanwhile.
ACCEPT_RETRY_DELAY = 1.0

_OUT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def bind(hosts: Iterable[str | None], port: int, *, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``hosts`` resolve to, as ``create_server`` binds
    them (SO_REUSEADDR; IPV6_V6ONLY on IPv6, so that "0.0.0.0" and "::" share a port);
    OSError naming the address when one cannot be bound (all closed then)."""
    infos = []
    for host in hosts:
        infos += socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class AcceptingServer(asyncio.AbstractServer):
    """``asyncio.Server``'s part that netboot and aiohttp's runner use (``sockets``,
    ``start_serving``, ``close``, ``wait_closed``), over sockets from :func:`bind`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, factory: Callable[[], Any],
                 socks: list[socket.socket], *, ssl_context: ssl.SSLContext | None = None
                 ) -> None:
        self._loop = loop
        self._factory = factory
        self._socks = socks
        self._ssl = ssl_context
        self._serving = False
        self._closed = False
        self._connecting: set[asyncio.Task[Any]] = set()  # made, not yet connected
        self._retry: asyncio.TimerHandle | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else tuple(self._socks)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._watch()

    async def serve_forever(self) -> None:
        self._watch()
        await asyncio.Future()

    def close(self) -> None:
        if self._closed:
            return
        self._unwatch()
        self._closed = True
        for sock in self._socks:
            sock.close()

    async def wait_closed(self) -> None:
        return None

    def _watch(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._serving:
            self._serving = False
            for sock in self._socks:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # none left (or the client left before it was taken)
            except OSError as exc:
                if exc.errno not in _OUT_OF:
                    raise
                # The queue stays in the kernel; taking it again at once would spin.
                log.error("accepting HTTP connections paused %.0f s: %s", ACCEPT_RETRY_DELAY,
                          exc)
                self._unwatch()
                self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._ssl))
            self._connecting.add(task)
            task.add_done_callback(self._connected)

    def _resume(self) -> None:
        self._retry = None
        self._watch()

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, OSError):
            return  # connected, or the client left or failed its TLS handshake
        log.error("an accepted HTTP connection failed before its first byte: %r", exc)
