"""Which netboot servers share the inventory, by their base URLs: a device's way out when the
server that rendered its config dies for good.

A device's register command names the server that rendered its config first, then the
others (content.register_texts), so that a device whose server died after its config
registers through another, as a pair's user expects with no VIP. Each server records its
base URL in one setting (:data:`~netboot.inventory.base.SERVERS`, a JSON object: URL -> the
time it last said it runs, by its own clock) at start and every :data:`REFRESH_SECONDS`,
with a compare-and-set (Store.claim_setting), so that two servers writing at once keep
both; a URL not said for :data:`STALE_SECONDS` is dropped by the next writer (a server
stopped uncleanly, or one whose address changed); a server stopped cleanly takes its own
entries out (:meth:`Peers.withdraw`). A site that names its servers (``server.peers``) is
given those instead (:class:`Peers` ``named``); each server still records itself.

A server records every base URL its devices are given (one per interface where each device
is given the address it reached: service.Service.device_bases), and never a loopback or
unspecified one (:func:`offered`): ``http://127.0.0.1:…`` in another server's record would
send each device to itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from netboot.errors import StoreError
from netboot.inventory.base import SERVERS, Store
from netboot.model import loopback_url, parse_ip

# How often a server says it runs, and reads who else does.
REFRESH_SECONDS = 60.0
# A server not heard of for this long is left out (and dropped from the record): ten
# refreshes, so a restart or a database outage of a few minutes does not drop it, and a
# clock a few minutes off between two hosts does neither (service.check_clock warns of
# more than a few seconds).
STALE_SECONDS = 600.0
# Compare-and-set rounds before a refresh gives up until the next (each lost round means
# another server wrote between this one's read and write: two or three at most in a pair).
ROUNDS = 5
# How long a clean stop waits for the inventory to take this server's entries out: a store
# that does not answer then leaves them to age out (STALE_SECONDS), as a killed server's.
WITHDRAW_SECONDS = 5.0

log = logging.getLogger(__name__)

# This server's base URL, or each of them (one per interface: Service.device_bases).
Own = Callable[[], str | tuple[str, ...]]


def offered(url: str) -> bool:
    """Whether a base URL may be recorded and offered to devices: not one naming a loopback
    host (each device would try itself) nor an unspecified one (0.0.0.0, ``::``: no host)."""
    if loopback_url(url):
        return False
    address = parse_ip(urlsplit(url).hostname)
    return address is None or not address.is_unspecified


def _owned(own: str | tuple[str, ...]) -> tuple[str, ...]:
    return (own,) if isinstance(own, str) else own


def read_record(text: str | None) -> dict[str, float]:
    """The record's URLs and times; an unreadable record (a hand's edit, a newer netboot's
    shape) as empty, to be written afresh: it names nothing a decision needs."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    # (A loopback or unspecified URL, which a netboot of session 48 recorded as it was,
    # is read as absent: offered.)
    return {url: float(seen) for url, seen in data.items()
            if isinstance(url, str) and url.startswith(("http://", "https://"))
            and isinstance(seen, int | float) and not isinstance(seen, bool)
            and math.isfinite(seen) and offered(url)}


def recorded(record: Mapping[str, float], own: str | tuple[str, ...], now: float,
             *, gone: bool = False) -> str:
    """The record's text with ``own`` (a URL, or each of a server's) said now, or taken out
    (``gone``: a clean stop), and the URLs unheard of for STALE_SECONDS left out (sorted:
    the same record is the same text). A URL not :func:`offered` is never written."""
    owned = _owned(own)
    kept = {url: seen for url, seen in record.items()
            if now - seen < STALE_SECONDS and not (gone and url in owned)}
    if not gone:
        kept.update((url, now) for url in owned if offered(url))
    return json.dumps(dict(sorted(kept.items())), separators=(",", ":"))


def others_in(record: Mapping[str, float], own: str | tuple[str, ...], now: float
              ) -> tuple[str, ...]:
    """The other servers' base URLs the record names (not one of ``own``), heard of within
    STALE_SECONDS, in the order of their text (every server lists them alike)."""
    owned = _owned(own)
    return tuple(sorted(url for url, seen in record.items()
                        if url not in owned and now - seen < STALE_SECONDS))


async def recorded_servers(store: Store, clock: Callable[[], float] = time.time
                           ) -> tuple[str, ...]:
    """Every server the record names, heard of within STALE_SECONDS (``netboot render``:
    the configs it shows name them as a server's do; it writes nothing)."""
    return others_in(read_record(await store.get_setting(SERVERS)), "", clock())


class Peers:
    """This server's entry in the inventory's record of servers, and the others it names
    (:attr:`others`, what Content's register command tries after this server), each change
    of them told to ``told`` (Content.set_peers)."""

    def __init__(self, store: Store, own: Own, *, named: tuple[str, ...] = (),
                 told: Callable[[tuple[str, ...]], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._own = own
        self._told = told
        self._clock = clock
        # server.peers: the site's list, given as it is (this server's own URL left out
        # by Content); the record is then written, not read.
        self._named = named
        self.others: tuple[str, ...] = named
        self._failing = False
        self._heard: str | None = None  # the record's text last read (heard)
        self._due = -math.inf  # when (time.monotonic) to refresh next
        self._unoffered = False  # the loopback base URL's warning given (refresh)

    @property
    def refreshed(self) -> bool:
        """Whether this server has said it runs (a refresh was due once): what a clean stop
        takes out."""
        return self._due != -math.inf

    async def refresh_if_due(self, now: float) -> None:
        """:meth:`refresh` if REFRESH_SECONDS passed since the last (``now``: monotonic)."""
        if now >= self._due:
            self._due = now + REFRESH_SECONDS
            await self.refresh()

    def heard(self, text: str | None) -> None:
        """The record as the inventory's change feed tells it (the service's watcher, every
        half second: another server started or said it runs): the others read from it
        when it changed, so that a server learns of one that starts within a second, not
        at its next refresh."""
        if text is None or text is self._heard or text == self._heard:
            return
        self._heard = text
        if not self._named:
            self._take(read_record(text), self._own())

    def _take(self, record: Mapping[str, float], own: str | tuple[str, ...]) -> None:
        others = others_in(record, own, self._clock())
        if others != self.others:
            log.info("servers sharing the inventory besides this one (%s), which devices "
                     "register through when it is gone: %s", ", ".join(_owned(own)),
                     ", ".join(others) or "none")
            self.others = others
            if self._told is not None:
                self._told(others)

    async def _write(self, own: tuple[str, ...], *, gone: bool = False) -> str | None:
        """The record with ``own`` said now (or taken out: ``gone``), by compare-and-set:
        the record as it was written last."""
        text = await self._store.get_setting(SERVERS)
        held = text
        for _ in range(ROUNDS):
            new = recorded(read_record(text), own, self._clock(), gone=gone)
            if new == text or (gone and not read_record(text).keys() & set(own)):
                return text  # nothing of this server's to take out
            held = await self._store.claim_setting(SERVERS, new, replace=text)
            if held == new:
                break
            text = held  # another server wrote between: again from what it wrote
        return held

    async def withdraw(self) -> None:
        """A clean stop: this server's entries taken out of the record, so that the others'
        devices stop trying it at once, not after STALE_SECONDS (a killed server's age out).
        Bounded by WITHDRAW_SECONDS; a store that refuses or does not answer is logged."""
        own = _owned(self._own())
        try:
            await asyncio.wait_for(self._write(own, gone=True), WITHDRAW_SECONDS)
        except (StoreError, TimeoutError) as exc:
            log.warning("could not take this server (%s) out of the inventory's servers "
                        "(%s): the others name it for up to %d minutes", ", ".join(own),
                        exc or "no answer", STALE_SECONDS // 60)

    async def refresh(self) -> None:
        """Say this server runs at its base URLs, and read who else does. A store that
        refuses is logged once (until it answers again): the list read before stays."""
        own = _owned(self._own())
        if not any(offered(url) for url in own) and not self._unoffered:
            self._unoffered = True
            log.warning("this server's base URL %s names no host another can reach: it is "
                        "not recorded among the inventory's servers, and the others' devices "
                        "do not register through it; set server.advertise (or "
                        "http.public_url) to the provisioning address", ", ".join(own))
        try:
            held = await self._write(own)
            record = read_record(held)
        except StoreError as exc:
            if not self._failing:
                log.warning("could not record this server (%s) among the inventory's "
                            "servers: %s; devices' register commands keep naming %s",
                            ", ".join(own), exc, ", ".join(self.others) or "this server alone")
            self._failing = True
            return
        self._failing = False
        self._heard = held
        if not self._named:
            self._take(record, own)
