"""Bounds on what unknown devices write to the inventory: per source, and in all.

Recording an unknown machine is a write that anyone on the provisioning network can cause:
20,000 PXE requests with random MACs once added 13,351 ``discovered`` rows, the inventory grew
without limit, and the writes crowded out the answers real devices were waiting for. So:

* each source (the address a request came from, a DHCP relay's own for a relayed one, else
  the interface a broadcast came in on) gets a token bucket of new records; an empty bucket
  means the request is still answered, but nothing is recorded for it;
* all sources together get one bucket too: a host that takes many addresses of the VLAN had
  a budget per address (a /24's 254 addresses: 5,080 records at once, then 508 a second);
* the number of discovered records is capped: the oldest is evicted (deleted with its events)
  to make room for a new one, and evictions are counted.

Only records of *unknown* machines are bounded: an enrolled machine's boots never pass here.
The clock comes in as an argument, so the buckets are tested without sleeping.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import OrderedDict
from dataclasses import dataclass

from netboot.errors import NotFound
from netboot.inventory.base import MachineFilter, Store
from netboot.model import BootRequest, MachineState

_UNSPECIFIED = ("", "0.0.0.0", "::")  # a DHCP broadcast from a client without an address


@dataclass(frozen=True)
class DiscoveryLimits:
    max_discovered: int = 10_000  # discovered records kept; the oldest goes first
    rate_per_source: float = 2.0  # new records a second, per source, once the burst is spent
    burst_per_source: int = 20  # new records a source may add at once
    max_sources: int = 4096  # buckets kept; the least recently used is forgotten
    # All sources together: ten sources' worth (the broadcasts of a few interfaces and a
    # few relays each spending their own at once); a site with more relays raises it.
    rate_all_sources: float = 20.0
    burst_all_sources: int = 200


def peer_key(peer: str) -> str:
    """A budget's key for a peer address: a global IPv6 address's /64 (one interface's
    SLAAC and privacy addresses, which a host picks as it likes: a budget per address was a
    budget per packet), an IPv4-mapped one as the IPv4 address it is, else the peer as it is
    (a link-local address too: every host's is in fe80::/64) (s35-attack)."""
    if ":" not in peer:
        return peer
    try:
        address = ipaddress.IPv6Address(peer)
    except ValueError:  # not an address: as it is
        return peer
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.is_link_local:
        return peer
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def source_of(request: BootRequest) -> str:
    """Who caused this request, for the per-source budget: a request from an address counts
    against that address (a relayed DHCP request against its relay, which sends it from its
    own: the clients behind it share a segment), a local broadcast against the interface it
    came in on. Not against giaddr, a field of the datagram that any host fills as it likes:
    one host varying it had a budget per value (s33-attack)."""
    remote = request.remote_addr
    if remote and remote not in _UNSPECIFIED:
        remote = peer_key(remote)
        return "relay " + remote if request.relay else remote
    return "broadcast on " + (request.interface or "the provisioning network")


class TokenBuckets:
    """One token bucket per key, holding at most ``max_keys`` of them.

    Each bucket is one float: the time at which it is full again (``burst`` tokens less the
    debt paid back at ``rate``: ``burst - (full - now) * rate`` tokens now). A bucket full
    again is the same as none, and :meth:`forget_full` drops those when quiet (a look at
    the oldest at each take cost ~12 % more instructions a take; callgrind, s35-mem). The
    tuple of tokens and last take it replaces, with its two floats, was ~80 bytes more a
    key, and every key stayed until pushed out: an installer's report budget per machine
    (enroll.py) outlived a 1,000-device storm, its ~1,000 keys ~0.25 MiB resident after it
    (benchmarks/README.md, s35-mem). One float: ~10 % fewer instructions a take, too."""

    __slots__ = ("_full", "_max_keys", "_most", "_room", "_step")

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self._step = 1.0 / rate  # seconds one token takes to come back
        # The most debt (seconds) at which one more token is taken, and any debt at all.
        self._room = (burst - 1) / rate
        self._most = burst / rate
        self._max_keys = max_keys
        # key -> when its bucket is full again, the least recently used first.
        self._full: OrderedDict[str, float] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        buckets = self._full
        full = buckets.pop(key, now)
        # Clamped: a clock stepped back leaves a bucket empty at worst (a debt over its
        # burst's worth cannot be run up otherwise), not refusing for as long as the step.
        debt = min(max(0.0, full - now), self._most)
        allowed = debt <= self._room
        buckets[key] = now + debt + self._step if allowed else now + debt
        if len(buckets) > self._max_keys:
            # A forgotten source starts again with a full bucket: a flood spread over more
            # than max_keys sources is still held by the overall cap.
            buckets.popitem(last=False)
        return allowed

    def would_take(self, key: str, now: float) -> bool:
        """Whether :meth:`take` would allow one now, spending nothing."""
        full = self._full.get(key, now)
        return min(max(0.0, full - now), self._most) <= self._room

    def __len__(self) -> int:
        """Buckets held (not yet full again, or not yet looked at since)."""
        return len(self._full)

    def forget_full(self, now: float) -> None:
        """Every bucket full again by ``now`` forgotten (when quiet: Service.forget_idle)."""
        buckets = self._full
        for key in [k for k, when in buckets.items() if when <= now]:
            del buckets[key]


class DiscoveryGuard:
    """Admits new discovered records: per-source rate, then room under the cap.

    ``evicted`` and ``refused`` count since start, for the metrics to read.
    """

    def __init__(self, store: Store, limits: DiscoveryLimits, *,
                 logger: logging.Logger | None = None) -> None:
        self._store = store
        self.limits = limits
        self._buckets = TokenBuckets(limits.rate_per_source, limits.burst_per_source,
                                     limits.max_sources)
        self._all = TokenBuckets(limits.rate_all_sources, limits.burst_all_sources, 1)
        self._log = logger or logging.getLogger(__name__)
        # Discovered machine ids, oldest first; read from the store on first use, then kept
        # as records are added. An id that has left ``discovered`` since (approved, merged,
        # deleted) is dropped when its turn to be evicted comes.
        self._order: OrderedDict[str, None] | None = None
        self._lock = asyncio.Lock()
        self.evicted = 0
        self.refused = 0

    def admit(self, request: BootRequest, now: float) -> bool:
        """Spend one token of this request's source now, or count it refused. Lets the DHCP
        path skip the whole background record of a device whose source's budget is spent
        (a flood of unknown MACs costs no task per packet); the record then calls
        :meth:`reserve` with ``admitted=True``."""
        source = source_of(request)
        # The bucket for all spent only by a record admitted: a source over its own budget
        # does not take the others' share (access.RefusalBudget likewise).
        if self._all.would_take("", now) and self._buckets.take(source, now):
            self._all.take("", now)
            return True
        self.refused += 1
        if self._log.isEnabledFor(logging.DEBUG):  # a flood refuses thousands a second
            self._log.debug("discovery budget of %s spent: mac=%s not recorded", source,
                            request.mac)
        return False

    def refuses(self, request: BootRequest, now: float) -> bool:
        """:meth:`admit` where it refuses (the refusal counted, as admit counts it); False,
        spending nothing, where it would admit. For the DHCP answer cache: a repeat of an
        unknown device answered without the decision refuses as the decision would, and one
        its source's budget would admit again is decided (and recorded) in full."""
        if self._buckets.would_take(source_of(request), now) and self._all.would_take("", now):
            return False
        return not self.admit(request, now)

    async def reserve(self, request: BootRequest, machine_id: str, now: float, *,
                      admitted: bool = False) -> bool:
        """Whether a new record for ``machine_id`` may be written now; if so, room is made
        (the oldest discovered records evicted) and the id counted. ``admitted``: the
        source's token was already spent by :meth:`admit`. A caller whose create then fails
        calls :meth:`release`."""
        if not admitted and not self.admit(request, now):
            return False
        async with self._lock:
            order = await self._loaded()
            while len(order) >= self.limits.max_discovered:
                victim, _ = order.popitem(last=False)
                await self._evict(victim)
            order[machine_id] = None
        return True

    def release(self, machine_id: str) -> None:
        if self._order is not None:
            self._order.pop(machine_id, None)

    async def _evict(self, machine_id: str) -> None:
        machine = await self._store.get_machine(machine_id)
        if machine is None or machine.state != MachineState.DISCOVERED:
            return  # moved on since; not a discovered record any more
        try:
            await self._store.delete_machine(machine_id)
        except NotFound:
            return
        self.evicted += 1
        self._log.debug("discovered record of %s evicted (discovery.max_discovered=%d)",
                        machine.ref, self.limits.max_discovered)

    async def _loaded(self) -> OrderedDict[str, None]:
        if self._order is None:
            found = []
            page = 5000
            offset = 0
            while True:
                batch = await self._store.list_machines(MachineFilter(
                    state=MachineState.DISCOVERED, limit=page, offset=offset))
                found += [(m.created, m.id) for m in batch]
                if len(batch) < page:
                    break
                offset += page
            self._order = OrderedDict((mid, None) for _, mid in sorted(found))
        return self._order

