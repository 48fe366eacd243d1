"""Whether the inventory answers: one record per running service.

The boot path reads it before touching the inventory (a server that knows the database is
down answers from its in-memory view at once, instead of waiting for a timeout per request);
the service's watcher keeps it current (netboot.service); ``/healthz`` and the
``netboot_inventory_up`` gauge report it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class InventoryHealth:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.up = True
        self.reason: str | None = None
        self.since = clock()  # of the last change between up and down
        # What the inventory cannot tell while it answers (a lock its writes wait for held
        # by a session it may not see): reported, neither "ok" nor an outage.
        self.unknown: str | None = None
        # Down, but its reads answer (writes are refused: stuck behind a lock holder, or no
        # notification reaches the store): said so, not "unreachable" (s35-pg).
        self.answers = False

    def failed(self, reason: str, *, answers: bool = False) -> bool:
        """The inventory did not answer (``answers``: it answers reads, but its writes would
        each fail); True when it was up until now."""
        was_up = self.up
        if was_up:
            self.since = self._clock()
        self.up, self.reason, self.answers = False, reason, answers
        return was_up

    def restored(self) -> bool:
        """The inventory answered; True when it was down until now."""
        was_down = not self.up
        if was_down:
            self.since = self._clock()
        self.up, self.reason, self.answers = True, None, False
        return was_down

    def doubt(self, why: str | None) -> None:
        """What the inventory cannot tell now (None: nothing)."""
        self.unknown = why

    def problem(self, *, detail: bool = True) -> str | None:
        """What is wrong, for an operator (None: nothing); without ``detail``, without the
        store's own words, for anyone who asks (``/healthz``, a device's refused install):
        they name the database's host, user and locks (benchmarks/README.md, s37-polish)."""
        if self.up:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        why = f": {self.reason}" if detail else ""
        if self.answers:
            return f"the inventory answers reads but refuses writes since {when}{why}"
        return f"the inventory is unreachable since {when}{why}"

    def as_dict(self) -> dict[str, str | None]:
        """The inventory's state and what the store said, for an authenticated reader
        (``GET /api/v1/status``): ``ok``, ``degraded`` or ``unknown``, as ``/healthz``."""
        problem = self.problem()
        if problem is not None:
            return {"state": "degraded", "detail": problem}
        return {"state": "ok" if self.unknown is None else "unknown", "detail": self.unknown}
