"""The boot decision, without sockets: first stages, discovery policies, state rules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from netboot.boot import BootService, BootSettings
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.inventory.memory import MemoryStore
from netboot.model import (
    Arch,
    BootAction,
    BootRequest,
    Cluster,
    Firmware,
    Group,
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


async def enrolled(store: MemoryStore, **kw: object) -> Machine:
    m = Machine(mac=MAC, hostname="edge-1", profile="p", cluster="edge", **kw)  # type: ignore[arg-type]
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
    m = await store.get_machine(str(MAC))
    assert m is not None and m.state == MachineState.DISCOVERED
    assert m.arch == Arch.X86_64 and m.firmware == Firmware.UEFI and m.uuid == uuid
    assert m.facts["relay"] == "192.0.2.1" and m.facts["interface"] == "eth1"
    assert [e.kind for e in await store.list_events(str(MAC))] == ["discovered"]
    plan = await boot.plan(req(Firmware.IPXE, serial="SN1", product="Box"))
    assert plan.action == BootAction.IGNORE
    m = await store.get_machine(str(MAC))
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
    plan = await boot.plan(req(Firmware.IPXE, product="Box"))
    assert plan.action == BootAction.INSTALL and plan.token == "tok"
    m = await store.get_machine(str(MAC))
    assert m is not None and m.hostname == "line3-000011" and m.cluster == "edge"
    assert m.state == MachineState.BOOTING


async def test_install_then_local_then_reinstall(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, clock = setup
    await enrolled(store)
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.INSTALL
    assert plan.k3s is not None and plan.k3s.server_url == "https://192.0.2.50:6443"
    m = await store.get_machine(str(MAC))
    assert m is not None and m.token_hash and m.token_expires == clock.now + 86_400
    assert "tok" not in repr(m.token_hash)
    await store.update_machine(replace(m, state=MachineState.INSTALLED))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.LOCAL
    await store.update_machine(replace(m, state=MachineState.FAILED))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.HOLD
    await boot._enroller.reinstall(str(MAC))
    assert (await boot.plan(req(Firmware.IPXE))).action == BootAction.INSTALL


async def test_no_profile_holds(setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.create_machine(Machine(mac=MAC, hostname="x"))
    plan = await boot.plan(req(Firmware.IPXE))
    assert plan.action == BootAction.HOLD and "no profile" in plan.reason


async def test_managed_cluster_first_server_inits(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    a = Machine(mac=MacAddress.parse("52:54:00:00:00:01"), hostname="s1", cluster="m",
                role=Role.AGENT, profile="p")
    s1 = Machine(mac=MacAddress.parse("52:54:00:00:00:02"), hostname="s2", cluster="m",
                 role=Role.SERVER, profile="p", ipv4="192.0.2.101")
    s2 = Machine(mac=MacAddress.parse("52:54:00:00:00:03"), hostname="s3", cluster="m",
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
    agent = Machine(mac=MacAddress.parse("52:54:00:00:00:01"), hostname="a1", cluster="m",
                    role=Role.AGENT, profile="p")
    await store.create_machine(agent)
    # DNS on, but no registered server: m.netboot.lan answers nothing, so nobody is sent there.
    assert (await boot.k3s_join(agent, cluster, Role.AGENT, None)).waiting
    server = Machine(mac=MacAddress.parse("52:54:00:00:00:02"), hostname="bad_name",
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
    agent = Machine(mac=MacAddress.parse("52:54:00:00:00:01"), hostname="a1", cluster="m",
                    role=Role.AGENT, profile="p")
    first = Machine(mac=MacAddress.parse("52:54:00:00:00:02"), hostname="s1", cluster="m",
                    role=Role.SERVER, profile="p")
    second = Machine(mac=MacAddress.parse("52:54:00:00:00:03"), hostname="s2", cluster="m",
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
    agent = Machine(mac=MAC, hostname="a1", cluster="m", role=Role.AGENT, profile="p")
    server = Machine(mac=MacAddress.parse("52:54:00:00:00:02"), hostname="s1", cluster="m",
                     role=Role.SERVER, profile="p")
    await store.create_machine(agent)
    await store.create_machine(server)
    for _ in range(3):  # the retry loop asks again and again
        plan = await boot.plan(req(Firmware.IPXE))
        assert plan.action == BootAction.HOLD and plan.token is None
        assert "waiting for cluster m's first server to register" in plan.reason
        assert plan.retry_seconds > 0
    held = await store.get_machine(str(MAC))
    assert held is not None and held.state == MachineState.ENROLLED and held.token_hash is None
    events = [e for e in await store.list_events(str(MAC)) if e.kind == "hold"]
    assert len(events) == 1 and "first server" in events[0].message
    assert (await boot.explain(str(MAC)))["decision"] == "hold"
    assert "waiting for cluster m" in (await boot.explain(str(MAC)))["reason"]
    # The first server is never held: it forms the cluster.
    splan = await boot.plan(BootRequest(mac=server.mac, firmware=Firmware.IPXE,
                                        arch=Arch.X86_64))
    assert splan.action == BootAction.INSTALL and splan.k3s is not None
    assert splan.k3s.cluster_init
    booted = await store.get_machine(str(server.mac))
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
    await store.create_machine(Machine(mac=MAC, hostname="e", arch=Arch.X86_64))
    result = await boot.explain(str(MAC))
    assert result["group"] == "x86" and result["profile"] == "p"
    assert result["profile_source"] == "group" and result["decision"] == "install"
    assert (await store.get_machine(str(MAC))).state == MachineState.ENROLLED  # type: ignore[union-attr]
    unknown = await boot.explain("52:54:00:99:99:99")
    assert unknown["known"] is False


async def test_reinstalled_init_node_joins_the_running_cluster(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await store.put_cluster(Cluster(name="m", server_url="managed", token="t"))
    first = Machine(mac=MacAddress.parse("52:54:00:00:00:02"), hostname="s1", cluster="m",
                    role=Role.SERVER, profile="p")
    await store.create_machine(first)
    cluster = await store.get_cluster("m")
    assert cluster is not None
    assert (await boot.k3s_join(first, cluster, Role.SERVER, None)).cluster_init
    second = Machine(mac=MacAddress.parse("52:54:00:00:00:03"), hostname="s2", cluster="m",
                     role=Role.SERVER, profile="p", state=MachineState.REGISTERED,
                     ipv4="192.0.2.102")
    await store.create_machine(second)
    again = await boot.k3s_join(first, cluster, Role.SERVER, None)
    assert not again.cluster_init and again.server_url == "https://192.0.2.102:6443"
    # The init node deleted: a new server joins the one that runs, none re-initialises.
    await store.delete_machine(str(first.mac))
    third = Machine(mac=MacAddress.parse("52:54:00:00:00:04"), hostname="s3", cluster="m",
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
    kinds = [e.kind for e in await store.list_events(str(MAC))]
    assert kinds == ["discovered", "hold"]


async def test_install_records_what_the_firmware_told(
        setup: tuple[BootService, MemoryStore, Clock]) -> None:
    boot, store, _ = setup
    await enrolled(store)
    uuid = "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"
    await boot.plan(req(Firmware.IPXE, uuid=uuid, serial="SN7", product="Box",
                        platform="efi"))
    m = await store.get_machine(str(MAC))
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
    m = await store.get_machine(str(MAC))
    assert m is not None and m.state == MachineState.BOOTING and m.token_hash is not None
    assert m.uuid == "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"  # and the DHCP facts are kept
