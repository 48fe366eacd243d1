"""The claims of refused registrations, kept by the address they came from (s40-claim).

A registered machine's spent install token is in its config: anyone who read it can post it
with a secret of their own, from as many addresses as it holds. The ``registration
contested`` events that tell such a refusal are rate limited (enroll.CONTEST_BURST,
CONTEST_EVERY) so that a flood cannot fill the store; a flood of random secrets then used
every event up and the real device's claim was never recorded, nor could it be given the
machine (s40-review). Here, beside the events, each machine keeps the latest claim of each
address it was refused from, with how often that address sent it: the device's register
command retries every 10 s for an hour with its one secret, so its address's entry shows
one claim tried many times, where a flood's secrets each come once. Bounded in memory (no
store write: a flood costs the store nothing more): :data:`PLACES` addresses a machine,
those whose claim came once dropped first, oldest first, and :data:`MACHINES` machines,
the least recently contested dropped first. Kept by this process: lost at a restart and not
shared between servers, which the device's next try (10 s later) makes up for.

:class:`KeptClaims` shares them through the inventory (s42-ops): with several servers on
one PostgreSQL, a claim refused by one was not listed nor given by another, and a restart
lost them all. Each machine's kept claims are one setting (:data:`SETTING` + its id: at most
:data:`PLACES` entries, a few KiB; one row a machine ever contested, which only a holder of
its spent install token can make), merged into by each server with a compare-and-set,
written at most once every :data:`WRITE_EVERY` seconds a machine (the state then: nothing
lost, a flood's refusals between two writes cost the store nothing), and read where an
operator asks (the API's list and claim, the CLI on the database).

Each claim is kept with the registration it was refused against (:func:`registration_of`:
when the machine came into its state, and the secret that holds it), and is told only while
that registration is the machine's: a reinstall, a new registration or a claim given (here, by
another process, or by another server of the inventory) makes them history. Before, a
reinstalled machine's old contest was shown as current, and could be given to (s41-ops).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from netboot.errors import OutcomeUnknown
from netboot.inventory.base import REFUSED_CLAIMS
from netboot.model import Machine, MachineState

# Addresses kept a machine: a flood from more addresses than this, each sending its secret
# twice or more, is what can push a device's entry out; one-off claims go first.
PLACES = 32
# Machines with kept claims (the least recently contested dropped first): ~PLACES * 200
# bytes each at most.
MACHINES = 1024
# The inventory setting of a machine's kept claims (KeptClaims), then its id: one no
# server's view holds (base.REFUSED_CLAIMS).
SETTING = REFUSED_CLAIMS
# Seconds between two writes of one machine's kept claims: the device's register command
# retries every 10 s, so its claim is in the store by its next try or the one after.
WRITE_EVERY = 5.0


def claims_out(held: Iterable[Held]) -> list[dict[str, Any]]:
    """Kept claims as the API and the CLI's ``--json`` give them."""
    return [{"peer": h.peer or None, "claim": h.claim, "tries": h.tries, "first": h.first,
             "last": h.last} for h in held]


def registration_of(machine: Machine) -> tuple[float, str | None]:
    """What names the registration a claim is refused against: when the machine came into
    its state (a reinstall, a new registration move it) and the secret that holds it (a claim
    given replaces it, the state unmoved)."""
    return (machine.in_state_since, machine.secret_hash)


@dataclass(slots=True)
class Held:
    """The latest claim refused from ``peer``: sent ``tries`` times in a row, from
    ``first`` to ``last`` (the clock's seconds), against registration ``against``
    (:func:`registration_of`); ``written`` of those tries are in the inventory's setting
    (:class:`KeptClaims`)."""

    peer: str
    claim: str
    tries: int
    first: float
    last: float
    against: tuple[float, str | None]
    written: int = 0


class RefusedClaims:
    """Per machine, the latest claim refused from each address (see the module)."""

    __slots__ = ("_by_machine", "_machines", "_places", "since")

    def __init__(self, places: int = PLACES, machines: int = MACHINES, *,
                 since: float = 0.0) -> None:
        self._places = places
        self._machines = machines
        # When this process began keeping them (its start): a claim refused before it is
        # lost, which the API and its 404s say (the device's next try is kept again).
        self.since = since
        # machine id -> peer -> its latest claim, the least recently refused first.
        self._by_machine: OrderedDict[str, OrderedDict[str, Held]] = OrderedDict()

    def refused(self, machine: Machine, peer: str, claim: str, now: float) -> Held:
        """Keep ``claim``, refused from ``peer`` for registered ``machine`` at ``now``."""
        machine_id, against = machine.id, registration_of(machine)
        places = self._by_machine.pop(machine_id, None)
        if places is not None and any(h.against != against for h in places.values()):
            places = None  # refused against an earlier registration: history now
        if places is None:
            places = OrderedDict()
            if len(self._by_machine) >= self._machines:
                self._by_machine.popitem(last=False)
        self._by_machine[machine_id] = places
        held = places.pop(peer, None)
        if held is not None and held.claim == claim:
            held.tries += 1
            held.last = now
        else:
            held = Held(peer, claim, 1, now, now, against)
            if len(places) >= self._places:
                # A one-off first (a flood's random secret), else the oldest: a device
                # retrying its one secret outlives a flood of new ones.
                once = next((p for p, h in places.items() if h.tries == 1), None)
                if once is None:
                    places.popitem(last=False)
                else:
                    del places[once]
        places[peer] = held
        return held

    def find(self, machine: Machine, claim: str) -> Held | None:
        """The address's entry that holds ``claim`` against the machine's registration as it
        is now (the most tried if several)."""
        found = [h for h in self._current(machine) if h.claim == claim]
        return max(found, key=lambda h: (h.tries, h.last)) if found else None

    def held(self, machine: Machine) -> list[Held]:
        """The claims kept against the machine's registration as it is now (none once it was
        reinstalled, registered again or given), the most tried first (then the latest)."""
        return sorted(self._current(machine), key=lambda h: (-h.tries, -h.last))

    def _current(self, machine: Machine) -> list[Held]:
        places = self._by_machine.get(machine.id)
        if not places:
            return []
        against = registration_of(machine)
        return [h for h in places.values() if h.against == against]

    def forget(self, machine_id: str) -> None:
        """Drop the machine's claims (given: they were refused against a registration that
        is no longer the one held; one registered again, or given by another server, is
        told by the ``since`` of :meth:`find` and :meth:`held`)."""
        self._by_machine.pop(machine_id, None)


Against = tuple[float, str | None]


def merged(stored: Iterable[Held], mine: Iterable[Held], places: int = PLACES) -> list[Held]:
    """The claims ``stored`` (a machine's setting: every server's written so far, all refused
    against one registration) with this server's ``mine`` added, by address: an address's
    latest claim; where both hold one claim, its tries those stored plus this server's not
    yet written (``tries - written``: each server adds what it counted since its last
    write, so that two servers' counts of one device's retries are their sum, where the
    most either counted was shown: s43-ops); then bounded to ``places`` as
    :meth:`RefusedClaims.refused` bounds them (the one-offs dropped first, oldest first).
    Neither is changed."""
    by_peer = {h.peer: replace(h, written=0) for h in stored}
    for h in mine:
        old = by_peer.get(h.peer)
        if old is None or (old.claim != h.claim and h.last > old.last):
            # Not stored (or another claim stored before this one): all this server counted.
            by_peer[h.peer] = replace(h, written=0)
        elif old.claim == h.claim:
            by_peer[h.peer] = replace(old, tries=old.tries + h.tries - h.written,
                                      first=min(old.first, h.first),
                                      last=max(old.last, h.last))
    kept = sorted(by_peer.values(), key=lambda h: h.last)
    while len(kept) > places:
        once = next((h for h in kept if h.tries == 1), None)
        kept.remove(kept[0] if once is None else once)
    return kept


def encoded(against: Against, held: Iterable[Held]) -> str:
    """A machine's kept claims as its setting holds them (all refused against ``against``)."""
    return json.dumps({"against": list(against),
                       "held": [[h.peer, h.claim, h.tries, h.first, h.last] for h in held]},
                      separators=(",", ":"))


def decoded(text: str | None, against: Against, places: int = PLACES) -> list[Held]:
    """The claims ``text`` (a setting :func:`encoded` wrote) keeps against ``against``: none
    when they were refused against another registration, or the text is not one (a row
    written by hand is ignored, and at most ``places`` are read of it)."""
    try:
        value = json.loads(text) if text else None
        if not isinstance(value, dict) or value.get("against") != list(against):
            return []
        return [Held(str(p), str(c), int(t), float(f), float(la), against)
                for p, c, t, f, la in value["held"][:places]]
    except (ValueError, TypeError, KeyError):
        return []


class SettingsStore(Protocol):
    """What :class:`KeptClaims` needs of the inventory (netboot.inventory.base.Store)."""

    async def get_machine(self, machine_id: str) -> Machine | None: ...

    async def get_setting(self, key: str) -> str | None: ...

    async def claim_setting(self, key: str, value: str, *, replace: str | None = None
                            ) -> str: ...

    async def delete_setting(self, key: str) -> None: ...


class KeptClaims:
    """This server's kept claims (:class:`RefusedClaims`) shared through the inventory: each
    machine's written to its setting at most every ``every`` seconds (a task a machine
    waiting to write, at most :data:`MACHINES`), merged there with other servers'; read back,
    merged with this server's not yet written, where an operator asks (see the module)."""

    __slots__ = ("_clock", "_every", "_log", "_pending", "_store", "_written", "memory")

    def __init__(self, memory: RefusedClaims, store: SettingsStore, *,
                 clock: Any = time.time, every: float = WRITE_EVERY,
                 logger: logging.Logger | None = None) -> None:
        self.memory = memory
        self._store = store
        self._clock = clock
        self._every = every
        self._log = logger or logging.getLogger(__name__)
        # machine id -> its write, waiting or under way; machine id -> when last written.
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._written: OrderedDict[str, float] = OrderedDict()

    def refused(self, machine: Machine, peer: str, claim: str, now: float) -> Held:
        """:meth:`RefusedClaims.refused`, and the machine's kept claims written soon."""
        held = self.memory.refused(machine, peer, claim, now)
        if machine.id not in self._pending and len(self._pending) < MACHINES:
            self._pending[machine.id] = asyncio.get_running_loop().create_task(
                self._write_soon(machine.id))
        return held

    async def held(self, machine: Machine) -> list[Held]:
        """The claims kept against the machine's registration as it is now, by any server of
        the inventory (and this one's not yet written), the most tried first."""
        against = registration_of(machine)
        stored = decoded(await self._store.get_setting(SETTING + machine.id), against)
        return sorted(merged(stored, self.memory.held(machine)),
                      key=lambda h: (-h.tries, -h.last))

    async def find(self, machine: Machine, claim: str) -> Held | None:
        """The address's entry that holds ``claim`` (the most tried if several)."""
        return next((h for h in await self.held(machine) if h.claim == claim), None)

    async def _write_soon(self, machine_id: str) -> None:
        try:
            wait = self._written.get(machine_id, -math.inf) + self._every - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
        finally:
            # Refusals from here on schedule the next write (after ``every``).
            self._pending.pop(machine_id, None)
        self._written[machine_id] = self._clock()
        self._written.move_to_end(machine_id)
        if len(self._written) > MACHINES:
            self._written.popitem(last=False)
        try:
            await self._write(machine_id)
        except Exception as exc:  # kept here still: its next refusal writes again
            self._log.warning("the refused claims of machine %s were not written to the "
                              "inventory (%s): kept by this server, written at the next",
                              machine_id, exc)

    async def _write(self, machine_id: str) -> None:
        """Merge this server's claims of ``machine_id`` into its setting, compare-and-set
        (another server merging at once: read again and merge again)."""
        store, key = self._store, SETTING + machine_id
        for _ in range(5):
            # Read now: a registration, reinstall or claim given since the refusals (here
            # or on another server) makes them history, not written.
            machine = await store.get_machine(machine_id)
            if machine is None or machine.state is not MachineState.REGISTERED:
                return
            mine = self.memory.held(machine)
            if not mine:
                return
            against = registration_of(machine)
            text = await store.get_setting(key)
            # The tries this write adds, taken with the value that holds them (no await
            # between): a refusal counted while the read was under way (Held.tries moves in
            # place) was written but not counted as written, and the next write added it
            # again (s44-review).
            adding = [(h, h.tries - h.written) for h in mine]
            value = encoded(against, merged(decoded(text, against), mine))
            if value == text or await self._claimed(key, value, text):
                for h, tries in adding:  # in the store now: the next write adds the rest
                    h.written += tries
                if await store.get_machine(machine_id) is None:
                    # Deleted between the read above and this write, whose row its delete
                    # (in its transaction) could not remove: removed here, as it would be.
                    await store.delete_setting(key)
                return

    async def _claimed(self, key: str, value: str, text: str | None) -> bool:
        """Whether the compare-and-set of ``value`` over ``text`` took. A commit whose answer
        was lost (OutcomeUnknown: a PostgreSQL connection cut in its COMMIT) is read back:
        the setting holding ``value`` is this write stored (no other server's merge gives
        this server's own tries and times), one still holding ``text`` is none (merged and
        written again). Counted unwritten, a stored one was added again by the next write,
        the device's tries told too high (s43-ops' leftover). Another value since cannot
        tell (a merge over this write or over ``text``): the error stands, as before."""
        try:
            return await self._store.claim_setting(key, value, replace=text) == value
        except OutcomeUnknown:
            now = await self._store.get_setting(key)
            if now == value:
                return True
            if now == text:
                return False
            raise

    async def close(self) -> None:
        """Write every machine's waiting claims now (a stop keeps what it kept)."""
        pending = list(self._pending.items())
        for _, task in pending:
            task.cancel()
        for machine_id, task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self._write(machine_id)
