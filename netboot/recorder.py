"""Boot-path events, written off the hot path in group commits.

A boot storm records an event for nearly every request (a DHCP step, a local boot, a hold);
one transaction each made the database the bottleneck of every decision. Events that
acknowledge nothing to a client are queued here and written together: one transaction per
batch, at most ``delay`` seconds after the first of it, all of them on :meth:`flush` (at
shutdown, and before anyone reads the events back). What a client is told is done — a state
it depends on, a token, a registration — is never queued: its writer commits it, with its
event, before answering, so a ``kill -9`` loses at most the last ``delay`` of history notes.

While the inventory is unreachable the queue is kept (up to ``max_queued`` events, the oldest
dropped beyond, with a count in the log) and no write is tried until :meth:`flush` is called
again (the service's watcher does once the inventory answers): a boot storm against a dead
database costs no failed transaction per event and no log line per event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from netboot.errors import NetbootError, StoreError
from netboot.inventory.base import Batch, Store
from netboot.model import Event

# Machines whose newest event this process remembers (see Recorder.last): about 100 bytes
# each, so a storm of 100,000 machines costs ~10 MB, not unbounded memory.
_REMEMBERED = 100_000

# Long enough to gather a storm's events into one commit, short enough that `netboot
# explain` run right after a boot shows it (reads flush anyway).
DEFAULT_DELAY = 0.025


class Recorder:
    def __init__(self, store: Store, *, delay: float = DEFAULT_DELAY,
                 logger: logging.Logger | None = None, max_queued: int = 100_000) -> None:
        self._store = store
        self._delay = delay
        self._max_queued = max_queued
        self.failing: str | None = None  # why the last write failed (None: it did not)
        self.dropped = 0  # events dropped from a full queue while the inventory was away
        self._log = logger or logging.getLogger(__name__)
        self._queue: list[Event] = []
        self._newest: dict[str, Event] = {}  # machine id -> its newest queued event
        # machine id -> (kind, message) of the newest event recorded or committed through here,
        # oldest first (bounded by _REMEMBERED)
        self._last: dict[str, tuple[str, str]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one batch at a time, in order

    def record(self, event: Event) -> None:
        """Queue ``event``; it is committed within ``delay`` seconds."""
        self._queue.append(event)
        self._newest[event.machine] = event
        if len(self._queue) > self._max_queued:
            old = self._queue.pop(0)
            if self._newest.get(old.machine) is old:
                del self._newest[old.machine]
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                self._log.error("%d boot events dropped: the inventory is unreachable and "
                                "%d are queued already", self.dropped, self._max_queued)
        self._remember((event,))
        if self._writer is None and self.failing is None:
            self._writer = asyncio.ensure_future(self._write_soon())

    @property
    def queued(self) -> int:
        """Events waiting to be written."""
        return len(self._queue)

    def last(self, machine_id: str) -> tuple[str, str] | None:
        """(kind, message) of the newest event of this machine that went through this
        recorder, queued or written; None when it has none or it was forgotten. Events that
        other processes write (the CLI) are not seen here: a caller that must not repeat
        one only trusts a match, and reads the store otherwise."""
        return self._last.get(machine_id)

    def _remember(self, events: Iterable[Event]) -> None:
        last = self._last
        for event in events:
            last.pop(event.machine, None)  # re-inserted last: the dict stays oldest first
            last[event.machine] = (event.kind, event.message)
        while len(last) > _REMEMBERED:
            del last[next(iter(last))]

    def pending(self, machine_id: str) -> Event | None:
        """The newest event of this machine that is queued, not yet written."""
        return self._newest.get(machine_id)

    async def _write_soon(self) -> None:
        try:
            await asyncio.sleep(self._delay)
        finally:
            self._writer = None
        await self.flush()

    async def commit(self, batch: Batch) -> None:
        """Write ``batch`` now, before the caller answers anyone, with the events queued
        before it in the same transaction (so history keeps its order). If it fails, nothing
        of it is written and the queued events stay queued."""
        async with self._lock:
            if batch.merge:  # a merge moves events: write what is queued under the old ids
                await self._write(Batch())
            await self._write(batch, strict=True)
            if batch.merge:  # events moved to the surviving ids: forget the merged ones
                for old, _ in batch.merge:
                    self._last.pop(old, None)
            self._remember(batch.events)

    async def flush(self) -> None:
        """Write everything queued until now, in one transaction."""
        async with self._lock:
            await self._write(Batch())

    async def _write(self, batch: Batch, *, strict: bool = False) -> None:
        queued, self._queue = self._queue, []
        if not queued and not (batch.merge or batch.create or batch.update or batch.events
                               or batch.expect):
            return
        try:
            await self._store.apply_batch(Batch(merge=batch.merge, create=batch.create,
                                                update=batch.update,
                                                events=[*queued, *batch.events],
                                                expect=batch.expect))
        except NetbootError as exc:
            if strict:
                self._queue[:0] = queued  # kept, in order, before anything queued meanwhile
                raise
            if not isinstance(exc, StoreError):
                # Refused for what they are, not for where they go: retrying cannot help.
                self._log.error("could not record %d boot events: %s", len(queued), exc)
                self._written(queued)
                return
            # Notes about boots, acknowledged to no one: kept for when the inventory is back.
            self._queue[:0] = queued
            if self.failing is None:
                self._log.error("could not record %d boot events, keeping them until the "
                                "inventory answers: %s", len(queued), exc)
            self.failing = str(exc)
            return
        if self.failing is not None and queued:
            self._log.warning("recorded %d boot events queued while the inventory was "
                              "unreachable", len(queued))
        self.failing = None
        self._written(queued)

    def _written(self, events: list[Event]) -> None:
        for event in events:
            if self._newest.get(event.machine) is event:
                del self._newest[event.machine]

    async def close(self) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
            self._writer = None
        await self.flush()
        if self._queue:
            self._log.error("%d boot events not recorded: the inventory is unreachable (%s)",
                            len(self._queue), self.failing)
