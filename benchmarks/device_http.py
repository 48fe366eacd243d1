"""The storm's devices' HTTP/1.1 client (benchmarks/storm.py): a pool of kept-alive
connections per client address, reopened as iPXE reopens them, each response read whole.

Why not aiohttp, which the storm used until session 30: py-spy of the load generator in a
1,000-device storm (8 MiB kernel + 32 MiB initrd a device) had 72 % of its samples in
reading the transfers' bytes through aiohttp (a new ``bytes`` of up to 256 KiB per
``recv``, sliced again by its parser, joined again by ``iter_chunked``), and the generator's
CPU was 24-26 s of a 26-29 s storm: the storm measured its own load generator
(benchmarks/README.md, s30-storm). Here every byte is still received and read, by
``recv_into`` into one buffer of the process (an ``asyncio.BufferedProtocol``): the body of
a download is counted there and checked against its ``Content-Length``; a small body (a
script, a config, an API answer) is kept. On loopback, 40 MiB downloads: aiohttp 0.19 s user
+ 0.52-0.66 s system a GiB, this 0.02 + 0.30-0.36 s.

A device's requests are the bytes aiohttp sent (its header set, so that the servers do what
they did for every session's storm before), with this client's own User-Agent.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

# iPXE keeps a connection alive for the next request to the same server (src/core/pool.c) and,
# when a connection taken from that pool is closed before it delivered a byte of the response,
# reopens it and sends the request again: httpconn.c's http_conn_socket_close() asks for that
# when pool_is_reopenable() (recycled, not yet alive), httpcore.c's http_reopen() does it.
# curl's Curl_retry_request() does the same ("Connection died, retrying a fresh connect"), and
# RFC 9112 §9.3.1 allows it: a server may close an idle kept-alive connection at any time
# (nginx does so when worker_connections run out), and the request then crosses the close.
# A response with Retry-After (netboot's 503 at http.max_connections) is asked again after
# that many seconds, as httpcore.c's http_parse_retry_after() makes iPXE do.
REOPENS = 8  # pooled connections a request may find closed in a row (a device pools a few)
RETRY_AFTER_MAX = 5  # 503s a request waits out before it counts as failed
# An idle pooled connection older than this is closed, not reused (aiohttp's keepalive_timeout,
# which the storm's devices had until session 30).
KEEPALIVE = 15.0
USER_AGENT = "netboot-storm/1"
MAX_HEAD = 64 << 10  # a response head longer than this is a broken server
READ_BUFFER = 256 << 10  # what one recv_into may take (asyncio's own read size)
# socket.MSG_TRUNC as a plain int: or-ing the IntFlag built an enum member a read (py-spy of a
# storm's generator: 3 % of its samples in enum's __or__ and __call__).
MSG_TRUNC = int(socket.MSG_TRUNC)

EVENTS: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "storm_events", default=None)  # a device's requests, kept for the straggler report


class HttpError(Exception):
    """A request's failure; the storm counts it by its class name."""


class ConnectFailed(HttpError):
    """A new connection could not be opened (never retried: only a pooled one is)."""


class Disconnected(HttpError):
    """The connection closed (or was reset) before the whole response came."""


class BadResponse(HttpError):
    """Bytes that are not an HTTP/1.1 response, or a body longer than it said."""


class Response:
    """A whole response: status, header fields (names lowercased), and the body when kept
    (``size`` counts its bytes either way)."""

    __slots__ = ("body", "headers", "size", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, size: int) -> None:
        self.status, self.headers, self.body, self.size = status, headers, body, size


class DeviceSocket(socket.socket):
    """A device's TCP socket. While ``discard`` is above 0 (the bytes of a download still to
    come), asyncio's ``recv_into`` receives at most that many with MSG_TRUNC: the kernel
    counts them and drops them instead of copying them to the program (tcp(7)). The device
    still receives and acknowledges every byte: the server's work is the same, the
    generator's copy of 40 MiB a device is not made (perf of the generator: 23 % of its
    samples were that copy, _copy_to_iter, benchmarks/README.md s30-storm)."""

    discard = 0
    dropped = 0  # bytes received so, in all

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.discard > 0:
            n = super().recv_into(buffer, min(self.discard, len(buffer)), flags | MSG_TRUNC)
            self.dropped += n
            return n
        return super().recv_into(buffer, nbytes, flags)


class Connection(asyncio.BufferedProtocol):
    """One kept-alive connection. Every ``recv_into`` lands in the process's one read buffer
    and is consumed before the loop reads again: a kept body is copied out, a download's only
    counted."""

    def __init__(self, buffer: memoryview, sock: DeviceSocket | None = None,
                 copy: bool = True) -> None:
        self.buffer = buffer
        self.sock, self.copy = sock, copy  # copy: a download's bytes too (no MSG_TRUNC)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.uses = 0
        self.answered = False  # a byte came since it was last handed out
        self.idle_since = 0.0
        self.waiter: asyncio.Future[Response] | None = None
        self.head = bytearray()
        self.keep = True
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.left = -1  # body bytes still to come; -1: until the close (no length given)
        self.chunked = False
        self.raw = bytearray()  # a chunked body as it came, decoded when whole
        self.in_body = False
        self.framed = False  # the last response ended where it said: the next may follow

    # -- asyncio's side ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.answered = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            self._close()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            if not self.in_body:
                self.head += self.buffer[:nbytes]
                end = self.head.find(b"\r\n\r\n", 0, MAX_HEAD)
                if end < 0:
                    if len(self.head) > MAX_HEAD:
                        raise BadResponse("response head too long")
                    return
                rest = bytes(self.head[end + 4:])
                self._read_head(bytes(self.head[:end]))
                if waiter.done():
                    if rest:
                        self._close()  # bytes past a response without a body
                    return
                self._take(rest)
            else:
                self._take(self.buffer[:nbytes])
        except HttpError as exc:
            if not waiter.done():
                waiter.set_exception(exc)
            self._close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.in_body and self.left == -1 and not self.chunked:
            self._complete()  # a body delimited by the close (RFC 9112 §6.3, item 8)
            return
        why = f" ({type(exc).__name__})" if exc else ""
        waiter.set_exception(Disconnected(f"closed before the whole response{why}"))

    # -- the response --------------------------------------------------------------------------
    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise BadResponse(f"status line {lines[0][:40]!r}")
        self.status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadResponse("header line without a colon")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.headers = headers
        self.in_body = True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.chunked = True
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self.left = 0
        elif "content-length" in headers:
            if not headers["content-length"].isdigit():
                raise BadResponse("Content-Length not a number")
            self.left = int(headers["content-length"])
        if self.left == 0:
            self._complete()

    def _take(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self.chunked:
            self.raw += data
            self._chunks()
            return
        n = len(data)
        if self.left >= 0 and n > self.left:
            raise BadResponse(f"{n - self.left} bytes past the body")
        self.size += n
        if self.keep:
            self.body.append(bytes(data))
        if self.left > 0:
            self.left -= n
            if self.sock is not None and not self.keep and not self.copy:
                self.sock.discard = self.left  # the rest of the download: counted, not copied
            if self.left == 0:
                self._complete()

    def _chunks(self) -> None:
        """Decode the chunked body once its last chunk and the trailer's end came."""
        raw, pos, out = self.raw, 0, []
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                return
            size_text = bytes(raw[pos:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadResponse("chunk size not hex") from None
            if size == 0:
                if raw.find(b"\r\n\r\n", eol) < 0 and raw[eol:eol + 4] != b"\r\n\r\n":
                    return  # the trailer is still coming
                break
            if len(raw) < eol + 2 + size + 2:
                return
            out.append(bytes(raw[eol + 2:eol + 2 + size]))
            pos = eol + 2 + size + 2
        body = b"".join(out)
        self.size = len(body)
        self.body = [body] if self.keep else []
        self._complete()

    def _complete(self) -> None:
        assert self.waiter is not None
        self.framed = self.chunked or self.left == 0
        self.waiter.set_result(Response(self.status, self.headers, b"".join(self.body),
                                        self.size))

    # -- the client's side -----------------------------------------------------------------------
    def exchange(self, request: bytes, keep: bool) -> asyncio.Future[Response]:
        """Send ``request``; the future is the whole response (its body kept if ``keep``)."""
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.head, self.in_body, self.keep = bytearray(), False, keep
        self.status, self.headers, self.body, self.size = 0, {}, [], 0
        self.left, self.chunked, self.raw = -1, False, bytearray()
        self.answered = self.framed = False
        if self.sock is not None:
            self.sock.discard = 0
        self.transport.write(request)
        return self.waiter

    @property
    def reusable(self) -> bool:
        return (not self.closed and self.transport is not None
                and not self.transport.is_closing() and self.framed
                and self.headers.get("connection", "").lower() != "close")

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def socket(self) -> socket.socket | None:
        return self.transport.get_extra_info("socket") if self.transport else None


class DeviceHttp:
    """One device's (or one client address's) pool of kept-alive connections, every socket
    bound to ``ip`` and, when ``window``, receiving with iPXE's window (0: Linux's
    autotuning). ``buffer``: the process's read buffer (one is made if not given). ``copy``:
    a download's bytes are copied into it too, not dropped by the kernel once counted
    (DeviceSocket)."""

    def __init__(self, ip: str, window: int, buffer: memoryview | None = None,
                 copy: bool = False) -> None:
        self.ip, self.window, self.copy = ip, window, copy
        self.buffer = buffer if buffer is not None else memoryview(bytearray(READ_BUFFER))
        self.idle: dict[tuple[str, int], list[Connection]] = {}
        self.retries = {"reopened": 0, "retry_after": 0}  # requests asked again, by cause

    async def connection(self, host: str, port: int) -> tuple[Connection, bool]:
        """A pooled connection to (host, port) that is still open, else a new one; and
        whether it was pooled."""
        pool = self.idle.get((host, port), [])
        now = time.monotonic()
        while pool:
            conn = pool.pop()
            if conn.reusable and now - conn.idle_since < KEEPALIVE:
                return conn, True
            conn._close()
        loop = asyncio.get_running_loop()
        sock = DeviceSocket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if self.window:
                # Before connect: the window scale is agreed in the SYN. Linux doubles it for
                # its bookkeeping and advertises a share of that (its scaling_ratio), and
                # autotuning leaves it be.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.window)
            sock.setblocking(False)
            sock.bind((self.ip, 0))
            await loop.sock_connect(sock, (host, port))
            _, conn = await loop.create_connection(
                lambda: Connection(self.buffer, sock, self.copy), sock=sock)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return conn, False

    def release(self, conn: Connection, host: str, port: int) -> None:
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self.idle.setdefault((host, port), []).append(conn)
        else:
            conn._close()

    async def close(self) -> None:
        for pool in self.idle.values():
            for conn in pool:
                conn._close()
        self.idle.clear()


def request_bytes(method: str, target: str, netloc: str, body: bytes | None,
                  headers: dict[str, str]) -> bytes:
    """The request as aiohttp 3.14 wrote it (its fields in its order: the caller's first)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += ["Accept: */*", "Accept-Encoding: gzip, deflate", f"User-Agent: {USER_AGENT}"]
    if body is not None:
        lines += [f"Content-Length: {len(body)}", "Content-Type: application/json"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def request(session: DeviceHttp, method: str, url: str, *, json_body: Any = None,
                  headers: dict[str, str] | None = None, keep: bool = True) -> Response:
    """The whole response to ``method url``, reopened as iPXE reopens (above): only a
    connection from the pool that was closed before any byte of the response came is asked
    again; a new connection's failure, or one after a byte came, is the request's. Bounded
    in time by the caller (the device's own timeout)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = json.dumps(json_body).encode() if json_body is not None else None
    payload = request_bytes(method, target, parts.netloc, body, headers or {})
    reopens = waits = 0
    events = EVENTS.get()
    while True:
        t0 = time.perf_counter()
        conn, reused = await session.connection(host, port)
        done = False
        try:
            resp = await conn.exchange(payload, keep)
            done = True
        except Disconnected as exc:
            if events is not None:
                events.append((t0, time.perf_counter(), f"{method} {url[:40]} "
                               f"{type(exc).__name__} reused={reused}"))
            if not reused or conn.answered or reopens >= REOPENS:
                raise
            reopens += 1
            session.retries["reopened"] += 1
            continue
        finally:
            if done:
                session.release(conn, host, port)
            else:
                conn._close()  # failed, or cancelled (the device's timeout) mid-response
        if events is not None:
            sock = conn.transport.get_extra_info("sockname") if conn.transport else None
            events.append((t0, time.perf_counter(), f"{method} {url[:40]} {resp.status} "
                           f"reused={reused} local={sock}"))
        after = resp.headers.get("retry-after", "")
        if resp.status == 503 and after.isdigit() and waits < RETRY_AFTER_MAX:
            waits += 1
            session.retries["retry_after"] += 1
            await asyncio.sleep(int(after))
            continue
        return resp
