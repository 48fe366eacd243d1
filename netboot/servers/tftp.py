"""asyncio TFTP server: a thin adapter around :mod:`netboot.wire.tftp`.

Read-only, RFC 1350 + options (RFC 2347 OACK, 2348 blksize, 2349 tsize/timeout, 7440
windowsize). protocols.md §6.3 explains why tftpy's server is not used.

* A listener on (host, port), built on :class:`BoundaryProtocol`, so one bad datagram never
  stops the service. RRQs start transfers, WRQs get ERROR 2, other packets are dropped. Its
  socket is read by :func:`open_stamped_endpoint`'s transport, a burst per wake-up, each
  datagram with the kernel's receive time.
* Each transfer sends and receives on a socket of its own, connected to its client and
  bound to an ephemeral port the kernel picks: its port, not 69, is the server's TID (RFC
  1350 §4), random per transfer, as dnsmasq (by default), tftpd-hpa and atftpd choose it.
  A port shared by every transfer is learnt by anyone who makes one transfer, and then a
  blind attacker could forge an RRQ from a victim's address and the victim's ACKs to that
  port: 101 forged datagrams (~4 KB) had 10.3 MB of DATA sent to the victim
  (benchmarks/README.md, s35-attack); with a port per transfer the ACKs must also guess
  it. A datagram to a transfer's port from any other (ip, port) finds no socket (the
  transfer's is connected): the kernel answers ICMP port unreachable, as it does for
  tftpd-hpa, and the transfer goes on.
* ``single_port`` (``tftp.single_port``) keeps one data port per listener instead (its
  address, port 0: the kernel's pick at start, the same for every transfer until a
  restart), every transfer's socket bound to it, for a firewall that should pass one port
  (dnsmasq's ``--tftp-single-port``): a datagram from any other (ip, port)
  reaches the port's unconnected socket and gets ERROR 5, and the transfers go on
  (dnsmasq: "TID mismatch"). :class:`_Link` says what it costs. Its trade: the forged ACKs
  above need only the client's port, which the attacker chose.
* Transfers are keyed by the client's (ip, port): a repeated RRQ while one runs means our
  first reply was lost, so the first reply is resent instead of starting a second transfer.
  A different RRQ from that port means the client has moved on: the running transfer ends
  and the new request is served (dnsmasq does the same).
  A copy of the RRQ that reached the kernel before its transfer ended by the client's own
  doing (its ERROR, its last ACK), but was read after, is a duplicate too: the client resent
  it before our answer reached it, and the listener read it late (in a storm, seconds
  late). Served, it was a transfer to a port nobody reads, holding a slot until
  ``first_retries`` ran out: in a 1,000-device storm 834 of them, and ``max_transfers``
  (1,024) was hit. The same request that arrived after the end is a new one (U-Boot with a
  fixed ``tftpsrcp`` fetching the file again, a port reused behind a NAT) and is served at
  once, as dnsmasq serves it. A client that never received our answer, or a request that
  differs, starts a transfer as before.
* Concurrent transfers are bounded overall and per client address. Past the overall bound
  an RRQ is dropped without a reply, so the client retries it later (every boot ROM
  retransmits its RRQ) instead of aborting the boot on an ERROR. Past the per-address bound
  (``tftp.max_per_client``) the RRQ is answered with ERROR 0 "busy": that address already
  holds that many transfers, so it is a relay or NAT with many devices behind it or a flood,
  and a device behind it must see why it failed rather than time out silently. Both are
  logged, rate-limited.
* A transfer whose first OACK/DATA is never answered ends after ``Policy.first_retries``
  retransmissions (about 3 s) instead of the full backoff (~45 s), so spoofed or abandoned
  RRQs cannot hold every slot.
* The DATA datagrams of a file are built once per (file, blksize) and shared by every
  transfer of it (:class:`_PacketCache`, bounded in bytes, invalidated by the file's
  identity and times). Files above ``cache_file_size`` are read with ``os.pread`` on a
  descriptor held for the transfer, 64 KiB at a time, so big images come from the page
  cache without being read whole.
* Retransmission deadlines are kept per transfer and served by one sweep timer per server
  (:meth:`TftpServer._sweep_by`), not a timer handle per transfer.
* ``netascii`` (any case, as every mode) is converted as tftpd-hpa converts it: each LF
  sent as CR LF, each CR as CR NUL (:func:`netascii`, RFC 1350 / RFC 764), the whole file
  before it is cut into blocks, so a pair split across a block edge, every blksize and
  windowsize are served as octet's bytes are; a file's converted packets are kept in the
  packet cache beside its octet ones. ``tsize`` is left out of a netascii OACK (tftpd-hpa
  knows no size of a converted file, dnsmasq ignores the option there). Served as octet
  (until session 49, like pixiecore and tftpy), a file's CR LF came back from tftp-hpa's
  ascii mode as a bare LF. Other modes ("mail",
  "binary") get ERROR 4, as from tftpd-hpa; so does a request that does not decode (a
  field not NUL-terminated, no mode), naming the field, where it was left to time out.
* Log lines quote the client's file name with ``%r``, whose escapes keep a control
  character in a name from forging or garbling a line.
* Paths: ``\\`` counts as ``/`` and a leading ``/`` is dropped (dnsmasq does both); ``..``
  and NUL are refused with ERROR 2 before the content layer is asked.
"""

from __future__ import annotations

import _socket
import asyncio
import collections
import contextlib
import errno
import functools
import logging
import math
import operator
import os
import select
import socket
import stat
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from netboot.eager import carry_on, first_step
from netboot.errors import ConfigError, DecodeError, Forbidden, NotFound, StoreError
from netboot.files import clean_relative
from netboot.logs import RateLimitedLog, log_line
from netboot.model import Blob
from netboot.servers import sockets
from netboot.servers.interfaces import Addresses, InterfaceWatcher
from netboot.servers.udp import (
    Address,
    BoundaryProtocol,
    DrainingTransport,
    Reply,
    open_stamped_endpoint,
)
from netboot.wire.tftp import (
    Ack,
    Datagram,
    Error,
    ErrorCode,
    MemorySource,
    Negotiated,
    Opcode,
    Outcome,
    Packets,
    Policy,
    ReadRequest,
    Sender,
    Source,
    Step,
    WriteRequest,
    error_packet,
    negotiate,
    netascii,
    parse,
)

log = logging.getLogger(__name__)

# An RRQ is at most 512 bytes per RFC 2347, but U-Boot allows 512-byte paths plus options.
MAX_REQUEST = 2048
PORT_KEY = "tftp.port"
PORT_FLAG = "--tftp-port"


class TftpFiles(Protocol):
    async def tftp_open(self, path: str, peer: tuple[str, int],
                        local: Callable[[], str | None] | None = None) -> Blob: ...

    # raises NotFound (→ ERROR 1) or Forbidden (→ ERROR 2); anything else → ERROR 0 + logged
    # ``path`` arrives normalised: relative, "/"-separated, no "..", no NUL.
    # ``local`` (only with TftpServer's ``by_address``): asked, it tells the address the
    # request came in on (None if unknown), for a file whose URLs name it (Content.at).


@dataclass(slots=True)
class TftpStats:
    """Counters for tests, metrics and ``netboot explain``."""

    requests: int = 0
    started: int = 0
    completed: int = 0
    probes: int = 0
    failed: int = 0
    not_found: int = 0
    refused: int = 0
    busy: int = 0
    duplicate_requests: int = 0
    unknown_tid: int = 0
    retransmissions: int = 0  # DATA/OACK windows resent, over all finished transfers


class _FileSource:
    """Reads ahead with pread on a descriptor held open for the transfer: one system call
    per READ_AHEAD bytes instead of one per window (in lock-step, per block: a third of the
    cost of a block was the pread). A window outside the buffer (a resend after a wrap, a
    go-back) is read again. Used for files too big for the :class:`_PacketCache`."""

    READ_AHEAD = 64 * 1024

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._at = 0

    def read(self, offset: int, length: int) -> bytes | memoryview:
        start = offset - self._at
        if start < 0 or start + length > len(self._buf):
            self._buf = os.pread(self._fd, max(length, self.READ_AHEAD), offset)
            self._at, start = offset, 0
            if len(self._buf) < length:
                return self._buf  # short: the file shrank, the sender ends the transfer
        return memoryview(self._buf)[start : start + length]

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        # A window (WindowSource): straight into its datagrams, one system call.
        return os.preadv(self._fd, buffers, offset)


def _read_all(fd: int, size: int) -> bytes:
    parts, at = [], 0
    while at < size:
        chunk = os.pread(fd, size - at, at)
        if not chunk:
            break
        parts.append(chunk)
        at += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _PacketCache:
    """Every DATA datagram of recently served files, built once per (file, blksize) and
    shared: in a storm every device fetches the same loader, and a lock-step block is then
    a prebuilt datagram instead of a read, a header and a copy per block.

    An entry is valid for the file it was read from: keyed by path and blksize, it holds
    the file's (device, inode, size, mtime, ctime) as ``fstat`` saw them on the descriptor
    the transfer opened, and a file replaced or rewritten since is read again. A transfer
    keeps serving the bytes it started with (what a held-open descriptor of a replaced file
    gives too). Bounded in bytes, least recently used first out; files above ``max_file``
    are streamed with ``pread`` instead.

    A file modified less than SETTLE seconds ago is streamed, as a big file is, and nothing
    of it is kept: timestamps move in coarse ticks (a jiffy; 2 s on FAT), so a rewrite within
    the same tick, same size and same inode would look unchanged (git's "racily clean"
    entries)."""

    SETTLE = 2.0

    def __init__(self, budget: int, max_file: int) -> None:
        self.budget = budget
        self.max_file = min(max_file, budget)
        # Keyed by path, blksize and whether the bytes are the file's netascii form.
        self._entries: OrderedDict[tuple[str, int, bool], tuple[tuple[int, ...], Packets]] = (
            OrderedDict())
        self.size = 0  # bytes held
        self.hits = 0
        self.builds = 0

    def kept(self, path: str, st: os.stat_result, blksize: int,
             text: bool = False) -> Packets | None:
        """The packets kept of the file ``st`` describes (a stat of ``path``), if any: a
        transfer served from them needs no descriptor (an open, fstat and close were a
        quarter of a storm transfer's system calls). The file's identity and times are the
        entry's, so its bytes are the ones read when the entry was built; a file whose
        mode or owner changed since has a new ctime and goes the long way (open, which
        checks that it is readable)."""
        key = (path, blksize, text)
        entry = self._entries.get(key)
        if entry is None or entry[0] != (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                         st.st_ctime_ns):
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def packets(self, path: str, fd: int, st: os.stat_result, blksize: int,
                text: bool = False) -> Packets | None:
        """The file's packets, built and kept unless it is too big or too new (None: the
        caller streams it); ``text``: of its netascii form (:func:`netascii`)."""
        if st.st_size > self.max_file:
            return None
        key = (path, blksize, text)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] == signature:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self._drop(key)
        if time.time() - st.st_mtime < self.SETTLE:
            # Modified a moment ago: not kept (above), and not built either. Built for each
            # transfer, every transfer held a copy of the whole file until the file settled:
            # a storm meeting a loader copied in just before took 1,000 x 170 KB (storm.py,
            # whose assets are written just before its storm: 244 MiB resident), and a
            # 16 MiB file could take max_transfers x 16 MiB. Streamed, as a file above
            # max_file is, a transfer holds a window of it.
            return None
        payload = _read_all(fd, st.st_size)
        if len(payload) != st.st_size:
            return None  # shrank while read: streamed, and the sender notices
        built = Packets(netascii(payload) if text else payload, blksize)
        self.builds += 1
        self._entries[key] = (signature, built)
        self.size += built.nbytes
        while self.size > self.budget:  # max_file <= budget: the newest always fits
            # The least recently used: an OrderedDict's first entry, taken off its list in
            # O(1) (a plain dict's next(iter()) steps over every slot deleted since it last
            # resized, see boot._keep).
            _, (_, dropped) = self._entries.popitem(last=False)
            self.size -= dropped.nbytes
        return built

    def _drop(self, key: tuple[str, int, bool]) -> None:
        _, dropped = self._entries.pop(key)
        self.size -= dropped.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.size = 0


class _Transfer:
    """One read transfer: its :class:`Sender` (whose ``deadline`` the server's sweep reads),
    its client and its socket. Datagrams come from its :class:`_Link`; the sweep calls
    :meth:`on_timer`."""

    __slots__ = ("closed", "fd", "link", "path", "peer", "request", "sender", "server",
                 "sock", "window")

    def __init__(self, server: TftpServer, link: _Link, peer: Address, path: str,
                 sender: Sender, fd: int | None, sock: _socket.socket, request: bytes) -> None:
        self.server = server
        self.link = link
        self.peer = peer
        self.path = path
        # The RRQ as received; kept after the end while copies of it may still come (see
        # TftpServer._forget), cleared when the client may not have had our answer.
        self.request: bytes | None = request
        self.sender = sender
        self.fd = fd
        # Connected to the client, bound to an ephemeral port of its own or the link's port
        # (see _Link): send() without an address, and only this client's datagrams arrive.
        self.sock = sock
        # The window its last ACK was answered with, between the read of a poll's ACKs and
        # the sends (_Link._ready; a lock-step block goes in the batch's lists instead).
        self.window: tuple[Datagram, ...] = ()
        self.closed = False

    @property
    def tid(self) -> Address:
        """The server's end of the transfer (RFC 1350 §4): its socket's port of its own, or
        its link's address in single-port mode. (Tests and diagnostics: a system call.)"""
        if self.link.single_port:
            return self.link.address
        host, port = self.sock.getsockname()[:2]
        return host, port

    def begin(self) -> None:
        self._guard(self.sender.start)

    def duplicate_request(self) -> None:
        self._guard(self.sender.duplicate_request)

    def unreachable(self) -> None:
        self._guard(self.sender.unreachable)

    def abandoned(self) -> None:
        self._guard(self.sender.abandoned)

    def on_timer(self, now: float) -> None:
        self._guard(lambda _: self.sender.timeout(now))

    def _guard(self, event: Callable[[float], Step]) -> None:
        if self.closed:
            return
        try:
            step = event(time.monotonic())
        except Exception:
            self.crashed()
            return
        self.link.apply(self, step)

    def other(self, data: bytes) -> None:
        """Anything but a well-formed ACK from the client: parsed in full."""
        try:
            packet = parse(data)
        except DecodeError as exc:
            self.server.limited.log(
                logging.INFO, self.peer[0], "tftp %s:%d %r: malformed datagram ignored: %s",
                *self.peer, self.path, exc,
            )
            return
        if isinstance(packet, Ack):
            self._guard(lambda now: self.sender.ack(packet.block, now))
        elif isinstance(packet, Error):
            self._guard(lambda now: self.sender.error(packet.code, packet.message, now))
        else:
            log.debug("tftp %s:%d %r: ignored %s during the transfer",
                      *self.peer, self.path, type(packet).__name__)

    def crashed(self) -> None:
        # The transfer's boundary: a bug or I/O error ends this one only.
        log.exception("tftp %s:%d %r: transfer failed", *self.peer, self.path)
        self.server.stats.failed += 1
        self.request = None  # our failure: the client's next RRQ is served
        with contextlib.suppress(OSError):  # best effort, like any single UDP datagram
            self.sock.send(error_packet(ErrorCode.NOT_DEFINED, "internal error"))
        self.close()

    def finished(self, step: Step) -> None:
        s, server = self.sender, self.server
        stats = server.stats
        stats.retransmissions += s.retransmissions
        if server.observer is not None and step.outcome is not None:
            server.observer.tftp_transfer(step.outcome.value, min(s.acked * s.blksize, s.size))
        if step.outcome is Outcome.COMPLETE:
            stats.completed += 1
            # log_line: the same line without a LogRecord where serve's text handler is the
            # only one (a record, its handler chain and formatter were ~15 us per transfer).
            peer = self.peer
            log_line(
                log, logging.INFO,
                "tftp %s:%d %r: sent %d bytes in %d blocks (blksize %d, windowsize %d, "
                "%d retransmissions)",
                peer[0], peer[1], self.path, s.size, s.blocks, s.blksize, s.windowsize,
                s.retransmissions,
            )
        elif step.outcome is Outcome.PROBE:
            # EDK2 and PXE ROMs ask for tsize, then abort: the normal size probe.
            stats.probes += 1
            log.debug("tftp %s:%d %r: size probe ended (%s)", *self.peer, self.path, step.reason)
        else:
            stats.failed += 1
            if step.outcome is not Outcome.CLIENT_ERROR:
                # Timed out (perhaps every answer was lost) or the file changed: the
                # client's next RRQ, even the same one, is served.
                self.request = None
            # Rate-limited per address: a flood of RRQs that are never answered would
            # otherwise write one line per spoofed request.
            server.limited.log(
                logging.INFO, self.peer[0], "tftp %s:%d %r: transfer ended at block %d of %d: %s",
                *self.peer, self.path, s.acked, s.blocks, step.reason,
            )
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.link.remove(self)
        self.server._forget(self.peer, self)


# Fewer bytes than any datagram is charged against a socket's receive buffer (its skb's
# truesize: the sk_buff and skb_shared_info alone are ~550 on x86-64): a kept socket's
# queue holds at most SO_RCVBUF / this many (_Link.connect).
_SKB_AT_LEAST = 256


class _Link:
    """The server's end of every transfer started on one listener (RFC 1350 §4: a port of
    its own, not 69): per transfer a socket ``connect()``-ed to the client and bound to an
    ephemeral port of its own (the default: the server's TID is random per transfer, see
    the module's docstring), or, with ``single_port``, to the link's data port P, whose
    unconnected data socket on (its address, P) takes what no transfer's socket takes.
    (The data socket exists in both modes; by default no transfer uses its port.)

    The kernel hands each client's datagrams to its transfer's connected socket (an exact
    4-tuple outranks the unconnected socket), so a block costs a ``recv_into`` and a
    ``send``: no address formatted on receipt, none parsed nor routed on sending, no lookup
    of the transfer by address (about 1.5 us of a block's ~12, see benchmarks/README.md).
    Anything else sent to P (another port, another host, a late ACK after the end) reaches
    the unconnected data socket: a stranger gets ERROR 5 (RFC 1350 §4) and the transfers go
    on. Every socket carries SO_REUSEPORT, which is what lets them share P: unlike
    SO_REUSEADDR, Linux lets only sockets of the same user join (socket(7)), so another
    local user cannot bind P and send DATA to a transfer's client from the server's own
    address and port (a loader of their choosing), nor take its ACKs. Connected sockets in
    the group are found by their 4-tuple, not by the group's hash (Linux 5.4 and later).

    The transfers' sockets are polled by an epoll set of the link's own, itself one reader
    of the event loop: a wake-up takes every transfer with a datagram waiting, one
    ``recv_into`` each (level-triggered: a second datagram is seen by the next poll), so a
    storm of lock-step clients costs one receive and one send per block and no receive that
    finds nothing, where a reader per socket cost an event loop dispatch per datagram. (On
    kernels before 6.13, which lack the 4-tuple hash of connected UDP sockets, the kernel
    walks the sockets sharing P per datagram: as many as transfers run, a storm's 1,000-2,000
    and up to ``max_transfers``; measured flat on 6.18 only, not on such a kernel. On 6.18
    too for a kept socket connected again, unless hashed anew: see :meth:`_rehash`.)

    In single-port mode an ended transfer's socket is kept, still connected to its client and
    in the epoll set, and the next transfer connects it to its own client (:meth:`connect`,
    :meth:`remove`): what a kept socket receives is answered as the data socket answers a
    stranger. One left unused for the server's ``spare_idle`` seconds is closed
    (:meth:`_sweep_spares`). By default a transfer's socket is closed at its end, as
    dnsmasq's and tftpd-hpa's are: its port, one its client has seen, handed to another
    client's transfer would be a port the first could forge that transfer's ACKs to; and
    kept for its own client's next transfer only it was seldom taken (EDK2's download comes
    from a new port) and cost more than it saved: ``starts`` (EDK2's size probe and
    download, 4 KiB) 0.96x the CPU per pair closed at the end (0.89-1.01, 9 paired runs,
    benchmarks/README.md s35-tid). A datagram its client sends after the end finds no
    socket (ICMP port unreachable, as for tftpd-hpa)."""

    BATCH = 128  # datagrams per wake-up at most: the loop's other work is not starved
    # ACKs are 4 bytes, a client's ERROR at most a few hundred; longer is truncated,
    # which only shortens an ERROR's message.
    MAX_DATAGRAM = 1024
    # After busy-waits that saw no ACK (a client slower than ack_spin, a remote one), the
    # next 1, 2, 4 ... windows' waits are the event loop's, up to this many: a transient
    # miss skips one wait, a client that is always slower costs one spin per this many.
    SPIN_BACKOFF = 64
    # A kept socket connected to another client is hashed anew (_rehash) for a transfer
    # that expects at least this many ACKs: the rehash costs ~2.6 us (its system call and
    # the route looked up again at the next send), the walk it saves ~7 ns a socket on the
    # port a datagram, so from ~25 sockets 16 ACKs pay for it; EDK2's size probe of a small
    # file and its one-window download do not (benchmarks/README.md, s33-tftp).
    REHASH_ACKS = 16

    def __init__(self, server: TftpServer, sock: socket.socket, iface: str | None) -> None:
        self.server = server
        self.sock = sock
        self.iface = iface
        self._device = iface.encode() if iface else b""  # see connect
        self.address: Address = sock.getsockname()[:2]
        # Every transfer's socket on this link's port (True), or each on a port of its own.
        self.single_port = server.single_port
        self._buf = bytearray(self.MAX_DATAGRAM)
        # The same bytes as unsigned 32-bit numbers: [0] is a datagram's first four bytes
        # as the Sender's ack_word (its opcode and block in one subscript).
        self._words = memoryview(self._buf).cast("I")
        self._able: tuple[Datagram, ...] = ()  # the last window found GSO-able ...
        self._per = 0  # ... and its datagrams per UDP_SEGMENT send
        self._segment: dict[int, list[tuple[int, int, bytes]]] = {}  # UDP_SEGMENT cmsg by size
        self._transfers: dict[int, _Transfer] = {}  # by their socket's descriptor
        # Ended transfers' sockets kept for the next transfers (see connect): by the client
        # each is still connected to, oldest first, and that client by descriptor (a
        # datagram of its, read by _ready, is a stranger's) with the _spare_tick it was kept
        # at (see _sweep_spares). Still in the epoll set.
        self._spare: OrderedDict[Address, _socket.socket] = OrderedDict()
        self._spare_peers: dict[int, tuple[Address, int]] = {}
        # The idle kept sockets' sweep: armed only while sockets are kept, its ticks counted.
        self._spare_sweep: asyncio.TimerHandle | None = None
        self._spare_tick = 0
        self._reused: _socket.socket | None = None  # the spare connect() handed out last
        self._moved = False  # ... connected to another client than before (see _rehash)
        self._epoll = select.epoll()
        self._probe = select.poll()  # what a kept socket holds when taken again (connect)
        self._poll = self._epoll.poll
        self._unspun = 0  # windows left whose ACK is not busy-waited for (SPIN_BACKOFF)
        self._missed = 0  # busy-waits in a row that saw no ACK
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self._loop.add_reader(self._epoll.fileno(), self._ready)
        self.full = 0  # datagrams the send buffer refused (the retransmission timer resends)
        # The listener's transport: the receive time of the RRQ being handled (_late_copy).
        self.listener: DrainingTransport | None = None
        # A transfer's socket comes from this attribute, not straight from the method, so
        # that a test can hand out wrapped sockets in the compiled build too (mypyc's native
        # classes have read-only methods; see setup.py).
        self.open: Callable[[Address], _socket.socket] = self.connect
        # How a batch's lock-step blocks are sent (_send_blocks): the C method itself, called
        # by map() per socket. An attribute too, so that a test's wrapped sockets can be
        # sent through their own send(): the C method takes only its own type.
        self.send_block: Callable[[_socket.socket, bytes], int] = _socket.socket.send
        # How connect has the kernel hash a kept socket anew (_rehash): an attribute, so that
        # a test sees it called in the compiled build too.
        self.rehash: Callable[[_socket.socket], None] = self._rehash

    def close(self) -> None:
        if self._spare_sweep is not None:
            self._spare_sweep.cancel()
            self._spare_sweep = None
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._epoll.fileno())
        for transfer in list(self._transfers.values()):
            self.remove(transfer)
        for sock in self._spare.values():
            sock.close()
        self.server.spares -= len(self._spare)
        self._spare.clear()
        self._spare_peers.clear()
        self._epoll.close()
        self.sock.close()

    def connect(self, peer: Address) -> _socket.socket:
        """A socket for a transfer to ``peer``: bound to this link's address, connected.

        An ended transfer's socket when one is kept (:meth:`remove`), connected again: a
        start is then one ``connect`` and one ``recv`` where a new socket was five system
        calls (socket, setsockopt, bind, connect, epoll_ctl) and its end a sixth (close); in
        EDK2's size probe + download pairs, 4 KiB each, these were a quarter of the server's
        CPU outside the sends (benchmarks/README.md, s25-tftpstart). The one connected to
        ``peer`` already if there is one (EDK2's download from the probe's port): two
        sockets connected to one client would share its datagrams. Single-port mode only:
        by default no socket is kept, and each is new, on a port the kernel picks (see the
        class's docstring)."""
        spare = self._spare
        if spare:
            sock = spare.pop(peer, None)
            if sock is None:
                _, sock = spare.popitem(last=False)
            self.server.spares -= 1
            old = self._spare_peers.pop(sock.fileno())[0]
            try:
                sock.connect(peer)
            except OSError:
                sock.close()  # a new one below
            else:
                # What was queued before this connect is the old client's (a new client
                # sends to our port only after our first datagram): read and answered as a
                # stranger's, as the data socket would have; so is an ICMP error its
                # datagrams left, which the first send would otherwise fail with. Asked with
                # poll() first, which reports both (an error as POLLERR): a read that finds
                # nothing raises BlockingIOError, ~7,500 instructions against ~3,200 for
                # select() (callgrind), and nothing is queued at almost every start. Not
                # select() itself: it refuses a descriptor of 1024 or more (ValueError), what
                # a storm's sockets are numbered.
                probe = self._probe
                fd = sock.fileno()
                probe.register(fd, select.POLLIN)  # a dict entry: no system call
                try:
                    queued = probe.poll(0)
                finally:
                    probe.unregister(fd)
                if queued:
                    # All of it, not a batch: what is left the new transfer would read as
                    # its own client's (a connected socket's recv has no address), an old
                    # client's ERROR ending another machine's transfer. Bounded by what the
                    # receive buffer can hold (each datagram is charged its skb's truesize,
                    # over _SKB_AT_LEAST bytes), not by a sender that keeps sending.
                    self._read_spare(sock, old, sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_RCVBUF) // _SKB_AT_LEAST + 1)
                self._reused = sock
                self._moved = old != peer  # hashed anew by add() if its transfer is long
                return sock
        server = self.server
        if server.spares and server.spares + server.transfers > server.max_transfers:
            # Other links keep sockets (a storm on another interface) and this one has none
            # to give: one of theirs closed, so that the kept and the running sockets stay
            # within the max_transfers that service.raise_fd_limit counted, whichever
            # interface the storm is on.
            server.drop_spare(self)
        # Non-blocking from its creation (SOCK_NONBLOCK): no setblocking() system call. The
        # C socket type itself: socket.socket, its subclass, adds a Python __init__ and a
        # Python close() (for makefile's reference count, never used here), two Python
        # calls a transfer.
        sock = _socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            if self.single_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self.iface:
                sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, self.iface.encode())
            # Port 0 by default: the kernel's random ephemeral port, the transfer's own TID.
            sock.bind(self.address if self.single_port else (self.address[0], 0))
            sock.connect(peer)
        except BaseException:
            sock.close()
            raise
        return sock

    def local_for(self, peer: Address) -> str | None:
        """The address of this host a request from ``peer`` came in on, as its transfer's
        socket will have it: this link's own where it is bound to one, else the source the
        kernel picks by the route to ``peer`` (a UDP socket connected to it, on this link's
        device if it has one: no datagram is sent), which for a client on a subnet of this
        host is that subnet's address, the one its request was sent to. None where no route
        leads to it. Asked only where a file's URLs name it (TftpServer.by_address), once a
        rendered file: four system calls, not on an asset's path. (IP_PKTINFO on the
        listener would tell the address the datagram was sent to, but costs a recvmsg's
        ancillary data on every RRQ of every setup.)"""
        if self.address[0] != "0.0.0.0":
            return self.address[0]
        probe = _socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            if self.iface:
                probe.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, self._device)
            probe.connect(peer)
            local: str = probe.getsockname()[0]
        except OSError:
            return None
        finally:
            probe.close()
        return local

    def _rehash(self, sock: _socket.socket) -> None:
        """A kept socket just connected to another client for a long transfer (see
        REHASH_ACKS), hashed anew by the kernel under its new 4-tuple: its device bound
        again, the same one (the kernel rehashes a socket whose device is set; connecting a
        socket bound to an address does not, nor disconnecting it first). Linux 6.13+ finds
        a connected UDP socket by a hash of its 4-tuple, but connect() on a socket bound to
        an address leaves it under its first client's, so each datagram of its new client
        walked every socket sharing this port before finding it: ~0.35 us a datagram beside
        50 transfers, ~7 us beside 1,000 (a storm), where a new socket is found at once
        (benchmarks/README.md, s33-tftp). It leaves the port's SO_REUSEPORT group, which
        only ever picks among the unconnected sockets (a connected one is found by its
        4-tuple). Where it is not allowed (a kernel before 5.7; an interface's socket
        without CAP_NET_RAW) the socket is found all the same, by the walk."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, self._device)

    def drop_spare(self) -> bool:
        """Close this link's oldest kept socket (see remove); False if it keeps none."""
        if not self._spare:
            return False
        _, sock = self._spare.popitem(last=False)
        del self._spare_peers[sock.fileno()]
        self.server.spares -= 1
        sock.close()  # out of the epoll set with it (see remove)
        return True

    def _sweep_spares(self) -> None:
        """Close the kept sockets that no transfer took for ``spare_idle`` seconds, checked
        every ``spare_idle`` seconds while any is kept: one unused since the tick before last
        goes, between one and two ``spare_idle`` after its transfer ended. A storm's
        sockets, up to ``max_transfers`` of them, were otherwise held until shutdown (what
        dnsmasq and tftpd-hpa never hold: a socket per transfer, closed at its end). A tick
        number recorded when a socket is kept, not a clock read per transfer's end; the
        oldest are first (kept in order, taken from anywhere), so the walk stops at the
        first one kept since. A socket a transfer holds is not in ``_spare`` and is never
        seen here."""
        self._spare_tick += 1
        stale = self._spare_tick - 2
        spare, peers = self._spare, self._spare_peers
        idle: list[Address] = []
        for peer, sock in spare.items():
            if peers[sock.fileno()][1] > stale:
                break
            idle.append(peer)
        for peer in idle:
            sock = spare.pop(peer)
            del peers[sock.fileno()]
            sock.close()  # out of the epoll set with it (see remove)
        self.server.spares -= len(idle)
        self._spare_sweep = (self._loop.call_later(self.server.spare_idle, self._sweep_spares)
                             if spare else None)

    def add(self, transfer: _Transfer) -> None:
        fd = transfer.sock.fileno()
        reused = self._reused
        if reused is not None and reused.fileno() == fd:
            self._reused = None  # a spare: in the epoll set already
            sender = transfer.sender
            if self._moved and sender.blocks // sender.windowsize >= self.REHASH_ACKS:
                self.rehash(reused)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._transfers[fd] = transfer

    def remove(self, transfer: _Transfer) -> None:
        sock = transfer.sock
        fd = sock.fileno()
        if fd >= 0 and self._transfers.get(fd) is transfer:
            del self._transfers[fd]
        server = self.server
        # Single-port mode: kept for the next transfer (see connect; by default closed, see
        # the class's docstring) while the kept and the running sockets stay within
        # max_transfers, the descriptors service.raise_fd_limit counted (this
        # transfer is still among server.transfers here). Still connected to its client: a
        # datagram the client sends after the end reaches it, not the data socket, and
        # _ready answers it as the data socket would. Only the C type (a test's wrapped
        # socket is closed).
        if (self.single_port and type(sock) is _socket.socket and fd >= 0
                and not server._closing
                and server.spares + server.transfers <= server.max_transfers):
            peer = transfer.peer
            if peer not in self._spare:
                self._spare[peer] = sock
                self._spare_peers[fd] = (peer, self._spare_tick)
                server.spares += 1
                if self._spare_sweep is None:
                    self._spare_sweep = self._loop.call_later(server.spare_idle,
                                                              self._sweep_spares)
                return
        # Its close takes it out of the epoll set (the kernel drops a registration with the
        # last descriptor of its file, and a transfer's socket has no other): no
        # EPOLL_CTL_DEL before it, a system call a transfer.
        sock.close()

    def _ready(self) -> None:
        """The transfers' sockets: the hot path."""
        buf = self._buf
        words = self._words
        transfers = self._transfers
        server = self.server
        monotonic = time.monotonic
        poll, left = self._poll, self.BATCH
        windowed = False  # a window went out in the last batch (see _spin)
        while left > 0:
            # Polled again until nothing is waiting: a client on another CPU often has its
            # next ACK queued by the time the send returns, and a poll costs less than a
            # trip round the event loop (32 MiB at windowsize 8: one loop wake-up per ~15
            # windows instead of one per window, and main's CPU per MiB again).
            events = poll(0, left)
            if not events and (not windowed or not (events := self._spin(left))):
                return
            windowed = False
            left -= len(events)
            # One clock read per poll, not per ACK: every ACK of the batch was queued by
            # now, and its window goes out after the batch's reads whatever the clock says.
            now = monotonic()
            # The batch's windows are sent after all its ACKs are read (below): a lock-step
            # block as its socket and datagram, a window with its transfer.
            socks: list[_socket.socket] = []
            datagrams: list[bytes] = []
            answered: list[_Transfer] = []
            for fd, _ in events:
                try:
                    # A subscript, not .get(): no method call per block (~90 instructions).
                    transfer = transfers[fd]
                except KeyError:  # ended earlier in this batch, or a spare's
                    kept = self._spare_peers.get(fd)
                    if kept is not None:
                        self._read_spare(self._spare[kept[0]], kept[0], self.BATCH)
                    continue
                sock = transfer.sock
                try:
                    size = sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    # An ICMP error reported on the connected socket (ECONNREFUSED: the
                    # client's port is closed). Before the client answered anything the
                    # transfer ends (a late RRQ copy's OACK to a port closed since, a probe
                    # abandoned); later the timer resends, then gives up.
                    log.debug("tftp %s:%d %r: receive error %s", *transfer.peer,
                              transfer.path, exc)
                    if exc.errno == errno.ECONNREFUSED:
                        transfer.unreachable()
                    continue
                if size >= 4:
                    sender = transfer.sender
                    try:
                        # The ACK the sender waits for, as one number (ack_word): no packet
                        # value, no opcode and block read byte by byte.
                        send = sender.next_window(words[0], now)
                        if send is None and buf[1] == 4 and buf[0] == 0:
                            # Another ACK (a duplicate, a partial window's, the last): in
                            # full. Multiplied and added, which the interpreter specialises.
                            self.apply(transfer, sender.ack(buf[2] * 256 + buf[3], now))
                            # (The first window, after the OACK's ACK 0, goes out here.)
                            windowed = windowed or sender.windowsize > 1
                            continue
                    except Exception:
                        transfer.crashed()
                        continue
                    if send is not None:
                        # The bound read here, not once a batch: an ACK of this batch
                        # answered by apply() (or an ERROR, an ICMP error) may have armed
                        # the sweep earlier since, and a later deadline must not re-arm it.
                        deadline = sender.deadline
                        if deadline is not None and deadline < server._rearm_below:
                            server._sweep_by(deadline)
                        # One block comes as the datagram itself (lock-step, from packets or
                        # a read), a window as a tuple. isinstance() on the exact type is a
                        # pointer compare, and it narrows for mypy: a typing.cast() here was
                        # a Python call per block (~390 instructions, callgrind).
                        if isinstance(send, bytes):
                            socks.append(sock)
                            datagrams.append(send)
                        else:
                            transfer.window = send
                            answered.append(transfer)
                        continue
                transfer.other(bytes(buf[:size]))
            # Every ACK of the batch read, then every window sent: a send wakes its client,
            # which on a busy CPU preempts the server; read and sent in turn, each of the
            # batch's sends could cost a switch there and back before the next ACK was read.
            # Sent in a run, the clients answer while the run goes on and the next poll finds
            # their ACKs: 50 lock-step clients, 411 switches per 35,750 blocks against 1,235,
            # 3.5 % less CPU (benchmarks/README.md, session 11). One event per transfer per
            # poll, so a window (a view of its transfer's frame) is still intact when sent.
            if socks:
                self._send_blocks(socks, datagrams)
            for transfer in answered:
                self._send(transfer.window, transfer)
                if len(transfer.window) > 1:
                    # The next window read while the client takes this one: its ACK is
                    # answered without the read (a streamed file; nothing for packets).
                    transfer.sender.read_ahead()
                    windowed = True

    def _send_blocks(self, socks: list[_socket.socket], datagrams: list[bytes]) -> None:
        """Each socket's datagram, a batch's lock-step blocks: map() calls send() per pair
        and deque() drains it, a loop in C with no bytecode per datagram (~275 instructions
        of a block's ~9,800 less than a for loop of send() calls, callgrind). A send that
        fails (a full buffer, an ICMP error queued on the socket) stops the run, and the
        rest go on after it."""
        pending = iter(socks)
        sends = map(self.send_block, pending, datagrams)
        while True:
            try:
                collections.deque(sends, 0)
                return
            except OSError as exc:
                failed = socks[len(socks) - operator.length_hint(pending) - 1]
                self._not_sent(exc, self._transfers.get(failed.fileno()))

    def _spin(self, left: int) -> list[tuple[int, int]]:
        """The events of a lone windowed transfer's next ACK, busy-waited for up to the
        server's ``ack_spin`` seconds after its window went out, instead of the event
        loop's sleep: [] when another transfer runs, the wait is off or backed off, or no
        ACK came in time.

        A single windowed transfer is a ping-pong (RFC 7440 §4: the next window only after
        the ACK of the last), so its pace is two wake-ups per window. Asleep in the event
        loop, the server's CPU goes idle, and waking it for the ACK is the dearest part of
        the round (on this VM a halted vCPU woken by an IPI: with server and client pinned
        one CPU each, 0.18-0.29 s per 19 MiB against 0.026 s sharing one CPU). Polling
        keeps the CPU awake and takes the ACK as soon as it is queued (measured: 80 % of
        them within 10 us of the poll's start, 98 % within 100 us): the kernel's busy-poll
        (SO_BUSY_POLL) does the same for a NIC's queue, and loopback has none. Only for a
        lone transfer: with others running, a poll finds their datagrams and the event
        loop's other work (HTTP, DHCP) waits for no spin; a client slower than the wait (a
        remote one) costs one wait per SPIN_BACKOFF windows."""
        spin = self.server.ack_spin
        if spin <= 0 or len(self._transfers) != 1:
            return []
        if self._unspun:
            self._unspun -= 1
            return []
        poll, monotonic = self._poll, time.monotonic
        until = monotonic() + spin
        while monotonic() < until:
            events = poll(0, left)
            if events:
                self._missed = 0
                return events
        self._unspun = min(1 << self._missed, self.SPIN_BACKOFF)
        self._missed += 1
        return []

    def _read_spare(self, sock: _socket.socket, peer: Address, most: int) -> None:
        """What waits on a kept socket (see remove), from ``peer``, the client it was
        connected to, ``most`` datagrams at most: answered as the data socket answers a
        stranger (a late ACK ignored, ERROR 5 otherwise). An ICMP error its datagrams brought
        back is dropped."""
        buf = self._buf
        for _ in range(most):
            try:
                size = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # the error is cleared by its read
            self._stranger(bytes(buf[:size]), peer)

    def _readable(self) -> None:
        """The unconnected data socket: whatever no transfer's socket took."""
        buf = self._buf
        receive = self.sock.recvfrom_into
        transfers = self.server._transfers
        for _ in range(self.BATCH):
            try:
                size, peer = receive(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                log.debug("tftp %s:%d: receive error %s", *self.address, exc)
                return
            transfer = transfers.get(peer)
            if transfer is not None and transfer.link is self and not transfer.closed:
                # Its client, before or after its socket (cannot happen: the socket is
                # connected before the first send; handled in full all the same).
                transfer.other(bytes(buf[:size]))
            else:
                self._stranger(bytes(buf[:size]), peer)

    def _stranger(self, data: bytes, src: Address) -> None:
        if len(data) >= 2 and data[0] == 0 and data[1] == Opcode.ERROR:
            return  # never answer an ERROR (RFC 1350 §7): a client ending a finished transfer
        server = self.server
        if src in server._ended and len(data) >= 2 and data[0] == 0 and data[1] == Opcode.ACK:
            # A late ACK of a transfer that just ended (its last DATA was resent while the
            # ACK was on its way): a socket per transfer would be closed and say nothing.
            log.debug("tftp %s:%d: late ACK from %s:%d ignored", *self.address, *src)
            return
        server.stats.unknown_tid += 1
        server.limited.log(
            logging.INFO, src[0], "tftp %s:%d: packet from unknown TID %s:%d (ERROR 5)",
            *self.address, *src,
        )
        self.send(error_packet(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), src)

    def apply(self, transfer: _Transfer, step: Step) -> None:
        if transfer.closed:
            return
        if step.send:
            self._send(step.send, transfer)
        if step.outcome is not None:
            transfer.finished(step)
            return
        deadline = step.deadline
        if deadline is not None and deadline < self.server._rearm_below:
            self.server._sweep_by(deadline)

    def _send(self, send: tuple[Datagram, ...], transfer: _Transfer) -> None:
        sock = transfer.sock
        if len(send) == 1:
            try:
                sock.send(send[0])
            except OSError as exc:
                self._not_sent(exc, transfer)
            return
        server = self.server
        start = 0
        if server.gso:
            per = self._per if send is self._able else _gso_per(send)
            if per:
                # A streamed transfer's full windows are one tuple (views of its frame):
                # checked once. Held here until the next window, another transfer's or its own.
                self._able, self._per = send, per
                size = len(send[0])
                segment = self._segment.get(size)
                if segment is None:
                    segment = self._segment[size] = [
                        (_SOL_UDP, _UDP_SEGMENT, _GSO_SIZE.pack(size))]
                try:
                    # UDP_SEGMENT (Linux >= 4.18): the kernel cuts the buffers (one per
                    # datagram, gathered) into the window's datagrams: one system call per
                    # 64 KiB of window (windowsize 64 at blksize 1468: two, where datagram
                    # by datagram was 64 and five times the CPU, benchmarks/README.md).
                    if per >= len(send):
                        sock.sendmsg(send, segment)
                    else:
                        while start < len(send):
                            sock.sendmsg(send[start:start + per], segment)
                            start += per
                    return
                except (BlockingIOError, InterruptedError) as exc:
                    self._not_sent(exc, transfer)
                    return
                except OSError as exc:
                    if exc.errno not in _GSO_ERRORS:
                        self._not_sent(exc, transfer)  # the client, not GSO (ECONNREFUSED)
                        return
                    # No GSO here (an old kernel, a device without it): never try again.
                    log.info("tftp: UDP_SEGMENT unavailable (%s), sending datagram by "
                             "datagram", exc)
                    server.gso = False
        for datagram in send[start:]:
            try:
                sock.send(datagram)
            except OSError as exc:
                self._not_sent(exc, transfer)
                return

    def _not_sent(self, exc: OSError, transfer: _Transfer | None) -> None:
        if isinstance(exc, BlockingIOError | InterruptedError):
            self.full += 1  # lost like on the wire: the retransmission timer resends it
        elif transfer is not None:
            log.debug("tftp %s:%d %r: send error %s", *transfer.peer, transfer.path, exc)

    def send(self, datagram: bytes, dest: Address) -> None:
        with contextlib.suppress(OSError):  # best effort, like any single UDP datagram
            self.sock.sendto(datagram, dest)


_ENDED = 4096  # clients remembered after their transfer, for late ACKs and late RRQ copies
# A copy of an ended transfer's RRQ is told from the same request sent again by when it
# reached the kernel (see TftpServer._late_copy); this bounds how long after the end a copy
# read late is still ignored: longer than a storm's listener backlog (copies read up to
# ~4.5 s late in a 1,000-device storm). An older one is served (so is any copy where the
# kernel gives no receive time: then this window alone decides, as it did before).
_STALE_COPY = 5.0
_SWEEP_TICK = 0.002  # seconds between sweeps at least; a loss costs min_rto + up to this
_SWEEP_PER_TRANSFER = 2e-6  # ... and more with many transfers: a sweep walks them all
_SOL_UDP = 17
_UDP_SEGMENT = 103  # linux/udp.h
_GSO_SIZE = struct.Struct("=H")
_GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS
_GSO_MAX_BYTES = 65000  # a send's datagrams, headers included, fit one IPv4 packet
# What a kernel or device without UDP_SEGMENT answers; any other error is the client's
# (ECONNREFUSED from an ICMP error on the connected socket), not GSO's.
_GSO_ERRORS = frozenset({errno.EINVAL, errno.EIO, errno.EOPNOTSUPP, errno.ENOPROTOOPT,
                         errno.EMSGSIZE})


def _regular(st: os.stat_result) -> os.stat_result:
    """``st`` if it is a regular file's; a directory, device or FIFO is refused as the
    client's error (ERROR 0 "cannot read the file"), not a bug."""
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return st


def _gso_per(datagrams: tuple[Datagram, ...]) -> int:
    """Datagrams per ``UDP_SEGMENT`` send of this window, 0 if it cannot be cut so: every
    datagram but the last exactly as long as the first (the segment size), the last no
    longer; a send at most 64 segments (UDP_MAX_SEGMENTS) and ~64 KiB (one IP packet)."""
    size = len(datagrams[0])
    # (The lengths compared in C: a generator per window cost more than the check.)
    if len(datagrams[-1]) > size or len(set(map(len, datagrams[:-1]))) != 1:
        return 0
    return min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)


class TftpObserver(Protocol):
    """Told how every transfer ended (metrics): ``outcome`` complete, probe or failed, and the
    bytes acknowledged by the client."""

    def tftp_transfer(self, outcome: str, size: int) -> None: ...


class TftpServer:
    """Read-only TFTP on (host, port); ``port=0`` picks a free port, see :attr:`port`."""

    def __init__(
        self,
        files: TftpFiles,
        *,
        host: str = "0.0.0.0",
        port: int = 69,
        max_transfers: int = 64,
        max_per_client: int = 64,
        mtu: int = 1500,
        interfaces: list[str] | None = None,
        retransmit: float = 1.0,
        max_retries: int = 6,
        max_windowsize: int = 64,
        min_rto: float | None = 0.005,
        gso: bool = True,
        ack_spin: float = 0.0001,
        cache_size: int = 64 << 20,
        cache_file_size: int = 16 << 20,
        spare_idle: float = 5.0,
        single_port: bool = False,
        observer: TftpObserver | None = None,
        by_address: bool = False,
        watcher: InterfaceWatcher | None = None,
    ) -> None:
        self._files = files
        # With interfaces named: the host's addresses as they come and go (dnsmasq's
        # --bind-dynamic, as DHCP and DNS follow them): a named interface is listened on
        # while it has an IPv4 address, by its index (one deleted and made again, a VLAN's
        # or a USB NIC's, is a new device its old socket never hears). None: bound once.
        self._watcher = watcher
        self._ifindex: dict[str, int] = {}
        self._changed: asyncio.Event | None = None
        self._follower: asyncio.Task[None] | None = None
        self._draining: set[asyncio.Task[None]] = set()
        # The files' answers name the address a request came in on (Content.by_address: a
        # host without a default route and no --advertise, whose base URL is 127.0.0.1, a
        # device's own loopback): each lookup is given a way to ask it (_Link.local_for),
        # asked only for a file rendered with URLs. Off (every other setup), an RRQ's only
        # cost is this flag's test.
        self.by_address = by_address
        self.observer = observer
        self.host = host
        self.port = port
        self.max_transfers = max_transfers
        self.max_per_client = max_per_client
        self.interfaces = list(interfaces) if interfaces else []
        # The round-trip timer's floor never exceeds the fixed interval it replaces.
        self._settings = (mtu, retransmit, max_retries, max_windowsize,
                          None if min_rto is None else min(min_rto, retransmit))
        self.policy: Policy | None = None
        self.stats = TftpStats()
        self.limited = RateLimitedLog(log)
        self.gso = gso  # send a window in one sendmsg; cleared when the kernel refuses
        # Seconds a lone windowed transfer's next ACK is busy-waited for (_Link._spin): on
        # a quiet machine 80 % of them come within 10 us. 0: off.
        self.ack_spin = ack_spin
        self._listeners: list[tuple[DrainingTransport, BoundaryProtocol]] = []
        self._links: dict[str | None, _Link] = {}
        # Prebuilt DATA of files up to cache_file_size, cache_size bytes in all.
        self.cache = _PacketCache(cache_size, cache_file_size)
        self._transfers: dict[Address, _Transfer] = {}
        # Clients whose transfer ended lately, oldest first (see _Link._stranger), with the
        # request that transfer answered and when it ended, if the client had our answer.
        # (The end in monotonic seconds for the window, and as time.time_ns() to compare
        # with a datagram's kernel receive time: see _late_copy.)
        self._ended: OrderedDict[Address, tuple[bytes, float, int] | None] = OrderedDict()
        # One timer for every transfer's retransmission deadline (see _sweep_by).
        self._sweep: asyncio.TimerHandle | None = None
        self._rearm_below = math.inf
        self._opening: set[Address] = set()
        self.spares = 0  # ended transfers' sockets the links keep for the next (_Link.remove)
        # Seconds a kept socket may stay unused before it is closed (_Link._sweep_spares):
        # long enough for a storm's next starts to take it (EDK2's download follows its size
        # probe within milliseconds), short enough that a storm's sockets are not held after.
        self.spare_idle = spare_idle
        # Every transfer of a listener on one data port (tftp.single_port; see _Link), or
        # each on an ephemeral port of its own: the default, which forged ACKs cannot find.
        self.single_port = single_port
        self._per_client: Counter[str] = Counter()
        self._closing = False

    def forget_ended(self, now: float | None = None) -> None:
        """Clients whose transfer ended over ``_STALE_COPY`` seconds ago (monotonic ``now``)
        forgotten, once quiet after a storm (Service.forget_idle): past that window a copy of
        their request is served anyway (_late_copy), and a late ACK comes within a
        retransmission of the last DATA, not seconds after it (one later is answered ERROR 5,
        as it was once 4,096 newer transfers had ended). A 1,000-device storm left its ~2,000
        transfers' entries (~0.4 MiB) until 4,096 newer ones pushed them out. (Those without
        an end time, kept for their late ACKs only, stay: few.)"""
        cutoff = (time.monotonic() if now is None else now) - _STALE_COPY
        ended = self._ended
        for peer in [p for p, e in ended.items() if e is not None and e[1] <= cutoff]:
            del ended[peer]

    def drop_spare(self, asking: _Link) -> None:
        """One socket another link than ``asking`` keeps, closed (_Link.connect)."""
        for link in self._links.values():
            if link is not asking and link.drop_spare():
                return

    @property
    def transfers(self) -> int:
        """Transfers running now (including ones whose file is being opened)."""
        return len(self._transfers) + len(self._opening)

    async def start(self) -> None:
        mtu, retransmit, max_retries, max_windowsize, min_rto = self._settings
        try:
            self.policy = Policy(
                mtu=mtu,
                retransmit=retransmit,
                max_retries=max_retries,
                max_windowsize=max_windowsize,
                min_rto=min_rto,
            )
        except ValueError as exc:
            raise ConfigError(str(exc), key="tftp", fix="check tftp.mtu and timers") from None
        if self.max_transfers < 1 or self.max_per_client < 1:
            raise ConfigError("must be at least 1", key="tftp.max_transfers")
        failed: BaseException | None = None
        following = bool(self.interfaces) and self._watcher is not None
        try:
            ifaces: list[str | None] = [*self.interfaces] or [None]
            if following:
                present = self._present()
                for name in self.interfaces:
                    if name not in present:
                        log.warning("tftp: interface %s has no IPv4 address (yet): served "
                                    "once it has one", name)
                ifaces = [name for name in self.interfaces if name in present]
                self._ifindex = {name: present[name] for name in self.interfaces
                                 if name in present}
            for iface in ifaces:
                await self._listen(iface)
        except BaseException as exc:
            failed = exc
        if failed is not None:  # closed outside the handler: see recorder._write_group
            await self.close()
            raise failed
        if following:
            assert self._watcher is not None
            self._changed = asyncio.Event()
            self._watcher.subscribe(self._on_addresses)
            self._follower = asyncio.create_task(self._follow(), name="tftp-interfaces")
        # The interfaces listened on now: one named but not up yet is not (its warning
        # above; "tftp listening on ... on vb" once it is).
        named = [iface for iface in ifaces if iface is not None]
        log.info(
            "tftp listening on %s:%d%s (max blksize %d)",
            self.host, self.port,
            f" on {', '.join(named)}" if named else
            " on no interface yet" if self.interfaces else "",
            self.policy.max_blksize,
        )

    async def _listen(self, iface: str | None) -> None:
        sock = self._bind(self.host, self.port, iface, listener=True)
        # With port 0 the first bind picks the port; further interfaces reuse it.
        self.port = sock.getsockname()[1]
        try:
            # Shared with the transfers' connected sockets (see _Link).
            data = self._bind(self.host, 0, iface, listener=True, reuse=True)
        except BaseException:
            sock.close()
            raise
        link = _Link(self, data, iface)
        try:
            boundary = BoundaryProtocol(
                f"tftp[{iface}]" if iface else "tftp",
                functools.partial(self._handle, iface),
                logger=log,
                min_size=2,
                max_size=MAX_REQUEST,
            )
            # A burst of RRQs read per wake-up, not one per trip round the loop: in a storm the
            # listener fell seconds behind the transfers (each trip also serves every
            # transfer with an ACK waiting, DHCP and HTTP), clients resent their RRQs
            # meanwhile (3,740 copies for 2,000 requests in a 1,000-device storm), and a late
            # copy read after its transfer ended started a second one (see _handle).
            # Each with its kernel receive time, which tells such a copy from a new request.
            transport = open_stamped_endpoint(sock, boundary)
        except BaseException:
            # Both sockets closed here: a link left behind kept its data socket open until
            # the next listen on the interface replaced it (or for good, at a failed start).
            link.close()
            sock.close()
            raise
        self._links[iface] = link
        self._listeners.append((transport, boundary))
        link.listener = transport

    def _present(self) -> dict[str, int]:
        """The named interfaces that have an IPv4 address now, and their indexes."""
        assert self._watcher is not None
        present: dict[str, int] = {}
        for entry in self._watcher.addresses():
            if entry.name in self.interfaces and entry.name not in present:
                present[entry.name] = entry.ifindex
        return present

    def _on_addresses(self, addresses: Addresses) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _follow(self) -> None:
        assert self._changed is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Listen on each named interface that has an IPv4 address, and on no other."""
        wanted = self._present()
        for name, index in list(self._ifindex.items()):
            if wanted.get(name) != index:
                del self._ifindex[name]
                self._let_go(name)
                log.info("tftp: stopped listening on %s (%s)", name,
                         "its address went away" if name not in wanted
                         else "the interface was made again")
        for name, index in wanted.items():
            if name in self._ifindex:
                continue
            try:
                await self._listen(name)
            except (ConfigError, OSError) as exc:
                self.limited.log(logging.WARNING, f"listen {name}",
                                 "tftp: cannot listen on %s: %s", name, exc)
                continue
            self._ifindex[name] = index
            log.info("tftp listening on %s:%d on %s", self.host, self.port, name)

    def _let_go(self, iface: str) -> None:
        """One interface's listener, data socket and transfers closed (its device went
        away, or was made again under another index)."""
        link = self._links.pop(iface, None)
        if link is None:
            return
        for transport, boundary in list(self._listeners):
            if transport is link.listener:
                self._listeners.remove((transport, boundary))
                transport.close()
                task = asyncio.ensure_future(boundary.drain())
                self._draining.add(task)
                task.add_done_callback(self._draining.discard)
        for transfer in list(link._transfers.values()):
            transfer.close()
        link.close()

    async def close(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.unsubscribe(self._on_addresses)
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        for task in list(self._draining):
            await task
        for transport, _ in self._listeners:
            transport.close()
        for _, proto in self._listeners:
            await proto.drain()
        self._listeners.clear()
        for transfer in list(self._transfers.values()):
            transfer.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._rearm_below = math.inf
        for link in self._links.values():
            link.close()
        self._links.clear()
        self.cache.clear()

    # -- retransmission deadlines ------------------------------------------------------

    def _sweep_by(self, deadline: float) -> None:
        """Make the sweep run by ``deadline`` (``time.monotonic()`` seconds).

        One timer for all transfers instead of a timer handle each: in lock-step every ACK
        moves a transfer's deadline, and arming (or lazily re-arming) a handle per transfer
        cost more than the ACK itself. A transfer only stores its deadline; the sweep walks
        the transfers when the earliest one is due, resends for those whose deadline passed
        and sleeps until the next, at least a tick later so that a storm's thousand
        deadlines are taken in groups rather than with a wake-up each."""
        if self._sweep is not None:
            self._sweep.cancel()
        # A deadline up to a tick earlier than this one waits for it: re-arming a timer
        # whenever one transfer's deadline undercuts another's was a tenth of the cost.
        self._rearm_below = deadline - _SWEEP_TICK
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(max(0.0, deadline - time.monotonic()), self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep = None
        self._rearm_below = -math.inf  # no re-arming from inside the sweep: done below
        # The ACKs already queued first: the event loop runs a due timer before it polls for
        # I/O (libuv: timers lead each iteration), so after a long iteration (a busy loop in
        # a storm) the sweep came before the ACKs that arrived meanwhile, and resent windows
        # their clients had acknowledged. Each such resend cost a window's send, and its
        # client three ACKs of the copies (a gap to it), each read and ignored here.
        for link in self._links.values():
            link._ready()
        now = time.monotonic()
        nearest = math.inf
        for transfer in list(self._transfers.values()):
            # A closed transfer is no longer listed; one closed by this sweep is skipped.
            deadline = None if transfer.closed else transfer.sender.deadline
            if deadline is not None and deadline <= now:
                transfer.on_timer(now)
                deadline = None if transfer.closed else transfer.sender.deadline
            if deadline is not None and deadline < nearest:
                nearest = deadline
        self._rearm_below = math.inf
        if nearest < math.inf:
            tick = max(_SWEEP_TICK, len(self._transfers) * _SWEEP_PER_TRANSFER)
            self._sweep_by(max(nearest, now + tick))

    # -- sockets -------------------------------------------------------------------------

    def _bind(self, host: str, port: int, iface: str | None, *, listener: bool,
              reuse: bool = False) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if iface:
                # asyncio cannot tell which interface a datagram came in on: bind per
                # interface instead (DESIGN.md §5).
                sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE, iface.encode())
            sock.bind((host, port))
            if reuse:
                # After the bind: port 0 with SO_REUSEPORT set may be given a port that
                # another socket of this user with SO_REUSEPORT holds; a port of its own
                # first, then shared with the transfers' sockets (their binds check it from
                # now on, and join its group).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if listener:
                sockets.grow_receive_buffer(sock)  # a storm's RRQs arrive at once
        except OSError as exc:
            sock.close()
            if not listener:
                raise
            raise self._bind_error(exc, host, port, iface) from None
        return sock

    @staticmethod
    def _bind_error(exc: OSError, host: str, port: int, iface: str | None) -> ConfigError:
        return sockets.bind_error(
            exc, what="TFTP", proto="UDP", host=host, port=port, key=PORT_KEY, flag=PORT_FLAG,
            interface=iface, interface_key="server.interfaces",
            others="tftpd-hpa or dnsmasq --enable-tftp",
        )

    # -- requests ------------------------------------------------------------------------

    def _handle(
        self, iface: str | None, data: bytes, peer: Address
    ) -> list[Reply] | Awaitable[list[Reply]] | None:
        try:
            packet = parse(data)
        except DecodeError as exc:
            if data[:2] not in (b"\x00\x01", b"\x00\x02"):
                raise  # not a request: the boundary logs it, rate-limited, and drops it
            # A request that does not decode (its mode or an option not NUL-terminated, no
            # mode, a name that is not UTF-8): told why, ERROR 4, as tftpd-hpa ("Request not
            # null-terminated", "Missing mode") and dnsmasq ("unsupported request") answer
            # it, rather than left to time out. The reply names the field, not the bytes.
            self.stats.refused += 1
            self.limited.log(logging.INFO, peer[0], "tftp %s:%d: malformed request: %s",
                             *peer, exc)
            return [(error_packet(ErrorCode.ILLEGAL_OPERATION,
                                  f"malformed request: bad {exc.field or 'request'}"), peer)]
        if isinstance(packet, WriteRequest):
            self.stats.refused += 1
            self.limited.log(
                logging.INFO, peer[0], "tftp %s:%d %r: write request refused (read-only)",
                *peer, packet.filename,
            )
            return [(error_packet(ErrorCode.ACCESS_VIOLATION, "read-only server"), peer)]
        if not isinstance(packet, ReadRequest):
            log.debug("tftp %s:%d: %s on the listener ignored", *peer, type(packet).__name__)
            return None
        self.stats.requests += 1
        running = self._transfers.get(peer)
        if (running is not None and running.request == data) or peer in self._opening:
            # Our first reply was lost: resend it rather than start a second transfer. (A
            # request from a port whose request is still being opened waits for its resend.)
            self.stats.duplicate_requests += 1
            log.debug("tftp %s:%d %r: duplicate request", *peer, packet.filename)
            if running is not None:
                running.duplicate_request()
            return None
        if running is not None:
            # A different request from the port of a running transfer: its client has moved
            # on. A size probe and the download from one port (EDK2's pair, when the kernel
            # hands the new socket the old port), the download's RRQ read before the probe's
            # ERROR; U-Boot's next file from its one port (``tftpsrcp``) while its last ACK
            # of the previous one was lost. Taken as a copy, the old transfer's answer went
            # out again and the client's ACKs reached no transfer (a storm's device failed
            # so, benchmarks/README.md, session 15). The old transfer ends, its socket with
            # it (and any of its datagrams still queued), before the new one connects.
            log.debug("tftp %s:%d %r: a new request from the port of a running transfer",
                      *peer, packet.filename)
            running.abandoned()
        ended = self._ended.get(peer)
        if ended is not None and ended[0] == data and self._late_copy(iface, ended):
            self.stats.duplicate_requests += 1
            log.debug("tftp %s:%d %r: copy of the request of a transfer that has ended, ignored",
                      *peer, packet.filename)
            return None
        if packet.mode.lower() not in ("octet", "netascii"):
            self.stats.refused += 1
            self.limited.log(
                logging.INFO, peer[0], "tftp %s:%d %r: unsupported mode %r",
                *peer, packet.filename, packet.mode,
            )
            return [(error_packet(ErrorCode.ILLEGAL_OPERATION, "unsupported mode"), peer)]
        try:
            path = clean_relative(packet.filename)
        except Forbidden as exc:
            self.stats.refused += 1
            self.limited.log(
                logging.INFO, peer[0], "tftp %s:%d %r: refused: %s", *peer, packet.filename, exc
            )
            return [(error_packet(ErrorCode.ACCESS_VIOLATION, "access violation"), peer)]
        except NotFound:
            self.stats.not_found += 1
            return [(error_packet(ErrorCode.FILE_NOT_FOUND, "file not found"), peer)]
        if self._closing:
            return None
        if self._per_client[peer[0]] >= self.max_per_client:
            self.stats.busy += 1
            self.limited.log(
                logging.WARNING, peer[0],
                "tftp %s:%d %r: %s already has %d transfers running (tftp.max_per_client), "
                "answered ERROR busy", *peer, path, peer[0], self.max_per_client,
            )
            return [(error_packet(ErrorCode.NOT_DEFINED,
                                  "server busy: too many transfers from your address"), peer)]
        if self.transfers >= self.max_transfers:
            # No reply: the client retransmits its RRQ and gets a slot later; an ERROR
            # would abort the boot of a machine that merely came up with a thousand others.
            self.stats.busy += 1
            self.limited.log(
                logging.WARNING, "busy",
                "tftp %s:%d %r: %d transfers running (tftp.max_transfers), request dropped "
                "for the client to retry", *peer, path, self.transfers,
            )
            return None
        self._opening.add(peer)
        self._per_client[peer[0]] += 1
        return self._open(iface, packet, path, peer, data)

    def _late_copy(self, iface: str | None, ended: tuple[bytes, float, int]) -> bool:
        """Whether the RRQ being handled, identical to the one a transfer from its (address,
        port) answered until it ended, is a copy of it read late: it reached the kernel
        before that end (the client resent it before our answer reached it; a storm's
        listener reads seconds behind), within ``_STALE_COPY``. One that arrived after the
        end is a new request (the client fetches the same file again from a fixed port, or
        another client behind a NAT or relay has the port now): served at once, where a
        window alone ignored it until the client's next retransmission after it (U-Boot 5 s,
        benchmarks/README.md s19-stall). dnsmasq takes a copy as one only while the transfer
        runs. (RFC 1123's Sorcerer's Apprentice rule is about duplicate ACKs, not this.)

        The kernel stamps a datagram with CLOCK_REALTIME (SO_TIMESTAMPNS; SO_TIMESTAMPING's
        software receive stamp is the same clock, and none is taken from CLOCK_MONOTONIC),
        so the end is taken with time.time_ns() too: one clock, read moments to seconds
        apart. NTP's slewing moves it at most 0.5 ms a second; only a step of the clock (a
        first sync, a manual set) between a copy's arrival and the end could misorder them,
        and then one request is served twice (a transfer that times out in ~3 s) or waits
        for its client's next retransmission, which is what either rule alone costs."""
        _, end, end_ns = ended
        if time.monotonic() - end >= _STALE_COPY:
            return False
        link = self._links.get(iface)
        arrived = None if link is None or link.listener is None else link.listener.arrived
        return arrived is None or arrived < end_ns

    def _open(
        self, iface: str | None, request: ReadRequest, path: str, peer: Address, raw: bytes
    ) -> list[Reply] | Awaitable[list[Reply]]:
        """The content lookup, run at once (as :func:`netboot.eager.eager` does): an asset's
        blob needs no wait, and the transfer starts in the RRQ's own callback, without a task per
        request (a task, its scheduling and a trip round the loop before the transfer
        began); a lookup that waits (a per-machine file asks the inventory) goes on as a
        task, and the transfer starts when it ends. Then the listener is given a future of
        the replies, not a coroutine: one it drops unstarted (past its tasks in flight)
        would never give back the request's slot, and the client's next RRQs would be
        taken for copies of one being opened."""
        try:
            # Its first step run here (netboot.eager.first_step, as eager() runs it), the
            # blob taken as the coroutine's return value, not through a future made, set
            # and read again (and the loop asked for, a getpid system call) per request.
            coro = (self._files.tftp_open(path, peer) if not self.by_address else
                    self._files.tftp_open(path, peer, functools.partial(
                        self._links[iface].local_for, peer)))
            done, value = first_step(coro)
        except Exception as exc:
            self._opened_not(peer)
            return self._lookup_failed(exc, path, peer)
        except BaseException:
            self._opened_not(peer)
            raise
        if done:
            return self._opened(iface, request, path, peer, raw, value)
        lookup = carry_on(coro, value)
        answer: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
        lookup.add_done_callback(functools.partial(
            self._answer, iface, request, path, peer, raw, answer))
        return answer

    def _answer(
        self, iface: str | None, request: ReadRequest, path: str, peer: Address, raw: bytes,
        answer: asyncio.Future[list[Reply]], lookup: asyncio.Future[Blob],
    ) -> None:
        try:
            replies = self._looked_up(iface, request, path, peer, raw, lookup)
        except Exception as exc:  # a bug: the listener's boundary logs it
            if not answer.done():
                answer.set_exception(exc)
            return
        if not answer.done():  # (cancelled when the listener closed)
            answer.set_result(replies)

    def _looked_up(
        self, iface: str | None, request: ReadRequest, path: str, peer: Address, raw: bytes,
        lookup: asyncio.Future[Blob],
    ) -> list[Reply]:
        if lookup.cancelled():
            self._opened_not(peer)
            return []
        exc = lookup.exception()
        if exc is not None:
            self._opened_not(peer)
            return self._lookup_failed(exc, path, peer)
        return self._opened(iface, request, path, peer, raw, lookup.result())

    def _lookup_failed(self, exc: BaseException, path: str, peer: Address) -> list[Reply]:
        """The content layer's refusal or failure, told to the client and logged."""
        if isinstance(exc, NotFound):
            self.stats.not_found += 1
            # U-Boot's pxelinux.cfg lookup misses up to 14 files in a row (§3.3).
            if path.startswith("pxelinux.cfg/"):
                log.debug("tftp %s:%d %r: not found: %s", *peer, path, exc)
            else:
                self.limited.log(logging.INFO, peer[0], "tftp %s:%d %r: not found: %s",
                                 *peer, path, exc)
            return [(error_packet(ErrorCode.FILE_NOT_FOUND, "file not found"), peer)]
        if isinstance(exc, Forbidden):
            self.stats.refused += 1
            self.limited.log(
                logging.INFO, peer[0], "tftp %s:%d %r: refused: %s", *peer, path, exc
            )
            return [(error_packet(ErrorCode.ACCESS_VIOLATION, "access violation"), peer)]
        if isinstance(exc, StoreError):  # a per-machine file needs the inventory
            self.stats.failed += 1
            self.limited.log(logging.WARNING, "store",
                             "tftp %s:%d %r: inventory unavailable: %s", *peer,
                             path, exc)
            return [(error_packet(ErrorCode.NOT_DEFINED, "inventory unavailable"), peer)]
        if isinstance(exc, OSError):  # the disk, not a bug: no traceback
            self.stats.failed += 1
            self.limited.log(logging.WARNING, peer[0], "tftp %s:%d %r: cannot read: %s",
                             *peer, path, exc)
            return [(error_packet(ErrorCode.NOT_DEFINED, "cannot read the file"), peer)]
        log.error("tftp %s:%d %r: content lookup failed", *peer, path, exc_info=exc)
        return [(error_packet(ErrorCode.NOT_DEFINED, "internal error"), peer)]

    def _opened_not(self, peer: Address) -> None:
        """The request opened no transfer: its slot and its client's count given back."""
        self._opening.discard(peer)
        self._release(peer)

    def _opened(
        self, iface: str | None, request: ReadRequest, path: str, peer: Address, raw: bytes,
        blob: Blob,
    ) -> list[Reply]:
        registered = False
        try:
            if self._closing:
                return []
            if iface not in self._links:
                # Its interface was let go while the lookup waited (_let_go: its address went
                # away, its device was made again): the listener that would carry an ERROR
                # closed with it, so the request is dropped, told once, without a traceback
                # (was a KeyError in _start_transfer, logged as a bug). The client's retry
                # reaches the interface's next listener, as dnsmasq's would its new socket.
                self.limited.log(logging.INFO, f"gone {iface}",
                                 "tftp %s:%d %r: interface %s let go while the file was "
                                 "looked up: request dropped", *peer, path, iface)
                return []
            try:
                transfer = self._start_transfer(iface, request, path, peer, blob, raw)
            except PermissionError as exc:
                self.stats.refused += 1
                self.limited.log(logging.INFO, peer[0], "tftp %s:%d %r: refused: %s",
                                 *peer, path, exc)
                return [(error_packet(ErrorCode.ACCESS_VIOLATION, "access violation"), peer)]
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # No descriptor left (the open-files limit, which service.raise_fd_limit
                    # sizes for max_transfers: something else holds more than counted): as
                    # at max_transfers, dropped for the client's retry, not an ERROR that
                    # would abort its boot.
                    self.stats.busy += 1
                    self.limited.log(
                        logging.WARNING, "busy",
                        "tftp %s:%d %r: no descriptor left (%s; the open-files limit), "
                        "request dropped for the client to retry", *peer, path, exc.strerror)
                    return []
                # A file removed since the lookup, a name too long: the client is told, the
                # log says why, and nothing else is disturbed.
                self.stats.failed += 1
                self.limited.log(logging.WARNING, peer[0], "tftp %s:%d %r: cannot start: %s",
                                 *peer, path, exc)
                if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR):
                    return [(error_packet(ErrorCode.FILE_NOT_FOUND, "file not found"), peer)]
                if exc.errno == errno.EFBIG:  # see _netascii
                    return [(error_packet(ErrorCode.NOT_DEFINED,
                                          "file too large for netascii: ask octet"), peer)]
                return [(error_packet(ErrorCode.NOT_DEFINED, "cannot read the file"), peer)]
            if transfer is None:
                return [(error_packet(ErrorCode.NOT_DEFINED, "internal error"), peer)]
            registered = True
            transfer.begin()
            return []
        finally:
            self._opening.discard(peer)
            if not registered:
                self._release(peer)

    def _start_transfer(
        self, iface: str | None, request: ReadRequest, path: str, peer: Address, blob: Blob,
        raw: bytes,
    ) -> _Transfer | None:
        # Not a coroutine: nothing here waits, and a coroutine object per transfer is work.
        assert self.policy is not None
        fd: int | None = None
        try:
            source: Source | Packets
            if request.mode.lower() == "netascii":
                size, negotiated, source = self._netascii(request, blob)
            elif blob.data is not None:
                size = len(blob.data)
                negotiated = negotiate(request.options, size, self.policy)
                # Rendered per request, so not cached; prebuilt for the transfer when small.
                source = (Packets(blob.data, negotiated.blksize)
                          if size <= self.cache.max_file else MemorySource(blob.data))
            elif blob.path is not None:
                # The lookup's own stat when it took one (an asset's): a second here told the
                # same moments later, a system call and a stat_result per transfer. Regular
                # checked either way, so a FIFO is never opened (it blocks).
                st = _regular(blob.stat if blob.stat is not None else os.stat(blob.path))
                size = st.st_size
                negotiated = negotiate(request.options, size, self.policy)
                packets = self.cache.kept(blob.path, st, negotiated.blksize)
                if packets is not None:
                    source = packets
                else:
                    fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
                    st = _regular(os.fstat(fd))  # what was opened, not what was stat'ed
                    if st.st_size != size:
                        # The size of what we hold open, not of what was stat'ed before.
                        size = st.st_size
                        negotiated = negotiate(request.options, size, self.policy)
                    packets = self.cache.packets(blob.path, fd, st, negotiated.blksize)
                    if packets is not None:
                        source = packets
                        os.close(fd)  # the packets hold every byte
                        fd = None
                    else:
                        source = _FileSource(fd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            else:
                raise ValueError("blob has neither data nor path")
            sender = Sender(negotiated, size, source, self.policy)
            link = self._links[iface]
            sock = link.open(peer)
        except BaseException as exc:
            if fd is not None:
                os.close(fd)
            if isinstance(exc, OSError):
                raise  # the caller answers the client and logs it without a traceback
            if not isinstance(exc, Exception):
                raise
            log.exception("tftp %s:%d %r: cannot start the transfer", *peer, path)
            return None
        transfer = _Transfer(self, link, peer, path, sender, fd, sock, raw)
        try:
            link.add(transfer)
        except BaseException:
            sock.close()
            if fd is not None:
                os.close(fd)
            raise
        self._transfers[peer] = transfer
        self.stats.started += 1
        # DEBUG: the INFO line is the outcome (sent, failed), one per transfer, not two. Its
        # arguments are made only when it is written.
        if log.isEnabledFor(logging.DEBUG):
            n = sender.negotiated
            log.debug(
                "tftp %s:%d %r: sending %d bytes (blksize %d, windowsize %d%s%s)",
                *peer, path, size, n.blksize, n.windowsize,
                ", OACK" if n.oack else "", ", netascii"
                if request.mode.lower() == "netascii" else "",
            )
        return transfer

    def _netascii(
        self, request: ReadRequest, blob: Blob
    ) -> tuple[int, Negotiated, Source | Packets]:
        """A ``netascii`` read: the file's bytes converted (:func:`netascii`: LF to CR LF, CR
        to CR NUL, as tftpd-hpa sends them) and served from packets as octet's are, octet's
        path untouched. A file's packets are kept in the cache beside its octet ones (a
        flood of netascii requests then holds one copy, not one per transfer); a rendered
        file's, or one too new to keep, are built for the transfer.

        Options are negotiated without a size, so ``tsize`` is left out of the OACK:
        tftpd-hpa sets none for a converted file ("We don't know the tsize if conversion is
        needed", its ``validate_access``) and dnsmasq ignores the option in netascii; RFC
        2349's size of the file "in octets" is not what the client will count. A file above
        ``cache_file_size`` is refused (ERROR 0, saying so): no configuration or script is
        that big, and each transfer would hold a converted copy."""
        assert self.policy is not None
        negotiated = negotiate(request.options, None, self.policy)
        bs = negotiated.blksize
        if blob.data is not None:
            text = netascii(blob.data)
        elif blob.path is not None:
            st = _regular(blob.stat if blob.stat is not None else os.stat(blob.path))
            packets = self.cache.kept(blob.path, st, bs, text=True)
            if packets is not None:
                return packets.size, negotiated, packets
            fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = _regular(os.fstat(fd))  # what was opened, not what was stat'ed
                if st.st_size > self.cache.max_file:
                    raise OSError(errno.EFBIG, "too large to convert for netascii")
                packets = self.cache.packets(blob.path, fd, st, bs, text=True)
                if packets is not None:
                    return packets.size, negotiated, packets
                text = netascii(_read_all(fd, st.st_size))
            finally:
                os.close(fd)
        else:
            raise ValueError("blob has neither data nor path")
        return len(text), negotiated, (Packets(text, bs) if len(text) <= self.cache.max_file
                                       else MemorySource(text))

    def _release(self, peer: Address) -> None:
        self._per_client[peer[0]] -= 1
        if self._per_client[peer[0]] <= 0:
            del self._per_client[peer[0]]

    def _forget(self, peer: Address, transfer: _Transfer) -> None:
        if self._transfers.get(peer) is transfer:
            del self._transfers[peer]
            self._release(peer)
            self._ended.pop(peer, None)  # re-inserted last: the most recent
            request = transfer.request
            # Now, when the end is processed: a copy still queued on the listener arrived
            # before it, one sent after it arrives after.
            self._ended[peer] = (None if request is None
                                 else (request, time.monotonic(), time.time_ns()))
            if len(self._ended) > _ENDED:
                self._ended.popitem(last=False)

