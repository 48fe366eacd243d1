"""An inventory in dicts, for tests and ``--memory`` runs; nothing survives the process.

It keeps the SQLite store's semantics exactly (the contract suite runs against both): values are
round-tripped through :mod:`netboot.inventory.codec` on write, so what one store refuses the
other refuses too and a caller mutating its dict afterwards changes nothing here; hostnames are
unique under ASCII case folding, which is what SQLite's ``lower()`` does; machines list in
primary-MAC order (MAC-less ones last, by id); batches are validated in full before anything
is applied.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import TypeVar

from netboot import identity
from netboot.errors import Conflict, NotFound, StoreError, ValidationError
from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory.base import (
    INSTALLS_UNDER_WAY,
    REFUSED_CLAIMS,
    STALE_SETTINGS,
    Batch,
    Changes,
    EventListener,
    InstallsSince,
    MachineFilter,
    check_unchanged,
    fixed_taken,
    fold_hostname,
    in_use,
)
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
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

class MemoryStore:
    """:class:`~netboot.inventory.base.Store` in dicts. ``open``/``close`` only flip a flag."""

    def __init__(self, *, listener: EventListener | None = None) -> None:
        self._open = False
        self._listener = listener
        self._machines: dict[str, Machine] = {}  # id -> machine
        self._keys: dict[tuple[str, str], str] = {}  # (kind, value) claim -> id
        self._hostnames: dict[str, str] = {}  # folded hostname -> id
        self._fixed: dict[str, str] = {}  # fixed_ipv4 -> id (the stores' unique index)
        self._profiles: dict[str, Profile] = {}
        self._clusters: dict[str, Cluster] = {}
        self._groups: dict[str, Group] = {}
        self._events: dict[str, list[Event]] = {}
        self._feed: list[Event] = []  # every event in commit order (events_since)
        self._leases: dict[str, Lease] = {}
        self._lease_addrs: dict[str, str] = {}  # ipv4 -> mac
        self._settings: dict[str, str] = {}
        # Bumped by every write: the change feed of a store that keeps no history says only
        # "something changed", and its readers read again (dicts are cheap to read).
        self._generation = 0
        self._signal = Signal()
        self._tokens: dict[str, ApiToken] = {}
        self._audit: list[AuditEntry] = []

    async def open(self) -> None:
        self._open = True

    async def close(self) -> None:
        self._open = False

    def _check_open(self) -> None:
        # Same failure as a closed SQLite store, so callers' shutdown bugs show in tests.
        if not self._open:
            raise StoreError("the inventory is not open")

    # machines -------------------------------------------------------------------------
    async def get_machine(self, machine_id: str) -> Machine | None:
        self._check_open()
        return self._machines.get(machine_id)

    async def machine_by(self, kind: str, value: str) -> Machine | None:
        self._check_open()
        holder = self._keys.get(codec.claim_key(kind, value))
        return None if holder is None else self._machines[holder]

    async def machines_by(self, claims: Sequence[tuple[str, str]]) -> list[Machine | None]:
        self._check_open()
        holders = [self._keys.get(codec.claim_key(kind, value)) for kind, value in claims]
        return [None if holder is None else self._machines[holder] for holder in holders]

    async def get_machine_by_hostname(self, hostname: str) -> Machine | None:
        self._check_open()
        holder = self._hostnames.get(fold_hostname(hostname))
        return None if holder is None else self._machines[holder]

    def _matching(self, flt: MachineFilter) -> list[Machine]:
        out = []
        shared: set[str | None] = set()
        if flt.shared_fixed_ipv4:
            given = collections.Counter(m.fixed_ipv4 for m in self._machines.values())
            shared = {a for a, n in given.items() if n > 1 and a is not None}
        for machine in self._machines.values():
            if flt.state is not None and machine.state != flt.state:
                continue
            if flt.cluster is not None and machine.cluster != flt.cluster:
                continue
            if flt.profile is not None and machine.profile != flt.profile:
                continue
            if any(machine.labels.get(k) != v for k, v in flt.labels):
                continue
            if flt.uuid is not None and machine.uuid != flt.uuid:
                continue
            if flt.serials and machine.serial not in flt.serials:
                continue
            if flt.fixed_ipv4 is not None and machine.fixed_ipv4 != flt.fixed_ipv4:
                continue
            if flt.with_fixed_ipv4 and machine.fixed_ipv4 is None:
                continue
            if flt.without_secret and machine.secret_hash is not None:
                continue
            if flt.shared_fixed_ipv4 and machine.fixed_ipv4 not in shared:
                continue
            if flt.has_mac is not None and bool(machine.macs) != flt.has_mac:
                continue
            if flt.updated_before is not None and not machine.updated < flt.updated_before:
                continue
            if flt.in_state_before is not None \
                    and not machine.in_state_since < flt.in_state_before:
                continue
            if flt.ids is not None and machine.id not in flt.ids:
                continue
            if flt.after_id is not None and machine.id <= flt.after_id:
                continue
            if flt.text and not codec.matches_text(machine, flt.text):
                continue
            out.append(machine)
        return out

    async def list_machines(self, flt: MachineFilter | None = None) -> list[Machine]:
        self._check_open()
        flt = flt or MachineFilter()
        codec.check_filter(flt)
        if flt.after_id is not None:  # a keyset page, by id
            return sorted(self._matching(flt), key=lambda m: m.id)[:flt.limit]
        found = codec.sort_machines(self._matching(flt), flt.sort, flt.descending)
        return found[flt.offset : flt.offset + flt.limit]

    async def machines_after(self, after: str, limit: int) -> list[Machine]:
        self._check_open()
        return [self._machines[i] for i in sorted(i for i in self._machines if i > after)[:limit]]

    async def count_machines(self, flt: MachineFilter | None = None) -> int:
        self._check_open()
        return len(self._matching(flt or MachineFilter()))

    async def state_counts(self) -> dict[tuple[str | None, MachineState], int]:
        self._check_open()
        return dict(collections.Counter((m.cluster, m.state) for m in self._machines.values()))

    async def create_machine(self, machine: Machine) -> None:
        self._changed()
        await self.apply_batch(Batch(create=(machine,)))

    async def update_machine(self, machine: Machine, *,
                             expect_state: MachineState | None = None) -> None:
        self._changed()
        await self.apply_batch(Batch(update=(machine,), expect={} if expect_state is None
                                     else {machine.id: expect_state}))

    async def delete_machine(self, machine_id: str, *, expect_updated: float | None = None
                             ) -> None:
        self._changed()
        self._check_open()
        machine = self._machines.get(machine_id)
        if machine is None:
            raise NotFound(f"machine {machine_id} not found")
        if expect_updated is not None:
            codec.check_version(machine_id, expect_updated, machine.updated)
        self._release(self._machines, self._keys, self._hostnames, machine)
        _let_go(self._fixed, machine)
        self._events.pop(machine_id, None)
        for mac in machine.macs:
            self._drop_lease(str(mac))
        self._settings.pop(REFUSED_CLAIMS + machine_id, None)  # as SQL's, in its commit

    @staticmethod
    def _release(machines: dict[str, Machine], keys: dict[tuple[str, str], str],
                 hostnames: dict[str, str], machine: Machine) -> None:
        del machines[machine.id]
        for claim in claims(machine):
            keys.pop(claim, None)
        if machine.hostname is not None:
            hostnames.pop(fold_hostname(machine.hostname), None)

    async def apply_batch(self, batch: Batch) -> None:
        self._changed()
        """Merges, creates, updates in order, each checked against the state so far.

        The work happens on copies that replace the live dicts only when every row passed,
        which is the all-or-nothing a SQLite transaction gives.
        """
        self._check_open()
        creates = [_copy_machine(m) for m in batch.create]
        updates = [_copy_machine(m) for m in batch.update]
        events = [codec.event_from_dict(json.loads(codec.dumps(codec.event_to_dict(e))))
                  for e in batch.events]
        audits = [codec.audit_from_dict(codec.audit_to_dict(e)) for e in batch.audit]
        for machine_id, state in batch.expect.items():
            current = self._machines.get(machine_id)
            codec.check_expected(machine_id, state,
                                 None if current is None else current.state.value)
        for machine_id, read in batch.versions.items():
            current = self._machines.get(machine_id)
            codec.check_version(machine_id, read, None if current is None else current.updated)
        machines = dict(self._machines)
        keys = dict(self._keys)
        hostnames = dict(self._hostnames)
        fixed = dict(self._fixed)
        moved: list[tuple[str, str]] = []
        for source, target in batch.merge:
            old = machines.get(source)
            if old is None:
                raise NotFound(f"machine {source} not found")
            self._release(machines, keys, hostnames, old)
            _let_go(fixed, old)
            moved.append((source, target))
        if len(updates) > 1 or (updates and creates):
            # The addresses the batch moves let go first (sqlite._let_go_fixed): an import
            # swapping two machines' addresses, or giving a new machine the one it moves
            # an enrolled one off, is written.
            for machine in updates:
                if (old := machines.get(machine.id)) is not None \
                        and old.fixed_ipv4 != machine.fixed_ipv4:
                    _let_go(fixed, old)
        for machine in creates:
            if machine.id in machines:
                raise Conflict(f"machine {machine.id} already exists")
            _claim(machines, keys, hostnames, machine)
            _hold(fixed, machines, machine)
            machines[machine.id] = machine
        for machine in updates:
            old = machines.get(machine.id)
            if old is None:
                raise NotFound(f"machine {machine.id} not found")
            self._release(machines, keys, hostnames, old)
            _let_go(fixed, old)
            _claim(machines, keys, hostnames, machine)
            _hold(fixed, machines, machine)
            machines[machine.id] = machine
        self._machines = machines
        self._keys = keys
        self._hostnames = hostnames
        self._fixed = fixed
        for source, target in moved:
            history = self._events.pop(source, [])
            self._events[target] = sorted(history + self._events.get(target, []),
                                          key=lambda e: e.time)
        for event in events:
            self._events.setdefault(event.machine, []).append(event)
        self._feed += events
        self._audit.extend(audits)
        if events and self._listener is not None:
            self._listener.published(events)

    # profiles, clusters, groups ----------------------------------------------------------
    async def get_profile(self, name: str) -> Profile | None:
        self._check_open()
        return self._profiles.get(name)

    async def list_profiles(self) -> list[Profile]:
        self._check_open()
        return [self._profiles[k] for k in sorted(self._profiles)]

    async def put_profile(self, profile: Profile, *, create: bool = False,
                          expect: Profile | None = None) -> None:
        self._changed()
        self._check_open()
        value = codec.profile_from_dict(codec.profile_to_dict(profile))
        if expect is not None:
            check_unchanged("profile", profile.name, self._profiles.get(profile.name), expect)
        _put(self._profiles, "profile", value.name, value, create)

    async def delete_profile(self, name: str, *, expect: Profile | None = None,
                             unused: bool = False) -> None:
        self._changed()
        self._check_open()
        if expect is not None:
            check_unchanged("profile", name, self._profiles.get(name), expect)
        if unused:
            self._unused("profile", name)
        _delete(self._profiles, "profile", name)

    async def get_cluster(self, name: str) -> Cluster | None:
        self._check_open()
        return self._clusters.get(name)

    async def list_clusters(self) -> list[Cluster]:
        self._check_open()
        return [self._clusters[k] for k in sorted(self._clusters)]

    async def put_cluster(self, cluster: Cluster, *, create: bool = False,
                          expect: Cluster | None = None) -> None:
        self._changed()
        self._check_open()
        value = codec.cluster_from_dict(codec.cluster_to_dict(cluster))
        if expect is not None:
            check_unchanged("cluster", cluster.name, self._clusters.get(cluster.name), expect)
        _put(self._clusters, "cluster", value.name, value, create)

    async def delete_cluster(self, name: str, *, expect: Cluster | None = None,
                             unused: bool = False) -> None:
        self._changed()
        self._check_open()
        if expect is not None:
            check_unchanged("cluster", name, self._clusters.get(name), expect)
        if unused:
            self._unused("cluster", name)
        _delete(self._clusters, "cluster", name)

    async def get_group(self, name: str) -> Group | None:
        self._check_open()
        return self._groups.get(name)

    async def list_groups(self) -> list[Group]:
        self._check_open()
        return [self._groups[k] for k in sorted(self._groups)]

    async def put_group(self, group: Group, *, create: bool = False,
                        expect: Group | None = None) -> None:
        self._changed()
        self._check_open()
        value = codec.group_from_dict(codec.group_to_dict(group))
        if expect is not None:
            check_unchanged("group", group.name, self._groups.get(group.name), expect)
        _put(self._groups, "group", value.name, value, create)

    async def delete_group(self, name: str, *, expect: Group | None = None,
                           installs: InstallsSince | None = None) -> None:
        self._changed()
        self._check_open()
        if expect is not None:
            check_unchanged("group", name, self._groups.get(name), expect)
        if installs is not None:  # no feed of machines: every one under way (no await)
            installs.check(self._under_way())
        _delete(self._groups, "group", name)

    def _unused(self, kind: str, name: str) -> None:
        """base.in_use: no machine (the first by id) or group (by name) names it."""
        for machine_id in sorted(self._machines):
            m = self._machines[machine_id]
            if getattr(m, kind) == name:
                raise in_use(kind, name, f"machine {m.ref}", m.id)
        for group in sorted(self._groups):
            if getattr(self._groups[group], kind) == name:
                raise in_use(kind, name, f"group {group!r}", None)

    # events --------------------------------------------------------------------------
    async def add_event(self, event: Event) -> None:
        self._check_open()
        # Through JSON text, as SQLite does: tuples in data come back as lists in both stores.
        value = codec.event_from_dict(json.loads(codec.dumps(codec.event_to_dict(event))))
        self._events.setdefault(value.machine, []).append(value)
        self._feed.append(value)
        if self._listener is not None:
            self._listener.published((value,))

    async def list_events(self, machine_id: str, *, limit: int = 1000) -> list[Event]:
        self._check_open()
        if limit <= 0:
            return []
        return list(self._events.get(machine_id, [])[-limit:])

    async def prune_events(self, before: float, limit: int) -> int:
        self._check_open()
        # The oldest ``limit`` events of all machines (time stands for the SQL stores' ids),
        # and of those, the ones recorded before ``before``.
        oldest = sorted((e.time, m, i) for m, history in self._events.items()
                        for i, e in enumerate(history))[:max(limit, 0)]
        gone = {(m, i) for t, m, i in oldest if t < before}
        for m in {m for m, _ in gone}:
            kept = [e for i, e in enumerate(self._events[m]) if (m, i) not in gone]
            if kept:
                self._events[m] = kept
            else:
                del self._events[m]
        return len(gone)

    async def newest_events(self, machine_ids: Collection[str]) -> dict[str, Event]:
        self._check_open()
        return {m: events[-1] for m in machine_ids if (events := self._events.get(m))}

    async def events_since(self, after: int, *, limit: int = 1000) -> tuple[int, list[Event]]:
        self._check_open()
        if after < 0:
            return len(self._feed), []
        events = self._feed[after:after + limit]
        return after + len(events), events

    # leases --------------------------------------------------------------------------
    async def list_leases(self) -> list[Lease]:
        self._check_open()
        return [self._leases[k] for k in sorted(self._leases)]

    async def lease_by_ip(self, ipv4: str) -> Lease | None:
        self._check_open()
        holder = self._lease_addrs.get(ipv4)
        return None if holder is None else self._leases[holder]

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        self._check_open()
        value = codec.lease_from_dict(codec.lease_to_dict(lease))
        holder = self._lease_addrs.get(value.ipv4)
        if holder is not None and ending is not None and holder != value.mac \
                and holder == codec.normalise_mac(ending):
            self._drop_lease(holder)
            holder = None
        if holder is not None and holder != value.mac:
            if now is None or self._leases[holder].expires > now:
                raise Conflict(f"address {value.ipv4} is leased to {holder}")
            self._drop_lease(holder)
        self._drop_lease(value.mac)
        self._leases[value.mac] = value
        self._lease_addrs[value.ipv4] = value.mac

    async def delete_lease(self, mac: str) -> None:
        self._check_open()
        self._drop_lease(codec.normalise_mac(mac))

    def _drop_lease(self, mac: str) -> None:
        old = self._leases.pop(mac, None)
        if old is not None:
            self._lease_addrs.pop(old.ipv4, None)

    # settings ------------------------------------------------------------------------
    async def get_setting(self, key: str) -> str | None:
        self._check_open()
        return self._settings.get(key)

    async def put_setting(self, key: str, value: str) -> None:
        self._changed()
        self._check_open()
        if not isinstance(value, str):
            raise ValidationError("value", "a setting is a string")
        self._settings[key] = value

    async def claim_setting(self, key: str, value: str, *, replace: str | None = None) -> str:
        self._check_open()
        current = self._settings.get(key)
        if current is None or (replace is not None and current == replace):
            await self.put_setting(key, value)
            return value
        return current

    async def delete_setting(self, key: str) -> None:
        self._changed()
        self._check_open()
        self._settings.pop(key, None)

    async def seal_clear_tokens(self) -> int:
        # Nothing is sealed in memory: the tokens never leave the process.
        self._check_open()
        return 0

    async def forget_stale_settings(self) -> int:
        self._changed()
        self._check_open()
        stale = [k for k in self._settings if k in STALE_SETTINGS or (
            k.startswith(REFUSED_CLAIMS) and k[len(REFUSED_CLAIMS):] not in self._machines)]
        for key in stale:
            del self._settings[key]
        return len(stale)

    # change feed ---------------------------------------------------------------------
    @property
    def commits(self) -> int:
        return self._generation

    async def changes_since(self, seq: int) -> Changes:
        self._check_open()
        return Changes(self._generation, complete=seq == self._generation)

    async def forget_changes(self, before: int) -> None:
        return None

    async def feed_position(self) -> int:
        return self._generation

    async def under_way_since(self, seq: int) -> tuple[int, list[Machine]]:
        self._check_open()
        return self._generation, self._under_way()

    def _under_way(self) -> list[Machine]:
        return [m for m in self._machines.values()
                if m.state in INSTALLS_UNDER_WAY and m.profile is None]

    def _changed(self) -> None:
        self._generation += 1
        self._signal.fire()

    async def wait_for_changes(self, seq: int, timeout: float) -> bool:
        self._check_open()

        async def news() -> bool:
            return seq != self._generation

        return await wait_until(news, self._signal, timeout)

    # API tokens and the audit log ------------------------------------------------------
    async def create_token(self, token: ApiToken) -> None:
        self._check_open()
        value = codec.token_from_dict(codec.token_to_dict(token))
        if value.name in self._tokens:
            raise Conflict(f"token {value.name!r} already exists")
        if any(t.sha256 == value.sha256 for t in self._tokens.values()):
            raise Conflict("a token with this value already exists")
        self._tokens[value.name] = value

    async def token_by_hash(self, sha256: str) -> ApiToken | None:
        self._check_open()
        return next((t for t in self._tokens.values() if t.sha256 == sha256), None)

    async def list_tokens(self) -> list[ApiToken]:
        self._check_open()
        return [self._tokens[k] for k in sorted(self._tokens)]

    async def delete_token(self, name: str) -> None:
        self._check_open()
        if self._tokens.pop(name, None) is None:
            raise NotFound(f"token {name!r} not found")

    async def touch_token(self, name: str, when: float) -> None:
        self._check_open()
        token = self._tokens.get(name)
        if token is not None:
            self._tokens[name] = replace(token, last_used=when)

    async def add_audit(self, entry: AuditEntry) -> None:
        self._check_open()
        self._audit.append(codec.audit_from_dict(codec.audit_to_dict(entry)))

    async def settle_audit(self, entry: AuditEntry, written: str, otherwise: str) -> None:
        self._check_open()
        stored = codec.audit_from_dict(codec.audit_to_dict(entry))
        for i in range(len(self._audit) - 1, -1, -1):
            if self._audit[i] == stored:
                self._audit[i] = replace(stored, outcome=written)
                return
        self._audit.append(replace(stored, outcome=otherwise))

    async def list_audit(self, *, since: float | None = None,
                         limit: int = 1000) -> list[AuditEntry]:
        self._check_open()
        if limit <= 0:
            return []
        found = [e for e in self._audit if since is None or e.time >= since]
        return found[-limit:]

    async def prune_audit(self, keep: int) -> int:
        self._check_open()
        dropped = max(0, len(self._audit) - max(keep, 0))
        del self._audit[:dropped]
        return dropped


def _copy_machine(machine: Machine) -> Machine:
    return codec.machine_from_dict(codec.machine_to_dict(machine))


def _let_go(fixed: dict[str, str], machine: Machine) -> None:
    if machine.fixed_ipv4 is not None and fixed.get(machine.fixed_ipv4) == machine.id:
        del fixed[machine.fixed_ipv4]


def _hold(fixed: dict[str, str], machines: dict[str, Machine], machine: Machine) -> None:
    """Index ``machine``'s fixed_ipv4 (base.fixed_taken if another machine holds it)."""
    if (address := machine.fixed_ipv4) is None:
        return
    holder = fixed.get(address)
    if holder is not None and holder != machine.id:
        raise fixed_taken(address, machines[holder].ref, holder)
    fixed[address] = machine.id


def _claim(machines: dict[str, Machine], keys: dict[tuple[str, str], str],
           hostnames: dict[str, str], machine: Machine) -> None:
    """Index ``machine``'s identifiers and hostname; Conflict if another machine holds one."""
    for claim in claims(machine):
        holder = keys.get(claim)
        if holder is not None and holder != machine.id:
            raise identity.claimed(*claim, machines[holder])
    if machine.hostname is not None:
        key = fold_hostname(machine.hostname)
        holder = hostnames.get(key)
        if holder is not None and holder != machine.id:
            raise Conflict(f"hostname {machine.hostname!r} is used by {machines[holder].ref}",
                           field="hostname", holder=holder)
        hostnames[key] = machine.id
    for claim in claims(machine):
        keys[claim] = machine.id


def _put(table: dict[str, _T], kind: str, name: str, value: _T, create: bool) -> None:
    if create and name in table:
        raise Conflict(f"{kind} {name!r} already exists")
    table[name] = value


def _delete(table: dict[str, _T], kind: str, name: str) -> None:
    if table.pop(name, None) is None:
        raise NotFound(f"{kind} {name!r} not found")
