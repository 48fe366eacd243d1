"""CommittedHere answers only for a feed range that this store's commits cover exactly."""

from __future__ import annotations

from netboot.inventory import committed
from netboot.inventory.committed import CommittedHere
from netboot.model import MacAddress, Machine


def machine(n: int, hostname: str) -> Machine:
    return Machine(macs=(MacAddress.parse(f"02:00:00:00:04:{n:02x}"),), id=f"m-{n:012x}",
                   hostname=hostname)


def test_a_chain_of_own_commits_answers_with_the_newest_values() -> None:
    here = CommittedHere()
    here.add(10, 12, [("m-1", machine(1, "a"))])
    here.add(12, 13, [("m-1", machine(1, "b")), ("m-2", None)])
    assert here.since(10, 10) == {}  # nothing committed after 10 up to 10
    assert here.since(10, 13) == {"m-1": machine(1, "b"), "m-2": None}


def test_anything_else_in_the_range_is_no_answer() -> None:
    here = CommittedHere()
    here.add(10, 12, [("m-1", machine(1, "a"))])
    here.add(14, 15, [("m-1", machine(1, "b"))])  # 12..14: someone else's
    assert here.since(10, 15) is None
    assert here.since(10, 13) is None  # past the end of an own commit: another's too
    assert here.since(9, 12) is None  # before the first own commit
    assert here.since(14, 15) == {"m-1": machine(1, "b")}


def test_answered_ranges_are_forgotten_and_the_count_is_bounded() -> None:
    here = CommittedHere()
    here.add(1, 2, [("m-1", machine(1, "a"))])
    here.add(2, 3, [("m-1", machine(1, "b"))])
    assert here.since(2, 3) == {"m-1": machine(1, "b")}
    assert here.since(1, 3) is None  # 1..2 was before what a reader asked for: dropped
    here.add(3, 3, [("m-1", machine(1, "c"))])  # moved nothing: nothing to note
    assert here.since(3, 3) == {}
    for n in range(committed._KEEP + 1):
        here.add(100 + n, 101 + n, [])
    assert here.since(100, 101) is None  # the oldest went when the bound was reached
    assert here.since(100 + committed._KEEP, 101 + committed._KEEP) == {}


def test_split_gives_the_own_commits_inside_a_range_and_leaves_the_rest_to_a_read() -> None:
    """A reader whose range holds another writer's commit (12..14) reads only the positions
    between the own ones; these it takes as noted, the newest value of each machine.
    Nothing is forgotten."""
    here = CommittedHere()
    a, b = machine(1, "a"), machine(2, "b")
    here.add(10, 12, [("m-1", a)])
    here.add(14, 15, [("m-2", b), ("m-1", None)])
    assert here.split(10, 15) == ({"m-1": None, "m-2": b}, [(12, 14)])
    assert here.split(10, 17) == ({"m-1": None, "m-2": b}, [(12, 14), (15, 17)])
    assert here.split(10, 14) == ({"m-1": a}, [(12, 14)])  # 14..15 is past the reader's end
    assert here.split(11, 15) == ({"m-2": b, "m-1": None}, [(11, 14)])  # 10..12 began before
    assert here.split(9, 12) == ({"m-1": a}, [(9, 10)])
    assert here.split(15, 20) == ({}, [(15, 20)])
    assert here.split(12, 12) == ({}, [])
    assert here.since(10, 15) is None and here.split(10, 15)[0]
