"""HTTP's listeners (netboot.servers.accept, through netboot.servers.http.listen): a pallet of
devices that connect together is accepted at once on a busy loop, on asyncio's loop and on
uvloop, and the listener binds, serves TLS, survives bad clients, pauses out of descriptors
and closes as ``create_server``'s did. Real sockets on loopback, real loops."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from netboot.pki import Authority
from netboot.servers.http import listen
from netboot.service import loop_factory

LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(scenario())


class Turns:
    """Counts the loop's turns: a callback that puts itself back at each turn, burning a
    little CPU as a storm's turn does (sendfile to a thousand sockets)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.count, self.handle = loop, 0, loop.call_soon(self._turn)

    def _turn(self) -> None:
        self.count += 1
        sum(range(20_000))  # a busy turn, ~0.5 ms
        self.handle = self.loop.call_soon(self._turn)

    def stop(self) -> None:
        self.handle.cancel()


class Echo(asyncio.Protocol):
    """Answers each chunk with b"ok:" + the chunk; notes the turn it was made at."""

    made: list[int]
    turns: Turns | None = None

    def __init__(self) -> None:
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's is no asyncio.Transport subclass
        Echo.made.append(Echo.turns.count if Echo.turns is not None else -1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"ok:" + data)


def echo() -> Echo:
    return Echo()


@pytest.fixture(autouse=True)
def fresh_echo() -> None:
    Echo.made, Echo.turns = [], None


async def until(check: Callable[[], bool], what: str) -> None:
    """Turn the loop until ``check()`` holds (bounded: 30 s, a bound and not a measure)."""
    end = time.monotonic() + 30
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not reached in 30 s: {what}")
        await asyncio.sleep(0)


async def ask(host: str, port: int, message: bytes,
              tls: ssl.SSLContext | None = None) -> bytes:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls,
                                server_hostname=host if tls is not None else None), 30)
    writer.write(message)
    answer = await asyncio.wait_for(reader.readexactly(3 + len(message)), 30)
    writer.close()
    return answer


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pallet_of_connections_is_accepted_in_a_few_turns_of_a_busy_loop(
        loop: str) -> None:
    """200 devices connect before the loop turns (their handshakes done by the kernel, all
    in the accept queue): every connection is made within a few turns, each answers. uvloop's
    own listener (main's create_server) took one a turn: 200 turns for 200."""
    devices = 200

    async def scenario() -> None:
        server = await listen(echo, "127.0.0.1", 0)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        clients = []
        try:
            for _ in range(devices):  # blocking connects: the loop does not turn meanwhile
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                clients.append(client)
            Echo.turns = turns = Turns(asyncio.get_running_loop())
            await until(lambda: len(Echo.made) == devices, "every connection made")
            turns.stop()
            assert max(Echo.made) <= 10, (
                f"{devices} connections took {max(Echo.made)} turns of the loop")
            for n, client in enumerate(clients):
                client.setblocking(True)
                client.sendall(b"%d" % n)
            for n, client in enumerate(clients):
                expected = b"ok:%d" % n
                got = b""
                while len(got) < len(expected):
                    chunk = await asyncio.to_thread(client.recv, 64)
                    assert chunk, f"device {n}'s connection closed"
                    got += chunk
                assert got == expected
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_listener_binds_as_create_server_did(loop: str) -> None:
    """Bound and queueing but not accepting until start_serving; a port taken refused with
    the address named; "::" is one port for IPv4 and IPv6, an IPv4 peer seen as IPv4;
    closed: refused, wait_closed returns, a connection made before goes on."""

    async def scenario() -> None:
        server = await listen(echo, "127.0.0.1", 0,  # type: ignore[arg-type]
                              start_serving=False)
        port = server.sockets[0].getsockname()[1]
        assert not server.is_serving()
        early = socket.create_connection(("127.0.0.1", port), timeout=10)  # queued
        for _ in range(50):
            await asyncio.sleep(0)
        assert Echo.made == []  # not accepted before start_serving
        with pytest.raises(OSError) as taken:
            await listen(echo, "127.0.0.1", port)  # type: ignore[arg-type]
        assert taken.value.errno == errno.EADDRINUSE
        assert f"('127.0.0.1', {port})" in str(taken.value)
        await server.start_serving()
        assert server.is_serving()
        early.setblocking(True)
        early.sendall(b"early")
        assert await asyncio.to_thread(early.recv, 64) == b"ok:early"
        server.close()
        await server.wait_closed()
        assert not server.is_serving() and server.sockets == ()
        with pytest.raises(ConnectionRefusedError):
            await ask("127.0.0.1", port, b"late")
        early.sendall(b"still")  # a connection made before the close goes on
        assert await asyncio.to_thread(early.recv, 64) == b"ok:still"
        early.close()

        every = await listen(echo, "::", 0)  # type: ignore[arg-type]
        try:
            families = {s.family for s in every.sockets}
            assert families == {socket.AF_INET, socket.AF_INET6}
            assert len({s.getsockname()[1] for s in every.sockets}) == 1
            port = every.sockets[0].getsockname()[1]
            assert await ask("127.0.0.1", port, b"v4") == b"ok:v4"
            assert await ask("::1", port, b"v6") == b"ok:v6"
            peers = []

            class Peer(Echo):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    super().connection_made(transport)
                    peers.append(transport.get_extra_info("peername")[0])

            peered = await listen(Peer, "::", 0)  # type: ignore[arg-type]
            port = peered.sockets[0].getsockname()[1]
            await ask("127.0.0.1", port, b"x")
            assert peers == ["127.0.0.1"]  # not ::ffff:127.0.0.1
            peered.close()
        finally:
            every.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_tls_connections_are_accepted_with_the_listeners_context(
        loop: str, tmp_path: Path) -> None:
    """netboot's own certificate is what a TLS client verifies; a plain client at the TLS
    port (a device that got an http:// URL wrong) is dropped and the listener goes on."""
    tls = Authority(tmp_path / "ca", b"test").server_certificate(["127.0.0.1"])
    client = ssl.create_default_context(cadata=tls.ca_pem)

    async def scenario() -> None:
        server = await listen(echo, "127.0.0.1", 0,  # type: ignore[arg-type]
                              ssl_context=tls.ssl_context())
        port = server.sockets[0].getsockname()[1]
        try:
            assert await ask("127.0.0.1", port, b"secret", tls=client) == b"ok:secret"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n")
            # The server's TLS layer ends it: an alert at most, never an answer in the clear.
            try:
                rest = await asyncio.wait_for(reader.read(), 60)
            except ConnectionResetError:
                rest = b""
            assert b"HTTP/1.1" not in rest
            writer.close()
            assert await ask("127.0.0.1", port, b"again", tls=client) == b"ok:again"
        finally:
            server.close()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", LOOPS)
def test_out_of_descriptors_pauses_accepting_and_resumes(
        loop: str, caplog: pytest.LogCaptureFixture) -> None:
    """The process out of descriptors (a real EMFILE from accept): the listener stops
    accepting for ``RETRY_DELAY`` (1 s) rather than spin on the socket that stays readable
    (a log line a pause, not one a turn), and accepts the waiting connection once
    descriptors are free again."""
    caplog.set_level(logging.ERROR, logger="netboot.servers.accept")

    async def scenario() -> None:
        server = await listen(echo, "127.0.0.1", 0)  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        device = socket.socket()  # its descriptor before there are none left
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers: list[int] = []
        try:
            # Every descriptor number below the limit taken: the next accept gets EMFILE.
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
            while True:
                try:
                    fillers.append(os.dup(0))
                except OSError as exc:
                    assert exc.errno == errno.EMFILE
                    break
            device.settimeout(10)
            device.connect(("127.0.0.1", port))  # made by the kernel, queued
            Echo.turns = turns = Turns(asyncio.get_running_loop())
            await until(lambda: turns.count >= 200, "200 turns")
            assert Echo.made == []
            assert server.is_serving()
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Resumed after the pause: the connection that waited in the queue is made, the
        # device never told to go (libuv's own listener closes one it cannot take: its
        # "EMFILE trick", uv__emfile_trick).
        await until(lambda: len(Echo.made) == 1, "accepted after the pause")
        device.sendall(b"back")
        assert await asyncio.to_thread(device.recv, 64) == b"ok:back"
        device.close()
        turns.stop()
        server.close()
        # Logged, a line a pause (a second), not one at each of the 200 turns and more that
        # a listener spinning on its readable socket would have logged.
        pauses = [r for r in caplog.records if "accepting paused" in r.getMessage()]
        assert 1 <= len(pauses) < 20

    run_on(loop, scenario)

