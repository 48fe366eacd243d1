"""HTTP endpoints used by devices: iPXE scripts, assets, per-machine configs.

A thin aiohttp adapter over the ``DeviceContent`` protocol: it parses requests, maps errors to
status codes and streams files; what a machine gets is decided elsewhere. Assets are served with
Content-Length, HEAD, ETag/Last-Modified and sendfile, and Range as nginx answers it (UEFI HTTP
boot resumes with Range, protocols.md §4): one range or several (multipart/byteranges), with
If-Range (netboot.wire.ranges decides; netboot.servers.aio sends).

This module imports no aiohttp (netboot.servers.aio holds what needs it at import): ``netboot
serve`` binds its listeners with :class:`Doorway` and answers the front door's requests while
aiohttp is imported.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import contextvars
import fcntl
import functools
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import stat
import termios
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, cast
from urllib.parse import parse_qsl, unquote

from netboot.arrival import set_arrival
from netboot.eager import eager
from netboot.errors import (
    DECIDE_ATTEMPTS,
    AuthError,
    Busy,
    Conflict,
    DecodeError,
    Forbidden,
    NotFound,
    OutcomeUnknown,
    PlainHttpRefused,
    PreconditionFailed,
    RateLimited,
    RenderError,
    ScopeRequired,
    StateChanged,
    StoreError,
    StoreFull,
    TransitionRefused,
    ValidationError,
    WritesRefused,
)
from netboot.files import clean_relative
from netboot.logs import RateLimitedLog, escape, log_line, printable, set_log_context, wrote_text
from netboot.model import (
    Arch,
    Blob,
    BootPlan,
    BootRequest,
    Firmware,
    MacAddress,
    boot_request_of_values,
    normalise_uuid,
    parse_ip,
    reached_url,
)
from netboot.servers.fasthttp import (
    MAX_HEAD,
    Fields,
    HeadTemplate,
    HttpDate,
    NotMine,
    Reply,
    RequestHead,
    fill,
    head_template,
    parse_head,
    parse_post,
    reply_of,
    reply_parts,
)
from netboot.servers.sendthreads import SendThreads, Transfer

# aiohttp is imported by netboot.servers.aio, once netboot serve's listeners answer (its
# import is a third of the start-up): this module runs the front door without it, and
# aiohttp's RequestHandler is the handler's base only for the type checker;
# netboot.servers.aio puts it under the handler at run time. This module imports nothing of
# netboot.servers.aio: what needs its keys and responses lives there (AiohttpAccessLogger.log,
# asset_response, serve_devices, plain_http_middleware), so the two are no circle.
if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.web import RequestHandler as _HandlerBase
else:
    _HandlerBase = object



class RequestIds:
    """New request ids: a random prefix per process and a counter (16 hex digits, as
    ``secrets.token_hex(8)`` made them, without a system call per request). They tie log
    lines together; nothing is authorised by one."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = 0

    def __call__(self) -> str:
        self._next = (self._next + 1) & 0xFFFFFFFF
        # f"{n:08x}" without its format spec parsed at every call (~650 of a new id's
        # ~5,500 instructions through FrontDoor._request_id: callgrind, benchmarks/README.md
        # s30-front): hex() of the count with a ninth digit set, cut off with the "0x".
        return self._prefix + hex(0x100000000 | self._next)[3:]




class HttpObserver(Protocol):
    """Told of every request handled (metrics). ``route`` is the route's pattern
    (``/api/v1/machines/{ref}``), never the raw path, so that a scan of random URLs cannot
    create unbounded label values."""

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def plain_http_credential(self) -> None:
        """A credential (API token, session cookie, login) arrived over plain HTTP from the
        network and was refused unread."""


# A client's own request id is kept when it looks like one (a proxy's UUID, a trace id); other
# text is replaced, since it is echoed in a header and written into log lines.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# What the Server header says: no Python or aiohttp version for a scanner to match against.
SERVER_NAME = "netboot"

_BUILDARCH = {"i386": Arch.X86, "x86_64": Arch.X86_64, "arm32": Arch.ARM32,
              "arm64": Arch.ARM64, "riscv64": Arch.RISCV64}
# Looked up once: Python 3.11 finds an enum member through EnumType's __getattr__ hook at
# each use, ~870 instructions (callgrind), and every /ipxe request takes both.
_NO_ARCH = Arch.UNKNOWN
_IPXE = Firmware.IPXE


class DeviceContent(Protocol):
    def by_address(self) -> bool: ...

    def at(self, local: str | None) -> DeviceContent: ...

    def bootstrap_ipxe(self) -> str: ...

    def ipxe_plan(self, request: BootRequest) -> Awaitable[BootPlan]: ...

    def render_ipxe(self, plan: BootPlan) -> str: ...

    async def authorised_plan(self, mac_text: str, token: str | None) -> BootPlan: ...

    def k3os_config(self, plan: BootPlan) -> str: ...

    def nocloud(self, plan: BootPlan, name: str) -> str: ...

    async def config_fetched(self, plan: BootPlan, what: str) -> None: ...

    def asset(self, path: str) -> Blob: ...

    async def grub_file(self, name: str, peer: tuple[str, int], via: str) -> bytes: ...


class HealthCheck(Protocol):
    """What ``/healthz`` reports (netboot.health.InventoryHealth)."""

    def problem(self, *, detail: bool = True) -> str | None: ...

    @property
    def unknown(self) -> str | None:
        """What the inventory cannot tell (reported, not an outage); None: nothing."""


class DeviceReports(Protocol):
    """The installer's POSTs (netboot.api.Api), for the front door (:class:`FrontDoor`)."""

    async def front_post(self, route: str, ref: str | None, bearer: str | None, body: bytes,
                         remote: str | None, translate: Callable[[Exception], Reply],
                         ) -> Reply | None:
        """The answer of ``POST <route>`` (``ref``: the machine of an event report, None
        for a registration), errors through ``translate``, audited as aiohttp's path
        audits it; None, with nothing done, when the request is aiohttp's to answer (it
        needs an operator's token, which only aiohttp's path and its policy read)."""


def uri_query(raw: str) -> dict[str, str]:
    """A query string decoded as URI components (RFC 3986 §2.1), not as an HTML form.

    iPXE's ``${serial:uristring}`` escapes space as ``%20`` and leaves ``+`` as it is (iPXE
    ``format_uristring_setting`` → ``uri_encode`` field 0 escapes only non-printing bytes,
    space, ``%`` and ``/#:@?=&``), so ``Standard%20PC%20(Q35%20+%20ICH9,%202009)`` is a
    product with a plus. Form decoding (aiohttp's ``request.query``) would turn that ``+``
    into a space and no selector or serial would match. The first value of a key counts.
    """
    out: dict[str, str] = {}
    plain = "%" not in raw  # nothing to decode (iPXE's query, mostly): no unquote per part
    for part in raw.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        if plain:
            out.setdefault(key, value)
        else:
            out.setdefault(unquote(key, errors="replace"), unquote(value, errors="replace"))
    return out


def query_pairs(raw: str) -> list[tuple[str, str]]:
    """``parse_qsl(raw, keep_blank_values=True)``; a query with no ``%`` or ``+`` (nothing to
    decode: an installer's ``token=…``) split without it."""
    if "%" in raw or "+" in raw:
        return parse_qsl(raw, keep_blank_values=True)
    return [(key, value) for key, _, value in (part.partition("=")
                                               for part in raw.split("&") if part)]


def query_value(raw: str, name: str) -> str | None:
    """The value of the first pair of :func:`query_pairs` whose key is ``name``, or None;
    a query with nothing to decode read without making the pairs (an installer's
    ``token=…``: its config fetch's generator and list were ~2,000 loop instructions)."""
    if "%" in raw or "+" in raw:
        return next((v for k, v in parse_qsl(raw, keep_blank_values=True) if k == name), None)
    for part in raw.split("&"):
        key, _, value = part.partition("=")
        if key == name and part:  # an empty part is no pair (query_pairs skips it)
            return value
    return None


# ${platform} as iPXE builds give it: taken as they are, without _text's call (~1,800
# callgrind instructions of an /ipxe request).
_PLATFORMS = frozenset({"efi", "pcbios"})


def ipxe_request(query: Mapping[str, str], remote: str | None) -> BootRequest:
    """A BootRequest from the query string iPXE fills in from its settings (protocols.md §2.4)."""
    get = query.get
    mac_text = get("mac")
    if not mac_text:
        raise ValidationError("mac", "required (iPXE fills it from ${netX/mac:hexhyp})")
    mac = MacAddress.parse(mac_text)
    uuid = get("uuid") or None
    if uuid:
        try:
            uuid = normalise_uuid(uuid)
        except ValidationError:
            uuid = None  # firmware without SMBIOS UUID sends garbage; not worth refusing a boot
    build = (get("arch") or "").lower()
    platform = get("platform")  # iPXE's "efi" or "pcbios"; anything else bounded by _text
    if platform is not None and platform not in _PLATFORMS:
        platform = _text(platform.lower())
    # _text's call only for a string given (iPXE's chain URL may leave each one out: its
    # call was ~600 loop instructions for each missing one).
    serial, manufacturer, product, asset = (get("serial"), get("manufacturer"),
                                            get("product"), get("asset"))
    # Every field in declaration order, each checked here (a first install makes one per
    # request: the frozen __init__'s setattr by name per field was half of this function).
    return boot_request_of_values((
        mac, _BUILDARCH.get(build, _NO_ARCH), _IPXE, None, uuid,
        _text(serial) if serial else None,
        _text(manufacturer) if manufacturer else None,
        _text(product) if product else None, _text(asset) if asset else None,
        None, platform, remote, None, None, "http"))


def _text(value: str | None) -> str | None:
    """A firmware string of the query: stripped, at most 128 characters, None when empty.

    A character that is not printable is written as its escape (``\\x0a``): SMBIOS strings
    are printable text, but anyone may send ``/ipxe?mac=…&serial=…``, and the string is kept
    as the machine's serial, asset tag or a fact, which ``netboot machines show``, the API
    and site templates write out: a line break or an ESC there forged lines of an operator's
    terminal or of a rendered script (s36-attack)."""
    if not value:
        return None
    text = value.strip()
    if not text.isprintable():
        text = printable(text)
    return text[:128] or None


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


# /nocloud/{mac}/{token}/{name}: the one route with the install token in the path. Its
# third segment is redacted whatever follows it (a trailing slash, "//meta-data", nothing
# after the seed's slash): those are 404s, and their lines held the token (s36-attack).
_NOCLOUD_TOKEN = re.compile(r"^(/nocloud/[^/]+/)[^/]+(/.*)$", re.DOTALL)


def redacted_target(path: str, query: Iterable[tuple[str, str]]) -> str:
    """``netboot.servers.aio.loggable_target`` of a decoded path and query pairs (both
    doors use it)."""
    if path.startswith("/nocloud/"):  # (no expression run on every other path)
        path = _NOCLOUD_TOKEN.sub(r"\1<token>\2", path)
    pairs = ["token=<redacted>" if key.lower() == "token" else f"{key}={value}"
             for key, value in query]
    return escape(path + ("?" + "&".join(pairs) if pairs else ""), limit=1024)


# Methods escape() leaves as they are (printable ASCII, short): the access line writes them
# without the call.
_PLAIN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# An access line: peer, method, target, status, bytes sent, seconds, user agent.
_ACCESS_LINE = "%s %s %s %d %d %.3f \"%s\""


class AccessLogger:
    """One line per request: peer, method, target without the install token, status, bytes
    sent, seconds, user agent. What a device fetched, and how long its kernel took, is the
    first thing a failed or slow boot needs. Everything the client chose is escaped, so a
    ``%0a`` in a URL cannot forge a second line. (The front door logs with it before aiohttp
    is imported; netboot.servers.aio.AiohttpAccessLogger is it as aiohttp's access logger.)"""

    def __init__(self, logger: logging.Logger, log_format: str = "") -> None:
        self.logger = logger
        self.log_format = log_format

    def line(self, remote: str | None, method: str, target: str, status: int, sent: int,
             seconds: float, user_agent: str | None, request_id: str | None) -> None:
        """The line itself, for aiohttp's requests and the front door's (FrontDoor)."""
        # escape() is not called where it could change nothing (a method both doors take
        # as it is, no user agent): ~1,450 of a front answer's line's ~22,800 instructions
        # (callgrind, benchmarks/README.md s30-front).
        args = (remote, method if method in _PLAIN_METHODS else escape(method), target, status,
                sent, seconds, "-" if user_agent is None else escape(user_agent, limit=256))
        logger = self.logger
        # log_line's way (wrote_text) without log_line: its arguments packed and unpacked, and the
        # extras made for each line but read only by the JSON format, were ~3,000 of the
        # line's ~22,000 loop instructions (callgrind, benchmarks/README.md s46-install).
        if not wrote_text(logger, logging.INFO, _ACCESS_LINE, args):
            logger.log(logging.INFO, _ACCESS_LINE, *args,
                       extra={"request_id": request_id, "peer": remote, "path": target})


class FileSender:
    """Sends ``head`` and then ``count`` bytes of an open file from ``offset`` to a
    non-blocking TCP socket, as nginx does: sendfile(2), no copy through Python, no thread.

    :meth:`start` sends what the socket takes at once (a 1 MiB file usually goes whole in
    one call, with nothing asked of the loop); the rest goes on the loop's writable events,
    with the writer registered once for the whole file. (Registered and removed again at
    every ``EAGAIN``, uvloop's writer cost six ``epoll_ctl`` calls and a future per wake, ~10
    wakes per 32 MiB.) After a short ``sendfile`` the socket is full: the next call waits
    for room, as nginx waits for ``EPOLLOUT``, rather than failing with ``EAGAIN`` first.

    ``head`` is sent with ``MSG_MORE``: the kernel holds it back until the file's first
    bytes follow and sends both in full segments (nginx's ``tcp_nopush``, without the two
    ``TCP_CORK`` system calls per response); the last chunk of the file goes without it and
    pushes everything. ``pending``: what the socket's transport still buffers, which must
    leave before anything is written past it. ``done(sent, failed)`` is called once, with
    the bytes of the file sent (fewer than ``count`` when the file shrank) and whether the
    socket failed (or :meth:`stop` stopped it). ``sock`` is the caller's to close, once
    ``done`` was called (the loop may watch it until then); the file too. Never on a TLS
    socket: the bytes would bypass the encryption.
    """

    __slots__ = ("_count", "_done", "_fd", "_file", "_head", "_loop", "_offset", "_pending",
                 "_sock", "_watching", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, file: int,
                 offset: int, count: int, done: Callable[[int, bool], None], *,
                 head: bytes = b"", pending: Callable[[], int] | None = None) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._file = file
        self._offset = offset
        self._count = count
        self._head = head
        self._pending = pending
        self._done: Callable[[int, bool], None] | None = done
        self._watching = False
        self.sent = 0

    def start(self) -> None:
        if not self._step():
            self.wait()

    def wait(self) -> None:
        """Begin at the socket's next writable event (it was found full)."""
        self._watching = True
        self._loop.add_writer(self._fd, self._writable)

    def stop(self) -> None:
        """Stop where it is (the connection is lost): ``done`` with what was sent, as
        failed, unless it was called already."""
        self._finish(True)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_writer(self._fd)

    def _writable(self) -> None:
        self._step()

    def _step(self) -> bool:
        """Send what the socket takes; True once finished (``done`` called)."""
        failed = False
        try:
            if self._pending is not None and self._pending():
                return False  # the transport's bytes first; it writes them when it can
            if self._head:
                n = self._sock.send(self._head, socket.MSG_MORE)
                self._head = self._head[n:]
                if self._head:
                    return False
            n = os.sendfile(self._fd, self._file, self._offset + self.sent,
                            self._count - self.sent)
            self.sent += n
            if n and self.sent < self._count:
                return False  # the socket is full: on when it has room again
            # n == 0: the file is shorter than it was when its length was sent
        except BlockingIOError:
            return False
        except OSError:
            failed = True  # the client left, or the socket was closed
        self._finish(failed)
        return True

    def _finish(self, failed: bool) -> None:
        self._unwatch()
        done, self._done = self._done, None
        if done is not None:
            done(self.sent, failed)


async def sendfile(transport: Any, fobj: IO[Any], offset: int, count: int, *,
                   senders: SendThreads | None = None) -> int:
    """``count`` bytes of ``fobj`` from ``offset`` to a plain TCP transport's socket with
    sendfile(2) (:class:`FileSender`); the bytes sent. For loops whose ``loop.sendfile`` does
    not (uvloop), and on a send thread of ``senders`` (netboot.servers.sendthreads) on
    either loop, then with the transport buffering nothing (the head is out: the body is
    written past it). Never on a TLS transport: the bytes would bypass the encryption.

    What the transport still buffers (the response head) is sent first. The socket is
    watched through a duplicate descriptor: the loop refuses a writer on a descriptor its
    transport owns. A client that stops reading is dropped by the kernel (TCP_USER_TIMEOUT,
    :class:`GuardedHandler`), which ends the wait with an error.
    """
    # ``transport``: asyncio's or uvloop's TCP transport (uvloop's subclasses neither).
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[tuple[int, bool]] = loop.create_future()

    def done(sent: int, failed: bool) -> None:
        if not finished.done():
            finished.set_result((sent, failed))

    sender: FileSender | Transfer | None = None
    if senders is not None:  # (None: no thread or descriptor to take it)
        sender = senders.send(loop, sock.fileno(), fobj.fileno(), offset, count, done)
    watched = None
    if sender is None:
        watched = socket.socket(fileno=os.dup(sock.fileno()))
        sender = FileSender(loop, watched, fobj.fileno(), offset, count, done,
                            pending=transport.get_write_buffer_size)
        sender.start()
    try:
        sent, failed = await finished
    finally:
        sender.stop()  # cancelled: the connection is lost (once done: nothing)
        if watched is not None:
            watched.close()
    if failed:
        raise ConnectionResetError("connection lost")
    return sent


def web_response(reply: Reply) -> web.Response:
    """``reply`` as aiohttp's Response (aiohttp adds Date, Server and the request id)."""
    from aiohttp import web

    resp = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    resp.headers["Content-Type"] = reply.content_type
    return resp


def _json(body: Mapping[str, str | None], status: int,
          headers: Mapping[str, str] | None = None) -> Reply:
    # As web.json_response writes it (json.dumps' defaults), so that both doors agree.
    return Reply(status, json.dumps(body).encode(), "application/json; charset=utf-8",
                 tuple((headers or {}).items()))


# The routes firmware and installers ask without a credential of theirs (an install token
# opens a config, not an account): a Conflict there is answered without its holder.
_FIRMWARE_ROUTES = ("/ipxe", "/boot.ipxe", "/config/", "/nocloud/", "/grub/", "/assets/")


def error_reply(exc: Exception, log: logging.Logger, method: str, target: str,
                remote: str | None) -> Reply:
    """The one place HTTP errors are translated (DESIGN.md §4.5), for both doors."""
    if isinstance(exc, ValidationError):
        return _json({"error": exc.message, "field": exc.field}, 400)
    if isinstance(exc, DecodeError):
        return _json({"error": str(exc), "field": exc.field or "body"}, 400)
    if isinstance(exc, AuthError):
        return _json({"error": str(exc)}, 401, {"WWW-Authenticate": "Bearer"})
    if isinstance(exc, ScopeRequired):
        # RFC 6750 §3.1: the scope that would do, in the body and in the challenge.
        return _json({"error": str(exc), "scope": exc.scope}, 403, {
            "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{exc.scope}"'})
    if isinstance(exc, PlainHttpRefused):
        body = {"error": str(exc)}
        if exc.https_url is not None:
            body["https_url"] = exc.https_url
        return _json(body, 403)
    if isinstance(exc, Forbidden):
        # The detail names the server's own directories ("resolves outside /srv/..."): log it,
        # answer generically, as TFTP does with "access violation".
        log.info("refused %s %s from %s: %s", method, target, remote, exc)
        return _json({"error": "access denied"}, 403)
    if isinstance(exc, NotFound):
        return _json({"error": str(exc)}, 404)
    if isinstance(exc, PreconditionFailed):
        # RFC 9110 §13.1.1: If-Match false, the method not performed.
        return _json({"error": str(exc), "field": "If-Match"}, 412)
    if isinstance(exc, TransitionRefused):
        # The current state, machine-readable: a client can tell "already installed" from
        # "failed, reinstall first" without parsing the message.
        return _json({"error": str(exc), "state": exc.state, "event": exc.event}, 409)
    if isinstance(exc, Conflict) and target.startswith(_FIRMWARE_ROUTES):
        # Asked by no credential (PXE proves nothing): another machine's id and MAC, the
        # holder of the UUID or serial the request claimed (a learn the store refused on a
        # stale view), are the operator's to read, in the log, not any VLAN host's (iPXE
        # shows no body) (s43-attack's leftover, s44-attack).
        log.warning("conflict answering %s %s from %s: %s", method, target, remote, exc)
        return _json({"error": "this request's identifiers conflict with another machine's: "
                               "the server's log says which"}, 409)
    if isinstance(exc, Conflict):
        conflict: dict[str, Any] = {"error": str(exc)}
        if exc.field is not None:
            conflict["field"] = exc.field
        if exc.holder is not None:
            conflict["holder"] = exc.holder
        if exc.candidates:
            conflict["candidates"] = list(exc.candidates)
        return _json(conflict, 409)
    if isinstance(exc, RenderError):
        log.error("render failed for %s %s: %s", method, target, exc)
        return _json({"error": f"render failed: {exc}"}, 500)
    if isinstance(exc, Busy):
        return _json({"error": str(exc)}, 503, {"Retry-After": "5"})
    if isinstance(exc, RateLimited):
        # RFC 6585 §4: Too Many Requests, with when to ask again.
        return _json({"error": str(exc)}, 429, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, OutcomeUnknown):
        log.error("inventory failed for %s %s, outcome unknown: %s", method, target, exc)
        # Not "nothing was changed": a retry's answer (409 exists, 404 gone) tells which.
        return _json({"error": "the inventory's connection failed while the change was "
                      "being saved, and it cannot say whether it was: read it back before "
                      "trying again", "outcome": "unknown"}, 503, {"Retry-After": "5"})
    if isinstance(exc, StoreFull):
        log.error("inventory failed for %s %s: %s", method, target, exc)
        # Not "unreachable": the inventory answers; an operator is sent to the disk.
        return _json({"error": "the inventory's disk is full: nothing was changed; try "
                      "again later (boots of known machines are answered from memory "
                      "meanwhile)"}, 503, {"Retry-After": "5"})
    if isinstance(exc, WritesRefused):
        log.error("inventory failed for %s %s: %s", method, target, exc)
        return _json({"error": "the inventory refuses writes now: nothing was changed; try "
                      "again later (boots of known machines are answered from memory "
                      "meanwhile)"}, 503, {"Retry-After": "5"})
    if isinstance(exc, StoreError):
        log.error("inventory failed for %s %s: %s", method, target, exc)
        # Nothing was done: a client retries (iPXE's script, an installer's loop, an operator).
        return _json({"error": "the inventory is unreachable: nothing was changed; try "
                      "again later (boots of known machines are answered from memory "
                      "meanwhile)"}, 503, {"Retry-After": "5"})
    log.exception("bug handling %s %s", method, target)
    return _json({"error": "internal error"}, 500)


@dataclass(frozen=True, slots=True)
class _Held:
    """A small asset in memory, answered while its file keeps the same identity."""

    ident: tuple[int, ...]  # inode, device, size, mtime and ctime (ns): any change re-reads
    body: bytes
    headers: Mapping[str, str]  # Content-Type, ETag, Last-Modified, Accept-Ranges
    mtime: float
    compressed: bool  # a .gz/.br/.zst sibling aiohttp would pick by Accept-Encoding
    reply: Reply  # the whole file, for the front door


class AssetFiles:
    """Assets over HTTP: small files from memory, large ones with sendfile(2).

    A boot storm asks for the same few files thousands of times. aiohttp's FileResponse
    resolves, stats and opens each in a worker thread; the asset tree's path checks (every
    component resolved, the result checked to be under its root) cost ~0.3 ms more. Here, as
    nginx's ``open_file_cache`` does: a name's resolution is reused for ``resolve_ttl``
    seconds (a symlink pointed elsewhere is followed within that time; a removed file at
    once), and each request stats the file it resolved to: a file up to ``max_file`` bytes
    is answered from memory while its inode, size, mtime and ctime are unchanged (a
    replaced, rewritten or chmod-ed file is read again, never served stale), with its
    headers made once. Range requests are answered from memory as the file path answers
    them (netboot.servers.aio.held_response: one range or several, 416 when none is
    satisfiable, If-Range); other conditional requests and larger files go to
    FileResponse, with sendfile on every event loop.
    """

    def __init__(self, resolve: Callable[[str], Blob], *, max_file: int = 256 * 1024,
                 max_total: int = 64 << 20, resolve_ttl: float = 1.0, max_open: int = 64,
                 open_ttl: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._resolve = resolve
        self.max_file = max_file
        self.max_total = max_total
        self.max_open = max_open
        self._ttl = resolve_ttl
        self._open_ttl = open_ttl
        self._clock = clock
        self._resolved: dict[str, tuple[Blob, float]] = {}  # requested name -> (blob, until)
        # OrderedDicts: the oldest dropped in O(1) (boot._keep says why).
        self._held: OrderedDict[str, _Held] = OrderedDict()  # real path -> contents, oldest first
        # real path -> a large file kept open (_open_large), oldest opened first
        self._open: OrderedDict[str, _OpenFile] = OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None
        # An AssetFiles dropped (a server stopped) closes what it kept open.
        weakref.finalize(self, _retire_all, self._open)
        self._total = 0

    def _blob(self, name: str, *, fresh: bool = False) -> Blob:
        now = self._clock()
        known = None if fresh else self._resolved.get(name)
        if known is not None and known[1] > now:
            return known[0]
        blob = self._resolve(name)  # NotFound, Forbidden: as the asset tree says
        if len(self._resolved) >= 4096:  # bounded: a scan of random names cannot grow it
            self._resolved.clear()
        self._resolved[name] = (blob, now + self._ttl)
        return blob

    async def reply(self, name: str, *, accept_encoding: bool, large: bool = False
                    ) -> Reply | FileBody | None:
        """The whole file for a plain GET (no Range, no validators: the front door leaves
        those to aiohttp's path, netboot.servers.aio.asset_response): from memory, or with
        ``large`` a larger file opened to be sent with sendfile(2) (:class:`FileBody`); None
        when aiohttp's path is to answer (a large file without ``large``, a client that
        accepts an encoding a compressed sibling may have, something that is not a regular
        file)."""
        blob, held, st_path = await self.find(name)
        if blob.data is not None:
            return Reply(200, blob.data, blob.content_type.split(";")[0])
        if held is None:
            if not large or not st_path or (accept_encoding and _compressed_sibling(st_path)):
                return None
            return self._open_large(st_path, blob.content_type)
        if held.compressed and accept_encoding:
            return None
        return held.reply

    def ready(self, name: str, *, accept_encoding: bool, large: bool = False
              ) -> Reply | FileBody | None:
        """:meth:`reply` when nothing has to be read or resolved: the name's resolution is
        fresh and its file, held in memory, still has the identity it was read with (one
        stat, as nginx opens and stats a file per request), or with ``large`` a large file
        :meth:`reply` opened before (opened again); None otherwise (then ask
        :meth:`reply`)."""
        known = self._resolved.get(name)
        if known is None or known[1] <= self._clock():
            return None
        path = known[0].path
        held = self._held.get(path) if path is not None and known[0].data is None else None
        if held is None:
            if (large and path is not None and path in self._open
                    and not (accept_encoding and _compressed_sibling(path))):
                return self._open_large(path, known[0].content_type)
            return None
        if held.compressed and accept_encoding:
            return None
        try:
            st = os.stat(path)  # type: ignore[arg-type]  # held: a path
        except OSError:
            return None
        if _file_identity(st) != held.ident:
            return None
        return held.reply

    def _open_large(self, path: str, content_type: str) -> FileBody | None:
        """``path`` to send (``content_type``: its blob's), with the headers aiohttp's
        FileResponse sends for a whole file; None when it is not a regular file or cannot be
        opened (FileResponse then answers as it would).

        As nginx's ``open_file_cache``: the descriptor opened for a file is kept and used
        by every request while a ``stat`` of its path (one per request, what opening it
        would cost anyway) finds the file it has open, unchanged — same inode and device,
        size, mtime and ctime, the identity its headers were made from. A file replaced or
        rewritten is opened again; a removed one is not sent (the stat fails: the request
        is answered as the asset tree says now). Sending from the kept descriptor therefore
        sends what opening the path now would (while it is open its inode cannot be
        reused), without the open and close per request (~10 us of a 1 MiB answer's ~270).
        A descriptor is closed when its file changed or is evicted, and no request uses it;
        or unused for ``open_ttl`` seconds."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        kept = self._open.get(path)
        if kept is None or kept.ident != _file_identity(st) or kept.kind != content_type:
            kept = self._open_anew(path, content_type)
            if kept is None:
                return None
        kept.used = self._clock()
        return FileBody(kept)

    def _open_anew(self, path: str, content_type: str) -> _OpenFile | None:
        try:
            # O_NONBLOCK, as nginx opens: a FIFO put among the assets must not block the
            # loop (reads of a regular file ignore it).
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            st = os.fstat(fd)  # the file opened, whatever the path says by now
        except OSError:
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            os.close(fd)
            return None
        old = self._open.pop(path, None)
        if old is not None:
            old.retire()
        if len(self._open) >= self.max_open:  # bounded: a tree of many large files
            self._open.popitem(last=False)[1].retire()  # the oldest opened
        reply = Reply(200, b"", content_type.split(";", maxsplit=1)[0], (
            ("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"'),
            # Rounded up, as aiohttp does: a client's If-Modified-Since then matches.
            ("Last-Modified", formatdate(math.ceil(st.st_mtime), usegmt=True)),
            ("Accept-Ranges", "bytes")))
        kept = self._open[path] = _OpenFile(fd, _file_identity(st), st.st_size, content_type,
                                            reply)
        if self._sweeper is None:
            with contextlib.suppress(RuntimeError):  # no loop: closed when replaced, evicted
                self._sweeper = asyncio.get_running_loop().call_later(self._open_ttl,
                                                                      self._sweep)
        return kept

    def _sweep(self) -> None:
        """Close the descriptors no request used for ``open_ttl`` seconds."""
        self._sweeper = None
        idle = self._clock() - self._open_ttl
        for path, kept in list(self._open.items()):
            if kept.used <= idle:
                del self._open[path]
                kept.retire()
        if self._open:
            self._sweeper = asyncio.get_running_loop().call_later(self._open_ttl, self._sweep)

    async def find(self, name: str) -> tuple[Blob, _Held | None, str]:
        """The asset: its blob, its copy in memory when it is small enough (read now if
        needed), and the path of its file ("" for a blob rendered in memory)."""
        blob = self._blob(name)
        if blob.data is not None:
            return blob, None, ""
        try:
            st_path, st = _stat(blob)
        except OSError:  # removed since it was resolved: as the tree says now
            blob = self._blob(name, fresh=True)
            st_path, st = _stat(blob)
        held = None
        if stat.S_ISREG(st.st_mode) and st.st_size <= self.max_file:
            held = await self._hold(blob, st)
        return blob, held, st_path

    async def _hold(self, blob: Blob, st: os.stat_result) -> _Held | None:
        assert blob.path is not None
        ident = _file_identity(st)
        held = self._held.get(blob.path)
        if held is not None and held.ident == ident:
            return held
        try:
            body, compressed = await asyncio.get_running_loop().run_in_executor(
                None, _read_small, blob.path, st.st_size)
        except OSError:
            return None  # unreadable now: FileResponse answers as it would
        if len(body) != st.st_size:
            return None  # changing while read: not kept
        if held is not None:
            self._total -= len(held.body)
            del self._held[blob.path]
        headers: dict[str, str] = {"Content-Type": blob.content_type.split(";")[0],
                   # FileResponse's validators, so that a client's cache works across both.
                   "ETag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"',
                   # Rounded up, as aiohttp does: a client's If-Modified-Since then matches.
                   "Last-Modified": formatdate(math.ceil(st.st_mtime), usegmt=True),
                   "Accept-Ranges": "bytes"}
        held = _Held(ident, body, headers, st.st_mtime, compressed,
                     Reply(200, body, headers["Content-Type"],
                           tuple((k, v) for k, v in headers.items()
                                 if k != "Content-Type")))
        while self._held and self._total + len(body) > self.max_total:
            self._total -= len(self._held.popitem(last=False)[1].body)  # the oldest
        if len(body) <= self.max_total:
            self._held[blob.path] = held
            self._total += len(body)
        return held


class _OpenFile:
    """A large asset's descriptor kept open (:meth:`AssetFiles._open_large`), with the
    identity of the file it has open and the headers made from it; closed once retired
    (its file changed, evicted, idle) and no request's :class:`FileBody` uses it."""

    __slots__ = ("fd", "ident", "kept", "kind", "reply", "size", "used", "users")

    def __init__(self, fd: int, ident: tuple[int, ...], size: int, kind: str,
                 reply: Reply) -> None:
        self.fd = fd
        self.ident = ident
        self.size = size
        self.kind = kind  # the blob's content type the reply was made for
        self.reply = reply  # its status and headers as FileResponse gives them; no body
        self.used = 0.0  # when a request last took it (AssetFiles' clock)
        self.users = 0  # FileBody objects not closed yet
        self.kept = True

    def retire(self) -> None:
        self.kept = False
        if not self.users:
            os.close(self.fd)

    def release(self) -> None:
        self.users -= 1
        if not self.users and not self.kept:
            os.close(self.fd)


def _retire_all(kept: dict[str, _OpenFile]) -> None:
    for open_file in kept.values():
        open_file.retire()
    kept.clear()


class FileBody:
    """A large asset to send after its reply's head, whole, with sendfile(2): a kept
    descriptor (:class:`_OpenFile`) taken for one response. Whoever sends it closes it
    (:meth:`close`, once or more), which gives the descriptor back."""

    __slots__ = ("_file", "fd", "reply", "size")

    def __init__(self, file: _OpenFile) -> None:
        file.users += 1
        self._file: _OpenFile | None = file
        self.fd = file.fd
        self.size = file.size
        self.reply = file.reply

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.release()

    def __del__(self) -> None:
        self.close()  # a body dropped unsent (a bug) does not keep its descriptor open

    def __repr__(self) -> str:
        return f"FileBody(fd={self.fd}, size={self.size}, reply={self.reply!r})"


def _stat(blob: Blob) -> tuple[str, os.stat_result]:
    if blob.path is None:
        raise FileNotFoundError("no file behind this asset")
    return blob.path, os.stat(blob.path)


def _read_small(path: str, size: int) -> tuple[bytes, bool]:
    with open(path, "rb") as fh:
        body = fh.read(size + 1)
    return body, _compressed_sibling(path)


def _file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another (inode, device, size, mtime, ctime):
    a file replaced or rewritten in place differs, so what was kept of it is not used."""
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _compressed_sibling(path: str) -> bool:
    """Whether a compressed sibling of ``path`` exists that aiohttp's FileResponse may send
    instead to a client accepting its encoding (it looks for ``.br`` and ``.gz``; ``.zst``
    too, in case a newer aiohttp does): then it answers, with its Content-Encoding and Vary.
    Without one its answer is the plain file's, as if no Accept-Encoding had been sent — and
    most HTTP clients send one (curl with --compressed, Python's aiohttp, browsers; iPXE
    does not), so a large file is not sent through aiohttp's request path for that alone."""
    return any(os.path.lexists(path + ext) for ext in (".br", ".gz", ".zst"))


# --- what the plain HTTP listener answers ---------------------------------------------------

PlainApi = Literal["refuse", "loopback", "allow"]


def local_address(request: web.BaseRequest) -> str | None:
    """The address ``request`` came in on: its connection's own (None: not known)."""
    transport = request.transport
    return sockname_host(transport) if transport is not None else None


def sockname_host(transport: asyncio.BaseTransport) -> str | None:
    """A connection's own address (where its client reached this host), or None."""
    sockname = transport.get_extra_info("sockname")
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


@dataclass
class PlainHttp:
    """What the plain HTTP listener serves to whom (``http.plain_api``).

    Firmware cannot do TLS: boot scripts, kernels and images, ``/healthz`` and (while it is
    public) ``/metrics`` are served over plain HTTP to anyone, and so are the installer's
    routes, which carry only an install token (k3OS fetches its config with a curl that
    cannot be given a CA). Routes mark themselves with :meth:`serve_plain` where they are
    added, so a new route is HTTPS-only unless it says otherwise.

    Everything else, the API and the dashboard, answers a plain HTTP request from the network
    with 403 naming the HTTPS URL (a page GET: a 308 redirect there); a request carrying a
    credential (an API token, the dashboard's session cookie, a login) is refused without
    its credential being read or checked, counted, and logged once per peer, since the token
    crossed the network in clear. ``loopback`` (the default) trusts this host: 127.0.0.0/8,
    ::1 and a connection to the host's own address from that address (the CLI and scripts,
    a TLS-terminating proxy beside netboot); ``refuse`` trusts nobody; ``allow`` everybody,
    for a TLS-terminating proxy on another host.
    """

    mode: PlainApi = "loopback"
    https_url: Callable[[], str | None] = lambda: None  # the HTTPS base URL, None if off
    api_token_prefix: str = ""  # how an API token starts (netboot.access.TOKEN_PREFIX)
    session_cookie: str = ""  # the dashboard's session cookie (netboot.web.auth)
    stand_in: str = ""  # a host swapped for the address reached, as loopback (url_stand_in)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))

    def __post_init__(self) -> None:
        # One line per peer an hour: a client that leaks its token does so on every call.
        self._limited = RateLimitedLog(self.log, burst=1, window=3600.0)

    def trusts(self, request: web.BaseRequest) -> bool:
        """Whether this request may use the API and credentials as it is."""
        if request.secure or self.mode == "allow":
            return True
        if self.mode == "refuse":
            return False
        address = parse_ip(request.remote)
        if address is None:
            return False  # a Unix socket or an unknown transport: not known to be this host
        if address.is_loopback:
            return True
        # A connection from this host to its own address (the CLI told http.listen's
        # address): the peer is the address it reached. No other host can open one: Linux
        # drops a packet from outside whose source is a local address ("martian source").
        return parse_ip(local_address(request)) == address

    def credential(self, request: web.Request, plain_route: bool) -> str | None:
        """What credential the request carries, by its form only (never looked up)."""
        if request.cookies.get(self.session_cookie):
            return "the dashboard's session cookie"
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            bearer = scheme.lower() == "bearer"
            if bearer and not self.install_token(value):
                return "an API token"
            # On a firmware or installer route a bearer token is an install token, which is
            # what those routes take.
            if not plain_route or not bearer:
                return "an Authorization header"
        resource = request.match_info.route.resource
        if (request.method == "POST" and resource is not None
                and resource.canonical == "/login" and request.body_exists):
            return "a dashboard login"
        return None

    def install_token(self, bearer: str) -> bool:
        """Whether a bearer token is, by its form, an install token (what firmware and
        installer routes take) rather than an API token, an operator's credential. The
        front door asks too: it answers a device route with the one, never the other."""
        return not (self.api_token_prefix and bearer.strip().startswith(self.api_token_prefix))

    def leaked(self, request: web.Request, what: str, target: str) -> None:
        """Say once per peer and hour that ``request`` (its loggable ``target``) sent a
        credential in clear (counted in the metrics by netboot.servers.aio's middleware)."""
        self._limited.log(
            logging.WARNING, request.remote or "-",
            "http: %s sent %s over plain HTTP (%s %s): refused without reading it; it "
            "crossed the network in clear, so revoke and replace it, and point the client "
            "at %s", request.remote, what, escape(request.method), target,
            self.https_base(request) or "HTTPS (https.enabled is false)")

    def https_base(self, request: web.BaseRequest) -> str | None:
        """The HTTPS base URL to send ``request``'s client to (None: HTTPS is off).

        A loopback host in it (the advertised address of a host without a default route
        and no --advertise, which start-up warns of) is the address the request came in
        on: the client reached this host there, and could never reach its 127.0.0.1. Not
        the Host header, which the client writes (an open redirect): the socket's own
        address, as `trusts` reads it. Likewise the stand-in (several interfaces named, the
        first one's address advertised: model.stands_in)."""
        base = self.https_url()
        return reached_url(base, local_address(request), self.stand_in) if base else base

    def refusal(self, request: web.Request, what: str) -> PlainHttpRefused:
        base = self.https_base(request)
        url = f"{base.rstrip('/')}{request.rel_url}" if base else None
        where = (f"use {url}" if url else "HTTPS is off (https.enabled), and plain HTTP "
                 "serves the API only to this host")
        return PlainHttpRefused(f"{what} over plain HTTP is refused (http.plain_api: "
                                f"{self.mode}): {where}", url)


_TEXT = "text/plain; charset=utf-8"  # what web.Response(text=...) says
_NO_STORE = (("Cache-Control", "no-store"),)


class DeviceRoutes:
    def __init__(self, content: DeviceContent, *, logger: logging.Logger | None = None,
                 health: HealthCheck | None = None,
                 files: AssetFiles | None = None) -> None:
        self._content = content
        self._health = health
        self._log = logger or logging.getLogger(__name__)
        self._files = files or AssetFiles(content.asset)
        # The bootstrap script's text -> its Reply, by the local address it is served on
        # (None: every one but where the base URL is a loopback one, Content.at).
        self._bootstraps: dict[str | None, tuple[str, Reply]] = {}

    @property
    def files(self) -> AssetFiles:
        """The asset files ``/assets/`` serves (aiohttp's path: asset_response)."""
        return self._files

    def local_of(self, transport: asyncio.BaseTransport) -> str | None:
        """The ``local`` to give :meth:`front` and :meth:`ready` for a connection's requests:
        its own address where a device's URLs name it (Content.at), else None. Asked once
        a connection: nothing more a request where the base URL is the advertised one, nor
        for a client of this host itself (its loopback address: the base URL as it is; the
        benchmarks' clients, whose every request paid ~4,500 instructions for Content.at's
        look-up otherwise, s36-user)."""
        if not self._content.by_address():
            return None
        local = sockname_host(transport)
        return local if local is not None and self._content.at(local) is not self._content \
            else None

    def front(self, path: str, query: str, remote: str | None, *, accept_encoding: bool,
              bearer: str = "", large: bool = False, local: str | None = None
              ) -> tuple[str, Coroutine[Any, Any, Reply | FileBody | None]] | None:
        """The route pattern (the metrics' label, as aiohttp names it) and the answer of a
        plain GET the front door may give (:class:`FrontDoor`); None for aiohttp to route.
        The answers are the same coroutines aiohttp's handlers below await. ``bearer``: an
        install token from the Authorization header (:meth:`PlainHttp.install_token`),
        which ``/config`` takes before the query's, as :meth:`_token` does. ``large``: a
        large asset may be answered too (:meth:`AssetFiles.reply`). ``local``: the address
        the request came in on (its connection's own), which the URLs in a script or config
        name where the base URL is a loopback one (Content.at)."""
        if path == "/ipxe":
            return "/ipxe", self._ipxe(query, remote, local)
        if path == "/boot.ipxe":
            return "/boot.ipxe", self._boot_ipxe(local)
        if path.startswith("/assets/") and len(path) > 8:
            return "/assets/{path}", self._files.reply(path[8:], large=large,
                                                       accept_encoding=accept_encoding)
        if path.startswith("/config/") and "/" not in path[8:] and len(path) > 8:
            token = bearer or query_value(query, "token")
            return "/config/{mac}", self._config(path[8:], token, remote, local)
        if path == "/healthz":
            return "/healthz", self._healthz()
        return None

    # What every path :meth:`ready` may answer begins with: the front door asks it for no
    # other (an /ipxe or /config request's call with its keywords, ~1,000 loop instructions,
    # for a None; s33-loop).
    READY_PREFIXES = ("/boot.ipxe", "/assets/")

    def ready(self, path: str, *, accept_encoding: bool, large: bool = False,
              local: str | None = None) -> tuple[str, Reply | FileBody] | None:
        """:meth:`front`'s route and answer when it is in memory already and the same object
        as the last time (the bootstrap script, a small asset held unchanged), so that the
        front door may keep its encoding; None: ask :meth:`front`. Only for a path that
        begins with one of :attr:`READY_PREFIXES`."""
        if path == "/boot.ipxe":
            try:
                return "/boot.ipxe", self._boot_reply(local)
            except Exception:  # a template that does not render: front's error translation
                return None
        if path.startswith("/assets/") and len(path) > 8:
            reply = self._files.ready(path[8:], accept_encoding=accept_encoding, large=large)
            return None if reply is None else ("/assets/{path}", reply)
        return None

    async def healthz(self, request: web.Request) -> web.Response:
        """200 ``ok``; 503 ``degraded: <reason>`` while the inventory is unreachable (the
        server still answers boots of known machines: a readiness check, not a liveness one
        — a restart cannot help, and a server that cannot reach its database cannot start);
        200 ``unknown: ...`` while it answers but cannot tell whether its writes are stuck.
        The state only: anyone may ask, and the store's words name the database's host,
        user, locks and grants; they go to the log and to ``GET /api/v1/status``."""
        return web_response(await self._healthz())

    async def _healthz(self) -> Reply:
        problem = self._health.problem(detail=False) if self._health is not None else None
        if problem is None:
            unknown = self._health.unknown if self._health is not None else None
            if unknown is not None:
                # Writes go on (they wait for a session netboot cannot see, each bounded by
                # statement_timeout): no outage, so not a 503, and not "ok" either.
                return Reply(200, b"unknown: the inventory answers but cannot tell whether "
                             b"its writes are stuck (why: the server's log, GET "
                             b"/api/v1/status)\n", _TEXT, _NO_STORE)
            return Reply(200, b"ok\n", _TEXT)
        return Reply(503, f"degraded: {problem}; boots of known machines are answered from "
                     "memory, writes are refused (why: the server's log, GET /api/v1/status)"
                     "\n".encode(), _TEXT, _NO_STORE)

    async def boot_ipxe(self, request: web.Request) -> web.Response:
        return web_response(await self._boot_ipxe(local_address(request)))

    async def _boot_ipxe(self, local: str | None = None) -> Reply:
        return self._boot_reply(local)

    def _boot_reply(self, local: str | None = None) -> Reply:
        # The same Reply while the script is the same text (content keeps it until its
        # template or the base URL changes).
        content = self._content if local is None else self._content.at(local)
        text = content.bootstrap_ipxe()
        key = None if content is self._content else local
        kept = self._bootstraps.get(key)
        if kept is None or kept[0] is not text:
            if len(self._bootstraps) >= 64:
                self._bootstraps.clear()  # bounded: a host has a few addresses
            kept = self._bootstraps[key] = (text, Reply(200, text.encode(), _TEXT))
        return kept[1]

    async def ipxe(self, request: web.Request) -> web.Response:
        return web_response(await self._ipxe(request.rel_url.raw_query_string, request.remote,
                                             local_address(request)))

    async def _ipxe(self, query: str, remote: str | None, local: str | None = None) -> Reply:
        boot = ipxe_request(uri_query(query), remote)
        # The decision awaited here and its script rendered here: Content.ipxe_script's
        # coroutine between them was a level more between the task and the decision's
        # every wait (~1,400 loop instructions a level; s35-loop).
        content = self._content if local is None else self._content.at(local)
        plan = await content.ipxe_plan(boot)
        script = content.render_ipxe(plan)
        # The MAC's text by bytes.hex, what its __str__ returns, without that Python call
        # (~500 loop instructions a line; callgrind, s33-loop).
        log_line(self._log, logging.INFO, "ipxe mac=%s peer=%s action=%s reason=%r",
                 boot.mac.hex(":"), remote, plan.action, plan.reason, extra={"mac": boot.mac})
        return reply_of(200, script.encode(), _TEXT, _NO_STORE)  # Reply's, by position

    async def grub(self, request: web.Request) -> web.Response:
        peer = (request.remote or "", 0)
        name = clean_relative(request.match_info["name"])
        text = await self._content.at(local_address(request)).grub_file(name, peer, "http")
        from aiohttp import web

        return web.Response(body=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    def _token(self, request: web.Request) -> str | None:
        # Installers that can send headers use Bearer; cloud-init's NoCloud seed URL and a
        # kernel command line can only carry it in the path or the query.
        return (bearer_token(request) or request.match_info.get("token")
                or request.query.get("token"))

    async def config(self, request: web.Request) -> web.Response:
        return web_response(await self._config(request.match_info["mac"], self._token(request),
                                               request.remote, local_address(request)))

    async def _config(self, mac: str, token: str | None, remote: str | None,
                      local: str | None = None) -> Reply:
        attempt = 1
        content = self._content if local is None else self._content.at(local)
        while True:
            plan = await content.authorised_plan(mac, token)
            text = content.k3os_config(plan)
            # Written out, not a coroutine of its own (a first config's loop instructions).
            try:
                await self._content.config_fetched(plan, "k3OS config")
                break
            except StateChanged as exc:
                if exc.field != "updated" or attempt >= DECIDE_ATTEMPTS:
                    raise
            attempt += 1  # the machine was changed since it was read: planned again
        log_line(self._log, logging.INFO, "config mac=%s peer=%s served", plan.mac.hex(":"),
                 remote)  # the MAC's text as _ipxe's line makes it
        return reply_of(200, text.encode(), "text/yaml; charset=utf-8", _NO_STORE)

    async def nocloud(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        attempt = 1
        content = self._content.at(local_address(request))
        while True:
            plan = await content.authorised_plan(request.match_info["mac"],
                                                 self._token(request))
            text = content.nocloud(plan, name)
            if name != "user-data":
                break
            try:
                await self._content.config_fetched(plan, "cloud-init user-data")
                break
            except StateChanged as exc:
                if exc.field != "updated" or attempt >= DECIDE_ATTEMPTS:
                    raise
            attempt += 1  # as _config
        from aiohttp import web

        return web.Response(text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})


class FrontDoor:
    """Answers a plain GET of a device route without aiohttp (netboot.servers.fasthttp).

    :class:`GuardedHandler` asks it for each request head it reads while aiohttp is idle on
    the connection; what the front does not take is handed to aiohttp byte for byte. An
    answer here is what aiohttp's path gives for the same request — the same coroutine
    (:meth:`DeviceRoutes.front`), the same error translation (:func:`error_reply`), the same
    Server and X-Request-Id headers, the access log line, the metrics' observation and the
    log context — without the task, request object and middleware chain per request.

    A request carrying a bearer token is the front's when the plain-HTTP policy calls it an
    install token (:meth:`PlainHttp.install_token`), which device routes take from anyone:
    an API token, an operator's, goes to aiohttp, whose policy refuses and reports it.
    """

    def __init__(self, routes: DeviceRoutes, *, log: logging.Logger,
                 observer: HttpObserver | None, ids: Callable[[], str],
                 plain: PlainHttp | None = None) -> None:
        self.routes = routes
        self.log = log
        self.observer = observer
        self.ids = ids
        self.plain = plain
        self.date = HttpDate()
        self.answered = 0  # requests answered here, not by aiohttp
        # Replies sent again and again (DeviceRoutes.ready), encoded but for their Date and
        # request id: id(reply) -> (reply, its parts). The reply is kept to check identity.
        self._wire: dict[int, tuple[Reply, bytes, bytes, bytes]] = {}
        self._wire_bytes = 0  # the bodies of the replies in _wire
        self._heads: dict[bytes, RequestHead] = {}  # head(): whole heads seen, parsed
        self._fields: dict[bytes, Fields] = {}  # head(): their header lines, read (parse_head)
        # The heads of start()'s replies by status, content type, headers and close.
        self._templates: dict[tuple[int, str, tuple[tuple[str, str], ...], bool],
                              HeadTemplate] = {}
        self._reports: DeviceReports | None = None  # the installer's POSTs (take_reports)
        self._post_limits = (0, 0)  # bodies of an event report, of a registration

    def head(self, buf: bytes) -> RequestHead | NotMine | None:
        """:func:`parse_head`, remembered for a buffer that is one whole head: a storm's
        devices send the same bytes (iPXE's ``GET /boot.ipxe`` with its User-Agent and Host),
        and a keep-alive client the same again and again."""
        known = self._heads.get(buf)
        if known is not None:
            return known
        head = parse_head(buf, self._fields)
        if isinstance(head, RequestHead) and head.size == len(buf) <= 1024:
            if len(self._heads) >= 1024:  # bounded: a scan of random URLs only churns it
                self._heads.clear()
            self._heads[buf] = head
        return head

    def forget_heads(self) -> None:
        """The parsed heads remembered by :meth:`head` dropped, once quiet after a storm
        (Service.forget_idle): a storm's first requests are each a head of its own (the
        device's MAC in the URL), and up to 1,024 of them (~0.5 KiB each with their bytes)
        stayed until a scan or the next storm churned them (s35-mem)."""
        self._heads.clear()

    def ready(self, head: RequestHead, *, sendfile: bool = False,
              local: str | None = None) -> Answer | None:
        """The answer of ``head`` when it is in memory (:meth:`DeviceRoutes.ready`): one
        lookup, the Date, a request id and a join (with ``sendfile``, a large file's head
        too, and its file opened); None: :meth:`start` it. ``local``: the address its
        connection reached (DeviceRoutes.front)."""
        if head.close or head.bearer or not head.path.startswith(self.routes.READY_PREFIXES):
            return None
        found = self.routes.ready(head.path, accept_encoding=head.accept_encoding,
                                  large=sendfile, local=local)
        if found is None:
            return None
        started = time.monotonic()
        label, whole = found
        body, reply = (whole, whole.reply) if isinstance(whole, FileBody) else (None, whole)
        wire = self._wire.get(id(reply))
        if wire is None or wire[0] is not reply:
            # Bounded: the replies kept here keep their bodies too (a file's, also once
            # AssetFiles let it go), so old ones go at 256 or 16 MiB.
            self._wire_bytes += len(reply.body)
            if len(self._wire) >= 256 or self._wire_bytes > 16 << 20:
                self._wire.clear()
                self._wire_bytes = len(reply.body)
            before, between, after = reply_parts(
                reply, server=SERVER_NAME, close=False, length=body.size if body else None)
            # The body is not copied into what is kept: the reply holds it already.
            wire = self._wire[id(reply)] = (reply, before, between,
                                            after[:len(after) - len(reply.body)])
        rid = self._request_id(head.request_id)
        data = b"".join((wire[1], self.date(), wire[2], rid.encode("ascii"), wire[3],
                         reply.body))
        seconds = time.monotonic() - started
        self.answered += 1
        if self.observer is not None:
            self.observer.http_request(label, "GET", reply.status, seconds)
        return Answer(data, reply.status, seconds, rid, body)

    def _request_id(self, given: str) -> str:
        """The client's X-Request-Id when it is a sane token (as aiohttp's door takes it),
        else a new one; mostly none is given, and no match is tried (``_REQUEST_ID`` takes
        1-64 characters)."""
        return given if given and _REQUEST_ID.match(given) else self.ids()

    def start(self, head: RequestHead, remote: str | None, *, sendfile: bool = False,
              loop: asyncio.AbstractEventLoop | None = None, local: str | None = None
              ) -> tuple[Callable[[Reply | FileBody | None], Answer | None],
                         asyncio.Future[Reply | FileBody | None]] | None:
        """Begin answering ``head``: how to finish, and the reply as it is decided (done
        already when nothing had to wait); None when aiohttp is to route it. ``sendfile``:
        the connection can send a large file with sendfile(2) (plain TCP). ``loop``: the
        running loop, when the caller holds it (a connection's): CPython 3.11 asks the
        kernel for the process id (getpid(2)) at every asyncio.get_running_loop(), to tell
        a forked child, and a storm's loop made ~4.4 such calls a request (perf trace;
        benchmarks/README.md, s31-front). ``local``: the address the connection reached
        (DeviceRoutes.front)."""
        if head.bearer and (self.plain is None or not self.plain.install_token(head.bearer)):
            return None  # an operator's credential: the plain-HTTP policy's
        route = self.routes.front(head.path, head.query, remote, large=sendfile,
                                  accept_encoding=head.accept_encoding, bearer=head.bearer,
                                  local=local)
        if route is None:
            return None
        label, coro = route
        rid = self._request_id(head.request_id)
        started = time.monotonic()  # after its bytes were read: when it had arrived
        target = _front_target(head)  # for the log context and the access line
        # The request's context (log_context's fields, arrived's time) made for it, the
        # values set in it in place: what entering and leaving both managers around the
        # task's making gave it, at ~6,600 instructions a request, not ~18,200 (callgrind;
        # benchmarks/README.md, s30-front).
        context = contextvars.copy_context()
        context.run(set_log_context, {"request_id": rid, "path": target} if remote is None
                    else {"request_id": rid, "peer": remote, "path": target})
        context.run(set_arrival, started)
        # Answers from memory run at once; a decision runs in a task of its own, as under
        # aiohttp: its store may need one (asyncpg's pool acquires under asyncio.timeout,
        # which refuses to run outside a task), and it costs ~1 ms anyway, next to which a
        # task is little.
        # The task is named when made: unnamed, CPython 3.11 formats a "Task-N" for each.
        decided = (context.run(eager, coro) if label in _FROM_MEMORY
                   else asyncio.Task(coro, loop=loop or asyncio.get_running_loop(),
                                     context=context, name="netboot-front-decision"))

        def finish(reply: Reply | FileBody | None) -> Answer | None:
            if reply is None:
                return None
            body, whole = (reply, reply.reply) if isinstance(reply, FileBody) else (None, reply)
            data = self._encode(whole, head, rid, body)
            # As aiohttp's request_middleware, the time to decide: a file's sending after.
            seconds = time.monotonic() - started
            self.answered += 1
            if self.observer is not None:
                self.observer.http_request(label, "GET", whole.status, seconds)
            # Made by tuple.__new__, not through the named tuple's Python __new__ (a call:
            # ~1,500 loop instructions a request, s33-loop): every field given, in order.
            return tuple.__new__(Answer, (data, whole.status, seconds, rid, body, target))

        return finish, decided

    def _encode(self, whole: Reply, head: RequestHead, rid: str,
                body: FileBody | None = None) -> bytes:
        """``whole``'s head (from a template kept per kind of reply) and, without a file
        ``body`` to follow, its body."""
        key = (whole.status, whole.content_type, whole.headers, head.close)
        template = self._templates.get(key)
        if template is None:
            template = head_template(whole.status, whole.content_type, whole.headers,
                                     server=SERVER_NAME, close=head.close)
            if len(self._templates) >= 256:  # bounded: few kinds of reply, in practice
                self._templates.clear()
            self._templates[key] = template
        return fill(template, length=body.size if body else len(whole.body),
                    date=self.date(), request_id=rid, body=whole.body)

    def failed(self, exc: Exception, head: RequestHead, remote: str | None) -> Reply:
        return error_reply(exc, self.log, head.method, _front_target(head), remote)

    def take_reports(self, reports: DeviceReports, *, max_body: int, max_event: int) -> None:
        """Answer the installer's POSTs too (event reports, registration): bodies up to the
        limit aiohttp's path enforces (``http.max_event_bytes``, within
        ``http.max_body_bytes``); a larger one goes to aiohttp, which answers 413. A
        registration's too: anyone may post one, and 1 MiB of JSON was parsed before any
        token was looked at (s38-attack)."""
        self._reports = reports
        limit = min(max_body, max_event)
        self._post_limits = (limit, limit)

    def post_head(self, buf: bytes) -> RequestHead | NotMine | None:
        """:func:`parse_post` of ``buf``, whose head :meth:`head` found whole and aiohttp's:
        an installer's POST with its whole body, None while its body is to come, or
        aiohttp's after all."""
        if self._reports is None:
            return NotMine(None)
        return parse_post(buf, max(self._post_limits))

    def start_post(self, head: RequestHead, remote: str | None, *,
                   loop: asyncio.AbstractEventLoop | None = None
                   ) -> tuple[Callable[[Reply | FileBody | None], Answer | None],
                              asyncio.Future[Reply | FileBody | None]] | None:
        """:meth:`start` for an installer's POST (:meth:`post_head`)."""
        reports = self._reports
        if reports is None or (head.bearer and (self.plain is None
                                                or not self.plain.install_token(head.bearer))):
            return None  # an operator's credential: the plain-HTTP policy's
        register = head.path == "/api/v1/register"
        if len(head.body) > self._post_limits[register]:
            return None
        label = "/api/v1/register" if register else "/api/v1/machines/{ref}/events"
        ref = None if register else head.path.split("/")[4]
        rid = self._request_id(head.request_id)
        started = time.monotonic()
        target = _front_target(head)

        def translate(exc: Exception) -> Reply:
            return error_reply(exc, self.log, "POST", target, remote)

        # Its context made for it, as start() makes a decision's (log_context's fields set
        # in a copy, not entered and left around the task's making), with when it arrived:
        # the reports and registrations read in one loop iteration share one probe of the
        # change feed, as the GETs do (netboot.arrival). Each probed anew, a SQLite call on
        # the loop per POST, ~3 % of the loop in a storm's tail (benchmarks/README.md,
        # s42-tail; s43-again).
        context = contextvars.copy_context()
        context.run(set_log_context, {"request_id": rid, "path": target} if remote is None
                    else {"request_id": rid, "peer": remote, "path": target})
        context.run(set_arrival, started)
        decided: asyncio.Future[Reply | FileBody | None] = asyncio.Task(
            reports.front_post(label, ref, head.bearer or None, head.body, remote, translate),
            loop=loop or asyncio.get_running_loop(), context=context,
            name="netboot-front-post")

        def finish(reply: Reply | FileBody | None) -> Answer | None:
            if not isinstance(reply, Reply):
                return None
            data = self._encode(reply, head, rid)
            seconds = time.monotonic() - started
            self.answered += 1
            if self.observer is not None:
                self.observer.http_request(label, "POST", reply.status, seconds)
            return Answer(data, reply.status, seconds, rid)

        return finish, decided


# Front-door routes whose answer never reaches the inventory: run eagerly (netboot.eager).
_FROM_MEMORY = frozenset({"/boot.ipxe", "/healthz", "/assets/{path}"})
# A query of "key=value" parts, none empty, whose escapes are ASCII (iPXE's, with its %20s:
# "manufacturer=Dell%20Inc."): parse_qsl's pairs joined back with "&" and "=", as
# redacted_target joins them, are the query itself with "+" as a space, unquoted whole ("&"
# and "=" are never a decoded byte's, and an ASCII escape decodes to one character alone).
# parse_qsl's pairs were half of the front door's own work per request of a real iPXE.
_KEY = r"[!$'()*+,\-./0-9:;?@A-Z_a-z~]*+(?:%[0-7][0-9A-Fa-f][!$'()*+,\-./0-9:;?@A-Z_a-z~]*+)*+"
_VALUE = _KEY.replace(":;", ":;=")
_PLAIN_QUERY = re.compile(rf"{_KEY}={_VALUE}(?:&{_KEY}={_VALUE})*+")


def _front_target(head: RequestHead) -> str:
    """:func:`redacted_target` of a head, without parse_qsl where the query needs none."""
    query = head.query
    if not query:
        return escape(head.path, limit=1024)
    if "token" in query.lower():
        # Its pair is redacted whichever way (below: "token" is in the decoded text too, no
        # escape taking a letter of it), and an installer's config fetch has one: the
        # expression's match over its token was ~2,500 of its loop instructions (s33-loop).
        if (query.startswith("token=") and "&" not in query and "%" not in query
                and "+" not in query and not head.path.startswith("/nocloud/")):
            # The one pair an installer's config fetch sends, nothing to decode: its text
            # as redacted_target writes it, which escape() leaves as it is below 1,024
            # characters (the visible ASCII of parse_head's request line, as below),
            # without the pairs' list, its generator and the two calls (~150 of a first
            # config's ~5,200 loop bytecodes; s34-loop).
            target = f"{head.path}?token=<redacted>"
            if len(target) <= 1024:
                return target
        return redacted_target(head.path, query_pairs(query))
    if _PLAIN_QUERY.fullmatch(query) and not head.path.startswith("/nocloud/"):
        text = query.replace("+", " ")
        decoded = "%" in text
        if decoded:  # each one two hex digits of an ASCII character (_PLAIN_QUERY)
            first, *rest = text.split("%")
            text = first + "".join([chr(int(part[:2], 16)) + part[2:] for part in rest])
        if "token" not in text.lower():  # a token's pair is redacted: redacted_target's
            if not decoded and len(head.path) + len(text) < 1024:
                # Nothing decoded: parse_head's request line is visible ASCII without a
                # backslash, which escape() leaves as it is below 1,024 characters (its
                # call and its text were ~2,000 of this function's ~11,500 instructions:
                # callgrind, benchmarks/README.md s30-front).
                return f"{head.path}?{text}"
            return escape(f"{head.path}?{text}", limit=1024)
    return redacted_target(head.path, query_pairs(query))


# How long the front waits for the body of an installer's POST whose head it read: its
# client sends both at once (aiohttp's and curl's clients, in one write for a small body);
# a body later than this is aiohttp's, whose http.body_timeout then bounds it.
_BODY_GRACE = 0.5
# The head deadlines' sweep's tick (ConnectionGuard._sweep_heads): a head deadline is met
# at most this late; coarse, as nginx's timers (ngx_timer_resolution) may be.
HEAD_TICK = 1.0


class Answer(NamedTuple):
    """A front-door response, encoded, with what its access log line says (a tuple: one is
    made per request)."""

    data: bytes
    status: int
    seconds: float
    request_id: str
    file: FileBody | None = None  # sent after ``data`` with sendfile(2)
    target: str = ""  # _front_target of the request, when it was made already


# --- connection limits ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on connections, with nginx's defaults as the bar (seconds, counts).

    nginx: client_header_timeout 60s, client_body_timeout 60s, keepalive_timeout 75s,
    send_timeout 60s, worker_connections 512-1024. aiohttp alone keeps an idle connection for
    an hour and accepts until the process runs out of file descriptors.
    """

    max_connections: int = 1024
    max_connections_per_source: int = 128
    header_timeout: float = 60.0  # connect → complete request head
    body_timeout: float = 60.0  # request head → complete body
    keepalive_timeout: float = 75.0  # idle between requests on one connection
    send_timeout: float = 60.0  # sent data unacknowledged by the client (TCP_USER_TIMEOUT)


# Written to a connection over the cap before it is closed: a client sees why, and no request
# is read from it.
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nServer: " + SERVER_NAME.encode()
         + b"\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n")


class ConnectionGuard:
    """Counts open connections overall and per source address and keeps both under their caps.

    At the overall cap the connection idle longest (connected or kept alive, with no byte of
    a request read and none being answered) is closed to make room, as nginx reuses
    keep-alive connections when worker_connections run out (ngx_drain_connections takes the
    least recently used of its reusable queue): a flood of idle connections then churns
    through the cap while real requests are served, and a device's pooled connection closed
    before its next request is reopened by the device (iPXE's http_reopen). Past the
    per-source cap, or when every connection is busy, the new connection gets a 503 and is
    closed at once, so its descriptor comes back right away and a flood costs a counter bump
    per attempt, not a handler task. Refusals are logged once per window (rate-limited),
    never once per connection.
    """

    def __init__(self, limits: HttpLimits, logger: logging.Logger, *,
                 senders: SendThreads | None = None) -> None:
        self.limits = limits
        self.log = logger
        # The threads that send large files' bodies off the loop's thread (http.send_threads;
        # None: every body is sent on the loop's thread).
        self.senders = senders
        self.limited = RateLimitedLog(logger, burst=1)
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self._per_source: Counter[str] = Counter()
        # In the order they were last active (admitted, a request read, an answer sent):
        # the first idle one is the one idle longest.
        self._open: dict[GuardedHandler, str] = {}
        # Connections whose first request head is still to come, in the order they came,
        # with when it is due (header_timeout after): one sweep for them all, not a timer
        # a connection (a uvloop TimerHandle, its uv timer and a bound method each: s35-mem
        # counted two timers a connection at a storm's end). The sweep runs at the first
        # deadline and then at most every HEAD_TICK while any is due, so a head's deadline
        # is met between header_timeout and header_timeout + HEAD_TICK.
        self._heads_due: dict[GuardedHandler, float] = {}
        self._head_sweep: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None
        # The connections the front door answers are closed once idle keepalive_timeout by
        # one sweep, every HEAD_TICK while any is open (_sweep_idle), not by aiohttp's timer
        # a connection (a TimerHandle, its uv timer and a bound method: ~0.56 KB each, 0.55
        # MiB of a 1,000-device storm's connections at its last moment; s38-mem, s39-storm).
        self._idle_sweep: asyncio.TimerHandle | None = None
        self._idle_loop: asyncio.AbstractEventLoop | None = None

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, handler: GuardedHandler, source: str) -> bool:
        lim = self.limits
        if self._per_source[source] >= lim.max_connections_per_source:
            self.refused += 1
            self.limited.log(logging.WARNING, source,
                             "http: %s has %d connections open "
                             "(http.max_connections_per_source), refusing new ones",
                             source, self._per_source[source])
            return False
        if len(self._open) >= lim.max_connections:
            idle = self._reusable()
            if idle is None:
                self.refused += 1
                self.limited.log(logging.WARNING, "http-busy",
                                 "http: %d connections open and busy (http.max_connections), "
                                 "refusing new ones (%d refused so far)", len(self._open),
                                 self.refused)
                return False
            self.evicted += 1
            self.limited.log(logging.WARNING, "http-full",
                             "http: %d connections open (http.max_connections), closing the "
                             "longest idle to make room (%d so far)", len(self._open),
                             self.evicted)
            self.release(idle)
            idle.force_close()
        self._open[handler] = source
        self._per_source[source] += 1
        return True

    def await_head(self, handler: GuardedHandler, loop: asyncio.AbstractEventLoop) -> None:
        """``handler``'s connection came: its first request head is due header_timeout from
        now (:meth:`_sweep_heads` closes it then if none came)."""
        now = loop.time()
        self._heads_due[handler] = now + self.limits.header_timeout
        if self._head_sweep is None or self._sweep_loop is not loop:  # (a service restarted)
            self._sweep_loop = loop
            self._head_sweep = loop.call_later(self.limits.header_timeout, self._sweep_heads)

    def keep_alive(self, handler: GuardedHandler, loop: asyncio.AbstractEventLoop) -> None:
        """``handler``'s connection has no keep-alive timer of aiohttp's: :meth:`_sweep_idle`
        closes it once idle past its ``_next_keepalive_close_time``."""
        if self._idle_sweep is None or self._idle_loop is not loop:  # (a service restarted)
            self._idle_loop = loop
            self._idle_sweep = loop.call_later(HEAD_TICK, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._idle_sweep = None
        loop = self._idle_loop
        if loop is None or not self._open:
            return  # armed again by the next connection (keep_alive)
        now = loop.time()
        due = []
        # In the order they were last active: a front answer moves both that order and the
        # close time (GuardedHandler._front_sent), so the first not due ends the look. One
        # with aiohttp's own timer (handed a request: aiohttp arms it after its answers) is
        # aiohttp's to close.
        for handler in self._open:
            if handler.keepalive_timed:
                continue
            if handler.idle_close_at > now:
                break
            due.append(handler)
        for handler in due:
            handler.idle_due()
        self._idle_sweep = loop.call_later(HEAD_TICK, self._sweep_idle)

    def head_met(self, handler: GuardedHandler) -> None:
        """``handler`` has no head deadline any more (a whole POST head read, or closed)."""
        self._heads_due.pop(handler, None)

    def _sweep_heads(self) -> None:
        self._head_sweep = None
        loop = self._sweep_loop
        if loop is None:
            return
        now = loop.time()
        due = self._heads_due
        while due:  # in the order they came: the first not due ends the sweep
            handler = next(iter(due))
            if due[handler] > now:
                self._head_sweep = loop.call_later(max(due[handler] - now, HEAD_TICK),
                                                   self._sweep_heads)
                return
            del due[handler]
            handler.head_deadline()

    def _reusable(self) -> GuardedHandler | None:
        """The connection to close for a new one: idle longest, kept alive after an answer
        before one that has not asked yet (a new connection's request may be on its way), and
        none whose request has come to its socket unread (accepted in a burst, not read yet:
        closing it would drop a request the client sent on a connection it just opened)."""
        fresh = None
        for handler in self._open:
            if handler.idle and not handler.unread():
                if handler.answered:
                    return handler
                if fresh is None:
                    fresh = handler
        return fresh

    def touch(self, handler: GuardedHandler) -> None:
        """``handler`` was active just now: last in the order idle connections are closed."""
        source = self._open.pop(handler, None)
        if source is not None:
            self._open[handler] = source

    def release(self, handler: GuardedHandler) -> None:
        self._heads_due.pop(handler, None)
        source = self._open.pop(handler, None)
        if source is None:
            return
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]


class GuardedHandler(_HandlerBase):
    """aiohttp's connection handler with netboot's bounds: the connection cap, a deadline for
    the first request head, a kernel send timeout, and one quiet line for a malformed request
    instead of aiohttp's ERROR traceback per request. (Made with aiohttp's RequestHandler
    under it by netboot.servers.aio's ``AiohttpHandler``: this module imports no aiohttp.)"""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard,
                 loop: asyncio.AbstractEventLoop, front: FrontDoor | None = None,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, keepalive_timeout=guard.limits.keepalive_timeout,
                         **kwargs)
        self._guard = guard
        self._source: str | None = None
        self._fd = -1  # the connection's socket, for unread()
        # The front door (FrontDoor): bytes read and neither answered nor handed to aiohttp
        # yet, whether an answer is being decided, whether the rest of the connection is
        # aiohttp's (after a request with a body), and whether reading was paused here.
        self._front = front
        self._unread = b""
        self._front_busy = False
        self._front_off = front is None
        self._front_paused = False
        self._handed = False  # aiohttp was given a request on this connection
        self._peer: str | Literal[False] | None = False  # _remote(), False: not asked yet
        self._local: str | None = None  # the address the client reached (connection_made)
        self._plain_tcp = False  # a TCP socket without TLS: sendfile(2) may write to it
        self._sock: Any = None  # its socket object (asyncio's or uvloop's), when plain TCP
        self._own: socket.socket | None = None  # _own_socket(), when a file was sent
        self._own_fd = -1  # its descriptor
        # The front's file being sent, if any: on the loop's thread, or a send thread's.
        self._sending: FileSender | Transfer | None = None
        self._sending_since: float | None = None  # when it began to wait for the socket
        # Answers encoded and not written yet: the requests a client pipelined, read
        # together, leave together in one write (_front_flush).
        self._out: list[tuple[RequestHead, Answer]] = []
        self._body_timer: asyncio.TimerHandle | None = None  # a POST's body awaited
        if front is not None:
            # aiohttp's queue of parsed requests, unused by a connection the front door
            # answers: an empty deque holds a 528-byte block of glibc's (~750 bytes a
            # connection, 0.7 MiB of a 1,000-device storm's open connections, tracemalloc,
            # benchmarks/README.md s38-mem). An empty tuple reads the same to aiohttp (empty,
            # false) until it is given a request (_to_aiohttp), which makes the deque; an
            # append before that fails loudly, and no queue is ever shared.
            self._messages = cast(Any, ())
            # aiohttp's request parser (~1 KB with its C state) and its handler task (the
            # task, its coroutine and the future it waits on: ~0.95 KB), unused too: made at
            # the first request handed over (_to_aiohttp: AiohttpHandler._begin_aiohttp),
            # never for a connection the front door answers whole (~1.9 MiB of a
            # 1,000-device storm's open connections at its last moment; s40-mem, s41-mem).
            self._parser = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "-"
        if not self._guard.admit(self, source):
            # aiohttp never sees this connection: no handler task, no parser state.
            # (uvloop's transports are not asyncio.WriteTransport's subclasses.)
            cast(asyncio.WriteTransport, transport).write(_BUSY)
            transport.close()
            return
        self._source = source
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            # The kernel drops the connection when sent data stays unacknowledged this long,
            # including a client that stopped reading (zero window): nginx's send_timeout,
            # without a timer per write.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(self._guard.limits.send_timeout * 1000))
        self._fd = sock.fileno() if sock is not None else -1
        self._plain_tcp = sock is not None and transport.get_extra_info("sslcontext") is None
        self._sock = sock if self._plain_tcp else None  # uvloop makes a new one each time
        # Asked once a connection: a device's URLs name it where the base URL is a loopback
        # one (Content.at).
        if self._front is None:
            super().connection_made(transport)
        else:
            self._local = self._front.routes.local_of(transport)
            # aiohttp's connection_made without its handler task and keep-alive timer: the
            # task is made at the first request handed to aiohttp, and the guard's sweep
            # closes the connection once idle (keep_alive); aiohttp arms its own timer
            # after answering a request it is handed.
            self._attach(transport)
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            self._guard.keep_alive(self, self._loop)
        self._guard.await_head(self, self._loop)

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        """aiohttp's ``connection_made`` but its keep-alive timer and handler task
        (AiohttpHandler's: this module imports no aiohttp)."""
        raise NotImplementedError

    def _begin_aiohttp(self) -> None:
        """aiohttp's request parser and handler task, made for the first request handed
        to aiohttp (AiohttpHandler's)."""
        raise NotImplementedError

    def head_deadline(self) -> None:
        """header_timeout is over (ConnectionGuard._sweep_heads)."""
        # aiohttp counts parsed request heads; none yet means a slow or silent client
        # (slowloris). Later requests are bounded by keepalive_timeout, which aiohttp
        # re-arms after each response.
        if getattr(self, "_request_count", 1) == 0 and self.transport is not None:
            self._guard.timed_out += 1
            self._guard.limited.log(logging.INFO, self._source or "-",
                                    "http: %s sent no complete request in %.0f s "
                                    "(http.header_timeout), closed", self._source,
                                    self._guard.limits.header_timeout)
            self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._front_off:
            self._guard.touch(self)
            super().data_received(data)
            return
        # Not touched here for the front (ConnectionGuard.touch): a connection with bytes
        # unanswered is not idle, and each of its requests touches it when it is answered
        # (_front_sent) or handed to aiohttp (_to_aiohttp), the last activity the order of
        # idle connections counts: one dict move a request, not two.
        self._unread += data
        self._serve_front()

    def _aiohttp_idle(self) -> bool:
        """aiohttp waits for a request on this connection, none queued or being handled
        (or it was never given one: its task may not have run yet on a new connection)."""
        if self._messages:
            return False
        waiter = self._waiter
        return not self._handed if waiter is None else not waiter.done()

    def _to_aiohttp(self, size: int | None) -> None:
        """Hand the next ``size`` bytes (a whole request), or all of them, to aiohttp."""
        self._front_flush()  # the front's answers before aiohttp's
        self._guard.touch(self)
        if size is None:
            self._front_off = True
            data, self._unread = self._unread, b""
        else:
            data, self._unread = self._unread[:size], self._unread[size:]
        if not self._handed:
            self._messages = deque()  # (its empty tuple until now: __init__)
            self._begin_aiohttp()
        self._handed = True
        super().data_received(data)

    def _serve_front(self) -> None:
        """Answer or hand on, in order, each complete request read: the front answers only
        while aiohttp is idle, and aiohttp is given a request only while no front answer is
        being decided, so responses leave in the order the requests came (pipelining)."""
        front = self._front
        assert front is not None
        while (self._unread and not self._front_busy and not self._front_off
               and self.transport is not None and not self._paused):
            head = front.head(self._unread)
            if head is None:
                break  # the rest of a head is still to come
            if isinstance(head, NotMine) and head.size is None:
                head = self._post_head()
                if head is None:
                    break  # its body is still to come
            if isinstance(head, NotMine):
                self._to_aiohttp(head.size)
                continue
            if head.method == "POST":
                if not self._aiohttp_idle() or not self._serve_post(head):
                    self._to_aiohttp(head.size)
                continue
            if not self._aiohttp_idle():
                self._to_aiohttp(head.size)  # behind the request aiohttp is answering
                continue
            # Only a path ready() may answer asks it (READY_PREFIXES: not an /ipxe or a
            # /config, whose call found None at ~1,000 loop instructions; s34-loop).
            ready = (front.ready(head, sendfile=self._plain_tcp, local=self._local)
                     if head.path.startswith(front.routes.READY_PREFIXES) else None)
            if ready is not None:
                self._request_count += 1
                self._unread = self._unread[head.size:]
                self._front_send(head, ready)
                continue
            peer = self._peer  # _remote()'s, asked once a connection: no call for it
            started = front.start(head, self._remote() if peer is False else peer,
                                  sendfile=self._plain_tcp, loop=self._loop, local=self._local)
            if started is None:
                self._to_aiohttp(head.size)
                continue
            self._request_count += 1  # a request head came: the head deadline is met
            finish, decided = started
            if decided.done():
                self._front_answer(head, finish, decided)
                continue
            self._front_busy = True
            decided.add_done_callback(functools.partial(self._front_later, head, finish))
            break
        if self._out:  # (a decision under way has none: no call to find that out)
            self._front_flush()
        if self._front_paused or len(self._unread) > 4 * MAX_HEAD:
            self._front_flow()

    def _post_head(self) -> RequestHead | NotMine | None:
        """An installer's POST whole in what was read (FrontDoor.post_head); while its body
        is to come, a grace timer hands the connection to aiohttp should it not come soon
        (aiohttp's ``http.body_timeout`` then bounds a body sent slowly)."""
        front = self._front
        assert front is not None
        post = front.post_head(self._unread)
        if post is None:
            # The head is whole: its deadline is met, as aiohttp would count it; the body's
            # is aiohttp's once the grace is over.
            self._guard.head_met(self)
            if self._body_timer is None:
                self._body_timer = self._loop.call_later(_BODY_GRACE, self._body_late)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        return post

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport is not None and not self._front_busy and not self._front_off \
                and self._unread:
            self._to_aiohttp(None)

    def _serve_post(self, head: RequestHead) -> bool:
        """Answer an installer's POST here (FrontDoor.start_post); False: aiohttp's."""
        front = self._front
        assert front is not None
        started = front.start_post(head, self._remote(), loop=self._loop)
        if started is None:
            return False
        self._request_count += 1
        finish, decided = started
        self._front_busy = True
        decided.add_done_callback(functools.partial(self._front_later, head, finish))
        return True

    def _front_later(self, head: RequestHead,
                     finish: Callable[[Reply | FileBody | None], Answer | None],
                     decided: asyncio.Future[Reply | FileBody | None]) -> None:
        self._front_busy = False
        if decided.cancelled():
            return  # the server is stopping
        self._front_answer(head, finish, decided)
        # What was read meanwhile (pipelined), or reading to resume: a client that waits
        # for its answer has sent nothing more, and its answer is written already.
        if self.transport is not None and (self._unread or self._front_paused):
            self._serve_front()

    def _front_answer(self, head: RequestHead,
                      finish: Callable[[Reply | FileBody | None], Answer | None],
                      decided: asyncio.Future[Reply | FileBody | None]) -> None:
        front = self._front
        assert front is not None
        try:
            reply: Reply | FileBody | None = decided.result()
        except Exception as exc:  # the one translation both doors use
            reply = front.failed(exc, head, self._remote())
        answer = finish(reply)
        if answer is None:  # not the front's after all (a compressed sibling may apply)
            self._to_aiohttp(head.size)
            return
        self._unread = self._unread[head.size:]
        self._front_send(head, answer)

    def _front_send(self, head: RequestHead, answer: Answer) -> None:
        transport = self.transport
        body = answer.file
        if transport is None:  # the client left meanwhile
            if body is not None:
                body.close()
            return
        if body is None:
            if not self._out and (not self._unread or head.close):
                # Alone (nothing kept before it, nothing pipelined after it): what
                # _front_flush does for one answer, without keeping it first (~1,500 loop
                # instructions a first install; s34-loop).
                transport.write(answer.data)
                self._front_sent(head, answer, len(answer.data), answer.seconds)
                return
            self._out.append((head, answer))
            if not self._unread or head.close:
                self._front_flush()
            # else: more of the client's bytes are read already (pipelined requests):
            # this answer leaves with theirs, in one write (at the latest when
            # _serve_front stops or hands a request to aiohttp).
            return
        self._front_flush()  # the answers before this file first
        own = self._own_socket()
        if own is None:  # no descriptor left for its duplicate: the head, then the end
            transport.write(answer.data)
            self._file_sent(head, answer, body, 0, 0.0)
            return
        # The head goes with MSG_MORE and leaves with the file's first bytes (FileSender):
        # a head in a packet of its own cost the sender and the client ~17 % of a 1 MiB
        # answer's CPU. Written past the transport, which buffers nothing then (else it
        # goes behind what the transport buffers, and the file after).
        buffered = transport.get_write_buffer_size()
        data = answer.data
        sent = 0
        if buffered:
            transport.write(data)
            data = b""
        else:
            # What the socket takes at once, here: a 1 MiB file usually goes whole in this
            # one sendfile(2), and then no FileSender is made (a sixth of the Python work
            # of such an answer); a FileSender sends the rest when the socket has room.
            try:
                n = own.send(data, socket.MSG_MORE)
                data = data[n:]
                if not data and self._hand_over(head, answer, body):
                    return
                if not data:
                    sent = os.sendfile(self._own_fd, body.fd, 0, body.size)
                    if sent == body.size or not sent:  # whole, or the file shrank to 0
                        self._file_sent(head, answer, body, sent, 0.0)
                        return
            except BlockingIOError:
                pass  # the socket is full: on when it has room
            except OSError:  # the client left, or the socket was closed
                self._file_sent(head, answer, body, sent, 0.0)
                return
        sender = FileSender(self._loop, own, body.fd, sent, body.size - sent,
                            functools.partial(self._file_done, head, answer, body, sent),
                            head=data,
                            pending=transport.get_write_buffer_size if buffered else None)
        # Nothing more is answered or handed on until the file is out (pipelining).
        self._front_busy = True
        self._sending = sender
        self._sending_since = None
        if buffered:
            sender.start()  # done at once (_serve_front goes on), or:
        else:
            sender.wait()  # the socket is full
        if self._sending is sender:  # the rest when the socket takes it
            self._sending_since = self._loop.time()

    def _hand_over(self, head: RequestHead, answer: Answer, body: FileBody) -> bool:
        """A large body to a send thread (netboot.servers.sendthreads), its head written
        already (with MSG_MORE: it leaves with the body's first bytes); False: the loop's
        thread is to send it (no threads, a body below their minimum, no descriptor left).
        The kernel's copy of a 1 MiB body is most of its cost (s47-bigfile): on a thread,
        it runs on another CPU while the loop answers other requests."""
        senders = self._guard.senders
        if senders is None or body.size < senders.min_size:
            return False
        transfer = senders.send(self._loop, self._own_fd, body.fd, 0, body.size,
                                functools.partial(self._file_done, head, answer, body, 0))
        if transfer is None:
            return False
        # Nothing more is answered or handed on until the file is out (pipelining).
        self._front_busy = True
        self._sending = transfer
        self._sending_since = self._loop.time()
        return True

    @property
    def send_threads(self) -> SendThreads | None:
        """The threads large bodies go to (CountingFileResponse's sendfile asks)."""
        return self._guard.senders if self._plain_tcp else None

    def _file_done(self, head: RequestHead, answer: Answer, body: FileBody, before: int,
                   sent: int, failed: bool) -> None:
        """``before``: the bytes of the file sent before its FileSender began."""
        since = self._sending_since
        self._sending = self._sending_since = None
        self._front_busy = False
        # As aiohttp's log, the time to decide and to send: what the file waited for.
        self._file_sent(head, answer, body, before + sent,
                        0.0 if since is None else self._loop.time() - since)
        if since is not None and self.transport is not None and self._unread:
            self._serve_front()  # what was pipelined behind the file

    def _front_flush(self) -> None:
        """Write the answers kept by _front_send, in one write, then what follows each."""
        out = self._out
        if not out:
            return
        self._out = []
        transport = self.transport
        if transport is None:
            return  # the client left: nothing is sent or logged, as for a lone answer
        transport.write(out[0][1].data if len(out) == 1
                        else b"".join([answer.data for _, answer in out]))
        for head, answer in out:
            self._front_sent(head, answer, len(answer.data), answer.seconds)

    def _file_sent(self, head: RequestHead, answer: Answer, body: FileBody, sent: int,
                   seconds: float) -> None:
        if sent < body.size and self.transport is not None:
            # Fewer bytes than Content-Length said (the file shrank, the client left): the
            # connection cannot carry another response.
            self.force_close()
            if os.fstat(body.fd).st_size < body.size:  # shrank, not the client gone
                self.file_shrank(head.path, sent, body.size)
        body.close()
        self._front_sent(head, answer, len(answer.data) + sent, answer.seconds + seconds)

    def _own_socket(self) -> socket.socket | None:
        """A duplicate of the connection's socket, made at its first large file and closed
        with it: sendfile(2) and a writer can use it where the loop refuses a descriptor
        its transport owns, and its options cost one system call (uvloop's socket object
        makes a new socket for each)."""
        if self._own is None and self._sock is not None:
            with contextlib.suppress(OSError):
                self._own = socket.socket(fileno=os.dup(self._sock.fileno()))
                self._own_fd = self._own.fileno()
        return self._own

    def _front_sent(self, head: RequestHead, answer: Answer, sent: int, seconds: float
                    ) -> None:
        """What follows a front answer: its access log line, keep-alive, close."""
        # object: aiohttp types it as its abstract logger, which this module's AccessLogger
        # is only as netboot.servers.aio's AiohttpAccessLogger (a local's annotation costs
        # nothing at run time).
        logger: object = self.access_logger
        if self._logging_enabled and isinstance(logger, AccessLogger):
            logger.line(self._remote(), head.method, answer.target or _front_target(head),
                        answer.status, sent, seconds, head.user_agent or None,
                        answer.request_id)
        self._guard.touch(self)
        # aiohttp closes a connection idle this long after its own last response: move
        # that to after this one (its timer re-arms itself at this time).
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        if head.close:
            self.force_close()

    def _process_keepalive(self) -> None:
        # aiohttp's idle timer sees its own handler idle while the front sends a file or
        # waits for a decision: not idle, whatever the time (a slow client of a 32 MiB
        # initrd is bounded by TCP_USER_TIMEOUT, as nginx's send_timeout bounds it).
        if self._front_busy and self.transport is not None:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
            self._guard.touch(self)  # (the sweep's order: see ConnectionGuard._sweep_idle)
        if not self._handed and self._front is not None:
            # No handler task of aiohttp's to find it idle (made at the first hand-over), nor
            # its timer: the guard's sweep asks once due (idle_due) and looks again later.
            if self.transport is not None \
                    and self._loop.time() >= self._next_keepalive_close_time:
                self.force_close()
            return
        super()._process_keepalive()

    @property
    def keepalive_timed(self) -> bool:
        """aiohttp's keep-alive timer is armed for this connection (ConnectionGuard._sweep_idle
        leaves it to that)."""
        return self._keepalive_handle is not None

    @property
    def idle_close_at(self) -> float:
        """When the connection is to close if idle until then (the loop's clock)."""
        return self._next_keepalive_close_time

    def idle_due(self) -> None:
        """Its idle time is up (ConnectionGuard._sweep_idle): closed if idle, as aiohttp's
        timer closes it, else its time is moved on."""
        if self.transport is not None:
            self._process_keepalive()

    def _front_flow(self) -> None:
        """Stop reading while unanswered bytes pile up (a client pipelining faster than it
        reads its answers, or a slow answer); read again once they are answered."""
        transport = self.transport
        if transport is None:
            return
        piled = len(self._unread) > 4 * MAX_HEAD
        if piled and not self._front_paused:
            self._front_paused = True
            transport.pause_reading()
        elif not piled and self._front_paused:
            self._front_paused = False
            if not self._buffer_paused:
                transport.resume_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self._front_off and self._unread:
            self._serve_front()

    def file_shrank(self, path: str, there: int, needed: int) -> None:
        """Tell that the file at ``path`` was cut short while sent (its connection is closed:
        the answer cannot be as long as it said), as nginx's "file was truncated" alert;
        once a minute a path (every reader of a kernel copied over is cut at once).
        ``there``: the bytes of the file found; ``needed``: what the answer needed."""
        self._guard.limited.log(
            logging.WARNING, f"shrank {path}",
            "http: %s shrank while it was sent to %s: %d bytes of the %d its answer needed "
            "were there, the connection closed. A file copied over in place (cp) is cut "
            "short for whoever reads it: copy to a new name in the same directory and rename "
            "it over the old (mv)", path, self._remote() or "-", there, needed)

    def _remote(self) -> str | None:
        if self._peer is False:  # asked once a connection, not once a request
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        return self._peer

    def connection_lost(self, exc: BaseException | None) -> None:
        self._unread = b""
        self._out = []
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        own, self._own = self._own, None
        sending, self._sending = self._sending, None
        if sending is not None:  # logged as aiohttp logs a client gone mid-response
            sending.stop()
        if own is not None:
            own.close()  # the last descriptor of the socket: the connection ends
        if self._source is None:
            return  # refused in connection_made: nothing of aiohttp's to tear down
        self._guard.release(self)
        self._source = None
        super().connection_lost(exc)

    @property
    def idle(self) -> bool:
        """Waiting for a request (a fresh or kept-alive connection), none being handled and
        no byte of the next one read (the front's part of a head: closing then would cut a
        request the client has begun to send, which it may not retry)."""
        if not self._handed and self._front is not None:
            return not self._front_busy and not self._unread  # aiohttp has no task here
        waiter = getattr(self, "_waiter", None)
        return (waiter is not None and not waiter.done() and not self._front_busy
                and not self._unread)

    @property
    def answered(self) -> bool:
        """A request came on this connection (it is kept alive, or being answered)."""
        return getattr(self, "_request_count", 0) > 0

    def unread(self) -> bool:
        """Bytes wait in the socket's receive queue, not read by the loop yet (FIONREAD)."""
        if self._fd < 0:
            return False
        queued = array.array("i", [0])
        try:
            fcntl.ioctl(self._fd, termios.FIONREAD, queued)
        except OSError:
            return False
        return queued[0] > 0

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            resp = super().handle_error(request, status, exc, message)  # a bug: traceback
            resp.headers["Server"] = SERVER_NAME
            return resp
        # A malformed request is the peer's doing: one info line, rate-limited per peer.
        self._guard.limited.log(logging.INFO, request.remote or "-",
                                "http: bad request from %s: %s", request.remote,
                                escape(str(getattr(exc, "message", None) or exc or message)))
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send an error")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        from aiohttp import web

        resp = web.Response(status=status, text=f"{status} {phrase}\n",
                            headers={"Server": SERVER_NAME})
        resp.force_close()
        return resp




# --- listening before aiohttp is imported ---------------------------------------------------


class Doorway:
    """The protocol factory of both HTTP listeners, from the moment they are bound.

    ``netboot serve`` binds its listeners, then imports aiohttp (a third of its start-up,
    benchmarks/README.md). Until :meth:`open` is given aiohttp's handler factory, every
    connection is an :class:`EarlyConnection`: the front door answers what it answers (device
    GETs, ``/healthz``), and a request only aiohttp answers waits on its connection, reading
    paused, until the connection is handed to aiohttp with the bytes read — never refused,
    never lost. From :meth:`open` on, every new connection is aiohttp's handler directly and
    every early one is handed over (one still deciding an answer, once it is sent).
    """

    def __init__(self, front: FrontDoor, access: AccessLogger | None = None) -> None:
        self.front = front
        self.access = access
        self.handler: Callable[[], asyncio.Protocol] | None = None
        self.early: set[EarlyConnection] = set()
        self.held = 0  # requests that waited for aiohttp (handed over with their connection)

    def __call__(self) -> asyncio.Protocol:
        if self.handler is not None:
            return self.handler()
        return EarlyConnection(self)

    def open(self, handler: Callable[[], asyncio.Protocol]) -> None:
        """aiohttp is ready: ``handler`` makes the protocol of each connection from now on."""
        self.handler = handler
        for conn in list(self.early):
            conn.serve()  # hands itself over unless an answer is being decided


class EarlyConnection(asyncio.Protocol):
    """A connection accepted before aiohttp is ready (:class:`Doorway`): the front door's
    answers in order, pipelining included; at the first request that is aiohttp's, reading
    stops until :meth:`hand_over`. No large file here (sendfile is the handler's)."""

    def __init__(self, doorway: Doorway) -> None:
        self._doorway = doorway
        self.transport: asyncio.Transport | None = None
        self._peer: str | None = None
        self._local: str | None = None  # the address the client reached
        self._unread = b""
        self._deciding = False  # a decision is awaited: nothing else answered meanwhile
        self._waiting = False  # the next request is aiohttp's: reading paused until then

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._local = self._doorway.front.routes.local_of(transport)
        self._doorway.early.add(self)

    def data_received(self, data: bytes) -> None:
        self._unread += data
        self.serve()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._unread = b""
        self._doorway.early.discard(self)

    def serve(self) -> None:
        """Answer each complete request read the front door takes, in order; stop at one
        that is aiohttp's; hand the connection over once aiohttp is ready."""
        front = self._doorway.front
        while (self._unread and not self._deciding and not self._waiting
               and self.transport is not None):
            head = front.head(self._unread)
            if head is None:
                break  # the rest of a head is still to come
            if isinstance(head, NotMine):
                self._wait()
                break
            answer = front.ready(head, local=self._local)
            if answer is None:
                started = front.start(head, self._peer, local=self._local)
                if started is None:
                    self._wait()
                    break
                finish, decided = started
                if not decided.done():
                    self._deciding = True
                    self.transport.pause_reading()
                    decided.add_done_callback(functools.partial(self._decided, head, finish))
                    break
                answer = self._finish(head, finish, decided)
                if answer is None:
                    self._wait()
                    break
            self._send(head, answer)
        if self._doorway.handler is not None and not self._deciding:
            self.hand_over()
        elif self._unread and not self._waiting and len(self._unread) > 4 * MAX_HEAD:
            self._wait()  # piled up unanswered: the rest is read by the handler

    def _wait(self) -> None:
        if not self._waiting and self.transport is not None:
            self._waiting = True
            self._doorway.held += 1
            self.transport.pause_reading()

    def _finish(self, head: RequestHead,
                finish: Callable[[Reply | FileBody | None], Answer | None],
                decided: asyncio.Future[Reply | FileBody | None]) -> Answer | None:
        try:
            reply: Reply | FileBody | None = decided.result()
        except Exception as exc:  # the one translation both doors use
            reply = self._doorway.front.failed(exc, head, self._peer)
        return finish(reply)

    def _decided(self, head: RequestHead,
                 finish: Callable[[Reply | FileBody | None], Answer | None],
                 decided: asyncio.Future[Reply | FileBody | None]) -> None:
        self._deciding = False
        if decided.cancelled() or self.transport is None:
            return  # the server is stopping, or the client left
        answer = self._finish(head, finish, decided)
        if answer is None:
            self._wait()
        else:
            self._send(head, answer)
            if not self._waiting:
                self.transport.resume_reading()
        self.serve()

    def _send(self, head: RequestHead, answer: Answer) -> None:
        transport = self.transport
        assert transport is not None and answer.file is None
        self._unread = self._unread[head.size:]
        transport.write(answer.data)
        access = self._doorway.access
        if access is not None:
            access.line(self._peer, "GET", _front_target(head), answer.status,
                        len(answer.data), answer.seconds, head.user_agent or None,
                        answer.request_id)
        if head.close:
            transport.close()
            self.transport = None

    def hand_over(self) -> None:
        """Make the connection aiohttp's handler's (:meth:`Doorway.open`), with what was read
        and not answered: the handler answers it as if it had read it itself."""
        transport, unread = self.transport, self._unread
        self._doorway.early.discard(self)
        self.transport, self._unread = None, b""
        if transport is None or transport.is_closing():
            return
        handler = self._doorway.handler
        assert handler is not None
        protocol = handler()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if unread:
            protocol.data_received(unread)
        if self._waiting and not transport.is_closing():
            transport.resume_reading()


# The listeners' backlog (the kernel caps it at net.core.somaxconn): a pallet of devices that
# finish their TFTP download together opens ~1,000 connections within milliseconds; at nginx's
# default of 511 a third were dropped and retried a second later (the 1,000-device storm
# counted 331 listen drops; its nginx stand-in listens with 4096).
BACKLOG = 4096


async def listen(doorway: Doorway, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None,
                 start_serving: bool = True) -> asyncio.Server:
    """A listener whose connections :class:`Doorway` makes (OSError as create_server);
    listening from the bind on, but not accepting until ``start_serving()`` when
    ``start_serving`` is False (a connection waits in the backlog meanwhile: _held)."""
    loop = asyncio.get_running_loop()
    if not _every_address(host):
        return _held(await loop.create_server(doorway, host, port, reuse_address=True,
                                              backlog=BACKLOG, ssl=ssl_context,
                                              start_serving=start_serving))
    # "::" is every address, IPv4's too, as whoever writes it means (nginx's "listen [::]:80
    # ipv6only=off", Go's net.Listen("tcp", ":80")): asyncio and uvloop set IPV6_V6ONLY on an
    # IPv6 listener whatever net.ipv6.bindv6only says, so IPv4 devices were refused. Two
    # sockets on one port, 0.0.0.0 and IPv6-only "::", not one dual-stack socket: an IPv4
    # peer stays 192.0.2.60, never ::ffff:192.0.2.60, for what compares it as text (the
    # connection guard's sources, a fixed_ipv4's check, the plain API's loopback test).
    for attempt in range(3):
        # Port 0: one kernel pick for both families, kept bound until both listeners hold
        # it (SO_REUSEADDR and not listening, it lets them bind it and no one else: a probe
        # closed first left it to any process's bind in between).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as pick:
            chosen = port
            if not port:
                pick.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                pick.bind(("0.0.0.0", 0))
                chosen = int(pick.getsockname()[1])
            try:
                return _held(await loop.create_server(
                    doorway, ["0.0.0.0", "::"], chosen, reuse_address=True, backlog=BACKLOG,
                    ssl=ssl_context, start_serving=start_serving))
            except OSError:
                if port or attempt == 2:
                    raise
    raise AssertionError("unreachable: the last attempt raises")


def _held(server: asyncio.Server) -> asyncio.Server:
    """``server``'s sockets listening now, whether it accepts yet or not: a connection made
    before ``start_serving()`` waits in the backlog. Bound and not listening, the port was
    no one's (SO_REUSEADDR: asyncio's default, libuv's always): another process could bind
    it and listen first (a test's "free port" picked and let go), and the service's own
    listen() then failed, on uvloop silently: start() returned, the summary named the port,
    and its clients were served by the other process (tests/servers/test_http_listen.py)."""
    for sock in server.sockets:
        # A duplicate of the descriptor: listen(2) is the kernel socket's, and asyncio's
        # and uvloop's socket objects do not offer it. start_serving() listens again: the
        # same backlog, no effect.
        with socket.socket(fileno=os.dup(sock.fileno())) as same:
            same.listen(BACKLOG)
    return server


def _every_address(host: str) -> bool:
    """``host`` is IPv6's unspecified address ("::", "[::]", "0::0")."""
    try:
        return ipaddress.IPv6Address(host.strip("[]")).is_unspecified
    except ValueError:
        return False
