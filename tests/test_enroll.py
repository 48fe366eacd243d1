"""Bulk import: one transaction, every bad row reported with its line, idempotent, templates."""

from __future__ import annotations

import pytest

from netboot.enroll import Enroller, parse_import, render_hostname
from netboot.errors import ValidationError
from netboot.inventory.memory import MemoryStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Cluster, MacAddress, Machine, Profile

CSV = """mac,hostname,serial,cluster,role,profile,label.rack
52:54:00:00:00:01,edge-1,S1,edge,server,p,r1
52-54-00-00-00-02,,S2,edge,agent,p,r1
5254.0000.0003,edge-3,S3,,,,r2
"""


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    s = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "db.sqlite")
    await s.open()
    await s.put_cluster(Cluster(name="edge", token="t"))
    await s.put_profile(Profile(name="p", kernel="vmlinuz"))
    yield s
    await s.close()


async def test_csv_import_creates_and_is_idempotent(store) -> None:  # type: ignore[no-untyped-def]
    e = Enroller(store, hostname_template="edge-{serial}")
    rows = parse_import(CSV, "csv")
    assert [line for line, _ in rows] == [2, 3, 4]
    dry = await e.import_rows(rows, dry_run=True)
    assert len(dry.created) == 3 and not dry.applied
    assert await store.get_machine("52:54:00:00:00:01") is None
    report = await e.import_rows(rows)
    assert report.applied and len(report.created) == 3 and not report.errors
    m2 = await store.get_machine("52:54:00:00:00:02")
    assert m2 is not None and m2.hostname == "edge-s2"  # from the template
    # Events are written in the same transaction as the machines.
    assert [e.kind for e in await store.list_events("52:54:00:00:00:02")] == ["enrolled"]
    m3 = await store.get_machine("52:54:00:00:00:03")
    assert m3 is not None and m3.labels == {"rack": "r2"}
    again = await e.import_rows(parse_import(CSV, "csv"))
    assert again.created == () and again.changed == () and len(again.unchanged) == 3
    changed = await e.import_rows(parse_import(CSV.replace("S3,,,,r2", "S3,,,,r9"), "csv"))
    assert changed.changed == ("52:54:00:00:00:03",)


async def test_every_bad_row_reported_and_nothing_applied(store) -> None:  # type: ignore[no-untyped-def]
    await store.create_machine(Machine(mac=MacAddress.parse("52:54:00:00:00:99"),
                                       hostname="taken"))
    text = """mac,hostname,cluster,role,profile
52:54:00:00:00:01,ok-1,edge,agent,p
zz:54:00:00:00:02,bad-mac,,,
52:54:00:00:00:03,h3,nocluster,,
52:54:00:00:00:04,h4,,,noprofile
52:54:00:00:00:05,h5,,boss,
52:54:00:00:00:01,dup-mac,,,
52:54:00:00:00:07,ok-1,,,
52:54:00:00:00:08,taken,,,
52:54:00:00:00:09,Bad_Name!,,,
"""
    report = await Enroller(store).import_rows(parse_import(text, "csv"))
    assert not report.applied
    got = [(err.line, err.field) for err in report.errors]
    assert got == [(3, "mac"), (4, "cluster"), (5, "profile"), (6, "role"), (7, "mac"),
                   (8, "hostname"), (9, "hostname"), (10, "hostname")]
    assert "duplicate of line 2" in report.errors[4].message
    assert "52:54:00:00:00:99" in report.errors[6].message
    assert await store.get_machine("52:54:00:00:00:01") is None  # all or nothing


async def test_yaml_and_json_imports_with_lines(store) -> None:  # type: ignore[no-untyped-def]
    yaml_text = "- mac: 52:54:00:00:00:01\n  hostname: a\n  labels: {rack: r1}\n" \
                "- mac: nope\n  hostname: b\n"
    report = await Enroller(store).import_rows(parse_import(yaml_text, "yaml"))
    assert [(e.line, e.field) for e in report.errors] == [(4, "mac")]
    json_text = '{"machines": [{"mac": "52:54:00:00:00:01", "hostname": "a", "colour": "x"}]}'
    report = await Enroller(store).import_rows(parse_import(json_text, "json"))
    assert [(e.line, e.field) for e in report.errors] == [(1, "colour")]


def test_parse_errors() -> None:
    with pytest.raises(ValidationError, match="format"):
        parse_import("", "xml")
    with pytest.raises(ValidationError):
        parse_import("{", "json")
    with pytest.raises(ValidationError, match="list"):
        parse_import("a: 1\n", "yaml")
    with pytest.raises(ValidationError, match="key=value"):
        parse_import("mac,labels\n52:54:00:00:00:01,rack\n", "csv")


def test_hostname_templates() -> None:
    m = Machine(mac=MacAddress.parse("52:54:00:ab:cd:ef"), serial="SN 42", cluster="line-3")
    assert render_hostname("edge-{serial}", m) == "edge-sn-42"
    assert render_hostname("{cluster}-{mac_suffix}", m) == "line-3-abcdef"
    with pytest.raises(ValidationError, match="hostname_template"):
        render_hostname("{nope}", m)


async def test_large_import_in_one_batch(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = SqliteStore(tmp_path / "big.sqlite")
    await store.open()
    try:
        rows = [(i + 2, {"mac": f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"})
                for i in range(5000)]
        report = await Enroller(store, hostname_template="n-{mac_hexraw}").import_rows(rows)
        assert report.applied and len(report.created) == 5000
        assert await store.count_machines() == 5000
    finally:
        await store.close()


async def test_group_hostname_template_names_new_machines(store) -> None:  # type: ignore[no-untyped-def]
    from netboot.model import Group

    await store.put_group(Group(name="rack7", selector={"mac": ("02:00:00:07:*",)},
                                hostname_template="r7-{serial}"))
    e = Enroller(store, hostname_template="node-{mac_suffix}")
    rows = [(2, {"mac": "02:00:00:07:00:01", "serial": "A1"}),
            (3, {"mac": "02:00:00:08:00:01", "serial": "B1"})]
    report = await e.import_rows(rows)
    assert report.applied
    assert (await store.get_machine("02:00:00:07:00:01")).hostname == "r7-a1"
    assert (await store.get_machine("02:00:00:08:00:01")).hostname == "node-080001"
    m = Machine(mac=MacAddress.parse("02:00:00:07:00:02"), serial="A2")
    assert await e.name_for(m) == "r7-a2"


async def test_register_keeps_the_peer_over_a_claimed_loopback(store) -> None:  # type: ignore[no-untyped-def]
    """k3OS's `hostname -i` says 127.0.1.1 (and a user may claim 127.0.0.1); the request came
    from 192.0.2.60 on the provisioning network, which is what other nodes reach."""
    import hashlib
    import ipaddress

    from netboot.model import MachineState

    mac = MacAddress.parse("52:54:00:00:00:09")
    await store.create_machine(Machine(
        mac=mac, hostname="s1", state=MachineState.INSTALLED, cluster="edge",
        token_hash=hashlib.sha256(b"tok").hexdigest(), token_expires=None))
    enroller = Enroller(store, clock=lambda: 1000.0)
    peer = ipaddress.ip_address("192.0.2.60")
    body = {"mac": str(mac), "token": "tok", "addresses": ["127.0.0.1", "127.0.1.1", "nope"]}
    registered = await enroller.register(body, peer)
    assert registered.state == MachineState.REGISTERED and registered.ipv4 == "192.0.2.60"
    stored = await store.get_machine(str(mac))
    assert stored is not None and stored.ipv4 == "192.0.2.60"
    event = (await store.list_events(str(mac)))[-1]
    assert event.kind == "registered" and "192.0.2.60 (the request)" in event.message
    assert [(r["address"], r["reason"]) for r in event.data["refused"]] == [
        ("127.0.0.1", "loopback"), ("127.0.1.1", "loopback"), ("nope", "not an IP address")]
    # A loopback peer and only loopback claims: nothing usable, nothing stored, and an
    # earlier good address is kept rather than replaced by 127.0.1.1.
    again = await enroller.register({**body, "addresses": ["127.0.1.1"]},
                                    ipaddress.ip_address("127.0.0.1"))
    assert again.ipv4 == "192.0.2.60"
    # A global IPv6 peer keeps ipv4 meaning IPv4, and is recorded beside it.
    v6 = await enroller.register({**body, "addresses": []}, ipaddress.ip_address("2001:db8::9"))
    assert v6.ipv4 == "192.0.2.60" and v6.facts["ipv6"] == "2001:db8::9"
