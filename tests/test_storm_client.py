"""benchmarks/storm.py's device HTTP client reopens as iPXE does (httpconn.c's
http_conn_socket_close, httpcore.c's http_reopen): only a connection taken from the pool and
closed before any byte of the response came is retried, whatever the method; a new
connection's failure, or one after a byte came, is the request's. A 503 with Retry-After is
asked again (httpcore.c's http_parse_retry_after). Real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import storm

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n" + bytes(4 << 20)  # still coming
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"

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
                writer.write({"ok": OK, "big": BIG, "busy": BUSY, "cut": OK[:20]}[what])
                await writer.drain()
                if what == "cut":
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
        session = storm.device_session("127.0.0.1", 30)
        try:
            async with await storm.request(session, "GET", url) as resp:
                assert await resp.read() == b"ok"
            try:
                async with await storm.request(session, method, url, json={"k": 1}) as resp:
                    assert await resp.read() == b"ok"
                    return resp.status, seen
            except aiohttp.ClientError as exc:
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
        session = storm.device_session("127.0.0.1", 30)
        try:
            with pytest.raises(aiohttp.ServerDisconnectedError):
                await storm.request(session, "GET", url)
        finally:
            await session.close()
    assert seen == [1]  # aiohttp's own retry of a GET is off too


async def test_a_pooled_connection_closed_after_a_byte_is_not_retried() -> None:
    status, seen = await twice(lambda conn, n: "cut" if (conn, n) == (1, 2) else "ok")
    assert status in ("ServerDisconnectedError", "ClientPayloadError", "ClientOSError")
    assert seen == [2]


async def test_a_503_with_retry_after_is_asked_again() -> None:
    status, seen = await twice(lambda conn, n: "busy" if n == 2 else "ok")
    assert (status, seen) == (200, [3])


def rcvbuf_of(resp: aiohttp.ClientResponse) -> int:
    """SO_RCVBUF of the device's socket that carries ``resp`` (a body still coming)."""
    assert resp.connection is not None and resp.connection.transport is not None
    sock = resp.connection.transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


async def test_a_device_receives_with_ipxes_window_on_every_connection() -> None:
    # iPXE advertises at most 256 KiB (TCP_MAX_WINDOW_SIZE) and holds what it receives in its
    # own memory; left to Linux's autotuning, 1,500 of these sockets filled the host's TCP
    # memory in a storm and their kernel dropped the server's segments. The second request's
    # connection is a reopened one (the first closed before answering it).
    async with server(lambda conn, n: "close" if (conn, n) == (1, 2) else "big") as (url, seen):
        session = storm.device_session("127.0.0.1", 30)
        rcvbufs = []
        try:
            for _ in range(2):
                async with await storm.request(session, "GET", url) as resp:
                    rcvbufs.append(rcvbuf_of(resp))
                    await resp.content.readexactly(3 << 20)
                    rcvbufs.append(rcvbuf_of(resp))  # autotuning did not grow it
                    assert len(await resp.read()) == 1 << 20
        finally:
            await session.close()
    assert seen == [2, 1]
    # Linux doubles SO_RCVBUF for its bookkeeping (socket(7)).
    assert rcvbufs == [2 * storm.DEVICE_WINDOW] * 4


async def test_a_device_window_of_0_is_linuxs_autotuning() -> None:
    default = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[1])
    async with server(lambda conn, n: "big") as (url, _):
        session = storm.device_session("127.0.0.1", 30, window=0)
        try:
            async with await storm.request(session, "GET", url) as resp:
                assert rcvbuf_of(resp) == default
                await resp.content.readexactly(3 << 20)
                grown = rcvbuf_of(resp)
                assert len(await resp.read()) == 1 << 20
        finally:
            await session.close()
    assert grown > default  # autotuned as it was read
