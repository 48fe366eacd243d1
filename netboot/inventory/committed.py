"""The machines a store committed itself, by the change-feed positions each commit covered.

Why: a view syncing after its own process's commit read every machine of it back through the
change feed (a query and a decode per machine: ~7 % of netboot's CPU in a boot storm), though
the writer held the very values. A store's writer notes, inside its transaction (under the
writers' lock: SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's advisory lock), the newest feed
position before and after its writes; a commit whose "before" is the previous one's "after"
follows it with nothing of anyone else in between. A reader asking for what changed after
``seq`` whose feed ends at ``last`` is answered from here alone when such a chain of this
store's commits leads exactly from ``seq`` to ``last``; anything else committed in between (the
CLI in another process, another server, a write of this store that noted nothing) breaks
the chain, and the reader reads the feed, but only the positions between this store's
commits (:meth:`CommittedHere.split`): what another writer committed is decoded, what this
one wrote is taken as written (a machine both wrote is read, as it is now). Exact, not a
guess: the positions are the feed's own.

Thread-safe: SQLite's writer thread adds, the event loop asks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from netboot.model import Machine

# Commits kept for readers that have not asked yet: a store nobody reads through a view (the
# CLI) would otherwise keep every machine it wrote. Past this, all are dropped; a reader
# then reads the feed, which is only slower.
_KEEP = 4096


class CommittedHere:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # feed position before a commit -> (position after it, its machines as a read of
        # the store would give them, None when deleted), in commit order
        self._spans: dict[int, tuple[int, dict[str, Machine | None]]] = {}

    def add(self, before: int, after: int,
            machines: Iterable[tuple[str, Machine | None]]) -> None:
        """A commit of these machines moved the feed from ``before`` to ``after`` (read in
        its transaction, under the writers' lock). Call only once it is committed."""
        if after <= before:
            return  # nothing the feed carries
        written = dict(machines)
        with self._lock:
            if len(self._spans) >= _KEEP:
                self._spans.clear()
            self._spans[before] = (after, written)

    def since(self, seq: int, last: int) -> dict[str, Machine | None] | None:
        """Every machine committed after ``seq`` up to ``last`` if all of it was committed
        here, as it is now; None if anything else was (or is not known here)."""
        with self._lock:
            spans = self._spans
            merged: dict[str, Machine | None] = {}
            at = seq
            while at < last:
                span = spans.get(at)
                if span is None:
                    return None
                at, machines = span
                merged.update(machines)
            if at != last:
                return None
            self._forget(last)
            return merged

    def split(self, seq: int, last: int,
              ) -> tuple[dict[str, Machine | None], list[tuple[int, int]]]:
        """The feed range after ``seq`` up to ``last`` split into what this store committed
        in it and the rest: the machines of its own commits there, merged in commit order,
        and the ranges between them, each (after, up to), that anyone else (or a write of
        this store that noted nothing) may have committed in. A reader reads those alone,
        and what it finds there wins: a machine changed by another writer after an own
        commit is read as it is now (a sync after an own commit and another process's one
        reads only the other's). Nothing is forgotten: the reader forgets once its answer
        is out."""
        with self._lock:
            merged: dict[str, Machine | None] = {}
            gaps: list[tuple[int, int]] = []
            at = seq
            for before, (after, machines) in self._spans.items():
                if seq <= before and after <= last:  # in commit order: ascending
                    if before > at:
                        gaps.append((at, before))
                    merged.update(machines)
                    at = after
            if at < last:
                gaps.append((at, last))
            return merged, gaps

    def forget(self, seq: int) -> None:
        """Readers are at ``seq``: what was committed before it is not asked for again."""
        with self._lock:
            self._forget(seq)

    def _forget(self, seq: int) -> None:
        spans = self._spans
        while spans:
            first = next(iter(spans))
            if first >= seq:
                return
            del spans[first]
