"""The DHCP path over the real boot decision and a real SQLite inventory: decided from the
in-memory view, nothing written for a DISCOVER that tells nothing new, and a change made
through the store seen by the next offer."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.discovery import DiscoveryLimits
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.inventory.base import Batch
from netboot.inventory.sqlite import SqliteStore
from netboot.model import LoaderChain, MacAddress, Machine, MachineState
from netboot.pxe import DhcpSettings, classify
from netboot.recorder import Recorder
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt

SERVER_IP = "192.0.2.1"
MAC = MacAddress.parse("52:54:00:00:0a:01")


def discover(mac: MacAddress, xid: int) -> bytes:
    """A UEFI x86-64 PXE DISCOVER as OVMF sends it (60, 93 = 7, 97 UUID, 55); the UUID
    is the device's own (its MAC in the last bytes)."""
    return dhcp.encode(dhcp.Packet(
        op=Op.REQUEST, xid=xid, chaddr=mac.raw, flags=dhcp.BROADCAST_FLAG,
        options=(
            dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),
            dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes((1, 3, 60, 66, 67, 97))),
            dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x07"),
            dhcp.Option(Opt.CLIENT_UUID, b"\x00" + bytes(range(1, 11)) + mac.raw),
            dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003000"),
        )), pad_to=dhcp.MIN_PACKET_SIZE)


@dataclass
class Env:
    store: SqliteStore
    boot: BootService
    server: DhcpServer
    recorder: Recorder
    path: Path

    async def offer(self, xid: int, mac: MacAddress = MAC) -> dhcp.Packet | None:
        replies = await self.server.handle(discover(mac, xid), ("0.0.0.0", 68),
                                           server_ip=SERVER_IP, pxe_port=False)
        return dhcp.parse(replies[0][0]) if replies else None

    async def settle(self) -> None:
        """Every background record finished and every queued event written."""
        await self.boot.drain()

    def data_version(self) -> int:
        """SQLite's count of commits by other connections, as seen by a fresh one."""
        conn = sqlite3.connect(self.path)
        try:
            return int(conn.execute("PRAGMA data_version").fetchone()[0])
        finally:
            conn.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    assets = tmp_path / "assets"
    assets.mkdir()
    for name in ("snponly.efi", "shimx64.efi"):
        (assets / name).write_bytes(b"loader")
    store = SqliteStore(tmp_path / "netboot.db")
    await store.open()
    enroller = Enroller(store)
    boot = BootService(store, FileTree([assets], pinned=loader_aliases()),
                       BootSettings(policy="hold"), enroller)
    server = DhcpServer(DhcpSettings(), boot, store, interfaces=None, advertise=SERVER_IP,
                        host="127.0.0.1")
    yield Env(store, boot, server, enroller.recorder, tmp_path / "netboot.db")
    await boot.drain()
    await store.close()


async def test_a_repeated_discover_of_a_known_machine_writes_nothing(env: Env) -> None:
    await env.store.create_machine(Machine(macs=(MAC,), hostname="n1",
                                           state=MachineState.INSTALLED))
    first = await env.offer(1)
    assert first is not None and first.file_name == "snponly.efi"
    await env.settle()  # the first one is noted: "asked for a boot file", facts learnt
    machine = await env.store.machine_by("mac", str(MAC))
    assert machine is not None
    assert [e.kind for e in await env.store.list_events(machine.id)] == ["dhcp"]

    # Keep the data_version reader open across the repeats: it counts other connections'
    # commits, so an unchanged value means the DISCOVERs below committed nothing at all.
    conn = sqlite3.connect(env.path)
    try:
        before = conn.execute("PRAGMA data_version").fetchone()[0]
        for xid in range(2, 12):
            again = await env.offer(xid)
            assert again is not None and again.file_name == "snponly.efi"
            assert again.xid == xid
        await env.settle()
        await env.recorder.flush()
        assert conn.execute("PRAGMA data_version").fetchone()[0] == before
    finally:
        conn.close()
    assert [e.kind for e in await env.store.list_events(machine.id)] == ["dhcp"]


async def test_a_repeated_discover_is_decided_without_waiting_for_the_store(env: Env) -> None:
    await env.store.create_machine(Machine(macs=(MAC,), state=MachineState.INSTALLED))
    request = classify(dhcp.parse(discover(MAC, 1)), DhcpSettings(), "0.0.0.0").request
    for _ in range(2):  # fills the view; the first one's record (its arch) is read back
        assert await env.boot.first_stage(request) is not None
        await env.settle()
    decided = env.boot.first_stage(request)
    # Done at once: answered from the view, no store round trip, no task.
    assert decided.done() and decided.result() is not None


async def test_a_change_through_the_store_is_in_the_next_offer(env: Env) -> None:
    machine = Machine(macs=(MAC,), hostname="n1", state=MachineState.INSTALLED)
    await env.store.create_machine(machine)
    first = await env.offer(1)
    assert first is not None and first.file_name == "snponly.efi"
    await env.settle()
    stored = await env.store.machine_by("mac", str(MAC))
    assert stored is not None
    await env.store.update_machine(replace(stored, loader=LoaderChain.SHIM_GRUB))
    second = await env.offer(2)  # right away: no sync interval to wait out
    assert second is not None and second.file_name == "shimx64.efi"


async def test_a_new_fact_is_recorded_once(env: Env) -> None:
    """A machine whose firmware tells something new (its arch) is updated, once."""
    await env.store.create_machine(Machine(macs=(MAC,), state=MachineState.INSTALLED))
    for xid in (1, 2, 3):
        assert await env.offer(xid) is not None
        await env.settle()
    machine = await env.store.machine_by("mac", str(MAC))
    assert machine is not None and machine.arch is not None and str(machine.arch) == "x86_64"
    assert [e.kind for e in await env.store.list_events(machine.id)] == ["dhcp"]


async def test_unknown_devices_past_the_budget_cost_no_record(env: Env) -> None:
    """A broadcast flood of unknown MACs: answered (policy hold), but only the source's
    burst is recorded; the rest are refused before any background work."""
    burst = env.boot.discovery.limits.burst_per_source
    macs = [MacAddress(bytes((0x02, 0, 0, 0, 1, i))) for i in range(burst + 10)]
    answers = await asyncio.gather(*(env.offer(i, mac) for i, mac in enumerate(macs)))
    assert all(a is not None for a in answers)
    await env.settle()
    discovered = await env.store.count_machines()
    assert discovered == burst
    assert env.boot.discovery.refused >= 10


async def test_repeats_while_a_record_is_under_way_are_answered_and_write_nothing_more(
        env: Env) -> None:
    """A firmware's retransmissions (or a busy loop's repeats) that come while the record of
    their NIC is still being written: each is answered, none starts a record of its own, and
    the machine's history and facts come out as from one DISCOVER."""
    await env.store.create_machine(Machine(macs=(MAC,), state=MachineState.INSTALLED))
    other = MacAddress.parse("52:54:00:00:0a:02")
    await env.store.create_machine(Machine(macs=(other,), state=MachineState.INSTALLED))
    before = env.store.commits
    assert await env.offer(1, other) is not None
    await env.settle()
    one_discover = env.store.commits - before  # what one DISCOVER of a machine writes

    before = env.store.commits
    answers = await asyncio.gather(*(env.offer(xid) for xid in range(10, 20)))
    assert all(a is not None and a.file_name == "snponly.efi" for a in answers)
    await env.settle()
    assert env.store.commits - before == one_discover
    machine = await env.store.machine_by("mac", str(MAC))
    assert machine is not None and str(machine.arch) == "x86_64"
    assert [e.kind for e in await env.store.list_events(machine.id)] == ["dhcp"]


async def test_an_unknown_device_retransmitting_spends_one_discovery_token(
        tmp_path: Path) -> None:
    """The retransmissions of an unknown device whose record is under way spend none of its
    source's discovery budget: the next device is still recorded. The budget itself holds."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "snponly.efi").write_bytes(b"loader")
    store = SqliteStore(tmp_path / "netboot.db")
    await store.open()
    enroller = Enroller(store)
    boot = BootService(store, FileTree([assets], pinned=loader_aliases()),
                       BootSettings(policy="hold"), enroller,
                       discovery=DiscoveryLimits(burst_per_source=2, rate_per_source=0.001))
    server = DhcpServer(DhcpSettings(), boot, store, interfaces=None, advertise=SERVER_IP,
                        host="127.0.0.1")
    env = Env(store, boot, server, enroller.recorder, tmp_path / "netboot.db")
    try:
        first, second, third = (MacAddress(bytes((0x02, 0, 0, 0, 2, i))) for i in range(3))
        answers = await asyncio.gather(*(env.offer(xid, first) for xid in range(8)))
        assert all(a is not None for a in answers)
        assert await env.offer(8, second) is not None
        await env.settle()
        assert await env.offer(9, third) is not None  # over the budget: answered, not recorded
        await env.settle()
        recorded = {m.macs[0] for m in await store.list_machines()}
        assert recorded == {first, second}
        assert boot.discovery.refused == 1
    finally:
        await boot.drain()
        await store.close()


async def test_known_machines_records_follow_their_answers_a_few_per_turn_of_the_loop(
        env: Env) -> None:
    """A storm of known machines' first DISCOVERs: each is answered at once, and each
    starts a record (its step noted, its UUID learnt) that runs after the answers, a few
    per turn of the event loop (what came meanwhile is answered in between), not all in
    one. Once done, every machine has its step and its UUID, as from one DISCOVER each."""
    macs = [MacAddress(bytes((0x52, 0x54, 0, 0, 0x0b, i))) for i in range(100)]
    await env.store.apply_batch(Batch(create=[
        Machine(macs=(mac,), state=MachineState.INSTALLED) for mac in macs]))
    await env.boot.load_view()
    seen: list[int] = []  # events queued by the records, at each turn of the loop

    async def tick() -> None:
        while True:
            seen.append(env.recorder.queued)
            await asyncio.sleep(0)

    ticker = asyncio.ensure_future(tick())
    answers = [await env.offer(xid, mac) for xid, mac in enumerate(macs)]
    assert all(a is not None and a.file_name == "snponly.efi" for a in answers)
    while env.recorder.queued < len(macs) and len(seen) < 100_000:
        await asyncio.sleep(0)
    ticker.cancel()
    assert len({n for n in seen if 0 < n < len(macs)}) >= 3  # several turns in between
    await env.settle()
    for mac in macs:
        machine = await env.store.machine_by("mac", str(mac))
        assert machine is not None and machine.uuid is not None
        assert [e.kind for e in await env.store.list_events(machine.id)] == ["dhcp"]
