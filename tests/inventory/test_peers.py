"""The inventory's record of netboot servers (netboot.inventory.peers), on real SQLite files:
two servers' stores on one file, as two processes on one host share it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.inventory.base import SERVERS
from netboot.inventory.peers import STALE_SECONDS, Peers, read_record, recorded
from netboot.inventory.sqlite import SqliteStore
from netboot.inventory.view import InventoryView

A, B, C = "http://192.0.2.1:8080", "http://192.0.2.2:8080", "http://192.0.2.3:8080"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    pair = SqliteStore(tmp_path / "netboot.db"), SqliteStore(tmp_path / "netboot.db")
    for store in pair:
        await store.open()
    yield pair
    for store in pair:
        await store.close()


async def test_two_servers_find_each_other_and_one_unheard_of_is_dropped(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """Each records itself and reads the other; a server not heard of for STALE_SECONDS is
    left out of the others and out of the record at the next write."""
    clock = Clock()
    a = Peers(stores[0], lambda: A, clock=clock)
    b = Peers(stores[1], lambda: B, clock=clock)
    await a.refresh()
    assert a.others == ()
    await b.refresh()
    assert b.others == (A,)
    await a.refresh()
    assert a.others == (B,)
    kept = a.others
    await a.refresh()  # nothing changed: the same tuple (Content compares it)
    assert a.others is kept
    # B stops saying it runs (stopped, or gone with its host): A drops it after STALE_SECONDS.
    clock.now += STALE_SECONDS - 1
    await a.refresh()
    assert a.others == (B,)
    clock.now += 2
    await a.refresh()
    assert a.others == ()
    assert set(read_record(await stores[0].get_setting(SERVERS))) == {A}


async def test_servers_recording_at_once_are_all_kept(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """Three servers writing the record at once (two stores: two connections to the file):
    a compare-and-set each, so no write is lost to another's (a put would keep the last)."""
    clock = Clock()
    peers = [Peers(stores[0], lambda: A, clock=clock), Peers(stores[1], lambda: B, clock=clock),
             Peers(stores[0], lambda: C, clock=clock)]
    await asyncio.gather(*(p.refresh() for p in peers))
    assert set(read_record(await stores[1].get_setting(SERVERS))) == {A, B, C}
    await asyncio.gather(*(p.refresh() for p in peers))
    assert [p.others for p in peers] == [(B, C), (A, C), (A, B)]


async def test_a_site_that_names_its_servers_is_given_those_and_each_records_itself(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    clock = Clock()
    named = Peers(stores[0], lambda: A, named=(B, C), clock=clock)
    other = Peers(stores[1], lambda: "http://198.51.100.9:8080", clock=clock)
    await other.refresh()
    await named.refresh()
    assert named.others == (B, C)
    named.heard(await stores[0].get_setting(SERVERS))
    assert named.others == (B, C)
    await other.refresh()
    assert other.others == (A,)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"ftp://x": 1, "http://y": "z"}',
                                  '{"http://y": true}', '{"http://y": NaN}'])
async def test_an_unreadable_record_is_written_afresh(
        stores: tuple[SqliteStore, SqliteStore], text: str) -> None:
    """A record a hand or another program broke names nothing a decision needs: read as
    empty, and replaced by the next server's write (which names itself)."""
    await stores[0].put_setting(SERVERS, text)
    peers = Peers(stores[1], lambda: A, clock=Clock())
    await peers.refresh()
    assert peers.others == ()
    assert json.loads(await stores[0].get_setting(SERVERS) or "") == {A: 1_000_000.0}


def test_the_record_is_the_same_text_for_the_same_servers() -> None:
    one = recorded({B: 5.0, C: 4.0}, A, 10.0)
    two = recorded({C: 4.0, B: 5.0}, A, 10.0)
    assert one == two == '{"http://192.0.2.1:8080":10.0,"http://192.0.2.2:8080":5.0,' \
                         '"http://192.0.2.3:8080":4.0}'


async def test_a_new_server_is_told_by_the_change_feed_without_remaking_the_views_answers(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """Another server's record reaches this one's view through the change feed (so a pair
    learns of a server that starts within the watcher's half second, not at its next
    refresh), and is no change of what a decision reads: the view's generation counters
    (every kept answer and text is checked against them) stay where they were."""
    clock = Clock()
    view = InventoryView(stores[0])
    await view.sync()
    shared, rules = view.shared, view.rules
    a = Peers(stores[0], lambda: A, clock=clock)
    await a.refresh()
    await Peers(stores[1], lambda: B, clock=clock).refresh()
    await view.sync()
    assert view.held_setting(SERVERS) is not None
    assert (view.shared, view.rules) == (shared, rules)
    assert a.others == ()
    record = view.held_setting(SERVERS)
    assert isinstance(record, str)
    a.heard(record)
    assert a.others == (B,)


async def test_a_loopback_or_unspecified_base_url_is_never_recorded_nor_offered(
        stores: tuple[SqliteStore, SqliteStore], caplog: pytest.LogCaptureFixture) -> None:
    """A server started with the defaults on a host without a default route has the base URL
    http://127.0.0.1:PORT: recorded, every device of the other server would register to
    itself. Such a server records nothing of its own (and says what to set), and a record an
    older netboot wrote with one (or 0.0.0.0, ::1, localhost) offers it to no one (s49-ha)."""
    clock = Clock()
    local = Peers(stores[0], lambda: "http://127.0.0.1:8080", clock=clock)
    with caplog.at_level("WARNING", logger="netboot.inventory.peers"):
        await local.refresh()
    assert "set server.advertise" in caplog.text
    assert read_record(await stores[0].get_setting(SERVERS)) == {}
    older = json.dumps({url: clock.now for url in (
        "http://127.0.0.1:8080", "http://0.0.0.0:8080", "http://[::1]:8080",
        "http://localhost:8080", "http://[::]:8080", B)})
    await stores[0].put_setting(SERVERS, older)
    a = Peers(stores[1], lambda: A, clock=clock)
    await a.refresh()
    assert a.others == (B,)
    assert set(read_record(await stores[1].get_setting(SERVERS))) == {A, B}
    assert set(json.loads(await stores[1].get_setting(SERVERS) or "{}")) == {A, B}
    a.heard(older)
    assert a.others == (B,)


async def test_a_server_on_two_vlans_records_each_base_url_and_offers_none_of_its_own(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A server whose devices are each given the address they reached (several interfaces,
    no advertise) records one base URL per interface, so that the other server's devices on
    either VLAN are told one they can reach; none of them is among its own others (s49-ha)."""
    clock = Clock()
    two = Peers(stores[0], lambda: (A, "http://198.51.100.1:8080"), clock=clock)
    b = Peers(stores[1], lambda: B, clock=clock)
    await two.refresh()
    await b.refresh()
    await two.refresh()
    assert b.others == (A, "http://198.51.100.1:8080")
    assert two.others == (B,)


async def test_a_clean_stop_takes_its_own_entries_out_and_leaves_the_others(
        stores: tuple[SqliteStore, SqliteStore]) -> None:
    """A server stopped cleanly is no longer named at once (not after STALE_SECONDS): its
    entries taken out by compare-and-set, the others' kept; a second withdraw writes
    nothing (s49-ha)."""
    clock = Clock()
    two = Peers(stores[0], lambda: (A, C), clock=clock)
    b = Peers(stores[1], lambda: B, clock=clock)
    await two.refresh()
    await b.refresh()
    assert b.others == (A, C)
    await two.withdraw()
    text = await stores[1].get_setting(SERVERS)
    assert set(read_record(text)) == {B}
    b.heard(text)
    assert b.others == ()
    await two.withdraw()
    assert await stores[1].get_setting(SERVERS) == text
