"""Group commits of boot events: batched, ordered, flushed on shutdown, and nothing a device
was told is lost when the server is killed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import textwrap
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from netboot.boot import hash_token
from netboot.errors import NotFound, OutcomeUnknown, StateChanged
from netboot.inventory import codec
from netboot.inventory.base import Batch
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Event, MacAddress, Machine, MachineState
from netboot.recorder import Recorder
from tests import pg
from tests.held_store import begun, held_writer, write_lock, writes_waiting
from tests.killed import killed_after


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    """The recorder's store, and a second connection that sees only what is committed."""
    own, other = SqliteStore(tmp_path / "n.db"), SqliteStore(tmp_path / "n.db")
    await own.open()
    await other.open()
    yield own, other
    await own.close()
    await other.close()


MAC = MacAddress.parse("02:00:00:00:00:09")


def ev(kind: str, machine: str = "m1") -> Event:
    return Event(machine, 1.0, kind, kind)


async def kinds(store: SqliteStore, machine: str = "m1") -> list[str]:
    return [e.kind for e in await store.list_events(machine)]


async def test_queued_events_wait_for_one_commit_and_flush_writes_them(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    own, other = stores
    recorder = Recorder(own, delay=3600)  # only flush() writes here
    for kind in ("a", "b", "c"):
        recorder.record(ev(kind))
    assert recorder.pending("m1") is not None and recorder.pending("m1").kind == "c"  # type: ignore[union-attr]
    assert await kinds(other) == []
    await recorder.close()  # shutdown
    assert await kinds(other) == ["a", "b", "c"]
    assert recorder.pending("m1") is None


async def test_the_delay_bounds_how_long_an_event_waits(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    own, other = stores
    recorder = Recorder(own, delay=0.01)
    recorder.record(ev("a"))
    writer = recorder._writer  # the scheduled group commit
    assert writer is not None
    await writer
    assert await kinds(other) == ["a"]


async def test_a_commit_keeps_history_in_order_and_a_failed_one_loses_nothing(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    own, other = stores
    recorder = Recorder(own, delay=3600)
    recorder.record(ev("queued"))
    with pytest.raises(NotFound):
        await recorder.commit(Batch(update=(Machine(id="m-nobody", macs=(MAC,)),),
                                    events=(ev("told"),)))
    assert await kinds(other) == []  # all or nothing
    await recorder.commit(Batch(events=(ev("told"),)))
    assert await kinds(other) == ["queued", "told"]


SERVER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from netboot.boot import BootService, BootSettings
    from netboot.enroll import Enroller
    from netboot.files import FileTree
    from netboot.inventory.sqlite import SqliteStore
    from netboot.model import Arch, BootRequest, Firmware, MacAddress, Machine, Profile

    async def main() -> None:
        store = SqliteStore(sys.argv[1])
        await store.open()
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        mac = MacAddress.parse("02:00:00:00:00:01")
        await store.create_machine(Machine(macs=(mac,), profile="p"))
        enroller = Enroller(store)
        boot = BootService(store, FileTree([Path(sys.argv[2])]), BootSettings(), enroller)
        enroller.recorder._delay = 3600  # queued notes stay queued until the kill
        plan = await boot.plan(BootRequest(mac=mac, firmware=Firmware.IPXE, arch=Arch.X86_64,
                                           via="http"))
        await boot.first_stage(BootRequest(mac=mac, firmware=Firmware.IPXE, arch=Arch.X86_64,
                                           via="dhcp"))
        print(plan.token, flush=True)  # what the device is told
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_what_a_device_was_told_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "n.db"
    token = killed_after(SERVER, [str(db), str(tmp_path)], lambda out: out.readline().strip())
    assert token and token != "None"
    store = SqliteStore(db)
    await store.open()
    try:
        machine = await store.machine_by("mac", "02:00:00:00:00:01")
        assert machine is not None and machine.state == MachineState.BOOTING
        assert machine.token_hash == hash_token(token)
        assert "install-plan" in await kinds(store, machine.id)
    finally:
        await store.close()


async def test_while_the_inventory_is_away_events_are_kept_bounded_and_written_after(
        tmp_path: Path) -> None:
    """While the store fails (closed under the recorder: every call is a StoreError) the
    queue is kept, the oldest dropped beyond the bound; open again, a flush writes the kept
    events in order."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    recorder = Recorder(store, delay=3600, max_queued=3)
    await store.close()
    recorder.record(ev("a"))
    await recorder.flush()
    assert recorder.failing is not None and recorder.queued == 1
    for kind in ("b", "c", "d"):
        recorder.record(ev(kind))
    assert recorder.queued == 3 and recorder.dropped == 1
    assert recorder.pending("m1") is not None and recorder.pending("m1").kind == "d"  # type: ignore[union-attr]
    await store.open()
    await recorder.flush()
    assert recorder.failing is None and recorder.queued == 0
    assert await kinds(store) == ["b", "c", "d"]
    await recorder.close()
    await store.close()


async def test_last_remembers_what_went_through_queued_or_committed(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    own, _ = stores
    recorder = Recorder(own, delay=3600)
    assert recorder.last("m1") is None
    recorder.record(ev("dhcp"))
    assert recorder.last("m1") == ("dhcp", "dhcp")  # queued
    await recorder.flush()
    assert recorder.last("m1") == ("dhcp", "dhcp")  # and still once written
    await recorder.commit(Batch(events=(ev("install"),)))
    assert recorder.last("m1") == ("install", "install")
    await recorder.close()


async def two_discovered(store: SqliteStore) -> tuple[Machine, Machine]:
    """Machines "a" and "b", discovered, created in ``store``."""
    a = Machine(macs=(MAC,), hostname="a", state=MachineState.DISCOVERED)
    b = Machine(macs=(MacAddress.parse("02:00:00:00:00:0a"),), hostname="b",
                state=MachineState.DISCOVERED)
    await store.create_machine(a)
    await store.create_machine(b)
    return a, b


async def test_grouped_commits_keep_compare_and_set(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """Commits written in one group carry their expectations: a stale one fails alone, and
    two that decide on one machine from the same state do not both win."""
    own, other = stores
    a, b = await two_discovered(own)
    recorder = Recorder(own, delay=3600)
    stale, fine = await asyncio.gather(
        recorder.commit(Batch(update=(replace(a, hostname="a2"),), events=(ev("x", a.id),),
                              expect={a.id: MachineState.REGISTERED})),
        recorder.commit(Batch(update=(replace(b, hostname="b2"),), events=(ev("y", b.id),),
                              expect={b.id: MachineState.DISCOVERED})),
        return_exceptions=True)
    assert isinstance(stale, StateChanged) and fine is None
    assert (await other.get_machine(a.id)).hostname == "a"  # type: ignore[union-attr]
    assert (await other.get_machine(b.id)).hostname == "b2"  # type: ignore[union-attr]
    assert await kinds(other, a.id) == [] and await kinds(other, b.id) == ["y"]
    moved = replace(a, state=MachineState.REGISTERED)
    results = await asyncio.gather(
        *(recorder.commit(Batch(update=(replace(moved, hostname=name),),
                                expect={a.id: MachineState.DISCOVERED}))
          for name in ("first", "second")), return_exceptions=True)
    assert results[0] is None and isinstance(results[1], StateChanged)
    assert (await other.get_machine(a.id)).hostname == "first"  # type: ignore[union-attr]
    await recorder.close()


async def test_a_commit_expecting_another_machine_of_its_group_is_written_after_it(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A commit that updates one machine on the state of another (its expectation names
    that other machine) is not merged with a commit of the same group that moves the
    other: one after the other, as they came, it meets the moved state and fails alone."""
    own, other = stores
    a, b = await two_discovered(own)
    recorder = Recorder(own, delay=3600)
    moved, decided = await asyncio.gather(
        recorder.commit(Batch(update=(replace(a, state=MachineState.REGISTERED),),
                              expect={a.id: MachineState.DISCOVERED})),
        recorder.commit(Batch(update=(replace(b, hostname="b2"),),
                              expect={a.id: MachineState.DISCOVERED})),
        return_exceptions=True)
    assert moved is None and isinstance(decided, StateChanged)
    assert (await other.get_machine(a.id)).state is MachineState.REGISTERED  # type: ignore[union-attr]
    assert (await other.get_machine(b.id)).hostname == "b"  # type: ignore[union-attr]
    await recorder.close()


async def test_learnt_facts_are_kept_through_an_outage_and_never_overwrite_a_move(
        tmp_path: Path) -> None:
    """Facts learnt on the boot path: kept while the store fails, written once it is back;
    dropped (the events still written) when the machine moved since it was read."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    machine = Machine(macs=(MAC,), hostname="h", state=MachineState.DISCOVERED)
    await store.create_machine(machine)
    recorder = Recorder(store, delay=3600)
    read: dict[str, Machine | None] = {}

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return {i: read.get(i) or await store.get_machine(i) for i in ids}

    recorder.newest = newest
    await store.close()
    recorder.record(ev("dhcp", machine.id))
    recorder.learned(machine.id, lambda m: replace(m, hostname="learnt"))
    await recorder.flush()
    assert recorder.failing is not None and recorder.queued == 1
    await store.open()
    await recorder.flush()
    assert recorder.failing is None and recorder.queued == 0
    assert (await store.get_machine(machine.id)).hostname == "learnt"  # type: ignore[union-attr]
    assert await kinds(store, machine.id) == ["dhcp"]
    # Another server moved it after this process read it: the facts are not written over.
    read[machine.id] = await store.get_machine(machine.id)
    moved = replace(read[machine.id], state=MachineState.REGISTERED)  # type: ignore[type-var]
    await store.update_machine(moved)
    recorder.record(ev("again", machine.id))
    recorder.learned(machine.id, lambda m: replace(m, hostname="stale"))
    await recorder.flush()
    assert recorder.failing is None
    now = await store.get_machine(machine.id)
    assert now is not None and now.state == MachineState.REGISTERED and now.hostname == "learnt"
    assert await kinds(store, machine.id) == ["dhcp", "again"]
    await recorder.close()
    await store.close()


async def test_only_machines_learnt_by_the_teaching_redos_alone_are_written_as_learnt(
        tmp_path: Path) -> None:
    """Batch.learnt (its other fields not compared by the store) names exactly the machines
    whose every queued redo is a partial of ``Recorder.teaches`` (boot's learn): one also
    given another redo (a hostname set) is written whole, and every change is stored."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    fleet = [Machine(macs=(MacAddress.parse(f"02:00:00:00:01:0{i}"),), id=f"m-t{i}",
                     hostname=f"h{i}") for i in range(3)]
    await store.apply_batch(Batch(create=fleet))
    recorder = Recorder(store, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return {i: await store.get_machine(i) for i in ids}

    def teach(fact: str, machine: Machine) -> Machine:
        return replace(machine, facts={**machine.facts, fact: "1"}, updated=machine.updated + 1)

    recorder.newest, recorder.teaches = newest, teach
    batches: list[Batch] = []
    apply = store.apply_batch

    async def seen(batch: Batch) -> None:
        batches.append(batch)
        await apply(batch)

    store.apply_batch = seen  # type: ignore[method-assign]
    recorder.learned("m-t0", functools.partial(teach, "a"))
    recorder.learned("m-t0", functools.partial(teach, "b"))
    recorder.learned("m-t1", functools.partial(teach, "a"))
    recorder.learned("m-t1", lambda m: replace(m, hostname="other", updated=m.updated + 1))
    recorder.learned("m-t2", lambda m: replace(m, facts={"c": "1"}, updated=m.updated + 1))
    await recorder.flush()
    assert [set(b.learnt) for b in batches] == [{"m-t0"}]
    stored = {m.id: m for m in await store.list_machines()}
    assert stored["m-t0"].facts == {"a": "1", "b": "1"} and stored["m-t0"].hostname == "h0"
    assert stored["m-t1"].facts == {"a": "1"} and stored["m-t1"].hostname == "other"
    assert stored["m-t2"].facts == {"c": "1"}
    await recorder.close()
    await store.close()


async def test_a_learnt_copy_is_written_only_when_it_differs_whatever_its_stamp(
        tmp_path: Path) -> None:
    """A redo's machine is written when it differs from the stored one: another stamp, or
    the same stamp (a test clock) with a fact changed; not an equal copy of the same stamp,
    nor the stored object itself (Recorder._relearn tells the stamps apart before it
    compares every field)."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    await store.create_machine(Machine(macs=(MAC,), hostname="h", updated=5.0))
    machine_id = (await store.list_machines())[0].id
    recorder = Recorder(store, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return {i: await store.get_machine(i) for i in ids}

    recorder.newest = newest
    updates: list[Machine] = []
    apply = store.apply_batch

    async def seen(batch: Batch) -> None:
        updates.extend(batch.update)
        await apply(batch)

    store.apply_batch = seen  # type: ignore[method-assign]
    for redo in (lambda m: m, lambda m: replace(m)):  # the same object; an equal copy
        recorder.learned(machine_id, redo)
        await recorder.flush()
        assert updates == []
    stamp = (await store.get_machine(machine_id)).updated  # type: ignore[union-attr]
    recorder.learned(machine_id, lambda m: replace(m, facts={"a": "1"}))  # the same stamp
    await recorder.flush()
    stored = await store.get_machine(machine_id)
    assert [m.facts for m in updates] == [{"a": "1"}]
    assert stored is not None and stored.facts == {"a": "1"} and stored.updated == stamp
    recorder.learned(machine_id, lambda m: replace(m, updated=stamp + 1))  # another stamp
    await recorder.flush()
    assert len(updates) == 2
    assert (await store.get_machine(machine_id)).updated == stamp + 1  # type: ignore[union-attr]
    await recorder.close()
    await store.close()


async def test_learnt_facts_never_undo_an_edit_made_after_their_machine_was_read(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The machine read for learnt facts, then an operator's edit by another process that
    keeps its state (a new cluster) before the write: the facts, learnt on the whole
    machine as read, are not written over the edit (Batch.versions); the events are."""
    store, other = stores
    machine = Machine(macs=(MAC,), hostname="h", state=MachineState.ENROLLED, updated=1.0)
    await store.create_machine(machine)
    recorder = Recorder(store, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        read = {i: await store.get_machine(i) for i in ids}
        edited = replace(read[machine.id], cluster="core", updated=2.0)  # type: ignore[type-var]
        await other.update_machine(edited, expect_state=MachineState.ENROLLED)
        return read

    recorder.newest = newest
    recorder.record(ev("dhcp", machine.id))
    recorder.learned(machine.id, lambda m: replace(m, hostname="learnt", updated=3.0))
    await recorder.flush()
    assert recorder.failing is None and recorder.queued == 0
    now = await other.get_machine(machine.id)
    assert now is not None and now.cluster == "core" and now.updated == 2.0
    assert await kinds(other, machine.id) == ["dhcp"]
    await recorder.close()


async def test_learning_shows_the_facts_queued_for_the_next_batch(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """What the boot path asks before queueing a fact again: the machine as the next batch
    will store it; once written, nothing is queued and the machine is its own answer."""
    own, _ = stores
    machine = Machine(macs=(MAC,), hostname="h")
    await own.create_machine(machine)
    recorder = Recorder(own, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return {i: await own.get_machine(i) for i in ids}

    recorder.newest = newest
    assert recorder.learning(machine) is machine
    recorder.learned(machine.id, lambda m: replace(m, facts={**m.facts, "a": "1"}))
    recorder.learned(machine.id, lambda m: replace(m, facts={**m.facts, "b": "2"}))
    assert recorder.learning(machine).facts == {"a": "1", "b": "2"}
    assert machine.facts == {}  # the caller's machine is not touched
    await recorder.flush()
    stored = await own.get_machine(machine.id)
    assert stored is not None and stored.facts == {"a": "1", "b": "2"}
    assert recorder.learning(stored) is stored
    await recorder.close()


async def test_a_storm_of_learnt_facts_is_adopted_a_slice_at_a_time(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A batch of many machines' facts is learnt again and handed to the view in slices,
    with the event loop running between them (DHCP answers go out meanwhile); every one is
    written and adopted."""
    own, other = stores
    machines = [Machine(macs=(MacAddress(bytes((2, 0, 0, 0, i >> 8, i & 255))),),
                        hostname=f"n{i}") for i in range(200)]
    await own.apply_batch(Batch(create=machines))
    recorder = Recorder(own, delay=3600)
    ticks = 0
    adopted: list[tuple[int, int]] = []  # (machines, ticks of the loop by then)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return {i: await own.get_machine(i) for i in ids}

    recorder.newest = newest
    recorder.adopt = lambda ms, read: adopted.append((len(ms), ticks))
    for machine in machines:
        recorder.learned(machine.id, lambda m: replace(m, facts={"cpus": "4"}))

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    await recorder.flush()
    ticker.cancel()
    assert sum(n for n, _ in adopted) == 200 and len(adopted) > 1
    assert all(a[1] < b[1] for a, b in itertools.pairwise(adopted))  # the loop ran between
    for machine in machines:
        stored = await other.get_machine(machine.id)
        assert stored is not None and stored.facts == {"cpus": "4"}
    await recorder.close()


async def test_a_run_of_events_goes_after_the_queued_ones_and_is_remembered(
        tmp_path: Path) -> None:
    # An import commits its new machines' events as one run (codec.EventRun): written after
    # the boot notes queued before it, told to the listener, and remembered per machine as
    # any committed event is, without the recorder making an event of each.
    told: list[Event] = []

    class Listener:
        holding = True

        def published(self, events: Sequence[Event]) -> None:
            told.extend(events)

    store = SqliteStore(tmp_path / "n.db", listener=Listener())
    await store.open()
    try:
        recorder = Recorder(store, delay=3600)
        recorder.record(ev("queued", "m0"))
        run = codec.EventRun([f"m{i}" for i in range(1, 4)], 2.0, "enrolled", "imported")
        await recorder.commit(Batch(events=codec.joined(run, [ev("after", "m2")])))
        _, written = await store.events_since(0)
        expected = [ev("queued", "m0"), *run, ev("after", "m2")]
        assert written == expected and told == expected
        assert recorder.last("m1") == ("enrolled", "imported")
        assert recorder.last("m2") == ("after", "after")
    finally:
        await store.close()


async def test_a_backlog_at_its_bound_waits_for_a_write_that_starts_at_once(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """room() returns at once under the bound; at it, it wakes the writer (asleep for an
    hour here) and returns once a write has taken the backlog, not before."""
    own, other = stores
    recorder = Recorder(own, delay=3600, backlog=4)
    recorder.record(ev("e0"))
    await recorder.room()  # under the bound: no wait
    async with recorder._lock:  # a write under way: the backlog cannot be taken yet
        for k in range(1, 4):
            recorder.record(ev(f"e{k}"))
        assert recorder.crowded() and recorder.backlog == 4
        waiting = asyncio.ensure_future(recorder.room())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done()
    await asyncio.wait_for(waiting, 30)  # taken by the writer it woke, not in an hour
    assert not recorder.crowded()
    await recorder.close()
    assert await kinds(other) == ["e0", "e1", "e2", "e3"]


async def test_a_slow_write_does_not_queue_a_flush_per_delay_behind_it(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """While a write holds the lock, events recorded one after another arm one background
    write, not one per ``delay`` (a storm's slow batch had 221 flushes queued behind it)."""
    own, other = stores
    recorder = Recorder(own, delay=0.001)
    async with recorder._lock:
        for k in range(20):
            recorder.record(ev(f"e{k}"))
            await asyncio.sleep(0.005)  # past the delay: the writer waits for the lock
        assert len(recorder._lock._waiters or ()) == 1
    await recorder.close()
    assert await kinds(other) == [f"e{k}" for k in range(20)]


def commits_then_unknown(store: SqliteStore) -> list[Batch]:
    """``store``'s next write commits and then raises OutcomeUnknown (its connection lost
    during the COMMIT, the server not asked within the bound); the writes after it are the
    store's own. The batch so written is put in the list returned."""
    apply = store.apply_batch
    lost: list[Batch] = []

    async def apply_batch(batch: Batch) -> None:
        await apply(batch)
        if not lost:
            lost.append(batch)
            raise OutcomeUnknown("the connection failed during the COMMIT")

    store.apply_batch = apply_batch  # type: ignore[method-assign]
    return lost


async def test_a_group_whose_outcome_is_unknown_is_not_written_again_one_by_one(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A group commit the store cannot say was written (OutcomeUnknown: its connection
    lost during the COMMIT, the server not asked within the bound), that was in fact: each
    of its batches is told so, not written again alone (the one-by-one replay meant for a
    batch refused for what it is). Replayed, every event and audit entry of the group was
    stored twice and each caller told "written"; a create was a Conflict of its own write."""
    own, other = stores
    lost = commits_then_unknown(own)
    recorder = Recorder(own, delay=3600)
    created = Machine(macs=(MAC,), hostname="new")
    results = await asyncio.gather(
        recorder.commit(Batch(events=(ev("x", "m1"),))),
        recorder.commit(Batch(create=(created,), events=(ev("y", created.id),))),
        return_exceptions=True)
    assert len(lost[0].events) == 2  # one group
    assert [type(r) for r in results] == [OutcomeUnknown, OutcomeUnknown]
    assert await kinds(other, "m1") == ["x"]
    assert await kinds(other, created.id) == ["y"]
    del own.apply_batch
    await recorder.close()


# --- a caller cancelled while its batch is written learns what became of it ----------------


async def until_waiting(store: SqliteStore) -> None:
    for _ in range(500):
        if writes_waiting(store):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no write waits behind the held writer within 5 s")


async def test_a_commit_cancelled_while_written_returns_and_its_cancel_comes_after(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The group writes a cancelled caller's batch all the same: the caller is not told
    "cancelled" (nothing done, as far as it knows) before that write ends, and a batch that
    was written returns as written (its caller's audit entry, the view's copy of a token it
    carried), the cancel delivered at the caller's next wait."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    said: list[str] = []

    async def caller() -> None:
        await recorder.commit(Batch(events=(ev("told"),)), version="v1")
        said.append("written")
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    gate = held_writer(own)
    try:
        task = asyncio.ensure_future(caller())
        await until_waiting(own)  # its batch in the group, the group's write held
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # waiting for its batch's fate, not told "cancelled"
    finally:
        gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert said == ["written"]
    assert await kinds(other) == ["told"]
    assert recorder.last("m1") == ("told", "told")
    assert recorder.repeats("m1", "told", "told", "v1")  # remembered with its version


async def test_a_commit_cancelled_while_refused_is_cancelled_with_nothing_written(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    own, other = stores
    recorder = Recorder(own, delay=3600)
    said: list[str] = []

    async def caller() -> None:
        await recorder.commit(Batch(update=(Machine(id="m-nobody", macs=(MAC,)),),
                                    events=(ev("told"),)))
        said.append("written")

    gate = held_writer(own)
    try:
        task = asyncio.ensure_future(caller())
        await until_waiting(own)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()
    finally:
        gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert said == []
    assert await kinds(other) == []


async def test_a_cancelled_commit_in_a_group_learns_its_own_fate_not_the_groups(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """Two commits gathered in one group, one refused: written one at a time, the refused
    one's cancelled caller is cancelled, the written one's returns."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    said: list[str] = []

    async def caller(name: str, batch: Batch) -> None:
        await recorder.commit(batch)
        said.append(name)

    gate = held_writer(own)
    try:
        first = asyncio.ensure_future(recorder.commit(Batch(events=(ev("first"),))))
        await until_waiting(own)  # the first group's write held: the next two gather
        good = asyncio.ensure_future(caller("good", Batch(events=(ev("good"),))))
        bad = asyncio.ensure_future(caller("bad", Batch(
            update=(Machine(id="m-nobody", macs=(MAC,)),), events=(ev("bad"),))))
        await asyncio.sleep(0.05)  # both in the next group (it waits for the lock)
        good.cancel()
        bad.cancel()
        await asyncio.sleep(0.05)
        assert not good.done() and not bad.done()
    finally:
        gate.set()
    await asyncio.wait_for(first, 30)
    # Written, and it ends with no wait left for its cancel: with its result (unstoppable).
    await asyncio.wait_for(good, 30)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(bad, 30)
    assert said == ["good"]
    assert await kinds(other) == ["first", "good"]


async def test_a_commit_cancelled_after_its_group_settled_it_still_learns_its_fate(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The cancel lands after the write ended but before its caller ran again: the group,
    next in the loop's queue, settles the batch before the caller can ask for its fate."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    said: list[str] = []

    async def caller() -> None:
        await recorder.commit(Batch(events=(ev("told"),)))
        said.append("written")

    gate = held_writer(own)
    try:
        task = asyncio.ensure_future(caller())
        await until_waiting(own)
    finally:
        gate.set()
    time.sleep(0.2)  # the write ends on its thread; its answer waits in the loop's queue
    await asyncio.sleep(0)  # taken: the group is next in the queue, then the cancel
    task.cancel()
    await asyncio.wait_for(task, 5)  # written, and no wait left for its cancel
    assert said == ["written"]
    assert await kinds(other) == ["told"]


async def test_a_timeout_around_a_written_commit_is_still_a_timeout(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The cancel a written commit delivers late is the one asked for, counted once: a
    deadline that passed while the write was held is a TimeoutError at the next wait in
    its scope, as asyncio.timeout promises, and the task is not cancelled again after it."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    gate = held_writer(own)
    release = asyncio.get_running_loop().call_later(0.2, gate.set)
    said: list[str] = []
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await recorder.commit(Batch(events=(ev("told"),)))
                said.append("written")
                await asyncio.sleep(5)
    finally:
        release.cancel()
        gate.set()
    await asyncio.sleep(0)  # no cancel left over for this task
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0
    assert said == ["written"]
    assert await kinds(other) == ["told"]


async def test_a_cancelled_commit_ends_when_its_group_is_cancelled_before_it_writes(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """asyncio.run's end cancels every task left, the group waiting for the lock among
    them: a caller cancelled while its group waited must then be told (its batch was not
    written), not wait for a fate nobody will settle (a shutdown that hangs)."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    gate = held_writer(own)
    try:
        first = asyncio.ensure_future(recorder.commit(Batch(events=(ev("first"),))))
        await until_waiting(own)  # the first group's write held: the next one waits
        waiting = asyncio.ensure_future(recorder.commit(Batch(events=(ev("second"),))))
        await asyncio.sleep(0.05)  # its group is waiting for the lock
        groups = [t for t in recorder._groups if not t.done()]
        assert len(groups) == 2
        waiting.cancel()
        await asyncio.sleep(0.05)
        for task in groups:
            task.cancel()
        done, _ = await asyncio.wait((waiting,), timeout=5)
        assert waiting in done, "the cancelled caller still waits for its batch's fate"
        assert waiting.cancelled()
    finally:
        gate.set()
    await asyncio.wait((first,), timeout=30)
    await recorder.close()
    assert "second" not in await kinds(other)


async def test_a_group_cancelled_before_it_ran_settles_its_batches_and_gathers_no_more(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """asyncio.run's end (or a loop stopped by a signal, then asyncio.run's end) cancels, in
    one go, a caller and the group task its commit has just made, before that task ran: a
    coroutine cancelled before it starts runs none of its body, so no ``except`` in it can
    settle its batches. The cancelled caller must be told all the same (not wait for a fate
    nobody settles: a shutdown that hangs), and a later commit must not join that dead group
    (it would wait for ever)."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    caller = asyncio.ensure_future(recorder.commit(Batch(events=(ev("lost"),))))
    await asyncio.sleep(0)  # the caller ran: its group task is made, not yet run
    groups = [t for t in recorder._groups if not t.done()]
    assert len(groups) == 1
    dead = recorder._gathering
    assert dead is not None
    for task in (*groups, caller):  # as asyncio.runners._cancel_all_tasks: all at once
        task.cancel()
    try:
        done, _ = await asyncio.wait((caller,), timeout=5)
        assert caller in done, "the cancelled caller still waits for its batch's fate"
        assert caller.cancelled()
        later = asyncio.ensure_future(recorder.commit(Batch(events=(ev("after"),))))
        done, _ = await asyncio.wait((later,), timeout=5)
        assert later in done, "a later commit joined the dead group"
        later.result()
    finally:
        for _, fut, _ in dead.batches:  # a failing run: free what waits, not a hung test
            dead.settle(fut, asyncio.CancelledError())
    await recorder.close()
    assert await kinds(other) == ["after"]


async def test_a_group_cancelled_while_the_thread_writes_it_tells_what_was_written(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """asyncio.run's end cancels every task at once: here a caller and its group whose
    write the store's thread had begun. The thread cannot be stopped and commits it: the
    caller must be told "written" (its audit entry "done", never "aborted" for what is
    durable), its cancel coming after, as when only the caller is cancelled."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    said: list[str] = []

    async def caller() -> None:
        await recorder.commit(Batch(events=(ev("told"),)))
        said.append("written")
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    gate = held_writer(own)
    with write_lock(own) as release:
        try:
            task = asyncio.ensure_future(caller())
            await until_waiting(own)
        finally:
            gate.set()
        await begun(own)  # the thread runs the group's write: it waits for the lock
        groups = [t for t in recorder._groups if not t.done()]
        assert len(groups) == 1
        for t in (*groups, task):  # as asyncio.runners._cancel_all_tasks
            t.cancel()
        await asyncio.sleep(0.05)
        release()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    assert said == ["written"]
    assert await kinds(other) == ["told"]
    await asyncio.wait(groups, timeout=5)
    # Its write done, the group ends with no wait left for its own cancel: with its result.
    assert all(t.done() and not t.cancelled() and t.exception() is None for t in groups)


async def test_a_group_cancelled_during_its_postgres_commit_tells_what_was_written(
        pg_dsn: str) -> None:
    """The same on PostgreSQL: asyncio.run's end cancels a caller and its group while the
    group's COMMIT is under way, too far on to be stopped by the cancel asyncpg sends. The
    batch is durable: its caller is told "written" (its audit entry "done"), its cancel
    coming after (before: told cancelled, as if nothing had been written)."""
    store = PostgresStore(pg_dsn)
    await store.open()
    admin = await asyncpg.connect(pg_dsn)
    recorder = Recorder(store, delay=3600)
    said: list[str] = []
    try:
        task = await pg.committing(
            admin, lambda: recorder.commit(pg.slow_batch("deaf")), said)
        groups = [t for t in recorder._groups if not t.done()]
        assert len(groups) == 1
        for t in (*groups, task):  # as asyncio.runners._cancel_all_tasks
            t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        assert said == ["written"]
        assert [e.kind for e in await store.list_events("m1")] == ["deaf"]
        assert len(await store.list_audit()) == 1
    finally:
        await admin.close()
        await store.close()


async def test_a_group_cancelled_while_the_thread_writes_it_leaves_its_caller_written(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The group task alone cancelled during its write: its caller, not cancelled, returns
    as written (before: it got the group's CancelledError for a batch that was on disk)."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    gate = held_writer(own)
    with write_lock(own) as release:
        try:
            task = asyncio.ensure_future(recorder.commit(Batch(events=(ev("told"),))))
            await until_waiting(own)
        finally:
            gate.set()
        await begun(own)
        for t in list(recorder._groups):
            t.cancel()
        await asyncio.sleep(0.05)
        release()
        await asyncio.wait_for(task, 30)  # returns: written
    assert await kinds(other) == ["told"]


async def test_a_group_cancelled_before_the_thread_took_its_write_is_told_not_written(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """The other side: cancelled while its write still waited in the thread's queue, the
    write never runs and its caller is told so (not made to wait for it); the boot note
    queued before it, which that write had taken, stays queued for the next write."""
    own, other = stores
    recorder = Recorder(own, delay=3600)
    recorder.record(ev("note"))
    gate = held_writer(own)
    try:
        task = asyncio.ensure_future(recorder.commit(Batch(events=(ev("lost"),))))
        await until_waiting(own)  # queued behind the held writer, not begun
        groups = list(recorder._groups)
        for t in (*groups, task):
            t.cancel()
        done, _ = await asyncio.wait((task,), timeout=5)
        assert task in done and task.cancelled()
        assert recorder.queued == 1
    finally:
        gate.set()
    await recorder.close()
    assert await kinds(other) == ["note"]


async def test_a_flush_cancelled_before_its_write_began_keeps_what_it_took(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A flush cancelled at shutdown while its write waits for the writer thread: the notes
    and facts it took are not written, and stay queued for close()'s flush (they were
    dropped: lost history)."""
    own, other = stores
    recorder = Recorder(own, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        return dict.fromkeys(ids)  # gone: the facts change nothing when written

    recorder.newest = newest
    recorder.record(ev("note"))
    recorder.learned("m2", lambda m: m)
    gate = held_writer(own)
    try:
        flush = asyncio.ensure_future(recorder.flush())
        await until_waiting(own)
        flush.cancel()
        done, _ = await asyncio.wait((flush,), timeout=5)
        assert flush in done and flush.cancelled()
        assert recorder.queued == 1
        assert recorder.backlog == 2  # the note, and the facts of one machine
    finally:
        gate.set()
    await recorder.close()
    assert await kinds(other) == ["note"]


async def test_facts_a_cancelled_write_of_each_machine_alone_did_not_store_stay_queued(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A flush whose batch was refused for a learnt fact (a machine moved since it was
    read) writes its events without the facts, then each machine's facts alone. Cancelled
    there (at shutdown) while a machine's write waits for the writer thread: that write
    never runs, and the facts of that machine stay queued for close()'s flush (they were
    dropped: the events were written, so the cancel kept nothing)."""
    own, other = stores
    stale = Machine(macs=(MAC,), hostname="h1", state=MachineState.DISCOVERED)
    kept = Machine(macs=(MacAddress.parse("02:00:00:00:00:0a"),), hostname="h2",
                   state=MachineState.DISCOVERED)
    await own.apply_batch(Batch(create=(stale, kept)))
    recorder = Recorder(own, delay=3600)

    async def newest(ids: Collection[str]) -> dict[str, Machine | None]:
        read = {i: await own.get_machine(i) for i in ids}
        moved = read.get(stale.id)
        if moved is not None:
            # Read in another state than the stored one: the batch with its facts is refused.
            read[stale.id] = replace(moved, state=MachineState.REGISTERED)
        return read

    recorder.newest = newest
    recorder.record(ev("note", stale.id))
    recorder.learned(stale.id, lambda m: replace(m, hostname="learnt1"))
    recorder.learned(kept.id, lambda m: replace(m, hostname="learnt2"))
    apply = own.apply_batch
    holding = asyncio.Event()
    gates = []

    async def apply_batch(batch: Batch) -> None:
        if len(batch.update) == 1 and batch.update[0].id == kept.id and not batch.events:
            gates.append(held_writer(own))  # its own write: it waits behind the held one
            holding.set()
        await apply(batch)

    own.apply_batch = apply_batch  # type: ignore[method-assign]
    try:
        flush = asyncio.ensure_future(recorder.flush())
        await asyncio.wait_for(holding.wait(), 5)
        await until_waiting(own)
        flush.cancel()
        done, _ = await asyncio.wait((flush,), timeout=5)
        assert flush in done and flush.cancelled()
        assert recorder.queued == 0  # the note was written
        assert recorder.backlog == 1  # the facts of the one not stored
    finally:
        for gate in gates:
            gate.set()
        del own.apply_batch
    await recorder.close()
    assert await kinds(other, stale.id) == ["note"]
    now = await other.get_machine(kept.id)
    assert now is not None and now.hostname == "learnt2"


@pytest.mark.parametrize("strict", [True, False])
async def test_the_notes_of_a_write_whose_outcome_is_unknown_are_never_written_twice(
        stores: tuple[SqliteStore, SqliteStore], strict: bool) -> None:
    """Boot notes queued when a write took them whose outcome is unknown (OutcomeUnknown,
    here of a write that was in fact committed): not queued again, so never stored twice
    (strict: a caller's commit took them into its group; else the background flush). Queued
    again, the next write stored each of them a second time. The commit's caller is told
    the outcome is unknown; what is noted after is written as before."""
    own, other = stores
    lost = commits_then_unknown(own)
    recorder = Recorder(own, delay=3600)
    recorder.record(ev("noted", "m1"))
    if strict:
        with pytest.raises(OutcomeUnknown):
            await recorder.commit(Batch(events=(ev("told", "m2"),)))
    else:
        await recorder.flush()
    assert lost
    recorder.record(ev("after", "m1"))
    await recorder.flush()
    assert await kinds(other, "m1") == ["noted", "after"]
    if strict:
        assert await kinds(other, "m2") == ["told"]
    del own.apply_batch
    await recorder.close()


async def test_a_committed_event_is_remembered_once_with_its_commits_version(
        stores: tuple[SqliteStore, SqliteStore], monkeypatch: pytest.MonkeyPatch) -> None:
    """What each committed event said is remembered (note(), repeats()) once, as its batch
    is written, with the version its commit gives: each batch of a group with its own, a
    commit without one with None, as a flush's events. (It was remembered with None as
    written and again with the version as its caller went on: ~3,500 of a first install's
    loop instructions, session 28.)"""
    own, _ = stores
    recorder = Recorder(own, delay=3600)
    said: list[tuple[str, tuple[str, str], object]] = []
    remember = recorder._said
    monkeypatch.setattr(recorder, "_said", lambda machine, saying, version: (
        said.append((machine, saying, version)), remember(machine, saying, version)))
    first, second = object(), object()
    await asyncio.gather(recorder.commit(Batch(events=(ev("a", "m1"),)), version=first),
                         recorder.commit(Batch(events=(ev("b", "m2"),)), version=second),
                         recorder.commit(Batch(events=(ev("c", "m3"),))))
    assert said == [("m1", ("a", "a"), first), ("m2", ("b", "b"), second),
                    ("m3", ("c", "c"), None)]
    assert recorder.repeats("m1", "a", "a", first) and recorder.repeats("m2", "b", "b", second)
    assert not recorder.repeats("m1", "a", "a", second)
    said.clear()
    await recorder.commit(Batch(events=(ev("d", "m1"),)), version=second)  # a group of one
    assert said == [("m1", ("d", "d"), second)]
    await recorder.close()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_each_group_commit_is_told_its_rows_and_time(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """``committed`` (Metrics.inventory_commit: netboot_inventory_commit_*) hears of each
    group commit once it committed, on either store: its machines and events, its seconds
    from the write's start; a refused one is not a commit."""
    async with contextlib.AsyncExitStack() as stack:
        if kind == "sqlite":
            store: SqliteStore | PostgresStore = SqliteStore(tmp_path / "inv.db")
        else:
            cluster = request.getfixturevalue("postgres")
            store = PostgresStore(await stack.enter_async_context(pg.fresh_schema(cluster)))
        await store.open()
        stack.push_async_callback(store.close)
        told: list[tuple[int, float]] = []
        rec = Recorder(store, delay=60)
        rec.committed = lambda rows, seconds: told.append((rows, seconds))
        machine = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),))
        await store.create_machine(machine)
        rec.record(ev("held", machine.id))
        rec.record(ev("booted", machine.id))
        await rec.flush()
        assert [rows for rows, _ in told] == [2]
        await asyncio.gather(*(rec.commit(Batch(events=[ev(f"k{i}", machine.id)]))
                               for i in range(3)))
        assert [rows for rows, _ in told] == [2, 3]  # the three gathered in one
        assert all(0 < seconds < 10 for _, seconds in told)
        with pytest.raises(StateChanged):
            await rec.commit(Batch(update=[machine], events=[ev("x", machine.id)],
                                   expect={machine.id: MachineState.INSTALLED}))
        assert len(told) == 2


async def test_a_note_is_queued_exactly_when_repeats_says_it_is_none(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """note() has repeats() written out (s39-sighting): for every state a machine's newest
    saying can be in here (none; remembered for this version, another one, or none; queued
    alike or not), a note is dropped exactly when repeats() said so, it is compared with the
    store exactly when nothing here vouches for the version, and ``told`` moves with every
    note queued (boot._DhcpRepeat relies on it)."""
    own, _ = stores
    versions = (None, "v1", "v2")
    for remembered, queued, version, said in itertools.product(
            (None, *versions), (None, "same", "other"), versions, ("a", "b")):
        recorder = Recorder(own, delay=3600)
        if remembered is not None:
            recorder._said("m1", ("a", "a"), remembered)  # as a written event leaves it
        if queued is not None:
            recorder.record(Event("m1", 1.0, said if queued == "same" else "c",
                                  said if queued == "same" else "c"))
        expected_drop = recorder.repeats("m1", said, said, version)
        unsure_before = set(recorder._unsure)
        told, queue = recorder.told, recorder.queued
        event = Event("m1", 2.0, said, said)
        recorder.note(event, version)
        case = (remembered, queued, version, said)
        assert (recorder.queued == queue) is expected_drop, case
        assert (recorder.told == told) is expected_drop, case
        trusted = queued is not None or (remembered is not None and remembered is version)
        assert (recorder._unsure - unsure_before == {id(event)}) is (
            not expected_drop and not trusted), case
        if not expected_drop:
            assert recorder.last("m1") == (said, said) and recorder.pending("m1") is event
        recorder._cancel_asleep()


def test_a_groups_batches_are_merged_in_order_and_refused_where_two_write_one_machine() -> None:
    """recorder._merged (a group commit's batches as one, in one walk): every part of every
    batch in the order the batches came (machines, events, checks, audit entries, bases),
    as the seven comprehensions it replaced gave them; and _OneByOne wherever two batches
    update, create or expect one machine (the rule _overlap had), including through a
    version read alone and a machine one batch creates and another updates."""
    from netboot.model import AuditEntry
    from netboot.recorder import _merged, _OneByOne

    def machine(n: int) -> Machine:
        return Machine(macs=(MacAddress.parse(f"02:00:00:00:01:{n:02x}"),), id=f"m-{n}")

    m = [machine(n) for n in range(8)]
    entry = AuditEntry(time=1.0, actor="a", action="x", target="t", peer="p", outcome="ok")
    batches = [
        Batch(update=(m[0],), events=(ev("e0", m[0].id),), expect={m[0].id: MachineState.BOOTING},
              versions={m[0].id: 1.0}, bases={m[0].id: m[0]}),
        Batch(create=(m[1], m[2]), events=(ev("e1", m[1].id), ev("e2", m[2].id)),
              audit=(entry,)),
        Batch(update=(m[3], m[4]), expect={m[3].id: MachineState.ENROLLED},
              versions={m[4].id: 2.0}),
        Batch(update=(m[5],), expect={m[6].id: MachineState.INSTALLED}),
    ]
    commits = [(b, None, None) for b in batches]
    merged = _merged(commits)
    assert list(merged.create) == [m[1], m[2]]
    assert list(merged.update) == [m[0], m[3], m[4], m[5]]
    assert [e.kind for e in merged.events] == ["e0", "e1", "e2"]
    assert merged.expect == {m[0].id: MachineState.BOOTING, m[3].id: MachineState.ENROLLED,
                             m[6].id: MachineState.INSTALLED}
    assert list(merged.expect) == [m[0].id, m[3].id, m[6].id]
    assert merged.versions == {m[0].id: 1.0, m[4].id: 2.0}
    assert list(merged.audit) == [entry] and merged.bases == {m[0].id: m[0]}
    assert not merged.merge and not merged.learnt
    for other in (Batch(update=(m[0],)),  # one machine updated twice
                  Batch(update=(m[7],), expect={m[0].id: MachineState.BOOTING}),
                  Batch(update=(m[7],), versions={m[4].id: 2.0}),  # a version read alone
                  Batch(update=(m[1],)),  # created by one, updated by another
                  Batch(create=(m[6],))):  # expected by one, created by another
        with pytest.raises(_OneByOne):
            _merged([*commits, (other, None, None)])
    assert list(_merged([*commits, (Batch(update=(m[7],)), None, None)]).update)[-1] is m[7]
