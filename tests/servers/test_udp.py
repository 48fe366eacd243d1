"""The UDP error boundary and the draining transport over real sockets (loopback and an
AF_UNIX datagram pair, which blocks a sender when the receiver's queue is full)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time

import pytest

from netboot.errors import DecodeError
from netboot.servers.udp import (
    Address,
    BoundaryProtocol,
    DrainingTransport,
    Reply,
    open_datagram_endpoint,
    open_stamped_endpoint,
)
from tests.servers.udp_io import recvfrom

LOOPBACK = "127.0.0.1"
_log = logging.getLogger("tests.udp")


def echo(data: bytes, peer: Address) -> list[Reply]:
    """Answers b"bad…" with a DecodeError, b"bug…" with a bug, anything else with itself."""
    if data.startswith(b"bad"):
        raise DecodeError("not a packet", field="header", offset=0)
    if data.startswith(b"bug"):
        raise RuntimeError("a bug")
    return [(data, peer)]


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


async def test_asyncio_loop_gets_the_draining_transport_and_serves_a_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A burst larger than one read batch, with a malformed datagram, a bug and an oversized
    datagram among them: every good one is answered in order, the others are dropped and
    logged, and the listener keeps serving."""
    caplog.set_level(logging.INFO, logger="tests.udp")
    server = udp_socket()
    port = server.getsockname()[1]
    protocol = BoundaryProtocol("echo", echo, logger=_log, max_size=1000)
    transport = await open_datagram_endpoint(server, protocol)
    assert isinstance(transport, DrainingTransport)
    assert transport.get_extra_info("socket") is server
    client = udp_socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    good = [f"n{i}".encode() for i in range(150)]
    for i, data in enumerate(good):
        client.sendto(data, (LOOPBACK, port))
        if i == 70:
            client.sendto(b"bad one", (LOOPBACK, port))
            client.sendto(b"bug one", (LOOPBACK, port))
            client.sendto(b"x" * 2000, (LOOPBACK, port))  # read whole, dropped by size
    got = [(await asyncio.wait_for(recvfrom(client, 4096), 5))[0] for _ in good]
    assert got == good
    assert (protocol.received, protocol.dropped) == (153, 3)
    text = caplog.text
    assert "malformed datagram" in text and "bug while handling" in text
    assert "dropped 2000-byte datagram" in text
    transport.close()
    assert transport.is_closing()
    await asyncio.sleep(0)
    assert protocol.transport is None and server.fileno() == -1
    client.close()


async def test_a_stamped_transport_gives_each_datagram_its_kernel_receive_time() -> None:
    """Each datagram is handed over with the time the kernel received it (CLOCK_REALTIME
    nanoseconds, the clock of time.time_ns()), not the time it was read: two datagrams
    queued while reading is paused keep the order and times they came in, before the
    moment reading resumed."""
    server = udp_socket()
    seen: list[tuple[bytes, int | None]] = []

    class Stamps(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            seen.append((data, transport.arrived))

    transport = open_stamped_endpoint(server, Stamps())
    client = udp_socket()
    # The first socket of the system to ask for stamps turns them on by deferred kernel
    # work (net_enable_timestamp); until it has run, a datagram is stamped when read.
    await asyncio.sleep(0.05)
    transport.pause_reading()
    before = time.time_ns()
    client.sendto(b"one", server.getsockname())
    client.sendto(b"two", server.getsockname())
    await asyncio.sleep(0.05)
    resumed = time.time_ns()
    transport.resume_reading()
    for _ in range(500):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.01)
    (first, one), (second, two) = seen
    assert (first, second) == (b"one", b"two")
    assert one is not None and two is not None
    assert before <= one <= two < resumed
    transport.close()
    client.close()


async def test_a_send_that_would_block_is_queued_in_order_then_flushed() -> None:
    """An AF_UNIX datagram pair refuses a sender once the receiver's queue is full: what the
    transport cannot send at once waits, in order, and goes out when the socket is writable;
    past ``max_queued`` sendto raises ENOBUFS (which BoundaryProtocol logs)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    transport = DrainingTransport(asyncio.get_running_loop(), ours, asyncio.DatagramProtocol(),
                                  max_queued=50)
    sent = 0
    while transport.get_write_buffer_size() == 0:
        transport.sendto(sent.to_bytes(4, "big"))
        sent += 1
        assert sent < 100_000
    for _ in range(49):
        transport.sendto(sent.to_bytes(4, "big"))
        sent += 1
    with pytest.raises(OSError, match="queued"):
        transport.sendto(b"one too many")
    loop = asyncio.get_running_loop()
    got: list[int] = []
    while len(got) < sent:
        data = await asyncio.wait_for(loop.sock_recv(theirs, 64), 5)
        got.append(int.from_bytes(data, "big"))
    assert got == list(range(sent))
    await asyncio.sleep(0)
    assert transport.get_write_buffer_size() == 0
    transport.close()
    await asyncio.sleep(0)
    theirs.close()


async def test_receive_errors_go_to_error_received() -> None:
    """ICMP port unreachable for an earlier send surfaces on the next read of a UDP socket:
    it reaches the protocol's error_received and the transport keeps reading."""
    errors: list[Exception] = []

    class Protocol(asyncio.DatagramProtocol):
        def error_received(self, exc: Exception) -> None:
            errors.append(exc)

    server = udp_socket()
    transport = DrainingTransport(asyncio.get_running_loop(), server, Protocol())
    gone = udp_socket()
    gone_address = gone.getsockname()
    gone.close()
    server.connect(gone_address)  # connected: the kernel reports the ICMP error on it
    transport.sendto(b"to nobody")
    for _ in range(100):  # the error makes the socket readable: the loop reads it
        if errors:
            break
        await asyncio.sleep(0.01)
    assert errors and isinstance(errors[0], ConnectionRefusedError)
    transport.close()
    await asyncio.sleep(0)


async def test_past_the_tasks_in_flight_datagrams_wait_in_order_for_one_to_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The waiting room: with every task taken, a datagram is kept as it came, its handler
    not called yet; when a task ends the oldest are handled, in arrival order. Past the
    room, and for one that waited longer than ``max_wait``, the listener drops and logs."""
    caplog.set_level(logging.INFO, logger="tests.udp")
    go_on = asyncio.Event()
    handled: list[bytes] = []

    def slow(data: bytes, peer: Address) -> list[Reply] | asyncio.Future[list[Reply]]:
        handled.append(data)
        if data.startswith(b"quick"):  # answered at once: takes no task
            return [(data, peer)]

        async def later() -> list[Reply]:
            await go_on.wait()
            return [(data, peer)]

        return asyncio.ensure_future(later())

    async def exchange(protocol: BoundaryProtocol, sent: list[bytes],
                       answered: int) -> list[bytes]:
        transport = await open_datagram_endpoint(udp_socket(), protocol)
        port = transport.get_extra_info("socket").getsockname()[1]
        client = udp_socket()
        try:
            for data in sent:
                client.sendto(data, (LOOPBACK, port))
            for _ in range(1000):
                if protocol.received == len(sent):
                    break
                await asyncio.sleep(0.001)
            assert protocol.received == len(sent)
            return [(await asyncio.wait_for(recvfrom(client, 4096), 5))[0]
                    for _ in range(answered)]
        finally:
            go_on.set()
            await protocol.drain()
            transport.close()
            client.close()

    protocol = BoundaryProtocol("slow", slow, logger=_log, max_in_flight=2, max_waiting=4,
                                max_wait=60)
    sent = [b"a", b"b", b"c", b"quick d", b"e", b"f", b"g"]

    async def release_when_all_came() -> None:
        while protocol.received < len(sent):
            await asyncio.sleep(0.001)
        assert handled == [b"a", b"b"]  # the rest not handled yet
        go_on.set()

    releasing = asyncio.ensure_future(release_when_all_came())
    got = await exchange(protocol, sent, 6)
    await releasing
    assert sorted(got) == sorted(sent[:6]) and handled == sent[:6]  # in arrival order
    assert (protocol.dropped, protocol.waited) == (1, 4)
    assert "2 requests in flight and 4 waiting, dropping one" in caplog.text

    go_on.clear()
    caplog.clear()
    handled.clear()
    protocol = BoundaryProtocol("slow", slow, logger=_log, max_in_flight=1, max_waiting=4,
                                max_wait=0)
    sent = [b"h", b"i"]

    async def release_later() -> None:
        while protocol.received < len(sent):
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # i waits past max_wait
        go_on.set()

    releasing = asyncio.ensure_future(release_later())
    assert await exchange(protocol, sent, 1) == [b"h"]
    await releasing
    assert handled == [b"h"] and (protocol.dropped, protocol.waited) == (1, 0)
    assert re.search(r"dropping one from 127.0.0.1 that waited [0-9.]+s for its turn",
                     caplog.text)
