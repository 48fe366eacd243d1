"""The throwaway PostgreSQL cluster of netboot.lab.pgcluster, for pytest: a cluster that
cannot be made fails the run with what to install (the PostgreSQL tests never skip), and
store objects that share one inventory, as several servers have."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from netboot.inventory.base import Batch, Store
from netboot.lab.pgcluster import SUPERUSER, Cluster, ClusterError, fresh_schema, schema_sync
from netboot.lab.pgcluster import running as _running
from netboot.lab.pgcluster import start as _start
from netboot.model import AuditEntry, Event

__all__ = ["COMMITTING", "SLOW_COMMIT", "SUPERUSER", "Cluster", "committing", "fresh_schema",
           "running", "schema_sync", "slow_batch", "start", "stores_on_one_inventory", "until"]


def start() -> Cluster:
    try:
        return _start()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)


def running() -> contextlib.AbstractContextManager[Cluster]:
    return _running(start)


async def stores_on_one_inventory(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                  stack: contextlib.AsyncExitStack,
                                  count: int = 2) -> list[Store]:
    """``count`` open store objects on one inventory, as several servers have: SQLite
    stores on one file, or PostgreSQL stores on one fresh schema of the session's cluster
    (``request`` gives the ``postgres`` fixture); a memory store cannot be shared between
    processes: there it is one object ``count`` times. Closed when ``stack`` closes."""
    from netboot.inventory.memory import MemoryStore
    from netboot.inventory.postgres import PostgresStore
    from netboot.inventory.sqlite import SqliteStore

    stores: list[Store]
    if kind == "memory":
        memory = MemoryStore()
        await memory.open()
        return [memory] * count
    if kind == "sqlite":
        stores = [SqliteStore(tmp_path / "inv.db") for _ in range(count)]
    else:
        dsn = await stack.enter_async_context(
            fresh_schema(request.getfixturevalue("postgres")))
        stores = [PostgresStore(dsn) for _ in range(count)]
    for s in stores:
        await s.open()
        stack.push_async_callback(s.close)
    return stores


# A deferred constraint trigger makes an event's COMMIT slow: it runs in the COMMIT, before
# the commit record. "deaf" ignores the cancel asyncpg sends (as a COMMIT past the point
# where it can be stopped does) and commits; "stoppable" is stopped by it (aborted).
SLOW_COMMIT = (
    """CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.kind = 'deaf' THEN
            BEGIN
                PERFORM pg_sleep(30);
            EXCEPTION WHEN query_canceled THEN
                NULL;  -- the cancel heard too late: the COMMIT goes on
            END;
        ELSIF NEW.kind = 'stoppable' THEN
            PERFORM pg_sleep(30);
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON events DEFERRABLE INITIALLY"
    " DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
)


def slow_batch(kind: str) -> Batch:
    """An event of ``kind`` (SLOW_COMMIT's) for machine m1, with an audit entry."""
    return Batch(events=(Event("m1", 1.0, kind, kind),), audit=(AuditEntry(
        time=1.0, actor="a", action="x", target="t", peer="p", outcome="done"),))


async def committing(admin: asyncpg.Connection, write: Callable[[], Awaitable[object]],
                     said: list[str]) -> asyncio.Task[None]:
    """SLOW_COMMIT installed (through ``admin``), a caller of ``write`` started, once its
    COMMIT is under way: it says "written" once ``write`` returns, then waits once and says
    it went on (what a cancel delivered at its next wait must stop)."""
    for sql in SLOW_COMMIT:
        await admin.execute(sql)

    async def caller() -> None:
        await write()
        said.append("written")
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    task = asyncio.ensure_future(caller())
    await until(admin, COMMITTING, "in its COMMIT")
    return task


async def until(conn: asyncpg.Connection, sql: str, what: str) -> None:
    """Wait until ``sql``, asked on ``conn``, counts something: a test cancels a write once
    the server shows it where it means it to be, not after a guessed time."""
    for _ in range(500):
        if await conn.fetchval(sql):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 5 s")


# A session in a COMMIT that SLOW_COMMIT holds.
COMMITTING = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
              " AND query LIKE 'COMMIT%' AND wait_event = 'PgSleep'")
