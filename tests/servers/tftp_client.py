"""Test helpers for the TFTP server: a content class over a directory plus in-memory blobs, and
a hand-rolled asyncio client on real loopback sockets that can misbehave on purpose.

Every receive is bounded by a timeout; every loop by a count.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from netboot.files import FileTree
from netboot.model import Blob
from netboot.wire.tftp import (
    Ack,
    Data,
    Error,
    OptionAck,
    Packet,
    ReadRequest,
    encode,
    parse,
)
from tests.servers.udp_io import recvfrom

Address = tuple[str, int]
LOOPBACK = "127.0.0.1"


class DirFiles:
    """A real :class:`TftpFiles`: FileTree over a directory plus in-memory blobs."""

    def __init__(self, root: Path, memory: dict[str, bytes] | None = None) -> None:
        self.tree = FileTree([root])
        self.memory = dict(memory or {})
        self.opened: list[tuple[str, Address]] = []

    async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
        self.opened.append((path, peer))
        if path in self.memory:
            data = self.memory[path]
            return Blob(size=len(data), data=data)
        if path == "boom":
            raise RuntimeError("a bug in the content layer")
        return self.tree.blob(path)


async def until(predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
    """Wait for server-side state to change, bounded in time (no fixed sleeps)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


class RawClient:
    """A UDP socket on 127.0.0.1 (or another loopback address) speaking TFTP by hand."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()
        return host, port

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, packet: Packet | bytes, dest: Address) -> None:
        data = packet if isinstance(packet, bytes) else encode(packet)
        self.sock.sendto(data, dest)

    async def recv_raw(self, timeout: float = 3.0) -> tuple[bytes, Address]:
        async with asyncio.timeout(timeout):
            return await recvfrom(self.sock, 70000)

    async def recv(self, timeout: float = 3.0) -> tuple[Packet, Address]:
        data, addr = await self.recv_raw(timeout)
        return parse(data), addr

    async def nothing(self, timeout: float = 0.2) -> bool:
        """True if no datagram arrives within ``timeout`` (used only to show silence)."""
        try:
            await self.recv_raw(timeout)
        except TimeoutError:
            return True
        return False

    def rrq(
        self,
        server: Address,
        name: str,
        options: Iterable[tuple[str, str]] = (),
        mode: str = "octet",
    ) -> None:
        self.send(ReadRequest(name, mode, tuple(options)), server)


@dataclass
class Fetched:
    data: bytes
    oack: OptionAck | None
    tid: Address
    wire_blocks: list[int] = field(default_factory=list)  # block numbers as received, in order
    acks: int = 0


async def fetch(
    client: RawClient,
    server: Address,
    name: str,
    options: Iterable[tuple[str, str]] = (),
    *,
    drop: Iterable[int] = (),
    max_packets: int = 200_000,
    timeout: float = 3.0,
    mode: str = "octet",
) -> Fetched:
    """Download ``name`` like an RFC 7440 receiver (U-Boot's behaviour, protocols.md §3.7).

    ``drop`` lists absolute block numbers (1-based, unwrapped) to drop the first time they
    arrive. Out of order: one ACK for the last in-order block, then wait for it.
    """
    opts = tuple(options)
    client.rrq(server, name, opts, mode)
    to_drop = set(drop)
    first, tid = await client.recv(timeout)
    oack: OptionAck | None = None
    blksize, window = 512, 1
    if isinstance(first, OptionAck):
        oack = first
        blksize = int(first.option("blksize") or 512)
        window = int(first.option("windowsize") or 1)
        client.send(Ack(0), tid)
        pending: Packet | None = None
    elif isinstance(first, Data):
        pending = first
    else:
        raise AssertionError(f"unexpected first reply {first!r}")
    out = bytearray()
    result = Fetched(b"", oack, tid)
    expected = 1  # absolute
    last_acked = 0
    complained = False
    for _ in range(max_packets):
        if pending is None:
            pkt, src = await client.recv(timeout)
            assert src == tid, f"reply from {src}, transfer TID is {tid}"
        else:
            pkt, pending = pending, None
        if isinstance(pkt, Error):
            raise AssertionError(f"server sent ERROR {pkt.code} {pkt.message!r}")
        assert isinstance(pkt, Data), pkt
        absolute = expected if pkt.block == expected % 65536 else None
        if absolute is not None and absolute in to_drop:
            to_drop.discard(absolute)
            continue
        if absolute is None:
            # Out of order (a block was lost) or a duplicate: one ACK for the last good block.
            if not complained and pkt.block != (expected - 1) % 65536:
                complained = True
                last_acked = expected - 1
                client.send(Ack(last_acked % 65536), tid)
                result.acks += 1
            continue
        complained = False
        result.wire_blocks.append(pkt.block)
        out += pkt.data
        expected += 1
        last = len(pkt.data) < blksize
        if last or expected - 1 - last_acked >= window:
            last_acked = expected - 1
            client.send(Ack(last_acked % 65536), tid)
            result.acks += 1
        if last:
            result.data = bytes(out)
            return result
    raise AssertionError("too many packets")


@dataclass
class LossyFetched:
    data: bytes
    dropped: int = 0  # datagrams this client threw away, in and out
    data_received: int = 0  # DATA datagrams that arrived (kept or not)
    duplicates: int = 0  # DATA for a block already received


async def lossy_fetch(
    client: RawClient,
    server: Address,
    name: str,
    options: Iterable[tuple[str, str]] = (),
    *,
    loss: float,
    seed: int,
    duplicate: float = 0.0,
    ack_timeout: float = 0.3,
    max_packets: int = 200_000,
    dally: Callable[[], bool] | None = None,
) -> LossyFetched:
    """Download ``name`` through a link that loses ``loss`` of the datagrams each way: each
    one that arrives, and each ACK about to be sent, is dropped by a seeded RNG (the same
    pattern on every run). Like U-Boot and RFC 1350 clients, every duplicate or out-of-order
    DATA is answered with an ACK of the last in-order block, and the last ACK (or the RRQ)
    is sent again after ``ack_timeout`` without DATA. ``duplicate`` of the ACKs that are
    sent go out twice (a link that duplicates datagrams).

    ``dally``: after the last block, keep answering the server's resends of it with the final
    ACK until ``dally()`` is true (RFC 1350 §6: the final ACK may be lost too, and its sender
    waits to send it again), at most ~5 s; without it the fetch returns at once."""
    import random

    rng = random.Random(seed)  # a drop pattern, not security-relevant
    result = LossyFetched(b"")
    opts = tuple(options)
    request = encode(ReadRequest(name, "octet", opts))
    blksize = int(dict((k.lower(), v) for k, v in opts).get("blksize", 512))
    window = 1
    tid: Address | None = None
    expected, since_ack = 1, 0
    out = bytearray()

    def ack(block: int) -> None:
        nonlocal since_ack
        since_ack = 0
        if rng.random() < loss:
            result.dropped += 1
        else:
            assert tid is not None
            client.send(Ack(block % 65536), tid)
            if duplicate and rng.random() < duplicate:
                client.send(Ack(block % 65536), tid)

    client.send(request, server)
    for _ in range(max_packets):
        try:
            pkt, src = await client.recv(ack_timeout)
        except TimeoutError:
            if tid is None:
                client.send(request, server)  # the RRQ or its answer was lost
            else:
                ack(expected - 1)
            continue
        if rng.random() < loss:
            result.dropped += 1
            continue
        if isinstance(pkt, Error):
            raise AssertionError(f"server sent ERROR {pkt.code} {pkt.message!r}")
        if tid is None:
            tid = src
        assert src == tid, f"reply from {src}, transfer TID is {tid}"
        if isinstance(pkt, OptionAck):
            if expected == 1:
                blksize = int(pkt.option("blksize") or 512)
                window = int(pkt.option("windowsize") or 1)
                ack(0)
            continue
        assert isinstance(pkt, Data), pkt
        result.data_received += 1
        if pkt.block != expected % 65536:
            if (expected - pkt.block) % 65536 < 0x8000:
                result.duplicates += 1
            ack(expected - 1)
            continue
        out += pkt.data
        expected += 1
        since_ack += 1
        if len(pkt.data) < blksize:
            ack(expected - 1)
            result.data = bytes(out)
            for _ in range(100 if dally is not None else 0):
                if dally is not None and dally():
                    break
                try:
                    pkt, src = await client.recv(0.05)
                except TimeoutError:
                    continue
                if isinstance(pkt, Data) and src == tid and rng.random() >= loss:
                    ack(expected - 1)  # the last window again: our final ACK was lost
            return result
        if since_ack >= window:
            ack(expected - 1)
    raise AssertionError("too many packets")
