"""BOOTP/DHCP packets as values: ``parse(bytes) -> Packet`` and ``encode(Packet) -> bytes``.

A pure codec (DESIGN.md §4.1): no sockets, no clock, nothing of ours imported but the error
tree. Every option is kept in the order it came in, pads included, unknown codes untouched, so
``encode(parse(x)) == x`` for any packet this module accepts. Anything truncated or
inconsistent raises one :class:`~netboot.errors.DecodeError` naming the field and byte offset.

Layout (RFC 2131 §2, protocols.md §1.1)::

    op htype hlen hops | xid | secs flags | ciaddr | yiaddr | siaddr | giaddr
    chaddr(16) sname(64) file(128) | magic cookie 63 82 53 63 | options ... 255 [padding]
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeAlias

from netboot.errors import DecodeError

MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
# The header up to chaddr: what a server reads of a request (sname and file only matter when
# option 52 overloads them, which parse_request hands to parse).
_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s")
HEADER_SIZE = HEADER.size  # 236
OPTIONS_OFFSET = HEADER_SIZE + len(MAGIC_COOKIE)  # 240
# RFC 2131 §2: "the minimum length of a BOOTP message is 300 octets" (BOOTP vend field of 64);
# dnsmasq pads every reply to MIN_PACKETSZ 300 (protocols.md §1.1).
MIN_PACKET_SIZE = 300
BROADCAST_FLAG = 0x8000
ZERO_IP = "0.0.0.0"

_SNAME_OFFSET = 44
_FILE_OFFSET = 108


class Op(enum.IntEnum):
    REQUEST = 1  # BOOTREQUEST, client → server
    REPLY = 2  # BOOTREPLY, server → client


class MessageType(enum.IntEnum):
    """Option 53 (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


# RFC 2131 §3.1/§4.3: which message types travel in which direction. Option 53 that disagrees
# with ``op`` is an inconsistent packet (a DISCOVER in a BOOTREPLY is nobody's firmware).
_CLIENT_TYPES = frozenset(
    {MessageType.DISCOVER, MessageType.REQUEST, MessageType.DECLINE, MessageType.RELEASE,
     MessageType.INFORM}
)
_SERVER_TYPES = frozenset({MessageType.OFFER, MessageType.ACK, MessageType.NAK})


class Opt(enum.IntEnum):
    """Option codes netboot reads or writes (RFC 2132, RFC 4578, iPXE ``dhcp.h``)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    BROADCAST_ADDRESS = 28
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER_NAME = 66
    BOOTFILE_NAME = 67
    USER_CLASS = 77
    RELAY_AGENT_INFO = 82  # RFC 3046
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    ETHERBOOT = 175  # iPXE's encapsulated feature list
    END = 255


# The codes the parser tests for every option, as plain ints: on CPython 3.11 reading an
# enum member costs as much as the comparison it feeds (the parser's hot loop).
_PAD, _OVERLOAD, _MESSAGE_TYPE, _END = 0, 52, 53, 255
_CHECKED = frozenset((_OVERLOAD, _MESSAGE_TYPE))  # the codes parse_request looks into
_MESSAGE_TYPES = {int(mt): mt for mt in MessageType}


@dataclass(frozen=True, slots=True)
class Option:
    """One TLV option. ``code`` 0 (pad) carries no data and encodes as a single byte."""

    code: int
    data: bytes = b""


@dataclass(frozen=True)
class Packet:
    """A BOOTP/DHCP message. Addresses are dotted-quad strings; byte fields stay raw.

    ``chaddr``, ``sname`` and ``file`` hold the whole fixed-size field (16/64/128 bytes,
    NUL padding included) so nothing is lost on a round trip; the properties give the
    meaningful part. ``end`` is false for the rare packet whose options run to the end of the
    datagram without an END (255) option; ``trailer`` is whatever followed END.
    """

    op: int
    xid: int
    chaddr: bytes
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = ZERO_IP
    yiaddr: str = ZERO_IP
    siaddr: str = ZERO_IP
    giaddr: str = ZERO_IP
    sname: bytes = b""
    file: bytes = b""
    options: tuple[Option, ...] = field(default_factory=tuple)
    end: bool = True
    trailer: bytes = b""
    # Option values by code, built on the first lookup (see _build_index): derived, so no
    # part of init, equality, repr or replace (a replaced packet builds its own). Declared
    # rather than kept in __dict__ so that the class also compiles with mypyc, whose native
    # classes have no __dict__.
    _index: dict[int, bytes] = field(init=False, repr=False, compare=False, hash=False)

    # -- options -----------------------------------------------------------------------------

    def option(self, code: int) -> bytes | None:
        """The value of option ``code``, or None when absent.

        Several instances of one code are concatenated in order (RFC 3396 §7, long options);
        options overloaded into ``file``/``sname`` (option 52) are included, in the order
        RFC 2131 §4.1 sets: options, then ``file``, then ``sname``.
        """
        index: dict[int, bytes] | None = getattr(self, "_index", None)
        if index is None:
            index = self._build_index()
        return index.get(code)

    def _build_index(self) -> dict[int, bytes]:
        # The DHCP path asks a request for a dozen options, and walking the tuple and the
        # overloaded fields each time was a tenth of the per-packet cost.
        index: dict[int, bytes] = {}
        for o in self.all_options():
            seen = index.get(o.code)
            index[o.code] = o.data if seen is None else seen + o.data
        object.__setattr__(self, "_index", index)  # frozen: a cache, set once
        return index

    def has_option(self, code: int) -> bool:
        return self.option(code) is not None

    def all_options(self) -> tuple[Option, ...]:
        """Options including those overloaded into ``file``/``sname``; pads left out."""
        out = [o for o in self.options if o.code != _PAD]
        overload = self._overload()
        if overload & 1:
            out.extend(_parse_overloaded(self.file, "file", _FILE_OFFSET))
        if overload & 2:
            out.extend(_parse_overloaded(self.sname, "sname", _SNAME_OFFSET))
        return tuple(out)

    def _overload(self) -> int:
        for o in self.options:
            if o.code == _OVERLOAD and len(o.data) == 1:
                return o.data[0]
        return 0

    @property
    def message_type(self) -> MessageType | None:
        # option()'s body inline: a server reads a reply's type twice an answer (where it
        # goes, the metrics), each a Python call less (s38-dhcp1st).
        index: dict[int, bytes] | None = getattr(self, "_index", None)
        if index is None:
            index = self._build_index()
        return _message_type(index.get(_MESSAGE_TYPE))

    @property
    def requested_options(self) -> frozenset[int]:
        """Option 55, the parameter request list."""
        return frozenset(self.option(Opt.PARAMETER_REQUEST_LIST) or b"")

    # -- fixed fields ------------------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The hardware address proper (``hlen`` bytes of ``chaddr``)."""
        return self.chaddr[: min(self.hlen, 16)]

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def file_name(self) -> str | None:
        """The ``file`` field up to its NUL, or None when empty or overloaded with options."""
        if self._overload() & 1:
            return None
        return _cstring(self.file)

    @property
    def server_name(self) -> str | None:
        if self._overload() & 2:
            return None
        return _cstring(self.sname)

    def with_options(self, options: Iterable[Option]) -> Packet:
        return replace(self, options=tuple(options))


def _message_type(value: bytes | None) -> MessageType | None:
    """Option 53's value as a type; None when absent, unknown or not one byte (two
    instances concatenate to two bytes: no type)."""
    if value is None or len(value) != 1:
        return None
    return _MESSAGE_TYPES.get(value[0])


def _cstring(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0]
    return text.decode("latin-1") if text else None


def _ip(raw: bytes) -> str:
    # What str(IPv4Address) gives, at a fraction of the cost (4 addresses per packet).
    return ZERO_IP if raw == _ZERO4 else f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


_ZERO4 = bytes(4)


def _ip_bytes(text: str, name: str) -> bytes:
    if text == ZERO_IP:
        return _ZERO4
    try:
        return _packed(text)
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise ValueError(f"{name}: {text!r} is not an IPv4 address") from exc


@functools.lru_cache(maxsize=1024)
def _packed(text: str) -> bytes:
    # Strict (inet_aton would take "1" or "0x7f.1"); cached, since a server writes the same
    # few addresses (its own, a relay's) into every reply.
    return ipaddress.IPv4Address(text).packed


def _iter_tlv(
    data: bytes, base: int, where: str, *, stop_at_end: bool = True
) -> Iterator[tuple[int, Option | None]]:
    """Walk TLV options; yields (offset, option) and (offset, None) for END."""
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == _PAD:
            yield base + i, _PAD_OPTION
            i += 1
            continue
        if code == _END:
            yield base + i, None
            if stop_at_end:
                return
            i += 1
            continue
        if i + 1 >= n:
            raise DecodeError(
                f"option {code} has no length byte", field=f"{where} option {code}",
                offset=base + i,
            )
        length = data[i + 1]
        if i + 2 + length > n:
            raise DecodeError(
                f"option {code} length {length} runs past the end ({n - i - 2} bytes left)",
                field=f"{where} option {code}", offset=base + i,
            )
        yield base + i, Option(code, bytes(data[i + 2 : i + 2 + length]))
        i += 2 + length


def _parse_overloaded(raw: bytes, where: str, base: int) -> list[Option]:
    return [o for _, o in _iter_tlv(raw, base, where) if o is not None and o.code != _PAD]


_PAD_OPTION = Option(_PAD)


def _header(data: bytes, layout: struct.Struct) -> tuple[Any, ...]:
    """The fixed fields (``layout`` of them), checked: length, op, hlen, magic cookie."""
    if len(data) < OPTIONS_OFFSET:
        raise DecodeError(
            f"packet is {len(data)} bytes, a DHCP header and cookie need {OPTIONS_OFFSET}",
            field="header", offset=len(data),
        )
    fields = layout.unpack_from(data, 0)
    op, hlen = fields[0], fields[2]
    if op not in (1, 2):  # Op.REQUEST, Op.REPLY (plain ints: see _PAD)
        raise DecodeError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY", field="op", offset=0)
    if hlen > 16:
        raise DecodeError(f"hlen {hlen} exceeds the 16-byte chaddr", field="hlen", offset=2)
    if data[HEADER_SIZE:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise DecodeError(
            f"bad magic cookie {data[HEADER_SIZE:OPTIONS_OFFSET].hex()}", field="cookie",
            offset=HEADER_SIZE,
        )
    return fields


def parse(data: bytes) -> Packet:
    """Decode one DHCP datagram. Raises DecodeError naming the offset of the first problem."""
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file) = _header(data, HEADER)
    options: list[Option] = []
    end = False
    trailer = b""
    msg_type_offset = None
    for offset, opt in _iter_tlv(data[OPTIONS_OFFSET:], OPTIONS_OFFSET, "options"):
        if opt is None:
            end = True
            trailer = bytes(data[offset + 1 :])
            break
        code = opt.code
        if code == _MESSAGE_TYPE:
            if len(opt.data) != 1:
                raise DecodeError(
                    f"option 53 has length {len(opt.data)}, expected 1", field="option 53",
                    offset=offset,
                )
            msg_type_offset = offset
        if code == _OVERLOAD and (len(opt.data) != 1 or opt.data[0] not in (1, 2, 3)):
            raise DecodeError("option 52 must be 1 byte of 1, 2 or 3", field="option 52",
                              offset=offset)
        options.append(opt)
    packet = Packet(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=_ip(ciaddr), yiaddr=_ip(yiaddr), siaddr=_ip(siaddr), giaddr=_ip(giaddr),
        chaddr=bytes(chaddr), sname=bytes(sname), file=bytes(file), options=tuple(options),
        end=end, trailer=trailer,
    )
    # Overloaded fields must decode too, so that a later .option() cannot raise.
    packet._build_index()
    if msg_type_offset is not None:
        raw_type = data[msg_type_offset + 2]
        allowed = _CLIENT_TYPES if op == 1 else _SERVER_TYPES
        if raw_type not in allowed:
            raise DecodeError(
                f"message type {raw_type} does not travel in a "
                f"{'BOOTREQUEST' if op == Op.REQUEST else 'BOOTREPLY'}",
                field="option 53", offset=msg_type_offset,
            )
    return packet


class Request(NamedTuple):
    """A request as a server reads it (:func:`parse_request`): the header fields and the
    option values by code, no :class:`Option` per TLV and no round trip.

    The accessors of :class:`Packet` that a server reads (``option``, ``message_type``,
    ``mac``, the header fields) with the same answers for the same bytes: several instances
    of a code concatenated (RFC 3396 §7), options overloaded into ``file``/``sname``
    included. A named tuple: immutable, and built at a sixth of a frozen dataclass's cost,
    once per datagram in a storm.
    """

    op: int
    xid: int
    chaddr: bytes
    htype: int
    hlen: int
    hops: int
    secs: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    values: dict[int, bytes]  # option values by code
    message_type: MessageType | None  # option 53, read once: the server asks for it thrice

    def option(self, code: int) -> bytes | None:
        """The value of option ``code``, or None when absent (as :meth:`Packet.option`)."""
        return self.values.get(code)

    def has_option(self, code: int) -> bool:
        return code in self.values

    @property
    def mac(self) -> bytes:
        """The hardware address proper (``hlen`` bytes of ``chaddr``)."""
        return self.chaddr[: min(self.hlen, 16)]


# What a DHCP server reads from a request: either form answers the same.
Inbound: TypeAlias = Packet | Request


def parse_request(data: bytes) -> Request:
    """Decode a datagram as :func:`parse` does, for reading only: the same DecodeError for
    the same bytes, the same option values, at a fraction of the cost (one walk over the
    TLVs into a dict; no Option or Packet). A packet that overloads ``file``/``sname``
    (option 52, rare) goes through :func:`parse`."""
    n = len(data)
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
     chaddr) = _header(data, _FIXED)
    index: dict[int, bytes] = {}
    msg_type_offset = -1
    i = OPTIONS_OFFSET
    # _iter_tlv's walk and parse's checks, inline: a generator and an Option per TLV were
    # most of what decoding a DISCOVER cost. Each test an option passes is ~2,000
    # instructions of a DISCOVER's seven (s44-sighting): a length byte missing is told by
    # the IndexError of reading it (a try costs nothing until it raises), the two codes
    # checked by one set test, and a code seen once stored without a look-up first.
    code = 0
    overloaded = False
    try:
        while i < n:
            code = data[i]
            if code == _PAD:
                i += 1
                continue
            if code == _END:
                break
            stop = i + 2 + data[i + 1]
            if stop > n:
                raise DecodeError(
                    f"option {code} length {data[i + 1]} runs past the end ({n - i - 2} bytes "
                    "left)", field=f"options option {code}", offset=i,
                )
            value = data[i + 2 : stop]
            if code in _CHECKED:
                if code == _OVERLOAD:
                    overloaded = True
                    break
                if len(value) != 1:
                    raise DecodeError(
                        f"option 53 has length {len(value)}, expected 1", field="option 53",
                        offset=i,
                    )
                msg_type_offset = i
            if code in index:  # several instances concatenated (RFC 3396 §7)
                index[code] += value
            else:
                index[code] = value
            i = stop
    except IndexError:  # data[i + 1]: the last byte is an option's code
        raise DecodeError(
            f"option {code} has no length byte", field=f"options option {code}", offset=i,
        ) from None
    if overloaded:
        return _request_of(parse(data))  # parse checks option 52 and the fields it names
    if msg_type_offset >= 0:
        raw_type = data[msg_type_offset + 2]
        if raw_type not in (_CLIENT_TYPES if op == 1 else _SERVER_TYPES):
            raise DecodeError(
                f"message type {raw_type} does not travel in a "
                f"{'BOOTREQUEST' if op == Op.REQUEST else 'BOOTREPLY'}",
                field="option 53", offset=msg_type_offset,
            )
    # The four addresses: 0.0.0.0 in nearly every request (a DISCOVER's are), told here
    # without _ip's call (~1,500 instructions a datagram; s38-dhcp1st).
    return Request(
        op, xid, chaddr, htype, hlen, hops, secs, flags,
        ZERO_IP if ciaddr == _ZERO4 else _ip(ciaddr), ZERO_IP if yiaddr == _ZERO4 else _ip(yiaddr),
        ZERO_IP if siaddr == _ZERO4 else _ip(siaddr), ZERO_IP if giaddr == _ZERO4 else _ip(giaddr),
        index, _message_type(index.get(_MESSAGE_TYPE)))


# Options whose values are one device's own in requests otherwise alike byte for byte (the
# same firmware asking the same way): hostname, requested address, client identifier, FQDN,
# UUID (RFC 2132 §3.14, §9.1, §9.14; RFC 4702; RFC 4578 §2.3).
_OWN_OPTIONS = frozenset((12, 50, 61, 81, 97))
# xid, secs and flags: what a request holds of its own in the header before chaddr.
_XID_SECS_FLAGS = struct.Struct("!IHH")


# A request parsed once, cut around its device's own bytes: any datagram of the same length
# whose other bytes equal it parses to the same Request with those bytes in their places
# (parse_request walks the same offsets, reads the same codes and lengths, makes the same
# checks). A plain tuple, unpacked at once (a named tuple's field reads are attribute
# look-ups): 0-4 (op, htype, hlen, hops); 12-28 (the four addresses); the bytes from the
# cookie (236) on but the holes, as (offset, bytes); the holes, (code, start, stop); and the
# Request's fields a layout fixes: op, htype, hlen, hops, the addresses as text, the values
# (copied per request, the holes put in), the message type.
_Layout: TypeAlias = tuple[
    bytes, bytes, tuple[tuple[int, bytes], ...], tuple[tuple[int, int, int], ...],
    tuple[int, int, int, int, str, str, str, str, dict[int, bytes], "MessageType | None"]]
_new_tuple = tuple.__new__  # a Request made without its Python __new__


class RequestLayouts:
    """:func:`parse_request` with the layouts of the requests seen kept (one per server).

    A storm's first DISCOVERs come from a few firmware kinds, each sending the same bytes
    but for xid, secs, flags, chaddr and the option values that are the device's own
    (_OWN_OPTIONS: option 97's UUID in every PXE DISCOVER): a request of a known layout is
    checked against it by a few slice compares, and its values are the layout's with its own
    put in, where the walk over its options, one test after another, was ~41,000
    instructions of a first DISCOVER's ~202,000 (callgrind, benchmarks/README.md
    s50-sighting). The same Request, or the same DecodeError, as parse_request for the
    same bytes (tests/wire/test_dhcp.py holds the two equal). Bounded: ``limit`` layouts,
    then all forgotten; a request of no layout costs a second walk to make one."""

    def __init__(self, *, limit: int = 256) -> None:
        self._limit = limit
        self._count = 0
        self._held: dict[int, list[_Layout]] = {}

    def parse(self, data: bytes) -> Request:
        held = self._held.get(len(data))
        if held is not None:
            head, addresses = data[:4], data[12:28]
            for layout_head, layout_addresses, pieces, holes, known in held:
                if head != layout_head or addresses != layout_addresses:
                    continue
                for at, piece in pieces:
                    if data[at:at + len(piece)] != piece:
                        break
                else:
                    op, htype, hlen, hops, ciaddr, yiaddr, siaddr, giaddr, values, kind = known
                    values = values.copy()
                    for code, start, stop in holes:
                        values[code] = data[start:stop]
                    xid, secs, flags = _XID_SECS_FLAGS.unpack_from(data, 4)
                    return _new_tuple(Request, (
                        op, xid, data[28:44], htype, hlen, hops, secs, flags, ciaddr, yiaddr,
                        siaddr, giaddr, values, kind))
        request = parse_request(data)
        layout = _layout_of(data, request)
        if layout is not None:
            if self._count >= self._limit:
                self._held.clear()
                self._count = 0
            self._held.setdefault(len(data), []).append(layout)
            self._count += 1
        return request


def _layout_of(data: bytes, request: Request) -> _Layout | None:
    """``request``'s layout (parsed from ``data``); None where options are overloaded into
    sname/file or a device's own option comes twice (concatenated, RFC 3396 §7)."""
    if _OVERLOAD in request.values:
        return None
    holes: list[tuple[int, int, int]] = []
    if not _OWN_OPTIONS.isdisjoint(request.values):
        # parse's walk (a layout's first request only), over bytes parse_request read
        # without an error: up to END, as it stopped.
        for offset, option in _iter_tlv(data[OPTIONS_OFFSET:], OPTIONS_OFFSET, "options"):
            if option is None:
                break
            if option.code in _OWN_OPTIONS:
                if any(hole[0] == option.code for hole in holes):
                    return None
                holes.append((option.code, offset + 2, offset + 2 + len(option.data)))
    pieces, at = [], HEADER_SIZE
    for _, start, stop in holes:
        pieces.append((at, data[at:start]))
        at = stop
    pieces.append((at, data[at:]))
    # Its own copy of the values: the request parsed is the caller's.
    return (data[:4], data[12:28], tuple(pieces), tuple(holes),
            (request.op, request.htype, request.hlen, request.hops, request.ciaddr,
             request.yiaddr, request.siaddr, request.giaddr, dict(request.values),
             request.message_type))


def _request_of(packet: Packet) -> Request:
    return Request(
        packet.op, packet.xid, packet.chaddr, packet.htype, packet.hlen, packet.hops,
        packet.secs, packet.flags, packet.ciaddr, packet.yiaddr, packet.siaddr, packet.giaddr,
        packet._build_index(), packet.message_type,
    )


def _fixed(raw: bytes, size: int, name: str) -> bytes:
    if len(raw) > size:
        raise ValueError(f"{name} is {len(raw)} bytes, the field holds {size}")
    return raw.ljust(size, b"\0")


def encode(packet: Packet, *, pad_to: int = 0) -> bytes:
    """Encode ``packet``; zero bytes are appended after END until the datagram is ``pad_to``
    bytes long. Option values over 255 bytes are split into several instances (RFC 3396).
    Raises ValueError for values that cannot be encoded (a bug in the caller, not input)."""
    head = HEADER.pack(
        packet.op, packet.htype, packet.hlen, packet.hops, packet.xid & 0xFFFFFFFF,
        packet.secs, packet.flags,
        _ip_bytes(packet.ciaddr, "ciaddr"), _ip_bytes(packet.yiaddr, "yiaddr"),
        _ip_bytes(packet.siaddr, "siaddr"), _ip_bytes(packet.giaddr, "giaddr"),
        _fixed(packet.chaddr, 16, "chaddr"), _fixed(packet.sname, 64, "sname"),
        _fixed(packet.file, 128, "file"),
    )
    out = bytearray(head)
    out += MAGIC_COOKIE
    for opt in packet.options:
        if not 0 <= opt.code <= 254:
            raise ValueError(f"option code {opt.code} cannot be encoded as an option")
        if opt.code == _PAD:
            out.append(0)
            continue
        data = opt.data
        if not data:
            out += bytes((opt.code, 0))
        for i in range(0, len(data), 255):
            chunk = data[i : i + 255]
            out += bytes((opt.code, len(chunk))) + chunk
    if packet.end:
        out.append(_END)
        out += packet.trailer
    if len(out) < pad_to:
        out += bytes(pad_to - len(out))
    return bytes(out)


def ip_option(*addresses: str) -> bytes:
    """Option data for a list of IPv4 addresses (1, 3, 6, 54, ...)."""
    if len(addresses) == 1:  # the common case (and a reply patched per datagram) sans join
        return _ip_bytes(addresses[0], "address")
    return b"".join(_ip_bytes(a, "address") for a in addresses)
