"""HTTP byte ranges (RFC 9110 §14): a ``Range`` field read against a file's length, the
``If-Range`` condition (§13.1.5), and the framing of a ``multipart/byteranges`` answer
(§14.6). Pure: strings and integers in, frozen values out; ``netboot.servers.aio`` sends
what these decide, from memory or from the file.

What a client gets, as nginx (1.22, ``ngx_http_range_filter_module``) answers a static file,
but where nginx refuses what RFC 9110 lets a server ignore:

* one satisfiable range: 206 with ``Content-Range``; several: 206 ``multipart/byteranges``,
  each part with its ``Content-Type`` and ``Content-Range``, framed byte for byte as nginx
  frames them (a CRLF before each delimiter, none after the last);
* ranges that start at or past the end, and ``-0``, are dropped (§14.1.1: unsatisfiable);
  when none is left, 416 with ``Content-Range: bytes */LEN`` (§15.5.17); a range that ends
  past the end is clipped (§14.1.2);
* a field that is not a valid ``bytes`` ranges-specifier (``bytes=abc``, ``bytes=5-3``,
  another unit) is ignored: 200 and the whole file (§14.2: a server MAY ignore or reject an
  invalid one and MUST ignore an unknown unit; nginx answers 416 to the former, which a
  resuming client reads as "nothing to fetch");
* range amplification (CVE-2011-3192, the "Apache killer": many small or overlapping ranges,
  each part costing a head and a read): when the ranges' bytes add up to more than the file
  (nginx's rule: overlapping ranges of any size fall here) or there are more than
  :data:`MAX_RANGES` (Apache's ``MaxRanges`` default, its fix), the Range is ignored and the
  whole file is the answer (§14.2 allows it; §14.3 names these cases). An answer is then
  never more than the file plus :data:`MAX_RANGES` part heads, and never reads more than
  the file; coalescing instead would answer parts the client did not list as it listed
  them, and no client of this field sends such ranges.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

# Apache's MaxRanges default (CVE-2011-3192's fix); nginx's max_ranges is unlimited by
# default and relies on the sum rule alone (byte_ranges).
MAX_RANGES: Final = 200
# A position with more digits than this is past any file (int() of a 4,301-digit string
# raises, and aiohttp lets an 8 KiB field through): read as _FAR.
_DIGITS: Final = 18
_FAR: Final = 10**_DIGITS


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """No range of the field is satisfiable: 416 with ``Content-Range: bytes */LEN``."""


UNSATISFIABLE: Final = Unsatisfiable()

# (start, stop) of each range, half-open, in the order the client listed them.
Spans = tuple[tuple[int, int], ...]


def byte_ranges(field: str, size: int) -> Spans | Unsatisfiable | None:
    """The ranges of ``size`` bytes that a ``Range`` field value asks for: their spans, or
    :data:`UNSATISFIABLE`, or None when the field is to be ignored (the whole file, 200):
    not a valid ``bytes`` ranges-specifier, an empty file, or an amplification (see the
    module docstring)."""
    unit, eq, spec = field.partition("=")
    if not eq or unit.strip().lower() != "bytes" or size <= 0:
        return None  # another unit, or no ranges-specifier (RFC 9110 §14.2: MUST ignore)
    spans: list[tuple[int, int]] = []
    valid = 0
    for element in spec.split(","):
        item = element.strip(" \t")
        if not item:
            continue  # an empty list element (RFC 9110 §5.6.1: accepted and ignored)
        first, dash, last = item.partition("-")
        if not dash:
            return None
        valid += 1
        if valid > MAX_RANGES:
            return None
        if not first:  # suffix-range: the last N bytes (§14.1.1)
            length = _position(last)
            if length is None:
                return None
            if length:
                spans.append((max(0, size - length), size))
            continue  # "-0": unsatisfiable
        start = _position(first)
        end = _position(last) if last else _FAR
        if start is None or end is None or end < start:
            return None  # §14.1.1: a last-pos below the first-pos makes the field invalid
        if start < size:
            spans.append((start, min(end + 1, size)))  # clipped to the end (§14.1.2)
    if not valid:
        return None
    if not spans:
        return UNSATISFIABLE
    if sum(stop - start for start, stop in spans) > size:
        return None  # overlapping or amplifying: the whole file (nginx's rule)
    return tuple(spans)


def _position(digits: str) -> int | None:
    """1*DIGIT as an integer (RFC 9110 §14.1.1), or None; beyond any file when very long."""
    if not digits.isascii() or not digits.isdigit():
        return None
    return int(digits) if len(digits) <= _DIGITS else _FAR


def if_range_holds(field: str, etag: str, last_modified: int) -> bool:
    """Whether ``If-Range`` lets the Range apply to the file whose (strong) ``etag`` and
    ``Last-Modified`` (whole seconds since the epoch, as sent) are these (RFC 9110
    §13.1.5): an entity-tag that is the same strong tag, or a date that is exactly the
    Last-Modified sent. Anything else (another tag, a weak one, an earlier or later date,
    a value that is neither) is false: the whole file is the answer, never a part of a file
    that changed under the client's partial copy. (nginx compares the same way; aiohttp's
    FileResponse took no entity-tag at all and any date at or after the change.)"""
    field = field.strip(" \t")
    if field.startswith('"'):
        return field == etag  # strong comparison (§8.8.3.2): W/ never matches
    if field.startswith("W/"):
        return False
    parsed = email.utils.parsedate_tz(field)
    if parsed is None:
        return False
    try:
        return email.utils.mktime_tz(parsed) == last_modified
    except (OverflowError, ValueError):
        return False


@dataclass(frozen=True, slots=True)
class Multipart:
    """A ``multipart/byteranges`` answer's framing (RFC 9110 §14.6): each part's head (the
    CRLF and delimiter before it, its Content-Type and Content-Range) with the span of the
    file that follows it, the closing delimiter, and the body's length."""

    content_type: str  # the answer's: multipart/byteranges; boundary=...
    parts: tuple[tuple[bytes, int, int], ...]  # (head, start, stop)
    tail: bytes
    length: int  # the Content-Length of the whole body

    def batches(self, chunk: int) -> Iterator[list[tuple[bytes, int, int]]]:
        """The parts as reads of at most ``chunk`` bytes of the file, each with the head to
        send before it (b"" within a part), gathered into batches of at most ``chunk`` bytes
        of the file: one read job and one write a batch, however many parts. A job and two
        writes a part made MAX_RANGES one-byte parts cost ~10x the CPU of the whole file
        (s47-attack). Each batch made as it is asked for: a list of them all, made at once,
        was ~1.6 MB of a 2 GiB file's two parts, held while its reader did not read
        (s48-attack)."""
        batch: list[tuple[bytes, int, int]] = []
        room = chunk
        for first, start, stop in self.parts:
            head, at = first, start
            while True:
                if room == 0:
                    yield batch
                    batch, room = [], chunk
                end = min(stop, at + room)
                batch.append((head, at, end))
                room -= end - at
                head, at = b"", end
                if at >= stop:
                    break
        yield batch


def multipart(spans: Sequence[tuple[int, int]], size: int, content_type: str,
              boundary: str) -> Multipart:
    """The framing of ``spans`` of a ``size``-byte file of ``content_type``, as nginx frames
    it: ``CRLF --boundary CRLF Content-Type CRLF Content-Range CRLF CRLF data``, each part,
    then ``CRLF --boundary-- CRLF``. ``boundary``: characters RFC 2046 §5.1.1 allows, that
    do not occur in the file (the caller draws it at random)."""
    delimiter = f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: bytes "
    parts = tuple((f"{delimiter}{start}-{stop - 1}/{size}\r\n\r\n".encode("latin-1"),
                   start, stop) for start, stop in spans)
    tail = f"\r\n--{boundary}--\r\n".encode("latin-1")
    length = sum(len(head) + stop - start for head, start, stop in parts) + len(tail)
    return Multipart(f"multipart/byteranges; boundary={boundary}", parts, tail, length)
