"""The HTTP front door's codec: request heads a device sends, and the responses it gets.

A boot storm asks the same few device routes thousands of times a second (``/boot.ipxe``,
``/ipxe?mac=``, small assets, ``/config``). Through aiohttp each costs a task, a request
object, a StreamWriter, five middlewares and a header serialisation: ~300 µs of CPU on a
2-core box, where nginx spends ~30 µs. netboot's connection handler
(:class:`netboot.servers.http.GuardedHandler`) therefore reads a request head itself when
the connection is idle, and answers a plain ``GET`` of a device route from here; anything
else (another method, a body, HTTP/1.0, a cookie or a credential other than a bearer token,
a conditional or Range request, an encoded or odd target) is handed to aiohttp byte for
byte, which answers it as before. A bearer token is read for the caller, which answers an
installer's install token and leaves an API token to aiohttp's plain-HTTP policy.

This module is the pure part: bytes to a :class:`RequestHead` (or "not mine"), and a
:class:`Reply` to the bytes of a response. No sockets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Final, NamedTuple

from netboot.model import by_position, slot_init

# A head longer than this without its end goes to aiohttp, whose limits answer it (8 KiB
# per line, 32 KiB of headers): the front never buffers more than a normal request.
MAX_HEAD = 16 * 1024
# aiohttp's bound on a request line and on a header line (max_line_size, max_field_size).
MAX_LINE = 8190

# The request line of a GET this front may answer (RFC 9112 §3): "GET ", an origin-form
# target of visible ASCII with no percent-encoding, dot segments or empty segments (no "//"
# or "/." in the path), " HTTP/1.1", so that the path the route sees is exactly what aiohttp
# (yarl) would have decoded and normalised. Read with startswith, partition and translate
# (_only), not a regular expression: ~4,500 loop instructions a first install were the
# regular expressions' (s35-loop's callgrind), the match of the target the most of them.
_PATH_BYTES = b"!$&'()*+,-./0123456789:;=@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_QUERY_BYTES = _PATH_BYTES + b"%?"


def _only(allowed: bytes) -> bytes:
    """A translate() table that keeps ``allowed`` and changes every other byte: ``b`` is
    made of ``allowed`` alone iff ``b.translate(table) == b`` (one pass in C, no copy kept:
    translate returns ``b`` itself when nothing changed)."""
    return bytes(c if c in allowed else c ^ 0x80 for c in range(256))


_PATH: Final = _only(_PATH_BYTES)
_QUERY: Final = _only(_QUERY_BYTES)
# What may begin a request line while the rest is still to come: a method, then visible
# ASCII (RFC 9112 §3).
_START = re.compile(rb"[A-Z]{1,20}(?:\Z| [\x21-\x7e]*(?:\Z| [\x21-\x7e]*(?:\Z|\r)))")
# field-name = token (RFC 9110 §5.1); a field value has no control character but HTAB (§5.5).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The header lines' bytes but a control character (HTAB, and the CR LF between lines, which
# are counted apart: a bare CR or LF is a control character in a line).
_FIELD: Final = _only(bytes(c for c in range(256) if c == 9 or c in b"\r\n" or 0x1f < c != 0x7f))
# Field names as clients spell them, tokens already: no _TOKEN match for these (a device's
# /ipxe head, new for each machine, is parsed each time).
_NAMES: Final = frozenset({
    b"Host", b"User-Agent", b"Accept", b"Accept-Encoding", b"Connection", b"X-Request-Id",
    b"Authorization", b"Content-Length", b"Content-Type", b"host", b"user-agent",
    b"accept", b"accept-encoding", b"connection", b"x-request-id", b"authorization",
    b"content-length", b"content-type",
})

# Headers after which the request is aiohttp's to answer: a credential but a bearer token
# (the plain-HTTP policy reads those), conditional and partial requests (FileResponse's
# validators and ranges), an expectation.
_NOT_MINE: Final = frozenset({
    b"cookie", b"range", b"if-match", b"if-none-match",
    b"if-modified-since", b"if-unmodified-since", b"if-range", b"expect",
})


class RequestHead(NamedTuple):
    """A ``GET`` this front may answer. (A tuple: made once a request, where a frozen
    dataclass's ``__init__`` cost twice as much.)"""

    path: str  # without the query; nothing to decode (the request line allows no %)
    query: str  # raw, as after the '?' ("" when none)
    size: int  # bytes of the head, its closing blank line included
    close: bool  # "Connection: close": answer, then close
    user_agent: str
    request_id: str  # the client's X-Request-Id, "" when none (checked by the caller)
    accept_encoding: bool  # the client said what it can decode (the asset route checks)
    # The token of ``Authorization: Bearer <token>`` (RFC 6750 §2.1), "" when none: an
    # installer's install token, or an API token the caller leaves to aiohttp's policy.
    bearer: str = ""
    method: str = "GET"  # or "POST" (parse_post), whose ``size`` counts its body too
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class NotMine:
    """The request is aiohttp's (see the module docstring). ``size``: the bytes of its head
    when it has no body, so that aiohttp is given exactly this request and the front may
    answer the next; None when the rest of the connection must be aiohttp's (a body, an
    upgrade, a head it must refuse)."""

    size: int | None


_REST_IS_AIOHTTPS: Final = NotMine(None)
# Framing the front does not follow: with either, the rest of the stream is aiohttp's.
_BODY: Final = frozenset({b"content-length", b"transfer-encoding", b"upgrade"})
# Fields a request may have once (RFC 9110 §5.3: a list-less field sent twice is an error;
# aiohttp's SINGLETON_HEADERS, refused 400 when repeated); Content-Length and
# Transfer-Encoding are _BODY's. A head with one twice, or without Host (RFC 9112 §3.2: "A
# server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1 request message
# that lacks a Host header field and to any request message that contains more than one"),
# or with more fields than aiohttp takes (its max_headers), is aiohttp's to answer: the
# front answered those 200 where aiohttp (3.14) says 400 (s33-attack).
_SINGLETONS: Final = frozenset({
    b"host", b"user-agent", b"content-type", b"content-location", b"content-range",
    b"etag", b"max-forwards", b"server",
})
MAX_FIELDS = 128  # aiohttp's max_headers


class Fields(NamedTuple):
    """What :func:`parse_head` reads of a head's header lines (all of them after the request
    line): the same for every request whose lines are the same bytes, as a storm's devices
    send them (one iPXE build, one server), so that its caller may keep it for them."""

    passed: bool  # a field makes the request aiohttp's (a credential, a condition, a range)
    close: bool
    user_agent: str
    request_id: str
    accept_encoding: bool
    bearer: str


# A head of a request line alone: no Host, so aiohttp's (see _SINGLETONS).
_NO_FIELDS: Final = Fields(True, False, "", "", False, "")


def parse_head(buf: bytes, known: dict[bytes, Fields] | None = None
               ) -> RequestHead | NotMine | None:
    """The first request in ``buf``: a head this front answers, a :class:`NotMine`, or None
    when the head is not complete yet. ``known``: the caller's :class:`Fields` of header
    lines read before, looked up and added to (at most 1,024 of at most 1 KiB each), where a
    storm's first installs, each a head never seen (its MAC), share their header lines."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD or not _START.match(buf):
            # Not an HTTP request line (a TLS hello on the plain port): aiohttp refuses it
            # now, not when a head that never comes would be complete.
            return _REST_IS_AIOHTTPS
        return None
    if end > MAX_HEAD:
        return _REST_IS_AIOHTTPS
    if end > MAX_LINE and max(map(len, buf[:end].split(b"\r\n"))) > MAX_LINE:
        return _REST_IS_AIOHTTPS  # aiohttp refuses it (431/400): the same answer
    eol = buf.find(b"\r\n")  # the request line's end: the head's when it has no field
    fields = _NO_FIELDS
    if eol < end:
        block = buf[eol + 2:end]
        kept = known.get(block) if known is not None else None
        if kept is None:
            read = _read_fields(block)
            if isinstance(read, NotMine):
                return read
            if known is not None and len(block) <= 1024:
                if len(known) >= 1024:  # bounded: odd clients only churn it
                    known.clear()
                known[block] = read
            kept = read
        fields = kept
    # "GET /" and " HTTP/1.1" around the target, apart (they cannot overlap: the target is
    # "/" at least; eol >= 5 after "GET /", so eol - 9 >= -4 slices fewer than 9 bytes).
    # Compared as slices: startswith() with a start parses its arguments at ~500
    # instructions a call. find(), not ``in``: bytes' ``in`` first reads its operand as an
    # integer (a byte's value) and, for bytes, raises and clears a TypeError before it
    # searches: ~1,800 instructions each, twice a request (callgrind of a first install's
    # loop on the wire: benchmarks/README.md, s27-wire).
    if fields.passed or buf[:5] != b"GET /" or buf[eol - 9:eol] != b" HTTP/1.1":
        return NotMine(end + 4)
    path, _, query = buf[4:eol - 9].partition(b"?")
    if path.translate(_PATH) != path or (query and query.translate(_QUERY) != query) \
            or path.find(b"//") >= 0 or path.find(b"/.") >= 0:
        # Another method, HTTP/1.0, a target to decode or normalise: a request without a
        # body (RFC 9112 §6.3: neither Content-Length nor Transfer-Encoding), for aiohttp.
        return NotMine(end + 4)
    return RequestHead(path.decode("ascii"), query.decode("ascii"), end + 4, fields.close,
                       fields.user_agent, fields.request_id, fields.accept_encoding,
                       fields.bearer)


def _read_fields(block: bytes) -> Fields | NotMine:
    """:func:`parse_head`'s reading of the header lines ``block`` (their CRLFs between them),
    or :data:`_REST_IS_AIOHTTPS`."""
    passed = close = accept_encoding = False
    user_agent = request_id = bearer = ""
    lines = block.split(b"\r\n")
    # A control character anywhere (obs-fold, a bare CR or LF, NUL): a 400. One pass over
    # the block, where a regular expression's search a line cost ~800 instructions each.
    if block.translate(_FIELD) != block or block.count(b"\n") >= len(lines) \
            or block.count(b"\r") >= len(lines):
        return _REST_IS_AIOHTTPS
    once: list[bytes] = []  # the _SINGLETONS read
    for raw in lines:
        name, colon, value = raw.partition(b":")
        if not colon or (name not in _NAMES and _TOKEN.fullmatch(name) is None):
            return _REST_IS_AIOHTTPS  # obs-fold (a leading blank), a name not a token: a 400
        name = name.lower()
        if name in _BODY:
            return _REST_IS_AIOHTTPS
        if name in _SINGLETONS:
            if name in once:
                passed = True  # read on: a body framing header may follow
            once.append(name)
        if name in _NOT_MINE:
            passed = True  # read on: a body framing header may follow
        elif name == b"authorization":
            # A bearer token, once, is the caller's to judge; any other credential is the
            # plain-HTTP policy's (aiohttp's).
            scheme, _, token = value.strip(b" \t").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token.strip() or bearer:
                passed = True
            bearer = token.strip()
        elif name == b"connection":
            # (One token, keep-alive or close, is what clients send.)
            tokens = ({t.strip().lower() for t in value.split(b",")} if b"," in value
                      else {value.strip().lower()})
            if b"upgrade" in tokens:
                return _REST_IS_AIOHTTPS
            close = close or b"close" in tokens
        elif name == b"user-agent":
            user_agent = value.strip(b" \t").decode("latin-1")
        elif name == b"x-request-id":
            request_id = value.strip(b" \t").decode("latin-1")
        elif name == b"accept-encoding":
            accept_encoding = True
    if b"host" not in once or len(lines) > MAX_FIELDS:
        passed = True
    return Fields(passed, close, user_agent, request_id, accept_encoding, bearer)


# The installer's two POSTs (netboot.api: a progress report with its install token, the
# registration with the token in the body), answered by the front too: a storm sends three
# per device. The machine's reference is a MAC in any spelling or its id, nothing to decode.
_POST_LINE = re.compile(rb"POST (/api/v1/(?:machines/([0-9A-Za-z_.:-]{1,64})/events|register))"
                        rb" HTTP/1\.1")
_DIGITS = re.compile(rb"[0-9]{1,9}")


def parse_post(buf: bytes, limit: int) -> RequestHead | NotMine | None:
    """The first request in ``buf`` when it is one of the installer's POSTs with a
    ``Content-Length`` body of at most ``limit`` bytes, whole: a :class:`RequestHead` whose
    ``size`` counts the body; None when its head is whole but its body is still to come;
    else aiohttp's (a chunked or larger body, an expectation, a cookie or a credential but a
    bearer token, an upgrade, a head aiohttp refuses: it answers them all as before). For a
    ``buf`` whose head :func:`parse_head` found whole and not a GET of its own: its other
    fields are read by :func:`parse_head` itself, so that both doors' rules stay one."""
    end = buf.find(b"\r\n\r\n")
    eol = buf.find(b"\r\n")
    line = _POST_LINE.fullmatch(buf, 0, eol) if 0 <= end <= MAX_HEAD else None
    # A dot segment: aiohttp normalises the path. (find(): see parse_head.)
    if line is None or line[1].find(b"/.") >= 0:
        return _REST_IS_AIOHTTPS
    length: int | None = None
    fields = [b"GET / HTTP/1.1"]
    for raw in buf[eol + 2:end].split(b"\r\n") if eol < end else ():
        name, _, value = raw.partition(b":")
        if name.lower() != b"content-length":
            fields.append(raw)
            continue
        digits = value.strip(b" \t")
        if length is not None or not _DIGITS.fullmatch(digits):
            return _REST_IS_AIOHTTPS  # twice, or not a plain number: aiohttp's 400
        length = int(digits)
    if length is None or length > limit:
        return _REST_IS_AIOHTTPS
    head = parse_head(b"\r\n".join(fields) + b"\r\n\r\n")
    if not isinstance(head, RequestHead):
        return _REST_IS_AIOHTTPS
    size = end + 4 + length
    if len(buf) < size:
        return None
    return head._replace(path=line[1].decode("ascii"), size=size, accept_encoding=False,
                         method="POST", body=buf[end + 4:size])


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response of a device route: what both doors send (aiohttp's Response is built
    from it too, so that the two cannot drift)."""

    status: int
    body: bytes
    content_type: str  # with its charset when it is text
    headers: tuple[tuple[str, str], ...] = ()


# Made once per answer of a device route (model.slot_init).
slot_init(Reply)
# By position: status, body, content_type, headers (model.by_position): a first install's
# and a first config's answer.
reply_of: Callable[[int, bytes, str, tuple[tuple[str, str], ...]], Reply] = by_position(Reply)


class HttpDate:
    """The Date header (RFC 9110 §6.6.1), made once a second, as nginx and aiohttp do."""

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._text = formatdate(now, usegmt=True).encode("ascii")
        return self._text


_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


class HeadTemplate(NamedTuple):
    """The head of a response of one status, content type, set of headers and ``close``,
    around what changes per response: the Content-Length value, the Date and the request
    id (:func:`fill`). Made once per kind of reply (an ``/ipxe`` script, a 404), so that a
    response is one join, not a head written out again each time (~5 µs)."""

    start: bytes  # status line, Content-Type, "Content-Length: "
    date: bytes  # before the Date
    request_id: bytes  # Server, then "X-Request-Id: "
    end: bytes  # the reply's own headers, Connection: close, the blank line


def head_template(status: int, content_type: str, headers: tuple[tuple[str, str], ...], *,
                  server: str, close: bool) -> HeadTemplate:
    parts = [b"\r\n"]
    for name, value in headers:
        parts.append(b"%s: %s\r\n" % (name.encode("ascii"), value.encode("latin-1")))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return HeadTemplate(
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: " % (
            status, _REASONS.get(status, b""), content_type.encode("latin-1")),
        b"\r\nDate: ", b"\r\nServer: %s\r\nX-Request-Id: " % server.encode("ascii"),
        b"".join(parts))


def fill(head: HeadTemplate, *, length: int, date: bytes, request_id: str,
         body: bytes = b"") -> bytes:
    """A response: ``head`` with its values, then ``body`` (empty when a file follows)."""
    return b"".join((head.start, b"%d" % length, head.date, date, head.request_id,
                     request_id.encode("ascii"), head.end, body))


def encode_reply(reply: Reply, *, date: bytes, server: str, request_id: str,
                 close: bool, length: int | None = None) -> bytes:
    """The bytes of ``reply`` as HTTP/1.1, with the headers aiohttp's path adds (Date,
    Server, X-Request-Id) and ``Connection: close`` when the connection ends after it.
    ``length``: the Content-Length of a body sent after these bytes (a file), when
    ``reply.body`` is empty."""
    head = head_template(reply.status, reply.content_type, reply.headers, server=server,
                         close=close)
    return fill(head, length=len(reply.body) if length is None else length, date=date,
                request_id=request_id, body=reply.body)


def reply_parts(reply: Reply, *, server: str, close: bool, length: int | None = None
                ) -> tuple[bytes, bytes, bytes]:
    """:func:`encode_reply`'s bytes around the two values that change per request, the Date
    and the request id: made once for a reply that is sent again and again (a small asset,
    the bootstrap script), whose every answer is then a join of five byte strings."""
    head = head_template(reply.status, reply.content_type, reply.headers, server=server,
                         close=close)
    return (head.start + b"%d" % (len(reply.body) if length is None else length) + head.date,
            head.request_id, head.end + reply.body)
