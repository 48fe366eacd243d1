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
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

# Addresses kept a machine: a flood from more addresses than this, each sending its secret
# twice or more, is what can push a device's entry out; one-off claims go first.
PLACES = 32
# Machines with kept claims (the least recently contested dropped first): ~PLACES * 200
# bytes each at most.
MACHINES = 1024


@dataclass(slots=True)
class Held:
    """The latest claim refused from ``peer``: sent ``tries`` times in a row, from
    ``first`` to ``last`` (the clock's seconds)."""

    peer: str
    claim: str
    tries: int
    first: float
    last: float


class RefusedClaims:
    """Per machine, the latest claim refused from each address (see the module)."""

    __slots__ = ("_by_machine", "_machines", "_places")

    def __init__(self, places: int = PLACES, machines: int = MACHINES) -> None:
        self._places = places
        self._machines = machines
        # machine id -> peer -> its latest claim, the least recently refused first.
        self._by_machine: OrderedDict[str, OrderedDict[str, Held]] = OrderedDict()

    def refused(self, machine_id: str, peer: str, claim: str, now: float) -> Held:
        """Keep ``claim``, refused from ``peer`` for ``machine_id`` at ``now``."""
        places = self._by_machine.pop(machine_id, None)
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
            held = Held(peer, claim, 1, now, now)
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

    def find(self, machine_id: str, claim: str, since: float = -math.inf) -> Held | None:
        """The address's entry that holds ``claim`` (the most tried if several), refused
        at ``since`` or after (the registration that holds the machine now: one refused
        only before it was refused against another)."""
        places = self._by_machine.get(machine_id)
        found = [h for h in places.values()
                 if h.claim == claim and h.last >= since] if places else []
        return max(found, key=lambda h: (h.tries, h.last)) if found else None

    def held(self, machine_id: str, since: float = -math.inf) -> list[Held]:
        """The machine's kept claims refused at ``since`` or after, the most tried first
        (then the latest)."""
        places = self._by_machine.get(machine_id)
        return sorted((h for h in places.values() if h.last >= since),
                      key=lambda h: (-h.tries, -h.last)) if places else []

    def forget(self, machine_id: str) -> None:
        """Drop the machine's claims (given: they were refused against a registration that
        is no longer the one held; one registered again, or given by another server, is
        told by the ``since`` of :meth:`find` and :meth:`held`)."""
        self._by_machine.pop(machine_id, None)
