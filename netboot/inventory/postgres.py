"""The inventory on PostgreSQL (asyncpg): one database shared by several netboot servers.

It keeps the SQLite store's semantics exactly (the contract suite runs against memory, SQLite
and this); what differs is how, and why:

* Every write of the tables the change feed covers (machines, profiles, clusters, groups,
  settings) first takes one transaction-scoped advisory lock, ``pg_advisory_xact_lock``:
  writers queue as they do behind SQLite's ``BEGIN IMMEDIATE``, across processes and hosts.
  That is what keeps the feed in commit order: a sequence hands out numbers when rows are
  inserted, not when they commit, so two overlapping writers could commit 9 after 10 and a
  reader that read 10 would never see 9. With the lock, a number is drawn only by the one
  writer that holds it, and the lock is released after its commit is visible. The trigger
  that records a change takes the same lock, so a writer that is not netboot (psql, a
  migration) keeps the order too. Checks made inside such a transaction (identifier claims,
  hostnames, a machine's current state) therefore cannot be overtaken by another server.
* Unique keys are still declared (identifier claims, case-folded hostnames, lease
  addresses, token hashes): they are the last word should anything bypass the checks.
* Text columns use the "C" collation and hostnames fold ASCII letters only
  (``translate``): orderings and uniqueness are byte-for-byte SQLite's, whatever locale the
  database was created with.
* Model values are stored as the JSON text :mod:`netboot.inventory.codec` produces, as in
  SQLite, so the two stores' rows are the same and ``netboot db copy`` moves them unchanged
  (sealed secrets stay sealed with the same key).
* Schema changes are numbered steps recorded in ``schema_migrations``, applied under an
  advisory lock in one transaction per step: two servers starting together migrate once.
  A database newer than this code is refused.
* The change feed is the ``changes`` table, filled by triggers in the committing
  transaction; the trigger also does ``NOTIFY netboot_changes``, delivered at commit, on
  which :meth:`PostgresStore.wait_for_changes` wakes a reader at once instead of polling.
* :attr:`PostgresStore.commits` counts what this store knows was committed to the feed
  without asking the database: its own writes as they return, and every notification from a
  session not of its own pool (another server, the CLI, psql). A reader that saw the count
  unchanged since its last sync began answers from memory (the DHCP path: a round trip per
  DISCOVER through a pool queued behind the boot path's writes timed out under a storm).
* The DSN (it may hold a password) is never logged nor put in an error: messages name the
  database by :func:`netboot.inventory.dsn.redact`.
* Any failure of the server or the connection is a :class:`StoreError`, never "not found";
  :class:`~netboot.errors.OutcomeUnknown` where the connection failed while a write was
  being committed and the server, asked on a new connection, could not say whether it was;
  a write it says committed returns as written. Asked by the write's mark (a random key the
  transaction wrote, ``commit_marks``), not by its transaction id (pg_xact_status): a
  failover's new primary, or the same server after a crash that lost the write's WAL, hands
  that id to the next writer, whose outcome would be told as this write's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import random
import socket
import time
import uuid
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import asyncpg

from netboot import identity
from netboot.errors import (
    Conflict,
    NetbootError,
    NotFound,
    OutcomeUnknown,
    StoreError,
    StoreFull,
    ValidationError,
    WritesRefused,
)
from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory.base import (
    DOCUMENT_TABLES,
    INSTALLS_UNDER_WAY,
    REFUSED_CLAIMS,
    REFUSED_CLAIMS_END,
    SINCE_POSTGRES,
    STALE_SETTINGS,
    Batch,
    Changes,
    EventListener,
    InstallsSince,
    MachineFilter,
    Sealer,
    check_unchanged,
    fixed_taken,
    in_use,
    mend_stray,
    not_json,
)
from netboot.inventory.committed import CommittedHere
from netboot.inventory.dsn import PeerSettings
from netboot.inventory.dsn import redact as dsn_redact
from netboot.inventory.sealed import Sealed, join_token_context
from netboot.inventory.signal import Signal, wait_until
from netboot.logs import escape
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
)
from netboot.unstoppable import deliver, waited

log = logging.getLogger(__name__)

_R = TypeVar("_R")

# What a connection's failure raises (not the server's refusal of a statement alone: every
# PostgresError is here too, and callers that tell an ERROR from a loss use _answered).
# InternalClientError: a connection whose server ended it (a shutdown's FATAL) read while the
# loop was busy, its end not yet: asyncpg keeps it open, in an error state, and the pool hands
# it out; its next statement is refused before anything is sent (test_a_database_shutdown_
# while_the_loop_is_busy_is_a_store_error).
_FAILED = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
           TimeoutError)

# The server's disk (or quota) is full: SQLSTATE 53100, which PostgreSQL gives every ENOSPC
# (errcode_for_file_access) of a table, an index, a temporary file. Its words for EDQUOT and
# for a full disk met with another code (an I/O error) are matched too. Not the other class-53
# errors (memory, connections, configured limits): those do not say that writes are refused
# while reads answer.
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded")


def _remember(sessions: dict[int, float], pid: int, now: float) -> None:
    """``pid`` found at ``now`` (monotonic), the oldest forgotten past _KNOWN_SESSIONS."""
    sessions.pop(pid, None)
    sessions[pid] = now
    if len(sessions) > _KNOWN_SESSIONS:
        del sessions[next(iter(sessions))]


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the PostgreSQL server's full disk (see _DISK_FULL_WORDS)."""
    return isinstance(exc, asyncpg.DiskFullError) or (
        isinstance(exc, asyncpg.PostgresError)
        and any(words in str(exc) for words in _DISK_FULL_WORDS))


# Why a write refused by a server that takes reads only (SQLSTATE 25006: a hot standby the
# DSN names, a primary demoted by a failover manager, default_transaction_read_only set by
# an operator or by a managed service whose storage is nearly full) leaves reads answering.
_READ_ONLY_FIX = ("the PostgreSQL server takes reads only: a standby, or "
                  "default_transaction_read_only is on; point inventory.dsn at the primary, "
                  "or turn it off")


# _probe_full's rows: ~1 MiB of commit_marks heap and index (a uuid row ~40 bytes with its
# header and line pointer, its index entry ~24), rolled back.
FULL_PROBE_ROWS = 16_384
_FULL_PROBE = ("INSERT INTO commit_marks (id) SELECT gen_random_uuid()"
               " FROM generate_series(1, $1::int)")
# A store that found writes refused tells the other servers of the inventory at once (a
# notification on CHANNEL whose payload is this and its why), and again at each of its
# probes refused: a server that writes little (answering known machines) would otherwise say
# ok until its own next write needs a page, its peer degraded (s39-multi's "left"). Told,
# a server says it as its own and probes as its own: its probe taken clears it. Not a row:
# the disk that refuses writes refuses a marker too; a notification is a few bytes of the
# server's queue and one commit record, which a full tablespace still takes.
_REFUSED = "writes refused "
# A notification's payload is at most 8,000 bytes: the why is cut well within.
_REFUSED_WHY = 2_000
# Such a notification is believed only from a session whose role may write the inventory
# (another netboot server's, which could fill or refuse its writes anyway): NOTIFY needs no
# privilege, and every role may connect to a database by default (PUBLIC's CONNECT), so any
# role of the PostgreSQL server, one with no grant at all, had every netboot server of the
# inventory say its writes were refused (/healthz 503 "degraded": a readiness probe takes
# them all out of service) for as long as it sent one every few seconds, and put its text
# in their logs raw, a forged line with it (s46-attack). pg_stat_activity shows every
# session's PID and role to every role; the table name is resolved in the LISTEN
# connection's search_path, the inventory's.
_TELLER_MAY_WRITE = ("SELECT has_table_privilege(usesysid, 'machines', 'INSERT')"
                     " FROM pg_stat_activity WHERE pid = $1")
# The same for a commit's notification (an empty payload): each one of another session made
# every reader sync before answering (InventoryView.fresh), so such a role sending them in a
# loop (~2,100 a second from one session) had every DHCP answer of every server wait for a
# feed read (4.1x the feed's reads over 300 DISCOVERs, s46-attack). A session not known yet
# counts as before, and is looked at (those notifying meanwhile, in one query); one found
# not to write is a stranger, whose notifications count for nothing for STRANGER_SECONDS
# (a PID is not reused that soon: /proc/sys/kernel/pid_max, 4,194,304 on 64-bit Linux).
_WRITERS_AMONG = ("SELECT pid, has_table_privilege(usesysid, 'machines', 'INSERT')"
                  " FROM pg_stat_activity WHERE pid = ANY($1::int[])")
STRANGER_SECONDS = 300.0
_KNOWN_SESSIONS = 1024  # sessions found writing or not, remembered (the oldest forgotten)


# pg_advisory_xact_lock key of the inventory's writers: "netboot" in ASCII.
WRITE_LOCK = 0x6E6574626F6F74
# Migrations take their own lock, so that a migration and the writers it blocks are told apart.
MIGRATE_LOCK = WRITE_LOCK + 1
# A session's lock of the API writes that set a fixed_ipv4 (exclusive): check and write as
# one across every server of the database.
FIXED_LOCK = WRITE_LOCK + 2
CHANNEL = "netboot_changes"
_LAST_CHANGE = "SELECT coalesce(max(seq), 0) FROM changes"
# A write's mark (commit_marks, migration 4): a random key written in its transaction as it
# begins, in the round trip that takes the lock, which returns the transaction's id (what a
# cancel during its COMMIT asks about on the same connection, and what the logs name). A lost
# COMMIT is settled by the mark (_status): found, the write committed. Not by the id alone:
# after a crash that lost the WAL of the write's transaction, or a failover to a standby that
# never received it, the new primary hands that id to the next writer, and pg_xact_status
# then tells that writer's outcome as this write's. A key is the server's clock in ms (48
# bits: the primary's clock alone, whatever the netboot servers' clocks say) and 80 random
# bits from the writer. Each PRUNE_MARKS_EVERY-th write of a store also drops the marks older
# than MARK_KEEP by the server's clock: the primary key's range finds them (no other index;
# SKIP LOCKED: two writers pruning together never wait for each other). Claims (lost: a
# settle's, _CLAIM) are kept: a single statement settled "failed" while still unread by a
# backend stopped or hung (_single, PostgresStore._look) can commit only if its claim is
# gone once that backend runs again, however much later; one row per such settle.
_MARKED = ("INSERT INTO commit_marks (id) SELECT (lpad(to_hex((extract(epoch FROM"
           " clock_timestamp())::float8 * 1000)::bigint), 12, '0') || $1)::uuid")
_LOCKED = " FROM pg_advisory_xact_lock($2)"
_XID = " RETURNING id, pg_current_xact_id()::text"
_PRUNING = ("WITH gone AS (DELETE FROM commit_marks WHERE id IN (SELECT id FROM commit_marks"
            " WHERE id < (lpad(to_hex(((extract(epoch FROM clock_timestamp())::float8"
            " - $0::float8) * 1000)::bigint), 12, '0') || '00000000000000000000')::uuid"
            " AND NOT lost FOR UPDATE SKIP LOCKED)) ")
# (lock, prune) -> the statement: $1 the mark's random part (20 hex digits), then the lock's
# key, then MARK_KEEP.
_BEGUN = {
    (False, False): _MARKED + _XID,
    (True, False): _MARKED + _LOCKED + _XID,
    (False, True): _PRUNING.replace("$0", "$2") + _MARKED + _XID,
    (True, True): _PRUNING.replace("$0", "$3") + _MARKED + _LOCKED + _XID,
}
PRUNE_MARKS_EVERY = 100
# How long a mark is kept: far beyond LOST_COMMIT_WAIT. A write whose COMMIT was lost longer
# than half of it after it began (a peer lost without a reset, found by TCP's own timeout) is
# not settled by claiming its mark (it may have been pruned): only a mark found says anything.
MARK_KEEP = 3600.0
# How long a write cancelled while its COMMIT was under way is waited for (_committed): the
# COMMIT's answer, then one question on the same connection, milliseconds (on a new one if
# that connection failed: _status). Bounded so that a shutdown cannot hang on a server that
# no longer answers.
CANCELLED_COMMIT_WAIT = 10.0
# How long a write whose connection failed during its COMMIT waits to learn what became of it
# (_status): a new connection (the pool's may all have gone with the server, tried again while
# it refuses), its mark claimed, which waits while the write's transaction still runs (the
# server may not have seen the loss yet, or still be running the COMMIT). Past it, or with
# the server unreachable, the outcome is unknown.
LOST_COMMIT_WAIT = 10.0
# Asked of a write cancelled in its COMMIT on its own connection, once the COMMIT's answer is in
# (_committed): the same server, the outcome final, the id the write's.
_STATUS = "SELECT pg_xact_status($1::text::xid8)"
# Settling a lost COMMIT by its mark, on a new connection: the mark claimed (inserted, lost),
# unless the write's own is there. A mark whose transaction is still running (its COMMIT under
# way) holds its key: the claim waits for that transaction to end, then finds the mark
# (committed: false returned) or inserts its claim (aborted: true). Committed, the claim
# makes "not written" final: the write's transaction, were it still to come, could not add
# its mark. A claim of an earlier attempt whose answer was lost is found the same (true).
_CLAIM = ("INSERT INTO commit_marks (id, lost) VALUES ($1::uuid, true) ON CONFLICT (id)"
          " DO UPDATE SET lost = commit_marks.lost RETURNING lost")
_FOUND = "SELECT lost FROM commit_marks WHERE id = $1::uuid"
# A write that is one autocommit statement (_single) carries its mark too, in a CTE of the
# same statement (a data-modifying WITH runs to completion whatever the main statement reads:
# one transaction, still one round trip). Its whole key is chosen here, not by the server:
# the answer that would carry a key the server made is the one that may be lost. Its first
# 48 bits are this store's estimate of the server's clock (_server_ms: learnt from every
# mark a _write returns, and at open), so that pruning, by the server's clock, keeps it as
# long as any other; the estimate is off by a round trip, far within MARK_KEEP. Pruned as a
# _write prunes, one statement in PRUNE_MARKS_EVERY.
_SINGLE_MARK = "_mark AS (INSERT INTO commit_marks (id) VALUES ($M::uuid))"
_SINGLE_PRUNE = "_pruned AS " + _PRUNING[len("WITH gone AS "):].rstrip()
# pg_current_xact_id and the xid8 type that pg_xact_status is asked with (_write) came in 13.
MIN_SERVER_VERSION = (13, 0)
# How long a query may wait for a free connection of the pool (a stuck database answers
# with a StoreError, a 503, rather than an endless wait).
ACQUIRE_TIMEOUT = 30.0
# How often wait_for_changes looks while it cannot LISTEN.
POLL_SECONDS = 1.0
# The pause between two attempts to LISTEN again, doubling from the first to the last.
RELISTEN_PAUSES = (0.05, 5.0)
# Machines decoded between two yields to the event loop (~140 µs each on a busy 2-core
# machine: ~70 ms).
DECODE_CHUNK = 500

# Hostnames are unique under ASCII case folding (RFC 4343; IDNs arrive as punycode), which is
# what SQLite's lower() does; PostgreSQL's lower() would fold by the database's locale.
_UPPER, _LOWER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"


# The machines whose fixed_ipv4 or profile column is not their document's (base.StrayRow).
_STRAY_ROWS = ("SELECT id, coalesce(mac, id), fixed_ipv4, (data::jsonb) ->> 'fixed_ipv4',"
               " profile, (data::jsonb) ->> 'profile' FROM machines"
               " WHERE profile IS DISTINCT FROM (data::jsonb) ->> 'profile'"
               " OR fixed_ipv4 IS DISTINCT FROM (data::jsonb) ->> 'fixed_ipv4'"
               " ORDER BY created, id")


def _fold(sql: str) -> str:
    return f"translate({sql}, '{_UPPER}', '{_LOWER}')"


_TRACKED = (("machines", "id"), ("profiles", "name"), ("clusters", "name"), ("groups", "name"),
            ("settings", "key"))

# Numbered steps; step i brings the schema from version i to i + 1. Append, never edit: a
# released step has already run on someone's database.
MIGRATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("the inventory: machines, identifiers, labels, profiles, clusters, groups, events, "
     "leases, settings, API tokens, audit log, change feed", (
        """CREATE TABLE machines (
            id TEXT COLLATE "C" PRIMARY KEY,
            mac TEXT COLLATE "C",
            hostname TEXT COLLATE "C",
            state TEXT COLLATE "C" NOT NULL,
            cluster TEXT COLLATE "C",
            data TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            updated DOUBLE PRECISION NOT NULL
        )""",
        f"CREATE UNIQUE INDEX machines_hostname ON machines ({_fold('hostname')})"
        " WHERE hostname IS NOT NULL",
        "CREATE INDEX machines_order ON machines ((mac IS NULL), mac, id)",
        "CREATE INDEX machines_no_mac ON machines (id) WHERE mac IS NULL",
        "CREATE INDEX machines_state ON machines (state, mac)",
        "CREATE INDEX machines_cluster ON machines (cluster, mac)",
        "CREATE INDEX machines_uuid ON machines (((data::jsonb) ->> 'uuid'))",
        "CREATE INDEX machines_serial ON machines (((data::jsonb) ->> 'serial'))",
        """CREATE TABLE machine_keys (
            kind TEXT COLLATE "C" NOT NULL,
            value TEXT COLLATE "C" NOT NULL,
            machine TEXT COLLATE "C" NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            PRIMARY KEY (kind, value)
        )""",
        "CREATE INDEX machine_keys_machine ON machine_keys (machine)",
        """CREATE TABLE machine_labels (
            machine TEXT COLLATE "C" NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
            key TEXT COLLATE "C" NOT NULL,
            value TEXT COLLATE "C" NOT NULL,
            PRIMARY KEY (machine, key)
        )""",
        "CREATE INDEX machine_labels_kv ON machine_labels (key, value, machine)",
        'CREATE TABLE profiles (name TEXT COLLATE "C" PRIMARY KEY, data TEXT NOT NULL)',
        'CREATE TABLE clusters (name TEXT COLLATE "C" PRIMARY KEY, data TEXT NOT NULL)',
        'CREATE TABLE groups (name TEXT COLLATE "C" PRIMARY KEY, data TEXT NOT NULL)',
        # No foreign key to machines: unknown machines have events too (see sqlite.py).
        """CREATE TABLE events (
            id BIGSERIAL PRIMARY KEY,
            machine TEXT COLLATE "C" NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL
        )""",
        "CREATE INDEX events_machine ON events (machine, id)",
        """CREATE TABLE leases (
            mac TEXT COLLATE "C" PRIMARY KEY,
            ipv4 TEXT COLLATE "C" NOT NULL UNIQUE,
            expires DOUBLE PRECISION NOT NULL,
            hostname TEXT
        )""",
        'CREATE TABLE settings (key TEXT COLLATE "C" PRIMARY KEY, value TEXT NOT NULL)',
        """CREATE TABLE api_tokens (
            name TEXT COLLATE "C" PRIMARY KEY,
            sha256 TEXT COLLATE "C" NOT NULL UNIQUE,
            scope TEXT NOT NULL,
            created DOUBLE PRECISION NOT NULL,
            expires DOUBLE PRECISION,
            last_used DOUBLE PRECISION
        )""",
        """CREATE TABLE audit (
            id BIGSERIAL PRIMARY KEY,
            time DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            peer TEXT NOT NULL,
            outcome TEXT NOT NULL
        )""",
        "CREATE INDEX audit_time ON audit (time, id)",
        'CREATE TABLE changes (seq BIGSERIAL PRIMARY KEY, tbl TEXT COLLATE "C" NOT NULL,'
        ' key TEXT COLLATE "C" NOT NULL)',
        # One function for every tracked table; its argument names the key column. The old
        # key too when an update renames the row, as SQLite's triggers do.
        """CREATE FUNCTION netboot_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            old_key TEXT;
            new_key TEXT;
        BEGIN
            PERFORM pg_advisory_xact_lock(WRITE_LOCK);
            IF TG_OP <> 'INSERT' THEN old_key := to_jsonb(OLD) ->> TG_ARGV[0]; END IF;
            IF TG_OP <> 'DELETE' THEN new_key := to_jsonb(NEW) ->> TG_ARGV[0]; END IF;
            IF old_key IS NOT NULL AND old_key IS DISTINCT FROM new_key THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, old_key);
            END IF;
            IF new_key IS NOT NULL THEN
                INSERT INTO changes (tbl, key) VALUES (TG_TABLE_NAME, new_key);
            END IF;
            -- Delivered at commit, once per transaction (equal notifications fold into one).
            PERFORM pg_notify('CHANNEL', '');
            RETURN NULL;
        END $$""".replace("WRITE_LOCK", str(WRITE_LOCK)).replace("CHANNEL", CHANNEL),
        *(f"CREATE TRIGGER {table}_changes AFTER INSERT OR UPDATE OR DELETE ON {table}"
          f" FOR EACH ROW EXECUTE FUNCTION netboot_record_change('{key}')"
          for table, key in _TRACKED),
    )),
    ("drop the UUID and serial expression indexes: machine_keys answers every lookup by "
     "identifier (as in SQLite's migration 6)", (
        "DROP INDEX machines_uuid",
        "DROP INDEX machines_serial",
    )),
    ("drop the (state, mac) index (as in SQLite's migration 7): counts by state come from "
     "the view or one grouped scan; without an index on state, a state change is a HOT "
     "update where the page has room", (
        # No partial index on the rare states here, unlike SQLite: PostgreSQL counts the
        # columns of an index's predicate among those that forbid a HOT update, so even
        # one that holds only the discovered and failed machines would make every state
        # change of a storm write a new entry in each of the table's indexes. Listing the
        # discovered (the discovery limit's load, once per process) and the failed (the
        # status, 20 of them) scans instead.
        "DROP INDEX machines_state",
    )),
    ("commit marks: a write's random key, written in its transaction, which settles a "
     "COMMIT whose answer was lost (written or not) even after a failover or a crash gave "
     "its transaction id to another writer", (
        # No SQLite counterpart: a SQLite write's outcome is its own process's to know.
        "CREATE TABLE commit_marks (id UUID PRIMARY KEY, lost BOOLEAN NOT NULL DEFAULT false)",
    )),
    ("one fixed_ipv4 per address, refused by the database (as in SQLite's migration 8): a "
     "column the writers set, unique; a duplicate stored before is left to its oldest holder "
     "and named at start-up. The profile a machine names, a column indexed for a profile's "
     "delete", (
        # A column, not an expression index over the document: every machine update would
        # parse its document, and no update of one could be HOT (a column an indexed
        # expression reads, changed). Written with its own value it leaves HOT as it was.
        'ALTER TABLE machines ADD COLUMN fixed_ipv4 TEXT COLLATE "C"',
        "UPDATE machines m SET fixed_ipv4 = f.ipv4 FROM (SELECT DISTINCT ON (ipv4) id, ipv4"
        " FROM (SELECT id, created, (data::jsonb) ->> 'fixed_ipv4' AS ipv4 FROM machines) d"
        " WHERE ipv4 IS NOT NULL ORDER BY ipv4, created, id) f WHERE m.id = f.id",
        "CREATE UNIQUE INDEX machines_fixed_ipv4 ON machines (fixed_ipv4)"
        " WHERE fixed_ipv4 IS NOT NULL",
        # The profile a machine names, for a profile's delete (as SQLite's migration 8).
        'ALTER TABLE machines ADD COLUMN profile TEXT COLLATE "C"',
        "UPDATE machines SET profile = (data::jsonb) ->> 'profile'"
        " WHERE (data::jsonb) ->> 'profile' IS NOT NULL",
        "CREATE INDEX machines_profile ON machines (profile) WHERE profile IS NOT NULL",
    )),
)

SCHEMA_VERSION = len(MIGRATIONS)

# Whether a document is not JSON as ``data::jsonb`` reads it (PostgresStore._not_json_error):
# the cast's error caught (a subtransaction a row: for a start that already failed only).
_NOT_JSONB = (
    "CREATE OR REPLACE FUNCTION pg_temp.netboot_not_jsonb(t text) RETURNS boolean"
    " LANGUAGE plpgsql AS $$ BEGIN PERFORM t::jsonb; RETURN false;"
    " EXCEPTION WHEN others THEN RETURN true; END $$"
)

_MACHINE_COLUMNS = ("id", "mac", "hostname", "state", "cluster", "data", "created", "updated",
                    "fixed_ipv4", "profile")
_INSERT_MACHINE = (
    "INSERT INTO machines (id, mac, hostname, state, cluster, data, created, updated,"
    " fixed_ipv4, profile) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
# The fixed_ipv4 column: the machine's address, but NULL kept where the stored document
# already held that address while another machine holds the column (a duplicate migration 5
# found: its boots and edits go on; start-up names it). The document is parsed only when
# the column is NULL and the address is not (an address given, or such a duplicate).
_UPDATE_MACHINE = (
    "UPDATE machines SET mac = $2, hostname = $3, state = $4, cluster = $5, data = $6,"
    " created = $7, updated = $8, fixed_ipv4 = CASE WHEN $9::text IS NULL THEN NULL"
    " WHEN fixed_ipv4 = $9 THEN fixed_ipv4 WHEN fixed_ipv4 IS NULL"
    " AND (data::jsonb) ->> 'fixed_ipv4' = $9 AND EXISTS (SELECT 1 FROM machines o"
    " WHERE o.fixed_ipv4 = $9 AND o.id <> $1) THEN NULL ELSE $9 END, profile = $10"
    " WHERE id = $1"
)
# The addresses a batch of updates moves, let go before any is written (sqlite.py's
# _let_go_fixed): an import swapping two machines' addresses is written.
_LET_GO_FIXED = (
    "UPDATE machines m SET fixed_ipv4 = NULL FROM unnest($1::text[], $2::text[]) AS u (id, ip)"
    " WHERE m.id = u.id AND m.fixed_ipv4 IS NOT NULL AND m.fixed_ipv4 IS DISTINCT FROM u.ip"
)
_INSERT_LABEL = "INSERT INTO machine_labels (machine, key, value) VALUES ($1, $2, $3)"
_INSERT_KEY = "INSERT INTO machine_keys (kind, value, machine) VALUES ($1, $2, $3)"

_TABLES = {"profile": "profiles", "cluster": "clusters", "group": "groups"}
class _Row:
    """A machine ready for SQL: column values, JSON text, label and identifier rows."""

    __slots__ = ("keys", "labels", "machine", "params")

    def __init__(self, machine: Machine) -> None:
        as_dict = codec.machine_to_dict(machine)
        # Round trip so that what would not read back is refused now (see codec's docstring).
        self.machine = codec.machine_from_dict(as_dict)
        m = self.machine
        mac = as_dict["macs"][0] if as_dict["macs"] else None
        self.params: tuple[Any, ...] = (
            m.id, mac, m.hostname, m.state.value, m.cluster, codec.dumps(as_dict, "machine"),
            float(as_dict["created"]), float(as_dict["updated"]), m.fixed_ipv4, m.profile)
        self.labels = [(m.id, k, v) for k, v in as_dict["labels"].items()]
        self.keys = [(kind, value, m.id) for kind, value in claims(m)]

    @property
    def id(self) -> str:
        return self.machine.id


@functools.lru_cache(maxsize=64)
def _single_sql(sql: str, n: int, prune: bool) -> str:
    """``sql`` (``n`` parameters) with its mark (and the marks' pruning) in a CTE before it
    (_single); a handful of statements, built once each (~4 µs a call otherwise)."""
    ctes = [_SINGLE_MARK.replace("$M", f"${n + 1}")]
    if prune:
        ctes.append(_SINGLE_PRUNE.replace("$0", f"${n + 2}"))
    head = "WITH " + ", ".join(ctes)
    return f"{head}, {sql[5:]}" if sql.startswith("WITH ") else f"{head} {sql}"


class _Retry(Exception):
    """The fast path of a batch hit a problem; replay row by row to name it."""


# Of the pool sessions given (by their backend PIDs, $1): for how long (seconds, by the
# server's clock) the server has shown each backend idle, if it does (a session whose
# statement has been waited for longer than that was never read by its backend); and, for
# one waiting for a lock, a session that holds it idle in its transaction for longer than
# $2 seconds, for how long and when its transaction began (a holder that makes no progress:
# PostgresStore._look), or else one whose state this role may not see (its row says
# "<insufficient privilege>": a session of another role, without pg_read_all_stats; held
# and its transaction's start NULL), and its role; then the backend's state and wait event
# (what a statement that overran statement_timeout is doing; "advisory" for the writers'
# lock, WRITE_LOCK, which every write of the feed's tables waits for, else a row of one
# table, which only its own writes wait for) and this session's role (the GRANT that would
# make a hidden holder visible).
# pg_blocking_pids takes the lock manager's locks: asked only of what has waited that long.
_IDLE_FOR = (
    "SELECT a.pid, CASE WHEN a.state LIKE 'idle%' THEN extract(epoch FROM clock_timestamp()"
    " - a.state_change)::float8 END, h.pid, extract(epoch FROM clock_timestamp()"
    " - h.state_change)::float8, h.xact_start, h.usename, a.state, a.wait_event,"
    " current_user::text FROM pg_stat_activity a LEFT JOIN LATERAL (SELECT b.pid,"
    " b.state_change, b.xact_start, b.usename::text FROM pg_stat_activity b"
    " WHERE a.wait_event_type = 'Lock'"
    " AND b.pid = ANY(pg_blocking_pids(a.pid)) AND (b.state LIKE 'idle in transaction%'"
    " AND clock_timestamp() - b.state_change > make_interval(secs => $2::float8)"
    " OR b.state IS NULL AND b.query = '<insufficient privilege>')"
    " ORDER BY b.state IS NULL, b.state_change LIMIT 1) h ON true"
    " WHERE a.pid = ANY($1::int[])")


# Whether the session of a PID is still idle in the transaction it was found stuck in (begun
# at $2: _look). Not in any transaction: a holder that committed and began another (psql with
# AUTOCOMMIT off, a driver that opens one implicitly, is idle in a transaction after every
# statement), or a later session given the same PID, holds nothing writes wait for.
_STILL_STUCK = ("SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1"
                " AND state LIKE 'idle in transaction%' AND xact_start = $2")
# Whether the session of a PID, whose state this role may not see, still holds the writers'
# lock (pg_locks shows every role's: an advisory lock on a bigint key is classid, its high
# 32 bits, objid, its low ones, objsubid 1).
_STILL_HOLDS = ("SELECT count(*) > 0 FROM pg_locks WHERE pid = $1 AND granted"
                " AND locktype = 'advisory' AND objsubid = 1 AND classid::int8 = $2"
                " AND objid::int8 = $3")


def _asking(name: str) -> Callable[..., Any]:
    """asyncpg's Connection method ``name``, with ``asked`` set while its statement is
    waited for (_Session); looked up at each call (tests count the statements sent by
    patching the class). One coroutine, not a wrapper around a second (measured with
    callgrind: benchmarks/README.md s31-pg)."""
    async def asking(self: _Session, *args: Any, **kwargs: Any) -> Any:
        self.asked = time.monotonic()
        try:
            return await getattr(asyncpg.Connection, name)(self, *args, **kwargs)
        except asyncpg.ConnectionDoesNotExistError as exc:
            if self.ended_why is None:
                raise
            raise asyncpg.ConnectionDoesNotExistError(f"{exc}: {self.ended_why}") from exc
        finally:
            self.asked = None
    return asking


class _Session(asyncpg.Connection):  # type: ignore[misc]  # asyncpg is untyped
    """A pool session that knows since when (``asked``, monotonic; None: not) a statement
    of its has been waited for, so that the store's check can look at a backend hung alone
    (:meth:`PostgresStore._look`); ended by the store for it, the statement's error says
    why (``ended_why``). Every statement of the store passes here: the connection's
    methods, and asyncpg's BEGIN, COMMIT and ROLLBACK, which call ``execute`` (none of
    these calls another of them: ``asked`` is one statement's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: float | None = None
        self.ended_why: str | None = None
        # Its backend's PID, as the server says (pg_backend_pid(), asked as the session is
        # set up: server_keepalives): what pg_stat_activity names it by. Not
        # get_server_pid(): a pooler (pgbouncer) hands its client a PID of its own.
        self.backend = 0

    execute = _asking("execute")
    executemany = _asking("executemany")
    fetch = _asking("fetch")
    fetchval = _asking("fetchval")
    fetchrow = _asking("fetchrow")
    copy_records_to_table = _asking("copy_records_to_table")


class PostgresStore:
    """:class:`~netboot.inventory.base.Store` on a PostgreSQL database.

    The constructor does no I/O; :meth:`open` connects (a small pool, plus one connection
    that LISTENs for the change feed) and migrates; :meth:`close` closes them.
    """

    def __init__(self, dsn: str, *, sealer: Sealer | None = None,
                 listener: EventListener | None = None, pool_size: int = 8,
                 peer: PeerSettings | None = None) -> None:
        self._dsn = dsn
        # How every connection notices a peer gone without a word (dsn.PeerSettings).
        self._peer = peer or PeerSettings()
        self.name = dsn_redact(dsn)
        self._sealed = Sealed(sealer)
        # The view's pages share their machines' equal label sets and creation times.
        self._page_maps = codec.SharedMaps()
        self._listener = listener
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._notify: asyncpg.Connection | None = None
        # The last LISTEN connection's backend PID, as the server says (server_keepalives'
        # last column): what pg_stat_activity names it by. Not get_server_pid(): behind a
        # pooler that is the pooler's own number; not its query text either, which is
        # "LISTEN ..." only until the check's first SELECT 1 on it (s36-flaky).
        self._notify_backend = 0
        # Set when the LISTEN connection closes (its peer was lost: the kernel gave it up,
        # the server ended it); the task that listens again waits for it.
        self._notify_lost = asyncio.Event()
        self._relisten: asyncio.Task[None] | None = None
        # The pool's sessions (each adopted: _adopt_session), ended together when the server
        # is found silent (_silenced); and why, while it is (said in the errors it causes).
        self._sessions: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        self._silence: str | None = None
        # Sessions found holding a lock others wait for, idle in their transaction, that
        # have been logged (_look: once each).
        self._stuck_told: set[int] = set()
        # (its PID, its transaction's start, why, whether its state is hidden from this
        # role) while such a holder of the writers' lock stops writes (stuck_writes; a
        # hidden one: cannot_tell, as it may be at work), until
        # a write takes the writers' lock or the check finds the holder no longer idle in
        # that transaction (hidden: no longer holding the writers' lock).
        self._stuck: tuple[int, Any, str, bool] | None = None
        # Backends whose statements statement_timeout does not bound (a migration's): the
        # check does not end them for overrunning it.
        self._unbounded: set[int] = set()
        self._signal = Signal()
        # open()'s notification sent to itself (_delivered): its payload, and the future
        # set when it arrives.
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        # When the LISTEN connection last got a notification (or was made), monotonic: the
        # check sends one to itself when none came for a check_interval (_heartbeat).
        self._heard = 0.0
        self._beat: asyncio.Future[str | None] | None = None  # the last _heartbeat
        # Why the check cannot tell whether a waiting session of the store's is stuck (its
        # backend not shown by the server: cannot_tell), as the last check found; None:
        # none such.
        self._blind: str | None = None
        # Why no notification reaches a LISTEN connection made again (_keep_listening asks,
        # as open() does: _undelivered), until one made later does; None: they do.
        self._deaf: str | None = None
        # Why writes are refused while the server's disk is full (a write met DiskFullError:
        # _conn), until a write succeeds (_probe_full, from the check); None: not full.
        self._full: str | None = None
        self._full_probe: asyncio.Future[None] | None = None
        self._telling: asyncio.Future[None] | None = None  # the last _tell_refused
        # The last look at who told of refused writes (_heed_refused), and the last PID not
        # believed (said once, not at each of a flood's notifications).
        self._heeding: asyncio.Future[None] | None = None
        self._unheeded: int | None = None
        # Other sessions whose commits' notifications were heard: found writing the
        # inventory or not (strangers), PID -> when (monotonic); those to look at next, and
        # the look under way (_look_at_notifiers).
        self._writers: dict[int, float] = {}
        self._strangers: dict[int, float] = {}
        self._unlooked: set[int] = set()
        self._looking: asyncio.Future[None] | None = None
        # Feed writes made through this object plus notifications of others' (see commits);
        # the backend PIDs of this pool's sessions tell the two kinds of notification apart.
        self._commits = 0
        self._own: set[int] = set()
        # The change feed's own connection, outside the pool (opened when first asked): a
        # view's sync is one round trip, never queued behind writers that hold the pool's
        # connections while they wait for the writers' lock (every DHCP decision of a storm
        # after a write of this server waits for one sync).
        self._feed: asyncpg.Connection | None = None
        self._feed_lock: asyncio.Lock | None = None
        # The machines this store committed, by feed position: a sync after them is answered
        # with them instead of reading them back (committed.py).
        self._here = CommittedHere()
        self.migrated: list[int] = []  # the schema versions the last open() applied
        self._writes = 0  # writes begun (_write, _single): each PRUNE_MARKS_EVERY-th prunes marks
        # The server's clock (ms) minus this host's monotonic clock (ms), as last learnt
        # (_server_ms): the first bits of a single statement's mark.
        self._clock_offset: float | None = None
        # The marks' random bits, seeded from the system's entropy: unique keys, not secret
        # ones (a mark guessed is worth nothing: writing one takes the database itself).
        self._random = random.Random()  # noqa: S311

    def __repr__(self) -> str:
        return f"PostgresStore({self.name!r})"

    @property
    def commits(self) -> int:
        """Commits to the change feed this store knows of without a round trip
        (base.LocalCommits): its own writes, counted when each returns (after its commit,
        failed or not), and the NOTIFY of every other session's commit, counted as it
        arrives. A reader that sees the count unchanged since its last sync began is current
        but for what another server committed within the notification's latency; a
        notification cannot be lost unnoticed: while the LISTEN connection is down, readers
        still sync on their own schedule (InventoryView.fresh's ``max_age``)."""
        return self._commits

    async def mend_stray_columns(self) -> list[tuple[str, str]]:
        """base.mend_stray, as SqliteStore.mend_stray_columns: one scan of every document,
        in the writers' lock's transaction, for start-up."""
        # Looked for in a read first: no write (nor the writers' lock) at every start.
        try:
            async with self._conn() as conn:
                if not await conn.fetch(_STRAY_ROWS):
                    return []
        except StoreError as exc:
            # A document that is not JSON (the cast's error, naming no row): named.
            bad = await self._not_json_error("read")
            if bad is not None:
                raise bad from exc
            raise
        async with self._write() as conn:
            rows = [tuple(row) for row in await conn.fetch(_STRAY_ROWS)]
            if not rows:
                return []
            holders = {address: ident for address, ident in await conn.fetch(
                "SELECT fixed_ipv4, id FROM machines WHERE fixed_ipv4 = ANY($1::text[])",
                [row[3] for row in rows if row[3] is not None])}
            let_go, fixed, profiles, told = mend_stray(rows, holders)
            for sql, args in (("UPDATE machines SET fixed_ipv4 = NULL WHERE id = $1",
                               [(ident,) for ident in let_go]),
                              ("UPDATE machines SET fixed_ipv4 = $1 WHERE id = $2", fixed),
                              ("UPDATE machines SET profile = $1 WHERE id = $2", profiles)):
                if args:
                    await conn.executemany(sql, args)
        return told

    @contextlib.asynccontextmanager
    async def fixed_addresses_held(self) -> AsyncIterator[None]:
        """Held by one caller of every server on this database at a time: an API write that
        sets a fixed_ipv4 (base.FixedLock), from its check that no other machine has it
        to its commit, which runs on another connection (the lock is this session's, not a
        transaction's: pg_advisory_lock). A connection given back holding it (its unlock
        failed) is let go by asyncpg's reset (pg_advisory_unlock_all)."""
        async with self._conn() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", FIXED_LOCK)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", FIXED_LOCK)

    # plumbing ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool; database and connection failures become StoreError,
        a unique key the explicit checks did not foresee a Conflict."""
        pool = self._pool
        if pool is None:
            raise StoreError(f"the inventory {self.name} is not open")
        try:
            acquiring = pool.acquire(timeout=ACQUIRE_TIMEOUT)
            # Asked from a callback rather than a task (the DHCP server decides eagerly in its
            # datagram callback, and a view still loading reads the store): asyncpg's acquire
            # times out with asyncio.timeout, which refuses to run outside a task, so there
            # it runs in a task of its own; from that first wait on the caller is in one.
            conn = await (acquiring if asyncio.current_task() is not None
                          else asyncio.ensure_future(acquiring))
            try:
                yield conn
            finally:
                await pool.release(conn)
        except NetbootError:
            raise
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"inventory constraint failed: {exc}") from exc
        except _FAILED as exc:
            if _disk_full(exc):
                # Reads still answer: "unreachable" sent operators to the network, and health
                # said ok (s37-chaos's SQLite fix, for PostgreSQL). Said by stuck_writes until
                # a write succeeds (the check probes while it is: _probe_full).
                was, self._full = self._full, (
                    f"inventory {self.name}: {self._reason(exc)} (free space on the "
                    "PostgreSQL server's disk that holds the inventory's tablespace)")
                if was is None:
                    self._tell_refused()
                raise StoreFull(self._full) from exc
            if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                # The same for a server turned read-only: every write a 503 "unreachable"
                # while /healthz said ok (s39-multi). Cleared the same way, by the probe.
                was, self._full = self._full, (
                    f"inventory {self.name}: {self._reason(exc)} ({_READ_ONLY_FIX})")
                if was is None:
                    self._tell_refused()
                raise WritesRefused(self._full) from exc
            raise StoreError(f"inventory {self.name}: {self._reason(exc)}") from exc

    async def _probe_full(self) -> None:
        """While the server's disk was found full, asked by the check every check_interval:
        FULL_PROBE_ROWS commit marks written in a transaction rolled back, ~1 MiB of the
        inventory's own table and index (what SQLite's store waits to have free,
        FREE_TO_WRITE; the server's free space is not for a client to read, so here it is
        tried). Taken, writes are taken again (stuck_writes clears); refused, it stays.
        Not a real write's success: a small one fits on a page with room left while the
        next needs a new one, and health would flap between the two. The dead rows the
        one that succeeds leaves are autovacuum's."""
        try:
            async with self._conn() as conn:
                probe = conn.transaction()
                await probe.start()
                try:
                    await conn.execute(_FULL_PROBE, FULL_PROBE_ROWS)
                finally:
                    await probe.rollback()
        except StoreError:
            # StoreFull: still full (_conn said so again), told again for a server started
            # since; another: the check's.
            if self._full is not None:
                self._tell_refused()
            return
        if self._full is not None:
            log.warning("inventory %s: %s takes writes again", self.name,
                        "the server" if _READ_ONLY_FIX in self._full else "its disk")
        self._full = None

    def _tell_refused(self) -> None:
        """Tell the other servers why writes are refused (_REFUSED), beside the caller: one
        notification on a pool session, at most one under way (a storm's refused writes
        send one)."""
        telling = self._telling
        if self._pool is not None and (telling is None or telling.done()):
            self._telling = asyncio.ensure_future(self._notify_refused())

    async def _notify_refused(self) -> None:
        why = self._full
        if why is None:
            return
        # Unanswered or refused (a standby takes no NOTIFY), the others find out at their
        # own write or check, as before.
        with contextlib.suppress(StoreError):
            async with self._conn() as conn:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL,
                                   _REFUSED + why[:_REFUSED_WHY])

    @contextlib.asynccontextmanager
    async def _write(self, *, feed: bool = True, lock: bool = True,
                     ) -> AsyncIterator[asyncpg.Connection]:
        """A transaction holding the writers' lock (see the module docstring; ``lock`` false:
        a write of what the feed does not carry and no check orders). ``feed``: it may
        change what the change feed carries, so :attr:`commits` counts it once it is over
        (after the commit: a sync that begins later reads it).

        Told as it ended (netboot.unstoppable): cancelled before its COMMIT, it is rolled
        back and the cancel raised; cancelled while its COMMIT was under way (asyncpg then
        asks the server to cancel it, which it may or may not do), the server is asked
        what became of the transaction: committed, the write returns and the cancel comes
        at the caller's next wait; else the cancel is raised. A caller told "cancelled" of
        a durable write (a group commit's clients, their audit entries "aborted") otherwise.
        Its connection failed while its COMMIT was under way (the server restarted or
        failed over, the connection reset: no answer, where a refused COMMIT answers with an
        ERROR), the same question is asked on a new connection (:meth:`_settle`): the caller
        is told "written", "failed", or that the outcome is unknown, never "failed" of what
        may be durable. A write that succeeded costs no round trip more.
        """
        cancel: asyncio.CancelledError | None = None
        xid: str | None = None  # set once the body is done: its COMMIT is under way
        lost: BaseException | None = None  # the COMMIT's connection failed before its answer
        committed = False
        self._writes += 1
        began = time.monotonic()
        # The mark's random part: its key, made by the server with its clock first.
        args: list[Any] = [f"{self._random.getrandbits(80):020x}"]
        if lock:
            args.append(WRITE_LOCK)
        prune = not self._writes % PRUNE_MARKS_EVERY
        if prune:
            args.append(MARK_KEEP)
        mark: uuid.UUID | None = None
        try:
            async with self._conn() as conn:
                try:
                    async with conn.transaction():
                        # Its mark and its transaction's id, in the round trip that takes
                        # the lock.
                        mark, begun = await conn.fetchrow(_BEGUN[lock, prune], *args)
                        self._learn_clock(mark.int >> 80)
                        if lock:
                            self._stuck = None  # the writers' lock was free again
                        yield conn
                        xid = begun
                except asyncio.CancelledError as exc:
                    if xid is None:
                        raise  # before its COMMIT: rolled back, nothing was written
                    cancel = exc
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    if xid is None or _answered(exc):
                        raise  # the body failed, or the server refused the COMMIT: rolled back
                    lost = exc
                if cancel is not None:
                    assert xid is not None and mark is not None
                    asking = asyncio.ensure_future(self._committed(conn, xid, mark, began))
                    await waited(cancel, asking, within=CANCELLED_COMMIT_WAIT,
                                 late=functools.partial(_late, self.name, asking))
                committed = lost is None
        except asyncio.CancelledError as exc:
            if not committed:
                raise
            cancel = exc  # while the connection went back to the pool: written all the same
        finally:
            if feed:
                self._commits += 1
        if lost is not None:  # asked once the broken connection is back in the pool
            assert xid is not None and mark is not None
            await self._settle(xid, mark, began, lost)
        if cancel is not None:
            deliver(cancel)

    async def _settle(self, xid: str | None, mark: uuid.UUID, began: float,
                      lost: BaseException) -> None:
        """A write whose connection failed (``lost``) while its COMMIT was under way, told
        as it ended, the server asked on a new connection by the write's mark (:meth:`_status`):
        committed, this returns; not committed (and now never to be), the StoreError of a
        failed write (nothing was written); still in progress within LOST_COMMIT_WAIT, or
        the server unreachable, :class:`OutcomeUnknown` (logged here: the one place that
        knows the transaction). A cancel meanwhile waits for the answer and comes after it,
        as in :meth:`_write` (netboot.unstoppable). ``began``: when the write began
        (monotonic)."""
        asking = asyncio.ensure_future(self._status(mark, began))
        cancel: asyncio.CancelledError | None = None
        status: str | None = None
        try:
            status = await asyncio.shield(asking)
        except asyncio.CancelledError as exc:
            cancel = exc
        if cancel is not None:
            status = await waited(cancel, asking)  # bounded by _status, which never fails
        if status == "committed":
            log.warning("inventory %s: the connection failed while a write was committed "
                        "(%s); the server says it committed: told written", self.name,
                        self._reason(lost))
            if cancel is not None:
                deliver(cancel)
            return
        if cancel is not None:
            raise cancel  # not written, or nobody can say, and the caller asked to stop
        if status == "aborted":
            raise StoreError(f"inventory {self.name}: {self._reason(lost)}") from lost
        unknown = self._unknown(lost, (f"transaction {xid} is {status}" if xid else
                                       f"its statement is {status}") if status else
                                "the server could not be asked whether it committed")
        log.error("%s", unknown)
        raise unknown from lost

    async def _committed(self, conn: asyncpg.Connection, xid: str, mark: uuid.UUID,
                         began: float) -> None:
        """Return if the transaction ``xid``, whose COMMIT was cancelled, was committed;
        raise if not, or if the server cannot say. Asked on its own connection: asyncpg
        sends the question once the cancelled COMMIT's answer is in, so the outcome is
        final (and the id the write's: the same server). That connection lost meanwhile
        (the COMMIT's answer with it), on a new one, by the write's ``mark``
        (:meth:`_status`)."""
        try:
            status = await conn.fetchval(_STATUS, xid)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if _answered(exc):
                log.error("a write cancelled during its COMMIT may or may not be committed: "
                          "its caller is told it was cancelled (%s)", reason(exc))
                raise
            status = await self._status(mark, began)
            if status not in ("committed", "aborted"):
                log.error("a write cancelled during its COMMIT, whose connection then "
                          "failed (%s), may or may not be committed (transaction %s is %s): "
                          "its caller is told it was cancelled", reason(exc), xid,
                          status or "not known")
        if status != "committed":
            raise _NotCommitted(status)

    def _unknown(self, lost: BaseException, why: str) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"inventory {self.name}: the connection failed while a write was being committed "
            f"({self._reason(lost)}) and {why}: its outcome is unknown, it may or may not be "
            "written")

    async def _status(self, mark: uuid.UUID, began: float) -> str | None:
        """What became of the write whose mark is ``mark`` (begun at ``began``, monotonic),
        asked on a connection of its own by claiming the mark (_CLAIM): "committed" (the
        write's mark is there), "aborted" (it was not: the claim now holds its key, so the
        write's transaction can no longer commit it), "in progress" (the write's transaction
        still held the key at LOST_COMMIT_WAIT: its COMMIT runs), None (the server could not
        be asked, or only read and did not have the mark: a standby not yet promoted; or the
        write began so long ago that its mark may have been pruned, and it is not there).
        The connection is tried again while the server cannot be reached or only read (a
        restart, a failover under way), all within LOST_COMMIT_WAIT. Exact whoever has the
        write's transaction id now: a failover's new primary, or the same server after a
        crash that lost the write's WAL, hands it to the next writer."""
        deadline = time.monotonic() + LOST_COMMIT_WAIT
        claim = time.monotonic() - began < MARK_KEEP / 2  # its mark cannot have been pruned
        pause = 0.01
        while True:
            try:
                # The claim waits for a transaction that holds the key no longer than the
                # time left: the server's own lock_timeout says it still runs.
                conn = await self._connect(
                    timeout=_left(deadline),
                    server_settings={"lock_timeout": f"{int(_left(deadline) * 1000) + 1}"})
                try:
                    if claim:
                        try:
                            lost = await conn.fetchval(_CLAIM, mark, timeout=_left(deadline) + 1)
                        except asyncpg.LockNotAvailableError:
                            return "in progress"
                        except asyncpg.ReadOnlySQLTransactionError:
                            # A standby (or a primary turned read-only): the write's mark
                            # or a claim it has replayed is final; their absence is not.
                            found = await conn.fetchval(_FOUND, mark, timeout=_left(deadline))
                            if found is None:
                                raise
                            return "aborted" if found else "committed"
                        return "aborted" if lost else "committed"
                    found = await conn.fetchval(_FOUND, mark, timeout=_left(deadline))
                    return None if found is None else "aborted" if found else "committed"
                finally:
                    conn.terminate()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                    TimeoutError) as exc:
                if time.monotonic() + pause >= deadline:
                    log.info("inventory %s: cannot ask what became of the write marked %s: %s",
                             self.name, mark, reason(exc))
                    return None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def _single(self, method: str, sql: str, *args: Any, committed: Any = None) -> Any:
        """One write that is one autocommit statement ``sql`` (its own transaction), run by
        the connection's ``method`` ("execute", "fetchval") with ``args``: one round trip
        where a ``_write`` costs four (BEGIN, its mark, the statement, COMMIT), told as it
        ended all the same. The statement is never cancelled from here: asyncpg, its call
        cancelled, asks the server to cancel the statement and throws its answer away, so
        nothing would say whether it committed. A caller cancelled meanwhile waits for that
        answer instead (the statement's run, milliseconds; bounded by CANCELLED_COMMIT_WAIT,
        past which the statement is cancelled and the caller told so, logged as maybe
        written): answered, it was committed (autocommit commits before ReadyForQuery, on
        which asyncpg returns), the result is returned and the cancel delivered at the
        caller's next wait; failed, nothing was written and the cancel is raised.

        Its connection lost once the statement was sent (no ERROR answer), it is settled by
        its mark (_SINGLE_MARK, written by the statement itself) as a ``_write`` whose
        COMMIT was lost is (:meth:`_settle`): committed, ``committed`` is returned (the
        statement's own answer is what was lost: a caller that needs more than "it
        committed" passes what that means); not, the StoreError of a failed write; unknown
        within LOST_COMMIT_WAIT, :class:`OutcomeUnknown`."""
        self._writes += 1
        # As text: asyncpg encodes it for the uuid parameter; a UUID object only if asked.
        key = f"{self._server_ms():012x}{self._random.getrandbits(80):020x}"
        prune = not self._writes % PRUNE_MARKS_EVERY
        params: list[Any] = [*args, key, MARK_KEEP] if prune else [*args, key]
        query = _single_sql(sql, len(args), prune)
        began = time.monotonic()
        cancel: asyncio.CancelledError | None = None
        lost: BaseException | None = None
        done = False
        result: Any = committed
        try:
            async with self._conn() as conn:
                statement = asyncio.ensure_future(getattr(conn, method)(query, *params))
                try:
                    result = await asyncio.shield(statement)
                except asyncio.CancelledError as exc:
                    cancel = exc
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                    if _answered(exc):
                        raise  # the server's own answer: rolled back
                    lost = exc  # asked by its mark once the connection is back in the pool
                if cancel is not None:
                    result = await waited(cancel, statement, within=CANCELLED_COMMIT_WAIT,
                                          late=functools.partial(_late, self.name, statement))
                done = True
        except asyncio.CancelledError as exc:
            if not done:
                raise
            cancel = exc  # while the connection went back to the pool: written all the same
        if lost is not None:
            await self._settle(None, uuid.UUID(key), began, lost)  # returns if committed
            result = committed
        if cancel is not None:
            deliver(cancel)
        return result

    async def server_clock(self) -> tuple[float, float, float]:
        """base.ServerClock: the server's clock_timestamp() (now() is the transaction's
        start), this host's wall clock at the middle of the round trip."""
        async with self._conn() as conn:
            began = time.time()
            server = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
            ended = time.time()
        return float(server), (began + ended) / 2, ended - began

    def _learn_clock(self, server_ms: int) -> None:
        """The server's clock read (ms since the epoch, a mark's first bits) just now."""
        self._clock_offset = server_ms - time.monotonic() * 1000

    def _server_ms(self) -> int:
        """The server's clock now, in ms, as this store last learnt it (a single statement's
        mark: _SINGLE_MARK); before it learnt any (open learns it), this host's."""
        if self._clock_offset is None:
            return int(time.time() * 1000)
        return int(time.monotonic() * 1000 + self._clock_offset)

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self._pool_size,
                timeout=self._peer.connect_timeout,
                # No client-side timeout: a lost peer is noticed by the kernel (keepalives,
                # TCP_USER_TIMEOUT: dsn.PeerSettings), a long statement by the server's own
                # statement_timeout, and one whose backend does not run by the check
                # (_look); each set as a session is adopted.
                command_timeout=None, init=self._adopt_session, reset=_kept_session,
                connection_class=_Session)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError,
                ValueError) as exc:
            raise StoreError(f"cannot open inventory {self.name}: {reason(exc)}") from exc
        self._pool = pool
        try:
            async with self._conn() as conn:  # the version came with the session: no query
                supported(conn.get_server_version(), self.name)
            # Listening checked before anything else is written: a pooler that pools
            # transactions or statements is named before it fails a migration its own way.
            await self._listen()
            await self._delivered()
            applied = self.migrated = await self.migrate()
        except BaseException:
            await self.close()
            raise
        self._relisten = asyncio.ensure_future(self._keep_listening())
        log.info("inventory %s open, schema version %d%s", self.name, SCHEMA_VERSION,
                 f" (migrated: {', '.join(map(str, applied))})" if applied else "")

    async def close(self) -> None:
        relisten, self._relisten = self._relisten, None
        if relisten is not None:
            relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relisten
        beat, self._beat = self._beat, None
        if beat is not None:
            beat.cancel()  # its session is closed with the pool's, below
        for task in (self._full_probe, self._telling, self._heeding, self._looking):
            if task is not None:
                task.cancel()
        self._full_probe = self._telling = self._heeding = self._looking = None
        for conn in (self._notify, self._feed):
            if conn is not None:
                with contextlib.suppress(asyncpg.InterfaceError, OSError,
                                         asyncpg.PostgresError):
                    await conn.close(timeout=5)
        self._notify = self._feed = None
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except TimeoutError:
                pool.terminate()

    async def _connect(self, timeout: float | None = None,
                       server_settings: dict[str, str] | None = None) -> asyncpg.Connection:
        """A connection outside the pool (LISTEN, the feed's, a settle's question), set up
        as the pool's are (:func:`connect`)."""
        return await connect(self._dsn, self._peer, timeout=timeout,
                             server_settings=server_settings)

    async def _listen(self) -> None:
        """One connection outside the pool that LISTENs: a notification wakes readers."""
        old, self._notify = self._notify, None
        if old is not None:
            old.terminate()
        conn: asyncpg.Connection | None = None
        try:
            conn = await self._connect()
            # Its LISTEN within connect_timeout too, a part of the attempt: a connection can
            # be answered by what does not answer a statement (a proxy such as pgbouncer
            # authenticates clients itself; a backend stopped once connected), and a LISTEN
            # waited on for ever stopped the store from listening again, and from checking
            # (_keep_listening: a session made meanwhile was never ended). First the
            # server's side of the keepalives and timeouts, as a pool session's
            # (_adopt_session): without them the server kept the LISTEN session of a
            # vanished netboot for its kernel's two hours of keepalive, or ~15 minutes of
            # retransmissions once notifications were sent to it (s34-pg).
            async with asyncio.timeout(self._peer.connect_timeout):
                backend = (await conn.fetchrow(*server_keepalives(self._peer)))[-1]
                await conn.add_listener(CHANNEL, self._notified)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            if conn is not None:
                conn.terminate()  # not left open, in whatever state the failure left it
            raise StoreError(f"inventory {self.name}: cannot LISTEN: {reason(exc)}") from exc
        self._notify, self._notify_backend = conn, backend
        self._heard = time.monotonic()
        self._notify_lost.clear()
        self._silence = None  # it answered a connect and a LISTEN
        conn.add_termination_listener(self._notify_closed)
        if conn.is_closed():
            # Lost before the listener was added (in the turn its LISTEN was answered):
            # asyncpg tells only the listeners it has when it cleans up, so it never will.
            self._notify_lost.set()

    async def _delivered(self) -> None:
        """:meth:`_undelivered` at open: the store refuses to open if a notification does
        not reach it (StoreError naming the setting)."""
        deaf = await self._undelivered(tell_role=True)
        if deaf is not None:
            raise StoreError(f"inventory {self.name}: {deaf}")

    async def _undelivered(self, *, tell_role: bool = False) -> str | None:
        """Why a notification sent from a pool session did not reach the LISTEN connection
        within connect_timeout, naming the setting; None if it did (StoreError: the pool
        session could not ask).
        Behind a pooler in transaction or statement pooling (pgbouncer's ``pool_mode =
        transaction``) the LISTEN is made on whichever server session ran it, and what that
        session is notified of goes to whichever client uses it then, or nowhere: the store
        would open and every other server's commit would reach its view only at the view's
        own syncs, nothing said. Measured with pgbouncer 1.18: in session pooling the
        notification comes; in transaction pooling never (tests/inventory/
        test_postgres.py). One round trip, once per open; the same statement asks whether
        this role may see other roles' sessions (logged: _look cannot tell a stuck lock
        holder of another role from one at work without it)."""
        probe = (f"probe {uuid.uuid4().hex}", asyncio.get_running_loop().create_future())
        self._probe = probe
        try:
            async with self._conn() as conn:
                _, sees, me = await conn.fetchrow(
                    f"SELECT pg_notify('{CHANNEL}', '{probe[0]}'),"
                    " pg_has_role('pg_read_all_stats', 'USAGE'), current_user::text")
            try:
                async with asyncio.timeout(self._peer.connect_timeout):
                    await probe[1]
            except TimeoutError:
                return self._undelivered_words()
        finally:
            self._probe = None
        if tell_role and not sees:
            log.warning("inventory %s: netboot's role, %s, lacks pg_read_all_stats: a lock "
                        "holder of another role that holds up writes cannot be told stuck "
                        "from at work, only reported (GRANT pg_read_all_stats TO %s)",
                        self.name, me, me)
        return None

    def _undelivered_words(self) -> str:
        return ("a notification sent on this database did not "
                f"reach netboot's LISTEN connection within {self._peer.connect_timeout} "
                "s: is a connection pooler between netboot and PostgreSQL in transaction "
                "or statement pooling? netboot is told of other servers' changes by "
                "LISTEN/NOTIFY, which needs a server session of its own: set pgbouncer's "
                "pool_mode = session for netboot's database (or connect netboot to "
                "PostgreSQL directly)")

    async def _heartbeat(self) -> str | None:
        """:meth:`_undelivered` for the check, when the LISTEN connection has heard nothing
        for a check_interval: why no notification reached it, None if one did or it could
        not be sent (no verdict: a silent server is the check's ``SELECT 1``'s to tell, a
        pool session whose backend does not read it the check's _look's, which ends it).
        Sent on a pool session, not on the LISTEN connection: behind a pooler in
        transaction pooling, that client's statement may be lent the very server session
        that still LISTENs, which would notify it, and say it hears. Not cancelled on a
        timeout of its own: asyncpg's pool waits for a cancelled statement's session to be
        reset, and a session whose backend is stopped never is (the check then waited on it
        and a write on the pool waited for ever).

        A pooler reloaded into transaction pooling (pgbouncer's RELOAD) keeps netboot's
        LISTEN client connected, and its ``SELECT 1`` answered; from its next query on, its
        server session is lent to others, and no notification reaches it. Measured with
        pgbouncer 1.18 and 1.24.1 (s35-pg): every other server's commit unseen for as long
        as it was watched (20 s), health "ok", listening; found only at a re-listen, which
        nothing caused. A store that commits hears its own commits' notifications, so only
        an idle one sends this: one NOTIFY a check_interval, which the other servers
        receive and ignore (it has a payload)."""
        probe = (f"probe {uuid.uuid4().hex}", asyncio.get_running_loop().create_future())
        self._probe = probe
        try:
            try:
                async with self._conn() as conn:
                    await conn.execute(f"SELECT pg_notify('{CHANNEL}', '{probe[0]}')")
            except StoreError:
                return None
            try:
                async with asyncio.timeout(self._peer.connect_timeout):
                    await probe[1]
            except TimeoutError:
                if self._beat is asyncio.current_task():
                    self._notify_lost.set()  # wakes the check now, not at its next turn
                return self._undelivered_words()
            return None
        finally:
            if self._probe is probe:  # cancelled, it ends after a re-listen's probe began
                self._probe = None

    def _unlisten(self) -> None:
        """End the LISTEN connection on purpose (not "lost": :meth:`_notify_closed`)."""
        conn, self._notify = self._notify, None
        if conn is not None:
            conn.terminate()

    def _notify_closed(self, conn: object) -> None:
        if conn is self._notify:  # not one _listen or close replaced on purpose
            self._notify_lost.set()

    async def _keep_listening(self) -> None:
        """Listen again whenever the LISTEN connection is lost (the server restarted or
        failed over, or its peer vanished and the kernel gave the connection up: dsn.
        PeerSettings) or the server did not answer its check (:meth:`_watch`), for as long
        as the store is open.

        Nothing is missed meanwhile: the change feed is the ``changes`` table, and a
        notification only says "read it". While no connection listens, another server's
        commit is not counted (:attr:`commits`), so the count is moved at the loss (readers
        sync before they next answer, then every ``max_age``: InventoryView.fresh) and again
        once listening (after LISTEN, so that a sync begun from then reads every commit the
        outage hid, and each later one is notified); waiting readers are woken both times.
        An attempt the server does not answer within connect_timeout finds it silent too
        (:meth:`_silenced`): the store's connections (any made since) are ended again."""
        first, most = RELISTEN_PAUSES
        while True:
            try:
                why = await self._watch()
            except Exception:  # a bug: logged, and listened again (checked) rather than never
                log.exception("inventory %s: the check failed", self.name)
                why = "its check failed (logged)"
            self._notify_lost.clear()
            self._notify = None
            self._commits += 1
            self._signal.fire()
            log.error("inventory %s: %s; other servers' writes reach this server's view at "
                      "its next sync until it listens again", self.name, why)
            pause = first
            while True:
                try:
                    await self._listen()
                    # Asked again at each new LISTEN connection, not only at open(): a
                    # pooler switched to transaction pooling while netboot runs (pgbouncer
                    # reloaded) lends the new LISTEN a server session whose notifications
                    # go to whoever uses it next (s34-pg2). Then the connection is ended:
                    # readers poll (wait_for_changes) rather than wait on it, health says
                    # why (stuck_writes), and the next attempt asks again.
                    try:
                        deaf = await self._undelivered()
                    except StoreError:
                        self._unlisten()  # made again, and asked again, next attempt
                        raise
                    if deaf is None:
                        if self._deaf is not None:
                            # The pool's sessions made meanwhile may hold asyncpg's
                            # prepared statements made on server sessions the pooler then
                            # lent to others ("prepared statement does not exist" at each
                            # use, measured with pgbouncer 1.18 switched back): made anew.
                            for session in (*self._sessions, self._feed):
                                if session is not None and not session.is_closed():
                                    session.terminate()
                            log.warning("inventory %s: notifications reach netboot again; "
                                        "its sessions are made anew", self.name)
                        self._deaf = None
                        break
                    self._unlisten()
                    if self._deaf is None:
                        log.error("inventory %s: %s; readers poll the change feed every %s "
                                  "s meanwhile", self.name, deaf, POLL_SECONDS)
                    self._deaf = deaf
                    pause = most  # no faster than the pooler's configuration is changed
                except StoreError as exc:
                    if isinstance(exc.__cause__, TimeoutError):
                        self._silenced(f"the server stopped answering (no new connection "
                                       f"listening within {self._peer.connect_timeout} s)")
                    log.info("%s; trying again in %.2f s", exc, pause)
                except Exception:  # a bug: logged, and tried again rather than never
                    log.exception("inventory %s: listening again failed", self.name)
                await asyncio.sleep(pause)
                pause = min(pause * 2, most)
            self._commits += 1
            self._signal.fire()
            log.warning("inventory %s: listening for changes again", self.name)

    async def _watch(self) -> str:
        """Until the LISTEN connection is lost, or the server does not answer its check:
        why. Every ``check_interval`` seconds one round trip on it (:func:`answers`); not
        answered within ``check_timeout``, the server's kernel may well still answer (TCP's
        probes, acknowledgements: a stopped or hung server, a proxy that lost the server and
        keeps the client's side), but the server does not: every connection of the store is
        ended (:meth:`_silenced`), which bounds a query or a COMMIT waiting on it, and the
        LISTEN connection is made again.

        Also when a notification the store sent itself did not reach it (:meth:`_heartbeat`,
        sent when it heard none for a check_interval): the LISTEN connection is made again,
        and its own probe tells health why (_deaf). The heartbeat runs beside the checks, not
        between them: waiting for a pool session, or for the notification, it must not
        stretch the checks' bound on a silent server (check_interval + check_timeout)."""
        interval, within = self._peer.check_interval, self._peer.check_timeout
        beat: asyncio.Future[str | None] | None = None
        self._beat = None  # an earlier check's, if still under way, wakes this one no more
        while True:
            if not interval:
                await self._notify_lost.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._notify_lost.wait()
            conn = self._notify
            deaf = None
            if beat is not None and beat.done():
                deaf, beat = beat.result(), None
            if deaf is not None and conn is not None:
                self._notify = None  # not "lost": ended here, on purpose
                conn.terminate()
                # Told now (health: stuck_writes), not after the new LISTEN's own probe's
                # connect_timeout too; that probe keeps it or clears it.
                self._deaf = deaf
                return deaf
            if self._notify_lost.is_set() or conn is None or conn.is_closed():
                return "the LISTEN connection was lost"
            if await answers(conn, within) and await self._look(conn, within) \
                    and await self._writable(conn, within):
                if self._full is not None and (self._full_probe is None
                                               or self._full_probe.done()):
                    # Beside the check, as the heartbeat: a write may wait for a session.
                    self._full_probe = asyncio.ensure_future(self._probe_full())
                pool = self._pool
                if (beat is None and time.monotonic() - self._heard >= interval
                        and pool is not None and pool.get_idle_size()):
                    # Only on a session idle now: never queued behind the storm's writes.
                    # Left to end on its own if this returns (bounded: _heartbeat).
                    beat = self._beat = asyncio.ensure_future(self._heartbeat())
                continue
            why = _unanswered(within)
            self._notify = None  # not "lost": ended here, on purpose
            conn.terminate()
            self._silenced(why)
            return why

    async def _look(self, conn: asyncpg.Connection, within: float) -> bool:
        """The server answered its check on ``conn``; a pool session whose statement has
        been waited for longer than ``within`` seconds, while the server shows its backend
        idle for that long too, has a backend that does not read it (stopped, hung: the
        rest of the server answers). Not "idle since before the statement was sent": a
        statement's first use on a session is two round trips (asyncpg prepares it), and a
        backend stopped between them has been idle only since the first; an answer sent
        that long ago and not yet read is a loss TCP's bounds are for. It is ended,
        once logged, and its statement fails (a write in its COMMIT settled as one whose
        connection was lost: _settle). One round trip more, only while some statement has
        waited that long. A backend hung while it runs a statement shows "active", as one
        that runs a long one does (a bulk import's COPY, a COMMIT waiting for a synchronous
        standby): told apart by the server's own statement_timeout, which a backend that
        runs enforces (an ERROR). A statement waited for ``within`` past it has a backend
        that does not run: the session is ended, logged once, the server asked to end the
        backend too (pg_terminate_backend, acted on once it runs), and the statement fails
        (a write settled as above: its body's, failed; its COMMIT's or a single statement's,
        by its mark).

        A session waiting that long for a lock (the writers' lock, most likely) held by a
        session idle in its transaction for longer than ``within`` (of any server or
        client: its client or its backend stopped or hung, an operator's forgotten psql
        transaction) is ended too: it would wait as long as that holder, for ever if its
        backend is stopped (pg_terminate_backend acts only once it runs). Its write fails
        (its first statement takes the lock: nothing was written; a single statement
        waiting for a row is settled by its mark, claimed: it can no longer commit) saying
        which PID holds it; logged once per holder. Only a holder of the writers' lock
        stops writes (:meth:`stuck_writes`): a row's holder (an operator's UPDATE of one
        lease or token) stops that row's writes alone. A holder that runs a statement (a
        bulk import's COPY under the lock) is waited for. Only the store's own sessions are
        ever ended, never the holder. A holder is seen only if the store's role may see
        its state: one of the same role, or any with pg_read_all_stats. One of another role
        whose state this role may not see (without pg_read_all_stats, pg_stat_activity
        hides it) is waited for too: stuck or at work, netboot cannot tell, so it says so
        (logged once per holder, and cannot_tell while it holds the writers' lock, naming
        the GRANT that would let it tell: /healthz "unknown", not an outage); its writes
        wait, each bounded by statement_timeout. A waiting session whose backend the server
        does not show under the PID it gave (a pooler that moves sessions between
        backends) cannot be looked at: cannot_tell says so while one waits.

        False if the server did not answer its questions here within ``within`` (as it is
        a check's: :func:`answered`): the server is silent, as if the check's ``SELECT 1``
        had gone unanswered (a question left running on ``conn`` would make every later
        check's refused at once, taken for an answer: the server never told silent)."""
        stuck = self._stuck  # a write that takes the lock meanwhile clears it (_write)
        if stuck is not None:
            pid, began, _, hidden = stuck
            still = await answered(
                conn.fetchval(_STILL_HOLDS, pid, WRITE_LOCK >> 32, WRITE_LOCK & 0xFFFFFFFF)
                if hidden else conn.fetchval(_STILL_STUCK, pid, began), within)
            if still is None:
                return False
            with contextlib.suppress(*_FAILED):
                if not still.result():
                    log.warning("inventory %s: the session of backend PID %d no longer "
                                "holds up writes", self.name, pid)
                    self._stuck = None
        now = time.monotonic()
        waiting: dict[int, tuple[_Session, float]] = {}
        for session in (*self._sessions, self._feed):
            asked = getattr(session, "asked", None)
            if asked is not None and now - asked > within and not session.is_closed():
                waiting[session.backend] = (session, now - asked)
        if not waiting:
            self._blind = None
            return True
        asking = await answered(conn.fetch(_IDLE_FOR, list(waiting), within), within)
        if asking is None:
            return False
        rows: dict[int, Any] | None = None
        with contextlib.suppress(*_FAILED):
            rows = {row[0]: row for row in asking.result()}
        bound = self._peer.statement_timeout
        overran: list[int] = []
        blind = None
        for pid, (session, wait) in waiting.items():
            if rows is not None and pid not in rows:
                # The server shows no backend of the PID it named as the session was made
                # (a pooler in between that moves sessions between backends, or a backend
                # just ended): nothing to look at, so nothing to tell; said, not "healthy".
                blind = (f"inventory {self.name}: a statement has waited {wait:.0f} s on a "
                         f"session whose backend (PID {pid}) the server does not show, so "
                         "netboot cannot tell whether it is stuck (a connection pooler "
                         "between netboot and PostgreSQL must keep each session on one "
                         "backend: pgbouncer's pool_mode = session)")
                continue
            _, idle, holder, held, began, role, state, event, me = (rows or {}).get(
                pid, (pid, *[None] * 8))
            # The writers' lock (an advisory one): every write waits. A row's holder (an
            # operator's UPDATE of one lease or token) stops that row's writes alone: each
            # is given up (or waited for, if hidden), the others go on: no outage.
            advisory = event == "advisory"
            what = "" if advisory else "of what it locked "
            if idle is not None and idle >= within:
                session.ended_why = (
                    f"the server did not read a statement of this session within "
                    f"{within} s, though it answers others (its backend, PID {pid}, "
                    "does not: stopped or hung)")
                log.error("inventory %s: %s: the session is ended (a write in its COMMIT"
                          " is settled as one whose connection was lost)", self.name,
                          session.ended_why)
            elif holder is not None and held is not None:
                session.ended_why = (
                    f"waited {wait:.0f} s for a lock held by the session of backend "
                    f"PID {holder}, idle in its transaction for {held:.0f} s (its client "
                    f"or its backend stopped or hung?): writes {what}wait for it until it "
                    "ends")
                if advisory:
                    self._stuck = (holder, began, f"inventory {self.name}: writes are "
                                   f"refused: {session.ended_why}", False)
                if holder not in self._stuck_told:
                    self._stuck_told.add(holder)
                    # The holder is not ended here (it may be anyone's): an operator
                    # can, and its backend, if stopped, acts on it once it runs.
                    log.error("inventory %s: %s; each is given up after %s s (the holder "
                              "is left as it is: end it with pg_terminate_backend(%d))",
                              self.name, session.ended_why, within, holder)
            elif bound and wait > bound + within and pid not in self._unbounded:
                # The backend was to cancel it at statement_timeout (an ERROR, answered at
                # once), and has not for check_timeout more: it does not run (stopped, hung
                # in the kernel), though it shows "active" as one at work does. Ended here,
                # and the server asked to end the backend too: a signal it acts on once it
                # runs again, rather than finish what its client gave up (a single
                # statement's settle then finds its claim, or waits on its mark: unknown).
                doing = f"{state}, waiting for {event}" if event else state or "not shown"
                session.ended_why = (
                    f"a statement of this session ran for {wait:.0f} s, past the "
                    f"server's statement_timeout of {bound} s, which its backend (PID "
                    f"{pid}: {doing}) did not enforce: stopped or hung")
                log.error("inventory %s: %s: the session is ended, and the backend asked to "
                          "end (pg_terminate_backend; a write in its COMMIT is settled as "
                          "one whose connection was lost)", self.name, session.ended_why)
                overran.append(pid)
            elif holder is not None:
                # Held by a session of another role whose state this role may not see:
                # stuck or at work, netboot cannot tell; its writes wait (statement_timeout
                # bounds each). Told, with what would let it tell.
                why = (f"writes {what}wait for a lock held by the session of backend PID "
                       f"{holder} (role {role}); this netboot's role, {me}, may not see what "
                       "that session does (stuck idle in its transaction, or at work), so it "
                       f"cannot give its writes up: it lacks pg_read_all_stats (GRANT "
                       f"pg_read_all_stats TO {me})")
                if advisory:
                    self._stuck = (holder, None, f"inventory {self.name}: {why}", True)
                if holder not in self._stuck_told:
                    self._stuck_told.add(holder)
                    log.error("inventory %s: %s; each write is given up after "
                              "statement_timeout (%s s)", self.name, why, bound or "none")
                continue
            else:
                continue  # it runs the statement, or its answer is on its way
            session.terminate()
        if blind is not None and self._blind is None:
            log.warning("%s", blind)
        self._blind = blind
        if overran:
            ending = await answered(conn.execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", overran),
                within)
            if ending is None:
                return False
            with contextlib.suppress(*_FAILED):
                ending.result()
        return True

    async def _writable(self, conn: asyncpg.Connection, within: float) -> bool:
        """Whether the check may go on (False: the server went silent meanwhile). A server
        whose sessions are read-only (_READ_ONLY_FIX) is told by stuck_writes from this check
        on, not from this server's next write only: a server that writes little (answering
        known machines) said ok meanwhile, its peer degraded (s39-multi). The probe clears
        it once a write is taken."""
        if self._full is not None:
            return True
        asking = await answered(conn.fetchval("SELECT current_setting('transaction_read_only')"),
                                within)
        if asking is None:
            return False
        with contextlib.suppress(Exception):  # an error answered, or the connection lost
            if asking.result() == "on" and self._full is None:
                self._full = (f"inventory {self.name}: its sessions are read-only "
                              f"(transaction_read_only is on; {_READ_ONLY_FIX})")
                log.warning("%s", self._full)
        return True

    def stuck_writes(self) -> str | None:
        """Why writes are given up while reads answer (base.StuckWrites): a lock they wait
        for held by a session idle in its transaction past check_timeout (:meth:`_look`).
        Not a holder whose state this role may not see: that one may be at work (a bulk
        import of another role), and its writes wait rather than fail: cannot_tell.

        Also while no notification reaches a LISTEN connection made again (a pooler
        switched to transaction pooling while netboot runs: :meth:`_keep_listening`): the
        view would otherwise be told of no other server's commit, nothing said; health
        says so, naming pool_mode = session, until a later LISTEN is notified.

        Also while the server's disk is full (a write met DiskFullError), until a write
        succeeds (:meth:`_probe_full`)."""
        if self._deaf is not None:
            return f"inventory {self.name}: {self._deaf}"
        if self._full is not None:
            return self._full
        stuck = self._stuck
        return None if stuck is None or stuck[3] else stuck[2]

    def cannot_tell(self) -> str | None:
        """Why the check cannot tell whether writes are stuck (base.CannotTell), with what
        would let it: a holder of the writers' lock whose state this role may not see (the
        GRANT), or a waiting session whose backend the server does not show."""
        stuck = self._stuck
        return stuck[2] if stuck is not None and stuck[3] else self._blind

    def _silenced(self, why: str) -> None:
        """The server does not answer (``why``): end every connection of the pool and the
        feed's, as a server restart would. A statement under way on one fails at once
        (its write settled as one whose connection was lost: :meth:`_settle`, asked on a new
        connection within LOST_COMMIT_WAIT), an idle one is made again when next used (within
        connect_timeout). A statement answered by a server that is there is not cut here (a
        COPY waiting on a lock: its server answers the check; statement_timeout is the
        server's)."""
        self._silence = why
        for conn in (*self._sessions, self._feed):
            if conn is not None and not conn.is_closed():
                conn.terminate()

    def _reason(self, exc: BaseException) -> str:
        """:func:`reason`, and why the store ended the connection if it did (or why a
        connection could not be made in time: the server found silent, and not since
        answered a LISTEN)."""
        said = reason(exc)
        first = _first(exc)
        if isinstance(first, asyncpg.QueryCanceledError) and "statement timeout" in str(first):
            # The server's words do not say which setting, nor that it is netboot's.
            return (f"{said} (inventory.postgresql.statement_timeout: "
                    f"{self._peer.statement_timeout} s)")
        if ((isinstance(first, asyncpg.InterfaceError) and "released back to the pool" in said)
                or (isinstance(first, asyncpg.InternalClientError)
                    and "cannot switch to state" in said)):
            # asyncpg's words for a session that ended while idle in a transaction (it drops
            # the server's FATAL that said why; read before the connection's end, it leaves
            # the protocol in a state the next statement cannot leave): the server rolled
            # the transaction back.
            said = (f"{said}: the session ended during its transaction, which is rolled "
                    "back (ended by the server: idle in the transaction longer than "
                    "inventory.postgresql.idle_in_transaction_session_timeout, "
                    f"{self._peer.idle_in_transaction_session_timeout} s, as when this "
                    "process stopped or hung; or pg_terminate_backend, a restart)")
        if self._silence is not None and isinstance(
                first, asyncpg.ConnectionDoesNotExistError | TimeoutError):
            return f"{said}: {self._silence}"
        if self._deaf is not None:
            # A pooler in transaction pooling fails statements its own way too (asyncpg's
            # prepared statements, made on one server session, asked for on another):
            # every error says what the store found (s34-pg2).
            return f"{said}; {self._deaf}"
        return said

    async def _adopt_session(self, conn: asyncpg.Connection) -> None:
        """A new connection of the pool: its notifications are of writes counted already.
        Forgotten when it closes, so that a later session of another server that gets the
        same backend PID is counted as foreign.

        Its keepalives are set on both sides: here (:func:`tune`), and the server's, so that
        the server notices this host gone (a pulled cable, a crashed VM) within the same
        bound: a session of a vanished netboot that held the writers' lock in an open
        transaction would otherwise hold it, and every other server's writes behind it, for
        the server kernel's two hours. Its statement_timeout and
        idle_in_transaction_session_timeout in the same statement (dsn.PeerSettings): a
        netboot stopped or hung mid-transaction, whose host still answers, is ended by
        the server too. One round trip per pool connection, once: a
        ``SET``, not a startup parameter, which poolers such as pgbouncer refuse.

        That round trip is a part of making the session: bounded by connect_timeout, as the
        connect is (asyncpg's pool bounds only the connect; the acquire's 30 s were the
        bound of a session whose server went silent here), and the session is among those
        a silent server's check ends (:meth:`_silenced`) from before it is sent.

        The same statement asks its backend's PID (pg_backend_pid()): behind pgbouncer the
        PID asyncpg was handed (get_server_pid) is pgbouncer's, which pg_stat_activity and
        the notifications never name, so the check found no session of the store's (a
        write behind a stuck holder waited for ever, health "ok": s34-pg) and every own
        commit's notification was counted as another server's."""
        tune(conn, self._peer)
        conn.backend = conn.get_server_pid()  # the server's own, until it says (direct)
        self._sessions.add(conn)
        try:
            pid = conn.backend = await self._set_up(conn, self._peer)
        except TimeoutError:
            conn.terminate()  # then asyncpg's pool closes it at once, and raises this
            why = (f"the server stopped answering (a new session was not set up within "
                   f"{self._peer.connect_timeout} s)")
            log.warning("inventory %s: %s: ended", self.name, why)
            raise StoreError(f"inventory {self.name}: {why}") from None
        self._own.add(pid)
        conn.add_termination_listener(lambda _: self._ended_own(pid))

    def _ended_own(self, pid: int) -> None:
        """A session of this pool ended. A commit it sent may still be made once its backend
        runs again (a lost COMMIT, _settle): that notification comes from a PID no longer
        this pool's, counted as another's commit (readers sync), and known as a writer of
        the inventory, not looked at (_look_at_notifiers): the look took a pool session at
        that moment for a question whose answer is known."""
        self._own.discard(pid)
        _remember(self._writers, pid, time.monotonic())

    async def _set_up(self, conn: asyncpg.Connection, peer: PeerSettings) -> int:
        """The server's side of ``peer`` on ``conn`` (:func:`server_keepalives`), within
        connect_timeout (TimeoutError past it): its backend's PID."""
        async with asyncio.timeout(self._peer.connect_timeout):
            row = await conn.fetchrow(*server_keepalives(peer))
        return int(row[-1])

    def _notified(self, _conn: object, pid: int, _channel: str, payload: str) -> None:
        self._heard = time.monotonic()
        if payload.startswith(_REFUSED):
            # Another server's writes were refused (this one's own: its pool's PIDs): said by
            # this one's health too, until its own probe is taken (the check's, _probe_full).
            # Believed once the teller is known to be a writer of the inventory
            # (_TELLER_MAY_WRITE): one look at a time, a flood's others dropped meanwhile.
            if pid not in self._own and self._full is None and not self._stranger(pid) and (
                    self._heeding is None or self._heeding.done()):
                self._heeding = asyncio.ensure_future(
                    self._heed_refused(pid, payload[len(_REFUSED):]))
            return
        if payload:  # not a commit's (its trigger's is empty): open()'s probe (_delivered)
            probe = self._probe
            if probe is not None and payload == probe[0] and not probe[1].done():
                probe[1].set_result(None)
            return
        if pid not in self._own:
            if pid not in self._writers:
                # Counted once its session is found writing (_look_at_notifiers): counted at
                # once, a session not known yet made every reader sync, and a role granted
                # nothing that opened a session for each NOTIFY and closed it was never
                # known, so never a stranger (s47-attack).
                if not self._stranger(pid):
                    self._unlooked.add(pid)
                    if self._looking is None or self._looking.done():
                        self._looking = asyncio.ensure_future(self._look_at_notifiers())
                return
            self._commits += 1  # another session's commit: readers sync before answering
        self._signal.fire()

    def _stranger(self, pid: int) -> bool:
        found = self._strangers.get(pid)
        return found is not None and time.monotonic() - found < STRANGER_SECONDS

    async def _look_at_notifiers(self) -> None:
        """Whether the sessions whose commits' notifications were heard may write the
        inventory (_WRITERS_AMONG), until none is left to look at: a writer's is a commit,
        counted now. Not asked (this server's pool away): they count as commits, as before.
        A session gone before it is looked at counts for nothing: readers sync on their
        own schedule all the same (InventoryView.fresh's ``max_age``), and a netboot
        server's sessions are its pool's, long-lived."""
        while self._unlooked:
            pids, self._unlooked = self._unlooked, set()
            try:
                async with self._conn() as conn:
                    rows = await conn.fetch(_WRITERS_AMONG, list(pids))
            except StoreError:
                self._commits += 1
                self._signal.fire()
                return
            now = time.monotonic()
            wrote = False
            for row in rows:
                _remember(self._writers if row[1] else self._strangers, int(row[0]), now)
                wrote = wrote or bool(row[1])
            if wrote:
                self._commits += 1
                self._signal.fire()

    async def _heed_refused(self, pid: int, why: str) -> None:
        """Another session told of refused writes (_notified): said by this server's health
        too if that session's role may write the inventory (_TELLER_MAY_WRITE). Not asked
        (this server's own pool away): the teller tells again at its next refused write or
        probe, and this server finds out at its own write, as before the notification."""
        try:
            async with self._conn() as conn:
                may_write = await conn.fetchval(_TELLER_MAY_WRITE, pid)
        except StoreError:
            return
        if not may_write:
            _remember(self._strangers, pid, time.monotonic())
            if self._unheeded != pid:
                self._unheeded = pid
                log.warning("inventory %s: a notification that writes are refused came from "
                            "backend %d, whose role may not write the inventory (not a netboot "
                            "server's): ignored (which role: pg_stat_activity)", self.name, pid)
            return
        if self._full is None:
            # Escaped: a device's words reach no log line raw, nor another server's.
            self._full = f"{escape(why, _REFUSED_WHY)} (told by another netboot server)"
            log.warning("inventory %s: writes refused: %s", self.name, self._full)

    def _listening(self) -> bool:
        return self._notify is not None and not self._notify.is_closed()

    async def migrate(self) -> list[int]:
        """Apply the steps this database lacks; the versions applied (none: up to date)."""
        try:
            return await self._migrate_all()
        except StoreError as exc:
            # A step that reads documents (migration 5's data::jsonb) fails on one that is
            # not JSON ("invalid input syntax for type json", no row): searched for, named.
            bad = await self._not_json_error("migrate")
            if bad is not None:
                raise bad from exc
            raise

    async def _not_json_error(self, doing: str) -> StoreError | None:
        """base.not_json for this database, if a document in it is not JSON: each row's
        data cast as the failed statement cast it, in a function of this session's own
        schema (pg_temp, dropped with the transaction's end; no pg_input_is_valid before
        PostgreSQL 16), which catches the cast's error row by row."""
        found: tuple[str, str, list[str]] | None = None
        try:
            async with self._conn() as conn, conn.transaction():
                await conn.execute(_NOT_JSONB)
                for table, key in DOCUMENT_TABLES:
                    if await conn.fetchval("SELECT to_regclass($1)", table) is None:
                        continue  # a table an older schema lacks
                    keys = [row[0] for row in await conn.fetch(
                        f"SELECT {key} FROM {table} WHERE pg_temp.netboot_not_jsonb(data)"  # noqa: S608
                        f" ORDER BY {key} LIMIT 4")]
                    if keys:
                        found = table, key, keys
                        break
                await conn.execute("DROP FUNCTION pg_temp.netboot_not_jsonb(text)")
        except StoreError:
            return None
        if found is None:
            return None
        table, key, keys = found
        quoted = keys[0].replace("'", "''")
        return not_json(self.name, doing, table, keys,
                        f"DELETE FROM {table} WHERE {key} = '{quoted}'")  # noqa: S608 - told, not run

    async def _migrate_all(self) -> list[int]:
        applied: list[int] = []
        async with self._conn() as conn, conn.transaction():
            # Not bounded by statement_timeout: a step may rewrite a large table, and a
            # server that starts beside another waits here for its migration.
            pid = conn.get_server_pid()
            self._unbounded.add(pid)
            try:
                # A statement of its own before the lock's (a statement's timeout is armed
                # as it begins), in the same message (one simple query, one round trip).
                await conn.execute("SET LOCAL statement_timeout = 0;"
                                   f" SELECT pg_advisory_xact_lock({MIGRATE_LOCK})")
                return await self._migrate(conn, applied)
            finally:
                self._unbounded.discard(pid)

    async def _migrate(self, conn: asyncpg.Connection, applied: list[int]) -> list[int]:
        """:meth:`migrate` in its transaction on ``conn``, the migrations' lock held."""
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)")
        # With the server's clock: the first bits of a single statement's mark (_single).
        version, server_ms = await conn.fetchrow(
            "SELECT coalesce(max(version), 0), (extract(epoch FROM clock_timestamp())"
            " * 1000)::bigint FROM schema_migrations")
        self._learn_clock(server_ms)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"inventory {self.name} has schema version {version}, newer than this "
                f"netboot knows ({SCHEMA_VERSION}); run the netboot release that wrote "
                "it, or a newer one")
        for index in range(version, SCHEMA_VERSION):
            description, steps = MIGRATIONS[index]
            for step in steps:
                await conn.execute(step)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description, applied)"
                " VALUES ($1, $2, $3)", index + 1, description, time.time())
            log.info("inventory %s: migrated schema to version %d (%s)", self.name,
                     index + 1, description)
            applied.append(index + 1)
        return applied

    async def schema_version(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_migrations"))

    async def seal_clear_tokens(self) -> int:
        """Seal the join tokens written in clear (by a tool, or copied from an older SQLite
        file) with this store's sealer; how many. For start-up once the sealer's key is in
        its file and claimed as the inventory's (service.open_inventory), not at open: two
        servers starting with new keys on a database holding clear tokens sealed them with
        the key of the one that then lost the claim, and a kill before the key's file was
        written lost the key they were sealed with (SqliteStore.seal_clear_tokens)."""
        sealer = self._sealed.sealer
        if sealer is None:
            return 0
        sealed = 0
        async with self._write() as conn:
            for name, text in await conn.fetch("SELECT name, data FROM clusters FOR UPDATE"):
                data = json.loads(text)
                token = data.get("token")
                if isinstance(token, str) and token and not sealer.is_sealed(token):
                    data["token"] = sealer.seal(token, context=join_token_context(name))
                    await conn.execute("UPDATE clusters SET data = $2 WHERE name = $1", name,
                                       codec.dumps(data, "cluster"))
                    sealed += 1
        if sealed:
            log.info("inventory %s: sealed the join tokens of %d clusters", self.name, sealed)
        return sealed

    # machines -------------------------------------------------------------------------
    async def get_machine(self, machine_id: str) -> Machine | None:
        async with self._conn() as conn:
            text = await conn.fetchval("SELECT data FROM machines WHERE id = $1", machine_id)
        return self._machine(text)

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        key_kind, key_value = codec.claim_key(kind, value)
        async with self._conn() as conn:
            text = await conn.fetchval(
                "SELECT m.data FROM machine_keys k JOIN machines m ON m.id = k.machine"
                " WHERE k.kind = $1 AND k.value = $2", key_kind, key_value)
        return self._machine(text)

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        keys = [codec.claim_key(kind, value) for kind, value in claims]
        if not keys:
            return []
        async with self._conn() as conn:
            # One statement: one snapshot for every key, the index probed per pair.
            rows = await conn.fetch(
                "SELECT k.kind, k.value, m.id, m.data FROM machine_keys k"
                " JOIN machines m ON m.id = k.machine"
                " WHERE (k.kind, k.value) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                [kind for kind, _ in keys], [value for _, value in keys])
        decoded: dict[str, Machine | None] = {}  # one value per machine
        found: dict[tuple[str, str], Machine | None] = {}
        for kind, value, ident, data in rows:
            if ident not in decoded:
                decoded[ident] = self._machine(data)
            found[kind, value] = decoded[ident]
        return [found.get(key) for key in keys]

    async def get_machine_by_hostname(self, hostname: str) -> Machine | None:
        async with self._conn() as conn:
            text = await conn.fetchval(
                f"SELECT data FROM machines WHERE {_fold('hostname')} = {_fold('$1')}"  # noqa: S608
                " AND hostname IS NOT NULL", hostname)
        return self._machine(text)

    async def list_machines(self, flt: MachineFilter | None = None) -> list[Machine]:
        flt = flt or MachineFilter()
        codec.check_filter(flt)
        where, params = _where(flt)
        order = "m.mac IS NULL, m.mac, m.id"
        if flt.sort == "mac" and flt.descending:
            order = "m.mac IS NULL DESC, m.mac DESC, m.id DESC"
        elif flt.sort != "mac":
            # The column name comes from SORT_KEYS (checked by codec.check_filter).
            column = SINCE_POSTGRES if flt.sort == "state_since" else f"m.{flt.sort}"
            order = f"{column} IS NULL, {column}{' DESC' if flt.descending else ''}, {order}"
        if flt.after_id is not None:
            order = "m.id"
        n = len(params)
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT m.data FROM machines m{where} ORDER BY {order}"  # noqa: S608
                f" LIMIT ${n + 1} OFFSET ${n + 2}", *params, flt.limit,
                0 if flt.after_id is not None else flt.offset)
        return await self._decoded(rows)

    async def machines_after(self, after: str, limit: int) -> list[Machine]:
        async with self._conn() as conn:
            # The primary key's range, in its order (COLLATE "C": as Python orders the ids).
            rows = await conn.fetch("SELECT data FROM machines WHERE id > $1 ORDER BY id"
                                    " LIMIT $2", after, limit)
        return await self._decoded(rows, self._page_maps)

    async def _decoded(self, rows: list[asyncpg.Record],
                       maps: codec.SharedMaps | None = None) -> list[Machine]:
        # Decoded a chunk at a time, yielding to the event loop between chunks: the whole
        # inventory (the view loading 100,000 machines at start) decoded in one go held the
        # loop for seconds, and every DHCP decision of a storm meanwhile missed its 1 s.
        # (SQLite decodes on its reader thread.)
        machines: list[Machine] = []
        for start in range(0, len(rows), DECODE_CHUNK):
            if start:
                await asyncio.sleep(0)
            machines += (m for m in (self._machine(r[0], maps)
                                     for r in rows[start:start + DECODE_CHUNK]) if m is not None)
        return machines

    async def count_machines(self, flt: MachineFilter | None = None) -> int:
        where, params = _where(flt or MachineFilter())
        async with self._conn() as conn:
            return int(await conn.fetchval(
                f"SELECT count(*) FROM machines m{where}", *params))  # noqa: S608

    async def state_counts(self) -> dict[tuple[str | None, MachineState], int]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT cluster, state, count(*) FROM machines GROUP BY cluster, state")
        return {(r[0], MachineState(r[1])): int(r[2]) for r in rows}

    def _machine(self, text: str | None, maps: codec.SharedMaps | None = None
                 ) -> Machine | None:
        """Decode a stored machine and open its sealed install token."""
        if text is None:
            return None
        return self._sealed.open_machine(
            codec.machine_from_document(codec.loads_document(text), maps))

    async def create_machine(self, machine: Machine) -> None:
        await self.apply_batch(Batch(create=(machine,)))

    async def update_machine(self, machine: Machine, *,
                             expect_state: MachineState | None = None) -> None:
        await self.apply_batch(Batch(update=(machine,), expect={} if expect_state is None
                                     else {machine.id: expect_state}))

    async def delete_machine(self, machine_id: str, *, expect_updated: float | None = None
                             ) -> None:
        async with self._write() as conn:
            if expect_updated is not None:  # the row locked from this read to its delete
                codec.check_version(machine_id, expect_updated, await conn.fetchval(
                    "SELECT updated FROM machines WHERE id = $1 FOR UPDATE", machine_id))
            macs = await conn.fetch(
                "SELECT value FROM machine_keys WHERE machine = $1 AND kind = 'mac'",
                machine_id)
            # Labels and keys go by ON DELETE CASCADE; events and leases have no foreign key.
            if await conn.fetchval("DELETE FROM machines WHERE id = $1 RETURNING id",
                                   machine_id) is None:
                raise NotFound(f"machine {machine_id} not found")
            await conn.execute("DELETE FROM events WHERE machine = $1", machine_id)
            await conn.execute("DELETE FROM leases WHERE mac = ANY($1::text[])",
                               [r[0] for r in macs])
            # Its refused claims (claims.KeptClaims), read by no one once it is gone.
            await conn.execute("DELETE FROM settings WHERE key = $1",
                               REFUSED_CLAIMS + machine_id)

    async def apply_batch(self, batch: Batch) -> None:
        """One transaction: merges, creates, updates, events in order."""
        if not (batch.merge or batch.create or batch.update or batch.events or batch.expect
                or batch.versions or batch.audit):
            return
        audit = [codec.audit_from_dict(codec.audit_to_dict(e)) for e in batch.audit]
        # Each event as read back, with its data's text (codec.stored_event: the round trip
        # of event_from_dict, or the text its maker gave, Event.data_text), copied: the
        # listener keeps them.
        stored = [codec.stored_event(e) for e in batch.events]
        events = [v for v, _ in stored]
        event_rows = [(v.machine, v.time, v.kind, v.message, text) for v, text in stored]
        sealed = [self._sealed.seal_machine(m) for m in (*batch.create, *batch.update)]
        creates = [_Row(m) for m in sealed[:len(batch.create)]]
        updates = [_Row(m) for m in sealed[len(batch.create):]]
        # Events alone change nothing the feed carries: a storm's group commits of boot events
        # would otherwise send every reader back to the database.
        feed = bool(batch.merge or creates or updates)
        async with self._write(feed=feed) as conn:
            # Under the writers' lock: every feed row committed before is visible, none is
            # added by anyone else until this transaction's commit is.
            before = await conn.fetchval(_LAST_CHANGE) if feed else None
            # Under the writers' lock: no other server can move the machine before commit.
            versions = batch.versions
            for machine_id, state in batch.expect.items():
                if machine_id not in versions:
                    codec.check_expected(machine_id, state, await conn.fetchval(
                        "SELECT state FROM machines WHERE id = $1", machine_id))
                    continue
                # The state and the version read by one statement (one round trip a machine,
                # as for the state alone).
                row = await conn.fetchrow("SELECT state, updated FROM machines WHERE id = $1",
                                          machine_id)
                codec.check_expected(machine_id, state, None if row is None else row[0])
                codec.check_version(machine_id, versions[machine_id], row[1])
            for machine_id, version in versions.items():
                if machine_id not in batch.expect:
                    codec.check_version(machine_id, version, await conn.fetchval(
                        "SELECT updated FROM machines WHERE id = $1", machine_id))
            for source, target in batch.merge:
                if await conn.fetchval("DELETE FROM machines WHERE id = $1 RETURNING id",
                                       source) is None:
                    raise NotFound(f"machine {source} not found")
                await conn.execute("UPDATE events SET machine = $1 WHERE machine = $2",
                                   target, source)
            try:
                async with conn.transaction():  # a savepoint
                    await _fast_batch(conn, creates, updates, self._peer, batch.bases)
            except (asyncpg.UniqueViolationError, _Retry):
                # COPY and executemany cannot say which row failed: replay one by one under
                # the same lock to name it (see sqlite.py).
                await _slow_batch(conn, creates, updates, self._machine)
            if event_rows:
                await conn.executemany(
                    "INSERT INTO events (machine, time, kind, message, data)"
                    " VALUES ($1, $2, $3, $4, $5)", event_rows)
            if audit:
                await conn.executemany(
                    "INSERT INTO audit (time, actor, action, target, peer, outcome)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    [(float(e.time), e.actor, e.action, e.target, e.peer, e.outcome)
                     for e in audit])
            after = await conn.fetchval(_LAST_CHANGE) if feed else None
        if before is not None and after is not None:  # committed
            read = [self._sealed.as_read(r.machine, s, g) for r, s, g in zip(
                (*creates, *updates), sealed, (*batch.create, *batch.update), strict=True)]
            # A token sealed already (a copied row): only the feed's read can tell.
            if all(m is not None for m in read):
                self._here.add(int(before), int(after), [
                    *((source, None) for source, _ in batch.merge),
                    *((r.id, m) for r, m in zip((*creates, *updates), read, strict=True))])
        if events and self._listener is not None:
            self._listener.published(events)

    # profiles, clusters, groups ----------------------------------------------------------
    async def _get_named(self, kind: str, name: str) -> Any:
        async with self._conn() as conn:
            text = await conn.fetchval(
                f"SELECT data FROM {_TABLES[kind]} WHERE name = $1", name)  # noqa: S608
        return None if text is None else json.loads(text)

    async def _list_named(self, kind: str) -> list[Any]:
        async with self._conn() as conn:
            rows = await conn.fetch(f"SELECT data FROM {_TABLES[kind]} ORDER BY name")  # noqa: S608
        return [json.loads(r[0]) for r in rows]

    async def _put_named(self, kind: str, name: str, data: str, create: bool) -> None:
        table = _TABLES[kind]
        async with self._write() as conn:
            if create:
                done = await conn.fetchval(
                    f"INSERT INTO {table} (name, data) VALUES ($1, $2)"  # noqa: S608
                    " ON CONFLICT (name) DO NOTHING RETURNING name", name, data)
                if done is None:
                    raise Conflict(f"{kind} {name!r} already exists")
            else:
                await conn.execute(
                    f"INSERT INTO {table} (name, data) VALUES ($1, $2)"  # noqa: S608
                    " ON CONFLICT (name) DO UPDATE SET data = excluded.data", name, data)

    async def _delete_named(self, kind: str, name: str, open_item: Callable[[Any], Any],
                            read: Any, unused: bool,
                            installs: InstallsSince | None = None) -> None:
        """Delete the ``kind`` named ``name``; if it is still ``read`` (check_unchanged)
        and, ``unused``, no machine or group names it (base.in_use), and a group's
        ``installs`` check passes: checked under the writers' lock, which every machine and
        group write takes, so none comes between."""
        table = _TABLES[kind]
        async with self._write() as conn:
            if installs is not None:
                installs.check(await self._installs_since(conn, installs.seq))
            if read is not None:
                stored = await conn.fetchval(
                    f"SELECT data FROM {table} WHERE name = $1 FOR UPDATE", name)  # noqa: S608
                check_unchanged(kind, name, None if stored is None
                                else open_item(json.loads(stored)), read)
            if unused:
                # By the indexed column (a profile's since migration 5: it parsed every
                # machine's document here, the writers' lock held).
                where = "cluster = $1" if kind == "cluster" else "profile = $1"
                found = await conn.fetchrow(
                    f"SELECT coalesce(mac, id), id FROM machines WHERE {where} LIMIT 1",  # noqa: S608
                    name)
                if found is not None:
                    raise in_use(kind, name, f"machine {found[0]}", found[1])
                group = await conn.fetchval(
                    f"SELECT name FROM groups WHERE (data::jsonb) ->> '{kind}' = $1"  # noqa: S608
                    " ORDER BY name LIMIT 1", name)
                if group is not None:
                    raise in_use(kind, name, f"group {group!r}", None)
            if await conn.fetchval(f"DELETE FROM {table} WHERE name = $1"  # noqa: S608
                                   " RETURNING name", name) is None:
                raise NotFound(f"{kind} {name!r} not found")

    async def get_profile(self, name: str) -> Profile | None:
        data = await self._get_named("profile", name)
        return None if data is None else codec.profile_from_dict(data)

    async def list_profiles(self) -> list[Profile]:
        return [codec.profile_from_dict(d) for d in await self._list_named("profile")]

    async def put_profile(self, profile: Profile, *, create: bool = False,
                          expect: Profile | None = None) -> None:
        await self._put_item("profile", profile.name, codec.profile_json(profile), create,
                             codec.profile_from_dict, expect)

    async def _put_item(self, kind: str, name: str, text: str, create: bool,
                        open_item: Callable[[Any], Any], expect: Any) -> None:
        if expect is None:
            await self._put_named(kind, name, text, create)
        else:  # a compare-and-set (base.check_unchanged)
            await self._put_named_if(kind, name, text, open_item, expect)

    async def delete_profile(self, name: str, *, expect: Profile | None = None,
                             unused: bool = False) -> None:
        await self._delete_named("profile", name, codec.profile_from_dict, expect, unused)

    async def get_cluster(self, name: str) -> Cluster | None:
        data = await self._get_named("cluster", name)
        return None if data is None else self._sealed.open_cluster(data)

    async def list_clusters(self) -> list[Cluster]:
        return [self._sealed.open_cluster(d) for d in await self._list_named("cluster")]

    async def put_cluster(self, cluster: Cluster, *, create: bool = False,
                          expect: Cluster | None = None) -> None:
        data = self._sealed.cluster_data(cluster)
        await self._put_item("cluster", cluster.name, codec.dumps(data, "cluster"), create,
                             self._sealed.open_cluster, expect)

    async def _put_named_if(self, kind: str, name: str, data: str,
                            open_item: Callable[[Any], Any], read: Any) -> None:
        """Replace the ``kind`` named ``name`` if it is still ``read`` (check_unchanged).
        The row locked (FOR UPDATE) from its read to its write: another server's
        compare-and-set on it waits, then reads what this one wrote."""
        table = _TABLES[kind]
        async with self._write() as conn:
            stored = await conn.fetchval(
                f"SELECT data FROM {table} WHERE name = $1 FOR UPDATE", name)  # noqa: S608
            check_unchanged(kind, name, None if stored is None
                            else open_item(json.loads(stored)), read)
            await conn.execute(f"UPDATE {table} SET data = $2 WHERE name = $1",  # noqa: S608
                               name, data)

    async def delete_cluster(self, name: str, *, expect: Cluster | None = None,
                             unused: bool = False) -> None:
        await self._delete_named("cluster", name, self._sealed.open_cluster, expect, unused)

    async def get_group(self, name: str) -> Group | None:
        data = await self._get_named("group", name)
        return None if data is None else codec.group_from_dict(data)

    async def list_groups(self) -> list[Group]:
        return [codec.group_from_dict(d) for d in await self._list_named("group")]

    async def put_group(self, group: Group, *, create: bool = False,
                        expect: Group | None = None) -> None:
        await self._put_item("group", group.name, codec.group_json(group), create,
                             codec.group_from_dict, expect)

    async def delete_group(self, name: str, *, expect: Group | None = None,
                           installs: InstallsSince | None = None) -> None:
        await self._delete_named("group", name, codec.group_from_dict, expect, False,
                                 installs)

    # events --------------------------------------------------------------------------
    async def add_event(self, event: Event) -> None:
        value = codec.event_from_dict(codec.event_to_dict(event))
        data = codec.dumps(dict(value.data), "data")
        # Under the writers' lock, as every other event insert: ids then follow commit
        # order, which events_since relies on.
        async with self._write(feed=False) as conn:
            await conn.execute(
                "INSERT INTO events (machine, time, kind, message, data)"
                " VALUES ($1, $2, $3, $4, $5)",
                value.machine, float(value.time), value.kind, value.message, data)
        if self._listener is not None:
            self._listener.published((value,))

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        if limit <= 0:
            return []
        # Newest `limit` by id (insertion order, not the caller's clock), then oldest first.
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT time, kind, message, data FROM events WHERE machine = $1"
                " ORDER BY id DESC LIMIT $2", machine_id, limit)
        return [Event(machine=machine_id, time=t, kind=k, message=msg, data=json.loads(d))
                for t, k, msg, d in reversed(rows)]

    async def newest_events(self, machine_ids: Collection[str]) -> dict[str, Event]:
        if not machine_ids:
            return {}
        # Each machine's newest by the (machine, id) index, one probe each (LATERAL … LIMIT
        # 1): a held machine's thousands of events are not walked, as DISTINCT ON would.
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT e.machine, e.time, e.kind, e.message, e.data"
                " FROM unnest($1::text[]) AS m(id) CROSS JOIN LATERAL"
                " (SELECT machine, time, kind, message, data FROM events WHERE machine = m.id"
                " ORDER BY id DESC LIMIT 1) AS e", list(set(machine_ids)))
        return {m: Event(machine=m, time=t, kind=k, message=msg, data=json.loads(d))
                for m, t, k, msg, d in rows}

    async def events_since(self, after: int, *, limit: int = 1000) -> tuple[int, list[Event]]:
        # Every insert into events holds the writers' lock (_write): ids follow commit order,
        # so no event with a smaller id can commit after a reader passed it.
        async with self._conn() as conn:
            if after < 0:
                return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")), []
            rows = await conn.fetch(
                "SELECT id, machine, time, kind, message, data FROM events WHERE id > $1"
                " ORDER BY id LIMIT $2", after, limit)
        return (int(rows[-1][0]) if rows else after), [
            Event(machine=m, time=t, kind=k, message=msg, data=json.loads(d))
            for _, m, t, k, msg, d in rows]

    # leases --------------------------------------------------------------------------
    async def list_leases(self) -> list[Lease]:
        async with self._conn() as conn:
            rows = await conn.fetch("SELECT mac, ipv4, expires, hostname FROM leases ORDER BY mac")
        return [Lease(mac=m, ipv4=ip, expires=e, hostname=h) for m, ip, e, h in rows]

    async def lease_by_ip(self, ipv4: str) -> Lease | None:
        async with self._conn() as conn:
            row = await conn.fetchrow("SELECT mac, ipv4, expires, hostname FROM leases"
                                      " WHERE ipv4 = $1", ipv4)
        return None if row is None else Lease(mac=row[0], ipv4=row[1], expires=row[2],
                                              hostname=row[3])

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        value = codec.lease_from_dict(codec.lease_to_dict(lease))
        async with self._write(feed=False, lock=False) as conn:
            if ending is not None:
                await conn.execute("DELETE FROM leases WHERE ipv4 = $1 AND mac = $2",
                                   value.ipv4, codec.normalise_mac(ending))
            if now is not None:
                # A concurrent claim of the same expired row waits for this one's commit,
                # then finds it gone and fails on the unique address below.
                await conn.execute("DELETE FROM leases WHERE ipv4 = $1 AND mac <> $2"
                                   " AND expires <= $3", value.ipv4, value.mac, float(now))
            try:
                # The unique address is the claim, whoever else writes. In a savepoint, so
                # that the holder can still be read for the message.
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO leases (mac, ipv4, expires, hostname)"
                        " VALUES ($1, $2, $3, $4) ON CONFLICT (mac) DO UPDATE SET"
                        " ipv4 = excluded.ipv4, expires = excluded.expires,"
                        " hostname = excluded.hostname",
                        value.mac, value.ipv4, float(value.expires), value.hostname)
            except asyncpg.UniqueViolationError as exc:
                holder = await conn.fetchval("SELECT mac FROM leases WHERE ipv4 = $1",
                                             value.ipv4)
                raise Conflict(f"address {value.ipv4} is leased to {holder}") from exc

    async def delete_lease(self, mac: str) -> None:
        mac = codec.normalise_mac(mac)
        await self._single("execute", "DELETE FROM leases WHERE mac = $1", mac)

    # change feed -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _feed_conn(self) -> AsyncIterator[asyncpg.Connection]:
        """The feed's connection, one reader at a time; (re)connected when it is closed (the
        database restarted). Failures are StoreError, as for the pool's connections."""
        if self._pool is None:
            raise StoreError(f"the inventory {self.name} is not open")
        if self._feed_lock is None:
            self._feed_lock = asyncio.Lock()
        async with self._feed_lock:
            try:
                if self._feed is None or self._feed.is_closed():
                    self._feed = await self._feed_session()
                yield self._feed
            except NetbootError:
                raise
            except _FAILED as exc:
                if self._feed is not None and not self._feed.is_closed():
                    self._feed.terminate()  # in an unknown state: the next reader reconnects
                raise StoreError(f"inventory {self.name}: {self._reason(exc)}") from exc

    async def _feed_session(self) -> asyncpg.Connection:
        """The feed's connection, set up as a pool session is (:meth:`_adopt_session`: the
        server's keepalives and statement_timeout, within connect_timeout; one round trip,
        once per connection), and a :class:`_Session`, which the check looks at
        (:meth:`_look`): its backend stopped or hung alone, every sync (each DHCP decision
        after a write waits for one) waited for ever behind the one it holds. Not its
        idle_in_transaction_session_timeout: its read-only transaction holds no lock a
        writer waits for, and decodes every changed machine between two of its statements
        (_read_changes: a resync after a long outage, ~140 µs a machine on a busy host),
        which a bound would fail again at every try."""
        peer = dataclasses.replace(self._peer, idle_in_transaction_session_timeout=0)
        conn = await connect(self._dsn, peer, connection_class=_Session)
        conn.backend = conn.get_server_pid()  # the server's own, until it says (direct)
        try:
            conn.backend = await self._set_up(conn, peer)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def changes_since(self, seq: int) -> Changes:
        async with self._feed_conn() as conn:
            if seq >= 0:
                # The common answer, "nothing", in one indexed round trip.
                last = await conn.fetchval("SELECT max(seq) FROM changes")
                if (last if last is not None else 0) == seq:
                    return Changes(seq, complete=True)
                mine = None if last is None else self._here.since(seq, int(last))
                if mine is not None:
                    # All committed by this store since ``seq``: what it wrote, not read back.
                    return Changes(int(last), complete=True, machines=mine)
            # One snapshot: the changes and the rows they name agree.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                changes = await self._read_changes(conn, seq)
            self._here.forget(changes.seq)
            return changes

    async def _read_changes(self, conn: asyncpg.Connection, seq: int) -> Changes:
        first, last = await conn.fetchrow("SELECT min(seq), max(seq) FROM changes")
        last = last if last is not None else max(0, seq)
        # Pruning deletes a prefix; a sequence may also skip numbers (a rolled-back writer),
        # which can only make this say "incomplete" needlessly, never the other way.
        if seq < 0 or seq > last or (first is not None and first > seq + 1 and seq < last):
            return Changes(last, complete=False)
        # This store's own commits in the range are taken as they were written, not read
        # back (committed.py): only the positions between them are read (another server's
        # commit amid a storm of this one's). Their spans are noted once committed, so in
        # this snapshot.
        machines, gaps = self._here.split(seq, last)
        named_in: dict[str, dict[str, None]] = {}  # table -> its keys, once each
        for after, upto in gaps:
            for tbl, key in await conn.fetch(
                    "SELECT DISTINCT tbl, key FROM changes WHERE seq > $1 AND seq <= $2",
                    after, upto):
                named_in.setdefault(tbl, {})[key] = None
        keys = {tbl: list(names) for tbl, names in named_in.items()}

        async def rows(sql: str, names: list[str]) -> dict[str, Any]:
            return {k: v for k, v in await conn.fetch(sql, names)} if names else {}

        machine_ids = keys.get("machines", [])
        found = await rows("SELECT id, data FROM machines WHERE id = ANY($1::text[])",
                           machine_ids)
        machines.update((m, self._machine(found.get(m))) for m in machine_ids)

        async def named(kind: str, decode: Callable[[Any], _R]) -> dict[str, _R | None]:
            names = keys.get(_TABLES[kind], [])
            table = await rows(f"SELECT name, data FROM {_TABLES[kind]}"  # noqa: S608
                               " WHERE name = ANY($1::text[])", names)
            return {n: None if n not in table else decode(json.loads(table[n])) for n in names}

        setting_keys = keys.get("settings", [])
        settings = await rows("SELECT key, value FROM settings WHERE key = ANY($1::text[])",
                              setting_keys)
        return Changes(
            last, complete=True, machines=machines,
            profiles=await named("profile", codec.profile_from_dict),
            clusters=await named("cluster", self._sealed.open_cluster),
            groups=await named("group", codec.group_from_dict),
            settings={k: settings.get(k) for k in setting_keys})

    async def wait_for_changes(self, seq: int, timeout: float) -> bool:
        """Woken by NOTIFY at the commit of any writer on this database. While the LISTEN
        connection is down (the database restarted) it polls, until :meth:`_keep_listening`
        listens again (and wakes it)."""
        async def news() -> bool:
            if seq < 0:
                return True
            async with self._conn() as conn:
                return int(await conn.fetchval(
                    "SELECT coalesce(max(seq), 0) FROM changes")) != seq

        return await wait_until(news, self._signal, timeout,
                                poll=lambda: None if self._listening() else POLL_SECONDS)

    async def feed_position(self) -> int:
        async with self._conn() as conn:
            return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes"))

    async def under_way_since(self, seq: int) -> tuple[int, list[Machine]]:
        async with self._conn() as conn, conn.transaction(isolation="repeatable_read",
                                                          readonly=True):
            last = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")
            return int(last), await self._installs_since(conn, seq)

    async def _installs_since(self, conn: asyncpg.Connection, seq: int) -> list[Machine]:
        """SqliteStore's _installs_since: the machines with no profile of their own, under
        way, written after ``seq`` (every such one where the feed was pruned past it).
        Seqs follow commit order: each is taken under the writers' lock."""
        states = [state.value for state in INSTALLS_UNDER_WAY]
        first, last = await conn.fetchrow("SELECT min(seq), max(seq) FROM changes")
        if first is not None and first > seq + 1 and seq < last:
            rows = await conn.fetch("SELECT data FROM machines WHERE state = ANY($1::text[])"
                                    " AND profile IS NULL", states)
        else:
            rows = await conn.fetch(
                "SELECT data FROM machines WHERE state = ANY($1::text[]) AND profile IS NULL"
                " AND id IN (SELECT key FROM changes WHERE seq > $2 AND tbl = 'machines')",
                states, seq)
        return [m for m in (self._machine(row[0]) for row in rows) if m is not None]

    async def forget_changes(self, before: int) -> None:
        async with self._write(feed=False) as conn:
            # Never the newest row: it is what tells a reader that nothing before it is missing.
            await conn.execute("DELETE FROM changes WHERE seq < $1"
                               " AND seq < (SELECT max(seq) FROM changes)", before)

    # settings ------------------------------------------------------------------------
    async def get_setting(self, key: str) -> str | None:
        async with self._conn() as conn:
            value = await conn.fetchval("SELECT value FROM settings WHERE key = $1", key)
        return None if value is None else str(value)

    async def claim_setting(self, key: str, value: str, *, replace: str | None = None) -> str:
        async with self._write() as conn:
            current = await conn.fetchval("SELECT value FROM settings WHERE key = $1", key)
            if current is None or (replace is not None and current == replace):
                await conn.execute(
                    "INSERT INTO settings (key, value) VALUES ($1, $2)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, value)
                return value
            return str(current)

    async def put_setting(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise ValidationError("value", "a setting is a string")
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO settings (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, value)

    async def delete_setting(self, key: str) -> None:
        async with self._write() as conn:
            await conn.execute("DELETE FROM settings WHERE key = $1", key)

    async def forget_stale_settings(self) -> int:
        async with self._write() as conn:
            # A range of the primary key (COLLATE "C"): the rows of machines ever contested.
            gone = await conn.fetchval(
                "WITH gone AS (DELETE FROM settings WHERE (key >= $1 AND key < $2"
                " AND NOT EXISTS (SELECT 1 FROM machines m WHERE m.id = substr(settings.key, $3)))"
                " OR key = ANY($4::text[]) RETURNING 1) SELECT count(*) FROM gone",
                REFUSED_CLAIMS, REFUSED_CLAIMS_END, len(REFUSED_CLAIMS) + 1,
                list(STALE_SETTINGS))
            return int(gone)

    # API tokens and the audit log ------------------------------------------------------
    async def create_token(self, token: ApiToken) -> None:
        value = codec.token_from_dict(codec.token_to_dict(token))
        try:
            await self._single(
                "execute", f"INSERT INTO api_tokens ({codec.TOKEN_COLUMNS})"  # noqa: S608
                " VALUES ($1, $2, $3, $4, $5, $6)",
                value.name, value.sha256, str(value.scope), value.created, value.expires,
                value.last_used)
        except Conflict as exc:  # refused, nothing written: name which key was taken
            async with self._conn() as conn:
                taken = await conn.fetchval("SELECT 1 FROM api_tokens WHERE name = $1",
                                            value.name)
            what = f"token {value.name!r}" if taken else "a token with this value"
            raise Conflict(f"{what} already exists") from exc

    async def token_by_hash(self, sha256: str) -> ApiToken | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {codec.TOKEN_COLUMNS} FROM api_tokens WHERE sha256 = $1",  # noqa: S608
                sha256)
        return None if row is None else codec.token_from_row(row)

    async def list_tokens(self) -> list[ApiToken]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT {codec.TOKEN_COLUMNS} FROM api_tokens ORDER BY name")  # noqa: S608
        return [codec.token_from_row(r) for r in rows]

    async def delete_token(self, name: str) -> None:
        # Committed with its answer lost (settled by its mark): the token is gone, which is
        # what was asked; whether it was there before went with the answer: told deleted.
        if await self._single("fetchval", "DELETE FROM api_tokens WHERE name = $1"
                              " RETURNING name", name, committed=name) is None:
            raise NotFound(f"token {name!r} not found")

    async def touch_token(self, name: str, when: float) -> None:
        await self._single("execute", "UPDATE api_tokens SET last_used = $2 WHERE name = $1",
                           name, float(when))

    async def add_audit(self, entry: AuditEntry) -> None:
        e = codec.audit_from_dict(codec.audit_to_dict(entry))
        await self._single(
            "execute", "INSERT INTO audit (time, actor, action, target, peer, outcome)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            float(e.time), e.actor, e.action, e.target, e.peer, e.outcome)

    async def settle_audit(self, entry: AuditEntry, written: str, otherwise: str) -> None:
        e = codec.audit_from_dict(codec.audit_to_dict(entry))
        # One statement (one round trip): the entry found (by the audit_time index) is
        # updated, or the other added. An entry whose change's COMMIT still runs is not
        # seen (its insert is not committed): then both are kept, which only a COMMIT
        # running past LOST_COMMIT_WAIT leaves.
        await self._single(
            "execute", "WITH found AS (UPDATE audit SET outcome = $7 WHERE id ="
            " (SELECT max(id) FROM audit WHERE time = $1 AND actor = $2 AND action = $3"
            " AND target = $4 AND peer = $5 AND outcome = $6) RETURNING 1)"
            " INSERT INTO audit (time, actor, action, target, peer, outcome)"
            " SELECT $1, $2, $3, $4, $5, $8 WHERE NOT EXISTS (SELECT 1 FROM found)",
            float(e.time), e.actor, e.action, e.target, e.peer, e.outcome, written, otherwise)

    async def list_audit(self, *, since: float | None = None,
                         limit: int = 1000) -> list[AuditEntry]:
        if limit <= 0:
            return []
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT time, actor, action, target, peer, outcome FROM audit"
                " WHERE time >= $1 ORDER BY id DESC LIMIT $2",
                float("-inf") if since is None else float(since), limit)
        return [AuditEntry(time=t, actor=a, action=ac, target=tg, peer=p, outcome=o)
                for t, a, ac, tg, p, o in reversed(rows)]

    async def prune_audit(self, keep: int) -> int:
        # Committed with its answer lost (settled by its mark): the count went with the
        # answer; told 0 (the pruning is done; no caller reads the count but the tests).
        deleted = await self._single(
            "fetchval", "WITH gone AS (DELETE FROM audit WHERE id <="
            " (SELECT coalesce(max(id), 0) FROM audit) - $1 RETURNING 1)"
            " SELECT count(*) FROM gone", max(keep, 0), committed=0)
        return int(deleted)


    async def prune_events(self, before: float, limit: int) -> int:
        if limit <= 0:
            return 0
        # As sqlite.py's: only the oldest ``limit`` rows by id are looked at. A lost answer
        # is told 0: the caller's pass stops, and the next pass goes on from there.
        deleted = await self._single(
            "fetchval", "WITH gone AS (DELETE FROM events WHERE id IN (SELECT id FROM"
            " (SELECT id, time FROM events ORDER BY id LIMIT $2) oldest WHERE time < $1)"
            " RETURNING 1) SELECT count(*) FROM gone", float(before), limit, committed=0)
        return int(deleted)

def _left(deadline: float) -> float:
    """The time left before ``deadline`` (monotonic), as a timeout asyncpg accepts."""
    return max(deadline - time.monotonic(), 0.001)


def _answered(exc: BaseException) -> bool:
    """Whether ``exc`` is the server's answer to the statement, an ERROR, which rolls its
    transaction back, rather than the connection's loss before the answer (a FATAL error
    ends the session too: a backend terminated during a COMMIT may have committed first)."""
    return (isinstance(exc, asyncpg.PostgresError)
            and (exc.severity_en or exc.severity) == "ERROR")


class _NotCommitted(Exception):
    """A transaction whose COMMIT was cancelled ended otherwise (aborted), or nobody can say."""


def _late(name: str, asking: asyncio.Future[Any]) -> None:
    asking.cancel()  # the connection goes back to the pool free
    log.error("inventory %s: a write cancelled during its COMMIT was not told committed "
              "within %.0f s; its caller is told it was cancelled, though it may be",
              name, CANCELLED_COMMIT_WAIT)


async def _kept_session(_conn: asyncpg.Connection) -> None:
    """The pool's reset of a connection given back: nothing to undo. asyncpg's default sends
    ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` at every release, a round
    trip the caller waits for (two per touch_token, one of them this): this store's pool
    sessions never take a session lock, open a cursor outside a transaction, LISTEN (its
    own connection does) nor SET anything but the server's side of the keepalives and its
    timeouts (server_keepalives; a migration's SET LOCAL ends with it), set once
    for the session's life (:meth:`PostgresStore._adopt_session`; RESET ALL would undo
    them). asyncpg still rolls back a transaction left open and drops listeners before
    calling this (Connection._reset)."""


async def connect(dsn: str, peer: PeerSettings, *, timeout: float | None = None,
                  server_settings: dict[str, str] | None = None,
                  connection_class: type[asyncpg.Connection] = asyncpg.Connection,
                  ) -> asyncpg.Connection:
    """A connection to ``dsn`` within ``timeout`` (default: the settings' connect_timeout),
    with ``server_settings`` sent at start-up, set up by :func:`tune`."""
    conn = await asyncpg.connect(dsn, timeout=peer.connect_timeout if timeout is None
                                 else timeout, server_settings=server_settings,
                                 connection_class=connection_class)
    try:
        tune(conn, peer)
    except OSError:
        conn.terminate()
        raise
    return conn


def tune(conn: asyncpg.Connection, peer: PeerSettings) -> None:
    """Keepalives and TCP_USER_TIMEOUT on ``conn``'s socket (dsn.PeerSettings): a peer gone
    without a word ends the connection within the bound, not the kernel's minutes or hours.
    Set once the connection is made: ``connect_timeout`` bounds the making. A Unix socket
    has no peer to lose."""
    sock = conn._transport.get_extra_info("socket")  # asyncpg has no getter
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in peer.socket_options():
        sock.setsockopt(level, option, value)


def server_keepalives(peer: PeerSettings) -> tuple[str, ...]:
    """The statement (and its arguments) that gives a pool session the server's side of
    ``peer``: PostgreSQL's tcp_keepalives_* and tcp_user_timeout (ignored on a Unix socket;
    the server always probes a TCP session; without ``keepalives`` its kernel's timing is
    left alone), and its statement_timeout and idle_in_transaction_session_timeout (in ms
    there; 0: none), all user-settable: one round trip for all, which also answers the
    session's backend PID (its last column: _Session.backend)."""
    names = ["tcp_user_timeout", "statement_timeout", "idle_in_transaction_session_timeout"]
    values = [str(peer.tcp_user_timeout * 1000), str(peer.statement_timeout * 1000),
              str(peer.idle_in_transaction_session_timeout * 1000)]
    if peer.keepalives:
        names += ["tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"]
        values += [str(peer.keepalives_idle), str(peer.keepalives_interval),
                   str(peer.keepalives_count)]
    calls = ", ".join(f"set_config('{name}', ${n}, false)"
                      for n, name in enumerate(names, start=1))
    return (f"SELECT {calls}, pg_backend_pid()", *values)


async def answers(conn: asyncpg.Connection, within: float) -> bool:
    """Whether the server answers one round trip on ``conn`` (``SELECT 1`` as a simple
    query; asyncpg fails on an empty query's answer) within ``within`` seconds, counted only
    while the event loop runs: a loop blocked for a while (a busy one) must not blame the
    server for its own delay, so each wait of the loop counts a quarter-second at most. An
    error answered, or the connection lost (its termination tells), is not silence."""
    asking = await answered(conn.execute("SELECT 1"), within)
    if asking is None:
        return False
    with contextlib.suppress(Exception):
        asking.result()
    return True


async def answered(question: Awaitable[_R], within: float) -> asyncio.Future[_R] | None:
    """``question``'s task, done, if the server answers it within ``within`` seconds counted
    as :func:`answers` counts them (only while the loop runs); None if not: it is left
    running, and then its connection is to be ended (the server is silent), as nothing
    else may be sent on it while it runs: asyncpg refuses a next statement at once
    ("another operation is in progress"), which a check would take for an answer."""
    asking = asyncio.ensure_future(question)
    step = min(within, 0.25)
    waited = 0.0
    try:
        while waited < within:
            before = time.monotonic()
            done, _ = await asyncio.wait((asking,), timeout=step)
            if done:
                return asking
            waited += min(time.monotonic() - before, step)
    finally:  # unanswered, or the caller cancelled (the store closing): ended by its connection
        asking.add_done_callback(lambda t: t.cancelled() or t.exception())
    return None


async def copy_records(conn: asyncpg.Connection, peer: PeerSettings, table: str,
                       records: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
    """``copy_records_to_table``, with two things asyncpg does not do:

    * No TCP_USER_TIMEOUT while the rows are sent, where the checks run
      (``check_interval``). A server may rightly stop reading them for as long as a lock it
      waits for is held (a unique key's entry another transaction wrote and has not
      committed): the window closes, and Linux ends a connection whose zero window outlasts
      the user timeout, though every probe is answered (measured: ended 2-3 s into such a
      wait with a 2 s user timeout, benchmarks/README.md s30-pg). A server that stopped or
      vanished meanwhile is the checks' to notice (:meth:`PostgresStore._watch`,
      :func:`watched`) and the keepalives' while the connection idles. With the checks off
      nothing else would: a vanished server (rows sent and never acknowledged) was waited
      for through the kernel's retransmissions (tcp_retries2, ~15 minutes), a stopped one
      for ever. There the user timeout stays: the COPY fails within it, a COPY waiting on a
      lock longer than it too (its transaction rolls back, the write told failed: a bound
      the operator chose by turning the checks off).
    * Its end, if the connection ends. asyncpg's COPY waits for the transport's writes to
      resume, which a lost connection never does: it waited forever (measured). The COPY
      runs in a task of its own, stopped when the connection's termination is told."""
    sock = conn._transport.get_extra_info("socket")  # asyncpg has no getter
    tcp = bool(peer.check_interval) and sock is not None and sock.family in (
        socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_USER_TIMEOUT")
    if tcp:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def gone(_conn: object) -> None:
        if not ended.done():
            ended.set_result(None)

    conn.add_termination_listener(gone)
    copying = asyncio.ensure_future(conn.copy_records_to_table(table, records=records,
                                                               columns=columns))
    try:
        await asyncio.wait((copying, ended), return_when=asyncio.FIRST_COMPLETED)
        if not copying.done():
            copying.cancel()
            # asyncpg, stopped, writes its CopyFail to the transport that is gone
            # (AttributeError): what it raises then says nothing more.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await copying
            raise asyncpg.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation")
        copying.result()
    except asyncio.CancelledError:
        copying.cancel()
        raise
    finally:
        conn.remove_termination_listener(gone)
        if tcp and not conn.is_closed():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                peer.tcp_user_timeout * 1000)


@contextlib.asynccontextmanager
async def watched(dsn: str, peer: PeerSettings, conn: asyncpg.Connection,
                  ) -> AsyncIterator[list[str]]:
    """While the block runs on ``conn`` (one outside a store: ``netboot db copy``'s), the
    server is asked one round trip every ``check_interval`` on a connection of its own, as a
    store asks on its LISTEN connection (:meth:`PostgresStore._watch`); unanswered within
    ``check_timeout``, or that connection lost, ``conn`` is ended, and why is added to the
    list yielded (for the error's words)."""
    said: list[str] = []
    if not peer.check_interval:
        yield said
        return
    checker = await connect(dsn, peer)

    async def watch() -> None:
        while True:
            await asyncio.sleep(peer.check_interval)
            if checker.is_closed() or not await answers(checker, peer.check_timeout):
                said.append(_unanswered(peer.check_timeout))
                conn.terminate()
                return

    watching = asyncio.ensure_future(watch())
    try:
        yield said
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        checker.terminate()


def _unanswered(within: float) -> str:
    """Why a server is taken as silent, in the words a store's check and ``watched`` say."""
    return f"the server stopped answering (no answer to a check within {within} s)"


def supported(version: tuple[int, ...], name: str) -> None:
    """Refuse a server older than MIN_SERVER_VERSION, saying which and what to do."""
    if tuple(version[:2]) < MIN_SERVER_VERSION:
        have = ".".join(map(str, version[:2]))
        need = ".".join(map(str, MIN_SERVER_VERSION[:1]))
        raise StoreError(
            f"inventory {name}: PostgreSQL {have} is too old: netboot needs PostgreSQL "
            f"{need} or newer (pg_current_xact_id, pg_xact_status on xid8); upgrade the "
            "server, or use a SQLite inventory")


def _first(exc: BaseException) -> BaseException:
    """The failure ``exc`` was raised while handling, if asyncpg raised it for the state that
    failure left (the transaction's ROLLBACK on a connection that ended: "cannot call
    Transaction.__aexit__(): the underlying connection is closed"): what went wrong."""
    while isinstance(exc, asyncpg.InterfaceError) and isinstance(exc.__context__, _FAILED):
        exc = exc.__context__
    return exc


def reason(exc: BaseException) -> str:
    """What went wrong, in words that never include the DSN."""
    exc = _first(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        # The kernel gave the connection up (dsn.PeerSettings): no FIN, no RST, nothing.
        return f"the server stopped answering ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return f"{exc}: {reason(cause)}"  # asyncpg's "connection was closed", and why
    return str(exc) or type(exc).__name__



def _where(flt: MachineFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []

    def arg(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    if flt.state is not None:
        clauses.append(f"m.state = {arg(flt.state.value)}")
    if flt.cluster is not None:
        clauses.append(f"m.cluster = {arg(flt.cluster)}")
    if flt.profile is not None:
        clauses.append(f"m.profile = {arg(flt.profile)}")  # machines_profile (migration 5)
    if flt.uuid is not None:
        clauses.append(f"((m.data::jsonb) ->> 'uuid') = {arg(flt.uuid)}")
    if flt.serials:
        clauses.append(f"((m.data::jsonb) ->> 'serial') = ANY({arg(list(flt.serials))}::text[])")
    if flt.fixed_ipv4 is not None:
        clauses.append(f"((m.data::jsonb) ->> 'fixed_ipv4') = {arg(flt.fixed_ipv4)}")
    if flt.with_fixed_ipv4:
        clauses.append("((m.data::jsonb) ->> 'fixed_ipv4') IS NOT NULL")
    if flt.without_secret:
        clauses.append("((m.data::jsonb) ->> 'secret_hash') IS NULL")
    if flt.shared_fixed_ipv4:
        clauses.append("((m.data::jsonb) ->> 'fixed_ipv4') IN (SELECT (data::jsonb) ->>"
                       " 'fixed_ipv4' FROM machines GROUP BY 1 HAVING count(*) > 1)")
    if flt.has_mac is not None:
        clauses.append("m.mac IS NOT NULL" if flt.has_mac else "m.mac IS NULL")
    if flt.updated_before is not None:
        clauses.append(f"m.updated < {arg(float(flt.updated_before))}")
    if flt.in_state_before is not None:
        clauses.append(f"{SINCE_POSTGRES} < {arg(float(flt.in_state_before))}")
    if flt.after_id is not None:
        clauses.append(f"m.id > {arg(flt.after_id)}")
    if flt.ids is not None:
        clauses.append(f"m.id = ANY({arg(sorted(flt.ids))}::text[])")
    if flt.text:
        # strpos, not LIKE: no wildcard characters to escape in the text.
        needle = arg(flt.text.lower())
        hostname = _fold("coalesce(m.hostname, '')")
        clauses.append(f"(strpos({hostname}, {needle}) > 0"  # noqa: S608 - $n, no value
                       f" OR strpos({_fold('m.id')}, {needle}) > 0"
                       " OR EXISTS (SELECT 1 FROM machine_keys k WHERE k.machine = m.id"
                       f" AND strpos({_fold('k.value')}, {needle}) > 0))")
    for key, value in flt.labels:
        clauses.append(
            "EXISTS (SELECT 1 FROM machine_labels l WHERE l.machine = m.id"  # noqa: S608
            f" AND l.key = {arg(key)} AND l.value = {arg(value)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


async def _fast_batch(conn: asyncpg.Connection, creates: list[_Row], updates: list[_Row],
                      peer: PeerSettings, bases: Mapping[str, Machine]) -> None:
    if creates:
        # COPY: a 100k-machine import is one stream, not 100k statements.
        await copy_records(conn, peer, "machines", [r.params for r in creates],
                           _MACHINE_COLUMNS)
        await copy_records(conn, peer, "machine_labels",
                           [lab for r in creates for lab in r.labels], ("machine", "key", "value"))
        await copy_records(conn, peer, "machine_keys",
                           [key for r in creates for key in r.keys], ("kind", "value", "machine"))
    if updates:
        ids = [r.id for r in updates]
        if len(set(ids)) != len(ids):
            raise _Retry  # one machine updated twice: its labels would be inserted twice
        present = await conn.fetchval(
            "SELECT count(*) FROM machines WHERE id = ANY($1::text[])", ids)
        if present != len(ids):
            raise _Retry
        # Not for a group commit of boots: their bases (Batch.bases) say no address moves.
        if len(updates) > 1 and any(
                (base := bases.get(r.id)) is None or base.fixed_ipv4 != r.machine.fixed_ipv4
                for r in updates):
            await _let_go_fixed(conn, updates)
        await conn.executemany(_UPDATE_MACHINE, [r.params for r in updates])
        # Labels and identifiers rarely change with an update (a state step, a fact, a token):
        # rewritten only for the machines where they differ from what is stored (as the
        # SQLite store does), which spares two indexed tables a delete and an insert per row.
        labels = await _stored(conn, "SELECT machine, key, value FROM machine_labels"
                                     " WHERE machine = ANY($1::text[])", ids)
        keys = await _stored(conn, "SELECT machine, kind, value FROM machine_keys"
                                   " WHERE machine = ANY($1::text[])", ids)
        relabel = [r for r in updates
                   if labels.get(r.id, []) != sorted((k, v) for _, k, v in r.labels)]
        rekey = [r for r in updates
                 if keys.get(r.id, []) != sorted((k, v) for k, v, _ in r.keys)]
        if relabel:
            await conn.execute("DELETE FROM machine_labels WHERE machine = ANY($1::text[])",
                               [r.id for r in relabel])
            await conn.executemany(_INSERT_LABEL, [lab for r in relabel for lab in r.labels])
        if rekey:
            gone, added = _rekeyed(rekey, keys, updates)
            if gone:
                await conn.execute(
                    "DELETE FROM machine_keys WHERE (kind, value) IN"
                    " (SELECT * FROM unnest($1::text[], $2::text[]))",
                    [k for k, _ in gone], [v for _, v in gone])
            if added:
                await conn.executemany(_INSERT_KEY, added)


def _rekeyed(rekey: list[_Row], stored: dict[str, list[tuple[str, str]]], updates: list[_Row],
             ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The identifier rows of the machines ``rekey`` whose identifiers changed: the stored
    (kind, value) rows to delete (those a machine no longer claims) and the rows to insert
    (those it claims anew), given ``stored``, every updated machine's rows as stored.

    Only the difference is written: a first DHCP sighting learns a machine's UUID (option
    97), and deleting and inserting its MAC row again was half of those statements' rows
    (s34-keys did the same for SQLite; s35-pg). Raises _Retry when a machine takes an
    identifier that a machine listed after it in ``updates`` gives up: a batch is its
    machines written in order (the recorder joins commits into one batch and, refused,
    writes them one by one), and that identifier is still the later one's when the earlier
    takes it. The deletes, all made before the inserts, would let it pass; _slow_batch
    refuses it naming the holder, as MemoryStore and SQLite do."""
    order = {r.id: n for n, r in enumerate(updates)}
    holder = {key: r.id for r in rekey for key in stored.get(r.id, ())}
    gone: list[tuple[str, str]] = []
    added: list[tuple[str, str, str]] = []
    for r in rekey:
        old = set(stored.get(r.id, ()))
        for row in r.keys:
            key = (row[0], row[1])
            if key in old:
                old.discard(key)
                continue
            giver = holder.get(key)
            if giver is not None and order[giver] > order[r.id]:
                raise _Retry
            added.append(row)
        gone += old
    return gone, added


async def _stored(conn: asyncpg.Connection, query: str,
                  ids: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Rows (machine, a, b) of ``query`` as machine id → sorted [(a, b)]."""
    found: dict[str, list[tuple[str, str]]] = {}
    for machine, a, b in await conn.fetch(query, ids):
        found.setdefault(machine, []).append((a, b))
    for rows in found.values():
        rows.sort()
    return found


async def _slow_batch(conn: asyncpg.Connection, creates: list[_Row], updates: list[_Row],
                      decode: Callable[[str | None], Machine | None]) -> None:
    """The same writes with the checks MemoryStore makes, in the same order and words."""
    # A new machine may take the address an update moves an enrolled one off (the fast
    # path's COPY, first, was refused by the index), machines may swap theirs.
    if len(updates) > 1 or (updates and creates):
        await _let_go_fixed(conn, updates)
    for row in creates:
        if await conn.fetchval("SELECT 1 FROM machines WHERE id = $1", row.id):
            raise Conflict(f"machine {row.id} already exists")
        await _check_claims(conn, row, decode)
        await conn.execute(_INSERT_MACHINE, *row.params)
        await _insert_children(conn, row)
    for row in updates:
        if not await conn.fetchval("SELECT 1 FROM machines WHERE id = $1", row.id):
            raise NotFound(f"machine {row.id} not found")
        await _check_claims(conn, row, decode)
        await conn.execute(_UPDATE_MACHINE, *row.params)
        await conn.execute("DELETE FROM machine_labels WHERE machine = $1", row.id)
        await conn.execute("DELETE FROM machine_keys WHERE machine = $1", row.id)
        await _insert_children(conn, row)


async def _let_go_fixed(conn: asyncpg.Connection, updates: list[_Row]) -> None:
    await conn.execute(_LET_GO_FIXED, [r.id for r in updates],
                       [r.machine.fixed_ipv4 for r in updates])


async def _insert_children(conn: asyncpg.Connection, row: _Row) -> None:
    for rows, sql in ((row.labels, _INSERT_LABEL), (row.keys, _INSERT_KEY)):
        if rows:
            await conn.executemany(sql, rows)


async def _check_claims(conn: asyncpg.Connection, row: _Row,
                        decode: Callable[[str | None], Machine | None]) -> None:
    for kind, value, _ in row.keys:
        holder = decode(await conn.fetchval(
            "SELECT m.data FROM machine_keys k JOIN machines m ON m.id = k.machine"
            " WHERE k.kind = $1 AND k.value = $2 AND k.machine <> $3", kind, value, row.id))
        if holder is not None:
            raise identity.claimed(kind, value, holder)
    if (fixed := row.machine.fixed_ipv4) is not None:
        # Refused as the unique index refuses it, but the duplicate _UPDATE_MACHINE keeps.
        other = await conn.fetchrow(
            "SELECT id, coalesce(mac, id) FROM machines WHERE fixed_ipv4 = $1 AND id <> $2"
            " AND NOT EXISTS (SELECT 1 FROM machines s WHERE s.id = $2 AND s.fixed_ipv4 IS NULL"
            " AND (s.data::jsonb) ->> 'fixed_ipv4' = $1)", fixed, row.id)
        if other is not None:
            raise fixed_taken(fixed, other[1], other[0])
    hostname = row.machine.hostname
    if hostname is None:
        return
    found = await conn.fetchrow(
        f"SELECT coalesce(mac, id), id FROM machines WHERE {_fold('hostname')} ="  # noqa: S608
        f" {_fold('$1')} AND hostname IS NOT NULL AND id <> $2", hostname, row.id)
    if found is not None:
        raise Conflict(f"hostname {hostname!r} is used by {found[0]}", field="hostname",
                       holder=found[1])
