"""Retention: machine events older than ``inventory.events_keep_days`` are dropped.

Every boot, report and registration appends an event (``netboot explain``, the dashboard's
timeline); nothing else ever removed one but the removal of its machine. A 1,000-device
install adds 6,000 rows, ~0.9 MiB of SQLite file (benchmarks/README.md, s36-ops): a pallet a
day grew the inventory by ~310 MiB a year, and with it a copy (``netboot db copy``), a
backup, a first sync. The audit log (netboot.access, newest 100,000 kept), discovered
records (``discovery.max_discovered``) and the change feed (the view's pruning) were bounded
already; events were not.

Pruning stays off the hot path: a pass every PASS_SECONDS (the first FIRST_PASS_SECONDS after
start, not at the power-on of a pallet that starts the server), in batches of BATCH rows with
a PAUSE between, so that the writer, which a storm's group commits share, is never held for
more than one small delete. Several servers sharing one PostgreSQL inventory each run passes;
a row is deleted once, the others find nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from netboot.errors import StoreError

DAY = 86400.0
PASS_SECONDS = 3600.0
FIRST_PASS_SECONDS = 600.0
# ~1,000 rows a delete: a few milliseconds of SQLite's writer (B-tree leaves of the oldest
# ids, contiguous), far below a storm's group commit.
BATCH = 1000
PAUSE = 0.05


class PrunesEvents(Protocol):
    async def prune_events(self, before: float, limit: int) -> int: ...


async def prune_old_events(store: PrunesEvents, before: float, *, batch: int = BATCH,
                           pause: float = PAUSE) -> int:
    """Drop every event recorded before ``before``, a batch at a time; returns how many."""
    total = 0
    while True:
        dropped = await store.prune_events(before, batch)
        if not dropped:
            return total
        total += dropped
        await asyncio.sleep(pause)


async def keep_events(store: PrunesEvents, days: float, *, clock: Callable[[], float],
                      log: logging.Logger, first: float = FIRST_PASS_SECONDS,
                      every: float = PASS_SECONDS) -> None:
    """Forever: a pass dropping events older than ``days``, then every ``every`` seconds.
    A failed pass (the inventory unreachable) is logged and tried again at the next."""
    await asyncio.sleep(first)
    while True:
        try:
            dropped = await prune_old_events(store, clock() - days * DAY)
        except StoreError as exc:
            log.warning("events older than %g days not pruned (tried again in %.0f s): %s",
                        days, every, exc)
        else:
            if dropped:
                log.info("pruned %d events older than %g days (inventory.events_keep_days)",
                         dropped, days)
        await asyncio.sleep(every)
