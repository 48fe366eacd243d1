"""What only the PostgreSQL store has: migrations in a table, several servers on one
database, a database that is unreachable (a StoreError that never shows the password)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from netboot.errors import OutcomeUnknown, StoreError
from netboot.inventory import postgres
from netboot.inventory.base import Batch
from netboot.inventory.dsn import PeerSettings
from netboot.inventory.postgres import SCHEMA_VERSION, PostgresStore
from netboot.inventory.sqlite import SqliteStore
from netboot.inventory.view import InventoryView
from netboot.model import (
    ApiToken,
    AuditEntry,
    Cluster,
    MacAddress,
    Machine,
    MachineState,
    Scope,
)
from netboot.sealing import Sealer
from tests import pg
from tests.inventory import test_contract as contract
from tests.inventory.test_view import loaded

_R = TypeVar("_R")


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


async def test_indexes_match_sqlite(pg_dsn: str, tmp_path: Path) -> None:
    # The two schemas index the same things under the same names (constraint indexes aside:
    # SQLite names them sqlite_autoindex_*, PostgreSQL *_pkey and *_key), so that a query
    # fast on one is not a scan on the other.
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname ="
                                " current_schema()")
    finally:
        await conn.close()
    in_pg = {r[0] for r in rows if not r[0].endswith(("_pkey", "_key"))}
    lite = SqliteStore(tmp_path / "inv.db")
    await lite.open()
    await lite.close()
    with sqlite3.connect(tmp_path / "inv.db") as db:
        in_sqlite = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'"
            " AND name NOT LIKE 'sqlite_autoindex_%'")}
    # One deliberate difference: SQLite's partial index of the rare states (discovered,
    # failed). PostgreSQL counts an index predicate's columns among those that forbid a HOT
    # update, so there it would cost every state change of a storm what the (state, mac)
    # index cost (test_a_state_change_is_a_hot_update).
    assert in_pg == in_sqlite - {"machines_rare_states"}
    assert "machines_rare_states" in in_sqlite
    assert not {"machines_uuid", "machines_serial", "machines_state"} & in_pg


async def test_a_state_change_is_a_hot_update(pg_dsn: str) -> None:
    """The store's update of a machine whose state, document and time change (each step of
    a boot storm) touches no indexed column: PostgreSQL writes no index entry (HOT), where
    the (state, mac) index, or any index whose predicate names the state, forbade it."""
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        machine = Machine(macs=(MacAddress.parse("02:00:00:00:05:01"),), hostname="n1",
                          cluster="a")
        await store.create_machine(machine)
        booting = replace(machine, state=MachineState.BOOTING, updated=machine.updated + 1,
                          facts={"peer": "192.0.2.7"})
        row = postgres._Row(booting)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():
            await conn.execute(postgres._UPDATE_MACHINE, *row.params)
            updated, hot = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
                " WHERE relname = 'machines' AND schemaname = current_schema()")
    finally:
        await conn.close()
    assert (updated, hot) == (1, 1)


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


@pytest.fixture
async def two(pg_dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two netboot servers."""
    a, b = PostgresStore(pg_dsn), PostgresStore(pg_dsn)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_commit_through_one_server_wakes_the_view_of_another(
        two: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch) -> None:
    # Were the reader polling, this would wait an hour: it must be woken by NOTIFY.
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)
    a, b = two
    view = InventoryView(b)
    await view.sync()
    mac = "02:00:00:00:00:42"
    assert await view.machine_by("mac", mac) is None  # remembered as nobody's
    waiting = asyncio.create_task(view.wait(600.0))
    await asyncio.sleep(0)
    machine = Machine(macs=(MacAddress.parse(mac),), hostname="via-a")
    await a.create_machine(machine)
    assert await waiting is True
    assert await view.machine_by("mac", mac) == machine
    await a.put_cluster(Cluster(name="edge"))
    assert await view.wait(600.0) is True
    assert [c.name for c in await view.list_clusters()] == ["edge"]


async def test_concurrent_writers_on_two_servers_reach_a_view_exactly(
        two: tuple[PostgresStore, PostgresStore]) -> None:
    """Commit order is feed order (the writers' lock): a view that follows the feed while
    two servers write concurrently ends equal to a fresh read, nothing skipped."""
    a, b = two
    view = InventoryView(b)
    await view.sync()
    for n in range(4):
        for i in range(20):  # remembered as unset: only the feed can change that now
            assert await view.get_setting(f"k{n}-{i}") is None

    async def writer(store: PostgresStore, n: int) -> None:
        for i in range(20):
            await store.put_setting(f"k{n}-{i}", str(i))
            await view.sync()  # reads interleave with the writes

    await asyncio.gather(*(writer(s, n) for n, s in enumerate((a, b, a, b))))
    await view.sync()
    for n in range(4):
        for i in range(20):
            assert await view.get_setting(f"k{n}-{i}") == str(i)


async def test_a_database_restart_fails_requests_then_heals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """While the database is down every call is a StoreError (a 503), never "not found";
    once it is back the same store answers again, and its reader listens again."""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    cluster = await asyncio.to_thread(pg.start)  # its own: the session's must stay up
    a, b = PostgresStore(cluster.dsn()), PostgresStore(cluster.dsn())
    try:
        await a.open()
        await b.open()
        first = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),), hostname="one")
        await a.create_machine(first)
        await asyncio.to_thread(cluster.halt)
        with pytest.raises(StoreError):
            await a.get_machine(first.id)
        with pytest.raises(StoreError):
            await a.put_setting("k", "v")
        await asyncio.to_thread(cluster.restart)
        assert await a.get_machine(first.id) == first
        seq = (await b.changes_since(-1)).seq
        waiting = asyncio.create_task(b.wait_for_changes(seq, 600.0))
        await asyncio.sleep(0)
        second = Machine(macs=(MacAddress.parse("02:00:00:00:00:02"),), hostname="two")
        await a.create_machine(second)
        assert await waiting is True
        assert await b.get_machine(second.id) == second
    finally:
        await a.close()
        await b.close()
        await asyncio.to_thread(cluster.stop)


async def test_a_database_shutdown_while_the_loop_is_busy_is_a_store_error() -> None:
    """The server shut down while the event loop was busy (a storm's): its FATAL and the
    connection's end arrive together, and the loop may read the first before the second.
    asyncpg then keeps the connection open, in an error state, the pool hands it out, and
    the next statement raises asyncpg's InternalClientError ("another operation is in
    progress"), not a StoreError: a 500 where a 503 was due. Every moment of that window is
    tried (the loop blocked during the shutdown, then 0-4 turns of it). (Before: turns 2 and
    3 raised InternalClientError; the relistening task, busy on the loop at a shutdown, made
    test_a_database_restart_fails_requests_then_heals meet it too.)"""
    cluster = await asyncio.to_thread(pg.start)  # its own: the session's must stay up
    store = PostgresStore(cluster.dsn(), pool_size=1)
    try:
        await store.open()
        for turns in range(5):
            assert await store.get_setting("k") is None  # the pool's one connection, idle
            cluster.halt()  # blocking the loop, as a busy one would be
            for _ in range(turns):
                await asyncio.sleep(0)
            with pytest.raises(StoreError):
                await store.get_setting("k")
            await asyncio.to_thread(cluster.restart)
    finally:
        await store.close()
        await asyncio.to_thread(cluster.stop)


async def read_back_shows(dsn: str, machine_id: str) -> None:
    """Change a stored machine's hostname to "read-back" behind the feed's back (triggers
    off for this session): a sync shows it only if it read the row back."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE machines SET data = jsonb_set(data::jsonb, '{hostname}',"
                           " '\"read-back\"')::text WHERE id = $1", machine_id)
    finally:
        await conn.close()


async def test_own_commits_reach_the_view_without_a_read_back(
        two: tuple[PostgresStore, PostgresStore], pg_dsn: str) -> None:
    """A view's sync after its own server's commit takes what was written, not read back;
    another server's commit in between sends it to the feed, exactly."""
    a, b = two
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:00:03:0{i}"),), hostname=f"n{i}")
                for i in range(2)]
    view = await loaded(b, *machines)
    mine = replace(machines[0], hostname="mine")
    await b.update_machine(mine)
    await read_back_shows(pg_dsn, mine.id)
    await view.sync()
    assert await view.get_machine(mine.id) == mine  # not "read-back"

    theirs = replace(machines[1], hostname="theirs")
    await b.update_machine(replace(theirs, hostname="own-first"))
    await a.update_machine(theirs)
    again = replace(mine, hostname="own-after")
    await b.update_machine(again)
    await view.sync()
    assert await view.get_machine(theirs.id) == theirs
    assert await view.get_machine(mine.id) == again


async def test_a_sync_over_own_commits_and_another_servers_reads_only_the_others(
        two: tuple[PostgresStore, PostgresStore], pg_dsn: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Own commits with another server's between them: the sync reads and decodes only the
    other's machine, the own ones are the objects written (each changed behind the feed's
    back: read back, it would show). (Before s35-echo the whole range was read back.)"""
    a, b = two
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:00:06:0{i}"),), hostname=f"n{i}")
                for i in range(3)]
    view = await loaded(b, *machines)
    decoded: list[str] = []
    decode = b._machine

    def counted(text: str | None, *args: Any) -> Machine | None:
        found = decode(text, *args)
        if found is not None:
            decoded.append(found.id)
        return found

    monkeypatch.setattr(b, "_machine", counted)

    first = replace(machines[0], hostname="first")
    await b.update_machine(first)
    await read_back_shows(pg_dsn, first.id)
    theirs = replace(machines[1], hostname="theirs")
    await a.update_machine(theirs)
    last = replace(machines[2], hostname="last")
    await b.update_machine(last)
    await read_back_shows(pg_dsn, last.id)
    await view.sync()
    assert await view.get_machine(first.id) == first
    assert await view.get_machine(last.id) == last
    assert await view.get_machine(theirs.id) == theirs
    assert decoded == [theirs.id]


# --- a write cancelled while its COMMIT is under way is told as it ended --------------------

_AT_THE_LOCK = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND wait_event = 'advisory'")


@pytest.mark.parametrize("kind", ["deaf", "stoppable"])
async def test_a_batch_cancelled_during_its_commit_is_told_as_it_ended(
        pg_dsn: str, kind: str) -> None:
    """A group commit cancelled (asyncio.run's end, a client gone) while its COMMIT is under
    way: asyncpg asks the server to cancel it, too late for a COMMIT that can no longer be
    stopped. Such a batch is durable and must be told written (its clients, its audit
    entries "done"), the cancel coming at the caller's next wait; one the cancel did stop
    is told cancelled, nothing written. (Before: "cancelled" either way.)"""
    store = PostgresStore(pg_dsn, pool_size=1)  # the next write is on the same connection
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    said: list[str] = []
    try:
        task = await pg.committing(admin, lambda: store.apply_batch(pg.slow_batch(kind)), said)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        kept = [e.kind for e in await store.list_events("m1")]
        audit = await store.list_audit()
        if kind == "deaf":
            assert kept == ["deaf"] and len(audit) == 1
            assert said == ["written"]  # told written, then cancelled at its next wait
        else:
            assert kept == [] and audit == []
            assert said == []
        await _next_write_is_sound(store)
    finally:
        await admin.close()
        await store.close()


async def _next_write_is_sound(store: PostgresStore) -> None:
    """The connection (a pool of one) is sound for the next write."""
    await store.put_setting("after", "1")
    assert await store.get_setting("after") == "1"


async def test_a_write_cancelled_before_its_transaction_began_is_told_cancelled(
        pg_dsn: str) -> None:
    """The other side: cancelled while it waits for the writers' lock (another server
    writes), its transaction is rolled back: cancelled, nothing written."""
    store = PostgresStore(pg_dsn)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    admin = await asyncpg.connect(pg_dsn)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
            task = asyncio.ensure_future(store.put_setting("k", "v"))
            await pg.until(admin, _AT_THE_LOCK, "waiting for the writers' lock")
            task.cancel()
            done, _ = await asyncio.wait((task,), timeout=5)
            assert task in done and task.cancelled()
        assert await store.get_setting("k") is None
    finally:
        await holder.close()
        await admin.close()
        await store.close()


# --- a write whose connection fails while its COMMIT is under way is told as it ended -------

_HELD_COMMIT = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE"
                " 'COMMIT%' AND wait_event = 'PgSleep'")


@contextlib.asynccontextmanager
async def _cut_store(pg_dsn: str) -> AsyncIterator[tuple[PostgresStore, pg.Cutter,
                                                         asyncpg.Connection]]:
    """A store of one connection whose connections pass through a :class:`pg.Cutter`, with
    SLOW_COMMIT installed, and an admin connection; what is still committing at the end is
    ended."""
    admin = await asyncpg.connect(pg_dsn)
    try:
        async with pg.cutting(pg_dsn) as (dsn, cutter):
            store = PostgresStore(dsn, pool_size=1)
            await store.open()
            try:
                for sql in pg.SLOW_COMMIT:
                    await admin.execute(sql)
                yield store, cutter, admin
            finally:
                await admin.execute(_HELD_COMMIT)
                await store.close()
    finally:
        await admin.close()


@pytest.mark.parametrize("kind", ["quick", "slow"])
async def test_a_write_whose_connection_is_lost_during_a_commit_that_commits_is_told_written(
        pg_dsn: str, kind: str) -> None:
    """The connection reset once the COMMIT was sent (the server failed over or restarted
    after it, a connection tracker dropped it): the server commits all the same and its
    answer is lost. Asked on a new connection, the server says it committed ("slow": it is
    still committing when first asked, then done): told written. (Before: a StoreError, a
    503 saying nothing was changed, of a write that is durable.)"""
    async with _cut_store(pg_dsn) as (store, cutter, _):
        cutter.cut_after(b"COMMIT")
        await store.apply_batch(pg.slow_batch(kind))
        assert cutter.cut.is_set()
        assert [e.kind for e in await store.list_events("m1")] == [kind]
        assert len(await store.list_audit()) == 1
        await _next_write_is_sound(store)


async def test_a_write_cancelled_during_its_commit_then_its_connection_lost_is_told_written(
        pg_dsn: str) -> None:
    """A cancel during a COMMIT that commits (asyncio.run's end), then the connection lost
    before the COMMIT's answer came (and with it the question asked on that connection):
    asked on a new connection, it committed: told written, the cancel at the caller's next
    wait. (Before: told cancelled, logged "may or may not be committed".)"""
    said: list[str] = []
    async with _cut_store(pg_dsn) as (store, cutter, admin):
        cutter.cut_after(b"COMMIT", hold=True)  # its answer never comes, until the reset

        async def caller() -> None:
            await store.apply_batch(pg.slow_batch("quick"))
            said.append("written")
            await asyncio.sleep(0)
            said.append("went on after its cancel")

        task = asyncio.ensure_future(caller())
        await pg.until(admin, "SELECT count(*) FROM events", "committed")
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the COMMIT's answer
        cutter.reset()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert said == ["written"]
        await _next_write_is_sound(store)


async def test_a_write_whose_commit_outcome_cannot_be_learnt_is_told_unknown(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its connection lost during a COMMIT still running past LOST_COMMIT_WAIT: it may yet
    commit or not. The caller is told the outcome is unknown (OutcomeUnknown, a
    StoreError), not that it failed; logged once."""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 0.5)
    async with _cut_store(pg_dsn) as (store, cutter, admin):
        cutter.cut_after(b"COMMIT")
        with pytest.raises(OutcomeUnknown) as err:
            await store.apply_batch(pg.slow_batch("stoppable"))
        assert "outcome is unknown" in str(err.value) and "in progress" in str(err.value)
        assert caplog.text.count("outcome is unknown") == 1
        await admin.execute(_HELD_COMMIT)  # it holds the writers' lock meanwhile
        await _next_write_is_sound(store)


async def test_a_write_whose_session_is_ended_during_its_commit_is_told_failed(
        pg_dsn: str) -> None:
    """The other outcome: its session terminated while the COMMIT runs (before the commit
    record), the transaction is aborted; asked, the server says so: a StoreError that says
    it failed, not unknown, nothing written."""
    store = PostgresStore(pg_dsn, pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    said: list[str] = []
    try:
        task = await pg.committing(admin, lambda: store.apply_batch(
            pg.slow_batch("stoppable")), said)
        await admin.execute(_HELD_COMMIT)
        with pytest.raises(StoreError) as err:
            await asyncio.wait_for(task, 30)
        assert not isinstance(err.value, OutcomeUnknown)
        assert said == []
        assert await store.list_events("m1") == [] and await store.list_audit() == []
        await _next_write_is_sound(store)
    finally:
        await admin.close()
        await store.close()


async def test_a_write_whose_commit_a_server_restart_ends_is_told_failed_once_it_is_back(
        ) -> None:
    """The server stopped while a COMMIT runs (a fast shutdown ends the sessions: aborted)
    and started again: the store asks on a new connection, tried again while the server
    is down, within LOST_COMMIT_WAIT: aborted, a StoreError that says it failed, not
    that the outcome is unknown (as it would be asking only once, into the restart)."""
    cluster = await asyncio.to_thread(pg.start)  # its own: the session's must stay up
    store = PostgresStore(cluster.dsn(), pool_size=1)
    said: list[str] = []
    try:
        await store.open()
        admin = await asyncpg.connect(cluster.dsn())
        try:
            task = await pg.committing(admin, lambda: store.apply_batch(
                pg.slow_batch("stoppable")), said)
        finally:
            await admin.close()
        await asyncio.to_thread(cluster.halt)
        await asyncio.to_thread(cluster.restart)
        with pytest.raises(StoreError) as err:
            await asyncio.wait_for(task, 30)
        assert not isinstance(err.value, OutcomeUnknown), err.value
        assert said == []
        assert await store.list_events("m1") == [] and await store.list_audit() == []
    finally:
        await store.close()
        await asyncio.to_thread(cluster.stop)


def _mark(when: float) -> uuid.UUID:
    """A mark as a write made at ``when`` (seconds since the epoch) has: ms, random bits."""
    return uuid.UUID(int=(int(when * 1000) << 80) | random.getrandbits(80))


async def test_a_write_the_server_has_no_mark_of_is_told_failed_for_good(pg_dsn: str) -> None:
    """A lost COMMIT whose mark is not there (its transaction aborted, or never reached the
    server that answers now): "aborted", the key claimed so that the write can no longer
    commit; asked again (the first answer lost), the claim is found, not taken for the
    write's mark. A mark that is there: "committed". A write begun so long ago that its mark
    may have been pruned: only a mark found says anything (None, unknown, not claimed)."""
    store = PostgresStore(pg_dsn, pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    try:
        now = time.monotonic()
        lost = _mark(time.time())
        assert await store._status(lost, now) == "aborted"
        assert await store._status(lost, now) == "aborted"
        async with store._write() as conn:  # a write's own mark
            mark = await conn.fetchval("SELECT id FROM commit_marks ORDER BY id DESC LIMIT 1")
        assert await store._status(mark, now) == "committed"
        old = now - postgres.MARK_KEEP
        assert await store._status(mark, old) == "committed"
        other = _mark(time.time())
        assert await store._status(other, old) is None
        assert await admin.fetchval("SELECT count(*) FROM commit_marks WHERE id = $1",
                                    other) == 0
    finally:
        await admin.close()
        await store.close()


async def test_marks_are_pruned_by_the_writes_themselves(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each PRUNE_MARKS_EVERY-th write drops the marks older than MARK_KEEP, in the round
    trip that writes its own: the table stays small, no write costs a round trip more."""
    monkeypatch.setattr(postgres, "PRUNE_MARKS_EVERY", 3)
    store = PostgresStore(pg_dsn, pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    try:
        stale = _mark(time.time() - postgres.MARK_KEEP - 60)
        await admin.execute("INSERT INTO commit_marks (id) VALUES ($1)", stale)
        # A settle's claim is kept: a statement it settled "failed", still unread by a hung
        # backend, must find it however late that backend runs.
        claim = _mark(time.time() - postgres.MARK_KEEP - 60)
        await admin.execute("INSERT INTO commit_marks (id, lost) VALUES ($1, true)", claim)
        for n in range(3):
            await store.put_setting("k", str(n))
        marks = await admin.fetchval("SELECT count(*) FROM commit_marks WHERE NOT lost")
        gone = await admin.fetchval("SELECT count(*) FROM commit_marks WHERE id = $1", stale)
        kept = await admin.fetchval("SELECT count(*) FROM commit_marks WHERE id = $1", claim)
        assert (marks, gone, kept) == (3, 0, 1)  # the store's own three (migrate writes none)
    finally:
        await admin.close()
        await store.close()


def _standby(cluster: pg.Cluster) -> Path:
    """A copy of the cluster's data, stopped cleanly for it and started again: a standby
    that has received everything up to now and nothing after (asynchronous replication
    behind by what comes next)."""
    cluster.halt()
    copy = cluster.base / "standby"
    subprocess.run(["cp", "-a", str(cluster.base / "data"), str(copy)], check=True)
    cluster.restart()
    return copy


def _fail_over(cluster: pg.Cluster, standby: Path) -> None:
    """The primary stopped and the standby started in its place (its address, its data)."""
    cluster.halt()
    data = cluster.base / "data"
    data.rename(cluster.base / "old-primary")
    standby.rename(data)
    cluster.restart()


@pytest.mark.parametrize("standby", ["behind", "received"])
async def test_a_write_lost_in_a_failover_is_told_what_the_new_primary_has(
        standby: str) -> None:
    """A write committed on the primary, its COMMIT's answer lost in a failover that came
    before the store first asked. "behind": the new primary never received it, and the next
    writer there got the lost transaction's id (its WAL never reached it) and committed:
    asked by that id (pg_xact_status), the other writer's "committed" was told as this
    write's, a write that is not there told written. By its mark: not there, told failed.
    "received" (a synchronous standby): the mark is there, told written."""
    cluster = await asyncio.to_thread(pg.start)  # its own: the session's must stay up
    try:
        setup = PostgresStore(cluster.dsn())
        await setup.open()  # migrated before the standby is taken
        await setup.close()
        copy = await asyncio.to_thread(_standby, cluster) if standby == "behind" else None
        async with pg.cutting(cluster.dsn()) as (dsn, cutter):
            store = PostgresStore(dsn, pool_size=1)
            await store.open()
            try:
                admin = await asyncpg.connect(cluster.dsn())
                try:
                    cutter.cut_after(b"COMMIT", hold=True)  # the answer withheld until reset
                    write = asyncio.ensure_future(store.apply_batch(pg.slow_batch("quick")))
                    await pg.until(admin, "SELECT count(*) FROM events", "committed")
                    lost = int(await admin.fetchval("SELECT xmin::text FROM events"))
                finally:
                    await admin.close()
                if copy is None:
                    copy = await asyncio.to_thread(_standby, cluster)
                await asyncio.to_thread(_fail_over, cluster, copy)
                admin = await asyncpg.connect(cluster.dsn())
                try:
                    # Other servers write on the new primary before the store asks.
                    while int(await admin.fetchval("SELECT pg_current_xact_id()::text")) < lost:
                        pass
                    said = await admin.fetchval("SELECT pg_xact_status($1::text::xid8)",
                                                str(lost))
                    events = await admin.fetchval("SELECT count(*) FROM events")
                finally:
                    await admin.close()
                assert (said, events) == (("committed", 0) if standby == "behind"
                                          else ("committed", 1))
                cutter.reset()
                if standby == "behind":
                    with pytest.raises(StoreError) as err:
                        await asyncio.wait_for(write, 30)
                    assert not isinstance(err.value, OutcomeUnknown), err.value
                    assert await store.list_events("m1") == []
                else:
                    await asyncio.wait_for(write, 30)
                    assert [e.kind for e in await store.list_events("m1")] == ["quick"]
                await _next_write_is_sound(store)
            finally:
                await store.close()
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_commit_the_server_refuses_is_told_failed_without_asking(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A COMMIT answered with an ERROR (a deferred check failed) was rolled back: a
    StoreError at once, the server not asked anything more."""
    async def asked(self: PostgresStore, mark: object, began: float) -> str | None:
        raise AssertionError("asked")
    monkeypatch.setattr(PostgresStore, "_status", asked)
    async with _cut_store(pg_dsn) as (store, _, _):
        with pytest.raises(StoreError, match="refused at commit") as err:
            await store.apply_batch(pg.slow_batch("refused"))
        assert not isinstance(err.value, OutcomeUnknown)
        assert await store.list_events("m1") == [] and await store.list_audit() == []


async def test_a_single_statement_write_whose_connection_is_lost_is_settled_by_its_mark(
        pg_dsn: str) -> None:
    """An autocommit statement (an audit entry) whose connection is lost once it was sent:
    its mark, written by the statement itself, says it committed: told written, not
    "unknown" (as it was before the marks: its transaction's id would have come in the
    answer that was lost)."""
    async with _cut_store(pg_dsn) as (store, cutter, _):
        # Cut at the message that runs it (the actor is among its parameters), not at the
        # statement's preparation (its text), after which nothing would have run.
        cutter.cut_after(b"cut-here")
        await store.add_audit(AuditEntry(time=1.0, actor="cut-here", action="x",
                                         target="t", peer="p", outcome="done"))
        assert len(await store.list_audit()) == 1
        await _next_write_is_sound(store)


async def test_a_single_statement_lost_and_refused_is_told_failed(pg_dsn: str) -> None:
    """The server refused the statement (a token name taken), but its ERROR was lost with
    the connection: the mark is not there, so the claim makes "not written" final: told
    failed (a StoreError), not unknown, and nothing was written."""
    async with _cut_store(pg_dsn) as (store, cutter, _):
        token = ApiToken(name="cut-here", sha256="1" * 64, scope=Scope.ADMIN, created=1.0)
        await store.create_token(token)
        cutter.cut_after(b"cut-here")
        with pytest.raises(StoreError) as told:
            await store.create_token(replace(token, sha256="2" * 64))
        assert not isinstance(told.value, OutcomeUnknown)
        assert [t.sha256 for t in await store.list_tokens()] == ["1" * 64]
        cutter.cut_after(b"cut-here")  # deleted, its answer lost: told deleted
        await store.delete_token("cut-here")
        assert await store.list_tokens() == []
        await _next_write_is_sound(store)


async def test_a_single_statement_lost_while_it_still_runs_is_told_unknown(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lost while the statement still waits (held at an advisory lock past LOST_COMMIT_WAIT):
    the claim of its mark waits for it and gives up: told unknown, which is exact (here it
    commits once let go)."""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 1.0)
    async with _cut_store(pg_dsn) as (store, cutter, admin):
        for sql in _HELD_AUDIT:
            await admin.execute(sql)
        await admin.execute("SELECT pg_advisory_lock(42)")
        cutter.cut_after(b"cut-here")
        with pytest.raises(OutcomeUnknown, match="its statement is in progress"):
            await store.add_audit(AuditEntry(time=1.0, actor="cut-here", action="x",
                                             target="t", peer="p", outcome="done"))
        await admin.execute("SELECT pg_advisory_unlock(42)")
        await _within("the statement committed once let go",
                      lambda: _audit_count(admin, 1))
        await admin.execute("DROP TRIGGER held_audit ON audit")
        await _next_write_is_sound(store)


async def _audit_count(admin: asyncpg.Connection, count: int) -> bool:
    return bool(await admin.fetchval("SELECT count(*) FROM audit") == count)


async def test_single_statement_marks_are_pruned_and_keyed_by_the_servers_clock(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single statement's mark is keyed by the server's clock (learnt from the server,
    whatever this host's says), so pruning keeps it as long as a transaction's; each
    PRUNE_MARKS_EVERY-th statement prunes too."""
    monkeypatch.setattr(postgres, "PRUNE_MARKS_EVERY", 3)
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        admin = await asyncpg.connect(pg_dsn)
        try:
            now_ms = await admin.fetchval(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
            old = _mark(0.0)
            await admin.execute("INSERT INTO commit_marks (id) VALUES ($1)", old)
            monkeypatch.setattr(time, "time", lambda: 0.0)  # this host's clock far off
            for i in range(3):
                await store.touch_token("none", float(i))
            ids = [r[0] for r in await admin.fetch("SELECT id FROM commit_marks")]
            assert old not in ids and len(ids) == 3  # the old one pruned by the third
            assert all(abs((m.int >> 80) - now_ms) < 60_000 for m in ids)
        finally:
            await admin.close()
    finally:
        await store.close()


# --- a write that is one autocommit statement: one round trip, told as it ended -------------

# The audit insert waits in a trigger for an advisory lock the test holds (key 42): the
# statement is under way, its outcome not yet decided, until the test lets it go.
_HELD_AUDIT = (
    """CREATE FUNCTION held_audit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(42);
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER held_audit AFTER INSERT ON audit FOR EACH ROW EXECUTE FUNCTION held_audit()",
)
_AT_42 = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'"
          " AND query LIKE '%INSERT INTO audit (%'")


@contextlib.asynccontextmanager
async def _held_audit(pg_dsn: str, said: list[str],
                      ) -> AsyncIterator[tuple[PostgresStore, asyncpg.Connection,
                                               asyncio.Task[None]]]:
    """A store of one connection (the next write is on the same one), an admin connection
    holding key 42, and add_audit started with its statement held at that key; both closed
    at the end."""
    store = PostgresStore(pg_dsn, pool_size=1)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    try:
        for sql in _HELD_AUDIT:
            await admin.execute(sql)
        await admin.execute("SELECT pg_advisory_lock(42)")

        async def caller() -> None:
            await store.add_audit(AuditEntry(time=1.0, actor="a", action="x", target="t",
                                             peer="p", outcome="done"))
            said.append("written")
            await asyncio.sleep(0)
            said.append("went on after its cancel")

        task = asyncio.ensure_future(caller())
        await pg.until(admin, _AT_42, "held in its statement")
        yield store, admin, task
    finally:
        await admin.close()
        await store.close()


@pytest.mark.parametrize("ending", ["committed", "stopped"])
async def test_a_single_statement_write_cancelled_under_way_is_told_as_it_ended(
        pg_dsn: str, ending: str) -> None:
    """A write that is one autocommit statement (an audit entry, a token's touch) cancelled
    while the statement runs: its answer, not the cancel, says what it did. Let go, it
    commits: told written, the cancel at the caller's next wait; stopped by the server (an
    operator's pg_cancel_backend), nothing written: told cancelled."""
    said: list[str] = []
    async with _held_audit(pg_dsn, said) as (store, admin, task):
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the statement's answer
        if ending == "committed":
            await admin.execute("SELECT pg_advisory_unlock(42)")
        else:
            await admin.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                                " WHERE query LIKE '%INSERT INTO audit (%'"
                                " AND pid <> pg_backend_pid()")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        audit = await store.list_audit()
        if ending == "committed":
            assert len(audit) == 1 and said == ["written"]
        else:
            assert audit == [] and said == []
        await _next_write_is_sound(store)


async def test_a_single_statement_write_not_answering_in_time_is_stopped_and_told_cancelled(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Past CANCELLED_COMMIT_WAIT the statement is cancelled at the server (a shutdown does
    not hang on it) and the caller told cancelled, logged as maybe written."""
    monkeypatch.setattr(postgres, "CANCELLED_COMMIT_WAIT", 0.2)
    said: list[str] = []
    async with _held_audit(pg_dsn, said) as (store, admin, task):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert said == [] and "not told committed" in caplog.text
        await admin.execute("SELECT pg_advisory_unlock(42)")
        assert await store.list_audit() == []  # here the server's cancel stopped it
        await _next_write_is_sound(store)


async def test_single_statement_writes_are_one_round_trip(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A token's touch (every API request with a bearer token), an audit entry, a lease's
    release, a token's creation and deletion, the audit's pruning: one query each, not a
    transaction's BEGIN, id, statement and COMMIT (four)."""
    store = PostgresStore(pg_dsn)
    await store.open()
    sent: list[str] = []
    for method in ("execute", "fetch", "fetchrow", "fetchval"):
        real = getattr(asyncpg.Connection, method)

        def counted(self: asyncpg.Connection, query: str, *args: object,
                    _real: Any = real, **kw: object) -> Any:
            sent.append(query)
            return _real(self, query, *args, **kw)
        monkeypatch.setattr(asyncpg.Connection, method, counted)
    try:
        writes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("create_token", lambda: store.create_token(ApiToken(
                name="t", sha256="0" * 64, scope=Scope.ADMIN, created=1.0))),
            ("touch_token", lambda: store.touch_token("t", 2.0)),
            ("delete_token", lambda: store.delete_token("t")),
            ("add_audit", lambda: store.add_audit(AuditEntry(
                time=1.0, actor="a", action="x", target="t", peer="p", outcome="done"))),
            ("prune_audit", lambda: store.prune_audit(0)),
            ("prune_events", lambda: store.prune_events(1.0, 1000)),  # retention
            ("delete_lease", lambda: store.delete_lease("52:54:00:00:00:01")),
        ]
        for name, write in writes:
            sent.clear()
            await write()
            assert len(sent) == 1, (name, sent)
    finally:
        await store.close()


async def test_identifiers_only_added_insert_only_their_rows(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first DHCP sighting learns a machine's UUID (or serial, asset tag): only its new
    rows are inserted, its MAC rows neither deleted nor inserted again (as the SQLite store
    does since s34-keys); a machine whose serial changed has only that row replaced. The
    rows read back are those writing everything gives."""
    from netboot.identity import claims
    from netboot.inventory.base import Batch

    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        fleet = contract.keyed_fleet()
        await store.apply_batch(Batch(create=fleet))
        sent: list[tuple[str, list[Any]]] = []
        for method in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
            real = getattr(asyncpg.Connection, method)

            def counted(self: asyncpg.Connection, query: str, *args: Any,
                        _real: Any = real, _many: bool = method == "executemany",
                        **kw: Any) -> Any:
                sent.append((query, list(args[0]) if _many else [args]))
                return _real(self, query, *args, **kw)
            monkeypatch.setattr(asyncpg.Connection, method, counted)
        uuid = contract.sighting_uuid
        seen = contract.sightings(fleet)
        await store.apply_batch(Batch(update=seen))
        monkeypatch.undo()
        deleted = [args for query, rows in sent if query.startswith("DELETE FROM machine_keys")
                   for args in rows]
        assert deleted == [(["serial"], ["SN3"])]
        inserted = sorted(row for query, rows in sent
                          if query.startswith("INSERT INTO machine_keys") for row in rows)
        assert inserted == sorted([("uuid", uuid(0), fleet[0].id), ("uuid", uuid(1), fleet[1].id),
                                   ("serial", "SN1", fleet[1].id), ("uuid", uuid(3), fleet[3].id),
                                   ("serial", "SN9", fleet[3].id)])
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert sorted(tuple(r) for r in await admin.fetch(
                "SELECT machine, kind, value FROM machine_keys")) == sorted(
                (m.id, k, v) for m in seen for k, v in claims(m))
        finally:
            await admin.close()
        await contract.assert_found(store, seen)
        assert await store.machine_by("serial", "SN3") is None
    finally:
        await store.close()


def test_a_server_older_than_13_is_refused_naming_its_version_and_the_fix() -> None:
    with pytest.raises(StoreError) as err:
        postgres.supported((12, 17, 0), "db@host")
    message = str(err.value)
    assert "PostgreSQL 12.17 is too old" in message and "PostgreSQL 13 or newer" in message
    assert "upgrade the server" in message and "db@host" in message
    postgres.supported((13, 0), "db@host")
    postgres.supported((17, 2), "db@host")


async def test_opening_a_server_older_than_13_is_refused(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal comes at open, before any migration (the server's version is faked: the
    session's cluster is newer)."""
    monkeypatch.setattr(asyncpg.Connection, "get_server_version",
                        lambda self: asyncpg.ServerVersion(12, 0, 0, "final", 0))
    store = PostgresStore(pg_dsn)
    with pytest.raises(StoreError, match=r"PostgreSQL 12\.0 is too old"):
        await store.open()
    monkeypatch.undo()
    admin = await asyncpg.connect(pg_dsn)
    try:  # nothing was migrated
        assert await admin.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await admin.close()


# --- a peer lost without a reset (a pulled cable, a VM gone, a firewall's dropped state) ------

# Short settings: a silent peer ends a connection within ~2-3 s (keepalives and the user
# timeout, dsn.PeerSettings); the tests' bounds (HANG) are what a hang would pass, the
# kernel's own being ~15 minutes for data sent and two hours for an idle connection.
QUICK = PeerSettings(connect_timeout=1, keepalives_idle=1, keepalives_interval=1,
                     keepalives_count=2, tcp_user_timeout=2)
HANG = 20.0


@contextlib.asynccontextmanager
async def _through_tcp(pg_dsn: str, **kw: Any) -> AsyncIterator[tuple[PostgresStore,
                                                                     pg.Cutter]]:
    """A store (``kw``: its arguments) whose connections pass through a :class:`pg.Cutter`
    on TCP loopback, with QUICK settings unless ``kw`` gives others."""
    async with pg.cutting(pg_dsn, tcp=True) as (dsn, cutter):
        store = await _opened(dsn, **{"peer": QUICK, **kw})
        try:
            async with asyncio.timeout(3 * HANG):  # a hang anywhere fails, showing where
                yield store, cutter
        finally:
            cutter.thaw()
            await store.close()


async def _opened(dsn: str, **kw: Any) -> PostgresStore:
    """A store (``kw``: its arguments) open on ``dsn``, before anything is cut. QUICK's
    connect_timeout (1 s) bounds its first sessions too, which a loaded machine's (a backend
    forked, authenticated, set up) can pass: "a new session was not set up within 1 s"
    (with every session's set-up 1.5 s slower, tests failed there before anything was
    cut). An open that failed so, or timed out, is tried again with a new store; any other
    error fails at once; HANG seconds at most (s49-flake)."""
    deadline = time.monotonic() + HANG
    while True:
        store = PostgresStore(dsn, **kw)
        try:
            await store.open()
            return store
        except StoreError as exc:
            slow = "not set up within" in str(exc) or "timed out" in str(exc)
            if not slow or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.05)


async def _answers_again(store: PostgresStore) -> None:
    """Once the path is back (``cutter.thaw()``), until a read is answered. Its new
    connection is bounded by QUICK's connect_timeout (1 s), which a loaded machine's new
    session (a backend forked, authenticated) can pass: a StoreError saying it timed out,
    as the store should say it, is asked again; any other error fails at once; HANG
    seconds at most."""
    deadline = time.monotonic() + HANG
    while True:
        try:
            await store.get_setting("answers-again")
            return
        except StoreError as exc:
            if "timed out" not in str(exc) or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.05)


async def _within(what: str, check: Callable[[], Awaitable[bool] | bool]) -> None:
    """Until ``check()`` holds, HANG seconds at most."""
    async def poll() -> None:
        while True:
            answer = check()
            if answer if isinstance(answer, bool) else await answer:
                return
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(poll(), HANG)
    except TimeoutError:
        raise AssertionError(f"not {what} within {HANG} s") from None


async def _ended(call: Awaitable[_R]) -> _R:
    """``call``'s result or error, which must come within HANG seconds: a call still under
    way then is a hang, failed without cancelling it (a cancel through the black hole would
    only wait in its turn)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait((task,), timeout=HANG)
    if task not in done:
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise AssertionError(f"still waiting after {HANG} s")
    return task.result()


async def _a_commit_wakes_the_view(writer: PostgresStore, view: InventoryView,
                                   mac: str) -> None:
    """A machine ``writer`` (another server) commits wakes a reader of ``view`` waiting
    (by NOTIFY: the view's store listens), and the view then has it."""
    waiting = asyncio.ensure_future(view.wait(600.0))
    after = Machine(macs=(MacAddress.parse(mac),), hostname="after")
    await writer.create_machine(after)
    assert await asyncio.wait_for(waiting, HANG) is True
    assert await view.machine_by("mac", mac) == after


@pytest.mark.parametrize("gone", ["failover", "server"])
async def test_a_write_whose_peer_vanishes_during_its_commit_is_settled_within_the_bound(
        pg_dsn: str, gone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection black-holed once the COMMIT was sent (no FIN, no RST: the server
    commits, its answer never comes). The kernel's keepalives end the connection within the
    settings' bound, and the write is settled as a reset one is: asked on a new connection,
    "written" where the server can be reached ("failover": the old connections lost, new
    ones get through), else "unknown" within LOST_COMMIT_WAIT. (Before: the COMMIT waited
    for the kernel's ~15 minutes, and every writer behind it.)"""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 2.0)
    async with _through_tcp(pg_dsn, pool_size=1) as (store, cutter):
        cutter.freeze_after(b"COMMIT", new=gone == "server")
        writing = store.apply_batch(pg.slow_batch("quick"))
        if gone == "failover":
            await _ended(writing)  # told written
        else:
            with pytest.raises(OutcomeUnknown, match="outcome is unknown"):
                await _ended(writing)
        cutter.thaw()
        await _answers_again(store)  # (its new connection took over 1 s on a loaded machine)
        assert [e.kind for e in await store.list_events("m1")] == ["quick"]
        await _next_write_is_sound(store)


async def test_an_idle_connection_whose_peer_vanished_fails_its_next_use_within_the_bound(
        pg_dsn: str) -> None:
    """A pool's idle connection, its peer black-holed: the next query is a StoreError
    within the bound (the data sent unacknowledged: TCP_USER_TIMEOUT; or the connection
    already given up by its keepalives, and a new one not made within connect_timeout),
    not a wait of the kernel's minutes; once the path is back, the store answers again."""
    async with _through_tcp(pg_dsn, pool_size=1) as (store, cutter):
        assert await store.get_setting("k") is None  # the pool's one connection, now idle
        cutter.freeze()
        with pytest.raises(StoreError, match="the server stopped answering"):
            await _ended(store.get_setting("k"))
        cutter.thaw()
        await _answers_again(store)
        await _next_write_is_sound(store)


async def test_a_lost_listen_connection_is_noticed_and_listened_again_without_missing_a_change(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LISTEN connection black-holed (no FIN, no RST) while another server commits: its
    NOTIFY is lost. The kernel ends the connection within the bound; the store counts a
    possible commit (a view no longer answers from memory without a sync), listens again
    once the path is back, and a view syncs what was committed meanwhile; later commits
    wake readers again. (Before: the connection waited for two hours of the kernel's
    keepalive, the view thought itself current, and nothing listened again.)"""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    async with _through_tcp(pg_dsn) as (b, cutter):
        a = PostgresStore(pg_dsn)
        await a.open()
        try:
            view = InventoryView(b)
            await view.sync()
            assert view.fresh(3600.0)
            cutter.freeze()
            during = Machine(macs=(MacAddress.parse("02:00:00:00:07:01"),), hostname="during")
            await a.create_machine(during)
            await _within("told the LISTEN connection was lost",
                          lambda: not view.fresh(3600.0))
            cutter.thaw()
            await _answers_again(b)
            await asyncio.wait_for(view.sync(), HANG)
            assert await view.machine_by("mac", "02:00:00:00:07:01") == during
            # A read answered says a pool session is made again, not the LISTEN connection:
            # its new connection, bounded by QUICK's 1 s, can fail on a loaded machine ("no
            # new connection listening within 1 s", raised to the view's waiting reader in
            # the loaded run, s49-flake); the store listens again on its next try.
            await _within("listening again", b._listening)
            await _a_commit_wakes_the_view(a, view, "02:00:00:00:07:02")
        finally:
            await a.close()


async def test_a_listen_connection_lost_as_its_listen_is_answered_is_listened_again(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LISTEN connection lost in the loop turn its LISTEN was answered, before the store
    could ask to be told of its end (asyncpg tells only the termination listeners added by
    then): the store still notices the loss and listens again, rather than never (readers
    then never told of another server's commit: a view answering from memory until its
    max_age, every time)."""
    add = asyncpg.Connection.add_listener
    lost: list[asyncpg.Connection] = []

    async def listening_then_lost(self: asyncpg.Connection, *args: Any) -> None:
        await add(self, *args)
        if not lost:  # the first LISTEN after the store opened: its connection then lost
            lost.append(self)
            self._transport.abort()  # asyncpg's connection_lost, called soon
            for _ in range(3):
                await asyncio.sleep(0)
            assert self.is_closed()

    # The new LISTEN's own probe (its notification, on the connection lost) is given up
    # after connect_timeout: 1 s here, not the default 10 s of the suite's time (s41-ci).
    store = PostgresStore(pg_dsn, peer=PeerSettings(connect_timeout=1))
    await store.open()
    try:
        monkeypatch.setattr(asyncpg.Connection, "add_listener", listening_then_lost)
        assert store._notify is not None
        store._notify.terminate()  # lost: listened again, and that connection lost at once
        await _within("listening again after the LISTEN connection was lost twice",
                      lambda: bool(lost) and store._listening())
        monkeypatch.undo()
    finally:
        await store.close()


# --- a server whose kernel answers but which does not (stopped, hung; a proxy that lost it) ---

# QUICK, and the server asked a round trip every second, given a second to answer.
CHECKED = replace(QUICK, check_interval=1, check_timeout=1)
# The same where the server itself answers throughout (a backend alone stopped, a lock
# held idle): making a session is not what those tests bound, and a loaded machine's (a
# backend forked, authenticated, set up) took over QUICK's 1 s: the store's open failed,
# "timed out" (s48-flake). Where the path or the server goes silent, QUICK's 1 s stays.
ANSWERED = replace(CHECKED, connect_timeout=int(HANG))


async def test_a_stopped_server_is_told_within_the_checks_bound_and_heals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process of the server stopped (SIGSTOP) behind a TCP proxy that keeps the
    client's side open: the kernels answer every probe, nothing is unacknowledged, so no
    keepalive or user timeout fires. The store's check (a round trip on its LISTEN
    connection every second, a second to answer) finds the server silent: a read under way
    on an open connection is a StoreError saying so, a write whose COMMIT was under way is
    told "unknown" (the server could not be asked within LOST_COMMIT_WAIT), a caller
    cancelled mid-query ends, a view no longer answers from memory. Once the server runs
    again, that write's COMMIT completes (so "unknown" was exact), the store writes again,
    listens again (a commit of another store wakes a waiting reader) and the view syncs.
    (Without the checks, check_interval 0: each still waits after 20 s.)"""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 2.0)
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    cluster = await asyncio.to_thread(pg.start)  # its own: all of it is stopped
    admin = await asyncpg.connect(cluster.dsn())
    other = PostgresStore(cluster.dsn())
    try:
        async with pg.cutting(cluster.dsn(), tcp=True) as (dsn, _cutter):
            store = PostgresStore(dsn, peer=CHECKED)
            await store.open()
            await other.open()
            try:
                view = InventoryView(store)
                await view.sync()
                assert view.fresh(3600.0)
                # Two of the pool's connections made: one for the write, one idle for the
                # caller cancelled mid-query (asyncpg's CancelRequest then waits on the
                # stopped server: its connection ended ends it).
                await asyncio.gather(store.get_setting("a"), store.get_setting("b"))
                said: list[str] = []
                writing = await pg.committing(
                    admin, lambda: store.apply_batch(pg.slow_batch("slow")), said)
                with pg.stopped(pg.server_pids(cluster.process.pid)):
                    # On the feed's connection, open since the view's sync.
                    reading = asyncio.ensure_future(store.changes_since(0))
                    cancelled = asyncio.ensure_future(store.list_machines())
                    await asyncio.sleep(0.2)
                    cancelled.cancel()
                    with pytest.raises(StoreError, match="no answer to a check within 1 s"):
                        await _ended(reading)
                    with pytest.raises(OutcomeUnknown, match="outcome is unknown"):
                        await _ended(writing)
                    with pytest.raises(asyncio.CancelledError):
                        await _ended(cancelled)
                    assert not view.fresh(3600.0)
                assert said == []
                await _within("the stopped COMMIT completed once the server runs again",
                              lambda: _kinds(admin, "m1", ["slow"]))
                await asyncio.wait_for(_next_write_is_sound(store), HANG)
                await _within("listening again", store._listening)
                await asyncio.wait_for(view.sync(), HANG)
                await _a_commit_wakes_the_view(other, view, "02:00:00:00:08:01")
            finally:
                await store.close()
    finally:
        await other.close()
        await admin.close()
        await asyncio.to_thread(cluster.stop)


async def _kinds(admin: asyncpg.Connection, machine: str, kinds: list[str]) -> bool:
    """Whether ``machine``'s events (in any schema ``admin`` sees: the cluster's own) are
    of ``kinds``."""
    rows = await admin.fetch("SELECT kind FROM events WHERE machine = $1 ORDER BY id", machine)
    return [r[0] for r in rows] == kinds


async def test_a_stopped_listen_backend_is_noticed_and_the_view_resynced(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the backend of the LISTEN connection stopped (a hung session: the server, its
    other sessions and the kernels answer): another server's commit is notified to nobody.
    The check finds it silent within its bound, the view no longer answers from memory and
    syncs the commit, the store listens on a new connection and a later commit wakes a
    reader. (Without the checks, check_interval 0: the view thought itself current.)"""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    async with _a_writer_beside_a_checked_view(pg_dsn) as (a, b, view):
        assert view.fresh(3600.0) and b._notify is not None
        with pg.stopped([b._notify.get_server_pid()]):
            during = Machine(macs=(MacAddress.parse("02:00:00:00:09:01"),), hostname="during")
            await a.create_machine(during)
            await _within("told the LISTEN connection's server is silent",
                          lambda: not view.fresh(3600.0))
            await asyncio.wait_for(view.sync(), HANG)
            assert await view.machine_by("mac", "02:00:00:00:09:01") == during
            await _within("listening again", b._listening)
            await _a_commit_wakes_the_view(a, view, "02:00:00:00:09:02")


async def test_a_listen_the_server_does_not_answer_is_given_up_and_listened_again(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection made to listen again is answered (TCP, authentication: a proxy such
    as pgbouncer answers those itself), then its LISTEN is not (here: its backend stopped
    once connected). The attempt is given up within connect_timeout, as a connection not
    made in time is, and the store listens on another: it does not wait on that LISTEN for
    ever, with no check made meanwhile (a session made since never ended, a commit of
    another server never notified)."""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    add = asyncpg.Connection.add_listener
    stopped: list[int] = []

    async def answered_then_silent(self: asyncpg.Connection, *args: Any) -> None:
        if not stopped:  # the first LISTEN after the loss: its backend stops
            stopped.append(self.get_server_pid())
            os.kill(stopped[0], signal.SIGSTOP)
        await add(self, *args)

    async with _a_writer_beside_a_checked_view(pg_dsn) as (a, b, view):
        try:
            monkeypatch.setattr(asyncpg.Connection, "add_listener", answered_then_silent)
            assert b._notify is not None
            b._notify.terminate()  # lost: listened again, on a connection that goes silent
            await _within("a LISTEN was sent to the stopped backend", lambda: bool(stopped))
            await _within("listening again on another connection", lambda: b._listening(
                ) and b._notify is not None and b._notify.get_server_pid() != stopped[0])
            await asyncio.wait_for(view.sync(), HANG)
            await _a_commit_wakes_the_view(a, view, "02:00:00:00:0a:01")
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def _a_writer_beside_a_checked_view(pg_dsn: str, peer: PeerSettings = CHECKED,
                                           ) -> AsyncIterator[
        tuple[PostgresStore, PostgresStore, InventoryView]]:
    """(a store that writes, a store reached through a TCP proxy with the checks on
    (``peer``: CHECKED; ANSWERED where no session must fail within QUICK's 1 s), that
    store's view, synced): another server's commits and one that must hear of them."""
    async with _through_tcp(pg_dsn, peer=peer) as (b, _cutter):
        a = PostgresStore(pg_dsn)
        await a.open()
        try:
            view = InventoryView(b)
            await view.sync()
            yield a, b, view
        finally:
            await a.close()


@contextlib.asynccontextmanager
async def _a_copy_waiting_on_a_lock(pg_dsn: str) -> AsyncIterator[
        tuple[asyncpg.Connection, asyncpg.Connection, asyncio.Future[None], int]]:
    """(an admin connection, the lock's holder, a COPY waiting for it, the rows sent):
    40 MB of rows, more than the buffers hold, copied through a TCP proxy (QUICK: 2 s of
    user timeout) into a table where another transaction holds an uncommitted key the rows
    have (an operator's open transaction, say): the server waits for it reading nothing."""
    rows = [(i, "p" * 200) for i in range(200_000)]
    admin = await asyncpg.connect(pg_dsn)
    holder = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, pad TEXT)")
        await holder.execute("BEGIN")
        await holder.execute("INSERT INTO t VALUES (5, 'held')")
        async with pg.cutting(pg_dsn, tcp=True) as (dsn, _cutter):
            conn = await postgres.connect(dsn, QUICK)
            try:
                copying = asyncio.ensure_future(
                    postgres.copy_records(conn, QUICK, "t", rows, ("k", "pad")))
                await pg.until(admin, "SELECT count(*) FROM pg_stat_activity WHERE query"
                               " LIKE 'COPY%' AND wait_event_type = 'Lock'", "waiting")
                yield conn, holder, copying, len(rows)
            finally:
                conn.terminate()
    finally:
        await holder.close()
        await admin.close()


async def test_a_copy_waiting_on_a_lock_longer_than_the_user_timeout_completes(
        pg_dsn: str) -> None:
    """The server reads none of a COPY's rows while it waits for a lock: the window closes,
    and Linux ends a connection whose zero window outlasts TCP_USER_TIMEOUT, though every
    probe is answered. copy_records sends without the user timeout: the COPY waits for the
    lock, as it should, and completes once it is released; the connection keeps its user
    timeout afterwards. (With asyncpg's copy_records_to_table and QUICK's 2 s user timeout:
    the connection was ended 2-3 s into the wait, and the COPY, waiting for the transport's
    writes to resume, still waited after 20 s: forever.)"""
    async with _a_copy_waiting_on_a_lock(pg_dsn) as (conn, holder, copying, sent):
        await asyncio.sleep(3 * QUICK.tcp_user_timeout)
        assert not copying.done()
        await holder.execute("ROLLBACK")
        await _ended(copying)
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2000
        assert await conn.fetchval("SELECT count(*) FROM t") == sent


async def test_a_copy_whose_connection_ends_fails_rather_than_waiting_for_ever(
        pg_dsn: str) -> None:
    """A COPY under way whose connection ends (the store's check ends it so, as it ends a
    silent server's: _silenced) is a failure at once: asyncpg's own COPY, paused for the
    transport's writes to resume, is never told and waited for ever."""
    async with _a_copy_waiting_on_a_lock(pg_dsn) as (conn, _holder, copying, _sent):
        await asyncio.sleep(0.5)  # the buffers full, the COPY paused
        conn.terminate()
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await _ended(copying)


@pytest.mark.parametrize("silent", ["vanished", "stopped"])
async def test_a_copy_without_the_checks_to_a_silent_server_fails_within_the_user_timeout(
        pg_dsn: str, silent: str) -> None:
    """With the checks off (check_interval 0) nothing but the kernel watches a COPY, so its
    rows are sent with the user timeout kept: a server that vanishes mid-COPY (the proxy
    black-holes it, rows left unacknowledged) or whose backend stops (its window closes)
    ends the connection within it, and the COPY fails. (Sent without it, as with the checks
    on: the vanished one was waited for through the kernel's ~15 minutes of
    retransmissions, the stopped one for ever: "still waiting after 20 s".)"""
    peer = replace(QUICK, check_interval=0)
    rows = [(i, "p" * 200) for i in range(200_000)]
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, pad TEXT)")
        async with pg.cutting(pg_dsn, tcp=True) as (dsn, cutter):
            conn = await postgres.connect(dsn, peer)
            try:
                if silent == "vanished":
                    cutter.freeze_after(b"p" * 200)  # once the first rows were passed on
                copying = asyncio.ensure_future(
                    postgres.copy_records(conn, peer, "t", rows, ("k", "pad")))
                stopping = []
                if silent == "stopped":  # once its rows flow
                    await pg.until(admin, "SELECT count(*) FROM pg_stat_progress_copy"
                                   " WHERE bytes_processed > 0", "copying")
                    stopping.append(conn.get_server_pid())
                with pg.stopped(stopping), pytest.raises(asyncpg.ConnectionDoesNotExistError):
                    await _ended(copying)
            finally:
                conn.terminate()
                cutter.thaw()
    finally:
        await admin.close()


async def test_a_pool_session_whose_set_up_is_not_answered_fails_within_connect_timeout(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    """A new pool session connected, then its backend silent before its set-up statement
    (the server's keepalives) is answered: the session is ended within connect_timeout
    (1 s here), logged once, rather than after the acquire's 30 s; the query that waits for
    it is answered on a new session (asyncpg makes the pool's floor again in the background:
    the stopped one is that) or told the StoreError. (Before: "still waiting after 20 s".)"""
    stopped: list[int] = []
    tuned = postgres.tune

    def tune_then_stop(conn: asyncpg.Connection, peer: PeerSettings) -> None:
        tuned(conn, peer)
        if armed and not stopped:
            stopped.append(conn.get_server_pid())
            os.kill(stopped[0], signal.SIGSTOP)

    armed = False
    monkeypatch.setattr(postgres, "tune", tune_then_stop)
    store = PostgresStore(pg_dsn, peer=QUICK, pool_size=1)
    await store.open()
    try:
        for session in list(store._sessions):
            session.terminate()  # the pool's one session: the next query makes another
        armed = True
        with contextlib.suppress(StoreError):
            assert await _ended(store.get_setting("k")) is None
        assert stopped and caplog.text.count("not set up within 1 s): ended") == 1
        assert await _ended(store.get_setting("k")) is None
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await store.close()


@contextlib.asynccontextmanager
async def _one_checked_session(pg_dsn: str) -> AsyncIterator[tuple[PostgresStore, int]]:
    """A store of one pool session, checked every second (CHECKED), and its backend's PID;
    the backend continued (SIGCONT) at the end, whatever stopped it."""
    store = PostgresStore(pg_dsn, peer=ANSWERED, pool_size=1)
    await store.open()
    try:
        (session,) = list(store._sessions)
        pid = session.get_server_pid()
        try:
            yield store, pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    finally:
        await store.close()


async def test_a_statement_sent_to_a_backend_hung_alone_fails_within_the_checks_bound(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """One pool session's backend stopped while idle (the server, the LISTEN session and
    the kernels answer, so neither the check nor TCP notices): a read sent to it is never
    read. The check sees the statement waited for longer than its timeout while the server
    shows that backend idle since before it was sent: the session is ended, logged once,
    the read a StoreError saying why; the next read gets a new session. (Before: "still
    waiting after 20 s", for ever.)"""
    async with _one_checked_session(pg_dsn) as (store, pid):
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(StoreError, match=f"its backend, PID {pid}, does not"):
            await _ended(store.get_setting("k"))
        assert caplog.text.count("the session is ended") == 1
        assert await _ended(store.get_setting("k")) is None


async def test_writes_sent_to_a_backend_hung_alone_are_settled(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction's COMMIT sent to a backend stopped once its body ran (idle in the
    transaction, which holds the write's mark): the session ended by the check, the write
    settled as a lost COMMIT, "unknown" (the claim of its mark waits on the stopped
    transaction past LOST_COMMIT_WAIT: it may commit once continued). A single statement
    sent to a backend stopped while idle: settled "failed" (its mark claimed: the statement,
    read once the backend runs again, can no longer commit, and does not)."""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 1.0)
    async with _one_checked_session(pg_dsn) as (store, pid):
        with pytest.raises(OutcomeUnknown, match="outcome is unknown"):
            async def commit_to_a_stopped_backend() -> None:
                async with store._write() as conn:
                    await conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
                    os.kill(pid, signal.SIGSTOP)
            await _ended(commit_to_a_stopped_backend())
        os.kill(pid, signal.SIGCONT)
        # The pool makes its session again in the background: one still being set up (a
        # loaded machine's took seconds) was stopped here, then ended by the check for its
        # set-up, and the write went to the next session, written (s49-flake). A read
        # first: the pool hands out a session once it is set up.
        await store.get_setting("k")
        (session,) = [s for s in store._sessions if not s.is_closed()]
        second = session.get_server_pid()
        os.kill(second, signal.SIGSTOP)
        try:
            with pytest.raises(StoreError) as told:
                await _ended(store.add_audit(AuditEntry(
                    time=1.0, actor="a", action="x", target="t", peer="p", outcome="done")))
            assert not isinstance(told.value, OutcomeUnknown)
        finally:
            os.kill(second, signal.SIGCONT)
        admin = await asyncpg.connect(pg_dsn)
        try:
            await _within("the stopped backends gone", lambda: _gone(admin, [pid, second]))
        finally:
            await admin.close()
        assert await store.list_audit() == []
        await _next_write_is_sound(store)


async def _gone(admin: asyncpg.Connection, pids: list[int]) -> bool:
    return not await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids)


async def test_a_write_waiting_for_a_lock_a_stuck_session_holds_is_given_up(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A session holds the writers' lock idle in its transaction, its backend stopped (a
    server's session hung mid-write; pg_terminate_backend cannot end it while stopped):
    every write waits for that lock. The check gives such a wait up once it has lasted
    past its timeout: each write is a StoreError naming the holder's PID within the checks'
    bound, logged once per holder, nothing written; once the holder ends, writes go
    through. (Before: "still waiting after 20 s", for as long as the holder.)"""
    store = PostgresStore(pg_dsn, peer=ANSWERED)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    admin = await asyncpg.connect(pg_dsn)
    pid = holder.get_server_pid()
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
        with pg.stopped([pid]):
            for value in ("a", "b"):
                with pytest.raises(StoreError, match=f"held by the session of backend PID {pid}"):
                    await _ended(store.put_setting("k", value))
            assert caplog.text.count("pg_terminate_backend") == 1
            stuck = store.stuck_writes()  # the watcher's health says so (test_service)
            assert stuck is not None and f"PID {pid}" in stuck
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await _within("the holder gone", lambda: _gone(admin, [pid]))
        await _within("writes no longer stuck", lambda: store.stuck_writes() is None)
        assert await store.get_setting("k") is None
        await store.put_setting("k", "c")
        assert await store.get_setting("k") == "c"
    finally:
        holder.terminate()
        await admin.close()
        await store.close()


async def _a_write_given_up_behind(store: PostgresStore, holder: asyncpg.Connection,
                                   value: str = "a") -> None:
    """``holder`` takes the writers' lock and stays idle in its transaction (an operator's
    forgotten psql): a write of ``store`` is given up past the check's timeout, naming the
    holder's PID."""
    await holder.execute("BEGIN")
    await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
    with pytest.raises(StoreError,
                       match=f"held by the session of backend PID {holder.get_server_pid()}"):
        await _ended(store.put_setting("k", value))


async def test_a_store_whose_role_cannot_see_a_holder_waits_for_it_and_ends_nothing(
        request: pytest.FixtureRequest) -> None:
    """A store connected as a role without pg_read_all_stats sees other roles' sessions in
    pg_stat_activity without their state: a holder of the writers' lock of another role
    (a superuser's psql) idle in its transaction is not given up for, and a write waits
    for it, as it did before the checks looked (nothing of the store's ended); cannot_tell
    says why, with the GRANT that would let it tell (s32-pg), and stuck_writes says
    nothing (s34-pg: the holder may be at work, writes are not refused); the same holder
    as the store's own role is found and its writers given up. The store
    never ends a session it does not own: ending one of its own is all it does (the holder
    lives on in both cases)."""
    cluster: pg.Cluster = request.getfixturevalue("postgres")
    role = f"r_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(cluster.dsn())
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    await admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    dsn = cluster.dsn().replace(f"{pg.SUPERUSER}@", f"{role}@") + f"&search_path={role}"
    store = PostgresStore(dsn, peer=ANSWERED)
    holders: list[asyncpg.Connection] = []
    try:
        await store.open()
        for who in (cluster.dsn(), dsn):
            holder = await asyncpg.connect(who)
            holders.append(holder)
            await holder.execute("BEGIN")
            await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
            writing = asyncio.ensure_future(store.put_setting("k", who))
            if who == dsn:
                with pytest.raises(StoreError, match="held by the session of backend PID"):
                    await _ended(writing)
                assert store.stuck_writes() is not None
            else:
                await asyncio.sleep(3.5)  # three checks past the check's timeout
                unseen = store.cannot_tell()
                assert not writing.done() and unseen is not None
                assert store.stuck_writes() is None
                assert f"GRANT pg_read_all_stats TO {role}" in unseen and "refused" not in unseen
            assert await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1",
                                        holder.get_server_pid()) == "idle in transaction"
            await holder.execute("COMMIT")
            if who != dsn:
                await _ended(writing)
        await _within("writes no longer stuck", lambda: store.stuck_writes() is None
                      and store.cannot_tell() is None)
        await store.put_setting("k", "v")
        assert await store.get_setting("k") == "v"
    finally:
        for holder in holders:
            holder.terminate()
        await store.close()
        await admin.execute(f"DROP SCHEMA {role} CASCADE")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_a_row_lock_held_idle_gives_up_that_write_alone_and_is_no_outage(
        pg_dsn: str) -> None:
    """An operator's psql holds one API token's row idle in its transaction (a forgotten
    UPDATE of it; not a table the change feed carries: the writers' lock is free). The
    write that waits for that row is given up past the check's timeout, naming the holder;
    the store's writes are not stuck (stuck_writes: the service's health, /healthz):
    every other write goes through meanwhile. (Before: any lock's holder idle in its
    transaction was taken as the writers' lock's: the health went down, installs refused,
    until that psql ended its transaction, for one token's row.)"""
    store = PostgresStore(pg_dsn, peer=ANSWERED)
    await store.open()
    await store.create_token(ApiToken(name="t", sha256="2" * 64, scope=Scope.ADMIN, created=1.0))
    holder = await asyncpg.connect(pg_dsn)
    pid = holder.get_server_pid()
    try:
        await holder.execute("BEGIN")
        await holder.execute("UPDATE api_tokens SET last_used = 1 WHERE name = 't'")
        with pytest.raises(StoreError, match=f"held by the session of backend PID {pid}"):
            await _ended(store.touch_token("t", 2.0))
        await asyncio.sleep(1.5)  # a check more
        assert store.stuck_writes() is None
        await store.put_setting("k", "v")
        assert await store.get_setting("k") == "v"
        # The given-up statement, run once the holder commits, cannot commit (its mark
        # was claimed): told failed, it is not written.
        await holder.execute("COMMIT")
        await _within("the given-up statement's backend gone", lambda: holder.fetchval(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE query LIKE"
            " '%SET last_used = $2 WHERE%' AND pid <> pg_backend_pid()"))
        assert [t.last_used for t in await store.list_tokens()] == [1.0]
    finally:
        holder.terminate()
        await store.close()


async def test_writes_are_no_longer_stuck_once_the_holder_ends_its_transaction(
        pg_dsn: str) -> None:
    """An operator's psql holds the writers' lock idle in its transaction (a forgotten
    UPDATE of a netboot table): writes are given up and told stuck. The operator then
    commits and leaves the session in a new transaction that holds nothing netboot waits for
    (psql with AUTOCOMMIT off is idle in a transaction after every statement; so is an
    application whose driver opens one implicitly): writes are no longer stuck at the next
    check. (Before: "stuck" for as long as that PID was idle in any transaction, and with the
    health down the boot path wrote nothing that would take the lock and clear it: installs
    refused until the operator closed psql.)"""
    store = PostgresStore(pg_dsn, peer=ANSWERED)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        await _a_write_given_up_behind(store, holder)
        assert store.stuck_writes() is not None
        await holder.execute("COMMIT")
        await holder.execute("BEGIN")
        await holder.execute("SELECT count(*) FROM settings")  # idle in a new transaction
        await _within("writes no longer stuck", lambda: store.stuck_writes() is None)
        await store.put_setting("k", "b")
        assert await store.get_setting("k") == "b"
    finally:
        holder.terminate()
        await store.close()


async def test_a_write_taking_the_lock_while_the_check_asks_about_the_holder_stops_no_check(
        pg_dsn: str) -> None:
    """Writes stuck behind a holder idle in its transaction; the holder commits, and a
    write takes the writers' lock (which says writes are no longer stuck) while the check's
    question about that holder is on its way. The checks go on: a second holder is found
    and its writers given up as the first's were. (Before: the check named the holder from
    what the write had just cleared, a TypeError that ended the task that checks and
    listens again: writes then waited for the next stuck holder for ever.)"""
    async with pg.cutting(pg_dsn) as (dsn, cutter):
        store = PostgresStore(dsn, peer=ANSWERED)  # the proxy watches; it cuts nothing
        await store.open()
        holder = await asyncpg.connect(pg_dsn)
        asked = asyncio.Event()
        try:
            await _a_write_given_up_behind(store, holder)
            await holder.execute("COMMIT")

            def a_write_takes_the_lock() -> None:
                store._stuck = None  # as _write does once it holds the writers' lock
                asked.set()

            cutter.call_before(b"count(*) > 0 FROM pg_stat_activity", a_write_takes_the_lock)
            await _within("the check's question asked", asked.is_set)
            await asyncio.sleep(2.5)  # two checks more
            await _a_write_given_up_behind(store, holder, "b")
        finally:
            holder.terminate()
            await store.close()


async def test_a_check_that_fails_is_logged_and_the_checks_go_on(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A check that raises what it never should (a bug, as the one a write taking the lock
    during the check's question was) is logged, and the store listens again and goes on
    checking: a stuck holder is then found as ever. (Before: the exception ended the task
    that checks and listens again, unlogged until the task was collected: no check ran
    again, writes behind a stuck holder waited for ever.)"""
    real = PostgresStore._look
    failed: list[bool] = []

    async def once_broken(self: PostgresStore, conn: asyncpg.Connection, within: float,
                          ) -> bool:
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug")
        return await real(self, conn, within)

    monkeypatch.setattr(PostgresStore, "_look", once_broken)
    store = PostgresStore(pg_dsn, peer=ANSWERED)
    await store.open()
    holder = await asyncpg.connect(pg_dsn)
    try:
        await _within("a check run", lambda: bool(failed))
        await _a_write_given_up_behind(store, holder)
        assert "the check failed" in caplog.text and "RuntimeError: a bug" in caplog.text
    finally:
        holder.terminate()
        await store.close()


@pytest.mark.parametrize("question", ["idle", "stuck"])
async def test_a_server_stopped_as_the_check_looks_at_a_waiting_session_is_told_silent(
        question: str) -> None:
    """A write waits past the check's timeout for the writers' lock (held by a session
    that runs a long statement: "idle" — the look asks how long the waiting backends have
    been idle — or by one idle in its transaction with its backend stopped: "stuck" — the
    look asks whether that holder still holds up writes), and the whole server stops just
    as the check's look at it reaches the server. That look is a round trip on the LISTEN
    connection that the server does not answer, as a check's own ``SELECT 1``: the server is
    told silent within the checks' bound and the write fails saying so. (Before, s31-pg's
    look was left running on the LISTEN connection: every later check's ``SELECT 1`` was
    refused at once by asyncpg, "another operation is in progress", which counts as an
    answer: the server was never told silent, the write "still waiting after 20 s", for
    ever.)"""
    cluster = await asyncio.to_thread(pg.start)  # its own: all of it is stopped
    holder = await asyncpg.connect(cluster.dsn())
    stopped: list[int] = []
    try:
        async with pg.cutting(cluster.dsn(), tcp=True) as (dsn, cutter):
            store = PostgresStore(dsn, peer=CHECKED)
            await store.open()
            try:
                await holder.execute("BEGIN")
                await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
                if question == "idle":
                    holding = asyncio.ensure_future(holder.execute("SELECT pg_sleep(60)"))
                    look = b"pg_blocking_pids"
                else:
                    stopped.append(holder.get_server_pid())
                    os.kill(stopped[0], signal.SIGSTOP)
                    with pytest.raises(StoreError, match="held by the session of backend"):
                        await _ended(store.put_setting("k", "a"))
                    assert store.stuck_writes() is not None
                    look = b"count(*) > 0 FROM pg_stat_activity"

                def stop_the_server() -> None:
                    for pid in pg.server_pids(cluster.process.pid):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGSTOP)
                            stopped.append(pid)

                cutter.call_before(look, stop_the_server)
                with pytest.raises(StoreError, match="no answer to a check within 1 s"):
                    await _ended(store.put_setting("k", "v"))
                assert len(stopped) > 2  # stopped by the look, not by a check's SELECT 1
            finally:
                for pid in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                await store.close()
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        holder.terminate()
        if question == "idle":
            with contextlib.suppress(BaseException):
                await holding
        await asyncio.to_thread(cluster.stop)


# --- the server's own bounds on netboot's sessions (statement_timeout, idle in transaction) --

# Room for the test to stop a backend mid-statement before its own timeout would fire.
BOUNDED = replace(ANSWERED, statement_timeout=2)
_SLEEPING = "SELECT count(*) FROM pg_stat_activity WHERE pid = {} AND wait_event = 'PgSleep'"


@pytest.mark.parametrize("where", ["body", "single", "commit"])
async def test_a_statement_whose_backend_hangs_while_it_runs_is_ended_and_settled(
        pg_dsn: str, where: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A pool session's backend stopped while it runs netboot's statement (the server, the
    LISTEN session and the kernels answer; pg_stat_activity shows it "active", as one at
    work): its own statement_timeout (2 s here) cannot fire while it is stopped. The check
    finds the statement waited for check_timeout past that bound: the session is ended,
    logged once, the backend asked to end (pg_terminate_backend: acted on once it runs),
    and the write settled as one whose connection was lost: a transaction's body ("body":
    failed), a single statement (failed: its mark claimed first), a COMMIT ("commit": its
    stopped transaction holds its mark: unknown). Continued, the backend ends without
    committing anything. (Before: "still waiting after 20 s", for ever: a backend hung
    mid-statement was waited for.)"""
    monkeypatch.setattr(postgres, "LOST_COMMIT_WAIT", 1.0)
    admin = await asyncpg.connect(pg_dsn)
    store = PostgresStore(pg_dsn, peer=BOUNDED, pool_size=1)
    await store.open()
    (session,) = list(store._sessions)
    pid = session.get_server_pid()
    try:
        if where == "commit":
            for sql in pg.SLOW_COMMIT:  # "deaf": a COMMIT that sleeps 30 s
                await admin.execute(sql)
            call: Awaitable[object] = store.apply_batch(pg.slow_batch("deaf"))
        elif where == "body":
            async def body() -> None:
                async with store._write() as conn:
                    await conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
                    await conn.execute("SELECT pg_sleep(1.8)")
            call = body()
        else:
            call = store._single("execute", "INSERT INTO settings (key, value) SELECT 'k', 'v'"
                                 " FROM pg_sleep(1.8)")
        task = asyncio.ensure_future(call)
        await pg.until(admin, _SLEEPING.format(pid), "running its statement")
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreError) as told:
                await _ended(task)
        finally:
            os.kill(pid, signal.SIGCONT)
        if where == "commit":
            assert isinstance(told.value, OutcomeUnknown)
        else:
            assert not isinstance(told.value, OutcomeUnknown)
            assert f"past the server's statement_timeout of 2 s, which its backend (PID {pid}:" \
                   f" active, waiting for PgSleep) did not enforce" in str(told.value)
        assert caplog.text.count("the backend asked to end (pg_terminate_backend") == 1
        await _within("the stopped backend gone", lambda: _gone(admin, [pid]))
        assert await store.get_setting("k") is None
        assert await store.list_events("m1") == []
        await _next_write_is_sound(store)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await admin.close()
        await store.close()


async def test_a_statement_that_runs_past_the_statement_timeout_is_cancelled_by_the_server(
        pg_dsn: str) -> None:
    """A backend that runs (not stopped) cancels a statement of netboot's at the session's
    statement_timeout itself: an ERROR, the write told failed naming the setting, the
    session kept; nothing written. A migration is not bounded by it."""
    store = PostgresStore(pg_dsn, peer=BOUNDED, pool_size=1)
    await store.open()
    try:
        (session,) = list(store._sessions)
        with pytest.raises(StoreError, match=r"statement timeout \(inventory\.postgresql\."
                                             r"statement_timeout: 2 s\)"):
            async with store._write() as conn:
                await conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
                await conn.execute("SELECT pg_sleep(4)")
        assert not session.is_closed()
        assert await store.get_setting("k") is None
        async with store._conn() as conn:
            settings = await conn.fetchrow(
                "SELECT current_setting('statement_timeout'),"
                " current_setting('idle_in_transaction_session_timeout')")
        assert tuple(settings) == ("2s", "30s")
    finally:
        await store.close()


@pytest.mark.parametrize("closed", [True, False])
async def test_a_server_stopped_mid_transaction_is_ended_and_other_servers_write_on(
        pg_dsn: str, closed: bool) -> None:
    """A netboot server whose write stops mid-transaction (its process stopped or hung
    between two statements: to the database, its session idle in its transaction, holding
    the writers' lock, and every server's writes behind it). The database ends that session
    past idle_in_transaction_session_timeout (1 s here), rolling it back: another server's
    write waiting for the lock goes through. The first server, run again, is told its write
    failed, and nothing of it is written, whether its session's end was read before it
    runs again ("closed") or not. (Before: the other server's write waited until
    its check gave it up, a StoreError naming the holder's PID, as every later write, for
    as long as the stopped server.)"""
    stalled = PostgresStore(pg_dsn, peer=replace(QUICK, idle_in_transaction_session_timeout=1,
                                                 connect_timeout=ANSWERED.connect_timeout),
                            pool_size=1)
    # Its check gives a write up (a StoreError naming the holder) after 15 s: the other
    # server's write must go through before, at the idle bound (1 s). It was 5 s, and the
    # write's time was asserted under 5 s, which a loaded machine could take.
    other = PostgresStore(pg_dsn, peer=replace(ANSWERED, check_timeout=15))
    await stalled.open()
    await other.open()
    (session,) = list(stalled._sessions)
    resume = asyncio.Event()
    inside = asyncio.Event()

    async def stopped_mid_write() -> None:
        async with stalled._write() as conn:
            await conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'stalled')")
            inside.set()
            await resume.wait()  # the server's process, stopped: nothing sent
            await conn.execute("INSERT INTO settings (key, value) VALUES ('j', 'stalled')")

    try:
        writing = asyncio.ensure_future(stopped_mid_write())
        await asyncio.wait_for(inside.wait(), HANG)
        await _ended(other.put_setting("k", "other"))  # no StoreError: not given up
        if closed:  # its end read before it runs again (else asyncpg says it otherwise)
            await _within("the stalled session's end read", session.is_closed)
        resume.set()
        with pytest.raises(StoreError, match=r"the session ended during its transaction, "
                                             r"which is rolled back .*idle_in_transaction"):
            await _ended(writing)
        assert await other.get_setting("k") == "other"
        assert await other.get_setting("j") is None
        await _next_write_is_sound(stalled)
    finally:
        resume.set()
        await stalled.close()
        await other.close()


@contextlib.asynccontextmanager
async def _a_store_of_another_role(pg_dsn: str, *, granted: bool = False) -> AsyncIterator[
        tuple[str, PostgresStore, asyncpg.Connection]]:
    """A new login role that may use ``pg_dsn``'s schema (pg_read_all_stats only if
    ``granted``), a store connected as it (statement_timeout 4 s), not yet open, and a
    connection of the superuser (another role: an operator's psql); all dropped after."""
    role = f"r_{uuid.uuid4().hex[:12]}"
    schema = pg_dsn.rpartition("search_path=")[2]
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    await admin.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
    if granted:
        await admin.execute(f"GRANT pg_read_all_stats TO {role}")
    store = PostgresStore(pg_dsn.replace(f"//{pg.SUPERUSER}@", f"//{role}@"),
                          peer=replace(ANSWERED, statement_timeout=4))
    holder = await asyncpg.connect(pg_dsn)
    try:
        yield role, store, holder
    finally:
        holder.terminate()
        await store.close()
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


@pytest.mark.parametrize("granted", [False, True])
async def test_a_lock_holder_this_role_may_not_see_is_told_with_the_grant_that_shows_it(
        pg_dsn: str, granted: bool, caplog: pytest.LogCaptureFixture) -> None:
    """netboot's role without pg_read_all_stats: pg_stat_activity hides what a session of
    another role does (its state NULL), so a holder of the writers' lock stuck idle in its
    transaction cannot be told from one at work. A write waiting for it past the check's
    timeout is told (logged once, and cannot_tell, for /healthz's "unknown", while that
    session holds the lock), naming the privilege and the GRANT, and not as stuck (no
    outage: the holder may be at work); the write itself fails at statement_timeout (4 s
    here). With the privilege granted, that holder is the stuck one s31-pg gives writes up
    for, naming its PID, and nothing is unknown. Once it ends, writes go on. (Before,
    without the privilege: "still waiting after 20 s", for as long as the holder, nothing
    said; s32-pg: said, but as stuck_writes, which the health took for an outage: s34-pg.)
    """
    async with _a_store_of_another_role(pg_dsn, granted=granted) as (role, store, holder):
        await store.open()
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
        pid = holder.get_server_pid()
        grant = f"GRANT pg_read_all_stats TO {role}"
        if granted:
            with pytest.raises(StoreError, match=f"held by the session of backend PID {pid}"):
                await _ended(store.put_setting("k", "v"))
            assert grant not in caplog.text and store.cannot_tell() is None
        else:
            with pytest.raises(StoreError, match="statement timeout"):
                await _ended(store.put_setting("k", "v"))
            assert caplog.text.count(grant) == 2  # at open (the role), and for the holder
            unseen = store.cannot_tell()
            assert unseen is not None and grant in unseen and f"PID {pid} (role" in unseen
            assert store.stuck_writes() is None
        await holder.execute("ROLLBACK")
        await _within("writes no longer stuck", lambda: store.stuck_writes() is None
                      and store.cannot_tell() is None)
        await store.put_setting("k", "w")
        assert await store.get_setting("k") == "w"


async def test_a_row_holder_this_role_may_not_see_is_told_and_is_no_outage(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """netboot's role without pg_read_all_stats, and a session of another role (an
    operator's psql as the superuser) holding one API token's row idle in its transaction:
    the write waiting for that row is told once with the GRANT (netboot cannot tell the
    holder stuck) and fails at statement_timeout (4 s here), but only that row's writes
    wait: stuck_writes stays None at every look (no outage: health up, installs answered)
    and other writes go through meanwhile. (s32-pg and s32-review merged: without "only
    the writers' lock", the hidden holder of a row was told stuck at each check, cleared
    at the next, the health flapping down.)"""
    async with _a_store_of_another_role(pg_dsn) as (role, store, holder):
        await store.open()
        await store.create_token(ApiToken(name="t", sha256="2" * 64, scope=Scope.ADMIN,
                                          created=1.0))
        await holder.execute("BEGIN")
        await holder.execute("UPDATE api_tokens SET last_used = 1 WHERE name = 't'")
        touching = asyncio.ensure_future(store.touch_token("t", 2.0))
        grant = f"GRANT pg_read_all_stats TO {role}"
        seen: list[str | None] = []
        while not touching.done():
            seen.append(store.stuck_writes())
            await asyncio.sleep(0.05)
        with pytest.raises(StoreError, match="statement timeout"):
            await touching
        assert len(seen) > 40 and seen == [None] * len(seen)
        # Once at open (the role), once for the holder.
        assert caplog.text.count(grant) == 2 and "writes of what it locked wait" in caplog.text
        await store.put_setting("k", "v")  # the writers' lock is free: no wait
        assert await store.get_setting("k") == "v"
        await holder.execute("ROLLBACK")


@pytest.mark.parametrize("when", ["idle", "running"])
async def test_a_change_feed_read_whose_backend_hangs_alone_fails_within_the_checks_bound(
        pg_dsn: str, when: str, caplog: pytest.LogCaptureFixture) -> None:
    """The change feed's own connection (every sync of a view, outside the pool) with its
    backend stopped, while idle ("idle": the read sent is never read) or while it runs the
    read ("running": waiting for a table lock a session at work holds, so active, past its
    statement_timeout of 2 s): the check ends it as it ends a pool session, logged once,
    the read a StoreError saying why; the next read makes the connection again. (Before:
    "still waiting after 20 s", and every later sync behind it, for ever.)"""
    admin = await asyncpg.connect(pg_dsn)
    holder = await asyncpg.connect(pg_dsn)
    store = PostgresStore(pg_dsn, peer=BOUNDED)
    await store.open()
    holding: asyncio.Future[Any] | None = None
    pid = 0
    try:
        await store.changes_since(0)
        assert store._feed is not None
        pid = store._feed.get_server_pid()
        if when == "idle":
            os.kill(pid, signal.SIGSTOP)
            reading = asyncio.ensure_future(store.changes_since(0))
            words = f"its backend, PID {pid}, does not"
        else:
            await holder.execute("BEGIN")
            await holder.execute("LOCK TABLE changes IN ACCESS EXCLUSIVE MODE")
            holding = asyncio.ensure_future(holder.execute("SELECT pg_sleep(60)"))
            reading = asyncio.ensure_future(store.changes_since(0))
            await pg.until(admin, f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
                           " AND wait_event_type = 'Lock'", "waiting for the table lock")
            os.kill(pid, signal.SIGSTOP)
            words = f"which its backend (PID {pid}: active, waiting for relation) did not"
        try:
            with pytest.raises(StoreError, match=re.escape(words)):
                await _ended(reading)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert caplog.text.count(words) == 1
        if holding is not None:  # its backend sleeps on, holding the lock, unless ended
            await admin.execute("SELECT pg_terminate_backend($1)", holder.get_server_pid())
            await _within("the holder gone", lambda: _gone(admin, [holder.get_server_pid()]))
        assert (await _ended(store.changes_since(0))).complete
        assert store._feed is not None and store._feed.get_server_pid() != pid
        # Its server's settings: the statement bound, not the idle-in-transaction one (its
        # read-only transaction decodes every changed machine between two statements).
        assert tuple(await store._feed.fetchrow(
            "SELECT current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')")) == ("2s", "0")
    finally:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        holder.terminate()
        if holding is not None:
            with contextlib.suppress(BaseException):
                await holding
        await admin.close()
        await store.close()


async def test_a_migration_is_not_bounded_by_the_statement_timeout(pg_dsn: str) -> None:
    """A server starting while another migrates waits for the migrations' lock longer than
    statement_timeout (1 s here; 2.5 s of wait): it opens all the same, as a migration step
    rewriting a large table would run on. Only the migration is unbounded: the store's next
    statements are bounded again."""
    holder = await asyncpg.connect(pg_dsn)
    store = PostgresStore(pg_dsn, peer=replace(BOUNDED, statement_timeout=1))
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.MIGRATE_LOCK)
        opening = asyncio.ensure_future(store.open())
        await asyncio.sleep(2.5)
        await holder.execute("ROLLBACK")
        await _ended(opening)
        with pytest.raises(StoreError, match="statement timeout"):
            async with store._conn() as conn:
                await conn.execute("SELECT pg_sleep(2)")
    finally:
        holder.terminate()
        await store.close()


# --- s34-pg: the LISTEN connection's own bounds; pgbouncer; a holder this role cannot see ---

async def test_the_listen_session_has_the_servers_side_of_the_settings_a_pool_session_has(
        pg_dsn: str) -> None:
    """The LISTEN connection's session is set up as a pool session is (server_keepalives:
    the server's tcp_keepalives_*, tcp_user_timeout, statement_timeout and
    idle_in_transaction_session_timeout): the server notices a vanished netboot's LISTEN
    session within the same bound. Only the timeouts can be read back here (the cluster
    listens on a Unix socket, where the TCP ones read 0). (Before: the LISTEN session had
    none of them: statement_timeout 0.)"""
    store = PostgresStore(pg_dsn, peer=PeerSettings(check_interval=0, statement_timeout=7,
                                                   idle_in_transaction_session_timeout=9))
    await store.open()
    try:
        assert store._notify is not None
        assert await store._notify.fetchval("SHOW statement_timeout") == "7s"
        assert await store._notify.fetchval("SHOW idle_in_transaction_session_timeout") == "9s"
        async with store._conn() as conn:  # as a pool session has
            assert await conn.fetchval("SHOW statement_timeout") == "7s"
    finally:
        await store.close()


async def test_a_listen_backend_the_server_ends_is_listened_again_and_the_view_resynced(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend of the LISTEN connection ended by the server (pg_terminate_backend: an
    operator, a pooler's or a failover's cleanup) while another server commits: the store
    notices the loss, its view no longer answers from memory and syncs that commit from the
    change feed (nothing missed), the store listens on a new connection, and a later
    commit of the other server wakes a waiting reader."""
    monkeypatch.setattr(postgres, "POLL_SECONDS", 3600.0)  # woken by NOTIFY, or not at all
    async with _a_writer_beside_a_checked_view(pg_dsn, ANSWERED) as (a, b, view):
        assert view.fresh(3600.0) and b._notify is not None
        old = b._notify.get_server_pid()
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", old)
        finally:
            await admin.close()
        during = Machine(macs=(MacAddress.parse("02:00:00:00:0b:01"), ), hostname="during")
        await a.create_machine(during)
        await _within("told the LISTEN connection was lost", lambda: not view.fresh(3600.0))
        await asyncio.wait_for(view.sync(), HANG)
        assert await view.machine_by("mac", "02:00:00:00:0b:01") == during
        await _within("listening again on another backend", lambda: b._listening(
            ) and b._notify is not None and b._notify.get_server_pid() != old)
        await _a_commit_wakes_the_view(a, view, "02:00:00:00:0b:02")


@contextlib.asynccontextmanager
async def _through_pgbouncer(request: pytest.FixtureRequest, mode: str, **kw: Any,
                             ) -> AsyncIterator[tuple[pg.Cluster, str, Callable[[str], str]]]:
    """A fresh database of the session's cluster and a pgbouncer in ``pool_mode = mode`` in
    front of it (``kw``: pg.bouncing's other arguments): the cluster, the database's name,
    and database name -> a DSN through the pooler."""
    cluster: pg.Cluster = request.getfixturevalue("postgres")
    async with pg.fresh_database(cluster) as database:
        with pg.bouncing(cluster, mode, **kw) as through:
            yield cluster, database, through


async def test_through_pgbouncer_in_session_pooling_a_stuck_holder_is_found(
        request: pytest.FixtureRequest) -> None:
    """netboot through pgbouncer (pool_mode = session, the supported mode): the PID asyncpg
    is handed is pgbouncer's, not the backend's, so the check looks the sessions up by the
    PID the server names (pg_backend_pid(), asked as each is set up). A write waiting for
    the writers' lock held by a session idle in its transaction is given up naming the
    holder, and writes are told stuck until it ends; the store's own commits are not
    counted as other servers' (their notifications name the real backends). (Before: the
    check found none of the store's sessions: the write still waited after 20 s, health
    "ok"; and every own write counted twice.)"""
    async with _through_pgbouncer(request, "session") as (cluster, database, through):
        store = PostgresStore(through(database), peer=CHECKED)
        await store.open()
        holder = await asyncpg.connect(cluster.dsn(database))  # an operator's psql
        try:
            before = store.commits
            await store.put_setting("k", "v")
            await asyncio.sleep(0.3)  # its notification has come by now
            assert store.commits == before + 1
            await holder.execute("BEGIN")
            await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
            pid = holder.get_server_pid()
            with pytest.raises(StoreError, match=f"held by the session of backend PID {pid}"):
                await _ended(store.put_setting("k", "w"))
            stuck = store.stuck_writes()
            assert stuck is not None and f"PID {pid}" in stuck
            await holder.execute("ROLLBACK")
            await _within("writes no longer stuck", lambda: store.stuck_writes() is None)
            await store.put_setting("k", "x")
            assert await store.get_setting("k") == "x"
        finally:
            holder.terminate()
            await store.close()


async def _told_deaf_then_healthy_again(store: PostgresStore, dsn: str) -> None:
    """``store`` behind the pgbouncer of ``dsn``, now in transaction pooling: told that no
    notification reaches it (stuck_writes names pool_mode = session) and not listening
    (readers poll meanwhile); the pooler back in session pooling, healthy and listening."""
    def told() -> bool:
        said = store.stuck_writes()
        return said is not None and "pool_mode = session" in said and not store._listening()

    await _within("told no notification reaches it, not listening", told)
    pg.repool(dsn, "session")
    await _within("listening again, healthy", lambda: store.stuck_writes(
        ) is None and store._listening())

async def test_through_pgbouncer_switched_to_transaction_pooling_a_relisten_is_told(
        request: pytest.FixtureRequest) -> None:
    """pgbouncer switched from session to transaction pooling while netboot runs (its
    configuration reloaded), then the LISTEN connection's backend ended: the store listens
    again through it, and checks again that a notification reaches it. None does, so the
    store says so where health reads it (stuck_writes: /healthz "degraded", naming
    pool_mode = session) and its readers poll rather than wait for notifications that never
    come; once the pooler is back in session pooling, a new attempt listens and the store is
    healthy again. (Before: open() alone checked: the store listened, said nothing, and its
    view learnt other servers' commits only at its own syncs.)"""
    async with _through_pgbouncer(request, "session") as (cluster, database, through):
        dsn = through(database)
        store = PostgresStore(dsn, peer=CHECKED)
        await store.open()
        admin = await asyncpg.connect(cluster.dsn(database))
        try:
            assert store.stuck_writes() is None
            pg.repool(dsn, "transaction")
            # By its PID: its query text is "LISTEN ..." only until the check's first
            # SELECT 1 on it, a second after open here (s36-flaky).
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid = $2", database, store._notify_backend)
            assert ended == 1
            await _told_deaf_then_healthy_again(store, dsn)
        finally:
            await admin.close()
            await store.close()


async def test_through_pgbouncer_reloaded_into_transaction_pooling_a_kept_listen_is_told(
        request: pytest.FixtureRequest) -> None:
    """pgbouncer switched from session to transaction pooling while netboot runs, its LISTEN
    client kept connected (nothing ends its backend): from the check's next ``SELECT 1`` on,
    that client's server session is lent to others and no notification reaches it. The
    check sends one to itself when nothing was heard for a check_interval, so the store is
    told within about two check_intervals + connect_timeout: it stops listening (readers poll),
    health names pool_mode = session; back in session pooling, it listens again. (Before:
    other servers' commits went unseen, the store listening and healthy, for as long as it
    was watched: "not told ... within 20.0 s".)"""
    async with _through_pgbouncer(request, "session") as (cluster, database, through):
        dsn = through(database)
        store = PostgresStore(dsn, peer=CHECKED)
        other = PostgresStore(cluster.dsn(database))
        await store.open()
        await other.open()
        try:
            before = store.commits
            await other.put_setting("k", "1")
            await _within("another server's commit heard", lambda: store.commits > before)
            pg.repool(dsn, "transaction")
            await _told_deaf_then_healthy_again(store, dsn)
            before = store.commits
            await other.put_setting("k", "2")
            await _within("another server's commit heard again",
                          lambda: store.commits > before)
        finally:
            await other.close()
            await store.close()


@pytest.mark.parametrize(("mode", "settings"), [
    ("transaction", ""), ("statement", ""),
    # pgbouncer 1.21+ keeps prepared statements working in transaction pooling; LISTEN
    # still does not (its server session is lent to others): refused the same way.
    ("transaction", "max_prepared_statements = 100\n"),
])
async def test_through_pgbouncer_pooling_transactions_the_store_refuses_to_open(
        request: pytest.FixtureRequest, mode: str, settings: str) -> None:
    """Through pgbouncer in transaction (or statement) pooling, LISTEN/NOTIFY cannot work:
    the LISTEN runs on whichever server session pgbouncer lends, and what that session is
    notified of goes to whoever uses it next, or nowhere. The store refuses to open, within
    connect_timeout, naming the setting. (Before: it opened, and no other server's commit
    ever woke its readers: its view learnt them only at its own syncs, nothing said.)"""
    # Debian 12's 1.18 refuses to start with the setting ("unknown parameter"):
    # tests/install-deps.sh builds a newer one from Debian 13's source.
    async with _through_pgbouncer(request, mode, settings=settings,
                                  at_least=(1, 21) if settings else None) as (_, database, through):
        store = PostgresStore(through(database), peer=QUICK)
        with pytest.raises(StoreError, match="pool_mode = session"):
            await _ended(store.open())
        await store.close()


async def test_a_waiting_session_whose_backend_the_server_does_not_show_is_told_unknown(
        pg_dsn: str) -> None:
    """A write waiting past the check's timeout on a session whose backend the server does
    not show under the PID the store knows it by (what every session was behind pgbouncer
    before s34-pg: pgbouncer's own PID; a pooler that moves sessions between backends):
    the check cannot look at it, so it says so (cannot_tell, /healthz's "unknown"), rather
    than nothing (health "ok"); once nothing waits, nothing is unknown."""
    async with _a_store_of_another_role(pg_dsn, granted=True) as (_role, store, holder):
        store._pool_size = 1
        await store.open()
        for session in store._sessions:
            session.backend = 2**31 - 1  # no backend's
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
        writing = asyncio.ensure_future(store.put_setting("k", "v"))
        await _within("told it cannot tell", lambda: store.cannot_tell() is not None)
        unseen = store.cannot_tell()
        assert unseen is not None and f"PID {2**31 - 1}" in unseen and "pool_mode" in unseen
        assert store.stuck_writes() is None and not writing.done()
        await holder.execute("ROLLBACK")
        await _ended(writing)
        await _within("nothing unknown once nothing waits", lambda: store.cannot_tell() is None)


@pytest.mark.root
async def test_the_servers_full_disk_is_store_full_told_by_health_until_a_write_succeeds(
        postgres: pg.Cluster) -> None:
    """The inventory's tablespace on a 3 MiB tmpfs, filled by another table: a write is
    StoreFull (the 503 "the inventory's disk is full", not "unreachable"), naming the
    server's disk; reads answer; stuck_writes says why (health: degraded) until the check's
    probe write succeeds once space is freed, then writes are taken again. (Before
    s38-journey: a StoreError read "unreachable", and stuck_writes said nothing.)"""
    from netboot.errors import StoreFull

    admin = await asyncpg.connect(postgres.dsn())
    store: PostgresStore | None = None
    try:
        async with pg.tiny_tablespace(postgres, "3m") as space, \
                pg.fresh_schema(postgres) as dsn:
            try:
                store = PostgresStore(f"{dsn}&default_tablespace={space}", peer=ANSWERED)
                await store.open()
                kept = Machine(macs=(MacAddress.parse("52:54:00:00:38:30"),), hostname="kept")
                await store.create_machine(kept)
                schema = dsn.split("search_path=", 1)[1]
                await pg.fill_tablespace(admin, schema, space)
                assert store.stuck_writes() is None
                with pytest.raises(StoreFull) as full:
                    for i in range(200):  # until a write needs a page the disk has not
                        await store.create_machine(Machine(
                            macs=(MacAddress.parse(f"52:54:00:00:39:{i % 256:02x}"),)))
                assert "No space left on device" in str(full.value)
                assert "PostgreSQL server's disk" in str(full.value)
                said = store.stuck_writes()
                assert said is not None and "No space left on device" in said
                read = await store.machine_by("mac", "52:54:00:00:38:30")
                assert read is not None and read.hostname == "kept"  # reads answer
                await asyncio.sleep(2.5)  # probes meanwhile: still refused, still said
                assert store.stuck_writes() is not None
                await admin.execute(f"DROP TABLE {schema}.filler")
                for _ in range(150):  # the check's probe, every check_interval (1 s)
                    if store.stuck_writes() is None:
                        break
                    await asyncio.sleep(0.1)
                assert store.stuck_writes() is None
                await store.create_machine(Machine(
                    macs=(MacAddress.parse("52:54:00:00:38:31"),), hostname="after"))
            finally:
                if store is not None:
                    await store.close()
    finally:
        await admin.close()


@pytest.mark.root
async def test_a_full_disk_found_by_one_server_is_told_by_every_server_until_writes_succeed(
        postgres: pg.Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """Two servers' stores on one inventory whose tablespace is an 8 MiB tmpfs, filled: A's
    write is refused; B, which writes nothing meanwhile, says so too (its health: degraded,
    naming the full disk) within a check, told by A's notification, and both say nothing
    once space is freed (each one's own probe taken). Before s40-multi B said ok until its
    own next write needed a page: one server healthy, its peer failing."""
    from netboot.errors import StoreFull

    admin = await asyncpg.connect(postgres.dsn())
    stores: list[PostgresStore] = []
    try:
        # Room, once freed, for both servers' probes (each ~1 MiB, left until autovacuum).
        async with pg.tiny_tablespace(postgres, "8m") as space, \
                pg.fresh_schema(postgres) as dsn:
            try:
                for _ in range(2):
                    store = PostgresStore(f"{dsn}&default_tablespace={space}",
                                          peer=ANSWERED)
                    stores.append(store)
                    await store.open()
                a, b = stores
                schema = dsn.split("search_path=", 1)[1]
                await pg.fill_tablespace(admin, schema, space)
                await asyncio.sleep(1.5)  # checks ran: nothing written, nothing known
                assert a.stuck_writes() is None and b.stuck_writes() is None
                with pytest.raises(StoreFull):
                    for i in range(200):  # until a write needs a page the disk has not
                        await a.create_machine(Machine(
                            macs=(MacAddress.parse(f"52:54:00:00:40:{i % 256:02x}"),)))
                with caplog.at_level(logging.WARNING, logger="netboot.inventory.postgres"):
                    await _within("B told of A's full disk",
                                  lambda: b.stuck_writes() is not None)
                said = b.stuck_writes()
                assert said is not None and "No space left on device" in said, said
                # Told by A's notification (logged as B heard it): its text may since be B's
                # own probe's finding (the probe runs once B is told), so the log says how
                # B first learnt it, not the text read after (CI read B's own, once).
                assert any("(told by another netboot server)" in r.getMessage()
                           for r in caplog.records), [r.getMessage() for r in caplog.records]
                await asyncio.sleep(2.5)  # B's own probes meanwhile: refused, still said
                assert b.stuck_writes() is not None and a.stuck_writes() is not None
                await admin.execute(f"DROP TABLE {schema}.filler")
                await _within("both clear once writes are taken",
                              lambda: a.stuck_writes() is None and b.stuck_writes() is None)
                await b.create_machine(Machine(
                    macs=(MacAddress.parse("52:54:00:00:40:ff"),), hostname="after"))
            finally:
                for store in stores:
                    await store.close()
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def _a_stranger(postgres: pg.Cluster, dsn: str) -> AsyncIterator[
        tuple[PostgresStore, asyncpg.Connection, asyncpg.Connection]]:
    """A store open on ``dsn``, a superuser's connection (a writer of the inventory) and one
    of a role granted nothing (PUBLIC's CONNECT only: any role of the server may notify)."""
    role = f"mon_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres.dsn())
    store = PostgresStore(dsn, peer=ANSWERED)
    mon = None
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await store.open()
        mon = await asyncpg.connect(postgres.dsn().replace(f"{pg.SUPERUSER}@", f"{role}@"))
        yield store, admin, mon
    finally:
        if mon is not None:
            await mon.close()
        await store.close()
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_writes_refused_is_believed_only_from_a_role_that_may_write_the_inventory(
        postgres: pg.Cluster, pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """NOTIFY needs no privilege and PUBLIC may connect to a database: a role granted
    nothing sent ``writes refused`` with a forged log line on the inventory's channel, and
    the store said its writes were refused (the service's /healthz 503 "degraded", seen on a
    live `netboot serve` for as long as it sent one every 0.5 s) and logged the line raw
    (s46-attack). Now it is ignored, said once; the same from a session of a role that may
    write the inventory (another server's) is believed, its text escaped."""
    from netboot.inventory.postgres import CHANNEL

    async with _a_stranger(postgres, pg_dsn) as (store, admin, mon):
        forged = "writes refused disk full\n2026-12-07 15:00:00 INFO netboot: forged"
        with caplog.at_level(logging.WARNING, logger="netboot.inventory.postgres"):
            for _ in range(3):
                await mon.execute("SELECT pg_notify($1, $2)", CHANNEL, forged)
            await _within("the notification handled", lambda: store.stuck_writes() is not None
                          or any("ignored" in r.getMessage() for r in caplog.records))
            assert store.stuck_writes() is None
            ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
            assert len(ignored) == 1 and "may not write the inventory" in ignored[0], ignored
            await admin.execute("SELECT pg_notify($1, $2)", CHANNEL, forged)
            await _within("told by a writer", lambda: store.stuck_writes() is not None)
        said = store.stuck_writes()
        assert said is not None and "told by another netboot server" in said
        assert "\n" not in said and "disk full\\n2026" in said, said
        assert not any("\n" in r.getMessage() for r in caplog.records)


async def test_a_role_that_may_not_write_the_inventory_makes_no_reader_sync(
        postgres: pg.Cluster, pg_dsn: str) -> None:
    """A commit's notification (an empty payload on the channel) from another session made
    every reader sync before answering (InventoryView.fresh): a role granted nothing sending
    them in a loop (~2,100 a second) had a live server read the feed 240 times over 300
    DISCOVERs, 58 without (s46-attack). Now its session is looked at once and none of its
    notifications counts (s47-attack: not its first either, a session not known yet being
    counted only once found writing); a writer's still do."""
    from netboot.inventory.postgres import CHANNEL

    async with _a_stranger(postgres, pg_dsn) as (store, admin, mon):
        mon_pid = await mon.fetchval("SELECT pg_backend_pid()")
        admin_pid = await admin.fetchval("SELECT pg_backend_pid()")
        before = store.commits
        await mon.execute(f"NOTIFY {CHANNEL}")
        # Looked at (on the base there is no look: the 50 are sent at once).
        await _within("the stranger looked at",
                      lambda: mon_pid in getattr(store, "_strangers", {mon_pid: 0.0}))
        for _ in range(50):
            await mon.execute(f"NOTIFY {CHANNEL}")
        await admin.execute(f"NOTIFY {CHANNEL}")  # delivered after the 50 (commit order)
        await _within("the writer's counted", lambda: store.commits >= before + 52
                      or admin_pid in getattr(store, "_writers", {}))
        await _within("the writer's counted", lambda: store.commits > before)
        assert store.commits == before + 1


async def test_a_role_that_may_not_write_notifying_from_new_sessions_makes_no_reader_sync(
        postgres: pg.Cluster, pg_dsn: str) -> None:
    """The same role opening a session for each NOTIFY and closing it at once: each session
    was not known yet, so each notification counted as a commit (every reader synced before
    its next answer), and was never found a stranger: gone before it was looked at (s47-
    attack: 30 of 30 counted on 317fd9b). Now a session is counted once found writing; a
    writer's commit still is."""
    from netboot.inventory.postgres import CHANNEL

    async with _a_stranger(postgres, pg_dsn) as (store, admin, mon):
        before = store.commits
        role = await mon.fetchval("SELECT current_user")
        as_mon = postgres.dsn().replace(f"{pg.SUPERUSER}@", f"{role}@")
        for _ in range(30):
            once = await asyncpg.connect(as_mon)
            await once.execute(f"NOTIFY {CHANNEL}")
            await once.close()
        await admin.execute(f"NOTIFY {CHANNEL}")  # delivered after the 30
        await _within("the writer's counted", lambda: store.commits > before)
        assert store.commits == before + 1


async def test_a_database_holding_one_fixed_address_twice_is_migrated_keeping_both(
        pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Migration 5 (the fixed_ipv4 column and its unique index) on a database of schema 4
    where two machines share an address: as SQLite's migration 8 (test_sqlite.py)."""
    a = contract.machine(contract.MAC1, hostname="a", fixed_ipv4="192.0.2.7", profile="k3os",
                         created=1.0, updated=1.0)
    b = contract.machine(contract.MAC2, hostname="b", created=2.0, updated=2.0)
    store = PostgresStore(pg_dsn)
    await store.open()
    await store.put_profile(contract.PROFILE)
    await store.apply_batch(Batch(create=[a, b]))
    await store.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DROP INDEX machines_fixed_ipv4;"
                           " ALTER TABLE machines DROP COLUMN fixed_ipv4;"
                           " DROP INDEX machines_profile;"
                           " ALTER TABLE machines DROP COLUMN profile;"
                           " DELETE FROM schema_migrations WHERE version = 5")
        await conn.execute("UPDATE machines SET data = (jsonb_set(data::jsonb, '{fixed_ipv4}',"
                           " '\"192.0.2.7\"'))::text WHERE id = $1", b.id)
    finally:
        await conn.close()
    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await contract.check_a_shared_fixed_address_migrated(
            store, a, replace(b, fixed_ipv4=a.fixed_ipv4), caplog)
    finally:
        await store.close()


async def test_a_late_commit_of_a_session_this_pool_ended_is_a_commit_and_needs_no_look(
        pg_dsn: str) -> None:
    """A session of the pool ended while its COMMIT was on its way (a lost commit, settled
    "unknown") may still commit once its backend runs again: its notification then comes from
    a PID no longer the pool's. It is a commit (readers sync), and a writer's: s46-attack's
    look at unknown notifiers took a pool session for it, and in
    test_writes_sent_to_a_backend_hung_alone_are_settled (under load) that look held the very
    session the test stopped next, so the next write went to a new session and succeeded."""
    from netboot.inventory.postgres import CHANNEL

    store = PostgresStore(pg_dsn)
    await store.open()
    try:
        await store.get_setting("k")
        conn = next(iter(store._sessions))
        pid = conn.get_server_pid()
        conn.terminate()
        await _within("the pool's session ended", lambda: pid not in store._own)
        before = store.commits
        store._notified(None, pid, CHANNEL, "")
        assert store.commits == before + 1
        assert store._looking is None or store._looking.done()
    finally:
        await store.close()
