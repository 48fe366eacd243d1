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

import json
import math
from collections.abc import Iterable, Mapping

from netboot.model import Lease

# dnsmasq's PING_CACHE_TIME (config.h).
FREE_SECONDS = 30.0
# Addresses the inventory's record holds at most (those ending last kept): a host answering
# for every address of a /16 pool would otherwise make it megabytes, rewritten at each mark.
RECORDED = 256


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


def in_use_record(held: str | None, marks: Mapping[str, tuple[float, str]],
                  ended: Iterable[str], now: float) -> str:
    """The inventory's record of the addresses kept as in use (base.DHCP_IN_USE, a JSON
    object: ip -> [until, the line said of it]) with a server's ``marks`` (ip -> (until,
    text)) put in and those it ``ended`` (reclaimed: they answer no more) taken out; what
    another server recorded stays until its time, those past ``now`` go. At most RECORDED,
    those ending last; sorted, so that the same record is the same text."""
    record = read_in_use(held, now)
    for ip in ended:
        record.pop(ip, None)
    record.update(marks)
    kept = sorted(record.items(), key=lambda item: -item[1][0])[:RECORDED]
    return json.dumps({ip: [until, text] for ip, (until, text) in sorted(kept)},
                      separators=(",", ":"))


def read_in_use(text: str | None, now: float) -> dict[str, tuple[float, str]]:
    """The record's addresses still kept at ``now``; an unreadable record (a hand's edit, a
    newer netboot's shape) as empty: it names nothing a decision needs."""
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, tuple[float, str]] = {}
    for ip, entry in data.items():
        if (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)
                and isinstance(entry[0], int | float) and not isinstance(entry[0], bool)
                and math.isfinite(entry[0]) and entry[0] > now):
            out[ip] = (float(entry[0]), entry[1])
    return out
