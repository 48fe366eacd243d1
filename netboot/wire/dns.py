"""DNS wire codec for the hot path: plain queries in, authoritative answers out. No sockets.

dnslib stays the general codec (``netboot.names``): every query this module does not
recognise as *plain* is handed to it, so odd shapes keep dnslib's exact behaviour (FORMERR,
NOTIMP, BADVERS, forwarding). What is plain (:func:`parse_plain_query`): a standard query
(QR=0, OPCODE=0) with exactly one question, no answer or authority records, and at most one
additional record that is a well-formed EDNS version 0 OPT at the root (RFC 6891 §6.1), with
nothing after it. Anything else returns ``None``, never an exception: deciding what is
malformed, and saying so, is the full parser's job.

:func:`encode_reply` writes the answer the way dnslib's ``DNSRecord.pack`` does, so that for
a lowercase question the bytes are identical (``tests/wire/test_dns.py`` compares them):

* the question is echoed byte for byte, 0x20 case mixing included (what a resolver using
  draft-vixie-dnsext-dns0x20 checks);
* names are compressed (RFC 1035 §4.1.4) against the question and every name written
  before, suffix by suffix; unlike dnslib, the question's suffixes match without regard to
  case (RFC 4343), so with a mixed-case question the answers' owners still point at it;
  a name is only remembered at offsets a 14-bit pointer can reach (dnslib would write a
  broken pointer past 16,383 in a large TCP answer);
* rdata names are compressed only where :class:`Record` says so: the RFC 1035 types (NS,
  PTR, SOA); an SRV target is never compressed (RFC 2782) and travels in ``head``;
* over the size limit, additional records go first (RFC 2181 §9), then answer and authority,
  with TC set and the question kept (RFC 1035 §4.2.1, RFC 7766 §5); the OPT record stays in
  every case (RFC 6891 §7) — the order dnslib's path uses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "HEADER",
    "MAX_NAME",
    "Labels",
    "PlainQuery",
    "Record",
    "encode_reply",
    "parse_plain_query",
]

HEADER = 12  # RFC 1035 §4.1.1
MAX_NAME = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
_MAX_POINTER = 0x3FFF  # RFC 1035 §4.1.4: a pointer is a 14-bit offset
_T_OPT = 41
_CLASS_IN = 1
_OPT_FIXED = 11  # root name, type, class, TTL, RDLENGTH

Labels = tuple[bytes, ...]  # a name as wire labels, most specific first

_RR = struct.Struct(">HHIH")  # type, class, TTL, RDLENGTH
_H = struct.Struct(">H")
_COUNTS = struct.Struct(">HHHH")


class PlainQuery(NamedTuple):
    """The one question of a plain query, and what the reply must echo or respect.

    A NamedTuple, not a frozen dataclass: one is built per query on the hot path, and a
    frozen dataclass's ``__init__`` costs a ``object.__setattr__`` per field.
    """

    id: int
    rd: bool  # RFC 1035 §4.1.1: copied into the response
    cd: bool  # RFC 4035 §3.2.2: copied into the response
    qname: bytes  # the name on the wire exactly as asked (0x20 case kept), root included
    labels: Labels  # the same name lowercased (RFC 4343), for lookups and compression
    qtype: int
    qclass: int
    end: int  # where the question ends: ``data[HEADER:end]`` is echoed in the reply
    payload: int | None  # EDNS UDP payload size asked for, None without an OPT record


def parse_plain_query(data: bytes) -> PlainQuery | None:
    """The question of a plain query, or ``None`` when the full parser must decide."""
    size = len(data)
    # Byte 2: QR=0 and OPCODE=0 (AA, TC, RD are not ours to judge); QD=1, AN=NS=0, AR<=1.
    if size < HEADER + 5 or data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    arcount = data[10] << 8 | data[11]
    if arcount > 1:
        return None
    i = HEADER
    while True:
        if i >= size:
            return None
        n = data[i]
        if n == 0:
            break
        if n & 0xC0:
            return None  # a pointer or an extended label type in a question
        i += 1 + n
    if i + 1 - HEADER > MAX_NAME:
        return None  # dnslib refuses to pack it again; the full path answers FORMERR
    end = i + 5
    if end > size:
        return None
    payload: int | None = None
    if arcount:
        # RFC 6891 §6.1.2: OWNER is the root, TYPE 41, CLASS the payload size, TTL the
        # extended RCODE, VERSION and flags; the options must fill RDLENGTH exactly.
        if end + _OPT_FIXED > size or data[end] != 0:
            return None
        rtype, payload, ttl, rdlen = _RR.unpack_from(data, end + 1)
        if rtype != _T_OPT or (ttl >> 16) & 0xFF or end + _OPT_FIXED + rdlen != size:
            return None  # EDNS version > 0 → BADVERS from the full path
        j = end + _OPT_FIXED
        while j < size:
            if j + 4 > size:
                return None
            j += 4 + (data[j + 2] << 8 | data[j + 3])
        if j != size:
            return None
    elif end != size:
        return None  # trailing bytes: leave them to the full parser
    qname = data[HEADER : i + 1]
    if not qname.isascii():
        return None  # dnslib refuses labels that are not UTF-8: let it decide, as before
    lower = qname.lower()  # ASCII only, as RFC 4343 §3 compares
    labels = []
    j = 0
    last = len(lower) - 1
    while j < last:
        n = lower[j]
        labels.append(lower[j + 1 : j + 1 + n])
        j += 1 + n
    qtype, qclass = struct.unpack_from(">HH", data, i + 1)
    return PlainQuery(data[0] << 8 | data[1], bool(data[2] & 0x01), bool(data[3] & 0x10),
                      qname, tuple(labels), qtype, qclass, end, payload)


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record of class IN, its RDATA in three parts: ``head`` (fixed bytes),
    ``names`` (written with compression, RFC 1035 §3.3 types only) and ``tail``.

    A/AAAA: the address in ``head``. NS/PTR: the target in ``names``. SOA: MNAME and RNAME in
    ``names``, the five timers in ``tail``. SRV: priority, weight, port and the uncompressed
    target all in ``head`` (RFC 2782).
    """

    owner: Labels  # lowercase
    rtype: int
    ttl: int
    head: bytes = b""
    names: tuple[Labels, ...] = ()
    tail: bytes = b""


class _Writer:
    """A message under construction with the names written so far (for compression)."""

    __slots__ = ("out", "qlabels", "seen")

    def __init__(self, out: bytearray, qlabels: Labels) -> None:
        self.out = out
        self.qlabels = qlabels
        self.seen: dict[Labels, int] | None = None

    def _question_suffixes(self) -> dict[Labels, int]:
        # The question's suffixes, lowercased, at their offsets: later names point at them.
        seen = {}
        labels = self.qlabels
        offset = HEADER
        for k in range(len(labels)):
            seen[labels[k:]] = offset
            offset += 1 + len(labels[k])
        return seen

    def name(self, labels: Labels) -> None:
        out = self.out
        if labels == self.qlabels:
            out += b"\xc0\x0c"  # the question's name, the owner of every answer: offset 12
            return
        seen = self.seen
        if seen is None:
            seen = self.seen = self._question_suffixes()
        for k in range(len(labels)):
            suffix = labels[k:]
            offset = seen.get(suffix)
            if offset is not None:
                out += _H.pack(0xC000 | offset)
                return
            if len(out) <= _MAX_POINTER:
                seen[suffix] = len(out)
            label = labels[k]
            out.append(len(label))
            out += label
        out.append(0)

    def record(self, rr: Record) -> None:
        out = self.out
        self.name(rr.owner)
        if not rr.names:
            rdata = rr.head
            out += _RR.pack(rr.rtype, _CLASS_IN, rr.ttl, len(rdata))
            out += rdata
            return
        at = len(out)
        out += _RR.pack(rr.rtype, _CLASS_IN, rr.ttl, 0)
        start = len(out)
        out += rr.head
        for name in rr.names:
            self.name(name)
        out += rr.tail
        _H.pack_into(out, at + 8, len(out) - start)


def _opt(payload: int, rcode: int) -> bytes:
    # RFC 6891 §6.1.3: the upper 8 bits of a 12-bit RCODE live in the OPT TTL; version 0.
    return b"\x00" + _RR.pack(_T_OPT, payload, (rcode >> 4) << 24, 0)


def encode_reply(
    data: bytes,
    query: PlainQuery,
    *,
    aa: bool,
    ra: bool,
    rcode: int,
    answers: tuple[Record, ...] | list[Record] = (),
    authority: tuple[Record, ...] | list[Record] = (),
    additional: tuple[Record, ...] | list[Record] = (),
    limit: int,
    opt_payload: int | None,
) -> tuple[bytes, bool]:
    """The reply to ``query`` (parsed from ``data``) and whether it was truncated.

    ``opt_payload`` is the payload size our own OPT record advertises, ``None`` to send no
    OPT (the query had none). ``limit`` is the largest reply the client can take.
    """
    header_flags = 0x8000 | (0x0400 if aa else 0) | (0x0100 if query.rd else 0)
    header_flags |= (0x0080 if ra else 0) | (0x0010 if query.cd else 0) | (rcode & 0x0F)
    out = bytearray(data[:HEADER])
    out[2:4] = _H.pack(header_flags)
    out += data[HEADER : query.end]
    w = _Writer(out, query.labels)
    for rr in answers:
        w.record(rr)
    for rr in authority:
        w.record(rr)
    middle = len(out)
    for rr in additional:
        w.record(rr)
    opt = b"" if opt_payload is None else _opt(opt_payload, rcode)
    extra = 1 if opt else 0
    an, ns, ar = len(answers), len(authority), len(additional)
    truncated = False
    if len(out) + len(opt) > limit:
        del out[middle:]  # compression points only backwards: a prefix stays consistent
        ar = 0
        if len(out) + len(opt) > limit:
            del out[query.end :]
            an = ns = 0
            out[2] |= 0x02  # TC
            truncated = True
    out[4:12] = _COUNTS.pack(1, an, ns, ar + extra)
    out += opt
    return bytes(out), truncated
