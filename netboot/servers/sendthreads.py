"""Large files' bodies sent with sendfile(2) on a few threads of their own, off the event
loop's thread.

The kernel's copy is the bulk of a large file's cost (100-320 µs a 1 MiB response on a
2-CPU VM, alike for nginx; benchmarks/README.md s47-bigfile). On the loop's thread it caps
netboot's file serving at one CPU where nginx's workers use every CPU. ``os.sendfile`` and
``epoll.poll`` release the GIL, so a thread that does nothing else runs the copy on another
CPU while the loop reads and answers other requests.

Each :class:`_SendThread` is an epoll loop over the transfers it was given, as an nginx
worker sends a body: ``sendfile`` until the socket is full, then on at its next ``EPOLLOUT``
(level-triggered: see :meth:`_SendThread._begin`); a slow client holds no thread, only its
place in the epoll set. A client that stops reading is dropped by the kernel
(``TCP_USER_TIMEOUT``, set on every connection by netboot.servers.http.GuardedHandler): the
error wakes the epoll and ends the transfer.

A transfer works on duplicates of the socket's and the file's descriptors that only its
thread closes: the loop may close its own (the connection lost, the file released) at any
time without the thread writing to a descriptor number the process has since reused for
another connection. The loop's side of a transfer (:class:`Transfer`) is told the outcome
on the loop's thread (``call_soon_threadsafe``), once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger("netboot.http")

# A body smaller than this is sent on the loop's thread: the hand-off (two dup(2)s, a
# wake-up of the thread and one of the loop, ~15 µs of both threads' CPU) pays only where the
# copy is long. Files up to 256 KiB are answered from memory anyway (AssetFiles.max_file).
MIN_SIZE = 768 * 1024


class Transfer:
    """One body being sent by a send thread: ``count`` bytes of ``file`` from ``offset``.

    ``done(sent, failed)`` is called once on the loop's thread: the bytes sent (fewer than
    ``count`` when the file shrank, or on failure) and whether the socket failed (the client
    left, TCP_USER_TIMEOUT) or :meth:`stop` stopped it. ``sent`` is the thread's count so far.
    """

    __slots__ = ("_done", "_loop", "_pool", "_thread", "count", "file", "offset", "sent",
                 "sock", "stopped")

    def __init__(self, pool: SendThreads, thread: _SendThread,
                 loop: asyncio.AbstractEventLoop, sock: int, file: int, offset: int,
                 count: int, done: Callable[[int, bool], None]) -> None:
        self._pool = pool
        self._thread = thread
        self._loop = loop
        self.sock = sock  # the thread's duplicates: it closes them
        self.file = file
        self.offset = offset
        self.count = count
        self.sent = 0
        self.stopped = False
        self._done: Callable[[int, bool], None] | None = done

    def stop(self) -> None:
        """Stop where it is (the connection is lost, the server stops): ``done`` now, with
        what was sent, as failed, unless it was called already; the thread drops it next."""
        if self._finish(True):
            self.stopped = True
            self._thread.post(self)

    def report(self, failed: bool) -> None:
        """The thread's outcome (on the loop's thread)."""
        self._finish(failed)

    def _finish(self, failed: bool) -> bool:
        done, self._done = self._done, None
        if done is None:
            return False
        self._pool.ended(self._thread)
        done(self.sent, failed)
        return True


class _SendThread:
    """A thread and its epoll set of transfers (see the module's docstring)."""

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        # Transfers to begin or to stop, from the loop's thread (a deque's append and
        # popleft are atomic).
        self._inbox: collections.deque[Transfer] = collections.deque()
        self._sending: dict[int, Transfer] = {}  # the socket's duplicate -> its transfer
        self._edged: set[int] = set()  # of those, registered edge-triggered (_step's EAGAIN)
        self._closing = False
        self.alive = True  # False once its loop ended (closed, or a bug): given nothing more
        self.load = 0  # transfers given and not ended, counted on the loop's thread
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def held(self) -> int:
        return len(self._sending) + len(self._inbox)

    def post(self, transfer: Transfer) -> None:
        self._inbox.append(transfer)
        if self.alive:  # (its eventfd stays open until close(): never another's descriptor)
            os.eventfd_write(self._wake, 1)

    def close(self, timeout: float) -> None:
        self._closing = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._wake)

    def _run(self) -> None:
        epoll, wake, sending, inbox = self._epoll, self._wake, self._sending, self._inbox
        try:
            while not self._closing:
                for fd, _ in epoll.poll():
                    if fd == wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(wake)
                        continue
                    transfer = sending.get(fd)
                    if transfer is not None:
                        self._step(transfer)
                while inbox:
                    transfer = inbox.popleft()
                    if transfer.stopped:
                        self._end(transfer, True, report=False)
                    elif sending.get(transfer.sock) is not transfer:
                        self._begin(transfer)
        except Exception:  # a bug: the transfers end, the loop is told, the server goes on
            log.exception("http: a send thread failed")
        finally:
            self.alive = False
            for transfer in list(sending.values()) + list(inbox):
                self._end(transfer, True)
            epoll.close()

    def _begin(self, transfer: Transfer) -> None:
        if self._step(transfer):
            return
        self._sending[transfer.sock] = transfer
        # Registered once for the whole body, level-triggered: an event whenever the socket
        # has room (or failed). A step ends at a short write, and a short write is either a
        # full socket, which tcp_poll reports as not writable until ACKs free a third of its
        # buffer (so no event until then, as an edge would wait), or the file's end after it
        # was cut short beyond what was sent, where the socket has room: reported at the
        # next poll, whose step's sendfile returns 0 and ends the transfer. Edge-triggered
        # (s48), the file's end waited for an edge that never came (the kernel wakes a
        # socket's writers only after a write found it full); s49-attack called sendfile
        # again after every short write to tell the two apart, an EAGAIN call (a syscall
        # and an exception, ~7,400 instructions and ~2 us of kernel time) each time a
        # socket filled: ~90,000-100,000 more sendfile calls in a 1,000-device storm, ~0.3 s
        # of CPU (benchmarks/README.md, s50-bisect).
        self._epoll.register(transfer.sock, select.EPOLLOUT)

    def _step(self, transfer: Transfer) -> bool:
        """Send what the socket takes; True once the transfer ended."""
        if transfer.stopped:
            self._end(transfer, True, report=False)
            return True
        failed = False
        try:
            n = os.sendfile(transfer.sock, transfer.file, transfer.offset + transfer.sent,
                            transfer.count - transfer.sent)
            transfer.sent += n
            if n and transfer.sent < transfer.count:
                # A short write: the socket is full, or the file ended (cut short beyond
                # what was sent). Not called again here: the level-triggered EPOLLOUT
                # (_begin) comes when a full socket has room, and at once at the file's
                # end, where the next call returns 0.
                if self._edged and transfer.sock in self._edged:
                    self._edged.discard(transfer.sock)  # sending again: level as before
                    self._epoll.modify(transfer.sock, select.EPOLLOUT)
                return False
            # n == 0: the file is shorter than it was when its length was sent
        except BlockingIOError:
            # Nothing taken though the socket may be reported writable: the system's TCP
            # memory is short (sk_wmem_schedule fails where tcp_poll sees room in the
            # socket's own buffer). Level-triggered, that would be reported and fail again
            # at every poll; edge-triggered until a write takes bytes, the next event comes
            # when ACKs free memory (the failed write marked the socket full), as it did
            # before session 50.
            sock = transfer.sock
            if sock in self._sending and sock not in self._edged:
                self._edged.add(sock)
                self._epoll.modify(sock, select.EPOLLOUT | select.EPOLLET)
            return False
        except OSError:
            failed = True  # the client left, reset, or TCP_USER_TIMEOUT dropped it
        self._end(transfer, failed)
        return True

    def _end(self, transfer: Transfer, failed: bool, *, report: bool = True) -> None:
        sock = transfer.sock
        if sock < 0:
            return  # ended already
        if self._sending.get(sock) is transfer:
            del self._sending[sock]
            self._edged.discard(sock)
            # Before the close: the socket's other descriptors keep it open, and epoll
            # forgets a registration only when the last one closes.
            self._epoll.unregister(sock)
        transfer.sock = -1
        os.close(sock)
        os.close(transfer.file)
        if report:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                transfer._loop.call_soon_threadsafe(transfer.report, failed)


class SendThreads:
    """A few send threads (``threads``), made at :meth:`start` and ended at :meth:`close`;
    bodies of at least ``min_size`` bytes go to them (:meth:`send`)."""

    def __init__(self, threads: int, *, min_size: int = MIN_SIZE) -> None:
        self.threads = threads
        self.min_size = min_size
        self.given = 0  # transfers handed to a thread, ever
        self._all: list[_SendThread] = []

    @property
    def in_flight(self) -> int:
        """Transfers given and not ended (their ``done`` not called yet)."""
        return sum(thread.load for thread in self._all)

    @property
    def held(self) -> int:
        """Transfers the threads still hold: waiting for a socket's room, or to be dropped
        (each with its two descriptors)."""
        return sum(thread.held for thread in self._all)

    @property
    def alive(self) -> int:
        """Threads running."""
        return sum(thread.alive for thread in self._all)

    def start(self) -> None:
        if not self._all:
            self._all = [_SendThread(f"netboot-send-{i}") for i in range(self.threads)]

    def close(self, timeout: float = 5.0) -> None:
        threads, self._all = self._all, []
        for thread in threads:
            thread.close(timeout)

    def send(self, loop: asyncio.AbstractEventLoop, sock: int, file: int, offset: int,
             count: int, done: Callable[[int, bool], None]) -> Transfer | None:
        """Send ``count`` bytes of ``file`` from ``offset`` to the non-blocking TCP socket
        ``sock`` (never a TLS one: the bytes would bypass the encryption) on the least busy
        thread; ``done`` as :class:`Transfer` says. None (nothing begun): no thread, or no
        descriptor left for the duplicates; the caller sends it on the loop."""
        thread = min(self._all, key=_load) if self._all else None
        if thread is None or not thread.alive:
            return None
        try:
            own_sock = os.dup(sock)
        except OSError:
            return None
        try:
            own_file = os.dup(file)
        except OSError:
            os.close(own_sock)
            return None
        thread.load += 1
        self.given += 1
        transfer = Transfer(self, thread, loop, own_sock, own_file, offset, count, done)
        thread.post(transfer)
        return transfer

    def ended(self, thread: _SendThread) -> None:
        thread.load -= 1


def _load(thread: _SendThread) -> int:
    return thread.load
