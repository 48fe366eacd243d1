"""``netboot db``: migrate an inventory's schema, copy an inventory between SQLite and
PostgreSQL, and prove the copy equal.

The copy moves rows, not model values: the two stores share one table layout (same tables,
columns and JSON documents, see postgres.py), so rows go across unchanged. Sealed secrets stay
sealed with the same key (the ``secrets-key-id`` setting goes along; the servers on the
target need the same ``secret.key``), event and audit ids keep their order, and events of
machines nobody enrolled come along too, which a copy through the Store API would lose.

It is proven, not assumed: after the copy each table is read back from the target and its row
count and a SHA-256 over its rows in a canonical form (sorted, numbers as floats) must equal
the source's. The source is read in one snapshot (SQLite's WAL, PostgreSQL's repeatable
read), so a running server's inventory can be backed up; stop the servers that use the
target first (README, "Backup, restore and upgrades").
The change feed is not copied: the target's own triggers record the inserted rows, so a
server that starts on it reads everything once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from netboot.durable import link_new
from netboot.errors import ConfigError, Conflict, StoreError
from netboot.inventory import dsn as pg_dsn
from netboot.inventory.base import Store

# In insertion order (machines before the rows that reference them). The same columns in both.
# A machine's fixed_ipv4 and profile columns (SQLite migration 8, PostgreSQL 5) are the
# database's rules (one address a machine; a profile's users found by index): a copy
# without them let the target give an address twice and delete a profile in use until a
# server's start set them again from the documents (service.mend_stray_columns).
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("machines", ("id", "mac", "hostname", "state", "cluster", "data", "created", "updated",
                  "fixed_ipv4", "profile")),
    ("machine_keys", ("kind", "value", "machine")),
    ("machine_labels", ("machine", "key", "value")),
    ("profiles", ("name", "data")),
    ("clusters", ("name", "data")),
    ("groups", ("name", "data")),
    ("events", ("id", "machine", "time", "kind", "message", "data")),
    ("leases", ("mac", "ipv4", "expires", "hostname")),
    ("settings", ("key", "value")),
    ("api_tokens", ("name", "sha256", "scope", "created", "expires", "last_used")),
    ("audit", ("id", "time", "actor", "action", "target", "peer", "outcome")),
)
# Tables whose ids a PostgreSQL sequence hands out: moved past the copied ids.
_SERIAL = ("events", "audit")

Rows = dict[str, list[tuple[Any, ...]]]
_R = TypeVar("_R")


def is_dsn(spec: str) -> bool:
    return spec.startswith(tuple(f"{s}://" for s in pg_dsn.SCHEMES))


def describe(spec: str) -> str:
    """How messages name an inventory: a path, or a DSN without its password."""
    return pg_dsn.redact(spec) if is_dsn(spec) else spec


def _needs_driver(*specs: str) -> None:
    """A ConfigError with the fix where a DSN is given and asyncpg is not installed (the
    README's install has only the ``fast`` extra): not the driver's traceback."""
    if any(is_dsn(spec) for spec in specs):
        try:
            import asyncpg  # noqa: F401
        except ImportError as exc:
            raise ConfigError("a postgresql:// inventory needs the asyncpg driver, which is "
                              "not installed", source="--from/--to",
                              fix=pg_dsn.INSTALL_ASYNCPG) from exc


def open_spec(spec: str, peer: pg_dsn.PeerSettings | None = None) -> Store:
    """The store for a DSN (postgresql://…, its connections set up by ``peer``: the
    configured inventory.postgresql) or an SQLite file path; not yet open."""
    if is_dsn(spec):
        trouble = pg_dsn.problem(spec)
        if trouble is not None:
            raise StoreError(f"{describe(spec)}: the DSN {trouble}")
        from netboot.inventory.postgres import PostgresStore

        return PostgresStore(spec, peer=peer)
    from netboot.inventory.sqlite import SqliteStore

    return SqliteStore(spec)


@dataclass(frozen=True)
class Migrated:
    name: str
    applied: tuple[int, ...]
    version: int


async def migrate(spec: str, peer: pg_dsn.PeerSettings | None = None) -> Migrated:
    """Bring ``spec``'s schema to this netboot's version; which steps that took."""
    if is_dsn(spec):
        from netboot.inventory.postgres import SCHEMA_VERSION, PostgresStore

        store = PostgresStore(spec, peer=peer)
        await store.open()  # migrates
        await store.close()
        return Migrated(describe(spec), tuple(store.migrated), SCHEMA_VERSION)
    from netboot.inventory.sqlite import SCHEMA_VERSION as SQLITE_VERSION

    before = await asyncio.to_thread(_sqlite_version, Path(spec))
    sqlite_store = open_spec(spec)
    await sqlite_store.open()
    await sqlite_store.close()
    return Migrated(spec, tuple(range(before + 1, SQLITE_VERSION + 1)), SQLITE_VERSION)


def _sqlite_version(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class TableCheck:
    table: str
    rows: int
    sha256: str


@dataclass(frozen=True)
class Copied:
    """What :func:`copy` proved (each table's count and checksum), by state, the copied
    machines whose next network boot installs (:func:`installs_on_boot`), and the machines
    whose hostname ``""`` was copied as none (:func:`empty_hostnames_unset`)."""
    checks: list[TableCheck]
    installs_on_boot: dict[str, int]
    hostnames_unset: list[str] = field(default_factory=list)


def empty_hostnames_unset(rows: Rows) -> list[str]:
    """The machines of ``rows`` stored with the hostname ``""`` (an API before S43 stored
    it; hand SQL) made nameless in ``rows``, column and document: the refs (first MAC, else
    id) of those changed. The API refuses ``""`` ("send null for none") and the servers
    keep it apart from none (frames, the hostname index holds one ``""``): a copy, a
    restore's or a move's, is where it goes the API's way, said by the copy. The checksums
    prove the target holds ``rows`` as made here."""
    columns = TABLES[0][1]
    ident, mac, hostname, data = (columns.index(c) for c in ("id", "mac", "hostname", "data"))
    machines = rows["machines"]
    unset: list[str] = []
    for i, row in enumerate(machines):
        text = row[data]
        if row[hostname] != "" and '"hostname":""' not in text and '"hostname": ""' not in text:
            continue  # the usual row: no parse of its document
        document = json.loads(text)
        if document.get("hostname") == "":
            del document["hostname"]
            text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        elif row[hostname] != "":
            continue  # "" elsewhere in the document (a label's value, a product string)
        changed = list(row)
        changed[hostname], changed[data] = None, text
        machines[i] = tuple(changed)
        unset.append(row[mac] or row[ident])
    return unset


def installs_on_boot(rows: Rows) -> dict[str, int]:
    """How many of the machines in ``rows`` are, by state, in one whose next network boot
    is given an install (a plan or the install under way asked again). A copy restoring a
    backup brings machines back as they were then: one that installed since is in such a
    state again and installs again, its disk wiped, when it next boots from the network."""
    from netboot import lifecycle
    from netboot.model import MachineState

    column = TABLES[0][1].index("state")
    counts: dict[str, int] = {}
    for row in rows["machines"]:
        state = str(row[column])
        counts[state] = counts.get(state, 0) + 1
    return {state: n for state, n in sorted(counts.items())
            if state in MachineState._value2member_map_ and any(
                lifecycle.allows(MachineState(state), step) for step in (
                    lifecycle.Trigger.INSTALL_PLAN, lifecycle.Trigger.INSTALL_AGAIN))}


async def copy(source: str, target: str, *, force: bool = False,
               peer: pg_dsn.PeerSettings | None = None) -> Copied:
    """Copy every row of ``source`` into ``target`` (each a DSN or an SQLite path; a DSN's
    connections set up by ``peer``, the configured inventory.postgresql), both migrated
    first; Conflict if the target holds anything and ``force`` is not given (then
    its rows are replaced, in the same transaction). Raises StoreError naming the table if
    the target's counts or checksums differ from the source's afterwards."""
    if describe(source) == describe(target) or (
            not is_dsn(source) and not is_dsn(target)
            and Path(source).resolve() == Path(target).resolve()):
        raise Conflict("--from and --to name the same inventory")
    _needs_driver(source, target)
    if not is_dsn(source) and not Path(source).is_file():
        raise StoreError(f"{source}: no such inventory file")
    if not is_dsn(source) and Path(source).stat().st_size == 0:
        # Migrated, it would be an empty inventory, copied as one over a restore's target.
        raise StoreError(f"{source}: an empty file, not an inventory (a copy killed as it "
                         "gave the file its name, on a file system without hard links?)")
    peer = peer or pg_dsn.PeerSettings()
    into = target
    if not is_dsn(target):
        folder = Path(target).parent
        if not folder.is_dir():
            # Named as the option given, not as the server's inventory (whose message says
            # to move server.data_dir): a first backup's /backup is made by hand.
            raise ConfigError(f"the directory {folder} does not exist", source="--to",
                              fix=f"create it (install -d -m 0700 {folder}), or name a file "
                                  "in another directory")
        if not Path(target).exists():
            into = str(_spare_file(Path(target)))
    try:
        for spec in (source, into):
            await migrate(spec, peer)
        rows = await _read(source, peer)
        unset = empty_hostnames_unset(rows)
        await _write(into, rows, force=force, peer=peer)
        expected = checksums(rows)
        found = checksums(await _read(into, peer))
        for want, got in zip(expected, found, strict=True):
            if want != got:
                raise StoreError(f"copy to {describe(target)} differs in table {want.table}: "
                                 f"{got.rows} rows (sha256 {got.sha256[:16]}) where the "
                                 f"source has {want.rows} (sha256 {want.sha256[:16]})")
        if into != target:
            await asyncio.to_thread(_put_in_place, Path(into), Path(target))
    finally:
        if into != target:
            _remove_spare(Path(into))
    return Copied(expected, installs_on_boot(rows), unset)


def _spare_file(target: Path) -> Path:
    """A new file beside ``target`` (``.NAME.copy-*``, 0600) that a copy into a new SQLite
    file is made in, whole, before it takes ``target``'s name (:func:`_put_in_place`).
    Made at ``target``, a copy killed (kill -9, a reboot, the OOM killer) after its
    migration and before its one transaction committed left a valid, empty inventory under
    the backup's name, which a restore then copied without a word ("counts and checksums
    equal", 0 machines) over the inventory it was to bring back (s45-integrity). 0600 as
    the server's netboot.db: a copy holds the audit log, serials and sealed secrets (its
    -wal and -shm take the file's mode)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.copy-", dir=target.parent)
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror}") from exc
    os.close(fd)
    return Path(name)


def _put_in_place(spare: Path, target: Path) -> None:
    """The finished copy ``spare`` given ``target``'s name, which must still be free: its
    WAL moved into the file first (the -wal and -shm files go by the name), then a link
    (refusing a name that exists, where a rename would replace it) and the directory
    synced (durable.link_new), so that the name is there after a power loss too."""
    try:
        conn = sqlite3.connect(spare, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()  # the last connection: its -wal and -shm removed
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write {target}: {exc}") from exc
    for side in ("-wal", "-shm"):
        if spare.with_name(spare.name + side).exists():
            raise StoreError(f"cannot write {target}: {spare}{side} was left by SQLite; "
                             "nothing was written to the target")
    try:
        link_new(spare, target)
    except FileExistsError:
        raise Conflict(f"{target} was made by another program during the copy; nothing was "
                       "written to it: copy again to another name") from None
    except OSError as exc:
        raise StoreError(f"cannot write {target}: {exc.strerror}") from exc


def _remove_spare(spare: Path) -> None:
    for path in (spare, spare.with_name(spare.name + "-wal"),
                 spare.with_name(spare.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def checksums(rows: Rows) -> list[TableCheck]:
    out = []
    for table, _ in TABLES:
        canonical = sorted(json.dumps([_canon(v) for v in row], ensure_ascii=False)
                           for row in rows[table])
        digest = hashlib.sha256("\n".join(canonical).encode()).hexdigest()
        out.append(TableCheck(table, len(canonical), digest))
    return out


def _canon(value: Any) -> Any:
    # SQLite may hand back 5 where PostgreSQL has 5.0 (REAL affinity keeps integers as such).
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else value


async def _read(spec: str, peer: pg_dsn.PeerSettings) -> Rows:
    if is_dsn(spec):
        return await _pg(spec, _pg_read, peer)
    return await asyncio.to_thread(_sqlite_read, Path(spec))


async def _write(spec: str, rows: Rows, *, force: bool, peer: pg_dsn.PeerSettings) -> None:
    if is_dsn(spec):
        async def write(conn: Any) -> None:
            await _pg_write(conn, rows, force, describe(spec), peer)

        await _pg(spec, write, peer)
    else:
        await asyncio.to_thread(_sqlite_write, Path(spec), rows, force)


def _refuse(name: str, counts: Sequence[tuple[str, int]]) -> Conflict:
    held = ", ".join(f"{n} {t}" for t, n in counts if n)
    return Conflict(f"{name} is not empty ({held}); give --force to replace its contents")


# --- SQLite ---------------------------------------------------------------------------------


def _sqlite_read(path: Path) -> Rows:
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN")  # one snapshot of every table
            out = {table: [tuple(r) for r in conn.execute(
                f"SELECT {', '.join(cols)} FROM {table}")]  # noqa: S608 - constant names
                for table, cols in TABLES}
            conn.execute("COMMIT")
            return out
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def _sqlite_write(path: Path, rows: Rows, force: bool) -> None:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                counts = [(t, conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # noqa: S608
                          for t, _ in TABLES]
                if any(n for _, n in counts):
                    if not force:
                        raise _refuse(str(path), counts)
                    for table, _ in reversed(TABLES):
                        conn.execute(f"DELETE FROM {table}")  # noqa: S608
                for table, cols in TABLES:
                    marks = ", ".join("?" * len(cols))
                    conn.executemany(f"INSERT INTO {table} ({', '.join(cols)})"  # noqa: S608
                                     f" VALUES ({marks})", rows[table])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write {path}: {exc}") from exc


# --- PostgreSQL -----------------------------------------------------------------------------


async def _pg(spec: str, work: Callable[[Any], Awaitable[_R]], peer: pg_dsn.PeerSettings,
              ) -> _R:
    """Run ``work`` on one connection to ``spec``, with the configured ``peer`` settings (as
    the store's connections have them: a copy's COPY may rightly be long, a server gone or
    silent is noticed all the same: postgres.watched); failures are StoreError without the
    DSN."""
    import asyncpg

    from netboot.inventory.postgres import connect, reason, watched

    name = describe(spec)
    failed = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
    try:
        conn = await connect(spec, peer)
    except failed as exc:
        raise StoreError(f"cannot open inventory {name}: {reason(exc)}") from exc
    said: list[str] = []
    try:
        async with watched(spec, peer, conn) as said:
            return await work(conn)
    except failed as exc:
        why = reason(exc) + "".join(f": {s}" for s in said)
        raise StoreError(f"inventory {name}: {why}") from exc
    finally:
        conn.terminate() if conn.is_closed() else await conn.close()


async def _pg_read(conn: Any) -> Rows:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return {table: [tuple(r) for r in await conn.fetch(
            f"SELECT {', '.join(cols)} FROM {table}")]  # noqa: S608 - constant names
            for table, cols in TABLES}


async def _pg_write(conn: Any, rows: Rows, force: bool, name: str,
                    peer: pg_dsn.PeerSettings) -> None:
    from netboot.inventory.postgres import WRITE_LOCK, copy_records

    async with conn.transaction():
        # The writers' lock: no server writes half-way through (see postgres.py).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
        counts = [(t, int(await conn.fetchval(f"SELECT count(*) FROM {t}")))  # noqa: S608
                  for t, _ in TABLES]
        if any(n for _, n in counts):
            if not force:
                raise _refuse(name, counts)
            # DELETE, not TRUNCATE: the change feed's triggers see deletes, not truncates.
            for table, _ in reversed(TABLES):
                await conn.execute(f"DELETE FROM {table}")  # noqa: S608
        for table, cols in TABLES:
            if rows[table]:
                await copy_records(conn, peer, table, rows[table], cols)
        for table in _SERIAL:
            # Later rows get ids after the copied ones, keeping insertion order.
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"  # noqa: S608
                f" coalesce(max(id), 0) + 1, false) FROM {table}")
