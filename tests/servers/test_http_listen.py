"""A listener's port is its own from the bind on (netboot.servers.http.listen).

``Service.start`` binds every listener first and serves them only once all are bound
(/healthz says "ok" only then). A socket bound and not listening is no one's port yet: with
SO_REUSEADDR (asyncio's default, libuv's always) another process may bind the same port and
listen first (a test's "free port" picked and let go, another server given that port). On
asyncio's loop the service's own listen() then failed at start; on uvloop's, what ``netboot
serve`` runs, it failed silently: start() returned, the summary named the port, and every
client of it reached the other server (its certificate, its inventory).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from netboot.config import load
from netboot.pki import Authority
from netboot.servers.http import listen
from netboot.service import build, loop_factory
from tests.certs import leaf_der, served_certificate
from tests.conftest import write_config


def taken_by_another(port: int, host: str = "127.0.0.1") -> socket.socket | None:
    """Another server's socket bound and listening on ``port`` (SO_REUSEADDR, as asyncio's,
    aiohttp's and libuv's are), or None when the kernel refuses it the port."""
    thief = socket.socket()
    thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        thief.bind((host, port))
        thief.listen()
    except OSError:
        thief.close()
        return None
    return thief


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::"])
def test_a_listener_not_yet_serving_holds_its_port(loop: str, host: str) -> None:
    """Bound, not yet accepting (``start_serving=False``): no other socket takes the port,
    a connection made meanwhile waits in the backlog, and is answered once it serves."""
    answered: list[bytes] = []

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            answered.append(b"hello")
            transport.write(b"hello")
            transport.close()

    async def scenario() -> None:
        server = await listen(Hello, host, 0, start_serving=False)  # type: ignore[arg-type]
        thief = None
        try:
            port = server.sockets[0].getsockname()[1]
            thief = taken_by_another(port, "0.0.0.0" if host == "::" else host)
            assert thief is None, "another socket bound and listened on the service's port"
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 10)
            assert answered == []  # queued, not yet accepted
            await server.start_serving()
            assert await asyncio.wait_for(reader.read(), 10) == b"hello"
            writer.close()
        finally:
            if thief is not None:
                thief.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_services_https_port_is_not_taken_between_its_bind_and_its_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """Another netboot-CA server tries the HTTPS port as soon as it is bound: refused, and a
    client of the port start() names is served this service's certificate. Before, it got
    the port: start() failed on asyncio's loop, and on uvloop's started and never listened,
    every handshake answered with the other certificate."""
    import netboot.service as service_module

    other = Authority(tmp_path / "other", b"another CA").server_certificate(["192.0.2.10"])
    bound = service_module.listen
    thieves: list[asyncio.AbstractServer] = []
    refused: list[int] = []

    async def then_another(*args: Any, **kwargs: Any) -> asyncio.Server:
        server = await bound(*args, **kwargs)
        if kwargs.get("ssl_context") is not None:
            thief = taken_by_another(server.sockets[0].getsockname()[1])
            if thief is None:
                refused.append(server.sockets[0].getsockname()[1])
            else:
                thieves.append(await asyncio.get_running_loop().create_server(
                    asyncio.Protocol, sock=thief, ssl=other.ssl_context()))
        return server

    monkeypatch.setattr(service_module, "listen", then_another)

    async def scenario() -> None:
        service = await build(load(write_config(tmp_path), env={}))
        try:
            await service.start()
            assert service.tls is not None
            assert await served_certificate(service.https_port) == leaf_der(
                service.tls.cert_file)
            assert refused == [service.https_port]
        finally:
            for thief in thieves:
                thief.close()
            await service.close()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(scenario())

