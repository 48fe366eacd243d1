"""aiohttp's side of netboot's HTTP server: the application keys, middlewares, the connection
handler and the sites, for what the front door (netboot.servers.http) does not answer.

Kept apart so that ``netboot serve`` answers before aiohttp is imported: its import is a
third of the start-up (``from aiohttp import web`` imports aiohttp's client too), and the
front door answers devices and ``/healthz`` without it. ``serve`` binds its listeners with
:class:`netboot.servers.http.Doorway`, imports this module in a thread, then hands the
listeners and the connections that wait for aiohttp to :class:`GuardedSite` and
:class:`AiohttpHandler` (benchmarks/README.md, issue 10).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_fileresponse import CONTENT_TYPES, FALLBACK_CONTENT_TYPE, NOSENDFILE
from aiohttp.web_protocol import RequestPayloadError

from netboot.errors import OutcomeUnknown
from netboot.logs import log_context
from netboot.servers.http import (
    _REQUEST_ID,
    SERVER_NAME,
    AccessLogger,
    AssetFiles,
    ConnectionGuard,
    DeviceRoutes,
    FrontDoor,
    GuardedHandler,
    HttpObserver,
    PlainHttp,
    RequestIds,
    _Held,
    error_reply,
    redacted_target,
    sendfile,
    web_response,
)
from netboot.wire.ranges import (
    Multipart,
    Spans,
    Unsatisfiable,
    byte_ranges,
    if_range_holds,
    multipart,
)

# Typed keys for what the wiring puts on the application (aiohttp's AppKey).
LOG_KEY = web.AppKey("log", logging.Logger)
MAX_BODY_KEY = web.AppKey("max_body", int)
MAX_EVENT_KEY = web.AppKey("max_event", int)
BODY_TIMEOUT_KEY = web.AppKey("body_timeout", float)
REQUEST_ID = web.RequestKey("request_id", str)  # the id echoed in X-Request-Id
_TARGET = web.RequestKey("loggable_target", str)
# On an error's answer: the change's outcome is unknown (OutcomeUnknown), for the audit entry.
OUTCOME_UNKNOWN = web.ResponseKey("outcome_unknown", bool)

REQUEST_IDS_KEY = web.AppKey("request_ids", RequestIds)

OBSERVER_KEY = web.AppKey("observer", HttpObserver)


def loggable_target(request: web.BaseRequest) -> str:
    """The request target without the install token (in the query or the NoCloud path),
    with control characters escaped.

    The install token opens a machine's config, which carries the cluster join secret, so it
    must not end up in log files. Works from the path alone, not from the matched route: a
    request that never reached routing (a malformed request line) has no route to ask.
    """
    known: str | None = request.get(_TARGET)  # made once a request (log context, access)
    if known is not None:
        return known
    target = redacted_target(request.path, request.query.items())
    request[_TARGET] = target
    return target


class CountingFileResponse(web.FileResponse):
    """FileResponse that remembers how many bytes sendfile() moved, and answers Range as
    nginx does (netboot.wire.ranges: several ranges as multipart/byteranges, If-Range with
    an entity-tag, an invalid Range ignored).

    aiohttp counts only what passes through its writer, so with sendfile the access log said
    258 bytes for an 8 MB kernel. ``loop.sendfile`` returns the count; the fallback path
    (no sendfile, compression) goes through the writer and is counted there already.
    """

    sendfile_bytes = 0

    async def _prepare_open_file(self, request: web.BaseRequest, fobj: Any,
                                 st: os.stat_result, file_encoding: str | None,
                                 ) -> AbstractStreamWriter | None:
        field = request.headers.get(hdrs.RANGE)
        if field is None:  # the whole file, as aiohttp answers it
            return await super()._prepare_open_file(request, fobj, st, file_encoding)
        # aiohttp's own reading answered 416 to several ranges and to a field it could not
        # parse (another unit too), 206 with the whole file to bytes=-0, and took no
        # entity-tag in If-Range (a part of a replaced file) and any date after the change
        # (s46-range): netboot.wire.ranges decides instead.
        size = st.st_size
        self.etag = f"{st.st_mtime_ns:x}-{size:x}"
        self.last_modified = st.st_mtime
        wanted = requested(request, field, size, self.headers[hdrs.ETAG], st.st_mtime)
        if isinstance(wanted, Unsatisfiable):
            self.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
            self.set_status(416)
            self.content_length = 0
            return await web.StreamResponse.prepare(self, request)
        if hdrs.CONTENT_TYPE not in self.headers:
            self.content_type = CONTENT_TYPES.guess_type(str(self._path))[0] \
                or FALLBACK_CONTENT_TYPE
        if file_encoding:  # as FileResponse: the ranges are the encoded file's
            self.headers[hdrs.CONTENT_ENCODING] = file_encoding
            self.headers[hdrs.VARY] = hdrs.ACCEPT_ENCODING
            self._compression = False
        self.headers[hdrs.ACCEPT_RANGES] = "bytes"
        if wanted is None:
            offset, count = 0, size
        elif len(wanted) == 1:
            self.set_status(206)
            offset, stop = wanted[0]
            count = stop - offset
            self.headers[hdrs.CONTENT_RANGE] = f"bytes {offset}-{stop - 1}/{size}"
        else:
            return await self._send_parts(request, fobj, multipart(
                wanted, size, self.headers[hdrs.CONTENT_TYPE], secrets.token_hex(10)))
        self.content_length = count
        if count == 0 or request.method == hdrs.METH_HEAD:
            return await web.StreamResponse.prepare(self, request)
        return await self._sendfile(request, fobj, offset, count)

    async def _send_parts(self, request: web.BaseRequest, fobj: Any, parts: Multipart
                          ) -> AbstractStreamWriter | None:
        """A 206 ``multipart/byteranges`` of ``parts``, read at most ``chunk_size`` bytes of
        the file a job, as aiohttp's fallback reads a file (never the file whole: the parts
        add up to no more than the file, netboot.wire.ranges.byte_ranges), small parts
        together (Multipart.batches)."""
        self.set_status(206)
        self.headers[hdrs.CONTENT_TYPE] = parts.content_type
        self.content_length = parts.length
        writer = await web.StreamResponse.prepare(self, request)
        if writer is None or request.method == hdrs.METH_HEAD:
            return writer
        loop = asyncio.get_running_loop()
        for batch in parts.batches(self._chunk_size):
            try:
                data = await loop.run_in_executor(None, self._read_batch, fobj, batch)
            except ConnectionResetError:
                self._shrank(request, batch[0][1], parts.parts[-1][2])
                raise
            await writer.write(data)
        await writer.write(parts.tail)
        await web.StreamResponse.write_eof(self)
        return writer

    @staticmethod
    def _shrank(request: web.BaseRequest, there: int, needed: int) -> None:
        """Told as the front door tells it (GuardedHandler.file_shrank), where one serves."""
        told = getattr(request.protocol, "file_shrank", None)
        if told is not None:
            told(request.path, there, needed)

    def _read_batch(self, fobj: IO[bytes], batch: list[tuple[bytes, int, int]]) -> bytes:
        """One batch of parts, each head followed by its bytes of the file (in a thread)."""
        out: list[bytes] = []
        for head, start, stop in batch:
            fobj.seek(start)
            data = fobj.read(stop - start)
            if len(data) < stop - start:  # shrank since its stat: the length cannot be kept
                raise ConnectionResetError(f"{self._path} shrank while sent")
            out += (head, data)
        return b"".join(out)

    async def _sendfile(
        self, request: web.BaseRequest, fobj: IO[Any], offset: int, count: int
    ) -> AbstractStreamWriter:
        if NOSENDFILE or self.compression or request.transport is None:
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None
        loop = asyncio.get_running_loop()
        transport = request.transport
        # A large body on a send thread (netboot.servers.sendthreads: the kernel's copy on
        # another CPU), once the head is out; the plain-TCP handler's threads only (None on
        # TLS, where the bytes must pass through the encryption).
        senders = getattr(request.protocol, "send_threads", None)
        try:
            if senders is not None and count >= senders.min_size \
                    and not transport.get_write_buffer_size():
                self.sendfile_bytes = await sendfile(transport, fobj, offset, count,
                                                     senders=senders)
            else:
                self.sendfile_bytes = await loop.sendfile(transport, fobj, offset, count)
        except NotImplementedError:
            # uvloop has no loop.sendfile: aiohttp would read the file through a thread in
            # 256 KiB chunks and copy each through the transport (0.5x nginx on 32 MiB).
            if transport is None or transport.get_extra_info("sslcontext") is not None:
                return await self._sendfile_fallback(writer, fobj, offset, count)
            self.sendfile_bytes = await sendfile(transport, fobj, offset, count)
        if self.sendfile_bytes < count:
            # The file shrank since its stat (a copy over it truncates it in place): the
            # connection cannot carry another answer, and the client must see it end, not
            # wait for the rest (the front door's _file_sent; nginx: "file was truncated").
            self._shrank(request, offset + self.sendfile_bytes, offset + count)
            raise ConnectionResetError(f"{self._path} shrank while sent")
        await web.StreamResponse.write_eof(self)
        return writer


def error_response(exc: Exception, log: logging.Logger, request: web.Request) -> web.Response:
    """:func:`error_reply` for an aiohttp request."""
    response = web_response(error_reply(exc, log, request.method, loggable_target(request),
                                        request.remote))
    if isinstance(exc, OutcomeUnknown):
        response[OUTCOME_UNKNOWN] = True
    return response


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    log = request.app[LOG_KEY]
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException as exc:
        if exc.status == 413:
            return web.json_response({"error": "request body too large", "field": "body"},
                                     status=413)
        raise
    except Exception as exc:
        return error_response(exc, log, request)


# Request headers the in-memory path leaves to aiohttp's FileResponse (conditional requests).
_CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


async def asset_response(files: AssetFiles, request: web.BaseRequest, name: str
                         ) -> web.StreamResponse:
    """``name`` of ``files`` as aiohttp answers it: conditional requests, Range, a compressed
    sibling by Accept-Encoding (the front door answers a plain GET: AssetFiles.reply)."""
    blob, held, st_path = await files.find(name)
    if blob.data is not None:
        return web.Response(body=blob.data, content_type=blob.content_type.split(";")[0])
    if held is None or any(h in request.headers for h in _CONDITIONAL) or (
            held.compressed and hdrs.ACCEPT_ENCODING in request.headers):
        resp = CountingFileResponse(st_path)
        resp.content_type = blob.content_type.split(";")[0]
        return resp
    return held_response(request, held)


def held_response(request: web.BaseRequest, held: _Held) -> web.Response:
    """A small asset from memory, with Range as CountingFileResponse answers it."""
    field = request.headers.get(hdrs.RANGE)
    if field is None:
        return web.Response(body=held.body, headers=held.headers)
    size = len(held.body)
    wanted = requested(request, field, size, held.headers["ETag"], held.mtime)
    if wanted is None:
        return web.Response(body=held.body, headers=held.headers)
    if isinstance(wanted, Unsatisfiable):
        return web.Response(status=416, headers={**held.headers,
                                                 hdrs.CONTENT_RANGE: f"bytes */{size}"})
    if len(wanted) == 1:
        start, stop = wanted[0]
        part = web.Response(body=held.body[start:stop], headers=held.headers, status=206)
        part.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{stop - 1}/{size}"
        return part
    parts = multipart(wanted, size, held.headers["Content-Type"], secrets.token_hex(10))
    body = b"".join([b for head, start, stop in parts.parts for b in
                     (head, held.body[start:stop])] + [parts.tail])
    return web.Response(body=body, status=206, headers={
        **held.headers, hdrs.CONTENT_TYPE: parts.content_type})


def requested(request: web.BaseRequest, field: str, size: int, etag: str, mtime: float
              ) -> Spans | Unsatisfiable | None:
    """What a request's ``Range`` field (``field``) asks of a file of ``size`` bytes with
    this ETag and mtime: its spans, unsatisfiable, or None for the whole file (an If-Range
    that does not hold, a field ignored: netboot.wire.ranges)."""
    if_range = request.headers.get(hdrs.IF_RANGE)
    # Last-Modified is sent rounded up to the second (aiohttp's, AssetFiles' headers).
    if if_range is not None and not if_range_holds(if_range, etag, math.ceil(mtime)):
        return None
    return byte_ranges(field, size)


# Set on a request that came over plain HTTP from a peer that must use HTTPS: nothing may
# read or check a credential it carries (netboot.web.auth.request_token refuses it).
PLAINTEXT = web.RequestKey("plaintext", bool)

PLAIN_HTTP_KEY = web.AppKey("plain_http", PlainHttp)
# (method, route pattern) of the routes every peer may use over plain HTTP.
PLAIN_ROUTES_KEY = web.AppKey("plain_routes", set[tuple[str, str]])


def serve_devices(app: web.Application, devices: DeviceRoutes) -> None:
    """The device routes' handlers on ``app``: every one is for firmware or an installer,
    neither of which can verify TLS, so all of them stay on plain HTTP (PlainHttp)."""
    r = app.router
    files = devices.files

    async def asset(request: web.Request) -> web.StreamResponse:
        # match_info is already percent-decoded by aiohttp; check the decoded form so that
        # %2e%2e and %00 are refused like their literal forms.
        return await asset_response(files, request, request.match_info["path"])

    serve_plain(
        app,
        r.add_get("/healthz", devices.healthz),
        r.add_get("/boot.ipxe", devices.boot_ipxe),
        # These have effects (an install token, a state change): HEAD must not run them.
        r.add_get("/ipxe", devices.ipxe, allow_head=False),
        r.add_get("/assets/{path:.+}", asset),  # also answers HEAD
        # GRUB loaded by UEFI HTTP boot reads its built-in prefix /grub from this server.
        r.add_get("/grub/{name:.+}", devices.grub, allow_head=False),
        r.add_get("/config/{mac}", devices.config, allow_head=False),
        r.add_get("/nocloud/{mac}/{name}", devices.nocloud, allow_head=False),
        r.add_get("/nocloud/{mac}/{token}/{name}", devices.nocloud, allow_head=False),
    )


def plain_route(request: web.Request) -> bool:
    """Whether the matched route was marked with :func:`serve_plain`."""
    resource = request.match_info.route.resource
    if resource is None:
        return True  # no route: a 404 or 405 carries nothing
    method = "GET" if request.method == "HEAD" else request.method
    return (method, resource.canonical) in request.app.get(PLAIN_ROUTES_KEY, ())


def serve_plain(app: web.Application, *routes: web.AbstractRoute) -> None:
    """Serve ``routes`` on the plain HTTP listener to every peer: firmware and installer
    routes, which take no credential but an install token. (HEAD follows GET.)"""
    marked = app.get(PLAIN_ROUTES_KEY)
    if marked is None:
        marked = app[PLAIN_ROUTES_KEY] = set()
    for route in routes:
        if route.resource is not None:
            marked.add((route.method, route.resource.canonical))


@web.middleware
async def plain_http_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Apply :class:`PlainHttp` (when the wiring set one): on the plain listener, from a peer
    it does not trust, firmware and installer routes pass and everything else is refused."""
    policy = request.app.get(PLAIN_HTTP_KEY)
    if policy is None or policy.trusts(request):
        passed: web.StreamResponse = await handler(request)
        return passed
    request[PLAINTEXT] = True
    plain = plain_route(request)
    leaked = policy.credential(request, plain)
    if leaked is not None:
        observer = request.app.get(OBSERVER_KEY)
        if observer is not None:  # a credential sent in clear, counted in the metrics
            observer.plain_http_credential()
        policy.leaked(request, leaked, loggable_target(request))
    elif plain:
        resp: web.StreamResponse = await handler(request)
        return resp
    base = policy.https_base(request)
    is_api = request.path.startswith("/api/")
    if request.method in ("GET", "HEAD") and not is_api and base:
        # A browser that typed the plain URL lands on the dashboard over HTTPS. 308 keeps
        # the method (RFC 9110 §15.4.9); a session cookie sent along was counted above.
        raise web.HTTPPermanentRedirect(f"{base.rstrip('/')}{request.rel_url}")
    if leaked is not None:
        raise policy.refusal(request, "a request carrying " + leaked)
    raise policy.refusal(request, "the API" if is_api else "the dashboard")


@web.middleware
async def body_timeout_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Read the request body within ``http.body_timeout`` (nginx client_body_timeout): a
    client that announces a body and trickles it must not hold the connection forever. The
    body is cached, so handlers' ``request.json()`` reads it from memory."""
    if request.body_exists:
        try:
            await asyncio.wait_for(request.read(), request.app[BODY_TIMEOUT_KEY])
        except TimeoutError:
            request.app[LOG_KEY].info("http: body from %s not complete in %.0f s "
                                      "(http.body_timeout), closed", request.remote,
                                      request.app[BODY_TIMEOUT_KEY])
            timed_out = web.json_response({"error": "request body timed out"}, status=408)
            timed_out.force_close()
            return timed_out
    resp: web.StreamResponse = await handler(request)
    return resp


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


@web.middleware
async def request_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The outermost middleware: a request id (the client's ``X-Request-Id`` when it is a sane
    token, else a new one) echoed in the response and bound to log lines of this request
    (netboot.logs.log_context), and one observation per request for the metrics."""
    given = request.headers.get("X-Request-Id", "")
    ids = request.app.get(REQUEST_IDS_KEY)
    rid = given if _REQUEST_ID.match(given) else ids() if ids else secrets.token_hex(8)
    request[REQUEST_ID] = rid
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.monotonic()
    status = 500
    with log_context(request_id=rid, peer=request.remote, path=loggable_target(request)):
        try:
            resp: web.StreamResponse = await handler(request)
            status = resp.status
            if not resp.prepared:
                resp.headers["X-Request-Id"] = rid
            return resp
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = rid
            raise
        finally:
            observer = request.app.get(OBSERVER_KEY)
            if observer is not None:
                observer.http_request(route, request.method, status,
                                      time.monotonic() - started)


def install(app: web.Application, *, body_timeout: float) -> None:
    """What every netboot HTTP application gets: the Server header and the body timeout (the
    middleware itself is listed by the wiring, inside the error middleware)."""
    app[BODY_TIMEOUT_KEY] = body_timeout
    app[REQUEST_IDS_KEY] = RequestIds()
    app.on_response_prepare.append(_server_header)


class AiohttpAccessLogger(AccessLogger, AbstractAccessLogger):
    """:class:`AccessLogger` as aiohttp takes it (a subclass of its abstract logger): the
    line of a request aiohttp answered."""

    @property
    def enabled(self) -> bool:
        return True

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        # CountingFileResponse's, what sendfile() moved past aiohttp's writer.
        sent = response.body_length + getattr(response, "sendfile_bytes", 0)
        self.line(request.remote, request.method, loggable_target(request), response.status,
                  sent, time, request.headers.get("User-Agent"), request.get(REQUEST_ID))


class AiohttpHandler(GuardedHandler, web.RequestHandler):
    """:class:`GuardedHandler` over aiohttp's RequestHandler: what every connection is once
    aiohttp is imported (and what a connection accepted before is handed to)."""

    # RequestHandler keeps every argument of its parser but this one (_begin_aiohttp): its
    # default, and the one given, if any, on the handler.
    _auto_decompress = True

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        if "auto_decompress" in kwargs:
            self._auto_decompress = bool(kwargs["auto_decompress"])

    def _attach(self, transport: asyncio.BaseTransport) -> None:
        # RequestHandler.connection_made (aiohttp 3.14) without its keep-alive timer and
        # handler task (GuardedHandler.connection_made).
        BaseProtocol.connection_made(self, transport)  # the transport, TCP_NODELAY
        real = cast(asyncio.Transport, transport)
        if self._tcp_keepalive:
            tcp_keepalive(real)
        assert self._manager is not None
        self._manager.connection_made(self, real)

    def _begin_aiohttp(self) -> None:
        # The parser RequestHandler.__init__ makes, with the arguments it was given (kept
        # on the handler), and the task its connection_made starts, as it starts it.
        if self._parser is None:
            self._parser = HttpRequestParser(
                self, self._loop, self._read_bufsize, max_line_size=self.max_line_size,
                max_field_size=self.max_field_size, max_headers=self.max_headers,
                payload_exception=RequestPayloadError, auto_decompress=self._auto_decompress,
                max_msg_queue_size=self._max_msg_queue_size)
        if self._task_handler is None:
            if sys.version_info >= (3, 12):
                self._task_handler = asyncio.Task(self.start(), loop=self._loop,
                                                  eager_start=True)
            else:
                self._task_handler = self._loop.create_task(self.start())


class GuardedSite(web.BaseSite):
    """A listener already bound and answering (its :class:`Doorway`), registered with the
    runner, which stops it, as aiohttp's TCPSite would be; from :meth:`start` on, its
    connections are :class:`AiohttpHandler`\\ s."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer, *,
                 name: str) -> None:
        super().__init__(runner)
        self._server = server
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()


def handlers(runner: web.AppRunner, *, guard: ConnectionGuard, front: FrontDoor | None,
             access: logging.Logger | None) -> Callable[[], AiohttpHandler]:
    """The protocol factory of both listeners once aiohttp is ready (:meth:`Doorway.open`):
    netboot's handler with the guard, the front door and the access log."""
    manager = runner.server
    assert manager is not None
    loop = asyncio.get_running_loop()
    if access is None:
        return lambda: AiohttpHandler(manager, guard=guard, loop=loop, front=front,
                                      access_log=None)
    return lambda: AiohttpHandler(manager, guard=guard, loop=loop, front=front,
                                  access_log=access, access_log_class=AiohttpAccessLogger)
