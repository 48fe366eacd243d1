"""Listening before aiohttp is imported (netboot.servers.http.Doorway): ``netboot serve``
binds its listeners, the front door answers devices and ``/healthz`` at once, and a request
only aiohttp answers waits on its connection until aiohttp is ready, then gets its answer —
on both listeners, pipelined or not, with a body or not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

import netboot.service as wiring
from netboot.config import load
from netboot.service import Service, build
from tests.conftest import child_json, write_config


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines
                  if line.lower().startswith("content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 30)
    return int(lines[0].split()[1]), body


async def until(check: Callable[[], bool]) -> None:
    """Wait (bounded) until ``check()`` holds."""
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached in 30 s")


Held = tuple[Service, threading.Event, "asyncio.Future[None]"]  # service, gate, its start()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """aiohttp's side of a start is imported once the test sets this event."""
    gate = threading.Event()
    real = wiring._import_aiohttp_side

    def import_when_let() -> None:
        gate.wait(60)
        return real()

    monkeypatch.setattr(wiring, "_import_aiohttp_side", import_when_let)
    yield gate
    gate.set()


@contextlib.asynccontextmanager
async def starting(tmp_path: Path, gate: threading.Event) -> AsyncIterator[Held]:
    """A service starting as ``serve`` starts it, its listeners bound and answering, and
    aiohttp's side held back until ``gate`` is set."""
    service = await build(load(write_config(tmp_path), env={}), app=False)
    start = asyncio.ensure_future(service.start())
    try:
        await until(lambda: bool(service.https_port) or start.done())
        assert service.runner is None and service.doorway is not None
        yield service, gate, start
    finally:
        gate.set()
        await asyncio.wait_for(asyncio.shield(start), 60)
        await service.close()


def run_on(loop: str, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=wiring.loop_factory(loop)) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_front_door_answers_and_aiohttp_requests_wait_for_their_answer(
        tmp_path: Path, gate: threading.Event, loop: str) -> None:
    async def scenario() -> None:
        async with starting(tmp_path, gate) as held:
            await waiting_requests_are_answered(*held)

    run_on(loop, scenario)


async def waiting_requests_are_answered(service: Service, gate: threading.Event,
                                        start: asyncio.Future[None]) -> None:
    doorway = service.doorway
    assert doorway is not None
    token = (service.config.data_dir / "admin.token").read_text().strip()
    port = service.http_port
    # Before aiohttp: the front door's routes answer.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == (200, b"ok\n")
    # Pipelined: a front answer, a request for aiohttp (the API), another front answer.
    writer.write(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /api/v1/machines HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {token}\r\n\r\n".encode()
                 + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, script = await read_response(reader)
    assert status == 200 and script.startswith(b"#!ipxe")
    # A request with a body, on a second connection; a third connection says nothing yet.
    body = json.dumps({"mac": "52:54:00:00:00:21"}).encode()
    post_r, post_w = await asyncio.open_connection("127.0.0.1", port)
    post_w.write(b"POST /api/v1/machines HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    await until(lambda: doorway.held == 2 and len(doorway.early) == 3)
    assert service.runner is None  # still waiting for aiohttp: nothing answered them

    gate.set()
    await asyncio.wait_for(start, 60)
    assert service.runner is not None and not doorway.early
    status, listed = await read_response(reader)
    assert status == 200 and json.loads(listed)["total"] in (0, 1)
    assert await read_response(reader) == (200, b"ok\n")  # in order, after the API's answer
    status, made = await read_response(post_r)
    assert status == 201 and json.loads(made)["mac"] == "52:54:00:00:00:21"
    idle_w.write(b"GET /api/v1/machines/52:54:00:00:00:21 HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {token}\r\n\r\n".encode())
    status, one = await read_response(idle_r)
    assert status == 200 and json.loads(one)["hostname"] == "node-000021"
    for w in (writer, post_w, idle_w):
        w.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_https_requests_before_aiohttp_get_their_answers(
        tmp_path: Path, gate: threading.Event, loop: str) -> None:
    async def scenario() -> None:
        async with starting(tmp_path, gate) as held:
            await waiting_https_request_is_answered(*held)

    run_on(loop, scenario)


async def waiting_https_request_is_answered(service: Service, gate: threading.Event,
                                            start: asyncio.Future[None]) -> None:
    doorway = service.doorway
    assert doorway is not None
    client = ssl.create_default_context(cafile=str(service.config.data_dir / "tls" / "ca.pem"))
    client.check_hostname = False  # the certificate names 192.0.2.10, the test dials loopback
    reader, writer = await asyncio.open_connection("127.0.0.1", service.https_port, ssl=client)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /api/v1/machines HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == (200, b"ok\n")  # the front door, over TLS
    await until(lambda: doorway.held == 1)
    gate.set()
    await asyncio.wait_for(start, 60)
    status, _ = await read_response(reader)
    assert status == 401  # aiohttp's API: no token given
    writer.close()


def test_serve_answers_before_it_imports_aiohttp(tmp_path: Path) -> None:
    """The first answers of a ``serve`` start come from a process that has not imported
    aiohttp; it is imported once the listeners answer, and then answers the API; the system
    CAs its client's contexts would read at import (netboot.cacerts) are never read: ~2 MiB
    resident that a server making no outgoing HTTPS request does not need; nor are
    frozenlist's C++ extension (libstdc++) and prometheus_client (until a scrape) loaded."""
    path = write_config(tmp_path)
    script = (
        "import asyncio, json, sys, threading\n"
        "import netboot.service as wiring\n"
        "from netboot.config import load\n"
        "gate = threading.Event()\n"
        "real = wiring._import_aiohttp_side\n"
        "wiring._import_aiohttp_side = lambda: gate.wait(60) and real()\n"
        "async def get(port, path):\n"
        "    r, w = await asyncio.open_connection('127.0.0.1', port)\n"
        "    w.write(f'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n'"
        ".encode())\n"
        "    status = (await r.readline()).split()[1].decode()\n"
        "    w.close()\n"
        "    return status\n"
        "async def main():\n"
        f"    service = await wiring.build(load({str(path)!r}, env={{}}), app=False)\n"
        "    start = asyncio.ensure_future(service.start())\n"
        "    for _ in range(3000):\n"
        # Served, not only bound: the port is known once bound (start_serving=False), and
        # a loaded machine's connect found it refused before start served it (s40-flake).
        "        if service.listeners and service.listeners[0].is_serving() or start.done():\n"
        "            break\n"
        "        await asyncio.sleep(0.01)\n"
        "    before = [await get(service.http_port, '/healthz'),\n"
        "              await get(service.http_port, '/boot.ipxe'), 'aiohttp' in sys.modules]\n"
        "    gate.set()\n"
        "    await start\n"
        "    after = [await get(service.http_port, '/api/v1/machines'),\n"
        "             'aiohttp' in sys.modules]\n"
        "    import ssl, aiohttp.connector\n"
        "    held = (aiohttp.connector._SSL_CONTEXT_VERIFIED,  # read after the import\n"
        "            aiohttp.connector._SSL_CONTEXT_UNVERIFIED)\n"
        "    await asyncio.sleep(1.0)  # the branch before read them within ~0.1 s of start\n"
        "    after.append([h.cert_store_stats()['x509_ca'] for h in held])\n"
        "    after.append(ssl.create_default_context().cert_store_stats()['x509_ca'] > 0)\n"
        "    import frozenlist\n"
        "    after.append([frozenlist.FrozenList.__module__,  # not its C++ extension\n"
        "                  'prometheus_client' in sys.modules])  # imported at a scrape\n"
        "    await service.close()\n"
        "    print(json.dumps([before, after]))\n"
        "asyncio.run(main())\n"
    )
    before, after = child_json(script)
    assert before == ["200", "200", False]
    assert after == ["401", True, [0, 0], True,  # a context made after reads them
                     ["frozenlist", False]]


def test_serve_starts_without_the_modules_only_errors_and_imports_use(tmp_path: Path) -> None:
    """A started ``serve`` (the CLI's imports, then build and start, aiohttp's side in) has
    not loaded difflib (a misspelt configuration key's suggestion) nor csv (a CSV import
    posted to it): each is imported where it is used, and still does its work there
    (benchmarks/README.md, issue 10, session 15)."""
    path = write_config(tmp_path)
    script = (
        "import asyncio, json, sys\n"
        "import netboot.cli\n"
        "import netboot.service as wiring\n"
        "from netboot.config import load\n"
        "from netboot.enroll import parse_import\n"
        "from netboot.errors import ConfigError\n"
        "LAZY = ['difflib', 'csv', '_csv']\n"
        "async def main():\n"
        f"    service = await wiring.build(load({str(path)!r}, env={{}}), app=False)\n"
        "    await service.start()\n"
        "    started = [m for m in LAZY if m in sys.modules]\n"
        "    await service.close()\n"
        "    return started\n"
        "started = asyncio.run(main())\n"
        f"open({str(tmp_path / 'bad.yaml')!r}, 'w').write('htp:\\n  port: 80\\n')\n"
        "try:\n"
        f"    load({str(tmp_path / 'bad.yaml')!r}, env={{}})\n"
        "    fix = None\n"
        "except ConfigError as exc:\n"
        "    fix = exc.fix\n"
        "rows = parse_import('mac,hostname\\n52:54:00:00:00:01,a\\n', 'csv')\n"
        "print(json.dumps([started, fix, [r[1]['hostname'] for r in rows],\n"
        "                  [m for m in LAZY if m in sys.modules]]))\n"
    )
    started, fix, hostnames, after = child_json(script)
    assert started == []
    assert fix == "did you mean 'http'?"
    assert hostnames == ["a"]
    assert after == ["difflib", "csv", "_csv"]


async def test_the_view_loads_while_aiohttp_is_still_being_imported(
        tmp_path: Path, gate: threading.Event) -> None:
    """/healthz and DHCP answer as soon as the listeners are bound: a storm that starts
    then must have its inventory view loading, not waiting behind the API's import (its
    DISCOVERs timed out on the store while it did: every device waited for its 4 s
    retransmission)."""
    service = await build(load(write_config(tmp_path), env={}), app=False)
    loaded = asyncio.Event()
    service.view_loaded = loaded.set
    start = asyncio.ensure_future(service.start())
    try:
        await asyncio.wait_for(loaded.wait(), 20)
        assert service.runner is None and not start.done()  # aiohttp still held back
    finally:
        gate.set()
        await asyncio.wait_for(asyncio.shield(start), 60)
        await service.close()
