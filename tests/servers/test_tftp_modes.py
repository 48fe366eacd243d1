"""TFTP transfer modes and request edges, side by side with tftpd-hpa: netascii (RFC 1350,
RFC 764's NVT line ends) compared byte for byte with what tftpd-hpa's ``in.tftpd`` sends for
the same file and blksize, real clients (tftp-hpa, atftp) fetching in netascii, and the
answers to modes, options and malformed requests. Real UDP sockets on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from netboot.servers.tftp import TftpServer
from netboot.wire.tftp import Data, Error, ErrorCode, OptionAck, netascii
from tests.servers.test_tftp import addr, run
from tests.servers.tftp_client import LOOPBACK, DirFiles, RawClient, fetch

IN_TFTPD = "/opt/tftpd-hpa/usr/sbin/in.tftpd"
needs_in_tftpd = pytest.mark.requires(IN_TFTPD, "tftpd-hpa (unpacked by tests/install-deps.sh)")
needs_hpa = pytest.mark.requires("tftp", "tftp-hpa")
needs_atftp = pytest.mark.requires("atftp", "atftp")

# Every kind of line end and lone byte a text file may hold: LF, CR LF, a lone CR, CR CR, a
# NUL, a CR last in the file; the runs put a CR pair across the block edge at blksize 8, 512
# and 1468 once converted (test_the_test_file_splits_pairs_across_block_edges).
TEXT = (b"DEFAULT install\nLABEL install\r\n  KERNEL /k/Image\rAPPEND a=b\r\r\n\x00"
        + b"y" * 401 + b"\r\n" * 40 + b"\n\r" * 30 + b"z" * 672 + b"\r\n" * 10 + b"tail\r")
# A per-machine file (rendered, in memory): CR LF line ends as a Windows editor leaves them.
RENDERED = b"#!ipxe\r\nchain http://192.0.2.1/ipxe?mac=${net0/mac}\r\n" * 20


def _splits(stream: bytes, blksize: int) -> int:
    """How many blocks of ``stream`` end inside a CR pair (a CR last, its LF or NUL first in
    the next block): the edge the conversion must carry across."""
    return sum(1 for end in range(blksize, len(stream), blksize) if stream[end - 1] == 13)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "pxelinux.cfg").mkdir(parents=True)
    (r / "pxelinux.cfg" / "default").write_bytes(TEXT)
    (r / "rendered.cfg").write_bytes(RENDERED)  # what tftpd-hpa serves for the rendered one
    (r / "b.bin").write_bytes(bytes(range(256)) * 4)
    (r / "sub").mkdir()
    for f in r.rglob("*"):  # settled: the packet cache keeps them (_PacketCache.SETTLE)
        os.utime(f, (time.time() - 60, time.time() - 60))
    return r


@pytest.fixture
def files(root: Path) -> DirFiles:
    return DirFiles(root, {"machine.cfg": RENDERED})


@pytest.fixture
async def server(files: DirFiles) -> AsyncIterator[TftpServer]:
    srv = TftpServer(files, host=LOOPBACK, port=0)  # type: ignore[arg-type]
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _in_tftpd(root: Path) -> Iterator[int]:
    port = _free_udp_port()
    proc = subprocess.Popen(
        [IN_TFTPD, "--listen", "--foreground", "--address", f"{LOOPBACK}:{port}", "--secure",
         "--user", "root", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.kill()  # (a listener with no state to save; its own pid, never by name)
        proc.wait()


@pytest.fixture
async def hpa(root: Path) -> AsyncIterator[tuple[str, int]]:
    """tftpd-hpa's in.tftpd on 127.0.0.1, serving ``root``, answering (a bounded wait)."""
    with _in_tftpd(root) as port, RawClient() as probe:
        for _ in range(100):
            probe.rrq((LOOPBACK, port), "nope")
            with contextlib.suppress(TimeoutError):
                pkt, _ = await probe.recv(0.1)
                assert isinstance(pkt, Error), pkt
                break
        else:
            raise AssertionError("in.tftpd did not answer within 10 s")
        yield LOOPBACK, port


# ---------------------------------------------------------------- netascii, byte for byte


def test_the_test_file_splits_pairs_across_block_edges() -> None:
    """The files below put a CR pair across a block edge at each blksize compared (else the
    comparisons would not show the edge carried)."""
    for blksize in (8, 512, 1468):
        assert _splits(netascii(TEXT), blksize) > 0, blksize
    assert _splits(netascii(RENDERED), 8) > 0


@needs_in_tftpd
@pytest.mark.parametrize("blksize", [None, 8, 512, 1468])
@pytest.mark.parametrize(("name", "served_as"), [
    ("pxelinux.cfg/default", "pxelinux.cfg/default"),
    ("machine.cfg", "rendered.cfg"),  # netboot's in-memory blob, tftpd-hpa's file of it
], ids=["file", "rendered"])
async def test_netascii_is_what_tftpd_hpa_sends(
    server: TftpServer, hpa: tuple[str, int], name: str, served_as: str, blksize: int | None
) -> None:
    options = [] if blksize is None else [("blksize", str(blksize))]
    with RawClient() as a, RawClient() as b:
        theirs = await fetch(a, hpa, served_as, options, mode="netascii")
        ours = await fetch(b, addr(server), name, options, mode="netascii")
    assert ours.data == theirs.data
    original = TEXT if name.startswith("pxelinux") else RENDERED
    assert ours.data != original and len(ours.data) > len(original)  # converted, not octet
    if blksize is not None:
        assert ours.oack is not None and ours.oack.option("blksize") == str(blksize)


@needs_in_tftpd
@pytest.mark.parametrize("windowsize", [2, 4, 64])
async def test_netascii_windowed_is_what_tftpd_hpa_sends_in_lock_step(
    server: TftpServer, hpa: tuple[str, int], windowsize: int
) -> None:
    """RFC 7440 windows of the converted stream (tftpd-hpa 5.2 has no windowsize: its
    lock-step bytes are the reference), from prebuilt packets."""
    opts = [("blksize", "8")]
    with RawClient() as a, RawClient() as b:
        theirs = await fetch(a, hpa, "pxelinux.cfg/default", opts, mode="netascii")
        ours = await fetch(b, addr(server), "pxelinux.cfg/default",
                           [*opts, ("windowsize", str(windowsize))], mode="netascii")
    assert ours.oack is not None and ours.oack.option("windowsize") == str(windowsize)
    assert ours.data == theirs.data


@needs_in_tftpd
async def test_netascii_from_a_source_past_the_packet_size_is_what_tftpd_hpa_sends(
    files: DirFiles, hpa: tuple[str, int]
) -> None:
    """A rendered file whose converted bytes exceed ``cache_file_size`` (its own bytes do
    not) is served from a MemorySource, read per window, not from packets."""
    srv = TftpServer(files, host=LOOPBACK, port=0,  # type: ignore[arg-type]
                     cache_file_size=len(RENDERED) + 1)
    await srv.start()
    try:
        for opts in ([("blksize", "8")], [("blksize", "8"), ("windowsize", "4")]):
            with RawClient() as a, RawClient() as b:
                theirs = await fetch(a, hpa, "rendered.cfg", opts[:1], mode="netascii")
                ours = await fetch(b, addr(srv), "machine.cfg", opts, mode="netascii")
            assert ours.data == theirs.data
            assert len(ours.data) > len(RENDERED) + 1
    finally:
        await srv.close()


# ------------------------------------------------------------------------- real clients


@needs_hpa
@pytest.mark.parametrize("name", ["pxelinux.cfg/default", "machine.cfg"])
async def test_tftp_hpa_client_in_ascii_mode_gets_the_file_as_it_is(
    server: TftpServer, tmp_path: Path, name: str
) -> None:
    """tftp-hpa's ``-m ascii`` turns CR LF back into LF and CR NUL into CR: the file arrives
    with its CR LF and lone CRs intact only if the server converted it (served as octet, each
    CR LF came back as a bare LF)."""
    rc, out = await run(["tftp", LOOPBACK, str(server.port), "-m", "ascii", "-c", "get",
                          name, "out"], tmp_path)
    assert rc == 0, out
    want = TEXT if name.startswith("pxelinux") else RENDERED
    assert (tmp_path / "out").read_bytes() == want


@needs_atftp
async def test_atftp_client_in_netascii_mode_gets_the_file_as_it_is(
    server: TftpServer, tmp_path: Path
) -> None:
    rc, out = await run(["atftp", "--get", "--option", "mode netascii", "-r", "machine.cfg",
                          "-l", "out", LOOPBACK, str(server.port)], tmp_path)
    assert rc == 0, out
    assert (tmp_path / "out").read_bytes() == RENDERED


# ------------------------------------------------------------------- options and modes


async def test_netascii_leaves_tsize_out_of_the_oack(
    server: TftpServer
) -> None:
    """tftpd-hpa knows no size of a converted file (it refuses the request, ERROR 8), dnsmasq
    ignores the option in netascii: the OACK carries the other options and no tsize, and a
    request whose only option is tsize gets DATA 1 at once (RFC 2347: no option granted)."""
    with RawClient() as client:
        got = await fetch(client, addr(server), "pxelinux.cfg/default",
                          [("tsize", "0"), ("blksize", "512")], mode="netascii")
        assert got.oack is not None
        assert got.oack.options == (("blksize", "512"),)
        assert got.data == netascii(TEXT)
        with RawClient() as other:
            other.rrq(addr(server), "pxelinux.cfg/default", [("tsize", "0")], "netascii")
            pkt, _ = await other.recv()
            assert pkt == Data(1, netascii(TEXT)[:512])
        # octet keeps it
        with RawClient() as third:
            got = await fetch(third, addr(server), "pxelinux.cfg/default", [("tsize", "0")])
            assert got.oack is not None and got.oack.option("tsize") == str(len(TEXT))


@pytest.mark.parametrize(("mode", "converted"), [
    ("netascii", True), ("NetASCII", True), ("NETASCII", True), ("octet", False),
    ("OCTET", False), ("Octet", False)])
async def test_modes_are_case_insensitive(
    server: TftpServer, mode: str, converted: bool
) -> None:
    with RawClient() as client:
        got = await fetch(client, addr(server), "pxelinux.cfg/default", mode=mode)
        assert got.data == (netascii(TEXT) if converted else TEXT)


@pytest.mark.parametrize("mode", ["mail", "binary", "ascii", "", "octet "])
async def test_other_modes_get_error_4(server: TftpServer, mode: str) -> None:
    with RawClient() as client:
        # tftpd-hpa: ERROR 4 "Unknown mode" ("Missing mode" for an empty one); RFC 1350's "mail"
        # is obsolete and a read-only server has no mailbox.
        client.rrq(addr(server), "b.bin", (), mode)
        pkt, _ = await client.recv()
        assert isinstance(pkt, Error) and pkt.code == ErrorCode.ILLEGAL_OPERATION


async def test_octet_and_netascii_packets_of_a_file_are_kept_apart(
    server: TftpServer
) -> None:
    """The packet cache keys a file's netascii packets apart from its octet ones: the same
    file and blksize fetched both ways, in both orders, gets each its own bytes, and each
    form is built once."""
    name = "pxelinux.cfg/default"
    for mode, want in [("octet", TEXT), ("netascii", netascii(TEXT)), ("octet", TEXT),
                       ("netascii", netascii(TEXT))]:
        with RawClient() as c:
            got = await fetch(c, addr(server), name, mode=mode)
        assert got.data == want, mode
    assert server.cache.builds == 2
    assert server.cache.hits == 2


async def test_netascii_of_a_file_just_written_is_converted_and_not_kept(
    server: TftpServer, root: Path
) -> None:
    """A file modified within the cache's SETTLE is not kept (its timestamps may not tell a
    rewrite): its netascii form is built for the transfer from the descriptor it opened."""
    (root / "fresh.cfg").write_bytes(TEXT)
    with RawClient() as c:
        got = await fetch(c, addr(server), "fresh.cfg", [("blksize", "8")], mode="netascii")
    assert got.data == netascii(TEXT)
    assert server.cache.builds == 0


async def test_netascii_of_a_file_above_cache_file_size_is_refused_saying_why(
    files: DirFiles
) -> None:
    with RawClient() as client:
        srv = TftpServer(files, host=LOOPBACK, port=0,  # type: ignore[arg-type]
                         cache_file_size=100)
        await srv.start()
        try:
            client.rrq(addr(srv), "pxelinux.cfg/default", (), "netascii")
            pkt, _ = await client.recv()
            assert isinstance(pkt, Error) and pkt.code == ErrorCode.NOT_DEFINED
            assert "netascii" in pkt.message
            with RawClient() as c:  # octet of it streams as before
                assert (await fetch(c, addr(srv), "pxelinux.cfg/default")).data == TEXT
        finally:
            await srv.close()


# ------------------------------------------------------------------ malformed requests


@pytest.mark.parametrize(("datagram", "field"), [
    (b"\x00\x01b.bin\x00octet", "mode"),  # the mode's NUL missing (tftpd-hpa: "Request not
    (b"\x00\x01b.bin\x00", "mode"),  # null-terminated"), no mode ("Missing mode")
    (b"\x00\x01b.bin", "filename"),
    (b"\x00\x01\xff\xfe\x00octet\x00", "filename"),  # not UTF-8
    (b"\x00\x01b.bin\x00octet\x00blksize\x00512", "option value"),
    (b"\x00\x02up.bin\x00octet", "mode"),  # a WRQ too
])
async def test_a_malformed_request_gets_error_4_naming_the_field(
    server: TftpServer, datagram: bytes, field: str
) -> None:
    """Answered, as tftpd-hpa and dnsmasq answer it, not left to time out; the server goes
    on serving."""
    with RawClient() as client:
        client.send(datagram, addr(server))
        pkt, _ = await client.recv()
        assert pkt == Error(ErrorCode.ILLEGAL_OPERATION, f"malformed request: bad {field}")
        with RawClient() as c:
            assert (await fetch(c, addr(server), "b.bin")).data == bytes(range(256)) * 4


async def test_a_last_option_without_its_value_is_ignored_and_the_file_served(
    server: TftpServer
) -> None:
    with RawClient() as client:
        # tftpd-hpa and dnsmasq serve it: RFC 2347 lets a server ignore an option.
        client.send(b"\x00\x01b.bin\x00octet\x00tsize\x000\x00blksize\x00", addr(server))
        pkt, tid = await client.recv()
        assert pkt == OptionAck((("tsize", "1024"),))
        client.send(b"\x00\x04\x00\x00", tid)
        pkt, _ = await client.recv()
        assert pkt == Data(1, bytes(range(256)) * 2)


# ------------------------------------------------------------ side by side with tftpd-hpa


async def _answer(server: tuple[str, int], datagram: bytes) -> tuple[str, int | bytes]:
    """The first answer to ``datagram`` from a fresh port: ("error", its code), or ("data",
    the whole file as the transfer carried it, ACKed in lock-step)."""
    with RawClient() as c:
        c.send(datagram, server)
        pkt, tid = await c.recv()
        if isinstance(pkt, Error):
            return "error", pkt.code
        blksize = 512
        if isinstance(pkt, OptionAck):
            blksize = int(pkt.option("blksize") or 512)
            c.send(b"\x00\x04\x00\x00", tid)
            pkt, _ = await c.recv()
        out = bytearray()
        block = 1
        for _ in range(10_000):
            assert isinstance(pkt, Data), pkt
            if pkt.block == block:  # (a resent copy of the block before is ACKed again)
                out += pkt.data
                block += 1
            c.send(b"\x00\x04" + pkt.block.to_bytes(2, "big"), tid)
            if pkt.block == block - 1 and len(pkt.data) < blksize:
                return "data", bytes(out)
            pkt, _ = await c.recv()
        raise AssertionError("too many blocks")


@needs_in_tftpd
@pytest.mark.parametrize("datagram", [
    b"\x00\x01b.bin\x00mail\x00",  # tftpd-hpa: ERROR 4 "Unknown mode"
    b"\x00\x01b.bin\x00binary\x00",
    b"\x00\x01b.bin\x00\x00",  # "Missing mode"
    b"\x00\x01b.bin\x00",  # "Missing mode"
    b"\x00\x01b.bin",
    b"\x00\x01b.bin\x00OCTET\x00",
    b"\x00\x01pxelinux.cfg/default\x00NetASCII\x00blksize\x008\x00",
    b"\x00\x01pxelinux.cfg/default\x00netascii\x00blksize\x00512\x00windowsize\x004\x00",
    b"\x00\x01b.bin\x00octet\x00foo\x00bar\x00",  # an unknown option: ignored
    b"\x00\x01b.bin\x00octet\x00blksize\x00",  # a last option without its value
    b"\x00\x01b.bin\x00octet\x00tsize\x000\x00\x00\x00\x00",  # padding NULs
    b"\x00\x01nope\x00octet\x00",  # ERROR 1
    b"\x00\x01/b.bin\x00octet\x00",
    b"\x00\x01./b.bin\x00octet\x00",
    b"\x00\x01pxelinux.cfg//default\x00octet\x00",
])
async def test_answered_as_tftpd_hpa_answers(
    server: TftpServer, hpa: tuple[str, int], datagram: bytes
) -> None:
    """The same datagram to in.tftpd and to netboot: the same ERROR code, or the same bytes.
    (Where netboot answers otherwise on purpose, benchmarks/README.md s49-tftp's table says
    why: invalid option values ignored, not ERROR 8; blksize capped at mtu - 32; ``..``
    refused; ``\\`` taken as ``/``; tsize from the file, not echoed. A mode without its
    NUL is left out: in.tftpd's answer depends on the request before it, read into the same
    buffer: ERROR 4 "Request not null-terminated" after one, the file after another.)"""
    assert await _answer(addr(server), datagram) == await _answer(hpa, datagram)
