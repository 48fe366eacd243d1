"""netboot.standing: what stands that the operator must fix, said once and shown (s43-ops)."""

from __future__ import annotations

import pytest

from netboot.model import Cluster, Group, MacAddress, Machine, MachineState
from netboot.standing import (
    CLOCK_BEHIND_TOLD,
    Standing,
    claimable_groups,
    clock_behind,
    clusters_alike,
    every_interface,
    from_store,
    newest,
    older_notice,
)


async def test_clusters_named_alike_but_for_case_already_stored_are_told_at_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """Clusters differing only by case stored before the 409 (s41-attack's leftover) were
    kept with nothing said, their nodes still sent to one DNS name answering the servers of
    both: start-up names them and the fix (once: a look again at the same says nothing more;
    gone once fixed); a store without such names says nothing."""
    standing = Standing()
    caplog.clear()
    standing.set("clusters-alike", clusters_alike(["edge", "edge2", "core"]))
    assert not caplog.records and standing.as_list() == [] and standing.version == 0
    alike = ["edge", "edge2", "core", "Edge", "EDGE2"]  # written as an older netboot took them
    standing.set("clusters-alike", clusters_alike(alike))
    standing.set("clusters-alike", clusters_alike(reversed(alike)))  # the same: not again
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 2, told
    assert told[0].startswith("clusters Edge, edge are named alike but for case")
    assert "edge.<zone>" in told[0] and "netboot clusters rm NAME" in told[0]
    assert told[1].startswith("clusters EDGE2, edge2 ")
    shown = standing.as_list()
    assert [(w["kind"], w["refs"], w["message"]) for w in shown] == [
        ("clusters-alike", ["Edge", "edge"], told[0]), ("clusters-alike", ["EDGE2", "edge2"],
                                                       told[1])]
    version = standing.version
    standing.set("clusters-alike", clusters_alike(["edge", "edge2", "core"]))  # fixed
    assert standing.as_list() == [] and standing.version > version


def test_a_clock_behind_the_inventorys_newest_change_is_told_at_start(
        caplog: pytest.LogCaptureFixture) -> None:
    """A server started before its clock was set (a board without a real-time clock, NTP not
    synced) issued install tokens that expired once the clock stepped forward and stamped
    events in the past, with nothing said (s41-attack's leftover): start-up tells it when
    the clock is behind the newest change it loaded; a clock in step says nothing."""
    now = 1_800_000_000.0
    machines = [Machine(macs=(MacAddress.parse(f"52:54:00:00:43:0{i}"),), updated=now - i)
                for i in range(3)]
    last = newest(machines)
    assert last is machines[0] and newest([]) is None
    assert clock_behind(last, now) is None
    assert clock_behind(last, now + 3600) is None  # a server stopped an hour: nothing
    assert clock_behind(None, now) is None
    told = clock_behind(last, now - CLOCK_BEHIND_TOLD - 86400)
    assert told is not None and told.kind == "clock-behind"
    assert "behind the inventory's newest change" in told.text
    assert "52:54:00:00:43:00" in told.text and "time-sync.target" in told.text
    standing = Standing()
    caplog.clear()
    standing.set("clock-behind", [told])
    assert [r.getMessage() for r in caplog.records] == [told.text]
    standing.set("clock-behind", [clock_behind(last, now)])  # set since: gone
    assert standing.as_list() == []


def test_older_registrations_are_named_with_the_fix_five_at_most() -> None:
    """The machines an older register command registered: counted, five named, the fix; live
    ones say a server still runs an older version."""
    older = [Machine(hostname=f"older-{i}", state=MachineState.REGISTERED) for i in range(7)]
    assert older_notice([]) is None
    notice = older_notice(older)
    assert notice is not None and notice.refs == tuple(f"older-{i}" for i in range(7))
    assert notice.text.startswith("7 registered machines were registered by an older")
    assert "older-4, ..." in notice.text and "older-5" not in notice.text
    assert "netboot machines reinstall REF" in notice.text and "just now" not in notice.text
    live = older_notice(older[:1], live=True)
    assert live is not None and "just now" in live.text and "older-0)" in live.text


async def test_the_cli_reads_what_stands_from_the_inventory() -> None:
    """``netboot status`` has no server to ask: the same notices from the store."""
    from netboot.inventory.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    standing = Standing(told=False)
    await from_store(store, 1_800_000_000.0, standing)
    assert standing.as_list() == []
    for name in ("edge", "Edge"):
        await store.put_cluster(Cluster(name=name), create=True)
    await store.create_machine(Machine(hostname="older-1", state=MachineState.REGISTERED,
                                       macs=(MacAddress.parse("52:54:00:00:43:09"),),
                                       updated=1_800_000_000.0))
    await store.create_machine(Machine(hostname="new-1", state=MachineState.REGISTERED,
                                       secret_hash="00" * 32, updated=1_700_000_000.0))
    await from_store(store, 1_700_000_000.0, standing)
    assert [(n["kind"], n["refs"]) for n in standing.as_list()] == [
        ("clock-behind", ["52:54:00:00:43:09"]), ("clusters-alike", ["Edge", "edge"]),
        ("older-registrations", ["older-1"])]


def test_dhcp_on_every_interface_of_a_multi_homed_host_is_told_with_the_fix() -> None:
    """No interface named: DHCP answers on each interface with an IPv4 address. Where there
    are two or more, the notice names each (its first address) and the fix, --interface and
    http.listen (s44-attack); one interface, or DHCP off, is nothing to tell."""
    told = every_interface([("eth0", "10.0.0.5"), ("eth1", "192.0.2.10"),
                            ("eth1", "192.0.2.11")], "proxy", "0.0.0.0")
    assert told is not None and told.kind == "every-interface"
    assert told.refs == ("eth0", "eth1")
    assert "eth0 (10.0.0.5), eth1 (192.0.2.10)," in told.text, told.text
    assert "--interface eth0" in told.text and "http.listen" in told.text, told.text
    assert every_interface([("eth0", "10.0.0.5"), ("eth0", "10.0.0.6")], "proxy",
                           "0.0.0.0") is None
    assert every_interface([("eth0", "10.0.0.5"), ("eth1", "192.0.2.10")], "off",
                           "0.0.0.0") is None


def test_groups_giving_clusters_on_claimable_strings_alone_are_told() -> None:
    """Two groups selecting on firmware strings a request tells (product, arch...) and
    giving different clusters: a host that knows an enrolled machine's MAC picks the one
    whose join token it wants (s43-attack, on the wire). Told, naming them and the fix;
    not where a selector has a key the operator sets (a label, the MAC), nor where one
    cluster is given, nor by groups that give none (s44-attack)."""
    prod = Group("gprod", {"product": ("ProdBox",)}, profile="p", cluster="ca")
    lab = Group("glab", {"product": ("LabBox",), "arch": ("x86_64",)}, cluster="cb")
    told = claimable_groups([prod, lab])
    assert told is not None and told.kind == "claimable-groups"
    assert told.refs == ("gprod", "glab")
    assert "gprod (product -> ca), glab (arch, product -> cb)" in told.text, told.text
    assert "--cluster NAME" in told.text and "--selector rack=r1" in told.text, told.text
    racked = Group("glab", {"product": ("LabBox",), "rack": ("r2",)}, cluster="cb")
    assert claimable_groups([prod, racked]) is None
    assert claimable_groups([prod, Group("gm", {"mac": ("52:54:00:*",)}, cluster="cb")]) \
        is None
    assert claimable_groups([prod, Group("g2", {"arch": ("arm64",)}, cluster="ca")]) is None
    assert claimable_groups([prod, Group("g3", {"arch": ("arm64",)}, profile="p")]) is None


def test_every_notice_kind_is_one_the_documents_status_names() -> None:
    """GET /status's ``warnings`` kinds are an enum in the OpenAPI document: a kind made here
    but missing there is a response a client validating against the document refuses (the
    two of s44-attack were)."""
    import re
    from pathlib import Path

    from netboot import service, standing
    from netboot.openapi import document

    made: set[str] = set()
    for module in (standing, service):
        text = Path(str(module.__file__)).with_suffix(".py").read_text()
        made |= set(re.findall(r'(?:Notice|\.set)\(\s*"([a-z0-9-]+)"', text))
    enums: list[list[str]] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            warnings = node.get("warnings")
            # /status's notices (objects with a kind); a machine's ``warnings`` are plain
            # sentences (s48-review's rename warning), not notices.
            kinds = warnings.get("items", {}).get("properties", {}).get("kind") \
                if isinstance(warnings, dict) else None
            if kinds is not None:
                enums.append(kinds["enum"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document())
    assert enums and "claimable-groups" in made and "every-interface" in made, (enums, made)
    for enum in enums:
        assert made <= set(enum), made - set(enum)
