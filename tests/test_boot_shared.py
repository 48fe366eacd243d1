"""Two netboot servers deciding from one inventory at the same moment (two BootServices on
two store objects of one SQLite file or one PostgreSQL database): no in-process lock is
shared, yet a managed cluster gets one --cluster-init node and a machine one install token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.boot import BootService, BootSettings
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.identity import request_for
from netboot.inventory.base import Store
from netboot.model import (
    Arch,
    BootAction,
    BootRequest,
    Cluster,
    Firmware,
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
