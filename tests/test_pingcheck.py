"""Which offers wait for a ping (netboot.pingcheck) and what an address that answered becomes
in the pool (LeasePool.in_use): pure, ``now`` passed in."""

from __future__ import annotations

from pathlib import Path

from netboot.inventory.base import DHCP_IN_USE
from netboot.inventory.sqlite import SqliteStore
from netboot.inventory.view import InventoryView
from netboot.model import Lease
from netboot.pingcheck import FREE_SECONDS, RECORDED, PingChecks, in_use_record, read_in_use
from tests.test_leases import T0, A, B, C, pool


def test_a_pool_address_is_checked_but_not_a_clients_own_lease_nor_a_fixed_address() -> None:
    checks = PingChecks()
    own = Lease(A, "192.0.2.100", T0 + 3600)
    assert checks.needed("192.0.2.100", T0, lease=None, fixed=None)
    assert not checks.needed("192.0.2.100", T0, lease=own, fixed=None)  # renewal, reboot
    assert checks.needed("192.0.2.101", T0, lease=own, fixed=None)  # another than its own
    assert not checks.needed("192.0.2.50", T0, lease=None, fixed="192.0.2.50")


def test_an_address_found_free_is_not_checked_again_for_30_seconds() -> None:
    checks = PingChecks()
    checks.found_free("192.0.2.100", T0)
    assert not checks.needed("192.0.2.100", T0 + FREE_SECONDS - 1, lease=None, fixed=None)
    assert checks.needed("192.0.2.100", T0 + FREE_SECONDS, lease=None, fixed=None)
    checks.found_free("192.0.2.101", T0 + 1)
    checks.forget("192.0.2.101")  # answered since: checked again
    assert checks.needed("192.0.2.101", T0 + 2, lease=None, fixed=None)


def test_what_is_remembered_free_is_bounded_by_the_addresses_of_the_last_30_seconds() -> None:
    checks = PingChecks()
    for i in range(10_000):
        checks.found_free(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", T0 + i)
    assert len(checks._free) <= FREE_SECONDS + 1


def test_an_address_in_use_is_kept_from_every_client_then_offered_again() -> None:
    """It answered a ping while offered to A: A's offer goes, nobody is offered it for
    decline_seconds (a DISCOVER gets the next address), then it is a candidate again."""
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    p.in_use("192.0.2.100", T0 + 1)
    assert p.offer(A, T0 + 1) == "192.0.2.101"
    assert p.offer(B, T0 + 2) == "192.0.2.102"
    assert p.offer(C, T0 + 3) is None  # the third address is in use: none left
    assert p.request(C, "192.0.2.100", T0 + 4) is None  # nor taken by a REQUEST
    assert p.offer(C, T0 + 602) == "192.0.2.100"


def test_the_oldest_mark_is_reclaimable_and_one_mark_says_until_when() -> None:
    """DECLINE and a ping's answer are one mark each address (LeasePool.marked_until), the
    oldest first for reclaimable (ISC dhcpd's oldest abandoned lease): a mark made again
    is the newest; an address outside the pool, some machine's fixed one, or one passed
    over (``skip``) is not reclaimable; reclaim drops the mark and says what it was."""
    fixed = {"192.0.2.101": "m1"}
    p = pool(reserved_fixed=fixed.get)
    p.in_use("192.0.2.100", T0)
    p.in_use("192.0.2.101", T0 + 1)
    assert p.offer(A, T0 + 2) == "192.0.2.102"
    assert p.decline(A, "192.0.2.102", T0 + 3) is not None
    p.in_use("192.0.2.100", T0 + 4)  # answered again: the newest now
    assert p.marked_until("192.0.2.100", T0 + 5) == T0 + 4 + 600
    assert p.marked_until("192.0.2.102", T0 + 5) == T0 + 3 + 600
    assert p.offer(B, T0 + 5) is None  # no free address
    assert p.reclaimable(B, T0 + 5) == "192.0.2.102"  # .101 is a machine's fixed address
    assert p.reclaimable(B, T0 + 5, skip=["192.0.2.102"]) == "192.0.2.100"
    assert p.reclaimable(B, T0 + 5, skip=["192.0.2.102", "192.0.2.100"]) is None
    assert p.reclaim("192.0.2.102", T0 + 6) == (False, T0 + 3)  # declined, at T0 + 3
    assert p.marked_until("192.0.2.102", T0 + 6) is None
    assert p.reclaim("192.0.2.102", T0 + 6) is None  # taken back already
    assert p.offer(B, T0 + 6) == "192.0.2.102"
    assert p.reclaim("192.0.2.100", T0 + 7) == (True, T0 + 4)  # it had answered a ping
    assert p.marked_until("192.0.2.100", T0 + 605) is None  # and marks end as before


def test_the_inventorys_record_of_addresses_in_use_keeps_others_and_drops_the_ended() -> None:
    """in_use_record/read_in_use (base.DHCP_IN_USE, netboot status's address-in-use): a
    server's marks put in, those it ended taken out, another server's kept until their time,
    those past it gone, an unreadable record read as empty, and at most RECORDED kept (those
    ending last)."""
    other = in_use_record(None, {"192.0.2.5": (T0 + 100, "b's")}, (), T0)
    text = in_use_record(other, {"192.0.2.7": (T0 + 600, "a's"), "192.0.2.8": (T0 + 9, "x")},
                         (), T0)
    assert read_in_use(text, T0) == {"192.0.2.5": (T0 + 100, "b's"),
                                     "192.0.2.7": (T0 + 600, "a's"),
                                     "192.0.2.8": (T0 + 9, "x")}
    later = in_use_record(text, {"192.0.2.7": (T0 + 600, "a's")}, ("192.0.2.8",), T0 + 1)
    assert read_in_use(later, T0 + 1) == {"192.0.2.5": (T0 + 100, "b's"),
                                          "192.0.2.7": (T0 + 600, "a's")}
    assert read_in_use(later, T0 + 100) == {"192.0.2.7": (T0 + 600, "a's")}
    for bad in ("", "[", "[1]", '{"192.0.2.1": [true, "x"]}', '{"192.0.2.1": [1e999, "x"]}',
                '{"192.0.2.1": "x"}'):
        assert read_in_use(bad, T0) == {}, bad
    many = {f"10.0.{i // 256}.{i % 256}": (T0 + 1 + i, "t") for i in range(RECORDED + 10)}
    kept = read_in_use(in_use_record(None, many, (), T0), T0)
    assert len(kept) == RECORDED and "10.0.0.0" not in kept and "10.0.1.9" in kept


async def test_recording_addresses_in_use_remakes_none_of_the_views_answers(
        tmp_path: Path) -> None:
    """The record (base.DHCP_IN_USE), written by a server whenever its marks change (each
    answered ping, on a real SQLite file, reaching another server's view through the change
    feed), is read by no decision: the view's generation counters, against which every kept
    answer and text is checked, stay where they were (a setting the view took for a change
    of what decisions read made every kept answer again at each ping answered)."""
    store = SqliteStore(tmp_path / "netboot.db")
    await store.open()
    record = in_use_record(None, {"192.0.2.100": (T0 + 600, "answered")}, (), T0)
    counters = []  # the view's (shared, rules): before, after the record, after another
    try:
        view = InventoryView(store)
        for key, value in (("", ""), (DHCP_IN_USE, record), ("some-other-setting", "1")):
            if key:
                await store.put_setting(key, value)
            await view.sync()
            counters.append((view.shared, view.rules))
    finally:
        await store.close()
    assert counters[0] == counters[1] != counters[2]  # the last: the check can fail
