"""The address pool of authoritative DHCP mode: a pure, in-memory state machine.

Every method takes ``now`` (seconds since the epoch) and returns a decision; nothing here does
I/O. The DHCP adapter keeps the pool in memory so that a DISCOVER is answered in microseconds
(iPXE gives up on offers after about two seconds, protocols.md §1.6) and persists the changes
the pool reports through a :class:`LeaseStore` in the background. On start the adapter loads
the store's leases back (:meth:`LeasePool.load`), so leases survive a restart.

State is bounded by the size of the pool: one lease or offer per address, and one "declined"
mark per address.

Every operation costs about the same whatever the pool's size and fill. A free address is found
without scanning the pool: addresses never handed out are taken in order behind a cursor, and
every address given back since (released, moved from, its offer or lease or mark run out) in a
min-heap of candidates, those that ran out found through a heap of every holding's end; the
lowest free address is still the one chosen. A scan from the pool's start each time (as before
session 35) cost 14 ms a DISCOVER on a full pool of 4,094 addresses and 0.36 s on a /16, and a
pool filled in quadratic time: any host that sends DISCOVERs with made-up MACs (chaddr is a
field) held the event loop, which also serves TFTP and HTTP, from a few dozen packets a second
(s35-attack).
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from netboot.model import Lease


class LeaseStore(Protocol):  # implemented by the inventory
    async def list_leases(self) -> list[Lease]: ...
    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None: ...
    async def delete_lease(self, mac: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Offer:
    mac: str
    ipv4: str
    expires: float


@dataclass(frozen=True, slots=True)
class Changes:
    """What the adapter must persist after a pool operation."""

    put: tuple[Lease, ...] = ()
    delete: tuple[str, ...] = ()  # MACs whose lease is gone


class LeasePool:
    """Addresses ``start``..``end`` (inclusive) minus ``reserved``, handed out per MAC."""

    def __init__(
        self,
        start: str,
        end: str,
        *,
        lease_seconds: int,
        decline_seconds: int,
        offer_seconds: int = 60,
        reserved: Iterable[str] = (),
        network: ipaddress.IPv4Network | None = None,
        reserved_fixed: Callable[[str], str | None] | None = None,
    ) -> None:
        self._start = int(ipaddress.IPv4Address(start))
        self._end = int(ipaddress.IPv4Address(end))
        if self._start > self._end:
            raise ValueError("pool start is after pool end")
        self.lease_seconds = lease_seconds
        self.decline_seconds = decline_seconds
        self.offer_seconds = offer_seconds
        self._reserved = self._configured = frozenset(
            int(ipaddress.IPv4Address(a)) for a in reserved)
        # This host's own addresses inside the pool, as its interfaces have them now
        # (reserve_host): reserved beside the configured ones.
        self._host: frozenset[int] = frozenset()
        # Every address of this host, in the pool or not (reserve_host): a machine's fixed
        # address is never one of them (fixed_refused).
        self._own: frozenset[int] = frozenset()
        self._network = network
        # Which machine an address is the fixed_ipv4 of (the inventory view's index, one
        # look-up), or None: such an address is never leased to another client, as dnsmasq
        # never offers a dynamic address a dhcp-host reserves (dhcp.c address_allocate
        # skips config_find_by_address). Asked of the one candidate chosen, not of the pool.
        self._reserved_fixed = reserved_fixed
        # Candidates passed over as some machine's fixed address (value -> text): looked at
        # again only when no other address is free (_choose), those no longer reserved (the
        # machine deleted or given another address) then given back. Bounded by the fixed
        # addresses inside the pool, which the operator sets, not a client.
        self._passed_fixed: dict[int, str] = {}
        self._leases: dict[str, Lease] = {}  # mac -> lease
        self._by_ip: dict[str, str] = {}  # ip -> mac (leases)
        self._offers: dict[str, Offer] = {}  # mac -> pending offer
        self._offered_ip: dict[str, str] = {}  # ip -> mac (offers)
        # Addresses not usable until a time (ip -> until), the one place that says so: those
        # a client DECLINEd and those that answered a ping before their offer (in_use, the
        # ones in ``_answered``). Kept in the order they were marked, the oldest first (each
        # mark lasts decline_seconds, so that is also the order they end in): reclaim's.
        self._declined: dict[str, float] = {}
        self._answered: set[str] = set()
        # Addresses the inventory refused (another netboot server sharing it holds them),
        # not offered until then: ip -> until.
        self._elsewhere: dict[str, float] = {}
        # Finding a free address without a scan (module docstring): the next address never
        # handed out, addresses that may have been given back since, and (end, address) of
        # every holding above (stale entries, of holdings renewed or dropped, are skipped
        # when they come up, and the heap is rebuilt when they outnumber the live ones).
        self._fresh = self._start
        self._maybe_free: list[int] = []  # a heap: the lowest free address first, as before
        self._maybe_free_set: set[int] = set()  # the same addresses, each kept once
        self._ends: list[tuple[float, str]] = []
        self._gone: list[str] = []  # MACs whose lease ran out, for the next expire()

    # -- queries -----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._end - self._start + 1 - sum(
            1 for r in self._reserved if self._start <= r <= self._end
        )

    def lease(self, mac: str) -> Lease | None:
        return self._leases.get(mac)

    def leases(self) -> list[Lease]:
        return sorted(self._leases.values(), key=lambda lease: ipaddress.IPv4Address(lease.ipv4))

    def in_pool(self, ip: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return False
        return self._start <= value <= self._end and value not in self._reserved

    def on_network(self, ip: str) -> bool:
        if self._network is None:
            return self.in_pool(ip)
        try:
            return ipaddress.IPv4Address(ip) in self._network
        except ValueError:
            return False

    def links(self, addresses: Iterable[tuple[str, str]]) -> frozenset[str]:
        """Of ``addresses`` (interface name, IPv4 address), the interfaces the pool is for:
        those with an address on the pool's network. dnsmasq answers a request that was not
        relayed only on an interface whose address a dhcp-range's network holds (dhcp.c
        ``complete_context``; else "no address range available for DHCP request via
        <iface>"): a management NIC on another network gets no offer of the pool's."""
        return frozenset(name for name, address in addresses if self.on_network(address))

    def reserve_host(self, addresses: Iterable[str]) -> list[Lease]:
        """This host's IPv4 addresses now (an interface's that came or went: rtnetlink):
        those inside the pool are never offered, as dnsmasq never offers the address of the
        interface a request came in on (dhcp.c ``address_allocate``/``address_available``,
        which read the interfaces' addresses for every packet). An address that stops being
        this host's is offered again. An offer of a newly reserved address is withdrawn.
        A live lease of one is left as dnsmasq leaves it: not offered to its client again
        (a DISCOVER gets another address) and its renewal NAKed ("address not available",
        rfc2131.c), so the client moves off it at its next renewal or boot; returned, for
        the caller to say so."""
        self._own = frozenset(int(ipaddress.IPv4Address(a)) for a in addresses)
        host = frozenset(value for value in self._own if self._start <= value <= self._end)
        if host == self._host:
            return []
        came, went = host - self._host, self._host - host
        self._host = host
        self._reserved = self._configured | host
        for value in sorted(went):
            if value not in self._reserved:
                self._given_back(str(ipaddress.IPv4Address(value)))
        held = []
        for value in sorted(came):
            ip = str(ipaddress.IPv4Address(value))
            offered = self._offered_ip.get(ip)
            if offered is not None:
                self._drop_offer(offered)
            holder = self._by_ip.get(ip)
            if holder is not None:
                held.append(self._leases[holder])
        return held

    def holder(self, ip: str) -> str | None:
        """The client ``ip`` is leased to (run out or not), if any: the one a request
        granting it ends (_set_lease)."""
        return self._by_ip.get(ip)

    def taker(self, ip: str, mac: str, now: float) -> str | None:
        """The other client ``ip`` is leased or offered to now, if any."""
        holder = self._by_ip.get(ip)
        if holder is not None and holder != mac and self._leases[holder].expires > now:
            return holder
        offered = self._offered_ip.get(ip)
        if offered is not None and offered != mac and self._offers[offered].expires > now:
            return offered
        return None

    def fixed_refused(self, mac: str, fixed: str, now: float,
                      sibling: str | None = None) -> str | None:
        """Why ``fixed`` (the machine's ``fixed_ipv4``) must not be given to ``mac`` now, or
        None. Given anyway, two hosts answer ARP for one address: dnsmasq (rfc2131.c, a
        ``dhcp-host`` address) refuses one that is the server's ("not using configured
        address ... because it is in use by the server or relay"), leased to another client
        ("... because it is leased to"), or declined ("... previously declined"), and offers
        a dynamic one instead; the caller does the same, for every address of this host and
        the configured router's too. ``sibling``: another NIC of the same machine, whose
        lease or offer of it is no reason (dnsmasq: not when that MAC is of the same
        dhcp-host, config_has_mac); taking it ends theirs (_set_lease)."""
        try:
            value = int(ipaddress.IPv4Address(fixed))
        except ValueError:
            return "it is not an IPv4 address"
        if value in self._own or value in self._configured:
            return "it is in use by this server (one of its addresses) or the router"
        other = self.taker(fixed, mac, now)
        if other is not None and other != sibling:
            leased = self._by_ip.get(fixed) == other
            return f"it is {'leased' if leased else 'offered'} to {other}"
        if self.declined(fixed, now):
            return "it was declined (in use on the network?)"
        return None

    def moved_from(self, mac: str, fixed: str, now: float) -> bool:
        """Whether a REQUEST of ``mac`` for its machine's ``fixed`` address must be NAKed
        because another NIC (a sibling: fixed_refused let it through) holds a live lease of
        it and ``mac`` was not offered it: a renewal, rebinding or INIT-REBOOT of a NIC whose
        lease the sibling's ACK ended. One holder at a time, as dnsmasq's ``dhcp-host`` with
        several MACs ("permission to abandon a DHCP lease to one of the hardware addresses
        when another one asks for a lease"): the newest asker's. Both kept, two hosts
        answered ARP for one address; anyone on the VLAN with the machine's SMBIOS UUID
        (option 97, broadcast) was attached to it and held its address beside the real NIC
        (s46-attack #4). NAKed, the NIC discovers again (RFC 2131 §4.3.2) and is offered the
        address (the ACK decides): a spoof is then seen moving it back and forth
        (DhcpServer's warning and the machine's event), never holding it with another."""
        holder = self._by_ip.get(fixed)
        if holder is None or holder == mac or self._leases[holder].expires <= now:
            return False
        offer = self._offers.get(mac)
        return offer is None or offer.ipv4 != fixed or offer.expires <= now

    def declined(self, ip: str, now: float) -> bool:
        until = self._declined.get(ip)
        return until is not None and until > now

    def _free_for(self, ip: str, mac: str, now: float, *, over: str | None = None) -> bool:
        """``ip`` may be given to ``mac`` as a dynamic address: not leased or offered to
        another live client (``over``: but this one's offer, which the caller takes), not
        recently declined, not some machine's fixed address."""
        if self.declined(ip, now) or self._elsewhere.get(ip, 0.0) > now:
            return False
        if self._reserved_fixed is not None and self._reserved_fixed(ip) is not None:
            return False
        holder = self._by_ip.get(ip)
        if holder is not None and holder != mac:
            lease = self._leases[holder]
            if lease.expires > now:
                return False
        offered = self._offered_ip.get(ip)
        if offered is not None and offered not in (mac, over):
            offer = self._offers[offered]
            if offer.expires > now:
                return False
        return True

    def offered_elsewhere(self, ip: str, mac: str, now: float) -> Offer | None:
        """The live offer of ``ip`` to another client, if ``ip`` is only offered (not leased)
        and no address is free for ``mac``: the one a REQUEST of ``mac`` selecting ``ip``
        takes (:meth:`request`), a full pool's, which :meth:`shared_offer` offered to both.

        With a free address left, another's offer is never taken: a host that read a
        client's OFFER (broadcast: iPXE sets the flag) and REQUESTed its address from a
        made-up MAC took it and had the client NAKed, then the next one, every round, while
        the pool had room (s47-attack)."""
        offered = self._offered_ip.get(ip)
        if offered is None or offered == mac or ip in self._by_ip:
            return None
        offer = self._offers[offered]
        return offer if offer.expires > now and not self._any_free(mac, now) else None

    def _any_free(self, mac: str, now: float) -> bool:
        """Whether :meth:`offer` would find ``mac`` an address now; the candidate it looked
        at is put back (found, it is no one's: only an offer holds it)."""
        ip = self._choose(mac, now, requested=None, fixed=None)
        if ip is None:
            return False
        self._given_back(ip)
        return True

    # -- state changes -----------------------------------------------------------------------

    def load(self, leases: Iterable[Lease], now: float) -> None:
        """Take leases from the store at start-up; expired ones are dropped."""
        for lease in leases:
            if lease.expires > now:
                self._set_lease(lease)

    def _set_lease(self, lease: Lease) -> None:
        old = self._leases.get(lease.mac)
        if old is not None and self._by_ip.get(old.ipv4) == lease.mac:
            del self._by_ip[old.ipv4]
            self._given_back(old.ipv4)
        previous_holder = self._by_ip.get(lease.ipv4)
        if previous_holder is not None and previous_holder != lease.mac:
            self._leases.pop(previous_holder, None)
        self._leases[lease.mac] = lease
        self._by_ip[lease.ipv4] = lease.mac
        self._drop_offer(lease.mac)
        self._ends_at(lease.expires, lease.ipv4)

    def _drop_offer(self, mac: str) -> None:
        offer = self._offers.pop(mac, None)
        if offer is not None and self._offered_ip.get(offer.ipv4) == mac:
            del self._offered_ip[offer.ipv4]
            self._given_back(offer.ipv4)

    def _drop_lease(self, mac: str) -> Lease | None:
        lease = self._leases.pop(mac, None)
        if lease is not None and self._by_ip.get(lease.ipv4) == mac:
            del self._by_ip[lease.ipv4]
            self._given_back(lease.ipv4)
        return lease

    def _given_back(self, ip: str) -> None:
        """``ip`` may be free now: a candidate for the next client (checked when taken)."""
        value = int(ipaddress.IPv4Address(ip))
        if (self._start <= value <= self._end and value not in self._reserved
                and value not in self._maybe_free_set):
            self._maybe_free_set.add(value)
            heapq.heappush(self._maybe_free, value)

    def _ends_at(self, until: float, ip: str) -> None:
        ends = self._ends
        heapq.heappush(ends, (until, ip))
        live = len(self._leases) + len(self._offers) + len(self._declined) + len(self._elsewhere)
        if len(ends) > 2 * live + 64:
            # Mostly stale (renewals push an entry each): keep one per live holding. A
            # holding run out but not yet expired is still in its map, so it is kept too.
            ends[:] = [(lease.expires, lease.ipv4) for lease in self._leases.values()]
            ends.extend((offer.expires, offer.ipv4) for offer in self._offers.values())
            ends.extend((t, ip) for ip, t in self._declined.items())
            ends.extend((t, ip) for ip, t in self._elsewhere.items())
            heapq.heapify(ends)

    def _run_out(self, now: float) -> None:
        """Drop the holdings that ended by ``now``, their addresses made candidates: only
        the addresses whose end has come are looked at, not every holding."""
        ends = self._ends
        while ends and ends[0][0] <= now:
            _, ip = heapq.heappop(ends)
            holder = self._by_ip.get(ip)
            if holder is not None and self._leases[holder].expires <= now:
                self._drop_lease(holder)
                self._gone.append(holder)
            offered = self._offered_ip.get(ip)
            if offered is not None and self._offers[offered].expires <= now:
                self._drop_offer(offered)
            if self._declined.get(ip, now + 1.0) <= now:
                del self._declined[ip]
                self._answered.discard(ip)
                self._given_back(ip)
            if self._elsewhere.get(ip, now + 1.0) <= now:
                del self._elsewhere[ip]
                self._given_back(ip)

    def expire(self, now: float) -> Changes:
        """Forget expired leases, offers and decline marks (RFC 2131 §4.4.6 lease expiry)."""
        self._run_out(now)
        # A MAC leased again since its lease ran out keeps its new lease in the store.
        gone = tuple(dict.fromkeys(mac for mac in self._gone if mac not in self._leases))
        self._gone = []
        return Changes(delete=gone)

    def held_elsewhere(self, ip: str, until: float) -> None:
        """The inventory refused our claim on ``ip``: another server sharing it gave it to
        another client. Drop our offer or lease of it, and do not offer it before ``until``
        (then the inventory is asked again, and says again if it is still taken)."""
        self._elsewhere[ip] = until
        self._ends_at(until, ip)
        offered = self._offered_ip.get(ip)
        if offered is not None:
            self._drop_offer(offered)
        holder = self._by_ip.get(ip)
        if holder is not None:
            self._drop_lease(holder)

    def offer(
        self, mac: str, now: float, *, requested: str | None = None, fixed: str | None = None
    ) -> str | None:
        """Pick an address for a DISCOVER and hold it for ``offer_seconds`` (RFC 2131 §4.3.1:
        the client's current binding, else the requested address if free, else a free one).
        None when the pool is exhausted: the caller stays silent."""
        ip = self._choose(mac, now, requested=requested, fixed=fixed)
        if ip is None:
            return None
        self._drop_offer(mac)
        # An address whose offer to another client ran out: that offer goes (it is not
        # reached through its address any more, and would stay in memory for good).
        previous = self._offered_ip.get(ip)
        if previous is not None and previous != mac:
            self._offers.pop(previous, None)
        self._offers[mac] = Offer(mac, ip, now + self.offer_seconds)
        self._offered_ip[ip] = mac
        self._ends_at(now + self.offer_seconds, ip)
        return ip

    def _choose(
        self, mac: str, now: float, *, requested: str | None, fixed: str | None
    ) -> str | None:
        if fixed is not None:
            # Enrolled machines with a fixed address get it even outside the pool; it is the
            # operator's job not to put it inside another machine's range.
            return fixed if not self.declined(fixed, now) else None
        lease = self._leases.get(mac)
        if lease is not None and self._free_for(lease.ipv4, mac, now) and self.in_pool(
            lease.ipv4
        ):
            return lease.ipv4
        offer = self._offers.get(mac)
        if offer is not None and self._free_for(offer.ipv4, mac, now):
            return offer.ipv4
        if requested is not None and self.in_pool(requested) and self._free_for(
            requested, mac, now
        ):
            return requested
        # The lowest free address: of those given back, and of those never handed out (an
        # address passed over there is held, so it comes back as a candidate when its
        # holding ends). A candidate held again is dropped, and added again when it is given
        # back once more.
        self._run_out(now)
        candidates = self._maybe_free
        while True:
            if candidates and (candidates[0] < self._fresh or self._fresh > self._end):
                value = heapq.heappop(candidates)
                self._maybe_free_set.discard(value)
                if value in self._reserved:  # given back before it became this host's
                    continue
            elif self._fresh <= self._end:
                value = self._fresh
                self._fresh += 1
                if value in self._reserved:
                    continue
            elif self._passed_fixed and self._unreserved_given_back():
                continue
            else:
                return None
            ip = str(ipaddress.IPv4Address(value))
            if self._reserved_fixed is not None and self._reserved_fixed(ip) is not None:
                # Not a candidate while it is reserved; it has no holding whose end would
                # give it back, so it is kept aside (_unreserved_given_back).
                self._passed_fixed[value] = ip
                continue
            if self._free_for(ip, mac, now):
                return ip

    def shared_offer(self, mac: str, now: float) -> str | None:
        """For a DISCOVER that :meth:`offer` found no free address for: the address of the
        oldest live offer to another client, offered to ``mac`` too and held for neither
        (nothing is kept of it), or None when nothing is only offered. The first of them to
        REQUEST it gets it (:meth:`request`), the other a NAK, and it discovers again.

        Offers held addresses for ``offer_seconds`` whoever asked: DISCOVERs with made-up
        MACs (chaddr is a field: no reply need be read, the source may be forged), one per
        address a minute (4 a second for a /24), left every real client unanswered, "pool
        exhausted" (s46-attack). dnsmasq keeps no state for an offer (rfc2131.c allocates a
        lease at DHCPREQUEST only), so DISCOVERs alone take nothing from it; RFC 2131 §4.3.1
        lets a server not reserve what it offers. The oldest offer is the one most likely
        unanswered; nothing is written, so a flood of them costs no memory and no write."""
        self._run_out(now)
        for offer in self._offers.values():  # in the order they were made: oldest first
            if offer.mac != mac and offer.expires > now \
                    and self._offered_ip.get(offer.ipv4) == offer.mac:
                return offer.ipv4
        return None

    def _unreserved_given_back(self) -> bool:
        """The addresses passed over as fixed that are no longer any machine's, made
        candidates again; whether there were any."""
        assert self._reserved_fixed is not None
        freed = [value for value, ip in self._passed_fixed.items()
                 if self._reserved_fixed(ip) is None]
        for value in freed:
            ip = self._passed_fixed.pop(value)
            self._given_back(ip)
        return bool(freed)

    def request(
        self,
        mac: str,
        ip: str,
        now: float,
        *,
        fixed: str | None = None,
        hostname: str | None = None,
        selecting: bool = False,
    ) -> Lease | None:
        """Bind ``ip`` to ``mac`` for a REQUEST (selecting, init-reboot, renewing or
        rebinding, RFC 2131 §4.3.2). Returns the lease to ACK, or None to NAK.

        While selecting the address must be the one offered; otherwise a client may keep
        (or, this server being authoritative for its link, take) any free address of the pool.
        """
        if fixed is not None and ip != fixed:
            return None  # the machine must move to its fixed address: NAK, it rediscovers
        if fixed is not None and self.moved_from(mac, fixed, now):
            return None
        taken: Offer | None = None
        if selecting:
            offer = self._offers.get(mac)
            current = self._leases.get(mac)
            if not (
                (offer is not None and offer.ipv4 == ip)
                or (current is not None and current.ipv4 == ip)
                or ip == fixed
            ):
                # An address only offered to another client (shared_offer's) is the first
                # requester's, as with dnsmasq, which keeps no offers.
                taken = self.offered_elsewhere(ip, mac, now)
                if taken is None:
                    return None
        over = None if taken is None else taken.mac
        if ip != fixed and not (self.in_pool(ip) and self._free_for(ip, mac, now, over=over)):
            return None
        if self.declined(ip, now):
            return None
        if over is not None:
            self._drop_offer(over)
        lease = Lease(mac=mac, ipv4=ip, expires=now + self.lease_seconds, hostname=hostname)
        self._set_lease(lease)
        return lease

    def not_selected(self, mac: str) -> None:
        """The client chose another server's offer (REQUEST with another server id)."""
        self._drop_offer(mac)

    def decline(self, mac: str, ip: str, now: float) -> Changes | None:
        """DHCPDECLINE: the client found ``ip`` in use (RFC 2131 §4.3.3). Mark it bad for
        ``decline_seconds`` and drop the client's binding to it.

        Only from the client ``ip`` was offered or leased to (§4.3.3: the DECLINE names the
        address this server gave that client; dnsmasq honours one only for the client's own
        lease): None, nothing marked, for any other. Any host could otherwise mark any
        address of the pool bad (one another client holds, whose renewal was then NAKed, or
        every free one: the pool exhausted) by naming it (s33-attack's "Left"). DHCP proves
        nothing of who sends it (a chaddr is a field), but such a host now has to hold the
        offer itself, which it gets only as any client does, one address at a time."""
        if not self.on_network(ip):
            return Changes()
        offer = self._offers.get(mac)
        lease = self._leases.get(mac)
        if not ((offer is not None and offer.ipv4 == ip) or (lease is not None
                                                               and lease.ipv4 == ip)):
            return None
        self._mark(ip, now, answered=False)
        self._drop_offer(mac)
        lease = self._leases.get(mac)
        if lease is not None and lease.ipv4 == ip:
            self._drop_lease(mac)
            return Changes(delete=(mac,))
        return Changes()

    def in_use(self, ip: str, now: float) -> None:
        """``ip`` answered a ping before its offer (pingcheck): a host the pool knows nothing
        of has it. Kept from every client for ``decline_seconds``, as a declined address
        (dnsmasq's DECLINE_BACKOFF, 10 minutes; ISC dhcpd abandons it), then checked again
        when it comes up, or sooner when nothing else is free (reclaimable); the offer
        waiting on the ping is withdrawn."""
        self._mark(ip, now, answered=True)
        offered = self._offered_ip.get(ip)
        if offered is not None:
            self._drop_offer(offered)

    def _mark(self, ip: str, now: float, *, answered: bool) -> None:
        """``ip`` not usable for ``decline_seconds`` from ``now``: marked anew (the newest)."""
        self._declined.pop(ip, None)
        self._declined[ip] = now + self.decline_seconds
        if answered:
            self._answered.add(ip)
        else:
            self._answered.discard(ip)
        self._ends_at(now + self.decline_seconds, ip)

    def marked_until(self, ip: str, now: float) -> float | None:
        """Until when ``ip`` is kept from clients as in use (DECLINEd, or it answered a
        ping), or None: the pool's word, which the DHCP server's notices follow."""
        until = self._declined.get(ip)
        return until if until is not None and until > now else None

    def reclaimable(self, mac: str, now: float, *, skip: Iterable[str] = ()) -> str | None:
        """For a DISCOVER of ``mac`` that :meth:`offer` found no free address for: the pool
        address marked in use the longest ago (not in ``skip``, those tried already), to be
        checked again and, found free, taken back (:meth:`reclaim`); None when there is none.

        ISC dhcpd, with no free lease left, reclaims the oldest abandoned one (an address
        that answered a ping or was declined: "Reclaiming abandoned lease") and pings it
        again before offering it; otherwise a host that answered once, or a device that
        spoofed echo replies for a few seconds, held the addresses it answered for
        decline_seconds whatever came after, and when those were the pool's last, no client
        got any (s48-ping's "left"). Walks the marks oldest first: only when the pool is
        full, and at most the marks that are no pool address or some machine's fixed one
        (the operator's) are passed over."""
        skipped = set(skip)
        for ip, until in self._declined.items():
            if until <= now or ip in skipped or not self.in_pool(ip):
                continue
            if self._elsewhere.get(ip, 0.0) > now or self.taker(ip, mac, now) is not None:
                continue
            if self._reserved_fixed is not None and self._reserved_fixed(ip) is not None:
                continue
            return ip
        return None

    def reclaim(self, ip: str, now: float) -> tuple[bool, float] | None:
        """``ip``'s mark dropped (a ping found it free again: :meth:`reclaimable`); whether
        it had answered a ping (else a client had DECLINEd it) and when it was marked, or
        None if it was not marked (another DISCOVER reclaimed it meanwhile)."""
        until = self._declined.pop(ip, None)
        if until is None or until <= now:
            return None
        answered = ip in self._answered
        self._answered.discard(ip)
        self._given_back(ip)
        return answered, until - self.decline_seconds

    def release(self, mac: str, ip: str) -> Changes:
        """DHCPRELEASE (RFC 2131 §4.3.4): free the address if it is the client's."""
        lease = self._leases.get(mac)
        if lease is None or lease.ipv4 != ip:
            return Changes()
        self._drop_lease(mac)
        return Changes(delete=(mac,))
