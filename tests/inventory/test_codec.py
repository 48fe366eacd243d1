"""The JSON codec: plain JSON out, strict parsing in, every error naming its field."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.errors import ValidationError
from netboot.identity import claims
from netboot.inventory import codec
from netboot.inventory.base import MachineFilter
from netboot.model import (
    Arch,
    Asset,
    Cluster,
    Event,
    Firmware,
    Group,
    Lease,
    LoaderChain,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    machine_of_values,
)

MAC = "aa:bb:cc:dd:ee:ff"

MACHINE = Machine(
    macs=(MacAddress.parse(MAC),),
    state=MachineState.REGISTERED,
    hostname="n1",
    uuid="4c4c4544-0042-3510-8052-b2c04f4e3032",
    labels={"rack": "r1"},
    role=Role.SERVER,
    arch=Arch.X86_64,
    firmware=Firmware.UEFI,
    ipv4="10.0.0.1",
    facts={"vendor": "x"},
    token_hash="ff" * 32,
    token_expires=10.0,
    created=1.0,
    updated=2.0,
)


def test_machine_to_dict_is_plain_json() -> None:
    d = codec.machine_to_dict(MACHINE)
    assert d["macs"] == [MAC] and d["id"] == MACHINE.id
    assert d["state"] == "registered" and type(d["state"]) is str
    assert d["role"] == "server" and type(d["role"]) is str
    assert d["arch"] == "x86_64" and d["firmware"] == "uefi"
    assert d["labels"] == {"rack": "r1"} and type(d["labels"]) is dict
    assert d["serial"] is None
    assert set(d) == {f for f in Machine.__dataclass_fields__}
    assert json.loads(json.dumps(d)) == d


def test_secrets_left_out_on_request() -> None:
    assert "token_hash" not in codec.machine_to_dict(MACHINE, secrets=False)
    cluster = Cluster(name="c", token="s3cret")
    assert "token" not in codec.cluster_to_dict(cluster, secrets=False)
    assert codec.cluster_to_dict(cluster)["token"] == "s3cret"


def test_profile_to_dict_lists() -> None:
    p = Profile(name="p", kernel="k", initrds=("a", "b"), assets=(Asset("a", "00"),))
    d = codec.profile_to_dict(p)
    assert d["initrds"] == ["a", "b"] and d["assets"] == [{"path": "a", "sha256": "00"}]


def test_the_stored_text_of_a_profile_or_group_is_its_dict_and_what_a_read_refuses_is_refused(
        ) -> None:
    # profile_json/group_json: what sqlite.py's and postgres.py's puts store; a value its
    # own read would refuse never reaches the database.
    p = Profile(name="p", kernel="k", initrds=("a",), assets=(Asset("a", "00"),))
    assert json.loads(codec.profile_json(p)) == codec.profile_to_dict(p)
    assert codec.profile_from_dict(json.loads(codec.profile_json(p))) == p
    g = Group(name="g", selector={"arch": ("x86_64",)}, profile="p")
    assert json.loads(codec.group_json(g)) == codec.group_to_dict(g)
    assert codec.group_from_dict(json.loads(codec.group_json(g))) == g
    for refused, field in ((lambda: codec.profile_json(Profile(name="p", kernel="")), "kernel"),
                           (lambda: codec.group_json(Group(name="")), "name")):
        with pytest.raises(ValidationError) as err:
            refused()
        assert err.value.field == field


@pytest.mark.parametrize(
    ("to_dict", "from_dict", "value"),
    [
        (codec.machine_to_dict, codec.machine_from_dict, MACHINE),
        (codec.machine_to_dict, codec.machine_from_dict, Machine(macs=(MacAddress.parse(MAC),))),
        (
            codec.profile_to_dict,
            codec.profile_from_dict,
            Profile(
                name="p",
                kernel="k",
                initrds=("i",),
                assets=(Asset("k", "ab"), Asset("i")),
                iso_url="http://x/iso",
                ssh_authorized_keys=("ssh-ed25519 A",),
            ),
        ),
        (
            codec.cluster_to_dict,
            codec.cluster_from_dict,
            Cluster(name="c", labels={"a": "b"}, taints=("t",)),
        ),
        (
            codec.cluster_to_dict,
            codec.cluster_from_dict,
            Cluster(name="c", endpoint="https://[2001:db8::10]:7443"),
        ),
        (
            codec.group_to_dict,
            codec.group_from_dict,
            Group(name="g", selector={"arch": ("arm64", "x86_64")}, role=Role.AGENT),
        ),
        (
            codec.event_to_dict,
            codec.event_from_dict,
            Event(machine="m-0123456789ab", time=1.0, kind="k", data={"a": [1]}),
        ),
        (codec.lease_to_dict, codec.lease_from_dict, Lease(mac=MAC, ipv4="10.0.0.1", expires=3.0)),
    ],
)
def test_round_trip_through_json_text(
    to_dict: Callable[[Any], dict[str, Any]], from_dict: Callable[[object], Any], value: object
) -> None:
    assert from_dict(json.loads(json.dumps(to_dict(value)))) == value


def test_from_dict_minimal_and_normalising() -> None:
    m = codec.machine_from_dict({"id": "m-1", "macs": ["AA-BB-CC-DD-EE-FF", "aabb.ccdd.ee00"]})
    assert m == Machine(id="m-1", macs=(MacAddress.parse(MAC),
                                        MacAddress.parse("aa:bb:cc:dd:ee:00")))
    assert m.mac == MacAddress.parse(MAC) and m.ref == MAC
    # Nothing is required: a machine enrolled by serial has no NIC yet, and gets an id.
    bare = codec.machine_from_dict({"serial": "SN1"})
    assert bare.macs == () and bare.mac is None and bare.id.startswith("m-")
    assert bare.ref == bare.id
    assert codec.event_from_dict({"machine": "m-1", "time": 1, "kind": "k"}).machine == "m-1"
    assert codec.machine_from_dict({"macs": [MAC], "created": 5}).created == 5.0


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ("not an object", "machine"),
        ([], "machine"),
        ({"mac": MAC}, "mac"),  # the stored form is "macs"
        ({"macs": None}, "macs"),
        ({"macs": MAC}, "macs"),
        ({"macs": [12]}, "macs[0]"),
        ({"macs": [MAC, "zz:bb:cc:dd:ee:ff"]}, "macs[1]"),
        ({"macs": [MAC, MAC.upper()]}, "macs[1]"),  # the same NIC twice
        ({"id": ""}, "id"),
        ({"id": 5}, "id"),
        ({"macs": [MAC], "colour": "red"}, "colour"),  # unknown
        ({"macs": [MAC], "state": "sleeping"}, "state"),
        ({"macs": [MAC], "state": None}, "state"),
        ({"macs": [MAC], "state": 3}, "state"),
        ({"macs": [MAC], "hostname": 5}, "hostname"),
        ({"macs": [MAC], "labels": ["a"]}, "labels"),
        ({"macs": [MAC], "labels": {"rack": 1}}, "labels.rack"),
        ({"macs": [MAC], "facts": {"x": None}}, "facts.x"),
        ({"macs": [MAC], "role": "master"}, "role"),
        ({"macs": [MAC], "arch": "sparc"}, "arch"),
        ({"macs": [MAC], "firmware": True}, "firmware"),
        ({"macs": [MAC], "ipv4": "10.0.0"}, "ipv4"),
        ({"macs": [MAC], "fixed_ipv4": "fe80::1"}, "fixed_ipv4"),
        ({"macs": [MAC], "token_expires": "soon"}, "token_expires"),
        ({"macs": [MAC], "created": True}, "created"),
        ({"macs": [MAC], "updated": float("nan")}, "updated"),
    ],
)
def test_machine_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.machine_from_dict(data)
    assert err.value.field == field


def test_unknown_fields_all_listed() -> None:
    with pytest.raises(ValidationError) as err:
        codec.machine_from_dict({"macs": [MAC], "zeta": 1, "alpha": 2})
    assert err.value.field == "alpha"
    assert "'alpha'" in err.value.message and "'zeta'" in err.value.message


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"kernel": "k"}, "name"),
        ({"name": "p"}, "kernel"),
        ({"name": "", "kernel": "k"}, "name"),
        ({"name": "p", "kernel": "k", "initrds": "one"}, "initrds"),
        ({"name": "p", "kernel": "k", "initrds": ["a", 2]}, "initrds[1]"),
        ({"name": "p", "kernel": "k", "assets": {}}, "assets"),
        ({"name": "p", "kernel": "k", "assets": ["x"]}, "assets[0]"),
        (
            {"name": "p", "kernel": "k", "assets": [{"path": "a"}, {"sha256": "00"}]},
            "assets[1].path",
        ),
        ({"name": "p", "kernel": "k", "assets": [{"path": "a", "size": 1}]}, "assets[0].size"),
        ({"name": "p", "kernel": "k", "cmdline": None}, "cmdline"),
        ({"name": "p", "kernel": "k", "iso_url": 1}, "iso_url"),
        ({"name": "p", "kernel": "k", "bogus": 1}, "bogus"),
    ],
)
def test_profile_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.profile_from_dict(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "name"),
        ({"name": "c", "token": 5}, "token"),
        ({"name": "c", "labels": {"a": 1}}, "labels.a"),
        ({"name": "c", "taints": [None]}, "taints[0]"),
        ({"name": "c", "nodes": 3}, "nodes"),
    ],
)
def test_cluster_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.cluster_from_dict(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "name"),
        ({"name": "g", "selector": ["arch"]}, "selector"),
        ({"name": "g", "selector": {"arch": "arm64"}}, "selector.arch"),
        ({"name": "g", "selector": {"arch": ["arm64", 1]}}, "selector.arch[1]"),
        ({"name": "g", "role": "boss"}, "role"),
        ({"name": "g", "priority": 1}, "priority"),
    ],
)
def test_group_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.group_from_dict(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"time": 1, "kind": "k"}, "machine"),
        ({"machine": "", "time": 1, "kind": "k"}, "machine"),
        ({"machine": "m-1", "kind": "k"}, "time"),
        ({"machine": "m-1", "time": "1", "kind": "k"}, "time"),
        ({"machine": "m-1", "time": 1}, "kind"),
        ({"machine": "m-1", "time": 1, "kind": "k", "data": []}, "data"),
        ({"machine": "m-1", "time": 1, "kind": "k", "data": {"x": float("inf")}}, "data"),
        ({"machine": "m-1", "time": 1, "kind": "k", "level": "info"}, "level"),
    ],
)
def test_event_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.event_from_dict(data)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"ipv4": "10.0.0.1", "expires": 1}, "mac"),
        ({"mac": MAC, "expires": 1}, "ipv4"),
        ({"mac": MAC, "ipv4": "10.0.0.300", "expires": 1}, "ipv4"),
        ({"mac": MAC, "ipv4": "10.0.0.1"}, "expires"),
        ({"mac": MAC, "ipv4": "10.0.0.1", "expires": None}, "expires"),
        ({"mac": MAC, "ipv4": "10.0.0.1", "expires": 1, "hostname": 1}, "hostname"),
    ],
)
def test_lease_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.lease_from_dict(data)
    assert err.value.field == field


def test_dumps_refuses_what_json_cannot_hold() -> None:
    assert codec.dumps({"a": "é"}) == '{"a":"é"}'
    with pytest.raises(ValidationError) as err:
        codec.dumps({"a": float("nan")}, "data")
    assert err.value.field == "data"


def test_check_filter() -> None:
    codec.check_filter(MachineFilter(limit=0, offset=0))
    with pytest.raises(ValidationError) as err:
        codec.check_filter(MachineFilter(offset=-5))
    assert err.value.field == "offset"


# --- what a store keeps of a machine ----------------------------------------------------------


def test_stored_machine_is_the_machine_when_it_reads_back_as_it_is() -> None:
    assert codec.stored_machine(MACHINE) is MACHINE


@pytest.mark.parametrize(("change", "field"), [
    ({"labels": {"rack": 7}}, "labels.rack"),
    ({"fixed_ipv4": "999.1.1.1"}, "fixed_ipv4"),
    ({"created": float("nan")}, "created"),
    ({"id": "m-a/b"}, "id"),
    ({"macs": (MacAddress.parse(MAC), MacAddress.parse(MAC))}, "macs[1]"),
])
def test_stored_machine_refuses_what_would_not_read_back(change: dict[str, Any],
                                                         field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.stored_machine(replace(MACHINE, **change))
    assert err.value.field == field


class _Text(str):
    """A string of another type: written the same, read back as a str."""


@pytest.mark.parametrize("change", [
    *({field: _Text("x-1")} for field in ("hostname", "uuid", "serial", "asset", "cluster",
                                          "profile", "token_hash", "install_token")),
    {"labels": {_Text("k"): "v"}}, {"labels": {"k": _Text("v")}},
    {"facts": {_Text("k"): "v"}}, {"facts": {"k": _Text("v")}},
    {"ipv4": _Text("192.0.2.1")}, {"fixed_ipv4": _Text("192.0.2.1")},
    {"created": 5}, {"updated": 6}, {"token_expires": 7},
])
def test_stored_machine_copies_a_field_that_would_read_back_otherwise(
        change: dict[str, Any]) -> None:
    # Each field's check (codec._exact, written out field by field): a machine with a value
    # of another type or spelling is not kept as it is but taken through the round trip.
    odd = replace(MACHINE, **change)
    got = codec.stored_machine(odd)
    assert got is not odd
    assert got == codec.machine_from_dict(codec.machine_to_dict(odd))


@pytest.mark.parametrize("field", ["created", "updated", "token_expires"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_stored_machine_refuses_a_time_that_is_not_finite(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as err:
        codec.stored_machine(replace(MACHINE, **{field: value}))
    assert err.value.field == field


def test_stored_machine_normalises_like_the_round_trip() -> None:
    odd = replace(MACHINE, created=5)
    got = codec.stored_machine(odd)
    assert got == codec.machine_from_dict(codec.machine_to_dict(odd))
    assert type(got.created) is float


def test_document_leaves_out_defaults_and_reads_back_the_same() -> None:
    bare = Machine(macs=(MacAddress.parse(MAC),), id="m-1", created=1.0, updated=2.0)
    assert codec.machine_document(bare) == {"id": "m-1", "macs": [MAC], "state": "enrolled",
                                            "created": 1.0, "updated": 2.0}
    for m in (bare, MACHINE):
        doc = json.loads(codec.dumps(codec.machine_document(m)))
        assert codec.machine_from_document(doc) == m == codec.machine_from_dict(doc)
        full = json.loads(codec.dumps(codec.machine_to_dict(m)))
        assert codec.machine_from_document(full) == m


@pytest.mark.parametrize("change", [
    {},
    {"macs": (), "state": MachineState.ENROLLED, "labels": {}, "facts": {}, "uuid": None,
     "role": None, "arch": None, "firmware": None, "ipv4": None, "token_hash": None,
     "token_expires": None},
    {"macs": (MacAddress.parse(MAC), MacAddress.parse("02:00:00:00:00:01"))},
    # What JSON must quote or escape, and text beyond ASCII (kept as it is, not \u-escaped).
    {"hostname": 'a"b\\c', "labels": {"k\n\t": "v\u00e9\u2028", "\u00fc": "\x00\x1f"},
     "facts": {"product": "\U0001f600 \"x\""}, "serial": "s/1", "asset": "</script>"},
    {"cluster": "c", "profile": "p", "install_token": "tok", "loader": LoaderChain.IPXE,
     "fixed_ipv4": "10.0.0.9", "created": 1e-7, "updated": 1.7e300, "token_expires": -0.0},
    {"created": 1700000000.123456789, "updated": 0.1 + 0.2},
    # Facts under the keys whose quoted text is looked up (codec._QUOTED_KEYS), in any
    # order, beside keys that are not, and values JSON must escape (s34-writer).
    {"facts": {"install_peer": "192.0.2.7", "arch": "x86_64", "firmware": "efi"}},
    {"facts": {"zz": "1", "product": 'a"b', "install_peer": "\\", "k\n": "v",
               "remote_addr": "\u00e9", "ipv6": "2001:db8::1", "manufacturer": "\x7f",
               "dhcp_hostname": "", "platform": "p", "relay": "r", "interface": "i",
               "uuid": "u", "serial": "s", "asset": "a", "via": "http", "mac": "m",
               "peer": "x", "": "empty key"}},
])
def test_machine_json_is_the_documents_text(change: dict[str, Any]) -> None:
    # The bulk path writes this text directly; it must be what dumps() makes of the document.
    m = replace(MACHINE, **change)
    assert codec.stored_machine(m) is m
    assert codec.machine_json(m) == codec.dumps(codec.machine_document(m))
    assert codec.machine_from_document(codec.loads_document(codec.machine_json(m))) == m


def test_machine_json_with_shared_times_is_the_same_text() -> None:
    # A group commit's rows share one dict of creation times' texts: each text is the one
    # the time alone gives, whatever came before it (0.0 and -0.0: equal keys, not text).
    times: dict[float, str] = {}
    machines = [replace(MACHINE, created=c, updated=u) for c, u in [
        (1796442092.472269, 1796442248.9700117), (1796442092.472269, 1796442249.269776),
        (0.0, 1796442092.472269), (-0.0, 0.0), (0.0, -0.0), (1e16, 1.5e-7),
        (1796442248.9700117, 1796442092.472269)]]
    for m in machines:
        assert codec.stored_machine(m) is m
        text = codec.machine_json(m, None, times)
        assert text == codec.machine_json(m) == codec.dumps(codec.machine_document(m))
    assert times == {m.created: repr(m.created) for m in machines if m.created}


def test_machine_json_writes_the_expiry_from_the_update_times_text() -> None:
    # An expiry a whole number of seconds after the update time, within 2**30 .. 2**31, is
    # written from the update time's text: each text is repr's, on random doubles of that
    # binade (and a whole number of seconds after them) and on its edges, beside pairs the
    # rule must leave to repr (other binades, a fraction of a second apart, the wrong order;
    # the last pair crosses into the next binade, whose repr is a digit shorter).
    import random
    import struct

    draw = random.Random(30)
    low, high = 2.0 ** 30, 2.0 ** 31
    pairs = [(low + 2.0 ** -22, low + 2.0 ** -22 + 1), (high - 3600.5, high - 0.5),
             (high - 2.0 ** -22 - 7, high - 2.0 ** -22), (1796471103.0, 1796474703.0),
             (1796471103.9999998, 1796474703.9999998), (high - 1, high + 3599),
             (low - 1, low + 3599), (2.0, 10.0), (3e9 + 0.1, 3e9 + 3600.1),
             (1796471103.5, 1796471103.75), (1796474703.7693584, 1796471103.7693584),
             (1e16, 1e16 + 2.0), (2147483647.0000029, 2147487247.000003)]
    for _ in range(20_000):
        u = struct.unpack("<d", struct.pack("<Q", (0x41D << 52) | draw.getrandbits(52)))[0]
        k = draw.choice((3600, 86400, 0, 1, draw.randrange(10 ** 7)))
        if u + k < high:
            pairs.append((u, u + k))
    for updated, expires in pairs:
        m = replace(MACHINE, updated=updated, token_expires=expires)
        assert codec.stored_machine(m) is m
        assert codec.machine_json(m) == codec.dumps(codec.machine_document(m)), (updated,
                                                                                  expires)


def test_claims_json_is_what_sqlite_extracts_of_the_machines_text() -> None:
    # The store's writer compares this text with json_extract's of the stored document.
    import sqlite3

    conn = sqlite3.connect(":memory:")
    machines = [
        MACHINE, replace(MACHINE, labels={}, uuid=None, facts={}),
        replace(MACHINE, labels={"k": 'v"\\', "\u00fc": "\u00df\n\t\x01", "}": "],"},
                uuid="u\"1", serial="s/1\u00e9", asset="</script>"),
        replace(MACHINE, id='m-],"state":"x",\\"macs":[', macs=()),
        replace(MACHINE, macs=tuple(MacAddress.parse(f"52:54:00:00:00:0{i}") for i in range(3)),
                labels={"a": "1", "b": "2"}, serial="", asset="a")]
    for m in machines:
        assert codec.stored_machine(m) is m
        text = codec.machine_json(m, "sealed-token")
        (extracted,) = conn.execute("SELECT json_extract(?, '$.labels', '$.macs', '$.uuid',"
                                    " '$.serial', '$.asset')", (text,)).fetchone()
        assert codec.claims_json(m, text) == extracted
        assert codec.same_claims(extracted, m) == (True, True)
        # The writer's one pass makes both texts (_Row): the same two.
        assert codec.machine_texts(m, "sealed-token") == (text, extracted)
        assert codec.machine_texts(m, "sealed-token", {}) == (text, extracted)
        assert codec.machine_texts(m, "sealed-token", claims=False) == (text, "")
    conn.close()


def test_stored_claims_spelled_otherwise_are_compared_by_value() -> None:
    # A document another writer spelled otherwise (spaces, another order of keys, escapes
    # where none are needed): its text is not the new one's, its values are compared.
    m = replace(MACHINE, labels={"rack": "r1", "k": "v"}, serial="s1", asset=None)
    other = f'[{{"k":"\\u0076","rack":"r1"}}, ["{MAC}"], "{m.uuid}", "s1", null]'
    assert other != codec.claims_json(m, codec.machine_json(m))
    assert codec.same_claims(other, m) == (True, True)
    assert codec.same_claims(other.replace('"r1"', '"r2"'), m) == (False, True)
    assert codec.same_claims(other.replace('"s1"', '"s2"'), m) == (True, False)
    assert codec.same_claims(other.replace(f'"{MAC}"', '"AA:BB:CC:DD:EE:FF"'), m) == (True,
                                                                                       False)
    assert codec.same_claims(other.replace("null]", '"a"]'), m) == (True, False)
    bare = replace(m, labels={})
    for labels in ("null", "{}"):
        assert codec.same_claims(f'[{labels},["{MAC}"],"{m.uuid}","s1",null]', bare) == (
            True, True)
    for odd in (None, 7, "", "[", "{}", "[1,2]"):  # not the array: unsure
        assert codec.same_claims(odd, m) == (False, False)


@pytest.mark.parametrize("change", [
    {"macs": ["AA-BB-CC-DD-EE-FF"]},  # another spelling: normalised by the strict parse
    {"created": 3},
])
def test_document_decoder_hands_the_unusual_to_the_strict_parse(change: dict[str, Any]) -> None:
    doc = {**codec.machine_to_dict(MACHINE), **change}
    assert codec.machine_from_document(doc) == codec.machine_from_dict(doc)


@pytest.mark.parametrize(("change", "field"), [
    ({"labels": {"rack": 7}}, "labels.rack"),
    ({"created": None}, "created"),
    ({"state": "sleeping"}, "state"),
    ({"colour": "red"}, "colour"),
    ({"macs": ["nope"]}, "macs[0]"),
])
def test_document_decoder_names_what_it_refuses(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        codec.machine_from_document({**codec.machine_to_dict(MACHINE), **change})
    assert err.value.field == field


def test_document_decoder_shares_repeated_names() -> None:
    docs = [json.loads(codec.dumps(codec.machine_document(replace(MACHINE, id=f"m-{i}"))))
            for i in range(2)]
    a, b = (codec.machine_from_document(d) for d in docs)
    assert a.labels["rack"] is b.labels["rack"]


def test_machines_without_labels_share_one_read_only_mapping() -> None:
    bare = Machine(macs=(MacAddress.parse(MAC),), id="m-1", created=1.0, updated=2.0)
    a, b = (codec.machine_from_document(codec.machine_document(bare)) for _ in range(2))
    assert a.labels is b.labels is a.facts is codec.NO_ENTRIES
    assert a == bare and codec.stored_machine(a) is a
    with pytest.raises(TypeError):
        a.labels["x"] = "y"  # type: ignore[index]


def test_labels_and_identifiers_compared_with_the_stored_documents_parts() -> None:
    # What SQLite's json_extract gives of a stored document's labels and identifiers, as
    # other writers may have spelled them: compared by value.
    m = replace(MACHINE, labels={"rack": "r1", "k": 'v"'}, uuid="u", serial="s", asset=None)
    macs = "[" + ",".join(f'"{mac}"' for mac in m.macs) + "]"

    def claims(labels: str, macs: str = macs, uuid: str = '"u"', serial: str = '"s"',
               asset: str = "null") -> str:
        return f"[{labels},{macs},{uuid},{serial},{asset}]"

    assert codec.same_claims(claims('{"rack":"r1","k":"v\\""}'), m) == (True, True)
    assert codec.same_claims(claims('{"k":"v\\"","rack":"r1"}'), m) == (True, True)  # order
    assert codec.same_claims(claims('{"rack":"r1"}'), m) == (False, True)
    assert codec.same_claims(claims("null"), m) == (False, True)
    bare = replace(m, labels={})
    for absent in ("null", "{}"):
        assert codec.same_claims(claims(absent), bare) == (True, True)
    assert codec.same_claims(claims('{"rack":"r1"}'), bare) == (False, True)
    for odd in ('"x"', "[]", "0", "1.5"):  # not an object
        assert codec.same_claims(claims(odd), bare) == (False, True)
    assert codec.same_claims(claims("null", "null"), bare) == (True, False)
    assert codec.same_claims(claims("null", macs.upper()), bare) == (True, False)
    assert codec.same_claims(claims("null", serial='"s2"'), bare) == (True, False)
    assert codec.same_claims(claims("null", asset='"a"'), bare) == (True, False)
    seven = replace(bare, uuid="7")
    assert codec.same_claims(claims("null", uuid="7"), seven) == (True, False)
    assert codec.same_claims(claims("null", uuid='"7"'), seven) == (True, True)
    bare = replace(bare, macs=(), uuid=None, serial=None)
    assert codec.same_claims("[null,[],null,null,null]", bare) == (True, True)


def test_identifiers_only_added_are_the_rows_to_insert() -> None:
    # A UUID, serial or asset tag where the stored document has none (a first DHCP sighting
    # learns the UUID): the rows identity.claims gives of those, cleaned, and no others; a
    # changed or removed one, or other MACs, is None (every row written again).
    m = replace(MACHINE, labels={}, uuid=None, serial=None, asset=None)
    macs = "[" + ",".join(f'"{mac}"' for mac in m.macs) + "]"

    def stored(uuid: str = "null", serial: str = "null", asset: str = "null") -> str:
        return f"[null,{macs},{uuid},{serial},{asset}]"

    uuid = "0A1B2C3D-0000-4000-8000-00000000000E"  # cleaned: lower case
    assert codec.claims_change(stored(), m) == (True, True, None)
    learnt = replace(m, uuid=uuid, asset=" A1 ")
    assert codec.claims_change(stored(), learnt) == (
        True, False, [("uuid", uuid.lower()), ("asset", "A1")])
    assert codec.claims_change(stored(), learnt) == (
        True, False, [c for c in claims(learnt) if c[0] != "mac"])
    # A stored field kept as it was is not added again; one that changed or went: None.
    assert codec.claims_change(stored(asset='" A1 "'), learnt) == (
        True, False, [("uuid", uuid.lower())])
    assert codec.claims_change(stored(asset='"A2"'), learnt) == (True, False, None)
    assert codec.claims_change(stored(serial='"s"'), learnt) == (True, False, None)
    assert codec.claims_change(stored(uuid="7"), replace(learnt, uuid="7")) == (
        True, False, None)  # not a string as stored: unsure
    assert codec.claims_change("[null,[],null,null,null]", learnt) == (True, False, None)
    # A placeholder claims nothing: no row to add.
    assert codec.claims_change(stored(), replace(m, serial="To be filled by O.E.M.")) == (
        True, False, [])
    # The labels are answered from the same parse.
    assert codec.claims_change(stored(), replace(learnt, labels={"r": "1"}))[:2] == (
        False, False)
    for odd in (None, 7, "", "[", "[1,2]"):
        assert codec.claims_change(odd, learnt) == (False, False, None)


@pytest.mark.parametrize("macs", [(), ("52:54:00:00:00:01",),
                                  ("52:54:00:00:00:01", "52:54:00:00:00:02", "02:00:00:00:00:03")])
@pytest.mark.parametrize("ident", ["m-1", 'm-],"state":"x",\\"macs":[', 'm-,"macs":["a"]'])
def test_identifiers_compared_with_the_mac_array_of_the_machines_own_text(
        macs: tuple[str, ...], ident: str) -> None:
    # The array read from the new document's text, whatever its id holds: as written anew.
    m = replace(MACHINE, id=ident, macs=tuple(MacAddress.parse(a) for a in macs))
    assert codec.stored_machine(m) is m
    text = codec.machine_json(m, "sealed-token")
    written = "[" + ",".join(f'"{a}"' for a in macs) + "]"
    labels = codec.dumps(dict(m.labels))
    assert codec.claims_json(m, text) == f'[{labels},{written},"{m.uuid}",null,null]'


@pytest.mark.parametrize("text", ['{"a":1}', ' {"a": 1} ', '{"a":1}\n'])
def test_loads_document(text: str) -> None:
    assert codec.loads_document(text) == {"a": 1}


def test_loads_document_names_bad_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        codec.loads_document('{"a":')


def test_machine_of_values_is_the_constructor() -> None:
    values = [getattr(MACHINE, f.name) for f in dataclasses.fields(Machine)]
    made = machine_of_values(values)
    # Of the layout the constructor gives (model._two_layouts: MACHINE has seldom-set fields).
    assert made == MACHINE == Machine(*values) and type(made) is type(Machine(*values))
    assert isinstance(made, Machine)
    with pytest.raises(ValueError):
        machine_of_values(values[:-1])  # every field or nothing


# Values a stored document's fields may hold, usual and odd (JSON types, other spellings).
_ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(
    [0.5, float("nan"), float("inf"), "", " ", "x", "c", "enrolled", "registered", "server",
     "agent", "ipxe", "x86_64", "uefi", "10.0.0.1", "010.0.0.1", "AA:BB:CC:DD:EE:FF",
     "02:00:00:00:00:09", "m-1", "m-\t", "m-a/b"]),
    st.lists(st.sampled_from(["02:00:00:00:00:07", "02-00-00-00-00-08", "x", 1]), max_size=3),
    st.dictionaries(st.sampled_from(["k", "rack"]), st.sampled_from(["v", 1, None]),
                    max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(Machine)] + ["colour"]),
                       _ODD, max_size=5))
def test_document_decoder_answers_as_the_strict_parse(change: dict[str, Any]) -> None:
    """Whatever a stored document holds, the one-pass decoder gives the machine the strict
    parse gives, or the strict parse's error naming the field."""
    doc = {**codec.machine_document(MACHINE), **change}
    try:
        expected: Machine | str = codec.machine_from_dict(doc)
    except ValidationError as exc:
        expected = exc.field or ""
    try:
        got: Machine | str = codec.machine_from_document(doc)
    except ValidationError as exc:
        got = exc.field or ""
    if doc.get("id") is None and isinstance(got, Machine) and isinstance(expected, Machine):
        got = replace(got, id=expected.id)  # none stored: each parse makes a new one
    assert got == expected
    if isinstance(got, Machine):
        assert [type(getattr(got, f.name)) for f in dataclasses.fields(Machine)] == [
            type(getattr(expected, f.name)) for f in dataclasses.fields(Machine)]


_ROWS: list[dict[str, Any]] = [
    {},
    {"macs": ()},
    {"macs": (MacAddress.parse("02:00:00:00:00:01"), MacAddress.parse("02:00:00:00:00:02"))},
    {"hostname": "n\u00e9-1", "uuid": "00112233-4455-6677-8899-aabbccddeeff", "serial": 'S"1\\',
     "asset": "A\n1", "cluster": "c", "role": Role.SERVER, "profile": "p",
     "labels": {"rack": "r1", "k\u00e9y": "\u2603 \"q\""}, "fixed_ipv4": "10.0.0.9"},
    {"role": None, "labels": codec.NO_ENTRIES},
]


@pytest.mark.parametrize("change", _ROWS)
def test_new_machines_write_what_their_machines_would(change: dict[str, Any]) -> None:
    # An import's rows are written without a Machine each: the same columns and text as the
    # machine they stand for, which is what reading them as a sequence gives.
    values: dict[str, Any] = {
        "macs": (MacAddress.parse("02:00:00:00:00:09"),), "hostname": "h", "uuid": None,
        "serial": "SN1", "asset": None, "cluster": None, "role": Role.AGENT, "profile": None,
        "labels": {"rack": "r2"}, "fixed_ipv4": None, **change}
    new = codec.NewMachines(MachineState.ENROLLED, 1700000000.25)
    new.add("m-00000000000a", *values.values())
    machine = Machine(id="m-00000000000a", state=MachineState.ENROLLED, facts=codec.NO_ENTRIES,
                      created=1700000000.25, updated=1700000000.25, **values)
    assert list(new) == [machine] and new[0] == machine and new[:1] == [machine]
    assert codec.stored_machine(machine) is machine
    assert list(new.columns()) == [codec.bulk_columns(machine)]
    assert list(new.refs()) == [machine.ref] and list(new.ids()) == [machine.id]


def test_new_machines_renamed_and_merged_ones_kept_in_order() -> None:
    new = codec.NewMachines(MachineState.ENROLLED, 1700000000)  # an int time reads as a float
    new.add("m-00000000000a", (), None, None, "SN1", None, None, None, None, codec.NO_ENTRIES,
            None)
    merged = replace(MACHINE, id="m-00000000000b", hostname=None)
    new.add_machine(merged)
    new.rename(0, "edge-sn1")
    new.rename(1, "edge-b")
    assert [new.hostname(0), new.hostname(1)] == ["edge-sn1", "edge-b"]
    assert new[0].created == 1700000000.0 and type(new[0].created) is float
    assert new[1] == replace(merged, hostname="edge-b")
    assert [c[0] for c in new.columns()] == ["m-00000000000a", "m-00000000000b"]
    assert list(new.columns())[1] == codec.bulk_columns(replace(merged, hostname="edge-b"))
    with pytest.raises(ValidationError) as err:
        codec.NewMachines(MachineState.ENROLLED, float("nan"))
    assert err.value.field == "created"


def test_the_sequences_made_on_demand_index_and_slice_as_a_list_does() -> None:
    """NewMachines, EventRun and Events share one __getitem__ (codec._Indexed): every index,
    negative ones, out of range and slices read as the list of their items does."""
    new = codec.NewMachines(MachineState.ENROLLED, 1.0)
    for n in range(3):
        new.add(f"m-{n}", (), None, None, f"SN{n}", None, None, None, None, codec.NO_ENTRIES,
                None)
    run = codec.EventRun(["m-1", "m-2", "m-3"], 3, "enrolled", "imported")
    events = codec.Events([Event("m-0", 1.0, "k")], run, [Event("m-4", 4.0, "k")])
    for seq in (new, run, events):
        items: list[Any] = list(seq)
        assert len(seq) == len(items)
        for i in range(-len(items), len(items)):
            assert seq[i] == items[i]
        for i in (len(items), -len(items) - 1):
            with pytest.raises(IndexError):
                seq[i]
        for cut in (slice(None), slice(1, None), slice(None, -1), slice(None, None, -2),
                    slice(5, 9)):
            assert seq[cut] == items[cut]


def test_an_event_run_reads_as_its_events_and_checks_what_they_share() -> None:
    run = codec.EventRun(["m-1", "m-2"], 3, "enrolled", "imported")
    assert list(run) == [Event("m-1", 3.0, "enrolled", "imported"),
                         Event("m-2", 3.0, "enrolled", "imported")]
    assert run[-1].machine == "m-2" and [e.machine for e in run[:1]] == ["m-1"]
    both = codec.joined([Event("m-0", 1.0, "k")], run)
    assert isinstance(both, codec.Events) and len(both) == 3 and both[2] == run[1]
    assert both[1:] == list(run) and list(both) == [Event("m-0", 1.0, "k"), *run]
    assert [type(p) for p in codec.event_parts(both)][1] is codec.EventRun
    assert list(codec.event_sayings(both)) == [("m-0", ("k", "")),
                                               ("m-1", ("enrolled", "imported")),
                                               ("m-2", ("enrolled", "imported"))]
    assert codec.joined([Event("m-0", 1.0, "k")], []) == [Event("m-0", 1.0, "k")]
    for bad in ({"time": math.inf}, {"time": "1"}, {"kind": " "}, {"message": None}):
        args: dict[str, Any] = {"time": 1.0, "kind": "k", "message": "", **bad}
        with pytest.raises(ValidationError):
            codec.EventRun(["m-1"], **args)
    assert list(codec.run_ids(codec.EventRun(["m-1", "m-2", "m-3"], 1.0, "k", ""), 2)) == [
        '["m-1", "m-2"]', '["m-3"]']
    with pytest.raises(ValidationError):
        list(codec.run_ids(codec.EventRun(["m-1", ""], 1.0, "k", ""), 2))


def test_machines_decoded_together_share_their_equal_label_sets() -> None:
    # codec.SharedMaps: equal labels (and facts) of machines decoded with one are one
    # mapping; unequal ones stay apart; past its limit it keeps the others as decoded; the
    # machines are the ones decoded without it.
    def doc(i: int, rack: str, **extra: Any) -> Any:
        return json.loads(codec.machine_json(Machine(
            macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
            id=f"m-{i:012x}", labels={"rack": rack, "site": "s1"}, created=5.0, updated=5.0,
            **extra)))

    maps = codec.SharedMaps(limit=3)  # r1, product=x, r2
    docs = [doc(0, "r1"), doc(1, "r1", facts={"product": "x"}), doc(2, "r2"),
            doc(3, "r3"), doc(4, "r3"), doc(5, "r2", facts={"product": "x"})]
    got = [codec.machine_from_document(d, maps) for d in docs]
    assert got == [codec.machine_from_document(d) for d in docs]
    assert got[0].labels is got[1].labels and got[2].labels is got[5].labels
    assert got[0].labels is not got[2].labels
    assert got[3].labels == got[4].labels and got[3].labels is not got[4].labels  # past 3
    assert got[1].facts is got[5].facts
    assert got[0].facts is codec.NO_ENTRIES


_TEXT = st.text(max_size=6)


@settings(max_examples=300, deadline=None)
@given(machine=st.sampled_from(["m-1", " ", ""]),
       when=st.sampled_from([1.5, 2, math.nan, math.inf, True]),
       kind=st.sampled_from(["install-plan", " "]), message=st.sampled_from(["", "m", None]),
       data=st.one_of(st.dictionaries(_TEXT, _TEXT, max_size=4),
                      st.dictionaries(_TEXT, st.one_of(_TEXT, st.integers(), st.none(),
                                                       st.floats(), st.lists(_TEXT)),
                                      max_size=4)))
def test_a_stored_event_is_its_round_trip(machine: str, when: float, kind: str,
                                          message: str, data: dict[str, Any]) -> None:
    # stored_event writes text-only data (the boot path's events) without the round trip
    # through event_from_dict: the same event and JSON, or the same refusal.
    event = Event(machine, when, kind, message, data)
    try:
        value = codec.event_from_dict(codec.event_to_dict(event))
        expected: object = (value, codec.dumps(dict(value.data), "data"))
    except ValidationError as exc:
        for copy in (True, False):
            with pytest.raises(ValidationError) as got:
                codec.stored_event(event, copy)
            assert (got.value.field, got.value.message) == (exc.field, exc.message)
        return
    stored = codec.stored_event(event)
    assert stored == expected
    assert type(stored[0].time) is float and type(stored[0].data) is dict
    if data:
        assert stored[0].data is not data  # the caller's dict is not what is kept
    # Not copied: the event itself where its data is text only (what a copy would hold),
    # else the same copy; the same text either way.
    given = codec.stored_event(event, False)
    assert given == expected and type(given[0].time) is float
    if type(when) is float and all(type(v) is str for v in data.values()):
        assert given[0] is event
    else:
        assert given[0] is not event and given[0].data is not data


@pytest.mark.parametrize("data", [
    {"via": "http", "firmware": "efi", "arch": "x86_64", "mac": "02:00:00:00:00:01",
     "peer": "192.0.2.7"},
    {"peer": 'a"b', "other": "\\", "mac": "\n", "via": "\u2028", "": "", "arch": "\U0001f600"},
    {key: key for key in codec._QUOTED_KEYS},
])
def test_a_stored_event_with_the_boot_paths_keys_writes_what_dumps_does(
        data: dict[str, str]) -> None:
    # The keys of the boot path's events are quoted by a look-up (codec._QUOTED_KEYS):
    # the text is still the one JSON's encoder writes, in the dict's order.
    event = Event("m-1", 1.5, "install-plan", "m", data)
    for copy in (True, False):
        stored, text = codec.stored_event(event, copy)
        assert text == codec.dumps(data) and stored == event
        assert json.loads(text) == data and list(json.loads(text)) == list(data)


def test_a_stored_event_with_its_data_text_writes_that_text() -> None:
    # Its maker made the text with the data (Event.data_text, the boot path's events): the
    # store writes it as given; a copy holds a copy of the data and the same text. The
    # event's fields are still checked.
    data = {"via": "http", "mac": "02:00:00:00:00:01"}
    text = codec.dumps(data)
    event = Event("m-1", 1.5, "install-plan", "m", data, text)
    assert codec.stored_event(event, False) == (event, text)
    assert codec.stored_event(event, False)[0] is event
    copied, said = codec.stored_event(event)
    assert said is text and copied == event and copied.data_text is text
    assert copied is not event and copied.data is not data
    with pytest.raises(ValidationError) as got:
        codec.stored_event(Event(" ", 1.5, "install-plan", "m", data, text))
    assert got.value.field == "machine"


def test_the_quoted_keys_are_jsons_own_quoting() -> None:
    assert {key: json.dumps(key) + ":" for key in codec._QUOTED_KEYS} == codec._QUOTED_KEYS


def test_equal_creation_times_decoded_are_one_float() -> None:
    # SharedMaps.time: machines decoded together and created at one time (a bulk import)
    # hold one float object for it, each distinct time up to the bound; zero (0.0 or -0.0)
    # is never shared; without shared maps nothing is.
    maps = codec.SharedMaps(times=2)

    def decoded(i: int, created: float, updated: float | None = None) -> Machine:
        text = codec.machine_json(Machine(
            macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
            id=f"m-{i:012x}", created=created,
            updated=created if updated is None else updated))
        return codec.machine_from_document(json.loads(text), maps)

    a, b = decoded(1, 1700000000.25), decoded(2, 1700000000.25)
    c, d = decoded(3, 1700000001.5, 1700000002.5), decoded(4, 1700000001.5)
    assert a.created is b.created and a.updated is a.created and b.updated is b.created
    assert c.created is d.created and c.updated == 1700000002.5
    e, f = decoded(5, 1700000003.0), decoded(6, 1700000003.0)  # a third time: past 2
    assert e.created == f.created and e.created is not f.created
    assert decoded(7, 1700000000.25).created is a.created  # the kept ones stay shared
    zero, negative = decoded(8, 0.0), decoded(9, -0.0)
    assert str(negative.created) == "-0.0" and str(zero.created) == "0.0"
    assert maps._times == {1700000000.25: 1700000000.25, 1700000001.5: 1700000001.5}
    alone = codec.machine_json(Machine(macs=(MacAddress(bytes(6)),), id="m-alone",
                                       created=1700000000.25, updated=1700000000.25))
    assert codec.machine_from_document(json.loads(alone)).created is not a.created


_TAUGHT_UUIDS = [None, "4c4c4544-0042-3910-8056-b4c04f4b3631",
                 "4C4C4544-0042-3910-8056-B4C04F4B3632", "00000000-0000-0000-0000-000000000000",
                 "not a uuid"]


@settings(max_examples=300)
@given(uuid=st.sampled_from(_TAUGHT_UUIDS), serial=st.sampled_from([None, "SN1", " SN2 ", ""]),
       asset=st.sampled_from([None, "AT1", "To be filled by O.E.M."]),
       arch=st.sampled_from(list(Arch)), firmware=st.sampled_from(list(Firmware)),
       manufacturer=st.sampled_from([None, "QEMU", 'a "quoted" \u00e9']),
       remote=st.sampled_from([None, "192.0.2.9"]),
       held=st.sampled_from([None, "4c4c4544-0042-3910-8056-b4c04f4b3639"]),
       known=st.sampled_from([(None, None, None), (Arch.ARM64, Firmware.UEFI, "SN0")]),
       facts=st.sampled_from([{}, {"manufacturer": "Dell"}, {"platform": "efi"}]),
       taken=st.sets(st.sampled_from(["uuid", "serial", "asset"])),
       again=st.booleans())
def test_a_learnt_delta_is_the_delta_of_every_field(
        uuid: str | None, serial: str | None, asset: str | None, arch: Arch,
        firmware: Firmware, manufacturer: str | None, remote: str | None, held: str | None,
        known: tuple[Arch | None, Firmware | None, str | None], facts: dict[str, str],
        taken: set[str], again: bool) -> None:
    """machine_delta of an update that boot.learn made (Batch.learnt: its other fields
    not compared, its identifiers taken as cleaned) is what comparing every field gives,
    identifier rows included, for requests with placeholders, uncleaned identifiers,
    identifiers other machines hold and a machine learnt twice (two requests in a group)."""
    from netboot.boot import learn
    from netboot.model import BootRequest

    base = Machine(macs=(MacAddress.parse(MAC),), id="m-learnt", hostname="h", uuid=held,
                   arch=known[0], firmware=known[1], serial=known[2], facts=facts,
                   updated=1764960000.25, labels={"rack": "1"}, cluster="c")
    request = BootRequest(mac=MacAddress.parse(MAC), arch=arch, firmware=firmware, uuid=uuid,
                          serial=serial, asset=asset, manufacturer=manufacturer,
                          remote_addr=remote, via="dhcp")
    new = learn(base, request, 1764960061.123456789, frozenset(taken))
    if again:
        new = learn(new, replace(request, asset="AT2", manufacturer="other"), 1764960062.5)
    if new is base:
        return
    full = codec.machine_delta(base, new)
    assert full is not None
    assert codec.machine_delta(base, new, None, True) == full
