"""The inventory protocol: what every store (memory, SQLite, later PostgreSQL) provides.

Stores hold frozen model values and nothing else: no policy, no rendering. Every method is a
coroutine so that a networked store (PostgreSQL) fits the same shape. Machines are keyed by
their ``id``; each identifier they claim (every MAC, and the UUID, serial and asset tag
unless a placeholder, see :func:`netboot.identity.claims`) is indexed and unique. Errors:
``NotFound`` when the named object does not exist, ``Conflict`` when a unique key (an
identifier, a hostname, a lease address) is already used, ``StoreError`` when the store itself
fails; a store failure is never reported as "not found".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from netboot.errors import Conflict, NotFound, StateChanged, UnreadableRow
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
    by_position,
    slot_init,
)

# What machines can be listed by: "mac" is the default order (codec.machine_order).
SORT_KEYS = ("mac", "hostname", "state", "cluster", "updated", "created", "state_since")
# The settings that hold a machine's refused claims (netboot.claims.KeptClaims), then its
# id: read from the store where an operator asks, never by a decision, so that a server's
# view neither holds them nor takes their writes (a flood's, every few seconds) for a
# change of what its decisions read (s42-ops).
REFUSED_CLAIMS = "refused-claims/"
# Where those keys end, for a range scan of them by the primary key (SQLite's LIKE folds
# case and does not use the index): '/' + 1.
REFUSED_CLAIMS_END = "refused-claims0"
# The setting that holds the netboot servers sharing the inventory, each by its base URL and
# when it last said it runs (netboot.inventory.peers): read by no decision either, and
# written by each server every minute, which a view would take for a change of what its
# decisions read (every kept answer and text made again).
SERVERS = "servers"
# The setting that holds the pool addresses the authoritative DHCP servers found in use (they
# answered a ping: netboot.pingcheck.in_use_record), each until when it is kept from clients:
# ``netboot status`` shows them as the serving server's GET /status does. Read by no
# decision either, written when a server's marks change.
DHCP_IN_USE = "dhcp-in-use"
# Settings an earlier netboot wrote that none reads now, dropped at a server's start
# (Store.forget_stale_settings): the marker that once stopped the older-registrations look
# for good (s40-ops; unread since s41-ops).
STALE_SETTINGS = ("older_registrations_none",)
# A sort key that is no column: its SQL (SQLite's, PostgreSQL's), the time a machine came
# into its state (Machine.in_state_since: ``state_since``, else ``created``).
SINCE_SQLITE = "COALESCE(json_extract(m.data, '$.state_since'), m.created)"
SINCE_POSTGRES = "COALESCE(((m.data::jsonb) ->> 'state_since')::float8, m.created)"


# Hostnames are unique under ASCII case folding (RFC 4343), as SQLite's lower() and
# PostgreSQL's translate() index them: a writer comparing names before the store does
# (MemoryStore, an import's names against the inventory's) folds the same way.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_hostname(hostname: str) -> str:
    # The name itself when it has no capital (as netboot stores them): translate() makes a
    # new string each call, 100,000 of them (~6 MiB) for an import's map of the inventory.
    return hostname if hostname.islower() else hostname.translate(_ASCII_LOWER)


# A machine whose columns differ from its document, as mend_stray reads it: its id, its
# ref, its fixed_ipv4 column and its document's, its profile column and its document's.
StrayRow = tuple[str, str, str | None, str | None, str | None, str | None]


def mend_stray(rows: Sequence[StrayRow], holders: Mapping[str, str],
               ) -> tuple[list[str], list[tuple[str, str]], list[tuple[str | None, str]],
                          list[tuple[str, str]]]:
    """How a store sets the ``fixed_ipv4`` and ``profile`` columns beside machines'
    documents from the documents, in one write transaction (start-up's
    service.mend_stray_columns): ``rows`` are the machines whose columns differ (StrayRow),
    oldest first; ``holders`` the machine id holding each of their documents' addresses in
    its column now. Every differing address is let go first (two machines' swapped by
    hand), then each taken back where no other machine's column holds it, the oldest
    first; one another holds stays NULL, its document keeping it (an older inventory's
    shared address, S42's migration: start-up names those). Gives the ids to let go,
    (address, id) and (profile, id) to set, and each machine changed (its ref, how)."""
    let_go = [row[0] for row in rows if row[2] is not None and row[2] != row[3]]
    freed = set(let_go)
    held = {address for address, ident in holders.items() if ident not in freed}
    fixed: list[tuple[str, str]] = []
    profiles: list[tuple[str | None, str]] = []
    told: list[tuple[str, str]] = []
    for ident, ref, column, document, profile_column, profile in rows:
        said = []
        if profile_column != profile:
            profiles.append((profile, ident))
            said.append(f"profile {profile_column or 'none'} -> {profile or 'none'}")
        now = column if column == document else None
        if now is None and document is not None and document not in held:
            fixed.append((document, ident))
            held.add(document)
            now = document
        if now != column:
            said.append(f"fixed_ipv4 {column or 'none'} -> {now or 'none'}" + (
                "" if now == document else
                f" (its document's {document} is another machine's)"))
        if said:
            told.append((ref, ", ".join(said)))
    return let_go, fixed, profiles, told


# The tables whose rows hold a JSON document netboot parses (its ``data`` column), each
# with the column naming a row: what a store searches for a document that is not JSON when
# a migration or start-up's scan of the documents failed (not_json).
DOCUMENT_TABLES = (("machines", "id"), ("profiles", "name"), ("clusters", "name"),
                   ("groups", "name"))


def not_json(inventory: str, doing: str, table: str, keys: Sequence[str],
             fix_sql: str) -> UnreadableRow:
    """The error that stops a start whose migration or scan of the documents met a row
    whose ``data`` is not JSON (hand SQL, a damaged copy): where, which rows (``keys``:
    the first few found, by key) and the fix, as a bad config file is told (file, line,
    fix). Nothing was changed: the migration's transaction rolled back whole."""
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    rows = ", ".join(repr(k) for k in keys[:3])
    return UnreadableRow(
        f"cannot {doing} inventory {inventory}: the {table} row{'s' if len(keys) > 1 else ''}"
        f" {rows}{more} hold{'' if len(keys) > 1 else 's'} a data document that is not "
        f"JSON (written by hand SQL or a damaged copy, not by netboot); nothing was changed. "
        f"Put each such row's data right (the JSON netboot wrote, e.g. from a backup), or "
        f"remove the row ({fix_sql}), then start netboot again")


def check_unchanged(kind: str, name: str, stored: Any, read: Any) -> None:
    """The compare-and-set of ``put_cluster``/``put_profile``/``put_group(expect=read)``:
    the item as stored now (opened) is the one its writer read (``kind``: cluster, profile,
    group)."""
    if stored is None:
        raise NotFound(f"{kind} {name!r} not found")
    if stored != read:
        # No holder: a Conflict's holder is a machine's id (OpenAPI's Error), and the item
        # is the one the request names; it was the item's own name.
        raise StateChanged(f"{kind} {name!r} was changed since it was read: another writer "
                           "(another server or a CLI on this inventory) changed it meanwhile; "
                           "send the change again (it is made on the item as stored then)",
                           field=kind)


def in_use(kind: str, name: str, user: str, holder: str | None) -> Conflict:
    """The refusal of ``delete_profile``/``delete_cluster(unused=True)``: ``user`` (``machine
    <ref>`` or ``group '<name>'``; ``holder`` the machine's id, None for a group: a
    Conflict's holder is a machine's id) names it at the delete's commit, though the
    deleter's check found none (another writer gave it meanwhile)."""
    return Conflict(f"{kind} {name!r} is used by {user} (given it by another writer since "
                    "this delete checked: another server or a CLI on this inventory); change "
                    "or remove it first", field=kind, holder=holder)


def fixed_taken(fixed: str, ref: str, holder: str) -> Conflict:
    """A store's refusal of a second machine given one ``fixed_ipv4`` (its unique index):
    ``ref`` names the machine holding it, ``holder`` its id. Core checks first
    (Core._fixed_ipv4_free, worded alike); this is what a writer that did not, or that
    raced another, is told."""
    return Conflict(f"fixed_ipv4 {fixed} is the fixed address of machine {ref}: give each "
                    "machine an address of its own", field="fixed_ipv4", holder=holder)


@dataclass(frozen=True, slots=True)
class MachineFilter:
    state: MachineState | None = None
    cluster: str | None = None
    labels: tuple[tuple[str, str], ...] = ()  # all must match
    # The machines naming this profile: by the indexed ``profile`` column of the SQL stores
    # (a profile's users, Core._users), not a scan of every document.
    profile: str | None = None
    uuid: str | None = None  # exact, canonical lowercase form
    serials: tuple[str, ...] = ()  # any of these exact serials
    has_mac: bool | None = None  # True: at least one NIC known; False: none yet
    # The machines given this fixed_ipv4 (canonical text), or (with_fixed_ipv4) any: the
    # API's check that no two share one, start-up's report of those that do. A scan.
    fixed_ipv4: str | None = None
    with_fixed_ipv4: bool = False
    # The machines whose fixed_ipv4 another machine's document holds too (stored before
    # s40-net refused it): start-up's and ``netboot status``'s report, one scan in the
    # store's SQL, not a decode of every machine given one (~3.9 s of CPU at 100,000).
    shared_fixed_ipv4: bool = False
    # The machines holding no install secret (``secret_hash``): with the registered state,
    # those an older register command registered (core.older_registrations), which
    # ``netboot status`` names. A scan of the documents, not a decode of each (s44-review).
    without_secret: bool = False
    # Case-insensitive substring of the hostname, id, or any MAC, UUID, serial or asset tag
    # (the dashboard's search box).
    text: str | None = None
    # Only machines of these ids (None: any): what a loaded view found for ``text``
    # (InventoryView.matching_text), so that the store reads those rows, not every one.
    ids: frozenset[str] | None = None
    # Machines whose last change (``updated``: a state, a learnt fact) is older than this
    # (seconds since the epoch): with a state, the ones stuck in it (the dashboard's
    # "unchanged for" filter in a storm).
    updated_before: float | None = None
    # Machines in their state since before this (Machine.in_state_since): with a state, the
    # ones stuck in it (the dashboard's "Unchanged for", the API's unchanged_for), which a
    # learnt fact or a token's change, moving ``updated``, does not reset.
    in_state_before: float | None = None
    sort: str = "mac"  # one of SORT_KEYS
    descending: bool = False
    limit: int = 100
    offset: int = 0
    # Machines whose id sorts after this one, listed by id (sort and offset unread): a
    # keyset page, where a machine leaving the filter between two pages moves no other
    # past the next page's start, as an offset's (a group delete's look, Core).
    after_id: str | None = None


@dataclass(frozen=True, slots=True)
class Batch:
    """A set of machine writes (and their events) applied in one transaction: all or nothing.

    Order: merges, then creates, then updates, then events. A merge ``(source, target)`` deletes
    machine ``source`` and gives its events to ``target`` (a discovered record that proved to be
    an enrolled machine); it comes first so the target may take over the source's identifiers.

    ``expect`` is compare-and-set: machine id → the state its writer read. Checked first, in
    the same transaction: NotFound if the machine is gone, StateChanged (a Conflict) if it is
    in another state now, and nothing of the batch is written. Two servers deciding on one
    machine at once (two install tokens, a report racing a reinstall) so never both win.

    ``versions`` is the same check on the whole machine: machine id → its ``updated`` time as
    its writer read it (StateChanged, field ``updated``, if the stored one is another: someone
    changed the machine since, even without moving its state). For a writer that stores the
    whole machine derived from its read (a boot decision), so that an operator's edit (its
    cluster, profile, labels) or another NIC's attachment committed between that read and
    the write is not silently undone. Every writer of a machine sets ``updated``.
    """

    merge: Sequence[tuple[str, str]] = ()
    create: Sequence[Machine] = ()
    update: Sequence[Machine] = ()
    events: Sequence[Event] = ()
    expect: Mapping[str, MachineState] = field(default_factory=dict)
    versions: Mapping[str, float] = field(default_factory=dict)
    # Audit log entries, written last in the same transaction (Access.record: an entry
    # joins the recorder's group commits instead of a transaction of its own).
    audit: Sequence[AuditEntry] = ()
    # Machine id -> the machine an update was made from, as read (its ``updated`` the one in
    # ``versions``): a store may write only what changed from it (SQLite changes the stored
    # document in place, benchmarks/README.md s35-writer). A hint: writing the whole
    # machine stores the same.
    bases: Mapping[str, Machine] = field(default_factory=dict)
    # Ids of updates that are their base (``bases``) with only what a boot request teaches
    # (netboot.boot.learn: facts, UUID, serial, asset tag, arch, firmware and ``updated``;
    # an identifier set only where the base has none, cleaned as netboot.identity cleans
    # it): the recorder's learnt facts (Recorder.learned). A hint: a store may write those
    # fields without comparing the others (SQLite, codec.machine_delta's ``learnt``).
    learnt: Collection[str] = frozenset()


# Made once per first install, and per group commit (model.slot_init: each slot set by its
# descriptor, not object.__setattr__ by name).
slot_init(Batch)
# By position: merge, create, update, events, expect, versions, audit, bases, learnt
# (model.by_position).
batch_of: Callable[[Sequence[tuple[str, str]], Sequence[Machine], Sequence[Machine],
                    Sequence[Event], Mapping[str, MachineState], Mapping[str, float],
                    Sequence[AuditEntry], Mapping[str, Machine], Collection[str]],
                   Batch] = by_position(Batch)


# The states of an install under way whose config is still to be fetched or fetched
# again: a group giving such a machine its profile is not deleted (Core.delete).
INSTALLS_UNDER_WAY = (MachineState.BOOTING, MachineState.INSTALLING)


@dataclass(frozen=True, slots=True)
class InstallsSince:
    """A group's delete checked again in its own transaction (Core.delete): ``check``
    raises (a Conflict naming them) if a group still gives any of the machines handed to it
    the profile its install under way reads. Handed, by the store, every machine with no
    profile of its own in INSTALLS_UNDER_WAY that was written after change feed position
    ``seq`` (the caller's look at every such machine began there), or every such machine
    where the feed no longer reaches back to ``seq``. The boot path takes no lock: an
    install planned between the look and the delete was not seen, and the group deleted
    under it (its installer's config a 409, the install broken midway)."""
    seq: int
    check: Callable[[Sequence[Machine]], None]


@dataclass(frozen=True, slots=True)
class Changes:
    """What was committed to the inventory since a position of its change feed.

    ``seq`` is the position to ask from next. When ``complete`` is False the feed cannot say
    what changed (its history was pruned, or the store keeps none): a reader drops everything
    it holds and reads again. Otherwise each changed object is given as it is now, None when
    it was deleted.
    """

    seq: int
    complete: bool
    machines: Mapping[str, Machine | None] = field(default_factory=dict)
    profiles: Mapping[str, Profile | None] = field(default_factory=dict)
    clusters: Mapping[str, Cluster | None] = field(default_factory=dict)
    groups: Mapping[str, Group | None] = field(default_factory=dict)
    settings: Mapping[str, str | None] = field(default_factory=dict)


class ChangeFeed(Protocol):
    """Every commit to machines, profiles, clusters, groups and settings, by whoever made it
    (this process, the CLI in another, another server), in commit order, recorded in the
    committing transaction itself; PostgreSQL also wakes waiting readers with NOTIFY."""

    async def changes_since(self, seq: int) -> Changes:
        """What changed after ``seq`` (-1: nothing is known yet, answer incomplete)."""

    async def forget_changes(self, before: int) -> None:
        """History before ``before`` is no longer needed by this reader (it may be pruned)."""

    async def feed_position(self) -> int:
        """The feed's newest position now, read alone: nothing of a reader's (the view's
        place, this store's own noted commits) moves, as changes_since(-1) would."""

    async def under_way_since(self, seq: int) -> tuple[int, list[Machine]]:
        """InstallsSince's machines written after ``seq`` (with no profile of their own,
        under way), read outside a delete, and the position they were read at."""

    async def wait_for_changes(self, seq: int, timeout: float) -> bool:
        """True as soon as something was committed after ``seq`` (at once if it already was),
        False after ``timeout`` seconds without. PostgreSQL is woken by NOTIFY, the memory
        store by its own writes; SQLite polls (no notification reaches another process)."""


@runtime_checkable
class LocalCommits(Protocol):
    """A store that counts the commits to the change feed it knows of: the writes made
    through it (in this process) as they return, and those of other processes it is told of
    (PostgreSQL's NOTIFY; SQLite is told of none).

    Lets a reader of the change feed tell, without a round trip, that nothing it could know of
    was committed since it last synced (:meth:`netboot.inventory.view.InventoryView.fresh`);
    commits by other processes it was not told of still need
    :meth:`ChangeFeed.changes_since`."""

    @property
    def commits(self) -> int: ...


@runtime_checkable
class SettledFeed(Protocol):
    """A store that can tell, without a round trip, that nothing at all (by any process) was
    committed to the change feed after ``seq``: a reader's sync then has nothing to apply
    and returns at once (:meth:`netboot.inventory.view.InventoryView.sync`). False whenever
    unsure."""

    def settled(self, seq: int) -> bool: ...


@runtime_checkable
class HeldCaches(Protocol):
    """A store whose connections keep caches of their own in this process's memory
    (SQLite's page cache, per connection), which it can give back when asked: what a busy
    stretch filled stays allocated until then, though the file's pages are in the system's
    page cache anyway."""

    async def release_caches(self) -> None:
        """Empty what the connections cache now (each refills as it reads again)."""


@runtime_checkable
class StuckWrites(Protocol):
    """A store that can find its writes stuck while it still answers reads (PostgreSQL: a
    lock its writers wait for held by a session that makes no progress): why, or None.
    The service's watcher reports it as an outage (health, ``/healthz``, the
    ``netboot_inventory_up`` gauge): every write would fail after a wait meanwhile, so
    boots of known machines are better answered from memory at once. PostgreSQL also
    says so while no notification reaches its LISTEN connection (a pooler switched to
    transaction pooling): its view is not told of other servers' commits then."""

    def stuck_writes(self) -> str | None: ...


def stuck_writes(store: object) -> str | None:
    """Why the store's writes are stuck, if it can tell (:class:`StuckWrites`), else None."""
    return store.stuck_writes() if isinstance(store, StuckWrites) else None


@runtime_checkable
class CannotTell(Protocol):
    """A store whose writes wait on something it cannot see (PostgreSQL: a lock holder of
    another role, without pg_read_all_stats), so it cannot tell whether they are stuck:
    why, and what would let it tell, or None. Not an outage (the holder may be at work:
    writes wait for it, each bounded), and not "ok" either: the service's health reports
    it as unknown (``/healthz``)."""

    def cannot_tell(self) -> str | None: ...


def cannot_tell(store: object) -> str | None:
    """Why the store cannot tell whether its writes are stuck (:class:`CannotTell`), else
    None."""
    return store.cannot_tell() if isinstance(store, CannotTell) else None


@runtime_checkable
class ServerClock(Protocol):
    """A store on a database server with a clock of its own (PostgreSQL), which several
    netboot servers share: their install tokens' expiry, ``install_timeout`` and
    ``unchanged_for`` compare times each one wrote by its own clock, so servers out of
    step eat into them. The service's watcher compares it with this host's
    (health.ClockSkew)."""

    async def server_clock(self) -> tuple[float, float, float]:
        """(the database's clock, this host's clock at the middle of the round trip that
        read it, that round trip's length), in seconds; StoreError when it does not answer."""
        ...


async def release_held_caches(store: object) -> None:
    """Empty the store's own caches if it keeps any (:class:`HeldCaches`); the one place
    that asks, for the view after its load and for ``serve`` once quiet after a storm."""
    if isinstance(store, HeldCaches):
        await store.release_caches()


class EventListener(Protocol):
    """Told of events once they are committed (the live event bus, netboot.events)."""

    @property
    def holding(self) -> bool:
        """Whether events published now are kept past the call (a live stream's queue): a
        store then publishes copies no caller can change (the values it reads back); else
        it may publish an event as given where it stores it as it is (text-only data)."""
        ...

    def published(self, events: Sequence[Event]) -> None: ...


class Sealer(Protocol):
    """Seals secret values (cluster join tokens) before a store writes them to disk
    (:class:`netboot.sealing.Sealer`). ``context`` is authenticated with the value."""

    key_id: str

    def seal(self, value: str, *, context: str) -> str: ...

    def unseal(self, value: str, *, context: str) -> str: ...

    def is_sealed(self, value: str) -> bool: ...


class StateCounts(Protocol):
    """Machines per cluster and state: what the metrics scrape and the fleet status count."""

    async def state_counts(self) -> dict[tuple[str | None, MachineState], int]:
        """How many machines are in each (cluster, state), None for no cluster; only pairs
        with at least one machine. Exact as of the call; one read of the store at most."""


class GroupsKept:
    """What :meth:`GroupCounts.group_counts` remembers between calls, kept by its caller:
    machine id -> (the machine object, the (cluster, state) its group gives it or None), the
    counts of those pairs, and the view's ``rules`` they were selected under."""

    __slots__ = ("counts", "rules", "seen")

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Machine, tuple[str, MachineState] | None]] = {}
        self.counts: dict[tuple[str, MachineState], int] = {}
        self.rules = -1


class GroupCounts(StateCounts, Protocol):
    """And the machines that a group puts in a cluster (none of their own), by that cluster
    and state, where they are held in memory (the loaded view): what the fleet status reads
    otherwise by reading every machine."""

    async def group_counts(self, kept: GroupsKept,
                           ) -> dict[tuple[str, MachineState], int] | None:
        """Only pairs with at least one machine; None where only the store can tell."""


def by_state(counts: Mapping[tuple[str | None, MachineState], int]) -> dict[MachineState, int]:
    """:meth:`StateCounts.state_counts`' answer summed over the clusters: every state, in
    MachineState's order, 0 where none."""
    out = dict.fromkeys(MachineState, 0)
    for (_, state), count in counts.items():
        out[state] += count
    return out


class Store(ChangeFeed, StateCounts, Protocol):
    """The async inventory. ``mac`` arguments are MACs in any accepted spelling; machines and
    their events are named by machine id."""

    async def open(self) -> None:
        """Create or migrate the schema; must be called before use."""

    async def close(self) -> None: ...

    # machines -------------------------------------------------------------------------
    async def get_machine(self, machine_id: str) -> Machine | None: ...

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        """The machine claiming identifier ``kind`` (mac | uuid | serial | asset) = ``value``.

        ``value`` in the form :func:`netboot.identity.claims` gives (a MAC in any spelling);
        placeholders match nothing. ValidationError naming ``kind`` for an unknown kind."""

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        """:meth:`machine_by` of each claim, in their order, in one read: what the boot
        path's view asks for every device of a storm that comes while it is still loading,
        many devices' identifiers at a time. A machine holding several of them is given as
        one value. ValidationError as :meth:`machine_by`."""

    async def get_machine_by_hostname(self, hostname: str) -> Machine | None: ...

    async def list_machines(self, flt: MachineFilter | None = None) -> list[Machine]: ...

    async def machines_after(self, after: str, limit: int) -> list[Machine]:
        """The first ``limit`` machines whose id sorts after ``after`` ("": from the first),
        in the store's id order: the whole inventory a page at a time (the view's load),
        each page a short read, so that the boot path's reads meanwhile are not queued
        behind all of it. The next page starts after the last id of this one."""

    async def count_machines(self, flt: MachineFilter | None = None) -> int: ...

    async def create_machine(self, machine: Machine) -> None:
        """Conflict if the id, an identifier or the hostname (case-insensitive) is used."""

    async def update_machine(self, machine: Machine, *,
                             expect_state: MachineState | None = None) -> None:
        """NotFound if absent; Conflict if a new identifier or hostname belongs to another;
        with ``expect_state``, StateChanged if the stored machine is in another state."""

    async def delete_machine(self, machine_id: str, *, expect_updated: float | None = None
                             ) -> None:
        """NotFound if absent. Deletes its events and the leases of its MACs too. With
        ``expect_updated`` (the machine's ``updated`` as its deleter read it: the API's
        If-Match), a compare-and-set in the delete's transaction: StateChanged (field
        ``updated``, codec.check_version) and nothing deleted if another writer changed it."""

    async def apply_batch(self, batch: Batch) -> None:
        """All creates and updates in one transaction; Conflict/NotFound rolls back all."""

    # profiles, clusters, groups (upsert by name) ----------------------------------------
    async def get_profile(self, name: str) -> Profile | None: ...

    async def list_profiles(self) -> list[Profile]: ...

    async def put_profile(self, profile: Profile, *, create: bool = False,
                          expect: Profile | None = None) -> None:
        """Insert or replace; with ``create=True`` Conflict if the name exists. With
        ``expect``, a compare-and-set as put_cluster's (check_unchanged, field ``profile``)."""

    async def delete_profile(self, name: str, *, expect: Profile | None = None,
                             unused: bool = False) -> None:
        """NotFound if absent. With ``expect`` (the profile as its deleter read it: the API's
        If-Match), a compare-and-set in the delete's transaction, as put_profile's
        (StateChanged, nothing deleted). With ``unused``, refused (:func:`in_use`, a
        Conflict naming the user) while a machine or a group names it, checked in the
        delete's transaction too: a machine given it by another writer after the deleter's
        own check is not left naming a profile that is gone."""

    async def get_cluster(self, name: str) -> Cluster | None: ...

    async def list_clusters(self) -> list[Cluster]: ...

    async def put_cluster(self, cluster: Cluster, *, create: bool = False,
                          expect: Cluster | None = None) -> None:
        """Insert or replace; with ``create=True`` Conflict if the name exists. With
        ``expect`` (the cluster as its writer read it), a compare-and-set: replaced only if
        the stored cluster is still that one, else StateChanged (field ``cluster``) and
        nothing written; a cluster has no version column, so the stored value itself, read
        and written in one transaction, is what is compared (two servers on one PostgreSQL
        giving an old cluster its agent token at once: one wins, the other reads it)."""

    async def delete_cluster(self, name: str, *, expect: Cluster | None = None,
                             unused: bool = False) -> None:
        """As delete_profile."""

    async def get_group(self, name: str) -> Group | None: ...

    async def list_groups(self) -> list[Group]: ...

    async def put_group(self, group: Group, *, create: bool = False,
                        expect: Group | None = None) -> None:
        """As put_profile (field ``group``)."""

    async def delete_group(self, name: str, *, expect: Group | None = None,
                           installs: InstallsSince | None = None) -> None:
        """As delete_profile (no user: a machine is selected by a group, never names one).
        ``installs``: the installs begun since the caller's look, checked in the delete's
        own transaction (InstallsSince)."""

    # events --------------------------------------------------------------------------
    async def add_event(self, event: Event) -> None: ...

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        """Oldest first; at most the newest ``limit`` events."""

    async def newest_events(self, machine_ids: Collection[str]) -> dict[str, Event]:
        """Each machine's newest event (what ``list_events(id, limit=1)`` holds), by machine
        id, for those that have one: one read for a batch of machines (netboot.recorder
        compares a storm's first notes with the store's history in one query per batch)."""

    async def prune_events(self, before: float, limit: int) -> int:
        """Drop the events recorded before ``before`` (the writer's clock) among the oldest
        ``limit`` (by insertion order); returns how many were dropped. Bounded work per call,
        so that a retention pass (netboot.retention) never holds the writer for long: a
        caller repeats it while it drops any."""

    async def events_since(self, after: int, *, limit: int = 1000) -> tuple[int, list[Event]]:
        """Events of every machine committed after position ``after`` (by any writer: this
        process, another server), in commit order, at most ``limit``; and the position to
        ask from next. ``after`` -1: the current position, no events (start following now).
        How another server's events reach this one's live stream (netboot.events.relay)."""

    # leases (authoritative DHCP mode) ------------------------------------------------
    async def list_leases(self) -> list[Lease]: ...

    async def lease_by_ip(self, ipv4: str) -> Lease | None:
        """The lease of this address (expired or not), None if there is none: one look-up by
        the address's unique index. U-Boot's ``pxelinux.cfg/<hex IP>`` and GRUB's
        ``grub.cfg-<hex IP>`` ask it per request, which any host can send (TFTP: a forged
        source too); read through :meth:`list_leases` each was a read of every lease (7 ms of
        CPU at 4,094 leases, 132 ms at 65,534: s37-attack)."""

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        """Insert or replace by MAC; Conflict if another MAC holds the address. With ``now``,
        a lease of another MAC that expired by then is replaced instead: one atomic claim
        (two servers claiming one address: one wins, the other gets Conflict). With
        ``ending``, that MAC's lease of this address ends in the same write: a machine's
        fixed address moved from one NIC to another (LeasePool.moved_from), held by one of
        them at every instant, never by neither."""

    async def delete_lease(self, mac: str) -> None:
        """No error if absent (a RELEASE for an unknown lease is harmless)."""

    # small key/value settings (admin token hash, schema facts, counters) -------------
    async def get_setting(self, key: str) -> str | None: ...

    async def put_setting(self, key: str, value: str) -> None: ...

    async def claim_setting(self, key: str, value: str, *, replace: str | None = None) -> str:
        """Set ``key`` to ``value`` only if it is unset, or (``replace``) holds exactly that
        value: one atomic step. Returns what the key holds afterwards, so the caller learns
        whether it won (``value``) or who did. Two servers claiming at once: one wins."""

    async def delete_setting(self, key: str) -> None:
        """No error if absent. A machine's refused claims (:data:`REFUSED_CLAIMS` + its id)
        go with it in :meth:`delete_machine`'s transaction, not by this."""

    async def seal_clear_tokens(self) -> int:
        """Seal the join tokens stored in clear (an older netboot's, a tool's) with this
        store's sealer; how many (0 for a store that keeps none in clear). Called at start-up
        once the sealer's key is in its file and claimed (service.open_inventory), not at
        open: sealed before, a kill between the two lost the key they were sealed with."""
        ...

    async def forget_stale_settings(self) -> int:
        """Drop the settings no one reads any more, in one transaction: the refused claims
        of machines that are gone (written by a server as another deleted the machine, or
        left by a netboot before s43-ops, whose deletes kept them) and
        :data:`STALE_SETTINGS`. How many went. A server's start-up pass."""

    # API tokens (only their sha256) and the audit log ----------------------------------
    async def create_token(self, token: ApiToken) -> None:
        """Conflict if the name (or, by a one-in-2^256 chance, the hash) is already used."""

    async def token_by_hash(self, sha256: str) -> ApiToken | None: ...

    async def list_tokens(self) -> list[ApiToken]:
        """Ordered by name."""

    async def delete_token(self, name: str) -> None:
        """NotFound if absent."""

    async def touch_token(self, name: str, when: float) -> None:
        """Set ``last_used``; no error if the token was revoked meanwhile."""

    async def add_audit(self, entry: AuditEntry) -> None: ...

    async def settle_audit(self, entry: AuditEntry, written: str, otherwise: str) -> None:
        """The one entry of a request whose change's outcome its answer could not tell:
        ``entry``, which the change's own transaction carried, gets the outcome ``written``
        if it is stored (the newest equal one); else an entry like it with ``otherwise`` is
        added."""

    async def list_audit(self, *, since: float | None = None,
                         limit: int = 1000) -> list[AuditEntry]:
        """Oldest first; at most the newest ``limit`` entries at or after ``since``."""

    async def prune_audit(self, keep: int) -> int:
        """Drop all but the newest ``keep`` entries; returns how many were dropped."""


class FixedLock:
    """Held by a write that sets a fixed_ipv4 (Enroller.fixed_lock) from its check that no
    other machine has it to its commit: this process's lock, then the inventory's where its
    store has one (PostgresStore.fixed_addresses_held, an advisory lock; SqliteStore's, an
    flock beside the file), so that the API's, CLI's and an import's check and write are one
    across the servers of one PostgreSQL or the processes on one file. Made with the
    enroller from its store, not swapped in by the wiring: a bare Enroller (a tool's import)
    held this process's lock alone."""

    def __init__(self, store: object) -> None:
        self._here = asyncio.Lock()
        self._across: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = (
            getattr(store, "fixed_addresses_held", None))
        self._held: list[contextlib.AbstractAsyncContextManager[None]] = []

    async def __aenter__(self) -> None:
        await self._here.acquire()  # one holder here at a time: _held has one entry
        if self._across is None:  # a store of this process alone (MemoryStore)
            return
        try:
            held = self._across()
            await held.__aenter__()
        except BaseException:
            self._here.release()
            raise
        self._held.append(held)

    async def __aexit__(self, *exc: Any) -> None:
        try:
            if self._held:
                await self._held.pop().__aexit__(*exc)
        finally:
            self._here.release()
