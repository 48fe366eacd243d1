"""HTTP Range on every way netboot serves bytes (RFC 9110 §14), against a real netboot server
on loopback: real ``curl`` and aiohttp's client, small assets answered from memory and large
ones from their file, HEAD, If-Range, the 304 path and the generated answers (an iPXE script,
a config).

The expectations are RFC 9110's; the multipart framing and the status of each case were
checked against nginx 1.22 serving the same file (benchmarks/README.md, s46-range), which
frames the parts byte for byte as netboot does but answers 416 where RFC 9110 §14.2 lets a
server ignore an invalid Range (netboot ignores it: 200, the whole file).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import ssl
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from netboot.service import Service
from netboot.wire.ranges import MAX_RANGES
from tests.servers.test_http_front import HEXHYP, exchange, serving

pytestmark = pytest.mark.requires("curl", "curl")

SMALL = bytes(range(256)) * 4 + b"small-end"  # 1,033 bytes: answered from memory
LARGE = bytes(reversed(range(256))) * 1600 + b"large-end"  # 400 KiB: from the file
FILES = {"small.bin": SMALL, "large.bin": LARGE}


async def curl(*args: str, out: Path | None = None) -> tuple[str, bytes]:
    """curl's head (``-D -`` to stdout) and body; it must exit 0. With ``out``, the body is
    left in that file (b"" returned)."""
    into = out or Path(os.environ.get("TMPDIR", "/tmp")) / f"curl-{os.getpid()}.out"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "120", "-D", "-", "-o", str(into), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    head, err = await proc.communicate()
    assert proc.returncode == 0, err
    if out is not None:
        return head.decode("latin-1"), b""
    if not into.exists():  # no body (a 304)
        return head.decode("latin-1"), b""
    try:
        return head.decode("latin-1"), into.read_bytes()
    finally:
        into.unlink()


def header(head: str, name: str) -> str | None:
    found = re.search(rf"^{name}: ([^\r\n]*)", head, re.IGNORECASE | re.MULTILINE)
    return found.group(1) if found else None


def status(head: str) -> int:
    return int(head.split(" ", 2)[1])


def byteranges(data: bytes, spans: list[tuple[int, int]], boundary: str,
               kind: str = "application/octet-stream") -> bytes:
    """The multipart/byteranges body RFC 9110 §14.6 (and RFC 2046 §5.1.1) describes for the
    inclusive ``spans`` of ``data``, framed as nginx frames it."""
    body = b"".join(b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\n%s"
                    % (boundary.encode(), kind.encode(), first, last, len(data),
                       data[first:last + 1]) for first, last in spans)
    return body + b"\r\n--%s--\r\n" % boundary.encode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Service]:
    async with serving(tmp_path) as service:
        for name, data in FILES.items():
            (tmp_path / "assets" / name).write_bytes(data)
        yield service


def url(service: Service, target: str) -> str:
    return f"http://127.0.0.1:{service.http_port}{target}"


@pytest.mark.parametrize("name", list(FILES))
async def test_several_ranges_are_one_multipart_answer(server: Service, name: str) -> None:
    """``curl -r 0-99,200-299,-10``: 206 multipart/byteranges with each part's Content-Type
    and Content-Range and the body's Content-Length (main answered 416: "none of the ranges
    is satisfiable"). From memory and from the file alike, a second time too (then the small
    file is held in memory)."""
    data = FILES[name]
    spans = [(0, 99), (200, 299), (len(data) - 10, len(data) - 1)]
    for _ in range(2):
        head, body = await curl("-r", "0-99,200-299,-10", url(server, f"/assets/{name}"))
        assert status(head) == 206, head
        kind = header(head, "Content-Type")
        assert kind is not None and kind.startswith("multipart/byteranges; boundary=")
        boundary = kind.split("boundary=", 1)[1]
        assert re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary)  # RFC 2046 §5.1.1
        assert boundary.encode() not in data
        assert body == byteranges(data, spans, boundary)
        assert header(head, "Content-Length") == str(len(body))
        assert header(head, "Content-Range") is None
    # aiohttp's client reads the same parts with its own multipart reader.
    async with aiohttp.ClientSession() as session, session.get(
            url(server, f"/assets/{name}"), headers={"Range": "bytes=0-99,200-299,-10"}) as r:
        assert r.status == 206
        reader = aiohttp.MultipartReader.from_response(r)
        got = []
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            got.append((part.headers["Content-Range"], bytes(await part.read())))
    assert got == [(f"bytes {a}-{b}/{len(data)}", data[a:b + 1]) for a, b in spans]


@pytest.mark.parametrize("name", list(FILES))
async def test_unsatisfiable_ranges_are_dropped_and_none_left_is_416(
        server: Service, name: str) -> None:
    data = FILES[name]
    size = len(data)
    # One satisfiable range among unsatisfiable ones: that range alone, not multipart (main:
    # 416); a range past the end is clipped.
    head, body = await curl("-H", f"Range: bytes={size}-,-0,5-{size * 2}",
                            url(server, f"/assets/{name}"))
    assert (status(head), header(head, "Content-Range"), body) == (
        206, f"bytes 5-{size - 1}/{size}", data[5:])
    for spec in (f"bytes={size}-", f"bytes={size}-{size + 9},{size + 20}-", "bytes=-0"):
        head, body = await curl("-H", f"Range: {spec}", url(server, f"/assets/{name}"))
        assert (status(head), header(head, "Content-Range")) == (416, f"bytes */{size}"), spec
        assert data[:32] not in body
    # Suffix and open ranges.
    for spec, first in (("bytes=-500", size - 500), (f"bytes=-{size * 3}", 0),
                        ("bytes=1000-", 1000)):
        head, body = await curl("-H", f"Range: {spec}", url(server, f"/assets/{name}"))
        assert (status(head), header(head, "Content-Range"), body) == (
            206, f"bytes {first}-{size - 1}/{size}", data[first:]), spec


@pytest.mark.parametrize("name", list(FILES))
@pytest.mark.parametrize("spec", ["bytes=abc", "items=0-9", "bytes=5-3", "bytes=-",
                                  "bytes=0-9,x", "bytes=", "bytes=0-1,2-1"])
async def test_a_range_that_is_not_valid_is_ignored(server: Service, name: str,
                                                    spec: str) -> None:
    """RFC 9110 §14.2: a Range of another unit MUST be ignored, an invalid one MAY be; a
    client that sent one gets the whole file, 200 (main answered 416 to all of these, which
    tells a resuming client that there is nothing more to fetch)."""
    head, body = await curl("-H", f"Range: {spec}", url(server, f"/assets/{name}"))
    assert (status(head), header(head, "Content-Range"), body) == (200, None, FILES[name])


@pytest.mark.parametrize("name", list(FILES))
async def test_if_range_sends_the_whole_file_once_it_changed(server: Service, name: str,
                                                             tmp_path: Path) -> None:
    """A download resumed after the file was replaced: If-Range with the ETag of the copy the
    client has is false now, so the answer is the new file whole, 200, never its tail
    spliced onto the old head (main answered 206 with the new file's tail: aiohttp's
    FileResponse read If-Range as a date only and ignored an entity-tag). With the current
    ETag, or the current Last-Modified exactly, the range applies; a weak tag, a later date
    and garbage never do (RFC 9110 §13.1.5; nginx compares the same way)."""
    path = tmp_path / "assets" / name
    old = FILES[name]
    head, _ = await curl("-r", "0-99", url(server, f"/assets/{name}"))
    etag, stamp = header(head, "ETag"), header(head, "Last-Modified")
    assert etag and stamp
    for condition in (etag, stamp):
        head, body = await curl("-r", "100-", "-H", f"If-Range: {condition}",
                                url(server, f"/assets/{name}"))
        assert (status(head), body) == (206, old[100:]), condition
    later = formatdate(path.stat().st_mtime + 3600, usegmt=True)
    for condition in (f"W/{etag}", '"other"', later, "garbage"):
        head, body = await curl("-r", "100-", "-H", f"If-Range: {condition}",
                                url(server, f"/assets/{name}"))
        assert (status(head), header(head, "Content-Range"), body) == (200, None, old), \
            condition
    new = bytes(reversed(old))
    fresh = path.with_name(name + ".new")
    fresh.write_bytes(new)
    fresh.replace(path)
    for multi in ("100-", "100-199,300-399"):
        head, body = await curl("-r", multi, "-H", f"If-Range: {etag}",
                                url(server, f"/assets/{name}"))
        assert (status(head), header(head, "Content-Range"), body) == (200, None, new)


@pytest.mark.parametrize("name", list(FILES))
async def test_range_amplification_gets_the_file_once(server: Service, name: str) -> None:
    """CVE-2011-3192 (the "Apache killer"): ranges that add up to more than the file
    (overlapping ones of any size) or more than MAX_RANGES of them are answered with the
    whole file, 200, once (RFC 9110 §14.2 allows ignoring Range; nginx's sum rule, Apache's
    MaxRanges); MAX_RANGES small ranges that do not overlap are answered as asked."""
    data = FILES[name]
    target = url(server, f"/assets/{name}")
    size = len(data)
    for spec in (",".join(["0-"] * 50), f"0-{size // 2},{size // 4}-{size * 3 // 4}",
                 ",".join(f"{i}-{i}" for i in range(0, 2 * (MAX_RANGES + 1), 2))):
        head, body = await curl("-H", f"Range: bytes={spec}", target)
        assert (status(head), header(head, "Content-Range"), body) == (200, None, data)
    spec = ",".join(f"{i}-{i}" for i in range(0, 2 * MAX_RANGES, 2))
    head, body = await curl("-H", f"Range: bytes={spec}", target)
    assert status(head) == 206
    assert body.count(b"Content-Range: ") == MAX_RANGES
    assert header(head, "Content-Length") == str(len(body))


async def test_many_small_ranges_are_read_in_few_goes(server: Service,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """MAX_RANGES one-byte ranges of a file served from disk: each part was read by its own
    job of the thread pool and written by two writes, 200 jobs for 200 bytes (s47-attack:
    18 ms of the server's CPU for a 1.2 KB request, against 1.75 ms for the whole 3 MB file
    by sendfile; ~55 such requests a second fill a core). Now parts are read together, at
    most a chunk of the file's bytes a job: one job here, the same bytes sent."""
    loop = asyncio.get_running_loop()
    real = loop.run_in_executor
    jobs = 0

    def counting(executor: object, func: object, *args: object) -> object:
        nonlocal jobs
        if isinstance(getattr(func, "__self__", None), web.FileResponse):
            jobs += 1  # the response's own (the server's other work may use the pool too)
        return real(executor, func, *args)  # type: ignore[arg-type]

    spans = [(i, i) for i in range(0, 2 * MAX_RANGES, 2)]
    spec = ",".join(f"{a}-{b}" for a, b in spans)
    target = url(server, "/assets/large.bin")
    await curl("-H", f"Range: bytes={spec}", target)  # the file's stat cached, as in a storm
    monkeypatch.setattr(loop, "run_in_executor", counting)
    head, body = await curl("-H", f"Range: bytes={spec}", target)
    monkeypatch.undo()
    assert status(head) == 206
    kind = header(head, "Content-Type")
    assert kind is not None
    assert body == byteranges(LARGE, spans, kind.split("boundary=", 1)[1])
    assert jobs <= 2, jobs  # the file opened, its parts read (main: 201)


async def test_slow_readers_of_a_large_files_two_ranges_hold_little_each(
        server: Service, tmp_path: Path) -> None:
    """Anyone on the VLAN asks ``Range: bytes=0-0,1-`` of a 2 GiB boot image (two parts
    that add up to the file: allowed) on 20 connections and reads nothing. Every read of
    the answer was planned at once (Multipart.batches: a list, a batch a 256 KiB of the
    file), ~1.6 MB of Python objects a request held while its reader does not read, 6.5
    GB for http.max_connections; now each batch is made when it is read (s48-attack)."""
    import socket
    import tracemalloc

    with open(tmp_path / "assets" / "image.iso", "wb") as f:  # sparse: no disk used
        f.truncate(2 << 30)
    loop = asyncio.get_running_loop()
    socks = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            socks.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", server.http_port))
            await loop.sock_sendall(sock, b"GET /assets/image.iso HTTP/1.1\r\nHost: t\r\n"
                                          b"Range: bytes=0-0,1-\r\n\r\n")
        for sock in socks:  # each answer begun: its head and first part sent
            for _ in range(1000):  # bounded
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("no answer begun")
        for _ in range(20):  # a few turns for the reads and writes that can go on
            await asyncio.sleep(0.05)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        for sock in socks:
            sock.close()
    assert held / 20 < 1_000_000, held  # main: ~1.9 MB a reader


@pytest.mark.parametrize("name", list(FILES))
async def test_head_with_a_range_says_what_a_get_would_send(server: Service,
                                                            name: str) -> None:
    """HEAD answers the status and headers of the GET (RFC 9110 §9.3.2), no body: 206 with
    the multipart's length (main answered 416 to several ranges)."""
    target = f"/assets/{name}"
    for spec in ("bytes=0-99,200-299", "bytes=0-99", "bytes=abc"):
        [got] = await exchange(server.http_port, (
            f"GET {target} HTTP/1.1\r\nHost: t\r\nRange: {spec}\r\nConnection: close\r\n"
            "\r\n").encode())
        assert got.status == (200 if spec == "bytes=abc" else 206)
        assert await _head(server, target, spec) == (
            got.status, str(len(got.body)), got.header("Content-Type")[:20], b""), spec  # type: ignore[index]


async def _head(server: Service, target: str, spec: str
                ) -> tuple[int, str | None, str, bytes]:
    """A HEAD's status, Content-Length, Content-Type (its first 20 characters: a boundary
    is drawn for each answer) and what followed its head (before the close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        writer.write(f"HEAD {target} HTTP/1.1\r\nHost: t\r\nRange: {spec}\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    return (status(text), header(text, "Content-Length"),
            (header(text, "Content-Type") or "")[:20], rest)


async def test_a_range_with_a_matching_if_none_match_is_304(server: Service) -> None:
    """The 304 path wins over Range (RFC 9110 §13.2.2: If-None-Match before Range), as
    nginx answers; an If-Match that fails is 412."""
    for name in FILES:
        head, _ = await curl(url(server, f"/assets/{name}"))
        etag = header(head, "ETag")
        assert etag
        for spec in ("bytes=0-9", "bytes=0-9,20-29", "bytes=999999-"):
            head, body = await curl("-H", f"Range: {spec}", "-H", f"If-None-Match: {etag}",
                                    url(server, f"/assets/{name}"))
            assert (status(head), body) == (304, b"")
        head, _ = await curl("-H", "Range: bytes=0-9,20-29", "-H", 'If-Match: "other"',
                             url(server, f"/assets/{name}"))
        assert status(head) == 412


async def test_generated_answers_ignore_range(server: Service) -> None:
    """An iPXE script or a config is made for each request (an install token, a state):
    a part of one would be spliced onto a part of another, so Range is ignored there and
    the answer is whole, 200, without Accept-Ranges (RFC 9110 §14.2, §14.3)."""
    for target in ("/boot.ipxe", f"/ipxe?mac={HEXHYP}&arch=x86_64"):
        head, whole = await curl(url(server, target))
        assert status(head) == 200 and header(head, "Accept-Ranges") is None
        for spec in ("bytes=0-9", "bytes=0-9,20-29", "bytes=999999-"):
            head, body = await curl("-H", f"Range: {spec}", url(server, target))
            assert (status(head), header(head, "Content-Range")) == (200, None), (target, spec)
            assert body.startswith(b"#!ipxe\n") and len(body) > 10
            if target == "/boot.ipxe":
                assert body == whole


@pytest.mark.parametrize("spec", ["", "0-", "0-99,1000-"])
async def test_a_file_cut_short_while_a_range_of_it_is_sent_ends_the_connection(
        server: Service, tmp_path: Path, spec: str, caplog: pytest.LogCaptureFixture) -> None:
    """An operator copies a new kernel over the old one (``cp`` truncates the file in place)
    while a device reads a range of it: the answer can no longer be as long as its
    Content-Length said, so the connection is closed, as the whole file's is (the front
    door) and as nginx does ("file was truncated"). A single range (sendfile) was left open
    on keep-alive, short: the client waited for bytes that never came until its own
    timeout (s47-attack: curl's --max-time, live). The operator is told which file shrank
    (nginx logs it at alert); each way closed the connection without a line (s48-attack)."""
    path = tmp_path / "assets" / "cut.bin"
    with path.open("wb") as fh:
        fh.truncate(256 << 20)  # sparse: far more than the socket buffers hold
    reader, writer = await asyncio.open_connection("127.0.0.1", server.http_port)
    try:
        asked = f"Range: bytes={spec}\r\n" if spec else ""
        writer.write(f"GET /assets/cut.bin HTTP/1.1\r\nHost: t\r\n{asked}\r\n".encode())
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)).decode("latin-1")
        assert status(head) == (206 if spec else 200), head
        length = int(header(head, "Content-Length") or 0)
        got = len(await asyncio.wait_for(reader.readexactly(1 << 20), 30))
        os.truncate(path, 1000)
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 60):  # main: no EOF
            got += len(chunk)
    finally:
        writer.close()
    assert got < length  # ended at EOF, short: the client knows it has not the whole part
    told = [(r.levelname, r.getMessage()) for r in caplog.records if "shrank" in r.getMessage()]
    assert len(told) == 1 and told[0][0] == "WARNING", told  # main: none
    assert "/assets/cut.bin" in told[0][1] and "of the 268435456 its answer" in told[0][1], told


async def test_ranges_of_a_file_of_several_gib(server: Service, tmp_path: Path) -> None:
    """A 5 GiB sparse image: ranges past 4 GiB (64-bit offsets), several at once, and one
    of 64 MiB, streamed from the file in chunks (the server's peak memory grows by far less
    than the part)."""
    size = 5 << 30
    path = tmp_path / "assets" / "disk.img"
    with path.open("wb") as fh:
        fh.truncate(size)
        for at in (0, 4 << 30, size - 16):
            fh.seek(at)
            fh.write(b"mark@%011d" % at)
    target = url(server, "/assets/disk.img")
    kind = header((await curl("-I", target))[0], "Content-Type")
    assert kind
    head, body = await curl("-r", f"0-15,{4 << 30}-{(4 << 30) + 15},-16", target)
    assert status(head) == 206
    boundary = (header(head, "Content-Type") or "").split("boundary=", 1)[1]
    marks = [(0, 15), (4 << 30, (4 << 30) + 15), (size - 16, size - 1)]
    expected = b"".join(
        b"\r\n--%s\r\nContent-Type: %s\r\nContent-Range: bytes %d-%d/%d\r\n\r\nmark@%011d"
        % (boundary.encode(), kind.encode(), a, b, size, a) for a, b in marks)
    assert body == expected + b"\r\n--%s--\r\n" % boundary.encode()
    # The peak resident size of this process (the server's) from now (proc(5): clear_refs 5).
    Path("/proc/self/clear_refs").write_text("5")
    part = 64 << 20
    got = tmp_path / "part.out"
    head, _ = await curl("-r", f"0-15,{(4 << 30) - part}-{(4 << 30) + 15}", target, out=got)
    peak = int(re.findall(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[0])
    rss = int(re.findall(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text())[0])
    assert status(head) == 206
    assert got.stat().st_size == int(header(head, "Content-Length") or 0) > part
    with got.open("rb") as fh:
        fh.seek(-200, os.SEEK_END)
        assert b"mark@%011d" % (4 << 30) in fh.read()
    assert peak - rss < 16 << 10, f"peak memory {peak - rss} KiB over now for a 64 MiB part"


async def test_several_ranges_over_tls_and_of_a_compressed_sibling(server: Service,
                                                                   tmp_path: Path) -> None:
    """Where sendfile cannot go: over HTTPS (the parts pass the encryption) and from a
    ``.gz`` sibling chosen by Accept-Encoding, whose bytes the ranges then count (as
    aiohttp's FileResponse and nginx's gzip_static answer a single range)."""
    data = FILES["large.bin"]
    context = ssl.create_default_context(cafile=str(server.config.data_dir / "tls" / "ca.pem"))
    context.check_hostname = False
    spans = [(0, 99), (300_000, 300_099)]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"https://127.0.0.1:{server.https_port}/assets/large.bin",
                               headers={"Range": "bytes=0-99,300000-300099"},
                               ssl=context) as r:
            assert r.status == 206
            boundary = r.headers["Content-Type"].split("boundary=", 1)[1]
            assert await r.read() == byteranges(data, spans, boundary)
        packed = gzip.compress(data)
        (tmp_path / "assets" / "large.bin.gz").write_bytes(packed)
        async with session.get(url(server, "/assets/large.bin"), auto_decompress=False,
                               headers={"Range": "bytes=0-9,-10",
                                        "Accept-Encoding": "gzip"}) as r:
            assert (r.status, r.headers["Content-Encoding"]) == (206, "gzip")
            boundary = r.headers["Content-Type"].split("boundary=", 1)[1]
            assert await r.read() == byteranges(
                packed, [(0, 9), (len(packed) - 10, len(packed) - 1)], boundary)
