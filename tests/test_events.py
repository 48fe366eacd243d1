"""The in-process event bus: fan-out in order, bounded queues that say what they dropped."""

from __future__ import annotations

import asyncio

import pytest

from netboot.errors import Busy, RateLimited
from netboot.events import EventBus, Missed, Published
from netboot.inventory.memory import MemoryStore
from netboot.model import Event


def ev(i: int) -> Event:
    return Event(f"m-{i}", float(i), "progress", str(i))


async def test_every_subscriber_gets_events_in_order() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.listen(seen.append)
    with bus.subscribe() as a, bus.subscribe() as b:
        bus.published([ev(1), ev(2)])
        for sub in (a, b):
            first, second = await sub.next(), await sub.next()
            assert isinstance(first, Published) and isinstance(second, Published)
            assert (first.event, second.event) == (ev(1), ev(2))
            assert second.seq == first.seq + 1
    assert seen == [ev(1), ev(2)]
    assert bus.subscribers == 0


async def test_a_slow_reader_is_told_what_it_missed() -> None:
    bus = EventBus(queue_size=3)
    with bus.subscribe() as sub:
        bus.published([ev(i) for i in range(10)])
        missed = await sub.next()
        assert missed == Missed(7)
        rest = [await sub.next() for _ in range(3)]
        assert [r.event.message for r in rest if isinstance(r, Published)] == ["7", "8", "9"]


async def test_streams_are_capped() -> None:
    bus = EventBus(max_subscribers=1)
    with bus.subscribe(), pytest.raises(Busy), bus.subscribe():
        pass


async def test_streams_are_capped_per_holder_and_given_back() -> None:
    bus = EventBus(max_subscribers=4, max_per_holder=2)
    with bus.subscribe("wall"), bus.subscribe("wall"):
        with (pytest.raises(RateLimited, match=r"token 'wall' holds 2 event streams already"),
              bus.subscribe("wall")):
            pass
        with bus.subscribe("other"), bus.subscribe(None):
            assert bus.subscribers == 4
    with bus.subscribe("wall"), bus.subscribe("wall"):
        assert bus.subscribers == 2


async def test_closing_the_bus_ends_every_stream_and_opens_none() -> None:
    # The server stops: a waiting reader (an SSE handler) is woken with the end, a full
    # queue's reader too, and no stream opens after (s36-attack).
    bus = EventBus(queue_size=2)
    with bus.subscribe() as waiting, bus.subscribe() as full:
        bus.published([ev(1), ev(2)])
        assert isinstance(await waiting.next(), Published)
        assert isinstance(await waiting.next(), Published)
        reader = asyncio.ensure_future(waiting.next())
        await asyncio.sleep(0)
        bus.close()
        assert await asyncio.wait_for(reader, 1) is None
        items = [await full.next() for _ in range(2)]
        assert items[-1] is None and bus.subscribers == 0
    with pytest.raises(Busy), bus.subscribe():
        pass


async def test_a_burst_read_before_the_bus_closed_ends_with_the_close() -> None:
    # The live feed writes a burst at once (Subscription.ready, s36-ops) and ends when the
    # server stops (EventBus.close, s36-attack): what was queued before the close goes out,
    # the close is not taken for an event and is still there for next() after the burst.
    bus = EventBus(queue_size=4)
    with bus.subscribe() as sub:
        bus.published([ev(1), ev(2)])
        bus.close()
        first = await sub.next()
        assert isinstance(first, Published)
        burst = sub.ready()
        assert [type(x) for x in burst] == [Published]
        assert await asyncio.wait_for(sub.next(), 1) is None


async def test_the_store_publishes_committed_events_only() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.listen(seen.append)
    store = MemoryStore(listener=bus)
    await store.open()
    await store.add_event(ev(1))
    assert [e.message for e in seen] == ["1"]


async def test_relay_publishes_other_servers_events_once_and_not_ours() -> None:
    """Events read back from a shared inventory's feed: this process's own (already
    published) are not published again, another server's go to the streams, one call late
    (an own event may be read back a moment before the store publishes it), and not to the
    metrics: each server counts what it did."""
    bus = EventBus()
    counted: list[Event] = []
    bus.listen(counted.append)
    with bus.subscribe() as sub:
        bus.relay([ev(1), ev(2)])  # 1: ours, read back before the store published it
        bus.published([ev(1)])
        assert isinstance(first := await sub.next(), Published) and first.event == ev(1)
        bus.relay([ev(3)])  # now 1 (ours: skipped) and 2 (another server's) are published
        bus.relay([])  # and 3
        relayed = [await sub.next() for _ in range(2)]
        assert [r.event for r in relayed if isinstance(r, Published)] == [ev(2), ev(3)]
    assert counted == [ev(1)]


async def test_ready_takes_everything_queued_without_waiting_missed_first() -> None:
    """A stream writes a burst as one chunk (api.event_stream): what is queued, at once."""
    bus = EventBus(queue_size=3)
    with bus.subscribe() as sub:
        assert sub.ready() == []
        bus.published([ev(i) for i in range(5)])
        got = sub.ready()
        assert got[0] == Missed(2)
        assert [r.event.message for r in got[1:] if isinstance(r, Published)] == ["2", "3", "4"]
        assert sub.ready() == [] and sub.missed == 0


async def test_a_dropped_stream_resumes_with_what_was_published_in_its_gap() -> None:
    """A browser's EventSource reconnects with the last id it read (Last-Event-ID): it is
    given what came since, though nobody was subscribed meanwhile (its one stream had
    dropped), for keep_seconds after the last stream closed and from the newest keep
    events; further back, after that, or from another process's place: Missed."""
    now = [100.0]
    bus = EventBus(keep=5, keep_seconds=60.0, clock=lambda: now[0])
    assert not bus.holding
    with bus.subscribe() as sub:
        assert sub.place == 0
        bus.published([ev(1), ev(2)])
        read = [await sub.next(), await sub.next()]
    last = read[-1]
    assert isinstance(last, Published) and last.event == ev(2)
    # The stream dropped: the events of the gap are kept (and the feed still relayed).
    now[0] += 30
    assert bus.holding and bus.relaying
    bus.published([ev(3), ev(4)])
    with bus.subscribe(after=last.seq) as sub:
        got = sub.ready()
        assert [p.event for p in got if isinstance(p, Published)] == [ev(3), ev(4)]
        assert not any(isinstance(p, Missed) for p in got)
        assert sub.place == last.seq + 2
    with bus.subscribe(after=last.seq + 2) as sub:  # nothing missed: nothing given
        assert sub.ready() == []
    # Further back than the newest five: how many were missed, not which.
    bus.published([ev(i) for i in range(5, 12)])
    with bus.subscribe(after=last.seq) as sub:
        assert sub.ready() == [Missed(9)]
    # Another process's place (a restart): missed, how many not known.
    with bus.subscribe(after=-1) as sub:
        got = sub.ready()
        assert got == [Missed(0)]
    # A minute after the last stream closed, nothing is kept any more.
    now[0] += 61
    assert not bus.holding and not bus.relaying
    bus.published([ev(12)])
    with bus.subscribe(after=last.seq + 9) as sub:
        assert sub.ready() == [Missed(1)]
