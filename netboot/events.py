"""The in-process event bus: every recorded machine event, fanned out to live watchers.

The stores call :meth:`EventBus.published` after an event is committed (see
``netboot.inventory.base.EventListener``); the dashboard's Server-Sent Events stream, the
metrics and ``netboot events --follow`` (through that stream) subscribe here. Nothing polls the
database for news.

Several servers sharing one inventory: each publishes what it commits itself at once, and
:meth:`EventBus.relay` publishes what the others committed, as the inventory's event feed
(``Store.events_since``) gives it; the events this process published already are known by
their identity and not published twice.

A subscriber is a bounded queue: a browser tab that stops reading must not grow the server's
memory, so when its queue is full the oldest entries are dropped and the subscriber is told
how many it missed (the dashboard then reloads its page of machines instead of patching it).

A stream that drops (a proxy's idle timeout, a laptop's sleep, a server's stream closed)
resumes where it was: the browser's EventSource reconnects with ``Last-Event-ID``, the id of
the last event it read, and :meth:`EventBus.subscribe` (``after``) gives the new subscriber
what was published since, from the last ``keep`` events, which the bus keeps for
``keep_seconds`` after its last subscriber left (the gap had nobody subscribed to see it). A
place it no longer holds (too far back, or another process's: a restart) is a ``Missed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

from netboot.errors import Busy, RateLimited
from netboot.model import Event


@dataclass(frozen=True, slots=True)
class Published:
    """An event as watchers see it: numbered in publication order (the SSE ``id:``)."""

    seq: int
    event: Event


@dataclass(frozen=True, slots=True)
class Missed:
    """``count`` events were dropped because this subscriber read too slowly, or were
    published where a resumed stream cannot be given them (0: how many is not known)."""

    count: int


class Subscription:
    def __init__(self, bus: EventBus, size: int) -> None:
        self._bus = bus
        # None: the bus closed (the server stops), the stream ends.
        self._queue: asyncio.Queue[Published | None] = asyncio.Queue(maxsize=size)
        self.missed = 0
        self._unknown = False  # resumed from a place the bus does not hold: Missed(0)
        # The seq of the last event published before it: where a stream that drops before
        # its first event resumes (the stream's first message carries it as its id).
        self.place = bus._last

    def _offer(self, item: Published) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.missed += 1
        self._queue.put_nowait(item)

    async def next(self) -> Published | Missed | None:
        """The next event, or a :class:`Missed` first when events were dropped; None once
        the bus is closed (:meth:`EventBus.close`)."""
        if self.missed or self._unknown:
            return self._missed()
        return await self._queue.get()

    def _missed(self) -> Missed:
        missed = Missed(self.missed)
        self.missed, self._unknown = 0, False
        return missed

    def ready(self) -> list[Published | Missed]:
        """What :meth:`next` would return now without waiting, all of it (at most the
        queue's size, and a :class:`Missed` first): a stream writes a burst as one chunk."""
        out: list[Published | Missed] = []
        if self.missed or self._unknown:
            out.append(self._missed())
        queue = self._queue
        while not queue.empty():
            item = queue.get_nowait()
            if item is None:  # the bus closed (EventBus.close): next() says so after this
                queue.put_nowait(None)
                break
            out.append(item)
        return out

    def _resume(self, items: Sequence[Published] | Missed) -> None:
        if isinstance(items, Missed):
            self.missed, self._unknown = items.count, not items.count
            return
        for item in items:
            self._offer(item)

    def close(self) -> None:
        self._bus._left(self)

    def _end(self) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(None)


class EventBus:
    """Fan-out of committed events to subscribers and synchronous listeners (metrics)."""

    def __init__(self, *, queue_size: int = 1000, max_subscribers: int = 256,
                 max_per_holder: int = 32, max_own: int = 50_000, keep: int = 1000,
                 keep_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._subscribers: set[Subscription] = set()
        # Streams open per holder (a token's name): one read token held every one of
        # max_subscribers, and every other dashboard was refused (benchmarks/README.md,
        # s37-attack, s37-polish); 32 leaves a wall of dashboards sharing a token its tabs.
        self._held_by: dict[str, int] = {}
        self.max_per_holder = max_per_holder
        # Identities of events published here that the feed has not shown back yet (bounded:
        # without a relay running, e.g. in the CLI, the oldest are forgotten).
        self._own: OrderedDict[tuple[str, float, str, str], None] = OrderedDict()
        self._max_own = max_own
        self._held: list[Event] = []  # from the feed, published at the next relay()
        self._listeners: list[Callable[[Event], None]] = []
        # The newest seq given. Events published while nobody watches are counted too (not
        # kept): a stream resuming from before them is told it missed them.
        self._last = 0
        # A stream resuming from a place before this seq is told Missed(0): the feed was not
        # read after it (nobody watched, :meth:`unread`), so what others committed is unknown.
        self._unread_before = 0
        # What a stream that dropped is given when it resumes (subscribe's ``after``): the
        # newest ``keep`` events, kept while a stream is open and ``keep_seconds`` after the
        # last closed (EventSource retries after 3 s; a proxy's or a sleep's gap is longer).
        self._recent: deque[Published] = deque(maxlen=keep)
        self._keep_seconds = keep_seconds
        self._kept_until = -math.inf
        self._clock = clock
        # Names this process's places: a place another process gave (a restart, another
        # server behind the same name) is not one of this bus's.
        self.instance = secrets.token_hex(4)
        self.queue_size = queue_size
        self.max_subscribers = max_subscribers
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def relaying(self) -> bool:
        """Whether anyone watches the streams, so that other servers' events are worth
        reading from the feed (:meth:`relay`). Nobody watching, the feed is not read: the
        watcher only keeps its place at the newest event (a storm's ~4,000 events a second
        were each read back, decoded and told from this process's own, ~5 % of the GIL).
        For ``keep_seconds`` after the last stream closed the feed is still read: a stream
        that resumes is given what others committed in its gap too."""
        return self._watched()

    @property
    def holding(self) -> bool:
        """Whether events published now are kept past the call (``EventListener``): only a
        subscriber's queue and the events kept for a resume (``keep_seconds`` after the
        last stream closed) keep them; the synchronous listeners (metrics) read an event's
        machine, time and kind as they are told of it."""
        return self._watched()

    def _watched(self) -> bool:
        if self._subscribers:
            return True
        if self._kept_until == -math.inf:  # no stream closed lately: no clock read
            return False
        if self._clock() < self._kept_until:
            return True
        self._kept_until = -math.inf
        return False

    def published(self, events: Sequence[Event]) -> None:
        """Called by a store once ``events`` are committed, on the event loop's thread."""
        for event in events:
            for listen in self._listeners:
                listen(event)
        if not self._watched():
            # Nobody to tell, and nothing to tell apart from the feed, which is not read
            # meanwhile (relaying): the identities of earlier ones are dropped too, and the
            # events kept for a resume (a stream resuming now is told it missed some).
            self._own.clear()
            self._recent.clear()
            self._last += len(events)
            return
        for event in events:
            self._own[_identity(event)] = None
        while len(self._own) > self._max_own:
            self._own.popitem(last=False)
        self._offer(events)

    def relay(self, events: Sequence[Event]) -> None:
        """Events from the inventory's feed, in commit order (call it periodically: each
        call publishes what the previous one was given): those another server committed
        go to the subscribers (live streams; not to the listeners: each server's metrics
        count what it did); those this process committed were published already."""
        # Held for one call: an event this process committed may be read back by the feed
        # a moment before the store publishes it here (both wait on the same commit).
        held, self._held = self._held, list(events)
        if not self._watched():
            self._last += len(held)  # at most: some may be this process's, counted already
            return
        self._offer([e for e in held if not self._seen(e)])

    def unread(self) -> None:
        """The feed was not read while nobody watched (relaying false): the watcher moved its
        place past whatever other servers committed meanwhile. A stream resuming from a place
        before now is told it missed events, how many not known; it was given none and told
        nothing, its dashboard showing those servers' machines as they were (s48-attack).
        The newest seq moves by one, a place no event has: a stream opened from now on is
        given it, and misses nothing."""
        self._recent.clear()
        self._last += 1
        self._unread_before = self._last

    def _seen(self, event: Event) -> bool:
        key = _identity(event)
        if key in self._own:
            del self._own[key]
            return True
        return False

    def _offer(self, events: Sequence[Event]) -> None:
        for event in events:
            self._last += 1
            item = Published(self._last, event)
            self._recent.append(item)
            for sub in self._subscribers:
                sub._offer(item)

    def _since(self, after: int) -> list[Published] | Missed:
        """What was published after ``after`` (a seq this bus gave), or a Missed when the
        kept events no longer reach back to it (or it is no seq of this bus: -1)."""
        last, recent = self._last, self._recent
        if after == last:
            return []
        if after < self._unread_before:
            return Missed(0)
        if recent and recent[0].seq - 1 <= after < last:
            return [item for item in recent if item.seq > after]
        return Missed(last - after if 0 <= after < last else 0)

    def _left(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)
        if not self._subscribers:
            self._kept_until = self._clock() + self._keep_seconds

    def listen(self, callback: Callable[[Event], None]) -> None:
        """``callback(event)`` for every event, synchronously (must be cheap, must not raise)."""
        self._listeners.append(callback)

    def close(self) -> None:
        """The server stops: every subscriber's stream ends now, and none opens again. An
        open stream (a dashboard's tab) otherwise held the HTTP server's shutdown for
        aiohttp's two 60 s waits, ~127 s measured, past systemd's 90 s stop timeout
        (s36-attack)."""
        self._closed = True
        for sub in self._subscribers:
            sub._end()
        self._subscribers.clear()

    def event_id(self, seq: int) -> str:
        """The SSE ``id:`` of the event (or the place) ``seq``: this process's instance and
        the seq, so that a resume from another process's id is told apart (:meth:`seq_of`)."""
        return f"{self.instance}.{seq}"

    def seq_of(self, event_id: str) -> int:
        """The seq of an ``id:`` this bus gave (:meth:`event_id`); -1 for one of another
        process (a restart, another server behind the name) or none of ours."""
        instance, _, seq = event_id.partition(".")
        if instance != self.instance or not (seq.isascii() and seq.isdigit()) or len(seq) > 18:
            return -1
        return int(seq)

    @contextlib.contextmanager
    def subscribe(self, holder: str | None = None, *,
                  after: int | None = None) -> Iterator[Subscription]:
        """A stream's subscription; ``holder`` (a token's name) may hold ``max_per_holder``
        at once (429, RateLimited), all of them ``max_subscribers`` (503, Busy). ``after``:
        the seq of the last event a dropped stream read (its ``Last-Event-ID``; -1 for a
        place of another process): what was published since comes first, or a Missed."""
        if self._closed:
            raise Busy("the server is shutting down")
        held = self._held_by.get(holder, 0) if holder is not None else 0
        if held >= self.max_per_holder:
            raise RateLimited(f"token {holder!r} holds {held} event streams already, the most "
                              f"one token may hold ({self.max_subscribers} in all): close one "
                              "(a dashboard tab) or use another token", retry_after=30)
        if len(self._subscribers) >= self.max_subscribers:
            raise Busy(f"{len(self._subscribers)} event streams are open already, the most "
                       "the server holds")
        sub = Subscription(self, self.queue_size)
        if after is not None:
            sub._resume(self._since(after))
        self._subscribers.add(sub)
        if holder is not None:
            self._held_by[holder] = held + 1
        try:
            yield sub
        finally:
            sub.close()
            if holder is not None:
                if left := self._held_by[holder] - 1:
                    self._held_by[holder] = left
                else:
                    del self._held_by[holder]

    async def stream(self) -> AsyncIterator[Published | Missed]:
        with self.subscribe() as sub:
            while True:
                item = await sub.next()
                if item is None:
                    return
                yield item


def _identity(event: Event) -> tuple[str, float, str, str]:
    # Machine, time (the writer's clock, to the microsecond), kind and message: two events
    # equal in all four are one event seen twice.
    return (event.machine, event.time, event.kind, event.message)
