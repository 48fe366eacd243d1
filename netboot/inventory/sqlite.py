"""The default inventory: one SQLite file in WAL mode, safe for several processes.

Why it looks like this:

* All sqlite work runs on ONE worker thread that owns the one connection: sqlite3 connections
  are not shareable across threads, and one thread serialises this process's writes so the
  event loop never blocks on disk or on another process's lock.
* WAL lets readers proceed while a writer commits (the HTTP API keeps answering during a bulk
  import); ``busy_timeout`` makes a second process wait for the write lock instead of failing
  at once; ``synchronous=NORMAL`` is durable across process crashes in WAL mode and loses at
  most the last commits on power loss, which a re-sent boot event tolerates.
* Every write takes the write lock up front (``BEGIN IMMEDIATE``): a deferred transaction that
  reads and then writes can fail with SQLITE_BUSY without waiting, whatever the timeout.
* Schema changes are an ordered list of migrations recorded in ``PRAGMA user_version``, applied
  inside the same write transaction that re-reads the version, so two processes opening a new
  file at once migrate it once. A file newer than this code is refused, never downgraded.
* Model values are kept as JSON produced by :mod:`netboot.inventory.codec`; the columns beside
  it exist only to be indexed (hostname uniqueness, filters).
* A cluster's join token, and a machine's install token while its install is under way, are
  sealed (``Sealer``, injected) in the stored JSON and opened on read, each bound to its
  cluster or machine: the file, its WAL and its backups never hold them in clear. Callers
  see plain values.
  Tokens an older netboot stored in clear are sealed by :meth:`SqliteStore.seal_clear_tokens`
  (start-up calls it once the key is in its file and is the inventory's, not at open: a
  token sealed with a key not yet written was lost with it by a crash before the write),
  with ``secure_delete`` on (it zeroes the space a rewritten row leaves behind) and the WAL
  checkpointed into the file and truncated, so no clear copy survives in either.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import math
import os
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from netboot import identity
from netboot.arrival import arrival
from netboot.errors import (
    Conflict,
    NetbootError,
    NotFound,
    StoreError,
    StoreFull,
    ValidationError,
)
from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory.base import (
    DOCUMENT_TABLES,
    INSTALLS_UNDER_WAY,
    REFUSED_CLAIMS,
    REFUSED_CLAIMS_END,
    SINCE_SQLITE,
    STALE_SETTINGS,
    Batch,
    Changes,
    EventListener,
    InstallsSince,
    MachineFilter,
    Sealer,
    StrayRow,
    check_unchanged,
    fixed_taken,
    in_use,
    mend_stray,
    not_json,
)
from netboot.inventory.committed import CommittedHere
from netboot.inventory.sealed import Sealed, join_token_context
from netboot.inventory.signal import Signal, wait_until
from netboot.model import (
    ApiToken,
    AuditEntry,
    Cluster,
    Event,
    Group,
    Lease,
    Machine,
    MachineState,
    Profile,
    new_machine_id,
)
from netboot.unstoppable import told

log = logging.getLogger(__name__)

_R = TypeVar("_R")

BUSY_TIMEOUT_MS = 5000
# How long a write cancelled once its thread began it is waited for (_outcome): its commit
# waits at most BUSY_TIMEOUT_MS for the lock, then writes (milliseconds for a group commit).
# Bounded so that a shutdown cannot hang on a thread that never returns.
CANCELLED_WRITE_WAIT = 2 * BUSY_TIMEOUT_MS / 1000
# How long a sync waits for a group commit of this store's under way to be noted, rather
# than read it back (changes_since): a group commit's transaction takes ~0.2-5 ms in a storm
# (benchmarks/README.md, s35-echo); a writer waiting for another process's lock (up to
# BUSY_TIMEOUT_MS) is not waited for past this.
NOTE_WAIT = 0.02
# How long an API write of a fixed_ipv4 waits for another process's (fixed_addresses_held),
# polled every FIXED_LOCK_POLL s: the holder's check and write take milliseconds.
FIXED_LOCK_WAIT = 30.0
FIXED_LOCK_POLL = 0.005
# The WAL index (-shm) is mapped into memory in 32 KiB regions, one per 4062 WAL frames. Its
# pages are reserved on disk up to this size at open, so that a later full disk cannot turn
# a touch of a mapped page into a SIGBUS (the checkpoints keep the WAL within WAL_FRAMES):
# 16 regions, 512 KiB of disk, index 65,502 frames (mapped only as the WAL reaches them).
# The WAL passes WAL_FRAMES while a checkpointer pass holds the checkpoint lock (the
# writer's own attempt then returns at once and comes again after the next commit): passes
# of 4,000 frames took up to 0.3-0.9 s under load, ~18,000 frames of first installs a
# second (s33-tail), so the reserve leaves 17,500 frames of room past the bound.
SHM_RESERVE = 16 * 32768
# The pager's page cache (SQLite's default is 2,000 KiB a connection): the view's load reads
# the machines' pages once each, in order, and the cache held ~2 MiB of them for good after
# (issue 10: < 150 MiB resident with 100,000 machines).
PAGER_CACHE_KIB = 256
# Free space in the inventory's directory below which it is taken as full (a write failed
# with SQLITE_FULL, or start-up found less): room for ~250 WAL frames of 4 KiB, ~70 first
# installs (~3.7 frames each, s33-tail). Until the filesystem has this much again, writes are
# reported stuck (stuck_writes), so /healthz says "degraded" and the boot path answers known
# machines from memory at once instead of failing a write per request.
FREE_TO_WRITE = 1 << 20
# How often wait_for_changes looks for commits of other processes.
POLL_SECONDS = 0.25
# WAL frames not yet copied into the database past which they are (SQLite's own
# autocheckpoint threshold, which netboot used until the checkpoint left the commit), and
# the WAL's length past which the writer itself checkpoints (SqliteStore._checkpoint_due):
# within the -shm's first twelve regions (4062 + 11 * 4096 frames) and so within
# SHM_RESERVE's thirteen, a WAL of ~190 MiB at most (on disk and in the page cache, not
# resident). Each time the writer catches the WAL up, every group commit waits for it (it
# copies what the checkpointer has not and syncs twice): 10-40 ms, up to 80-140 under
# load, 43-64 times in 30,000 first installs of a storm with 4,000 frames, a third as often
# with 12,000 (benchmarks/README.md, s21-writer). At 12,000 a storm of first installs
# (~3.7 frames each) filled the WAL every ~0.7 s, and 0.8-4.8 % of the first installs and
# configs of a 100,000-machine storm on the wire were answered only after such a catch-up:
# over 1 %, so it set their p99 (s33-tail). At 48,000, 0-0.8 %. The passes come every
# 4,000 frames (were 1,000): a page that many commits rewrite (the b-trees' interior
# pages, the tails of events and changes) is copied once a pass: 0.3-0.7x the bytes
# written to disk a first install or config, 0.92x the CPU (s33-tail). Within a pass of
# the bound they follow each other, so that the writer's catch-up copies only the last
# pass's lag (_checkpoint_due).
CHECKPOINT_FRAMES = 4000
WAL_FRAMES = 12 * CHECKPOINT_FRAMES
# The WAL index (-shm) begins with two copies of its 48-byte header (mxFrame, the frames in
# the WAL, at offset 16) and then the checkpoint information (nBackfill, the frames copied
# into the database, at offset 96), in native byte order: SQLite's "WAL-index format"
# (walformat.html, section 2.2), shared by every process that opens the file.
_WAL_INDEX = struct.Struct("=I12xI76xI")
_WAL_INDEX_VERSION = 3007000

# A migration step: SQL text, or a function for what SQL alone cannot do (re-encode documents).
Step = str | Callable[[sqlite3.Connection], None]


def _feed_ends(conn: sqlite3.Connection) -> tuple[int | None, int | None]:
    """The change feed's first and last positions (None, None: empty). Apart: SQLite
    answers a lone min() or max() from the primary key's ends, both in one statement by a
    scan of the feed (~9 ms at 100,000 rows, s44-integrity), which the view's read of
    changes made at each sync after another connection's commit."""
    first = conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
    last = conn.execute("SELECT max(seq) FROM changes").fetchone()[0]
    return first, last


def _change_trigger(table: str, key: str, op: str) -> str:
    """A trigger recording each ``op`` on ``table`` in the change feed, by the row's key (both
    keys when an update renames it)."""
    rows = {"INSERT": ("new",), "DELETE": ("old",), "UPDATE": ("old", "new")}[op]
    body = "".join(f"INSERT INTO changes (tbl, key) SELECT '{table}', {row}.{key}"
                   + (f" WHERE old.{key} IS NOT new.{key}" if op == "UPDATE" and row == "old"
                      else "") + "; " for row in rows)
    return f"CREATE TRIGGER {table}_{op.lower()}_changes AFTER {op} ON {table} BEGIN {body}END"


# Ordered; index i brings a database from user_version i to i + 1. Append, never edit: a
# released migration has already run on someone's disk.
MIGRATIONS: tuple[tuple[Step, ...], ...] = (
    (
        """CREATE TABLE machines (
            mac TEXT PRIMARY KEY NOT NULL,
            hostname TEXT,
            state TEXT NOT NULL,
            cluster TEXT,
            data TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        ) WITHOUT ROWID""",
        # Case-insensitive uniqueness (RFC 4343: DNS names compare without case). lower()
        # folds ASCII only; hostnames are ASCII (RFC 1123, IDNs arrive as punycode).
        "CREATE UNIQUE INDEX machines_hostname ON machines (lower(hostname))"
        " WHERE hostname IS NOT NULL",
        "CREATE INDEX machines_state ON machines (state, mac)",
        "CREATE INDEX machines_cluster ON machines (cluster, mac)",
        # A row per label so that filters are exact string matches on an index, with no
        # JSON-path quoting of keys that contain dots or quotes.
        """CREATE TABLE machine_labels (
            mac TEXT NOT NULL REFERENCES machines (mac) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (mac, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX machine_labels_kv ON machine_labels (key, value, mac)",
        "CREATE TABLE profiles (name TEXT PRIMARY KEY NOT NULL, data TEXT NOT NULL)",
        "CREATE TABLE clusters (name TEXT PRIMARY KEY NOT NULL, data TEXT NOT NULL)",
        "CREATE TABLE groups (name TEXT PRIMARY KEY NOT NULL, data TEXT NOT NULL)",
        # No foreign key to machines: unknown machines have events too (discovery, ignore),
        # which is what `netboot explain` shows for a device nobody enrolled.
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            mac TEXT NOT NULL,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX events_mac ON events (mac, id)",
        # Leases may belong to machines not in the inventory (authoritative DHCP for anyone).
        """CREATE TABLE leases (
            mac TEXT PRIMARY KEY NOT NULL,
            ipv4 TEXT NOT NULL UNIQUE,
            expires REAL NOT NULL,
            hostname TEXT
        )""",
        "CREATE TABLE settings (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)",
    ),
    (
        # Lookups by firmware identity on the boot path (U-Boot's pxelinux.cfg/<uuid>, a
        # Raspberry Pi's serial prefix): expression indexes over the stored document, so
        # no write path changes and no scan of every machine per TFTP request.
        "CREATE INDEX machines_uuid ON machines (json_extract(data, '$.uuid'))",
        "CREATE INDEX machines_serial ON machines (json_extract(data, '$.serial'))",
    ),
    (
        # A machine is no longer its MAC: it has an id, any number of NICs, and is matched by
        # MAC, UUID, serial or asset tag (netboot.identity). The machines table is rebuilt
        # with the id as key; machine_keys indexes every identifier with a unique
        # (kind, value), which is what refuses two machines claiming one MAC or serial.
        "ALTER TABLE machines RENAME TO machines_v2",
        "ALTER TABLE machine_labels RENAME TO machine_labels_v2",
        "DROP INDEX machines_hostname",
        "DROP INDEX machines_state",
        "DROP INDEX machines_cluster",
        "DROP INDEX machines_uuid",
        "DROP INDEX machines_serial",
        "DROP INDEX machine_labels_kv",
        """CREATE TABLE machines (
            id TEXT PRIMARY KEY NOT NULL,
            mac TEXT,
            hostname TEXT,
            state TEXT NOT NULL,
            cluster TEXT,
            data TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX machines_hostname ON machines (lower(hostname))"
        " WHERE hostname IS NOT NULL",
        # `mac` is the primary NIC, kept only to list machines in MAC order.
        "CREATE INDEX machines_order ON machines (mac IS NULL, mac, id)",
        # Machines enrolled without a MAC: counted on the DHCP path of every unknown NIC.
        "CREATE INDEX machines_no_mac ON machines (id) WHERE mac IS NULL",
        "CREATE INDEX machines_state ON machines (state, mac)",
        "CREATE INDEX machines_cluster ON machines (cluster, mac)",
        "CREATE INDEX machines_uuid ON machines (json_extract(data, '$.uuid'))",
        "CREATE INDEX machines_serial ON machines (json_extract(data, '$.serial'))",
        """CREATE TABLE machine_keys (
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            machine TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            PRIMARY KEY (kind, value)
        ) WITHOUT ROWID""",
        "CREATE INDEX machine_keys_machine ON machine_keys (machine)",
        """CREATE TABLE machine_labels (
            machine TEXT NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (machine, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX machine_labels_kv ON machine_labels (key, value, machine)",
        """CREATE TABLE events_v3 (
            id INTEGER PRIMARY KEY,
            machine TEXT NOT NULL,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        lambda conn: _machines_by_id(conn),  # noqa: PLW0108 - defined below, bound at run time
        # Events of a MAC no machine has (an unknown device, nothing recorded) keep the MAC
        # as their key: they stay in the file, reachable by nobody, as before.
        "INSERT INTO events_v3 (id, machine, time, kind, message, data)"
        " SELECT e.id, coalesce(k.machine, e.mac), e.time, e.kind, e.message, e.data"
        " FROM events e LEFT JOIN machine_keys k ON k.kind = 'mac' AND k.value = e.mac",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
        "CREATE INDEX events_machine ON events (machine, id)",
        # The init node of a managed cluster was recorded by MAC.
        "UPDATE settings SET value = (SELECT k.machine FROM machine_keys k"
        " WHERE k.kind = 'mac' AND k.value = settings.value)"
        " WHERE key LIKE 'cluster-init/%' AND EXISTS (SELECT 1 FROM machine_keys k"
        " WHERE k.kind = 'mac' AND k.value = settings.value)",
        "DROP TABLE machine_labels_v2",
        "DROP TABLE machines_v2",
    ),
    (
        # API tokens by name, found by the sha256 of the presented value (never the value).
        """CREATE TABLE api_tokens (
            name TEXT PRIMARY KEY NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            scope TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL,
            last_used REAL
        )""",
        # The one admin token of earlier versions becomes the token named "admin": the
        # operator's scripts keep working, and it can now be listed and revoked.
        "INSERT INTO api_tokens (name, sha256, scope, created)"
        " SELECT 'admin', value, 'admin', CAST(strftime('%s', 'now') AS REAL)"
        " FROM settings WHERE key = 'admin-token-sha256'",
        "DELETE FROM settings WHERE key = 'admin-token-sha256'",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            peer TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
        "CREATE INDEX audit_time ON audit (time, id)",
    ),
    (
        # The change feed (netboot.inventory.base.ChangeFeed): a row per changed object,
        # written by triggers inside the committing transaction, so every writer (this
        # process, the CLI in another, an older tool) records its changes and a reader sees a
        # change exactly when it sees the commit. AUTOINCREMENT: seqs never go back, and a
        # gap can only mean pruning.
        "CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " tbl TEXT NOT NULL, key TEXT NOT NULL)",
        *(_change_trigger(table, key, op)
          for table, key in (("machines", "id"), ("profiles", "name"), ("clusters", "name"),
                             ("groups", "name"), ("settings", "key"))
          for op in ("INSERT", "UPDATE", "DELETE")),
    ),
    (
        # The firmware-identity indexes of migration 2 are superseded by machine_keys, which
        # every lookup by UUID, serial or asset tag uses (_machine_by). Only the list filters
        # MachineFilter.uuid/serials still read those fields, and nothing on a hot path sets
        # them: they scan. Two expression indexes parsed every machine's whole document on
        # every write, a quarter of a bulk import's SQLite time (issue 10).
        "DROP INDEX machines_uuid",
        "DROP INDEX machines_serial",
    ),
    (
        # The (state, mac) index moved an entry between two random leaves at every state
        # change of a boot storm (enrolled -> booting -> installing -> installed): ~2 of a
        # first install's ~4-6 WAL frames, a third of the config step's (benchmarks/README.md,
        # s12-wal, s17-state). Counts by state come from the serving process's view, else
        # from one grouped scan (state_counts); only the rare states that are listed by state
        # keep an index (the discovery limit pages through the discovered records, the
        # status lists the failed), which no storm transition enters or leaves. A query
        # uses it only when it names this exact condition (_RARE_STATES).
        "DROP INDEX machines_state",
        "CREATE INDEX machines_rare_states ON machines (state, mac IS NULL, mac, id)"
        " WHERE state IN ('discovered', 'failed')",
    ),
    (
        # One fixed_ipv4 per address, refused by the file itself (s42-integrity): a writer
        # that does not take netboot's fixed-address lock (hand SQL setting the column, a
        # tool of its own) can no longer give two machines one address, which authoritative
        # DHCP would lease to both. A column the writers set beside the document, not an
        # expression index over it: SQLite would evaluate json_extract on every write of a
        # machine, the boot path's included (~12,000 instructions an update, callgrind).
        # An older netboot cannot write the file once this migration ran (user_version).
        "ALTER TABLE machines ADD COLUMN fixed_ipv4 TEXT",
        # A file that holds one address twice (stored before the API refused it, s40-net)
        # keeps every machine as it is: the oldest holder's column is set, the others' left
        # NULL (their documents keep the address; DHCP gives it to the first that asks), and
        # start-up names them all with the fix (service.warn_of_shared_fixed_addresses).
        # Their writes keep it so (_fixed_column) until it is changed.
        "UPDATE machines SET fixed_ipv4 = json_extract(data, '$.fixed_ipv4') WHERE id IN"
        " (SELECT id FROM (SELECT id, row_number() OVER (PARTITION BY"
        " json_extract(data, '$.fixed_ipv4') ORDER BY created, id) AS n FROM machines"
        " WHERE json_extract(data, '$.fixed_ipv4') IS NOT NULL) WHERE n = 1)",
        "CREATE UNIQUE INDEX machines_fixed_ipv4 ON machines (fixed_ipv4)"
        " WHERE fixed_ipv4 IS NOT NULL",
        # The profile a machine names, a column beside the document for the same reason:
        # a profile's delete finds a machine naming it in its write transaction
        # (_delete_named) by this index, where it read every machine's document with the
        # write lock held (81-150 ms of CPU at 100,000 machines, s41-integrity), which every
        # boot's write waited for.
        "ALTER TABLE machines ADD COLUMN profile TEXT",
        "UPDATE machines SET profile = json_extract(data, '$.profile')"
        " WHERE json_extract(data, '$.profile') IS NOT NULL",
        "CREATE INDEX machines_profile ON machines (profile) WHERE profile IS NOT NULL",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

# The partial index's condition as queries must state it for SQLite to use the index (its
# planner proves a query's WHERE implies the index's by matching terms, not by value), and
# the states it holds.
_RARE_STATES = "m.state IN ('discovered', 'failed')"
RARE_STATES = frozenset({MachineState.DISCOVERED, MachineState.FAILED})

_INSERT_MACHINE = (
    "INSERT INTO machines (id, mac, hostname, state, cluster, data, created, updated,"
    " fixed_ipv4, profile) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Migration 3's insert, as it ran then (the columns of that schema).
_INSERT_MACHINE_V3 = (
    "INSERT INTO machines (id, mac, hostname, state, cluster, data, created, updated)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_MACHINE = (
    "UPDATE machines SET mac = ?, hostname = ?, state = ?, cluster = ?, data = ?, created = ?,"
    " updated = ?, fixed_ipv4 = ?, profile = ? WHERE id = ?"
)
# The stored columns an update compares with, by id, for every machine of a group at once (one
# statement, not one per machine), with the parts of the stored document that the label and
# identifier rows are made of, extracted by SQLite's JSON functions (json_extract, not the
# -> operators of SQLite 3.38): in C, outside the GIL
# that the event loop waits for (json.loads of the whole document in Python was ~4 us of the
# writer's GIL time per update, a tenth of a first install's on the writer). Those five
# parts as one JSON array (one json_extract of five paths), compared as text with the one
# the new document gives (codec.claims_json, made with it by codec.machine_texts): SQLite
# 3.40 parsed a document ~2.45 times for five json_extracts of it (its cache of parsed
# documents is per call site), and Python's _sqlite gives the GIL up and takes it back
# around each column of each row read.
# Not the document itself: an update that leaves it as it was leaves those parts too.
_STORED_COLUMNS = (
    "SELECT id, mac, hostname, state, cluster, json_extract(data, '$.labels', '$.macs',"
    " '$.uuid', '$.serial', '$.asset'), updated, fixed_ipv4, profile FROM machines"
    " WHERE id IN (SELECT value FROM json_each(?))")
# The indexed columns that an update sets, by which of them changed: SQLite rewrites the
# entries of every index on a column named in SET, even to its own value (an install, which
# changes the state alone, rewrote the MAC-order, hostname and cluster indexes too).
_INDEXED = ("mac", "hostname", "state", "cluster", "fixed_ipv4", "profile")
_UPDATE_CHANGED = {
    changed: "UPDATE machines SET " + "".join(f"{c} = ?, " for c in changed)  # noqa: S608 - names from _INDEXED
    + "data = ?, created = ?, updated = ? WHERE id = ?"
    for changed in (tuple(c for c, keep in zip(_INDEXED, bits, strict=True) if keep)
                    for bits in itertools.product((False, True), repeat=len(_INDEXED)))}
_STATE_ONLY = ("state",)
_INSERT_LABEL = "INSERT INTO machine_labels (machine, key, value) VALUES (?, ?, ?)"
_DELETE_LABELS = "DELETE FROM machine_labels WHERE machine = ?"
_INSERT_KEY = "INSERT INTO machine_keys (kind, value, machine) VALUES (?, ?, ?)"
_DELETE_KEYS = "DELETE FROM machine_keys WHERE machine = ?"

_TABLES = {"profile": "profiles", "cluster": "clusters", "group": "groups"}


class _Row:
    """A machine ready for SQL: column values, JSON text (or what changes in the stored
    one), label and identifier rows."""

    __slots__ = ("_token", "base", "claims", "created", "data", "delta", "id", "mac",
                 "machine", "updated")

    def __init__(self, machine: Machine, install_token: str | None = None,
                 times: dict[float, str] | None = None, update: bool = False,
                 base: Machine | None = None, learnt: bool = False) -> None:
        # What would not read back is refused now (see codec's docstring), checked in place.
        # ``install_token``: what the document holds in place of the machine's own (sealed);
        # ``times``: the texts of times, shared by a batch's rows (codec.machine_json).
        # ``update`` by position: a class called with a keyword is handed it in a dict
        # (type_call), ~1,000 of the writer's instructions a row of a group commit.
        # ``base``: the machine as stored (_bases), of which only what changed is written
        # (codec.machine_delta): its other fields, labels and identifiers are the stored
        # ones but those it adds (their rows inserted, ``delta[3]``), so the claims are not
        # compared (None), and the document is made only if the group is written row by
        # row (_slow_batch). ``learnt``: ``machine`` is ``base`` with learnt facts alone
        # (Batch.learnt), whose other fields are not compared.
        self.delta = None if base is None else codec.machine_delta(base, machine, install_token,
                                                                   learnt)
        self.base = base
        if self.delta is not None:
            self.machine = m = machine
            self.data: str | None = None
            self._token = install_token
            self.claims: str | None = None
        else:
            self.machine = m = codec.stored_machine(machine)
            # The document, and an update's claims' text (compared with the stored
            # document's, _update_group; "" for a new machine's, never compared).
            self.data, self.claims = codec.machine_texts(m, install_token, times,
                                                         claims=update)
        self.id = m.id
        self.mac = m.macs[0].hex(":") if m.macs else None  # its str(), without the call
        self.created = m.created
        self.updated = m.updated

    def document(self) -> str:
        """The whole document (for a row changed in place, made when it is written whole)."""
        if self.data is None:
            self.data = codec.machine_json(self.machine, self._token)
        return self.data

    # Made when written, not with the row: most updates leave both as they are (_update_rows).
    @property
    def labels(self) -> list[tuple[str, str, str]]:
        return [(self.id, k, v) for k, v in self.machine.labels.items()]

    @property
    def keys(self) -> list[tuple[str, str, str]]:
        return [(kind, value, self.id) for kind, value in claims(self.machine)]

    def insert_params(self) -> tuple[Any, ...]:
        m = self.machine
        state, cluster = m.state.value, m.cluster
        return (self.id, self.mac, m.hostname, state, cluster, self.document(), self.created,
                self.updated, m.fixed_ipv4, m.profile)

    def update_params(self, fixed: str | None) -> tuple[Any, ...]:
        """``fixed``: the fixed_ipv4 column's value (_fixed_column)."""
        m = self.machine
        state, cluster = m.state.value, m.cluster
        return (self.mac, m.hostname, state, cluster, self.document(), self.created,
                self.updated, fixed, m.profile, self.id)


class _Retry(Exception):
    """The fast path of a batch hit a problem; replay row by row to name it."""


class SqliteStore:
    """:class:`~netboot.inventory.base.Store` on one SQLite file.

    The constructor does no I/O; :meth:`open` creates the worker thread, opens the file and
    migrates it; :meth:`close` closes the connection and stops the thread.
    """

    def __init__(self, path: str | Path, *, sealer: Sealer | None = None,
                 listener: EventListener | None = None,
                 free_space: Callable[[Path], int] | None = None) -> None:
        self.path = Path(path)
        # Bytes an unprivileged writer may still use in a directory (tests give their own).
        self._free_space = free_space or _free_space
        # Why writes fail for a full filesystem (set by the thread whose write or start-up
        # found it, read on the event loop's: a str or None, replaced whole), until
        # stuck_writes finds FREE_TO_WRITE free again.
        self._full: str | None = None
        self._sealer = sealer
        self._sealed = Sealed(sealer)
        self._listener = listener
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
        # Reads run on a second thread and connection: in WAL mode they never wait for a
        # writer, so a DHCP answer's machine lookup is not queued behind a 100k-row import.
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None  # touched only on the reader thread
        # The view's load reads the whole inventory by pages on a thread and connection of
        # its own (opened at its first page): on the reader thread the decisions of a storm
        # at start-up queued behind each page and the pages behind them, and the view never
        # finished loading while the storm lasted.
        self._pager: ThreadPoolExecutor | None = None
        self._pconn: sqlite3.Connection | None = None  # touched only on the pager thread
        # The pages' machines share their equal label sets and creation times (the pager
        # thread's alone): with 100,000 bulk-imported machines in the view, ~3 MiB.
        self._page_maps = codec.SharedMaps()
        # A bulk import's checkpoint runs after its commit, on a thread and connection of its
        # own (see _apply_batch): the import and the writer's next commits do not wait for it.
        self._checkpointer: ThreadPoolExecutor | None = None
        self._cconn: sqlite3.Connection | None = None  # touched only on that thread
        # A checkpoint asked of the checkpointer, of the writer, and not begun yet
        # (_checkpoint_due, on the writer's thread).
        self._checkpoint_asked = False
        self._writer_checkpoints = False
        self._bulk_written = False  # a bulk import committed: its checkpoint is the checkpointer's
        self._checkpointer_made = threading.Lock()  # made by the loop's or the writer's thread
        self._closing = False  # from close() on, no checkpointer is made
        self._shm = self.path.with_name(self.path.name + "-shm")
        self._shm_size = 0  # what SQLite may have mapped; the file must not shrink below it
        # One descriptor of -shm, open from open() to close(). Closing ANY descriptor of a
        # file drops every POSIX (fcntl) lock this process holds on it (POSIX.1-2008,
        # fcntl(2) "Advisory record locking"), SQLite's DMS lock on -shm included; a second
        # process then believes it is the first user, truncates -shm to 3 bytes and this
        # process's mapping faults (SIGBUS). So the reservation never opens and closes one.
        self._shm_fd: int | None = None
        # The reader thread's last full read of the change feed: its data_version then, and
        # the newest seq; while data_version stays, nothing was committed and nothing is read.
        self._data_version = -1
        self._read_seq = -1
        self._feed_seq = -1  # the feed's last answer (event loop): the newest seq then
        # The machines this store committed, by feed position: a sync after them is answered
        # with them instead of reading them back (committed.py).
        self._here = CommittedHere()
        # Group commits submitted to the writer and not yet returned, in order (_run).
        self._noting: list[Future[Any]] = []
        self._commits = 0  # writes made through this object, counted as they return
        # A third connection, used only on the event loop's thread, only for PRAGMA
        # data_version: the boot path asks the feed on every decision, and when nothing was
        # committed (a storm of repeated requests) one read of the WAL index in shared memory
        # answers, without a hop to the reader thread (which cost more than the decision).
        self._probe: sqlite3.Connection | None = None
        self._probed = -1  # the probe's data_version before the feed's last full read
        # The last probe: the time just before it, its answer, and this store's commits
        # then. A request that arrived before that time is answered from it (arrival.py).
        self._last_probe: tuple[float, int | None, int] = (-math.inf, None, -1)

    @property
    def commits(self) -> int:
        """Writes made through this store so far (base.LocalCommits): counted when each
        returns, on the event loop's thread, so a reader that sees the count unchanged
        since its last sync knows this process wrote nothing since."""
        return self._commits

    async def seal_clear_tokens(self) -> int:
        """Seal the join tokens stored in clear (an older netboot's, a tool's), with this
        store's sealer; how many. For start-up once the sealer's key is in its file and
        claimed as the inventory's (service.open_inventory): sealed at open, before the
        key was written, a kill (or a failed write of the key) between the two left tokens
        sealed with a key no file held, and the next start made another."""
        if self._sealer is None:
            return 0
        return await self._run(_seal_clear_tokens, self.path, self._sealer)

    async def mend_stray_columns(self) -> list[tuple[str, str]]:
        """base.mend_stray: each machine's ``fixed_ipv4`` and ``profile`` columns set from
        its document where SQL changed one without the other; one scan of every document
        (json_extract, in C), for start-up (service.mend_stray_columns)."""
        # Looked for in a read first: no write transaction at every start for none.
        try:
            if not await self._read(_stray_rows):
                return []
            return await self._run(_mend_stray_columns)
        except StoreError as exc:
            # A document that is not JSON ("malformed JSON", naming no row): named.
            bad = await self._read(_not_json_error, self.path, "read")
            if bad is not None:
                raise bad from exc
            raise

    @contextlib.asynccontextmanager
    async def fixed_addresses_held(self) -> AsyncIterator[None]:
        """Held by one caller of every process on this file at a time (a server, a CLI
        beside it, a second server): an API or CLI write that sets a fixed_ipv4, from its
        check that no other machine has it to its commit (Core's fixed_lock, as
        PostgresStore's advisory lock). An flock(2) of a file beside the inventory's,
        ``<file>-fixed.lock``: let go when its descriptor closes, a holder's crash too.
        Since migration 8 the file itself refuses one address to two machines (the
        fixed_ipv4 column's unique index): the lock makes Core's check, made before the
        write, the one that answers (a 409 naming the holder, the same words), not a
        replay of the refused batch."""
        if self.path.name in ("", ":memory:"):
            yield  # one connection's database: no other process shares it
            return
        lock = self.path.with_name(self.path.name + "-fixed.lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"the inventory {self.path}: cannot open {lock}: {exc.strerror}"
                             + (" (another user's: give it the inventory file's owner, "
                                f"chown --reference={self.path} {lock}, or remove it)"
                                if exc.errno == errno.EACCES else "")) from exc
        try:
            _as_inventory(fd, self.path)
            deadline = time.monotonic() + FIXED_LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(
                            f"the inventory {self.path}: another process held its fixed "
                            f"address lock ({self.path.name}-fixed.lock) for "
                            f"{FIXED_LOCK_WAIT:.0f} s; try again") from None
                    await asyncio.sleep(FIXED_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # lets the flock go

    # plumbing ----------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., _R], *args: Any) -> _R:
        if self._executor is None:
            raise StoreError(f"the inventory {self.path} is not open")
        # The writer's own future, not run_in_executor's wrapper: cancelled, that forgets
        # whether a write the thread had begun was committed (_outcome).
        job = self._executor.submit(self._guard, fn, args, False)
        noting = fn == self._apply_here
        if noting:
            self._noting.append(job)  # changes_since: its notes are on their way
        try:
            return await _outcome(job)
        finally:
            if noting:
                self._noting.remove(job)
            # Failed or not: a reader syncs once more, harmlessly. Writes the change feed
            # does not carry (history, leases, tokens) are not counted: a storm's group
            # commits of boot events would otherwise send every reader back to the store.
            if fn not in _OFF_FEED and not (fn == self._apply_here and not any(args[:2])
                                            and not args[4]):
                self._commits += 1

    async def _read(self, fn: Callable[..., _R], *args: Any) -> _R:
        if self._reader is None:
            raise StoreError(f"the inventory {self.path} is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader, self._guard, fn, args, True)

    def _guard(self, fn: Callable[..., _R], args: Sequence[Any], reader: bool) -> _R:
        """Translate sqlite3 errors on the worker thread, where they happen."""
        if reader:
            return self._call(self._rconn, fn, args)
        try:
            return self._call(self._conn, fn, args)
        finally:
            self._checkpoint_due()  # the one place that asks, after every write

    def _paged(self, fn: Callable[..., _R], *args: Any) -> _R:
        if self._pconn is None:
            self._pconn = self._query_only()
            try:
                self._pconn.execute(f"PRAGMA cache_size = {-PAGER_CACHE_KIB}")
            except sqlite3.Error as exc:
                raise _unopenable(self.path, exc) from exc
        return self._call(self._pconn, fn, args)

    def _call(self, conn: sqlite3.Connection | None, fn: Callable[..., _R],
              args: Sequence[Any]) -> _R:
        if conn is None:
            raise StoreError(f"the inventory {self.path} is not open")
        self._check_shm()
        try:
            return fn(conn, *args)
        except NetbootError:
            raise
        except sqlite3.IntegrityError as exc:
            # Only reached for a constraint the explicit checks did not foresee.
            raise Conflict(f"inventory constraint failed: {exc}") from exc
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                self._full = why = (f"inventory {self.path}: {exc} (free space in "
                                    f"{self.path.parent})")
                raise StoreFull(why) from exc
            raise StoreError(f"inventory {self.path}: {exc}") from exc

    def stuck_writes(self) -> str | None:
        """Why writes fail while reads answer (base.StuckWrites): the filesystem was found
        full (a write failed with SQLITE_FULL, or start-up found less than FREE_TO_WRITE
        free), and has not had FREE_TO_WRITE free since. Asked by the service's watcher
        (every 0.5 s): one statvfs while full, nothing otherwise."""
        full = self._full
        if full is None:
            return None
        if self._free() >= FREE_TO_WRITE:
            self._full = None
            return None
        return full

    def _free(self) -> int:
        """Bytes free in the inventory's directory (unknown: taken as FREE_TO_WRITE)."""
        try:
            return self._free_space(self.path.parent)
        except OSError:
            return FREE_TO_WRITE

    def _reserve_shm(self, size: int) -> None:
        """Allocate the -shm file's blocks up to ``size`` (never shrinking it)."""
        if self._shm_fd is None:
            self._shm_fd = os.open(self._shm, os.O_RDWR | os.O_CLOEXEC)
        os.posix_fallocate(self._shm_fd, 0, size)

    def _release_shm(self) -> None:
        """Close the -shm descriptor, only once SQLite's connections of this store are closed
        (closing it drops this process's locks on the file)."""
        fd, self._shm_fd = self._shm_fd, None
        if fd is not None:
            os.close(fd)

    def _check_shm(self) -> None:
        """Touching a mapped -shm page beyond the file's end is a SIGBUS: the whole process,
        DHCP, TFTP, DNS and HTTP with it, dies without a log line. If the file shrank under
        us (truncated by another program, or a disk-cleaning script), give it back its size
        before SQLite touches it; zeroed pages are an invalid WAL index, which SQLite
        rebuilds from the WAL. If even that fails, this request fails, not the process."""
        if not self._shm_size:
            return
        try:
            size = os.stat(self._shm).st_size
        except FileNotFoundError:
            # Unlinked: our mapping keeps the old file alive, so nothing can fault; but other
            # processes will not share it any more.
            log.error("inventory %s: %s was removed by another program; restart netboot "
                      "before using the CLI on this database", self.path, self._shm.name)
            self._shm_size = 0
            return
        except OSError:
            size = 0
        if size >= self._shm_size:
            return
        log.error("inventory %s: %s shrank to %d bytes (was %d; truncated by another "
                  "program?): restoring its size", self.path, self._shm.name, size,
                  self._shm_size)
        try:
            self._reserve_shm(self._shm_size)
        except OSError as exc:
            raise StoreError(f"inventory {self.path}: cannot restore {self._shm.name}: "
                             f"{exc.strerror}") from exc

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netboot-sqlite")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._open_on_worker)
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True)
            raise
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netboot-sqlite-r")
        self._pager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netboot-sqlite-p")
        try:
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self.close()
            raise
        try:
            # timeout 0: the probe never waits for a lock; busy, the reader thread answers.
            probe = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            probe.execute("PRAGMA query_only = ON")
            probe.execute("PRAGMA mmap_size = 0")  # see _configure
        except sqlite3.Error as exc:
            log.info("inventory %s: no change probe (%s); the reader thread answers", self.path,
                     exc)
        else:
            self._probe = probe

    def _open_on_worker(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise _unopenable(self.path, exc) from exc
        try:
            _configure(conn, self.path)
            _migrate(conn, self.path)
        except StoreError as exc:
            conn.close()
            if not any(w in str(exc) for w in ("unable to open", "readonly", "disk I/O")):
                raise
            raise _unopenable(self.path, exc) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        # SQLite has created and mapped the WAL index by now (first connection: it truncated
        # it, then wrote region 0 page by page).
        try:
            self._reserve_shm(SHM_RESERVE)
        except OSError as exc:
            log.warning("inventory %s: cannot reserve %d bytes for %s: %s", self.path,
                        SHM_RESERVE, self._shm.name, exc.strerror)
        try:
            self._shm_size = os.stat(self._shm).st_size
        except OSError:
            self._shm_size = 0
        self._checkpoint_due()  # after a migration's writes
        log.info("inventory %s open, schema version %d", self.path, SCHEMA_VERSION)
        free = self._free()
        if free < FREE_TO_WRITE:
            # Said at start-up, not at the first write a device's boot fails with: the
            # watcher reports it (stuck_writes) until space is freed.
            self._full = f"inventory {self.path}: {_full_disk(self.path.parent, free)}"
            log.error("%s", self._full)

    def _open_reader(self) -> None:
        self._rconn = self._query_only()

    def _query_only(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only = ON")  # this connection never writes
            conn.execute("PRAGMA mmap_size = 0")  # see _configure
        except sqlite3.Error as exc:
            raise _unopenable(self.path, exc) from exc
        return conn

    def _close_reader(self) -> None:
        conn, self._rconn = self._rconn, None
        if conn is not None:
            conn.close()

    def _close_checkpointer(self) -> None:
        conn, self._cconn = self._cconn, None
        if conn is not None:
            conn.close()

    def _checkpoint_soon(self) -> None:
        """Checkpoint the WAL on the checkpointer's thread; the caller does not wait."""
        with self._checkpointer_made:  # the writer's thread asks too (_checkpoint_due)
            if self._executor is None or self._closing:
                return
            if self._checkpointer is None:
                self._checkpointer = ThreadPoolExecutor(max_workers=1,
                                                        thread_name_prefix="netboot-sqlite-c")
            self._checkpointer.submit(self._checkpoint)

    def _checkpoint(self) -> None:
        self._checkpoint_asked = False
        try:
            if self._cconn is None:
                self._cconn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                              isolation_level=None)
                self._cconn.execute("PRAGMA mmap_size = 0")  # see _configure
            self._call(self._cconn, _wal_checkpoint, ())
        except (NetbootError, sqlite3.Error) as exc:
            # Not an error of what was committed: the next commits checkpoint again.
            log.warning("inventory %s: checkpoint failed: %s", self.path, exc)

    def _checkpoint_due(self) -> None:
        """On the writer's thread, after a write: the WAL checkpointed, as SQLite's
        autocheckpoint did it, once CHECKPOINT_FRAMES wait to be copied into the database,
        but not inside the commit.

        The autocheckpoint ran inside the ``COMMIT`` that passed the threshold (copying the
        pages into the database, two ``fdatasync``): every answer waiting for that group
        commit (first installs, config fetches) waited for it too, and so did the next
        group, ~20 % of the writer's time in a storm. Durability is the same (the commit
        writes the WAL, synchronous=NORMAL; the checkpoint syncs the WAL before copying it,
        as before). The checkpoint runs on the checkpointer's thread, beside the writer's
        next commits. One that runs while commits go on copies only what was committed when
        it began, and the WAL starts again from its beginning only after a checkpoint that
        caught up with its end: so once the WAL holds WAL_FRAMES frames (a storm's commits
        never leave the checkpointer a gap), the writer checkpoints it itself, as its next
        task (after this commit's answer, before the next commit), which catches up (no
        commit of this process runs meanwhile) and bounds the WAL as before. A bulk
        import's checkpoint is the checkpointer's (_apply_batch says why). Asked here only,
        after every write (_guard)."""
        if self._conn is None:
            return
        if self._bulk_written:  # see _apply_batch: never on the writer's thread
            self._bulk_written = False
            self._checkpoint_asked = True
            self._checkpoint_soon()
            return
        frames, copied = self._wal_frames()
        if frames >= WAL_FRAMES and copied < frames:
            if not self._writer_checkpoints:
                self._writer_checkpoints = True
                try:
                    assert self._executor is not None  # a write ran on it
                    self._executor.submit(self._checkpoint_here)
                except RuntimeError:  # closing: closing the connection checkpoints
                    self._writer_checkpoints = False
        elif not self._checkpoint_asked and (
                frames - copied >= CHECKPOINT_FRAMES
                # Within a pass of the bound, passes follow each other: the writer's own
                # catch-up then copies only what came during the last one (s33-tail).
                or (frames >= WAL_FRAMES - CHECKPOINT_FRAMES and copied < frames)):
            self._checkpoint_asked = True
            self._checkpoint_soon()

    def _checkpoint_here(self) -> None:
        self._writer_checkpoints = False
        conn = self._conn
        if conn is None:
            return
        try:
            self._call(conn, _wal_checkpoint, ())
        except NetbootError as exc:
            log.warning("inventory %s: checkpoint failed: %s", self.path, exc)

    def _wal_frames(self) -> tuple[int, int]:
        """(frames in the WAL, frames of it copied into the database), read from the WAL
        index's header; (WAL_FRAMES, 0), a checkpoint now, when it cannot be read or is not
        what SQLite writes (a checkpoint too many costs only its time)."""
        fd = self._shm_fd
        try:
            head = os.pread(fd, _WAL_INDEX.size, 0) if fd is not None else b""
        except OSError:
            head = b""
        if len(head) == _WAL_INDEX.size:
            version, frames, copied = _WAL_INDEX.unpack(head)
            if version == _WAL_INDEX_VERSION and copied <= frames:
                return frames, copied
        return WAL_FRAMES, 0

    def _close_pager(self) -> None:
        conn, self._pconn = self._pconn, None
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.close()
        # A checkpoint under way ends first (closing the last connection checkpoints anyway),
        # and a commit still under way asks for no other.
        with self._checkpointer_made:
            self._closing = True
            checkpointer, self._checkpointer = self._checkpointer, None
        await _stop(checkpointer, self._close_checkpointer)
        pager, self._pager = self._pager, None
        reader, self._reader = self._reader, None
        try:
            await _stop(pager, self._close_pager)
        finally:
            await _stop(reader, self._close_reader)
        executor = self._executor
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(executor, self._close_on_worker)
        finally:
            self._executor = None
            executor.shutdown(wait=True)

    async def release_caches(self) -> None:
        """Each connection's page cache emptied (``PRAGMA shrink_memory``), on the
        connection's own thread, between its other statements (base.HeldCaches).

        The writer's cache fills to SQLite's default 2,000 KiB with a 1,000-device storm's
        commits (and on a first start after a bulk import, with the feed's pruning); the
        reader's and the pager's fill with their reads. Each held that memory for the
        connection's life, though the file's pages stay in the system's page cache: asked
        after the view's load and once quiet after each busy stretch
        (service.release_when_quiet), ~2.1 MiB less resident after such a storm with
        100,000 machines enrolled (issue 10: < 150 MiB; benchmarks/README.md, session 18).
        A smaller writer's cache instead made first config fetches slower (session 12)."""
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is not None:  # the event loop's own connection
            _shrink(probe)
        with self._checkpointer_made:
            checkpointer = None if self._closing else self._checkpointer
        for pool, which in ((self._executor, "_conn"), (self._reader, "_rconn"),
                            (self._pager, "_pconn"), (checkpointer, "_cconn")):
            if pool is None:
                continue
            try:
                await loop.run_in_executor(pool, self._shrink_on_thread, which)
            except RuntimeError:  # the pool shut down meanwhile (close()): nothing to keep
                return

    def _shrink_on_thread(self, which: str) -> None:
        conn = getattr(self, which)
        if conn is not None:
            _shrink(conn)

    def _close_on_worker(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                # Lets SQLite refresh query-planner statistics it found stale; cheap.
                conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.warning("inventory %s: PRAGMA optimize failed: %s", self.path, exc)
            conn.close()
        self._release_shm()

    # machines -------------------------------------------------------------------------
    async def get_machine(self, machine_id: str) -> Machine | None:
        return self._sealed.open_machine(await self._read(_get_machine, machine_id))

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        key = codec.claim_key(kind, value)
        return self._sealed.open_machine(await self._read(_machine_by, *key))

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        keys = [codec.claim_key(kind, value) for kind, value in claims]
        found = await self._read(_machines_by, keys)
        opened: dict[str, Machine | None] = {}  # one value per machine, its token opened once
        out: list[Machine | None] = []
        for key in keys:
            machine = found.get(key)
            if machine is not None:
                if machine.id not in opened:
                    opened[machine.id] = self._sealed.open_machine(machine)
                machine = opened[machine.id]
            out.append(machine)
        return out

    async def get_machine_by_hostname(self, hostname: str) -> Machine | None:
        return self._sealed.open_machine(await self._read(_get_machine_by_hostname, hostname))

    async def list_machines(self, flt: MachineFilter | None = None) -> list[Machine]:
        flt = flt or MachineFilter()
        codec.check_filter(flt)
        return [m for m in map(self._sealed.open_machine, await self._read(_list_machines, flt))
                if m is not None]

    async def machines_after(self, after: str, limit: int) -> list[Machine]:
        if self._pager is None:
            raise StoreError(f"the inventory {self.path} is not open")
        page = await asyncio.get_running_loop().run_in_executor(
            self._pager, self._paged, _machines_after, after, limit, self._page_maps)
        # The sealed forms of the tokens opened kept: a storm's configs write them again.
        opened = self._sealed.open_machine
        return [m for p in page if (m := opened(p, keep=True)) is not None]

    async def count_machines(self, flt: MachineFilter | None = None) -> int:
        return await self._read(_count_machines, flt or MachineFilter())

    async def state_counts(self) -> dict[tuple[str | None, MachineState], int]:
        return await self._read(_state_counts)

    async def create_machine(self, machine: Machine) -> None:
        await self.apply_batch(Batch(create=(machine,)))

    async def update_machine(self, machine: Machine, *,
                             expect_state: MachineState | None = None) -> None:
        await self.apply_batch(Batch(update=(machine,), expect={} if expect_state is None
                                     else {machine.id: expect_state}))

    async def delete_machine(self, machine_id: str, *, expect_updated: float | None = None
                             ) -> None:
        await self._run(_delete_machine, machine_id, expect_updated)

    async def apply_batch(self, batch: Batch) -> None:
        """One ``BEGIN IMMEDIATE`` transaction: merges, creates, updates, events in order."""
        if (batch.merge or batch.create or batch.update or batch.events or batch.expect
                or batch.versions or batch.audit):
            # Checked as they are written (on the worker): 100,000 events of an import are
            # not copied first, unless a listener is to be told of them; a run of them
            # (codec.EventRun) stays one.
            listener = self._listener
            # Stored copies only for a listener that keeps them (a live stream): the
            # others (metrics) read machine, time and kind, the objects a copy holds.
            copy = listener is not None and listener.holding
            parts: list[codec.EventRun | Iterable[tuple[Event, str]]] = list(
                codec.event_parts(batch.events, copy))
            if listener is not None:
                parts = [p if isinstance(p, codec.EventRun) else list(p) for p in parts]
            rows = [p if isinstance(p, codec.EventRun) else
                    ((v.machine, v.time, v.kind, v.message, data) for v, data in p)
                    for p in parts]
            audit = [_audit_row(codec.audit_from_dict(codec.audit_to_dict(e)))
                     for e in batch.audit]
            seal = self._sealed.seal_machine
            # An import's new machines stay rows until written (codec.NewMachines).
            create = (batch.create.sealed(seal) if isinstance(batch.create, codec.NewMachines)
                      else [seal(m) for m in batch.create])
            # The updates as given, their tokens sealed beside them: encoded with those, not
            # copied with them (a first install's new token, on the event loop).
            sealed = self._sealed.sealed_token
            await self._run(self._apply_here, create, batch.update,
                            [sealed(m) for m in batch.update], rows, batch.merge,
                            dict(batch.expect), audit, batch.create, dict(batch.versions),
                            batch.bases, batch.learnt)
            if batch.events and listener is not None:
                # A stream opened while the batch was written keeps copies too, as one
                # opened before: the events are checked already, only their data is copied.
                late = not copy and listener.holding
                listener.published(codec.joined(*(
                    p if isinstance(p, codec.EventRun) else
                    [replace(v, data=dict(v.data)) if late else v for v, _ in p]
                    for p in parts)))

    def _apply_here(self, conn: sqlite3.Connection, create: Sequence[Machine],
                    update: Sequence[Machine], tokens: Sequence[str | None],
                    events: Iterable[_EventRows],
                    merge: Sequence[tuple[str, str]], expect: Mapping[str, MachineState],
                    audit: Sequence[tuple[float, str, str, str, str, str]],
                    given_create: Sequence[Machine], versions: Mapping[str, float],
                    bases: Mapping[str, Machine], learnt: Collection[str] = ()) -> None:
        """On the worker: the batch, then (committed) what it wrote, noted for the feed.
        ``update`` as given, ``tokens`` what each one's document holds in place of its
        install token (Sealed.sealed_token)."""
        written = _apply_batch(conn, create, update, events, merge, expect, audit, tokens,
                               versions, bases, learnt)
        if len(create) >= BULK_ROWS:  # committed without a checkpoint: see _apply_batch
            self._bulk_written = True
        if written is not None:
            before, after, rows = written
            given = (*given_create, *update)
            as_read = self._sealed.as_read
            # An update whose token was sealed here (``tokens``: so it came in clear) and
            # that was in stored form is read back as given, what as_read answers after
            # asking the sealer whether the token is sealed (~2,000 instructions a first
            # install, benchmarks/README.md s34-writer).
            read = [g if r.machine is g and t is not None else as_read(r.machine, sealed, g)
                    for r, sealed, g, t in zip(rows, (*create, *update), given,
                                               (*(None for _ in create), *tokens),
                                               strict=True)]
            # A token sealed already (a copied row): only the feed's read can tell.
            if all(m is not None for m in read):
                self._here.add(before, after, [
                    *((source, None) for source, _ in merge),
                    *((r.id, m) for r, m in zip(rows, read, strict=True))])

    # profiles, clusters, groups ----------------------------------------------------------
    async def get_profile(self, name: str) -> Profile | None:
        data = await self._read(_get_named, "profile", name)
        return None if data is None else codec.profile_from_dict(data)

    async def list_profiles(self) -> list[Profile]:
        return [codec.profile_from_dict(d) for d in await self._read(_list_named, "profile")]

    async def put_profile(self, profile: Profile, *, create: bool = False,
                          expect: Profile | None = None) -> None:
        await self._put_item("profile", profile.name, codec.profile_json(profile), create,
                             codec.profile_from_dict, expect)

    async def _put_item(self, kind: str, name: str, text: str, create: bool,
                        open_item: Callable[[Any], Any], expect: Any) -> None:
        if expect is None:
            await self._run(_put_named, kind, name, text, create)
        else:  # a compare-and-set (base.check_unchanged)
            await self._run(_put_named_if, kind, name, text, open_item, expect)

    async def delete_profile(self, name: str, *, expect: Profile | None = None,
                             unused: bool = False) -> None:
        await self._run(_delete_named, "profile", name, codec.profile_from_dict, expect, unused)

    async def get_cluster(self, name: str) -> Cluster | None:
        data = await self._read(_get_named, "cluster", name)
        return None if data is None else self._sealed.open_cluster(data)

    async def list_clusters(self) -> list[Cluster]:
        return [self._sealed.open_cluster(d) for d in await self._read(_list_named, "cluster")]

    async def put_cluster(self, cluster: Cluster, *, create: bool = False,
                          expect: Cluster | None = None) -> None:
        data = self._sealed.cluster_data(cluster)
        await self._put_item("cluster", cluster.name, codec.dumps(data, "cluster"), create,
                             self._sealed.open_cluster, expect)

    async def delete_cluster(self, name: str, *, expect: Cluster | None = None,
                             unused: bool = False) -> None:
        await self._run(_delete_named, "cluster", name, self._sealed.open_cluster, expect,
                        unused)

    async def get_group(self, name: str) -> Group | None:
        data = await self._read(_get_named, "group", name)
        return None if data is None else codec.group_from_dict(data)

    async def list_groups(self) -> list[Group]:
        return [codec.group_from_dict(d) for d in await self._read(_list_named, "group")]

    async def put_group(self, group: Group, *, create: bool = False,
                        expect: Group | None = None) -> None:
        await self._put_item("group", group.name, codec.group_json(group), create,
                             codec.group_from_dict, expect)

    async def delete_group(self, name: str, *, expect: Group | None = None,
                           installs: InstallsSince | None = None) -> None:
        await self._run(_delete_named, "group", name, codec.group_from_dict, expect, False,
                        installs)

    # events --------------------------------------------------------------------------
    async def add_event(self, event: Event) -> None:
        value = codec.event_from_dict(codec.event_to_dict(event))
        data = codec.dumps(dict(value.data), "data")
        await self._run(_add_event, value, data)
        if self._listener is not None:
            self._listener.published((value,))

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        if limit <= 0:
            return []
        return await self._read(_list_events, machine_id, limit)

    async def newest_events(self, machine_ids: Collection[str]) -> dict[str, Event]:
        if not machine_ids:
            return {}
        # The ids as one JSON parameter: any number of them, one statement.
        return await self._read(_newest_events, json.dumps(list(machine_ids)))

    async def events_since(self, after: int, *, limit: int = 1000) -> tuple[int, list[Event]]:
        # Ids follow commit order: one writer at a time (BEGIN IMMEDIATE), max(id) + 1 each.
        return await self._read(_events_since, after, limit)

    # leases --------------------------------------------------------------------------
    async def list_leases(self) -> list[Lease]:
        return await self._read(_list_leases)

    async def lease_by_ip(self, ipv4: str) -> Lease | None:
        return await self._read(_lease_by_ip, ipv4)

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        await self._run(_put_lease, codec.lease_from_dict(codec.lease_to_dict(lease)), now,
                        None if ending is None else codec.normalise_mac(ending))

    async def delete_lease(self, mac: str) -> None:
        await self._run(_delete_lease, codec.normalise_mac(mac))

    # change feed -------------------------------------------------------------------------
    def settled(self, seq: int) -> bool:
        """Whether nothing was committed after ``seq`` (base.SettledFeed): the probe's
        data_version is the one of the feed's last full read, which ended at ``seq``.

        The probe is made again unless the request this work answers had arrived before
        the last one was made (netboot.arrival) and this store committed nothing since:
        then that probe already saw every commit the request's sender could have known of.
        Requests read in one loop iteration and decided in the next share one probe."""
        came = arrival()
        at, probed, commits = self._last_probe
        if came is None or came >= at or commits != self._commits:
            probed = self._probe_version()
        return probed is not None and probed == self._probed and 0 <= seq == self._feed_seq

    async def changes_since(self, seq: int) -> Changes:
        probed = self._probe_version()
        if probed is not None and probed == self._probed and 0 <= seq == self._feed_seq:
            return Changes(seq, complete=True)  # nothing committed since the last full read
        last = None if probed is None or seq < 0 else self._probe_last()
        mine = None if last is None or last < seq else self._here.since(seq, last)
        if last is not None and mine is None and (job := self._noting_now()) is not None:
            # A group commit of this store's is under way, and may be what the probe saw:
            # SQLite releases the GIL around COMMIT, so the loop often sees a commit before
            # the writer thread has it back to note it (CommittedHere.add). Read now, the
            # feed decoded it again (~1.5 % of a storm's machines, s35-echo); its end is
            # waited for instead (the rest of the writer's turn, not a read and a decode of
            # every machine of it), within a bound: a writer waiting for another process's
            # lock is not waited for. Then asked again: exact either way.
            await _ended(job, NOTE_WAIT)
            probed = self._probe_version()
            last = None if probed is None else self._probe_last()
            mine = None if last is None or last < seq else self._here.since(seq, last)
        if last is not None and mine is not None:
            # All committed by this store since ``seq`` (events alone move no position):
            # what it wrote, not read back. The probe's answers came from one snapshot at
            # least as new as ``probed``, so a commit after it changes data_version.
            changes = Changes(last, complete=True, machines=mine)
        else:
            changes = await self._read(self._changes_since, seq)
            self._here.forget(changes.seq)
        if probed is not None:
            # Read before the full read: a commit after it changes the probe's answer.
            self._probed = probed
        self._feed_seq = changes.seq
        return changes

    def _noting_now(self) -> Future[None] | None:
        """The group commit the writer thread runs now (begun, not ended), if any: the one
        whose COMMIT a reader may see before it is noted."""
        for job in self._noting:
            if job.running():
                return job
        return None

    def _probe_version(self) -> int | None:
        if self._probe is None:
            return None
        at = time.monotonic()  # before the probe: what arrived before it, it sees
        try:
            version: int | None = int(self._probe.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            version = None
        self._last_probe = (at, version, self._commits)
        return version

    def _probe_last(self) -> int | None:
        """The change feed's newest seq, read by the probe on the event loop's thread (a read
        of the table's last page: cheaper than the hop to the reader thread); None if the
        probe cannot read now (busy: the reader thread answers)."""
        if self._probe is None:
            return None
        try:
            row = self._probe.execute("SELECT max(seq) FROM changes").fetchone()
        except sqlite3.Error:
            return None
        return None if row[0] is None else int(row[0])

    def _changes_since(self, conn: sqlite3.Connection, seq: int) -> Changes:
        """On the reader thread: ``PRAGMA data_version`` first, which changes exactly when
        another connection (our writer, the CLI, another server) committed; when it has not,
        nothing is read. Read before the query, so a commit in between is seen next time."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self._data_version and 0 <= seq == self._read_seq:
            return Changes(seq, complete=True)
        conn.execute("BEGIN")  # one snapshot: the changes and the rows they name agree
        try:
            return self._read_changes(conn, seq, version)
        finally:
            conn.execute("COMMIT")

    def _read_changes(self, conn: sqlite3.Connection, seq: int, version: int) -> Changes:
        first, last = _feed_ends(conn)
        last = last if last is not None else max(0, seq)
        self._data_version, self._read_seq = version, last
        if seq < 0 or seq > last or (first is not None and first > seq + 1 and seq < last):
            return Changes(last, complete=False)  # nothing known, or pruned past it
        # This store's own commits in the range are taken as its writer noted them, not
        # decoded again (committed.py): only the positions between them are read. Their
        # spans are committed (noted after COMMIT) and so in this snapshot.
        machines, gaps = self._here.split(seq, last)
        keys: dict[str, set[str]] = {}
        for after, upto in gaps:
            for tbl, key in conn.execute(
                    "SELECT tbl, key FROM changes WHERE seq > ? AND seq <= ?", (after, upto)):
                keys.setdefault(tbl, set()).add(key)
        for m in keys.get("machines", ()):
            machines[m] = self._sealed.open_machine(_get_machine(conn, m))

        def named(kind: str, decode: Callable[[Any], _R]) -> dict[str, _R | None]:
            out: dict[str, _R | None] = {}
            for name in keys.get(_TABLES[kind], ()):
                data = _get_named(conn, kind, name)
                out[name] = None if data is None else decode(data)
            return out

        return Changes(
            last, complete=True, machines=machines,
            profiles=named("profile", codec.profile_from_dict),
            clusters=named("cluster", self._sealed.open_cluster),
            groups=named("group", codec.group_from_dict),
            settings={k: _get_setting(conn, k) for k in keys.get("settings", ())})

    async def forget_changes(self, before: int) -> None:
        await self._run(_forget_changes, before)

    async def feed_position(self) -> int:
        return await self._read(_last_change)

    async def under_way_since(self, seq: int) -> tuple[int, list[Machine]]:
        return await self._read(_installs_since, seq)

    async def wait_for_changes(self, seq: int, timeout: float) -> bool:
        """Polls: another process's commit reaches no one here until asked."""
        async def news() -> bool:
            return seq < 0 or await self._read(_last_change) != seq

        return await wait_until(news, Signal(), timeout, poll=lambda: POLL_SECONDS)

    # settings ------------------------------------------------------------------------
    async def get_setting(self, key: str) -> str | None:
        return await self._read(_get_setting, key)

    async def claim_setting(self, key: str, value: str, *, replace: str | None = None) -> str:
        return await self._run(_claim_setting, key, value, replace)

    async def put_setting(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise ValidationError("value", "a setting is a string")
        await self._run(_put_setting, key, value)

    async def delete_setting(self, key: str) -> None:
        await self._run(_delete_setting, key)

    async def forget_stale_settings(self) -> int:
        return await self._run(_forget_stale_settings)

    # API tokens and the audit log ------------------------------------------------------
    async def create_token(self, token: ApiToken) -> None:
        await self._run(_create_token, codec.token_from_dict(codec.token_to_dict(token)))

    async def token_by_hash(self, sha256: str) -> ApiToken | None:
        return await self._read(_token_by_hash, sha256)

    async def list_tokens(self) -> list[ApiToken]:
        return await self._read(_list_tokens)

    async def delete_token(self, name: str) -> None:
        await self._run(_delete_token, name)

    async def touch_token(self, name: str, when: float) -> None:
        await self._run(_touch_token, name, float(when))

    async def add_audit(self, entry: AuditEntry) -> None:
        await self._run(_add_audit, codec.audit_from_dict(codec.audit_to_dict(entry)))

    async def settle_audit(self, entry: AuditEntry, written: str, otherwise: str) -> None:
        await self._run(_settle_audit, codec.audit_from_dict(codec.audit_to_dict(entry)),
                        written, otherwise)

    async def list_audit(self, *, since: float | None = None,
                         limit: int = 1000) -> list[AuditEntry]:
        if limit <= 0:
            return []
        return await self._read(_list_audit, since, limit)

    async def prune_audit(self, keep: int) -> int:
        return await self._run(_prune_audit, max(keep, 0))

    async def prune_events(self, before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        return await self._run(_prune_events, before, limit)


def _seal_clear_tokens(conn: sqlite3.Connection, path: Path, sealer: Sealer) -> int:
    """Seal the join tokens an older netboot stored in clear (one transaction), then move the
    rewritten pages into the file and empty the WAL; how many."""
    try:
        with _immediate(conn):
            rows = conn.execute("SELECT name, data FROM clusters").fetchall()
            sealed = 0
            for name, text in rows:
                data = json.loads(text)
                token = data.get("token")
                if isinstance(token, str) and token and not sealer.is_sealed(token):
                    data["token"] = sealer.seal(token, context=join_token_context(name))
                    conn.execute("UPDATE clusters SET data = ? WHERE name = ?",
                                 (codec.dumps(data, "cluster"), name))
                    sealed += 1
        if sealed:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            log.info("inventory %s: sealed the join tokens of %d clusters", path, sealed)
        return sealed
    except sqlite3.Error as exc:
        raise StoreError(f"cannot seal the join tokens in {path}: {exc}") from exc


async def _outcome(job: Future[_R]) -> _R:
    """What the writer thread's ``job`` did, told as it was (netboot.unstoppable): a cancel
    that comes before the thread began it cancels it (nothing was done); once begun it
    cannot be stopped, so its end is waited for (at most CANCELLED_WRITE_WAIT) and told."""
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError as exc:
        cancel = exc
    # Outside the except block, as in the compiled modules (tests/test_compiled.py).
    if job.cancel():
        raise cancel  # not begun: it never runs
    return await told(cancel, asyncio.wrap_future(job), within=CANCELLED_WRITE_WAIT,
                      late=_late)


async def _ended(job: Future[Any], within: float) -> None:
    """Until the writer thread's ``job`` has ended, at most ``within`` seconds; its outcome
    is its caller's to tell, not this waiter's."""
    waiting = asyncio.wrap_future(job)
    waiting.add_done_callback(_retrieved)
    await asyncio.wait((waiting,), timeout=within)


def _retrieved(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


def _late() -> None:
    log.error("a write cancelled while the inventory's writer ran it had not ended after "
              "%.0f s; its caller is told it was cancelled, though it may yet be "
              "committed", CANCELLED_WRITE_WAIT)


async def _stop(pool: ThreadPoolExecutor | None, closing: Callable[[], None]) -> None:
    """Run ``closing`` on the thread of ``pool`` (its connection's), then end the thread."""
    if pool is not None:
        try:
            await asyncio.get_running_loop().run_in_executor(pool, closing)
        finally:
            pool.shutdown(wait=True)


# --- worker-thread functions: each takes the connection first --------------------------------


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _journal_mode_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoints after the commits, not inside them: SqliteStore._checkpoint_due.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA foreign_keys = ON")
        # Zero what a delete or a rewrite frees: old (sealed) secrets and token hashes do not
        # linger in free pages of the file.
        conn.execute("PRAGMA secure_delete = ON")
        # No memory-mapped I/O on the database file: with it, a file truncated or unreadable
        # under us is a SIGBUS that kills every server in the process; with read() it is an
        # SQLITE_IOERR, a StoreError, a 503. (The WAL index, -shm, is always mapped; SQLite
        # writes every page of it before mapping it, so a full disk fails that write with
        # an error instead of a SIGBUS later.)
        conn.execute("PRAGMA mmap_size = 0")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open inventory {path}: {exc}") from exc
    if str(mode).lower() != "wal":
        # e.g. a network file system without shared memory: refuse rather than run unsafely.
        raise StoreError(f"inventory {path}: cannot use WAL journal mode (got {mode!r})")


def _shrink(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("PRAGMA shrink_memory")
    except sqlite3.Error as exc:  # memory kept, nothing else: the next quiet spell asks again
        log.warning("inventory: PRAGMA shrink_memory failed: %s", exc)


def _unopenable(path: Path, exc: BaseException) -> StoreError:
    """SQLite says only "unable to open database file" or "attempt to write a readonly
    database": name the cause an operator can fix."""
    directory = path.parent
    try:
        read_only_fs = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only_fs = False
    if not directory.is_dir():
        reason = (f"the directory {directory} does not exist; create it, or point "
                  "server.data_dir (--data-dir) or inventory.path elsewhere")
    elif read_only_fs:
        reason = (f"{directory} is on a read-only file system; point server.data_dir "
                  "(--data-dir) or inventory.path at a writable directory")
    elif not os.access(directory, os.W_OK | os.X_OK):
        reason = (f"the directory {directory} is not writable by uid {os.geteuid()}, and "
                  f"SQLite creates {path.name}-wal and {path.name}-shm beside the database; "
                  "fix its owner or mode, or point server.data_dir elsewhere")
    else:
        unwritable = [p for p in (path, path.with_name(path.name + "-wal"),
                                  path.with_name(path.name + "-shm"))
                      if p.exists() and not os.access(p, os.R_OK | os.W_OK)]
        if unwritable:
            reason = (f"{', '.join(map(str, unwritable))} not readable and writable by uid "
                      f"{os.geteuid()}; fix the owner or mode")
        else:
            detail = str(exc).removeprefix(f"cannot open inventory {path}: ")
            reason = detail
            try:
                free = _free_space(directory)
            except OSError:
                free = FREE_TO_WRITE
            if free < FREE_TO_WRITE:
                # SQLite says "disk I/O error" when the -shm cannot grow on a full disk.
                reason += f" ({_full_disk(directory, free)})"
    return StoreError(f"cannot open inventory {path}: {reason}")


def _full_disk(directory: Path, free: int) -> str:
    return (f"its disk is full: {free >> 10} KiB free in {directory}, netboot writes with "
            f"{FREE_TO_WRITE >> 10} KiB or more; free space there")


def _free_space(directory: Path) -> int:
    """Bytes an unprivileged process may still write in ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL, waiting out another process doing the same.

    Switching needs an exclusive lock and SQLite answers "database is locked" at once, without
    calling the busy handler, when another connection holds a lock at that moment (two
    processes opening a new file together). So retry here until the busy timeout. A file that
    is already in WAL mode (the mode is persistent) needs no switch and no lock.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0])
            if mode.lower() == "wal":
                return mode
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    try:
        with _immediate(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"inventory {path} has schema version {version}, newer than this netboot "
                    f"knows ({SCHEMA_VERSION}); run the netboot release that wrote it, or a "
                    "newer one"
                )
            for index in range(version, SCHEMA_VERSION):
                for step in MIGRATIONS[index]:
                    if callable(step):
                        step(conn)
                    else:
                        conn.execute(step)
                # Inside the transaction: the version and the schema change commit together.
                conn.execute(f"PRAGMA user_version = {index + 1}")
                if version:  # a new inventory's first start is one line, not one a step
                    log.info("inventory %s: migrated schema to version %d", path, index + 1)
            if not version:
                log.info("inventory %s: created (schema version %d)", path, SCHEMA_VERSION)
    except sqlite3.Error as exc:
        # A step that reads documents (migration 8's json_extract) fails on one that is not
        # JSON with "malformed JSON" and no row: the file, rolled back, is searched for it.
        bad = _not_json_error(conn, path, "migrate")
        if bad is not None:
            raise bad from exc
        raise StoreError(f"cannot migrate inventory {path}: {exc}") from exc


def _not_json_rows(conn: sqlite3.Connection) -> tuple[str, str, list[str]] | None:
    """The first table of base.DOCUMENT_TABLES with rows whose data is not JSON (as
    json_extract reads it: json_valid), its key column and the first few rows' keys."""
    for table, key in DOCUMENT_TABLES:
        try:
            keys = [row[0] for row in conn.execute(
                f"SELECT {key} FROM {table} WHERE NOT json_valid(data)"  # noqa: S608
                f" ORDER BY {key} LIMIT 4")]
        except sqlite3.Error:
            continue  # a table (or key column) an older schema lacks
        if keys:
            return table, key, keys
    return None


def _not_json_error(conn: sqlite3.Connection, path: Path, doing: str) -> StoreError | None:
    """base.not_json for this file, if a document in it is not JSON."""
    try:
        found = _not_json_rows(conn)
    except sqlite3.Error:
        return None
    if found is None:
        return None
    table, key, keys = found
    # The shell's foreign keys are off unless asked: a machine's identifiers and labels
    # go with it only with them on (ON DELETE CASCADE).
    quoted = keys[0].replace("'", "''")
    fix = (f"sqlite3 {path} \"PRAGMA foreign_keys = ON; DELETE FROM {table}"  # noqa: S608 - told, not run
           f" WHERE {key} = '{quoted}'\"")
    return not_json(str(path), doing, table, keys, fix)


@contextlib.contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _machine(data: str, maps: codec.SharedMaps | None = None) -> Machine:
    return codec.machine_from_document(codec.loads_document(data), maps)


def _machines_by_id(conn: sqlite3.Connection) -> None:
    """Migration 3: every machine of ``machines_v2`` gets an id; its MAC becomes its first NIC.

    Firmware placeholders ("To be filled by O.E.M.") that earlier versions learnt as serials
    were never identities and are not indexed. A real identifier two old machines share (two
    discovered records of one device) stays with the first in MAC order; the other keeps it
    in its facts, and a log line says so.
    """
    rows = conn.execute("SELECT data FROM machines_v2 ORDER BY mac").fetchall()
    for (text,) in rows:
        data = json.loads(text)
        data["macs"] = [data.pop("mac")]
        data["id"] = new_machine_id()
        machine = codec.machine_from_dict(data)
        for kind, value in claims(machine)[1:]:
            holder = conn.execute("SELECT machine FROM machine_keys WHERE kind = ? AND value = ?",
                                  (kind, value)).fetchone()
            if holder is not None:
                log.warning("inventory migration: %s %r of %s is also %s's; kept as a fact",
                            kind, value, machine.mac, holder[0])
                machine = replace(
                    machine, facts={**machine.facts, kind: value},
                    uuid=None if kind == "uuid" else machine.uuid,
                    serial=None if kind == "serial" else machine.serial,
                    asset=None if kind == "asset" else machine.asset)
        row = _Row(machine)
        conn.execute(_INSERT_MACHINE_V3, row.insert_params()[:8])
        conn.executemany(_INSERT_LABEL, row.labels)
        conn.executemany(_INSERT_KEY, row.keys)


def _get_machine(conn: sqlite3.Connection, machine_id: str) -> Machine | None:
    row = conn.execute("SELECT data FROM machines WHERE id = ?", (machine_id,)).fetchone()
    return None if row is None else _machine(row[0])


def _machine_by(conn: sqlite3.Connection, kind: str, value: str) -> Machine | None:
    row = conn.execute(
        "SELECT m.data FROM machine_keys k JOIN machines m ON m.id = k.machine"
        " WHERE k.kind = ? AND k.value = ?", (kind, value)).fetchone()
    return None if row is None else _machine(row[0])


# Identifiers per statement of machines_by: far inside SQLite's 32,766 variables, and few
# distinct statements for its cache (one per size of the last chunk).
CLAIMS_PER_READ = 500


def _machines_by(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]],
                 ) -> dict[tuple[str, str], Machine]:
    """The holder of each key that has one, one statement per kind (and per
    :data:`CLAIMS_PER_READ`), in one transaction: one snapshot for all of them. Each machine is
    decoded once, however many of the keys it holds."""
    by_kind: dict[str, dict[str, None]] = {}
    for kind, value in keys:
        by_kind.setdefault(kind, {})[value] = None
    found: dict[tuple[str, str], Machine] = {}
    decoded: dict[str, Machine] = {}
    conn.execute("BEGIN")
    try:
        for kind, distinct in by_kind.items():
            values = list(distinct)
            for start in range(0, len(values), CLAIMS_PER_READ):
                chunk = values[start:start + CLAIMS_PER_READ]
                rows = conn.execute(
                    "SELECT k.value, m.id, m.data FROM machine_keys k"  # noqa: S608
                    " JOIN machines m ON m.id = k.machine"
                    f" WHERE k.kind = ? AND k.value IN ({','.join('?' * len(chunk))})",
                    (kind, *chunk))
                for value, ident, data in rows:
                    machine = decoded.get(ident)
                    if machine is None:
                        machine = decoded[ident] = _machine(data)
                    found[kind, value] = machine
    finally:
        conn.execute("COMMIT")
    return found


def _get_machine_by_hostname(conn: sqlite3.Connection, hostname: str) -> Machine | None:
    row = conn.execute(
        "SELECT data FROM machines WHERE lower(hostname) = lower(?) AND hostname IS NOT NULL",
        (hostname,),
    ).fetchone()
    return None if row is None else _machine(row[0])


def _where(flt: MachineFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if flt.state is not None:
        if flt.state in RARE_STATES:
            clauses.append(_RARE_STATES)
        clauses.append("m.state = ?")
        params.append(flt.state.value)
    if flt.cluster is not None:
        clauses.append("m.cluster = ?")
        params.append(flt.cluster)
    if flt.profile is not None:
        clauses.append("m.profile = ?")  # machines_profile (migration 8)
        params.append(flt.profile)
    if flt.uuid is not None:
        clauses.append("json_extract(m.data, '$.uuid') = ?")
        params.append(flt.uuid)
    if flt.serials:
        clauses.append(f"json_extract(m.data, '$.serial') IN ({','.join('?' * len(flt.serials))})")
        params.extend(flt.serials)
    if flt.fixed_ipv4 is not None:
        clauses.append("json_extract(m.data, '$.fixed_ipv4') = ?")
        params.append(flt.fixed_ipv4)
    if flt.with_fixed_ipv4:
        clauses.append("json_extract(m.data, '$.fixed_ipv4') IS NOT NULL")
    if flt.without_secret:
        clauses.append("json_extract(m.data, '$.secret_hash') IS NULL")
    if flt.shared_fixed_ipv4:
        clauses.append("json_extract(m.data, '$.fixed_ipv4') IN (SELECT json_extract(data,"
                       " '$.fixed_ipv4') FROM machines GROUP BY 1 HAVING count(*) > 1)")
    if flt.has_mac is not None:
        clauses.append("m.mac IS NOT NULL" if flt.has_mac else "m.mac IS NULL")
    if flt.updated_before is not None:
        clauses.append("m.updated < ?")
        params.append(flt.updated_before)
    if flt.in_state_before is not None:
        clauses.append(f"{SINCE_SQLITE} < ?")
        params.append(flt.in_state_before)
    if flt.after_id is not None:
        clauses.append("m.id > ?")
        params.append(flt.after_id)
    if flt.ids is not None:
        # One parameter however many (a JSON array), not one each: SQLite's limit is 32,766.
        clauses.append("m.id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(sorted(flt.ids)))
    if flt.text:
        # instr(lower(..)) rather than LIKE: no wildcard characters to escape in the text.
        clauses.append("(instr(lower(coalesce(m.hostname, '')), ?) OR instr(lower(m.id), ?)"
                       " OR EXISTS (SELECT 1 FROM machine_keys k WHERE k.machine = m.id"
                       " AND instr(lower(k.value), ?)))")
        params.extend([flt.text.lower()] * 3)
    for key, value in flt.labels:
        clauses.append(
            "EXISTS (SELECT 1 FROM machine_labels l"
            " WHERE l.machine = m.id AND l.key = ? AND l.value = ?)"
        )
        params.extend((key, value))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _list_machines(conn: sqlite3.Connection, flt: MachineFilter) -> list[Machine]:
    where, params = _where(flt)
    order = "m.mac IS NULL, m.mac, m.id"
    if flt.sort == "mac" and flt.descending:
        order = "m.mac IS NULL DESC, m.mac DESC, m.id DESC"
    elif flt.sort != "mac":
        # The column name comes from SORT_KEYS (checked by codec.check_filter), never a value.
        column = SINCE_SQLITE if flt.sort == "state_since" else f"m.{flt.sort}"
        order = (f"{column} IS NULL, {column}{' DESC' if flt.descending else ''}, {order}")
    if flt.after_id is not None:
        order = "m.id"
    # Decoded a thousand rows at a time, not after fetchall(): all 100,000 documents (35 MB
    # of text) are never held beside the machines made of them (a re-import reads every
    # machine). Not row by row either: iterating the cursor measured a fifth slower.
    cur = conn.execute(
        f"SELECT m.data FROM machines m{where} ORDER BY {order}"  # noqa: S608
        " LIMIT ? OFFSET ?",
        (*params, flt.limit, 0 if flt.after_id is not None else flt.offset),
    )
    # A page at a time, not fetchall(): each stored document is decoded and dropped soon
    # after it is read, so the machines kept are not interleaved with 100,000 dead texts
    # (~30 MiB of holes in Python's small-object arenas that a whole-inventory read left
    # resident for the life of the process); fetchmany is as fast as fetchall, row by row
    # was ~20 % slower.
    out: list[Machine] = []
    # Machines listed together share their equal label sets (a re-import reads them all).
    maps = codec.SharedMaps()
    while rows := cur.fetchmany(1024):
        out += [_machine(r[0], maps) for r in rows]
    return out


def _machines_after(conn: sqlite3.Connection, after: str, limit: int,
                    maps: codec.SharedMaps | None = None) -> list[Machine]:
    # A range of the id-keyed table (WITHOUT ROWID): read in its own order, where a listing by
    # MAC looks each row up from the MAC index.
    rows = conn.execute("SELECT data FROM machines WHERE id > ? ORDER BY id LIMIT ?",
                        (after, limit)).fetchall()
    return [_machine(r[0], maps) for r in rows]


def _stray_rows(conn: sqlite3.Connection) -> list[StrayRow]:
    return conn.execute(
        "SELECT id, coalesce(mac, id), fixed_ipv4, json_extract(data, '$.fixed_ipv4'),"
        " profile, json_extract(data, '$.profile') FROM machines"
        " WHERE profile IS NOT json_extract(data, '$.profile')"
        " OR fixed_ipv4 IS NOT json_extract(data, '$.fixed_ipv4')"
        " ORDER BY created, id").fetchall()


def _mend_stray_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    with _immediate(conn):
        rows = _stray_rows(conn)
        if not rows:
            return []
        holders = dict(conn.execute(
            "SELECT fixed_ipv4, id FROM machines WHERE fixed_ipv4 IN"
            " (SELECT value FROM json_each(?))",
            (json.dumps([row[3] for row in rows if row[3] is not None]),)).fetchall())
        let_go, fixed, profiles, told = mend_stray(rows, holders)
        conn.executemany("UPDATE machines SET fixed_ipv4 = NULL WHERE id = ?",
                         [(ident,) for ident in let_go])
        conn.executemany("UPDATE machines SET fixed_ipv4 = ? WHERE id = ?", fixed)
        conn.executemany("UPDATE machines SET profile = ? WHERE id = ?", profiles)
        return told


def _count_machines(conn: sqlite3.Connection, flt: MachineFilter) -> int:
    where, params = _where(flt)
    # The planner prefers a scan of a wider index to the partial one without statistics;
    # counting the machines that wait for a NIC is on the DHCP path, so name it.
    table = "machines m INDEXED BY machines_no_mac" if flt.has_mac is False else "machines m"
    row = conn.execute(f"SELECT count(*) FROM {table}{where}", params).fetchone()  # noqa: S608
    return int(row[0])


def _state_counts(conn: sqlite3.Connection) -> dict[tuple[str | None, MachineState], int]:
    # One pass over every machine's row (no index holds the state), for a process without
    # a loaded view (the CLI); a server answers from its view. Grouped by state first: by
    # cluster first, the planner walks machines_cluster for its order and looks each row up
    # in the table (100,000 machines: 116 ms against 51 for the scan, CPU, under load).
    return {(cluster, MachineState(state)): count for state, cluster, count in conn.execute(
        "SELECT state, cluster, count(*) FROM machines GROUP BY state, cluster")}


def _delete_machine(conn: sqlite3.Connection, machine_id: str,
                    expect_updated: float | None = None) -> None:
    with _immediate(conn):
        if expect_updated is not None:  # compared in the delete's transaction
            row = conn.execute("SELECT updated FROM machines WHERE id = ?",
                               (machine_id,)).fetchone()
            codec.check_version(machine_id, expect_updated, None if row is None else row[0])
        macs = [r[0] for r in conn.execute(
            "SELECT value FROM machine_keys WHERE machine = ? AND kind = 'mac'", (machine_id,))]
        # Labels and keys go by ON DELETE CASCADE; events and leases have no foreign key.
        if conn.execute("DELETE FROM machines WHERE id = ?", (machine_id,)).rowcount == 0:
            raise NotFound(f"machine {machine_id} not found")
        conn.execute("DELETE FROM events WHERE machine = ?", (machine_id,))
        conn.executemany("DELETE FROM leases WHERE mac = ?", ((m,) for m in macs))
        # Its refused claims (claims.KeptClaims), read by no one once it is gone.
        conn.execute("DELETE FROM settings WHERE key = ?", (REFUSED_CLAIMS + machine_id,))


def _apply_batch(
    conn: sqlite3.Connection,
    create: Sequence[Machine],
    update: Sequence[Machine],
    events: Iterable[_EventRows] = (),
    merge: Sequence[tuple[str, str]] = (),
    expect: Mapping[str, MachineState] | None = None,
    audit: Sequence[tuple[float, str, str, str, str, str]] = (),
    tokens: Sequence[str | None] | None = None,
    versions: Mapping[str, float] | None = None,
    bases: Mapping[str, Machine] | None = None,
    learnt: Collection[str] = (),
) -> tuple[int, int, list[_Row]] | None:
    """The feed's newest position before and after the batch (read under its write lock)
    and the rows written, creates then updates; None for a bulk import (not kept).
    ``tokens``: what each update's document holds in place of its install token;
    ``bases``, ``learnt``: Batch.bases, Batch.learnt."""
    updated = zip(update, tokens, strict=True) if tokens is not None else (
        (m, None) for m in update)
    if len(create) < BULK_ROWS:
        # Encode (and so validate) on the worker, not the event loop: 100k rows take a second
        # of CPU that the DHCP and TFTP servers sharing the loop should not wait for. Before
        # BEGIN, so a bad row costs no lock time.
        # A group commit's machines imported together share their creation time: its text
        # is written out once (codec.machine_json).
        times: dict[float, str] = {}
        creates = [_Row(m, None, times) for m in create]
        found = _bases(update, bases, versions) if bases and not (create or merge) else None
        updates = ([_Row(m, t, times, True) for m, t in updated] if found is None else
                   [_Row(m, t, times, True, found.get(m.id), m.id in learnt)
                    for m, t in updated])
        span = _write_batch(conn, create, creates, updates, events, merge, expect, audit,
                            versions)
        return (*span, [*creates, *updates]) if span is not None else None
    # A bulk import: its new machines are encoded as they are inserted, since a second copy
    # of 100,000 encoded rows is memory the import cannot spare; a bad row rolls it all back.
    size = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute(f"PRAGMA cache_size = {-BULK_CACHE_KIB}")
    # The labels and identifiers inserted refer to machines the same transaction inserts
    # (or, for updates, found by id): checking each reference costs a random look-up per row.
    # A merge deletes machines and needs ON DELETE CASCADE: checks stay on then. (Outside a
    # transaction: SQLite ignores the pragma inside one.)
    checks = bool(merge)
    conn.execute(f"PRAGMA foreign_keys = {'ON' if checks else 'OFF'}")
    # The staging table (a chunk of BULK_CHUNK rows, see _bulk_insert) and the statement
    # journals of the inserts from it in memory, not in temporary files written and read
    # back through system calls (half the import's system time). Nothing of the database
    # itself: its pages and its WAL, hence durability, are as without. (Changing it drops
    # this connection's temporary tables; netboot keeps none between statements.)
    temp = conn.execute("PRAGMA temp_store").fetchone()[0]
    conn.execute("PRAGMA temp_store = MEMORY")
    # No checkpoint at the commit: the WAL holds every page the import wrote (~90 MB for
    # 100,000 machines) and copying them into the database and syncing both took ~1 s of
    # the import's wall time (more on a busy disk) and held the writer thread, on which the
    # boot path's commits queue. SqliteStore._checkpoint_due has it done on a thread of its own
    # once the import returns; readers and writers go on meanwhile (WAL mode). The commit is
    # as durable as any other (synchronous=NORMAL: synced by that checkpoint).
    autocheckpoint = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    try:
        _write_batch(conn, create, None, [_Row(m, t, None, True) for m, t in updated], events,
                     merge, expect, audit, versions)
        return None
    finally:
        conn.execute(f"PRAGMA cache_size = {int(size)}")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA temp_store = {int(temp)}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(autocheckpoint)}")


def _write_batch(conn: sqlite3.Connection, create: Sequence[Machine], creates: list[_Row] | None,
                 updates: list[_Row], events: Iterable[_EventRows],
                 merge: Sequence[tuple[str, str]],
                 expect: Mapping[str, MachineState] | None = None,
                 audit: Sequence[tuple[float, str, str, str, str, str]] = (),
                 versions: Mapping[str, float] | None = None,
                 ) -> tuple[int, int] | None:
    """The feed's newest position before and after, when the batch writes machines."""
    try:
        return _write_transaction(conn, create, creates, updates, events, merge, expect, audit,
                                  versions)
    except _Retry:
        # The fast path failed, and its transaction was rolled back: the whole of it again,
        # one row at a time, to name what failed (every check made again). Not a savepoint
        # kept open around the fast path: SQLite then copies every page the batch modifies
        # into a statement journal, a temporary file once past 64 KiB (40 of the 94 KiB
        # written per machine of a storm's installs, and the openat+unlink pairs under load).
        return _write_transaction(conn, create, creates, updates, events, merge, expect, audit,
                                  versions, slow=True)


def _write_transaction(conn: sqlite3.Connection, create: Sequence[Machine],
                       creates: list[_Row] | None, updates: list[_Row],
                       events: Iterable[_EventRows],
                       merge: Sequence[tuple[str, str]],
                       expect: Mapping[str, MachineState] | None = None,
                       audit: Sequence[tuple[float, str, str, str, str, str]] = (),
                       versions: Mapping[str, float] | None = None,
                       *, slow: bool = False) -> tuple[int, int] | None:
    span = None
    with _immediate(conn):
        before = _last_change(conn) if merge or create or updates else None
        expect = dict(expect or {})
        # The expected state of a machine the batch updates is checked by _update_rows, with
        # the columns it reads before writing the row anyway (a statement less per machine
        # of a compare-and-set batch: every first install). Not after a merge, which deletes
        # rows first; the replay (slow) checks them all here, in the order given.
        # As a rule every machine expected is one updated (a group commit of first
        # installs): the copy is handed on whole, not rebuilt machine by machine (~2,300
        # of the writer's instructions a first install for both, benchmarks/README.md
        # s34-writer); it is only read by id.
        ids = {u.id for u in updates}
        later: dict[str, MachineState]
        if slow or merge:
            later = {}
        elif expect.keys() <= ids:
            later, expect = expect, {}
        else:
            later = {u.id: expect.pop(u.id) for u in updates if u.id in expect}
        # The versions read (Batch.versions) likewise, with the same columns.
        versions = dict(versions or {})
        later_versions: dict[str, float]
        if slow or merge or not versions:
            later_versions = {}
        elif versions.keys() <= ids:
            later_versions, versions = versions, {}
        else:
            later_versions = {u.id: versions.pop(u.id) for u in updates if u.id in versions}
        for machine_id, state in expect.items():
            row = conn.execute("SELECT state, updated FROM machines WHERE id = ?",
                               (machine_id,)).fetchone()
            codec.check_expected(machine_id, state, None if row is None else row[0])
            if (read := versions.pop(machine_id, None)) is not None:
                codec.check_version(machine_id, read, None if row is None else row[1])
        for machine_id, read in versions.items():
            row = conn.execute("SELECT updated FROM machines WHERE id = ?",
                               (machine_id,)).fetchone()
            codec.check_version(machine_id, read, None if row is None else row[0])
        for source, target in merge:
            if conn.execute("DELETE FROM machines WHERE id = ?", (source,)).rowcount == 0:
                raise NotFound(f"machine {source} not found")
            conn.execute("UPDATE events SET machine = ? WHERE machine = ?", (target, source))
        if slow:
            # executemany cannot say which row failed: replayed one by one to name it. The
            # replay succeeds, and commits, when only the fast path's shape failed: one
            # machine updated twice has its labels inserted twice.
            _slow_batch(conn, [_Row(m) for m in create] if creates is None else creates,
                        updates)
        else:
            try:
                if creates is None:
                    _bulk_insert(conn, create)
                else:
                    _insert_rows(conn, creates)
                _update_rows(conn, updates, later, later_versions, len(ids) < len(updates))
            except sqlite3.IntegrityError:
                raise _Retry from None  # rolled back by _immediate; see _write_batch
        _insert_events(conn, events)
        conn.executemany(_INSERT_AUDIT, audit)
        if before is not None:
            span = before, _last_change(conn)
    return span


def _bases(update: Sequence[Machine], bases: Mapping[str, Machine],
           versions: Mapping[str, float] | None) -> Mapping[str, Machine] | None:
    """The machines of ``bases`` whose stored document an update may change in place: each
    one's version is checked (``versions``, in _update_group, before its row is written), so
    the stored document is the one that read as it. Not in a batch that creates or merges
    machines (their rows are written first), nor when a machine is updated twice (the
    second update's base is not what the first one left)."""
    if versions is None or len({m.id for m in update}) < len(update):
        return None
    return {i: b for i, b in bases.items() if versions.get(i) == b.updated}


# From this many new machines a batch is a bulk import (see _bulk_insert).
BULK_ROWS = 500
# Page cache of a bulk import, KiB. SQLite's default (2 MiB) holds a sliver of 100,000
# machines' indexes; each insert lands on a random page of each, and the pages it evicts are
# written to the WAL and read back over and over (a third of an import's time went to
# system calls). Given back after the batch. 16 MiB measured as fast as 32 MiB once the two
# expression indexes were gone (migration 6), 8 MiB a fifth slower; the import's peak RSS is
# what the rest would cost.
BULK_CACHE_KIB = 16384


def _wal_checkpoint(conn: sqlite3.Connection) -> None:
    # PASSIVE: copies what no reader still needs, never waits for a lock or blocks a writer.
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()


def _insert_rows(conn: sqlite3.Connection, creates: list[_Row]) -> None:
    if creates:
        conn.executemany(_INSERT_MACHINE, (r.insert_params() for r in creates))
        conn.executemany(_INSERT_LABEL, (lab for r in creates for lab in r.labels))
        conn.executemany(_INSERT_KEY, (key for r in creates for key in r.keys))


def _update_rows(conn: sqlite3.Connection, updates: list[_Row],
                 expect: dict[str, MachineState], versions: dict[str, float],
                 repeated: bool) -> None:
    """Each machine's row, and its labels and identifiers where they changed; ``expect``:
    the states some must be in before the batch, ``versions`` the ``updated`` times (each
    checked, and removed).

    Most updates of a boot storm change a machine's document only (facts learnt, a token)
    or its state with it (an install): the other indexed columns, labels and identifiers
    stay. Those are compared with what is stored (reads of pages the update touches anyway)
    and only what changed is set: setting an indexed column, even to its own value,
    rewrites its entry in every index on it, and the labels and identifiers were deleted
    and inserted again. Measured on 100,000 machines: ~300 us of SQLite CPU per updated
    machine before, ~35 after; an install's update wrote 54 KiB (WAL and checkpoint) when
    it set all four columns, 30 KiB setting the state alone.
    The labels and identifiers are compared with the stored document's, read with the
    columns from the row's own page: every writer writes a machine's label and identifier
    rows from the document it stores with them, in the same transaction. Reading the rows
    themselves was two more statements and two more random pages (of machine_labels and
    of machine_keys' index) per update, ~15 % of the writer's time in a storm on 100,000
    machines.
    The group's stored rows are read by one statement and its updates written by one
    ``executemany`` per set of changed columns (a storm's installs share one): a statement
    per machine cost the writer's thread ~2 us of GIL time each to set up. A machine listed
    twice is written one update at a time, in order, so that it ends as written last, as
    the replay of :func:`_slow_batch` leaves it; a missing one is named by that replay.
    """
    if not updates:
        return
    if repeated:  # a machine listed twice (the caller counted the ids)
        for r in updates:
            _update_group(conn, [r], expect, versions)
        return
    _update_group(conn, updates, expect, versions)


def _update_group(conn: sqlite3.Connection, updates: list[_Row],
                  expect: dict[str, MachineState], versions: dict[str, float]) -> None:
    """:func:`_update_rows` of machines listed once each."""
    for r in updates:
        if r.delta is None:
            break
    else:  # as a rule (a group of first installs, of config fetches)
        _update_bases(conn, updates, expect, versions)
        return
    stored = {row[0]: row for row in conn.execute(
        _STORED_COLUMNS, (json.dumps([r.id for r in updates]),))}
    if len(stored) < len(updates):
        raise _Retry  # no such machine
    shapes: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    in_place: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
                   list[tuple[Any, ...]]] = {}
    labels: list[_Row] = []
    # In the group's order, as today's delete-and-insert of each: a machine whose
    # identifiers changed, or the rows that machines only adding some insert (one list for
    # a run of those, one executemany). The order keeps a conflict what it was: a key added
    # before another machine of the group gives it up is refused, the group written again
    # row by row to name it (_slow_batch), as when every row was deleted and inserted.
    keys: list[_Row | list[tuple[str, str, str]]] = []
    moved: list[str] = []  # the machines whose fixed_ipv4 column changes
    for r in updates:
        m = r.machine
        old = stored[r.id]
        # Compared here, as the version below (the stored state is never NULL).
        if (expect and (expected := expect.pop(r.id, None)) is not None
                and old[3] != expected._value_):
            codec.check_expected(r.id, expected, old[3])
        # Compared here, the call made only to refuse (a call per machine of a group commit
        # is ~1,000 of the writer's instructions, held with the GIL).
        if versions and (read := versions.pop(r.id, None)) is not None and old[6] != read:
            codec.check_version(r.id, read, old[6])
        state: str = m.state._value_
        shape: tuple[str, ...]
        params: tuple[Any, ...]
        # The document: its text, or the values of what changes in it (their keys in the
        # statement's shape).
        # (Changed in place, its creation time is the stored one: not set again.)
        data = (r.data, r.created) if (delta := r.delta) is None else delta[2]
        if (old[1] == r.mac and old[2] == m.hostname and old[4] == m.cluster
                and old[7] == m.fixed_ipv4 and old[8] == m.profile):  # as a rule
            if old[3] == state:
                shape, params = (), (*data, r.updated, r.id)
            elif delta is not None and _shares_state(_STATE_ONLY, delta[0]):
                # The delta's first value is the state's: bound once.
                shape, params = _STATE_ONLY, (*data, r.updated, r.id)
            else:
                shape, params = _STATE_ONLY, (state, *data, r.updated, r.id)
        else:
            if old[7] != m.fixed_ipv4:
                moved.append(r.id)
            changed = [(c, now) for c, was, now in zip(
                _INDEXED, (*old[1:5], old[7], old[8]), (r.mac, m.hostname, state, m.cluster,
                                                         m.fixed_ipv4, m.profile), strict=True)
                if was != now]
            shape = tuple([c for c, _ in changed])
            params = (*[now for _, now in changed], *data, r.updated, r.id)
            if delta is not None and _shares_state(shape, delta[0]):
                params = params[1:]
        if delta is None:
            shapes.setdefault(shape, []).append(params)
        else:
            in_place.setdefault((shape, delta[0], delta[1]), []).append(params)
        if r.claims is None or old[5] == r.claims:  # as a rule (None: the stored ones)
            # Changed in place: the rows of the identifiers it adds (codec.machine_delta),
            # in the group's order as below.
            if delta is not None and delta[3]:
                run = keys[-1] if keys else None
                if not isinstance(run, list):
                    run = []
                    keys.append(run)
                run.extend([(kind, value, r.id) for kind, value in delta[3]])
            continue
        same_labels, same_keys, added = codec.claims_change(old[5], m)
        if not same_labels:
            labels.append(r)
        if same_keys:
            continue
        if added is None:
            keys.append(r)
        elif added:
            run = keys[-1] if keys else None
            if not isinstance(run, list):
                run = []
                keys.append(run)
            run.extend([(kind, value, r.id) for kind, value in added])
    _let_go_fixed(conn, moved)
    for shape, rows in shapes.items():
        conn.executemany(_UPDATE_CHANGED[shape], rows)
    for (shape, keys_set, gone), rows in in_place.items():
        conn.executemany(_update_in_place(shape, keys_set, gone, False), rows)
    for r in labels:
        conn.execute(_DELETE_LABELS, (r.id,))
        conn.executemany(_INSERT_LABEL, r.labels)
    for k in keys:
        if isinstance(k, _Row):
            conn.execute(_DELETE_KEYS, (k.id,))
            conn.executemany(_INSERT_KEY, k.keys)
        else:
            conn.executemany(_INSERT_KEY, k)


def _update_bases(conn: sqlite3.Connection, updates: list[_Row],
                  expect: dict[str, MachineState], versions: dict[str, float]) -> None:
    """:func:`_update_group` of rows that each change their stored document in place
    (``_Row.delta``): their stored columns are not read. Each one's version is checked
    (_bases), so the stored row is its base's: the indexed columns are compared with the
    base's (the MACs are the same, codec.machine_delta) and the compare-and-set is the
    UPDATE's own (``WHERE updated = ? AND state = ?``: the version, and the state expected,
    else the base's). A machine not written so (gone, changed meanwhile) makes the group
    written again row by row, which names it (_slow_batch, as a refusal did here).

    The read of the group's stored columns (one statement, then seven columns a machine
    made into Python values) was ~11,000 of the writer's instructions a first install
    holding the interpreter lock (benchmarks/README.md s35-writer).

    The identifier rows an update adds (a first DHCP sighting's UUID: ``delta[3]``) are
    inserted after the group's UPDATEs, in its order: one another machine holds (or one of
    the group added before) breaks machine_keys' uniqueness, and the group is written again
    row by row, which names it as the whole write does (identity.claimed). No machine of
    such a group gives up an identifier (machine_delta refuses a change or a removal), so
    inserting them after every UPDATE refuses what inserting each with its row would."""
    shapes: dict[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]],
                 list[tuple[Any, ...]]] = {}
    added: list[tuple[str, str, str]] | None = None
    moved: list[str] = []  # the machines whose fixed_ipv4 column changes
    for r in updates:
        m, base, delta = r.machine, r.base, r.delta
        assert base is not None and delta is not None  # the caller tested
        if delta[3]:
            if added is None:
                added = []
            added.extend([(kind, value, r.id) for kind, value in delta[3]])
        expected = expect.pop(r.id, None) if expect else None
        was: str = (base.state if expected is None else expected)._value_
        state: str = m.state._value_
        hostname, cluster = m.hostname, m.cluster
        shape: tuple[str, ...]
        params: tuple[Any, ...]
        if (hostname == base.hostname and cluster == base.cluster
                and m.fixed_ipv4 == base.fixed_ipv4 and m.profile == base.profile):  # as a rule
            # (A state change's first delta value is the state, as a rule: bound once for
            # the column and the document, _shares_state.)
            if state == was:
                shape, params = (), (*delta[2], r.updated, r.id, versions.pop(r.id), was)
            elif _shares_state(_STATE_ONLY, delta[0]):
                shape, params = _STATE_ONLY, (*delta[2], r.updated, r.id, versions.pop(r.id),
                                              was)
            else:
                shape = _STATE_ONLY
                params = (state, *delta[2], r.updated, r.id, versions.pop(r.id), was)
        else:
            if m.fixed_ipv4 != base.fixed_ipv4:
                moved.append(r.id)
            changed = [(c, now) for c, was_value, now in (
                ("hostname", base.hostname, hostname), ("state", was, state),
                ("cluster", base.cluster, cluster),
                ("fixed_ipv4", base.fixed_ipv4, m.fixed_ipv4),
                ("profile", base.profile, m.profile)) if was_value != now]
            shape = tuple([c for c, _ in changed])
            params = (*[now for _, now in changed], *delta[2], r.updated, r.id,
                      versions.pop(r.id), was)
            if _shares_state(shape, delta[0]):
                params = params[1:]
        shapes.setdefault((shape, delta[0], delta[1]), []).append(params)
    _let_go_fixed(conn, moved)
    written = 0
    for (columns, keys_set, gone), rows in shapes.items():
        written += conn.executemany(_update_in_place(columns, keys_set, gone, True),
                                    rows).rowcount
    if written != len(updates):
        raise _Retry
    if added:
        conn.executemany(_INSERT_KEY, added)


def _shares_state(changed: tuple[str, ...], keys: tuple[str, ...]) -> bool:
    """Whether :func:`_update_in_place` binds the state once for its column and the
    document's first key (``changed`` the state alone, ``keys`` first the state): the
    caller's parameters are then the delta's values, the first of them the column's."""
    return changed == _STATE_ONLY and bool(keys) and keys[0] == "state"


def _update_in_place(changed: tuple[str, ...], keys: tuple[str, ...],
                     gone: tuple[str, ...], checked: bool) -> str:
    """The UPDATE of a machine whose document changes in place (codec.machine_delta): the
    indexed columns ``changed``, the document's top-level ``keys`` set (a JSON text for
    codec.DELTA_JSON's, else a string) and ``gone`` removed, by SQLite's JSON functions;
    ``checked``: only if its version and state are those given (_update_bases).
    Made per group commit (one a group of first installs; sqlite3's statement cache keeps
    it prepared). The keys are codec's own names, never a caller's."""
    data = "data"
    if keys:
        # The state column's parameter named again for the document's state, when it is
        # the only indexed column set and the first key (_shares_state: an install, a
        # config fetch): one value bound, not the same text twice (SQLite copies each
        # bound text, holding the interpreter lock). Then the first key's value is not
        # among the statement's parameters: the caller binds it once, as the column's.
        shared = _shares_state(changed, keys)
        # codec.SINCE_UPDATED, after "updated": its parameter (numbered as SQLite numbers
        # them, the indexed columns' first) bound once, named again; the plain ``?`` after
        # it go on from the highest number given. Counted key by key: codec.FACTS_NEW's
        # key binds one value a name.
        parts = []
        bound = len(changed)  # the parameters numbered so far
        updated = 0  # the number of "updated"'s
        for i, k in enumerate(keys):
            if shared and i == 0:
                parts.append("'$.state', ?1")
            elif k == codec.SINCE_UPDATED:
                parts.append(f"'$.state_since', json(?{updated})")
            elif k.startswith(codec.FACTS_NEW):
                names = k[len(codec.FACTS_NEW):].split(",")
                parts.append("'$.facts', json_object("
                             + ", ".join(f"'{name}', ?" for name in names) + ")")
                bound += len(names)
            else:
                parts.append(f"'$.{k}', json(?)" if k in codec.DELTA_JSON else f"'$.{k}', ?")
                bound += 1
                if k == "updated":
                    updated = bound
        data = "json_set(data, " + ", ".join(parts) + ")"
    if gone:
        data = "json_remove(" + data + "".join(f", '$.{k}'" for k in gone) + ")"
    return ("UPDATE machines SET " + "".join(f"{c} = ?, " for c in changed)  # noqa: S608
            + f"data = {data}, updated = ? WHERE id = ?"
            + (" AND updated = ? AND state = ?" if checked else ""))


# A batch's events as _write_batch takes them, in order: runs (one statement each) and rows.
_EventRows = codec.EventRun | Iterable[tuple[str, float, str, str, str]]


def _insert_events(conn: sqlite3.Connection, events: Iterable[_EventRows]) -> None:
    """The events in order; a run (an import's "enrolled" events) by one ``INSERT … SELECT``
    over its ids, not a bound statement per event (a quarter of the time for 100,000)."""
    for part in events:
        if isinstance(part, codec.EventRun):
            # In chunks: 100,000 ids as one JSON text cost the import ~6 MiB of peak memory.
            for ids in codec.run_ids(part, BULK_CHUNK):
                conn.execute("INSERT INTO events (machine, time, kind, message, data)"
                             " SELECT value, ?, ?, ?, '{}' FROM json_each(?) ORDER BY key",
                             (part.time, part.kind, part.message, ids))
        else:
            conn.executemany("INSERT INTO events (machine, time, kind, message, data)"
                             " VALUES (?, ?, ?, ?, ?)", part)


# New machines staged at a time by _bulk_insert: ~1.2 MiB of staging table in memory.
BULK_CHUNK = 4096


def _bulk_insert(conn: sqlite3.Connection, create: Sequence[Machine]) -> None:
    """Many new machines, BULK_CHUNK at a time: into a temporary table (no index, no
    trigger), encoded as they go, then one ``INSERT … SELECT`` per table, labels and MACs
    taken from the stored document. Each row inserted by a statement of its own made SQLite
    keep a statement journal for it (the change-feed trigger could fail half way) and copy
    every index page it touched into it; one statement copies each page at most once. In
    chunks, so that the staging table fits in memory (all 100,000 rows took 80 MiB there)."""
    conn.execute("CREATE TEMP TABLE bulk (id, mac, more_macs, hostname, state, cluster, data,"
                 " created, updated, uuid, serial, asset, fixed_ipv4, profile)")
    rows = codec.bulk_columns_of(create)
    try:
        while chunk := list(itertools.islice(rows, BULK_CHUNK)):
            conn.executemany("INSERT INTO temp.bulk VALUES"
                             " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             chunk)
            _from_staging(conn)
            conn.execute("DELETE FROM temp.bulk")
    finally:
        conn.execute("DROP TABLE IF EXISTS temp.bulk")


def _from_staging(conn: sqlite3.Connection) -> None:
    """The machines of ``temp.bulk`` into their tables, identifiers and labels."""
    conn.execute("INSERT INTO machines (id, mac, hostname, state, cluster, data, created,"
                 " updated, fixed_ipv4, profile) SELECT id, mac, hostname, state, cluster, data,"
                 " created, updated, fixed_ipv4, profile FROM temp.bulk")
    conn.execute("INSERT INTO machine_labels (machine, key, value)"
                 " SELECT b.id, l.key, l.value FROM temp.bulk b,"
                 " json_each(b.data, '$.labels') l")
    # The first MAC from its column; the document is parsed only for a machine with more
    # (json_each over every document was a third of this statement).
    conn.execute("INSERT INTO machine_keys (kind, value, machine)"
                 " SELECT 'mac', mac, id FROM temp.bulk WHERE mac IS NOT NULL"
                 " UNION ALL SELECT 'mac', k.value, b.id FROM temp.bulk b,"
                 " json_each(b.data, '$.macs') k WHERE b.more_macs AND k.key > 0"
                 " UNION ALL SELECT 'uuid', uuid, id FROM temp.bulk WHERE uuid IS NOT NULL"
                 " UNION ALL SELECT 'serial', serial, id FROM temp.bulk"
                 " WHERE serial IS NOT NULL"
                 " UNION ALL SELECT 'asset', asset, id FROM temp.bulk WHERE asset IS NOT NULL")


def _slow_batch(conn: sqlite3.Connection, creates: list[_Row], updates: list[_Row]) -> None:
    """The same writes with the checks MemoryStore makes, in the same order and words."""
    # The addresses the batch's updates move let go first, as the fast path does
    # (_let_go_fixed, _let_go_moved): a new machine may take one an update gives up.
    if len(updates) > 1 or (updates and creates):
        _let_go_moved(conn, updates)
    for row in creates:
        if conn.execute("SELECT 1 FROM machines WHERE id = ?", (row.id,)).fetchone():
            raise Conflict(f"machine {row.id} already exists")
        _check_claims(conn, row)
        _fixed_column(conn, row, create=True)
        conn.execute(_INSERT_MACHINE, row.insert_params())
        conn.executemany(_INSERT_LABEL, row.labels)
        conn.executemany(_INSERT_KEY, row.keys)
    for row in updates:
        if not conn.execute("SELECT 1 FROM machines WHERE id = ?", (row.id,)).fetchone():
            raise NotFound(f"machine {row.id} not found")
        _check_claims(conn, row)
        conn.execute(_UPDATE_MACHINE, row.update_params(_fixed_column(conn, row)))
        conn.execute(_DELETE_LABELS, (row.id,))
        conn.execute(_DELETE_KEYS, (row.id,))
        conn.executemany(_INSERT_LABEL, row.labels)
        conn.executemany(_INSERT_KEY, row.keys)


def _let_go_moved(conn: sqlite3.Connection, updates: Sequence[_Row]) -> None:
    """The fixed_ipv4 column of each of ``updates`` emptied where the update gives its
    machine another address, before _slow_batch writes the batch row by row: a new machine
    may take the address an update moves an enrolled one off (an import's; the fast path,
    which inserts first, was refused by the index and the batch replayed here), machines
    may swap theirs. Each row sets its own again as it is written."""
    conn.executemany("UPDATE machines SET fixed_ipv4 = NULL WHERE id = ? AND fixed_ipv4 IS NOT"
                     " NULL AND fixed_ipv4 IS NOT ?", [(r.id, r.machine.fixed_ipv4)
                                                       for r in updates])


def _let_go_fixed(conn: sqlite3.Connection, moved: Sequence[str]) -> None:
    """Empty the fixed_ipv4 column of the machines ``moved`` (those of a batch whose address
    changes) before any of them is written, when there are two or more: an import that swaps
    two machines' addresses (A given B's, B given A's) is then written, where the unique
    index, checked at each row (SQLite cannot defer it), refused the first row. Each row
    then sets its own, so the index still refuses an address the batch leaves held by two."""
    if len(moved) > 1:
        conn.execute("UPDATE machines SET fixed_ipv4 = NULL WHERE fixed_ipv4 IS NOT NULL"
                     " AND id IN (SELECT value FROM json_each(?))", (json.dumps(moved),))


def _fixed_column(conn: sqlite3.Connection, row: _Row, *, create: bool = False) -> str | None:
    """What the fixed_ipv4 column of ``row`` is written as (machines_fixed_ipv4, migration
    8): its address, or a Conflict naming the machine holding it (as Core._fixed_ipv4_free
    words it). An address the machine's stored document already held while another machine
    holds its column (a duplicate the migration found) is written NULL again, as stored:
    its boots and edits go on; start-up names it."""
    fixed = row.machine.fixed_ipv4
    if fixed is None:
        return None
    holder = conn.execute("SELECT id, coalesce(mac, id) FROM machines WHERE fixed_ipv4 = ?"
                          " AND id <> ?", (fixed, row.id)).fetchone()
    if holder is None:
        return fixed
    if not create and conn.execute(
            "SELECT fixed_ipv4 IS NULL AND json_extract(data, '$.fixed_ipv4') = ? FROM machines"
            " WHERE id = ?", (fixed, row.id)).fetchone() == (1,):
        return None
    raise fixed_taken(fixed, holder[1], holder[0])


def _check_claims(conn: sqlite3.Connection, row: _Row) -> None:
    for kind, value, _ in row.keys:
        holder = conn.execute(
            "SELECT m.data FROM machine_keys k JOIN machines m ON m.id = k.machine"
            " WHERE k.kind = ? AND k.value = ? AND k.machine <> ?",
            (kind, value, row.id)).fetchone()
        if holder is not None:
            raise identity.claimed(kind, value, _machine(holder[0]))
    hostname = row.machine.hostname
    if hostname is None:
        return
    found = conn.execute(
        "SELECT coalesce(mac, id), id FROM machines WHERE lower(hostname) = lower(?)"
        " AND hostname IS NOT NULL AND id <> ?",
        (hostname, row.id),
    ).fetchone()
    if found is not None:
        raise Conflict(f"hostname {hostname!r} is used by {found[0]}", field="hostname",
                       holder=found[1])


def _get_named(conn: sqlite3.Connection, kind: str, name: str) -> Any:
    row = conn.execute(
        f"SELECT data FROM {_TABLES[kind]} WHERE name = ?",  # noqa: S608 - table from a constant map
        (name,),
    ).fetchone()
    return None if row is None else json.loads(row[0])


def _list_named(conn: sqlite3.Connection, kind: str) -> list[Any]:
    rows = conn.execute(f"SELECT data FROM {_TABLES[kind]} ORDER BY name").fetchall()  # noqa: S608
    return [json.loads(r[0]) for r in rows]


def _put_named(conn: sqlite3.Connection, kind: str, name: str, data: str, create: bool) -> None:
    table = _TABLES[kind]
    if create:
        try:
            conn.execute(f"INSERT INTO {table} (name, data) VALUES (?, ?)", (name, data))  # noqa: S608
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"{kind} {name!r} already exists") from exc
    else:
        conn.execute(
            f"INSERT INTO {table} (name, data) VALUES (?, ?)"  # noqa: S608
            " ON CONFLICT (name) DO UPDATE SET data = excluded.data",
            (name, data),
        )


def _as_inventory(fd: int, path: Path) -> None:
    """The inventory's lock file ``fd`` given the owner and mode of the inventory's file
    ``path``, as SQLite gives its -wal and -shm files (os_unix.c: robustFchown when run as
    root, the database's mode): made by a CLI run as root beside a server running as its own
    user (the container's netboot), it was root's alone (0600), and every fixed_ipv4 write of
    the server failed to open it. A user that may not change it leaves it as it is."""
    try:
        want, have = os.stat(path), os.fstat(fd)
    except OSError:
        return
    mode = stat.S_IMODE(want.st_mode) & 0o666
    with contextlib.suppress(OSError):
        if os.geteuid() == 0 and (have.st_uid, have.st_gid) != (want.st_uid, want.st_gid):
            os.fchown(fd, want.st_uid, want.st_gid)
        if stat.S_IMODE(have.st_mode) != mode and have.st_uid == os.geteuid():
            os.fchmod(fd, mode)


def _put_named_if(conn: sqlite3.Connection, kind: str, name: str, data: str,
                  open_item: Callable[[Any], Any], read: Any) -> None:
    """Replace the ``kind`` named ``name`` if it is still ``read`` (base.check_unchanged):
    the read and the write in one write transaction, so no other writer comes between."""
    table = _TABLES[kind]
    with _immediate(conn):
        row = conn.execute(f"SELECT data FROM {table} WHERE name = ?",  # noqa: S608
                           (name,)).fetchone()
        check_unchanged(kind, name, None if row is None else open_item(json.loads(row[0])),
                        read)
        conn.execute(f"UPDATE {table} SET data = ? WHERE name = ?", (data, name))  # noqa: S608


def _delete_named(conn: sqlite3.Connection, kind: str, name: str,
                  open_item: Callable[[Any], Any], read: Any, unused: bool,
                  installs: InstallsSince | None = None) -> None:
    """Delete the ``kind`` named ``name``; if it is still ``read`` (base.check_unchanged)
    and, ``unused``, no machine or group names it (base.in_use), and a group's
    ``installs`` check passes: checked in the delete's own write transaction, so no other
    writer comes between the check and the delete."""
    table = _TABLES[kind]
    with _immediate(conn):
        if installs is not None:
            installs.check(_installs_since(conn, installs.seq)[1])
        if read is not None:
            row = conn.execute(f"SELECT data FROM {table} WHERE name = ?",  # noqa: S608
                               (name,)).fetchone()
            check_unchanged(kind, name, None if row is None else open_item(json.loads(row[0])),
                            read)
        if unused:
            # By the indexed column (a profile's since migration 8: it read every machine's
            # document here, with the write lock held).
            where = "cluster = ?" if kind == "cluster" else "profile = ?"
            found = conn.execute(f"SELECT coalesce(mac, id), id FROM machines WHERE {where}"  # noqa: S608
                                 " LIMIT 1", (name,)).fetchone()
            if found is not None:
                raise in_use(kind, name, f"machine {found[0]}", found[1])
            found = conn.execute(f"SELECT name FROM groups WHERE json_extract(data, '$.{kind}')"  # noqa: S608
                                 " = ? ORDER BY name LIMIT 1", (name,)).fetchone()
            if found is not None:
                raise in_use(kind, name, f"group {found[0]!r}", None)
        cur = conn.execute(f"DELETE FROM {table} WHERE name = ?", (name,))  # noqa: S608
        if cur.rowcount == 0:
            raise NotFound(f"{kind} {name!r} not found")


def _add_event(conn: sqlite3.Connection, event: Event, data: str) -> None:
    conn.execute(
        "INSERT INTO events (machine, time, kind, message, data) VALUES (?, ?, ?, ?, ?)",
        (event.machine, event.time, event.kind, event.message, data),
    )


def _list_events(conn: sqlite3.Connection, machine_id: str, limit: int) -> list[Event]:
    # Newest `limit` by id (insertion order, not the caller's clock), then oldest first.
    rows = conn.execute(
        "SELECT time, kind, message, data FROM events WHERE machine = ?"
        " ORDER BY id DESC LIMIT ?",
        (machine_id, limit),
    ).fetchall()
    return [
        Event(machine=machine_id, time=t, kind=k, message=msg, data=json.loads(d))
        for t, k, msg, d in reversed(rows)
    ]


def _newest_events(conn: sqlite3.Connection, ids: str) -> dict[str, Event]:
    # Each machine's newest id by the (machine, id) index, one probe each: a held machine's
    # thousands of events are not walked (as max(id) ... GROUP BY machine would).
    rows = conn.execute(
        "SELECT machine, time, kind, message, data FROM events WHERE id IN"
        " (SELECT (SELECT id FROM events WHERE machine = j.value ORDER BY id DESC LIMIT 1)"
        " FROM json_each(?) j)", (ids,)).fetchall()
    return {m: Event(machine=m, time=t, kind=k, message=msg, data=json.loads(d))
            for m, t, k, msg, d in rows}


def _events_since(conn: sqlite3.Connection, after: int, limit: int) -> tuple[int, list[Event]]:
    if after < 0:
        return int(conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]), []
    rows = conn.execute(
        "SELECT id, machine, time, kind, message, data FROM events WHERE id > ?"
        " ORDER BY id LIMIT ?", (after, limit)).fetchall()
    return (rows[-1][0] if rows else after), [
        Event(machine=m, time=t, kind=k, message=msg, data=json.loads(d))
        for _, m, t, k, msg, d in rows]


def _list_leases(conn: sqlite3.Connection) -> list[Lease]:
    rows = conn.execute("SELECT mac, ipv4, expires, hostname FROM leases ORDER BY mac")
    return [Lease(mac=m, ipv4=ip, expires=e, hostname=h) for m, ip, e, h in rows]


def _lease_by_ip(conn: sqlite3.Connection, ipv4: str) -> Lease | None:
    # The address's UNIQUE constraint is its index: one row, not the table.
    row = conn.execute("SELECT mac, ipv4, expires, hostname FROM leases WHERE ipv4 = ?",
                       (ipv4,)).fetchone()
    return None if row is None else Lease(mac=row[0], ipv4=row[1], expires=row[2],
                                          hostname=row[3])


def _put_lease(conn: sqlite3.Connection, lease: Lease, now: float | None,
               ending: str | None = None) -> None:
    with _immediate(conn):
        if ending is not None:
            conn.execute("DELETE FROM leases WHERE ipv4 = ? AND mac = ?", (lease.ipv4, ending))
        if now is not None:
            conn.execute("DELETE FROM leases WHERE ipv4 = ? AND mac <> ? AND expires <= ?",
                         (lease.ipv4, lease.mac, now))
        holder = conn.execute(
            "SELECT mac FROM leases WHERE ipv4 = ? AND mac <> ?", (lease.ipv4, lease.mac)
        ).fetchone()
        if holder is not None:
            raise Conflict(f"address {lease.ipv4} is leased to {holder[0]}")
        conn.execute(
            "INSERT INTO leases (mac, ipv4, expires, hostname) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (mac) DO UPDATE SET ipv4 = excluded.ipv4,"
            " expires = excluded.expires, hostname = excluded.hostname",
            (lease.mac, lease.ipv4, lease.expires, lease.hostname),
        )


def _delete_lease(conn: sqlite3.Connection, mac: str) -> None:
    conn.execute("DELETE FROM leases WHERE mac = ?", (mac,))


def _forget_changes(conn: sqlite3.Connection, before: int) -> None:
    with _immediate(conn):
        # Never the newest row: it is what tells a reader that nothing before it is missing.
        conn.execute("DELETE FROM changes WHERE seq < ? AND seq < (SELECT max(seq) FROM changes)",
                     (before,))


def _installs_since(conn: sqlite3.Connection, seq: int) -> tuple[int, list[Machine]]:
    """base.InstallsSince's machines: those with no profile of their own, under way, that
    the change feed says were written after ``seq`` (from the feed's primary key range,
    each looked up by id: not a scan of every machine), or every such one if it was
    pruned past; and the feed's position they were read at."""
    states = ", ".join(f"'{state.value}'" for state in INSTALLS_UNDER_WAY)
    first, last = _feed_ends(conn)
    if first is not None and last is not None and first > seq + 1 and seq < last:
        rows = conn.execute(f"SELECT data FROM machines WHERE state IN ({states})"  # noqa: S608
                            " AND profile IS NULL")
    else:
        # CROSS JOIN: SQLite keeps this order (the feed's range first).
        rows = conn.execute(
            "SELECT m.data FROM (SELECT DISTINCT key FROM changes WHERE seq > ?"  # noqa: S608
            " AND tbl = 'machines') AS c CROSS JOIN machines AS m ON m.id = c.key"
            f" WHERE m.state IN ({states}) AND m.profile IS NULL", (seq,))
    return (last or 0), [_machine(row[0]) for row in rows]


def _last_change(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])


def _get_setting(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _claim_setting(conn: sqlite3.Connection, key: str, value: str, replace: str | None) -> str:
    with _immediate(conn):  # the write lock first: the read below is the one that decides
        current = _get_setting(conn, key)
        if current is None or (replace is not None and current == replace):
            _put_setting(conn, key, value)
            return value
        return current


def _put_setting(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _delete_setting(conn: sqlite3.Connection, key: str) -> None:
    with _immediate(conn):
        conn.execute("DELETE FROM settings WHERE key = ?", (key,))


def _forget_stale_settings(conn: sqlite3.Connection) -> int:
    with _immediate(conn):
        # A range of the primary key: the rows of machines ever contested, not the table.
        gone = conn.execute(
            "DELETE FROM settings WHERE key >= ? AND key < ? AND NOT EXISTS"
            " (SELECT 1 FROM machines m WHERE m.id = substr(settings.key, ?))",
            (REFUSED_CLAIMS, REFUSED_CLAIMS_END, len(REFUSED_CLAIMS) + 1)).rowcount
        return int(gone + conn.executemany("DELETE FROM settings WHERE key = ?",
                                           ((k,) for k in STALE_SETTINGS)).rowcount)



def _create_token(conn: sqlite3.Connection, token: ApiToken) -> None:
    try:
        conn.execute(f"INSERT INTO api_tokens ({codec.TOKEN_COLUMNS})"  # noqa: S608 - a constant
                     " VALUES (?, ?, ?, ?, ?, ?)",
                     (token.name, token.sha256, str(token.scope), token.created, token.expires,
                      token.last_used))
    except sqlite3.IntegrityError as exc:
        taken = conn.execute("SELECT 1 FROM api_tokens WHERE name = ?", (token.name,)).fetchone()
        what = f"token {token.name!r}" if taken else "a token with this value"
        raise Conflict(f"{what} already exists") from exc


def _token_by_hash(conn: sqlite3.Connection, sha256: str) -> ApiToken | None:
    row = conn.execute(f"SELECT {codec.TOKEN_COLUMNS} FROM api_tokens WHERE sha256 = ?",  # noqa: S608
                       (sha256,)).fetchone()
    return None if row is None else codec.token_from_row(row)


def _list_tokens(conn: sqlite3.Connection) -> list[ApiToken]:
    rows = conn.execute(f"SELECT {codec.TOKEN_COLUMNS} FROM api_tokens ORDER BY name")  # noqa: S608
    return [codec.token_from_row(r) for r in rows]


def _delete_token(conn: sqlite3.Connection, name: str) -> None:
    if conn.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount == 0:
        raise NotFound(f"token {name!r} not found")


def _touch_token(conn: sqlite3.Connection, name: str, when: float) -> None:
    conn.execute("UPDATE api_tokens SET last_used = ? WHERE name = ?", (when, name))


_INSERT_AUDIT = ("INSERT INTO audit (time, actor, action, target, peer, outcome)"
                 " VALUES (?, ?, ?, ?, ?, ?)")


def _audit_row(entry: AuditEntry) -> tuple[float, str, str, str, str, str]:
    return (entry.time, entry.actor, entry.action, entry.target, entry.peer, entry.outcome)


def _add_audit(conn: sqlite3.Connection, entry: AuditEntry) -> None:
    conn.execute(_INSERT_AUDIT, _audit_row(entry))


def _settle_audit(conn: sqlite3.Connection, entry: AuditEntry, written: str,
                  otherwise: str) -> None:
    with _immediate(conn):
        if not conn.execute(
                "UPDATE audit SET outcome = ? WHERE id = (SELECT max(id) FROM audit WHERE"
                " time = ? AND actor = ? AND action = ? AND target = ? AND peer = ?"
                " AND outcome = ?)", (written, *_audit_row(entry))).rowcount:
            conn.execute(_INSERT_AUDIT, _audit_row(replace(entry, outcome=otherwise)))


def _list_audit(conn: sqlite3.Connection, since: float | None, limit: int) -> list[AuditEntry]:
    # Newest `limit` by id (insertion order, not the writers' clocks), then oldest first.
    rows = conn.execute(
        "SELECT time, actor, action, target, peer, outcome FROM audit"
        " WHERE time >= ? ORDER BY id DESC LIMIT ?",
        (float("-inf") if since is None else since, limit),
    ).fetchall()
    return [AuditEntry(time=t, actor=a, action=ac, target=tg, peer=p, outcome=o)
            for t, a, ac, tg, p, o in reversed(rows)]


def _prune_audit(conn: sqlite3.Connection, keep: int) -> int:
    cur = conn.execute(
        "DELETE FROM audit WHERE id <= (SELECT COALESCE(MAX(id), 0) FROM audit) - ?", (keep,))
    return cur.rowcount


def _prune_events(conn: sqlite3.Connection, before: float, limit: int) -> int:
    # Only the oldest ``limit`` rows by id are looked at (the primary key's order, no index
    # on time): a pass over a table with nothing to drop reads ``limit`` rows, not all.
    cur = conn.execute(
        "DELETE FROM events WHERE id IN (SELECT id FROM"
        " (SELECT id, time FROM events ORDER BY id LIMIT ?) WHERE time < ?)", (limit, before))
    return cur.rowcount


# Writes that change nothing the change feed reports (see SqliteStore.commits).
_OFF_FEED = frozenset({_add_event, _put_lease, _delete_lease, _forget_changes, _create_token,
                       _delete_token, _touch_token, _add_audit, _settle_audit, _prune_audit,
                       _prune_events})
