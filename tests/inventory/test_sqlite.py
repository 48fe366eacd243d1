"""What only the SQLite store promises: durability, WAL, migrations, several processes, errors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import netboot
from netboot.errors import NotFound, StoreError
from netboot.inventory import sqlite as sqlite_store
from netboot.inventory.base import MachineFilter
from netboot.inventory.sqlite import SCHEMA_VERSION, SqliteStore
from netboot.model import Cluster, Event, Group, Lease, MacAddress, Machine, Profile, Scope

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
    m = Machine(mac=MacAddress.parse(MAC1), hostname="n1", labels={"r": "1"}, created=1.5)
    store = SqliteStore(path)
    await store.open()
    await store.create_machine(m)
    await store.put_profile(Profile(name="p", kernel="k"))
    await store.put_cluster(Cluster(name="c", token="t"))
    await store.put_group(Group(name="g", selector={"arch": ("arm64",)}))
    await store.add_event(Event(mac=MAC1, time=2.0, kind="boot", data={"a": 1}))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=9.0))
    await store.put_setting("k", "v")
    await store.close()

    again = SqliteStore(str(path))  # str paths work too
    await again.open()
    try:
        assert await again.get_machine(MAC1) == m
        assert await again.count_machines(MachineFilter(labels=(("r", "1"),))) == 1
        assert await again.get_profile("p") == Profile(name="p", kernel="k")
        assert await again.get_cluster("c") == Cluster(name="c", token="t")
        assert await again.get_group("g") == Group(name="g", selector={"arch": ("arm64",)})
        assert await again.list_events(MAC1) == [
            Event(mac=MAC1, time=2.0, kind="boot", data={"a": 1})
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
    assert {"events", "leases", "settings", "machines_hostname", "events_mac"} <= names


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
            await store.create_machine(Machine(mac=mac, hostname=f"h{base + i}"))
            await store.add_event(Event(mac=str(mac), time=float(i), kind="created"))
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
        assert len(await store.list_events("02:00:00:01:00:c7")) == 1
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
        await store.create_machine(Machine(mac=MacAddress.parse("02:00:00:00:00:01")))
        gate = threading.Event()

        def long_write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
            gate.wait(20)  # bounded; released below as soon as the read has answered
            conn.execute("COMMIT")

        writer = asyncio.ensure_future(store._run(long_write))
        try:
            found = await asyncio.wait_for(store.get_machine("02:00:00:00:00:01"), 10)
            assert found is not None
            assert await store.get_setting("k") is None  # the open write is not visible yet
        finally:
            gate.set()
            await writer
        assert await store.get_setting("k") == "v"
    finally:
        await store.close()


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


SHM_CHILD = """
import asyncio, os, sys
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine

async def main(path):
    store = SqliteStore(path)
    await store.open()
    try:
        await store.create_machine(Machine(mac=MacAddress(bytes(6)), hostname="a"))
        for i in range(3):
            os.truncate(path + "-shm", 0)  # another program, or a disk cleaner
            assert await store.get_machine("00:00:00:00:00:00") is not None
            await store.create_machine(
                Machine(mac=MacAddress(bytes([2, 0, 0, 0, 1, i])), hostname=f"b{i}"))
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


async def test_the_admin_token_of_older_versions_becomes_a_named_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A database from before named tokens: its one admin token's hash sat in the settings.
    path = tmp_path / "inv.db"
    before = next(i for i, m in enumerate(sqlite_store.MIGRATIONS)
                  if any("api_tokens" in statement for statement in m))
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
