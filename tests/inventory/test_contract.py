"""The Store contract: every store (memory, SQLite, PostgreSQL) passes this one suite."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netboot import identity
from netboot.errors import Conflict, NotFound, StateChanged, StoreError, ValidationError
from netboot.inventory import codec
from netboot.inventory.base import Batch, MachineFilter, Store
from netboot.inventory.memory import MemoryStore
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import (
    ApiToken,
    Arch,
    Asset,
    AuditEntry,
    Cluster,
    Event,
    Firmware,
    Group,
    Lease,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    Scope,
)
from tests import pg

MAC1 = "02:00:00:00:00:01"
MAC2 = "02:00:00:00:00:02"
MAC3 = "02:00:00:00:00:03"


def mac(i: int) -> str:
    return str(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")))


def mid(m: str) -> str:
    """A stable id per MAC, so a test can write the same machine twice."""
    return "m-" + MacAddress.parse(m).hexraw


def machine(m: str = MAC1, **kw: object) -> Machine:
    return Machine(macs=(MacAddress.parse(m),), id=mid(m), **kw)  # type: ignore[arg-type]


def sighting_uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-0000000000{i:02x}"


def keyed_fleet() -> list[Machine]:
    """Four machines known by their MACs alone but the last (serial SN3): what
    :func:`sightings` are learnt of, in test_sqlite.py's and test_postgres.py's tests of the
    identifier rows a first DHCP sighting writes."""
    return [Machine(macs=(MacAddress.parse(f"52:54:00:00:0a:0{i}"),), hostname=f"k{i}",
                    serial="SN3" if i == 3 else None) for i in range(4)]


def sightings(fleet: list[Machine]) -> list[Machine]:
    """:func:`keyed_fleet` after first sightings: UUIDs learnt (and a serial for the second),
    the third's placeholder serial claims nothing, the last's serial changed."""
    return [replace(fleet[0], uuid=sighting_uuid(0), updated=9.0),
            replace(fleet[1], uuid=sighting_uuid(1), serial="SN1", updated=9.0),
            replace(fleet[2], serial="To be filled by O.E.M.", updated=9.0),  # claims none
            replace(fleet[3], uuid=sighting_uuid(3), serial="SN9", updated=9.0)]  # changed


async def assert_found(store: Store, machines: Iterable[Machine]) -> None:
    """Each of ``machines`` is read back as itself by its id and by every claim it holds."""
    for m in machines:
        assert await store.get_machine(m.id) == m
        for kind, value in identity.claims(m):
            assert await store.machine_by(kind, value) == m


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async with contextlib.AsyncExitStack() as stack:
        s: Store
        if request.param == "memory":
            s = MemoryStore()
        elif request.param == "sqlite":
            s = SqliteStore(tmp_path / "inv.db")
        else:
            cluster = request.getfixturevalue("postgres")
            s = PostgresStore(await stack.enter_async_context(pg.fresh_schema(cluster)))
        await s.open()
        try:
            yield s
        finally:
            await s.close()


# --- machines: create / get ------------------------------------------------------------------


async def test_get_missing_is_none(store: Store) -> None:
    assert await store.machine_by("mac", MAC1) is None
    assert await store.get_machine_by_hostname("nope") is None


async def test_round_trip_every_machine_field(store: Store) -> None:
    full = Machine(
        macs=(MacAddress.parse(MAC1),),
        state=MachineState.INSTALLING,
        hostname="Node-1",
        uuid="4c4c4544-0042-3510-8052-b2c04f4e3032",
        serial="SN123",
        asset="A-7",
        labels={"rack": "r1", "site": "edge.1", "quote'key": 'va"l'},
        cluster="c1",
        role=Role.SERVER,
        profile="k3os",
        arch=Arch.ARM64,
        firmware=Firmware.UEFI_HTTP,
        ipv4="10.0.0.5",
        fixed_ipv4="10.0.0.6",
        facts={"manufacturer": "Dell", "bios": "2.1"},
        token_hash="ab" * 32,
        token_expires=1_700_000_123.5,
        created=1_700_000_000.25,
        updated=1_700_000_001.75,
    )
    await store.create_machine(full)
    got = await store.machine_by("mac", MAC1)
    assert got == full
    assert got is not None and isinstance(got.state, MachineState)
    assert isinstance(got.role, Role) and isinstance(got.arch, Arch)
    assert isinstance(got.firmware, Firmware) and isinstance(got.mac, MacAddress)


async def test_round_trip_defaults_and_none(store: Store) -> None:
    bare = machine(MAC2)
    await store.create_machine(bare)
    got = await store.machine_by("mac", MAC2)
    assert got == bare
    assert got is not None
    assert got.hostname is None and got.role is None and got.arch is None
    assert got.firmware is None and got.token_expires is None
    assert dict(got.labels) == {} and dict(got.facts) == {}


async def test_get_accepts_any_mac_spelling(store: Store) -> None:
    await store.create_machine(machine(MAC1))
    got = await store.machine_by("mac", "02-00-00-00-00-01".upper())
    assert got is not None and str(got.mac) == MAC1


async def test_machines_by_answers_each_claim_as_machine_by(store: Store) -> None:
    uuid = "4c4c4544-0042-3510-8052-b2c04f4e3032"
    one = machine(MAC1, uuid=uuid, serial="SN1", install_token="tok-1")
    two = Machine(macs=(MacAddress.parse(MAC2), MacAddress.parse(MAC3)), id="m-two",
                  asset="A-2")
    await store.create_machine(one)
    await store.create_machine(two)
    # Every kind, another spelling, a repeat, a placeholder, unknown values, several chunks of
    # a store that reads them in chunks.
    claims = [("mac", MAC1), ("uuid", uuid.upper()), ("mac", "02-00-00-00-00-03"),
              ("serial", "SN1"), ("asset", "A-2"), ("mac", MAC1), ("mac", mac(9)),
              ("uuid", "00000000-0000-0000-0000-000000000000"), ("serial", "nope"),
              *(("mac", mac(100 + i)) for i in range(1200)), ("mac", MAC2)]
    got = await store.machines_by(claims)
    assert got == [await store.machine_by(kind, value) for kind, value in claims]
    assert got[:6] == [one, one, two, one, two, one] and got[-1] == two
    assert got[0] is got[1] is got[3] is got[5]  # one value per machine read
    assert got[0] is not None and got[0].install_token == "tok-1"  # opened as machine_by does
    assert got[2] is got[4] is got[-1]
    assert await store.machines_by([]) == []
    with pytest.raises(ValidationError):
        await store.machines_by([("mac", MAC1), ("colour", "red")])


async def test_stored_value_is_detached_from_caller(store: Store) -> None:
    labels = {"rack": "r1"}
    await store.create_machine(machine(MAC1, labels=labels))
    labels["rack"] = "changed"
    got = await store.machine_by("mac", MAC1)
    assert got is not None and got.labels == {"rack": "r1"}


async def test_create_duplicate_id_conflicts(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a"))
    with pytest.raises(Conflict, match=mid(MAC1)):
        await store.create_machine(machine(MAC1, hostname="b"))
    got = await store.machine_by("mac", MAC1)
    assert got is not None and got.hostname == "a"


async def test_create_duplicate_mac_conflicts_naming_field_and_holder(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a"))
    other = Machine(macs=(MacAddress.parse(MAC2), MacAddress.parse(MAC1)), hostname="b")
    with pytest.raises(Conflict, match=MAC1) as err:
        await store.create_machine(other)
    assert err.value.field == "mac" and err.value.holder == mid(MAC1)
    assert await store.get_machine(other.id) is None
    assert await store.machine_by("mac", MAC2) is None  # nothing half-written


async def test_create_duplicate_hostname_case_insensitive(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="Node-1"))
    with pytest.raises(Conflict) as err:
        await store.create_machine(machine(MAC2, hostname="nODE-1"))
    assert "'nODE-1'" in str(err.value) and MAC1 in str(err.value)
    assert await store.machine_by("mac", MAC2) is None


async def test_many_machines_without_hostname(store: Store) -> None:
    await store.create_machine(machine(MAC1))
    await store.create_machine(machine(MAC2))
    assert await store.count_machines() == 2


async def test_get_by_hostname_case_insensitive(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="Node-1"))
    got = await store.get_machine_by_hostname("NODE-1")
    assert got is not None and str(got.mac) == MAC1 and got.hostname == "Node-1"


async def test_invalid_value_refused_on_write(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.create_machine(machine(MAC1, labels={"rack": 7}))
    assert err.value.field == "labels.rack"
    assert await store.machine_by("mac", MAC1) is None


async def test_invalid_mac_argument(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.machine_by("mac", "not-a-mac")
    assert err.value.field == "mac"


# --- machines: update / delete ---------------------------------------------------------------


async def test_update_replaces(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a", labels={"x": "1"}))
    new = machine(MAC1, hostname="b", labels={"y": "2"}, state=MachineState.INSTALLED)
    await store.update_machine(new)
    assert await store.machine_by("mac", MAC1) == new
    assert await store.get_machine_by_hostname("a") is None
    assert await store.count_machines(MachineFilter(labels=(("x", "1"),))) == 0
    assert await store.count_machines(MachineFilter(labels=(("y", "2"),))) == 1


async def test_update_missing_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match=mid(MAC1)):
        await store.update_machine(machine(MAC1))


async def test_update_hostname_taken_conflicts(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a"))
    await store.create_machine(machine(MAC2, hostname="b"))
    with pytest.raises(Conflict, match=MAC1):
        await store.update_machine(machine(MAC2, hostname="A"))
    got = await store.machine_by("mac", MAC2)
    assert got is not None and got.hostname == "b"


async def test_update_keeps_own_hostname_with_new_case(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="node"))
    await store.update_machine(machine(MAC1, hostname="NODE"))
    got = await store.get_machine_by_hostname("node")
    assert got is not None and got.hostname == "NODE"


async def test_update_frees_old_hostname(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a"))
    await store.update_machine(machine(MAC1, hostname=None))
    await store.create_machine(machine(MAC2, hostname="a"))
    got = await store.get_machine_by_hostname("a")
    assert got is not None and str(got.mac) == MAC2


async def test_delete(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="a", labels={"k": "v"}))
    await store.add_event(Event(machine=mid(MAC1), time=1.0, kind="boot"))
    await store.add_event(Event(machine=mid(MAC2), time=1.0, kind="boot"))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.9", expires=100.0))
    await store.delete_machine(mid(MAC1))
    assert await store.machine_by("mac", MAC1) is None
    assert await store.list_events(mid(MAC1)) == []
    assert len(await store.list_events(mid(MAC2))) == 1  # others untouched
    assert await store.list_leases() == []
    assert await store.count_machines(MachineFilter(labels=(("k", "v"),))) == 0
    # hostname and address are free again
    await store.create_machine(machine(MAC2, hostname="A"))
    await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.9", expires=100.0))


async def test_delete_missing_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match=mid(MAC1)):
        await store.delete_machine(mid(MAC1))


# --- batches ---------------------------------------------------------------------------------


async def test_batch_creates_and_updates(store: Store) -> None:
    await store.create_machine(machine(MAC1, hostname="one"))
    await store.apply_batch(
        Batch(
            create=[machine(MAC2, hostname="two"), machine(MAC3, hostname="three")],
            update=[machine(MAC1, hostname="uno", state=MachineState.FAILED)],
        )
    )
    assert await store.count_machines() == 3
    got = await store.machine_by("mac", MAC1)
    assert got is not None and got.hostname == "uno" and got.state == MachineState.FAILED


async def test_empty_batch(store: Store) -> None:
    await store.apply_batch(Batch())
    assert await store.count_machines() == 0


@pytest.mark.parametrize(
    ("batch", "error", "text"),
    [
        # the last create collides with an existing MAC
        (Batch(create=[machine(MAC2), machine(MAC1)]), Conflict, f"machine {mid(MAC1)}"),
        # a hostname already used, in another case
        (Batch(create=[machine(MAC2), machine(MAC3, hostname="EXISTING")]), Conflict, MAC1),
        # two rows of one batch collide with each other
        (Batch(create=[machine(MAC2, hostname="x"), machine(MAC3, hostname="X")]), Conflict, MAC2),
        (Batch(create=[machine(MAC2), machine(MAC2)]), Conflict, mid(MAC2)),
        # an update of a machine that does not exist
        (Batch(create=[machine(MAC2)], update=[machine(MAC3)]), NotFound, mid(MAC3)),
        # an update taking a hostname created earlier in the batch
        (
            Batch(create=[machine(MAC2, hostname="new")], update=[machine(MAC1, hostname="NEW")]),
            Conflict,
            MAC2,
        ),
    ],
)
async def test_batch_all_or_nothing(
    store: Store, batch: Batch, error: type[Exception], text: str
) -> None:
    before = machine(MAC1, hostname="existing", labels={"k": "v"})
    await store.create_machine(before)
    with pytest.raises(error, match=text):
        await store.apply_batch(batch)
    assert await store.list_machines() == [before]
    assert await store.count_machines(MachineFilter(labels=(("k", "v"),))) == 1


async def test_batch_update_same_machine_twice_last_wins(store: Store) -> None:
    await store.create_machine(machine(MAC1, labels={"a": "1"}))
    await store.apply_batch(
        Batch(update=[machine(MAC1, labels={"a": "2"}), machine(MAC1, labels={"a": "3"})])
    )
    got = await store.machine_by("mac", MAC1)
    assert got is not None and got.labels == {"a": "3"}


async def test_batch_invalid_row_refused_whole(store: Store) -> None:
    with pytest.raises(ValidationError):
        await store.apply_batch(Batch(create=[machine(MAC1), machine(MAC2, fixed_ipv4="x")]))
    assert await store.count_machines() == 0


async def test_large_batch(store: Store) -> None:
    rows = [machine(mac(i), hostname=f"n{i}", labels={"i": str(i % 3)}) for i in range(2000)]
    await store.apply_batch(Batch(create=rows))
    assert await store.count_machines() == 2000
    assert await store.count_machines(MachineFilter(labels=(("i", "0"),))) == 667


# Past the SQLite store's bulk-import path (sqlite.BULK_ROWS): staged rows, one statement each.
BULK = 600


def bulk_rows() -> list[Machine]:
    return [Machine(macs=(MacAddress.parse(mac(100 + i)),)
                    + ((MacAddress.parse(mac(10_000 + i)),) if i % 3 == 0 else ()),
                    hostname=f"n{i}", serial=f"S{i}", asset=f"A{i}" if i % 2 else None,
                    uuid=f"4c4c4544-0042-3510-8052-{i:012x}" if i % 5 == 0 else None,
                    labels={"i": str(i % 4), "site": "edge"} if i % 7 else {},
                    facts={"product": "x"} if i % 11 == 0 else {},
                    cluster="c1" if i % 2 else None, role=Role.AGENT, created=5.0, updated=6.0)
            for i in range(BULK)]


async def test_bulk_batch_reads_back_by_every_identifier(store: Store) -> None:
    rows = bulk_rows()
    await store.apply_batch(Batch(create=rows, events=[Event(m.id, 7.0, "enrolled", "imported")
                                                       for m in rows]))
    assert await store.count_machines() == BULK
    for m in rows[::37]:
        assert await store.get_machine(m.id) == m
        for kind, value in [("mac", str(x)) for x in m.macs] + [
                (k, getattr(m, k)) for k in ("serial", "asset", "uuid") if getattr(m, k)]:
            assert await store.machine_by(kind, value) == m, (kind, value)
        assert await store.get_machine_by_hostname(m.hostname or "") == m
        assert [e.kind for e in await store.list_events(m.id)] == ["enrolled"]
    labelled = sum(1 for i in range(BULK) if i % 7 and i % 4 == 1)
    assert await store.count_machines(MachineFilter(labels=(("i", "1"),))) == labelled
    # References are checked again after the bulk write: a delete takes labels and keys along.
    await store.delete_machine(rows[1].id)
    assert await store.count_machines(MachineFilter(labels=(("i", "1"),))) == labelled - 1
    assert await store.machine_by("mac", mac(101)) is None
    await store.create_machine(replace(rows[1], id="m-again"))
    assert await store.machine_by("mac", mac(101)) == replace(rows[1], id="m-again")


@pytest.mark.parametrize(("bad", "text"), [
    (Machine(macs=(MacAddress.parse(MAC1),), hostname="fresh"), "mac 02:00:00:00:00:01"),
    (machine(mac(5000), serial="S-1"), "serial S-1"),
    (machine(mac(5001), hostname="EXISTING"), "hostname 'EXISTING'"),
    (machine(mac(5002), serial="S7"), "serial S7"),  # another row of the same batch
    (machine(mac(5003), fixed_ipv4="999.1.1.1"), "not an IPv4"),
])
async def test_bulk_batch_all_or_nothing(store: Store, bad: Machine, text: str) -> None:
    before = machine(MAC1, hostname="existing", serial="S-1", labels={"k": "v"})
    await store.create_machine(before)
    rows = bulk_rows()
    rows.insert(300, bad)
    with pytest.raises((Conflict, ValidationError), match=text):
        await store.apply_batch(Batch(create=rows, events=[Event(m.id, 7.0, "enrolled")
                                                           for m in rows]))
    assert await store.list_machines() == [before]
    assert await store.list_events(rows[0].id) == []
    assert await store.count_machines(MachineFilter(labels=(("site", "edge"),))) == 0


# --- listing ---------------------------------------------------------------------------------


async def _fleet(store: Store) -> None:
    await store.apply_batch(
        Batch(
            create=[
                machine(MAC3, state=MachineState.ENROLLED, cluster="a", labels={"r": "1"}),
                machine(MAC1, state=MachineState.INSTALLED, cluster="a", labels={"r": "1"}),
                machine(
                    MAC2, state=MachineState.ENROLLED, cluster="b", labels={"r": "2", "g": "x"}
                ),
                machine(mac(4), state=MachineState.ENROLLED, labels={"r": "1", "g": "x"}),
            ]
        )
    )


def macs(found: list[Machine]) -> list[str]:
    return [str(m.mac) for m in found]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (None, [MAC1, MAC2, MAC3, mac(4)]),
        (MachineFilter(state=MachineState.ENROLLED), [MAC2, MAC3, mac(4)]),
        (MachineFilter(cluster="a"), [MAC1, MAC3]),
        (MachineFilter(state=MachineState.ENROLLED, cluster="a"), [MAC3]),
        (MachineFilter(labels=(("r", "1"),)), [MAC1, MAC3, mac(4)]),
        (MachineFilter(labels=(("r", "1"), ("g", "x"))), [mac(4)]),
        (MachineFilter(labels=(("g", "x"),), cluster="b"), [MAC2]),
        (MachineFilter(labels=(("r", "3"),)), []),
        (MachineFilter(labels=(("nokey", "1"),)), []),
        (MachineFilter(state=MachineState.FAILED), []),
    ],
)
async def test_list_and_count_filters(
    store: Store, flt: MachineFilter | None, expected: list[str]
) -> None:
    await _fleet(store)
    assert macs(await store.list_machines(flt)) == expected
    assert await store.count_machines(flt) == len(expected)


async def test_filter_by_last_change_finds_the_stuck(store: Store) -> None:
    """``updated_before``: the dashboard's "unchanged for" filter (s36-ops), with a state
    the machines stuck in it."""
    for i, (t, state) in enumerate([(10.0, MachineState.BOOTING), (20.0, MachineState.BOOTING),
                                    (30.0, MachineState.BOOTING), (5.0, MachineState.ENROLLED)]):
        await store.create_machine(machine(mac(i), state=state, created=1.0, updated=t))
    stuck = MachineFilter(state=MachineState.BOOTING, updated_before=25.0)
    assert macs(await store.list_machines(stuck)) == [mac(0), mac(1)]
    assert await store.count_machines(stuck) == 2
    assert macs(await store.list_machines(MachineFilter(updated_before=25.0))) == [
        mac(0), mac(1), mac(3)]
    assert await store.count_machines(MachineFilter(updated_before=5.0)) == 0


async def test_filter_by_no_install_secret_finds_older_registrations(store: Store) -> None:
    """``without_secret``: the registered machines holding no install secret, those an
    older register command registered, found by the store (``netboot status`` read and
    decoded every registered machine to find them: ~2.6 s of CPU at 100,000, s43-ops)."""
    for i, (state, secret) in enumerate([
            (MachineState.REGISTERED, None), (MachineState.REGISTERED, "ab" * 32),
            (MachineState.ENROLLED, None), (MachineState.REGISTERED, None)]):
        await store.create_machine(machine(mac(i), state=state, secret_hash=secret,
                                           created=10.0 - i))
    older = MachineFilter(state=MachineState.REGISTERED, without_secret=True)
    assert macs(await store.list_machines(older)) == [mac(0), mac(3)]
    assert macs(await store.list_machines(replace(older, sort="created"))) == [mac(3), mac(0)]
    assert await store.count_machines(older) == 2
    assert await store.count_machines(MachineFilter(without_secret=True)) == 3


async def _in_document_alone(store: Store, machine_id: str, address: str) -> None:
    """``machine_id``'s document given ``address`` as an older netboot stored it (before
    s40-net refused a shared one, S42's unique column): the document alone."""
    if isinstance(store, SqliteStore):
        with contextlib.closing(sqlite3.connect(store.path)) as hand, hand:
            hand.execute("UPDATE machines SET data = json_set(data, '$.fixed_ipv4', ?)"
                         " WHERE id = ?", (address, machine_id))
    elif isinstance(store, PostgresStore):
        async with store._conn() as conn:
            await conn.execute("UPDATE machines SET data = jsonb_set(data::jsonb,"
                               " '{fixed_ipv4}', to_jsonb($1::text))::text WHERE id = $2",
                               address, machine_id)
    else:
        machines = store._machines  # type: ignore[attr-defined]
        machines[machine_id] = replace(machines[machine_id], fixed_ipv4=address)


async def test_filter_by_a_shared_fixed_address_finds_those_sharing_one(store: Store) -> None:
    """``shared_fixed_ipv4``: the machines whose fixed_ipv4 another's document holds too,
    found by the store (start-up and ``netboot status`` read and decoded every machine
    given one to find them: ~3.9 s of CPU at 100,000)."""
    for i in range(5):
        await store.create_machine(machine(mac(i), fixed_ipv4=f"192.0.2.{10 + i}"))
    await store.create_machine(machine(mac(5)))
    flt = MachineFilter(shared_fixed_ipv4=True)
    assert await store.count_machines(flt) == 0
    await _in_document_alone(store, mid(mac(3)), "192.0.2.11")
    await _in_document_alone(store, mid(mac(4)), "192.0.2.11")
    await _in_document_alone(store, mid(mac(5)), "192.0.2.12")
    assert macs(await store.list_machines(flt)) == [mac(1), mac(2), mac(3), mac(4), mac(5)]
    assert await store.count_machines(flt) == 5
    assert [m.fixed_ipv4 for m in await store.list_machines(flt)] == [
        "192.0.2.11", "192.0.2.12", "192.0.2.11", "192.0.2.11", "192.0.2.12"]


async def _mixed_states(store: Store) -> None:
    """Machines in every state, in clusters and none, then moved and deleted (a storm's
    steps and an operator's), so that the rows' order is not their creation order."""
    rng = random.Random(9)
    states, clusters = list(MachineState), [None, "a", "b"]
    created = [machine(mac(i), state=rng.choice(states), cluster=rng.choice(clusters),
                       hostname=rng.choice((None, f"h{i}")), updated=float(rng.randrange(50)))
               for i in rng.sample(range(1, 200), 60)]
    await store.apply_batch(Batch(create=created))
    for m in rng.sample(created, 25):
        await store.update_machine(replace(m, state=rng.choice(states),
                                           cluster=rng.choice(clusters)))
    for m in rng.sample(created, 8):
        with contextlib.suppress(NotFound):
            await store.delete_machine(m.id)


async def test_state_counts_equal_a_count_of_every_machine(store: Store) -> None:
    assert await store.state_counts() == {}
    await _mixed_states(store)
    every = await store.list_machines(MachineFilter(limit=1000))
    assert await store.state_counts() == dict(
        collections.Counter((m.cluster, m.state) for m in every))


@pytest.mark.parametrize(("sort", "descending"), [
    ("mac", False), ("mac", True), ("hostname", False), ("updated", True), ("cluster", False)])
async def test_a_state_filter_lists_what_filtering_every_machine_gives(
        store: Store, sort: str, descending: bool) -> None:
    """Each state, the rare ones a partial index holds (SQLite) and the others, lists the
    machines in the order of the unfiltered list, paged alike, counted alike."""
    await _mixed_states(store)
    every = await store.list_machines(MachineFilter(limit=1000, sort=sort,
                                                    descending=descending))
    for state in MachineState:
        expected = [m.id for m in every if m.state == state]
        assert len(expected) >= 4, state  # a page of three after the first is a real one
        found = await store.list_machines(MachineFilter(state=state, limit=1000, sort=sort,
                                                        descending=descending))
        assert [m.id for m in found] == expected, state
        page = await store.list_machines(MachineFilter(state=state, limit=3, offset=1,
                                                       sort=sort, descending=descending))
        assert [m.id for m in page] == expected[1:4], state
        assert await store.count_machines(MachineFilter(state=state)) == len(expected)
        in_a = await store.list_machines(MachineFilter(state=state, cluster="a", limit=1000,
                                                       sort=sort, descending=descending))
        assert [m.id for m in in_a] == [m.id for m in every
                                         if m.state == state and m.cluster == "a"], state


async def test_pagination_stable_by_mac(store: Store) -> None:
    # created out of order: listing is by MAC, whatever the insertion order
    await store.apply_batch(Batch(create=[machine(mac(i)) for i in (7, 3, 9, 1, 5, 2, 8, 4, 6)]))
    pages = [
        macs(await store.list_machines(MachineFilter(limit=4, offset=o))) for o in (0, 4, 8, 12)
    ]
    assert pages == [
        [mac(1), mac(2), mac(3), mac(4)],
        [mac(5), mac(6), mac(7), mac(8)],
        [mac(9)],
        [],
    ]
    assert await store.count_machines(MachineFilter(limit=1, offset=5)) == 9
    assert await store.list_machines(MachineFilter(limit=0)) == []


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
async def test_the_view_loads_pages_whose_equal_labels_and_times_are_one_object(
        store: Store) -> None:
    # A bulk import's machines share a creation time and a few label sets: the view's pages
    # (machines_after) hold each once, across pages, not 100,000 equal copies. (The memory
    # store keeps the objects it was given: nothing decoded.)
    rack = {"rack": "r1", "site": "s"}
    for i in range(6):
        await store.create_machine(Machine(
            macs=(MacAddress(bytes([2, 0, 0, 0, 0, i])),), id=f"m-{i}", labels=dict(rack),
            created=1700000000.5, updated=1700000000.5))
    first, second = await store.machines_after("", 3), await store.machines_after("m-2", 3)
    machines = [*first, *second]
    assert len(machines) == 6
    assert all(m.labels is machines[0].labels for m in machines)
    assert all(m.created is machines[0].created for m in machines)


async def test_machines_after_pages_through_every_machine_by_id(store: Store) -> None:
    # Ids created out of order, one with a character above ASCII: each page starts after
    # the last id of the one before, and together they hold every machine once.
    ids = ["m-b", "m-a", "m-\u00e9", "m-c1", "m-c", "m-Z"]
    await store.apply_batch(Batch(create=[Machine(macs=(MacAddress.parse(mac(i)),), id=ident)
                                          for i, ident in enumerate(ids)]))
    pages, after = [], ""
    while page := await store.machines_after(after, 4):
        pages.append([m.id for m in page])
        after = page[-1].id
    assert pages == [["m-Z", "m-a", "m-b", "m-c"], ["m-c1", "m-\u00e9"]]
    assert await store.machines_after("m-b", 2) == [
        await store.get_machine("m-c"), await store.get_machine("m-c1")]
    assert await store.machines_after("m-\u00e9", 10) == []


async def test_pagination_with_filter(store: Store) -> None:
    await _fleet(store)
    flt = MachineFilter(state=MachineState.ENROLLED, limit=2, offset=1)
    assert macs(await store.list_machines(flt)) == [MAC3, mac(4)]


@pytest.mark.parametrize("flt", [MachineFilter(limit=-1), MachineFilter(offset=-1)])
async def test_negative_page_refused(store: Store, flt: MachineFilter) -> None:
    with pytest.raises(ValidationError):
        await store.list_machines(flt)


async def test_default_limit_is_100(store: Store) -> None:
    await store.apply_batch(Batch(create=[machine(mac(i)) for i in range(150)]))
    assert len(await store.list_machines()) == 100
    assert await store.count_machines() == 150


# --- profiles, clusters, groups --------------------------------------------------------------

PROFILE = Profile(
    name="k3os",
    kernel="k3os/vmlinuz",
    initrds=("k3os/initrd", "extra.img"),
    cmdline="k3os.mode=install console=ttyS0",
    config_template="cloud-init",
    assets=(Asset("k3os/vmlinuz", "aa" * 32), Asset("k3os/initrd", None)),
    install_device="/dev/nvme0n1",
    iso_url="https://example.invalid/k3os.iso",
    ssh_authorized_keys=("ssh-ed25519 AAAA test",),
    description="k3OS installer",
)
CLUSTER = Cluster(
    name="edge",
    server_url="https://10.0.0.1:6443",
    token="s3cret",
    labels={"zone": "a"},
    taints=("dedicated=edge:NoSchedule",),
    description="edge site",
)
GROUP = Group(
    name="rack1",
    selector={"arch": ("x86_64", "arm64"), "manufacturer": ("Dell",)},
    profile="k3os",
    cluster="edge",
    role=Role.AGENT,
    labels={"rack": "1"},
    taints=("t=1:NoSchedule",),
    hostname_template="edge-{mac_suffix}",
)


async def test_profiles(store: Store) -> None:
    assert await store.get_profile("k3os") is None
    await store.put_profile(PROFILE)
    assert await store.get_profile("k3os") == PROFILE
    with pytest.raises(Conflict, match="k3os"):
        await store.put_profile(PROFILE, create=True)
    changed = Profile(name="k3os", kernel="other")
    await store.put_profile(changed)  # upsert
    await store.put_profile(Profile(name="alpine", kernel="k"), create=True)
    assert [p.name for p in await store.list_profiles()] == ["alpine", "k3os"]
    assert await store.get_profile("k3os") == changed
    await store.delete_profile("k3os")
    assert await store.get_profile("k3os") is None
    with pytest.raises(NotFound):
        await store.delete_profile("k3os")


async def test_clusters(store: Store) -> None:
    await store.put_cluster(CLUSTER, create=True)
    assert await store.get_cluster("edge") == CLUSTER
    with pytest.raises(Conflict, match="edge"):
        await store.put_cluster(Cluster(name="edge"), create=True)
    assert await store.get_cluster("edge") == CLUSTER
    await store.put_cluster(Cluster(name="edge"))
    await store.put_cluster(Cluster(name="core"))
    assert await store.list_clusters() == [Cluster(name="core"), Cluster(name="edge")]
    await store.delete_cluster("edge")
    assert await store.get_cluster("edge") is None
    with pytest.raises(NotFound):
        await store.delete_cluster("edge")


async def test_a_cluster_written_on_the_one_read_is_refused_once_changed(store: Store) -> None:
    """put_cluster(expect=): written if the stored cluster is still the one read, else
    StateChanged naming it and nothing written (clusters have no version column: the value
    itself is compared; Core.give_agent_tokens on servers starting at once)."""
    await store.put_cluster(CLUSTER, create=True)
    read = await store.get_cluster("edge")
    assert read is not None
    given = replace(read, agent_token="a" * 64)
    await store.put_cluster(given, expect=read)
    assert await store.get_cluster("edge") == given
    with pytest.raises(StateChanged) as refused:
        await store.put_cluster(replace(read, agent_token="b" * 64), expect=read)
    # No holder: it is a machine's id (OpenAPI's Error), and the cluster is the one named.
    assert refused.value.field == "cluster" and refused.value.holder is None
    assert "send the change again" in str(refused.value)  # what to do: a message's fix
    assert await store.get_cluster("edge") == given
    with pytest.raises(NotFound):
        await store.put_cluster(Cluster(name="gone"), expect=Cluster(name="gone"))
    assert await store.get_cluster("gone") is None


@pytest.mark.parametrize("kind", ["profile", "group"])
async def test_a_profile_or_group_written_on_the_one_read_is_refused_once_changed(
        store: Store, kind: str) -> None:
    """put_profile/put_group(expect=), as put_cluster's: the API's If-Match compared in the
    write's own transaction (Core.put), so a replace committed meanwhile is not lost."""
    item = PROFILE if kind == "profile" else GROUP
    put, get = getattr(store, f"put_{kind}"), getattr(store, f"get_{kind}")
    await put(item, create=True)
    read = await get(item.name)
    given = replace(read, profile=None) if kind == "group" else replace(read, cmdline="a=1")
    await put(given, expect=read)
    assert await get(item.name) == given
    with pytest.raises(StateChanged) as refused:
        await put(replace(read, labels={"x": "y"}) if kind == "group"
                  else replace(read, description="theirs"), expect=read)
    assert refused.value.field == kind and refused.value.holder is None
    assert await get(item.name) == given
    with pytest.raises(NotFound):
        await put(replace(item, name="gone"), expect=replace(item, name="gone"))
    assert await get("gone") is None


@pytest.mark.parametrize("kind", ["profile", "cluster", "group"])
async def test_a_profile_cluster_or_group_deleted_on_the_one_read_is_kept_once_changed(
        store: Store, kind: str) -> None:
    """delete_profile/delete_cluster/delete_group(expect=): the API's If-Match on a DELETE
    compared in the delete's own transaction, as a replace's (check_unchanged)."""
    item: Any = {"profile": PROFILE, "cluster": CLUSTER, "group": GROUP}[kind]
    put, get = getattr(store, f"put_{kind}"), getattr(store, f"get_{kind}")
    delete = getattr(store, f"delete_{kind}")
    await put(item, create=True)
    read = await get(item.name)
    given = replace(read, description="theirs") if kind != "group" else replace(
        read, labels={"x": "y"})
    await put(given)
    with pytest.raises(StateChanged) as refused:
        await delete(item.name, expect=read)
    assert refused.value.field == kind and refused.value.holder is None
    assert await get(item.name) == given
    await delete(item.name, expect=given)
    assert await get(item.name) is None
    with pytest.raises(NotFound):
        await delete(item.name, expect=given)


@pytest.mark.parametrize("kind", ["profile", "cluster"])
async def test_a_profile_or_cluster_in_use_is_not_deleted_unused(store: Store,
                                                                 kind: str) -> None:
    """delete_profile/delete_cluster(unused=True): refused while a machine or a group names
    it, found in the delete's own transaction (base.in_use: a Conflict naming the user);
    without ``unused`` a store deletes as before (a test's dangling reference)."""
    item: Any = PROFILE if kind == "profile" else CLUSTER
    put, get = getattr(store, f"put_{kind}"), getattr(store, f"get_{kind}")
    delete = getattr(store, f"delete_{kind}")
    await put(item, create=True)
    await store.create_machine(machine(MAC2))
    await store.create_machine(machine(MAC1, **{kind: item.name}))
    with pytest.raises(Conflict) as refused:
        await delete(item.name, unused=True)
    assert refused.value.field == kind and refused.value.holder == mid(MAC1)
    assert f"{kind} {item.name!r} is used by machine {MAC1}" in str(refused.value)
    await store.delete_machine(mid(MAC1))
    await store.put_group(replace(GROUP, **{"profile" if kind == "cluster" else "cluster":
                                            None, kind: item.name}), create=True)
    with pytest.raises(Conflict, match="is used by group 'rack1'") as refused:
        await delete(item.name, unused=True, expect=item)
    assert refused.value.holder is None  # a machine's id only: the message names the group
    assert await get(item.name) == item
    await store.delete_group("rack1")
    await delete(item.name, unused=True, expect=item)
    assert await get(item.name) is None
    await put(item, create=True)
    await store.create_machine(machine(MAC1, **{kind: item.name}))
    await delete(item.name)  # not asked: the store holds no policy
    assert await get(item.name) is None


async def test_a_machine_deleted_on_its_version_read_is_kept_once_changed(store: Store) -> None:
    """delete_machine(expect_updated=): the API's If-Match on a DELETE compared in the
    delete's transaction; a machine written meanwhile stays, StateChanged naming it."""
    await store.create_machine(machine(updated=10.0))
    changed = replace(machine(updated=11.0), hostname="edge-2")
    await store.update_machine(changed)
    with pytest.raises(StateChanged) as refused:
        await store.delete_machine(changed.id, expect_updated=10.0)
    assert refused.value.field == "updated" and refused.value.holder == changed.id
    assert await store.get_machine(changed.id) == changed
    await store.delete_machine(changed.id, expect_updated=11.0)
    assert await store.get_machine(changed.id) is None
    with pytest.raises(NotFound):
        await store.delete_machine(changed.id, expect_updated=11.0)


async def test_groups(store: Store) -> None:
    await store.put_group(GROUP, create=True)
    got = await store.get_group("rack1")
    assert got == GROUP
    assert got is not None and got.selector["arch"] == ("x86_64", "arm64")
    with pytest.raises(Conflict, match="rack1"):
        await store.put_group(GROUP, create=True)
    await store.put_group(Group(name="all"))
    assert [g.name for g in await store.list_groups()] == ["all", "rack1"]
    await store.delete_group("rack1")
    assert await store.get_group("rack1") is None
    with pytest.raises(NotFound):
        await store.delete_group("rack1")


# --- events ----------------------------------------------------------------------------------


async def test_events_oldest_first_and_limit_newest(store: Store) -> None:
    # Times deliberately not monotonic: order is insertion order, not the caller's clock.
    times = [5.0, 1.0, 3.0, 2.0, 4.0]
    for i, t in enumerate(times):
        await store.add_event(Event(machine=mid(MAC1), time=t, kind=f"k{i}", message=f"m{i}"))
    await store.add_event(Event(machine=mid(MAC2), time=0.0, kind="other"))
    every = await store.list_events(mid(MAC1))
    assert [e.kind for e in every] == ["k0", "k1", "k2", "k3", "k4"]
    assert [e.time for e in every] == times
    assert [e.kind for e in await store.list_events(mid(MAC1), limit=2)] == ["k3", "k4"]
    assert [e.kind for e in await store.list_events(mid(MAC1), limit=99)] == [e.kind for e in every]
    assert await store.list_events(mid(MAC1), limit=0) == []
    assert await store.list_events(mid(MAC3)) == []


async def test_newest_events_of_many_machines_in_one_read(store: Store) -> None:
    """What ``list_events(id, limit=1)`` holds, for a batch of machines in one read (the
    recorder's comparison of a storm's first notes); machines without events left out."""
    for i, t in enumerate([5.0, 1.0, 3.0]):  # newest by insertion, not the caller's clock
        await store.add_event(Event(machine=mid(MAC1), time=t, kind=f"k{i}", message=f"m{i}",
                                    data={"i": i}))
    await store.add_event(Event(machine=mid(MAC2), time=0.0, kind="other"))
    newest = await store.newest_events([mid(MAC1), mid(MAC2), mid(MAC3), mid(MAC1)])
    assert newest == {mid(MAC1): (await store.list_events(mid(MAC1), limit=1))[0],
                      mid(MAC2): (await store.list_events(mid(MAC2), limit=1))[0]}
    assert newest[mid(MAC1)] == Event(mid(MAC1), 3.0, "k2", "m2", {"i": 2})
    assert await store.newest_events([]) == {}
    assert await store.newest_events({mid(MAC3)}) == {}
    # More ids than a statement takes parameters (SQLite's old limit was 999).
    ids = [mid(mac(i)) for i in range(10, 1510)]
    await store.apply_batch(Batch(events=[Event(m, 1.0, "dhcp", f"n{k}")
                                          for k, m in enumerate(ids) if k % 2 == 0]))
    many = await store.newest_events(ids)
    assert {m: e.message for m, e in many.items()} == {
        m: f"n{k}" for k, m in enumerate(ids) if k % 2 == 0}


async def test_prune_events_drops_the_old_among_the_oldest_only(store: Store) -> None:
    """Retention (netboot.retention): events recorded before a time go, the oldest first,
    at most ``limit`` rows looked at a call, so a pass never holds the writer for long."""
    for t, m in [(1.0, MAC1), (2.0, MAC2), (3.0, MAC1), (4.0, MAC2), (5.0, MAC1)]:
        await store.add_event(Event(machine=mid(m), time=t, kind="k", message=f"t{t:g}"))
    assert await store.prune_events(2.5, 1) == 1  # the oldest only
    assert [e.time for e in await store.list_events(mid(MAC1))] == [3.0, 5.0]
    assert [e.time for e in await store.list_events(mid(MAC2))] == [2.0, 4.0]
    assert await store.prune_events(3.5, 10) == 2
    assert [e.time for e in await store.list_events(mid(MAC1))] == [5.0]
    assert [e.time for e in await store.list_events(mid(MAC2))] == [4.0]
    assert await store.prune_events(3.5, 10) == 0  # nothing older left
    assert await store.prune_events(100.0, 0) == 0
    assert await store.prune_events(100.0, 10) == 2
    assert await store.list_events(mid(MAC1)) == await store.list_events(mid(MAC2)) == []
    await store.add_event(Event(machine=mid(MAC1), time=9.0, kind="k"))
    assert [e.time for e in await store.list_events(mid(MAC1))] == [9.0]


async def test_event_round_trip(store: Store) -> None:
    event = Event(
        machine=mid(MAC1),
        time=1_700_000_000.5,
        kind="install.progress",
        message="50% done",
        data={"percent": 50, "nested": {"a": [1, "b", None]}, "ok": True},
    )
    await store.add_event(event)
    assert await store.list_events(mid(MAC1)) == [event]


async def test_an_event_with_its_data_text_reads_back_as_its_data(store: Store) -> None:
    # The boot path's events carry their data's JSON text (Event.data_text), which a store
    # writes as given: read back, the event is its data's, in every store, in one batch
    # with another event of the machine, and the same after the store's own copy.
    data = {"via": 'ip"xe', "firmware": "ipxe", "arch": "x86_64",
            "mac": "52:54:00:00:00:11", "peer": "192.0.2.7"}
    first = Event(mid(MAC1), 1_700_000_000.5, "install-plan", "m", data, codec.dumps(data))
    second = Event(mid(MAC1), 1_700_000_001.5, "config", "c", {}, "{}")
    await store.apply_batch(Batch(events=(first, second)))
    assert await store.list_events(mid(MAC1)) == [first, second]
    (newest,) = (await store.newest_events([mid(MAC1)])).values()
    assert newest == second


async def test_event_for_unknown_machine_is_kept(store: Store) -> None:
    await store.add_event(Event(machine=mid(MAC1), time=1.0, kind="discover"))
    events = await store.list_events(mid(MAC1))
    assert len(events) == 1 and events[0].machine == mid(MAC1)


async def test_event_data_must_be_json(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.add_event(Event(machine=mid(MAC1), time=1.0, kind="k", data={"x": object()}))
    assert err.value.field == "data"
    assert await store.list_events(mid(MAC1)) == []


async def test_events_since_follows_every_machine_in_commit_order(store: Store) -> None:
    await store.add_event(Event(machine=mid(MAC1), time=9.0, kind="before"))
    start, none = await store.events_since(-1)
    assert none == []
    await store.add_event(Event(machine=mid(MAC2), time=2.0, kind="a", data={"n": 1}))
    await store.apply_batch(Batch(events=[Event(machine=mid(MAC1), time=1.0, kind="b"),
                                          Event(machine=mid(MAC3), time=3.0, kind="c")]))
    pos, first = await store.events_since(start, limit=2)
    assert [(e.machine, e.kind) for e in first] == [(mid(MAC2), "a"), (mid(MAC1), "b")]
    assert first[0].data == {"n": 1}
    pos, rest = await store.events_since(pos)
    assert [e.kind for e in rest] == ["c"]
    assert await store.events_since(pos) == (pos, [])


async def test_a_run_of_events_is_written_in_its_place(store: Store) -> None:
    # An import's "enrolled" events go as one run of machine ids (codec.EventRun), between
    # the events queued before it and those after, in that order; a bad id in it fails the
    # whole batch. (More than SQLite writes of a run at once: sqlite.BULK_CHUNK.)
    start, _ = await store.events_since(-1)
    ids = [mid(mac(i)) for i in range(10, 4210)]
    run = codec.EventRun(ids, 5, "enrolled", "imported")
    events = codec.joined([Event(machine=mid(MAC1), time=1.0, kind="before")], run,
                          [Event(machine=ids[0], time=6.0, kind="after", data={"n": 1})])
    assert len(events) == 4202 and events[1] == Event(ids[0], 5.0, "enrolled", "imported")
    await store.apply_batch(Batch(events=events))
    _, got = await store.events_since(start, limit=5000)
    assert got == list(events)
    assert [e.kind for e in await store.list_events(ids[0])] == ["enrolled", "after"]
    with pytest.raises(ValidationError):
        await store.apply_batch(Batch(events=codec.joined(
            [Event(machine=MAC2, time=1.0, kind="k")],
            codec.EventRun([mid(MAC3), " "], 5.0, "enrolled", "imported"))))
    assert await store.list_events(MAC2) == [] and await store.list_events(mid(MAC3)) == []


# --- leases ----------------------------------------------------------------------------------


async def test_leases(store: Store) -> None:
    await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.2", expires=200.0, hostname="b"))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0))
    assert await store.list_leases() == [
        Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0),
        Lease(mac=MAC2, ipv4="10.0.0.2", expires=200.0, hostname="b"),
    ]
    # replace by MAC, including moving to another address (the old one is freed)
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.3", expires=300.0))
    await store.put_lease(Lease(mac=MAC3, ipv4="10.0.0.1", expires=300.0))
    assert {(x.mac, x.ipv4) for x in await store.list_leases()} == {
        (MAC1, "10.0.0.3"),
        (MAC2, "10.0.0.2"),
        (MAC3, "10.0.0.1"),
    }


async def test_a_lease_is_found_by_its_address(store: Store) -> None:
    """U-Boot's ``pxelinux.cfg/<hex IP>`` and GRUB's ``grub.cfg-<hex IP>`` look a machine up
    by its leased address (content.py's _by_ip): one indexed read, expired or not."""
    assert await store.lease_by_ip("10.0.0.1") is None
    await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.2", expires=200.0, hostname="b"))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0))
    assert await store.lease_by_ip("10.0.0.2") == Lease(mac=MAC2, ipv4="10.0.0.2",
                                                         expires=200.0, hostname="b")
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.3", expires=300.0))  # moved
    assert await store.lease_by_ip("10.0.0.1") is None
    assert await store.lease_by_ip("10.0.0.3") == Lease(mac=MAC1, ipv4="10.0.0.3",
                                                         expires=300.0)
    await store.delete_lease(MAC1)
    assert await store.lease_by_ip("10.0.0.3") is None
    assert await store.lease_by_ip("10.0.0.20") is None  # no prefix match


async def test_lease_address_conflict(store: Store) -> None:
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0))
    with pytest.raises(Conflict) as err:
        await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.1", expires=100.0))
    assert "10.0.0.1" in str(err.value) and MAC1 in str(err.value)
    assert await store.list_leases() == [Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0)]


async def test_lease_renewal_same_address(store: Store) -> None:
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0))
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=500.0))
    assert [x.expires for x in await store.list_leases()] == [500.0]


async def test_delete_lease(store: Store) -> None:
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=100.0))
    await store.delete_lease(MAC1)
    await store.delete_lease(MAC1)  # absent: harmless
    assert await store.list_leases() == []
    await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.1", expires=100.0))


async def test_lease_address_validated(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.256", expires=1.0))
    assert err.value.field == "ipv4"


# --- settings --------------------------------------------------------------------------------


async def test_settings(store: Store) -> None:
    assert await store.get_setting("admin_token") is None
    await store.put_setting("admin_token", "h1")
    await store.put_setting("admin_token", "h2")
    await store.put_setting("other", "")
    assert await store.get_setting("admin_token") == "h2"
    assert await store.get_setting("other") == ""
    await store.delete_setting("admin_token")
    await store.delete_setting("never-set")  # no error
    assert await store.get_setting("admin_token") is None
    assert await store.get_setting("other") == ""


async def test_a_machines_refused_claims_go_with_it_and_stale_settings_at_a_start(
        store: Store) -> None:
    """A deleted machine's refused claims (REFUSED_CLAIMS + its id, claims.KeptClaims)
    stayed, read by no one: the store had no setting delete (s42-ops). Now its delete
    removes them in its transaction; forget_stale_settings (a server's start) drops those
    of machines already gone and the marker an earlier netboot wrote, and keeps a live
    machine's and every other setting."""
    from netboot.inventory.base import REFUSED_CLAIMS

    gone, kept = Machine(macs=(MacAddress.parse(MAC1),)), Machine(macs=(MacAddress.parse(MAC2),))
    await store.apply_batch(Batch(create=(gone, kept)))
    for m in (gone, kept):
        await store.put_setting(REFUSED_CLAIMS + m.id, "{}")
    await store.put_setting(REFUSED_CLAIMS + "m-deleted-before", "{}")
    await store.put_setting("older_registrations_none", "1")
    await store.put_setting("refused-claimsx", "not a machine's")
    await store.put_setting("cluster-init/c", gone.id)
    await store.delete_machine(gone.id)
    assert await store.get_setting(REFUSED_CLAIMS + gone.id) is None
    assert await store.get_setting(REFUSED_CLAIMS + kept.id) == "{}"
    assert await store.forget_stale_settings() == 2
    assert await store.get_setting(REFUSED_CLAIMS + "m-deleted-before") is None
    assert await store.get_setting("older_registrations_none") is None
    for key in (REFUSED_CLAIMS + kept.id, "refused-claimsx", "cluster-init/c"):
        assert await store.get_setting(key) is not None
    assert await store.forget_stale_settings() == 0


# --- lifecycle -------------------------------------------------------------------------------


async def test_use_after_close_is_store_error(store: Store) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.machine_by("mac", MAC1)
    await store.close()  # twice is harmless
    await store.open()  # and the fixture's close still works


async def test_filter_by_uuid_and_serials(store: Store) -> None:
    from netboot.model import MacAddress, Machine

    a = Machine(macs=(MacAddress.parse("02:00:00:00:00:01"),), hostname="a",
                uuid="8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4", serial="S1")
    b = Machine(macs=(MacAddress.parse("02:00:00:00:00:02"),), hostname="b", serial="S2")
    await store.create_machine(a)
    await store.create_machine(b)
    found = await store.list_machines(MachineFilter(uuid=a.uuid))
    assert [m.hostname for m in found] == ["a"]
    nobody = "00000000-0000-0000-0000-000000000000"
    assert await store.list_machines(MachineFilter(uuid=nobody)) == []
    found = await store.list_machines(MachineFilter(serials=("S2", "nope")))
    assert [m.hostname for m in found] == ["b"]
    assert await store.count_machines(MachineFilter(serials=("S1", "S2"))) == 2


# --- identity: several NICs, machines without a MAC, identifier claims, merges ---------------


async def test_every_nic_finds_the_machine(store: Store) -> None:
    two = Machine(macs=(MacAddress.parse(MAC1), MacAddress.parse(MAC2)), hostname="two")
    await store.create_machine(two)
    for m in (MAC1, MAC2, "02-00-00-00-00-02".upper()):
        assert await store.machine_by("mac", m) == two
    assert await store.get_machine(two.id) == two
    assert await store.machine_by("mac", MAC3) is None


async def test_machine_without_mac_found_by_serial_asset_uuid(store: Store) -> None:
    uuid = "4c4c4544-0042-3510-8052-b2c04f4e3032"
    bare = Machine(serial="SN-1", asset="A-1", uuid=uuid, hostname="bare")
    await store.create_machine(bare)
    assert await store.machine_by("serial", "SN-1") == bare
    assert await store.machine_by("serial", " SN-1 ") == bare  # stripped like firmware's
    assert await store.machine_by("asset", "A-1") == bare
    assert await store.machine_by("uuid", uuid.upper()) == bare
    assert await store.machine_by("serial", "sn-1") is None  # serials are case-sensitive
    assert await store.count_machines(MachineFilter(has_mac=False)) == 1
    assert await store.count_machines(MachineFilter(has_mac=True)) == 0
    with pytest.raises(ValidationError) as err:
        await store.machine_by("colour", "red")
    assert err.value.field == "kind"


@pytest.mark.parametrize("kind", ["serial", "asset", "uuid"])
async def test_identifier_claimed_twice_conflicts(store: Store, kind: str) -> None:
    value = "4c4c4544-0042-3510-8052-b2c04f4e3032" if kind == "uuid" else "X-9"
    first = machine(MAC1, **{kind: value})
    await store.create_machine(first)
    with pytest.raises(Conflict) as err:
        await store.create_machine(machine(MAC2, **{kind: value}))
    assert err.value.field == kind and err.value.holder == first.id
    assert value in str(err.value) and MAC1 in str(err.value)
    # An update claiming it is refused the same way; the machine is left as it was.
    await store.create_machine(machine(MAC2))
    with pytest.raises(Conflict):
        await store.update_machine(machine(MAC2, **{kind: value}))
    assert await store.machine_by("mac", MAC2) == machine(MAC2)


@pytest.mark.parametrize(("kind", "value"), [
    ("serial", "To be filled by O.E.M."), ("serial", "Default string"), ("serial", ""),
    ("serial", "0123456789"), ("asset", "No Asset Tag"), ("serial", "System Serial Number"),
    ("uuid", "00000000-0000-0000-0000-000000000000"),
    ("uuid", "ffffffff-ffff-ffff-ffff-ffffffffffff"),
])
async def test_placeholders_never_match_nor_conflict(store: Store, kind: str,
                                                     value: str) -> None:
    await store.create_machine(machine(MAC1, **{kind: value}))
    await store.create_machine(machine(MAC2, **{kind: value}))
    assert await store.machine_by(kind, value) is None
    assert await store.count_machines() == 2


async def test_update_releases_identifiers(store: Store) -> None:
    await store.create_machine(machine(MAC1, serial="S1"))
    await store.update_machine(Machine(macs=(MacAddress.parse(MAC2),), id=mid(MAC1),
                                       serial="S2"))
    assert await store.machine_by("mac", MAC1) is None
    assert await store.machine_by("serial", "S1") is None
    # Freed: another machine may take them now.
    await store.create_machine(Machine(macs=(MacAddress.parse(MAC1),), serial="S1"))
    got = await store.machine_by("serial", "S2")
    assert got is not None and got.id == mid(MAC1) and got.mac == MacAddress.parse(MAC2)


# One batch in which one machine gives up an identifier and another takes it. A batch is its
# machines written in order, each checked against the state the earlier ones left: that is
# what the recorder relies on when it joins independent commits into one batch and, when
# the store refuses the group, writes them again one by one ("only the refused one fails"):
# a group must not pass where its commits one after the other would not. So the giver must
# come first; a taker listed before its giver is refused, naming the giver, and a swap of
# two identifiers between two machines cannot be one batch (written as three: one machine
# gives its identifier up first). An import never moves an identifier: a row naming one
# that another enrolled machine holds is refused before the store is asked.
UUID_X = "4c4c4544-0042-3510-8052-b2c04f4e3099"


def _giver_and_taker(kind: str) -> tuple[Machine, Machine, Machine, Machine]:
    """(taker, giver) as stored, then (taker, giver) after the move of one ``kind``."""
    one, two, three = (MacAddress.parse(m) for m in (MAC1, MAC2, MAC3))
    if kind == "mac":
        giver = Machine(id="m-giver", macs=(two, three))
        return (Machine(id="m-taker", macs=(one,)), giver,
                Machine(id="m-taker", macs=(one, three)), replace(giver, macs=(two,)))
    value = UUID_X if kind == "uuid" else "SN-MOVED"
    giver = Machine(id="m-giver", macs=(two,), **{kind: value})  # type: ignore[arg-type]
    taker = Machine(id="m-taker", macs=(one,))
    return taker, giver, replace(taker, **{kind: value}), replace(giver, **{kind: None})


@pytest.mark.parametrize("kind", ["mac", "uuid", "serial"])
async def test_an_identifier_given_up_earlier_in_a_batch_may_be_taken(store: Store,
                                                                      kind: str) -> None:
    taker, giver, took, gave = _giver_and_taker(kind)
    await store.apply_batch(Batch(create=[taker, giver]))
    await store.apply_batch(Batch(update=[gave, took]))
    assert await store.list_machines() == [took, gave]
    value = str(took.macs[1]) if kind == "mac" else getattr(took, kind)
    assert await store.machine_by(kind, value) == took


@pytest.mark.parametrize("kind", ["mac", "uuid", "serial"])
async def test_an_identifier_taken_before_its_holder_gives_it_up_is_refused(
        store: Store, kind: str) -> None:
    taker, giver, took, gave = _giver_and_taker(kind)
    await store.apply_batch(Batch(create=[taker, giver]))
    with pytest.raises(Conflict, match="already belongs to machine m-giver") as err:
        await store.apply_batch(Batch(update=[took, gave]))
    assert err.value.field == kind and err.value.holder == giver.id
    assert await store.list_machines() == [taker, giver]  # nothing written
    # A new machine taking it is refused too: a batch's creates come before its updates.
    new = replace(took, id="m-new", macs=(MacAddress.parse(mac(9)), *took.macs[1:]))
    with pytest.raises(Conflict, match="already belongs to machine m-giver") as err:
        await store.apply_batch(Batch(create=[new], update=[gave]))
    assert err.value.field == kind and err.value.holder == giver.id
    assert await store.list_machines() == [taker, giver]


@pytest.mark.parametrize("kind", ["uuid", "serial", "asset"])
async def test_an_identifier_learnt_from_its_base_is_claimed_as_written_whole(
        store: Store, kind: str) -> None:
    """An update given the machine it was made from (Batch.bases, as the recorder writes a
    first DHCP sighting's learnt UUID) that adds an identifier: found by it, and refused
    alike when another machine holds it, or takes it before its holder gives it up in the
    same batch (SQLite changes such a document in place, inserting the new rows only)."""
    value = UUID_X if kind == "uuid" else "SN-LEARNT"
    await store.apply_batch(Batch(create=[machine(MAC1), machine(MAC2)]))
    one, two = await store.get_machine(mid(MAC1)), await store.get_machine(mid(MAC2))
    assert one is not None and two is not None

    def learnt(base: Machine, **kw: object) -> Batch:
        new = replace(base, facts={"manufacturer": "QEMU"}, updated=base.updated + 1,
                      **kw)  # type: ignore[arg-type]
        return Batch(update=[new], versions={base.id: base.updated}, bases={base.id: base})

    await store.apply_batch(learnt(one, **{kind: value}))
    got = await store.machine_by(kind, value)
    assert got is not None and got.id == one.id and got.facts == {"manufacturer": "QEMU"}
    with pytest.raises(Conflict, match=f"{kind} {value} already belongs to machine") as err:
        await store.apply_batch(learnt(two, **{kind: value}))
    assert err.value.field == kind and err.value.holder == one.id
    assert await store.get_machine(two.id) == two  # nothing written
    # The holder gives it up in the same batch, after the taker: refused; before: taken.
    held = await store.get_machine(one.id)
    assert held is not None
    gave = replace(held, **{kind: None}, updated=held.updated + 1)  # type: ignore[arg-type]
    took = replace(two, **{kind: value}, updated=two.updated + 1)  # type: ignore[arg-type]
    versions = {held.id: held.updated, two.id: two.updated}
    bases = {held.id: held, two.id: two}
    with pytest.raises(Conflict, match="already belongs to machine") as err:
        await store.apply_batch(Batch(update=[took, gave], versions=versions, bases=bases))
    assert err.value.field == kind and err.value.holder == one.id
    assert await store.list_machines() == [held, two]
    await store.apply_batch(Batch(update=[gave, took], versions=versions, bases=bases))
    assert await store.machine_by(kind, value) == took
    assert await store.list_machines() == [gave, took]


async def test_two_machines_swapping_macs_in_one_batch_are_refused(store: Store) -> None:
    one, two, three, four = (MacAddress.parse(m) for m in (MAC1, MAC2, MAC3, mac(4)))
    a, b = Machine(id="m-a", macs=(one, three)), Machine(id="m-b", macs=(two, four))
    await store.apply_batch(Batch(create=[a, b]))
    with pytest.raises(Conflict, match=f"mac {mac(4)} already belongs to machine m-b") as err:
        await store.apply_batch(Batch(update=[replace(a, macs=(one, four)),
                                              replace(b, macs=(two, three))]))
    assert err.value.field == "mac" and err.value.holder == b.id
    assert await store.list_machines() == [a, b]
    # Three batches (or one with a giver first): b gives its NIC up, a takes it, b takes a's.
    await store.apply_batch(Batch(update=[replace(b, macs=(two,)),
                                          replace(a, macs=(one, four))]))
    await store.apply_batch(Batch(update=[replace(b, macs=(two, three))]))
    assert await store.list_machines() == [replace(a, macs=(one, four)),
                                           replace(b, macs=(two, three))]


async def test_machines_without_mac_list_last_by_id(store: Store) -> None:
    await store.create_machine(Machine(id="m-b", serial="B"))
    await store.create_machine(machine(MAC2))
    await store.create_machine(Machine(id="m-a", serial="A"))
    await store.create_machine(machine(MAC1))
    assert [m.id for m in await store.list_machines()] == [mid(MAC1), mid(MAC2), "m-a", "m-b"]
    assert [m.id for m in await store.list_machines(MachineFilter(has_mac=False))] == [
        "m-a", "m-b"]


async def test_delete_drops_the_leases_of_every_nic(store: Store) -> None:
    two = Machine(macs=(MacAddress.parse(MAC1), MacAddress.parse(MAC2)))
    await store.create_machine(two)
    await store.put_lease(Lease(mac=MAC1, ipv4="10.0.0.1", expires=9.0))
    await store.put_lease(Lease(mac=MAC2, ipv4="10.0.0.2", expires=9.0))
    await store.put_lease(Lease(mac=MAC3, ipv4="10.0.0.3", expires=9.0))
    await store.delete_machine(two.id)
    assert [lease.mac for lease in await store.list_leases()] == [MAC3]
    assert await store.machine_by("mac", MAC2) is None


async def test_merge_moves_events_and_frees_identifiers(store: Store) -> None:
    found = machine(MAC2, state=MachineState.DISCOVERED, serial="SN-7")
    enrolled = Machine(serial="SN-8", hostname="edge")
    await store.apply_batch(Batch(create=[found, enrolled]))
    await store.add_event(Event(found.id, 1.0, "discovered"))
    await store.add_event(Event(enrolled.id, 2.0, "enrolled"))
    merged = Machine(id=enrolled.id, macs=(MacAddress.parse(MAC2),), serial="SN-8",
                     hostname="edge", facts={"from": "discovery"})
    await store.apply_batch(Batch(merge=[(found.id, enrolled.id)], update=[merged],
                                  events=[Event(enrolled.id, 3.0, "merged")]))
    assert await store.get_machine(found.id) is None
    assert await store.machine_by("mac", MAC2) == merged
    assert await store.machine_by("serial", "SN-7") is None
    assert [e.kind for e in await store.list_events(enrolled.id)] == [
        "discovered", "enrolled", "merged"]
    assert await store.list_events(found.id) == []
    assert await store.count_machines() == 1


async def test_merge_of_missing_machine_applies_nothing(store: Store) -> None:
    await store.create_machine(machine(MAC1))
    with pytest.raises(NotFound, match="m-nope"):
        await store.apply_batch(Batch(merge=[("m-nope", mid(MAC1))],
                                      create=[machine(MAC2)]))
    assert await store.count_machines() == 1


# --- search and sort (the dashboard's table) ---------------------------------------------


async def _named_fleet(store: Store) -> None:
    await store.apply_batch(Batch(create=[
        machine(MAC1, hostname="rack2-b", serial="SN-0001", updated=30.0),
        machine(MAC2, hostname="Rack1-A", serial="sn-0002", updated=10.0),
        machine(MAC3, serial="X-9", state=MachineState.FAILED, updated=20.0),
        Machine(id="m-nonic", hostname="rack1-z", serial="SN-NONIC", updated=5.0),
    ]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rack1", [MAC2, None]),  # case-insensitive, machines without a NIC last
        ("sn-000", [MAC1, MAC2]),  # serials, whatever their case
        ("00:00:03", [MAC3]),  # part of a MAC
        ("nonic", [None]),  # part of an id
        ("%", []),  # no wildcard: a literal character that no field has
        ("_", []),
    ],
)
async def test_text_search(store: Store, text: str, expected: list[str | None]) -> None:
    await _named_fleet(store)
    flt = MachineFilter(text=text)
    assert [str(m.mac) if m.mac else None for m in await store.list_machines(flt)] == expected
    assert await store.count_machines(flt) == len(expected)


async def test_a_search_within_given_ids(store: Store) -> None:
    """``ids`` (what a loaded view found for a text, api.py): only those machines, with every
    other filter, the order and the store's own text check; none for an empty set."""
    await _named_fleet(store)
    everyone = {m.id: m for m in await store.list_machines()}
    by_host = {m.hostname: m.id for m in everyone.values()}
    some = frozenset({by_host["rack2-b"], by_host[None], "m-nonic", "m-gone"})
    flt = MachineFilter(ids=some)
    assert [m.hostname for m in await store.list_machines(flt)] == ["rack2-b", None, "rack1-z"]
    assert await store.count_machines(flt) == 3
    flt = MachineFilter(ids=some, text="rack")  # the store's text check still holds
    assert [m.hostname for m in await store.list_machines(flt)] == ["rack2-b", "rack1-z"]
    assert await store.count_machines(flt) == 2
    flt = MachineFilter(ids=some, state=MachineState.FAILED)
    assert [m.hostname for m in await store.list_machines(flt)] == [None]
    assert await store.list_machines(MachineFilter(ids=frozenset())) == []
    assert await store.count_machines(MachineFilter(ids=frozenset(), text="rack")) == 0


@pytest.mark.parametrize(
    ("sort", "descending", "expected"),
    [
        ("hostname", False, ["Rack1-A", "rack1-z", "rack2-b", None]),
        ("hostname", True, ["rack2-b", "rack1-z", "Rack1-A", None]),  # absent last either way
        ("updated", False, ["rack1-z", "Rack1-A", None, "rack2-b"]),
        ("updated", True, ["rack2-b", None, "Rack1-A", "rack1-z"]),
        # By the state's name (enrolled < failed), ties by MAC, the machine without one last.
        ("state", False, ["rack2-b", "Rack1-A", "rack1-z", None]),
    ],
)
async def test_sort(store: Store, sort: str, descending: bool,
                    expected: list[str | None]) -> None:
    await _named_fleet(store)
    found = await store.list_machines(MachineFilter(sort=sort, descending=descending))
    assert [m.hostname for m in found] == expected


async def test_unknown_sort_refused(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.list_machines(MachineFilter(sort="data; DROP TABLE machines"))
    assert err.value.field == "sort"


# --- API tokens and the audit log ------------------------------------------------------------


def api_token(name: str = "ci", sha: str = "a" * 64, **kw: object) -> ApiToken:
    return ApiToken(name=name, sha256=sha, scope=kw.pop("scope", Scope.READ),  # type: ignore[arg-type]
                    created=100.0, **kw)  # type: ignore[arg-type]


async def test_tokens_round_trip_by_hash(store: Store) -> None:
    assert await store.token_by_hash("a" * 64) is None
    token = api_token(expires=200.5)
    await store.create_token(token)
    assert await store.token_by_hash("a" * 64) == token
    assert await store.token_by_hash("b" * 64) is None
    await store.touch_token("ci", 150.0)
    found = await store.token_by_hash("a" * 64)
    assert found is not None and found.last_used == 150.0 and found.scope == Scope.READ
    await store.touch_token("gone", 1.0)  # revoked meanwhile: nothing to do, no error


async def test_token_name_and_hash_are_unique(store: Store) -> None:
    await store.create_token(api_token("ci", "a" * 64))
    with pytest.raises(Conflict, match="'ci' already exists"):
        await store.create_token(api_token("ci", "b" * 64, scope=Scope.ADMIN))
    with pytest.raises(Conflict, match="this value"):
        await store.create_token(api_token("other", "a" * 64))
    assert [t.name for t in await store.list_tokens()] == ["ci"]
    found = await store.token_by_hash("a" * 64)
    assert found is not None and found.scope == Scope.READ  # the refused write changed nothing


async def test_tokens_list_by_name_and_delete(store: Store) -> None:
    for name, sha in (("zeta", "c" * 64), ("alpha", "d" * 64)):
        await store.create_token(api_token(name, sha))
    assert [t.name for t in await store.list_tokens()] == ["alpha", "zeta"]
    await store.delete_token("zeta")
    assert await store.token_by_hash("c" * 64) is None
    with pytest.raises(NotFound):
        await store.delete_token("zeta")
    assert [t.name for t in await store.list_tokens()] == ["alpha"]


async def test_token_fields_are_checked(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.create_token(api_token(scope="root"))
    assert err.value.field == "scope"
    with pytest.raises(ValidationError) as err:
        await store.create_token(api_token(name=""))
    assert err.value.field == "name"
    assert await store.list_tokens() == []


def audit(t: float, actor: str = "ci", outcome: str = "201") -> AuditEntry:
    return AuditEntry(time=t, actor=actor, action="POST /api/v1/machines",
                      target="02:00:00:00:00:01", peer="192.0.2.7", outcome=outcome)


async def test_audit_oldest_first_newest_kept(store: Store) -> None:
    assert await store.list_audit() == []
    for t in (10.0, 20.0, 30.0, 40.0):
        await store.add_audit(audit(t, actor=f"a{int(t)}"))
    assert [e.time for e in await store.list_audit()] == [10.0, 20.0, 30.0, 40.0]
    assert await store.list_audit() == [audit(10.0, "a10"), audit(20.0, "a20"),
                                        audit(30.0, "a30"), audit(40.0, "a40")]
    assert [e.time for e in await store.list_audit(since=20.0)] == [20.0, 30.0, 40.0]
    assert [e.time for e in await store.list_audit(limit=2)] == [30.0, 40.0]
    assert [e.time for e in await store.list_audit(since=35.0, limit=5)] == [40.0]
    assert await store.list_audit(limit=0) == []


async def test_an_entry_settled_replaces_its_requests_stored_entry_or_is_added(
        store: Store) -> None:
    """settle_audit: the entry a change's own transaction carried, if stored, gets the
    settled outcome (one entry per request, not a second beside it); not stored, an entry
    like it with the other outcome is added. Only the very entry: another request's of
    another time or outcome is left alone."""
    await store.add_audit(audit(10.0))
    await store.add_audit(audit(20.0))
    await store.add_audit(audit(20.0, outcome="409"))
    await store.settle_audit(audit(20.0), "503 outcome unknown (written)",
                             "503 outcome unknown")
    await store.settle_audit(audit(30.0), "503 outcome unknown (written)",
                             "503 outcome unknown")
    assert [(e.time, e.outcome) for e in await store.list_audit()] == [
        (10.0, "201"), (20.0, "503 outcome unknown (written)"), (20.0, "409"),
        (30.0, "503 outcome unknown")]
    assert (await store.list_audit())[-1] == audit(30.0, outcome="503 outcome unknown")


async def test_audit_prune_keeps_the_newest(store: Store) -> None:
    for t in range(5):
        await store.add_audit(audit(float(t)))
    assert await store.prune_audit(2) == 3
    assert [e.time for e in await store.list_audit()] == [3.0, 4.0]
    assert await store.prune_audit(10) == 0
    await store.add_audit(audit(9.0))
    assert [e.time for e in await store.list_audit()] == [3.0, 4.0, 9.0]


async def test_audit_fields_are_checked(store: Store) -> None:
    with pytest.raises(ValidationError) as err:
        await store.add_audit(AuditEntry(time=1.0, actor="", action="x", target="",
                                         peer="", outcome="ok"))
    assert err.value.field == "actor"
    assert await store.list_audit() == []


async def test_audit_entries_in_a_batch_are_all_or_nothing_with_it(store: Store) -> None:
    """Access.record commits its entry as a batch (with the recorder's group commits)."""
    m = machine()
    await store.apply_batch(Batch(create=(m,), audit=(audit(1.0, "a1"),)))
    await store.apply_batch(Batch(audit=(audit(2.0, "a2"), audit(3.0, "a3"))))
    assert await store.list_audit() == [audit(1.0, "a1"), audit(2.0, "a2"), audit(3.0, "a3")]
    with pytest.raises(Conflict):  # the machine exists: nothing of the batch is written
        await store.apply_batch(Batch(create=(m,), audit=(audit(4.0, "a4"),)))
    with pytest.raises(ValidationError):  # a bad entry: nor the rest of its batch
        await store.apply_batch(Batch(create=(machine(MAC2),), audit=(
            AuditEntry(time=5.0, actor="", action="x", target="", peer="", outcome="ok"),)))
    assert [e.time for e in await store.list_audit()] == [1.0, 2.0, 3.0]
    assert await store.get_machine(machine(MAC2).id) is None


# --- the change feed wakes readers -----------------------------------------------------------


async def test_wait_for_changes_returns_at_a_commit(store: Store) -> None:
    seq = (await store.changes_since(-1)).seq
    assert await store.wait_for_changes(seq, 0.0) is False  # nothing committed since
    waiter = asyncio.create_task(store.wait_for_changes(seq, 120.0))
    await asyncio.sleep(0)  # let it check and start waiting
    await store.put_setting("k", "v")
    assert await waiter is True
    assert await store.wait_for_changes(seq, 0.0) is True  # already: at once
    assert await store.wait_for_changes(-1, 0.0) is True  # knows nothing: read


# --- race safety without in-process locks: compare-and-set, claims ---------------------------


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def pair(request: pytest.FixtureRequest,
               tmp_path: Path) -> AsyncIterator[tuple[Store, Store]]:
    """Two store objects on one inventory, as two servers have (a memory store cannot be
    shared between processes: there it is one object twice)."""
    async with contextlib.AsyncExitStack() as stack:
        stores = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack)
        yield stores[0], stores[1]


async def test_update_with_the_state_read_succeeds(store: Store) -> None:
    await store.create_machine(machine(MAC1, state=MachineState.ENROLLED))
    booting = machine(MAC1, state=MachineState.BOOTING, token_hash="ab" * 32)
    await store.update_machine(booting, expect_state=MachineState.ENROLLED)
    assert await store.get_machine(mid(MAC1)) == booting


async def test_update_from_a_stale_state_is_refused_and_writes_nothing(store: Store) -> None:
    await store.create_machine(machine(MAC1, state=MachineState.BOOTING, hostname="a"))
    with pytest.raises(StateChanged) as err:
        await store.apply_batch(Batch(
            update=[machine(MAC1, state=MachineState.BOOTING, hostname="b")],
            create=[machine(MAC2)], events=[Event(mid(MAC1), 1.0, "install-plan")],
            expect={mid(MAC1): MachineState.ENROLLED}))
    assert err.value.field == "state" and err.value.holder == mid(MAC1)
    assert "booting now, not enrolled" in str(err.value)
    got = await store.get_machine(mid(MAC1))
    assert got is not None and got.hostname == "a"
    assert await store.machine_by("mac", MAC2) is None
    assert await store.list_events(mid(MAC1)) == []
    with pytest.raises(NotFound):
        await store.update_machine(machine(MAC3), expect_state=MachineState.ENROLLED)


async def test_expected_states_are_those_before_the_batch(store: Store) -> None:
    """A machine updated twice in one batch is compared with its state before the batch,
    not with the first update's; a machine expected but not updated is compared too."""
    await store.create_machine(machine(MAC1, state=MachineState.ENROLLED))
    await store.create_machine(machine(MAC2, state=MachineState.INSTALLED))
    booting = machine(MAC1, state=MachineState.BOOTING, updated=2.0)
    installing = machine(MAC1, state=MachineState.INSTALLING, updated=3.0)
    with pytest.raises(StateChanged):
        await store.apply_batch(Batch(update=[booting, installing],
                                      expect={mid(MAC1): MachineState.BOOTING}))
    with pytest.raises(StateChanged) as err:
        await store.apply_batch(Batch(update=[booting, installing], expect={
            mid(MAC1): MachineState.ENROLLED, mid(MAC2): MachineState.ENROLLED}))
    assert err.value.holder == mid(MAC2)
    assert await store.get_machine(mid(MAC1)) == machine(MAC1, state=MachineState.ENROLLED)
    await store.apply_batch(Batch(update=[booting, installing], expect={
        mid(MAC1): MachineState.ENROLLED, mid(MAC2): MachineState.INSTALLED}))
    assert await store.get_machine(mid(MAC1)) == installing


async def test_a_write_from_an_older_version_does_not_undo_a_change_made_since(
        pair: tuple[Store, Store]) -> None:
    """A boot decision reads a machine and writes the whole machine derived from that read
    a few ms later (its group commit): an operator's edit committed in between through
    another store (the CLI, another server) keeps the state, so only the version read
    (Batch.versions) tells that the write would undo it. Refused, nothing written; the
    same write from the new version passes. In a group of several machines (SQLite's one
    read of the stored rows) and for a machine expected without being updated alike."""
    a, b = pair
    await a.create_machine(machine(MAC1, state=MachineState.ENROLLED, updated=1.0))
    await a.create_machine(machine(MAC2, state=MachineState.ENROLLED, updated=1.0))
    read = await a.get_machine(mid(MAC1))
    assert read is not None
    # The operator moves it to another cluster meanwhile (the state stays enrolled).
    await b.update_machine(replace(read, cluster="edge", updated=2.0),
                           expect_state=MachineState.ENROLLED)
    plan = replace(read, state=MachineState.BOOTING, token_hash="ab" * 32, updated=3.0)
    other = machine(MAC2, state=MachineState.BOOTING, updated=3.0)
    for batch in (Batch(update=[plan], expect={read.id: read.state},
                        versions={read.id: read.updated}),
                  Batch(update=[other, plan], events=[Event(read.id, 3.0, "install-plan")],
                        expect={read.id: read.state, other.id: MachineState.ENROLLED},
                        versions={read.id: read.updated, other.id: 1.0}),
                  Batch(update=[other], versions={other.id: 1.0, read.id: read.updated})):
        with pytest.raises(StateChanged) as err:
            await a.apply_batch(batch)
        assert err.value.field == "updated" and err.value.holder == read.id
        assert "since it was read" in str(err.value)
        got = await b.get_machine(read.id)
        assert got is not None and got.cluster == "edge" and got.state == MachineState.ENROLLED
        assert await a.get_machine(other.id) == machine(MAC2, state=MachineState.ENROLLED,
                                                        updated=1.0)
        assert await a.list_events(read.id) == []
    # Decided again from what is stored now: written.
    fresh = await a.get_machine(read.id)
    assert fresh is not None and fresh.updated == 2.0
    again = replace(fresh, state=MachineState.BOOTING, token_hash="cd" * 32, updated=4.0)
    await a.apply_batch(Batch(update=[other, again],
                              expect={fresh.id: fresh.state, other.id: MachineState.ENROLLED},
                              versions={fresh.id: fresh.updated, other.id: 1.0}))
    assert await b.get_machine(read.id) == again
    assert await b.get_machine(other.id) == other
    # A caller that passes only a state is checked on the state alone, as before.
    await a.apply_batch(Batch(update=[replace(again, hostname="x", updated=5.0)],
                              expect={read.id: MachineState.BOOTING}))
    with pytest.raises(NotFound):
        await a.apply_batch(Batch(update=[machine(MAC3)], versions={mid(MAC3): 1.0}))


async def test_claim_setting_is_insert_if_absent(store: Store) -> None:
    assert await store.claim_setting("cluster-init/edge", "m-1") == "m-1"
    assert await store.claim_setting("cluster-init/edge", "m-2") == "m-1"  # taken: the winner
    assert await store.get_setting("cluster-init/edge") == "m-1"
    # A stale claim (its machine is gone) is replaced only by one who names it.
    assert await store.claim_setting("cluster-init/edge", "m-2", replace="m-9") == "m-1"
    assert await store.claim_setting("cluster-init/edge", "m-2", replace="m-1") == "m-2"


async def test_two_writers_advancing_one_machine_exactly_one_wins(
        pair: tuple[Store, Store]) -> None:
    """Two servers issue an install plan for one machine at the same moment: one token."""
    a, b = pair
    await a.create_machine(machine(MAC1, state=MachineState.ENROLLED))
    for attempt in range(5):
        read = await a.get_machine(mid(MAC1))
        assert read is not None
        plans = [machine(MAC1, state=MachineState.BOOTING, token_hash=f"{n}{attempt}" * 32)
                 for n in (1, 2)]
        outcome = await asyncio.gather(
            *(s.update_machine(p, expect_state=read.state) for s, p in zip(pair, plans,
                                                                          strict=True)),
            return_exceptions=True)
        won = [p for p, o in zip(plans, outcome, strict=True) if o is None]
        lost = [o for o in outcome if o is not None]
        assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], StateChanged)
        assert await a.get_machine(mid(MAC1)) == won[0] == await b.get_machine(mid(MAC1))
        await a.update_machine(machine(MAC1, state=MachineState.ENROLLED))  # again


async def test_two_servers_claiming_the_cluster_init_node_agree_on_one(
        pair: tuple[Store, Store]) -> None:
    a, b = pair
    for n in range(5):
        key = f"cluster-init/c{n}"
        winners = await asyncio.gather(a.claim_setting(key, "m-a"), b.claim_setting(key, "m-b"))
        assert winners[0] == winners[1] in ("m-a", "m-b")
        assert await a.get_setting(key) == winners[0] == await b.get_setting(key)


async def test_two_servers_claiming_a_dead_init_nodes_place_agree_on_one(
        pair: tuple[Store, Store]) -> None:
    """The init node removed (its disk died: netboot machines rm), two held servers of the
    cluster retry through two netboot servers at once: each claims in the dead node's place
    (BootService._k3s_join's replace=), one wins, and both are told the same (s36-journey)."""
    a, b = pair
    for n in range(5):
        key = f"cluster-init/d{n}"
        assert await a.claim_setting(key, "m-dead") == "m-dead"
        winners = await asyncio.gather(a.claim_setting(key, "m-a", replace="m-dead"),
                                       b.claim_setting(key, "m-b", replace="m-dead"))
        assert winners[0] == winners[1] in ("m-a", "m-b")
        assert await a.get_setting(key) == winners[0] == await b.get_setting(key)


async def test_two_servers_leasing_one_address_exactly_one_wins(
        pair: tuple[Store, Store]) -> None:
    a, b = pair
    for n in range(5):
        ip = f"192.0.2.{10 + n}"
        outcome = await asyncio.gather(
            a.put_lease(Lease(mac=mac(100 + n), ipv4=ip, expires=100.0), now=50.0),
            b.put_lease(Lease(mac=mac(200 + n), ipv4=ip, expires=100.0), now=50.0),
            return_exceptions=True)
        assert sorted(type(o).__name__ for o in outcome) == ["Conflict", "NoneType"]
        holders = [lease.mac for lease in await a.list_leases() if lease.ipv4 == ip]
        assert len(holders) == 1


async def test_a_claim_takes_over_only_an_expired_lease(store: Store) -> None:
    await store.put_lease(Lease(mac=MAC1, ipv4="192.0.2.9", expires=100.0))
    for now in (None, 99.0):
        with pytest.raises(Conflict, match=MAC1):
            await store.put_lease(Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0), now=now)
    await store.put_lease(Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0), now=100.0)
    assert await store.list_leases() == [Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0)]


async def test_a_lease_ending_anothers_of_its_address_is_one_write(store: Store) -> None:
    """put_lease's ``ending``: a machine's fixed address moved from NIC MAC1 to MAC2 (the
    DHCP server's LeasePool.moved_from) ends MAC1's lease of it in the same write; a lease
    of MAC1 on another address, or of a third MAC, is not ended (Conflict, as before)."""
    await store.put_lease(Lease(mac=MAC1, ipv4="192.0.2.9", expires=100.0))
    with pytest.raises(Conflict, match=MAC1):
        await store.put_lease(Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0))
    await store.put_lease(Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0),
                          ending=MAC1.upper())
    assert await store.list_leases() == [Lease(mac=MAC2, ipv4="192.0.2.9", expires=500.0)]
    await store.put_lease(Lease(mac=MAC1, ipv4="192.0.2.10", expires=100.0))
    with pytest.raises(Conflict, match=MAC2):  # MAC1 is not the holder of .9
        await store.put_lease(Lease(mac=MAC3, ipv4="192.0.2.9", expires=500.0), ending=MAC1)
    await store.put_lease(Lease(mac=MAC2, ipv4="192.0.2.9", expires=600.0), ending=MAC1)
    assert sorted(await store.list_leases(), key=lambda lease: lease.mac) == [
        Lease(mac=MAC1, ipv4="192.0.2.10", expires=100.0),
        Lease(mac=MAC2, ipv4="192.0.2.9", expires=600.0)]


# --- one fixed_ipv4 per address, owned by the store (s42-integrity) ----------------------


def taken(address: str) -> str:
    """The store's refusal of ``address`` to a second machine (base.fixed_taken)."""
    return re.escape(f"fixed_ipv4 {address} is the fixed address of machine")


async def test_a_fixed_address_given_to_a_second_machine_is_refused_by_the_store(
        store: Store) -> None:
    """Whoever writes (Core checks first, under its lock; a writer that does not: hand SQL
    setting the column, a tool of its own, a writer that raced another), the store itself
    refuses a second machine one fixed_ipv4, naming the holder: authoritative DHCP would
    lease it to both."""
    a = machine(MAC1, hostname="a", fixed_ipv4="192.0.2.10", created=1.0, updated=1.0)
    await store.create_machine(a)
    b = machine(MAC2, hostname="b", fixed_ipv4="192.0.2.10")
    with pytest.raises(Conflict, match=re.escape(
            "fixed_ipv4 192.0.2.10 is the fixed address of machine")) as err:
        await store.create_machine(b)
    assert (err.value.field, err.value.holder) == ("fixed_ipv4", a.id)
    await store.create_machine(replace(b, fixed_ipv4=None))
    for write in (lambda: store.update_machine(b),
                  lambda: store.apply_batch(Batch(update=[b], versions={b.id: b.updated},
                                                  bases={b.id: replace(b, fixed_ipv4=None)}))):
        with pytest.raises(Conflict, match=taken("192.0.2.10")) as err:
            await write()
        assert (err.value.field, err.value.holder) == ("fixed_ipv4", a.id)
    # A bulk import (a batch past sqlite.BULK_ROWS: its own insert path) likewise.
    many = [machine(mac(100 + i), fixed_ipv4=f"198.51.100.{i % 200 + 1}") for i in range(600)]
    many[-1] = replace(many[-1], fixed_ipv4="192.0.2.10")
    with pytest.raises(Conflict, match=taken("192.0.2.10")) as err:
        await store.apply_batch(Batch(create=many[:200] + many[-1:] + many[200:599]))
    assert err.value.holder == a.id
    assert await store.count_machines() == 2
    # Let go, it is free: a machine's own address again is no conflict.
    await store.update_machine(replace(a, fixed_ipv4="192.0.2.11", updated=2.0))
    await store.update_machine(replace(b, updated=2.0))
    await store.update_machine(replace(b, hostname="b2", updated=3.0))
    assert (await store.get_machine(b.id)).fixed_ipv4 == "192.0.2.10"  # type: ignore[union-attr]
    await store.delete_machine(b.id)
    await store.create_machine(replace(b, id="m-c", macs=(MacAddress.parse(MAC3),)))


async def test_a_batch_swapping_two_machines_fixed_addresses_is_written(store: Store) -> None:
    """An import that swaps two machines' addresses (A given B's, B given A's) is one batch:
    the unique index, checked at each row, must not refuse it; a batch that leaves one
    address to two machines still is."""
    a = machine(MAC1, fixed_ipv4="192.0.2.1", updated=1.0)
    b = machine(MAC2, fixed_ipv4="192.0.2.2", updated=1.0)
    c = machine(MAC3, fixed_ipv4="192.0.2.3", updated=1.0)
    await store.apply_batch(Batch(create=[a, b, c]))
    swapped = [replace(a, fixed_ipv4="192.0.2.2", updated=2.0),
               replace(b, fixed_ipv4="192.0.2.1", updated=2.0)]
    await store.apply_batch(Batch(update=swapped))
    assert await store.list_machines() == [*swapped, c]
    # A rotation of three, one of them given none (it lets go before the others take).
    rotated = [replace(swapped[0], fixed_ipv4="192.0.2.3", updated=3.0),
               replace(swapped[1], fixed_ipv4=None, updated=3.0),
               replace(c, fixed_ipv4="192.0.2.1", updated=3.0)]
    await store.apply_batch(Batch(update=rotated))
    assert await store.list_machines() == rotated
    # Two of the batch given one address: refused, nothing written.
    with pytest.raises(Conflict, match=taken("192.0.2.9")) as err:
        await store.apply_batch(Batch(update=[replace(rotated[0], fixed_ipv4="192.0.2.9"),
                                              replace(rotated[2], fixed_ipv4="192.0.2.9")]))
    assert err.value.field == "fixed_ipv4"
    # One moved onto an address the batch leaves to its holder: refused.
    with pytest.raises(Conflict, match=taken("192.0.2.1")) as err:
        await store.apply_batch(Batch(update=[replace(rotated[0], fixed_ipv4="192.0.2.1"),
                                              replace(rotated[1], hostname="x")]))
    assert err.value.holder == c.id
    assert await store.list_machines() == rotated
    # The freed addresses are free.
    await store.create_machine(machine(mac(9), fixed_ipv4="192.0.2.2"))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_two_writers_giving_one_fixed_address_at_once_give_it_once(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two real writers on one inventory (two SQLite stores on one file, each with its own
    connections as two processes have; two PostgreSQL stores on one schema, as two
    servers), neither taking netboot's fixed-address lock (an older server's or a tool's
    write), give two new machines one address at once, many times: the store lets exactly
    one have it, the other is refused naming it."""
    async with contextlib.AsyncExitStack() as stack:
        one, two = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        for i in range(20):
            address = f"198.51.100.{i + 1}"
            a = machine(mac(2 * i + 1), fixed_ipv4=address)
            b = machine(mac(2 * i + 2), fixed_ipv4=address)
            results = await asyncio.gather(one.create_machine(a), two.create_machine(b),
                                           return_exceptions=True)
            refused = [r for r in results if isinstance(r, Conflict)]
            assert len(refused) == 1 and results.count(None) == 1, results
            winner = a if results[0] is None else b
            assert (refused[0].field, refused[0].holder) == ("fixed_ipv4", winner.id)
            held = await one.list_machines(MachineFilter(fixed_ipv4=address))
            assert [m.id for m in held] == [winner.id]


async def check_a_shared_fixed_address_migrated(store: Store, a: Machine, b: Machine,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """After the migration that gave the store its unique fixed_ipv4 index, on an inventory
    where an older netboot stored ``a`` and then ``b`` with one address: both kept as they
    were, start-up names both and the fix, ``b`` boots and is edited as before, and no
    third machine is given the address; ``b`` given another address lets go of it."""
    from netboot.service import warn_of_shared_fixed_addresses

    assert await store.get_machine(a.id) == a and await store.get_machine(b.id) == b
    with caplog.at_level("WARNING"):
        await warn_of_shared_fixed_addresses(store)
    assert f"machines {a.ref}, {b.ref} share the fixed_ipv4 {a.fixed_ipv4}" in caplog.text
    assert "--fixed-ipv4" in caplog.text
    # b's writes go on: a boot's (in place, Batch.bases) and an edit of the whole machine.
    booted = replace(b, state=MachineState.BOOTING, updated=b.updated + 1)
    await store.apply_batch(Batch(update=[booted], versions={b.id: b.updated},
                                  bases={b.id: b}, learnt=frozenset()))
    edited = replace(booted, hostname="b-renamed", updated=booted.updated + 1)
    await store.update_machine(edited)
    await store.apply_batch(Batch(update=[replace(edited, labels={"r": "1"}),
                                          replace(a, labels={"r": "1"})]))
    assert (await store.get_machine(b.id)).fixed_ipv4 == a.fixed_ipv4  # type: ignore[union-attr]
    with pytest.raises(Conflict, match=re.escape(f"fixed_ipv4 {a.fixed_ipv4} is")) as err:
        await store.create_machine(machine(mac(77), fixed_ipv4=a.fixed_ipv4))
    assert err.value.holder == a.id
    # b given an address of its own: a still holds the shared one, b holds its new one.
    moved = replace(await store.get_machine(b.id), fixed_ipv4="192.0.2.99",  # type: ignore[type-var]
                    updated=edited.updated + 5)
    await store.update_machine(moved)
    with pytest.raises(Conflict, match=taken("192.0.2.99")):
        await store.create_machine(machine(mac(78), fixed_ipv4="192.0.2.99"))
    with pytest.raises(Conflict, match=re.escape(f"fixed_ipv4 {a.fixed_ipv4} is")):
        await store.create_machine(machine(mac(78), fixed_ipv4=a.fixed_ipv4))
    # The profile a names, an indexed column since the migration too, found by its delete.
    with pytest.raises(Conflict, match="is used by machine") as err:
        await store.delete_profile(PROFILE.name, unused=True)
    assert err.value.holder == a.id


async def test_machines_are_listed_and_counted_by_the_profile_they_name(
        store: Store) -> None:
    """MachineFilter.profile: the machines naming a profile (Core._users' list of a
    profile's users, by the SQL stores' indexed column), in every store alike, with the
    other filters, paged."""
    await store.create_machine(machine(MAC1, profile="p"))
    await store.create_machine(machine(MAC2, profile="q", cluster="c"))
    await store.create_machine(machine(MAC3, profile="p", cluster="c"))
    await store.create_machine(machine(mac(4)))
    by_profile = MachineFilter(profile="p")
    assert [m.ref for m in await store.list_machines(by_profile)] == [MAC1, MAC3]
    assert await store.count_machines(by_profile) == 2
    assert [m.ref for m in await store.list_machines(
        replace(by_profile, cluster="c"))] == [MAC3]
    assert [m.ref for m in await store.list_machines(replace(by_profile, limit=1,
                                                             offset=1))] == [MAC3]
    assert await store.count_machines(MachineFilter(profile="none")) == 0


async def test_a_profile_named_by_every_write_path_keeps_its_delete_refused(
        store: Store) -> None:
    """A profile's delete finds the machines naming it by an indexed column the writers set
    beside the document (SQLite migration 8, PostgreSQL 5), no longer by reading every
    document in its write transaction: each write path sets it (a create, a whole update, a
    bulk import, a boot's write in place from its base), and one taking the profile away
    frees it."""
    await store.put_profile(PROFILE, create=True)
    name = PROFILE.name

    async def refused_by(holder: str) -> None:
        with pytest.raises(Conflict) as err:
            await store.delete_profile(name, unused=True)
        assert err.value.holder == holder

    a = machine(MAC1, updated=1.0)
    await store.create_machine(a)
    await store.update_machine(replace(a, profile=name, updated=2.0))
    await refused_by(a.id)
    await store.update_machine(replace(a, updated=3.0))
    in_place = replace(a, profile=name, updated=4.0)
    await store.apply_batch(Batch(update=[in_place], versions={a.id: 3.0},
                                  bases={a.id: replace(a, updated=3.0)}))
    await refused_by(a.id)
    await store.apply_batch(Batch(update=[replace(in_place, profile=None, updated=5.0)],
                                  versions={a.id: 4.0}, bases={a.id: in_place}))
    many = [machine(mac(100 + i), profile=name if i == 555 else None) for i in range(600)]
    await store.apply_batch(Batch(create=many))
    await refused_by(many[555].id)
    await store.delete_machine(many[555].id)
    await store.delete_profile(name, unused=True)


async def test_a_new_machine_given_the_address_an_update_moves_another_off_is_written(
        store: Store) -> None:
    """An import creating a machine with the address it moves an enrolled one off (one
    batch: its creates are written before its updates) is written; the index still refuses
    the address to the new machine when the batch leaves it to its holder."""
    a = machine(MAC1, fixed_ipv4="192.0.2.1", updated=1.0)
    await store.create_machine(a)
    c = machine(MAC3, fixed_ipv4="192.0.2.1")
    with pytest.raises(Conflict, match=taken("192.0.2.1")) as err:
        await store.apply_batch(Batch(create=[c], update=[replace(a, hostname="a")]))
    assert err.value.holder == a.id
    moved = replace(a, fixed_ipv4="192.0.2.2", updated=2.0)
    await store.apply_batch(Batch(create=[c], update=[moved]))
    assert await store.list_machines() == [moved, c]
    # A bulk import's (past sqlite.BULK_ROWS) likewise.
    many = [machine(mac(100 + i)) for i in range(599)] + [
        machine(mac(99), fixed_ipv4="192.0.2.2")]
    await store.apply_batch(Batch(create=many, update=[replace(moved, fixed_ipv4=None)]))
    assert [m.id for m in await store.list_machines(MachineFilter(fixed_ipv4="192.0.2.2"))
            ] == [mid(mac(99))]


async def test_the_mac_orders_two_directions_are_each_others_mirror(store: Store) -> None:
    """Api._page reads a page of the far half of the list by MAC from the other end and
    reverses it (the dashboard's "last" of 100,000 machines stepped over 99,950 rows): right
    only while descending by MAC is ascending reversed, machines without a MAC (ordered by
    id) and all, in every store."""
    for i in range(9):
        await store.create_machine(machine(mac(i * 7 % 9), hostname=f"h{i}"))
    for i in range(3):
        await store.create_machine(Machine(uuid=sighting_uuid(i), hostname=f"u{i}"))
    up = await store.list_machines(MachineFilter(limit=100))
    down = await store.list_machines(MachineFilter(limit=100, descending=True))
    assert len(up) == 12 and [m.id for m in down] == [m.id for m in reversed(up)]
    assert [m.macs for m in up[-3:]] == [(), (), ()]  # no MAC: last, ascending
    for offset in range(12):
        page = await store.list_machines(MachineFilter(limit=4, offset=offset,
                                                       descending=True))
        assert [m.id for m in page] == [m.id for m in reversed(up)][offset:offset + 4]
