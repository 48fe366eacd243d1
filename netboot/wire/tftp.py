"""TFTP: a pure codec and a pure read-transfer state machine. No sockets, no clock.

Codec: RFC 1350 packets (RRQ, WRQ, DATA, ACK, ERROR) and the RFC 2347 OACK, each a frozen
dataclass; :func:`parse` raises only :class:`DecodeError` naming the field and offset;
:func:`encode` is its inverse for well-formed values.

Transfer: :func:`negotiate` turns the options of an RRQ into what the server grants (RFC 2347
/ 2348 / 2349 / 7440), and :class:`Sender` runs one read transfer. Events go in
(``start``, ``ack``, ``error``, ``timeout``, ``duplicate_request``, ``unreachable``), each
with ``now`` passed in; a :class:`Step` comes out: datagrams to send, when to call
``timeout`` next, and whether the transfer is over and how. The adapter in
``netboot/servers/tftp.py`` does the I/O.

Quirks handled here, with where they come from (``protocols.md`` §3.7, §6):

* Option names are case-insensitive (RFC 2347); only options the client asked for go into
  the OACK; the client's own spelling of each name is echoed, so case-sensitive clients
  (tftpy compares names case-sensitively) find the name they sent.
* ``timeout`` is echoed exactly as sent: U-Boot aborts with "Invalid timeout val" when the
  OACK carries a different value.
* ``blksize`` never exceeds the request (RFC 2348; U-Boot aborts with "Invalid blk size") nor
  ``mtu - 32`` (IP fragmentation breaks many boot ROMs; dnsmasq caps the same way).
* Block numbers wrap 65535 → 0 after ``65535 * blksize`` bytes, as U-Boot, iPXE, dnsmasq and
  tftpy all expect; internally blocks are counted without wrapping.
* A duplicate ACK never triggers a resend (the Sorcerer's Apprentice bug, RFC 1123 §4.2.3.1);
  only the retransmission timer resends.
* An ERROR from the client right after the OACK (or DATA 1) is the usual size/existence probe
  of PXE ROMs and EDK2, not a failure.
* Until the client acknowledges anything, the first OACK/DATA is resent only
  ``Policy.first_retries`` times without backoff (~3 s), at most
  ``Policy.max_first_interval`` apart whatever ``timeout`` it asked: a client that never
  answered is gone or spoofed, and the full backoff (or a 255 s timeout) would let a few
  RRQs a second hold every slot.
* Once it has answered, the retransmission timer follows the measured round trip (RFC 6298:
  SRTT + 4 RTTVAR, at least ``Policy.min_rto``, at most the base interval), sampled only from
  windows sent once (Karn's rule). A lost block in lock-step (U-Boot's and PXE ROMs'
  default) then costs milliseconds instead of the second a fixed timer costs, which is what
  tftpd-hpa and dnsmasq pay. Timeouts double the interval; only those at the base interval
  or above count toward ``max_retries``, so the time before giving up stays what it was.
* A lock-step client ACKs both copies of a block resent too early (RFC 1350 answers every
  DATA): that second ACK marks the timeout spurious, the first copy's round trip becomes a
  sample and the transfer's floor rises to it (at most 4 x ``min_rto``), so a client or
  host slower than the floor is not sent every block twice.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from netboot.errors import DecodeError

__all__ = [
    "MAX_BLKSIZE",
    "MIN_BLKSIZE",
    "Ack",
    "Data",
    "Datagram",
    "Error",
    "ErrorCode",
    "MemorySource",
    "Negotiated",
    "Opcode",
    "OptionAck",
    "Outcome",
    "Packet",
    "Packets",
    "Phase",
    "Policy",
    "ReadRequest",
    "Sender",
    "Source",
    "Step",
    "WindowSource",
    "WriteRequest",
    "data_packet",
    "encode",
    "error_packet",
    "negotiate",
    "netascii",
    "parse",
]

DEFAULT_BLKSIZE = 512  # RFC 1350
MIN_BLKSIZE = 8  # RFC 2348: valid values range between 8 and 65464
MAX_BLKSIZE = 65464
MAX_WINDOWSIZE = 65535  # RFC 7440: 1..65535
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255  # RFC 2349
_BLOCK_MOD = 0x10000
_MAX_IOV = 512  # buffers per preadv: IOV_MAX is 1024 on Linux

_HEAD = struct.Struct("!H")
_HEAD2 = struct.Struct("!HH")
_WORD = struct.Struct("=I")  # four bytes as one unsigned number, in this machine's order


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6  # RFC 2347


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_NEGOTIATION = 8  # RFC 2347


Options = tuple[tuple[str, str], ...]
# A datagram to send: bytes, or a view of a buffer that the next event may overwrite (the
# adapter sends it at once; see Sender's window frame).
Datagram = bytes | memoryview


def _check_block(block: int) -> None:
    if not 0 <= block <= 0xFFFF:
        raise ValueError(f"block number {block} does not fit 16 bits")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    filename: str
    mode: str = "octet"
    options: Options = ()  # in wire order, names and values as sent

    def option(self, name: str) -> str | None:
        """The first value of option ``name``, compared case-insensitively (RFC 2347)."""
        return _lookup(self.options, name)


@dataclass(frozen=True, slots=True)
class WriteRequest:
    filename: str
    mode: str = "octet"
    options: Options = ()

    def option(self, name: str) -> str | None:
        return _lookup(self.options, name)


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    data: bytes

    def __post_init__(self) -> None:
        _check_block(self.block)


@dataclass(frozen=True, slots=True)
class Ack:
    block: int

    def __post_init__(self) -> None:
        _check_block(self.block)


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFFFF:
            raise ValueError(f"error code {self.code} does not fit 16 bits")


@dataclass(frozen=True, slots=True)
class OptionAck:
    options: Options

    def option(self, name: str) -> str | None:
        return _lookup(self.options, name)


Packet = ReadRequest | WriteRequest | Data | Ack | Error | OptionAck


def _lookup(options: Options, name: str) -> str | None:
    want = name.lower()
    for key, value in options:
        if key.lower() == want:
            return value
    return None


# ---------------------------------------------------------------------------------- codec


def _cstring(data: bytes, start: int, field: str) -> tuple[bytes, int]:
    end = data.find(b"\x00", start)
    if end < 0:
        raise DecodeError(f"{field} is not NUL-terminated", field=field, offset=start)
    return data[start:end], end + 1


def _ascii(raw: bytes, field: str, offset: int) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DecodeError(
            f"{field} is not ASCII", field=field, offset=offset + exc.start
        ) from None


def _parse_options(data: bytes, pos: int) -> Options:
    options: list[tuple[str, str]] = []
    while pos < len(data):
        name_at = pos
        name, pos = _cstring(data, pos, "option name")
        if not name:
            # Some PXE ROMs pad requests with NULs after the last option: stop there.
            if data[name_at:].strip(b"\x00"):
                raise DecodeError("empty option name", field="option name", offset=name_at)
            break
        value_at = pos
        if pos >= len(data):
            # The last name with no value after it: ignored, the request served (RFC 2347
            # lets a server ignore any option; tftpd-hpa and dnsmasq both serve it). A value
            # begun and not NUL-terminated is still an error.
            break
        value, pos = _cstring(data, pos, "option value")
        options.append(
            (_ascii(name, "option name", name_at), _ascii(value, "option value", value_at))
        )
    return tuple(options)


def _parse_request(data: bytes, opcode: int) -> ReadRequest | WriteRequest:
    cls = ReadRequest if opcode == Opcode.RRQ else WriteRequest
    # The common request in one split: filename, mode, then names and values, each ended
    # by a NUL (so an empty field after the last), no name empty (which padding NULs or a
    # name without its value would leave). Anything else, or a field that does not decode,
    # goes the long way below, which says where a request is wrong.
    fields = data[2:].split(b"\x00")
    if len(fields) & 1 and len(fields) >= 3 and not fields[-1] and all(fields[2:-1:2]):
        try:
            filename = fields[0].decode("utf-8")
            texts = [field.decode("ascii") for field in fields[1:-1]]
        except UnicodeDecodeError:
            pass
        else:
            return cls(filename, texts[0], tuple(zip(texts[1::2], texts[2::2], strict=True)))
    raw_name, pos = _cstring(data, 2, "filename")
    try:
        filename = raw_name.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(
            "filename is not UTF-8", field="filename", offset=2 + exc.start
        ) from None
    mode_at = pos
    raw_mode, pos = _cstring(data, pos, "mode")
    mode = _ascii(raw_mode, "mode", mode_at)
    options = _parse_options(data, pos)
    return cls(filename, mode, options)


def parse(data: bytes | bytearray | memoryview) -> Packet:
    """Decode one TFTP datagram (any buffer: a :data:`Datagram` from the :class:`Sender`
    is often a view of its window frame). Raises only :class:`DecodeError`."""
    if not isinstance(data, bytes):
        # Copied once: the decoders below slice bytes, and compiled with mypyc (setup.py)
        # their arguments are checked as annotated.
        data = bytes(data)
    if len(data) < 2:
        raise DecodeError("datagram shorter than an opcode", field="opcode", offset=0)
    (opcode,) = _HEAD.unpack_from(data, 0)
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return _parse_request(data, opcode)
    if opcode == Opcode.DATA:
        if len(data) < 4:
            raise DecodeError("DATA without a block number", field="block", offset=2)
        (block,) = _HEAD.unpack_from(data, 2)
        return Data(block, bytes(data[4:]))
    if opcode == Opcode.ACK:
        if len(data) < 4:
            raise DecodeError("ACK without a block number", field="block", offset=2)
        # Trailing bytes after the block number are ignored (dnsmasq does the same).
        (block,) = _HEAD.unpack_from(data, 2)
        return Ack(block)
    if opcode == Opcode.ERROR:
        if len(data) < 4:
            raise DecodeError("ERROR without an error code", field="code", offset=2)
        (code,) = _HEAD.unpack_from(data, 2)
        # RFC 1350 terminates the message with NUL; some clients do not. Only ever logged.
        raw = data[4:]
        end = raw.find(b"\x00")
        message = (raw if end < 0 else raw[:end]).decode("utf-8", errors="replace")
        return Error(code, message)
    if opcode == Opcode.OACK:
        return OptionAck(_parse_options(data, 2))
    raise DecodeError(f"unknown opcode {opcode}", field="opcode", offset=0)


def _encode_options(options: Options) -> bytes:
    out = bytearray()
    for name, value in options:
        if not name or "\x00" in name or "\x00" in value:
            raise ValueError(f"option {name!r}={value!r} cannot be encoded")
        out += name.encode("ascii") + b"\x00" + value.encode("ascii") + b"\x00"
    return bytes(out)


def encode(packet: Packet) -> bytes:
    """Encode a packet value; raises ValueError for values that cannot be put on the wire."""
    if isinstance(packet, ReadRequest | WriteRequest):
        if "\x00" in packet.filename or "\x00" in packet.mode:
            raise ValueError("filename and mode cannot contain NUL")
        opcode = Opcode.RRQ if isinstance(packet, ReadRequest) else Opcode.WRQ
        return (
            _HEAD.pack(opcode)
            + packet.filename.encode("utf-8")
            + b"\x00"
            + packet.mode.encode("ascii")
            + b"\x00"
            + _encode_options(packet.options)
        )
    if isinstance(packet, Data):
        return data_packet(packet.block, packet.data)
    if isinstance(packet, Ack):
        return _HEAD2.pack(Opcode.ACK, packet.block)
    if isinstance(packet, Error):
        return error_packet(packet.code, packet.message)
    return _HEAD.pack(Opcode.OACK) + _encode_options(packet.options)


def data_packet(block: int, payload: bytes | memoryview) -> bytes:
    """DATA for a 16-bit block number: the hot path, one copy of the payload."""
    return _HEAD2.pack(Opcode.DATA, block) + payload


def ack_word(block: int) -> int:
    """The first four bytes of ACK ``block`` (the opcode, then the block number modulo 65536,
    big-endian on the wire) read as one unsigned 32-bit number in this machine's byte order:
    what ``memoryview(datagram).cast("I")[0]`` reads from a received ACK. The adapter hands
    the :class:`Sender` that one number and the sender compares it with the ACK it waits
    for: one subscript and one comparison per block, where the opcode and the block number
    read byte by byte were four subscripts and their arithmetic (1,253 instructions beyond
    a bare receive against 533, callgrind; a lock-step block is ~9,600 in all,
    benchmarks/README.md s24-tftp)."""
    word: int = _WORD.unpack(_HEAD2.pack(Opcode.ACK, block & 0xFFFF))[0]
    return word


def error_packet(code: int, message: str) -> bytes:
    return _HEAD2.pack(Opcode.ERROR, code) + message.encode("utf-8", errors="replace") + b"\x00"


def netascii(data: bytes) -> bytes:
    """A file's bytes as a ``netascii`` transfer carries them: RFC 1350 names RFC 764's NVT
    ASCII, whose line end is CR LF and whose bare CR is CR NUL; the file is local (Unix)
    text, so each LF goes out as CR LF and each CR as CR NUL, a CR LF of the file as CR NUL
    CR LF. What tftpd-hpa sends (``tftpsubs.c`` ``readit``/``read_ahead``: every ``\\n``
    and every ``\\r`` converted; compared byte for byte in tests/servers/test_tftp_modes.py),
    and what its client and tftpy's turn back into the file's own bytes. (dnsmasq converts
    LF alone, so a file's CR comes back as a line end from a client that reads CR LF.)

    The whole stream is converted before it is cut into blocks, so a pair split across a
    block edge (a CR last in one block, its LF or NUL first in the next) is cut where
    tftpd-hpa cuts it, and every blksize and windowsize applies unchanged. CR first: the
    CR that an LF turns into gets no NUL."""
    return data.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")


# ----------------------------------------------------------------------------- negotiation


@dataclass(frozen=True, slots=True)
class Policy:
    """Server-side limits and timers of a transfer (seconds)."""

    mtu: int = 1500
    max_windowsize: int = 64  # dnsmasq uses 32; RFC 7440 allows 65535
    retransmit: float = 1.0  # first retransmission when the client named no timeout
    backoff: float = 2.0  # each further retransmission waits this much longer ...
    max_interval: float = 10.0  # ... up to this
    max_retries: int = 6  # retransmissions without progress before giving up
    # Before the client answered anything (OACK or DATA 1 unacknowledged): this many
    # retransmissions at the base interval, no backoff, about 3 s in all. A client that asked
    # and then never answered is gone or was never there (a spoofed RRQ); the full backoff
    # would hold its slot for ~45 s, and a few RRQs per second would hold every slot.
    first_retries: int = 2
    # ... and at most this long apart, whatever ``timeout`` the RRQ named (RFC 2349 allows
    # 255 s): a forged RRQ asking 255 held its slot 255 s instead of ~3 s, so 16 datagrams a
    # second held all 4,096 (s36-udp). 5 s is U-Boot's own timeout option, kept as asked;
    # a client that asked more gets its OACK again sooner, as one whose ACK 0 was lost must.
    max_first_interval: float = 5.0
    stall: float = 120.0  # no progress for this long: give up (dnsmasq TFTP_TRANSFER_TIME)
    # The floor of the round-trip-derived timer; None keeps the fixed ``retransmit`` timer.
    # A few ms: a LAN round trip is well under one, and a spurious resend costs one block
    # (a duplicate ACK never makes us send, so it cannot snowball).
    min_rto: float | None = 0.005

    def __post_init__(self) -> None:
        if self.mtu - 32 < MIN_BLKSIZE:
            raise ValueError(f"mtu {self.mtu} is too small for TFTP")
        if self.max_windowsize < 1:
            raise ValueError("max_windowsize must be at least 1")
        if (self.retransmit <= 0 or self.backoff < 1 or self.max_retries < 0
                or self.first_retries < 0):
            raise ValueError("retransmit must be > 0, backoff >= 1, max_retries and "
                             "first_retries >= 0")
        if self.max_first_interval <= 0:
            raise ValueError("max_first_interval must be > 0")
        if self.min_rto is not None and not 0 < self.min_rto <= self.retransmit:
            raise ValueError("min_rto must be > 0 and at most retransmit")

    @property
    def max_blksize(self) -> int:
        # IPv4 + UDP + TFTP headers = 20 + 8 + 4; dnsmasq caps at mtu - 32 as well.
        return min(MAX_BLKSIZE, self.mtu - 32)


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What the server grants; ``oack`` is empty when no option was accepted (then DATA 1
    is sent straight away, RFC 2347)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: int | None = None  # seconds, as the client asked
    tsize: int | None = None
    oack: Options = ()


def negotiate(options: Options, size: int | None, policy: Policy) -> Negotiated:
    """Grant the options of an RRQ. Unknown or invalid options are left out, not refused:
    RFC 2347 lets the server ignore any option, and an ERROR 8 would abort the boot."""
    blksize, windowsize, timeout, tsize = DEFAULT_BLKSIZE, 1, None, None
    oack: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, value in options:
        key = name.lower()
        if key in seen:
            continue  # first occurrence wins
        seen.add(key)
        # Strict decimal, at most 10 digits: int() would also take " 5", "+5" or non-ASCII
        # digits. (Written out here, not a function: a call per option.)
        number = (int(value) if value.isdigit() and value.isascii() and len(value) <= 10
                  else None)
        if key == "blksize":
            # RFC 2348: the reply must not exceed the request; below 8 is invalid, so the
            # option is ignored and the default 512 applies.
            if number is None or number < MIN_BLKSIZE:
                continue
            blksize = min(number, policy.max_blksize)
            oack.append((name, str(blksize)))
        elif key == "tsize":
            # RFC 2349: the client sends 0 in an RRQ; answer only with a known size
            # (pixiecore: a tsize of 0 upsets capricious clients).
            if number is None or size is None:
                continue
            tsize = size
            oack.append((name, str(size)))
        elif key == "timeout":
            # U-Boot: an OACK timeout different from the request aborts the transfer, so
            # echo the client's exact text or leave the option out.
            if number is None or not MIN_TIMEOUT <= number <= MAX_TIMEOUT:
                continue
            timeout = number
            oack.append((name, value))
        elif key == "windowsize":
            if number is None or not 1 <= number <= MAX_WINDOWSIZE:
                continue
            windowsize = min(number, policy.max_windowsize)
            oack.append((name, str(windowsize)))
    return Negotiated(blksize, windowsize, timeout, tsize, tuple(oack))


# ---------------------------------------------------------------------------- the sender


class Source(Protocol):
    """Where the bytes of a transfer come from. ``read`` must return exactly ``length``
    bytes unless the underlying file shrank (then the transfer fails cleanly)."""

    def read(self, offset: int, length: int) -> bytes | memoryview: ...


class WindowSource(Source, Protocol):
    """A :class:`Source` that can also read a window straight into the datagrams' payload
    slots (``os.preadv``): one system call and no copy per window, where building each
    DATA from a read cost a copy, a header and a call per block. Returns the bytes read;
    fewer than asked means the file shrank."""

    def read_into(self, offset: int, buffers: list[memoryview]) -> int: ...


class MemorySource:
    """Bytes in memory, served by memoryview slicing (no copy until the DATA packet)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]


class Packets:
    """Every DATA datagram of a payload at one ``blksize``, built once: ``datagrams[n - 1]``
    is block ``n`` (counted from 1; its header carries ``n`` modulo 65536), ``blksize + 4``
    bytes long except the last, which is shorter, possibly just the header.

    Built once per file and blksize and shared by every transfer of it (a storm's clients
    all fetch the same loader): a lock-step block is then a list item, no read, no header
    and no copy, and a window the items the adapter hands to one ``sendmsg``. One ``bytes``
    per datagram rather than slices of one buffer: a memoryview slice per send cost more."""

    __slots__ = ("_acks", "blksize", "blocks", "datagrams", "nbytes", "size")

    def __init__(self, payload: bytes | memoryview, blksize: int) -> None:
        if blksize < 1:
            raise ValueError("blksize must be >= 1")
        size = len(payload)
        blocks = size // blksize + 1  # the last is shorter than blksize, possibly empty
        view = memoryview(payload)
        pack = _HEAD2.pack
        self.datagrams = [
            pack(Opcode.DATA, block % _BLOCK_MOD) + view[(block - 1) * blksize : block * blksize]
            for block in range(1, blocks + 1)
        ]
        self.blksize = blksize
        self.blocks = blocks
        self.size = size
        self.nbytes = size + 4 * blocks
        self._acks: list[int] | None = None

    def acks(self) -> list[int]:
        """``ack_word(n)`` for every block ``n`` but the last, and -1 at ``blocks``: what a
        sender waits for once block ``n`` is out (the last block's ACK ends the transfer and
        is :meth:`Sender.ack`'s). Made at the first transfer of these packets and shared
        like them (a pointer and a number object a block: ~40 bytes, ~3 % of a block's
        datagram at blksize 1,468, ~7 % at 512; not counted in the cache's ``cache_size``)."""
        acks = self._acks
        if acks is None:
            acks = self._acks = [*map(ack_word, range(self.blocks)), -1]
        return acks

    def window(self, first: int, last: int) -> tuple[Datagram, ...]:
        """DATA ``first`` .. ``last`` (1-based, inclusive)."""
        return tuple(self.datagrams[first - 1 : last])


class Phase(enum.Enum):
    OACK = "oack"  # OACK sent, waiting for ACK 0
    DATA = "data"
    DONE = "done"


class Outcome(enum.Enum):
    COMPLETE = "complete"
    PROBE = "probe"  # client ERROR after OACK / DATA 1: a size or existence probe
    CLIENT_ERROR = "client-error"  # client ERROR later in the transfer
    TIMED_OUT = "timed-out"
    SOURCE_ERROR = "source-error"  # the file changed under the transfer


class Step(NamedTuple):
    """What the adapter must do after an event. A named tuple, not a frozen dataclass: one
    is built per ACK, and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field)
    cost more than the ACK's own logic."""

    send: tuple[Datagram, ...] = ()
    deadline: float | None = None  # call ``timeout`` at this time; None once done
    outcome: Outcome | None = None  # set when the transfer is over
    reason: str = ""

    @property
    def done(self) -> bool:
        return self.outcome is not None


_DATA = Phase.DATA
_OP_DATA = int(Opcode.DATA)  # a plain int: an enum member's lookup costs more per block
# A spurious timeout raises a transfer's floor to the late round trip it showed, at most this
# many times ``Policy.min_rto`` (20 ms at the default 5): a loss then costs at most that, and
# 10 MiB lock-step at 10 % loss each way (~1,700 timeouts) stays well under a minute.
_SPURIOUS_FLOOR = 4


class Sender:
    """One read transfer. Blocks are counted from 1 without wrapping; the wire carries the
    number modulo 65536.

    ``source`` is either a :class:`Source` read per window, or the file's prebuilt
    :class:`Packets` at the negotiated blksize (then a window is slices of it)."""

    __slots__ = (
        "_acks", "_ahead", "_base", "_clean", "_doubt", "_doubt_rtt", "_expect", "_first",
        "_floor", "_frame",
        "_frames", "_fresh", "_heads", "_interval", "_lockstep", "_packets", "_policy",
        "_progress",
        "_read_into", "_rttvar", "_sent_at", "_slots", "_source", "_top",
        "acked", "answered", "blksize", "blocks", "deadline", "duplicate_acks", "negotiated",
        "outcome", "phase", "retransmissions", "retries", "sent", "size", "spurious", "srtt",
        "windowsize",
    )

    def __init__(
        self, negotiated: Negotiated, size: int, source: Source | Packets, policy: Policy
    ) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.negotiated = negotiated
        self.size = size
        self.blksize = negotiated.blksize
        self.windowsize = negotiated.windowsize
        self._source: Source | None = None
        self._packets: Packets | None = None
        if isinstance(source, Packets):
            if source.blksize != self.blksize or source.size != size:
                raise ValueError("the packets were built for another blksize or size")
            self._packets = source
        else:
            self._source = source
        # From packets, the ACK that next_window waits for once block n is out is acks[n];
        # in lock-step the block is the item of _lockstep, without the window's arithmetic.
        self._acks: list[int] = []
        self._lockstep: list[bytes] | None = None
        if self._packets is not None:
            self._acks = self._packets.acks()
            if self.windowsize == 1:
                self._lockstep = self._packets.datagrams
        # A window read straight into its datagrams (WindowSource); the frame is made at the
        # first window. Lock-step keeps the source's read-ahead: a read per block would be a
        # system call per block. At most _MAX_IOV buffers go to one preadv.
        self._read_into: Callable[[int, list[memoryview]], int] | None = (
            getattr(source, "read_into", None)
            if self._source is not None and 1 < self.windowsize <= _MAX_IOV else None)
        self._frame: bytearray | None = None
        self._slots: list[memoryview] = []
        self._frames: tuple[memoryview, ...] = ()
        self._heads: struct.Struct | None = None
        self._ahead = 0  # the first block of the full window read ahead into the frame, or 0
        self._policy = policy
        # The last block is shorter than blksize, possibly empty (RFC 1350 / RFC 2348).
        self.blocks = size // self.blksize + 1
        self.phase = Phase.OACK if negotiated.oack else Phase.DATA
        self.acked = 0  # highest block acknowledged in order
        self.sent = 0  # highest block sent
        self.retries = 0  # consecutive timeouts without progress
        self.retransmissions = 0
        self.duplicate_acks = 0
        self.spurious = 0  # timeouts found spurious (see _spurious)
        self.outcome: Outcome | None = None
        self._base = (
            float(negotiated.timeout) if negotiated.timeout is not None else policy.retransmit
        )
        # Until the client answers: the base, at most max_first_interval (see Policy).
        self._first = min(self._base, policy.max_first_interval)
        self.deadline: float | None = None  # when ``timeout`` is due; None once done
        # The least an RTO may be. Without the round-trip timer (min_rto None) it is the base
        # interval: every RTO is then the base, the fixed timer, with no None to test per ACK.
        # Never above the base: Policy keeps min_rto within its own retransmit, but a client's
        # timeout (RFC 2349, 1 s at least) may be below it, and next_window tests one bound.
        self._floor = (self._base if policy.min_rto is None
                       else min(policy.min_rto, self._base))
        # What a spurious timeout may raise the floor to (see _spurious), never above the base.
        self._top = (min(policy.min_rto * _SPURIOUS_FLOOR, self._base)
                     if policy.min_rto is not None else 0.0)
        self._progress = 0.0
        self.answered = False  # the client acknowledged something: the transfer has begun
        # RFC 6298 state. The base interval (the client's ``timeout`` or ours) stays the
        # ceiling: a client that named a timeout never waits longer than it asked.
        self.srtt: float | None = None
        self._rttvar = 0.0
        self._interval = self._base  # what the next (re)transmission arms
        self._sent_at = 0.0  # when the newest blocks (above _fresh) were sent
        self._fresh = 0  # blocks above this one were sent once: only their ACK is timed (Karn)
        self._clean = False  # the window in flight was not resent by the timer since
        # After the timer resent a window: 0 until an ACK advances, then that ACK's block and
        # its round trip from the first copy (see _spurious); -1 otherwise.
        self._doubt = -1
        self._doubt_rtt = 0.0
        # The ACK that next_window serves (the window in flight, sent once, more to come) as
        # its ack_word(), or -1: see _sent_window.
        self._expect = -1

    # -- events --------------------------------------------------------------------------

    def start(self, now: float) -> Step:
        self._progress = now
        if self.phase is Phase.OACK:
            return self._arm(now, (self._oack(),))
        return self._send_window(now)

    def ack_window(self, block: int, now: float) -> bytes | tuple[Datagram, ...] | None:
        """:meth:`next_window` for the ACK of ``block`` (its number on the wire)."""
        return self.next_window(ack_word(block), now)

    def next_window(self, word: int, now: float) -> bytes | tuple[Datagram, ...] | None:
        """The common ACK, on its own, given as its :func:`ack_word` (the adapter reads it
        from the datagram without decoding it): the client acknowledged every block sent
        and more remain. Returns the next window to send (its deadline is
        :attr:`deadline`): a tuple of datagrams, or the datagram itself when the window is
        one block (lock-step: no tuple made and dropped per block), or None when the
        datagram is anything else (another ACK, an ERROR, a short read of the next window),
        which leaves the state untouched: then decode it and call :meth:`ack`, which handles
        every case. Served here: prebuilt :class:`Packets`, and from a :class:`Source` a
        full window read into the frame or a lock-step block; the last window of a streamed
        file and a short read go to :meth:`ack`.

        The same steps as :meth:`ack` (RTT sample, progress, interval, next window) written
        out without a :class:`Step`: in lock-step this runs once per block and the calls and
        the Step were most of the Python cost of a block, and a streamed window went through
        both. Lock-step from packets takes its block straight from the list, and any other
        window from :meth:`_window_after` (~100 bytecodes a lock-step block in all: each is
        ~20 instructions of a block whose Python part is the larger half of its user time,
        benchmarks/README.md s24-tftp).

        Which ACK that is was worked out when the window went out (:attr:`_expect`, armed
        only for a window sent once, with more to come, in the DATA phase), so one
        comparison turns every other datagram away, and the state that such a window
        implies (answered, no retries, an RTT sample by Karn's rule) is not written again
        per block."""
        if word != self._expect:
            return None
        n = self.sent
        send: bytes | tuple[Datagram, ...]
        lockstep = self._lockstep
        if lockstep is not None:  # lock-step from packets: block n + 1 is a list item
            send = lockstep[n]
            last = n + 1
        else:
            window = self._window_after(n)
            if window is None:
                return None
            send, last = window
        self.acked = n
        # RFC 6298 §2, as in _sample: the window was sent once (armed only then). Multiplied
        # by float constants (exact: powers of 2), which the interpreter specialises; a
        # division by an int takes the generic path.
        rtt = now - self._sent_at
        srtt = self.srtt
        if srtt is None:
            srtt, rttvar = rtt, rtt * 0.5
        else:
            rttvar = self._rttvar
            rttvar += ((srtt - rtt if srtt > rtt else rtt - srtt) - rttvar) * 0.25
            srtt += (rtt - srtt) * 0.125
        self.srtt = srtt
        self._rttvar = rttvar
        # _advance and _rto: answered, _clean and retries == 0 hold already. The floor is
        # at most the base (Policy, _spurious), so one bound is tested at most.
        self._progress = self._sent_at = now
        rto = srtt + rttvar * 4.0
        floor = self._floor
        if rto < floor:
            rto = floor
        elif rto > self._base:
            rto = self._base
        self._interval = rto
        self.deadline = now + rto
        self.sent = last
        # From packets the table (-1 after the last block); a source's number made here.
        acks = self._acks
        self._expect = acks[last] if acks else ack_word(last) if last < self.blocks else -1
        return send

    def _window_after(self, n: int) -> tuple[bytes | tuple[Datagram, ...], int] | None:
        """:meth:`next_window`'s window after block ``n`` and its last block, when it is not
        a lock-step block from packets; None for ack() to send (the last window of a
        streamed file, a short read: nothing changed)."""
        last = n + self.windowsize
        blocks = self.blocks
        last = blocks if last > blocks else last
        packets = self._packets
        send: bytes | tuple[Datagram, ...]
        if packets is not None:
            send = (packets.datagrams[n] if last == n + 1
                    else tuple(packets.datagrams[n:last]))
        elif last == blocks:
            return None  # the last window: its short block is ack()'s to read
        elif self._read_into is not None:
            if self._ahead == n + 1:  # read while the client took the window before
                self._ahead = 0
                send = self._frames
            else:
                # Read before any state changes: a short read leaves ack() to report it.
                got, send = self._read_window(n + 1, last, n * self.blksize,
                                              last * self.blksize)
                if got != (last - n) * self.blksize:
                    return None
        elif last == n + 1 and self._source is not None:  # lock-step from the read-ahead
            bs = self.blksize
            chunk = self._source.read(n * bs, bs)
            if len(chunk) != bs:
                return None
            send = data_packet((n + 1) & 0xFFFF, chunk)
        else:
            return None
        return send, last

    def read_ahead(self) -> None:
        """Read the next full window into the frame now, after the window in flight was
        sent (the kernel copied it) and while the client takes it, so that its ACK is
        answered without the read (:meth:`next_window`). Only for a streamed window sent
        once with more than one full window to come; any other event that rewrites the
        frame (a resend, a partial ACK's window) drops it. A failed or short read is left
        for the next window's own read to report."""
        if self._expect < 0 or self._read_into is None:
            return
        n = self.sent
        last = n + self.windowsize
        if last >= self.blocks:
            return  # the last window is ack()'s to read
        bs = self.blksize
        try:
            got, _ = self._read_window(n + 1, last, n * bs, last * bs)
        except OSError:
            return
        if got == (last - n) * bs:
            self._ahead = n + 1

    def ack(self, block: int, now: float) -> Step:
        send = self.ack_window(block, now)
        if send is not None:
            return Step(send if isinstance(send, tuple) else (send,), self.deadline)
        if self.phase is Phase.DONE:
            return self._over()
        if self.phase is Phase.OACK:
            if block != 0:
                return self._wait()
            self.phase = Phase.DATA
            self._doubt = -1  # a resent OACK's ACK: no block to ask about
            self._advance(now)
            return self._send_window(now)
        acked = self.acked
        n = acked + ((block - acked) & 0xFFFF)  # % _BLOCK_MOD
        if n == acked:
            # Duplicate: never resend on it (Sorcerer's Apprentice); the timer will.
            self.duplicate_acks += 1
            if n == self._doubt and n > 0:
                self._spurious()
            return self._wait()
        if n > self.sent:
            # An old ACK from before a wrap, or for a block not sent; or the second copy's
            # ACK of a block resent by the timer, after the first one's: see _spurious.
            if self._doubt > 0 and block == self._doubt & 0xFFFF:
                self._spurious()
            return self._wait()
        self.acked = n
        if n > self._fresh:  # a block sent once: its ACK is a sample (Karn's rule)
            if self._clean:
                self._sample(now - self._sent_at)
        elif self._doubt == 0 and n == acked + 1 and self.answered:
            # The first ACK after the timer resent one block: it may answer either copy, so
            # it is no sample. Were it the first copy's, the client answers the second copy
            # too: see _spurious. (Not after a window of more: a client ACKs each duplicate
            # block, so a lost ACK brings as many as a late one.)
            self._doubt = n
            self._doubt_rtt = now - self._sent_at
        self._advance(now)
        if n == self.blocks:
            return self._finish(Outcome.COMPLETE, "")
        # RFC 7440 §4: on loss the receiver ACKs the last in-order block and the sender
        # restarts the window after it; on a full window this is simply the next window.
        return self._send_window(now)

    def error(self, code: int, message: str, now: float) -> Step:
        return self._ended_by_client(f"client error {code}: {message}")

    def abandoned(self, now: float) -> Step:
        """A different request came from the client's port: the client has moved on (its
        port is one transfer's TID, RFC 1350 §4), so this transfer ends as on its ERROR.
        dnsmasq likewise drops the old transfer of a peer that sends a new RRQ."""
        return self._ended_by_client("abandoned: a new request came from the client's port")

    def _ended_by_client(self, reason: str) -> Step:
        if self.phase is Phase.DONE:
            return self._over()
        probe = self.phase is Phase.OACK or self.acked == 0
        return self._finish(Outcome.PROBE if probe else Outcome.CLIENT_ERROR, reason)

    def unreachable(self, now: float) -> Step:
        """The client's port is closed: an ICMP port unreachable came back for what we sent.
        Before the client acknowledged anything it is gone (it gave up on its RRQ, or read
        the size from the OACK and closed its port instead of sending an ERROR), so the
        transfer ends now, as the timer would after ``first_retries`` (~3 s), with the same
        outcome. Once it has answered, one ICMP error does not outweigh the timer."""
        if self.phase is Phase.DONE:
            return self._over()
        if self.answered:
            return self._wait()
        return self._finish(Outcome.TIMED_OUT,
                            "the client's port is closed (ICMP port unreachable) before it "
                            "answered")

    def timeout(self, now: float) -> Step:
        if self.phase is Phase.DONE:
            return self._over()
        if self.deadline is not None and now < self.deadline:
            return self._wait()  # a stale timer
        p = self._policy
        retries = p.max_retries if self.answered else p.first_retries
        # A timeout faster than the base interval is the round-trip timer backing off toward
        # it; the retry budget is spent at the base interval and above, as before.
        fast = self.answered and self._interval < self._base
        if not fast and (self.retries >= retries or now - self._progress >= p.stall):
            what = f"block {self.acked + 1}" if self.answered else "the client never answered"
            return self._finish(
                Outcome.TIMED_OUT,
                f"no ACK after {self.retransmissions} retransmissions ({what})",
                error_packet(ErrorCode.NOT_DEFINED, "timed out"),
            )
        if self.answered:
            # Exponential backoff (RFC 6298 §5.5), capped at max_interval, or at the base
            # when that is larger (a client's own timeout is never shortened).
            self._interval = min(self._interval * p.backoff, max(p.max_interval, self._base))
        if not fast:
            self.retries += 1
        self.retransmissions += 1
        self._clean = False
        self._doubt = 0
        return self._resend(now)

    def duplicate_request(self, now: float) -> Step:
        """The client sent its RRQ again: our first reply was lost. Resend it at once, but
        only before anything was acknowledged; later it is a stray and is ignored."""
        if self.phase is Phase.OACK or (self.phase is Phase.DATA and self.acked == 0):
            self.retransmissions += 1
            self._clean = False
            return self._resend(now)
        return self._wait()

    # -- internals -----------------------------------------------------------------------

    def _oack(self) -> bytes:
        return _HEAD.pack(Opcode.OACK) + _encode_options(self.negotiated.oack)

    def _advance(self, now: float) -> None:
        self.retries = 0
        self._progress = now
        self.answered = True
        # Progress drops a backoff, even without a sample (RFC 6298 §5 keeps it until one,
        # Karn): on random loss, not congestion, keeping it cost 1.4-3.6x the time in the
        # simulated lossy link, and let the interval reach a client's own timeout, whose
        # late ACKs then taught SRTT a second (benchmarks/README.md, session 16). A path
        # that really got slower is learnt from its spurious timeouts instead (_spurious).
        self._interval = self._rto()
        self._clean = True  # the next window is sent fresh

    def _spurious(self) -> None:
        """The client acknowledged the block of the ACK that followed a timer's resend a
        second time: it got both copies, so the timeout was spurious, the first copy's ACK
        late, not lost (the question RFC 3522 answers with timestamps, answered here by the
        duplicate). That ACK's round trip from the first copy is then no longer ambiguous
        (Karn) and is taken as a sample: a client that became slower than the timer (every
        window timed out and resent, so never a sample) is learnt from its first spurious
        timeouts. And since a stall of the client or of this host is no round trip's
        variance (the estimate forgets it within a few blocks), the transfer's floor rises
        to that round trip, at most ``_SPURIOUS_FLOOR`` times ``min_rto``: a loss then costs
        at most that."""
        self._doubt = -1
        if self._policy.min_rto is None:
            return  # the fixed timer: nothing to learn
        floor = self._floor
        rtt = self._doubt_rtt
        self._sample(rtt)
        top = self._top
        if floor < top and rtt > floor:
            self._floor = top if rtt > top else rtt
        self.spurious += 1

    def _sample(self, rtt: float) -> None:
        # RFC 6298 §2: alpha 1/8, beta 1/4; the first sample sets SRTT and RTTVAR = R/2.
        if self.srtt is None:
            self.srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar += (abs(self.srtt - rtt) - self._rttvar) / 4
            self.srtt += (rtt - self.srtt) / 8

    def _rto(self) -> float:
        if self.srtt is None:
            return self._base
        return min(max(self.srtt + 4 * self._rttvar, self._floor), self._base)

    def _resend(self, now: float) -> Step:
        if self.phase is Phase.OACK:
            return self._arm(now, (self._oack(),))
        return self._send_window(now)

    def _send_window(self, now: float) -> Step:
        first = self.acked + 1
        last = min(self.acked + self.windowsize, self.blocks)
        packets = self._packets
        if packets is not None:  # the hot path: slices of the prebuilt datagrams
            self._sent_window(last, now)
            deadline = self.deadline = now + (self._interval if self.answered else self._first)
            return Step(packets.window(first, last), deadline)
        assert self._source is not None
        bs = self.blksize
        start = (first - 1) * bs
        end = min(last * bs, self.size)
        send: tuple[Datagram, ...]
        if first < last and self._read_into is not None:
            got, send = self._read_window(first, last, start, end)
            if got != end - start:
                return self._source_error(got, start, end)
            self._sent_window(last, now)
            return self._arm(now, send)
        chunk = self._source.read(start, end - start)
        if len(chunk) != end - start:
            return self._source_error(len(chunk), start, end)
        if first == last:  # lock-step: one block, no slicing
            send = (data_packet(first % _BLOCK_MOD, chunk),)
        else:
            view = memoryview(chunk)
            send = tuple(
                data_packet(block % _BLOCK_MOD,
                            view[(block - first) * bs : (block - first + 1) * bs])
                for block in range(first, last + 1)
            )
        self._sent_window(last, now)
        return self._arm(now, send)

    def _read_window(
        self, first: int, last: int, start: int, end: int
    ) -> tuple[int, tuple[Datagram, ...]]:
        """Blocks ``first`` .. ``last`` read into the window frame: one buffer of
        ``windowsize`` datagram slots, each a 4-byte header and a ``blksize`` payload, whose
        payloads are the buffers of one ``read_into``. The datagrams are views of the
        frame: valid until the next event of this transfer or its :meth:`read_ahead` (the
        adapter sends them at once); the frame is rewritten by each window, a resend
        included. It is held for the transfer's life: ``windowsize * (blksize + 4)``
        bytes, 94 KB at the default ``max_windowsize`` of 64 and blksize 1468, only for
        files streamed from disk."""
        assert self._read_into is not None
        self._ahead = 0  # the frame is rewritten
        frame = self._frame
        bs = self.blksize
        step = bs + 4
        ws = self.windowsize
        if frame is None:
            self._frame = frame = bytearray(ws * step)
            view = memoryview(frame)
            self._slots = [view[i * step + 4 : (i + 1) * step] for i in range(ws)]
            self._frames = tuple(view[i * step : (i + 1) * step] for i in range(ws))
            # Every header of a full window in one call: opcode and block as one 32-bit
            # number, the payloads as pad bytes (zeros, so written before the read).
            self._heads = struct.Struct("!" + f"I{bs}x" * ws)
        count = last - first + 1
        tail = end - start - (count - 1) * bs  # the last block's payload: < bs at the end
        slots, frames = self._slots, self._frames
        iov: list[memoryview]
        send: tuple[Datagram, ...]
        wire, heads = first & 0xFFFF, self._heads
        if count == ws and tail == bs:  # a full window: the frame as it is
            iov, send = slots, frames
            if heads is not None and wire + count <= _BLOCK_MOD:  # no wrap inside it
                head = _OP_DATA << 16 | wire
                heads.pack_into(frame, 0, *range(head, head + count))
                return self._read_into(start, iov), send
        else:
            iov = [*slots[: count - 1], slots[count - 1][:tail]]
            send = (*frames[: count - 1], frames[count - 1][: tail + 4])
        pack, op = _HEAD2.pack_into, _OP_DATA
        for i in range(count):
            pack(frame, i * step, op, (first + i) % _BLOCK_MOD)
        return self._read_into(start, iov), send

    def _sent_window(self, last: int, now: float) -> None:
        # Blocks up to the last one sent before are in this window again (a resend, or a
        # window restarted after a partial ACK, RFC 7440 §4): an ACK of one of them may
        # answer either copy and is no RTT sample (Karn); blocks above it are sent once.
        # (next_window's windows are all new blocks: they keep this true without a store.)
        fresh = self._fresh = self.sent
        if last > fresh:
            self.sent = last
            self._sent_at = now
        # next_window serves the ACK of this window if it went out once (not a resend: its
        # ACK is no RTT sample, Karn) after the client's progress (_clean implies answered
        # and no retries), and blocks remain after it; any other ACK goes to ack().
        if self._clean and fresh < last < self.blocks:
            self._expect = self._acks[last] if self._acks else ack_word(last)
        else:
            self._expect = -1

    def _source_error(self, got: int, start: int, end: int) -> Step:
        return self._finish(
            Outcome.SOURCE_ERROR,
            f"read {got} bytes at offset {start}, expected {end - start}"
            " (file changed during the transfer?)",
            error_packet(ErrorCode.NOT_DEFINED, "file changed"),
        )

    def _arm(self, now: float, packets: tuple[Datagram, ...]) -> Step:
        # Before the first ACK: the base interval (at most max_first_interval), no backoff
        # (see first_retries).
        self.deadline = now + (self._interval if self.answered else self._first)
        return Step(packets, self.deadline)

    def _wait(self) -> Step:
        return Step((), self.deadline)

    def _finish(self, outcome: Outcome, reason: str, *farewell: bytes) -> Step:
        self.phase = Phase.DONE
        self.outcome = outcome
        self.deadline = None
        self._expect = -1
        return Step(farewell, None, outcome, reason)

    def _over(self) -> Step:
        return Step((), None, self.outcome, "")
