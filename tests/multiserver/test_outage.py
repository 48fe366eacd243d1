"""A server that loses its inventory: known machines are answered from memory, writes are
refused with a clear 503, /healthz and metrics say so, and it catches up when the database
is back; nothing a client was told is done is lost.

SQLite: another program holds the database's locks (SQLite answers "locking protocol" to
every read and write), in-process with the aiohttp test client. PostgreSQL: the cluster is
stopped by its PID and started again, under two real ``netboot serve`` processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from netboot.model import Arch, BootRequest, Firmware, MacAddress
from tests import pg
from tests.conftest import Env, EnvFactory, boot, call, install_token
from tests.multiserver.conftest import Inventory, Pair, Server, running_pair
from tests.multiserver.test_pair import is_install, seed

DONE = "52:54:00:13:10:01"  # registered: boots its disk
NEW = "52:54:00:13:10:02"  # enrolled: would install

# SQLite's WAL locks live in the -shm file from byte 120: the writer's, the checkpointer's,
# recovery's and the five read marks (sqlite3 wal.c: WALINDEX_LOCK_OFFSET, SQLITE_SHM_NLOCK).
# A program holding them all leaves every reader and writer with SQLITE_PROTOCOL.
LOCKER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8, 120, os.SEEK_SET)
print("locked", flush=True)
sys.stdin.read()
"""


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process holds the inventory's locks until the block ends (ended by its own
    handle: its stdin closes)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, f"{db}-shm"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


async def registered(env: Env, mac: str) -> None:
    """Enrolled, installed and registered through the API, as a device does it."""
    await env.post("/api/v1/machines", {"mac": mac}, status=201)
    token = install_token(await boot(env, mac))
    await env.post("/api/v1/register", {"mac": mac, "token": token,
                                        "addresses": ["192.0.2.61"]}, status=200, headers={})


async def until(check: object, what: str, *, seconds: float = 60) -> None:
    """Poll ``check()`` (a coroutine function) until true; a bound, not a timed claim."""
    for _ in range(int(seconds / 0.1)):
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


async def test_sqlite_locked_away_answers_known_machines_and_catches_up(
        make_env: EnvFactory) -> None:
    env = await make_env()
    await env.seed()
    service = env.service
    await registered(env, DONE)
    assert "exit" in await boot(env, DONE)
    await env.post("/api/v1/machines", {"mac": NEW}, status=201)
    await env.get(f"/api/v1/machines/{NEW}/explain")  # the boot path's view knows it now
    done = await service.store.machine_by("mac", DONE)
    assert done is not None
    await service.boot.drain()
    before = [e.kind for e in await service.store.list_events(done.id)].count("local-boot")
    recorder = service.enroller.recorder

    with locked(service.store.path):
        # The first request finds the inventory locked (SQLite gives up after its retries)
        # and is answered from memory; from then on none waits.
        assert "exit" in await boot(env, DONE)
        assert not service.boot.health.up
        refused = await call(env, "GET", f"/ipxe?mac={NEW}&arch=x86_64", admin=False)
        assert refused.status == 503, refused.text
        assert "the inventory is unreachable" in refused.json()["error"]
        health = await call(env, "GET", "/healthz", admin=False)
        assert health.status == 503
        assert health.text.startswith("degraded: the inventory is unreachable since ")
        assert "locking protocol" not in health.text  # the state only: s37-polish
        assert "locking protocol" in (service.boot.health.problem() or "")
        stage = await service.boot.first_stage(BootRequest(
            mac=MacAddress.parse(DONE), firmware=Firmware.BIOS, arch=Arch.X86, via="dhcp"))
        assert stage is not None and stage.path == "undionly.kpxe"
        # The local boot's event is kept for later, not dropped, and not retried per event.
        await until(lambda: asyncio.sleep(0, recorder.failing is not None),
                    "the recorder's write failed")
        assert recorder.queued == 1
        metrics = (await service.metrics.render(service.store)).decode()
        assert "netboot_inventory_up 0.0" in metrics
        assert "netboot_inventory_queued_events 1.0" in metrics
        await service.watch_once()  # still locked: still degraded
        assert not service.boot.health.up

    await service.watch_once()  # what the watcher does every half second
    assert service.boot.health.up and recorder.failing is None and recorder.queued == 0
    assert (await call(env, "GET", "/healthz", admin=False)).text == "ok\n"
    kinds = [e.kind for e in await service.store.list_events(done.id)]
    assert kinds.count("local-boot") == before + 1
    assert is_install(await boot(env, NEW))
    assert "netboot_inventory_up 1.0" in (await service.metrics.render(service.store)).decode()


# --- PostgreSQL: two servers, the database stopped and started ---------------------------


@pytest.fixture
def own_postgres() -> Iterator[pg.Cluster]:
    """A cluster of this test alone: it is stopped and started again."""
    with pg.running() as cluster:
        yield cluster


@pytest.fixture
async def pg_pair(tmp_path: Path, own_postgres: pg.Cluster) -> AsyncIterator[Pair]:
    dsn = own_postgres.dsn()
    async with running_pair(tmp_path, Inventory("postgresql", f"  backend: postgresql\n"
                                                f"  dsn: {dsn!r}\n")) as running:
        yield running


async def healthy(pair: Pair, server: Server) -> bool:
    async with pair.http.get(server.base + "/healthz") as resp:
        return resp.status == 200


async def pair_registered(pair: Pair, mac: str, via: Server) -> None:
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": mac}, status=201)
    token = install_token(await pair.boot(via, mac))
    await pair.call(via, "POST", "/api/v1/register", admin=False, status=200,
                    body={"mac": mac, "token": token, "addresses": ["192.0.2.61"]})


async def test_postgresql_stopped_and_started_under_two_servers(
        pg_pair: Pair, own_postgres: pg.Cluster) -> None:
    pair = pg_pair
    await seed(pair, pair.a)
    await pair_registered(pair, DONE, pair.b)
    assert "exit" in await pair.boot(pair.b, DONE)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": NEW}, status=201)
    await pair.call(pair.b, "GET", f"/api/v1/machines/{NEW}/explain", status=200)

    async def local_boots() -> int:
        events = await pair.call(pair.a, "GET", f"/api/v1/machines/{DONE}/events", status=200)
        return [e["kind"] for e in events].count("local-boot")

    # B writes the boot's event within its recorder's delay, after the answer: counted once
    # it is there, or the outage's event below would be mistaken for it.
    await until(lambda: _at_least(local_boots, 1), "B wrote the local boot's event")
    before = await local_boots()

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, own_postgres.halt)
    try:
        assert "exit" in await pair.boot(pair.b, DONE)  # from B's memory
        async with pair.http.get(f"{pair.b.base}/ipxe?mac={NEW}&arch=x86_64") as resp:
            body = await resp.json()
            assert resp.status == 503 and "the inventory is unreachable" in body["error"]
        await until(lambda: healthy_not(pair, pair.a), "A says it is degraded")
        for server in (pair.a, pair.b):
            async with pair.http.get(server.base + "/healthz") as resp:
                text = await resp.text()
                assert resp.status == 503 and text.startswith("degraded: the inventory is "
                                                              "unreachable since "), text
            metrics = await pair.call(server, "GET", "/metrics", admin=False, status=200)
            assert "netboot_inventory_up 0.0" in metrics
        async with pair.http.post(pair.a.base + "/api/v1/machines", headers=pair.auth,
                                  json={"mac": "52:54:00:13:10:03"}) as resp:
            assert resp.status == 503  # a write, refused: nothing was done
    finally:
        await loop.run_in_executor(None, own_postgres.restart)

    for server in (pair.a, pair.b):
        await until(lambda s=server: healthy(pair, s), f"{server.name} is healthy again")  # type: ignore[misc]
    # B's queued local-boot event was written once the database was back.
    await until(lambda: _at_least(local_boots, before + 1), "B wrote the queued event")
    assert await local_boots() == before + 1
    assert is_install(await pair.boot(pair.b, NEW))
    # Enrolled through A now, booted through B at once: the views follow again.
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": "52:54:00:13:10:04"},
                    status=201)
    assert is_install(await pair.boot(pair.b, "52:54:00:13:10:04"))


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def healthy_not(pair: Pair, server: Server) -> bool:
    return not await healthy(pair, server)


async def test_database_restart_between_ipxe_and_register_loses_nothing(
        pg_pair: Pair, own_postgres: pg.Cluster) -> None:
    """The install token B handed out was committed before B answered: a database restart
    before the device registers loses neither it nor the registration."""
    pair = pg_pair
    await seed(pair, pair.a)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": NEW}, status=201)
    token = install_token(await pair.boot(pair.b, NEW))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, own_postgres.halt)
    try:
        body = {"mac": NEW, "token": token, "addresses": ["192.0.2.62"]}
        async with pair.http.post(pair.a.base + "/api/v1/register", json=body) as resp:
            assert resp.status == 503  # told so; the device tries again
    finally:
        await loop.run_in_executor(None, own_postgres.restart)
    await until(lambda: healthy(pair, pair.a), "A is healthy again")
    machine = await pair.call(pair.a, "POST", "/api/v1/register", body=body, admin=False,
                              status=200)
    assert machine["state"] == "registered" and machine["ipv4"] == "192.0.2.62"
    events = await pair.call(pair.b, "GET", f"/api/v1/machines/{NEW}/events", status=200)
    kinds = [e["kind"] for e in events]
    assert "install-plan" in kinds and kinds[-1] == "registered", kinds


async def _read_only(dsn: str, on: bool) -> None:
    """The whole server turned read-only (or back) for every session, open ones too: what a
    standby, a demoted primary, or a managed service nearly out of storage answers."""
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET default_transaction_read_only = off")
        await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on
                           else "ALTER SYSTEM RESET default_transaction_read_only")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def test_postgresql_turned_read_only_is_told_as_refusing_writes(
        pg_pair: Pair, own_postgres: pg.Cluster) -> None:
    """PostgreSQL answers reads but refuses every write (SQLSTATE 25006): each server's
    503 says the inventory refuses writes, its /healthz says so from its next watch, its
    status names the cause and the fix, known machines boot from memory; once the server
    takes writes again, both say ok and installs go on. (Before s39-multi: every write a
    503 "the inventory is unreachable", sending operators to the network, and /healthz
    200 ok throughout.)"""
    pair = pg_pair
    await seed(pair, pair.a)
    await pair_registered(pair, DONE, pair.b)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": NEW}, status=201)
    await pair.call(pair.b, "GET", f"/api/v1/machines/{NEW}/explain", status=200)
    await _read_only(own_postgres.dsn(), True)
    try:
        # Told by each server's check (every check_interval), before either writes.
        for server in (pair.a, pair.b):
            await until(lambda s=server: healthy_not(pair, s),  # type: ignore[misc]
                        f"{server.name} says it refuses writes")
        async with pair.http.post(pair.a.base + "/api/v1/machines", headers=pair.auth,
                                  json={"mac": "52:54:00:13:10:05"}) as resp:
            body = await resp.json()
            assert resp.status == 503 and "refuses writes" in body["error"], body
        async with pair.http.get(f"{pair.b.base}/ipxe?mac={NEW}&arch=x86_64") as resp:
            body = await resp.json()
            assert resp.status == 503 and "refuses writes" in body["error"], body
        for server in (pair.a, pair.b):
            async with pair.http.get(server.base + "/healthz") as resp:
                text = await resp.text()
                assert text.startswith("degraded: the inventory answers reads but refuses "
                                       "writes since "), text
            status = await pair.call(server, "GET", "/api/v1/status", status=200)
            detail = status["inventory"]["detail"]
            assert status["inventory"]["state"] == "degraded", status
            assert "read-only" in detail and "primary" in detail, detail
            metrics = await pair.call(server, "GET", "/metrics", admin=False, status=200)
            assert "netboot_inventory_up 0.0" in metrics
        assert "exit" in await pair.boot(pair.b, DONE)  # from memory
    finally:
        await _read_only(own_postgres.dsn(), False)
    for server in (pair.a, pair.b):
        await until(lambda s=server: healthy(pair, s), f"{server.name} is healthy again")  # type: ignore[misc]
    assert is_install(await pair.boot(pair.b, NEW))
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": "52:54:00:13:10:05"},
                    status=201)
    assert "takes writes again" in pair.a.log()


@pytest.mark.root
async def test_a_full_postgresql_disk_found_by_a_is_told_by_b_at_once(
        tmp_path: Path, postgres: pg.Cluster) -> None:
    """The inventory's tablespace on an 8 MiB tmpfs, filled by another table: A's write is
    refused (503, disk full); B, which writes nothing meanwhile, says so too (/healthz,
    status, metrics: what the dashboard's banner shows) from A's notification, not from its
    own next write; both say ok again once space is freed. (Before s40-multi: B said ok
    until it wrote, A degraded: one server healthy, its peer failing.)"""
    import asyncpg

    admin = await asyncpg.connect(postgres.dsn())
    try:
        async with pg.tiny_tablespace(postgres, "8m") as space, \
                pg.fresh_schema(postgres) as dsn:
            shared = Inventory("postgresql", "  backend: postgresql\n"
                               f"  dsn: {dsn + '&default_tablespace=' + space!r}\n")
            async with running_pair(tmp_path, shared) as pair:
                await seed(pair, pair.a)
                await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": NEW},
                                status=201)
                schema = dsn.split("search_path=", 1)[1]
                await pg.fill_tablespace(admin, schema, space)
                assert await healthy(pair, pair.b)
                refused = None
                for i in range(300):  # until a write needs a page the disk has not
                    async with pair.http.post(pair.a.base + "/api/v1/machines",
                                              headers=pair.auth,
                                              json={"mac": f"52:54:00:13:11:{i % 256:02x}",
                                                    "hostname": f"h{i}" + "x" * 50}) as resp:
                        if resp.status == 503:
                            refused = await resp.json()
                            break
                        assert resp.status == 201, await resp.text()
                assert refused is not None and "full" in refused["error"], refused
                await until(lambda: healthy_not(pair, pair.b), "B says the disk is full")
                status = await pair.call(pair.b, "GET", "/api/v1/status", status=200)
                assert status["inventory"]["state"] == "degraded", status
                assert "No space left on device" in status["inventory"]["detail"], status
                metrics = await pair.call(pair.b, "GET", "/metrics", admin=False, status=200)
                assert "netboot_inventory_up 0.0" in metrics
                await admin.execute(f"DROP TABLE {schema}.filler")
                for server in (pair.a, pair.b):
                    await until(lambda s=server: healthy(pair, s),  # type: ignore[misc]
                                f"{server.name} is healthy again")
                assert is_install(await pair.boot(pair.b, NEW))
    finally:
        await admin.close()
