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

Filled lazily, so that ``serve`` is ready at once and holds only the machines that booted:
a miss reads the store once and remembers the answer, a negative one too (unknown NICs ask
on every DHCP retransmission). Reads the view does not cover go to the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory.base import Changes, LocalCommits, MachineFilter, Store
from netboot.model import Cluster, Event, Group, Machine, MachineState, Profile, Role

# History the store may prune once the view is this far past it (other readers further
# behind re-read everything, which is correct, only slower).
_KEEP_CHANGES = 10_000

_V = TypeVar("_V")
_N = TypeVar("_N", Profile, Cluster)


class InventoryView:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._seq = -1
        self._pruned = 0
        self._syncing: asyncio.Future[None] | None = None
        self._started = 0  # syncs started / finished, to tell a sync begun after a caller
        self._finished = 0
        # Bumped by each applied sync: a store read that a sync overtook may hold a value
        # older than the view's, so it is answered but not remembered.
        self._applied = 0
        # For fresh(): the store's own write count and the loop time when the last applied
        # sync started (None: the store counts no writes, every reader syncs).
        self._local = store if isinstance(store, LocalCommits) else None
        self._synced: tuple[int, float] | None = None
        self._refresh: asyncio.Future[None] | None = None  # the background one fresh() began
        self._clear()

    def _clear(self) -> None:
        self._machines: dict[str, Machine | None] = {}  # id -> machine (None: no such id)
        self._keys: dict[tuple[str, str], str | None] = {}  # claim -> id (None: nobody's)
        self._claims: dict[str, list[tuple[str, str]]] = {}  # id -> its claims known here
        self._profiles: dict[str, Profile] | None = None
        self._clusters: dict[str, Cluster] | None = None
        self._groups: list[Group] | None = None
        self._settings: dict[str, str | None] = {}
        self._servers: dict[str, dict[str, Machine]] = {}  # cluster -> registered servers
        self._no_mac: set[str] | None = None  # ids of machines enrolled without a NIC

    # syncing -----------------------------------------------------------------------------
    async def sync(self) -> None:
        """Apply every change committed before this call."""
        wanted = self._started + 1  # a sync that starts from now on
        while self._finished < wanted:
            if self._syncing is None:
                self._started += 1
                loop = asyncio.get_running_loop()
                self._syncing = loop.create_future()
                began = None if self._local is None else (self._local.commits, loop.time())
                try:
                    self._apply(await self._store.changes_since(self._seq))
                    self._synced = began
                except BaseException as exc:
                    self._syncing.set_exception(exc)
                    self._syncing.exception()  # retrieved: the caller raises it
                    raise
                else:
                    self._syncing.set_result(None)
                finally:
                    self._syncing = None
                    self._finished += 1
                if self._seq - self._pruned > 2 * _KEEP_CHANGES:
                    self._pruned = self._seq - _KEEP_CHANGES
                    await self._store.forget_changes(self._pruned)
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

        True when nothing was written through this process's store since the last sync
        began; when that sync began ``max_age`` seconds ago or more, one is started in the
        background (what other processes commit is seen within about ``max_age``). For paths
        that answer within milliseconds and are asked again on a timeout anyway, such as
        DHCP, where a round trip to the store per packet was most of the cost. False
        whenever unsure: the store counts no writes, or this process wrote since."""
        if self._synced is None or self._local is None:
            return False
        commits, began = self._synced
        if commits != self._local.commits:
            return False
        if (self._refresh is None or self._refresh.done()) \
                and asyncio.get_running_loop().time() - began >= max_age:
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
            self._groups = None  # few, and their order matters: read again when asked
        self._settings.update(changes.settings)
        self._seq = changes.seq
        self._applied += 1

    def _put_machine(self, machine_id: str, machine: Machine | None) -> None:
        for claim in self._claims.pop(machine_id, ()):
            self._keys.pop(claim, None)
        for servers in self._servers.values():
            servers.pop(machine_id, None)
        if self._no_mac is not None:
            self._no_mac.discard(machine_id)
        self._machines[machine_id] = machine
        if machine is None:
            return
        own = claims(machine)
        self._claims[machine_id] = own
        for claim in own:
            self._keys[claim] = machine_id
        if machine.cluster in self._servers and _running_server(machine):
            self._servers[machine.cluster][machine_id] = machine
        if self._no_mac is not None and not machine.macs:
            self._no_mac.add(machine_id)

    # reads -------------------------------------------------------------------------------
    async def _read_through(self, read: Awaitable[_V], keep: Callable[[_V], object]) -> _V:
        """Read the store; remember the answer unless a sync was applied meanwhile (the read
        may then be older than the view: answered, not kept)."""
        applied = self._applied
        value = await read
        if applied == self._applied:
            keep(value)
        return value

    async def get_machine(self, machine_id: str) -> Machine | None:
        if machine_id in self._machines:
            return self._machines[machine_id]
        return await self._read_through(self._store.get_machine(machine_id),
                                        lambda m: self._put_machine(machine_id, m))

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        # Keys are held in their canonical spelling, which is what identity lookups pass
        # (str(MacAddress), clean_uuid): found as given, they need no normalising (a tenth
        # of a DHCP decision). Normalising is idempotent, so this answers as the slow path.
        key = (kind, value)
        if key not in self._keys:
            key = codec.claim_key(kind, value)
        if key in self._keys:
            machine_id = self._keys[key]
            return None if machine_id is None else self._machines.get(machine_id)

        def keep(machine: Machine | None) -> None:
            if machine is None:
                self._keys[key] = None
            else:
                self._put_machine(machine.id, machine)

        return await self._read_through(self._store.machine_by(kind, value), keep)

    async def count_machines_without_nic(self) -> int:
        if self._no_mac is None:
            found = await self._read_through(
                self._store.list_machines(MachineFilter(has_mac=False, limit=1 << 30)),
                lambda ms: setattr(self, "_no_mac", {m.id for m in ms}))
            return len(found)
        return len(self._no_mac)

    async def registered_servers(self, cluster: str) -> list[Machine]:
        """The cluster's registered server nodes, in the store's machine order (by MAC)."""
        servers = self._servers.get(cluster)
        if servers is None:
            found = await self._store_servers(cluster)
            servers = {m.id: m for m in found}
        return sorted(servers.values(),
                      key=lambda m: (m.mac is None, str(m.mac) if m.mac else "", m.id))

    async def _store_servers(self, cluster: str) -> list[Machine]:
        async def read() -> list[Machine]:
            return [m for m in await self._store.list_machines(MachineFilter(
                cluster=cluster, state=MachineState.REGISTERED, limit=1 << 30))
                if _running_server(m)]

        return await self._read_through(read(), lambda ms: self._servers.__setitem__(
            cluster, {m.id: m for m in ms}))

    async def list_groups(self) -> list[Group]:
        if self._groups is None:
            return list(await self._read_through(
                self._store.list_groups(), lambda gs: setattr(self, "_groups", gs)))
        return list(self._groups)

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
        if key in self._settings:
            return self._settings[key]
        return await self._read_through(self._store.get_setting(key),
                                        lambda v: self._settings.__setitem__(key, v))

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        return await self._store.list_events(machine_id, limit=limit)


def _seen(done: asyncio.Future[None]) -> None:
    # A failed background sync: the next reader's own sync meets the same error and
    # reports it; here it only must not be logged as never retrieved.
    if not done.cancelled():
        done.exception()


def _running_server(machine: Machine) -> bool:
    return machine.state == MachineState.REGISTERED and machine.role == Role.SERVER


def _set(held: dict[str, _V], name: str, value: _V | None) -> None:
    if value is None:
        held.pop(name, None)
    else:
        held[name] = value
