"""The boot decision, without sockets: first stages, discovery policies, state rules."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netboot import boot as boot_module
from netboot import enroll, identity
from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.core import Core
from netboot.enroll import Enroller
from netboot.errors import Conflict
from netboot.files import FileTree
from netboot.inventory import codec
from netboot.inventory.base import Batch
from netboot.inventory.memory import MemoryStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import (
    Arch,
    BootAction,
    BootPlan,
    BootRequest,
    Cluster,
    Event,
    Firmware,
    Group,
    LoaderChain,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
)

MAC = MacAddress.parse("52:54:00:00:00:11")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup(tmp_path: Path) -> tuple[BootService, MemoryStore, Clock]:
    for name in ("undionly.kpxe", "snponly.efi", "ipxe.efi"):
        (tmp_path / name).write_bytes(b"x")
    store = MemoryStore()
    await store.open()
    clock = Clock()
    enroller = Enroller(store, clock=clock)
    boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="ignore"), enroller,
                       clock=clock, new_token=lambda: "tok")
    await store.put_profile(Profile(name="p", kernel="vmlinuz", initrds=("initrd",)))
    await store.put_cluster(Cluster(name="edge", server_url="https://192.0.2.50:6443",
                                    token="secret"))
    return boot, store, clock


def req(fw: Firmware, arch: Arch = Arch.X86_64, **kw: object) -> BootRequest:
    return BootRequest(mac=MAC, firmware=fw, arch=arch, via="dhcp", **kw)  # type: ignore[arg-type]


async def events_of(store: MemoryStore, mac: MacAddress, boot: BootService) -> list[Event]:
    await boot.drain()  # boot events are written in batches
    machine = await store.machine_by("mac", str(mac))
    assert machine is not None
    return await store.list_events(machine.id)


async def enrolled(store: MemoryStore, **kw: object) -> Machine:
    m = Machine(macs=(MAC,), hostname="edge-1", profile="p", cluster="edge", **kw)  # type: ignore[arg-type]
    await store.create_machine(m)
    return m


@pytest.mark.parametrize(
    ("fw", "arch", "path", "http"),
    [
        (Firmware.BIOS, Arch.X86, "undionly.kpxe", False),
        (Firmware.UEFI, Arch.X86_64, "snponly.efi", False),
        (Firmware.UEFI_HTTP, Arch.X86_64, "/assets/ipxe.efi", True),
        (Firmware.IPXE, Arch.X86_64, "/boot.ipxe", True),
        (Firmware.UBOOT, Arch.ARM64, "boot.scr.uimg", False),
    ],
)
async def test_first_stage_by_firmware(setup: tuple[BootService, MemoryStore, Clock],
                                       fw: Firmware, arch: Arch, path: str, http: bool) -> None:
    boot, store, _ = setup
    await enrolled(store)
    stage = await boot.first_stage(req(fw, arch))
    assert stage is not None and stage.path == path and stage.http is http
    await boot.drain()


async def test_missing_loader_stays_silent(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await enrolled(store)
    assert await boot.first_stage(req(Firmware.UEFI, Arch.ARM64)) is None


async def test_unknown_machine_ignored_but_discovered(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    assert await boot.first_stage(req(Firmware.UEFI, uuid=uuid, relay="192.0.2.1",
                                      interface="eth1")) is None
    await boot.drain()
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.state == MachineState.DISCOVERED
    assert m.arch == Arch.X86_64 and m.firmware == Firmware.UEFI and m.uuid == uuid
    assert m.facts["relay"] == "192.0.2.1" and m.facts["interface"] == "eth1"
    assert [e.kind for e in await events_of(store, MAC, boot)] == ["discovered"]
    plan = await boot.plan(req(Firmware.IPXE, serial="SN1", product="Box"))
    assert plan.action == BootAction.IGNORE
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.firmware == Firmware.UEFI  # the first firmware is kept
    assert m.serial == "SN1" and m.facts["product"] == "Box"


async def test_hold_policy(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, _, _ = setup
    boot.settings = replace(boot.settings, policy="hold", hold_retry_seconds=7)
    assert await boot.first_stage(req(Firmware.BIOS, Arch.X86)) is not None
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.HOLD and plan.retry_seconds == 7
    await boot.drain()


async def test_auto_policy_enrolls_by_rule(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    rule = Group(name="line3", selector={"product": ("Box",)}, profile="p", cluster="edge",
                 role=Role.AGENT, hostname_template="line3-{mac_suffix}")
    boot.settings = replace(boot.settings, policy="auto", rules=(rule,))
    plan = await boot.plan(req(Firmware.IPXE, product="Other"))
    assert plan.action == BootAction.IGNORE
    # Matched on a string any host can send: held for approval, nothing issued.
    plan = await boot.plan(req(Firmware.IPXE, product="Box"))
    assert plan.action == BootAction.HOLD and plan.token is None and plan.group == "line3"
    assert plan.command is not None and "--cluster edge --role agent --profile p" in plan.command
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.state == MachineState.DISCOVERED and m.token_hash is None
    boot.settings = replace(boot.settings, trusted_rules=frozenset({"line3"}))
    plan = await boot.plan(req(Firmware.IPXE, product="Box"))
    assert plan.action == BootAction.INSTALL and plan.token == "tok"
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.hostname == "line3-000011" and m.cluster == "edge"
    assert m.state == MachineState.BOOTING


async def test_install_then_local_then_reinstall(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, clock = setup
    await enrolled(store)
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.INSTALL
    assert plan.k3s is not None and plan.k3s.server_url == "https://192.0.2.50:6443"
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.token_hash and m.token_expires == clock.now + 3600
    assert "tok" not in repr(m.token_hash)
    await store.update_machine(replace(m, state=MachineState.INSTALLED))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.LOCAL
    await store.update_machine(replace(m, state=MachineState.FAILED))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.HOLD
    await boot._enroller.reinstall(str(MAC))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.INSTALL


async def test_a_first_installs_event_says_what_the_request_told(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """The install-plan event of a first install carries the request's path, firmware,
    architecture, its MAC as text (aa:bb:cc:dd:ee:ff, whatever form the request spelled it
    in) and the address it came from."""
    boot, store, clock = setup
    await enrolled(store)
    await boot.plan(BootRequest(mac=MacAddress.parse("52-54-00-00-00-11"),
                                firmware=Firmware.IPXE, arch=Arch.X86_64, via="ipxe",
                                remote_addr="192.0.2.7"))
    (event,) = [e for e in await events_of(store, MAC, boot) if e.kind == "install-plan"]
    assert event.data == {"via": "ipxe", "firmware": "ipxe", "arch": "x86_64",
                          "mac": "52:54:00:00:00:11", "peer": "192.0.2.7"}
    assert type(event.data["mac"]) is str and event.time == clock.now


@pytest.mark.parametrize("request_", [
    BootRequest(mac=MAC, firmware=Firmware.IPXE, arch=Arch.X86_64, via="ipxe",
                remote_addr="192.0.2.7"),
    BootRequest(mac=MAC, firmware=Firmware.UEFI_HTTP, arch=Arch.ARM64, via="http"),
    BootRequest(mac=MacAddress(identity.NO_NIC_BYTES), firmware=Firmware.UNKNOWN,
                arch=Arch.UNKNOWN, via='a"b\\\u2028\U0001f600', remote_addr="fe80::1%eth0"),
    BootRequest(mac=MacAddress(identity.NO_NIC_BYTES), firmware=Firmware.BIOS, arch=Arch.X86,
                via="tftp", remote_addr="192.0.2.8"),
])
def test_a_boot_events_data_text_is_what_the_store_would_write_of_its_data(
        setup: tuple[BootService, MemoryStore, Clock], request_: BootRequest) -> None:
    """The boot path's events carry their data's JSON text, made with the data
    (Event.data_text), which the stores write instead of encoding it again: it is what
    codec writes of that data, in its order, whichever pairs the request gives."""
    boot, _, _ = setup
    machine = Machine(macs=(MAC,))
    event = boot._new_event(machine, "install-plan", "m", request_)
    assert event.data_text == codec.dumps(dict(event.data))
    assert json.loads(event.data_text) == event.data
    assert list(json.loads(event.data_text)) == list(event.data)
    plain = Event(event.machine, event.time, event.kind, event.message, dict(event.data))
    assert codec.stored_event(event, False) == codec.stored_event(plain, False)
    assert boot._new_event(machine, "seen", "m").data_text == "{}"


async def test_a_first_installs_event_is_stored_in_sqlite_as_its_data(tmp_path: Path) -> None:
    """A first install on a real SQLite file: its event's data column is the JSON of the
    request's pairs (written from the text made with the event), read back as that data,
    the same after the store is opened again."""
    (tmp_path / "ipxe.efi").write_bytes(b"x")
    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    try:
        clock = Clock()
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="ignore"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await store.put_profile(Profile(name="p", kernel="vmlinuz", initrds=("initrd",)))
        await store.put_cluster(Cluster(name="edge", server_url="https://192.0.2.50:6443",
                                        token="secret"))
        await store.create_machine(Machine(macs=(MAC,), hostname="edge-1", profile="p",
                                           cluster="edge"))
        plan = await boot.plan(BootRequest(mac=MAC, firmware=Firmware.IPXE, arch=Arch.X86_64,
                                           via='ip"xe', remote_addr="192.0.2.7"))
        assert plan.action == BootAction.INSTALL
        await boot.drain()
    finally:
        await store.close()
    data = {"via": 'ip"xe', "firmware": "ipxe", "arch": "x86_64", "mac": "52:54:00:00:00:11",
            "peer": "192.0.2.7"}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (text,) = conn.execute("SELECT data FROM events WHERE kind = 'install-plan'").fetchone()
    assert json.loads(text) == data and text == json.dumps(data, separators=(",", ":"))
    again = SqliteStore(path)
    await again.open()
    try:
        machine = await again.machine_by("mac", str(MAC))
        assert machine is not None
        (event,) = [e for e in await again.list_events(machine.id) if e.kind == "install-plan"]
        assert event.data == data
    finally:
        await again.close()


@pytest.mark.parametrize(("own", "group_profile", "said"), [
    ("p", "q", "install profile p"),
    (None, "q", "install profile q (group g)"),
    (None, None, "install profile p (enroll.default_profile)"),
])
async def test_an_install_plan_says_where_its_profile_came_from(
        setup: tuple[BootService, MemoryStore, Clock], tmp_path: Path, own: str | None,
        group_profile: str | None, said: str) -> None:
    """The install script's comment (the plan's reason) named the machine's group whatever
    gave the profile: "install profile p (group g)" for a profile set on the machine, which
    the group did not give. A group's or the default is named now (explain's
    profile_source); the machine's own, the usual case, is not."""
    _, store, clock = setup
    boot = BootService(store, FileTree([tmp_path]),
                       BootSettings(policy="ignore", default_profile="p"),
                       Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
    await store.put_profile(Profile(name="q", kernel="vmlinuz"))
    await store.put_group(Group(name="g", selector={"arch": ("x86_64",)},
                                profile=group_profile))
    await store.create_machine(Machine(macs=(MAC,), hostname="edge-1", profile=own,
                                       cluster="edge"))
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.INSTALL and plan.reason == f"enrolled: {said}"
    await boot.drain()


async def test_no_profile_holds(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.create_machine(Machine(macs=(MAC,), hostname="x"))
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.HOLD and "no profile" in plan.reason


async def test_a_machine_whose_cluster_is_gone_is_held_not_installed_without_one(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """Deleting a cluster in use is refused, but a machine or group given it while it was
    being deleted (the check and the delete are two steps; two servers over PostgreSQL)
    named a cluster no longer there, and installed with no k3s server and an empty token:
    a node that never joins, nothing said. Found by s40-attack (a cluster deleted with
    machines in it). Now held, the reason naming the cluster; its config is refused."""
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="gone", server_url="https://192.0.2.60:6443",
                                    token="t"))
    machine = Machine(macs=(MAC,), hostname="a1", profile="p", cluster="gone",
                      role=Role.AGENT)
    await store.create_machine(machine)
    await store.put_group(Group(name="g", selector={"arch": ("x86_64",)}, profile="p",
                                cluster="gone"))
    grouped = MacAddress.parse("52:54:00:00:00:12")
    await store.create_machine(Machine(macs=(grouped,), hostname="a2"))
    planned = await boot.plan(req(Firmware.IPXE))
    assert planned.action == BootAction.INSTALL and planned.k3s is not None
    await store.delete_cluster("gone")
    with pytest.raises(Conflict, match="cluster 'gone' does not exist") as refused:
        await boot.config_plan(machine, token="tok", reason="config")
    assert refused.value.field == "cluster"  # the 409 names the field to fix
    for mac, fix in ((MAC, "machines set"), (grouped, "group 'g' another")):
        plan = await boot.plan(BootRequest(mac=mac, firmware=Firmware.IPXE, arch=Arch.X86_64,
                                           via="dhcp"))
        assert plan.action == BootAction.HOLD and plan.token is None, plan
        assert "cluster 'gone' does not exist" in plan.reason and fix in plan.reason
    assert "does not exist" in (await boot.explain(str(MAC)))["reason"]


async def test_managed_cluster_first_server_inits(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    a = Machine(macs=(MacAddress.parse("52:54:00:00:00:01"),), hostname="s1", cluster="m",
                role=Role.AGENT, profile="p")
    s1 = Machine(macs=(MacAddress.parse("52:54:00:00:00:02"),), hostname="s2", cluster="m",
                 role=Role.SERVER, profile="p", ipv4="192.0.2.101")
    s2 = Machine(macs=(MacAddress.parse("52:54:00:00:00:03"),), hostname="s3", cluster="m",
                 role=Role.SERVER, profile="p")
    for m in (a, s1, s2):
        await store.create_machine(m)
    cluster = await store.get_cluster("m")
    assert cluster is not None
    # An agent before any server does not become the init node, and has nothing to join.
    ja = await boot.k3s_join(a, cluster, Role.AGENT, None)
    assert not ja.cluster_init and ja.waiting
    j1 = await boot.k3s_join(s1, cluster, Role.SERVER, None)
    assert j1.cluster_init and j1.server_url is None and "--cluster-init" in j1.args
    assert not j1.waiting
    # The first server has an address (a lease) but has not registered: nothing runs there.
    j2 = await boot.k3s_join(s2, cluster, Role.SERVER, None)
    assert not j2.cluster_init and j2.waiting
    await store.update_machine(replace(s1, state=MachineState.REGISTERED))
    j2 = await boot.k3s_join(s2, cluster, Role.SERVER, None)
    assert not j2.cluster_init and j2.server_url == "https://192.0.2.101:6443"
    assert (await boot.k3s_join(a, cluster, Role.AGENT, None)).server_url == \
        "https://192.0.2.101:6443"
    assert (await boot.k3s_join(s1, cluster, Role.SERVER, None)).cluster_init  # stable


async def test_endpoint_is_dns_name_only_when_netboot_dns_serves_it(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    boot.settings = replace(boot.settings, cluster_domain="netboot.lan")
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    cluster = await store.get_cluster("m")
    assert cluster is not None
    agent = Machine(macs=(MacAddress.parse("52:54:00:00:00:01"),), hostname="a1", cluster="m",
                    role=Role.AGENT, profile="p")
    await store.create_machine(agent)
    # DNS on, but no registered server: m.netboot.lan answers nothing, so nobody is sent there.
    assert (await boot.k3s_join(agent, cluster, Role.AGENT, None)).waiting
    server = Machine(macs=(MacAddress.parse("52:54:00:00:00:02"),), hostname="bad_name",
                     cluster="m", role=Role.SERVER, profile="p",
                     state=MachineState.REGISTERED, ipv4="192.0.2.101")
    await store.create_machine(server)
    # A hostname that is not a DNS label is left out of the zone: the address is used.
    assert (await boot.k3s_join(agent, cluster, Role.AGENT, None)).server_url == \
        "https://192.0.2.101:6443"
    await store.update_machine(replace(server, hostname="s1"))
    join = await boot.k3s_join(agent, cluster, Role.AGENT, None)
    assert join.server_url == "https://m.netboot.lan:6443"
    server_join = await boot.k3s_join(replace(agent, role=Role.SERVER), cluster, Role.SERVER,
                                      None)
    assert server_join.args[-2:] == ("--tls-san", "m.netboot.lan")


async def test_configured_endpoint_wins_and_the_first_server_still_inits(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t",
                                    endpoint="vip.example"))
    cluster = await store.get_cluster("m")
    assert cluster is not None
    agent = Machine(macs=(MacAddress.parse("52:54:00:00:00:01"),), hostname="a1", cluster="m",
                    role=Role.AGENT, profile="p")
    first = Machine(macs=(MacAddress.parse("52:54:00:00:00:02"),), hostname="s1", cluster="m",
                    role=Role.SERVER, profile="p")
    second = Machine(macs=(MacAddress.parse("52:54:00:00:00:03"),), hostname="s2", cluster="m",
                     role=Role.SERVER, profile="p")
    for m in (agent, first, second):
        await store.create_machine(m)
    # No server yet, but the VIP is where k3s will answer: the agent installs and retries.
    ja = await boot.k3s_join(agent, cluster, Role.AGENT, None)
    assert ja.server_url == "https://vip.example:6443" and "--tls-san" not in ja.args
    j1 = await boot.k3s_join(first, cluster, Role.SERVER, None)
    assert j1.cluster_init and j1.args[-2:] == ("--tls-san", "vip.example")
    await store.update_machine(replace(first, state=MachineState.REGISTERED,
                                       ipv4="192.0.2.101"))
    j2 = await boot.k3s_join(second, cluster, Role.SERVER, None)
    assert not j2.cluster_init and j2.server_url == "https://vip.example:6443"
    with_port = replace(cluster, endpoint="https://[2001:db8::10]:7443")
    assert (await boot.k3s_join(agent, with_port, Role.AGENT, None)).server_url == \
        "https://[2001:db8::10]:7443"


async def test_agent_before_its_server_holds_then_installs_by_itself(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    agent = Machine(macs=(MAC,), hostname="a1", cluster="m", role=Role.AGENT, profile="p")
    server = Machine(macs=(MacAddress.parse("52:54:00:00:00:02"),), hostname="s1", cluster="m",
                     role=Role.SERVER, profile="p")
    await store.create_machine(agent)
    await store.create_machine(server)
    for _ in range(3):  # the retry loop asks again and again
        plan = await boot.plan(req(Firmware.IPXE))
        assert plan.action == BootAction.HOLD and plan.token is None
        assert "waiting for cluster m's first server to register" in plan.reason
        assert plan.retry_seconds > 0
    held = await store.machine_by("mac", str(MAC))
    assert held is not None and held.state == MachineState.ENROLLED and held.token_hash is None
    events = [e for e in await events_of(store, MAC, boot) if e.kind == "hold"]
    assert len(events) == 1 and "first server" in events[0].message
    assert (await boot.explain(str(MAC)))["decision"] == "hold"
    assert "waiting for cluster m" in (await boot.explain(str(MAC)))["reason"]
    # The first server is never held: it forms the cluster.
    splan = await boot.plan(BootRequest(mac=server.mac, firmware=Firmware.IPXE,
                                        arch=Arch.X86_64))
    assert splan.action == BootAction.INSTALL and splan.k3s is not None
    assert splan.k3s.cluster_init
    booted = await store.get_machine(server.id)
    assert booted is not None
    await store.update_machine(replace(booted, state=MachineState.REGISTERED))
    # Registered, but every address it had was refused: still nothing to join, and why.
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.HOLD and "registered without one" in plan.reason
    await store.update_machine(replace(booted, state=MachineState.REGISTERED,
                                       ipv4="192.0.2.60"))
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.INSTALL and plan.k3s is not None
    assert plan.k3s.server_url == "https://192.0.2.60:6443" and not plan.k3s.cluster_init


async def test_explain(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_group(Group(name="x86", selector={"arch": ("x86_64",)}, profile="p"))
    await store.create_machine(Machine(macs=(MAC,), hostname="e", arch=Arch.X86_64))
    result = await boot.explain(str(MAC))
    assert result["group"] == "x86" and result["profile"] == "p"
    assert result["profile_source"] == "group" and result["decision"] == "install"
    assert (await store.machine_by("mac", str(MAC))).state == MachineState.ENROLLED  # type: ignore[union-attr]
    unknown = await boot.explain("52:54:00:99:99:99")
    assert unknown["known"] is False


async def test_reinstalled_init_node_joins_the_running_cluster(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    first = Machine(macs=(MacAddress.parse("52:54:00:00:00:02"),), hostname="s1", cluster="m",
                    role=Role.SERVER, profile="p")
    await store.create_machine(first)
    cluster = await store.get_cluster("m")
    assert cluster is not None
    assert (await boot.k3s_join(first, cluster, Role.SERVER, None)).cluster_init
    second = Machine(macs=(MacAddress.parse("52:54:00:00:00:03"),), hostname="s2", cluster="m",
                     role=Role.SERVER, profile="p", state=MachineState.REGISTERED,
                     ipv4="192.0.2.102")
    await store.create_machine(second)
    again = await boot.k3s_join(first, cluster, Role.SERVER, None)
    assert not again.cluster_init and again.server_url == "https://192.0.2.102:6443"
    # The init node deleted: a new server joins the one that runs, none re-initialises.
    await store.delete_machine(first.id)
    third = Machine(macs=(MacAddress.parse("52:54:00:00:00:04"),), hostname="s3", cluster="m",
                    role=Role.SERVER, profile="p")
    await store.create_machine(third)
    j3 = await boot.k3s_join(third, cluster, Role.SERVER, None)
    assert not j3.cluster_init and j3.server_url == "https://192.0.2.102:6443"


async def test_hold_is_recorded_once_per_reason(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    boot.settings = replace(boot.settings, policy="hold")
    for _ in range(5):
        assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.HOLD
    kinds = [e.kind for e in await events_of(store, MAC, boot)]
    assert kinds == ["discovered", "hold"]


async def test_install_records_what_the_firmware_told(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await enrolled(store)
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    await boot.plan(req(Firmware.IPXE, uuid=uuid, serial="SN7", product="Box",
                        platform="efi"))
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.uuid == uuid and m.serial == "SN7"
    assert m.facts["product"] == "Box" and m.facts["platform"] == "efi"


async def test_dhcp_record_never_undoes_a_concurrent_install_plan(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """DHCP notes are written in the background; the /ipxe plan that follows at once must
    keep its state and token even when the DHCP write runs after it."""
    import asyncio

    boot, store, _ = setup
    await enrolled(store)
    stage, plan = await asyncio.gather(
        boot.first_stage(req(Firmware.IPXE, uuid="8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4")),
        boot.plan(req(Firmware.IPXE)))
    await boot.drain()
    assert stage is not None and plan.action == BootAction.INSTALL
    m = await store.machine_by("mac", str(MAC))
    assert m is not None and m.state == MachineState.BOOTING and m.token_hash is not None
    assert m.uuid == "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"  # and the DHCP facts are kept


# --- identity: several NICs, machines enrolled by serial, discovered records that merge ----

NIC1 = MacAddress.parse("52:54:00:00:02:01")
NIC2 = MacAddress.parse("52:54:00:00:02:02")


def ipxe(mac: MacAddress, **kw: object) -> BootRequest:
    """What templates/ipxe/boot.ipxe sends: the NIC it booted from (${netX}) and SMBIOS."""
    return BootRequest(mac=mac, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                       **kw)  # type: ignore[arg-type]


async def test_two_nic_machine_enrolled_by_its_second_nic_installs_from_it(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    m = Machine(macs=(NIC2,), hostname="two", profile="p", cluster="edge")
    await store.create_machine(m)
    plan = await boot.plan(ipxe(NIC2))
    assert plan.action == BootAction.INSTALL and plan.machine is not None
    assert plan.machine.id == m.id and plan.mac == NIC2
    # Its first port, seen on the wire before (DHCP without an answer), is another machine
    # only until something proves otherwise: no identifier links them here.
    assert (await boot.plan(ipxe(NIC1))).action == BootAction.IGNORE


async def test_a_boot_from_any_enrolled_nic_is_the_same_machine(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    m = Machine(macs=(NIC1, NIC2), hostname="two", profile="p", cluster="edge")
    await store.create_machine(m)
    for nic in (NIC2, NIC1):
        plan = await boot.plan(ipxe(nic))
        assert plan.action == BootAction.INSTALL and plan.machine is not None
        assert plan.machine.id == m.id and plan.mac == nic
    assert await store.count_machines() == 1
    stored = await store.get_machine(m.id)
    assert stored is not None and stored.macs == (NIC1, NIC2)  # nothing attached twice


async def test_nics_of_one_machine_seen_at_once_are_all_attached(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    # A server whose four ports PXE-boot at once, enrolled by its UUID: each port's DHCP
    # record attaches its NIC. The boot path's lock was its NIC's, so the four
    # read-modify-writes of the one machine ran together and the last one stored its
    # attachment alone, after four "nic-attached" events (s33-attack).
    boot, store, _ = setup
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    m = Machine(uuid=uuid, hostname="four", profile="p", cluster="edge")
    await store.create_machine(m)
    nics = [MacAddress.parse(f"52:54:00:00:03:{i:02x}") for i in range(1, 5)]
    await asyncio.gather(*[boot.first_stage(replace(req(Firmware.UEFI, uuid=uuid), mac=nic))
                           for nic in nics])
    await boot.drain()
    stored = await store.get_machine(m.id)
    assert stored is not None and sorted(stored.macs) == nics
    attached = [e.data["mac"] for e in await store.list_events(m.id) if e.kind == "nic-attached"]
    assert sorted(attached) == [str(nic) for nic in nics]
    assert await store.count_machines() == 1


async def test_two_nics_asking_for_their_script_at_once_attach_once_each(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    m = Machine(serial="CZ2048XYZ", hostname="two", profile="p", cluster="edge")
    await store.create_machine(m)
    await asyncio.gather(boot.plan(ipxe(NIC1, serial="CZ2048XYZ")),
                         boot.plan(ipxe(NIC2, serial="CZ2048XYZ")))
    await boot.drain()
    stored = await store.get_machine(m.id)
    assert stored is not None and sorted(stored.macs) == [NIC1, NIC2]
    attached = [e.data["mac"] for e in await store.list_events(m.id) if e.kind == "nic-attached"]
    assert sorted(attached) == [str(NIC1), str(NIC2)]  # each told once, as stored


async def test_a_serial_only_machines_first_nic_is_held_until_an_operator_lists_it(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """A machine enrolled by its serial alone: the serial is on its label, its UUID on a
    vendor's manifest, and any host on the VLAN can send either from a made-up MAC before
    the machine first boots. The NIC its boot came from is attached, but the install (its
    token, its config with the cluster's join token) waits for an operator to list it; the
    held script names the command. Before session 50 that first ask was given the install."""
    boot, store, _ = setup
    m = Machine(serial="CZ2048XYZ", hostname="floor-1", profile="p", cluster="edge")
    await store.create_machine(m)
    plan = await boot.plan(ipxe(NIC1, serial="CZ2048XYZ"))
    assert plan.action == BootAction.HOLD and plan.token is None, plan
    assert plan.command == f"netboot machines set {m.id} --add-mac {NIC1}"
    await boot.drain()
    stored = await store.get_machine(m.id)
    assert stored is not None and stored.macs == (NIC1,) and stored.token_hash is None
    assert stored.state == m.state and stored.facts[identity.UNLISTED] == str(NIC1)
    events = await store.list_events(m.id)
    [attached] = [e for e in events if e.kind == "nic-attached"]
    assert f"not given its install until an operator lists it ({plan.command})" in \
        attached.message, attached.message
    assert events[-1].kind == "hold" and plan.command in events[-1].message
    # Asked again, the same: no token whatever the asker repeats.
    assert (await boot.plan(ipxe(NIC1, serial="CZ2048XYZ"))).action == BootAction.HOLD
    # The operator lists it (machines set --add-mac): its next ask installs.
    core = Core(store, Enroller(store), boot, None)  # type: ignore[arg-type]
    listed = await core.update_machine(m.id, {"macs": [str(NIC1)]}, lists=[str(NIC1)])
    assert identity.UNLISTED not in listed.facts
    plan = await boot.plan(ipxe(NIC1, serial="CZ2048XYZ"))
    assert plan.action == BootAction.INSTALL and plan.token == "tok"


async def test_a_host_sending_a_machines_uuid_from_many_macs_attaches_a_bounded_few(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """A host on the VLAN sends an enrolled machine's UUID (option 97) from 40 made-up MACs,
    each a PXE DISCOVER then iPXE's ask. Before, each was attached: 40 NICs more, each a
    write of the whole machine (its NIC list longer each time) and two events, without
    bound. Now identity.UNLISTED_MAX are attached, the rest written nowhere and held as
    NICs not listed, none given a token; the operator can still list any of them."""
    boot, store, _ = setup
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c6"
    m = Machine(macs=(NIC1,), uuid=uuid, hostname="victim", profile="p", cluster="edge")
    await store.create_machine(m)
    made_up = [MacAddress.parse(f"02:46:00:00:44:{i:02x}") for i in range(40)]
    for nic in made_up:
        await boot.first_stage(replace(req(Firmware.UEFI, uuid=uuid), mac=nic))
    await boot.drain()
    plans = [await boot.plan(ipxe(nic, uuid=uuid)) for nic in made_up]
    await boot.drain()
    assert {p.action for p in plans} == {BootAction.HOLD} and not any(p.token for p in plans)
    assert "was not attached" in plans[-1].reason, plans[-1].reason
    stored = await store.get_machine(m.id)
    assert stored is not None
    assert stored.macs == (NIC1, *made_up[:identity.UNLISTED_MAX]), stored.macs
    assert identity.unlisted_count(stored) == identity.UNLISTED_MAX
    events = await store.list_events(m.id)
    assert len(events) <= 3 * identity.UNLISTED_MAX, [e.kind for e in events]
    assert await store.count_machines() == 1
    # One the cap left out is listed as any NIC is: its next ask installs.
    core = Core(store, Enroller(store), boot, None)  # type: ignore[arg-type]
    last = str(made_up[-1])
    await core.update_machine(m.id, {"macs": [*map(str, stored.macs), last]}, lists=[last])
    assert (await boot.plan(ipxe(made_up[-1], uuid=uuid))).action == BootAction.INSTALL
    # The operator removes the strangers' NICs (PATCH macs): no longer counted, so the
    # machine's own next NIC is attached again (held until listed).
    await core.update_machine(m.id, {"macs": [str(NIC1), last]})
    pruned = await store.get_machine(m.id)
    assert pruned is not None and identity.unlisted_count(pruned) == 0, pruned.facts
    await boot.plan(ipxe(NIC2, uuid=uuid))
    stored = await store.get_machine(m.id)
    assert stored is not None and NIC2 in stored.macs and identity.unlisted(stored, str(NIC2))


async def test_serial_only_machine_installs_and_gets_its_mac_attached(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """enroll.trust_first_nic: a factory floor whose VLAN is closed trusts the first NIC of a
    machine enrolled without a MAC, as before session 50."""
    boot, store, _ = setup
    boot.settings = replace(boot.settings, trust_first_nic=True)
    m = Machine(serial="CZ2048XYZ", hostname="floor-1", profile="p", cluster="edge")
    await store.create_machine(m)
    # DHCP knows no serial: under "ignore", the unknown NIC still gets iPXE, because a
    # machine waits to be recognised by what iPXE reports.
    assert await boot.first_stage(req(Firmware.BIOS, Arch.X86)) is not None
    await boot.drain()
    plan = await boot.plan(ipxe(NIC1, serial="CZ2048XYZ"))
    assert plan.action == BootAction.INSTALL and plan.machine is not None
    assert plan.machine.id == m.id and plan.mac == NIC1
    stored = await store.machine_by("mac", str(NIC1))
    assert stored is not None and stored.id == m.id and stored.macs == (NIC1,)
    assert stored.state == MachineState.BOOTING
    kinds = [e.kind for e in await store.list_events(m.id)]
    assert "nic-attached" in kinds and kinds[-1] == "install-plan"
    # The DHCP record of MAC (another NIC, seen before) stayed a discovered record.
    assert await store.count_machines() == 2
    # Nothing waits for a NIC any more: unknown MACs are ignored again.
    assert await boot.first_stage(ipxe(MacAddress.parse("52:54:00:00:09:09"))) is None
    await boot.drain()


async def test_discovered_mac_that_proves_to_be_an_enrolled_serial_merges(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, clock = setup
    boot.settings = replace(boot.settings, policy="hold")
    # Seen first by DHCP only: a MAC and nothing else.
    assert await boot.first_stage(req(Firmware.UEFI, interface="eth1")) is not None
    await boot.drain()
    found = await store.machine_by("mac", str(MAC))
    assert found is not None and found.state == MachineState.DISCOVERED
    # The operator enrolls it by the serial on its label.
    clock.now += 60
    m = Machine(serial="SN-77", hostname="label-77", profile="p", cluster="edge")
    await store.create_machine(m)
    # Its next boot reports that serial from the same NIC: the same machine, whose NIC no
    # operator listed (anyone can send a serial), so held until one does.
    plan = await boot.plan(ipxe(MAC, serial="SN-77"))
    assert plan.action == BootAction.HOLD and plan.machine is not None
    assert plan.machine.id == m.id and plan.command == f"netboot machines set {m.id} " \
        f"--add-mac {MAC}"
    assert await store.get_machine(found.id) is None
    stored = await store.machine_by("mac", str(MAC))
    assert stored is not None and stored.id == m.id and stored.macs == (MAC,)
    assert stored.facts["interface"] == "eth1"  # what discovery learnt is kept
    kinds = [e.kind for e in await store.list_events(m.id)]
    assert kinds[0] == "discovered" and "merged" in kinds and "nic-attached" not in kinds
    assert await store.count_machines() == 1


async def test_identifiers_that_disagree_resolve_by_precedence(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """The MAC wins over the serial; the loser keeps its serial, the winner does not learn it."""
    boot, store, _ = setup
    by_mac = Machine(macs=(NIC1,), hostname="a", profile="p")
    by_serial = Machine(serial="SN-B", hostname="b", profile="p")
    by_uuid = Machine(uuid="8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4", hostname="c", profile="p")
    for x in (by_mac, by_serial, by_uuid):
        await store.create_machine(x)
    plan = await boot.plan(ipxe(NIC1, serial="SN-B", uuid=by_uuid.uuid))
    assert plan.machine is not None and plan.machine.id == by_mac.id
    stored = await store.get_machine(by_mac.id)
    assert stored is not None and stored.serial is None and stored.uuid is None
    assert stored.facts["serial"] == "SN-B"
    # Without the MAC, the UUID beats the serial.
    plan = await boot.plan(ipxe(NIC2, serial="SN-B", uuid=by_uuid.uuid))
    assert plan.machine is not None and plan.machine.id == by_uuid.id
    got = await store.get_machine(by_serial.id)
    assert got is not None and got.macs == ()  # the loser is untouched


async def test_placeholder_serials_never_make_two_boards_one_machine(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    boot.settings = replace(boot.settings, policy="hold")
    for nic in (NIC1, NIC2):
        plan = await boot.plan(ipxe(nic, serial="To be filled by O.E.M.",
                                    uuid="00000000-0000-0000-0000-000000000000"))
        assert plan.action == BootAction.HOLD
    assert await store.count_machines() == 2
    one = await store.machine_by("mac", str(NIC1))
    assert one is not None and one.serial is None and one.uuid is None
    assert one.facts["serial"] == "To be filled by O.E.M."


async def test_explain_and_dry_runs_of_a_machine_without_a_mac(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    m = Machine(serial="SN-5", hostname="five", profile="p", cluster="edge")
    await store.create_machine(m)
    out = await boot.explain(m.id, arch=Arch.X86_64)
    assert out["known"] is True and out["id"] == m.id and out["macs"] == []
    # Its first NIC is held until listed (identity.UNLISTED): said, not "install".
    assert out["decision"] == "hold", out
    assert f"netboot machines set {m.id} --add-mac MAC" in out["reason"], out
    boot.settings = replace(boot.settings, trust_first_nic=True)
    assert (await boot.explain(m.id, arch=Arch.X86_64))["decision"] == "install"
    got = await store.get_machine(m.id)
    assert got == m and await store.list_events(m.id) == []  # a dry run records nothing


async def test_group_by_mac_follows_the_first_nic_whichever_port_boots(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_group(Group(name="by-nic", selector={"mac": (str(NIC1),)}, profile="p"))
    m = Machine(macs=(NIC1, NIC2), hostname="two")
    await store.create_machine(m)
    for nic in (NIC2, NIC1):
        plan = await boot.plan(ipxe(nic))
        assert plan.action == BootAction.INSTALL and plan.group == "by-nic"


async def test_uuid_enrolled_machine_is_recognised_by_dhcp_option_97(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    m = Machine(uuid=uuid, hostname="by-uuid", profile="p")
    await store.create_machine(m)
    stage = await boot.first_stage(req(Firmware.UEFI, uuid=uuid))
    assert stage is not None and stage.path == "snponly.efi"
    await boot.drain()
    stored = await store.machine_by("mac", str(MAC))
    assert stored is not None and stored.id == m.id  # attached by the DHCP record
    assert await store.count_machines() == 1


async def test_a_dhcp_hostname_that_is_no_rfc1123_name_is_ignored_with_an_event(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """DHCP option 12 is any 255 bytes a device sends: stored raw, it became a fact shown as
    the machine's. Now only an RFC 1123 name is kept; another is left out, and the DHCP
    record's event says it was ignored (never the name itself), once while it repeats; a
    good one after it is kept. Nothing is refused: the device is answered as before."""
    boot, store, clock = setup
    m = Machine(macs=(MAC,), hostname="edge-1", profile="p")
    await store.create_machine(m)
    for name in ("a" * 64, "bad_name\n" + "x" * 200):
        stage = await boot.first_stage(req(Firmware.UEFI, hostname=name))
        assert stage is not None and stage.path == "snponly.efi"
        events = await events_of(store, MAC, boot)  # drained: the facts are written too
        stored = await store.get_machine(m.id)
        assert stored is not None and "dhcp_hostname" not in stored.facts, stored.facts
        note = events[-1]
        assert note.kind == "dhcp" and "ignored its DHCP hostname" in note.message
        assert name not in note.message and len(note.message) < 300
        clock.now += 1
    told = len(await events_of(store, MAC, boot))
    await boot.first_stage(req(Firmware.UEFI, hostname="bad_name\n" + "x" * 200))
    assert len(await events_of(store, MAC, boot)) == told  # the same note is not written again
    await boot.first_stage(req(Firmware.UEFI, hostname="Edge-1.lab"))
    assert "ignored" not in (await events_of(store, MAC, boot))[-1].message
    stored = await store.get_machine(m.id)
    assert stored is not None and stored.facts["dhcp_hostname"] == "Edge-1.lab"


# -- the loader chain (ipxe | shim-grub) ------------------------------------------------------

def signed_tree(root: Path) -> FileTree:
    """Debian's layout: /usr/lib/shim/shimx64.efi(.signed), /usr/lib/grub/<arch>-efi-signed/."""
    for name in ("snponly.efi", "ipxe.efi", "shimx64.efi", "shimx64.efi.signed",
                 "x86_64-efi-signed/grubnetx64.efi.signed",
                 "arm64-efi-signed/grubnetaa64.efi.signed"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return FileTree([root], pinned=loader_aliases())


async def chain_setup(root: Path) -> tuple[BootService, MemoryStore]:
    store = MemoryStore()
    await store.open()
    boot = BootService(store, signed_tree(root), BootSettings(policy="hold"), Enroller(store))
    await store.put_profile(Profile(name="p", kernel="vmlinuz"))
    return boot, store


def test_signed_names_win_over_unsigned_ones(tmp_path: Path) -> None:
    """/usr/lib/shim has an unsigned shimx64.efi beside shimx64.efi.signed: firmware
    enforcing Secure Boot refuses the former, so the pinned name serves the latter."""
    tree = signed_tree(tmp_path)
    assert tree.resolve("shimx64.efi").name == "shimx64.efi.signed"
    assert tree.resolve("grubx64.efi").name == "grubnetx64.efi.signed"
    assert tree.resolve("grubaa64.efi").name == "grubnetaa64.efi.signed"


@pytest.mark.parametrize(
    ("fw", "arch", "path", "chain"),
    [
        (Firmware.UEFI, Arch.X86_64, "snponly.efi", LoaderChain.IPXE),
        (Firmware.UEFI, Arch.ARM64, "grubaa64.efi", LoaderChain.SHIM_GRUB),
        (Firmware.UEFI_HTTP, Arch.ARM64, "/assets/grubaa64.efi", LoaderChain.SHIM_GRUB),
        (Firmware.BIOS, Arch.X86, "undionly.kpxe", LoaderChain.IPXE),
    ],
)
async def test_default_chain_by_arch(tmp_path: Path, fw: Firmware, arch: Arch, path: str,
                                     chain: LoaderChain | None) -> None:
    """No iPXE exists for arm64 in Debian: GRUB is its default; x86 keeps iPXE."""
    (tmp_path / "undionly.kpxe").write_bytes(b"x")
    boot, _ = await chain_setup(tmp_path)
    stage = await boot.first_stage(req(fw, arch))
    assert stage is not None and stage.path == path and stage.chain == chain
    await boot.drain()


async def test_the_repeat_check_reads_the_files_the_loader_decided_by(tmp_path: Path) -> None:
    """The DHCP answer cache's check (_assets_read) and the decision (loader) are one walk of
    the loader files: for every firmware, arch and chain, with the files from each place of
    the walk on present, the loader answers that file and the check lists each file tried
    before it as missing and it as found; with none, the loader stays silent."""
    store = MemoryStore()
    await store.open()
    tree = FileTree([tmp_path])
    boot = BootService(store, tree, BootSettings(policy="hold"), Enroller(store))
    for fw in Firmware:
        for arch in Arch:
            for chain in (None, *LoaderChain):
                request = req(fw, arch)
                tried = [name for name, found in boot._assets_read(request, chain)]
                assert not any(found for _, found in boot._assets_read(request, chain))
                if not tried:
                    stage = boot.loader(request, chain)
                    assert stage is None or not tree.exists(stage.path.removeprefix("/assets/"))
                    continue
                assert boot.loader(request, chain) is None
                for at in reversed(range(len(tried))):
                    (tmp_path / tried[at]).parent.mkdir(parents=True, exist_ok=True)
                    (tmp_path / tried[at]).write_bytes(b"x")
                    stage = boot.loader(request, chain)
                    assert stage is not None
                    assert stage.path in (tried[at], "/assets/" + tried[at])
                    assert boot._assets_read(request, chain) == (
                        *((name, False) for name in tried[:at]), (tried[at], True))
                for name in tried:
                    (tmp_path / name).unlink()


@pytest.mark.parametrize("where", ["machine", "group", "profile"])
async def test_chain_chosen_by_machine_group_or_profile(tmp_path: Path, where: str) -> None:
    boot, store = await chain_setup(tmp_path)
    shim = LoaderChain.SHIM_GRUB
    await store.put_profile(Profile(name="p", kernel="vmlinuz",
                                    loader=shim if where == "profile" else None))
    await store.put_group(Group(name="g", selector={"arch": ("x86_64",)}, profile="p",
                                loader=shim if where == "group" else None))
    await store.create_machine(Machine(macs=(MAC,), loader=shim if where == "machine" else None))
    stage = await boot.first_stage(req(Firmware.UEFI, Arch.X86_64))
    assert stage is not None and stage.path == "shimx64.efi" and stage.chain == shim
    http = await boot.first_stage(req(Firmware.UEFI_HTTP, Arch.X86_64))
    assert http is not None and http.path == "/assets/shimx64.efi"
    why = await boot.explain(str(MAC), arch=Arch.X86_64)
    assert why["loader"] == "shim-grub" and why["first_stage"] == "shimx64.efi"
    assert why["loader_source"] == {"machine": "set on the machine", "group": "set on group g",
                                    "profile": "set on profile p"}[where]
    await boot.drain()


async def test_machine_overrides_group_chain(tmp_path: Path) -> None:
    boot, store = await chain_setup(tmp_path)
    await store.put_group(Group(name="g", selector={"arch": ("x86_64",)}, profile="p",
                                loader=LoaderChain.SHIM_GRUB))
    await store.create_machine(Machine(macs=(MAC,), loader=LoaderChain.IPXE))
    stage = await boot.first_stage(req(Firmware.UEFI, Arch.X86_64))
    assert stage is not None and stage.path == "snponly.efi"
    await boot.drain()


async def test_chosen_chain_without_its_files_stays_silent(tmp_path: Path) -> None:
    """A Secure Boot machine would refuse iPXE anyway: no fallback, silence and a reason."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    store = MemoryStore()
    await store.open()
    boot = BootService(store, FileTree([tmp_path], pinned=loader_aliases()),
                       BootSettings(policy="hold"), Enroller(store))
    await store.create_machine(Machine(macs=(MAC,), loader=LoaderChain.SHIM_GRUB))
    assert await boot.first_stage(req(Firmware.UEFI, Arch.X86_64)) is None
    why = await boot.explain(str(MAC), arch=Arch.X86_64)
    assert why["first_stage"] is None and "no shim-grub loader" in why["first_stage_reason"]
    await boot.drain()


async def test_a_repeated_plan_that_changes_nothing_reads_and_writes_nothing(
        tmp_path: Path) -> None:
    """A storm's repeated requests (a held machine's retry loop, an install under way asked
    again, an installed machine's local boot): after the first, no transaction is committed
    and nothing but the change feed's probe touches the real SQLite store."""
    from netboot.inventory.sqlite import SqliteStore

    path = tmp_path / "n.db"
    store = SqliteStore(path)
    await store.open()
    try:
        clock = Clock()
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
        await store.put_cluster(Cluster(name="edge", server_url="https://192.0.2.50:6443",
                                        token="t"))
        macs = [MacAddress.parse(f"52:54:00:00:01:{i:02x}") for i in range(3)]
        await store.create_machine(Machine(macs=(macs[0],), cluster="m", role=Role.AGENT,
                                           profile="p"))  # held: no server yet
        await store.create_machine(Machine(macs=(macs[1],), cluster="edge", profile="p"))
        await store.create_machine(Machine(macs=(macs[2],), state=MachineState.INSTALLED))
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        requests = [BootRequest(mac=m, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                                remote_addr="192.0.2.7") for m in macs]
        first = [await boot.plan(r) for r in requests]
        assert [p.action for p in first] == [BootAction.HOLD, BootAction.INSTALL,
                                             BootAction.LOCAL]
        # The second round still says something new once: the install was asked for again.
        assert [(p.action, p.token) for p in [await boot.plan(r) for r in requests]] == \
            [(p.action, p.token) for p in first]
        await boot.drain()
        await boot._view.sync()  # reads back what this process itself committed
        watcher = sqlite3.connect(path)
        version = watcher.execute("PRAGMA data_version").fetchone()[0]
        touched: list[str] = []
        real_read, real_run = store._read, store._run

        async def read(fn: Any, *args: Any) -> Any:
            touched.append(f"read {fn.__name__}")
            return await real_read(fn, *args)

        async def run(fn: Any, *args: Any) -> Any:
            touched.append(f"write {fn.__name__}")
            return await real_run(fn, *args)

        store._read, store._run = read, run  # type: ignore[method-assign]
        clock.now += 30
        for _ in range(5):
            again = [await boot.plan(r) for r in requests]
            assert [(p.action, p.token) for p in again] == [(p.action, p.token) for p in first]
        await boot.drain()
        assert touched == [], touched
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == version
        watcher.close()
        # A change by someone else is seen at once, and the next decision follows it.
        other = SqliteStore(path)
        await other.open()
        await other.put_cluster(Cluster(name="m", server_url="https://192.0.2.9:6443",
                                        token="t"))
        await other.close()
        assert (await boot.plan(requests[0])).action == BootAction.INSTALL
        assert any(t.startswith("read") for t in touched)
    finally:
        await store.close()


async def test_a_pxelinux_request_mid_install_gets_the_token_only_at_its_first_address(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    """U-Boot asks for ``pxelinux.cfg/01-<mac>`` over TFTP (UDP): the answer goes to the
    source address, so another address is held without the token too; no new token is made."""
    boot, store, _ = setup
    await enrolled(store, role=Role.AGENT)

    def tftp(peer: str) -> BootRequest:
        return BootRequest(mac=MAC, firmware=Firmware.UBOOT, arch=Arch.ARM64, via="tftp",
                           remote_addr=peer)

    first = await boot.plan(tftp("192.0.2.61"))
    assert first.action == BootAction.INSTALL and first.token == "tok"
    other = await boot.plan(tftp("192.0.2.66"))
    assert other.action == BootAction.HOLD and other.token is None
    assert "another address" in other.reason
    again = await boot.plan(tftp("192.0.2.61"))
    assert again.action == BootAction.INSTALL and again.token == "tok"
    machine = await store.machine_by("mac", str(MAC))
    assert machine is not None and machine.state == MachineState.BOOTING
    assert machine.facts["install_peer"] == "192.0.2.61"
    kinds = [e.kind for e in await events_of(store, MAC, boot)]
    assert kinds.count("token withheld") == 1 and kinds.count("install-plan") == 2


@pytest.mark.parametrize("via", ["tftp", "http"])
async def test_a_machine_with_a_fixed_address_is_planned_an_install_only_from_it(
        setup: tuple[BootService, MemoryStore, Clock], via: str) -> None:
    """A first install asked from another address than the machine's fixed one (or from
    none) is held with no token made and nothing claimed: the machine stays enrolled, one
    ``token withheld`` event; from its fixed address it installs (s36-claim)."""
    boot, store, _ = setup
    await enrolled(store, role=Role.AGENT, fixed_ipv4="192.0.2.61")

    def request(peer: str | None) -> BootRequest:
        return BootRequest(mac=MAC, firmware=Firmware.UBOOT, arch=Arch.ARM64, via=via,
                           remote_addr=peer)

    for peer in ("192.0.2.66", "192.0.2.66", None):  # told once per asker in a row
        held = await boot.plan(request(peer))
        assert held.action == BootAction.HOLD and held.token is None
        assert "fixed address 192.0.2.61" in held.reason
    machine = await store.machine_by("mac", str(MAC))
    assert machine is not None and machine.state == MachineState.ENROLLED
    assert machine.token_hash is None and "install_peer" not in machine.facts
    first = await boot.plan(request("192.0.2.61"))
    assert first.action == BootAction.INSTALL and first.token == "tok"
    kinds = [e.kind for e in await events_of(store, MAC, boot)]
    assert kinds.count("token withheld") == 2 and kinds.count("install-plan") == 1


@pytest.mark.parametrize("peer", ["192.0.2.62", None])
async def test_a_first_installs_facts_keep_their_order_and_name_only_its_own_peer(
        setup: tuple[BootService, MemoryStore, Clock], peer: str | None) -> None:
    """A machine reinstalled carries the old install's peer among its facts: the new install
    names its own address, after the others and what the request told, or none when the
    request came from no address (_install_plan's copy of the facts)."""
    boot, store, _ = setup
    await enrolled(store, role=Role.AGENT, state=MachineState.ENROLLED,
                   facts={"a": "1", "install_peer": "192.0.2.9", "z": "2"})
    request = BootRequest(mac=MAC, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                          remote_addr=peer, product="Q35")
    assert (await boot.plan(request)).action == BootAction.INSTALL
    machine = await store.machine_by("mac", str(MAC))
    assert machine is not None
    want = {"a": "1", "z": "2", "product": "Q35"}
    if peer is not None:
        want |= {"remote_addr": peer, "install_peer": peer}
    assert list(machine.facts.items()) == list(want.items())


@pytest.mark.parametrize("known", [False, True])
async def test_a_first_installs_copy_holds_what_learn_makes_of_its_request(
        setup: tuple[BootService, MemoryStore, Clock], known: bool) -> None:
    """A first install's one copy of the machine (_install_plan: the install's step with
    what the request told set in it, each field by name) holds every field learn() gives
    the request: new ones told (an identity, the arch, the firmware), or, where the machine
    knows them all already (_news None), the machine's own."""
    boot, store, clock = setup
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    told: dict[str, Any] = dict(uuid=uuid, serial="SN7", asset="A1", arch=Arch.ARM64,
                                firmware=Firmware.UEFI)
    before = await enrolled(store, state=MachineState.ENROLLED,
                            **(told | {"facts": {"remote_addr": "192.0.2.7"}}
                               if known else {}))
    request = BootRequest(mac=MAC, via="http", remote_addr="192.0.2.7",
                          **(told | {"firmware": Firmware.IPXE}))
    assert boot_module.teaches(before, request) is not known
    assert (await boot.plan(request)).action == BootAction.INSTALL
    after = await store.machine_by("mac", str(MAC))
    learnt = boot_module.learn(before, request, clock.now)
    assert after is not None and after.state == MachineState.BOOTING
    fields = ("uuid", "serial", "asset", "arch", "firmware")
    # The first firmware seen is what the machine is (learn): the request's where none is
    # known.
    assert {f: getattr(after, f) for f in fields} == {f: getattr(learnt, f) for f in fields} \
        == told | {"firmware": Firmware.UEFI if known else Firmware.IPXE}
    assert after.facts == {**learnt.facts, "install_peer": "192.0.2.7"}
    assert after.token_hash and after.install_token == "tok" and after.updated == clock.now
    # The step changed the state: its time is the update's (s39-journey's state_since, the
    # dashboard's "Unchanged for"), set in this written-out step as lifecycle.advance sets it.
    assert after.state_since == clock.now and before.state_since is None


async def test_a_kept_decision_follows_every_change_at_once(tmp_path: Path) -> None:
    """Repeated requests are answered from the decision kept for them (nothing written, the
    same plan object); any change to what that decision read, made here or by another
    process (the CLI), gives the next request a new decision: the machine, its group,
    profile or cluster, a server of its cluster, a setting, the boot settings, and an event
    noted for the machine since."""
    from netboot.inventory.sqlite import SqliteStore

    path = tmp_path / "n.db"
    store = SqliteStore(path)
    await store.open()
    cli = SqliteStore(path)  # another process's store: its commits reach only the feed
    await cli.open()
    try:
        clock = Clock()
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
        macs = [MacAddress.parse(f"52:54:00:00:02:{i:02x}") for i in range(4)]
        agent = Machine(macs=(macs[0],), cluster="m", role=Role.AGENT, profile="p")
        await store.create_machine(agent)  # held: its cluster has no server yet
        await store.create_machine(Machine(macs=(macs[1],), cluster="m", profile="q"))
        installed = Machine(macs=(macs[2],), state=MachineState.INSTALLED)
        await store.create_machine(installed)
        grouped = Machine(macs=(macs[3],), labels={"rack": "r1"})  # no profile of its own
        await store.create_machine(grouped)
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        requests = [BootRequest(mac=m, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                                remote_addr="192.0.2.7") for m in macs]

        async def kept(request: BootRequest) -> BootPlan:
            """The decision once repeats are answered from memory: the same object."""
            for _ in range(2):
                plan = await boot.plan(request)
                await boot.drain()  # what the first one learnt is stored in the background
            assert await boot.plan(request) is plan
            return plan

        # The cluster: managed without a server, then given a fixed URL by the CLI.
        assert "first server" in (await kept(requests[0])).reason
        await cli.put_cluster(Cluster(name="m", server_url="https://192.0.2.9:6443", token="t"))
        assert (await boot.plan(requests[0])).action == BootAction.INSTALL
        # A server of the cluster registering (another machine: the join endpoint).
        await cli.put_cluster(Cluster(name="m", server_url="managed", token="t"))
        await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:00:02:99"),),
                                           cluster="m", role=Role.SERVER))
        held = await kept(requests[1])  # profile q does not exist
        assert held.action == BootAction.HOLD and "no profile" in held.reason
        # The profile, created by the CLI.
        await cli.put_profile(Profile(name="q", kernel="vmlinuz"))
        assert "first server" in (await kept(requests[1])).reason  # now waits for a server
        server = await store.machine_by("mac", "52:54:00:00:02:99")
        assert server is not None
        await cli.update_machine(replace(server, state=MachineState.REGISTERED,
                                         ipv4="192.0.2.60"))
        plan = await boot.plan(requests[1])
        assert plan.action == BootAction.INSTALL and plan.k3s is not None
        assert plan.k3s.server_url == "https://192.0.2.60:6443"
        # The machine itself: an installed one boots locally until it is reinstalled.
        assert (await kept(requests[2])).action == BootAction.LOCAL
        stored = await cli.get_machine(installed.id)
        assert stored is not None
        await cli.update_machine(replace(stored, state=MachineState.FAILED))
        assert "last install failed" in (await kept(requests[2])).reason
        # Its group: none gives it a profile, then one does.
        assert "no profile" in (await kept(requests[3])).reason
        await cli.put_group(Group(name="rack1", selector={"rack": ("r1",)}, profile="p"),
                            create=True)
        assert (await boot.plan(requests[3])).action == BootAction.INSTALL
        # The boot settings (a reload): the hold's retry interval.
        before = await kept(requests[2])
        boot.settings = replace(boot.settings, hold_retry_seconds=before.retry_seconds + 5)
        assert (await boot.plan(requests[2])).retry_seconds == before.retry_seconds + 5
        # An event noted since (a DHCP step that teaches nothing new): the hold is noted
        # again, as without the kept decision.
        dhcp = replace(requests[2], firmware=Firmware.UEFI, via="dhcp")
        await boot.first_stage(dhcp)  # its firmware is learnt: the machine changes
        await boot.drain()
        await kept(requests[2])
        holds = len([e for e in await store.list_events(installed.id) if e.kind == "hold"])
        await boot.first_stage(dhcp)
        await boot.drain()
        assert await boot.plan(requests[2]) is not None
        await boot.drain()
        kinds = [e.kind for e in await store.list_events(installed.id)]
        assert kinds[-2:] == ["dhcp", "hold"] and kinds.count("hold") == holds + 1
    finally:
        await cli.close()
        await store.close()


async def test_an_install_asked_again_is_kept_until_its_token_expires(tmp_path: Path) -> None:
    """An install under way asked again from the address its token was served to gets the
    decision kept from the ask before (the same plan object: nothing read or written) until
    its token expires, when the clock alone holds it; another address, or a change to the
    machine (by another process), is decided again."""
    from netboot.inventory.sqlite import SqliteStore

    path = tmp_path / "n.db"
    store = SqliteStore(path)
    await store.open()
    cli = SqliteStore(path)  # another process's store: its commits reach only the feed
    await cli.open()
    try:
        clock = Clock()
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        await store.put_cluster(Cluster(name="edge", server_url="https://192.0.2.50:6443",
                                        token="t"))
        m = await enrolled(store, role=Role.AGENT)  # type: ignore[arg-type]
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        ask = BootRequest(mac=MAC, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                          remote_addr="192.0.2.7")

        async def kept() -> BootPlan:
            """The decision once repeats are answered from memory: the same object."""
            for _ in range(2):
                plan = await boot.plan(ask)
                await boot.drain()  # its note, stored in the background
            assert await boot.plan(ask) is plan
            assert plan.action == BootAction.INSTALL and plan.token == "tok"
            return plan

        first = await boot.plan(ask)  # the install begins: its token committed
        assert first.action == BootAction.INSTALL and first.token == "tok"
        again = await kept()
        other = await boot.plan(replace(ask, remote_addr="192.0.2.66"))
        assert other.action == BootAction.HOLD and "another address" in other.reason
        # Its note ("token withheld") is the machine's newest now: the install's is noted
        # again, as without a kept decision, then kept.
        assert await boot.plan(ask) is not again
        again = await kept()
        assert again.machine is not None and again.machine.token_expires is not None
        clock.now = again.machine.token_expires  # the last moment it is valid
        assert await boot.plan(ask) is again
        clock.now += 1
        expired = await boot.plan(ask)
        assert expired.action == BootAction.HOLD and "expired" in expired.reason
        # A change to the machine by another process: decided again, and kept again.
        clock.now = again.machine.token_expires - 60
        stored = await cli.get_machine(m.id)
        assert stored is not None
        await cli.update_machine(replace(stored, hostname="renamed"))
        renamed = await boot.plan(ask)
        assert renamed.machine is not None and renamed.machine.hostname == "renamed"
        assert (await kept()).machine is renamed.machine
        await boot.drain()
        kinds = [e.kind for e in await store.list_events(m.id)]
        assert kinds.count("token expired") == 1 and kinds.count("token withheld") == 1
    finally:
        await cli.close()
        await store.close()


async def test_an_installs_first_ask_again_is_kept_from_its_own_note_on(
        tmp_path: Path) -> None:
    """An install under way asked again writes nothing but its "asked again" note: that
    decision is the one kept for the NIC, so the next ask is answered from it (the same plan
    object), its note still queued or written; it was decided in full once more before
    (s43-again). A decision that wrote more than events (a held agent's facts, learnt) is
    not kept."""
    from netboot.inventory.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        await store.put_cluster(Cluster(name="edge", server_url="https://192.0.2.50:6443",
                                        token="t"))
        m = await enrolled(store, role=Role.AGENT)  # type: ignore[arg-type]
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store), new_token=lambda: "tok")
        await boot.load_view()
        ask = BootRequest(mac=MAC, firmware=Firmware.IPXE, arch=Arch.X86_64, via="http",
                          remote_addr="192.0.2.7")
        first = await boot.plan(ask)  # the install begins: its token committed
        assert first.action == BootAction.INSTALL and first.token == "tok"
        again = await boot.plan(ask)  # its note queued: all it wrote
        assert again is not first and again.token == "tok"
        assert boot._recorder.pending(m.id) is not None
        assert await boot.plan(ask) is again  # the note still queued
        await boot.drain()
        assert await boot.plan(ask) is again  # and written
        kinds = [e.kind for e in await store.list_events(m.id)]
        assert kinds.count("install-plan") == 2  # the install's and its "asked again"

        # A held agent's first ask learns its facts (queued to be written): not kept.
        await store.put_cluster(Cluster(name="held", server_url="managed", token="t"))
        other = MacAddress.parse("52:54:00:aa:00:02")
        await store.create_machine(Machine(macs=(other,), hostname="a2", cluster="held",
                                           profile="p", role=Role.AGENT))
        await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:aa:00:03"),),
                                           hostname="s2", cluster="held", profile="p",
                                           role=Role.SERVER))
        held = replace(ask, mac=other, remote_addr="192.0.2.8")
        hold = await boot.plan(held)
        assert hold.action == BootAction.HOLD
        assert await boot.plan(held) is not hold
    finally:
        await store.close()


async def test_a_machines_lock_orders_its_holders_and_is_forgotten_when_free() -> None:
    # BootService._lock: holders of one key one at a time, in order; other keys meanwhile;
    # a waiter cancelled leaves it as it was; nothing kept once no one holds or waits.
    held: dict[str, list[Any]] = {}
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(key: str, name: str, wait: bool = False) -> None:
        async with boot_module._Locked(held, key):
            order.append(f"{name} in")
            if wait:
                await gate.wait()
            order.append(f"{name} out")

    first = asyncio.ensure_future(hold("a", "1", wait=True))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(hold("a", "2"))
    cancelled = asyncio.ensure_future(hold("a", "x"))
    await asyncio.sleep(0)
    await hold("b", "other")  # another key does not wait for "a"
    assert held["a"][1] == 3 and "b" not in held
    cancelled.cancel()
    await asyncio.sleep(0)
    assert held["a"][1] == 2
    gate.set()
    await asyncio.gather(first, second)
    assert order == ["1 in", "other in", "other out", "1 out", "2 in", "2 out"]
    assert held == {}
    with pytest.raises(RuntimeError):
        async with boot_module._Locked(held, "c"):
            raise RuntimeError("a failure inside")
    assert held == {}


async def test_a_machines_lock_handed_to_a_waiter_cancelled_before_it_ran_goes_on() -> None:
    # BootService._lock: the holder leaving hands the key to the first waiter; that waiter
    # cancelled in the same turn, before it ran, never gets in and hands it on; the key is
    # never held twice nor left held by no one, and is forgotten once all are gone.
    held: dict[str, list[Any]] = {}
    inside: list[str] = []
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(name: str, wait: bool = False) -> None:
        async with boot_module._Locked(held, "a"):
            assert not inside, f"{name} in while {inside} holds it"
            inside.append(name)
            order.append(f"{name} in")
            if wait:
                await gate.wait()
            await asyncio.sleep(0)
            inside.remove(name)

    first = asyncio.ensure_future(hold("1", wait=True))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(hold("2"))
    third = asyncio.ensure_future(hold("3"))
    await asyncio.sleep(0)
    assert held["a"][1] == 3
    gate.set()
    while not first.done():  # 1 leaves: the key is handed to 2, which has not run yet
        await asyncio.sleep(0)
    second.cancel()
    await asyncio.wait_for(asyncio.gather(first, third), 5)  # 3 is not left waiting
    with pytest.raises(asyncio.CancelledError):
        await second
    assert order == ["1 in", "3 in"]
    assert held == {}
    again = asyncio.ensure_future(hold("4"))  # free again: taken at once
    await again
    assert order[-1] == "4 in" and held == {}


async def test_a_machines_lock_left_with_a_cancelled_waiter_not_yet_woken_is_free() -> None:
    # BootService._lock: a waiter cancelled (its turn cancelled, its wake-up not yet run)
    # when the holder leaves is skipped; a comer in that same turn, before the cancelled
    # waiter wakes, must not wait for a hand-over nobody is left to make.
    held: dict[str, list[Any]] = {}
    holder = boot_module._Locked(held, "a")
    await holder.__aenter__()
    waiter = asyncio.ensure_future(boot_module._Locked(held, "a").__aenter__())
    await asyncio.sleep(0)  # waits for its turn
    waiter.cancel()  # its turn cancelled; it wakes at the loop's next turn
    await holder.__aexit__(None, None, None)  # (no wait: all in this step)
    comer = boot_module._Locked(held, "a")
    async with asyncio.timeout(5):  # entered inline: before the cancelled waiter wakes
        await comer.__aenter__()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await comer.__aexit__(None, None, None)
    assert held == {}
    async with asyncio.timeout(5), boot_module._Locked(held, "a"):
        pass
    assert held == {}


class _Watched:
    """A BootService on a real SQLite store whose recorder's writer sleeps an hour and whose
    backlog bound is 32 (only a full backlog starts a write), and the largest backlog seen
    while :meth:`watching` (sampled at every turn of the loop)."""

    def __init__(self, store: SqliteStore, tmp_path: Path) -> None:
        self.store = store
        self.enroller = Enroller(store)
        self.recorder = self.enroller.recorder
        self.recorder._delay, self.recorder._backlog = 3600, 32
        self.boot = BootService(store, FileTree([tmp_path]), BootSettings(), self.enroller)
        self.most = 0

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        done = False

        async def watch() -> None:
            while not done:
                self.most = max(self.most, self.recorder.backlog)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        try:
            yield
        finally:
            done = True
            await watcher


@contextlib.asynccontextmanager
async def _watched(tmp_path: Path, machines: list[Machine],
                   cluster: Cluster | None = None) -> AsyncIterator[_Watched]:
    """``machines`` (and ``cluster``, profile ``p``) in a fresh SQLite inventory: _Watched."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        if cluster is not None:
            await store.put_cluster(cluster)
        for machine in machines:
            await store.create_machine(machine)
        watched = _Watched(store, tmp_path)
        yield watched
        await watched.recorder.close()
    finally:
        await store.close()


async def test_a_storm_of_held_agents_faster_than_the_writer_is_paced_by_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Agents of a cluster whose first server has not registered, all asking at once (50 at
    a time, as a pallet's iPXE retry loops do): each is held, its hold event and what its
    request told queued for a background write. The writer is given an hour's delay, so only
    a full backlog starts it: what waits unwritten stays bounded by the recorder's bound and
    the requests in flight, every agent is answered, and every hold and fact is written."""
    agents = [Machine(macs=(MacAddress.parse(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}"),),
                      hostname=f"a{i}", cluster="m", role=Role.AGENT, profile="p")
              for i in range(400)]
    async with _watched(tmp_path, agents,
                        Cluster(name="m", server_url="managed", token="t")) as w:

        async def connection(share: list[Machine]) -> None:
            for agent in share:
                plan = await w.boot.plan(BootRequest(mac=agent.mac, firmware=Firmware.IPXE,
                                                     arch=Arch.X86_64, via="http"))
                assert plan.action == BootAction.HOLD and plan.token is None
                assert "first server to register" in plan.reason

        async with w.watching():
            await asyncio.gather(*(connection(agents[k::50]) for k in range(50)))
        # Each request in flight adds at most its event and its facts past the bound.
        assert 32 <= w.most <= 32 + 2 * 50
        # Said once, not per paced request.
        paced = [r.getMessage() for r in caplog.records if "inventory writer" in r.getMessage()]
        assert w.recorder.paced > 1 and len(paced) == 1
        assert "devices ask faster than their boot notes can be written" in paced[0]
        await w.boot.drain()
        for agent in agents:
            assert [e.kind for e in await w.store.list_events(agent.id)] == ["hold"]
            stored = await w.store.get_machine(agent.id)
            assert stored is not None and stored.arch == Arch.X86_64  # its facts, learnt


async def test_a_dhcp_storm_records_after_its_answers_paced_by_the_writer(
        tmp_path: Path) -> None:
    """400 enrolled machines' first DISCOVERs at once: every one is answered at once (the
    DHCP decision never waits for the writer), and their records (a "dhcp" note and the
    facts each request told), made after the answers, wait for the writer once its backlog
    is full: what is queued stays bounded, and everything is written in the end."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:01:{i >> 8:02x}:{i & 255:02x}"),),
                        hostname=f"m{i}", profile="p") for i in range(400)]
    async with _watched(tmp_path, machines) as w:
        async with w.watching():
            stages = await asyncio.gather(*(w.boot.first_stage(BootRequest(
                mac=m.mac, firmware=Firmware.UEFI, arch=Arch.X86_64, via="dhcp",
                uuid=f"00000000-0000-4000-8000-{i:012d}")) for i, m in enumerate(machines)))
            assert all(stage is not None and stage.path == "snponly.efi" for stage in stages)
            await w.boot.drain()
        assert 32 <= w.most <= 32 + 2 * 64  # a paced slice of records past the bound at most
        for i, machine in enumerate(machines):
            assert [e.kind for e in await w.store.list_events(machine.id)] == ["dhcp"]
            stored = await w.store.get_machine(machine.id)
            assert stored is not None and stored.uuid == f"00000000-0000-4000-8000-{i:012d}"


def _first_dhcp(count: int, tag: int) -> tuple[list[Machine], list[BootRequest]]:
    """``count`` enrolled machines (profile ``p``) and each one's first DISCOVER (a UUID in
    option 97, the firmware's manufacturer): what a fleet's first power-on sends."""
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:{tag:02x}:00:{i:02x}"),),
                        hostname=f"m{i}", profile="p") for i in range(count)]
    requests = [BootRequest(mac=m.mac, firmware=Firmware.UEFI, arch=Arch.X86_64, via="dhcp",
                            uuid=f"00000000-0000-4000-8000-{i:012d}", manufacturer="QEMU")
                for i, m in enumerate(machines)]
    return machines, requests


async def _stored_first_dhcp(w: _Watched, machines: list[Machine],
                             requests: list[BootRequest]) -> None:
    """Each machine holds its one "dhcp" note and what its first DISCOVER told."""
    for i, machine in enumerate(machines):
        events = await w.store.list_events(machine.id)
        assert [(e.kind, e.message) for e in events] == [
            ("dhcp", boot_module._dhcp_note(requests[i]))]
        stored = await w.store.get_machine(machine.id)
        assert stored is not None
        assert stored.uuid == f"00000000-0000-4000-8000-{i:012d}"
        assert (stored.arch, stored.firmware) == (Arch.X86_64, Firmware.UEFI)
        assert stored.facts.get("manufacturer") == "QEMU"


async def test_a_dhcp_storms_learnt_facts_are_written_as_learnt_and_read_back_exact(
        tmp_path: Path) -> None:
    """A storm's first DISCOVERs: their group commit names every machine learnt (Batch.learnt:
    the SQLite writer compares only what learn() sets), and what it stores is what the view
    answers, to the field, read again after a restart: the document, the UUID's row (found
    by it), arch, firmware, facts and version."""
    import json

    from netboot.inventory import codec

    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(40, 4)
    batches: list[Batch] = []
    async with _watched(tmp_path, machines) as w:
        apply = w.store.apply_batch

        async def seen(batch: Batch) -> None:
            batches.append(batch)
            await apply(batch)

        w.store.apply_batch = seen  # type: ignore[method-assign]
        await w.boot.load_view()
        w.recorder._delay, w.recorder._backlog = 3600.0, 1000
        for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in requests)):
            assert stage is not None
        await w.boot.drain()
        await w.recorder.flush()
        assert [set(b.learnt) for b in batches if b.update] == [{m.id for m in machines}]
        held = {m.id: w.boot._view.held_machine(m.id) for m in machines}
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        for i, machine in enumerate(machines):
            mine = held[machine.id]
            assert isinstance(mine, Machine) and mine.uuid is not None
            assert mine.facts == {"manufacturer": "QEMU"}
            assert (mine.arch, mine.firmware) == (Arch.X86_64, Firmware.UEFI)
            assert await store.get_machine(machine.id) == mine
            assert await store.machine_by("uuid", f"00000000-0000-4000-8000-{i:012d}") == mine
            text = await store._run(lambda conn, i=machine.id: conn.execute(
                "SELECT data FROM machines WHERE id = ?", (i,)).fetchone()[0])
            assert json.loads(text) == codec.machine_document(mine)
    finally:
        await store.close()


async def test_a_dhcp_storms_records_use_their_decisions_memo_once_it_is_evicted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm of first DISCOVERs whose records fall behind the answers by more than the
    memos kept per NIC (REPEATS_KEPT: 8 here, 8,192 when serving): each record is made from
    the memo its decision made (the request's identity worked out once, what it teaches the
    machine found once), not worked out again; and what it stores is the same: the facts
    the request told and one "dhcp" note a machine."""
    from netboot.identity import Identity

    monkeypatch.setattr(boot_module, "REPEATS_KEPT", 8)
    made: list[BootRequest] = []
    of_request = Identity.of_request.__func__  # type: ignore[attr-defined]

    def counted(cls: type[Identity], request: BootRequest) -> Identity:
        made.append(request)
        return of_request(cls, request)

    monkeypatch.setattr(Identity, "of_request", classmethod(counted))
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(100, 2)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        stages = [w.boot.first_stage(request) for request in requests]  # all before a record
        for stage in await asyncio.gather(*stages):
            assert stage is not None and stage.path == "snponly.efi"
        assert len(w.boot._seen) == 8  # the storm's first 92 memos evicted
        await w.boot.drain()
        await w.recorder.flush()
        # Each request's identity once, by its decision (before: 2 more a record whose memo
        # was evicted, its look-up's and its learn()'s).
        assert len(made) == len(requests)
        await _stored_first_dhcp(w, machines, requests)


async def test_a_dhcp_storms_paced_records_are_made_without_a_coroutine_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm of enrolled machines' first DISCOVERs: each paced record that would wait for
    nothing (the NIC's lock free, room in the recorder, a fresh view, the machine found by
    this NIC alone) is made in the pacer's loop, not by the record's coroutine
    (BootService._record_now), and stores the same: the facts told and one "dhcp" note."""
    general: list[BootRequest] = []
    record_dhcp = BootService._record_dhcp

    async def counted(self: BootService, request: BootRequest, **kw: Any) -> None:
        general.append(request)
        await record_dhcp(self, request, **kw)

    monkeypatch.setattr(BootService, "_record_dhcp", counted)
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(60, 3)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        # No group commit until the flush below: the view stays fresh for every record (one
        # made after a commit of this process syncs first: the coroutine's path).
        w.recorder._delay, w.recorder._backlog = 3600.0, 1000
        for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in requests)):
            assert stage is not None and stage.path == "snponly.efi"
        while w.boot._paced or w.boot._recording:
            await asyncio.sleep(0)
        assert general == []  # before: one coroutine each (60)
        assert w.recorder.backlog == 2 * len(machines)  # a note and facts each, queued
        await w.boot.drain()
        await w.recorder.flush()
        await _stored_first_dhcp(w, machines, requests)
        assert not w.boot._recording and not w.boot._paced


def _counting_lookups(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The look-ups from the view's memory (identity.held_lookup) BootService makes."""
    made: list[object] = []
    held_lookup = boot_module.identity.held_lookup

    def counted(*args: Any, **kw: Any) -> Any:
        made.append(None)
        return held_lookup(*args, **kw)

    monkeypatch.setattr(boot_module.identity, "held_lookup", counted)
    return made


async def test_a_paced_dhcp_record_takes_its_decisions_look_up_while_the_view_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first DISCOVER's record, paced after its answer, finds its machine by the look-up
    its decision made from the view's memory when the view has changed nothing it answers
    from since (InventoryView.held_changes): one look-up a first DISCOVER, not two; and
    stores the same (the facts told, one "dhcp" note each)."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(40, 7)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        w.recorder._delay, w.recorder._backlog = 3600.0, 1000  # no commit: the view stays
        made = _counting_lookups(monkeypatch)
        for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in requests)):
            assert stage is not None and stage.path == "snponly.efi"
        assert len(made) == len(requests)
        while w.boot._paced or w.boot._recording:
            await asyncio.sleep(0)
        assert len(made) == len(requests)  # before: a second one each (80)
        assert w.recorder.backlog == 2 * len(machines)  # a note and facts each, queued
        assert all(w.boot._seen[r.mac].res is None for r in requests)  # not kept alive
        await w.boot.drain()
        await w.recorder.flush()
        await _stored_first_dhcp(w, machines, requests)


async def test_a_paced_dhcp_record_looks_up_again_once_the_view_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change the view takes between a first DISCOVER's answer and its record (a group
    commit's adopt, a sync) is what the record sees: it looks its machine up again, and
    notes the step for the machine object the view holds now (the recorder's version: the
    next note compares with it), not the one its decision found. Another machine's change
    alone has every record look up again."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(4, 8)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        w.recorder._delay, w.recorder._backlog = 3600.0, 1000
        view = w.boot._view
        held = [view.held_machine(m.id) for m in machines]
        first, fourth = held[0], held[3]
        assert isinstance(first, Machine) and isinstance(fourth, Machine)
        made = _counting_lookups(monkeypatch)
        # Decided now, recorded at the pacer's next turn of the loop: the view changes in
        # between (nothing awaited before the adopt).
        stages = [w.boot.first_stage(r) for r in requests[:3]]
        assert all(f.done() and f.result() is not None for f in stages)
        relabelled = replace(first, labels={"rack": "r9"}, updated=first.updated + 1)
        view.adopt([relabelled, replace(fourth, hostname="renamed", updated=fourth.updated + 1)],
                   {first.id: first.updated, fourth.id: fourth.updated})
        assert view.held_machine(first.id) is relabelled
        while w.boot._paced or w.boot._recording:
            await asyncio.sleep(0)
        assert len(made) == 3 + 3  # before: 3, each record took its decision's
        assert w.recorder._last[first.id][1] is relabelled  # before: ``first``
        assert w.recorder._last[machines[1].id][1] is held[1]
        assert all(w.recorder.pending(m.id) is not None for m in machines[:3])
        await w.boot.drain()
        # What the view was told is not what is stored: nothing of it is written.
        w.recorder._queue.clear()
        w.recorder._learned.clear()


async def test_a_first_discover_is_decided_from_the_views_memory_without_a_coroutine_each(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded view answers a first DISCOVER's look-up and its loader chain from memory:
    neither the look-up's coroutine (_resolve) nor the chain's (_chain, _effective) is made,
    and the first stage and its reason are what those coroutines choose (the machine's own
    chain, its group's, its profile's, the default)."""
    from netboot.model import Group

    made: list[str] = []
    resolve, chain = BootService._resolve, BootService._chain

    def counted_resolve(self: BootService, *args: Any, **kw: Any) -> Any:
        made.append("_resolve")
        return resolve(self, *args, **kw)

    async def counted_chain(self: BootService, *args: Any, **kw: Any) -> Any:
        made.append("_chain")
        return await chain(self, *args, **kw)

    for name in ("snponly.efi", "shimx64.efi"):
        (tmp_path / name).write_bytes(b"x")
    machines, requests = _first_dhcp(4, 6)
    machines[0] = replace(machines[0], loader=LoaderChain.SHIM_GRUB)
    machines[1] = replace(machines[1], labels={"rack": "r1"})
    machines[2] = replace(machines[2], profile="sb")
    async with _watched(tmp_path, machines) as w:
        await w.store.put_profile(Profile(name="sb", kernel="vmlinuz",
                                          loader=LoaderChain.SHIM_GRUB))
        await w.store.put_group(Group(name="g", selector={"rack": ("r1",)},
                                      loader=LoaderChain.SHIM_GRUB))
        await w.boot.load_view()
        w.recorder._delay, w.recorder._backlog = 3600.0, 1000  # no commit: the view stays
        monkeypatch.setattr(BootService, "_resolve", counted_resolve)
        monkeypatch.setattr(BootService, "_chain", counted_chain)
        held = [w.boot.first_stage(r) for r in requests]
        assert all(f.done() for f in held)  # answered at once, from memory
        assert made == []  # before: a _resolve and a _chain each (8)
        # The coroutines' answers, for the same requests (as a view that cannot tell gets).
        monkeypatch.setattr(BootService, "_held_chain", lambda *a: None)
        monkeypatch.setattr(boot_module.identity, "held_lookup", lambda *a: None)
        w.boot.forget_memos()
        for request in requests:
            w.boot._seen.pop(request.mac, None)
        told = [await w.boot.first_stage(r) for r in requests]
        assert made.count("_chain") == len(requests)
        assert [(f.result().path, f.result().reason) for f in held] == [
            (s.path, s.reason) for s in told if s is not None]
        assert [f.result().reason.split("; ")[1] for f in held] == [
            "chain shim-grub: set on the machine)", "chain shim-grub: set on group g)",
            "chain shim-grub: set on profile sb)", "chain ipxe: default for the architecture)"]


async def test_a_paced_dhcp_record_whose_nic_is_locked_waits_for_its_holder(
        tmp_path: Path) -> None:
    """A paced record of a NIC whose lock another request holds (an /ipxe plan writing the
    machine) is not made in the pacer's loop: it waits for the lock (and the records paced
    after it wait with it), then is made, as the record's coroutine always made it."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(3, 4)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        lock = w.boot._lock(requests[1].mac)
        await lock.__aenter__()
        try:
            for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in requests)):
                assert stage is not None
            for _ in range(20):
                await asyncio.sleep(0)
            # The first NIC's note is queued; the locked NIC's waits, unnoted.
            assert w.recorder.pending(machines[0].id) is not None
            assert w.recorder.pending(machines[1].id) is None
            assert requests[1].mac in w.boot._recording
        finally:
            await lock.__aexit__(None, None, None)
        await w.boot.drain()
        await w.recorder.flush()
        await _stored_first_dhcp(w, machines, requests)


async def test_a_paced_dhcp_record_with_the_recorder_full_waits_for_room(
        tmp_path: Path) -> None:
    """While the recorder's backlog is at its bound, a paced record is not made in the
    pacer's loop (which would queue past the bound): it waits in Recorder.room() for the
    writer, as the record's coroutine does, and is made once there is room."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines, requests = _first_dhcp(3, 5)
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        w.recorder._backlog = 0  # crowded from the start: every record waits for room
        stages = await asyncio.gather(*(w.boot.first_stage(r) for r in requests))
        assert all(stage is not None for stage in stages)
        for _ in range(20):
            await asyncio.sleep(0)
        assert all(w.recorder.pending(m.id) is None for m in machines)
        assert w.recorder.paced >= 1  # the first record waits in room()
        w.recorder._backlog = 512
        w.recorder._room.set()
        await w.boot.drain()
        await w.recorder.flush()
        await _stored_first_dhcp(w, machines, requests)


async def test_dhcp_memos_forgotten_when_quiet_are_made_again_with_the_same_answers(
        tmp_path: Path) -> None:
    """Once quiet after a storm (Service.forget_idle) the NICs' DHCP memos are dropped, not
    held until 8,192 other NICs push them out (s35-mem); a NIC asking again is decided as
    one not seen yet: the same loader, and its repeat writes nothing (one "dhcp" note a
    machine, as without the forgetting)."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:03:00:{i:02x}"),),
                        hostname=f"f{i}", profile="p") for i in range(10)]
    requests = [BootRequest(mac=m.mac, firmware=Firmware.UEFI, arch=Arch.X86_64, via="dhcp")
                for m in machines]
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in requests)):
            assert stage is not None and stage.path == "snponly.efi"
        await w.boot.drain()
        await w.recorder.flush()
        assert len(w.boot._seen) == len(requests)
        w.boot.forget_memos()
        assert not w.boot._seen
        for request in requests:  # each asks again: a retransmission, the next boot
            stage = await w.boot.first_stage(request)
            assert stage is not None and stage.path == "snponly.efi"
        assert len(w.boot._seen) == len(requests)  # made again
        await w.boot.drain()
        await w.recorder.flush()
        for machine in machines:
            assert [e.kind for e in await w.store.list_events(machine.id)] == ["dhcp"]


async def test_a_first_install_lets_its_nics_dhcp_memo_go(tmp_path: Path) -> None:
    """A NIC's DHCP memo (the request, its identity, the decision and the machine as it was)
    is let go once the NIC's first install is planned over HTTP, not held to the storm's
    last moment (s40-mem): its firmware's DHCP is over, and the memo names the machine
    before the install. Memos of NICs not installing (held, or not asked yet) stay. The
    NIC's next boot is decided as one not seen yet: the same loader, the install under way
    kept (installing again hands it the same token)."""
    (tmp_path / "snponly.efi").write_bytes(b"x")
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:04:00:{i:02x}"),),
                        hostname=f"g{i}", profile="p") for i in range(6)]
    dhcp = [BootRequest(mac=m.mac, firmware=Firmware.UEFI, arch=Arch.X86_64, via="dhcp",
                        remote_addr=None) for m in machines]
    async with _watched(tmp_path, machines) as w:
        await w.boot.load_view()
        for stage in await asyncio.gather(*(w.boot.first_stage(r) for r in dhcp)):
            assert stage is not None and stage.path == "snponly.efi"
        await w.boot.drain()
        assert set(w.boot._seen) == {m.mac for m in machines}
        plans = [await w.boot.plan(BootRequest(mac=m.mac, firmware=Firmware.IPXE,
                                               arch=Arch.X86_64, via="http",
                                               remote_addr="192.0.2.50"))
                 for m in machines[:4]]
        assert all(p.action == BootAction.INSTALL and p.token for p in plans)
        assert set(w.boot._seen) == {m.mac for m in machines[4:]}  # not installing: kept
        stage = await w.boot.first_stage(dhcp[0])  # its next boot, as a NIC not seen yet
        assert stage is not None and stage.path == "snponly.efi"
        assert dhcp[0].mac in w.boot._seen
        again = await w.boot.plan(BootRequest(mac=machines[0].mac, firmware=Firmware.IPXE,
                                              arch=Arch.X86_64, via="http",
                                              remote_addr="192.0.2.50"))
        assert again.action == BootAction.INSTALL and again.token == plans[0].token
        await w.boot.drain()
        await w.recorder.flush()


async def _clusters_each_with_a_server(store: SqliteStore, count: int,
                                      ) -> tuple[list[str], dict[str, Machine]]:
    """``count`` managed clusters ``c0``…, each with one registered server (192.0.2.x, by
    its index) and one agent not installed yet: the names, and each cluster's agent."""
    names = [f"c{i}" for i in range(count)]
    agents = {}
    for i, name in enumerate(names):
        await store.put_cluster(Cluster(name=name, server_url="managed", token="t"))
        await store.create_machine(Machine(
            macs=(MacAddress.parse(f"52:54:00:01:{i // 256:02x}:{i % 256:02x}"),),
            cluster=name, role=Role.SERVER, state=MachineState.REGISTERED,
            ipv4=f"192.0.2.{i % 250 + 1}"))
        agents[name] = Machine(
            macs=(MacAddress.parse(f"52:54:00:02:{i // 256:02x}:{i % 256:02x}"),),
            cluster=name, role=Role.AGENT)
        await store.create_machine(agents[name])
    return names, agents


async def test_kept_joins_are_bounded_and_the_oldest_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The joins kept per managed cluster stay at most ``_FEW_CLUSTERS`` (a site with more
    clusters churns them, never grows them), the newest kept; a cluster whose join was
    dropped is answered as before, by reading it again. (The bound made small here: the
    real one is a fleet's hundreds, below.)"""
    monkeypatch.setattr(boot_module, "_FEW_CLUSTERS", 16)
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        clock = Clock()
        bound = boot_module._FEW_CLUSTERS
        names, agents = await _clusters_each_with_a_server(store, bound + 6)
        other = Machine(macs=(MacAddress.parse("52:54:00:03:00:01"),), cluster=names[-1],
                        role=Role.AGENT)  # asked last, of a kept cluster
        await store.create_machine(other)
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        clusters = {name: await store.get_cluster(name) for name in names}
        for round_ in range(2):
            for i, name in enumerate(names):
                cluster = clusters[name]
                assert cluster is not None
                join = await boot.k3s_join(agents[name], cluster, Role.AGENT, None)
                assert join.server_url == f"https://192.0.2.{i + 1}:6443", (round_, name)
                assert len(boot._joining) <= bound
        assert list(boot._joining) == names[-bound:]  # the newest, oldest first
        # Another node of a kept cluster: answered from the kept join, which stays as it was
        # (the node it was read for is not: its own servers' list may name it).
        last = names[-1]
        kept = boot._joining[last]
        cluster = clusters[last]
        assert cluster is not None
        join = await boot.k3s_join(other, cluster, Role.AGENT, None)
        assert join.server_url == f"https://192.0.2.{len(names)}:6443"
        assert boot._joining[last] is kept
    finally:
        await store.close()


async def test_a_fleet_of_hundreds_of_clusters_keeps_every_clusters_join(
        tmp_path: Path) -> None:
    """A fleet of edge sites, a cluster each (200 here), its storm's nodes drawn at random:
    once a node of each cluster is decided, every other node of any of them is told its
    join from the kept one, without reading the init node and servers again
    (BootService._known_join answers it). With 64 kept (s43's bound) ~2/3 of a 200-cluster
    storm's first configs read them again (s44-config)."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        clock = Clock()
        names, agents = await _clusters_each_with_a_server(store, 200)
        others = {}
        for i, name in enumerate(names):
            others[name] = Machine(
                macs=(MacAddress.parse(f"52:54:00:03:{i // 256:02x}:{i % 256:02x}"),),
                cluster=name, role=Role.AGENT)
            await store.create_machine(others[name])
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        clusters = {name: await store.get_cluster(name) for name in names}
        for name in names:
            cluster = clusters[name]
            assert cluster is not None
            await boot.k3s_join(agents[name], cluster, Role.AGENT, None)
        for i, name in enumerate(names):
            cluster = clusters[name]
            assert cluster is not None
            known = boot._known_join(others[name], cluster, Role.AGENT, None)
            assert known is not None, name  # decided from what was kept
            assert known.server_url == f"https://192.0.2.{i % 250 + 1}:6443"
            assert known == await boot.k3s_join(others[name], cluster, Role.AGENT, None)
    finally:
        await store.close()


def _news_as_rules_say(machine: Machine, request: BootRequest, taken: frozenset[str],
                       ) -> dict[str, Any] | None:
    """learn()'s rules (boot._news), written as plainly as they read: the oracle of the
    test below."""
    from netboot.identity import Identity

    seen = Identity.of_request(request)
    told: dict[str, str] = {}
    for key in ("manufacturer", "product", "hostname", "platform", "relay", "interface"):
        value = getattr(request, key)
        if value and (key != "hostname" or enroll.hostname_ok(value)):
            told["dhcp_hostname" if key == "hostname" else key] = value
    if request.remote_addr and not (request.relay and request.via == "dhcp"):
        told["remote_addr"] = request.remote_addr  # a relayed DHCP request's is the relay's
    for key in ("uuid", "serial", "asset"):
        value = getattr(request, key)
        if value and (getattr(seen, key) is None or key in taken):
            told[key] = value
    ids = {key: getattr(machine, key) or (None if key in taken else getattr(seen, key))
           for key in ("uuid", "serial", "asset")}
    arch = request.arch if request.arch != Arch.UNKNOWN else machine.arch
    firmware = machine.firmware or (request.firmware
                                    if request.firmware != Firmware.UNKNOWN else None)
    facts = machine.facts
    if (all(ids[k] == getattr(machine, k) for k in ids) and arch == machine.arch
            and firmware == machine.firmware
            and all(k in facts and facts[k] == v for k, v in told.items())):
        return None
    return {"facts": {**facts, **told}, **ids, "arch": arch, "firmware": firmware}


def test_what_a_request_teaches_follows_learns_rules() -> None:
    """boot._news (every first install asks it), written out field by field, answers as
    the rules read: over requests and machines with and without each identifier (real ones,
    firmware placeholders), facts told before or not, kinds other machines hold."""
    import itertools
    import random

    draw = random.Random(24)
    uuids = [None, "", "03000200-0400-0500-0006-000700080009",
             "00000000-0000-0000-0000-000000000000", "not-a-uuid"]
    texts = [None, "", "SN-1", "To be filled by O.E.M.", "  padded  ", "0"]
    kinds = ["uuid", "serial", "asset"]
    for _ in range(4000):
        told = {k: draw.choice([None, "", "x", "y", "no_name"]) for k in (
            "manufacturer", "product", "hostname", "platform", "relay", "interface")}
        request = BootRequest(
            mac=MAC, arch=draw.choice(list(Arch)), firmware=draw.choice(list(Firmware)),
            uuid=draw.choice(uuids), serial=draw.choice(texts), asset=draw.choice(texts),
            remote_addr=draw.choice([None, "", "192.0.2.9", "192.0.2.10"]),
            via=draw.choice(["dhcp", "http", "tftp"]), **told)
        facts = {k: v for k, v in (("manufacturer", "x"), ("product", "y"),
                                   ("dhcp_hostname", "x"), ("remote_addr", "192.0.2.9"),
                                   ("uuid", "not-a-uuid"), ("serial", "SN-1"))
                 if draw.random() < 0.4}
        machine = Machine(
            macs=(MAC,), uuid=draw.choice([None, uuids[2]]), serial=draw.choice([None, "SN-1"]),
            asset=draw.choice([None, "0", "A-7"]),
            arch=draw.choice([None, *Arch]), firmware=draw.choice([None, *Firmware]),
            facts=facts)
        taken = frozenset(itertools.compress(kinds, [draw.random() < 0.2 for _ in kinds]))
        expected = _news_as_rules_say(machine, request, taken)
        assert boot_module._news(machine, request, taken) == expected
        assert boot_module.teaches(machine, request, taken) == (expected is not None)
        if expected is not None:
            assert list(boot_module._news(machine, request, taken)["facts"]) == \
                list(expected["facts"])  # the facts' order too


def test_a_dhcp_request_learns_no_address_that_is_not_the_machines() -> None:
    """A machine seen before (arch, firmware, UUID; its address learnt from its HTTP
    requests) learns nothing from its DHCP requests' sources that are not its address, so
    its row is not rewritten at each boot: a relayed request comes from the relay agent
    (RFC 2131 §4.1; told as ``relay``), a broadcast from 0.0.0.0 (no address: pxe gives
    None). A request from another address of its own (the :4011 REQUEST, HTTP, TFTP) is a
    fact that changed, learnt as before."""
    known = Machine(macs=(MAC,), uuid="03000200-0400-0500-0006-000700080009",
                    arch=Arch.X86_64, firmware=Firmware.UEFI,
                    facts={"relay": "198.51.100.1", "remote_addr": "192.0.2.60"})
    dhcp = {"mac": MAC, "arch": Arch.X86_64, "firmware": Firmware.UEFI, "via": "dhcp",
            "uuid": "03000200-0400-0500-0006-000700080009"}
    relayed = BootRequest(**dhcp, remote_addr="198.51.100.1", relay="198.51.100.1")
    assert boot_module.learn(known, relayed, 1.0) is known
    assert not boot_module.teaches(known, relayed)
    broadcast = BootRequest(**dhcp, remote_addr=None)
    assert boot_module.learn(known, broadcast, 1.0) is known
    for via, relay in (("dhcp", None), ("http", None), ("tftp", None), ("http", "198.51.100.1")):
        moved = BootRequest(**{**dhcp, "via": via}, remote_addr="192.0.2.61", relay=relay)
        learnt = boot_module.learn(known, moved, 2.0)
        assert learnt.facts["remote_addr"] == "192.0.2.61" and learnt.updated == 2.0, via
    # A relayed request of a machine that never told its address learns none from it.
    bare = replace(known, facts={})
    assert "remote_addr" not in boot_module.learn(bare, relayed, 3.0).facts


async def test_a_fixed_address_is_answered_from_the_view_when_its_sync_fails(
        tmp_path: Path) -> None:
    """The authoritative pool's fixed_ipv4 lookup (BootService.fixed_address) with the
    inventory gone between two syncs: the machine's address as the loaded view holds it, as
    a first stage is answered from memory then. It raised StoreError, which the DHCP server
    took as no fixed address and offered an address of the pool: the machine came up on
    another address than the one its DNS record and its operator give it (dnsmasq answers a
    dhcp-host from its configuration, never from a store)."""
    from netboot.errors import StoreError
    from netboot.inventory.base import Changes

    class GoneStore(SqliteStore):
        gone = False

        async def changes_since(self, seq: int) -> Changes:
            if self.gone:
                raise StoreError("database is locked")
            return await super().changes_since(seq)

    store = GoneStore(tmp_path / "n.db")
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MAC,), fixed_ipv4="192.0.2.10"))
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store))
        await boot.load_view()
        assert await boot.fixed_address(str(MAC)) == "192.0.2.10"
        await store.put_setting("s42", "1")  # a commit here: the view is not fresh
        store.gone = True
        assert await boot.fixed_address(str(MAC)) == "192.0.2.10"
        assert not boot.health.up  # the outage is told as the first stage tells it
        await boot.drain()
    finally:
        await store.close()


async def test_a_config_plan_answered_without_a_wait_is_config_plans_own(
        tmp_path: Path) -> None:
    """BootService.config_plan_now (a first config's plan without config_plan's coroutine,
    s50-config) gives, where it answers, exactly config_plan's plan, and answers a storm's
    nodes: a managed cluster's agents with and without a group (its labels and taints) once
    its join is kept, a fixed server URL's nodes, on any NIC asked for. Where config_plan
    looks (a join not kept yet), refuses (no server yet: waiting; a cluster gone) or plans
    without a cluster, it answers None and config_plan decides."""
    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    try:
        clock = Clock()
        await store.put_profile(Profile(name="p", kernel="vmlinuz", initrds=("initrd",)))
        names, agents = await _clusters_each_with_a_server(store, 2)
        await store.put_cluster(Cluster(name="fixed", server_url="https://192.0.2.99:6443",
                                        token="ft"))
        await store.put_cluster(Cluster(name="empty", server_url="managed", token="et"))
        await store.put_group(Group(name="g", selector={"arch": ("arm64",)}, cluster="c1",
                                    profile="p", labels={"site": "s1"}, taints=("t=1:NoSchedule",)),
                              create=True)

        def machine(n: int, **fields: Any) -> Machine:
            return Machine(macs=(MacAddress.parse(f"52:54:00:04:00:{n:02x}"),), profile="p",
                           state=MachineState.BOOTING, **fields)

        grouped = machine(1, arch=Arch.ARM64, hostname="g1")
        fleet = {
            "agent of c0": machine(2, cluster="c0", role=Role.AGENT),
            "named agent of c0": machine(3, cluster="c0", role=Role.AGENT, hostname="n3"),
            "agent of c1 by its group": grouped,
            "server of c0": machine(4, cluster="c0", role=Role.SERVER),
            "agent of fixed": machine(5, cluster="fixed", role=Role.AGENT),
            "server of fixed": machine(6, cluster="fixed", role=Role.SERVER),
            "of no cluster": machine(7),
            "waiting (no server)": machine(8, cluster="empty", role=Role.AGENT),
            "of a cluster gone": machine(9, cluster="gone", role=Role.AGENT),
        }
        for m in fleet.values():
            await store.create_machine(m)
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        for name in names:  # a node of each managed cluster planned: its cluster's join kept
            await boot.config_plan(agents[name], token="tok", reason="r")
        other_nic = MacAddress.parse("52:54:00:04:01:01")
        answered = set()
        for _ in range(2):  # the second: every plan of the first made again
            for what, m in fleet.items():
                for mac in (None, other_nic):
                    now = boot.config_plan_now(m, token="tok", reason="r", mac=mac)
                    try:
                        plan = await boot.config_plan(m, token="tok", reason="r", mac=mac,
                                                      synced=True)
                    except Conflict:
                        assert now is None, what
                        continue
                    if now is not None:
                        assert now == plan, (what, now, plan)
                        assert now.k3s == plan.k3s and now.k3s is not None, what
                        answered.add(what)
        assert answered == {"agent of c0", "named agent of c0", "agent of c1 by its group",
                            "server of c0", "agent of fixed", "server of fixed"}, answered
        plan = boot.config_plan_now(grouped, token="tok", reason="r")
        assert plan is not None and plan.group == "g" and plan.k3s is not None
        assert plan.k3s.labels.get("site") == "s1" and plan.k3s.taints == ("t=1:NoSchedule",)
        assert plan.mac == grouped.mac and plan.token == "tok" and plan.reason == "r"
    finally:
        await store.close()


async def test_a_machine_held_without_a_wait_is_machine_by_macs_own(tmp_path: Path) -> None:
    """BootService.held_machine (a first config's read of its machine without
    machine_by_mac's coroutine, s50-config) answers only from a current view: what
    machine_by_mac answers, a machine or none; after another process's commit (a second
    store on the file: the view not current), UNSEEN, and machine_by_mac, awaited, reads
    the machine that commit made or changed."""
    from netboot.identity import Unseen

    store = SqliteStore(tmp_path / "n.db")
    await store.open()
    other = SqliteStore(tmp_path / "n.db")
    await other.open()
    try:
        clock = Clock()
        known = Machine(macs=(MacAddress.parse("52:54:00:05:00:01"),), hostname="k1")
        await store.create_machine(known)
        boot = BootService(store, FileTree([tmp_path]), BootSettings(policy="hold"),
                           Enroller(store, clock=clock), clock=clock, new_token=lambda: "tok")
        await boot.load_view()
        stranger = MacAddress.parse("52:54:00:05:00:02")
        for mac in (known.mac, stranger):
            assert mac is not None
            held = boot.held_machine(mac)
            assert not isinstance(held, Unseen), mac
            assert held == await boot.machine_by_mac(mac)
        assert boot.held_machine(stranger) is None
        # Another process enrolls the stranger and renames the known one.
        made = Machine(macs=(stranger,), hostname="s2")
        await other.create_machine(made)
        read = await other.get_machine(known.id)
        assert read is not None
        await other.update_machine(replace(read, hostname="k2"))
        assert known.mac is not None
        assert all(isinstance(boot.held_machine(mac), Unseen) for mac in (stranger, known.mac))
        for mac, hostname in ((stranger, "s2"), (known.mac, "k2")):
            found = await boot.machine_by_mac(mac)
            assert found is not None and found.hostname == hostname
            held = boot.held_machine(mac)  # synced now: held again
            assert not isinstance(held, Unseen) and held == found
    finally:
        await other.close()
        await store.close()
