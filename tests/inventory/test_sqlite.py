"""What only the SQLite store promises: durability, WAL, migrations, several processes, errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import netboot
from netboot.errors import Conflict, NotFound, StoreError
from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory import sqlite as sqlite_store
from netboot.inventory.base import Batch, MachineFilter
from netboot.inventory.sqlite import SCHEMA_VERSION, SqliteStore
from netboot.model import (
    Cluster,
    Event,
    Firmware,
    Group,
    Lease,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    Scope,
)
from tests.held_store import begun, held_writer, waiting, write_lock
from tests.inventory import test_contract as contract
from tests.killed import killed_after

MAC1 = "02:00:00:00:00:01"
REPO = Path(netboot.__file__).resolve().parent.parent


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A second, plain connection to the file, as another program would open it."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def worker_threads() -> int:
    return sum(t.name.startswith("netboot-sqlite") for t in threading.enumerate())


async def test_restart_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    m = Machine(macs=(MacAddress.parse(MAC1),), hostname="n1", labels={"r": "1"}, created=1.5)
    store = SqliteStore(path)
    await store.open()
    await store.create_machine(m)
    await store.put_profile(Profile(name="p", kernel="k"))
    await store.put_cluster(Cluster(name="c", token="t"))
    await store.put_group(Group(name="g", selector={"arch": ("arm64",)}))
    await store.add_event(Event(machine=m.id, time=2.0, kind="boot", data={"a": 1}))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=9.0))
    await store.put_setting("k", "v")
    await store.close()

    again = SqliteStore(str(path))  # str paths work too
    await again.open()
    try:
        assert await again.get_machine(m.id) == m
        assert await again.machine_by("mac", MAC1) == m
        assert await again.count_machines(MachineFilter(labels=(("r", "1"),))) == 1
        assert await again.get_profile("p") == Profile(name="p", kernel="k")
        assert await again.get_cluster("c") == Cluster(name="c", token="t")
        assert await again.get_group("g") == Group(name="g", selector={"arch": ("arm64",)})
        assert await again.list_events(m.id) == [
            Event(machine=m.id, time=2.0, kind="boot", data={"a": 1})
        ]
        assert await again.list_leases() == [Lease(mac=MAC1, ipv4="10.0.0.1", expires=9.0)]
        assert await again.get_setting("k") == "v"
    finally:
        await again.close()
    assert worker_threads() == 0


async def test_pragmas_wal_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert {"machines", "machine_labels", "profiles", "clusters", "groups"} <= names
    assert {"events", "leases", "settings", "machines_hostname", "events_machine",
            "machine_keys"} <= names
    # Migration 6: lookups by UUID or serial go through machine_keys, not the document.
    assert not {"machines_uuid", "machines_serial"} & names


async def test_connection_settings(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:

        def pragmas(conn: sqlite3.Connection) -> list[int]:
            names = ("busy_timeout", "foreign_keys", "synchronous")
            return [int(conn.execute(f"PRAGMA {p}").fetchone()[0]) for p in names]

        busy, fks, sync = await store._run(pragmas)
    finally:
        await store.close()
    assert busy == 5000 and fks == 1 and sync == 1  # 1 = NORMAL


async def test_reopen_is_a_no_op_migration(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    for _ in range(3):
        store = SqliteStore(path)
        await store.open()
        await store.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with raw(path) as conn:
        assert conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY name"
        ).fetchall() == (schema)


async def test_a_new_inventory_says_so_in_one_line_and_an_old_one_each_step(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A newcomer's first start printed "migrated schema to version 1" ... "7" (s36-user).
    caplog.set_level(logging.INFO, logger="netboot.inventory.sqlite")
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    told = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert told[0] == f"inventory {path}: created (schema version {SCHEMA_VERSION})"
    assert not any("migrated" in line for line in told), told
    # Session 10's (tests/data/inventory-s10, schema 6): each step it took is told.
    old = tmp_path / "old.db"
    shutil.copyfile(Path(__file__).parent.parent / "data" / "inventory-s10" / "netboot.db", old)
    caplog.clear()
    store = SqliteStore(old)
    await store.open()
    await store.close()
    assert [r.getMessage() for r in caplog.records if "schema" in r.getMessage()][:-1] == [
        f"inventory {old}: migrated schema to version {v}" for v in range(7, SCHEMA_VERSION + 1)]


async def test_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    with raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer = SqliteStore(path)
    with pytest.raises(StoreError, match=r"schema version \d+, newer than this netboot"):
        await newer.open()
    assert worker_threads() == 0  # a failed open leaves no thread behind
    with raw(path) as conn:  # and did not touch the file
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


async def test_failed_migration_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    broken = ("CREATE TABLE half_done (x)", "THIS IS NOT SQL")
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", (*sqlite_store.MIGRATIONS, broken))
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="migrate"):
        await SqliteStore(path).open()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names


async def test_corrupt_file_is_store_error(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    path.write_bytes(b"this is not an SQLite database, just garbage\n" * 200)
    store = SqliteStore(path)
    with pytest.raises(StoreError) as err:
        await store.open()
    assert not isinstance(err.value, NotFound)
    assert str(path) in str(err.value)
    assert worker_threads() == 0


async def test_missing_directory_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "no" / "such" / "dir.db").open()


async def test_broken_table_is_store_error_not_absent(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    try:
        with raw(path) as conn:
            conn.execute("DROP TABLE machine_labels")
            conn.execute("DROP TABLE machines")
        # A store failure is never "not found": not None, not NotFound.
        with pytest.raises(StoreError):
            await store.get_machine(MAC1)
        with pytest.raises(StoreError):
            await store.delete_machine(MAC1)
    finally:
        await store.close()


CHILD = """
import asyncio, sys
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Event, MacAddress, Machine

async def main(path, base):
    store = SqliteStore(path)
    await store.open()
    try:
        for i in range(200):
            mac = MacAddress((base + i).to_bytes(6, "big"))
            m = Machine(macs=(mac,), hostname=f"h{base + i}")
            await store.create_machine(m)
            await store.add_event(Event(machine=m.id, time=float(i), kind="created"))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_two_processes_write_one_database(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # Both open a file that does not exist yet, so they also race to create the schema.
    bases = (0x02_00_00_00_00_00, 0x02_00_00_01_00_00)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(path),
            str(base),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for base in bases
    ]
    results = [await asyncio.wait_for(p.communicate(), timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.count_machines() == 400
        last = await store.machine_by("mac", "02:00:00:01:00:c7")
        assert last is not None and len(await store.list_events(last.id)) == 1
    finally:
        await store.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 400


async def test_reads_do_not_queue_behind_a_write(tmp_path: Path) -> None:
    """A DHCP answer's lookup must not wait for a long write (a 100k-row import)."""
    from netboot.model import MacAddress, Machine

    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),)))
        gate = threading.Event()

        def long_write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
            gate.wait(20)  # bounded; released below as soon as the read has answered
            conn.execute("COMMIT")

        writer = asyncio.ensure_future(store._run(long_write))
        try:
            found = await asyncio.wait_for(store.machine_by("mac", "02:00:00:00:00:01"), 10)
            assert found is not None
            assert await store.get_setting("k") is None  # the open write is not visible yet
        finally:
            gate.set()
            await writer
        assert await store.get_setting("k") == "v"
    finally:
        await store.close()


def _version_2_file(path: Path) -> None:
    """A database as netboot wrote it when a machine was its MAC (schema version 2)."""
    from netboot.inventory.sqlite import MIGRATIONS

    def doc(mac: str, **kw: object) -> str:
        return json.dumps({"mac": mac, "state": "registered", "labels": {"rack": "r1"},
                           "facts": {}, "created": 1.0, "updated": 2.0, **kw})

    with raw(path) as conn:
        for steps in MIGRATIONS[:2]:
            for step in steps:
                assert isinstance(step, str)
                conn.execute(step)
        conn.execute("PRAGMA user_version = 2")
        rows = [
            (MAC1, "n1", doc(MAC1, hostname="n1", serial="SN-1", role="server", cluster="c")),
            # Placeholders that older versions learnt from firmware, shared by two machines.
            ("02:00:00:00:00:02", None, doc("02:00:00:00:00:02", serial="Default string")),
            ("02:00:00:00:00:03", None, doc("02:00:00:00:00:03", serial="Default string")),
            # A real serial two old records share: the first in MAC order keeps it.
            ("02:00:00:00:00:04", None, doc("02:00:00:00:00:04", serial="SN-1")),
        ]
        for mac, hostname, data in rows:
            conn.execute("INSERT INTO machines (mac, hostname, state, cluster, data, created,"
                         " updated) VALUES (?, ?, 'registered', NULL, ?, 1.0, 2.0)",
                         (mac, hostname, data))
            conn.execute("INSERT INTO machine_labels (mac, key, value) VALUES (?, 'rack', 'r1')",
                         (mac,))
        conn.execute("INSERT INTO events (mac, time, kind, message, data)"
                     " VALUES (?, 1.0, 'registered', '', '{}')", (MAC1,))
        conn.execute("INSERT INTO events (mac, time, kind, message, data)"
                     " VALUES ('02:00:00:00:00:99', 1.0, 'dhcp', '', '{}')")
        conn.execute("INSERT INTO settings (key, value) VALUES ('cluster-init/c', ?)", (MAC1,))


async def test_migration_gives_each_machine_an_id_and_its_mac_as_first_nic(
        tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _version_2_file(path)
    store = SqliteStore(path)
    await store.open()
    try:
        first = await store.machine_by("mac", MAC1)
        assert first is not None and first.id.startswith("m-")
        assert first.macs == (MacAddress.parse(MAC1),) and first.hostname == "n1"
        assert await store.get_machine(first.id) == first
        assert await store.machine_by("serial", "SN-1") == first
        assert [e.kind for e in await store.list_events(first.id)] == ["registered"]
        assert await store.get_setting("cluster-init/c") == first.id
        assert await store.count_machines(MachineFilter(labels=(("rack", "r1"),))) == 4
        # The placeholder is kept as it was but claims nothing; the shared real serial stays
        # with the first machine and is a fact of the other.
        two = await store.machine_by("mac", "02:00:00:00:00:02")
        assert two is not None and two.serial == "Default string"
        assert await store.machine_by("serial", "Default string") is None
        four = await store.machine_by("mac", "02:00:00:00:00:04")
        assert four is not None and four.serial is None and four.facts["serial"] == "SN-1"
    finally:
        await store.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert not {"machines_v2", "machine_labels_v2", "events_v3"} & names
        # The unknown device's event is kept under its MAC, as before.
        assert conn.execute("SELECT machine FROM events WHERE kind = 'dhcp'").fetchone()[0] \
            == "02:00:00:00:00:99"


async def test_migration_7_drops_the_state_index_and_keeps_every_machine(
        tmp_path: Path) -> None:
    """A file of schema version 6 (the (state, mac) index of every machine) opens at the
    current version with the rare states' partial index instead, every machine kept."""
    path = tmp_path / "old.db"
    store = SqliteStore(path)
    await store.open()
    states = list(MachineState)
    try:
        await store.apply_batch(Batch(create=[
            Machine(macs=(MacAddress((0x02_00_00_00_04_00 + i).to_bytes(6, "big")),),
                    state=states[i % len(states)], cluster=("a", None)[i % 2])
            for i in range(40)]))
        before = await store.list_machines(MachineFilter(limit=1000))
    finally:
        await store.close()
    with raw(path) as conn:  # as version 6 left it: the last steps (7, 8) undone
        for index in ("machines_fixed_ipv4", "machines_profile"):
            conn.execute(f"DROP INDEX {index}")
        for column in ("fixed_ipv4", "profile"):
            conn.execute(f"ALTER TABLE machines DROP COLUMN {column}")
        conn.execute("DROP INDEX machines_rare_states")
        conn.execute("CREATE INDEX machines_state ON machines (state, mac)")
        conn.execute("PRAGMA user_version = 6")
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.list_machines(MachineFilter(limit=1000)) == before
        for state in states:
            assert await store.list_machines(MachineFilter(state=state, limit=1000)) == [
                m for m in before if m.state == state]
    finally:
        await store.close()
    with raw(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'machines'")}
        assert "machines_state" not in indexes and "machines_rare_states" in indexes


def _plans(path: Path, run: Callable[[sqlite3.Connection], object]) -> list[str]:
    """The query plan of every statement ``run`` executes on a plain connection to ``path``
    (as the store's reader would run them, with their values bound)."""
    statements: list[str] = []
    with raw(path) as conn:
        conn.set_trace_callback(statements.append)
        run(conn)
        conn.set_trace_callback(None)
        return [" / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
                for sql in statements]


@pytest.mark.parametrize("state", list(MachineState))
async def test_only_the_rare_states_list_and_count_by_their_partial_index(
        tmp_path: Path, state: MachineState) -> None:
    """The discovered and failed machines (the discovery limit's load, the status' list of
    the failed) are read from the partial index, in its order (no sort); every other state
    has no index (a storm's transitions write none) and is a scan."""
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    flt = MachineFilter(state=state, limit=20, offset=5)
    listed = _plans(path, lambda conn: sqlite_store._list_machines(conn, flt))
    counted = _plans(path, lambda conn: sqlite_store._count_machines(conn, flt))
    grouped = _plans(path, sqlite_store._state_counts)
    if state in (MachineState.DISCOVERED, MachineState.FAILED):
        assert {MachineState.DISCOVERED, MachineState.FAILED} == sqlite_store.RARE_STATES
        assert listed == ["SEARCH m USING INDEX machines_rare_states (state=?)"]
        assert counted == ["SEARCH m USING COVERING INDEX machines_rare_states (state=?)"]
    else:
        assert all("machines_rare_states" not in plan for plan in listed + counted)
    assert grouped == ["SCAN machines / USE TEMP B-TREE FOR GROUP BY"]  # no look-ups


async def test_missing_directory_is_named_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        await SqliteStore(tmp_path / "no" / "such" / "dir.db").open()
    assert f"the directory {tmp_path / 'no' / 'such'} does not exist" in str(err.value)
    assert "server.data_dir" in str(err.value)


async def test_database_file_is_not_memory_mapped(tmp_path: Path) -> None:
    """A truncated or unreadable file must be an I/O error (a StoreError, a 503), not a
    SIGBUS that kills DHCP, TFTP, DNS and HTTP with it."""
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        def mmap_size(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA mmap_size").fetchone()[0])

        assert await store._run(mmap_size) == 0
        assert await store._read(mmap_size) == 0
    finally:
        await store.close()


async def test_the_view_load_pages_keep_a_small_page_cache(tmp_path: Path) -> None:
    # The pager's connection (machines_after: the view's load) reads every page once; its
    # cache is bounded at PAGER_CACHE_KIB, not SQLite's default 2,000 KiB held for good.
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MacAddress(bytes(6)),), hostname="a"))
        assert [m.hostname for m in await store.machines_after("", 10)] == ["a"]
        loop = asyncio.get_running_loop()

        def cache_size() -> int:
            return int(store._paged(lambda conn: conn.execute("PRAGMA cache_size").fetchone()[0]))

        assert await loop.run_in_executor(store._pager, cache_size) \
            == -sqlite_store.PAGER_CACHE_KIB
        assert await store._read(lambda conn: conn.execute("PRAGMA cache_size").fetchone()[0]) \
            == -2000  # the reader's is SQLite's default
    finally:
        await store.close()


def _sqlite_memory_used() -> int:
    """Bytes SQLite holds in this process (every connection), from the library the
    sqlite3 module is linked to."""
    import _sqlite3
    import ctypes

    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used())


async def test_release_caches_empties_each_connections_page_cache(tmp_path: Path) -> None:
    # The writer's, reader's and pager's page caches, filled by writing and reading ~2 MB
    # of machines, are given back by release_caches (issue 10's resident memory after a
    # storm), each on its own thread; the store reads and writes as before afterwards.
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        fleet = [Machine(macs=(MacAddress((0x02_00_00_10_00_00 + i).to_bytes(6, "big")),),
                         hostname=f"node-{i:05d}", serial=f"SN{i:07d}" + "x" * 400)
                 for i in range(3000)]
        await store.apply_batch(Batch(create=fleet))
        assert len(await store.list_machines(MachineFilter(limit=10_000))) == 3000
        assert len(await store.machines_after("", 10_000)) == 3000
        before = _sqlite_memory_used()
        await store.release_caches()
        after = _sqlite_memory_used()
        assert before - after > 2 * 1024 * 1024, (before, after)
        assert await store.get_machine(fleet[1234].id) == fleet[1234]
        added = Machine(macs=(MacAddress(bytes(6)),), hostname="after")
        await store.create_machine(added)
        assert await store.machine_by("mac", "00:00:00:00:00:00") == added
    finally:
        await store.close()
    await store.release_caches()  # closed: nothing to empty, no error


SHM_CHILD = """
import asyncio, os, sys
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine

async def main(path):
    store = SqliteStore(path)
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MacAddress(bytes(6)),), hostname="a"))
        for i in range(3):
            os.truncate(path + "-shm", 0)  # another program, or a disk cleaner
            assert await store.machine_by("mac", "00:00:00:00:00:00") is not None
            await store.create_machine(
                Machine(macs=(MacAddress(bytes([2, 0, 0, 0, 1, i])),), hostname=f"b{i}"))
        print("machines", len(await store.list_machines()))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1]))
"""


def test_truncated_shm_is_restored_not_a_sigbus(tmp_path: Path) -> None:
    """Touching a mapped -shm page past the file's end is a SIGBUS that kills every server
    in the process. The store restores the file's size before SQLite touches it (run in a
    child process, so that a regression kills the child, not the test run)."""
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", SHM_CHILD,
                          str(tmp_path / "inv.db")], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "machines 4" in out.stdout, out.stdout


async def test_cluster_written_before_endpoints_existed_reads_without_one(tmp_path: Path) -> None:
    """Clusters are JSON documents: a new optional field needs no schema migration, and a
    document from an older netboot (no "endpoint" key) reads back as "no endpoint"."""
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.put_cluster(Cluster(name="c", token="t", endpoint="vip.example"))
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE clusters SET data = ? WHERE name = 'c'",
                     ('{"name":"c","server_url":"managed","token":"t","labels":{},'
                      '"taints":[],"description":""}',))
    conn.close()
    again = SqliteStore(path)
    await again.open()
    try:
        assert await again.get_cluster("c") == Cluster(name="c", token="t")
    finally:
        await again.close()


# SQLite's "dead-man switch" lock on -shm: byte UNIX_SHM_BASE + SQLITE_SHM_NLOCK = 120 + 8
# (os_unix.c). A process that sees nobody holding it believes it is the first user of the
# database and truncates -shm, under every other process's mapping.
SHM_DMS_BYTE = 128

PROBE = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
want = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, int(sys.argv[2]), 1, 0)
kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, want))
print("unlocked" if kind == fcntl.F_UNLCK else pid)
"""


async def test_open_store_keeps_its_lock_on_the_wal_index(tmp_path: Path) -> None:
    """Reserving -shm must not drop this process's locks on it: closing any descriptor of a
    file releases all of a process's POSIX locks on that file, and a second netboot (or the
    CLI) would then truncate -shm and kill this one with SIGBUS."""
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MacAddress.parse(MAC1),)))
        shm = tmp_path / "inv.db-shm"
        out = subprocess.run([sys.executable, "-c", PROBE, str(shm), str(SHM_DMS_BYTE)],
                             capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == str(os.getpid())
    finally:
        await store.close()


async def test_the_admin_token_of_older_versions_becomes_a_named_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A database from before named tokens: its one admin token's hash sat in the settings.
    path = tmp_path / "inv.db"
    before = next(i for i, m in enumerate(sqlite_store.MIGRATIONS)
                  if any("api_tokens" in str(statement) for statement in m))
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:before])
        patch.setattr(sqlite_store, "SCHEMA_VERSION", before)
        old = SqliteStore(path)
        await old.open()
        await old.put_setting("admin-token-sha256", "f" * 64)
        await old.close()
    store = SqliteStore(path)
    await store.open()
    try:
        token = await store.token_by_hash("f" * 64)
        assert token is not None and (token.name, token.scope) == ("admin", Scope.ADMIN)
        assert token.created > 0 and token.expires is None
        assert await store.get_setting("admin-token-sha256") is None
    finally:
        await store.close()


async def test_an_update_of_the_document_only_leaves_indexed_rows_alone(tmp_path: Path) -> None:
    """A storm's updates (facts learnt, a token) change the document only: the identifier
    and label rows and the indexed columns are left as they are, not deleted and written
    again; an update that changes them rewrites exactly those, and reads follow."""
    from dataclasses import replace

    from netboot.model import MachineState

    path = tmp_path / "n.db"
    store = SqliteStore(path)
    await store.open()
    try:
        mac = MacAddress.parse("52:54:00:00:07:01")
        machine = Machine(macs=(mac,), hostname="a", serial="SN1", labels={"rack": "r1"})
        await store.create_machine(machine)
        watcher = sqlite3.connect(path)

        def rows() -> list[object]:
            """Identifier and label rows deleted (to be written again) since the start."""
            return watcher.execute("SELECT count(*) FROM writes").fetchall()

        watcher.executescript("""
            CREATE TABLE writes (what TEXT);
            CREATE TRIGGER keys_del AFTER DELETE ON machine_keys
                BEGIN INSERT INTO writes VALUES ('key'); END;
            CREATE TRIGGER labels_del AFTER DELETE ON machine_labels
                BEGIN INSERT INTO writes VALUES ('label'); END;
        """)
        learnt = replace(machine, facts={"platform": "efi"}, updated=5.0)
        await store.update_machine(learnt)
        assert rows() == [(0,)]
        assert await store.get_machine(machine.id) == learnt
        # Changed labels, identifiers and columns are written, and found by.
        other = MacAddress.parse("52:54:00:00:07:02")
        moved = replace(learnt, macs=(other,), hostname="b", serial="SN2",
                        labels={"rack": "r2"}, state=MachineState.INSTALLED)
        await store.update_machine(moved)
        assert await store.get_machine(machine.id) == moved
        assert await store.machine_by("mac", str(other)) == moved
        assert await store.machine_by("mac", str(mac)) is None
        assert await store.machine_by("serial", "SN2") == moved
        assert await store.machine_by("serial", "SN1") is None
        found = await store.list_machines(MachineFilter(labels=(("rack", "r2"),)))
        assert [m.id for m in found] == [machine.id]
        assert await store.list_machines(MachineFilter(labels=(("rack", "r1"),))) == []
        assert [m.id for m in await store.list_machines(
            MachineFilter(state=MachineState.INSTALLED))] == [machine.id]
        watcher.close()
    finally:
        await store.close()


async def test_an_install_update_sets_only_the_column_that_changed(tmp_path: Path) -> None:
    """An install changes a machine's state and document: the UPDATE names the state column
    alone, so that of the machine's indexes only the state's entries are rewritten (SQLite
    rewrites every index on a column named in SET, even to its own value), and the batch
    keeps no savepoint open (every page it modified was copied into a statement journal,
    a temporary file once past 64 KiB). A batch whose fast path fails is still written
    row by row, its compare-and-set checked again."""
    from dataclasses import replace

    from netboot.errors import Conflict, StateChanged
    from netboot.inventory.base import Batch
    from netboot.model import MachineState

    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        a = Machine(macs=(MacAddress.parse("52:54:00:00:08:01"),), hostname="a", cluster="c",
                    state=MachineState.ENROLLED)
        b = Machine(macs=(MacAddress.parse("52:54:00:00:08:02"),), hostname="b")
        await store.apply_batch(Batch(create=(a, b)))
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        installing = replace(a, state=MachineState.INSTALLING, token_hash="0" * 64,
                             facts={"arch": "x86_64"}, updated=9.0)
        await store.apply_batch(Batch(update=(installing,), expect={a.id: a.state},
                                      events=(Event(machine=a.id, time=9.0, kind="install"),)))
        # (The trace shows statements with their values bound, once per trigger program.)
        assert {s.split(", data = ")[0] for s in statements if s.startswith("UPDATE machines")
                } == {"UPDATE machines SET state = 'installing'"}
        assert not [s for s in statements if "SAVEPOINT" in s.upper()]
        assert await store.get_machine(a.id) == installing
        assert [m.id for m in await store.list_machines(
            MachineFilter(state=MachineState.INSTALLING))] == [a.id]
        # A fast path that fails (b takes a's MAC): the batch is refused as a whole, named.
        stolen = replace(b, macs=a.macs, updated=10.0)
        with pytest.raises(Conflict, match="52:54:00:00:08:01"):
            await store.apply_batch(Batch(update=(replace(installing, updated=10.0), stolen)))
        assert await store.get_machine(a.id) == installing
        assert await store.get_machine(b.id) == b
        # The replay checks the expectation again.
        with pytest.raises(StateChanged):
            await store.apply_batch(Batch(update=(stolen,), expect={a.id: a.state}))
        await store._run(lambda conn: conn.set_trace_callback(None))
    finally:
        await store.close()


async def test_a_group_of_updates_is_read_by_one_statement(tmp_path: Path) -> None:
    """A group commit's machines are read by one statement (their stored columns and the
    document's labels and identifiers, extracted by SQLite), not one per machine; only the
    one whose labels changed has its label rows written again, and only the one whose
    identifiers changed its identifier rows."""
    from dataclasses import replace

    from netboot.inventory.base import Batch
    from netboot.model import MachineState

    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        fleet = [Machine(macs=(MacAddress.parse(f"52:54:00:00:09:0{i}"),), hostname=f"g{i}",
                         serial=f"SN{i}", labels={"rack": "r1"}, state=MachineState.ENROLLED)
                 for i in range(4)]
        await store.apply_batch(Batch(create=fleet))
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        moved = [replace(fleet[0], state=MachineState.BOOTING, install_token="t", updated=9.0,
                     token_hash="ab" * 32, token_expires=1796453418.0505507, role=Role.AGENT,
                     firmware=Firmware.IPXE, facts={"install_peer": "127.0.0.1", "é": 'q"\\'}),
                 replace(fleet[1], labels={"rack": "r2"}, updated=9.0),
                 replace(fleet[2], serial="SN9", updated=9.0),
                 replace(fleet[3], hostname="h3", updated=9.0)]
        await store.apply_batch(Batch(update=moved, expect={fleet[0].id: MachineState.ENROLLED}))
        await store._run(lambda conn: conn.set_trace_callback(None))
        assert len([s for s in statements if s.startswith("SELECT id, mac")]) == 1
        assert [s for s in statements if s.startswith("DELETE FROM machine_labels")] == [
            f"DELETE FROM machine_labels WHERE machine = '{fleet[1].id}'"]
        assert [s for s in statements if s.startswith("DELETE FROM machine_keys")] == [
            f"DELETE FROM machine_keys WHERE machine = '{fleet[2].id}'"]
        for m in moved:
            assert await store.get_machine(m.id) == m
        assert await store.machine_by("serial", "SN9") == moved[2]
        assert await store.machine_by("serial", "SN2") is None
        assert [m.id for m in await store.list_machines(MachineFilter(labels=(("rack", "r2"),)))
                ] == [fleet[1].id]
    finally:
        await store.close()


async def test_identifiers_only_added_insert_only_their_rows(tmp_path: Path) -> None:
    """A first DHCP sighting learns a machine's UUID (or serial, asset tag): only the new
    rows are inserted, the group's in one statement; its MAC rows are not deleted and
    inserted again (most of the writer's work a first-seen DISCOVER, s34-keys). A machine
    whose identifiers changed still has its rows written again. The rows are those writing
    everything gives."""
    from netboot.inventory.base import Batch

    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        fleet = contract.keyed_fleet()
        await store.apply_batch(Batch(create=fleet))
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        uuid = contract.sighting_uuid
        seen = contract.sightings(fleet)
        await store.apply_batch(Batch(update=seen))
        await store._run(lambda conn: conn.set_trace_callback(None))
        assert [s for s in statements if s.startswith("DELETE FROM machine_keys")] == [
            f"DELETE FROM machine_keys WHERE machine = '{fleet[3].id}'"]
        inserted = [s.split("VALUES ")[1] for s in statements
                    if s.startswith("INSERT INTO machine_keys")]
        assert inserted == [f"('uuid', '{uuid(0)}', '{fleet[0].id}')",
                            f"('uuid', '{uuid(1)}', '{fleet[1].id}')",
                            f"('serial', 'SN1', '{fleet[1].id}')",
                            f"('mac', '52:54:00:00:0a:03', '{fleet[3].id}')",
                            f"('uuid', '{uuid(3)}', '{fleet[3].id}')",
                            f"('serial', 'SN9', '{fleet[3].id}')"]
        with raw(tmp_path / "n.db") as conn:
            assert sorted(conn.execute("SELECT machine, kind, value FROM machine_keys")) == sorted(
                (m.id, k, v) for m in seen for k, v in claims(m))
        await contract.assert_found(store, seen)
        assert await store.machine_by("serial", "SN3") is None
    finally:
        await store.close()


@pytest.mark.parametrize("case", ["held", "twice", "before", "after"])
async def test_an_added_identifier_another_machine_holds_is_refused_as_before(
        tmp_path: Path, case: str) -> None:
    """An identifier added (only) that another machine holds: the batch is refused as when
    every row was deleted and inserted, with the same error (MemoryStore's, the contract's),
    and nothing written; in a group, in the group's order: added before the machine
    holding it gives it up is refused, after is written. The key rows are the same either
    way."""
    from netboot.inventory.base import Batch
    from netboot.inventory.memory import MemoryStore

    x = "00000000-0000-4000-8000-0000000000aa"
    a, b, c = (Machine(macs=(MacAddress.parse(f"52:54:00:00:0b:0{i}"),), hostname=f"c{i}",
                       id=f"m-c{i}") for i in range(3))
    b = replace(b, uuid=x)
    a_adds = replace(a, uuid=x, updated=9.0)
    c_adds = replace(c, uuid=x, updated=9.0)
    b_gives = replace(b, uuid=None, updated=9.0)
    updates = {"held": [c_adds, a_adds], "twice": [replace(b_gives, serial="S"), a_adds,
                                                   c_adds],
               "before": [a_adds, b_gives], "after": [b_gives, a_adds]}[case]

    async def outcome(store: Any) -> tuple[object, ...]:
        await store.open()
        try:
            await store.apply_batch(Batch(create=(a, b, c)))
            try:
                await store.apply_batch(Batch(update=updates))
                error = None
            except Conflict as e:
                error = (str(e), e.field, e.holder)
            machines = [await store.get_machine(m.id) for m in (a, b, c)]
            owner = await store.machine_by("uuid", x)
            return error, machines, None if owner is None else owner.id
        finally:
            await store.close()

    got = await outcome(SqliteStore(tmp_path / "n.db"))
    assert got == await outcome(MemoryStore())
    assert (got[0] is None) == (case == "after")
    with raw(tmp_path / "n.db") as conn:
        assert sorted(conn.execute("SELECT machine, kind, value FROM machine_keys")) == sorted(
            (m.id, k, v) for m in got[1] for k, v in claims(m))


@pytest.mark.parametrize("bad", [0, 2, 4])  # which of the contract's bad rows: mac, serial, ipv4
async def test_bulk_batch_in_chunks_all_or_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   bad: int) -> None:
    # A bulk batch is staged BULK_CHUNK machines at a time: a bad row in a later chunk still
    # undoes the earlier ones, is named as with one chunk, and a good batch reads back.
    monkeypatch.setattr(sqlite_store, "BULK_CHUNK", 128)
    store = SqliteStore(tmp_path / "chunks.db")
    await store.open()
    try:
        cases = [(m, text) for (m, text) in (
            (Machine(macs=(MacAddress.parse(contract.MAC1),), hostname="fresh"),
             "mac 02:00:00:00:00:01"),
            (contract.machine(contract.mac(5000), serial="S-1"), "serial S-1"),
            (contract.machine(contract.mac(5001), hostname="EXISTING"), "hostname 'EXISTING'"),
            (contract.machine(contract.mac(5002), serial="S7"), "serial S7"),
            (contract.machine(contract.mac(5003), fixed_ipv4="999.1.1.1"), "not an IPv4"),
        )]
        await contract.test_bulk_batch_all_or_nothing(store, *cases[bad])
        await store.delete_machine(contract.mid(contract.MAC1))
        await contract.test_bulk_batch_reads_back_by_every_identifier(store)
        with raw(tmp_path / "chunks.db") as conn:
            assert conn.execute("SELECT count(*) FROM machine_keys").fetchone()[0] == sum(
                len(claims(m)) for m in contract.bulk_rows())
    finally:
        await store.close()


async def test_a_bulk_import_commits_without_its_checkpoint_which_follows_on_its_own_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The import's commit leaves its pages in the WAL (another connection reads them there);
    # the checkpoint runs afterwards on a thread of its own and leaves nothing behind, and the
    # writer's settings are back to its own for the commits that follow (no autocheckpoint
    # inside a commit: the store's, after it, test_checkpoints_follow_the_commits).
    path = tmp_path / "bulk.db"
    store = SqliteStore(path)
    await store.open()
    later: list[None] = []
    checkpoint_soon = store._checkpoint_soon
    monkeypatch.setattr(store, "_checkpoint_soon", lambda: later.append(None))
    try:
        rows = contract.bulk_rows()
        assert len(rows) >= sqlite_store.BULK_ROWS
        await store.apply_batch(Batch(create=rows))
        assert later == [None]
        wal = path.with_name(path.name + "-wal")
        assert os.path.getsize(wal) > os.path.getsize(path)  # not copied into the file yet
        with raw(path) as conn:
            assert conn.execute("SELECT count(*) FROM machines").fetchone()[0] == len(rows)
        assert await store._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        checkpoint_soon()
        assert store._checkpointer is not None
        await asyncio.get_running_loop().run_in_executor(store._checkpointer, lambda: None)
        with raw(path) as conn:
            busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, copied) == (0, frames) and frames > 0
        # A small batch afterwards commits (and checkpoints) as before; close ends the thread.
        await store.create_machine(contract.machine(contract.mac(9999)))
        assert later == [None]
    finally:
        await store.close()
    assert store._checkpointer is None
    with raw(path) as conn:
        assert conn.execute("SELECT count(*) FROM machines").fetchone()[0] == len(rows) + 1


async def test_a_failed_bulk_import_schedules_no_checkpoint(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "bulk.db")
    await store.open()
    try:
        rows = contract.bulk_rows()
        rows[-1] = replace(rows[-1], macs=rows[0].macs)  # a MAC twice: all or nothing
        with pytest.raises(Conflict):
            await store.apply_batch(Batch(create=rows))
        assert store._checkpointer is None
        assert await store.count_machines() == 0
        assert await store._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    finally:
        await store.close()


async def test_machines_listed_together_share_their_equal_label_sets(tmp_path: Path) -> None:
    # A re-import reads every machine to compare with: equal label sets are one mapping.
    store = SqliteStore(tmp_path / "labels.db")
    await store.open()
    try:
        for i in range(4):
            await store.create_machine(Machine(
                macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
                labels={"rack": f"r{i % 2}"}))
        listed = await store.list_machines(MachineFilter(limit=10))
        assert [m.labels for m in listed] == [{"rack": "r0"}, {"rack": "r1"}] * 2
        assert listed[0].labels is listed[2].labels and listed[1].labels is listed[3].labels
    finally:
        await store.close()


# Each machine of the property below draws its identifiers and hostname from its own pool
# (no two can conflict); raw spellings that claim alike (" A1 " and "A1"), placeholders that
# claim nothing, and labels that move between keys and values.
_POOL: dict[str, Callable[[int], st.SearchStrategy[Any]]] = {
    "macs": lambda i: st.lists(st.sampled_from([f"02:00:00:00:0{i}:0{n}" for n in range(4)]),
                               min_size=0, max_size=3, unique=True),
    "uuid": lambda i: st.sampled_from([None, f"0000000{i}-0000-4000-8000-000000000001",
                                       "00000000-0000-0000-0000-000000000000"]),
    "serial": lambda i: st.sampled_from([None, f"SN{i}", f" SN{i} ", "To be filled by O.E.M."]),
    "asset": lambda i: st.sampled_from([None, f"A{i}", f"A{i}b"]),
    "hostname": lambda i: st.sampled_from([None, f"h{i}", f"H{i}"]),
    "labels": lambda i: st.dictionaries(st.sampled_from(["rack", "site", "a.b"]),
                                        st.sampled_from(["1", "2", "rack"]), max_size=3),
    "facts": lambda i: st.dictionaries(st.sampled_from(["arch", "k"]), st.sampled_from(["x"]),
                                       max_size=1),
    "state": lambda i: st.sampled_from(list(netboot.model.MachineState)),
    "cluster": lambda i: st.sampled_from([None, "c1", "c2"]),
}


@st.composite
def _change(draw: st.DrawFn, i: int) -> dict[str, object]:
    fields = draw(st.sets(st.sampled_from(sorted(_POOL)), max_size=len(_POOL)))
    return {f: draw(_POOL[f](i)) for f in sorted(fields)}


@settings(max_examples=40)
@given(st.data())
def test_updates_write_what_changed_and_read_back_exactly(tmp_path_factory: pytest.TempPathFactory,
                                                          data: st.DataObject) -> None:
    """Updates that write only the columns, labels and identifiers that changed (compared
    with the stored row and document) leave the file exactly as writing everything would:
    every machine reads back as written, by id and by each identifier it claims (and by
    none it gave up), and its label, identifier and indexed-column rows are its own. Also
    when a machine is updated twice in one batch, and when its stored document was written
    in machine_to_dict's long form (by an older netboot)."""
    path = tmp_path_factory.mktemp("prop") / "n.db"

    def machine(i: int, change: dict[str, object]) -> Machine:
        fields = dict(change)
        fields["macs"] = tuple(MacAddress.parse(m) for m in fields.get("macs", ()))  # type: ignore[attr-defined]
        return Machine(id=f"m-prop{i}", **fields)  # type: ignore[arg-type]

    async def run() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            now = [machine(i, data.draw(_change(i))) for i in range(3)]
            await store.apply_batch(Batch(create=now))
            for step in range(data.draw(st.integers(1, 4))):
                if data.draw(st.booleans()):  # an older netboot rewrote one, long form
                    old = now[data.draw(st.integers(0, 2))]
                    with raw(path) as conn:
                        conn.execute("UPDATE machines SET data = ? WHERE id = ?",
                                     (json.dumps(codec.machine_to_dict(old)), old.id))
                picked = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=4))
                updates = []
                for i in picked:
                    drawn = machine(i, data.draw(_change(i)))
                    now[i] = replace(now[i], **{
                        **{k: getattr(drawn, k)
                           for k in data.draw(st.sets(st.sampled_from(sorted(_POOL))))},
                        "updated": float(step + 1)})
                    updates.append(now[i])
                if len(set(picked)) < len(picked) and data.draw(st.booleans()):
                    for u in updates:  # the same updates one batch each
                        await store.apply_batch(Batch(update=(u,)))
                else:
                    await store.apply_batch(Batch(update=updates))
                await contract.assert_found(store, now)
                with raw(path) as conn:
                    assert sorted(conn.execute("SELECT machine, key, value FROM machine_labels")
                                  ) == sorted((m.id, k, v) for m in now
                                              for k, v in m.labels.items())
                    assert sorted(conn.execute("SELECT machine, kind, value FROM machine_keys")
                                  ) == sorted((m.id, k, v) for m in now for k, v in claims(m))
                    assert sorted(conn.execute(
                        "SELECT id, mac, hostname, state, cluster FROM machines")) == sorted(
                        (m.id, str(m.macs[0]) if m.macs else None, m.hostname, m.state.value,
                         m.cluster) for m in now)
                    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            await store.close()

    asyncio.run(run())


# What an update changes of a machine it was made from (Batch.bases), for the property
# below: every field machine_delta writes, set, changed and back at its default.
_DELTA_POOL: dict[str, st.SearchStrategy[Any]] = {
    "state": st.sampled_from(list(netboot.model.MachineState)),
    "hostname": st.sampled_from([None, "h", "H2"]),
    "cluster": st.sampled_from([None, "c1", 'c"\\2']),
    "profile": st.sampled_from([None, "p", "p\n\u00e9\U0001f600\x7f\x01"]),
    "role": st.sampled_from([None, *Role]),
    "loader": st.sampled_from([None, *netboot.model.LoaderChain]),
    "arch": st.sampled_from([None, *netboot.model.Arch]),
    "firmware": st.sampled_from([None, *Firmware]),
    "ipv4": st.sampled_from([None, "192.0.2.1", "192.0.2.2"]),
    "fixed_ipv4": st.sampled_from([None, "198.51.100.7"]),
    "facts": st.dictionaries(st.sampled_from(["arch", "install_peer", "k\"", "a.b"]),
                             st.sampled_from(["x", "127.0.0.1", "\u00e9\t"]), max_size=3),
    "token_hash": st.sampled_from([None, "ab" * 32]),
    "install_token": st.sampled_from([None, "tok-1", "tok-2"]),
    "token_expires": st.sampled_from([None, 1.5, 1764960000.1234567 + 3600]),
    "labels": st.sampled_from([{}, {"rack": "1"}]),
    "serial": st.sampled_from([None, "SN", "To be filled by O.E.M."]),
    # (Each machine's own, made in change(): "u1"/"u2" two UUIDs, the other a placeholder.)
    "uuid": st.sampled_from([None, "u1", "u2", "ffffffff-ffff-ffff-ffff-ffffffffffff"]),
    "asset": st.sampled_from([None, "AT"]),
    # "updated": the update's own time (a state change, lifecycle.advance: the same float),
    # "equal": an equal float of its own (the same value read back); both set from the
    # update time's parameter (codec.SINCE_UPDATED), the others written as their own.
    "state_since": st.sampled_from([None, 1764900000.75, "updated", "equal"]),
}


@settings(max_examples=40)
@given(st.data())
def test_updates_from_their_bases_read_back_exactly(tmp_path_factory: pytest.TempPathFactory,
                                                   data: st.DataObject) -> None:
    """Updates given the machine they were made from (Batch.bases) change the stored
    document in place (only what changed, SQLite's json_set and json_remove), and leave a
    document that reads back as the machine written, its facts in their order: as the
    whole document would, which it is as a JSON value when the stored one was this
    netboot's (the fields at their defaults left out). Also when it was written in
    machine_to_dict's long form (an older netboot), with install tokens sealed, when
    identifiers are added (a UUID, placeholder or not, a serial, an asset tag: their rows
    inserted) and when identifiers or labels change (the whole document written then), and
    with ``state_since`` absent, its own time, or the update's (set from the update time's
    parameter): the identifier rows are the machines' claims after each step."""
    from netboot.sealing import Sealer

    path = tmp_path_factory.mktemp("delta") / "n.db"
    sealed = data.draw(st.booleans())

    def change(i: int, stamp: float) -> dict[str, Any]:
        drawn = data.draw(st.fixed_dictionaries({}, optional=_DELTA_POOL))
        if drawn.get("state_since") in ("updated", "equal"):
            drawn["state_since"] = (stamp if drawn["state_since"] == "updated"
                                    else float(repr(stamp)))
        for key in ("hostname", "serial", "asset"):  # each machine's own (no two conflict)
            if drawn.get(key) is not None and not drawn[key].startswith("To be"):
                drawn[key] += f"-{i}"
        if drawn.get("uuid") in ("u1", "u2"):
            drawn["uuid"] = f"4c4c4544-0000-4000-8000-0000000000{drawn['uuid'][1]}{i}"
        if drawn.get("fixed_ipv4") is not None:  # each its own: the store refuses one twice
            drawn["fixed_ipv4"] = f"198.51.100.{7 + i}"
        return drawn

    async def run() -> None:
        store = SqliteStore(path, sealer=Sealer.generate() if sealed else None)
        await store.open()
        try:
            t0 = 1764900000.25
            now = [Machine(macs=(MacAddress.parse(f"02:00:00:00:00:0{i}"),), id=f"m-d{i}",
                           created=t0, updated=t0, **change(i, t0))
                   for i in range(2)]
            await store.apply_batch(Batch(create=now))
            now = [m for m in [await store.get_machine(m.id) for m in now] if m is not None]
            long_form: set[str] = set()
            for step in range(data.draw(st.integers(1, 3))):
                if data.draw(st.booleans()):  # an older netboot rewrote one, long form
                    old = now[data.draw(st.integers(0, 1))]
                    long_form.add(old.id)
                    with raw(path) as conn:
                        doc = codec.machine_to_dict(old)
                        doc["install_token"] = json.loads(conn.execute(
                            "SELECT data FROM machines WHERE id = ?", (old.id,)).fetchone()[0]
                            ).get("install_token")
                        conn.execute("UPDATE machines SET data = ? WHERE id = ?",
                                     (json.dumps(doc), old.id))
                picked = sorted(data.draw(st.sets(st.integers(0, 1), min_size=1)))
                bases = {now[i].id: now[i] for i in picked}
                for i in picked:
                    stamp = 1764960000.1234567 + step
                    now[i] = replace(now[i], **change(i, stamp), updated=stamp)
                await store.apply_batch(Batch(
                    update=[now[i] for i in picked], versions={
                        i: b.updated for i, b in bases.items()}, bases=bases))
                for m in now:
                    read = await store.get_machine(m.id)
                    assert read == m
                    assert read is not None and list(read.facts) == list(m.facts)
                    with raw(path) as conn:
                        text = conn.execute("SELECT data FROM machines WHERE id = ?",
                                            (m.id,)).fetchone()[0]
                    if not sealed and m.id not in long_form:
                        assert json.loads(text) == codec.machine_document(m)
                    if sealed and m.install_token is not None:
                        assert m.install_token not in text
                for m in now:
                    for kind, value in claims(m):
                        assert await store.machine_by(kind, value) == m
                with raw(path) as conn:
                    assert sorted(conn.execute("SELECT machine, kind, value FROM machine_keys")
                                  ) == sorted((m.id, k, v) for m in now for k, v in claims(m))
                    assert sorted(conn.execute(
                        "SELECT id, mac, hostname, state, cluster, updated FROM machines")
                    ) == sorted((m.id, str(m.macs[0]), m.hostname, m.state.value, m.cluster,
                                 m.updated) for m in now)
                    assert sorted(conn.execute("SELECT machine, key, value FROM machine_labels")
                                  ) == sorted((m.id, k, v) for m in now
                                              for k, v in m.labels.items())
        finally:
            await store.close()

    asyncio.run(run())


async def test_a_first_install_changes_the_stored_document_in_place(tmp_path: Path) -> None:
    """A first install given the machine it was made from (Batch.bases, as boot.py writes
    it) is one UPDATE setting the state and changing only what changed in the document: no
    whole document bound, the claims not compared (nothing of them changed), the token
    sealed; it reads back as written, and its config fetch likewise."""
    from netboot.sealing import Sealer

    store = SqliteStore(tmp_path / "n.db", sealer=Sealer.generate())
    await store.open()
    try:
        m = Machine(macs=(MacAddress.parse(MAC1),), hostname="n1", labels={"rack": "r1"},
                    facts={"manufacturer": "QEMU", "install_peer": "192.0.2.9"},
                    profile="k3os", created=1764900000.5, updated=1764900000.5)
        await store.apply_batch(Batch(create=(m,)))
        read = await store.get_machine(m.id)
        assert read is not None
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        now = 1764960000.0137
        facts = {"manufacturer": "QEMU", "arch": "x86_64", "install_peer": "127.0.0.1"}
        installed = replace(read, state=MachineState.BOOTING, token_hash="cd" * 32,
                            install_token="secret-token", token_expires=now + 3600,
                            facts=facts, updated=now, state_since=now, cluster="c0",
                            role=Role.AGENT)
        await store.apply_batch(Batch(update=(installed,), expect={m.id: read.state},
                                      versions={m.id: read.updated}, bases={m.id: read}))
        # As lifecycle.advance stamps a state change: one float for both times.
        later = now + 61.5
        fetched = replace(installed, state=MachineState.INSTALLING, updated=later,
                          state_since=later)
        await store.apply_batch(Batch(update=(fetched,), expect={m.id: installed.state},
                                      versions={m.id: installed.updated},
                                      bases={m.id: installed}))
        await store._run(lambda conn: conn.set_trace_callback(None))
        # (Each statement traced once more for each trigger it runs: the change feed's.)
        updates = list(dict.fromkeys(s for s in statements if s.startswith("UPDATE machines")))
        assert len(updates) == 2
        assert "json_set(data, '$.state', 'booting'" in updates[0]
        assert "'$.install_token', 'nbs1:" in updates[0]
        assert "'$.facts', json('" in updates[0] and "cluster = 'c0'" in updates[0]
        assert "secret-token" not in updates[0]
        # state_since from the update time's parameter, after it (codec.SINCE_UPDATED): the
        # install plan's numbered after its indexed columns (state, cluster), the config
        # fetch's after its state.
        assert ("'$.updated', json('1764960000.0137'), '$.state_since', "
                "json('1764960000.0137'))" in updates[0])
        assert updates[1].startswith("UPDATE machines SET state = 'installing', data = "
                                     "json_set(data, '$.state', 'installing', '$.updated', "
                                     "json('1764960061.5137'), '$.state_since', "
                                     "json('1764960061.5137'))")
        delta = codec.machine_delta(installed, fetched)
        assert delta is not None and delta[0] == ("state", "updated", codec.SINCE_UPDATED)
        assert delta[2] == ["installing", "1764960061.5137"]  # the time's text bound once
        assert not any("machine_keys" in s or "machine_labels" in s for s in statements)
        assert await store.get_machine(m.id) == fetched
        with raw(tmp_path / "n.db") as conn:
            text = conn.execute("SELECT data FROM machines").fetchone()[0]
        doc = json.loads(text)
        assert doc.pop("install_token").startswith("nbs1:")
        expected = codec.machine_document(fetched)
        del expected["install_token"]
        assert doc == expected
    finally:
        await store.close()


def test_an_in_place_updates_parameters_are_numbered_as_its_values_are_given() -> None:
    """The UPDATE of a first install binds the state once, for its column and the document
    (``?1``), a FACTS_NEW key one value a name, and the update time's parameter named again
    for ``state_since`` by its number (codec.SINCE_UPDATED) counted past both."""
    facts = codec.FACTS_NEW + "remote_addr,install_peer"
    keys = ("state", "token_hash", facts, "token_expires", "updated", codec.SINCE_UPDATED)
    assert sqlite_store._update_in_place(("state",), keys, (), True) == (
        "UPDATE machines SET state = ?, data = json_set(data, '$.state', ?1, '$.token_hash', ?,"
        " '$.facts', json_object('remote_addr', ?, 'install_peer', ?), '$.token_expires',"
        " json(?), '$.updated', json(?), '$.state_since', json(?6)), updated = ? WHERE id = ?"
        " AND updated = ? AND state = ?")
    # Another indexed column set too: the state bound twice, as the columns' come first.
    assert sqlite_store._update_in_place(("state", "cluster"), keys, ("role",), False) == (
        "UPDATE machines SET state = ?, cluster = ?, data = json_remove(json_set(data,"
        " '$.state', ?, '$.token_hash', ?, '$.facts', json_object('remote_addr', ?,"
        " 'install_peer', ?), '$.token_expires', json(?), '$.updated', json(?),"
        " '$.state_since', json(?8)), '$.role'), updated = ? WHERE id = ?")


@pytest.mark.parametrize("stored", ["no facts", "facts", "long form"])
async def test_a_first_installs_facts_are_bound_and_leave_the_document_byte_for_byte(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str) -> None:
    """A first install's facts (all new, or new ones after the stored ones) are set by
    SQLite's JSON functions from their bound strings (codec.FACTS_NEW, FACTS_ADDED; its
    state bound once for the column and the document), not quoted and joined on the
    writer: and the document left is the same text, byte for byte, as the whole facts' JSON
    written in place leaves (what an S43 netboot writes, forced here by knowing no fact
    name), from a document of this netboot's or of an older one's long form (its facts
    {}), with values that JSON escapes (a quote, a backslash, control characters,
    U+2028, an emoji)."""
    odd = 'q"\\\n\x01\x7f\u2028\U0001f600'
    old_facts = {} if stored != "facts" else {"manufacturer": "QEMU", "product": odd}
    new_facts = {**old_facts, "remote_addr": "192.0.2.7", "install_peer": odd}

    async def installed(path: Path, bound: bool) -> tuple[str, list[str]]:
        with monkeypatch.context() as patch:
            if not bound:
                patch.setattr(codec, "_FACT_KEYS", frozenset())
            store = SqliteStore(path)
            await store.open()
            statements: list[str] = []
            try:
                m = Machine(macs=(MacAddress.parse(MAC1),), id="m-0123456789ab", hostname="n1",
                            facts=old_facts,
                            profile="k3os", created=1764900000.5, updated=1764900000.5)
                await store.apply_batch(Batch(create=(m,)))
                if stored.startswith("long form"):  # an older netboot's document
                    doc = codec.machine_to_dict(m)
                    assert doc["facts"] == {}
                    with raw(path) as conn:
                        conn.execute("UPDATE machines SET data = ?", (json.dumps(doc),))
                read = await store.get_machine(m.id)
                assert read is not None
                await store._run(lambda conn: conn.set_trace_callback(statements.append))
                now = 1764960000.0137
                new = replace(read, state=MachineState.BOOTING, token_hash="cd" * 32,
                              install_token="tok", token_expires=now + 3600, facts=new_facts,
                              updated=now, state_since=now)
                await store.apply_batch(Batch(update=(new,), expect={m.id: read.state},
                                              versions={m.id: read.updated},
                                              bases={m.id: read}))
                await store._run(lambda conn: conn.set_trace_callback(None))
                assert await store.get_machine(m.id) == new
            finally:
                await store.close()
            with raw(path) as conn:
                text = conn.execute("SELECT data FROM machines").fetchone()[0]
            return text, [s for s in statements if s.startswith("UPDATE machines")]

    text, updates = await installed(tmp_path / "bound.db", True)
    whole, whole_updates = await installed(tmp_path / "whole.db", False)
    assert text == whole
    assert "'$.facts', json('" in whole_updates[0]
    assert "'$.facts', json(" not in updates[0]
    assert ("'$.facts', json_object('remote_addr', '192.0.2.7', 'install_peer', "
            if stored != "facts" else
            "'$.facts.remote_addr', '192.0.2.7', '$.facts.install_peer', ") in updates[0]
    assert updates[0].startswith("UPDATE machines SET state = 'booting', data = json_set("
                                 "data, '$.state', 'booting', ")


@pytest.mark.parametrize("case", ["older base", "twice", "with a create"])
async def test_an_update_whose_base_cannot_be_changed_in_place_is_written_whole(
        tmp_path: Path, case: str) -> None:
    """A base that is not the version the update's compare-and-set reads (an older one), a
    machine updated twice in the batch (its second base is not what the first left), a batch
    that creates machines: the whole document is written, as without a base, and reads back
    as written."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        m = Machine(macs=(MacAddress.parse(MAC1),), hostname="n1", profile="p1", updated=1.0)
        await store.apply_batch(Batch(create=(m,)))
        second = replace(m, profile="p2", cluster="c2", updated=2.0)
        await store.apply_batch(Batch(update=(second,)))
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        last = replace(second, state=MachineState.BOOTING, updated=3.0)
        other = Machine(macs=(MacAddress.parse("02:00:00:00:00:02"),))
        if case == "older base":  # made from the first version, checked on the second's
            batch = Batch(update=(last,), versions={m.id: second.updated}, bases={m.id: m})
        elif case == "twice":
            first = replace(second, hostname="n9", updated=2.5)
            batch = Batch(update=(first, last), versions={m.id: second.updated},
                          bases={m.id: second})
        else:
            batch = Batch(create=(other,), update=(last,), versions={m.id: second.updated},
                          bases={m.id: second})
        await store.apply_batch(batch)
        await store._run(lambda conn: conn.set_trace_callback(None))
        assert not any("json_set" in s for s in statements)
        assert await store.get_machine(m.id) == last
    finally:
        await store.close()


_UUID1 = "4c4c4544-0042-3910-8056-b4c04f4b3632"


@pytest.mark.parametrize("learnt", [
    {"uuid": _UUID1},
    {"serial": "SN-1", "asset": "AT-1"},
    {"uuid": _UUID1, "serial": "SN-1", "asset": "AT-1"},
    {"uuid": "00000000-0000-0000-0000-000000000000", "serial": "To be filled by O.E.M."},
])
async def test_identifiers_learnt_change_the_stored_document_in_place(
        tmp_path: Path, learnt: dict[str, str]) -> None:
    """A first DHCP sighting learns a UUID (option 97) and facts: given the machine it was
    made from (Batch.bases, as the recorder writes it), the update is one UPDATE setting the
    changed keys by json_set and an INSERT of the new identifiers' rows only (a
    placeholder: none), no delete of the stored ones; the document reads back as the whole
    write's (the same JSON value), and the machine is found by each identifier."""
    async def write(path: Path, with_bases: bool) -> tuple[list[str], Machine, str, list[Any]]:
        store = SqliteStore(path)
        await store.open()
        try:
            m = Machine(macs=(MacAddress.parse(MAC1),), id="m-learn", hostname="n1",
                        labels={"rack": "r1"}, profile="k3os", created=1764900000.5,
                        updated=1764900000.5)
            other = Machine(macs=(MacAddress.parse("02:00:00:00:00:02"),), id="m-other",
                            uuid="4c4c4544-0042-3910-8056-b4c04f4b3699")
            await store.apply_batch(Batch(create=(m, other)))
            read = await store.get_machine(m.id)
            assert read is not None
            statements: list[str] = []
            await store._run(lambda conn: conn.set_trace_callback(statements.append))
            new = replace(read, **learnt, facts={"manufacturer": "QEMU", "arch": "x86_64"},
                          updated=1764960000.0137)
            await store.apply_batch(Batch(update=(new,), versions={m.id: read.updated},
                                          bases={m.id: read} if with_bases else {}))
            await store._run(lambda conn: conn.set_trace_callback(None))
            assert await store.get_machine(m.id) == new
            for kind, value in claims(new):
                assert await store.machine_by(kind, value) == new
            with raw(path) as conn:
                text = conn.execute("SELECT data FROM machines WHERE id = ?",
                                    (m.id,)).fetchone()[0]
                keys = sorted(conn.execute("SELECT machine, kind, value FROM machine_keys"))
            return statements, new, text, keys
        finally:
            await store.close()

    statements, new, text, keys = await write(tmp_path / "a.db", True)
    _, _, whole_text, whole_keys = await write(tmp_path / "b.db", False)
    # (Each statement traced once more for each trigger it runs: the change feed's.)
    updates = list(dict.fromkeys(s for s in statements if s.startswith("UPDATE machines")))
    assert len(updates) == 1 and updates[0].startswith("UPDATE machines SET data = json_set(")
    for key, value in learnt.items():
        assert f"'$.{key}', '{value}'" in updates[0]
    inserted = [s for s in statements if "machine_keys" in s]
    assert sorted(inserted) == sorted(
        f"INSERT INTO machine_keys (kind, value, machine) VALUES ('{kind}', '{value}',"
        f" 'm-learn')" for kind, value in claims(new) if kind != "mac")
    assert not any("machine_labels" in s for s in statements)
    assert json.loads(text) == json.loads(whole_text) == codec.machine_document(new)
    assert keys == whole_keys == sorted(
        [("m-learn", k, v) for k, v in claims(new)]
        + [("m-other", "mac", "02:00:00:00:00:02"),
           ("m-other", "uuid", "4c4c4544-0042-3910-8056-b4c04f4b3699")])


@pytest.mark.parametrize("case", ["held by another", "two of the group", "a mixed group",
                                  "serial held"])
async def test_an_identifier_added_in_place_that_another_machine_holds_is_refused_as_whole(
        tmp_path: Path, case: str) -> None:
    """An identifier added in place (codec.machine_delta) that another machine holds, or
    that another machine of the group adds first, refuses the batch with the error the
    whole write gives (type, words, field, holder) and writes nothing of it."""
    taken = "4c4c4544-0042-3910-8056-b4c04f4b3699"

    async def outcome(path: Path, with_bases: bool) -> tuple[Any, ...]:
        store = SqliteStore(path)
        await store.open()
        try:
            fleet = [Machine(macs=(MacAddress.parse(f"02:00:00:00:00:0{i}"),), id=f"m-k{i}",
                             updated=1.0) for i in range(3)]
            holder = Machine(macs=(MacAddress.parse("02:00:00:00:00:09"),), id="m-holder",
                             uuid=taken, serial="SN-H")
            await store.apply_batch(Batch(create=(*fleet, holder)))
            read = [m for m in [await store.get_machine(m.id) for m in fleet] if m]
            new = [replace(m, facts={"manufacturer": "QEMU"}, updated=2.0,
                           uuid=f"4c4c4544-0042-3910-8056-b4c04f4b363{i}") for i, m in
                   enumerate(read)]
            if case == "held by another":
                new[1] = replace(new[1], uuid=taken)
            elif case == "two of the group":
                new[2] = replace(new[2], uuid=new[0].uuid)
            elif case == "a mixed group":  # one written whole (a label changed), one taken
                new[0] = replace(new[0], labels={"rack": "1"})
                new[2] = replace(new[2], uuid=taken)
            else:
                new[1] = replace(new[1], serial="SN-H")
            statements: list[str] = []
            await store._run(lambda conn: conn.set_trace_callback(statements.append))
            with pytest.raises(Conflict) as refused:
                await store.apply_batch(Batch(
                    update=new, versions={m.id: m.updated for m in read},
                    bases={m.id: m for m in read} if with_bases else {}))
            await store._run(lambda conn: conn.set_trace_callback(None))
            # Tried in place first (with bases), then replayed row by row to name it.
            assert any("json_set(data" in s for s in statements) == with_bases
            assert [await store.get_machine(m.id) for m in fleet] == read
            with raw(path) as conn:
                keys = sorted(conn.execute("SELECT machine, kind, value FROM machine_keys"))
            assert keys == sorted((m.id, k, v) for m in (*read, holder)
                                  for k, v in claims(m))
            e = refused.value
            return type(e).__name__, str(e), e.field, e.holder
        finally:
            await store.close()

    with_bases = await outcome(tmp_path / "a.db", True)
    assert with_bases == await outcome(tmp_path / "b.db", False)
    assert with_bases[0] == "Conflict" and "already belongs to machine" in with_bases[1]


def _fleet(start: int, n: int) -> list[Machine]:
    return [Machine(macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
                    hostname=f"w{i}", serial=f"SN{i}", labels={"rack": str(i % 7)})
            for i in range(start, start + n)]


async def test_checkpoints_follow_the_commits(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Once CHECKPOINT_FRAMES wait in the WAL, a checkpoint runs on the checkpointer's thread:
    # the commit that asked for it and the ones after it return without waiting for it (it
    # is held here), and it copies the WAL into the file once let go. The store's reading
    # of the WAL index agrees with SQLite's own count.
    path = tmp_path / "ckpt.db"
    store = SqliteStore(path)
    await store.open()
    go, began = threading.Event(), threading.Event()
    checkpoint = sqlite_store._wal_checkpoint

    def held(conn: sqlite3.Connection) -> None:
        began.set()
        assert go.wait(60)
        checkpoint(conn)

    monkeypatch.setattr(sqlite_store, "_wal_checkpoint", held)
    try:
        assert await store._run(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        written = 0
        while not began.is_set():
            await store.apply_batch(Batch(create=_fleet(written, 20)))
            written += 20
            frames, copied = store._wal_frames()
            assert frames < sqlite_store.WAL_FRAMES and copied == 0
            if frames >= sqlite_store.CHECKPOINT_FRAMES:
                began.wait(10)  # asked for by that commit, which returned
        assert began.is_set()
        assert store._checkpointer is not None
        for _ in range(5):  # more commits while the checkpoint is held
            await store.apply_batch(Batch(create=_fleet(written, 20)))
            written += 20
        frames, copied = store._wal_frames()
        assert copied == 0 and sqlite_store.CHECKPOINT_FRAMES <= frames < sqlite_store.WAL_FRAMES
        go.set()
        await asyncio.get_running_loop().run_in_executor(store._checkpointer, lambda: None)
        frames_after, copied = store._wal_frames()
        assert frames_after == frames and frames - 300 < copied <= frames
        with raw(path) as conn:
            busy, log_frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, log_frames) == (0, frames)
        assert store._wal_frames() == (frames, frames)
        assert await store.count_machines() == written
    finally:
        go.set()
        await store.close()


def test_the_wal_bound_and_a_storms_overshoot_fit_the_reserved_wal_index() -> None:
    # The -shm's first region indexes 4062 frames, each later one 4096 (walformat.html);
    # SHM_RESERVE's regions must index WAL_FRAMES and what commits while the writer's own
    # checkpoint is queued (a group commit or a few) or finds a checkpointer pass under way
    # (up to ~0.9 s of a storm's commits under load, ~16,000 frames: s33-tail).
    regions = sqlite_store.SHM_RESERVE // 32768
    indexed = 4062 + (regions - 1) * 4096
    assert indexed - sqlite_store.WAL_FRAMES >= 16_000


async def test_the_wal_stays_short_when_checkpoints_beside_the_commits_never_catch_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A checkpoint beside a storm's commits copies what was committed when it began; the WAL
    # starts again from its beginning only after one that caught up. With the checkpointer
    # never catching up (here it does nothing), the writer checkpoints by itself between two
    # commits once the WAL holds WAL_FRAMES frames: the WAL stays within that and a batch.
    path = tmp_path / "bound.db"
    store = SqliteStore(path)
    await store.open()
    asked: list[None] = []
    monkeypatch.setattr(store, "_checkpoint", lambda: asked.append(None))
    try:
        peak = restarts = last = written = 0
        while written < 3_000 * sqlite_store.WAL_FRAMES // 4_000:  # two restarts at least
            await store.apply_batch(Batch(create=_fleet(written, 20)))
            written += 20
            frames, _ = store._wal_frames()
            peak, restarts, last = max(peak, frames), restarts + (frames < last), frames
        assert asked  # the checkpointer was asked first
        assert restarts >= 2
        assert peak < sqlite_store.WAL_FRAMES + 200
        page = await store._run(lambda conn: conn.execute("PRAGMA page_size").fetchone()[0])
        wal = path.with_name(path.name + "-wal")
        assert os.path.getsize(wal) <= 32 + (sqlite_store.WAL_FRAMES + 200) * (page + 24)
        assert await store.count_machines() == written
    finally:
        await store.close()


async def test_a_storms_commits_wait_for_the_writers_own_checkpoint_once_per_40000_frames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each time the writer catches the WAL up itself, every group commit waits for it (it
    # copies what the checkpointer has not, and syncs the WAL and the file). With the WAL
    # bounded at 12,000 frames a storm of first installs (~3.7 frames each) did so every
    # ~0.7 s, and 1.6-2.6 % of the first installs on the wire were answered only after it:
    # their p99 (benchmarks/README.md, s33-tail). Bounded at 48,000, a storm's commits meet
    # it at most once per 40,000 frames written, however the checkpointer keeps up (here it
    # never does: it does nothing); the WAL's own bound is the test above.
    path = tmp_path / "seldom.db"
    store = SqliteStore(path)
    await store.open()
    monkeypatch.setattr(store, "_checkpoint", lambda: None)
    catch_ups: list[int] = []
    here = store._checkpoint_here

    def counted() -> None:
        catch_ups.append(store._wal_frames()[0])
        here()

    monkeypatch.setattr(store, "_checkpoint_here", counted)
    try:
        written = frames_written = last = 0
        while frames_written < 100_000:
            await store.apply_batch(Batch(create=_fleet(written, 200)))
            written += 200
            frames, _ = store._wal_frames()
            frames_written += frames - last if frames >= last else frames
            last = frames
        assert catch_ups  # the WAL was caught up, so bounded
        assert len(catch_ups) <= frames_written // 40_000
        assert min(catch_ups) >= 40_000  # each let the WAL grow that far first
        assert await store.count_machines() == written
    finally:
        await store.close()


async def test_near_the_wal_bound_passes_follow_each_other_so_the_writers_catch_up_is_short(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checkpointer's passes come once CHECKPOINT_FRAMES wait (4,000: each copies a page
    # rewritten by many commits once; the disk written a first install 0.3-0.7x what 1,000
    # wrote). But the writer's own catch-up at WAL_FRAMES copies what the passes have not,
    # and every group commit waits for it: with up to a whole CHECKPOINT_FRAMES of lag, 62-226
    # ms a catch-up on the wire under load (s33-tail). Within CHECKPOINT_FRAMES of the bound a
    # pass is asked after every commit that leaves frames uncopied and finds none asked, so
    # that the catch-up copies only what came during the last pass.
    store = SqliteStore(tmp_path / "near.db")
    await store.open()
    asked: list[None] = []
    monkeypatch.setattr(store, "_checkpoint_soon", lambda: asked.append(None))
    try:
        bound, lag = sqlite_store.WAL_FRAMES, 50  # a commit's frames, far under a pass's
        for frames, expect in ((bound // 2, 0), (bound - sqlite_store.CHECKPOINT_FRAMES - 1, 0),
                               (bound - sqlite_store.CHECKPOINT_FRAMES, 1), (bound - 1, 1)):
            monkeypatch.setattr(store, "_wal_frames", lambda f=frames: (f, f - lag))
            asked.clear()
            store._checkpoint_asked = False
            store._checkpoint_due()
            assert len(asked) == expect, frames
            store._checkpoint_due()  # asked already, not begun: not asked again
            assert len(asked) == expect, frames
        # Everything copied: nothing to ask (the WAL starts again at the next commit).
        monkeypatch.setattr(store, "_wal_frames", lambda: (bound - 1, bound - 1))
        store._checkpoint_asked = False
        asked.clear()
        store._checkpoint_due()
        assert not asked
    finally:
        monkeypatch.undo()
        await store.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from netboot.inventory.base import Batch
    from netboot.inventory.sqlite import SqliteStore
    from netboot.model import Event, MacAddress, Machine

    async def main():
        store = SqliteStore(sys.argv[1])
        await store.open()
        for k in range(100_000):
            batch = [Machine(macs=(MacAddress((0x02_00_00_00_00_00 + 20 * k + i).to_bytes(
                6, "big")),), hostname=f"w{20 * k + i}") for i in range(20)]
            await store.apply_batch(Batch(create=batch, events=[
                Event(m.id, 1.0, "enrolled") for m in batch]))
            print(",".join(m.id for m in batch), flush=True)  # acknowledged

    asyncio.run(main())
""")


async def test_what_was_committed_survives_kill_9_while_checkpoints_run(tmp_path: Path) -> None:
    # Commits acknowledged one after the other, checkpoints running beside them on their own
    # thread (and by the writer between commits): a kill -9 at any point loses none of them.
    db = tmp_path / "k.db"

    def acknowledged(out: IO[str]) -> list[str]:
        acked: list[str] = []
        while len(acked) < 20 * 400:  # ~10 checkpoints' worth of frames
            line = out.readline()
            assert line, "the writer stopped"
            acked += line.strip().split(",")
        return acked

    acked = killed_after(WRITER, [str(db)], acknowledged)
    store = SqliteStore(db)
    await store.open()
    try:
        found = await store.list_machines(MachineFilter(limit=10_000_000))
        assert {m.id for m in found} >= set(acked)
        events = await store.newest_events(acked)
        assert set(events) == set(acked)
    finally:
        await store.close()


async def test_an_updated_machines_token_is_never_written_in_clear(tmp_path: Path) -> None:
    """Updates are encoded with their sealed token beside them (Sealed.sealed_token), not a
    sealed copy: neither the rows nor the database's files hold the token in clear."""
    from netboot.model import replace_machine
    from netboot.sealing import Sealer

    store = SqliteStore(tmp_path / "inv.db", sealer=Sealer.generate())
    await store.open()
    secret = "clear-token-" + "x" * 30
    try:
        m = Machine(macs=(MacAddress.parse("52:54:00:00:02:02"),), hostname="s",
                    state=MachineState.BOOTING)
        other = Machine(macs=(MacAddress.parse("52:54:00:00:02:03"),), hostname="t",
                        install_token=secret + "c")
        await store.apply_batch(Batch(create=(m, other)))
        m2 = replace_machine(m, install_token=secret, state=MachineState.INSTALLING)
        await store.update_machine(m2, expect_state=MachineState.BOOTING)
        await store.apply_batch(Batch(update=(replace_machine(other, hostname="t2"),
                                              replace_machine(m2, hostname="s2"))))
        got = await store.get_machine(m.id)
        assert got is not None and got.install_token == secret
    finally:
        await store.close()
    conn = sqlite3.connect(tmp_path / "inv.db")
    rows = [r[0] for r in conn.execute("SELECT data FROM machines")]
    conn.close()
    assert len(rows) == 2 and not any(secret in r for r in rows), rows
    assert not any(secret.encode() in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())


async def test_a_token_the_views_load_opened_is_written_again_as_stored(tmp_path: Path,
                                                                          ) -> None:
    """A machine whose token another process sealed, read by the view's load
    (machines_after) and written again with its token (a config fetch: booting ->
    installing), keeps its stored sealed text: no new seal on the event loop; it opens to
    the same token."""
    from netboot.model import replace_machine
    from netboot.sealing import Sealer

    sealer = Sealer.generate()
    path = tmp_path / "inv.db"
    secret = "clear-token-" + "y" * 30
    m = Machine(macs=(MacAddress.parse("52:54:00:00:02:04"),), hostname="s",
                state=MachineState.BOOTING, install_token=secret)
    other = SqliteStore(path, sealer=sealer)  # another process minted it
    await other.open()
    try:
        await other.apply_batch(Batch(create=(m,)))
    finally:
        await other.close()

    def stored_token() -> str:
        conn = sqlite3.connect(path)
        try:
            return conn.execute("SELECT json_extract(data, '$.install_token') FROM machines"
                                ).fetchone()[0]
        finally:
            conn.close()

    before = stored_token()
    assert sealer.is_sealed(before)
    store = SqliteStore(path, sealer=sealer)
    await store.open()
    try:
        [read] = await store.machines_after("", 10)
        assert read.install_token == secret
        await store.update_machine(replace_machine(read, state=MachineState.INSTALLING),
                                   expect_state=MachineState.BOOTING)
        got = await store.get_machine(m.id)
        assert got is not None and got.install_token == secret
        assert got.state is MachineState.INSTALLING
    finally:
        await store.close()
    assert stored_token() == before


async def test_a_write_cancelled_once_its_thread_began_it_returns_as_committed(
        tmp_path: Path) -> None:
    """The writer thread cannot be stopped once it has begun a write: cancelled then, the
    caller waits for it and is told what it did (committed: it returns, and the cancel comes
    at its next wait), not "cancelled" for what is on disk; cancelled while the write still
    waited in the thread's queue, the write never runs."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    said: list[str] = []

    async def writer(kind: str) -> None:
        await store.apply_batch(Batch(events=(Event("m1", 1.0, kind, kind),)))
        said.append(kind)
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    try:
        gate = held_writer(store)
        with write_lock(store) as release:
            try:
                begun_one = asyncio.ensure_future(writer("begun"))
                await waiting(store, 1)  # submitted: the first in the thread's queue
                queued = asyncio.ensure_future(writer("queued"))
                await waiting(store, 2)
            finally:
                gate.set()
            # The thread took the first and runs it (it waits for the lock): a fixed 0.1 s
            # was too short for a loaded machine's thread, whose first was then cancelled
            # before it ran.
            await begun(store, left=1)
            begun_one.cancel()
            queued.cancel()
            await asyncio.sleep(0.05)
            assert not begun_one.done()  # waiting for the thread, not told "cancelled"
            release()
            for task in (begun_one, queued):
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 30)
        assert said == ["begun"]
        assert [e.kind for e in await store.list_events("m1")] == ["begun"]
    finally:
        await store.close()


async def test_a_write_ending_a_timeout_scope_after_its_deadline_leaves_no_cancel_behind(
        tmp_path: Path) -> None:
    """s26-review's case: ``async with asyncio.timeout(...)`` around a write alone, the
    deadline passing while the thread waits for the file's lock. The write is committed and
    the body ends with it: no TimeoutError (the body was done), and no cancel reaches the
    task after the scope (before: a stray CancelledError at its next wait, on 3.11)."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        with write_lock(store) as release:
            asyncio.get_running_loop().call_later(0.3, release)
            async with asyncio.timeout(0.05):
                await store.put_setting("k", "v")
        await asyncio.sleep(0)  # no cancel left over for this task
        await asyncio.sleep(0.01)
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        assert await store.get_setting("k") == "v"
    finally:
        await store.close()


def _machine_tables(path: Path) -> list[list[tuple[Any, ...]]]:
    """The machines' tables of the database at ``path``, every row in order."""
    conn = sqlite3.connect(path)
    try:
        return [conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2, 3").fetchall()
                for t in ("machines", "machine_labels", "machine_keys")]
    finally:
        conn.close()


@pytest.mark.parametrize("events", [0, 1, 5, 37, 90])
async def test_a_group_writes_the_rows_a_create_and_executemany_write(
        tmp_path: Path, events: int) -> None:
    """A group's updates (their stored columns read as one JSON array a row) and events (a
    few multi-row statements) leave the tables byte for byte as the same machines created
    anew and the events inserted one row at a time leave them."""
    fleet = [Machine(macs=(MacAddress.parse(f"52:54:00:00:0a:{i:02x}"),), hostname=f"e{i}",
                     serial=f"SN{i}", uuid=f"u-{i}", labels={"rack": "r1", "ü": "ß\n"},
                     state=MachineState.ENROLLED, created=1.5, updated=2.25)
                 for i in range(6)]
    moved = [replace(fleet[0], state=MachineState.BOOTING, install_token="t", updated=9.0),
             replace(fleet[1], labels={"rack": "r2"}, updated=9.0),
             replace(fleet[2], serial="SN9", updated=9.0),
             replace(fleet[3], hostname="h3", cluster=None, updated=9.0),
             replace(fleet[4], macs=(*fleet[4].macs, MacAddress.parse("52:54:00:00:0b:01")),
                     hostname=None, updated=9.0),
             replace(fleet[5], asset="A\"5", uuid=None, labels={}, updated=9.0)]
    said = [Event(machine=fleet[i % 6].id, time=10.0 + i / 3, kind=f"k{i % 3}",
                  message=f"m{i}\u00e9", data={"n": str(i)} if i % 2 else {})
            for i in range(events)]

    grouped, fresh = SqliteStore(tmp_path / "g.db"), SqliteStore(tmp_path / "f.db")
    await grouped.open()
    await fresh.open()
    try:
        await grouped.apply_batch(Batch(create=fleet))
        await grouped.apply_batch(Batch(update=moved, events=said))
        await fresh.apply_batch(Batch(create=moved))
        stored = await grouped._run(lambda conn: conn.execute(
            "SELECT id, machine, time, kind, message, data FROM events ORDER BY id").fetchall())
    finally:
        await grouped.close()
        await fresh.close()
    assert _machine_tables(tmp_path / "g.db") == _machine_tables(tmp_path / "f.db")
    # ... and each document is the text dumps() makes of it (not only the same text twice).
    written = sqlite3.connect(tmp_path / "g.db")
    assert dict(written.execute("SELECT id, data FROM machines").fetchall()) == {
        m.id: codec.dumps(codec.machine_document(m)) for m in moved}
    written.close()
    one = sqlite3.connect(":memory:")
    one.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, machine TEXT, time REAL,"
                " kind TEXT, message TEXT, data TEXT)")
    one.executemany("INSERT INTO events (machine, time, kind, message, data)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(e.machine, e.time, e.kind, e.message, json.dumps(
                        dict(e.data), separators=(",", ":"))) for e in said])
    assert [r[1:] for r in stored] == [r[1:] for r in one.execute(
        "SELECT * FROM events ORDER BY id")]
    assert [r[0] for r in stored] == sorted(r[0] for r in stored)
    one.close()


async def test_a_group_updates_documents_another_writer_spelled_otherwise(
        tmp_path: Path) -> None:
    """Stored documents written by another writer (spaces, keys in another order, escapes
    where none are needed): their label and identifier parts are not the text the new
    document gives, and are compared by value; the rows end as the same machines created
    anew leave them, where they changed and where they did not."""
    fleet = [Machine(macs=(MacAddress.parse(f"52:54:00:00:0c:{i:02x}"),), hostname=f"o{i}",
                     serial=f"SN{i}", uuid=f"u-{i}", labels={"rack": "r1", "k": "v"},
                     state=MachineState.ENROLLED, created=1.5, updated=2.25)
                 for i in range(4)]
    moved = [replace(fleet[0], state=MachineState.BOOTING, install_token="t", updated=9.0),
             replace(fleet[1], labels={"rack": "r2", "k": "v"}, updated=9.0),
             replace(fleet[2], serial="SN9", updated=9.0),
             replace(fleet[3], labels={"k": "v", "rack": "r1"}, updated=9.0)]

    grouped, fresh = SqliteStore(tmp_path / "g.db"), SqliteStore(tmp_path / "f.db")
    await grouped.open()
    await fresh.open()
    try:
        await grouped.apply_batch(Batch(create=fleet))
        other = sqlite3.connect(tmp_path / "g.db")
        for m in fleet:
            document = codec.machine_document(m)
            document["labels"] = dict(reversed(document["labels"].items()))
            text = json.dumps(dict(reversed(document.items())), indent=1).replace(
                '"v"', '"\\u0076"')
            other.execute("UPDATE machines SET data = ? WHERE id = ?", (text, m.id))
        other.commit()
        other.close()
        assert await grouped.get_machine(fleet[0].id) == fleet[0]
        await grouped.apply_batch(Batch(update=moved))
        await fresh.apply_batch(Batch(create=moved))
    finally:
        await grouped.close()
        await fresh.close()
    assert _machine_tables(tmp_path / "g.db") == _machine_tables(tmp_path / "f.db")


async def test_the_bus_keeps_stored_copies_and_its_listeners_read_the_events_given(
        tmp_path: Path) -> None:
    """A live stream (a subscriber of the bus) keeps what it is told: it gets the stored
    copies, also when it subscribed while the batch was written; with no stream, the
    synchronous listeners (metrics) are told the events as given where their data is text
    (the copy would hold the same machine, time, kind and message), the round trip's copy
    otherwise. Each is equal to what the store reads back."""
    from netboot.events import EventBus, Published

    bus = EventBus()
    counted: list[Event] = []
    bus.listen(counted.append)
    store = SqliteStore(tmp_path / "inv.db", listener=bus)
    await store.open()
    try:
        text = Event("m1", 1.0, "install-plan", "plan", {"via": "ipxe", "arch": "x86_64"})
        other = Event("m1", 2.0, "progress", "step", {"step": 3})
        await store.apply_batch(Batch(events=(text, other)))
        assert counted[0] is text and counted[1] is not other
        assert counted == await store.list_events("m1") == [
            text, Event("m1", 2.0, "progress", "step", {"step": 3})]

        def kept(sub: Any) -> list[Event]:
            got = []
            while not sub._queue.empty():
                item = sub._queue.get_nowait()
                assert isinstance(item, Published)
                got.append(item.event)
            return got

        again = Event("m2", 3.0, "install-plan", "plan", {"via": "ipxe"})
        with bus.subscribe() as sub:
            await store.apply_batch(Batch(events=(again,)))
            told = kept(sub)
        assert told == [again] and told[0] is not again and told[0].data is not again.data
        late = Event("m3", 4.0, "install-plan", "plan", {"via": "ipxe"})
        gate = held_writer(store)
        try:
            writing = asyncio.ensure_future(store.apply_batch(Batch(events=(late,))))
            await waiting(store, 1)  # checked, submitted: waits behind the held writer
            with bus.subscribe() as sub:
                gate.set()
                await asyncio.wait_for(writing, 30)
                told = kept(sub)
        finally:
            gate.set()
        assert told == [late] and told[0] is not late and told[0].data is not late.data
        assert counted[-2:] == [again, late]
        assert await store.list_events("m3") == [late]
    finally:
        await store.close()


async def test_a_groups_notes_for_the_feed_are_its_updates_as_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the writer notes of a committed group for this process's view (CommittedHere):
    an update in stored form whose token came in clear (sealed here) is noted as given;
    one that is not in stored form (an int time), with or without a token, as normalised;
    a group holding a token sealed already (a copied row) is not noted at all (only a
    read can tell what it opens to). Each as a read gives it back."""
    from netboot.inventory.sealed import install_token_context
    from netboot.model import replace_machine
    from netboot.sealing import Sealer

    sealer = Sealer.generate()
    store = SqliteStore(tmp_path / "inv.db", sealer=sealer)
    await store.open()
    noted: list[list[tuple[str, Machine | None]]] = []
    add = store._here.add

    def noting(before: int, after: int, machines: list[tuple[str, Machine | None]]) -> None:
        noted.append(machines)
        add(before, after, machines)

    monkeypatch.setattr(store._here, "add", noting)
    try:
        made = [Machine(macs=(MacAddress.parse(f"52:54:00:00:03:0{i}"),), hostname=f"n{i}")
                for i in range(4)]
        await store.apply_batch(Batch(create=made))
        a, b, c, d = made
        clear = replace_machine(a, state=MachineState.BOOTING, install_token="tok-a",
                                token_hash="ab" * 32, updated=5.0)
        no_token = replace_machine(b, hostname="n1b")
        int_time = replace_machine(c, updated=7)
        int_time_token = replace_machine(d, install_token="tok-d", updated=8)
        noted.clear()
        await store.apply_batch(Batch(update=(clear, no_token, int_time, int_time_token)))
        [notes] = noted
        assert [ident for ident, _ in notes] == [m.id for m in made]
        got = [m for _, m in notes]
        assert got[0] is clear and got[1] is no_token
        for given, note in zip((int_time, int_time_token), got[2:], strict=True):
            assert note is not given and note == codec.stored_machine(given)
            assert type(note.updated) is float
        for note in got:
            assert note is not None and note == await store.get_machine(note.id)
        noted.clear()
        copied = sealer.seal("tok-b", context=install_token_context(b.id))
        await store.apply_batch(Batch(update=(replace_machine(clear, updated=6.0),
                                              replace_machine(no_token, install_token=copied))))
        assert noted == []
        read = await store.get_machine(b.id)
        assert read is not None and read.install_token == "tok-b"
    finally:
        await store.close()


def _decodes(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The machines the store's feed reads back and decodes, by id, as they are."""
    opened: list[str] = []
    open_machine = store._sealed.open_machine

    def counted(machine: Machine | None, **kw: Any) -> Machine | None:
        if machine is not None:
            opened.append(machine.id)
        return open_machine(machine, **kw)

    monkeypatch.setattr(store._sealed, "open_machine", counted)
    return opened


async def _noted_late(store: SqliteStore, monkeypatch: pytest.MonkeyPatch,
                      machine: Machine) -> tuple[threading.Event, asyncio.Future[None], int]:
    """A group commit of ``machine`` that is committed (the probe sees it) but not yet noted
    as this store's own (CommittedHere.add) until the returned gate is set: what a sync
    meets when the writer thread has not the GIL back after COMMIT. Returns the gate, the
    write, and the feed position before it."""
    seq = (await store.changes_since(-1)).seq
    seq = (await store.changes_since(seq)).seq
    gate = threading.Event()
    add = store._here.add

    def late(before: int, after: int, machines: Any) -> None:
        gate.wait(30)
        add(before, after, machines)

    monkeypatch.setattr(store._here, "add", late)
    writing = asyncio.ensure_future(store.apply_batch(Batch(update=(machine,))))
    for _ in range(3000):  # committed: the feed's newest position moved
        await asyncio.sleep(0.01)
        last = store._probe_last()
        if last is not None and last > seq:
            break
    if writing.done():
        gate.set()
        raise AssertionError("the group commit returned before it was noted")
    return gate, writing, seq


async def test_a_sync_meeting_an_own_commit_not_yet_noted_waits_for_it_instead_of_reading_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed's reader saw a group commit of this store before its writer noted it (the
    GIL given up around COMMIT): it waits for the note (within NOTE_WAIT) and takes the
    machine as written; another connection's commit made meanwhile is read, exactly. Before
    s35-echo both were read back and decoded (~1.5 % of a storm's machines)."""
    store, other = SqliteStore(tmp_path / "inv.db"), SqliteStore(tmp_path / "inv.db")
    await store.open()
    await other.open()
    try:
        a, b = (Machine(macs=(MacAddress.parse(f"52:54:00:00:05:0{i}"),), hostname=f"n{i}")
                for i in range(2))
        await store.apply_batch(Batch(create=(a, b)))
        mine = replace(a, hostname="mine")
        monkeypatch.setattr(sqlite_store, "NOTE_WAIT", 30.0)
        gate, writing, seq = await _noted_late(store, monkeypatch, mine)
        try:
            theirs = replace(b, hostname="theirs")
            await other.update_machine(theirs)  # after the own commit, before it is noted
            opened = _decodes(store, monkeypatch)
            asyncio.get_running_loop().call_later(0.1, gate.set)
            changes = await store.changes_since(seq)
        finally:
            gate.set()
        await writing
        assert changes.complete and changes.machines == {a.id: mine, b.id: theirs}
        assert changes.machines[a.id] is mine  # as written: not read back
        assert opened == [b.id]  # only the other connection's commit was decoded
    finally:
        await store.close()
        await other.close()


async def test_a_sync_waits_for_an_unnoted_own_commit_only_within_its_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that does not note its commit within NOTE_WAIT (stuck, or waiting for
    another process's lock while something else committed) is not waited for: the sync
    reads the feed, exactly, and returns."""
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        a = Machine(macs=(MacAddress.parse("52:54:00:00:05:10"),), hostname="n")
        await store.apply_batch(Batch(create=(a,)))
        mine = replace(a, hostname="mine")
        monkeypatch.setattr(sqlite_store, "NOTE_WAIT", 0.05)
        gate, writing, seq = await _noted_late(store, monkeypatch, mine)
        opened = _decodes(store, monkeypatch)
        try:
            changes = await asyncio.wait_for(store.changes_since(seq), 10)
            assert not writing.done()
        finally:
            gate.set()
        await writing
        assert changes.machines == {a.id: mine} and opened == [a.id]
    finally:
        await store.close()
@pytest.mark.parametrize("case", ["moved", "edited", "deleted", "state only"])
async def test_an_update_from_a_base_changed_meanwhile_is_refused_as_without_it(
        tmp_path: Path, case: str) -> None:
    """The compare-and-set of updates changed in place is their UPDATE's own (no stored
    columns read): a machine moved, edited or deleted since its base was read (or whose
    state alone differs from the one expected) refuses the group with the error an update
    without a base gets, word for word, and nothing of the group is written."""
    from netboot.errors import StateChanged

    async def outcome(path: Path, with_bases: bool) -> tuple[str, str, str | None]:
        store = SqliteStore(path)
        await store.open()
        try:
            fleet = [Machine(macs=(MacAddress.parse(f"02:00:00:00:00:0{i}"),), id=f"m-c{i}",
                             updated=1.0) for i in range(3)]
            await store.apply_batch(Batch(create=fleet))
            read = [await store.get_machine(m.id) for m in fleet]
            victim = fleet[1]
            with raw(path) as conn:
                if case == "moved":
                    conn.execute("UPDATE machines SET state = 'booting', updated = 2.0,"
                                 " data = json_set(data, '$.state', 'booting', '$.updated',"
                                 " 2.0) WHERE id = ?", (victim.id,))
                elif case == "edited":
                    conn.execute("UPDATE machines SET updated = 2.0, data = json_set(data,"
                                 " '$.updated', 2.0, '$.profile', 'p9') WHERE id = ?",
                                 (victim.id,))
                elif case == "deleted":
                    conn.execute("DELETE FROM machines WHERE id = ?", (victim.id,))
                else:  # another state at the same version (no writer of netboot's does it)
                    conn.execute("UPDATE machines SET state = 'failed' WHERE id = ?",
                                 (victim.id,))
            new = [replace(m, state=MachineState.BOOTING, profile="p1", updated=3.0)
                   for m in read if m is not None]
            batch = Batch(update=new, expect={m.id: m.state for m in read if m},
                          versions={m.id: m.updated for m in read if m},
                          bases={m.id: m for m in read if m} if with_bases else {})
            with pytest.raises((StateChanged, NotFound)) as refused:
                await store.apply_batch(batch)
            with raw(path) as conn:
                assert conn.execute("SELECT count(*) FROM machines WHERE"
                                    " json_extract(data, '$.profile') IS NOT NULL"
                                    ).fetchone()[0] == (1 if case == "edited" else 0)
            return (type(refused.value).__name__, str(refused.value),
                    getattr(refused.value, "field", None))
        finally:
            await store.close()

    with_bases = await outcome(tmp_path / "a.db", True)
    assert with_bases == await outcome(tmp_path / "b.db", False)


# --- a full disk (s37-chaos) -------------------------------------------------------------------


def _fill_up(conn: sqlite3.Connection) -> None:
    """The database may grow no further: a write that needs a new page fails with
    SQLITE_FULL, as on a full filesystem (the writer's connection: max_page_count is its)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


async def _write_until_full(store: SqliteStore) -> StoreError:
    for i in range(10_000):  # bounded: a page holds a few dozen machines
        try:
            await store.create_machine(Machine(
                macs=(MacAddress((0x02_00_00_37_00_00 + i).to_bytes(6, "big")),),
                hostname=f"full-{i}"))
        except StoreError as exc:
            return exc
    raise AssertionError("no write failed")


async def test_a_full_disk_is_said_and_its_writes_reported_stuck_until_space_is_free(
        tmp_path: Path) -> None:
    """A write failing with SQLITE_FULL raises StoreFull (not a bare StoreError, which says
    "unreachable" to a client), and stuck_writes names the full disk, so the watcher says
    "degraded: ... refuses writes" (it said "ok" while every write failed), until the
    directory has FREE_TO_WRITE free again. Reads answer meanwhile. (Before s37-chaos: a
    StoreError, stuck_writes not there.)"""
    from netboot.errors import StoreFull
    from netboot.inventory.base import stuck_writes

    free = [1 << 30]
    store = SqliteStore(tmp_path / "inv.db", free_space=lambda d: free[0])
    await store.open()
    try:
        assert stuck_writes(store) is None
        await store._run(_fill_up)
        free[0] = 0
        exc = await _write_until_full(store)
        assert isinstance(exc, StoreFull), exc
        assert "full" in str(exc) and str(tmp_path) in str(exc), exc
        said = stuck_writes(store)
        assert said is not None and "full" in said and str(tmp_path) in said, said
        assert (await store.list_machines(MachineFilter(limit=1))) != []  # reads answer
        free[0] = sqlite_store.FREE_TO_WRITE - 1
        assert stuck_writes(store) == said  # not yet room for a commit's frames
        free[0] = sqlite_store.FREE_TO_WRITE
        assert stuck_writes(store) is None
    finally:
        await store.close()


async def test_start_up_on_a_full_disk_says_so(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Opened with less than FREE_TO_WRITE free in its directory, the store logs an error
    naming it and reports its writes stuck from the start (before s37-chaos: nothing said
    until the first device's boot failed), until the space is back."""
    from netboot.inventory.base import stuck_writes

    free = [0]
    store = SqliteStore(tmp_path / "inv.db", free_space=lambda d: free[0])
    with caplog.at_level(logging.ERROR, logger="netboot.inventory.sqlite"):
        await store.open()
    try:
        said = stuck_writes(store)
        assert said is not None and "disk is full" in said and str(tmp_path) in said, said
        assert [r.getMessage() for r in caplog.records
                if r.levelno == logging.ERROR] == [said]
        free[0] = 1 << 30
        assert stuck_writes(store) is None
    finally:
        await store.close()


def test_an_inventory_that_cannot_open_on_a_full_disk_names_the_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first start with 8 KiB free: SQLite fails the migration with "disk I/O error" (its
    -shm cannot grow), which sends an operator to the hardware; the message names the full
    disk and the free space (seen on a tmpfs, s37-chaos; before: "disk I/O error" alone).
    With room, the message stays SQLite's."""
    path = tmp_path / "netboot.db"
    failed = StoreError(f"cannot migrate inventory {path}: disk I/O error")
    monkeypatch.setattr(sqlite_store, "_free_space", lambda directory: 8 << 10)
    said = str(sqlite_store._unopenable(path, failed))
    assert said == (f"cannot open inventory {path}: cannot migrate inventory {path}: disk I/O "
                    f"error (its disk is full: 8 KiB free in {tmp_path}, netboot writes with "
                    "1024 KiB or more; free space there)"), said
    monkeypatch.setattr(sqlite_store, "_free_space", lambda directory: 1 << 30)
    said = str(sqlite_store._unopenable(path, failed))
    assert said == f"cannot open inventory {path}: cannot migrate inventory {path}: disk I/O error"


def _lock_as(owner: int, lock: Path) -> str:
    """What a process of user ``owner`` gets opening and locking ``lock`` as
    SqliteStore.fixed_addresses_held does (a fork that drops root: nothing but these system
    calls runs in it): "held", or the error's name."""
    import errno
    import fcntl

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(owner)
            os.setuid(owner)
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                said = "held"
            except OSError as exc:
                said = errno.errorcode.get(exc.errno or 0, "?")
            os.write(write, said.encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as out:
            return out.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
async def test_the_fixed_address_lock_a_root_cli_made_is_taken_by_the_inventorys_owner() -> None:
    """A CLI run as root beside a server running as its own user (the container's netboot)
    made the fixed-address lock file (SqliteStore.fixed_addresses_held) root's alone, 0600:
    the server's next fixed_ipv4 write could not open it, nor any after. SQLite gives its
    own -wal and -shm files the database file's owner and mode when run as root; the lock
    file is given them too, and the owner's process takes it (s41-review)."""
    import tempfile

    owner = 65534  # nobody
    home = Path(tempfile.mkdtemp(prefix="s41lock-", dir="/tmp"))
    try:
        os.chown(home, owner, owner)
        path = home / "inv.db"
        store = SqliteStore(path)
        await store.open()
        await store.close()
        for made in home.iterdir():
            os.chown(made, owner, owner)
        os.chmod(path, 0o640)
        store = SqliteStore(path)  # the CLI, as root
        await store.open()
        try:
            async with store.fixed_addresses_held():
                pass
            assert _lock_as(owner, home / "inv.db-fixed.lock") == "held"  # the server
            lock = os.stat(home / "inv.db-fixed.lock")
            assert (lock.st_uid, lock.st_gid, lock.st_mode & 0o777) == (owner, owner, 0o640)
            # SQLite's own files beside it, made by this root process, are the owner's too.
            assert {made.stat().st_uid for made in home.iterdir()} == {owner}
        finally:
            await store.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


_FIXED_WRITER = """
import asyncio, sys
from netboot.errors import Conflict
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine

async def main(path, first, count):
    store = SqliteStore(path)
    await store.open()
    won = 0
    try:
        for i in range(count):
            mac = MacAddress((0x06_00_00_00_00_00 + first + i).to_bytes(6, "big"))
            try:
                await store.create_machine(Machine(macs=(mac,), id=f"m-p{first + i}",
                                                   fixed_ipv4=f"198.51.100.{i + 1}"))
                won += 1
            except Conflict:
                pass
    finally:
        await store.close()
    print(won)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_two_processes_giving_the_same_fixed_addresses_give_each_once(
        tmp_path: Path) -> None:
    """Two processes on one file (a server and an older tool, neither taking netboot's
    fixed-address lock) give the same 150 addresses to machines of their own at once: the
    file's unique index lets each address be held once, whoever wins it."""
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    env = {**os.environ, "PYTHONPATH": str(Path(netboot.__file__).resolve().parent.parent)}
    count = 150
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FIXED_WRITER, str(path), str(first), str(count), env=env,
        stdout=asyncio.subprocess.PIPE) for first in (0, 1000)]
    outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    assert [p.returncode for p in procs] == [0, 0]
    won = [int(out.decode()) for out, _ in outs]
    store = SqliteStore(path)
    await store.open()
    try:
        held = await store.list_machines(MachineFilter(with_fixed_ipv4=True, limit=1000))
    finally:
        await store.close()
    by_address = collections.Counter(m.fixed_ipv4 for m in held)
    assert sum(won) == len(held) == count and set(by_address.values()) == {1}, (won, by_address)


async def test_a_file_holding_one_fixed_address_twice_is_migrated_keeping_both(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Migration 8 (the fixed_ipv4 column and its unique index) on a file of schema 7 where
    two machines share an address (stored before the API refused it): nothing dropped, the
    oldest holds the index entry, start-up names both (contract.check_a_shared_fixed_...)."""
    from tests.inventory.test_contract import (
        PROFILE,
        check_a_shared_fixed_address_migrated,
        machine,
    )

    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    a = machine("02:00:00:00:00:01", hostname="a", fixed_ipv4="192.0.2.7", profile="k3os",
                created=1.0, updated=1.0)
    b = machine("02:00:00:00:00:02", hostname="b", created=2.0, updated=2.0)
    await store.put_profile(PROFILE)
    await store.apply_batch(Batch(create=[a, b]))
    await store.close()
    # The file as schema 7 left it, b's document given a's address by an older netboot.
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DROP INDEX machines_fixed_ipv4")
        conn.execute("ALTER TABLE machines DROP COLUMN fixed_ipv4")
        conn.execute("DROP INDEX machines_profile")
        conn.execute("ALTER TABLE machines DROP COLUMN profile")
        conn.execute("UPDATE machines SET data = json_set(data, '$.fixed_ipv4', '192.0.2.7')"
                     " WHERE id = ?", (b.id,))
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        await check_a_shared_fixed_address_migrated(store, a, replace(b, fixed_ipv4=a.fixed_ipv4),
                                                    caplog)
    finally:
        await store.close()


async def test_a_profile_delete_finds_its_users_by_an_index_in_its_write_transaction(
        tmp_path: Path) -> None:
    """delete_profile(unused=True) looks for a machine naming the profile with the write
    lock held (s41-integrity): it read every machine's document there (81-150 ms of CPU at
    100,000 machines, every boot's write waiting). Each statement it runs on machines is now
    a search of an index (SQLite's own plan of it, EXPLAIN QUERY PLAN), never a scan."""
    from tests.inventory.test_contract import PROFILE

    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        await store.put_profile(PROFILE, create=True)
        await store.apply_batch(Batch(create=[Machine(macs=(MacAddress((0x0200_0000_0000 + i)
                                                                       .to_bytes(6, "big")),))
                                              for i in range(50)]))
        statements: list[str] = []
        await store._run(lambda conn: conn.set_trace_callback(statements.append))
        await store.delete_profile(PROFILE.name, unused=True)
        await store._run(lambda conn: conn.set_trace_callback(None))
        reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")
                 and " machines " in f"{s} "]
        assert reads, statements
        plans = await store._run(lambda conn: [
            [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + s)] for s in reads])
        assert all(p and not any(step.startswith("SCAN") for step in p) for p in plans), plans
    finally:
        await store.close()


async def test_addresses_swapped_and_shared_by_hand_sql_are_mended_as_the_index_allows(
        tmp_path: Path) -> None:
    """mend_stray_columns (start-up's, service.mend_stray_columns) on what hand SQL may
    leave: two machines' addresses swapped in their documents alone (each column holding
    the other's address: both let go first, then each takes its own), a third's document
    given an address a fourth's column holds (its column let go, left NULL, said so), and
    an older inventory's shared address (NULL beside a document whose address another
    holds: kept, not told, at every start)."""
    store = SqliteStore(tmp_path / "inv.db")
    await store.open()
    try:
        made = [Machine(macs=(MacAddress.parse(f"52:54:00:43:01:0{i}"),), created=float(i),
                        fixed_ipv4=f"192.0.2.{i}") for i in range(1, 5)]
        await store.apply_batch(Batch(create=made))
        one, two, three, _ = (m.id for m in made)
        with contextlib.closing(sqlite3.connect(store.path)) as hand, hand:
            for ident, address in ((one, "192.0.2.2"), (two, "192.0.2.1"),
                                   (three, "192.0.2.4")):
                hand.execute("UPDATE machines SET data = json_set(data, '$.fixed_ipv4', ?)"
                             " WHERE id = ?", (address, ident))
        assert await store.mend_stray_columns() == [
            ("52:54:00:43:01:01", "fixed_ipv4 192.0.2.1 -> 192.0.2.2"),
            ("52:54:00:43:01:02", "fixed_ipv4 192.0.2.2 -> 192.0.2.1"),
            ("52:54:00:43:01:03", "fixed_ipv4 192.0.2.3 -> none (its document's 192.0.2.4 "
                                  "is another machine's)")]
        assert await store.mend_stray_columns() == []  # the shared one is kept, untold
        columns = await store._run(lambda conn: dict(conn.execute(
            "SELECT coalesce(mac, id), fixed_ipv4 FROM machines").fetchall()))
        assert columns == {"52:54:00:43:01:01": "192.0.2.2", "52:54:00:43:01:02": "192.0.2.1",
                           "52:54:00:43:01:03": None, "52:54:00:43:01:04": "192.0.2.4"}
        # 192.0.2.3, let go, is anyone's again; 192.0.2.2 is refused to another machine.
        await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:43:01:09"),),
                                           fixed_ipv4="192.0.2.3"))
        with pytest.raises(Conflict, match=r"fixed_ipv4 192\.0\.2\.2 is the fixed address"):
            await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:43:01:0a"),),
                                               fixed_ipv4="192.0.2.2"))
    finally:
        await store.close()


async def test_the_views_read_of_changes_does_not_scan_the_feed(tmp_path: Path) -> None:
    """The view's sync after another connection's commit reads the feed's ends: each by its
    own statement, answered from the primary key's ends; ``min(seq), max(seq)`` in one
    statement was a scan of the whole feed (~9 ms at 100,000 rows, at every sync)."""
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    try:
        steps: dict[int, int] = {}
        for rows in (100, 20_000):
            with raw(path) as conn:
                conn.executemany("INSERT INTO changes (tbl, key) VALUES ('settings', 'k')",
                                 [()] * (rows - 100 if rows > 100 else rows))
                last = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]

            def read(conn: sqlite3.Connection, last: int = last) -> int:
                count = [0]

                def tick() -> int:
                    count[0] += 1
                    return 0

                conn.set_progress_handler(tick, 1)  # every VM instruction
                try:
                    changes = store._read_changes(conn, last, -1)
                finally:
                    conn.set_progress_handler(None, 1)
                assert changes.complete and not changes.machines
                return count[0]

            steps[rows] = await store._read(read)
    finally:
        await store.close()
    # The same few instructions whatever the feed's length (a scan: one loop a row).
    assert steps[20_000] < steps[100] + 50, steps
