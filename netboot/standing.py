"""What stands against this inventory that its operator must fix, each with the fix (s43-ops).

Start-up's checks of what an older netboot stored, or of the clock, were log lines only, said
from three places (service.build, Service._load_view, the live look for older
registrations): an operator who reads ``/status``, the dashboard or ``netboot status``
rather than the log was never told, and a fixed one could not be seen to be gone. Here each
is a :class:`Notice` decided from what it reads (pure: no I/O); :class:`Standing` holds
those that stand now (the server's, by kind: each check replaces its own), logs each new one
once, and is what ``GET /status`` (``warnings``), the event stream (``event: warnings``,
the dashboard's banner) and the CLI (:func:`from_store`) show. Kinds:

- ``clusters-alike``: clusters named alike but for case (stored before the 409, s41-attack);
- ``clock-behind``: the clock behind the inventory's newest change (s41-attack);
- ``clock-skew``: this host's clock out of step with the PostgreSQL inventory's
  (health.ClockSkew's warning, every 5 minutes: Service.check_clock);
- ``older-registrations``: machines an older register command registered (s40-ops, s42-ops);
- ``rule-refs``: an auto discovery rule's cluster or profile that does not exist (s37-user);
- ``profile-files``: a profile's file as netboot no longer takes it (session 35);
- ``shared-fixed-ipv4``: machines sharing a fixed address (stored before s40-net);
- ``every-interface``: DHCP answering on every interface of a multi-homed host, none named
  (s44-attack);
- ``claimable-groups``: groups that give different clusters to machines on strings any
  host can send (s44-attack);
- ``address-in-use``: pool addresses that answered the DHCP server's ping, kept from
  clients while they are (servers/dhcp.py, dhcp.ping_check; s48-ping).

The last three are decided where they read the store (service.warn_of_missing_rule_refs,
warn_of_unservable_profiles, warn_of_shared_fixed_addresses), into the same Standing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from netboot.core import older_registrations
from netboot.inventory.base import DHCP_IN_USE, MachineFilter, Store
from netboot.model import Group, Machine, MachineState
from netboot.pingcheck import read_in_use

log = logging.getLogger("netboot.service")

# How far behind the inventory's newest change the clock may be before it is told
# (clock_behind): two servers' clocks apart by NTP's usual error are not.
CLOCK_BEHIND_TOLD = 300.0
# Machines named in a notice (all are counted).
NAMED = 5
# Machines a server's notice lists in its refs (GET /status, the event stream): after an
# upgrade from a fleet registered before session 39, every one is an older registration,
# and 100,000 names were ~1.4 MB and ~14 ms of the event loop at each /status (the machines
# page asks it at each burst of events) and each stream's opening. ``netboot status``
# (on the database, no loop to share) lists them all.
SERVED_REFS = 100


@dataclass(frozen=True, slots=True)
class Notice:
    """One thing that stands: its ``kind``, what it is and the fix (``text``, as logged),
    and the names of what it is about (``refs``: machines, clusters)."""

    kind: str
    text: str
    refs: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.text, "refs": list(self.refs)}


def older_notice(older: Sequence[Machine], *, live: bool = False,
                 refs: int | None = None) -> Notice | None:
    """The machines of ``older`` (core.older_registrations), and the fix. ``live``: named
    as another server still on an older version registers them (a rolling upgrade).
    ``refs``: how many at most its refs list (None: all)."""
    if not older:
        return None
    names = [m.hostname or m.ref for m in older]
    return Notice("older-registrations", (
        f"{len(older)} registered machines were registered by an older netboot's register "
        "command" + (" just now (a server of this inventory still runs an older version: "
                     "upgrade it)" if live else "")
        + f" ({', '.join(names[:NAMED])}{', ...' if len(older) > NAMED else ''}): they keep "
        "its weaker rules (a repeat registration from their address is answered without "
        "proof; those registered before session 37 report no new address at later boots) "
        "until reinstalled: netboot machines reinstall REF for each, when it may reinstall"
        + (f"; {refs} of them listed here, netboot status --json lists all"
           if refs is not None and len(names) > refs else "")),
        tuple(names[:refs]))


def clusters_alike(names: Iterable[str]) -> list[Notice]:
    """Clusters whose names differ only by case, stored before a second such one was a 409
    (s41-attack): one DNS name, ``<cluster>.<zone>``, which answers the servers of all of
    them while the nodes of each are sent there (a node joins, or is refused by, another's
    server). Kept as they are (removing one is the operator's call, and its machines')."""
    named: dict[str, list[str]] = {}
    for name in names:
        named.setdefault(name.lower(), []).append(name)
    return [Notice("clusters-alike", (
        f"clusters {', '.join(sorted(alike))} are named alike but for case (stored by an "
        f"older netboot): they are one DNS name, {lower}.<zone>, which answers the servers "
        "of each, and the nodes of each are sent there, where they may join another's "
        "server or be refused by it. Keep one: give the others' machines and groups a "
        "cluster of another name (netboot clusters add NAME; netboot machines set REF "
        "--cluster NAME), then remove them (netboot clusters rm NAME)"), tuple(sorted(alike)))
        for lower, alike in sorted(named.items()) if len(alike) > 1]


def newest(machines: Iterable[Machine]) -> Machine | None:
    """The machine changed last (its ``updated``)."""
    return max(machines, key=lambda m: m.updated, default=None)


def clock_behind(newest: Machine | None, now: float) -> Notice | None:
    """A clock behind the newest change of the inventory (a board without a real-time clock,
    started before NTP set it): install tokens issued now expire when the clock is stepped
    forward, before their installs end, and events written now are stamped in the past
    (inventory.events_keep_days drops them early). None once the clock is within
    :data:`CLOCK_BEHIND_TOLD` of it (set since: the notice is gone)."""
    if newest is None or newest.updated - now <= CLOCK_BEHIND_TOLD:
        return None
    return Notice("clock-behind", (
        f"the clock ({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now))}) is "
        f"{newest.updated - now:.0f} s behind the inventory's newest change "
        f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(newest.updated))}, machine "
        f"{newest.ref}): started before the time was set (no real-time clock, NTP not synced "
        "yet)? Install tokens issued now expire once the clock is set forward, before their "
        "installs end, and events written now are stamped in the past. Start netboot once "
        "the time is synced (systemd: After=time-sync.target with systemd-time-wait-sync "
        "enabled)"), (newest.ref,))


# What a boot request tells of itself (BootRequest.labels) and the facts learnt from what
# one told (the DHCP hostname, iPXE's platform, a relay's giaddr): the selector keys a host
# that sends a machine's MAC chooses the values of (groups.machine_labels puts them over
# the machine's labels; its own UUID, serial, asset tag and hostname only where it has one).
CLAIMABLE = frozenset({"arch", "firmware", "manufacturer", "product", "uuid", "serial",
                       "asset", "hostname", "dhcp_hostname", "platform", "relay"})


def claimable_groups(groups: Iterable[Group]) -> Notice | None:
    """Groups giving two or more clusters that select on claimable strings alone: a host
    that knows the MAC of an enrolled machine naming no cluster sends the strings of the
    group whose cluster it wants and is given that cluster's join token in its config
    (s43-attack, seen on the wire; matchbox's selectors on query arguments alike). A
    selector with a key the operator sets (a label, the MAC) is chosen by no request; a
    machine naming its own cluster takes no group's."""
    chosen = [g for g in groups if g.cluster and g.selector
              and all(k in CLAIMABLE for k in g.selector)]
    if len({g.cluster for g in chosen}) < 2:
        return None
    named = ", ".join(f"{g.name} ({', '.join(sorted(g.selector))} -> {g.cluster})"
                      for g in chosen)
    return Notice("claimable-groups", (
        f"groups {named} give different clusters on strings a boot request tells, which "
        "any host on the provisioning network can send: one that knows the MAC of an "
        "enrolled machine naming no cluster picks the group, and is given that cluster's "
        "join token. Name each machine's cluster (netboot machines set REF --cluster NAME), "
        "or add a key the operator sets to those selectors (a label: --selector "
        "rack=r1 with netboot machines set REF --label rack=r1; or mac)"),
        tuple(g.name for g in chosen))


def every_interface(interfaces: Sequence[tuple[str, str]], mode: str,
                    http_listen: str) -> Notice | None:
    """DHCP (``mode``) answering on each of ``interfaces`` (name, address: the host's
    non-loopback IPv4 ones, where ``server.interfaces`` names none), when there are two or
    more: a multi-homed host's other networks (a management LAN, a lab, the uplink) get
    proxy offers naming this server beside their own PXE server, or, authoritative, leases
    from its pool. dnsmasq answers a proxy range only on the interface holding its network,
    matchbox's HTTP listens on 127.0.0.1 unless ``-address`` says otherwise; pixiecore and
    smee answer everywhere, as netboot does where one interface is named by nobody. Said,
    with the fix, where the user did not choose it (s44-attack)."""
    names: dict[str, str] = {}
    for name, address in interfaces:
        names.setdefault(name, address)
    if mode == "off" or len(names) < 2:
        return None
    first = next(iter(names))
    return Notice("every-interface", (
        f"DHCP ({mode}) answers on every interface with an IPv4 address, no interface "
        f"named: {', '.join(f'{n} ({a})' for n, a in names.items())}, and on each that "
        f"comes up later; HTTP listens on {http_listen} (http.listen). Name the "
        f"provisioning interface to answer there only (netboot serve --interface {first}, "
        f"or server.interfaces: [{first}] in the config file), and set http.listen to its "
        "address to keep the API off the others (dnsmasq answers a proxy range only on the "
        "interface holding its network)"), tuple(names))


class Standing:
    """The notices that stand for this server, by kind (each check replaces its kind's),
    each new one logged once as a warning. ``version`` moves whenever what
    :meth:`as_list` gives changes (the event stream sends it again then)."""

    __slots__ = ("_by_kind", "_told", "version")

    def __init__(self, *, told: bool = True) -> None:
        self._by_kind: dict[str, tuple[Notice, ...]] = {}
        self._told = told  # false: none logged (the CLI prints them)
        self.version = 0

    def set(self, kind: str, notices: Iterable[Notice | None], *, told: bool = True) -> None:
        """Those of ``kind`` that stand now; the new ones logged (``told`` false: kept
        quiet, said otherwise)."""
        now = tuple(n for n in notices if n is not None)
        before = self._by_kind.get(kind, ())
        if now == before:
            return
        if told and self._told:
            for notice in now:
                if notice not in before:
                    log.warning("%s", notice.text)
        if now:
            self._by_kind[kind] = now
        else:
            self._by_kind.pop(kind, None)
        self.version += 1

    def holds(self, kind: str) -> bool:
        """Whether any notice of ``kind`` stands."""
        return kind in self._by_kind

    def as_list(self) -> list[dict[str, Any]]:
        """Every notice that stands, by kind (GET /status's ``warnings``)."""
        return [n.as_dict() for kind in sorted(self._by_kind) for n in self._by_kind[kind]]


async def look_at_names(store: Store, standing: Standing) -> None:
    """The notices read from the clusters' and groups' names: clusters named alike and
    groups giving clusters on claimable strings (at start, at each look again, and
    ``netboot status``'s)."""
    standing.set("clusters-alike", clusters_alike(c.name for c in await store.list_clusters()))
    standing.set("claimable-groups", [claimable_groups(await store.list_groups())])


async def from_store(store: Store, now: float, standing: Standing) -> None:
    """What a server decides from its loaded view, read from the store into ``standing``
    (``netboot status`` on the database, no server asked): the registered machines holding
    no install secret, the clusters, the newest change."""
    # Those holding no install secret alone, found by the store (every registered machine
    # read and decoded was ~2.6 s of CPU at 100,000: s43-ops' leftover), the rule still
    # core's; the oldest first (by the MAC, SQLite looked each registered row up from the
    # state's index: 0.6 s more).
    flt = MachineFilter(state=MachineState.REGISTERED, without_secret=True, sort="created")
    found = await store.count_machines(flt)
    older = older_registrations(await store.list_machines(replace(
        flt, limit=found + 100))) if found else []
    last = await store.list_machines(MachineFilter(sort="updated", descending=True, limit=1))
    await look_at_names(store, standing)
    standing.set("clock-behind", [clock_behind(newest(last), now)])
    # The addresses a serving DHCP server found in use, as it recorded them (its memory is
    # what GET /status shows): kept from clients until the time each says.
    standing.set("address-in-use", [Notice("address-in-use", text, (ip,)) for ip, (_, text)
                                    in read_in_use(await store.get_setting(DHCP_IN_USE),
                                                   now).items()])
    standing.set("older-registrations", [older_notice(older)])
