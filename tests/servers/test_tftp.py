"""The TFTP server on 127.0.0.1 port 0 with real sockets: interop with independent clients
(tftpy, tftp-hpa, busybox) and a hand-rolled client for each edge case of protocols.md §10."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import inspect
import logging
import os
import resource
import socket
import struct
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from netboot.errors import ConfigError
from netboot.model import Blob
from netboot.servers.sockets import SO_TIMESTAMPNS
from netboot.servers.tftp import TftpServer, _Link
from netboot.wire.tftp import (
    Ack,
    Data,
    Error,
    ErrorCode,
    OptionAck,
    ReadRequest,
    WriteRequest,
    encode,
)
from tests.servers.tftp_client import LOOPBACK, DirFiles, RawClient, fetch, lossy_fetch, until

SMALL = bytes(range(256)) * 20 + b"tail"  # 5124 bytes: 11 blocks at 512
EXACT = b"x" * 1024  # a multiple of 512: ends with an empty DATA
TEXT = b"DEFAULT install\nLABEL install\n  KERNEL /k/Image\n"


def pattern(size: int) -> bytes:
    # A 251-byte period (prime): a block served at the wrong offset shows up.
    unit = bytes((i * 7) & 0xFF for i in range(251))
    return (unit * (size // 251 + 1))[:size]


@pytest.fixture(scope="module", autouse=True)
def stamps_on() -> Iterator[None]:
    """Receive stamps on for the whole module. The kernel turns them on by deferred work
    when the first socket asks, and off when the last one closes (net_enable_timestamp):
    with each test's server the only socket asking, a datagram that came while that work
    was still queued (a loaded machine) was stamped when read, after an event it preceded,
    and a test of the late-copy rule saw a copy as a new request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    deadline = time.monotonic() + 2.0
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((LOOPBACK, 0))
        probe.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        probe.settimeout(1.0)  # (a loopback datagram is not lost: a bound, not a retry)
        probe.bind((LOOPBACK, 0))
        while time.monotonic() < deadline:  # until a datagram is stamped on arrival
            sent = time.time_ns()
            sock.sendto(b"x", probe.getsockname())
            time.sleep(0.002)
            _, ancillary, _, _ = probe.recvmsg(16, socket.CMSG_SPACE(16))
            if ancillary and _stamp(ancillary[0][2]) < sent + 1_000_000:
                break
        yield
    finally:
        probe.close()
        sock.close()


def _stamp(data: bytes) -> int:
    seconds, nanoseconds = struct.unpack("@ll", data[:16])
    return int(seconds * 1_000_000_000 + nanoseconds)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "small.bin").write_bytes(SMALL)
    (r / "exact.bin").write_bytes(EXACT)
    (r / "empty.bin").write_bytes(b"")
    (r / "sub" / "file.bin").write_bytes(b"in a subdirectory")
    (r / "pxelinux.cfg").mkdir()
    (r / "pxelinux.cfg" / "default").write_bytes(TEXT)
    (r / "big.bin").write_bytes(pattern(3_000_000))
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (r / "escape").symlink_to(outside)
    return r


@pytest.fixture
def files(root: Path) -> DirFiles:
    return DirFiles(root, {"mem.bin": pattern(100_000), "boot.scr.uimg": b"script"})


async def started(files: DirFiles, **kwargs: object) -> TftpServer:
    server = TftpServer(files, host=LOOPBACK, port=0, **kwargs)  # type: ignore[arg-type]
    await server.start()
    return server


@pytest.fixture
async def server(files: DirFiles, request: pytest.FixtureRequest) -> AsyncIterator[TftpServer]:
    # Long enough that no retransmission interleaves with a test's own steps, even on a
    # loaded CI machine; tests about the timer start their own server. The fixed timer:
    # the round-trip one would resend within milliseconds while a test pauses between steps.
    # A port per transfer (the default), or one data port for all (ONE_PORT, BOTH_MODES).
    single_port = getattr(request, "param", "port_per_transfer") == "single_port"
    srv = await started(files, retransmit=5.0, min_rto=None, single_port=single_port)
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def client() -> AsyncIterator[RawClient]:
    c = RawClient()
    try:
        yield c
    finally:
        c.close()


def addr(server: TftpServer) -> tuple[str, int]:
    return LOOPBACK, server.port


# The ``server`` fixture in tftp.single_port mode (every transfer on its link's data port,
# kept sockets handed to any client): for what only that mode does. BOTH_MODES: each.
ONE_PORT = pytest.mark.parametrize("server", ["single_port"], indirect=True)
BOTH_MODES = pytest.mark.parametrize("server", ["port_per_transfer", "single_port"],
                                     indirect=True)


# ------------------------------------------------------------------ independent clients


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("small.bin", {}, SMALL),
        ("small.bin", {"blksize": 1468}, SMALL),
        ("big.bin", {"blksize": 1468, "tsize": 0}, pattern(3_000_000)),
        ("exact.bin", {"tsize": 0}, EXACT),
        ("mem.bin", {"blksize": 1024}, pattern(100_000)),
        ("empty.bin", {}, b""),
    ],
    ids=["plain", "blksize", "blksize-tsize", "exact-tsize", "memory", "empty"],
)
async def test_tftpy_client(
    server: TftpServer, tmp_path: Path, name: str, options: dict[str, int], expected: bytes
) -> None:
    import tftpy

    out = tmp_path / "out"

    def download() -> None:
        client = tftpy.TftpClient(LOOPBACK, server.port, options=dict(options))
        client.download(name, str(out), timeout=5)

    await asyncio.wait_for(asyncio.to_thread(download), 60)
    assert out.read_bytes() == expected
    await until(lambda: server.stats.completed == 1)


async def run(args: list[str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


needs_hpa = pytest.mark.requires("tftp", "tftp-hpa")
needs_busybox = pytest.mark.requires("busybox", "busybox-static")


@needs_hpa
@pytest.mark.parametrize(
    ("name", "expected"), [("small.bin", SMALL), ("big.bin", None)], ids=["small", "big"]
)
async def test_tftp_hpa_binary(
    server: TftpServer, tmp_path: Path, name: str, expected: bytes | None
) -> None:
    rc, out = await run(
        ["tftp", LOOPBACK, str(server.port), "-m", "binary", "-c", "get", name, "out"], tmp_path
    )
    assert rc == 0, out
    want = expected if expected is not None else pattern(3_000_000)
    assert (tmp_path / "out").read_bytes() == want


@needs_hpa
async def test_tftp_hpa_netascii_of_a_unix_text_file(server: TftpServer, tmp_path: Path) -> None:
    # Each LF goes out as CR LF and tftp-hpa's ascii mode turns it back: a file with LF
    # arrives unchanged (CR and CR LF: tests/servers/test_tftp_modes.py).
    rc, out = await run(
        [
            "tftp",
            LOOPBACK,
            str(server.port),
            "-m",
            "ascii",
            "-c",
            "get",
            "pxelinux.cfg/default",
            "out",
        ],
        tmp_path,
    )
    assert rc == 0, out
    assert (tmp_path / "out").read_bytes() == TEXT


@needs_hpa
async def test_tftp_hpa_not_found(server: TftpServer, tmp_path: Path) -> None:
    _rc, out = await run(
        ["tftp", LOOPBACK, str(server.port), "-m", "binary", "-c", "get", "nope.bin", "out"],
        tmp_path,
    )
    assert "not found" in out.lower() or "error code 1" in out.lower(), out


@needs_busybox
@pytest.mark.parametrize("blksize", [512, 1468, 65464])  # busybox itself refuses > 65464
async def test_busybox_tftp(server: TftpServer, tmp_path: Path, blksize: int) -> None:
    rc, out = await run(
        [
            "busybox",
            "tftp",
            "-g",
            "-r",
            "big.bin",
            "-l",
            "out",
            "-b",
            str(blksize),
            LOOPBACK,
            str(server.port),
        ],
        tmp_path,
    )
    assert rc == 0, out
    assert (tmp_path / "out").read_bytes() == pattern(3_000_000)


# ------------------------------------------------------------------- negotiation edges


async def test_uppercase_option_names_are_honoured_and_echoed(
    server: TftpServer, client: RawClient
) -> None:
    got = await fetch(client, addr(server), "small.bin", [("BLKSIZE", "1024"), ("TSize", "0")])
    assert got.oack is not None
    assert got.oack.options == (("BLKSIZE", "1024"), ("TSize", str(len(SMALL))))
    assert got.data == SMALL
    assert len(got.wire_blocks) == len(SMALL) // 1024 + 1


async def test_timeout_is_echoed_exactly(server: TftpServer, client: RawClient) -> None:
    # U-Boot's RRQ (net/tftp.c): timeout 5, tsize 0, blksize 1468.
    opts = [("timeout", "5"), ("tsize", "0"), ("blksize", "1468")]
    got = await fetch(client, addr(server), "big.bin", opts)
    assert got.oack is not None
    assert got.oack.options == (("timeout", "5"), ("tsize", "3000000"), ("blksize", "1468"))
    assert got.data == pattern(3_000_000)


async def test_only_requested_options_in_oack(server: TftpServer, client: RawClient) -> None:
    got = await fetch(client, addr(server), "small.bin", [("tsize", "0"), ("color", "blue")])
    assert got.oack is not None
    assert got.oack.options == (("tsize", str(len(SMALL))),)


async def test_blksize_70000_is_clamped_without_crash(
    server: TftpServer, client: RawClient
) -> None:
    got = await fetch(client, addr(server), "big.bin", [("blksize", "70000")])
    assert got.oack is not None and got.oack.option("blksize") == "1468"  # mtu 1500 - 32
    assert got.data == pattern(3_000_000)
    # ... and the server still serves (tftpy's listener died here, protocols.md §6.3).
    with RawClient() as other:
        assert (await fetch(other, addr(server), "small.bin")).data == SMALL


async def test_blksize_below_8_is_ignored(server: TftpServer, client: RawClient) -> None:
    got = await fetch(client, addr(server), "small.bin", [("blksize", "4")])
    assert got.oack is None  # nothing acceptable was asked: DATA 1 straight away
    assert got.data == SMALL


async def test_exact_multiple_ends_with_empty_block(server: TftpServer, client: RawClient) -> None:
    got = await fetch(client, addr(server), "exact.bin")
    assert got.data == EXACT
    assert got.wire_blocks == [1, 2, 3]


async def test_windowsize_4_with_a_dropped_block(files: DirFiles, client: RawClient) -> None:
    server = await started(files, retransmit=0.05)
    try:
        opts = [("blksize", "512"), ("windowsize", "4")]
        # Block 7 is inside a window (5-8): the client ACKs 6 and the server goes on from 7
        # at once. Block 9 starts a window: the client's ACK 8 is a duplicate, so the
        # retransmission timer resends the window.
        got = await fetch(client, addr(server), "mem.bin", opts, drop=[7, 9])
        assert got.oack is not None and got.oack.option("windowsize") == "4"
        assert got.data == pattern(100_000)
        await until(lambda: server.stats.completed == 1)
    finally:
        await server.close()


@pytest.mark.parametrize("window", [1, 16])
async def test_rollover_past_65535_blocks(
    files: DirFiles, root: Path, client: RawClient, window: int
) -> None:
    size = 65_600 * 512 + 100  # 33,587,300 bytes: past the wrap at 33,553,920
    data = pattern(size)
    (root / "rollover.bin").write_bytes(data)
    server = await started(files, retransmit=1.0)
    try:
        opts = [("blksize", "512"), ("windowsize", str(window))]
        got = await fetch(client, addr(server), "rollover.bin", opts, timeout=5)
    finally:
        await server.close()
    assert hashlib.sha256(got.data).digest() == hashlib.sha256(data).digest()
    blocks = got.wire_blocks
    assert len(blocks) == 65_601
    assert blocks[65_534:65_537] == [65_535, 0, 1]  # wraps to 0, as U-Boot expects
    assert blocks[-1] == 65_601 % 65_536


# --------------------------------------------------------------------- transfer edges


async def test_duplicate_acks_do_not_cause_resends(files: DirFiles, client: RawClient) -> None:
    # A long fixed retransmit interval keeps the timer out of it: any extra DATA would come
    # from the duplicate ACKs (Sorcerer's Apprentice) and would arrive before DATA 5. Fixed:
    # with the round-trip timer (min_rto) the three ACKs above set it to a few ms, and on a
    # loaded machine the test's own pause before ACK 4 resent DATA 4, as it should.
    server = await started(files, retransmit=30.0, min_rto=None)
    try:
        client.rrq(addr(server), "small.bin")
        for n in range(1, 4):
            pkt, tid = await client.recv()
            assert pkt == Data(n, SMALL[(n - 1) * 512 : n * 512])
            client.send(Ack(n), tid)
        client.send(Ack(3), tid)
        client.send(Ack(3), tid)
        client.send(Ack(2), tid)  # an old one, too
        pkt, _ = await client.recv()
        assert isinstance(pkt, Data) and pkt.block == 4
        client.send(Ack(4), tid)
        pkt, _ = await client.recv()
        assert isinstance(pkt, Data) and pkt.block == 5
    finally:
        await server.close()


async def test_error_after_oack_is_a_quiet_probe(server: TftpServer, client: RawClient) -> None:
    client.rrq(addr(server), "big.bin", [("tsize", "0")])
    pkt, tid = await client.recv()
    assert isinstance(pkt, OptionAck) and pkt.option("tsize") == "3000000"
    client.send(Error(ErrorCode.OPTION_NEGOTIATION, "just wanted the size"), tid)
    await until(lambda: server.transfers == 0)
    assert server.stats.probes == 1 and server.stats.failed == 0


async def test_duplicate_rrq_is_not_a_second_transfer(
    server: TftpServer, client: RawClient
) -> None:
    client.rrq(addr(server), "small.bin")
    first, tid = await client.recv()
    client.rrq(addr(server), "small.bin")  # as if DATA 1 had been lost
    again, tid2 = await client.recv()
    assert first == again and isinstance(first, Data) and first.block == 1
    assert tid2 == tid
    assert server.stats.started == 1 and server.stats.duplicate_requests == 1
    client.send(Ack(1), tid)
    pkt, _ = await client.recv()
    assert isinstance(pkt, Data) and pkt.block == 2


async def test_a_copy_of_an_rrq_read_after_its_transfer_ended_starts_no_transfer(
    server: TftpServer, client: RawClient
) -> None:
    """In a storm a client resends its RRQ while the answer is slow, and the listener reads
    the copy only after the transfer the first one started has ended: the client ended its
    size probe with an ERROR, or acknowledged the last block. Such a copy was sent before
    the client had our answer; served, it was a second transfer to a port nobody reads,
    held until ``first_retries`` ran out and counted against ``max_transfers`` (a
    1,000-device storm: 834 of them, and the limit of 1,024 hit). It reached the kernel
    before the end, which tells it from the same request sent after the end (next test):
    here the listener is not read while the copy comes and the transfer ends."""
    listener, _ = server._listeners[0]
    probe = [("tsize", "0"), ("blksize", "1468")]
    client.rrq(addr(server), "big.bin", probe)
    oack, tid = await client.recv()
    assert isinstance(oack, OptionAck)
    listener.pause_reading()
    client.rrq(addr(server), "big.bin", probe)  # the copy, queued until after the end
    client.send(Error(ErrorCode.OPTION_NEGOTIATION, "size probe"), tid)
    await until(lambda: server.stats.probes == 1 and server.transfers == 0)
    assert server.stats.requests == 1
    listener.resume_reading()
    await until(lambda: server.stats.requests == 2)
    assert server.transfers == 0 and server.stats.duplicate_requests == 1
    assert await client.nothing()

    with RawClient() as other:
        other.rrq(addr(server), "boot.scr.uimg")
        data, tid = await other.recv()
        assert isinstance(data, Data) and data.data == b"script"  # one block: the last
        listener.pause_reading()
        other.rrq(addr(server), "boot.scr.uimg")  # a copy of the loader's RRQ
        other.send(Ack(1), tid)
        await until(lambda: server.stats.completed == 1)
        listener.resume_reading()
        await until(lambda: server.stats.requests == 4)
        assert server.transfers == 0 and server.stats.duplicate_requests == 2
        assert await other.nothing()
    assert server.stats.started == 2

    # Another request from the same port is a new transfer (a firmware reusing its port
    # for the download after the probe), served at once.
    got = await fetch(client, addr(server), "big.bin", [("blksize", "1468"), ("windowsize", "4")])
    assert got.data == pattern(3_000_000)
    await until(lambda: server.stats.completed == 2)
    assert server.stats.started == 3



LOADER = [("blksize", "1468"), ("windowsize", "4")]


async def test_the_same_rrq_sent_again_after_its_transfer_ended_is_served_at_once(
    server: TftpServer, client: RawClient
) -> None:
    """A request byte for byte the one of a transfer that has ended, from the same port,
    sent after that end, is a new request: U-Boot with a fixed ``tftpsrcp`` fetching the
    file again, a port reused behind a NAT, two devices behind one relay address. dnsmasq
    serves it at once; a 5 s window alone ignored it until the client's next
    retransmission after the window (U-Boot: 5 s; a storm's devices, s19-stall)."""
    probe = [("tsize", "0"), ("blksize", "1468")]
    client.rrq(addr(server), "big.bin", probe)
    oack, tid = await client.recv()
    assert isinstance(oack, OptionAck)
    client.send(Error(ErrorCode.OPTION_NEGOTIATION, "size probe"), tid)
    await until(lambda: server.stats.probes == 1 and server.transfers == 0)
    client.rrq(addr(server), "big.bin", probe)  # the same probe, after the end
    oack, tid = await client.recv()
    assert isinstance(oack, OptionAck) and oack.option("tsize") == "3000000"
    client.send(Error(ErrorCode.OPTION_NEGOTIATION, "size probe"), tid)
    await until(lambda: server.stats.probes == 2 and server.transfers == 0)

    with RawClient() as other:
        for completed in (1, 2):
            other.rrq(addr(server), "boot.scr.uimg")  # the same file, again
            data, tid = await other.recv()
            assert isinstance(data, Data) and data.data == b"script"
            other.send(Ack(1), tid)
            await until(lambda n=completed: server.stats.completed == n)  # type: ignore[misc]
    assert server.stats.started == 4 and server.stats.duplicate_requests == 0


async def test_clients_past_the_late_copy_window_are_forgotten_when_quiet(
    server: TftpServer, client: RawClient
) -> None:
    """Once quiet after a storm (Service.forget_idle) the clients whose transfer ended over
    ``_STALE_COPY`` seconds ago are forgotten: a 1,000-device storm's ~2,000 stayed until
    4,096 newer transfers ended (s35-mem). One that ended within the window is kept (a copy
    of its RRQ read late is still ignored), and a forgotten client's same request is served
    as it was (past the window, it was anyway)."""
    from netboot.servers.tftp import _STALE_COPY

    with RawClient() as other:
        other.rrq(addr(server), "boot.scr.uimg")
        data, tid = await other.recv()
        assert isinstance(data, Data)
        other.send(Ack(1), tid)
        await until(lambda: server.stats.completed == 1)
        ended = time.monotonic()
        got = await fetch(client, addr(server), "big.bin", LOADER)
        assert got.data == pattern(3_000_000)
        await until(lambda: server.stats.completed == 2)
        assert len(server._ended) == 2
        server.forget_ended()  # both within the window: kept
        assert len(server._ended) == 2
        server._ended[("127.0.0.9", 9)] = None  # an end without its request: kept
        server.forget_ended(ended + _STALE_COPY + 0.001)  # the first one only is past it
        assert list(server._ended) == [client.address, ("127.0.0.9", 9)]
        server.forget_ended(time.monotonic() + _STALE_COPY)
        assert list(server._ended.values()) == [None]
        other.rrq(addr(server), "boot.scr.uimg")  # the same request: served
        data, tid = await other.recv()
        assert isinstance(data, Data) and data.data == b"script"
        other.send(Ack(1), tid)
        await until(lambda: server.stats.completed == 3)
    assert server.stats.duplicate_requests == 0


async def test_a_new_request_from_the_port_of_a_running_transfer_replaces_it(
    server: TftpServer, client: RawClient
) -> None:
    """A client that read the size from the OACK and asks for the file from the same port
    without an ERROR (the probe abandoned, as a firmware may) gets the new request's answer
    at once: before, the new RRQ counted as a copy of the probe's, the probe's OACK (tsize,
    no windowsize) was sent again, and the client's ACK 0 reached no transfer."""
    client.rrq(addr(server), "big.bin", [("tsize", "0"), ("blksize", "1468")])
    oack, _ = await client.recv()
    assert isinstance(oack, OptionAck) and oack.option("tsize") == "3000000"
    got = await fetch(client, addr(server), "big.bin", LOADER)
    assert got.data == pattern(3_000_000)
    assert got.oack is not None and got.oack.option("windowsize") == "4"
    assert got.oack.option("tsize") is None
    await until(lambda: server.stats.completed == 1 and server.transfers == 0)
    assert server.stats.started == 2 and server.stats.duplicate_requests == 0
    assert server.stats.probes == 1  # the abandoned probe, not a failure


async def test_a_download_whose_request_is_read_before_the_probes_error_is_served(
    server: TftpServer, client: RawClient
) -> None:
    """The storm's one failed device (benchmarks/README.md, session 15): its size probe and
    its download came from the same port (the kernel's random choice for a new socket, 1 in
    ~28,000), and the listener, still reading a burst of other RRQs, read the download's
    RRQ before the probe's socket read the ERROR sent ahead of it. The RRQ counted as a copy
    of the probe's, the probe's OACK went out again, the ERROR then ended the probe, and
    the client's ACK 0 reached no transfer: 7 s without progress. Here another client's RRQ
    is queued on the listener first, so the listener is ahead of the probe's socket in the
    loop's wake-up and reads the download's RRQ in the same burst."""
    client.rrq(addr(server), "big.bin", [("tsize", "0"), ("blksize", "1468")])
    oack, tid = await client.recv()
    assert isinstance(oack, OptionAck)
    with RawClient() as other:
        other.rrq(addr(server), "small.bin")
        client.send(Error(ErrorCode.OPTION_NEGOTIATION, "size probe"), tid)
        got = await fetch(client, addr(server), "big.bin", LOADER)
        assert got.data == pattern(3_000_000)
        assert got.oack is not None and got.oack.option("windowsize") == "4"
        first, _ = await other.recv()
        assert isinstance(first, Data) and first.block == 1
    await until(lambda: server.stats.completed == 1 and server.stats.probes == 1)


async def test_a_request_for_another_file_while_the_last_block_is_resent_is_served(
    files: DirFiles, client: RawClient
) -> None:
    """U-Boot sends every RRQ of a boot from one port when ``tftpsrcp`` is set (and from
    1024 + its timer modulo 3072 otherwise): when its last ACK of a file is lost it has
    already moved on, and its next RRQ comes from the port of a transfer the server still
    resends. That request is served at once, not after the old transfer gives up."""
    srv = await started(files, retransmit=0.5, min_rto=None)
    try:
        client.rrq(addr(srv), "small.bin")
        blocks = 0
        while True:
            pkt, tid = await client.recv()
            assert isinstance(pkt, Data)
            blocks += 1
            if len(pkt.data) < 512:
                break  # the last block: its ACK "lost"
            client.send(Ack(pkt.block), tid)
        got = await fetch(client, addr(srv), "boot.scr.uimg")
        assert got.data == b"script"
        assert srv.stats.started == 2 and srv.stats.duplicate_requests == 0
    finally:
        await srv.close()

async def test_the_listener_reads_a_burst_of_requests_per_wake_up(
    server: TftpServer
) -> None:
    """A storm's RRQs waiting together are read together: asyncio's own UDP transport
    read one datagram per trip round the loop, which in a storm left the listener seconds
    behind (clients resent their RRQs meanwhile, see the test above)."""
    clients = [RawClient() for _ in range(20)]
    try:
        for c in clients:  # on loopback each is queued on the listener by the time sendto returns
            c.rrq(addr(server), "small.bin")
        for _ in range(3):  # a few trips round the loop, not twenty
            await asyncio.sleep(0)
        assert server.stats.requests == 20
        for c in clients:
            pkt, _ = await c.recv()
            assert isinstance(pkt, Data) and pkt.block == 1
    finally:
        for c in clients:
            c.close()


async def test_a_transfer_whose_first_answer_meets_a_closed_port_ends_at_once(
    files: DirFiles
) -> None:
    """The client's RRQ is read after the client closed its port (it gave up, or this is
    a late copy): the OACK comes back as an ICMP port unreachable, and the transfer ends
    then instead of holding its slot through ``first_retries`` (here 3 x 30 s)."""
    server = await started(files, retransmit=30.0, min_rto=None)
    try:
        gone = RawClient()
        gone.rrq(addr(server), "big.bin", [("tsize", "0"), ("blksize", "1468")])
        gone.close()  # before the server has read the RRQ (the test holds the loop)
        await until(lambda: server.stats.started == 1 and server.transfers == 0)
        assert server.stats.failed == 1 and server.stats.retransmissions == 0
        with RawClient() as real:  # and the server serves the next client as ever
            got = await fetch(real, addr(server), "small.bin")
            assert got.data == SMALL
    finally:
        await server.close()


async def _the_rest(client: RawClient, first: object, tid: tuple[str, int]) -> bytes:
    """A lock-step transfer at 512 from its first DATA to its end: the file's bytes."""
    out = bytearray(first.data if isinstance(first, Data) else b"")
    for n in range(1, 20):
        client.send(Ack(n), tid)
        pkt, _ = await client.recv()
        assert isinstance(pkt, Data) and pkt.block == n + 1
        out += pkt.data
        if len(pkt.data) < 512:
            client.send(Ack(pkt.block), tid)
            break
    return bytes(out)


@ONE_PORT
async def test_unknown_tid_gets_error_5_and_transfer_goes_on(
    server: TftpServer, client: RawClient
) -> None:
    client.rrq(addr(server), "small.bin")
    pkt, tid = await client.recv()
    with RawClient() as stranger:
        stranger.send(Ack(1), tid)
        err, src = await stranger.recv()
        assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_TID
        assert src == tid
    assert await _the_rest(client, pkt, tid) == SMALL
    assert server.stats.unknown_tid == 1


async def test_a_stranger_to_a_transfers_port_finds_no_socket_and_the_transfer_goes_on(
    server: TftpServer, client: RawClient
) -> None:
    """By default a transfer's port is its socket's alone, connected to its client: what
    anyone else sends there finds no socket, so the kernel answers ICMP port unreachable
    (as for tftpd-hpa), not ERROR 5 (RFC 1350 §4's "should"; single-port mode sends it, the
    test above), and the transfer goes on."""
    client.rrq(addr(server), "small.bin")
    pkt, tid = await client.recv()
    with RawClient() as stranger, RawClient("127.0.0.2") as elsewhere:
        stranger.send(Ack(1), tid)
        elsewhere.send(Ack(1), tid)
        assert await stranger.nothing() and await elsewhere.nothing()
    assert await _the_rest(client, pkt, tid) == SMALL
    assert server.stats.unknown_tid == 0


async def test_forged_acks_to_the_port_of_an_earlier_transfer_send_nothing_to_the_victim(
        server: TftpServer) -> None:
    """The reflection s35-attack measured (benchmarks/README.md): a host makes a transfer
    of its own and learns the server's port, then forges an RRQ with windowsize 64 from a
    victim's address and the victim's ACKs to that port. With one port for all transfers
    each forged ACK sent a 64-block window to the victim (101 datagrams, 10.3 MB); with a
    port per transfer the ACKs reach no transfer of the victim's, and the victim gets the
    OACK and its retransmissions only. (The victim's socket sends what the attacker
    would forge from its address.)"""
    with RawClient() as attacker, RawClient("127.0.0.2") as victim:
        learnt = (await fetch(attacker, addr(server), "small.bin")).tid
        await until(lambda: server.stats.completed == 1)
        victim.rrq(addr(server), "big.bin", [("blksize", "1024"), ("windowsize", "64")])
        first, tid = await victim.recv()
        assert isinstance(first, OptionAck)
        for block in range(0, 64 * 20, 64):
            victim.send(Ack(block), learnt)
        reflected = []
        with contextlib.suppress(TimeoutError):
            while True:
                reflected.append((await victim.recv(timeout=0.5))[0])
        assert len([p for p in reflected if isinstance(p, Data)]) == 0
        assert server._transfers[victim.address].sender.acked == 0
        assert tid != learnt


async def test_retransmits_with_backoff_then_gives_up(files: DirFiles, client: RawClient) -> None:
    server = await started(files, retransmit=0.02, max_retries=3)
    try:
        client.rrq(addr(server), "small.bin")
        pkt, tid = await client.recv()
        assert pkt == Data(1, SMALL[:512])
        client.send(Ack(1), tid)  # the client answers once, then goes silent
        seen = []
        for _ in range(10):
            pkt, _ = await client.recv()
            seen.append(pkt)
            if isinstance(pkt, Error):
                break
        assert seen[:4] == [Data(2, SMALL[512:1024])] * 4  # first send + 3 retransmissions
        assert seen[4] == Error(ErrorCode.NOT_DEFINED, "timed out")
        await until(lambda: server.transfers == 0)
        assert server.stats.failed == 1
    finally:
        await server.close()


async def test_a_sweep_reads_the_acks_already_queued_before_it_resends(
        files: DirFiles, client: RawClient) -> None:
    """uvloop runs a due timer before it polls: after a long loop iteration the sweep came
    before the ACKs that arrived meanwhile and resent windows already acknowledged."""
    server = await started(files, retransmit=0.02, min_rto=None, max_retries=3)
    try:
        client.rrq(addr(server), "small.bin")
        pkt, tid = await client.recv()
        assert pkt == Data(1, SMALL[:512])
        client.send(Ack(1), tid)  # queued on the transfer's socket, not read yet ...
        time.sleep(0.05)  # ... while the loop is busy past the transfer's deadline
        server._on_sweep()  # the sweep the loop then runs first
        pkt, _ = await client.recv()
        assert pkt == Data(2, SMALL[512:1024])  # not block 1 again
        for block in range(2, 12):
            client.send(Ack(block), tid)
            if block < 11:
                pkt, _ = await client.recv()
                assert pkt == Data(block + 1, SMALL[block * 512:(block + 1) * 512])
        await until(lambda: server.transfers == 0)
        assert server.stats.completed == 1
    finally:
        await server.close()


async def test_lost_oack_is_resent(files: DirFiles, client: RawClient) -> None:
    server = await started(files, retransmit=0.02, max_retries=5)
    try:
        client.rrq(addr(server), "small.bin", [("blksize", "1024")])
        first, tid = await client.recv()
        second, tid2 = await client.recv()  # not acknowledged: sent again by the timer
        assert first == second == OptionAck((("blksize", "1024"),)) and tid == tid2
        client.send(Ack(0), tid)
        pkt = None
        for _ in range(10):  # skip OACK retransmissions already in flight
            pkt, _ = await client.recv()
            if isinstance(pkt, Data):
                break
        assert pkt == Data(1, SMALL[:1024])
    finally:
        await server.close()


# ----------------------------------------------------------------------- path handling


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("../secret.txt", ErrorCode.ACCESS_VIOLATION),
        ("sub/../../secret.txt", ErrorCode.ACCESS_VIOLATION),
        ("..\\secret.txt", ErrorCode.ACCESS_VIOLATION),
        ("escape", ErrorCode.ACCESS_VIOLATION),  # symlink inside the root pointing out
        ("/etc/passwd", ErrorCode.FILE_NOT_FOUND),  # absolute: taken relative to the root
        ("nope.bin", ErrorCode.FILE_NOT_FOUND),
        ("sub", ErrorCode.FILE_NOT_FOUND),  # a directory
        ("", ErrorCode.FILE_NOT_FOUND),
    ],
)
async def test_paths_outside_the_root_are_refused(
    server: TftpServer, client: RawClient, name: str, code: ErrorCode
) -> None:
    client.rrq(addr(server), name)
    pkt, _ = await client.recv()
    assert isinstance(pkt, Error) and pkt.code == code, pkt


async def test_nul_in_the_name_is_not_a_path(server: TftpServer, client: RawClient) -> None:
    # The name ends at the first NUL; what follows is read as the mode and refused.
    client.send(b"\x00\x01small.bin\x00../../etc/passwd\x00", addr(server))
    pkt, _ = await client.recv()
    assert isinstance(pkt, Error) and pkt.code == ErrorCode.ILLEGAL_OPERATION


@pytest.mark.parametrize("name", ["sub\\file.bin", "/sub/file.bin", "\\sub\\file.bin"])
async def test_backslash_and_leading_slash(
    server: TftpServer, client: RawClient, name: str
) -> None:
    got = await fetch(client, addr(server), name)
    assert got.data == b"in a subdirectory"


async def test_wrq_is_refused(server: TftpServer, client: RawClient, root: Path) -> None:
    client.send(WriteRequest("upload.bin", "octet"), addr(server))
    pkt, _ = await client.recv()
    assert isinstance(pkt, Error) and pkt.code == ErrorCode.ACCESS_VIOLATION
    assert not (root / "upload.bin").exists()


async def test_content_bug_is_error_0(server: TftpServer, client: RawClient) -> None:
    client.rrq(addr(server), "boom")
    pkt, _ = await client.recv()
    assert isinstance(pkt, Error) and pkt.code == ErrorCode.NOT_DEFINED


async def test_unsupported_mode(server: TftpServer, client: RawClient) -> None:
    client.rrq(addr(server), "small.bin", mode="mail")
    pkt, _ = await client.recv()
    assert isinstance(pkt, Error) and pkt.code == ErrorCode.ILLEGAL_OPERATION


# ------------------------------------------------------------------ robustness, limits


async def test_malformed_datagrams_do_not_stop_the_server(
    server: TftpServer, client: RawClient
) -> None:
    junk = [
        b"\x00",
        b"\x00\x01no-terminator",
        b"\x00\x01name\x00octet\x00blksize\x00",
        b"\x00\x09abc",
        b"\xff\xff",
        b"\x00\x01\xff\xfe\x00octet\x00",
        b"\x00\x01" + b"a" * 5000 + b"\x00octet\x00",
        b"\x00\x04\x00\x01",  # an ACK to the listener
    ]
    with RawClient() as other:  # (the malformed requests are answered ERROR 4: not ours)
        for datagram in junk:
            other.send(datagram, addr(server))
    got = await fetch(client, addr(server), "small.bin")
    assert got.data == SMALL


async def test_malformed_datagram_on_a_transfer_is_ignored(
    server: TftpServer, client: RawClient
) -> None:
    client.rrq(addr(server), "small.bin", [("blksize", "1024")])
    pkt, tid = await client.recv()
    assert isinstance(pkt, OptionAck)
    client.send(b"\x00", tid)
    client.send(b"\x00\x07zz", tid)
    client.send(Ack(0), tid)
    pkt, _ = await client.recv()
    for _ in range(10):  # a retransmitted OACK may still be in flight
        if not isinstance(pkt, OptionAck):
            break
        pkt, _ = await client.recv()
    assert pkt == Data(1, SMALL[:1024])


async def test_concurrent_transfer_bound(files: DirFiles,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files, max_transfers=2, retransmit=30.0)
    a, b, c = RawClient(), RawClient(), RawClient()
    try:
        for cl in (a, b):
            cl.rrq(addr(server), "small.bin")
            pkt, _ = await cl.recv()
            assert isinstance(pkt, Data)
        c.rrq(addr(server), "small.bin")
        # Dropped without a reply, so the client retries instead of aborting its boot.
        await until(lambda: server.stats.busy == 1)
        assert server.transfers == 2
        # Not silent: one line for the request, naming the setting.
        busy = [r for r in caplog.records if "tftp.max_transfers" in r.getMessage()]
        assert len(busy) == 1 and busy[0].levelno == logging.WARNING
        # a gives up; c's retransmitted RRQ is then served.
        pkt_a_tid = await _tid_of(server, a)
        a.send(Error(ErrorCode.NOT_DEFINED, "bye"), pkt_a_tid)
        await until(lambda: server.transfers == 1)
        got = await fetch(c, addr(server), "small.bin")
        assert got.data == SMALL
    finally:
        for cl in (a, b, c):
            cl.close()
        await server.close()


async def test_per_client_bound(files: DirFiles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files, max_transfers=10, max_per_client=1, retransmit=30.0)
    a, b = RawClient(), RawClient()
    try:
        a.rrq(addr(server), "small.bin")
        assert isinstance((await a.recv())[0], Data)
        b.rrq(addr(server), "small.bin")  # same address 127.0.0.1, another port
        # Answered, not dropped: a device behind a busy relay or NAT sees why it failed.
        pkt, _ = await b.recv()
        assert pkt == Error(ErrorCode.NOT_DEFINED,
                            "server busy: too many transfers from your address")
        assert server.stats.busy == 1 and server.transfers == 1
        busy = [r for r in caplog.records if "tftp.max_per_client" in r.getMessage()]
        assert len(busy) == 1 and busy[0].levelno == logging.WARNING
    finally:
        a.close()
        b.close()
        await server.close()


async def test_requests_from_many_addresses_write_a_bounded_number_of_lines(
        files: DirFiles, caplog: pytest.LogCaptureFixture) -> None:
    # Each source address had a budget of its own (5 lines a minute) and nothing bounded
    # them together: RRQs for a missing file from 400 addresses (spoofed UDP on the VLAN;
    # here 127.0.x.y, all loopback) wrote 400 lines, one a datagram (s35-attack).
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files)
    try:
        for i in range(400):
            with RawClient(f"127.0.{1 + i // 250}.{1 + i % 250}") as c:
                c.rrq(addr(server), "missing.bin")
                pkt, _ = await c.recv()
                assert pkt == Error(ErrorCode.FILE_NOT_FOUND, "file not found")
        lines = [r for r in caplog.records if "not found" in r.getMessage()]
        assert server.stats.not_found == 400
        assert len(lines) == 200
    finally:
        await server.close()


async def _tid_of(server: TftpServer, client: RawClient) -> tuple[str, int]:
    return server._transfers[client.address].tid


async def test_close_ends_running_transfers(files: DirFiles, client: RawClient) -> None:
    server = await started(files, retransmit=30.0)
    client.rrq(addr(server), "big.bin")
    await client.recv()
    assert server.transfers == 1
    await server.close()
    assert server.transfers == 0


async def test_interface_binding_on_loopback(files: DirFiles, client: RawClient) -> None:
    server = await started(files, interfaces=["lo"])  # SO_BINDTODEVICE: root, as in CI
    try:
        got = await fetch(client, addr(server), "small.bin", [("blksize", "1468")])
        assert got.data == SMALL
    finally:
        await server.close()


# ----------------------------------------------------------------------- start-up errors


async def test_port_in_use_is_a_config_error(files: DirFiles) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        port = taken.getsockname()[1]
        server = TftpServer(files, host=LOOPBACK, port=port)
        with pytest.raises(ConfigError) as info:
            await server.start()
    assert info.value.key == "tftp.port"
    assert str(port) in str(info.value) and "--tftp-port" in str(info.value)


def test_privilege_error_names_the_flag() -> None:
    exc = TftpServer._bind_error(OSError(errno.EACCES, "Permission denied"), "0.0.0.0", 69, None)
    assert exc.key == "tftp.port"
    assert "69" in str(exc) and "CAP_NET_BIND_SERVICE" in str(exc) and "--tftp-port" in str(exc)


def test_constructor_binds_nothing(files: DirFiles) -> None:
    server = TftpServer(files, host=LOOPBACK, port=0)
    assert server.port == 0 and server.transfers == 0


async def test_a_flood_of_unanswered_requests_cannot_hold_the_slots(
        files: DirFiles, caplog: pytest.LogCaptureFixture) -> None:
    """400 RRQs from 8 loopback addresses that never ACK fill every slot; they are given up
    after first_retries, and a real client that retransmits its RRQ (as boot ROMs do) gets
    its file. Log lines stay bounded and no traceback appears."""
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files, max_transfers=64, max_per_client=32, retransmit=0.5)
    # One socket per request: every RRQ is a new client TID (a retransmission would reuse it).
    spoofers = [RawClient(f"127.0.0.{n % 8 + 2}") for n in range(400)]
    real = RawClient()
    try:
        for n, spoofer in enumerate(spoofers):
            spoofer.send(ReadRequest("small.bin", "octet", ()), addr(server))
            if n % 10 == 9:
                await asyncio.sleep(0.01)  # pace the burst below the socket's buffer
        # Every slot is held by a client that will never answer.
        await until(lambda: server.transfers == 64 and server.stats.busy > 0, timeout=30)
        got: bytes | None = None
        for _ in range(40):  # a boot ROM's RRQ retransmissions, bounded
            real.rrq(addr(server), "small.bin")
            try:
                pkt, tid = await real.recv(timeout=1.0)
            except TimeoutError:
                continue
            assert isinstance(pkt, Data), pkt
            data = pkt.data
            while len(pkt.data) == 512:
                real.send(Ack(pkt.block), tid)
                block = pkt.block
                # A block sent again (the round-trip timer fired while the ACK was on its
                # way, likely with the loop this busy) is a duplicate, as for any client.
                for _ in range(20):
                    pkt, _ = await real.recv()
                    assert isinstance(pkt, Data)
                    if pkt.block != block:
                        break
                assert pkt.block == block + 1
                data += pkt.data
            real.send(Ack(pkt.block), tid)
            got = data
            break
        assert got == SMALL
        await until(lambda: server.transfers == 0, timeout=30)
    finally:
        for cl in (*spoofers, real):
            cl.close()
        await server.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert len(caplog.records) < 100, len(caplog.records)


async def test_requests_asking_a_long_timeout_and_never_answering_give_their_slots_back(
        files: DirFiles) -> None:
    """RRQs over real UDP asking ``timeout`` 255 whose senders never answer the OACK (forged,
    or a host holding slots): each held its slot for 255 s, so ~16 datagrams a second held
    every one of ``max_transfers``. Given back after first_retries at max_first_interval
    (here 0.3 s: ~1 s), and the OACK each got still echoed 255."""
    server = await started(files, max_transfers=64, max_per_client=64, retransmit=0.2)
    server.policy = dataclasses.replace(server.policy, max_first_interval=0.3)
    holders = [RawClient(f"127.0.0.{n % 4 + 2}") for n in range(64)]
    try:
        for holder in holders:
            holder.send(ReadRequest("small.bin", "octet", (("timeout", "255"),)), addr(server))
        await until(lambda: server.transfers == 64, timeout=10)
        pkt, _ = await holders[0].recv()
        assert isinstance(pkt, OptionAck) and pkt.options == (("timeout", "255"),)
        # Back within 60 s, not the 255 asked (bounded by the wait, not by a timed assert:
        # ~1 s here, more on a loaded machine).
        await until(lambda: server.transfers == 0, timeout=60)
    finally:
        for holder in holders:
            holder.close()
        await server.close()


async def test_a_file_name_too_long_for_the_os_is_not_found(
        server: TftpServer, client: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    for name in ("a" * 300, "sub/" + "b" * 1000 + ".efi"):
        client.rrq(addr(server), name)
        pkt, _ = await client.recv()
        assert pkt == Error(ErrorCode.FILE_NOT_FOUND, "file not found")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# ------------------------------------------------------------------------- loss recovery


@pytest.mark.parametrize(("windowsize", "loss", "seed"), [(1, 0.10, 11), (8, 0.05, 12)])
async def test_lossy_link_transfer_is_intact_and_recovered_by_the_rtt_timer(
        files: DirFiles, client: RawClient, windowsize: int, loss: float, seed: int) -> None:
    server = await started(files, retransmit=1.0)
    try:
        options = [("blksize", "1468"), ("windowsize", str(windowsize))]
        got = await lossy_fetch(client, addr(server), "mem.bin", options, loss=loss,
                                seed=seed, dally=lambda: server.stats.completed == 1)
        assert got.data == pattern(100_000)
        assert got.dropped > 0
        await until(lambda: server.stats.completed == 1)
        stats = server.stats
        assert stats.failed == 0
        # Each lost datagram cost a few resends of its window at most: no duplicate-ACK
        # storm (the client ACKs every duplicate DATA, and the server must not answer
        # those ACKs, RFC 1123 §4.2.3.1).
        blocks = 100_000 // 1468 + 1
        # (+10: a scheduling hiccup on a loaded machine may look like a loss to a
        # millisecond timer; each costs a resend, never a cascade.)
        assert stats.retransmissions <= 3 * got.dropped + 10
        # A gap ACK restarts the window after it (RFC 7440 §4), so a loss may also repeat
        # what is still in flight: at most two windows per loss or timer resend.
        assert got.data_received <= blocks + 2 * windowsize * (
            got.dropped + stats.retransmissions + 1)
    finally:
        await server.close()


@pytest.mark.parametrize(("windowsize", "seed"), [(1, 21), (8, 22)])
async def test_loss_and_duplicated_acks_leave_the_transfer_intact(
        files: DirFiles, client: RawClient, windowsize: int, seed: int) -> None:
    """A link that loses 5 % each way and sends a fifth of the ACKs twice: the bytes arrive
    intact and the duplicated ACKs never make the server send (RFC 1123 §4.2.3.1)."""
    server = await started(files, retransmit=1.0)
    try:
        options = [("blksize", "1468"), ("windowsize", str(windowsize))]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.05,
                                seed=seed, duplicate=0.2,
                                dally=lambda: server.stats.completed == 1)
        assert got.data == pattern(3_000_000)
        await until(lambda: server.stats.completed == 1)
        assert server.stats.failed == 0
        blocks = 3_000_000 // 1468 + 1
        assert server.stats.retransmissions <= 3 * got.dropped + 10
        assert got.data_received <= blocks + 2 * windowsize * (
            got.dropped + server.stats.retransmissions + 1)
    finally:
        await server.close()


# ------------------------------------------------------------------ the shared file cache


def settled(*paths: Path) -> None:
    """Date files a minute back: the cache keeps no file modified in the last seconds."""
    old = time.time() - 60
    for path in paths:
        os.utime(path, (old, old))


async def test_clients_of_one_file_share_its_packets(
        files: DirFiles, root: Path) -> None:
    settled(root / "big.bin")
    server = await started(files)
    clients = [RawClient(f"127.0.0.{n + 2}") for n in range(3)]
    try:
        for c in clients:
            got = await fetch(c, addr(server), "big.bin", [("blksize", "1468")])
            assert got.data == pattern(3_000_000)
        assert server.cache.builds == 1 and server.cache.hits == 2
        # Another blksize is another set of datagrams.
        got = await fetch(clients[0], addr(server), "big.bin", [("blksize", "1024")])
        assert got.data == pattern(3_000_000)
        assert server.cache.builds == 2
    finally:
        for c in clients:
            c.close()
        await server.close()


async def test_a_file_whose_packets_are_kept_is_served_without_opening_it(
        files: DirFiles, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once its packets are built, a transfer of the unchanged file takes them on a stat():
    no descriptor opened, read and closed per transfer (a storm's every device)."""
    settled(root / "big.bin")
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    server = await started(files)
    try:
        for n in range(3):
            with RawClient(f"127.0.0.{n + 2}") as c:
                got = await fetch(c, addr(server), "big.bin", [("blksize", "1468")])
                assert got.data == pattern(3_000_000)
        assert server.cache.builds == 1 and server.cache.hits == 2
        assert [p for p in opened if p.endswith("big.bin")] == [str(root / "big.bin")]
    finally:
        await server.close()


@pytest.mark.parametrize("how", ["rewritten in place", "replaced", "resized"])
async def test_a_file_changed_on_disk_is_served_as_it_is_now(
        files: DirFiles, root: Path, client: RawClient, how: str) -> None:
    server = await started(files)
    path = root / "small.bin"
    settled(path)
    try:
        assert (await fetch(client, addr(server), "small.bin")).data == SMALL
        new = SMALL[::-1]  # same size, other bytes
        if how == "rewritten in place":
            with path.open("r+b") as f:
                f.write(new)
        elif how == "replaced":
            tmp = root / "small.bin.new"
            tmp.write_bytes(new)
            tmp.replace(path)
        else:
            new = SMALL + b"grown"
            path.write_bytes(new)
        # Modified a moment ago: streamed from the file as it is now, nothing built or kept.
        with RawClient() as again:
            assert (await fetch(again, addr(server), "small.bin")).data == new
        with RawClient() as third:
            assert (await fetch(third, addr(server), "small.bin")).data == new
        # The old bytes' datagrams dropped, none built for the new ones.
        assert server.cache.builds == 1 and server.cache.hits == 0 and server.cache.size == 0
    finally:
        await server.close()



async def test_transfers_of_a_file_modified_a_moment_ago_hold_no_copy_of_it_each(
        files: DirFiles, root: Path) -> None:
    """A storm that meets a loader copied in a moment ago: each transfer built the file's
    datagrams for itself until the file was SETTLE seconds old (not cached: its timestamps
    cannot tell a rewrite within the same tick yet), 1,000 copies of a 170 KB loader in
    storm.py (244 MiB). Streamed instead, twenty transfers of a fresh 3 MB file hold a
    window each, not 60 MB; each is intact."""
    (root / "big.bin").write_bytes(pattern(3_000_000))  # modified now
    server = await started(files, retransmit=5.0, min_rto=None)
    clients = [RawClient(f"127.0.0.{n + 2}") for n in range(20)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for c in clients:  # every transfer started and held open at its first block
            c.rrq(addr(server), "big.bin", [("blksize", "1468")])
        firsts = [await c.recv() for c in clients]
        assert all(isinstance(p, OptionAck) for p, _ in firsts)
        for c, (_, tid) in zip(clients, firsts, strict=True):
            c.send(Ack(0), tid)
        for c in clients:
            pkt, _ = await c.recv()
            assert isinstance(pkt, Data) and pkt.block == 1
        assert server.transfers == 20
        held = tracemalloc.get_traced_memory()[0] - before
        assert held < 3_000_000, f"{held} bytes held by 20 transfers of a 3 MB file"
        assert server.cache.builds == 0 and server.cache.size == 0
    finally:
        tracemalloc.stop()
        for c in clients:
            c.close()
        await server.close()
    with RawClient() as c:  # and served intact, streamed
        server = await started(files)
        try:
            assert (await fetch(c, addr(server), "big.bin", [("blksize", "1468")])).data \
                == pattern(3_000_000)
        finally:
            await server.close()

async def test_the_cache_is_bounded_and_big_files_are_streamed(
        files: DirFiles, root: Path, client: RawClient) -> None:
    # small.bin at blksize 512 takes 5,168 bytes of datagrams, exact.bin 1,036.
    settled(root / "small.bin", root / "exact.bin")
    server = await started(files, cache_size=6000, cache_file_size=6000)
    try:
        # Over cache_file_size: read from disk per window, nothing kept.
        got = await fetch(client, addr(server), "big.bin", [("blksize", "1468")])
        assert got.data == pattern(3_000_000)
        assert server.cache.builds == 0
        for name, data in (("small.bin", SMALL), ("exact.bin", EXACT), ("small.bin", SMALL)):
            with RawClient() as c:
                assert (await fetch(c, addr(server), name)).data == data
            assert server.cache.size <= server.cache.budget
        # exact.bin pushed small.bin out (least recently used), so it was built again.
        assert server.cache.builds == 3 and server.cache.hits == 0
    finally:
        await server.close()


def test_the_cache_drops_the_least_recently_used_file(tmp_path: Path) -> None:
    # Room for two 1,000-byte files' datagrams at blksize 512 (1,008 bytes each): a third
    # pushes out the one used longest ago, not the one built first.
    from netboot.servers.tftp import _PacketCache
    cache = _PacketCache(budget=2100, max_file=2100)
    paths = []
    for name in ("a", "b", "c"):
        path = tmp_path / name
        path.write_bytes(name.encode() * 1000)
        paths.append(path)
    settled(*paths)

    def get(path: Path) -> object:
        fd = os.open(path, os.O_RDONLY)
        try:
            return cache.packets(str(path), fd, os.fstat(fd), 512)
        finally:
            os.close(fd)

    first = get(paths[0])
    get(paths[1])
    assert get(paths[0]) is first and cache.hits == 1  # a used again: b is now the oldest
    get(paths[2])  # over the budget: b goes
    assert cache.size == 2 * 1008 and cache.builds == 3
    assert get(paths[0]) is first and cache.hits == 2
    get(paths[1])
    assert cache.builds == 4  # b was dropped, so it was built again


async def test_an_error_from_a_stranger_is_not_answered(
        server: TftpServer, client: RawClient) -> None:
    client.rrq(addr(server), "small.bin")
    _, tid = await client.recv()
    with RawClient() as stranger:
        # RFC 1350 §7: an ERROR is never acknowledged, not even with ERROR 5.
        stranger.send(Error(ErrorCode.NOT_DEFINED, "done"), tid)
        assert await stranger.nothing()
    assert server.stats.unknown_tid == 0


async def test_a_late_ack_after_the_transfer_is_not_an_unknown_tid(
        server: TftpServer, client: RawClient) -> None:
    """The last DATA resent while its ACK was on the way gets a second ACK after the transfer
    ended: ignored quietly, as by a socket per transfer that is closed, not ERROR 5."""
    got = await fetch(client, addr(server), "small.bin")
    assert got.data == SMALL
    await until(lambda: server.transfers == 0)
    client.send(Ack(11), got.tid)
    assert await client.nothing()
    assert server.stats.unknown_tid == 0


# ------------------------------------------------------- the data socket's hot paths


@pytest.mark.parametrize("single_port", [False, True])
async def test_a_burst_of_acks_past_one_drain_is_answered_in_full(
        files: DirFiles, caplog: pytest.LogCaptureFixture, single_port: bool) -> None:
    """150 lock-step clients ACK at the same instant, so more ACKs are queued on the data
    socket than one readiness event drains (``_Link.BATCH``); a malformed datagram and a
    stranger's ACK sit among them. Every client gets its next block on every round, the
    stranger gets ERROR 5 in single-port mode (by default its ACK to another's transfer's
    port finds no socket: nothing), and the transfers complete intact."""
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files, max_transfers=200, max_per_client=200, retransmit=5.0,
                           min_rto=None, single_port=single_port)
    clients = [RawClient(f"127.0.0.{n % 50 + 2}") for n in range(150)]
    stranger, garbler = RawClient(), clients[0]
    try:
        got: dict[int, bytearray] = {}
        tids: dict[int, tuple[str, int]] = {}
        for n, c in enumerate(clients):
            c.rrq(addr(server), "small.bin")
            pkt, tids[n] = await c.recv()
            assert isinstance(pkt, Data) and pkt.block == 1
            got[n] = bytearray(pkt.data)
        tid = tids[0]
        for block in range(1, 11):
            # No await between the sends: the server's loop runs only after all are queued.
            for n, c in enumerate(clients):
                c.send(Ack(block), tids[n])
                if n == 75:
                    garbler.send(b"\x00\x09garbage", tid)
                    stranger.send(Ack(block), tid)
            for n, c in enumerate(clients):
                pkt, _ = await c.recv()
                assert isinstance(pkt, Data) and pkt.block == block + 1, (n, pkt)
                got[n] += pkt.data
        for n, c in enumerate(clients):
            c.send(Ack(11), tids[n])
        await until(lambda: server.stats.completed == 150)
        assert all(bytes(data) == SMALL for data in got.values())
        if single_port:
            for _ in range(10):
                pkt, _ = await stranger.recv()
                assert pkt == Error(ErrorCode.UNKNOWN_TID, "unknown transfer ID")
        else:
            assert await stranger.nothing() and server.stats.unknown_tid == 0
        assert server.stats.failed == 0 and server.stats.retransmissions == 0
    finally:
        for c in (*clients, stranger):
            c.close()
        await server.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@BOTH_MODES
async def test_each_transfer_sends_and_receives_on_a_socket_connected_to_its_client(
        server: TftpServer) -> None:
    """Two transfers at once: each has a socket of its own, connected to its client, so the
    kernel hands it that client's datagrams only and it sends without an address. Its port
    (the TID its client sees) is its own, the kernel's random pick (RFC 1350 §4): two
    transfers, two ports, neither the listener's nor its data socket's; in single-port
    mode both are the listener's data port. Both complete, and each socket leaves the
    link's transfers when its transfer ends: closed, or kept for the next transfer (see
    the tests of kept sockets below)."""
    link = server._links[None]
    with RawClient() as a, RawClient("127.0.0.2") as b:
        a.rrq(addr(server), "small.bin")
        b.rrq(addr(server), "small.bin")
        (first_a, tid_a), (first_b, tid_b) = await a.recv(), await b.recv()
        assert first_a == first_b == Data(1, SMALL[:512])
        if server.single_port:
            assert tid_a == tid_b == link.address
        else:
            assert len({tid_a[1], tid_b[1], link.address[1], server.port}) == 4
        socks = {c.address: server._transfers[c.address].sock for c in (a, b)}
        for (address, sock), tid in zip(socks.items(), (tid_a, tid_b), strict=True):
            assert sock.getpeername() == address and sock.getsockname() == tid
        for c, tid in ((a, tid_a), (b, tid_b)):
            block = 1
            while True:
                c.send(Ack(block), tid)
                if block == 11:
                    break
                pkt, _ = await c.recv()
                assert isinstance(pkt, Data) and pkt.block == block + 1
                block += 1
        await until(lambda: server.stats.completed == 2)
        spare = server._links[None]._spare
        assert all(sock.fileno() == -1 or spare.get(address) is sock
                   for address, sock in socks.items())
        assert server._links[None]._transfers == {}


def _bind_as_another_user(address: tuple[str, int]) -> list[str]:
    """What binding ``address`` with SO_REUSEADDR, then SO_REUSEPORT, gives a process of the
    user nobody (a fork that drops root: nothing but these system calls runs in it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            said = []
            for option in (socket.SO_REUSEADDR, socket.SO_REUSEPORT):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, option, 1)
                try:
                    sock.bind(address)
                    said.append("bound")
                except OSError as exc:
                    said.append(errno.errorcode.get(exc.errno or 0, "?"))
                sock.close()
            os.write(write, " ".join(said).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as out:
            return out.read().decode().split()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
@BOTH_MODES
async def test_another_user_cannot_bind_the_data_port_of_running_transfers(
        server: TftpServer) -> None:
    """In single-port mode the transfers share their data port through SO_REUSEPORT, which
    Linux grants only to sockets of the same user: another local user can bind it neither
    so nor with SO_REUSEADDR (which any user could, were the port shared that way), so it
    can neither send DATA to a client from the server's port nor take the client's ACKs. A
    port per transfer (the default) carries neither option: refused both ways too."""
    with RawClient() as client:
        client.rrq(addr(server), "small.bin")
        first, tid = await client.recv()
        assert first == Data(1, SMALL[:512])
        assert _bind_as_another_user(tid) == ["EADDRINUSE", "EADDRINUSE"]
        client.send(Ack(1), tid)  # the transfer goes on
        pkt, _ = await client.recv()
        assert pkt == Data(2, SMALL[512:1024])


def wrapped_sockets(server: TftpServer, wrap: Callable[[socket.socket], Any]) -> list[Any]:
    """From now on every transfer socket the server's link opens is ``wrap(sock)`` (the
    link's ``open`` hook, which both builds honour), and its lock-step blocks go through
    the wrapper's ``send`` (the ``send_block`` hook); returns the list they are added to."""
    link = server._links[None]
    opened: list[Any] = []

    def wrapping_open(peer: tuple[str, int], open_: Any = link.open) -> socket.socket:
        opened.append(wrap(open_(peer)))
        return opened[-1]  # type: ignore[no-any-return]

    link.open = wrapping_open
    link.send_block = lambda sock, data: sock.send(data)  # the wrapper's own send()
    return opened


async def test_a_client_gone_mid_transfer_leaves_gso_on(files: DirFiles) -> None:
    """A client that closes its port while its windows are resent: the kernel reports the
    ICMP port unreachable on the transfer's connected socket (read by the next receive,
    or failing the next send: see the test below). GSO stays on for every other transfer,
    and this one times out."""
    server = await started(files, retransmit=0.05, max_retries=3, min_rto=None)
    try:
        client = RawClient()
        client.rrq(addr(server), "big.bin", [("blksize", "1468"), ("windowsize", "8")])
        oack, tid = await client.recv()
        assert isinstance(oack, OptionAck)
        client.send(Ack(0), tid)
        first, _ = await client.recv()
        assert isinstance(first, Data) and first.block == 1
        client.close()  # gone: the resent windows meet a closed port
        await until(lambda: server.stats.failed == 1)
        assert server.stats.retransmissions >= 2
        assert server.gso is True
        with RawClient() as again:  # and the next transfer's windows still arrive
            options = [("blksize", "1468"), ("windowsize", "8")]
            got = await lossy_fetch(again, addr(server), "big.bin", options, loss=0.0, seed=1)
            assert got.data == pattern(3_000_000)
    finally:
        await server.close()


async def test_econnrefused_on_a_window_is_the_clients_not_gsos(
        files: DirFiles, client: RawClient) -> None:
    """A window's ``sendmsg`` on the connected socket fails with ECONNREFUSED (an ICMP
    error from the client's side, reported on the send): the window is lost like on the
    wire and the timer resends it; ``UDP_SEGMENT`` is not given up for the whole server, as
    it is when the kernel refuses the option itself."""
    server = await started(files, retransmit=0.2)
    link = server._links[None]
    opened = wrapped_sockets(server, lambda sock: _RefusingWindows(sock, 2, errno.ECONNREFUSED))
    try:
        options = [("blksize", "1468"), ("windowsize", "8")]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.0, seed=1)
        assert got.data == pattern(3_000_000)
        await until(lambda: server.stats.completed == 1)
        (refusing,) = opened
        assert refusing.left == 0 and server.stats.retransmissions >= 1
        assert server.gso is True and link.full == 0
    finally:
        await server.close()


class _Refusing:
    """A transfer's socket whose first ``times`` sends fail with ``error``: by default a
    full send buffer, what a storm does to it. Everything else goes to the real socket."""

    def __init__(self, sock: socket.socket, times: int, error: int = errno.EAGAIN) -> None:
        self._sock = sock
        self.left = times
        self.error = error

    def refuse(self) -> None:
        if self.left > 0:
            self.left -= 1
            raise OSError(self.error, os.strerror(self.error))  # EAGAIN: BlockingIOError

    def send(self, data: bytes) -> int:
        self.refuse()
        return self._sock.send(data)

    def sendmsg(self, *args: object) -> int:
        self.refuse()
        return self._sock.sendmsg(*args)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


class _RefusingWindows(_Refusing):
    """Refuses windows (``sendmsg``) only; the OACK and single DATA go out."""

    def send(self, data: bytes) -> int:
        return self._sock.send(data)


class _Recording:
    """A transfer's socket that notes its receives and sends, in order, in a shared log."""

    def __init__(self, sock: socket.socket, log: list[tuple[str, int]]) -> None:
        self._sock = sock
        self._log = log

    def recv_into(self, buf: bytearray) -> int:
        size = self._sock.recv_into(buf)
        self._log.append(("recv", self._sock.fileno()))
        return size

    def send(self, data: bytes) -> int:
        self._log.append(("send", self._sock.fileno()))
        return self._sock.send(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


async def at_block_two(server: TftpServer, clients: list[RawClient]) -> list[tuple[str, int]]:
    """Each client's lock-step transfer of small.bin taken to DATA 2, one client at a time
    (the first ACK arms the lock-step path); returns their TIDs."""
    tids = []
    for c in clients:
        c.rrq(addr(server), "small.bin")
    for c in clients:
        pkt, tid = await c.recv()
        assert pkt == Data(1, SMALL[:512])
        tids.append(tid)
        c.send(Ack(1), tid)
        pkt, _ = await c.recv()
        assert pkt == Data(2, SMALL[512:1024])
    return tids


async def test_acks_waiting_together_are_all_read_before_their_blocks_are_sent(
        files: DirFiles) -> None:
    """ACKs that wait at once are read in one batch, then the next blocks go out in a run
    (a send wakes its client, which on a busy CPU preempts the server before it reads the
    next ACK); each transfer gets its own next block, intact."""
    server = await started(files, retransmit=5.0, min_rto=None)
    link = server._links[None]
    log: list[tuple[str, int]] = []

    def recording_open(peer: tuple[str, int], open_: Any = link.open) -> socket.socket:
        return _Recording(open_(peer), log)  # type: ignore[return-value]

    link.open = recording_open
    link.send_block = lambda sock, data: sock.send(data)  # the wrapper's own send()
    clients = [RawClient() for _ in range(3)]
    try:
        tids = await at_block_two(server, clients)
        log.clear()
        for c, tid in zip(clients, tids, strict=True):  # three ACKs waiting before a poll
            c.send(Ack(2), tid)
        for c in clients:
            pkt, _ = await c.recv()
            assert pkt == Data(3, SMALL[1024:1536])
        assert [kind for kind, _ in log] == ["recv"] * 3 + ["send"] * 3
        assert sorted(fd for kind, fd in log if kind == "recv") == sorted(
            fd for kind, fd in log if kind == "send")
    finally:
        for c in clients:
            c.close()
        await server.close()


async def test_a_batchs_refused_send_leaves_its_other_blocks_going_out(
        files: DirFiles) -> None:
    """ACKs read in one batch whose blocks each meet a full send buffer (EAGAIN): every
    block of the batch is tried and counted lost at once, not only the first one, after
    which the others would wait for their timer (here 5 s)."""
    server = await started(files, retransmit=5.0, min_rto=None)
    link = server._links[None]
    opened = wrapped_sockets(server, lambda sock: _Refusing(sock, 0))
    clients = [RawClient() for _ in range(3)]
    try:
        tids = await at_block_two(server, clients)
        for refusing in opened:
            refusing.left = 1
        for c, tid in zip(clients, tids, strict=True):  # three ACKs waiting before a poll
            c.send(Ack(2), tid)
        await until(lambda: link.full == 3, timeout=30.0)  # a hang's bound
        assert [refusing.left for refusing in opened] == [0, 0, 0]
    finally:
        for c in clients:
            c.close()
        await server.close()


async def test_a_batchs_earlier_deadline_is_not_overtaken_by_a_later_one(
        files: DirFiles) -> None:
    """In one batch, an ACK answered through the full path (apply) arms the sweep for its
    transfer's early deadline; a lock-step block answered after it in the same batch, due
    later, must not re-arm the sweep for its own later deadline: the first transfer's
    retransmission would then wait for the second's timer."""
    server = await started(files, retransmit=0.05)
    link = server._links[None]
    slow, quick = RawClient(), RawClient()
    try:
        # The slow client: a 5 s timeout of its own and one 0.3 s round trip, so that its
        # lock-step ACKs are answered by next_window with an RTO near a second.
        slow.rrq(addr(server), "small.bin", (("timeout", "5"),))
        pkt, slow_tid = await slow.recv()
        assert isinstance(pkt, OptionAck)
        slow.send(Ack(0), slow_tid)
        pkt, _ = await slow.recv()
        assert pkt == Data(1, SMALL[:512])
        await asyncio.sleep(0.3)
        slow.send(Ack(1), slow_tid)
        pkt, _ = await slow.recv()
        assert pkt == Data(2, SMALL[512:1024])
        # The quick client: its first ACK goes to Sender.ack (apply), due in 50 ms.
        quick.rrq(addr(server), "small.bin")
        pkt, quick_tid = await quick.recv()
        assert isinstance(pkt, Data) and pkt.block == 1
        server._sweep_by(time.monotonic() + 100.0)  # the sweep due later than both
        quick.send(Ack(1), quick_tid)
        slow.send(Ack(2), slow_tid)
        link._ready()  # both ACKs in one batch, the quick one first
        first = server._transfers[quick.address].sender
        second = server._transfers[slow.address].sender
        assert first.deadline is not None and second.deadline is not None
        assert second.deadline > first.deadline + 0.3  # the case: the later one second
        assert server._sweep is not None
        assert server._sweep.when() <= first.deadline + 0.001
    finally:
        slow.close()
        quick.close()
        await server.close()


@pytest.mark.parametrize("windowsize", [1, 8])
async def test_a_full_send_buffer_is_a_loss_the_timer_repairs(
        files: DirFiles, client: RawClient, windowsize: int) -> None:
    """EAGAIN on the transfer's socket (lock-step ``send``, a window's ``sendmsg``): the
    datagrams count as lost on the wire, nothing raises, and the retransmission timer
    resends them."""
    server = await started(files, retransmit=1.0)
    link = server._links[None]
    opened = wrapped_sockets(server, lambda sock: _Refusing(sock, 3))
    try:
        options = [("blksize", "1468"), ("windowsize", str(windowsize))]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.0, seed=1)
        assert got.data == pattern(3_000_000)
        await until(lambda: server.stats.completed == 1)
        (refusing,) = opened
        assert refusing.left == 0 and link.full >= 3
        assert server.stats.failed == 0 and server.stats.retransmissions >= 1
    finally:
        await server.close()


@pytest.mark.parametrize(("windowsize", "seed"), [(8, 31), (64, 32), (3, 33)])
async def test_streamed_windows_are_read_into_their_datagrams_intact(
        files: DirFiles, client: RawClient, windowsize: int, seed: int) -> None:
    """A file over ``cache_file_size`` is read per window straight into its datagrams
    (``preadv``); through loss and duplicated ACKs the bytes arrive intact."""
    server = await started(files, retransmit=1.0, cache_file_size=6000)
    try:
        options = [("blksize", "1468"), ("windowsize", str(windowsize))]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.03,
                                seed=seed, duplicate=0.2,
                                dally=lambda: server.stats.completed == 1)
        assert got.data == pattern(3_000_000)
        await until(lambda: server.stats.completed == 1)
        assert server.cache.builds == 0 and server.stats.failed == 0
    finally:
        await server.close()


class _Segmenting:
    """A transfer's socket that notes each ``sendmsg`` (its datagrams' lengths) and refuses
    the ``refuse``-th with ``error`` (counted from 1; 0: none), as a kernel without
    ``UDP_SEGMENT`` does."""

    def __init__(self, sock: socket.socket, refuse: int = 0, error: int = errno.EIO) -> None:
        self._sock = sock
        self.calls: list[list[int]] = []
        self.refuse = refuse
        self.error = error

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        self.calls.append([len(b) for b in buffers])
        if len(self.calls) == self.refuse:
            raise OSError(self.error, os.strerror(self.error))
        return self._sock.sendmsg(buffers, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@pytest.mark.parametrize("cache_file_size", [6000, 16 << 20], ids=["streamed", "cached"])
async def test_a_window_over_64_kib_goes_in_udp_segment_sends_of_one_ip_packet_each(
        files: DirFiles, client: RawClient, cache_file_size: int) -> None:
    """Windowsize 64 at blksize 1468 is 94 KB, more than one UDP_SEGMENT send may carry:
    each window goes as two sends of at most 64 KiB (44 datagrams and 20), not datagram by
    datagram, and the file arrives intact, each block once."""
    # The fixed timer (as the server fixture): with the round-trip one's 5 ms floor a loaded
    # machine resent a window now and then, and the counts below are of sends.
    server = await started(files, retransmit=5.0, min_rto=None,
                           cache_file_size=cache_file_size)
    opened = wrapped_sockets(server, _Segmenting)
    try:
        options = [("blksize", "1468"), ("windowsize", "64")]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.0, seed=1)
        assert got.data == pattern(3_000_000)
        assert got.duplicates == 0
        await until(lambda: server.stats.completed == 1)
        (sock,) = opened
        blocks = 3_000_000 // 1468 + 1  # 2,044: 31 full windows of 64, then 60
        assert sock.calls[:2] == [[1472] * 44, [1472] * 20]
        assert len(sock.calls) == 2 * 31 + 2  # the last window: 44, then 16 (the short last)
        assert sum(map(len, sock.calls)) == blocks
        assert all(sum(call) <= 65000 for call in sock.calls)
        assert server.gso is True
    finally:
        await server.close()


async def test_udp_segment_refused_mid_window_sends_the_rest_datagram_by_datagram(
        files: DirFiles, client: RawClient) -> None:
    """The kernel refuses UDP_SEGMENT on a window's second send (its first went): GSO is
    given up for the server and the window's rest goes datagram by datagram, so no block
    is lost or sent twice, and later windows go that way too."""
    server = await started(files, retransmit=5.0, min_rto=None)  # no resend: see above
    opened = wrapped_sockets(server, lambda sock: _Segmenting(sock, refuse=2))
    try:
        options = [("blksize", "1468"), ("windowsize", "64")]
        got = await lossy_fetch(client, addr(server), "big.bin", options, loss=0.0, seed=1)
        assert got.data == pattern(3_000_000)
        assert got.duplicates == 0 and server.stats.retransmissions == 0
        await until(lambda: server.stats.completed == 1)
        (sock,) = opened
        assert len(sock.calls) == 2 and server.gso is False
    finally:
        await server.close()


async def test_a_request_met_with_no_descriptor_left_is_dropped_for_a_retry(
        files: DirFiles, client: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    """EMFILE when a transfer's socket is opened (the open-files limit reached by more than
    service.raise_fd_limit counted): the RRQ is dropped as at max_transfers, counted busy and
    logged, so the client's retry is served, instead of an ERROR that aborts its boot."""
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    server = await started(files, retransmit=5.0)
    link = server._links[None]
    opens = link.open

    def no_descriptor(peer: tuple[str, int]) -> socket.socket:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    link.open = no_descriptor
    try:
        client.rrq(addr(server), "small.bin")
        await until(lambda: server.stats.busy == 1)
        assert await client.nothing(0.3)
        assert server.transfers == 0 and server.stats.failed == 0
        lines = [r for r in caplog.records if "no descriptor left" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        link.open = opens
        got = await fetch(client, addr(server), "small.bin")  # the retry
        assert got.data == SMALL
    finally:
        await server.close()


def _spread_clients(n: int) -> list[socket.socket]:
    """``n`` UDP sockets, 32 per loopback address 127.0.x.y (under tftp.max_per_client)."""
    socks = []
    try:
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind((f"127.0.{1 + i // 32 // 250}.{1 + i // 32 % 250}", 0))
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def test_more_than_1024_size_probes_at_once_fit_the_default_transfer_limit(
        files: DirFiles) -> None:
    """A storm's burst: 1,100 size probes at once, each held open (its OACK not answered
    yet, as an EDK2 device's while it has not read it), are all answered with the default
    tftp.max_transfers, none dropped (1,024 were reached by 1,000 devices, benchmarks/
    storm.py). The probes then end as EDK2 ends them (ERROR 8)."""
    import resource

    from netboot.config import TftpConfig
    from netboot.wire.tftp import encode, parse

    n = 1100
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 256  # the clients' sockets and the server's, in this one process
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"the open-files hard limit {hard} is below {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    defaults = TftpConfig()
    server = await started(files, max_transfers=defaults.max_transfers,
                           max_per_client=defaults.max_per_client, retransmit=30.0)
    socks = _spread_clients(n)
    try:
        request = encode(ReadRequest("small.bin", "octet", (("tsize", "0"),
                                                            ("blksize", "1468"))))
        for sent, sock in enumerate(socks, 1):  # in bursts an unprivileged listener holds
            sock.sendto(request, addr(server))
            if sent % 100 == 0 or sent == n:
                await until(lambda: server.stats.requests == sent, timeout=30.0)  # noqa: B023
        await until(lambda: server.transfers == n, timeout=30.0)
        assert server.stats.busy == 0 and server.stats.started == n
        answered = 0
        for sock in socks:  # every client got its OACK
            data, tid = sock.recvfrom(2048)
            assert isinstance(parse(data), OptionAck), data
            sock.sendto(encode(Error(ErrorCode.OPTION_NEGOTIATION, "size probe")), tid)
            answered += 1
        assert answered == n
        await until(lambda: server.transfers == 0, timeout=30.0)
        assert server.stats.probes == n and server.stats.busy == 0
    finally:
        for sock in socks:
            sock.close()
        await server.close()


async def test_an_asset_request_starts_its_transfer_in_the_datagram_callback(
        server: TftpServer, client: RawClient) -> None:
    """A lookup that needs no wait (an asset) runs at once: the RRQ's handler answers with a
    list, no task, and the transfer is running when it returns."""
    request = encode(ReadRequest("small.bin", "octet", ()))
    result = server._handle(None, request, client.address)
    assert result == []  # not an awaitable: no task for the boundary to run
    assert client.address in server._transfers
    assert not server._opening
    packet, _ = await client.recv()
    assert isinstance(packet, Data) and packet.block == 1


class WaitingFiles(DirFiles):
    """A content layer whose lookup waits, as a per-machine file waits for the inventory."""

    async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
        await asyncio.sleep(0.01)
        return await super().tftp_open(path, peer)


async def test_a_lookup_that_waits_goes_on_as_a_task_and_serves_the_file(
        root: Path, client: RawClient) -> None:
    server = await started(WaitingFiles(root), retransmit=5.0, min_rto=None)
    try:
        request = encode(ReadRequest("small.bin", "octet", ()))
        result = server._handle(None, request, client.address)
        assert inspect.isawaitable(result)  # the boundary runs the rest as a task
        assert client.address in server._opening  # a copy meanwhile is not a second request
        assert server._handle(None, request, client.address) is None
        replies = await result
        assert replies == [] and client.address in server._transfers
        assert not server._opening
        got = await fetch(client, addr(server), "small.bin")
        assert got.data == SMALL
        missing = RawClient("127.0.0.3")
        try:
            missing.rrq(addr(server), "nothing-here.bin")
            packet, _ = await missing.recv()
            assert isinstance(packet, Error) and packet.code == ErrorCode.FILE_NOT_FOUND
            await until(lambda: missing.address[0] not in server._per_client)
        finally:
            missing.close()
    finally:
        await server.close()


class GatedFiles(DirFiles):
    """A content layer whose lookup waits until the test opens its gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()

    async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
        await self.gate.wait()
        return await super().tftp_open(path, peer)


async def test_a_lookup_that_ends_after_its_interface_was_let_go_is_dropped_quietly(
        root: Path, client: RawClient, caplog: pytest.LogCaptureFixture) -> None:
    """A per-machine file's lookup waits (the inventory) while its named interface goes away
    (_let_go: its address removed, its device made again). Its end starts no transfer: the
    listener is closed, so the request is dropped and said once at INFO, no traceback (it
    was a KeyError in _start_transfer, logged as "cannot start the transfer"), and its
    slot and its client's count are given back."""
    caplog.set_level(logging.INFO, logger="netboot.servers.tftp")
    files = GatedFiles(root)
    server = await started(files, interfaces=["lo"], retransmit=5.0, min_rto=None)
    try:
        request = encode(ReadRequest("small.bin", "octet", ()))
        result = server._handle("lo", request, client.address)
        assert inspect.isawaitable(result)
        server._let_go("lo")
        files.gate.set()
        assert await result == []
        assert not server._transfers and not server._opening and not server._per_client
        assert server.stats.started == 0
        said = [r for r in caplog.records if "let go while" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.INFO, caplog.records
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    finally:
        await server.close()


async def test_a_listen_that_fails_partway_closes_what_it_opened(
        files: DirFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's transport failing after both sockets were bound: both closed, and no
    link left behind with its data socket open until the next listen replaced it."""
    import netboot.servers.tftp as tftp

    def refused(sock: socket.socket, protocol: object) -> object:
        raise OSError(errno.ENOMEM, "no memory")

    monkeypatch.setattr(tftp, "open_stamped_endpoint", refused)
    server = TftpServer(files, host=LOOPBACK, port=0)
    before = open_fds()
    with pytest.raises(OSError):
        await server._listen(None)
    assert server._links == {} and server._listeners == []
    assert open_fds() == before


class FifoFiles(DirFiles):
    """A content layer that hands out a path which is no regular file (by the time it is
    opened: a file replaced by a FIFO or a directory between the lookup and the start)."""

    def __init__(self, root: Path, odd: Path) -> None:
        super().__init__(root)
        self.odd = odd

    async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
        return Blob(size=0, path=str(self.odd))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
async def test_a_path_that_is_no_regular_file_is_refused_not_opened(
        root: Path, tmp_path: Path, client: RawClient, kind: str) -> None:
    odd = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(odd)  # opened, it would block the server until a writer came
    else:
        odd.mkdir()
    server = await started(FifoFiles(root, odd), retransmit=5.0, min_rto=None)
    try:
        client.rrq(addr(server), "anything.bin")
        packet, _ = await client.recv()
        assert isinstance(packet, Error) and packet.code == ErrorCode.NOT_DEFINED
        assert server.stats.failed == 1 and not server._transfers
    finally:
        await server.close()


async def test_a_request_dropped_past_the_lookups_in_flight_gives_its_slot_back(
        root: Path) -> None:
    """Past the listener's tasks in flight a request whose lookup waits is dropped by the
    listener. Its lookup had begun (eagerly): when it ends the transfer starts all the same,
    and nothing is left "being opened" (a coroutine dropped unstarted left the request
    there, and every later RRQ of its client was taken for a copy of it)."""
    server = await started(WaitingFiles(root), retransmit=5.0, min_rto=None)
    _, boundary = server._listeners[0]
    boundary._max_in_flight = 1
    first, second = RawClient("127.0.0.2"), RawClient("127.0.0.3")
    try:
        first.rrq(addr(server), "small.bin")
        await until(lambda: len(boundary._tasks) == 1)
        second.rrq(addr(server), "small.bin")
        await until(lambda: boundary.dropped == 1)
        await until(lambda: not server._opening)
        for client in (first, second):
            packet, _ = await client.recv()
            assert isinstance(packet, Data) and packet.block == 1
        assert server.transfers == 2
    finally:
        first.close()
        second.close()
        await server.close()


async def test_an_assets_transfer_starts_from_the_lookups_stat_not_a_second_one(
        server: TftpServer, client: RawClient, root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The content layer's blob of an asset carries the stat its lookup took; the transfer
    starts from it (a second stat, moments later, told the same at a system call a start).
    Both the first transfer (which opens the file and builds its packets) and the next
    (served from the packets kept) stat the file once."""
    path = str(root / "small.bin")
    old = time.time() - 3600  # settled: its packets are kept (_PacketCache.SETTLE)
    os.utime(path, (old, old))
    stats: list[str] = []
    real_stat = os.stat

    def counted(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(target, str) and target == path:
            stats.append(path)
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counted)
    for n in (1, 2):
        got = await fetch(client, addr(server), "small.bin")
        assert got.data == SMALL
        await until(lambda n=n: server.stats.completed == n)  # type: ignore[misc]
        assert len(stats) == n, stats
    assert server.cache.hits >= 1  # the second transfer went the packets' way


async def test_an_ended_transfers_socket_is_closed_and_out_of_the_links_poll(
        server: TftpServer, client: RawClient) -> None:
    """A transfer's end closes its socket, which is what takes it out of the link's epoll
    set (no EPOLL_CTL_DEL is made): a datagram its client sends after the end is the data
    socket's (a late ACK, ignored), and the link's poll has nothing. (A wrapped socket, which
    the link closes rather than keeps for the next transfer: see the tests below for those.)"""
    link = server._links[None]
    opened = wrapped_sockets(server, lambda sock: _Recording(sock, []))
    got = await fetch(client, addr(server), "small.bin")
    assert got.data == SMALL
    await until(lambda: server.stats.completed == 1)
    assert len(opened) == 1 and opened[0].fileno() == -1
    client.send(Ack(1), got.tid)  # a late copy of an ACK
    await asyncio.sleep(0.05)
    assert link._poll(0, 8) == [] and not link._transfers


@ONE_PORT
async def test_an_ended_transfers_socket_serves_the_next_transfer(server: TftpServer) -> None:
    """An ended transfer's socket is kept, still in the link's epoll set, and the next
    transfer takes it, connected to its own client (a start without a new socket: s25's
    starts benchmark), and completes on it. A client whose last transfer's socket is kept
    gets that one again (EDK2's download from its probe's port), not another: two sockets
    connected to one client would share its datagrams."""
    link = server._links[None]
    with RawClient() as a, RawClient("127.0.0.2") as b, RawClient("127.0.0.3") as c:
        both = await asyncio.gather(*(fetch(x, addr(server), "small.bin") for x in (b, a)))
        assert [got.data for got in both] == [SMALL, SMALL]
        await until(lambda: server.stats.completed == 2)
        kept_b, kept_a = link._spare[b.address], link._spare[a.address]
        a.rrq(addr(server), "small.bin", [("blksize", "1468")])
        await until(lambda: a.address in server._transfers)
        assert server._transfers[a.address].sock is kept_a
        assert list(link._spare) == [b.address]
        c.rrq(addr(server), "small.bin", [("blksize", "1468")])
        await until(lambda: c.address in server._transfers)
        assert server._transfers[c.address].sock is kept_b and not link._spare
        assert kept_b.getpeername() == c.address and kept_b.getsockname() == link.address
        for client in (a, c):
            oack, tid = await client.recv()
            assert isinstance(oack, OptionAck) and tid == link.address
            got = bytearray()
            client.send(Ack(0), tid)
            while True:
                pkt, _ = await client.recv()
                assert isinstance(pkt, Data)
                got += pkt.data
                client.send(Ack(pkt.block), tid)
                if len(pkt.data) < 1468:
                    break
            assert bytes(got) == SMALL
        await until(lambda: server.stats.completed == 4)


async def test_a_transfers_socket_is_closed_at_its_end_by_default(
        server: TftpServer) -> None:
    """By default an ended transfer's socket is closed, not kept for the next transfer (as
    in single-port mode, the tests below): its port is one its client has seen, and handed
    to another client's transfer it would be a port the first could forge that transfer's
    ACKs to (the reflection above). The next transfer, the same client's too, has a new
    socket; a late datagram to the old port finds none (ICMP, nothing from the server)."""
    link = server._links[None]
    with RawClient() as a, RawClient("127.0.0.2") as b:
        got = await asyncio.gather(*(fetch(x, addr(server), "small.bin") for x in (a, b)))
        assert [g.data for g in got] == [SMALL, SMALL]
        await until(lambda: server.stats.completed == 2)
        assert not link._spare and server.spares == 0 and link._spare_sweep is None
        a.send(Data(1, b"x"), got[0].tid)
        assert await a.nothing() and server.stats.unknown_tid == 0
        a.rrq(addr(server), "small.bin", [("blksize", "1468")])
        await until(lambda: a.address in server._transfers)
        oack, tid = await a.recv()
        assert isinstance(oack, OptionAck) and tid != got[1].tid
        a.send(Error(0, "enough"), tid)
        await until(lambda: server.transfers == 0)
        assert server.spares == 0


@ONE_PORT
async def test_a_kept_socket_taken_by_another_clients_long_transfer_is_hashed_anew(
        server: TftpServer) -> None:
    """A kept socket taken for another client's transfer of REHASH_ACKS ACKs or more is
    hashed anew by the kernel (its device bound again): Linux leaves a socket bound to an
    address and connected again under its old client's 4-tuple, and each datagram of the
    new client walked every socket on the port to find it (~7 us a datagram beside 1,000).
    Not for a short transfer (EDK2's size probe, a one-window file: the rehash would cost
    more than the walks), nor for the socket's own client again (its 4-tuple unchanged).
    The transfers go on, on those sockets."""
    link = server._links[None]
    rehashed: list[tuple[str, int]] = []
    rehash = link.rehash

    def recording(sock: socket.socket) -> None:
        rehashed.append(sock.getpeername())
        rehash(sock)

    link.rehash = recording
    assert len(SMALL) // 512 < link.REHASH_ACKS < 3_000_000 // 512  # small.bin, big.bin
    clients = [RawClient(f"127.0.0.{i}") for i in (1, 2, 3, 4, 5)]
    try:
        a, b, c, d, e = clients
        both = await asyncio.gather(*(fetch(x, addr(server), "small.bin") for x in (a, b, c)))
        assert [got.data for got in both] == [SMALL, SMALL, SMALL]
        await until(lambda: server.stats.completed == 3)
        kept_a = link._spare[a.address]
        kept = {link._spare[x.address] for x in (a, b, c)}
        started = []
        for x, name in ((a, "big.bin"), (d, "small.bin"), (e, "big.bin")):
            # a's own socket for a long transfer, then two others' (a small file, a long one).
            x.rrq(addr(server), name, [("blksize", "512")])
            await until(lambda x=x: x.address in server._transfers)
            started.append(server._transfers[x.address].sock)
        assert started[0] is kept_a and set(started) == kept
        assert rehashed == [e.address]
        got = bytearray()
        oack, tid = await e.recv()
        assert isinstance(oack, OptionAck) and tid == link.address
        for block in range(3):
            e.send(Ack(block), tid)
            pkt, _ = await e.recv()
            assert isinstance(pkt, Data) and pkt.block == block + 1
            got += pkt.data
        assert bytes(got) == pattern(3_000_000)[:len(got)] and len(got) == 3 * 512
    finally:
        for x in clients:
            x.close()


@ONE_PORT
async def test_a_datagram_to_a_kept_socket_is_answered_as_the_data_socket_answers(
        server: TftpServer) -> None:
    """A kept socket is still connected to its last client, so what that client sends
    after the end reaches it, not the data socket: a late ACK is ignored, anything else
    gets ERROR 5 (unknown TID) from the server's port, as from the data socket; one queued
    when the next transfer takes the socket is the old client's too, never the new one's."""
    link = server._links[None]
    with RawClient() as a, RawClient("127.0.0.2") as b:
        got = await fetch(a, addr(server), "small.bin")
        await until(lambda: server.stats.completed == 1)
        assert a.address in link._spare
        a.send(Ack(11), got.tid)  # a late ACK: nothing
        assert await a.nothing(0.2)
        a.send(Data(1, b"x"), got.tid)
        err, src = await a.recv()
        assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_TID
        assert src == link.address
        # Queued on the kept socket, then the next transfer takes it before it is read.
        b.rrq(addr(server), "small.bin")
        a.send(Data(2, b"y"), got.tid)
        first, tid = await b.recv()
        assert first == Data(1, SMALL[:512]) and tid == link.address
        err, _ = await a.recv()
        assert isinstance(err, Error) and err.code == ErrorCode.UNKNOWN_TID
        assert server.stats.unknown_tid == 2
        fetched = bytearray(SMALL[:512])
        for block in range(1, 11):
            b.send(Ack(block), tid)
            pkt, _ = await b.recv()
            assert isinstance(pkt, Data) and pkt.block == block + 1
            fetched += pkt.data
        b.send(Ack(11), tid)
        assert bytes(fetched) == SMALL
        await until(lambda: server.stats.completed == 2)


@ONE_PORT
async def test_a_kept_sockets_pending_icmp_error_does_not_fail_the_next_transfer(
        server: TftpServer) -> None:
    """A datagram sent from a kept socket to its old client's closed port leaves an ICMP
    error pending on it, which the next send would fail with: the socket's next transfer
    reads it off first, and its first DATA goes out at once (not after its 5 s timer)."""
    link = server._links[None]
    with RawClient("127.0.0.2") as b:
        a = RawClient()
        await fetch(a, addr(server), "small.bin")
        await until(lambda: server.stats.completed == 1)
        kept = link._spare[a.address]
        a.close()
        b.rrq(addr(server), "small.bin")  # read once the test awaits, before the error
        kept.send(b"\x00\x05\x00\x00late\x00")  # to the closed port: ECONNREFUSED queued
        first, _ = await b.recv(timeout=30.0)  # a hang's bound
        assert first == Data(1, SMALL[:512])
        assert server._transfers[b.address].sock is kept


@ONE_PORT
async def test_a_kept_socket_holds_nothing_of_its_old_client_once_connected_again(
        server: TftpServer) -> None:
    """Whatever the old client had queued on a kept socket when the next transfer takes it
    is read off there, however much it is: not a batch of it only, the rest left to the new
    transfer, which reads its socket as its own client's (no address on a connected
    socket). Else a host on the VLAN that fills its kept socket (a storm's loop reads it
    late) has its datagrams taken for another machine's: an ERROR that ends its boot."""
    link = server._links[None]
    with RawClient() as a, RawClient("127.0.0.2") as b:
        got = await fetch(a, addr(server), "small.bin")
        await until(lambda: server.stats.completed == 1)
        kept = link._spare[a.address]
        kept.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # room for them all
        queued = 3 * link.BATCH
        for _ in range(queued):  # no await: the loop reads none of them before the connect
            a.send(Error(0, "abort"), got.tid)
        sock = link.connect(b.address)
        try:
            assert sock is kept and sock.getpeername() == b.address
            with pytest.raises(BlockingIOError):
                left = sock.recv(64)
                raise AssertionError(f"the new transfer would read its old client's {left!r}")
        finally:
            sock.close()
            link._reused = None


@ONE_PORT
async def test_a_kept_socket_numbered_past_select_s_limit_serves_the_next_transfer(
        server: TftpServer) -> None:
    """A storm's transfers hold thousands of descriptors (service.raise_fd_limit raises the
    limit for them), so a kept socket is numbered 1024 or more: what connect asks of it must
    take any descriptor (select() refuses those, ValueError: the next client got ERROR
    "internal error" and the socket was lost, still open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard open-files limit ({hard}) leaves no descriptor past 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048) if soft !=
                                                resource.RLIM_INFINITY else soft, hard))
    fillers: list[int] = []
    link = server._links[None]
    try:
        while not fillers or fillers[-1] < 1100:  # every lower number taken
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        with RawClient() as a, RawClient("127.0.0.2") as b:
            assert (await fetch(a, addr(server), "small.bin")).data == SMALL
            await until(lambda: server.stats.completed == 1)
            kept = link._spare[a.address]
            assert kept.fileno() >= 1024
            got = await fetch(b, addr(server), "small.bin")
            assert got.data == SMALL
            await until(lambda: server.stats.completed == 2)
            assert link._spare.get(b.address) is kept  # used, and kept again
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_sockets_are_kept_within_max_transfers(files: DirFiles) -> None:
    """Kept sockets and running transfers together stay within max_transfers, the
    descriptors service.raise_fd_limit counts for TFTP; the server's close closes them."""
    server = await started(files, retransmit=5.0, min_rto=None, max_transfers=2,
                           single_port=True)
    link = server._links[None]
    clients = [RawClient(f"127.0.0.{n}") for n in range(1, 5)]
    try:
        for c in clients[:3]:  # three at once: two served, the third retries (busy)
            c.rrq(addr(server), "small.bin")
        firsts = [await c.recv() for c in clients[:2]]
        for c, (_, tid) in zip(clients[:2], firsts, strict=True):
            c.send(Error(0, "stop"), tid)
        await until(lambda: server.transfers == 0)
        assert len(link._spare) == 2 and server.spares == 2
        socks = list(link._spare.values())
        assert (await fetch(clients[3], addr(server), "small.bin")).data == SMALL
        await until(lambda: server.stats.completed == 1)
        assert len(link._spare) <= 2 and server.spares == len(link._spare)
    finally:
        for c in clients:
            c.close()
        await server.close()
    assert all(sock.fileno() == -1 for sock in socks)

async def test_a_link_without_kept_sockets_closes_another_links_to_stay_within_max_transfers(
        files: DirFiles) -> None:
    """A server on two interfaces: one link keeps the sockets of its storm, then the other's
    storm starts. A link reuses only its own kept sockets, so the other closes one of the
    first link's for each it makes while the kept and running sockets are at max_transfers
    (the descriptors service.raise_fd_limit counted): otherwise the first link's kept
    sockets and the second's running ones went past it (EMFILE: starts dropped, HTTP
    accepts paused). The second link is a real one on the same address (its own data
    socket), as the server makes one per interface."""
    server = await started(files, retransmit=5.0, min_rto=None, max_transfers=2,
                           single_port=True)
    link = server._links[None]
    clients = [RawClient(f"127.0.0.{n}") for n in range(1, 3)]
    other = _Link(server, server._bind(LOOPBACK, 0, None, listener=True, reuse=True), None)
    server._links["other"] = other
    made = None
    try:
        for c in clients:
            c.rrq(addr(server), "small.bin")
        firsts = [await c.recv() for c in clients]
        for c, (_, tid) in zip(clients, firsts, strict=True):
            c.send(Error(0, "stop"), tid)
        await until(lambda: server.transfers == 0)
        assert len(link._spare) == 2 and server.spares == 2
        kept = list(link._spare.values())
        peer = ("127.0.0.9", 4000)
        server._opening.add(peer)  # a start on the other link, counted as the server does
        made = other.connect(peer)
        assert server.spares + server.transfers == 2
        assert len(link._spare) == 1
        assert kept[0].fileno() == -1  # the oldest closed
        assert kept[1].fileno() >= 0
    finally:
        server._opening.discard(("127.0.0.9", 4000))
        if made is not None:
            made.close()
        del server._links["other"]
        other.close()
        for c in clients:
            c.close()
        await server.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class HeldSweeps:
    """A link's event loop with its timers held: ``call_later`` records the callback, and
    :meth:`tick` runs what is due, as one ``spare_idle`` passing would, whenever the test
    says; the rest (its readers) is the real loop's."""

    class Timer:
        def __init__(self, delay: float, callback: Callable[[], None]) -> None:
            self.delay, self.callback, self.cancelled = delay, callback, False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.armed: list[HeldSweeps.Timer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> HeldSweeps.Timer:
        timer = HeldSweeps.Timer(delay, callback)
        self.armed.append(timer)
        return timer

    def tick(self) -> None:
        due, self.armed = [t for t in self.armed if not t.cancelled], []
        for timer in due:
            timer.callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


async def test_kept_sockets_left_unused_for_spare_idle_are_closed(files: DirFiles) -> None:
    """After a storm the link keeps its transfers' sockets for the next ones; those no
    transfer takes within ``spare_idle`` are closed (between one and two ``spare_idle``
    after their end), not held until shutdown: the process's open descriptors are back
    where they were before the storm, and no timer is left armed with nothing kept.

    The sweep's timer is held (HeldSweeps) and ticked by the test: with the real one
    (0.5 s), a loaded machine that took over a second between the first transfer's end and
    the count found sockets closed already, and failed."""
    server = await started(files, retransmit=5.0, min_rto=None, spare_idle=0.5,
                           single_port=True)
    link = server._links[None]
    sweeps = HeldSweeps(link._loop)
    link._loop = sweeps  # type: ignore[assignment]
    clients = [RawClient(f"127.0.0.{n}") for n in range(1, 21)]
    try:
        before = open_fds()
        got = await asyncio.gather(*(fetch(c, addr(server), "small.bin") for c in clients))
        assert all(g.data == SMALL for g in got)
        await until(lambda: server.stats.completed == 20)
        assert [t.delay for t in sweeps.armed] == [0.5]  # one sweep, spare_idle away
        assert server.spares == len(link._spare) == 20
        kept = list(link._spare.values())
        assert open_fds() == before + 20
        # At least one spare_idle after the first was kept before any is closed (two ticks).
        sweeps.tick()
        assert server.spares == 20 and len(sweeps.armed) == 1
        sweeps.tick()
        assert server.spares == 0
        assert not link._spare and not link._spare_peers
        assert all(sock.fileno() == -1 for sock in kept)
        assert open_fds() == before
        assert link._spare_sweep is None and sweeps.armed == []
        # And kept again after, the sweep armed again for them.
        assert (await fetch(clients[0], addr(server), "small.bin")).data == SMALL
        await until(lambda: server.stats.completed == 21)
        assert server.spares == 1 and link._spare_sweep is not None
        sweeps.tick()
        sweeps.tick()
        assert server.spares == 0
        assert open_fds() == before
    finally:
        for c in clients:
            c.close()
        await server.close()


async def test_transfers_starting_while_kept_sockets_are_swept_are_served(
        files: DirFiles) -> None:
    """Clients fetching again and again, at pauses around ``spare_idle``, while the sweep
    runs many times: a start takes a kept socket the sweep was about to close, or a new one
    after it closed them, or ends just before a sweep; every transfer completes intact and
    on a socket still open, and the kept ones are closed once the clients stop."""
    idle = 0.02
    server = await started(files, retransmit=5.0, min_rto=None, spare_idle=idle,
                           single_port=True)
    link = server._links[None]
    clients = [RawClient(f"127.0.0.{n}") for n in range(1, 9)]
    pauses = [0.0, idle / 2, idle, 1.5 * idle, 2 * idle, 3 * idle]
    options: list[list[tuple[str, str]]] = [[], [("blksize", "1468")]]

    async def again(n: int, client: RawClient) -> int:
        done = 0
        stop = time.monotonic() + 1.0
        while time.monotonic() < stop:
            # Each request unlike the last: the same one again from the port at once can be
            # taken for a late copy of it (_late_copy), which waits for the client's resend.
            got = await fetch(client, addr(server), "small.bin", options[done % 2])
            assert got.data == SMALL and got.tid == link.address
            done += 1
            # Its end read by the server before the next request (else a request read
            # before the last ACK ends the transfer as abandoned, a failure in the stats).
            await until(lambda: client.address not in server._transfers)
            await asyncio.sleep(pauses[(n + done) % len(pauses)])
        return done

    try:
        before = open_fds()
        done = await asyncio.gather(*(again(n, c) for n, c in enumerate(clients)))
        await until(lambda: server.stats.completed == sum(done))
        assert server.stats.failed == 0 and server.stats.unknown_tid == 0
        assert link._spare_tick >= 10  # the sweep ran throughout
        await until(lambda: server.spares == 0, timeout=5.0)
        assert open_fds() == before and link._spare_sweep is None
    finally:
        for c in clients:
            c.close()
        await server.close()


# An RFC 7440 download by blocking socket calls in a process of its own: the server's event
# loop may be busy-waiting for this client's ACK, so no client can run on it (nor in a thread
# of its process, which would wait for the GIL). Prints the SHA-256 of what it received.
_WINDOW_CLIENT = """
import hashlib, socket, struct, sys, time
port, name, blksize, window = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pause = float(sys.argv[5])  # seconds before each ACK of a full window
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(5.0)
sock.sendto(b"\\x00\\x01%s\\x00octet\\x00blksize\\x00%d\\x00windowsize\\x00%d\\x00"
            % (name.encode(), blksize, window), ("127.0.0.1", port))
oack, tid = sock.recvfrom(2048)
assert oack[:2] == b"\\x00\\x06", oack
sock.connect(tid)
sock.send(b"\\x00\\x04\\x00\\x00")
digest, expected = hashlib.sha256(), 1
while True:
    data = sock.recv(blksize + 4)
    assert data[:2] == b"\\x00\\x03" and struct.unpack("!H", data[2:4])[0] == expected, data[:4]
    digest.update(data[4:])
    last = len(data) < blksize + 4
    if last or expected % window == 0:
        time.sleep(pause)
        sock.send(b"\\x00\\x04" + data[2:4])
    if last:
        break
    expected += 1
print(digest.hexdigest())
"""


@pytest.mark.parametrize("ack_spin", [0.5, 0.0])  # 0.5 s: a margin for a loaded machine
async def test_a_lone_windowed_transfer_busy_waits_for_its_next_ack(
        files: DirFiles, root: Path, ack_spin: float) -> None:
    """A lone windowed transfer's next ACK is polled for (``ack_spin``) after its window
    went out, not waited for by the event loop: with a client that takes 1 ms before each
    ACK, the loop turns a handful of times over the transfer's 101 windows, where without
    the wait it turns during every one of those milliseconds."""
    # 100 full windows of 8 x 512, then one of two blocks (a window of one block is sent as
    # lock-step's, and waited for by the event loop).
    data = pattern(8 * 512 * 100 + 512 + 7)
    (root / "windows.bin").write_bytes(data)
    server = await started(files, retransmit=5.0, min_rto=None, ack_spin=ack_spin)
    turns = 0  # the event loop's turns from the first window's ACK to the end

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += any(t.sender.acked for t in server._transfers.values())
            await asyncio.sleep(0)

    tick = asyncio.create_task(ticker())
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WINDOW_CLIENT, str(server.port), "windows.bin", "512", "8",
            "0.001", stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert out.decode().strip() == hashlib.sha256(data).hexdigest()
        await until(lambda: server.stats.completed == 1)
        assert server.stats.retransmissions == 0
        if ack_spin:
            assert turns < 20, turns
        else:
            assert turns > 100, turns
    finally:
        tick.cancel()
        await server.close()


class _AskingFiles(DirFiles):
    """DirFiles that asks ``local`` (TftpServer's by_address) for every file, as Content does
    for a rendered one, and keeps what it was told."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.told: list[str | None] = []

    async def tftp_open(self, path: str, peer: tuple[str, int],
                        local: Callable[[], str | None] | None = None) -> Blob:
        self.told.append(local() if local is not None else "not asked")
        return await super().tftp_open(path, peer)


@pytest.mark.parametrize("by_address", [False, True])
async def test_a_lookup_is_told_the_address_reached_only_where_the_files_answer_by_it(
        root: Path, client: RawClient, by_address: bool) -> None:
    """With ``by_address`` (the base URL is loopback: Content.at) the lookup may ask the
    address the request came in on: the listener's own where it is bound to one (else the
    route's source to the client: tests/test_service_reached_netns.py). Without, it is
    given nothing to ask (every other setup: an RRQ's cost unchanged)."""
    files = _AskingFiles(root)
    server = await started(files, by_address=by_address)
    try:
        got = await fetch(client, addr(server), "small.bin")
    finally:
        await server.close()
    assert got.data == (root / "small.bin").read_bytes()
    assert files.told == (["127.0.0.1"] if by_address else ["not asked"])
