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

Each claim is kept with the registration it was refused against (:func:`registration_of`:
when the machine came into its state, and the secret that holds it), and is told only while
that registration is the machine's: a reinstall, a new registration or a claim given (here, by
another process, or by another server of the inventory) makes them history. Before, a
reinstalled machine's old contest was shown as current, and could be given to (s41-ops).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from netboot.model import Machine

# Addresses kept a machine: a flood from more addresses than this, each sending its secret
# twice or more, is what can push a device's entry out; one-off claims go first.
PLACES = 32
# Machines with kept claims (the least recently contested dropped first): ~PLACES * 200
# bytes each at most.
MACHINES = 1024


def kept_since(claims: RefusedClaims) -> str:
    """When ``claims`` began to be kept (this process's start), as messages say it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claims.since))


def registration_of(machine: Machine) -> tuple[float, str | None]:
    """What names the registration a claim is refused against: when the machine came into
    its state (a reinstall, a new registration move it) and the secret that holds it (a claim
    given replaces it, the state unmoved)."""
    return (machine.in_state_since, machine.secret_hash)


@dataclass(slots=True)
class Held:
    """The latest claim refused from ``peer``: sent ``tries`` times in a row, from
    ``first`` to ``last`` (the clock's seconds), against registration ``against``
    (:func:`registration_of`)."""

    peer: str
    claim: str
    tries: int
    first: float
    last: float
    against: tuple[float, str | None]


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
