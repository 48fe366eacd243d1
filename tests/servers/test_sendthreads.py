"""Large files' bodies sent on send threads (netboot.servers.sendthreads), against a real
netboot server on loopback on both event loops: curl whole and by Range, clients that stop
reading or leave mid-file, a file cut short while it is sent, the server stopped with bodies
in flight, and the access log's byte counts."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netboot.config import load
from netboot.service import Service, build
from tests.conftest import write_config
from tests.servers.test_http_front import _open_fds_of, get, run_on, serving
from tests.servers.test_http_ranges import curl, header, status

pytestmark = pytest.mark.requires("curl", "curl")

LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
# 3 MiB and a tail: above the threads' minimum, more than one sendfile call on loopback.
BIG = bytes(range(256)) * (12 * 1024) + b"big-tail"


async def settled(service: Service, path: Path | None = None) -> None:
    """Until every transfer ended and the threads hold none (and none of ``path``'s
    descriptors is open), bounded: 20 s."""
    threads = service.send_threads
    assert threads is not None
    for _ in range(400):
        if not threads.in_flight and not threads.held \
                and (path is None or not _open_fds_of(path.resolve())):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"in flight {threads.in_flight}, held {threads.held}")


async def stalled(port: int, target: str) -> socket.socket:
    """A client that asks for ``target``, reads its first KiB and then nothing (a hung
    firmware): its small receive buffer fills and the server's socket with it."""
    ev = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await ev.sock_connect(sock, ("127.0.0.1", port))
        await ev.sock_sendall(sock, get(target))
        first = await asyncio.wait_for(ev.sock_recv(sock, 1024), 30)
        assert first.startswith(b"HTTP/1.1 200 OK\r\n"), first
    except BaseException:
        sock.close()
        raise
    return sock


def access_lines(caplog: pytest.LogCaptureFixture, target: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "netboot.access" and f"GET {target} " in r.getMessage()]


@LOOPS
def test_a_large_file_whole_and_by_range_is_sent_by_a_send_thread(
        tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """curl gets a large file whole (the front door) and by one range (aiohttp's
    FileResponse), each body sent by a send thread, byte for byte, and each access line
    counts the head and the body curl received. Main has no send threads: every body went
    out from the event loop's thread."""
    caplog.set_level(logging.INFO, logger="netboot.access")

    async def scenario() -> None:
        async with serving(tmp_path, seeded=False) as service:
            (tmp_path / "assets" / "big.bin").write_bytes(BIG)
            threads = service.send_threads
            assert threads is not None and threads.alive == 2
            url = f"http://127.0.0.1:{service.http_port}/assets/big.bin"
            head, body = await curl(url)
            assert status(head) == 200 and body == BIG
            first, last = 1000, len(BIG) - 2000
            ranged_head, part = await curl("-r", f"{first}-{last}", url)
            assert status(ranged_head) == 206 and part == BIG[first:last + 1]
            assert header(ranged_head, "Content-Range") == f"bytes {first}-{last}/{len(BIG)}"
            assert threads.given == 2  # both bodies, none on the loop's thread
            await settled(service)
            # What an operator's scrape says of them (netboot.metrics).
            metrics = {s.name: s.value for f in text_string_to_metric_families(
                generate_latest(service.metrics.registry).decode()) for s in f.samples}
            assert (metrics["netboot_http_send_thread_bodies_total"],
                    metrics["netboot_http_send_thread_bodies_sending"],
                    metrics["netboot_http_send_threads_running"]) == (2, 0, 2), metrics
            lines = access_lines(caplog, "/assets/big.bin")
            assert len(lines) == 2, lines
            for line, (h, b) in zip(lines, ((head, body), (ranged_head, part)), strict=True):
                code = status(h)
                assert f" {code} {len(h.encode('latin-1')) + len(b)} " in line, (line, h)

    run_on(loop, scenario)


@LOOPS
def test_a_client_that_stops_reading_is_dropped_and_its_thread_is_free(
        tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """A device that stops reading mid-file (a hung firmware) with a body on a send thread:
    the kernel drops it after http.send_timeout (TCP_USER_TIMEOUT), its transfer ends and
    its descriptors close; the access line says it got less than the file; the next client
    gets the file whole from the same threads."""
    caplog.set_level(logging.INFO, logger="netboot.access")
    size = 32 << 20

    async def scenario() -> None:
        async with serving(tmp_path, "  send_timeout: 2\n", seeded=False) as service:
            big = tmp_path / "assets" / "stall.bin"
            big.write_bytes(b"s" * size)
            threads = service.send_threads
            assert threads is not None
            sock = await stalled(service.http_port, "/assets/stall.bin")
            try:
                assert threads.given == 1  # and it reads no more
                await settled(service, big)  # bounded: 20 s against send_timeout's 2
            finally:
                sock.close()
            (line,) = access_lines(caplog, "/assets/stall.bin")
            sent = int(re.search(r" 200 (\d+) ", line).group(1))  # type: ignore[union-attr]
            assert 0 < sent < size, line
            head, body = await curl(f"http://127.0.0.1:{service.http_port}/assets/stall.bin")
            assert status(head) == 200 and len(body) == size
            assert threads.given == 2
            await settled(service, big)

    run_on(loop, scenario)


@LOOPS
def test_a_client_leaving_mid_file_frees_the_thread_and_the_server_serves_on(
        tmp_path: Path, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """Clients reset their connections in the middle of a body a send thread sends, on the
    front door's path and on aiohttp's (a Range): each transfer ends, the file's descriptors
    (the server's and the thread's duplicates) all close, each is logged with what it got,
    and the next client gets the whole file."""
    caplog.set_level(logging.INFO, logger="netboot.access")
    size = 32 << 20

    async def scenario() -> None:
        async with serving(tmp_path, seeded=False) as service:
            big = tmp_path / "assets" / "left.bin"
            big.write_bytes(b"l" * size)
            threads = service.send_threads
            assert threads is not None
            for extra in (b"", b"Range: bytes=10-\r\n") * 2:
                reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
                writer.write(get("/assets/left.bin", extra))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                assert head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 206 "))
                await reader.readexactly(1 << 16)
                writer.transport.abort()  # a reset, in the middle of the file
            assert threads.given == 4
            await settled(service, big)
            head, body = await curl(f"http://127.0.0.1:{service.http_port}/assets/left.bin")
            assert status(head) == 200 and len(body) == size
            await settled(service, big)

    run_on(loop, scenario)
    lines = access_lines(caplog, "/assets/left.bin")
    assert len(lines) == 5, lines
    counts = [int(re.search(r" 20[06] (\d+) ", m).group(1)) for m in lines]  # type: ignore[union-attr]
    assert all(c < size for c in counts[:4]) and counts[4] > size, lines


@LOOPS
@pytest.mark.parametrize("cut", [1000, 64 << 20], ids=["before-what-was-sent", "beyond"])
def test_a_file_cut_short_while_a_thread_sends_it_ends_the_connection(
        tmp_path: Path, loop: str, cut: int) -> None:
    """An operator copies a new kernel over the old one (``cp`` truncates it in place) while
    a send thread sends it whole: the answer cannot be as long as its Content-Length said,
    so the connection is closed at the file's new end (s47-attack's rule, nginx's "file was
    truncated"), not left open for bytes that never come.

    ``beyond``: cut at a length beyond what the thread had sent (a smaller kernel over a
    larger one), the thread's last ``sendfile`` moved the bytes up to the new end, fewer
    than asked, into a socket with room left, and the thread waited for the socket's next
    edge, taking the short write for a full socket. A socket that was not full gives none
    (the kernel wakes writers only when a write found it full): the client got every byte to
    the new end and waited, the connection and the thread's two descriptors held until it
    gave up (the wait below ran out on f849e89, s49-attack). s49-attack called sendfile
    again after each short write; the registration is now level-triggered, so the socket
    with room is reported at the next poll and that call ends it (edge-triggered again, the
    wait runs out: s50-bisect)."""
    async def scenario() -> None:
        async with serving(tmp_path, seeded=False) as service:
            path = tmp_path / "assets" / "cut.bin"
            with path.open("wb") as fh:
                fh.truncate(256 << 20)  # sparse: far more than the socket buffers hold
            reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
            try:
                writer.write(get("/assets/cut.bin"))
                head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                        ).decode("latin-1")
                assert status(head) == 200, head
                length = int(header(head, "Content-Length") or 0)
                got = len(await asyncio.wait_for(reader.readexactly(1 << 20), 30))
                os.truncate(path, cut)
                try:
                    while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
                        got += len(chunk)
                except TimeoutError:
                    raise AssertionError(f"the connection was left open after {got} bytes "
                                         f"of {length}: no more came") from None
            finally:
                writer.close()
            assert got < length  # ended at EOF, short
            if cut == 64 << 20:  # beyond what was sent (the buffers hold a few MiB): all of it
                assert got == cut
            threads = service.send_threads
            assert threads is not None and threads.given == 1
            await settled(service, path)

    run_on(loop, scenario)


@LOOPS
def test_stopping_the_server_with_bodies_in_flight_ends_them_and_its_threads(
        tmp_path: Path, loop: str) -> None:
    """``netboot serve`` stopped (SIGTERM's path: Service.close) while three devices sit in
    the middle of large bodies, reading nothing (send_timeout far away): it returns within
    its bound, each device sees its connection end, and no send thread is left running."""
    size = 32 << 20

    async def scenario() -> None:
        service = await build(load(write_config(tmp_path, http=""), env={}))
        await service.start()
        closed = False
        socks: list[socket.socket] = []
        try:
            (tmp_path / "assets" / "held.bin").write_bytes(b"h" * size)
            threads = service.send_threads
            assert threads is not None and threads.alive == 2
            for _ in range(3):
                socks.append(await stalled(service.http_port, "/assets/held.bin"))
            assert threads.given == 3 and threads.in_flight == 3
            await asyncio.wait_for(service.close(), 30)
            closed = True
            assert not [t for t in threading.enumerate() if t.name.startswith("netboot-send")]
            for sock in socks:  # each reads to its connection's end: EOF or a reset
                sock.setblocking(True)
                sock.settimeout(30)
                try:
                    while sock.recv(1 << 20):
                        pass
                except ConnectionResetError:
                    pass
        finally:
            for sock in socks:
                sock.close()
            if not closed:
                await service.close()

    run_on(loop, scenario)
