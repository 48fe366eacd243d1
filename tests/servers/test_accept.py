"""HTTP listeners (netboot.servers.http.listen, netboot.servers.accept): every connection
waiting is accepted at one readiness, on asyncio's loop and on uvloop's (whose own listeners
take one a turn of the loop), over real sockets on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

import netboot.service as wiring
from netboot.servers import accept
from netboot.servers.http import Doorway, listen

WAITING = 200  # connections the clients opened before the server's loop turned once


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=wiring.loop_factory(loop)) as runner:
        runner.run(scenario())


class Counted(asyncio.Protocol):
    """A connection that says hello and remembers it was made."""

    made: list[Counted]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(self)
        cast(asyncio.WriteTransport, transport).write(b"hello")


def counting() -> tuple[list[Counted], Callable[[], Counted]]:
    made: list[Counted] = []

    def factory() -> Counted:
        protocol = Counted()
        protocol.made = made
        return protocol
    return made, factory


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_pallet_of_connections_is_accepted_in_a_few_turns_of_a_busy_loop(loop: str) -> None:
    # A storm's loop turns slowly (10-50 ms a turn with 1,000 downloads under way): a
    # listener that takes one connection a turn (uvloop's own) left a pallet of devices
    # in the kernel's accept queue for seconds. Here the clients connect before the loop
    # turns; the loop's turns are counted until every connection was made.
    async def scenario() -> None:
        made, factory = counting()
        server = await listen(cast(Doorway, factory), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = []
        try:
            for _ in range(WAITING):  # completed by the kernel, queued for accept()
                clients.append(socket.create_connection(("127.0.0.1", port)))
            turns = 0
            while len(made) < WAITING and turns < WAITING:
                await asyncio.sleep(0)  # one turn: ready callbacks, then a poll of I/O
                turns += 1
            assert len(made) == WAITING
            assert turns <= 10, f"{turns} turns of the loop for {WAITING} connections"
            for client in clients:  # each one is a working connection
                client.settimeout(10)
                assert client.recv(5) == b"hello"
        finally:
            for client in clients:
                client.close()
            server.close()
            await server.wait_closed()

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_listener_binds_as_create_server_did(loop: str) -> None:
    async def scenario() -> None:
        made, factory = counting()
        # Not serving until asked; the port taken is refused to a second listener with the
        # address in the error, as create_server's was (service.bind_error reads it).
        server = await listen(cast(Doorway, factory), "127.0.0.1", 0, start_serving=False)
        port = server.sockets[0].getsockname()[1]
        assert not server.is_serving()
        with pytest.raises(OSError, match=r"127\.0\.0\.1"):
            await listen(cast(Doorway, factory), "127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        assert made == []  # queued, not accepted
        await server.start_serving()
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        writer.close()
        server.close()
        assert server.sockets == ()
        with pytest.raises(OSError):  # closed: nothing listens there any more
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        # "::" is both families' every address, one port for both, IPv4 peers as IPv4.
        both = await listen(cast(Doorway, factory), "::", 0)
        families = sorted(sock.family for sock in both.sockets)
        assert families == [socket.AF_INET, socket.AF_INET6]
        assert len({sock.getsockname()[1] for sock in both.sockets}) == 1
        for host in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(host, both.sockets[0].getsockname()[1])
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
            writer.close()
        both.close()

    run_on(loop, scenario)


def test_tls_connections_are_accepted_with_the_listeners_context(tmp_path: Path) -> None:
    from netboot.pki import Authority  # the server's own certificate, as serve makes it

    async def scenario() -> None:
        made, factory = counting()
        authority = Authority(tmp_path, b"passphrase")
        tls = authority.server_certificate(["localhost", "127.0.0.1"])
        server = await listen(cast(Doorway, factory), "127.0.0.1", 0,
                              ssl_context=tls.ssl_context())
        port = server.sockets[0].getsockname()[1]
        # A client that does not speak TLS is dropped at its handshake; the listener goes on.
        plain = socket.create_connection(("127.0.0.1", port))
        plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
        client = ssl.create_default_context(cadata=tls.ca_pem)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname="localhost")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        assert len(made) == 1  # the plain client's connection never reached the protocol
        writer.close()
        plain.close()
        server.close()

    run_on("uvloop", scenario)


def test_out_of_descriptors_pauses_accepting_and_resumes(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    async def scenario() -> None:
        made, factory = counting()
        monkeypatch.setattr(accept, "ACCEPT_RETRY_DELAY", 0.05)
        server = await listen(cast(Doorway, factory), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        real = socket.socket.accept
        failures = [OSError(24, "Too many open files")]

        def accepting(sock: socket.socket) -> tuple[socket.socket, Any]:
            if failures:
                raise failures.pop()
            return real(sock)
        monkeypatch.setattr(socket.socket, "accept", accepting)
        client = socket.create_connection(("127.0.0.1", port))
        for _ in range(200):
            if made:
                break
            await asyncio.sleep(0.01)
        assert len(made) == 1 and not failures
        client.close()
        server.close()

    run_on("asyncio", scenario)
