"""An in-memory view of what the boot path reads, kept exact by the store's change feed.

Why: a boot storm asks the same few questions for every device (which machine is this MAC,
which group, profile and cluster, which servers of the cluster are running), and each asked
the database — ~8 round trips to the store's thread per ``/ipxe``, one of them walking every
machine of a cluster. Here they are dictionary look-ups.

Exactness, not a TTL: :meth:`InventoryView.sync` asks the store's change feed what was
committed since the last sync (by this process, the CLI in another, another server) and
applies exactly that; a reader that syncs sees every commit made before it synced. One sync
serves every caller that arrived while it was under way only if it started after them:
concurrent requests share a round trip, none is answered from before its own arrival.

Filled eagerly by :meth:`InventoryView.load` (``netboot serve`` runs it in the background
once it is ready): every machine by every identifier, the groups, profiles and clusters, and
each cluster's registered servers; from then on a miss is an answer ("nobody's"), and the
boot path reads nothing from the store but the change feed. Until it is loaded (and in tools
that never load it) it is filled lazily: a miss reads the store once and remembers the
answer, a negative one too (unknown NICs ask on every DHCP retransmission); the misses of
every caller that asks while one such read is under way are the next read, one for all.

Memory, for 100,000 machines: the machines themselves (frozen, slotted values, shared with
the callers) and one dictionary per identifier kind whose keys are the machine's own objects
(a MAC by its 6 raw bytes): no copy of a machine, no per-machine list of its keys.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

from netboot.groups import machine_labels
from netboot.groups import select as select_group
from netboot.identity import UNSEEN, Unseen, clean_text, clean_uuid
from netboot.inventory import codec
from netboot.inventory.base import (
    DHCP_IN_USE,
    REFUSED_CLAIMS,
    SERVERS,
    Changes,
    GroupsKept,
    LocalCommits,
    MachineFilter,
    SettledFeed,
    Store,
    release_held_caches,
)
from netboot.model import (
    Cluster,
    Event,
    Group,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    equal,
)

# History the store may prune once the view is this far past it (other readers further
# behind re-read everything, which is correct, only slower).
_KEEP_CHANGES = 10_000
# Machines read from the store at a time while loading: one short read (~15 ms to decode on
# a quiet machine; SQLite reads pages on a thread of their own, PostgreSQL on one of its pool's
# connections), indexed by the event loop between two yields (~5-10 ms).
_LOAD_PAGE = 1_000

# How long the strings a text search made are kept for the next (InventoryView.matching_text).
_SEARCH_KEEP = 60.0

_V = TypeVar("_V")
_N = TypeVar("_N", Profile, Cluster, Group)

# An identifier as the view indexes it: a MAC by its raw bytes (the machine's own object),
# the other kinds by their text.
_Key = bytes | str


class InventoryView:
    def __init__(self, store: Store) -> None:
        # At most 29 instance attributes (29 now): from the 30th CPython 3.11 keeps them in
        # a dict of the object's own instead of its inline values, and every attribute read
        # of the view, the boot path's many included, costs ~27 instructions more (~10 %;
        # callgrind, benchmarks/README.md, s37-dhcp1st). Compiled (mypyc) it has no such
        # limit.
        self._store = store
        self._seq = -1
        self._syncing: asyncio.Future[None] | None = None
        # Syncs are numbered as they start; _finished is the number of the last one that
        # ended, applied or failed (one cancelled ends nothing: its waiters sync again). A
        # caller is served by a sync numbered above _started as it arrived: begun after it.
        self._started = 0
        self._finished = 0
        # Bumped by each applied sync: a store read that a sync overtook may hold a value
        # older than the view's, so it is answered but not remembered (where the view cannot
        # tell which keys the sync touched).
        self._applied = 0
        # For fresh(): the store's own write count and the time (time.monotonic) when the
        # last applied sync started (None: the store counts no writes, every reader syncs).
        # Not the loop's time: asyncio.get_running_loop() makes a getpid(2) system call in
        # Python 3.11's C code (a fork check), ~0.5 µs on this project's VM, and fresh() is
        # asked twice for every first DISCOVER of a storm (benchmarks/README.md, s37-dhcp1st).
        self._local = store if isinstance(store, LocalCommits) else None
        self._settled = store if isinstance(store, SettledFeed) else None
        self._synced: tuple[int, float] | None = None
        self._refresh: asyncio.Future[None] | None = None  # the background one fresh() began
        self._clears = 0  # bumped when everything is dropped (pruned history)
        # Bumped whenever anything a boot decision reads besides the machine itself may have
        # changed: a group, profile, cluster or setting, a cluster's registered servers, a
        # machine added or removed. A decision kept with this value and the machine object
        # (which the view replaces when its value changes) is the decision still.
        self.shared = 0
        # Bumped for the part of ``shared``'s causes that are rules, not machines: a group,
        # profile, cluster or setting. What a machine's first stage is decided from besides
        # the machine (its loader chain): machines added, removed or registered as servers
        # leave it (a storm's discovered records, an install wave's registrations).
        self.rules = 0
        # Bumped whenever what held() answers may change: a machine put or taken (even an
        # equal value's new object: callers compare identity), everything dropped, a load's
        # page or its end, an identifier read through as nobody's. A look-up answered from
        # memory while it had one value answers the same while it has it (a DHCP record made
        # from its decision's look-up, BootService._record_now).
        self.held_changes = 0
        self.loaded = False  # True: every machine is here, a miss is an answer
        # A load's feed position and what it puts in place, for the next sync to read the
        # feed from there and put it in place as it applies that read (load()).
        self._rewind: tuple[int, Callable[[], None]] | None = None
        # Identifiers to read through (the view not loaded), asked since the read under way
        # began: (kind, view key) -> the claim as the store takes it; the future the next
        # read answers them all by, and the task that reads (_read_asked).
        self._asked: dict[tuple[str, _Key], tuple[str, str]] = {}
        self._answer: asyncio.Future[dict[tuple[str, _Key], Machine | None]] | None = None
        self._asking: asyncio.Task[None] | None = None
        self._clear()

    def _clear(self) -> None:
        self._clears += 1
        self.held_changes += 1
        self.shared += 1
        self.rules += 1
        self.loaded = False
        self._machines: dict[str, Machine | None] = {}  # id -> machine (None: no such id)
        # kind -> identifier -> machine id (None: nobody's; only while not loaded); and
        # "fixed": a fixed_ipv4 -> the machine that has it (fixed_holder), not an identifier.
        self._keys: dict[str, dict[_Key, str | None]] = {k: {} for k in (*_KINDS, _FIXED)}
        self._profiles: dict[str, Profile] | None = None
        self._clusters: dict[str, Cluster] | None = None
        self._groups: dict[str, Group] | None = None
        self._group_list: list[Group] | None = None  # _groups by name, as the store lists them
        self._settings: dict[str, str | None] = {}
        # cluster -> its registered servers; while not loaded, only clusters asked about.
        self._servers: dict[str, dict[str, Machine]] = {}
        self._no_mac: set[str] | None = None  # ids of machines enrolled without a NIC
        # (cluster, state) -> how many of the machines held are in it (those with one or
        # more): only while loaded, when every machine is held.
        self._counts: dict[tuple[str | None, MachineState], int] | None = None

    # loading -----------------------------------------------------------------------------
    async def load(self) -> None:
        """Read the whole inventory into the view; afterwards nothing is read on a miss.

        Consistent without a lock on the store: the reads are taken after a feed position
        ``start``, and they are put in place by a sync that reads the feed from ``start``
        again, in the turn it applies that read, which applies again every change committed
        since (as it is now). Whatever the reads saw that changed later is replaced, whatever
        did not change they saw as it is.

        By pages in id order, not one listing: the store reads on one thread (SQLite) or a
        small pool (PostgreSQL), and a decision that read through to it while the view
        loaded waited behind the whole listing (3-10 s for 100,000 machines: a storm at
        start-up missed every DHCP deadline); now behind one page at most. A machine that
        exists throughout keeps its id, so it is in exactly one page; one created, changed
        or deleted meanwhile is in the feed after ``start``.

        Each page joins the view as it arrives, as a read through would (:meth:`_adopt`):
        a decision meanwhile finds the machines loaded so far without reading the store,
        exact as the lazily filled view is; only a miss is not an answer until the end.
        """
        while True:
            await self.sync()
            start, clears = self._seq, self._clears
            profiles = await self._store.list_profiles()
            clusters = await self._store.list_clusters()
            groups = await self._store.list_groups()
            reading = self._page("")
            try:
                while (page := await reading) and clears == self._clears:
                    reading = self._page(page[-1].id)  # read while this one is indexed
                    self._adopt(page)
                    del page
                    await asyncio.sleep(0)  # the event loop keeps serving meanwhile
            finally:
                reading.cancel()  # when cancelled meanwhile (else done: a no-op)
            while self._syncing is not None:  # no sync may finish over the rewind below
                await asyncio.shield(self._syncing)
            if clears != self._clears:
                continue  # history was pruned meanwhile: ``start`` means nothing now

            def install(start: int = start, profiles: list[Profile] = profiles,
                        clusters: list[Cluster] = clusters, groups: list[Group] = groups,
                        ) -> None:
                # Every machine is held now, as of ``start`` or later; what only a loaded
                # view keeps of all of them (every cluster's servers, the machines without a
                # NIC, the counts by cluster and state):
                servers: dict[str, dict[str, Machine]] = {}
                no_mac: set[str] = set()
                counts: dict[tuple[str | None, MachineState], int] = {}
                for machine in self._machines.values():
                    if machine is not None:
                        if machine.cluster is not None and _running_server(machine):
                            servers.setdefault(machine.cluster, {})[machine.id] = machine
                        if not machine.macs:
                            no_mac.add(machine.id)
                        pair = (machine.cluster, machine.state)
                        counts[pair] = counts.get(pair, 0) + 1
                self._servers, self._no_mac, self._counts = servers, no_mac, counts
                self._profiles = {p.name: p for p in profiles}
                self._clusters = {c.name: c for c in clusters}
                self._groups = {g.name: g for g in groups}
                self._group_list = None
                self._seq = start
                self.loaded = True
                self.held_changes += 1
                self._applied += 1
                self.shared += 1
                self.rules += 1

            # Put in place by the sync that reads the feed from ``start`` again, in the
            # same turn as it applies that read (catch_up), never before: the lists were
            # read as of ``start`` or later, and a sync meanwhile (a decision's) may have
            # moved the view past a profile, cluster or group change that the view, holding
            # none of them then, did not keep. Put in place before the read, they were what
            # the view answered without a sync while that read was under way: a first /ipxe
            # at start-up was held "no profile" for a profile committed before it (s36-flaky).
            self._rewind = (start, install)
            await self.catch_up()
            if self.loaded:
                # What the load's reads and the first sync's pruning of the feed left in the
                # store's caches (a first start after a bulk import: the writer's full
                # 2,000 KiB), then the C heap's free pages.
                await release_held_caches(self._store)
                return_freed_memory()
                return

    def _adopt(self, page: list[Machine]) -> None:
        """Machines read after the view's sync began, kept as :meth:`_keep_machine` keeps a
        read through: only those the view holds nothing of (one it holds was put by a sync
        or a read at least as new as the load's ``start``; a sync puts every machine it
        reports, so one that changed after this read is replaced by the next sync)."""
        held, keys, servers = self._machines, self._keys, self._servers
        self.held_changes += 1
        for machine in page:
            if machine.id not in held:
                held[machine.id] = machine
                _index(keys, servers, None, machine, all_clusters=False)
        # Another machine's decision may read these (a cluster's servers, who formed it).
        self.shared += 1

    def _page(self, after: str) -> asyncio.Future[list[Machine]]:
        reading = asyncio.ensure_future(self._store.machines_after(after, _LOAD_PAGE))
        reading.add_done_callback(_seen)
        return reading

    # syncing -----------------------------------------------------------------------------
    def current(self) -> bool:
        """Whether the view holds every change committed before this call, told without a
        wait: :meth:`sync`'s first step, which then has nothing to apply (True leaves the
        view as that sync would). False: call :meth:`sync`. Every boot decision asks this
        first, where the store can tell (SQLite's shared probe): no coroutine made for it."""
        if self._syncing is None and self._rewind is None and self._settled is not None \
                and self._settled.settled(self._seq):
            # Nothing committed since the last sync, by anyone (one read of the WAL index
            # in shared memory): nothing to apply, no round trip, no future to share.
            if self._local is not None:
                self._synced = (self._local.commits, time.monotonic())
            return True
        return False

    async def sync(self) -> None:
        """Apply every change committed before this call."""
        if not self.current():
            await self.catch_up()

    async def catch_up(self) -> None:
        """:meth:`sync` once :meth:`current` said False (its probe is not made again)."""
        wanted = self._started + 1  # a sync that starts from now on
        while self._finished < wanted:
            if self._syncing is None:
                self._started += 1
                number = self._started
                self._syncing = asyncio.get_running_loop().create_future()
                began = None if self._local is None else (self._local.commits, time.monotonic())
                rewind = self._rewind
                before = self._seq
                try:
                    changes = await self._store.changes_since(
                        self._seq if rewind is None else rewind[0])
                    if rewind is not None:
                        self._rewind = None
                        rewind[1]()  # a load's lists, as of its start: load()
                    self._apply(changes)
                    self._synced = began
                except asyncio.CancelledError:
                    # The caller that ran this sync was cancelled (its own deadline: a DHCP
                    # decision past its decide_timeout), not the callers waiting for it:
                    # they wake to find it unfinished and sync again. Handed to them, the
                    # cancellation ended each one's task as if it had been cancelled, and
                    # DHCP requests went unanswered with nothing logged (benchmarks/README.md,
                    # session 9). Nothing was applied: the read is done again.
                    self._syncing.set_result(None)
                    raise
                except BaseException as exc:
                    self._syncing.set_exception(exc)
                    self._syncing.exception()  # retrieved: the caller raises it
                    self._finished = number
                    raise
                else:
                    self._syncing.set_result(None)
                    self._finished = number
                finally:
                    self._syncing = None
                # The feed's older changes forgotten each time it passes a multiple of
                # _KEEP_CHANGES (the store keeps one to two times that many). Told by the
                # sync's own positions, not remembered in an attribute: at 30 instance
                # attributes CPython 3.11 keeps an object's attributes in a dict of its own
                # instead of its inline values, and each read of one took ~27 instructions
                # more (~1,000 a first DISCOVER's group commit; s37-dhcp1st).
                if self._seq > 2 * _KEEP_CHANGES \
                        and self._seq // _KEEP_CHANGES > before // _KEEP_CHANGES:
                    await self._store.forget_changes(self._seq - _KEEP_CHANGES)
            else:
                await asyncio.shield(self._syncing)

    async def wait(self, timeout: float) -> bool:
        """Until something is committed after what the view holds (PostgreSQL wakes it by
        NOTIFY; SQLite is polled), then sync; False if ``timeout`` passed without."""
        if not await self._store.wait_for_changes(self._seq, timeout):
            return False
        await self.sync()
        return True

    def fresh(self, max_age: float) -> bool:
        """Whether a reader may answer from the view without waiting for :meth:`sync`.

        True when the store's count of commits it knows of (base.LocalCommits) has not moved
        since the last sync began: nothing was written through this process's store, and on
        PostgreSQL no other session's commit was notified. When that sync began ``max_age``
        seconds ago or more, one is started in the background: what other processes commit
        is seen within about ``max_age`` where nothing notifies (SQLite, a PostgreSQL LISTEN
        connection that is down), within the notification's latency where it does. For paths
        that answer within milliseconds and are asked again on a timeout anyway, such as
        DHCP, where a round trip to the store per packet was most of the cost (on PostgreSQL,
        queued in the pool behind the storm's writes, past DHCP's deadline). False whenever
        unsure: the store counts no commits, or one was counted since."""
        if self._synced is None or self._local is None:
            return False
        commits, began = self._synced
        if commits != self._local.commits:
            return False
        if (self._refresh is None or self._refresh.done()) \
                and time.monotonic() - began >= max_age:
            self._refresh = asyncio.ensure_future(self.sync())
            self._refresh.add_done_callback(_seen)
        return True

    def _apply(self, changes: Changes) -> None:
        if not changes.complete:
            self._clear()
        for machine_id, machine in changes.machines.items():
            self._put_machine(machine_id, machine)
        if self._profiles is not None:
            for name, profile in changes.profiles.items():
                _set(self._profiles, name, profile)
        if self._clusters is not None:
            for name, cluster in changes.clusters.items():
                _set(self._clusters, name, cluster)
        if changes.groups:
            self._group_list = None
            if self._groups is not None:
                for name, group in changes.groups.items():
                    _set(self._groups, name, group)
        settings = changes.settings
        if settings and any(k.startswith(REFUSED_CLAIMS) or k in (SERVERS, DHCP_IN_USE)
                            for k in settings):
            # Machines' refused claims, the servers' record and the addresses in use: no
            # decision reads them (base.REFUSED_CLAIMS, base.SERVERS, base.DHCP_IN_USE); the
            # servers' record is kept for the service's watcher to read
            # (netboot.inventory.peers.Peers.heard), nothing remade.
            if SERVERS in settings:
                self._settings[SERVERS] = settings[SERVERS]
            settings = {k: v for k, v in settings.items()
                        if not k.startswith(REFUSED_CLAIMS) and k not in (SERVERS, DHCP_IN_USE)}
        self._settings.update(settings)
        if changes.profiles or changes.clusters or changes.groups or settings:
            self.shared += 1
            self.rules += 1
        self._seq = changes.seq
        self._applied += 1

    def adopt(self, machines: Iterable[Machine], read: Mapping[str, float]) -> None:
        """Machines this process has just committed: answered from now on, before the feed
        reports them (it then brings equal values, and the objects stay the same). The feed
        may have brought them first, read back while the commit returned: the committed
        object is kept all the same, which is the one its committer remembers
        (Recorder.note's version: an install asked again then reads no events back).

        ``read``: machine id -> the version (``updated``) each commit was made from, as its
        compare-and-set (Batch.versions) checked it. A sync in the moment between the commit
        and this call may have brought a version stored after it (another server's edit made
        on it): the commit passed its check, so nothing was stored between that read and
        the commit, and a held version that is neither came after both. It is kept: put
        over, it stayed for good, as the feed had reported that change already (s34-attack).
        A held version older than the read is replaced (a later sync would bring the
        commit anyway)."""
        held = self._machines
        for machine in machines:
            old = held.get(machine.id)
            if old is None or old is machine:
                self._put_machine(machine.id, machine)
            elif old.updated == machine.updated:
                if equal(old, machine):
                    held[machine.id] = machine  # the same value: its index entries stay
                    self.held_changes += 1
                else:
                    self._put_machine(machine.id, machine)
            elif old.updated == read.get(machine.id, old.updated):
                self._put_machine(machine.id, machine)

    def _put_machine(self, machine_id: str, machine: Machine | None) -> None:
        old = self._machines.get(machine_id)
        if old is not None and (machine is old or (
                machine is not None and machine.updated == old.updated and equal(machine, old))):
            # The same value: keep the object (callers may compare identity). Another
            # ``updated`` is another value, told without comparing every field.
            return
        self.held_changes += 1
        if self._counts is not None:
            _recount(self._counts, old, machine)
        if old is not None:
            # _same_entries, then _entries_added, asked in one go: the NICs and the running
            # servers compared once (each first sighting of a storm's group commit comes
            # here: s39-sighting).
            # The fixed_ipv4 is an index entry too (the pool's reserved addresses, _FIXED:
            # s39-pool): one changed takes the whole walk, one set where none was is added.
            fixed = old.fixed_ipv4
            if machine is not None and machine.macs == old.macs \
                    and (fixed is None or machine.fixed_ipv4 == fixed) \
                    and not _running_server(old) and not _running_server(machine):
                uuid, serial, asset = old.uuid, old.serial, old.asset
                if machine.uuid == uuid and machine.serial == serial \
                        and machine.asset == asset and machine.fixed_ipv4 == fixed:
                    # What no index holds changed (an install's state, token and facts; a
                    # report's step): the object replaced, its index entries left as they
                    # are.
                    self._machines[machine_id] = machine
                    return
                if (uuid is None or machine.uuid == uuid) \
                        and (serial is None or machine.serial == serial) \
                        and (asset is None or machine.asset == asset):
                    # Identifiers only added (a first DHCP sighting's UUID from option 97):
                    # every entry of the old one is the new one's too, so only the added
                    # ones are indexed: the same MACs, fixed address, servers and no-MAC
                    # set as the old one's (the tests above), whose entries stay. Not
                    # _index of the whole machine (its MACs keyed again, each identifier
                    # cleaned again): ~4,000 of the event loop's instructions a first
                    # DHCP sighting adopted after its group commit (benchmarks/README.md,
                    # s45-sighting; s36-dhcp1st for the walk of removing the old first).
                    self._machines[machine_id] = machine
                    keys = self._keys
                    if uuid is None and (key := _identifier_key(machine.uuid,
                                                                clean_uuid)) is not None:
                        keys["uuid"][key] = machine_id
                    if serial is None and (key := _identifier_key(machine.serial,
                                                                  clean_text)) is not None:
                        keys["serial"][key] = machine_id
                    if asset is None and (key := _identifier_key(machine.asset,
                                                                 clean_text)) is not None:
                        keys["asset"][key] = machine_id
                    if fixed is None and machine.fixed_ipv4 is not None:
                        keys[_FIXED][machine.fixed_ipv4] = machine_id
                    return
            _unindex(self._keys, self._servers, self._no_mac, machine_id, old)
        if old is None or machine is None or _running_server(old) or _running_server(machine):
            # Another machine's decision may read this one: as a cluster's server (its join
            # endpoint), or by its existence (the node that formed a cluster).
            self.shared += 1
        if machine is None and self.loaded:
            self._machines.pop(machine_id, None)
            return
        self._machines[machine_id] = machine
        if machine is not None:
            _index(self._keys, self._servers, self._no_mac, machine,
                   all_clusters=self.loaded)

    # reads -------------------------------------------------------------------------------
    async def _read_through(self, read: Awaitable[_V], keep: Callable[[_V], object], *,
                            exact: bool = False) -> _V:
        """Read the store; remember the answer unless it may be older than the view: when
        everything was dropped meanwhile, or (unless ``keep`` itself tells, ``exact``) when
        a sync was applied meanwhile."""
        applied, clears = self._applied, self._clears
        value = await read
        if clears == self._clears and (exact or applied == self._applied):
            keep(value)
        return value

    def _keep_machine(self, machine_id: str, machine: Machine | None) -> None:
        # A sync puts every machine it reports, known here or not: one present now was
        # reported after this read began, and is at least as new.
        if machine_id not in self._machines:
            self._put_machine(machine_id, machine)

    def held_machine(self, machine_id: str) -> Machine | Unseen | None:
        """What :meth:`get_machine` answers when it answers without waiting; :data:`UNSEEN`
        where only the store can tell."""
        if machine_id in self._machines:
            return self._machines[machine_id]
        return None if self.loaded else UNSEEN

    async def get_machine(self, machine_id: str) -> Machine | None:
        held = self.held_machine(machine_id)
        if not isinstance(held, Unseen):
            return held
        return await self._read_through(self._store.get_machine(machine_id),
                                        lambda m: self._keep_machine(machine_id, m), exact=True)

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        index = self._keys[kind]
        key = _key_of(kind, value, index)
        if key in index:
            machine_id = index[key]
            return None if machine_id is None else self._machines.get(machine_id)
        if self.loaded:
            return None
        return (await self._read_claims([(kind, key, value)]))[0]

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        """:meth:`machine_by` of each claim (:meth:`Store.machines_by`): what the view holds
        from memory, the rest in one store read, shared with every other caller's."""
        out: list[Machine | None] = []
        unseen: list[tuple[str, _Key, str]] = []
        where: list[int] = []
        keys, machines = self._keys, self._machines
        for kind, value in claims:
            index = keys[kind]
            key = _key_of(kind, value, index)
            if key in index:
                machine_id = index[key]
                out.append(None if machine_id is None else machines.get(machine_id))
            else:
                if not self.loaded:
                    where.append(len(out))
                    unseen.append((kind, key, value))
                out.append(None)
        if unseen:
            for i, machine in zip(where, await self._read_claims(unseen), strict=True):
                out[i] = machine
        return out

    async def _read_claims(self, claims: list[tuple[str, _Key, str]]) -> list[Machine | None]:
        """Identifiers the view cannot answer (not loaded), read through: asked together with
        every other caller's that come before the next read begins, and answered by it: one
        store read for a storm's many devices at start-up, where a read for each identifier
        of each device queued on the store's one thread, and the decisions waiting for them
        piled past DHCP's bound (benchmarks/README.md, s18-dhcpstart). Each caller is answered
        by a read begun after it asked, as a read of its own would be."""
        asked = self._asked
        for kind, key, value in claims:
            asked[kind, key] = (kind, value)
        answer = self._answer
        if answer is None:
            answer = self._answer = asyncio.get_running_loop().create_future()
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._read_asked())
        # Shielded: a caller past its own deadline (a DHCP decision's) leaves the read to
        # the others, as sync() does.
        found = await asyncio.shield(answer)
        return [found[kind, key] for kind, key, _ in claims]

    async def _read_asked(self) -> None:
        """While identifiers are asked: one store read of all those asked since the last
        began, its answers remembered (as :meth:`_keep_machine` keeps a read through) and
        handed to their callers."""
        try:
            while self._asked:
                asked, self._asked = self._asked, {}
                answer, self._answer = self._answer, None
                assert answer is not None
                clears = self._clears
                try:
                    found = await self._store.machines_by(list(asked.values()))
                except Exception as exc:
                    answer.set_exception(exc)
                    answer.exception()  # retrieved: each caller raises it
                    continue
                except BaseException:
                    answer.cancel()
                    raise
                if clears == self._clears and not self.loaded:
                    # Loaded meanwhile, the view holds what this read saw or newer.
                    keys = self._keys
                    self.held_changes += 1
                    for (kind, key), machine in zip(asked, found, strict=True):
                        if machine is not None:
                            self._keep_machine(machine.id, machine)
                        elif key not in keys[kind]:  # else a sync gave it to one meanwhile
                            keys[kind][key] = None
                answer.set_result(dict(zip(asked, found, strict=True)))
        finally:
            self._asking = None
            if self._answer is not None and self._asked:  # cancelled (the loop stopping)
                self._answer.cancel()
                self._answer, self._asked = None, {}

    def held(self, kind: str, key: _Key) -> Machine | Unseen | None:
        """What :meth:`machine_by` answers for ``key`` (as :meth:`Identity.lookup_keys`
        gives it: a MAC by its raw bytes) when it answers without waiting; :data:`UNSEEN`
        where only the store can tell (a view not loaded that never saw the key). The boot path's
        look-up (:func:`netboot.identity.lookup`: identity.HeldIndex) and checks repeated
        per datagram (the DHCP answer cache: BootService.repeat_guard)."""
        index = self._keys[kind]
        if key in index:
            machine_id = index[key]
            return None if machine_id is None else self._machines.get(machine_id)
        return None if self.loaded else UNSEEN

    def fixed_holder(self, ipv4: str) -> str | None:
        """The id of the machine whose ``fixed_ipv4`` is ``ipv4`` (canonical text), or None:
        one dictionary look-up, kept exact with the machines (_index, _unindex), so that the
        authoritative pool never leases one machine's fixed address to another (LeasePool,
        ``reserved_fixed``). Only the machines held: before the view is loaded (the first
        seconds after start), one not read yet is not known here."""
        return self._keys[_FIXED].get(ipv4)

    def matching_text(self, text: str, kept: SearchKept, most: int | None = None
                      ) -> set[str] | None:
        """The ids of the machines whose hostname, id, or any MAC, UUID, serial or asset tag
        (as the stores index them: netboot.identity.claims) holds ``text``
        case-insensitively (:class:`MachineFilter`'s ``text``), from memory; None while the
        view is not loaded (only the store can tell), or when more than ``most`` match
        (found so far: the search stops there). Call after a sync.

        Why: the stores answer ``text`` by reading every machine (SQLite ~0.8-1.1 s a query
        with 100,000: benchmarks/README.md s37-ops). Here every machine's fields are joined,
        a kind at a time, into one lowered string searched by ``str.find`` in C. Making those
        strings walks 100,000 scattered objects (~100-150 ms); searching them takes a few ms.
        So they are kept (~14 MiB for 100,000) in ``kept`` for the searches that follow (a
        dashboard's search box asks as the operator types), until the first machine changes
        (``held_changes`` moves) or ``_SEARCH_KEEP`` seconds pass: in a storm each search
        makes them again, and a quiet server does not hold them past a minute. ``kept`` is
        the caller's, not an attribute of the view: a 30th attribute moves CPython 3.11's
        instance values to a dict and costs every attribute read on the boot path
        (s37-dhcp1st)."""
        if not self.loaded:
            return None
        needle = text.lower()
        if not needle:
            return set(self._machines)
        held = kept.held
        if held is None or kept.at != self.held_changes:
            held = kept.held = _SearchText(self._machines, self._keys)
            kept.at = self.held_changes
            asyncio.get_running_loop().call_later(_SEARCH_KEEP, kept.drop, held)
        return held.find(needle, most)

    async def count_machines_without_nic(self) -> int:
        if self._no_mac is None:
            found = await self._read_through(
                self._store.list_machines(MachineFilter(has_mac=False, limit=1 << 30)),
                lambda ms: setattr(self, "_no_mac", {m.id for m in ms}))
            return len(found)
        return len(self._no_mac)

    async def state_counts(self) -> dict[tuple[str | None, MachineState], int]:
        """:meth:`Store.state_counts`, from memory once loaded (after a sync: exact as of
        the call, other processes' commits included); until then, the store's grouped read.
        The metrics scrape and the fleet status ask it: no index holds the state
        (sqlite.py, migration 7), the store answers it by reading every machine."""
        if self.loaded:
            await self.sync()
            counts = self._counts
            if self.loaded and counts is not None:  # else the sync dropped everything
                return dict(counts)
        return await self._store.state_counts()

    async def group_counts(self, kept: GroupsKept) -> dict[tuple[str, MachineState], int] | None:
        """Machines without a cluster of their own that a group puts in one, by that
        cluster and their state (:func:`netboot.enroll.fleet_status`): from memory once
        loaded (after a sync), None until then (the caller reads the store). A selector
        matches facts no index holds, so the store's answer is a read of every machine
        (100,000 at fleet scale, per ``GET /api/v1/status``: benchmarks/README.md,
        s37-polish). ``kept`` (the caller's) remembers each machine object with its pair: a
        machine is selected again only when the view holds another object for it (it
        replaces one whose value changed), every one when the rules changed. Nothing is
        added to the view or to its writes: an attribute more on the view slowed every
        ``_put_machine`` by 326 instructions (CPython 3.11 shares an instance dict's keys up
        to 30 names; callgrind)."""
        if not self.loaded:
            return None
        await self.sync()
        listed = self.held_settings()
        if not self.loaded or listed is None:
            return None
        groups, seen, counts = listed[0], kept.seen, kept.counts
        if kept.rules != self.rules:
            seen.clear()
            counts.clear()
            kept.rules = self.rules
        live = 0
        for machine_id, machine in self._machines.items():
            if machine is None or machine.cluster:
                continue
            live += 1
            old = seen.get(machine_id)
            if old is not None and old[0] is machine:
                continue
            if old is not None and old[1] is not None:
                _uncount(counts, old[1])
            # A discovered machine is in no group's cluster (enroll.fleet_status' cluster_of).
            group = None if machine.state is MachineState.DISCOVERED else \
                select_group(groups, machine_labels(machine))
            pair = (group.cluster, machine.state) if group is not None and group.cluster \
                else None
            seen[machine_id] = (machine, pair)
            if pair is not None:
                counts[pair] = counts.get(pair, 0) + 1
        if len(seen) > live:  # machines deleted, or given a cluster of their own, since
            for machine_id in [i for i, (m, _) in seen.items()
                               if (held := self._machines.get(i)) is None or held.cluster]:
                pair = seen.pop(machine_id)[1]
                if pair is not None:
                    _uncount(counts, pair)
        return dict(counts)

    async def registered_servers(self, cluster: str) -> list[Machine]:
        """The cluster's registered server nodes, in the store's machine order (by MAC)."""
        held = self.held_servers(cluster)
        if not isinstance(held, Unseen):
            return held
        found = await self._store_servers(cluster)
        return _by_mac({m.id: m for m in found})

    def held_machines(self) -> Iterator[Machine] | None:
        """Every machine, from memory once loaded (None until then): start-up's scans of
        the whole fleet read no store (service: the older register commands). Handed one
        at a time, to be read before the loop's next turn: a list of the fleet (100,000
        references, made after the load's malloc_trim) left 2.3 MiB more resident for the
        server's life (benchmarks/README.md, s42-tail). A generator function, not a
        generator expression: mypyc builds a generator expression's list whole."""
        if not self.loaded:
            return None
        return _each_held(self._machines)

    def held_servers(self, cluster: str) -> list[Machine] | Unseen:
        """What :meth:`registered_servers` answers when it answers without waiting;
        :data:`UNSEEN` where only the store can tell."""
        servers = self._servers.get(cluster)
        if servers is None:
            return [] if self.loaded else UNSEEN
        return _by_mac(servers)

    def held_settings(self) -> tuple[list[Group], dict[str, Profile], dict[str, Cluster]] | None:
        """The groups (by name, as :meth:`list_groups`; not to be changed), profiles and
        clusters by name, when the view holds all three (a boot decision reads them without
        a coroutine made and run per read); None when one must be read first (the async
        getters read it)."""
        groups, profiles, clusters = self._groups, self._profiles, self._clusters
        if groups is None or profiles is None or clusters is None:
            return None
        if self._group_list is None:
            self._group_list = _groups_in_order(groups)
        return self._group_list, profiles, clusters

    def held_setting(self, key: str) -> str | Unseen | None:
        """What :meth:`get_setting` answers when it answers without waiting; :data:`UNSEEN`
        where only the store can tell."""
        return self._settings.get(key, UNSEEN)

    async def _store_servers(self, cluster: str) -> list[Machine]:
        async def read() -> list[Machine]:
            return [m for m in await self._store.list_machines(MachineFilter(
                cluster=cluster, state=MachineState.REGISTERED, limit=1 << 30))
                if _running_server(m)]

        return await self._read_through(read(), lambda ms: self._servers.__setitem__(
            cluster, {m.id: m for m in ms}))

    async def list_groups(self) -> list[Group]:
        if self._group_list is None:
            self._group_list = _groups_in_order(await self._all_groups())
        return list(self._group_list)

    async def _all_groups(self) -> dict[str, Group]:
        if self._groups is None:
            return await self._read_through(self._by_name(self._store.list_groups()),
                                            lambda gs: setattr(self, "_groups", gs))
        return self._groups

    async def list_profiles(self) -> list[Profile]:
        return sorted((await self._all_profiles()).values(), key=lambda p: p.name)

    async def get_profile(self, name: str) -> Profile | None:
        return (await self._all_profiles()).get(name)

    async def _all_profiles(self) -> dict[str, Profile]:
        if self._profiles is None:
            return await self._read_through(self._by_name(self._store.list_profiles()),
                                            lambda ps: setattr(self, "_profiles", ps))
        return self._profiles

    async def list_clusters(self) -> list[Cluster]:
        return sorted((await self._all_clusters()).values(), key=lambda c: c.name)

    async def get_cluster(self, name: str) -> Cluster | None:
        return (await self._all_clusters()).get(name)

    async def _all_clusters(self) -> dict[str, Cluster]:
        if self._clusters is None:
            return await self._read_through(self._by_name(self._store.list_clusters()),
                                            lambda cs: setattr(self, "_clusters", cs))
        return self._clusters

    @staticmethod
    async def _by_name(read: Awaitable[list[_N]]) -> dict[str, _N]:
        return {item.name: item for item in await read}

    async def get_setting(self, key: str) -> str | None:
        held = self.held_setting(key)
        if not isinstance(held, Unseen):
            return held

        def keep(value: str | None) -> None:
            # A sync sets every setting it reports: one present now is at least as new.
            self._settings.setdefault(key, value)

        return await self._read_through(self._store.get_setting(key), keep, exact=True)

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        return await self._store.list_events(machine_id, limit=limit)


def _uncount(counts: dict[tuple[str, MachineState], int],
             pair: tuple[str, MachineState]) -> None:
    if left := counts[pair] - 1:
        counts[pair] = left
    else:
        del counts[pair]


def _key_of(kind: str, value: str, index: dict[_Key, str | None]) -> _Key:
    """The key of identifier ``kind`` = ``value`` in the view's ``index`` of that kind."""
    if kind == "mac":
        return _raw_mac(value)
    if value in index:
        # Found as given, a key is in its canonical spelling (what identity lookups pass,
        # e.g. clean_uuid): normalising is idempotent, so no need to (perfudp).
        return value
    return codec.claim_key(kind, value)[1]


def _raw_mac(text: str) -> bytes:
    """``MacAddress.parse(text).raw``; the canonical spelling (what identity claims pass,
    ``str(MacAddress)``) without building a MacAddress on every DHCP request of a storm.
    Anything else is parsed, and refused, by MacAddress.parse."""
    if len(text) == 17 and text[2::3] == ":::::":
        try:
            raw = bytes.fromhex(text.replace(":", ""))
        except ValueError:
            pass
        else:
            if len(raw) == 6:
                return raw
    return MacAddress.parse(text).raw


def _each_held(machines: dict[str, Machine | None]) -> Iterator[Machine]:
    """The machines of ``machines`` (InventoryView._machines), one at a time."""
    for machine in machines.values():
        if machine is not None:
            yield machine


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system after a load.

    Reading 100,000 machines leaves ~11 MiB resident that nothing uses any more: the rows'
    text and the list the store's thread built (C ``malloc``, not Python's small-object
    arenas, which return empty arenas themselves), freed, but held by glibc below live
    blocks. ``malloc_trim`` releases them (every thread's arena, glibc >= 2.8); elsewhere
    (musl, macOS) there is no such call and nothing is done. ``serve`` calls it again after
    each boot storm (service.release_when_quiet).
    """
    # Imported here: only a loaded view needs it, after start-up.
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)


def _seen(done: asyncio.Future[Any]) -> None:
    # A failed background sync or a page of a load abandoned: the next reader's own sync
    # (the load itself) meets the error and reports it; here it only must not be logged as
    # never retrieved.
    if not done.cancelled():
        done.exception()


_KINDS = ("mac", "uuid", "serial", "asset")
_FIXED = "fixed"  # fixed_ipv4 -> machine id, in _keys beside the identifiers (fixed_holder)


def _keys_of(machine: Machine) -> list[tuple[str, _Key]]:
    """What :func:`netboot.identity.claims` gives, as the view keys it: a MAC by its raw
    bytes, the other kinds by the machine's own string where it is the canonical one (one
    copy in memory). Written out, not through ``claims``: loading 100,000 machines built an
    ``Identity`` and a text form of every MAC only to drop them (a third of the indexing);
    tests/inventory/test_view.py holds both to the same answers."""
    macs = machine.macs
    out: list[tuple[str, _Key]] = [("mac", macs[0].raw)] if len(macs) == 1 else [
        ("mac", mac.raw) for mac in macs]
    if (key := _identifier_key(machine.uuid, clean_uuid)) is not None:
        out.append(("uuid", key))
    if (key := _identifier_key(machine.serial, clean_text)) is not None:
        out.append(("serial", key))
    if (key := _identifier_key(machine.asset, clean_text)) is not None:
        out.append(("asset", key))
    return out


def _identifier_key(text: str | None, clean: Callable[[str], str | None]) -> str | None:
    """How the view keys a UUID, serial or asset tag (None: not one): its cleaned form, the
    machine's own string where that is already it (one copy in memory)."""
    if text is None:
        return None
    value = clean(text)
    if not value:
        return None
    return text if value == text else value


def _joined(values: list[str]) -> str:
    """``values`` lowered, a line each."""
    hay = "\n".join(values).lower()
    if hay.count("\n") != max(len(values) - 1, 0):
        # A value with a newline (none should: identifiers and hostnames are checked
        # text), which would shift the lines after it: a space in its place.
        hay = "\n".join(v.replace("\n", " ") for v in values).lower()
    return hay


class SearchKept:
    """What :meth:`InventoryView.matching_text` made for a search, kept by its caller for
    the next: the strings searched and the view's ``held_changes`` they were made at."""

    __slots__ = ("at", "held")

    def __init__(self) -> None:
        self.held: _SearchText | None = None
        self.at = -1

    def drop(self, held: _SearchText) -> None:
        """Forget ``held`` (``_SEARCH_KEEP`` after it was made) unless newer ones replaced it."""
        if self.held is held:
            self.held = None


class _SearchText:
    """What :meth:`InventoryView.matching_text` searches: per kind of field, every
    machine's value lowered and joined by newlines (``lines``: the text, the owner of each
    line), and every MAC in its text form (``macs``)."""

    __slots__ = ("lines", "mac_owners", "macs")

    def __init__(self, machines: dict[str, Machine | None],
                 keys: dict[str, dict[_Key, str | None]]) -> None:
        ids: list[str | None] = list(machines)  # loaded: no None values (deleted: popped)
        hostnames = [m.hostname or "" if m is not None else "" for m in machines.values()]
        columns: list[tuple[list[str], list[str | None]]] = [
            (list(machines), ids), (hostnames, ids),
            *((cast("list[str]", list(keys[kind])), list(keys[kind].values()))
              for kind in ("uuid", "serial", "asset"))]
        self.lines = [(_joined(values), owners) for values, owners in columns]
        # 6 raw bytes a MAC (MacAddress), 18 characters each as "aa:bb:cc:dd:ee:ff:".
        self.macs = b"".join(cast("dict[bytes, str | None]", keys["mac"])).hex(":")
        self.mac_owners = list(keys["mac"].values())

    def find(self, needle: str, most: int | None = None) -> set[str] | None:
        """The owners of every line and MAC holding ``needle``; None past ``most`` of them
        (checked a line at a time: a search naming the whole fleet stops early)."""
        found: set[str] = set()
        cap = -1 if most is None else most
        if "\n" not in needle:
            for hay, owners in self.lines:
                at = hay.find(needle)
                line, counted = 0, 0
                while at >= 0:
                    line += hay.count("\n", counted, at)
                    owner = owners[line]
                    if owner is not None:
                        found.add(owner)
                        if len(found) == cap + 1:
                            return None
                    end = hay.find("\n", at)
                    if end < 0:
                        break
                    counted, line = end + 1, line + 1
                    at = hay.find(needle, counted)
        hay, owners = self.macs, self.mac_owners
        at, width = hay.find(needle), len(needle)
        while at >= 0:
            row, col = divmod(at, 18)
            if col + width <= 17:  # inside one MAC, not across two
                owner = owners[row]
                if owner is not None:
                    found.add(owner)
                    if len(found) == cap + 1:
                        return None
                at = hay.find(needle, (row + 1) * 18)
            else:
                at = hay.find(needle, at + 1)
        return found


def _index(keys: dict[str, dict[_Key, str | None]], servers: dict[str, dict[str, Machine]],
           no_mac: set[str] | None, machine: Machine, *, all_clusters: bool = True) -> None:
    ident = machine.id
    for kind, key in _keys_of(machine):
        keys[kind][key] = ident
    if machine.fixed_ipv4 is not None:
        keys[_FIXED][machine.fixed_ipv4] = ident
    cluster = machine.cluster
    if cluster is not None and _running_server(machine):
        held = servers.get(cluster)
        if held is None and all_clusters:
            held = servers[cluster] = {}
        if held is not None:
            held[ident] = machine
    if no_mac is not None and not machine.macs:
        no_mac.add(ident)


def _unindex(keys: dict[str, dict[_Key, str | None]], servers: dict[str, dict[str, Machine]],
             no_mac: set[str] | None, machine_id: str, machine: Machine) -> None:
    for kind, key in _keys_of(machine):
        index = keys[kind]
        if index.get(key) == machine_id:  # else another machine holds it now
            del index[key]
    if machine.fixed_ipv4 is not None and keys[_FIXED].get(machine.fixed_ipv4) == machine_id:
        del keys[_FIXED][machine.fixed_ipv4]
    if machine.cluster is not None:
        held = servers.get(machine.cluster)
        if held is not None:
            held.pop(machine_id, None)
    if no_mac is not None:
        no_mac.discard(machine_id)


def _recount(counts: dict[tuple[str | None, MachineState], int], old: Machine | None,
             new: Machine | None) -> None:
    """Move a machine from its old (cluster, state) count to its new one."""
    if old is not None:
        if new is not None and new.state == old.state and new.cluster == old.cluster:
            return
        pair = (old.cluster, old.state)
        left = counts[pair] - 1
        if left:
            counts[pair] = left
        else:
            del counts[pair]
    if new is not None:
        pair = (new.cluster, new.state)
        counts[pair] = counts.get(pair, 0) + 1


def _running_server(machine: Machine) -> bool:
    return machine.state == _REGISTERED and machine.role == _SERVER


# Looked up once: Python 3.11 finds an enum member through EnumType's __getattr__ hook at
# each use, ~870 instructions, and every machine written asks _running_server twice.
_REGISTERED = MachineState.REGISTERED
_SERVER = Role.SERVER


def _set(held: dict[str, _V], name: str, value: _V | None) -> None:
    if value is None:
        held.pop(name, None)
    else:
        held[name] = value


def _by_mac(servers: dict[str, Machine]) -> list[Machine]:
    """Machines in the store's machine order (by MAC; those without one last, by id)."""
    return sorted(servers.values(),
                  key=lambda m: (m.mac is None, str(m.mac) if m.mac else "", m.id))


def _groups_in_order(groups: dict[str, Group]) -> list[Group]:
    """Groups in :meth:`InventoryView.list_groups`' order: by name."""
    return sorted(groups.values(), key=lambda g: g.name)
