"""Which addresses the authoritative DHCP server checks with a ping before it offers them,
and what a check found: pure, ``now`` passed in (the probe itself: servers/ping.py).

As dnsmasq (dhcp.c ``address_allocate`` → ``do_icmp_ping``, rfc2131.c DHCPDISCOVER):

- an address chosen from the pool, or the one the client asks for (option 50) without
  holding it, is checked before its first offer;
- the client's own lease (a renewal, an INIT-REBOOT, a DISCOVER of a client that holds it:
  dnsmasq's ``lease->addr``) is not: the host that answers would be the client itself;
- a machine's fixed address (``fixed_ipv4``, dnsmasq's ``dhcp-host`` address, taken before
  any ping) is not: the operator put it there for that machine;
- an address found free is not checked again for ``free_seconds`` (dnsmasq's
  PING_CACHE_TIME, 30 s): "a stupid client bangs on us repeatedly";
- an address that answered is the pool's to keep from every client for a while
  (LeasePool.in_use), and another is tried.
"""

from __future__ import annotations

from netboot.model import Lease

# dnsmasq's PING_CACHE_TIME (config.h).
FREE_SECONDS = 30.0


class PingChecks:
    """Addresses recently found free, by when that stops holding; bounded by the addresses
    offered within ``free_seconds`` (at most the pool's size)."""

    def __init__(self, *, free_seconds: float = FREE_SECONDS) -> None:
        self.free_seconds = free_seconds
        self._free: dict[str, float] = {}  # ip -> until, oldest first

    def needed(self, ip: str, now: float, *, lease: Lease | None, fixed: str | None) -> bool:
        """Whether an offer of ``ip`` to a client holding ``lease`` (its live lease, if
        any) and given ``fixed`` (its machine's fixed address, if any) waits for a ping."""
        if fixed is not None or (lease is not None and lease.ipv4 == ip):
            return False
        until = self._free.get(ip)
        return until is None or until <= now

    def found_free(self, ip: str, now: float) -> None:
        """No answer within the wait: ``ip`` is taken as free for ``free_seconds``."""
        free = self._free
        free.pop(ip, None)
        free[ip] = now + self.free_seconds
        # Insertion order is time order: those that ran out are at the front.
        for old in list(free):
            if free[old] > now:
                break
            del free[old]

    def forget(self, ip: str) -> None:
        """``ip`` answered: checked again before any later offer."""
        self._free.pop(ip, None)
