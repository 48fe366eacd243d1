"""What only the PostgreSQL store has: migrations in a table, several servers on one
database, a database that is unreachable (a StoreError that never shows the password)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from netboot.errors import StoreError
from netboot.inventory.postgres import SCHEMA_VERSION, PostgresStore
from netboot.model import Cluster, MacAddress, Machine
from netboot.sealing import Sealer


async def test_unreachable_database_is_a_store_error_without_the_password(
        tmp_path: Path) -> None:
    store = PostgresStore(f"postgresql://netboot:hunter2@/db?host={tmp_path}&port=1")
    with pytest.raises(StoreError) as err:
        await store.open()
    assert "hunter2" not in str(err.value) and "netboot:***@" in str(err.value)
    with pytest.raises(StoreError):
        await store.get_machine("m-1")  # never opened: an error, not "absent"


async def test_two_servers_opening_a_new_database_migrate_it_once(pg_dsn: str) -> None:
    stores = [PostgresStore(pg_dsn) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        finally:
            await conn.close()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        assert await stores[0].migrate() == []  # nothing left to apply
    finally:
        for s in stores:
            await s.close()


async def test_refuses_a_newer_schema(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, 'future', 0)",
                           SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this netboot knows"):
        await PostgresStore(pg_dsn).open()


async def test_secrets_are_sealed_in_the_database(pg_dsn: str) -> None:
    sealer = Sealer.generate()
    store = PostgresStore(pg_dsn, sealer=sealer)
    await store.open()
    try:
        await store.put_cluster(Cluster(name="edge", token="join-s3cret"))
        machine = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),),
                          install_token="inst-s3cret")
        await store.create_machine(machine)
        assert (await store.get_cluster("edge")) == Cluster(name="edge", token="join-s3cret")
        assert await store.get_machine(machine.id) == machine
        conn = await asyncpg.connect(pg_dsn)
        try:
            rows = [r[0] for r in await conn.fetch(
                "SELECT data FROM clusters UNION ALL SELECT data FROM machines")]
        finally:
            await conn.close()
        assert rows and not any("s3cret" in r for r in rows)
    finally:
        await store.close()


async def test_a_lost_connection_is_a_store_error_not_absent(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, pool_size=1)
    await store.open()
    try:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("DROP TABLE machine_keys CASCADE")
        finally:
            await conn.close()
        with pytest.raises(StoreError):
            await store.machine_by("mac", "02:00:00:00:00:01")
    finally:
        await store.close()
