"""netboot.claims: the refused claims kept by address, bounded (s40-claim)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from netboot.claims import RefusedClaims
from netboot.model import Machine, MachineState


def registered(machine_id: str, since: float = 1.0, secret: str = "00" * 32) -> Machine:
    """A machine registered at ``since`` holding ``secret``."""
    return Machine(id=machine_id, state=MachineState.REGISTERED, state_since=since,
                   secret_hash=secret)


M1, M2, M3, M4, M = (registered(n) for n in ("m1", "m2", "m3", "m4", "m"))


def test_a_retried_claim_outlives_a_flood_of_one_off_ones_and_every_bound_holds() -> None:
    """The device's claim, tried twice from its address, stays through 10,000 one-off
    claims from 500 addresses; the machine keeps at most ``places`` addresses, the one-offs
    dropped first (oldest first); one address keeps only its latest claim, its tries reset
    when the claim changes; at most ``machines`` machines, the least recently contested
    dropped; forget drops a machine's."""
    kept = RefusedClaims(places=8, machines=3)
    assert kept.refused(M1, "192.0.2.7", "c" * 64, 1.0).tries == 1
    assert kept.refused(M1, "192.0.2.7", "c" * 64, 11.0).tries == 2
    for i in range(10_000):
        kept.refused(M1, f"198.51.100.{i % 500}", f"{i:064x}", 20.0 + i)
        assert len(kept.held(M1)) <= 8
    found = kept.find(M1, "c" * 64)
    assert found is not None and (found.peer, found.tries, found.first, found.last) == (
        "192.0.2.7", 2, 1.0, 11.0)
    assert kept.held(M1)[0] is found  # the most tried first
    assert kept.find(M1, f"{0:064x}") is None  # an old one-off: pushed out
    assert kept.find(M1, f"{9_999:064x}") is not None  # the latest: kept
    # One address: its latest claim only; a new one starts its tries again.
    assert kept.refused(M1, "192.0.2.7", "d" * 64, 12_000.0).tries == 1
    assert kept.find(M1, "c" * 64) is None
    # Machines: the least recently contested goes.
    for m in (M2, M3, M4):
        kept.refused(m, "192.0.2.1", "e" * 64, 1.0)
    assert kept.held(M1) == [] and kept.find(M4, "e" * 64) is not None
    kept.forget("m4")
    assert kept.find(M4, "e" * 64) is None and kept.held(registered("nope")) == []


def test_when_every_kept_address_retried_the_oldest_goes() -> None:
    """With no one-off left to drop, the least recently refused address goes."""
    kept = RefusedClaims(places=2)
    for peer in ("192.0.2.1", "192.0.2.2"):
        kept.refused(M, peer, peer.rjust(64, "0"), 1.0)
        kept.refused(M, peer, peer.rjust(64, "0"), 2.0)
    kept.refused(M, "192.0.2.3", "f" * 64, 3.0)
    assert [h.peer for h in kept.held(M)] == ["192.0.2.2", "192.0.2.3"]


def test_claims_refused_against_an_earlier_registration_are_history() -> None:
    """Kept against the registration that held the machine: once it was reinstalled and
    registered again (its state since another time), or given to a claim (another secret
    held), by this process or another server (no forget here), they are neither listed nor
    found (s41-ops: a reinstalled machine's old contest was shown as current, and given);
    a refusal of the new registration drops them and is kept."""
    kept = RefusedClaims(since=5.0)
    assert kept.since == 5.0
    kept.refused(M1, "192.0.2.7", "c" * 64, 2.0)
    assert [h.claim for h in kept.held(M1)] == ["c" * 64]
    again = registered("m1", since=100.0)  # reinstalled, registered again
    assert kept.held(again) == [] and kept.find(again, "c" * 64) is None
    given = replace(M1, secret_hash="c" * 64)  # given to the claim: state unmoved
    assert kept.held(given) == [] and kept.find(given, "c" * 64) is None
    kept.refused(again, "192.0.2.8", "d" * 64, 101.0)
    assert [h.claim for h in kept.held(again)] == ["d" * 64]
    assert kept.held(M1) == []  # the earlier registration's are gone for good


def test_a_machines_setting_merges_servers_and_stays_bounded() -> None:
    """KeptClaims' setting (s42-ops): a server's claims of an address stored already add
    only the tries it counted since its last write (``written`` of them are stored: two
    servers' counts of one device's retries are their sum, not the most either counted:
    s43-ops), the latest claim of an address wins, the merge is bounded as a server's
    memory is (one-offs first), and a row refused against another registration, or not one
    at all, or longer than PLACES, reads as nothing more than PLACES."""
    from netboot.claims import PLACES, Held, decoded, encoded, merged, registration_of

    against = registration_of(M)
    stored = [Held("192.0.2.7", "c" * 64, 3, 1.0, 30.0, against)]  # A's 3 tries, written
    b = [Held("192.0.2.7", "c" * 64, 2, 0.5, 40.0, against),  # B's 2, none written
         Held("192.0.2.8", "d" * 64, 1, 5.0, 5.0, against)]
    both = merged(stored, b)
    assert [(h.peer, h.tries, h.first, h.last, h.written) for h in both] == [
        ("192.0.2.8", 1, 5.0, 5.0, 0), ("192.0.2.7", 5, 0.5, 40.0, 0)]
    assert stored[0].tries == 3 and b[0].first == 0.5  # the sources are not changed
    # B wrote its 2, then counted a third: only that one is added again.
    again = merged(both, [replace(b[0], tries=3, written=2, last=50.0)])
    assert [h.tries for h in again if h.peer == "192.0.2.7"] == [6]
    newer = merged(both, [Held("192.0.2.7", "e" * 64, 1, 50.0, 50.0, against)])
    assert [(h.claim, h.tries) for h in newer if h.peer == "192.0.2.7"] == [("e" * 64, 1)]
    older = merged(both, [Held("192.0.2.7", "f" * 64, 4, 2.0, 2.0, against)])
    assert [h.claim for h in older if h.peer == "192.0.2.7"] == ["c" * 64]
    flood = [Held(f"198.51.100.{i}", f"{i:064x}", 1, i, i, against) for i in range(100)]
    kept = merged(stored, flood)
    assert len(kept) == PLACES and stored[0].claim in [h.claim for h in kept]
    text = encoded(against, kept)
    assert decoded(text, against) == kept
    assert decoded(text, registration_of(registered("m", since=2.0))) == []
    assert decoded("{not json", against) == [] and decoded(None, against) == []
    assert decoded('{"against": [1, 2], "held": 7}', against) == []
    assert len(decoded(encoded(against, flood), against)) == PLACES


async def test_a_servers_writes_add_its_new_tries_once_and_a_deleted_machines_row_goes(
        ) -> None:
    """Two KeptClaims on one store (two servers): the device's tries through each add up in
    the setting, each write adding only those not written before, and every server lists
    the sum (the most either counted was shown: s43-ops). A machine deleted while a server
    writes its claims (after its read of the machine, before its write) leaves no row: the
    writer removes what the delete's transaction could not see."""
    from netboot.claims import SETTING, KeptClaims
    from netboot.inventory.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    machine = registered("m-1")
    await store.create_machine(machine)
    now = [100.0]
    a, b = (KeptClaims(RefusedClaims(), store, clock=lambda: now[0], every=5.0)
            for _ in range(2))
    claim = "c" * 64
    for tries, (server, other) in enumerate(((a, b), (b, a), (a, b), (b, a), (a, b)), 1):
        server.refused(machine, "192.0.2.7", claim, now[0])
        await asyncio.sleep(0)
        # A try 10 s after the last (the device's retries) is written at once, not
        # WRITE_EVERY later: the other server lists it already.
        assert [h.tries for h in await other.held(machine)] == [tries]
        now[0] += 10.0
    await a.close()
    await b.close()
    assert [h.tries for h in await a.held(machine)] == [5]
    assert [h.tries for h in await b.held(machine)] == [5]
    assert [h.tries for h in await KeptClaims(RefusedClaims(), store).held(machine)] == [5]

    class Deleting(MemoryStore):
        """The machine deleted by another server just before the claims' write lands."""

        async def claim_setting(self, key: str, value: str, *, replace: str | None = None
                                ) -> str:
            if await self.get_machine("m-2") is not None:
                await self.delete_machine("m-2")
            return await super().claim_setting(key, value, replace=replace)

    racing = Deleting()
    await racing.open()
    doomed = registered("m-2")
    await racing.create_machine(doomed)
    writer = KeptClaims(RefusedClaims(), racing, clock=lambda: now[0])
    writer.refused(doomed, "192.0.2.7", claim, now[0])
    await writer.close()
    assert await racing.get_setting(SETTING + "m-2") is None


async def test_a_machines_kept_claims_written_are_no_change_a_view_holds(tmp_path: Any) -> None:
    """Each write of a machine's kept claims (a flood's, every WRITE_EVERY seconds a
    machine) came to every server's view through the change feed as a setting changed:
    held, and taken for a change of what decisions read (InventoryView.shared, rules), which
    makes every kept DHCP and install repeat decide again (s42-ops). A real SQLite file; a
    setting of another key still is one."""
    from netboot.claims import SETTING
    from netboot.inventory.sqlite import SqliteStore
    from netboot.inventory.view import InventoryView

    store = SqliteStore(tmp_path / "inventory.db")
    await store.open()
    try:
        view = InventoryView(store)
        await view.load()
        shared, rules = view.shared, view.rules
        await store.claim_setting(SETTING + "m-1", '{"against": [1, null], "held": []}')
        await view.sync()
        assert (view.shared, view.rules) == (shared, rules)
        await store.put_setting("site-note", "x")
        await view.sync()
        assert view.shared > shared and view.rules > rules
    finally:
        await store.close()


async def test_a_refusal_counted_while_a_write_reads_the_setting_is_written_once() -> None:
    """A refusal counted while a server's write of the machine's claims reads the setting
    (Held.tries moves in place) goes into the value written: it was not counted as written
    then, and the next write added it again (two tries listed as three)."""
    from netboot.claims import SETTING, KeptClaims, decoded, registration_of
    from netboot.inventory.memory import MemoryStore

    machine = registered("m-1")
    claim = "c" * 64
    kept: list[KeptClaims] = []

    class Racing(MemoryStore):
        """The device's next try is refused while the first write reads the setting."""

        raced = False

        async def get_setting(self, key: str) -> str | None:
            text = await super().get_setting(key)
            if not self.raced:
                self.raced = True
                kept[0].refused(machine, "192.0.2.7", claim, 110.0)
            return text

    store = Racing()
    await store.open()
    await store.create_machine(machine)
    kept.append(KeptClaims(RefusedClaims(), store, clock=lambda: 100.0))
    kept[0].refused(machine, "192.0.2.7", claim, 100.0)
    await asyncio.sleep(0)
    await kept[0].close()
    stored = decoded(await store.get_setting(SETTING + "m-1"), registration_of(machine))
    assert [h.tries for h in stored] == [2]
    assert [h.tries for h in await kept[0].held(machine)] == [2]


async def test_a_claims_write_whose_commit_lost_its_answer_is_read_back_not_added_again(
        ) -> None:
    """A compare-and-set whose commit answer was lost (OutcomeUnknown: PostgreSQL's
    connection cut in its COMMIT) is read back: stored, its tries count as written, and the
    next write adds only the new one (its tries were added twice: 1 + 1 listed as 3,
    s43-ops' leftover); not stored, it is merged and written again at once."""
    from netboot.claims import SETTING, KeptClaims, decoded, registration_of
    from netboot.errors import OutcomeUnknown
    from netboot.inventory.memory import MemoryStore

    class Cut(MemoryStore):
        """The next claim_setting commits (``stored``) or not, and its answer is lost."""

        cut: bool | None = None

        async def claim_setting(self, key: str, value: str, *, replace: str | None = None
                                ) -> str:
            cut, self.cut = self.cut, None
            if cut is False:
                raise OutcomeUnknown("connection lost during COMMIT (not stored)")
            taken = await super().claim_setting(key, value, replace=replace)
            if cut:
                raise OutcomeUnknown("connection lost during COMMIT (stored)")
            return taken

    machine = registered("m-1")
    claim = "c" * 64
    for stored_then in (True, False):
        store = Cut()
        await store.open()
        await store.create_machine(machine)
        kept = KeptClaims(RefusedClaims(), store, clock=lambda: 100.0)
        store.cut = stored_then
        kept.refused(machine, "192.0.2.7", claim, 100.0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert store.cut is None  # the cut write was made
        against = registration_of(machine)
        assert [h.tries for h in decoded(await store.get_setting(SETTING + "m-1"),
                                         against)] == [1]
        kept.refused(machine, "192.0.2.7", claim, 110.0)
        await kept.close()
        assert [h.tries for h in decoded(await store.get_setting(SETTING + "m-1"),
                                         against)] == [2]
