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


# Past this, the database's clock and this host's are out of step enough to say so: NTP
# keeps hosts within milliseconds, and a few seconds are what an operator reading two
# servers' logs, or an install_timeout of a few minutes, would notice.
CLOCK_SKEW_WARN = 3.0


def _utc(seconds: float) -> str:
    """ISO 8601, UTC, to the millisecond (two clocks a few seconds apart, side by side)."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds % 1 * 1000):03d}Z"


class ClockSkew:
    """The database's clock against this host's (a PostgreSQL inventory several servers
    share: each one's install tokens expire, and ``install_timeout`` and ``unchanged_for``
    are counted, by the clock of the server that wrote the time, so two servers out of step
    by S seconds give one machine S seconds more or less). Each check is judged here; the
    service's watcher reads the clocks and logs what :meth:`observe` says."""

    def __init__(self, threshold: float = CLOCK_SKEW_WARN) -> None:
        self.threshold = threshold
        self.seconds: float | None = None  # the database's clock minus this host's, last seen
        self.warned = False
        # The warning said while they stay out of step (GET /status's warnings show it).
        self.said: str | None = None

    def observe(self, database: float, local: float, round_trip: float = 0.0
                ) -> tuple[str, str] | None:
        """One reading: ``database``'s clock and this host's at the same moment (within
        ``round_trip``). What to log, as (level, message), or None: a warning the first time
        they are further apart than the threshold (the round trip's uncertainty given the
        benefit of the doubt), naming both times; an info line once back in step."""
        skew = database - local
        self.seconds = skew
        off = abs(skew) - round_trip / 2 > self.threshold
        if off and not self.warned:
            self.warned = True
            ahead = "ahead of" if skew > 0 else "behind"
            self.said = (f"the inventory database's clock ({_utc(database)}) is "
                         f"{abs(skew):.1f} s {ahead} this host's ({_utc(local)}): install "
                         "tokens, install_timeout and unchanged_for are counted by the clock "
                         "of the server that wrote each time, so servers sharing this "
                         "inventory should keep their clocks in step (NTP) with each other "
                         "and with it")
            return ("warning", self.said)
        if not off and self.warned and abs(skew) <= self.threshold / 2:
            self.warned, self.said = False, None
            return ("info", f"the inventory database's clock ({_utc(database)}) and this "
                    f"host's ({_utc(local)}) are in step again ({skew:+.3f} s)")
        return None
