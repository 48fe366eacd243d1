"""Boot-path events, written off the hot path in group commits.

A boot storm records an event for nearly every request (a DHCP step, a local boot, a hold);
one transaction each made the database the bottleneck of every decision. Events that
acknowledge nothing to a client are queued here and written together: one transaction per
batch, at most ``delay`` seconds after the first of it, all of them on :meth:`flush` (at
shutdown, and before anyone reads the events back). What a client is told is done — a state
it depends on, a token, a registration — is never queued: its writer commits it, with its
event, before answering, so a ``kill -9`` loses at most the last ``delay`` of history notes.
Those commits are grouped too: the ones that arrive while a transaction is under way are
written together in the next (each caller still waits for its own to be on disk), their
compare-and-set expectations with them; a group the store refuses is written again one
batch at a time, so that only the refused one fails.

A repeated note (a held machine asking every few seconds) is written once: :meth:`note`
compares it with the newest event of its machine that this process wrote or queued, and
where it knows none, with the newest in the store — read when the batch is written, not
while the request that noted it waits.

The queue is bounded while the inventory answers: a storm that asks faster than its notes and
facts can be written (each costs the event loop its share of the write, which a loop busy with
50 connections' requests gave a fiftieth of its turns) waits in :meth:`room` once ``backlog``
of them are queued, until the writer takes them. Unbounded, ~6,000 held agents a second left
~40,000 notes and facts queued within 8 s, 221 flushes waiting for the writer's lock, and
~2 million objects alive whose garbage collection then stopped the loop for 0.7-4.5 s
(benchmarks/README.md, session 16): every DHCP answer and TFTP block with it.

While the inventory is unreachable the queue is kept (up to ``max_queued`` events, the oldest
dropped beyond, with a count in the log), and so are the facts learnt on the boot path, and no
write is tried until :meth:`flush` is called again (the service's watcher does once the
inventory answers): a boot storm against a dead database costs no failed transaction per
event and no log line per event. The notes of a write whose outcome is unknown
(OutcomeUnknown: it may be stored) are not kept: written again, they could be stored twice.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from netboot.errors import NetbootError, OutcomeUnknown, StoreError
from netboot.inventory import codec
from netboot.inventory.base import Batch, Store, batch_of
from netboot.model import AuditEntry, Event, Machine, MachineState, equal
from netboot.unstoppable import told

# Long enough to gather a storm's events into one commit, short enough that `netboot
# explain` run right after a boot shows it (reads flush anyway).
DEFAULT_DELAY = 0.025
# Notes and facts queued (not yet taken by a write) beyond which boot paths wait for the writer
# (room()): ~250 held agents' requests (a hold event and facts each). The write of a full
# backlog is what a waiting request waits for: held agents at 50 connections, p99 90 ms with
# 4,096, 46 ms with 1,024, 27 ms with 512 at the same req/s; 128 cost throughput (a
# transaction per ~60 requests). Memory: ~1-2 KB each.
BACKLOG = 512
# The warning that requests wait for the writer: the first time, then at most this often.
PACED_LOG_EVERY = 60.0
# Machines whose newest event this process remembers (note(), last()): about 100 bytes each,
# so a storm of 100,000 machines costs ~10 MB, not unbounded memory. Beyond it the oldest are
# forgotten, which costs one read of the store when one of them notes again.
REMEMBER = 100_000


@dataclass(eq=False)
class _Group:
    """Commits gathered while a transaction was under way, written in the next one."""

    # Each commit's batch, its caller's future, and the version its events are remembered
    # with once written (commit's ``version``).
    batches: list[tuple[Batch, asyncio.Future[None], object]] = field(default_factory=list)
    # A cancelled caller's future (cancelled with it) -> the one that tells it its batch's
    # fate all the same (Recorder._fate).
    fates: dict[asyncio.Future[None], asyncio.Future[None]] = field(default_factory=dict)

    def settle(self, done: asyncio.Future[None], exc: BaseException | None) -> None:
        if done.cancelled():
            # Its caller may not have asked yet (it runs after this, in the loop's order).
            done = self.fate(done)
        _settle(done, exc)

    def fate(self, done: asyncio.Future[None]) -> asyncio.Future[None]:
        fate = self.fates.get(done)
        if fate is None:
            fate = self.fates[done] = asyncio.get_running_loop().create_future()
        return fate


class Recorder:
    def __init__(self, store: Store, *, delay: float = DEFAULT_DELAY,
                 logger: logging.Logger | None = None, max_queued: int = 100_000,
                 backlog: int = BACKLOG) -> None:
        self._store = store
        self._delay = delay
        self._max_queued = max_queued
        self._backlog = backlog
        self.failing: str | None = None  # why the last write failed (None: it did not)
        self.dropped = 0  # events dropped from a full queue while the inventory was away
        self._log = logger or logging.getLogger(__name__)
        self._queue: list[Event] = []
        self._newest: dict[str, Event] = {}  # machine id -> its newest queued event
        # machine id -> (what its newest event recorded or committed through here said, the
        # version of the machine it was noted for), oldest first (bounded by REMEMBER): the
        # version is the caller's (the boot path passes the machine as the view holds it), so
        # that a change by someone else makes the note count again.
        self._last: collections.OrderedDict[str, tuple[tuple[str, str], object]] = (
            collections.OrderedDict())  # its oldest dropped in O(1), boot._keep says why
        self._unsure: set[int] = set()  # id() of queued notes to compare with the store
        # The background write: asleep for ``delay`` (``_wake`` set: cut short by room()),
        # then flushing. One at a time: it is armed again after its flush if more came.
        self._writer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._room = asyncio.Event()  # set while the backlog is under its bound
        self._room.set()
        self.paced = 0  # requests that waited in room(), since the start
        self._paced_told = 0  # ... as of the last warning
        self._paced_at: float | None = None  # when it was logged (monotonic)
        self._lock = asyncio.Lock()  # one batch at a time, in order
        self._gathering: _Group | None = None
        # Facts learnt on the boot path: machine id -> how to learn them again on the machine
        # as it is stored when they are written (learned()); ``newest`` reads those machines.
        self._learned: dict[str, list[Callable[[Machine], Machine]]] = {}
        # Those taken by the write under way (one at a time: _lock), until it has ended and
        # the view adopted what it stored: learning() still says them meanwhile.
        self._storing: dict[str, list[Callable[[Machine], Machine]]] = {}
        self.newest: Callable[[Collection[str]], Awaitable[dict[str, Machine | None]]] | None = (
            None)
        # The function whose partials (functools.partial) are redos that set only what a
        # boot request teaches (netboot.boot._learnt_again): a machine learnt by those alone
        # is written as such (Batch.learnt), its other fields not compared with the stored.
        self.teaches: Callable[..., Machine] | None = None
        # Told what was written, with the version each was written from (InventoryView.adopt).
        self.adopt: Callable[[Sequence[Machine], Mapping[str, float]], None] | None = None
        self._groups: set[asyncio.Task[None]] = set()
        # Bumped by everything that may write (record, note, learned, commit): a caller that
        # finds it unchanged across a decision knows the decision wrote nothing.
        self.activity = 0
        # Bumped with ``activity`` by each event queued (record, note): a caller that finds
        # both moved alike across a decision knows it queued events and wrote nothing else
        # (boot's kept repeats: an install's first ask again, whose own note is all it wrote).
        self.queued_events = 0
        # Bumped by every change to what last() or learning() answers (the newest sayings
        # remembered, the facts queued): a caller that saw one answer, and finds it
        # unchanged, knows they answer as then (boot._DhcpRepeat, per repeated DISCOVER).
        self.told = 0
        # Told each write's rows (machines and events) and seconds from its start to its
        # commit (Metrics.inventory_commit: netboot_inventory_commit_*), once it committed.
        self.committed: Callable[[int, float], None] | None = None

    def record(self, event: Event) -> None:
        """Queue ``event``; it is committed within ``delay`` seconds."""
        self._record(event, None)

    def _record(self, event: Event, version: object) -> None:
        """:meth:`record`, ``event`` remembered with ``version`` (:meth:`note`'s: once, not
        for None and then again for it)."""
        self.activity += 1
        self.queued_events += 1
        self._queue.append(event)
        self._newest[event.machine] = event
        if len(self._queue) > self._max_queued:
            old = self._queue.pop(0)
            self._unsure.discard(id(old))
            if self._newest.get(old.machine) is old:
                del self._newest[old.machine]
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                self._log.error("%d boot events dropped: the inventory is unreachable and "
                                "%d are queued already", self.dropped, self._max_queued)
        self._said(event.machine, (event.kind, event.message), version)
        if self._writer is None and self.failing is None:  # _write_later, without its call
            self._writer = asyncio.ensure_future(self._write_soon())

    def _write_later(self) -> None:
        if self._writer is None and self.failing is None:
            self._writer = asyncio.ensure_future(self._write_soon())

    @property
    def backlog(self) -> int:
        """Events queued and machines with facts learnt, not yet taken by a write."""
        return len(self._queue) + len(self._learned)

    def crowded(self) -> bool:
        """Whether the backlog is at its bound (never while the inventory is away: then
        nothing is written until it is back, and the queue is bounded by ``max_queued``)."""
        return self.backlog >= self._backlog and self.failing is None

    async def room(self) -> None:
        """Wait while the backlog is at its bound: called by what is about to add to it (a
        boot decision, a DHCP record, a config fetched again), so that a storm asking faster
        than its notes are written is paced by the writer instead of queueing without end."""
        if not self.crowded():
            return
        self.paced += 1
        now = time.monotonic()
        if self._paced_at is None or now - self._paced_at >= PACED_LOG_EVERY:
            # Never silent, never a line per request: the operator learns that devices ask
            # faster than their boot notes are written, and that answers are paced for it.
            self._log.warning("boot requests wait for the inventory writer: %d notes and facts "
                              "queued (%d requests paced, %d since the last warning); devices "
                              "ask faster than their boot notes can be written",
                              self.backlog, self.paced, self.paced - self._paced_told)
            self._paced_at, self._paced_told = now, self.paced
        while self.crowded():
            if self._wake is not None:
                _wake_up(self._wake)  # write now, not after the delay
            self._room.clear()
            await self._room.wait()

    @property
    def queued(self) -> int:
        """Events waiting to be written."""
        return len(self._queue)

    def last(self, machine_id: str) -> tuple[str, str] | None:
        """(kind, message) of the newest event of this machine that went through this
        recorder, queued or written; None when it has none or it was forgotten. Events that
        other processes write (the CLI) are not seen here: a caller that must not repeat
        one only trusts a match, and reads the store otherwise."""
        known = self._last.get(machine_id)
        return None if known is None else known[0]

    def learned(self, machine_id: str, redo: Callable[[Machine], Machine]) -> None:
        """Store ``redo(machine)`` with the next batch, applied to the machine as it is stored
        then (nothing if it changes nothing, or the machine is gone). For what a device told
        about itself and was told nothing about: not worth a commit before the answer.
        ``redo`` changes only what a boot request teaches (netboot.boot.learn's fields, an
        identifier only where there is none): the store writes those alone (Batch.learnt)."""
        self.activity += 1
        self.told += 1
        redos = self._learned.setdefault(machine_id, [])
        if len(redos) >= _REDOS:
            # A machine asking again and again while the inventory is away: the newest
            # requests restate what the older ones told (what the device says about itself).
            del redos[0]
        redos.append(redo)
        if self._writer is None and self.failing is None:  # _write_later, without its call
            self._writer = asyncio.ensure_future(self._write_soon())

    def learning(self, machine: Machine) -> Machine:
        """``machine`` with the facts queued for it by :meth:`learned`: what the next batch
        stores, unless someone changes it first (then they are learnt again on that)."""
        # Those of the write under way too: until the view adopts the machine it stores, a
        # DHCP repeat judged on the view's copy was told news (the facts taken off the
        # queue, not yet on the copy) and recorded again: a decision and a record each,
        # ~750 of a closed loop's 20,000 +enrolled DISCOVERs (benchmarks/README.md,
        # s42-dhcp). A redo learnt again changes nothing it set.
        storing = self._storing
        if storing:
            for redo in storing.get(machine.id, ()):
                machine = redo(machine)
        for redo in self._learned.get(machine.id, ()):
            machine = redo(machine)
        return machine

    def note(self, event: Event, version: object = None) -> None:
        """Queue ``event`` unless the newest event of its machine says the same (kind and
        message). ``version`` stands for the machine's state: a note remembered for another
        version is not trusted (someone else may have written events since)."""
        # repeats() written out (every first DHCP sighting of a storm notes here): one
        # look-up of the machine's queued note, else of its remembered saying.
        machine_id = event.machine
        queued = self._newest.get(machine_id)
        if queued is not None:  # the newest of all, whoever wrote since
            if queued.kind == event.kind and queued.message == event.message:
                return
        else:
            known = self._last.get(machine_id)
            if known is None or known[1] is not version:
                self._unsure.add(id(event))  # compared with the store when written
            elif known[0] == (event.kind, event.message):
                return
        self._record(event, version)

    def repeats(self, machine_id: str, kind: str, message: str, version: object = None,
                ) -> bool:
        """Whether :meth:`note` would drop this note as a repeat, knowing so here: the newest
        event of the machine queued (whoever wrote it), else the newest remembered for this
        very ``version``, says the same."""
        queued = self._newest.get(machine_id)
        if queued is not None:  # the newest of all, whoever wrote since
            return queued.kind == kind and queued.message == message
        known = self._last.get(machine_id)
        return known is not None and known[1] is version and known[0] == (kind, message)

    def _remember(self, event: Event, version: object) -> None:
        self._said(event.machine, (event.kind, event.message), version)

    def _said(self, machine_id: str, said: tuple[str, str], version: object) -> None:
        self.told += 1
        last = self._last
        last[machine_id] = (said, version)
        last.move_to_end(machine_id)  # the newest last: oldest first
        if len(last) > REMEMBER:
            last.popitem(last=False)

    def pending(self, machine_id: str) -> Event | None:
        """The newest event of this machine that is queued, not yet written."""
        return self._newest.get(machine_id)

    async def _write_soon(self) -> None:
        try:
            if not self.crowded():
                loop = asyncio.get_running_loop()
                wake = self._wake = loop.create_future()
                timer = loop.call_later(self._delay, _wake_up, wake)
                try:
                    await wake
                finally:
                    timer.cancel()
                    self._wake = None
            # Not a second writer while this one waits for the lock or writes: each armed
            # while a write was slow queued one more flush behind it (221 of them).
            await self.flush()
        finally:
            self._writer = None
        if self.backlog:
            self._write_later()  # what came while this one wrote

    async def commit(self, batch: Batch, *, version: object = None) -> None:
        """Write ``batch`` before returning, with the events queued before it in the same
        transaction (so history keeps its order), and with other commits that arrive while
        a transaction is under way. If it fails, nothing of it is written and the queued
        events stay queued. ``version``: the machine as the batch leaves it, for note()."""
        self.activity += 1
        if batch.merge:  # a merge moves events: alone, after what is queued under the old ids
            async with self._lock:
                await self._write(Batch())
                await self._write(batch, strict=True)
            self.told += 1
            for old, _ in batch.merge:  # events moved to the surviving ids: forget these
                self._last.pop(old, None)
            for event in batch.events:
                self._remember(event, version)
            return
        group = self._gathering
        if group is None:
            group = self._gathering = _Group()
            task = asyncio.ensure_future(self._commit_group(group))
            self._groups.add(task)  # referenced until done (the loop keeps only weak ones)
            task.add_done_callback(functools.partial(self._group_ended, group))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        group.batches.append((batch, done, version))
        # Not shielded (a future less per commit): a caller cancelled cancels only its own
        # future; its batch is written with the others all the same. So the cancel is told
        # only once that write is over, as what it was: the batch refused, the cancel; the
        # batch written, this returns as written (an audit entry in the batch is then its
        # caller's "done", never "aborted" beside it; a token in it goes to the view) and
        # the cancel comes at the caller's next wait, if still asked for then (an
        # asyncio.timeout around this commit alone takes its own back: unstoppable.deliver).
        cancel: asyncio.CancelledError | None = None
        try:
            await done
        except asyncio.CancelledError as exc:
            cancel = exc
        # The fate waited for outside the except block, as in _write_group: in mypyc's
        # compiled coroutines an await inside a handler can leave the handled exception as
        # the thread's current one (every later exception then carries it as __context__).
        if cancel is not None:
            await told(cancel, _fate(group, done))  # the group's write ends on its own
        # Its events were remembered with ``version`` as they were written (_write), not
        # again here (once a first install: ~3,500 of its loop instructions, session 28).

    def _group_ended(self, group: _Group, task: asyncio.Task[None]) -> None:
        self._groups.discard(task)
        if task.cancelled():
            # Cancelled before it ran (asyncio.run's end cancels a caller and the group its
            # commit has just made in one go; a coroutine cancelled before its start runs
            # none of its body, _commit_group's except included) or before it took the lock:
            # its batches were not written; a caller cancelled meanwhile waits for that fate
            # (_fate), and a commit from now on gathers in a group of its own, not this one.
            if self._gathering is group:
                self._gathering = None
            for _, done, _ in group.batches:
                group.settle(done, asyncio.CancelledError())

    async def _commit_group(self, group: _Group) -> None:
        try:
            await self._write_group(group)
        except BaseException as exc:
            # Cancelled before its write began (asyncio.run's end cancels a group waiting
            # for the lock): its batches were not written, and a caller cancelled meanwhile
            # waits for that fate (_fate); _settle leaves those already told alone.
            for _, done, _ in group.batches:
                group.settle(done, exc)
            raise

    async def _write_group(self, group: _Group) -> None:
        async with self._lock:
            if self._gathering is group:
                self._gathering = None  # from here on, commits gather for the next one
            batches = group.batches
            try:
                if len(batches) == 1:
                    await self._write(batches[0][0], strict=True, commits=batches)
                else:
                    await self._write(_merged(batches), strict=True, commits=batches)
            except (NetbootError, _OneByOne) as exc:
                refused: BaseException | None = exc
            except BaseException as exc:
                for _, done, _ in batches:
                    group.settle(done, exc)
                raise
            else:
                refused = None
            # Outside the except block: in mypyc's compiled coroutine an await inside one
            # left the handled exception as the thread's current one, and every exception
            # raised later in the process carried it and its frames as __context__
            # (tests/test_compiled.py: test_identity's and test_lifecycle's chains).
            if refused is None:
                for _, done, _ in batches:
                    group.settle(done, None)
                return
            if len(batches) == 1 or isinstance(refused, OutcomeUnknown):
                # An outcome unknown is no refusal: the group may be written, and each batch
                # written again alone would be twice (its events, its audit entries; a
                # create its own Conflict). Each caller is told what the store said.
                for _, done, _ in batches:
                    group.settle(done, refused)
                return
            # One of them was refused (a conflict, a stale state): each alone, in the
            # order they came, so that only the refused one fails.
            for commit in batches:
                batch, done, _ = commit
                try:
                    await self._write(batch, strict=True, commits=(commit,))
                except NetbootError as one:
                    group.settle(done, one)
                except BaseException as one:
                    group.settle(done, one)
                    raise
                else:
                    group.settle(done, None)

    async def flush(self) -> None:
        """Write everything queued until now, in one transaction."""
        async with self._lock:
            await self._write(Batch())

    async def _write(self, batch: Batch, *, strict: bool = False,
                     commits: Sequence[tuple[Batch, object, object]] = ()) -> None:
        """Write ``batch`` with what is queued. ``commits``: the commits whose batches'
        events are ``batch.events`` (each batch, its future, its version), whose events are
        remembered with their version (none given: each with None)."""
        learned: dict[str, list[Callable[[Machine], Machine]]] = {}
        if not strict and self.newest is not None:
            learned, self._learned = self._learned, {}
            self._storing = learned
            self.told += 1
        try:
            await self._write_taken(batch, learned, strict, commits)
        finally:
            if self._storing:  # written and adopted, or queued again (_keep_learned)
                self._storing = {}
                self.told += 1  # what learning() says may have changed

    async def _write_taken(self, batch: Batch, learned: dict[str, list[Callable[[Machine],
                                                                              Machine]]],
                           strict: bool, commits: Sequence[tuple[Batch, object, object]],
                           ) -> None:
        """:meth:`_write` once the facts to learn are taken (``learned``)."""
        queued, self._queue = self._queue, []
        if not self.crowded():
            self._room.set()  # taken: what waits in room() may queue the next batch
        if not queued and not learned and not (batch.merge or batch.create or batch.update
                                               or batch.events or batch.expect
                                               or batch.versions or batch.audit):
            return
        relearnt: list[tuple[Machine, Machine]] = []
        away: str | None = None  # the inventory went away after the events were written
        written = False  # the events are committed
        try:
            events = await self._drop_repeats(queued)
            relearnt, taught = await self._relearn(learned)
            refused: NetbootError | None = None
            whole = _with(batch, events, relearnt, taught)
            began = time.perf_counter()
            try:
                await self._store.apply_batch(whole)
            except NetbootError as exc:
                if strict or not relearnt or isinstance(exc, StoreError):
                    raise
                refused = exc
            else:
                written = True
                if self.committed is not None:
                    self.committed(_rows(whole), time.perf_counter() - began)
            if refused is not None:  # awaited outside the handler: see _write_group
                # Refused, perhaps for a learnt fact (another server moved that machine
                # since it was read): the events without them, then each machine alone.
                whole = _with(batch, events, [], set())
                began = time.perf_counter()
                await self._store.apply_batch(whole)
                written = True
                if self.committed is not None:
                    self.committed(_rows(whole), time.perf_counter() - began)
                relearnt, away = await self._each_alone(relearnt, learned)
        except asyncio.CancelledError:
            # Cancelled (at shutdown) before they were committed (the store tells a write
            # its thread began as it ended): the notes and facts taken stay queued for the
            # next write (close()'s flush), not dropped.
            if not written:
                self._queue[:0] = queued
                self._keep_learned(learned)
            raise
        except NetbootError as exc:
            if not isinstance(exc, OutcomeUnknown):
                self._queue[:0] = queued  # kept, in order, before anything queued meanwhile
            elif queued:
                # Perhaps written (a commit whose answer was lost): written again, a group
                # that was would hold them twice. At most once, as a kill -9 within
                # ``delay`` loses them too; the facts are kept (learnt again on the machine
                # as stored, they change nothing that was written).
                self._log.error("%d boot events not written again: the write that held them "
                                "may or may not be stored (%s)", len(queued), exc)
                self._written(queued)
                queued = []
            if strict:
                raise
            if isinstance(exc, StoreError):
                # Notes about boots and facts, acknowledged to no one: kept for when the
                # inventory is back (no write is tried until flush() is called again).
                self._keep_learned(learned)
                if self.failing is None:
                    self._log.error("could not record %d boot events and facts of %d "
                                    "machines, keeping them until the inventory answers: %s",
                                    len(queued), len(learned), exc)
                self.failing = str(exc)
                return
            # Refused for what they are, not for where they go: retrying cannot help.
            del self._queue[:len(queued)]
            self._log.error("could not record %d boot events and facts of %d machines: %s",
                            len(queued), len(learned), exc)
            self._written(queued)
            return
        if self.failing is not None and queued:
            self._log.warning("recorded %d boot events queued while the inventory was "
                              "unreachable", len(queued))
        self.failing = away
        self._written(queued)
        # What each event said, without making the events of a run (an import's 100,000);
        # a commit's own events (a tuple, a list) read as they are, without the generator
        # and its type tests per batch.
        for each, _, version in commits or ((batch, None, None),):
            committed = each.events
            if type(committed) is tuple or type(committed) is list:
                for event in committed:
                    self._said(event.machine, (event.kind, event.message), version)
            else:
                for machine_id, said in codec.event_sayings(committed):
                    self._said(machine_id, said, version)
        await self._relearnt(relearnt)

    def _keep_learned(self, learned: dict[str, list[Callable[[Machine], Machine]]]) -> None:
        """Facts taken by a write that did not store them: kept for the next, before any
        learnt meanwhile."""
        self.told += 1
        for machine_id, redos in learned.items():
            self._learned[machine_id] = [*redos, *self._learned.get(machine_id, ())]

    async def _each_alone(self, relearnt: list[tuple[Machine, Machine]],
                          learned: dict[str, list[Callable[[Machine], Machine]]],
                          ) -> tuple[list[tuple[Machine, Machine]], str | None]:
        """Write each learnt update alone: the ones refused are dropped (the device tells
        them again on its next request), the ones the inventory did not answer for are kept
        for later. Those written, and why the inventory did not answer (None: it did)."""
        written = []
        away: str | None = None
        for i, (old, new) in enumerate(relearnt):
            if away is None:
                try:
                    await self._store.apply_batch(Batch(update=(new,),
                                                        expect={new.id: old.state},
                                                        versions={new.id: old.updated},
                                                        bases={new.id: old}))
                except StoreError as exc:
                    away = str(exc)
                except NetbootError as exc:
                    self._log.info("facts learnt about machine %s not stored: %s", new.id, exc)
                    continue
                except asyncio.CancelledError:
                    # Cancelled (at shutdown) before the store began this one (it tells a
                    # begun write as it ended): its facts and the rest's stay queued for the
                    # next write, as _write keeps what it took (the events are written, so
                    # its handler keeps nothing).
                    self._keep_learned({n.id: learned[n.id] for _, n in relearnt[i:]})
                    raise
                else:
                    written.append((old, new))
                    continue
            self.told += 1
            self._learned[new.id] = [*learned[new.id], *self._learned.get(new.id, ())]
        return written, away

    def _written(self, events: list[Event]) -> None:
        """Queued events are done with (stored, or refused for good)."""
        for event in events:
            self._unsure.discard(id(event))
            if self._newest.get(event.machine) is event:
                del self._newest[event.machine]

    async def _relearnt(self, relearnt: list[tuple[Machine, Machine]]) -> None:
        """Learnt facts are stored: the new versions stand for the machines in note(), and
        are told to ``adopt`` (the view), a slice at a time: a storm's batch is thousands of
        machines, and DHCP answers wait for whatever runs between two reads of the socket.
        A reader that syncs meanwhile takes them from the store's writer anyway."""
        for old, new in relearnt:
            known = self._last.get(new.id)
            if known is not None and known[1] is old:
                self._last[new.id] = (known[0], new)
        adopt = self.adopt
        if adopt is None:
            return
        for start in range(0, len(relearnt), _SLICE):
            if start:
                await asyncio.sleep(0)
            part = relearnt[start:start + _SLICE]
            adopt([new for _, new in part], {old.id: old.updated for old, _ in part})

    async def _relearn(self, learned: dict[str, list[Callable[[Machine], Machine]]],
                       ) -> tuple[list[tuple[Machine, Machine]], set[str]]:
        """(as stored, with the facts) for each machine whose facts change it, and the ids
        of those learnt by :attr:`teaches`' redos alone (Batch.learnt)."""
        taught: set[str] = set()
        if not learned or self.newest is None:
            return [], taught
        updates = []
        teaches = self.teaches
        for i, (machine_id, current) in enumerate((await self.newest(learned)).items()):
            if i and not i % _SLICE:
                await asyncio.sleep(0)  # see _relearnt
            if current is None:
                continue  # deleted meanwhile: nothing to learn about
            updated = current
            alone = teaches is not None
            for redo in learned[machine_id]:
                updated = redo(updated)
                if alone and getattr(redo, "func", None) is not teaches:
                    alone = False
            # Another stamp is another value (the dataclass's == builds and compares two
            # tuples of 24 fields, ~3,800 of the event loop's instructions a first DHCP
            # sighting: benchmarks/README.md, s45-sighting); the same object is no change.
            # model.equal, not `!=`: compiled, `!=` of two Machines is `is` (model.equal says
            # why): an equal copy of the same stamp was written again in the mypyc build.
            if updated is not current and (updated.updated != current.updated
                                           or not equal(updated, current)):
                updates.append((current, updated))
                if alone:
                    taught.add(machine_id)
        return updates, taught

    async def _drop_repeats(self, queued: list[Event]) -> list[Event]:
        """``queued`` without the notes that repeat their machine's newest stored event."""
        unsure = [e for e in queued if id(e) in self._unsure]
        if not unsure:
            return queued
        # One read for the batch: a storm's first notes are thousands of machines at once.
        newest = await self._store.newest_events({e.machine for e in unsure})
        drop = {id(e) for e in unsure
                if (last := newest.get(e.machine)) is not None
                and (last.kind, last.message) == (e.kind, e.message)}
        return [e for e in queued if id(e) not in drop]

    def _cancel_asleep(self) -> None:
        """Cancel the background write while it sleeps (never while it writes)."""
        if self._wake is not None and self._writer is not None:
            self._writer.cancel()
            self._writer = None

    async def close(self) -> None:
        self._cancel_asleep()  # its flush is the one below
        await self.flush()
        self._cancel_asleep()  # armed by a flush meanwhile
        if self._queue:
            self._log.error("%d boot events not recorded: the inventory is unreachable (%s)",
                            len(self._queue), self.failing)


def _wake_up(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


# Facts kept per machine until they are written: a device restates them on every request.
_REDOS = 16
# Machines learnt again or adopted between two yields to the event loop (~1-2 ms of work).
_SLICE = 64


class _OneByOne(Exception):
    """A group that must be written one batch at a time."""


def _merged(commits: Sequence[tuple[Batch, object, object]]) -> Batch:
    """The batches of a group's ``commits`` as one, in their order: their machines, events,
    checks and audit entries. Raises _OneByOne when two of them update, create or expect
    the same machine: in one transaction both would pass a compare-and-set that one after
    the other only the first passes.

    One walk over the group, each batch's parts added by C calls (list ``+=``,
    ``dict.update``), its overlap checked on the way: seven comprehensions over the group
    and a walk of its own for the overlap were ~175 bytecodes of the event loop a first
    install (benchmarks/README.md, s41-ipxe's probe; s42-install)."""
    create: list[Machine] = []
    update: list[Machine] = []
    events: list[Event] = []
    audit: list[AuditEntry] = []
    expect: dict[str, MachineState] = {}
    versions: dict[str, float] = {}
    bases: dict[str, Machine] = {}
    seen: set[str] = set()
    for batch, _, _ in commits:
        made, changed, expected, read = batch.create, batch.update, batch.expect, batch.versions
        if not made and len(changed) == 1 and len(expected) <= 1 and (
                not read or (len(read) == 1 and changed[0].id in read)):
            # A group's commits are one machine's each, as a rule (an install's token, a
            # config fetched): its id alone, without a set made per commit of the group.
            ident = changed[0].id
            if expected and ident not in expected:
                other = next(iter(expected))
                if other in seen:
                    raise _OneByOne
                seen.add(other)
            if ident in seen:
                raise _OneByOne
            seen.add(ident)
        else:
            ids = {*expected, *read, *(m.id for m in changed), *(m.id for m in made)}
            if not seen.isdisjoint(ids):
                raise _OneByOne
            seen |= ids
            if made:
                create += made
        update += changed
        events += batch.events
        if expected:
            expect.update(expected)
        if read:
            versions.update(read)
        if batch.audit:
            audit += batch.audit
        if batch.bases:
            bases.update(batch.bases)
    return batch_of((), create, update, events, expect, versions, audit, bases, ())


def _rows(batch: Batch) -> int:
    """A write's size as netboot_inventory_commit_rows counts it: machines and events."""
    return len(batch.create) + len(batch.update) + len(batch.events) + len(batch.merge)


def _with(batch: Batch, events: list[Event], relearnt: list[tuple[Machine, Machine]],
          taught: set[str]) -> Batch:
    """``batch`` after the queued ``events``, with the learnt updates (compare-and-set on
    the state and version each machine was read in: learnt again on it, each is the whole
    machine, which must not undo a change committed since that read)."""
    # One walk over the learnt updates, not four (a storm's group commit learns ~256).
    update = list(batch.update)
    expect: dict[str, MachineState] = {}
    versions: dict[str, float] = {}
    bases: dict[str, Machine] = {}
    for old, new in relearnt:
        update.append(new)
        ident = old.id
        expect[ident] = old.state
        versions[ident] = old.updated
        bases[ident] = old
    if batch.expect:
        expect.update(batch.expect)
    if batch.versions:
        versions.update(batch.versions)
    if batch.bases:
        bases.update(batch.bases)
    # ``taught``: the learnt updates that are their base with only what a boot request
    # teaches (_relearn), written without comparing the other fields (Batch.learnt).
    learnt: Collection[str] = taught if not batch.learnt else {*batch.learnt, *taught}
    return Batch(merge=batch.merge, create=batch.create, update=update,
                 events=codec.joined(events, batch.events), expect=expect, versions=versions,
                 audit=batch.audit, bases=bases, learnt=learnt)


def _fate(group: _Group, done: asyncio.Future[None]) -> asyncio.Future[None]:
    """What tells the batch of a commit whose caller was cancelled (``done``: its future)
    whether it was written, once its group has written it or refused it."""
    if not done.cancelled():  # settled just before the cancel came
        return done
    # Kept in the group (which ends with its task): deleted, the group's last settle
    # (_group_ended, after its task) made a new fate that nobody reads ("Future exception
    # was never retrieved" at shutdown).
    return group.fate(done)


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)
