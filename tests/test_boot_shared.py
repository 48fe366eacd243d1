"""Two netboot servers deciding from one inventory at the same moment (two BootServices on
two store objects of one SQLite file or one PostgreSQL database): no in-process lock is
shared, yet a managed cluster gets one --cluster-init node and a machine one install token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from netboot.boot import BootService, BootSettings
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.identity import request_for
from netboot.inventory.base import LocalCommits, Store
from netboot.model import (
    Arch,
    BootAction,
    BootRequest,
    Cluster,
    Event,
    Firmware,
    FirstStage,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
)
from tests import pg


@pytest.fixture(params=["sqlite", "postgresql"])
async def servers(request: pytest.FixtureRequest,
                  tmp_path: Path) -> AsyncIterator[tuple[Store, BootService, BootService]]:
    async with contextlib.AsyncExitStack() as stack:
        stores = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack)
        boots = [BootService(s, FileTree([tmp_path]), BootSettings(policy="hold"), Enroller(s))
                 for s in stores]
        for b in boots:
            stack.push_async_callback(b.drain)
        await stores[0].put_profile(Profile(name="p", kernel="vmlinuz"))
        await stores[0].put_cluster(Cluster(name="m", server_url="managed", token="t"))
        yield stores[0], boots[0], boots[1]


def server(n: int) -> Machine:
    return Machine(macs=(MacAddress.parse(f"52:54:00:00:00:{n:02x}"),), hostname=f"s{n}",
                   cluster="m", role=Role.SERVER, profile="p", state=MachineState.ENROLLED)


def boots_of(machine: Machine) -> BootRequest:
    return request_for(machine, arch=Arch.X86_64, firmware=Firmware.IPXE)


async def test_two_first_servers_through_two_netboots_one_cluster_init(
        servers: tuple[Store, BootService, BootService]) -> None:
    store, a, b = servers
    first, second = server(1), server(2)
    await store.create_machine(first)
    await store.create_machine(second)
    plans = await asyncio.gather(a.plan(boots_of(first)),
                                 b.plan(boots_of(second)))
    inits = [p for p in plans if p.k3s is not None and p.k3s.cluster_init]
    assert len(inits) == 1, [(p.action, p.reason) for p in plans]
    # The other waits, held, for the init node to register: not a second cluster.
    other = next(p for p in plans if p is not inits[0])
    assert other.action == BootAction.HOLD
    assert inits[0].machine is not None
    assert await store.get_setting("cluster-init/m") == inits[0].machine.id


async def test_one_machine_through_two_netboots_gets_one_install_token(
        servers: tuple[Store, BootService, BootService]) -> None:
    store, a, b = servers
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:09"),), hostname="n9",
                      profile="p", state=MachineState.ENROLLED)
    await store.create_machine(machine)
    for _ in range(3):
        plans = await asyncio.gather(a.plan(boots_of(machine)),
                                     b.plan(boots_of(machine)))
        assert [p.action for p in plans] == [BootAction.INSTALL] * 2
        assert plans[0].token and plans[0].token == plans[1].token
        stored = await store.get_machine(machine.id)
        assert stored is not None and stored.state == MachineState.BOOTING
        assert stored.install_token == plans[0].token
        await a._enroller.reinstall(machine.id)  # and again, from a fresh start


async def test_a_dhcp_decision_asked_outside_any_task_syncs_the_view(
        servers: tuple[Store, BootService, BootService]) -> None:
    """The DHCP server asks from its datagram callback, where no task runs; a stale view is
    synced there first, and asyncpg's pool waits for a connection with asyncio.timeout, which
    refuses to run outside a task (every proxy offer on PostgreSQL failed so in the storm)."""
    store, a, _ = servers
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:0a"),), hostname="n10",
                      profile="p", state=MachineState.ENROLLED)
    await store.create_machine(machine)  # through the store: a's view has not seen it
    loop = asyncio.get_running_loop()
    asked: asyncio.Future[asyncio.Future[object]] = loop.create_future()
    request = request_for(machine, arch=Arch.X86_64, firmware=Firmware.UEFI)
    loop.call_soon(lambda: asked.set_result(a.first_stage(request)))  # as datagram_received
    outside = await (await asked)
    assert outside == await a.first_stage(request)  # what a task is answered


@pytest.fixture(params=["sqlite", "postgresql"])
async def ignoring(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> AsyncIterator[tuple[Store, Store, BootService, str]]:
    """Server A (its store and BootService, policy ``ignore``: an unknown NIC gets no DHCP
    answer) and server B's store, on one inventory; and the backend's name."""
    async with contextlib.AsyncExitStack() as stack:
        own, other = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack)
        (tmp_path / "snponly.efi").write_bytes(b"loader")  # what a UEFI PC is pointed at
        a = BootService(own, FileTree([tmp_path]), BootSettings(policy="ignore"), Enroller(own))
        stack.push_async_callback(a.drain)
        await other.put_profile(Profile(name="p", kernel="vmlinuz"))
        yield own, other, a, request.param


def enrolled(n: int) -> Machine:
    return Machine(macs=(MacAddress.parse(f"52:54:00:00:01:{n:02x}"),), hostname=f"e{n}",
                   profile="p", state=MachineState.ENROLLED)


def dhcp_of(machine: Machine) -> BootRequest:
    return request_for(machine, arch=Arch.X86_64, firmware=Firmware.UEFI)


async def settled(a: BootService, request: BootRequest) -> asyncio.Future[FirstStage | None]:
    """A's DHCP decision for ``request`` once what asking records is written (the first
    DISCOVER of a machine stores what it taught; a repeat writes nothing) and synced."""
    await a.first_stage(request)
    await a.drain()
    await a.resync()
    return a.first_stage(request)


async def test_dhcp_answers_from_memory_while_nothing_was_written(
        ignoring: tuple[Store, Store, BootService, str]) -> None:
    """A DISCOVER repeated (a retransmission, the next device of a storm) when no server
    wrote anything since the view was current is decided without any wait: the future is
    done when first_stage returns, so no database round trip was made (each one awaits
    I/O). On PostgreSQL every decision waited for a sync through the pool, and in a storm
    they passed the DHCP deadline."""
    own, other, a, _ = ignoring
    known, stranger = enrolled(1), enrolled(2)
    await other.create_machine(known)
    await a.load_view()
    answer = await settled(a, dhcp_of(known))
    assert answer.done() and answer.result() is not None
    unknown = await settled(a, dhcp_of(stranger))
    assert unknown.done() and unknown.result() is None
    # A boot event changes nothing DHCP reads: still from memory.
    await own.add_event(Event(known.id, 1.0, "note", "history is not in the change feed"))
    again = a.first_stage(dhcp_of(known))
    assert again.done() and again.result() == answer.result()


async def test_dhcp_sees_this_servers_own_write_at_once(
        ignoring: tuple[Store, Store, BootService, str]) -> None:
    """What this server committed is in its next DHCP answer, whatever the view's age."""
    own, _, a, _ = ignoring
    machine = enrolled(3)
    await own.create_machine(machine)
    await a.load_view()
    assert (await settled(a, dhcp_of(machine))).result() is not None
    await own.delete_machine(machine.id)  # this server's store, not its boot path
    assert await a.first_stage(dhcp_of(machine)) is None


@pytest.mark.parametrize("ignoring", ["postgresql"], indirect=True)
async def test_dhcp_sees_another_servers_write_once_notified(
        ignoring: tuple[Store, Store, BootService, str]) -> None:
    """PostgreSQL: another server's commit reaches this one by NOTIFY; from its arrival on,
    no DHCP answer is decided from before that commit (SQLite has no notification: there
    another process's commit is fetched by a background sync within DHCP_VIEW_AGE)."""
    own, other, a, _ = ignoring
    machine = enrolled(4)
    await other.create_machine(machine)
    await a.load_view()
    answer = await settled(a, dhcp_of(machine))
    assert answer.done() and answer.result() is not None
    assert isinstance(own, LocalCommits)
    before = own.commits
    await other.delete_machine(machine.id)  # server B
    for _ in range(1000):  # the notification's latency, bounded (10 s)
        if own.commits != before:
            break
        await asyncio.sleep(0.01)
    assert own.commits != before, "no NOTIFY from the other server's commit"
    decided = a.first_stage(dhcp_of(machine))
    assert not decided.done()  # synced first: a round trip
    assert await decided is None


async def test_a_current_view_still_loading_reads_the_store_outside_a_task(
        ignoring: tuple[Store, Store, BootService, str]) -> None:
    """Before the view is loaded a miss reads the store, even when the view is current and
    the decision is taken eagerly in the DHCP server's datagram callback, outside any task (a
    PostgreSQL storm at start-up failed every decision with "Timeout should be used inside a
    task" once a current view answered eagerly: asyncpg's pool needs one)."""
    _, other, a, _ = ignoring
    machine = enrolled(5)
    await other.create_machine(machine)
    await a.first_stage(dhcp_of(enrolled(6)))  # syncs: the view is current, not loaded
    await a.drain()
    await a.resync()
    loop = asyncio.get_running_loop()
    asked: asyncio.Future[asyncio.Future[FirstStage | None]] = loop.create_future()
    request = dhcp_of(machine)
    loop.call_soon(lambda: asked.set_result(a.first_stage(request)))  # as datagram_received
    assert await (await asked) is not None


async def test_a_kept_join_follows_what_another_server_changes(
        servers: tuple[Store, BootService, BootService]) -> None:
    # A storm's agents of one cluster are told the same endpoint (kept per cluster while the
    # view's shared count stays): whatever another server or the CLI changes that a join
    # reads (a server's address, a server added, the cluster, the init node) is seen by the
    # very next decision of this one.
    store, a, _ = servers
    first = replace(server(1), state=MachineState.REGISTERED, ipv4="192.0.2.1")
    await store.create_machine(first)
    assert await store.claim_setting("cluster-init/m", first.id) == first.id
    await a.load_view()

    async def endpoint(n: int) -> str | None:
        agent = Machine(macs=(MacAddress.parse(f"52:54:00:00:01:{n:02x}"),),
                        hostname=f"a{n}", cluster="m", role=Role.AGENT, profile="p",
                        state=MachineState.ENROLLED)
        await store.create_machine(agent)
        plan = await a.plan(boots_of(agent))
        assert plan.action == BootAction.INSTALL, plan.reason
        assert plan.k3s is not None and not plan.k3s.cluster_init
        assert plan.k3s.node_name == f"a{n}" and plan.k3s.role == Role.AGENT
        return plan.k3s.server_url

    assert await endpoint(1) == await endpoint(2) == "https://192.0.2.1:6443"
    assert await endpoint(3) == "https://192.0.2.1:6443"  # kept, and the same
    await store.update_machine(replace(first, ipv4="192.0.2.9"))  # the server moved
    assert await endpoint(4) == "https://192.0.2.9:6443"
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t",
                                    endpoint="vip.example"))
    assert await endpoint(5) == "https://vip.example:6443"
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    assert await endpoint(6) == "https://192.0.2.9:6443"
    await store.delete_machine(first.id)  # no server left: the next agent waits
    agent = Machine(macs=(MacAddress.parse("52:54:00:00:01:07"),), cluster="m",
                    role=Role.AGENT, profile="p", state=MachineState.ENROLLED)
    await store.create_machine(agent)
    assert (await a.plan(boots_of(agent))).action == BootAction.HOLD
