"""benchmarks/storm.py's device HTTP client (benchmarks/device_http.py) reopens as iPXE does
(httpconn.c's http_conn_socket_close, httpcore.c's http_reopen): only a connection taken from
the pool and closed before any byte of the response came is retried, whatever the method; a
new connection's failure, or one after a byte came, is the request's. A 503 with Retry-After
is asked again (httpcore.c's http_parse_retry_after). A download is read whole and counted,
not kept. Real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import device_http
import storm

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + bytes(4 << 20)  # still coming
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1;x=y\r\nk\r\n0\r\n\r\n"
CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

# What a connection does with its n-th request (1-based), given its own number (1-based).
Plan = Callable[[int, int], str]


@contextlib.asynccontextmanager
async def server(plan: Plan) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on loopback that answers, closes or cuts each request as ``plan`` says;
    yields its URL and the number of requests each connection read."""
    ids = itertools.count(1)
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(ids)
        seen.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                seen[conn - 1] += 1
                what = plan(conn, seen[conn - 1])
                if what == "close":
                    return  # closed after reading the request, before a byte of an answer
                writer.write({"ok": OK, "big": BIG, "busy": BUSY, "cut": OK[:20],
                              "chunked": CHUNKED, "closing": CLOSING}[what])
                await writer.drain()
                if what in ("cut", "closing"):
                    return
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/x", seen
    finally:
        srv.close()
        await srv.wait_closed()


async def twice(plan: Plan, method: str = "POST") -> tuple[int | str, list[int]]:
    """A GET, then ``method`` on the pooled connection: the second's status, or its error."""
    async with server(plan) as (url, seen):
        session = device_http.DeviceHttp("127.0.0.1", storm.DEVICE_WINDOW)
        try:
            resp = await device_http.request(session, "GET", url)
            assert resp.body == b"ok"
            try:
                resp = await device_http.request(session, method, url,
                                                 json_body={"k": 1} if method == "POST" else None)
                assert resp.body == b"ok"
                return resp.status, seen
            except device_http.HttpError as exc:
                return type(exc).__name__, seen
        finally:
            await session.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_pooled_connection_closed_before_any_byte_is_reopened(method: str) -> None:
    # Connection 1 answers its first request and closes on its second without a byte.
    status, seen = await twice(lambda conn, n: "close" if (conn, n) == (1, 2) else "ok",
                               method)
    assert (status, seen) == (200, [2, 1])


async def test_a_new_connection_closed_before_any_byte_is_not_retried() -> None:
    async with server(lambda conn, n: "close") as (url, seen):
        session = device_http.DeviceHttp("127.0.0.1", storm.DEVICE_WINDOW)
        try:
            with pytest.raises(device_http.Disconnected):
                await device_http.request(session, "GET", url)
        finally:
            await session.close()
    assert seen == [1]  # a GET is not asked again either


async def test_a_pooled_connection_closed_after_a_byte_is_not_retried() -> None:
    status, seen = await twice(lambda conn, n: "cut" if (conn, n) == (1, 2) else "ok")
    assert status == "Disconnected"
    assert seen == [2]


async def test_a_503_with_retry_after_is_asked_again() -> None:
    status, seen = await twice(lambda conn, n: "busy" if n == 2 else "ok")
    assert (status, seen) == (200, [3])


def rcvbufs_of(session: device_http.DeviceHttp) -> list[int]:
    """SO_RCVBUF of each of the device's pooled sockets (after a 4 MiB body was read)."""
    socks = [conn.socket() for pool in session.idle.values() for conn in pool]
    return [int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)) for sock in socks if sock]


async def test_a_device_receives_with_ipxes_window_on_every_connection() -> None:
    # iPXE advertises at most 256 KiB (TCP_MAX_WINDOW_SIZE) and holds what it receives in its
    # own memory; left to Linux's autotuning, 1,500 of these sockets filled the host's TCP
    # memory in a storm and their kernel dropped the server's segments. The second request's
    # connection is a reopened one (the first closed before answering it).
    async with server(lambda conn, n: "close" if (conn, n) == (1, 2) else "big") as (url, seen):
        session = device_http.DeviceHttp("127.0.0.1", storm.DEVICE_WINDOW)
        rcvbufs = []
        try:
            for _ in range(2):
                resp = await device_http.request(session, "GET", url, keep=False)
                assert (resp.status, resp.size, resp.body) == (200, 4 << 20, b"")
                rcvbufs += rcvbufs_of(session)  # autotuning did not grow it
        finally:
            await session.close()
    assert seen == [2, 1]
    # Linux doubles SO_RCVBUF for its bookkeeping (socket(7)).
    assert rcvbufs == [2 * storm.DEVICE_WINDOW] * 2


async def test_a_device_window_of_0_is_linuxs_autotuning() -> None:
    default = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[1])
    async with server(lambda conn, n: "big") as (url, _):
        session = device_http.DeviceHttp("127.0.0.1", 0)
        try:
            resp = await device_http.request(session, "GET", url, keep=False)
            assert resp.size == 4 << 20
            [grown] = rcvbufs_of(session)
        finally:
            await session.close()
    assert grown > default  # autotuned as it was read


@pytest.mark.parametrize("copy", [False, True])
async def test_a_kept_body_is_the_bytes_sent_and_a_download_only_counted(copy: bool) -> None:
    """Both receive every byte (the size is the Content-Length's); a kept body is copied out
    of the process's read buffer, a download's bytes (after its first read, with the head)
    are dropped by the kernel once counted (MSG_TRUNC), unless ``copy``."""
    async with server(lambda conn, n: "big") as (url, seen):
        session = device_http.DeviceHttp("127.0.0.1", storm.DEVICE_WINDOW, copy=copy)
        try:
            kept = await device_http.request(session, "GET", url)
            counted = await device_http.request(session, "GET", url, keep=False)
            again = await device_http.request(session, "GET", url)  # the next response whole
            [conn] = session.idle[("127.0.0.1", int(url.split(":")[2].split("/")[0]))]
        finally:
            await session.close()
    assert seen == [3]
    assert kept.body == bytes(4 << 20) and kept.size == 4 << 20
    assert counted.body == b"" and counted.size == 4 << 20
    assert again.body == kept.body
    assert isinstance(conn.sock, device_http.DeviceSocket)
    if copy:
        assert conn.sock.dropped == 0
    else:
        assert 3 << 20 <= conn.sock.dropped < 4 << 20


async def test_a_chunked_body_is_decoded_and_its_connection_kept() -> None:
    status, seen = await twice(lambda conn, n: "chunked", "GET")
    assert (status, seen) == (200, [2])


async def test_a_response_that_says_close_is_not_pooled() -> None:
    # Not a reopen either: the device saw the close announced and opens a new connection.
    status, seen = await twice(lambda conn, n: "closing" if n == 1 else "ok", "GET")
    assert (status, seen) == (200, [1, 1])
