"""Bulk import: one transaction, every bad row reported with its line, idempotent, templates."""

from __future__ import annotations

import ast
import contextlib
import gc
import io
import itertools
import operator
import pathlib
import re
import traceback
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot import enroll
from netboot.enroll import (
    REPEAT_ELSEWHERE_SECONDS,
    Enroller,
    _changes_nothing,
    _lines,
    _new_ids,
    _row_machine,
    _updated,
    iter_import,
    parse_import,
    render_hostname,
)
from netboot.errors import ValidationError
from netboot.inventory.codec import NO_ENTRIES
from netboot.inventory.memory import MemoryStore
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import (
    Cluster,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
    replace_machine,
)
from tests import pg

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


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def every_store(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    """``store`` on PostgreSQL too: for the import's checks that every store shares."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql":
            cluster = request.getfixturevalue("postgres")
            s = PostgresStore(await stack.enter_async_context(pg.fresh_schema(cluster)))
        else:
            s = (MemoryStore() if request.param == "memory"
                 else SqliteStore(tmp_path / "db.sqlite"))
        await s.open()
        try:
            await s.put_cluster(Cluster(name="edge", token="t"))
            await s.put_profile(Profile(name="p", kernel="vmlinuz"))
            yield s
        finally:
            await s.close()


async def test_csv_import_creates_and_is_idempotent(store) -> None:  # type: ignore[no-untyped-def]
    e = Enroller(store, hostname_template="edge-{serial}")
    rows = parse_import(CSV, "csv")
    assert [line for line, _ in rows] == [2, 3, 4]
    dry = await e.import_rows(rows, dry_run=True)
    assert len(dry.created) == 3 and not dry.applied
    assert await store.machine_by("mac", "52:54:00:00:00:01") is None
    report = await e.import_rows(rows)
    assert report.applied and len(report.created) == 3 and not report.errors
    m2 = await store.machine_by("mac", "52:54:00:00:00:02")
    assert m2 is not None and m2.hostname == "edge-s2"  # from the template
    # Events are written in the same transaction as the machines.
    assert [e.kind for e in await store.list_events(m2.id)] == ["enrolled"]
    m3 = await store.machine_by("mac", "52:54:00:00:00:03")
    assert m3 is not None and m3.labels == {"rack": "r2"}
    again = await e.import_rows(parse_import(CSV, "csv"))
    assert again.created == () and again.changed == () and len(again.unchanged) == 3
    changed = await e.import_rows(parse_import(CSV.replace("S3,,,,r2", "S3,,,,r9"), "csv"))
    assert changed.changed == ("52:54:00:00:00:03",)


async def test_every_bad_row_reported_and_nothing_applied(
        every_store) -> None:  # type: ignore[no-untyped-def]
    store = every_store
    await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:00:00:99"),),
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
    assert await store.machine_by("mac", "52:54:00:00:00:01") is None  # all or nothing


async def test_a_bad_labels_cell_is_its_row_error_among_the_others(  # type: ignore[no-untyped-def]
        store) -> None:
    """A labels cell that is not k=v;k=v is listed with its line as any bad row is, not the
    end of the file's reading after which the operator finds the next bad row (s35-user)."""
    text = ("mac,role,labels\n52:54:00:00:00:01,agent,rack=a;row=1\n"
            "52:54:00:00:00:02,agentt,rack=a\n52:54:00:00:00:03,agent,rack\n"
            "52:54:00:00:00:04,agent,rack=b\n53:54:00:00:00:05,agent,\n")
    report = await Enroller(store).import_rows(parse_import(text, "csv"))
    # Line 6: a MAC no NIC has (its first byte odd), as the API refuses it (test_identity).
    assert [(e.line, e.field) for e in report.errors] == [(3, "role"), (4, "labels"),
                                                          (6, "mac")]
    assert report.errors[1].message == "'rack' is not key=value"
    assert not report.applied
    assert await store.machine_by("mac", "52:54:00:00:00:01") is None  # all or nothing


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
    # A bad labels cell is its row's error (import_rows lists it with the others').
    ((line, row),) = parse_import("mac,labels\n52:54:00:00:00:01,rack\n", "csv")
    assert line == 2 and isinstance(row["labels"], ValidationError)
    assert (row["labels"].field, row["labels"].message) == ("labels", "'rack' is not key=value")


def test_csv_cells_are_read_by_their_header() -> None:
    # What csv.DictReader gave before the reader read columns by index: header names are
    # stripped; blank lines are no rows but count in line numbers; missing trailing cells
    # are empty; a column named twice counts by its last cell; label.X, labels.X and
    # labels (k=v;k=v) all make labels; empty cells are left out.
    text = (" mac ,hostname,label.rack,labels,labels.site,hostname\n"
            "\n"
            "52:54:00:00:00:01, first ,r1, a = 1 ;b=2,s1,second\n"
            "52:54:00:00:00:02,x,,,\n"
            "52:54:00:00:00:03\n")
    assert parse_import(text, "csv") == [
        (3, {"mac": "52:54:00:00:00:01", "hostname": "second",
             "labels": {"rack": "r1", "a": "1", "b": "2", "site": "s1"}}),
        (4, {"mac": "52:54:00:00:00:02"}),
        (5, {"mac": "52:54:00:00:00:03"}),
    ]
    # A bad labels cell is named before extra values on the same line.
    ((_, row),) = parse_import("mac,labels\n52:54:00:00:00:01,rack,extra\n", "csv")
    assert "'rack' is not key=value" in str(row["labels"])
    with pytest.raises(ValidationError, match="line 2: more values than header columns"):
        parse_import("mac,labels\n52:54:00:00:00:01,rack=a,extra\n", "csv")
    with pytest.raises(ValidationError, match="empty CSV file"):
        parse_import("", "csv")


def test_a_csv_headers_field_names_are_read_in_any_case() -> None:
    """A factory's CSV says "MAC,Serial,Hostname": every row was `MAC: unknown column
    (known: mac, ...)` and nothing was imported (s38-user). A label's own name keeps its
    case; a name that is no field is still refused, once."""
    text = ("MAC, Serial ,HostName,Label.Rack,LABELS\n"
            "52:54:00:00:00:01,S1,a-1,r1,site=x\n")
    assert parse_import(text, "csv") == [
        (2, {"mac": "52:54:00:00:00:01", "serial": "S1", "hostname": "a-1",
             "labels": {"Rack": "r1", "site": "x"}})]
    # A name no field is refused once, at the header's line, not on each of 1,000 rows;
    # an empty name (a trailing comma) is no column.
    rows = "".join(f"52:54:00:00:01:{i:02x},r{i}\n" for i in range(100))
    with pytest.raises(ValidationError, match=r"line 1: Location: unknown column \(known: mac,") \
            as refused:
        parse_import("mac,Location\n" + rows, "csv")
    assert refused.value.field == "file" and refused.value.line == 1
    assert parse_import("mac,serial,\n52:54:00:00:00:01,S1,\n", "csv") == [
        (2, {"mac": "52:54:00:00:00:01", "serial": "S1"})]


def test_csv_blank_lines_before_the_header_are_skipped() -> None:
    """A spreadsheet's export that starts with a blank line (or a row of empty cells) had
    that line read as its header: no columns, and the real header "more values than header
    columns". Skipped now, as blank lines after the header are; rows keep their lines, and
    an error says which line the header was read from."""
    text = "\n ,,\nmac,hostname\n52:54:00:00:00:01,a\n\n52:54:00:00:00:02,b\n"
    assert parse_import(text, "csv") == [(4, {"mac": "52:54:00:00:00:01", "hostname": "a"}),
                                         (6, {"mac": "52:54:00:00:00:02", "hostname": "b"})]
    with pytest.raises(ValidationError, match=r"line 4: more values than header columns "
                                              r"\(header: line 3\)"):
        parse_import("\n\nmac\n52:54:00:00:00:01,x\n", "csv")
    with pytest.raises(ValidationError, match="empty CSV file"):
        parse_import("\n,,\n\n", "csv")


def test_a_csv_header_naming_one_field_twice_in_two_spellings_is_refused() -> None:
    """"MAC" and "mac" in one header were two columns of one field, the later's value
    winning (the earlier's dropped without a word): refused at the header's line, naming
    both. The same name twice still counts by its last column, and labels whose own names
    differ in case are two labels."""
    for header, first, second, what in (
            ("MAC,hostname,mac", "MAC", "mac", "mac"),
            ("mac,Serial, serial ", "Serial", " serial ", "serial"),
            ("mac,label.rack,Labels.rack", "label.rack", "Labels.rack", "label rack")):
        with pytest.raises(ValidationError) as refused:
            parse_import(header + "\n52:54:00:00:00:01,a,b\n", "csv")
        assert refused.value.field == "file" and refused.value.line == 1
        assert refused.value.message == (f"line 1: columns {first!r} and {second!r} are "
                                         f"both {what}: keep one")
    assert parse_import("mac,label.Rack,label.rack,mac\n,R,r,52:54:00:00:00:01\n",
                        "csv") == [
        (2, {"mac": "52:54:00:00:00:01", "labels": {"Rack": "R", "rack": "r"}})]


def test_a_yaml_files_machines_key_numbers_its_rows_by_their_lines() -> None:
    # The {machines: [...]} form numbered its rows 1, 2, 3, printed as the file's lines
    # ("fleet.yaml:3: mac: duplicate of line 2" for the machines on lines 9 and 5).
    text = ("# the rack\r\n"
            "machines:\r\n"
            "  - mac: 52:54:00:aa:00:01\r\n"
            "    hostname: srv-1\r\n"
            "  - mac: 5254.00aa.0002\r\n"
            "\r\n"
            "    hostname: srv-2\r\n"
            "  - {mac: 52:54:00:aa:00:03, hostname: srv-3,}\r\n")
    assert [line for line, _ in parse_import(text, "yaml")] == [3, 5, 8]
    assert [line for line, _ in parse_import("\ufeff" + text, "yaml")] == [3, 5, 8]
    assert [line for line, _ in parse_import("- mac: 52:54:00:aa:00:01\n\n- mac: "
                                             "52:54:00:aa:00:02\n", "yaml")] == [1, 3]


def test_a_json_files_rows_are_numbered_by_their_lines() -> None:
    # Rows were numbered 1, 2, 3 and printed as the file's lines ("fleet.json:3: mac:
    # duplicate of line 2" for the machines on lines 8 and 5).
    rows = ('[\n  {"mac": "52:54:00:aa:00:01",\n   "hostname": "a"},\n\n'
            '  {"mac": "52:54:00:aa:00:02"}, {"mac": "52:54:00:aa:00:03"},\n'
            '  {\n    "mac": "52:54:00:aa:00:04"\n  }\n]\n')
    expected = [{"mac": "52:54:00:aa:00:01", "hostname": "a"},
                {"mac": "52:54:00:aa:00:02"}, {"mac": "52:54:00:aa:00:03"},
                {"mac": "52:54:00:aa:00:04"}]
    assert parse_import(rows, "json") == list(zip([2, 5, 5, 6], expected, strict=True))
    wrapped = '{"site": {"name": "x"}, \r\n"machines": ' + rows.replace("\n", "\r\n") + "}"
    assert parse_import(wrapped, "json") == list(zip([3, 6, 6, 7], expected, strict=True))
    assert parse_import("[]", "json") == []
    assert parse_import(' { "machines" : [ ] } ', "json") == []
    # Malformed: json's own error, its line, as before (a trailing comma, a missing one,
    # data after the end, a key twice: the last kept, as json.loads keeps it).
    for text, line, message in [
            ('[\n {"mac": "52:54:00:aa:00:01"},\n]\n', 3, "Expecting value"),
            ('[\n {"mac": "52:54:00:aa:00:01"}\n {"mac": "52:54:00:aa:00:02"}]', 3,
             "Expecting ',' delimiter"),
            ('{"machines": [], }', 1, "Expecting property name enclosed in double quotes"),
            ('[] []', 1, "Extra data")]:
        with pytest.raises(ValidationError) as bad:
            parse_import(text, "json")
        assert (bad.value.line, bad.value.reason.split(" (")[0]) == (
            line, f"cannot parse json: {message}"), text
    assert parse_import('{"machines": [{"mac": "a"}], "machines": [{"mac": "b"}]}',
                        "json") == [(1, {"mac": "b"})]


def test_a_rows_trailing_commas_are_no_values() -> None:
    # A row ending in a comma (typed by hand, or a spreadsheet's empty trailing columns)
    # stopped the whole import: "line 3: more values than header columns".
    text = ("mac,hostname,labels\r\n"
            "52:54:00:00:00:01,a,rack=r1\r\n"
            "52:54:00:00:00:02,b,rack=r2,\r\n"
            "52:54:00:00:00:03,c,, ,,\r\n")
    assert parse_import(text, "csv") == [
        (2, {"mac": "52:54:00:00:00:01", "hostname": "a", "labels": {"rack": "r1"}}),
        (3, {"mac": "52:54:00:00:00:02", "hostname": "b", "labels": {"rack": "r2"}}),
        (4, {"mac": "52:54:00:00:00:03", "hostname": "c"}),
    ]
    # A value past the header is still the file's error: it is a column nobody named.
    with pytest.raises(ValidationError, match="line 3: more values than header columns"):
        parse_import(text.replace("rack=r2,", "rack=r2,r3"), "csv")


async def test_streamed_csv_import_writes_nothing_when_the_file_breaks_late(
        store) -> None:  # type: ignore[no-untyped-def]
    # Rows are read as the import goes: a malformed line after good ones still stops the
    # import before anything is written.
    text = CSV + "52:54:00:00:00:04,edge-4,S4,edge,agent,p,r1,one-too-many\n"
    with pytest.raises(ValidationError, match="line 5: more values than header columns"):
        await Enroller(store).import_rows(iter_import(text, "csv"))
    assert await store.count_machines() == 0
    assert list(iter_import(CSV, "csv")) == parse_import(CSV, "csv")


@pytest.mark.parametrize("late", ["bad row", "broken file"])
async def test_a_late_bad_row_writes_nothing_after_thousands_of_good_ones(
        every_store, late: str) -> None:  # type: ignore[no-untyped-def]
    # More named new rows than a store writes at once (sqlite.BULK_CHUNK; what an import
    # that wrote while it still read the file would have handed over), then the bad line:
    # nothing is written, the error names the line and the field, and the rows' identifiers
    # and names are free for the corrected file.
    rows = ["mac,hostname,serial,cluster,label.rack"]
    rows += [f"52:54:00:01:{i >> 8:02x}:{i & 255:02x},h{i},S{i},edge,r{i % 3}"
             for i in range(5000)]
    bad = ("52:54:00:01:00:07,h-dup,S-dup,edge,r1" if late == "bad row"
           else "52:54:00:02:00:00,h-x,S-x,edge,r1,one-too-many")
    text = "\n".join([*rows, bad, "52:54:00:02:00:01,h-y,S-y,edge,r1"]) + "\n"
    e = Enroller(every_store)
    if late == "bad row":
        report = await e.import_rows(iter_import(text, "csv"))
        assert not report.applied
        assert [(x.line, x.field) for x in report.errors] == [(5002, "mac")]
        assert "duplicate of line 9" in report.errors[0].message
    else:
        with pytest.raises(ValidationError, match="line 5002: more values than header"):
            await e.import_rows(iter_import(text, "csv"))
    assert await every_store.count_machines() == 0
    assert await every_store.machine_by("serial", "S4999") is None
    good = "\n".join(rows) + "\n"
    report = await e.import_rows(iter_import(good, "csv"))
    assert report.applied and len(report.created) == 5000
    assert await every_store.count_machines() == 5000


async def test_import_hands_out_new_ids_in_file_order(store) -> None:  # type: ignore[no-untyped-def]
    # Ids random as a set, increasing down the file (the store appends to its id-keyed
    # tables), also past the rows the file's length hint promised.
    rows = ["mac,serial"] + [f"52:54:00:00:01:{i:02x},X{i}" for i in range(40)]
    text = "\n".join(rows)  # no final newline: one row more than the hint's guess of rows
    parsed = iter_import(text, "csv")
    assert operator.length_hint(parsed) == 41
    report = await Enroller(store).import_rows(parsed)
    ids = []
    for i in range(40):
        machine = await store.machine_by("serial", f"X{i}")
        assert machine is not None and re.fullmatch(r"m-[0-9a-f]{12}", machine.id)
        ids.append(machine.id)
    assert report.applied and ids == sorted(ids) and len(set(ids)) == 40


def test_new_ids_sorted_then_random() -> None:
    ids = list(itertools.islice(_new_ids(500), 600))
    assert ids[:500] == sorted(ids[:500]) and len(set(ids)) == 600
    assert all(re.fullmatch(r"m-[0-9a-f]{12}", i) for i in ids)
    assert ids[500:] != sorted(ids[500:])  # past the guess: as new_machine_id gives them


async def test_import_pauses_the_collector_and_restores_it(store) -> None:  # type: ignore[no-untyped-def]
    seen = []
    enroller = Enroller(store)
    rows = parse_import(CSV, "csv")

    def progress(n: int) -> None:
        seen.append(gc.isenabled())

    assert gc.isenabled()
    await enroller.import_rows(rows, progress=progress)
    assert seen == [False] and gc.isenabled()
    gc.disable()  # off before (someone else's choice): left off
    try:
        await enroller.import_rows(rows, dry_run=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValidationError):  # an import that fails turns it back on too
        await enroller.import_rows(iter_import("mac\n1,2\n", "csv"))
    assert gc.isenabled()


async def test_bulk_import_through_sqlite_reads_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Enough rows for the SQLite store's bulk path (sqlite.BULK_ROWS).
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        await store.put_cluster(Cluster(name="edge", token="t"))
        rows = ["mac,hostname,serial,cluster,label.rack"]
        rows += [f"52:54:00:00:{i >> 8:02x}:{i & 255:02x},{'' if i % 4 == 0 else f'h{i}'},"
                 f"S{i},edge,r{i % 3}" for i in range(700)]
        report = await Enroller(store).import_rows(iter_import("\n".join(rows) + "\n", "csv"))
        assert report.applied and len(report.created) == 700
        got = await store.machine_by("serial", "S8")
        assert got is not None and got.hostname == "node-000008" and got.labels == {"rack": "r2"}
        assert str(got.mac) == "52:54:00:00:00:08" and got.cluster == "edge"
        assert [e.kind for e in await store.list_events(got.id)] == ["enrolled"]
        again = await Enroller(store).import_rows(iter_import("\n".join(rows) + "\n", "csv"))
        assert len(again.unchanged) == 700 and not again.errors
    finally:
        await store.close()


def test_hostname_templates() -> None:
    m = Machine(macs=(MacAddress.parse("52:54:00:ab:cd:ef"),), serial="SN 42", cluster="line-3")
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
    assert (await store.machine_by("mac", "02:00:00:07:00:01")).hostname == "r7-a1"
    assert (await store.machine_by("mac", "02:00:00:08:00:01")).hostname == "node-080001"
    m = Machine(macs=(MacAddress.parse("02:00:00:07:00:02"),), serial="A2")
    assert await e.name_for(m) == "r7-a2"


async def test_groups_without_templates_leave_the_default_one(store) -> None:  # type: ignore[no-untyped-def]
    # An import skips choosing a group for each unnamed row when no group has a template of
    # its own; the names are those a group's choice gives, with and without such a group.
    from netboot.model import Group

    await store.put_group(Group(name="site", selector={"mac": ("02:00:00:*",)}))
    e = Enroller(store, hostname_template="node-{serial}")
    report = await e.import_rows([(2, {"mac": "02:00:00:07:00:01", "serial": "A1"})])
    assert report.applied
    assert (await store.machine_by("mac", "02:00:00:07:00:01")).hostname == "node-a1"
    await store.put_group(Group(name="rack7", selector={"mac": ("02:00:00:07:*",)},
                                hostname_template="r7-{serial}"))
    report = await e.import_rows([(2, {"mac": "02:00:00:07:00:02", "serial": "A2"}),
                                  (3, {"mac": "02:00:00:08:00:02", "serial": "B2"})])
    assert report.applied
    assert (await store.machine_by("mac", "02:00:00:07:00:02")).hostname == "r7-a2"
    assert (await store.machine_by("mac", "02:00:00:08:00:02")).hostname == "node-b2"


# --- identity in imports: rows without a MAC, several NICs, conflicts named by line ----------

IDENTITY_CSV = """mac,macs,serial,asset,uuid,hostname
,,CZ-1,,,floor-1
,,,A-7,,floor-2
,,,,8D3A0C51-3B6B-4F0E-9D4C-52E5C1A2B3C4,floor-3
52:54:00:00:03:01,52:54:00:00:03:02;52-54-00-00-03-03,,,,two-port
"""


async def test_import_rows_with_only_a_serial_asset_or_uuid_and_several_macs(
        store) -> None:  # type: ignore[no-untyped-def]
    e = Enroller(store)
    report = await e.import_rows(parse_import(IDENTITY_CSV, "csv"))
    assert report.applied and not report.errors and len(report.created) == 4
    assert (await store.machine_by("serial", "CZ-1")).hostname == "floor-1"
    assert (await store.machine_by("asset", "A-7")).hostname == "floor-2"
    three = await store.machine_by("uuid", "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4")
    assert three.hostname == "floor-3" and three.macs == ()
    two = await store.machine_by("mac", "52:54:00:00:03:03")
    assert [str(m) for m in two.macs] == ["52:54:00:00:03:01", "52:54:00:00:03:02",
                                         "52:54:00:00:03:03"]
    # Idempotent; a later file naming the machine by its serial adds its NIC, keeps the rest.
    again = await e.import_rows(parse_import(IDENTITY_CSV, "csv"))
    assert again.applied and len(again.unchanged) == 4 and not again.created
    more = await e.import_rows([(2, {"serial": "CZ-1", "mac": "52:54:00:00:03:09",
                                     "cluster": "edge"})])
    assert more.applied and len(more.changed) == 1
    one = await store.machine_by("mac", "52:54:00:00:03:09")
    assert one.serial == "CZ-1" and one.hostname == "floor-1" and one.cluster == "edge"
    assert await store.count_machines() == 4


async def test_import_conflicts_name_the_line_and_field(
        store) -> None:  # type: ignore[no-untyped-def]
    e = Enroller(store)
    await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:00:04:01"),),
                                       serial="HAVE-1", hostname="have-1"))
    await store.create_machine(Machine(serial="HAVE-2", hostname="have-2"))
    rows = [
        (2, {"serial": "NEW-1", "mac": "52:54:00:00:04:02"}),
        (3, {"serial": "NEW-2", "macs": "52:54:00:00:04:02"}),  # the NIC of line 2
        # Its MAC is have-1's and its serial have-2's: two machines, which one?
        (4, {"mac": "52:54:00:00:04:01", "serial": "HAVE-2"}),
        (5, {"hostname": "nothing-to-know-it-by"}),
        (6, {"serial": "To be filled by O.E.M."}),
        (7, {"macs": ["52:54:00:00:04:07", "52-54-00-00-04-07"]}),
        (8, {"asset": "Default string", "mac": "52:54:00:00:04:08"}),
    ]
    report = await e.import_rows(rows)
    assert not report.applied
    got = {(err.line, err.field) for err in report.errors}
    assert got == {(3, "mac"), (4, "serial"), (5, "mac"), (6, "serial"), (7, "macs"),
                   (8, "asset")}
    by_line = {err.line: err.message for err in report.errors}
    assert "line 2" in by_line[3] and "HAVE-2" in by_line[4]
    assert await store.count_machines() == 2


async def test_import_merges_the_discovered_record_of_an_enrolled_serial(
        store) -> None:  # type: ignore[no-untyped-def]
    from netboot.model import Event, MachineState

    found = Machine(macs=(MacAddress.parse("52:54:00:00:05:01"),), serial="SN-5",
                    state=MachineState.DISCOVERED, facts={"product": "Box"})
    await store.create_machine(found)
    await store.add_event(Event(found.id, 1.0, "discovered"))
    report = await Enroller(store).import_rows([(2, {"serial": "SN-5", "hostname": "five"})])
    assert report.applied and len(report.changed) == 1, report.errors
    m = await store.machine_by("serial", "SN-5")
    assert m.id == found.id and m.hostname == "five" and m.state == MachineState.ENROLLED
    assert [str(x) for x in m.macs] == ["52:54:00:00:05:01"] and m.facts["product"] == "Box"
    assert [ev.kind for ev in await store.list_events(m.id)] == ["discovered", "updated"]
    # Two discovered records of one device (two NICs seen): the second merges.
    other = Machine(macs=(MacAddress.parse("52:54:00:00:05:02"),), asset="A-5",
                    state=MachineState.DISCOVERED)
    await store.create_machine(other)
    report = await Enroller(store).import_rows([(2, {"serial": "SN-5", "asset": "A-5"})])
    assert report.applied, report.errors
    m = await store.machine_by("asset", "A-5")
    assert m.id == found.id and len(m.macs) == 2 and await store.get_machine(other.id) is None
    assert await store.count_machines() == 1


async def _installed(store: Any, mac: str, hostname: str) -> MacAddress:
    """An installed machine of cluster edge whose install token is "tok", as its OS
    registers with it."""
    import hashlib

    parsed = MacAddress.parse(mac)
    await store.create_machine(Machine(
        macs=(parsed,), hostname=hostname, state=MachineState.INSTALLED, cluster="edge",
        token_hash=hashlib.sha256(b"tok").hexdigest(), token_expires=None))
    return parsed


async def test_register_keeps_the_peer_over_a_claimed_loopback(store) -> None:  # type: ignore[no-untyped-def]
    """k3OS's `hostname -i` says 127.0.1.1 (and a user may claim 127.0.0.1); the request came
    from 192.0.2.60 on the provisioning network, which is what other nodes reach."""
    import hashlib
    import ipaddress

    from netboot.model import MachineState

    mac = await _installed(store, "52:54:00:00:00:09", "s1")
    enroller = Enroller(store, clock=lambda: 1000.0)
    peer = ipaddress.ip_address("192.0.2.60")
    body = {"mac": str(mac), "token": "tok", "addresses": ["127.0.0.1", "127.0.1.1", "nope"]}
    registered = await enroller.register(body, peer)
    assert registered.state == MachineState.REGISTERED and registered.ipv4 == "192.0.2.60"
    stored = await store.machine_by("mac", str(mac))
    assert stored is not None and stored.ipv4 == "192.0.2.60"
    event = (await store.list_events(stored.id))[-1]
    assert event.kind == "registered" and "192.0.2.60 (the request)" in event.message
    assert [(r["address"], r["reason"]) for r in event.data["refused"]] == [
        ("127.0.0.1", "loopback"), ("127.0.1.1", "loopback"), ("nope", "not an IP address")]
    # A loopback peer and only loopback claims: nothing usable, nothing stored, and an
    # address known before (a lease) is kept rather than replaced by 127.0.1.1.
    mac2 = MacAddress.parse("52:54:00:00:00:0a")
    await store.create_machine(Machine(
        macs=(mac2,), hostname="s2", state=MachineState.INSTALLED, cluster="edge",
        ipv4="192.0.2.61", token_hash=hashlib.sha256(b"tok2").hexdigest()))
    again = await enroller.register({**body, "mac": str(mac2), "token": "tok2",
                                     "addresses": ["127.0.1.1"]},
                                    ipaddress.ip_address("127.0.0.1"))
    assert again.ipv4 == "192.0.2.61"
    # A global IPv6 peer keeps ipv4 meaning IPv4, and is recorded beside it.
    mac3 = MacAddress.parse("52:54:00:00:00:0b")
    await store.create_machine(Machine(
        macs=(mac3,), hostname="s3", state=MachineState.INSTALLED, cluster="edge",
        ipv4="192.0.2.62", token_hash=hashlib.sha256(b"tok3").hexdigest()))
    v6 = await enroller.register({**body, "mac": str(mac3), "token": "tok3", "addresses": []},
                                 ipaddress.ip_address("2001:db8::9"))
    assert v6.ipv4 == "192.0.2.62" and v6.facts["ipv6"] == "2001:db8::9"


async def test_registrations_and_their_events_are_one_grouped_write(store) -> None:  # type: ignore[no-untyped-def]
    """A storm's machines register together: each registration's state and its event are
    written in one transaction, with the recorder's group commits (a write of its own each
    was a transaction per machine, then a second commit for its event)."""
    import asyncio
    import hashlib
    import ipaddress

    macs = [MacAddress.parse(f"52:54:00:00:01:{i:02x}") for i in range(3)]
    for i, mac in enumerate(macs):
        await store.create_machine(Machine(
            macs=(mac,), hostname=f"r{i}", state=MachineState.INSTALLED, cluster="edge",
            token_hash=hashlib.sha256(f"tok{i}".encode()).hexdigest(), token_expires=None))
    enroller = Enroller(store, clock=lambda: 1000.0)
    writes: list[tuple[str, Any]] = []

    def counted(name: str) -> Any:
        real = getattr(store, name)

        async def write(*args: Any, **kwargs: Any) -> Any:
            writes.append((name, args[0] if args else None))
            return await real(*args, **kwargs)
        return write

    for name in ("apply_batch", "update_machine", "append_event"):
        if hasattr(store, name):
            setattr(store, name, counted(name))
    peer = ipaddress.ip_address("192.0.2.70")
    done = await asyncio.gather(*(enroller.register(
        {"mac": str(mac), "token": f"tok{i}"}, peer) for i, mac in enumerate(macs)))
    assert [m.state for m in done] == [MachineState.REGISTERED] * 3
    # Batches only (how many: the recorder's grouping, which timing decides), each
    # registration's state with its event.
    assert {name for name, _ in writes} == {"apply_batch"}, writes
    updated = [m.id for _, batch in writes for m in batch.update]
    assert sorted(updated) == sorted(m.id for m in done)
    for _, batch in writes:
        assert sorted(m.id for m in batch.update) == sorted(
            e.machine for e in batch.events if e.kind == "registered"), batch
    for m in done:
        stored = await store.get_machine(m.id)
        assert stored is not None and stored.state == MachineState.REGISTERED
        assert [ev.kind for ev in await store.list_events(m.id)][-1:] == ["registered"]
    # Its token is spent: a replay from elsewhere is refused by state, and writes nothing.
    before = len(writes)
    with pytest.raises(Exception, match="registered"):
        await enroller.register({"mac": str(macs[0]), "token": "tok0"},
                                ipaddress.ip_address("192.0.2.71"))
    assert len(writes) == before
    # From where it registered, it is a repeat (its answer was lost): answered as the first
    # (its machine token again), its state unwritten, one event saying so (s37-register).
    again = await enroller.register({"mac": str(macs[0]), "token": "tok0"}, peer)
    assert again.install_token == done[0].install_token and again.updated == done[0].updated
    assert [m for _, batch in writes[before:] for m in batch.update] == []
    assert [ev.kind for ev in await store.list_events(done[0].id)][-2:] == [
        "registered", "registration repeated"]


_MACS = [MacAddress(bytes([2, 0, 0, 0, 0, i])) for i in range(3)]
_SOME = st.sampled_from


@settings(max_examples=600, deadline=None)
@given(state=_SOME(list(MachineState)),
       old_macs=st.lists(_SOME(_MACS), max_size=2, unique=True).map(tuple),
       row_macs=st.lists(_SOME(_MACS), max_size=2, unique=True).map(tuple),
       old_text=st.lists(_SOME([None, "a", "b"]), min_size=8, max_size=8),
       row_text=st.lists(_SOME([None, "a", "b"]), min_size=8, max_size=8),
       old_role=_SOME([None, Role.AGENT, Role.SERVER]),
       row_role=_SOME([None, Role.AGENT, Role.SERVER]),
       old_labels=st.dictionaries(_SOME(["k", "j"]), _SOME(["1", "2"])),
       row_labels=st.dictionaries(_SOME(["k", "j"]), _SOME(["1", "2"])))
def test_a_row_that_changes_nothing_is_told_without_building_machines(
        state: MachineState, old_macs: tuple[MacAddress, ...], row_macs: tuple[MacAddress, ...],
        old_text: list[str | None], row_text: list[str | None], old_role: Role | None,
        row_role: Role | None, old_labels: dict[str, str], row_labels: dict[str, str]) -> None:
    # A re-import's rows are checked against their machines from the row's values alone
    # (_changes_nothing); the answer is the one building the updated machine gives.
    def fixed(text: str | None) -> str | None:
        return None if text is None else {"a": "192.0.2.1", "b": "192.0.2.2"}[text]

    host, uuid, serial, asset, cluster, profile, ip, fact = old_text
    old = Machine(macs=old_macs, id="m-000000000001", state=state, hostname=host, uuid=uuid,
                  serial=serial, asset=asset, cluster=cluster, profile=profile, role=old_role,
                  fixed_ipv4=fixed(ip), labels=old_labels or NO_ENTRIES,
                  facts={"f": fact} if fact else NO_ENTRIES, created=1.0, updated=2.0)
    host, uuid, serial, asset, cluster, profile, ip, _ = row_text
    values = (row_macs, host, uuid, serial, asset, cluster, row_role, profile,
              row_labels or NO_ENTRIES, fixed(ip))
    row = _row_machine(old.id, values, 3.0)
    assert _changes_nothing(old, values) == (_updated(old, row, [], 3.0) == old)


@given(st.text(alphabet='ab,"\r\n ', max_size=40))
def test_csv_lines_are_read_as_a_stringio_reads_them(text: str) -> None:
    # A CSV file is fed to csv.reader line by line instead of through a StringIO (which
    # copies the text at four bytes a character): the same lines, the same rows and line
    # numbers, quoted cells across lines included.
    assert list(_lines(text)) == list(io.StringIO(text))
    header = "mac,hostname\n"
    try:
        want = list(_csv_rows_via_stringio(header + text))
    except Exception as exc:  # the same failure either way
        with pytest.raises(type(exc)):
            list(iter_import(header + text, "csv"))
    else:
        assert list(iter_import(header + text, "csv")) == want


def _csv_rows_via_stringio(text: str) -> list[tuple[int, dict[str, Any]]]:
    """What the CSV reader made of ``text`` read through a StringIO, as before."""
    real = enroll._lines
    try:
        enroll._lines = lambda t: iter(io.StringIO(t))  # type: ignore[assignment]
        return list(enroll.iter_import(text, "csv"))
    finally:
        enroll._lines = real


def test_a_quoted_cell_across_lines_keeps_the_line_numbers() -> None:
    text = 'mac,hostname,labels\n52:54:00:00:00:01,a,"rack=r1;\nrow=2"\n52:54:00:00:00:02,b,\n'
    rows = list(iter_import(text, "csv"))
    assert [line for line, _ in rows] == [3, 4]
    assert rows[0][1]["labels"] == {"rack": "r1", "row": "2"}


async def test_a_reimport_names_a_stored_machine_s_identifier_given_twice(
        every_store) -> None:  # type: ignore[no-untyped-def]
    store = every_store
    # The inventory's identifiers and the rows' share one map (a MAC by its bytes): a row
    # repeating an identifier of a stored machine that an earlier row named, or naming two
    # stored machines, is still told by its line, field and the identifier as text.
    e = Enroller(store)
    first = await e.import_rows(parse_import(CSV, "csv"))
    assert first.applied
    rows = [
        (2, {"mac": "52:54:00:00:00:01", "serial": "S1"}),
        (3, {"mac": "52-54-00-00-00-01"}),  # line 2's MAC again
        (4, {"serial": "S1", "mac": "52:54:00:00:00:09"}),  # line 2's serial
        (5, {"mac": "52:54:00:00:00:03", "serial": "S2"}),  # two stored machines
        (6, {"macs": "52:54:00:00:00:02;52:54:00:00:00:0a"}),
    ]
    report = await e.import_rows(rows)
    assert not report.applied
    by_line = {err.line: (err.field, err.message) for err in report.errors}
    assert by_line == {
        3: ("mac", "duplicate of line 2 (52:54:00:00:00:01)"),
        4: ("serial", "duplicate of line 2 (S1)"),
        5: ("serial", "S2 belongs to machine 52:54:00:00:00:02, but the row's other "
                      "identifiers name 52:54:00:00:00:03"),
    }
    again = await e.import_rows(parse_import(CSV, "csv"))
    assert again.unchanged == ("52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03")


def test_a_refused_template_or_mac_keeps_its_cause_and_hides_what_it_replaced() -> None:
    # The same in both builds: mypyc (setup.py's NETBOOT_MYPYC=1 compiles this module) drops
    # the from part of "raise ... from", so the causes are set by errors.caused as well.
    machine = Machine(macs=(MacAddress.parse("52:54:00:ab:cd:ef"),))
    with pytest.raises(ValidationError) as template:
        render_hostname("node-{mac.nope}", machine)
    assert isinstance(template.value.__cause__, AttributeError)
    with pytest.raises(ValidationError) as mac:
        enroll.import_macs({"macs": ["52:54:00:00:00:01", "not-a-mac"]})
    shown = "".join(traceback.format_exception(mac.value))
    assert mac.value.__cause__ is None and "During handling" not in shown, shown
    with pytest.raises(ValidationError) as document:
        parse_import("machines: [", "yaml")
    assert document.value.__cause__ is not None


async def test_two_registrations_with_one_token_one_wins_with_one_audit_entry(store) -> None:  # type: ignore[no-untyped-def]
    """Two registrations racing with one token (in one group commit or not): one wins, the
    other is refused by the compare-and-set, and only the winner's audit entry is written."""
    import asyncio
    import ipaddress

    from netboot.errors import NetbootError
    from netboot.model import AuditEntry

    mac = await _installed(store, "52:54:00:00:02:01", "r")
    enroller = Enroller(store, clock=lambda: 1000.0)
    peer = ipaddress.ip_address("192.0.2.70")

    def entry(machine: Machine) -> AuditEntry:
        return AuditEntry(time=1.0, actor=f"machine:{machine.id}", action="POST /register",
                          target=machine.id, peer="-", outcome="200")

    done = await asyncio.gather(*(enroller.register(
        {"mac": str(mac), "token": "tok"}, peer, audit=entry) for _ in range(2)),
        return_exceptions=True)
    won = [d for d in done if isinstance(d, Machine)]
    lost = [d for d in done if not isinstance(d, Machine)]
    # Read before the other's commit: refused by the compare-and-set. Read after it: a
    # repeat from the same address (s37-register), answered as the first with its machine
    # token and an event saying so. Either way one registration, one "registered" event,
    # and an audit entry only for each answered.
    assert won and len(won) + len(lost) == 2, done
    assert all(isinstance(d, NetbootError) for d in lost), done
    assert len({m.install_token for m in won}) == 1 and won[0].install_token
    assert [a.outcome for a in await store.list_audit()] == ["200"] * len(won)
    kinds = [e.kind for e in await store.list_events(won[0].id)]
    assert kinds.count("registered") == 1
    assert kinds.count("registration repeated") == len(won) - 1, kinds


def test_a_token_that_opens_a_config_is_checked_without_waiting() -> None:
    """check_token's answer for a machine's own token, not expired, comes without a wait
    (a coroutine done at its first step): Content.authorised_plan reads the machine from the
    view it synced, then plans without syncing again (BootService.config_plan's
    ``synced``), which holds only while nothing else ran in between."""
    import hashlib

    from netboot import lifecycle

    machine = Machine(macs=(MacAddress.parse("52:54:00:00:0c:01"),),
                      state=MachineState.BOOTING, token_hash=hashlib.sha256(b"tok").hexdigest(),
                      token_expires=None)
    enroller = Enroller(MemoryStore())
    step = enroller.check_token(machine, "tok", lifecycle.Trigger.CONFIG_FETCHED, refused="no")
    with pytest.raises(StopIteration) as done:
        step.send(None)
    assert done.value.value is machine


@pytest.mark.parametrize("step", ["CONFIG_FETCHED", "REGISTER"])
def test_a_token_opens_without_check_token_exactly_where_check_token_gives_it_back(
        step: str) -> None:
    """Enroller.token_opens (Content.authorised_plan's way past check_token's coroutine, a
    first config's ~1,000 loop instructions: s50-config) says True exactly where check_token
    gives the machine back at its first step, for every state, its own token, another, none,
    a machine without a token, expired or not, and no machine; where False, check_token
    refuses (AuthError, TransitionRefused naming the state, or an expiry it goes to record:
    here the unopened store's StoreError)."""
    import hashlib

    from netboot import lifecycle
    from netboot.errors import AuthError, StoreError, TransitionRefused

    trigger = lifecycle.Trigger[step]
    enroller = Enroller(MemoryStore(), clock=lambda: 1000.0)
    seen = set()
    for state in MachineState:
        for held in (hashlib.sha256(b"tok").hexdigest(), None):
            for expires in (None, 2000.0, 500.0):
                machine = Machine(macs=(MacAddress.parse("52:54:00:00:0c:02"),), state=state,
                                  token_hash=held, token_expires=expires)
                for token in ("tok", "other", "", None):
                    opens = enroller.token_opens(machine, token, trigger)
                    step_of = enroller.check_token(machine, token, trigger, refused="no")
                    try:
                        step_of.send(None)
                    except StopIteration as done:
                        assert opens and done.value is machine, (state, held, expires, token)
                        seen.add(True)
                    except (AuthError, TransitionRefused):
                        assert not opens, (state, held, expires, token)
                        seen.add(False)
                    except StoreError:  # an expired token's refusal read the store's
                        assert not opens and expires == 500.0, (state, held, token)
                    else:  # (not reached: an unopened store refuses at the first read)
                        raise AssertionError((state, held, expires, token))
    assert seen == {True, False}
    assert not enroller.token_opens(None, "tok", trigger)


@pytest.mark.parametrize("kind", [
    "registered", "enrolled", "discovered", "reinstall", "install-plan", "nic-attached",
    "merged", "config", "dhcp", "hold", "local-boot", "updated", "register", "approve",
    "config-fetched", "booting"])
async def test_a_report_cannot_take_the_kind_of_netboots_own_record(  # type: ignore[no-untyped-def]
        store, kind: str) -> None:
    # An installer's token (it crossed plain HTTP in the config URL) wrote "registered",
    # "reinstall" or "enrolled" events on a machine still installing: a timeline that lied,
    # and metrics that took them as netboot's own (an install's and a registration's
    # durations observed, its tracking ended) (s33-attack).
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:31"),), hostname="r1", profile="p")
    await store.create_machine(machine)
    enroller = Enroller(store, clock=lambda: 1000.0)
    with pytest.raises(ValidationError) as refused:
        await enroller.report(machine, {"kind": kind})
    assert refused.value.field == "kind" and kind in refused.value.message
    assert await store.list_events(machine.id) == []


@pytest.mark.parametrize("kind", ["registered\n", "progress\n", "hold\n", "installed\n"])
async def test_a_kind_with_a_trailing_newline_is_refused(  # type: ignore[no-untyped-def]
        store, kind: str) -> None:
    # The kind's expression ended in "$", which matches before a final newline: an
    # installer's "registered\n" was taken as a kind of its own, shown in the dashboard's
    # timeline and `machines show` as netboot's "registered", its newline in log lines
    # and the metrics' kind label (s36-attack).
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:33"),), hostname="r3", profile="p",
                      state=MachineState.BOOTING)
    await store.create_machine(machine)
    with pytest.raises(ValidationError) as refused:
        await Enroller(store, clock=lambda: 1000.0).report(machine, {"kind": kind})
    assert refused.value.field == "kind"
    assert await store.list_events(machine.id) == []


@pytest.mark.parametrize("kind", ["progress", "k3s-standin", "install.progress", "installing"])
async def test_a_report_of_a_kind_of_its_own_is_taken(store, kind: str) -> None:  # type: ignore[no-untyped-def]
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:32"),), hostname="r2", profile="p",
                      state=MachineState.BOOTING)
    await store.create_machine(machine)
    event = await Enroller(store, clock=lambda: 1000.0).report(machine, {"kind": kind})
    assert [e.kind for e in await store.list_events(machine.id)] == [event.kind] == [kind]


async def test_report_budgets_full_again_are_forgotten_when_quiet(store) -> None:  # type: ignore[no-untyped-def]
    """A storm's installers each spend from a report budget of their machine's; held until
    16,384 other machines reported, a 1,000-device storm's budgets stayed resident after it
    (s35-mem). Once quiet (Service.forget_idle) those full again are dropped, and such a
    machine's next reports have the whole burst again, as a kept full bucket gave; one still
    spent is kept as it was."""
    from netboot.errors import RateLimited

    now = [1000.0]
    machines = [Machine(macs=(MacAddress.parse(f"52:54:00:00:0f:{i:02x}"),), hostname=f"q{i}",
                        profile="p", state=MachineState.BOOTING) for i in range(3)]
    for machine in machines:
        await store.create_machine(machine)
    enroller = Enroller(store, clock=lambda: now[0], report_burst=2, report_rate=1)
    for machine in machines[:2]:
        await enroller.report(machine, {"kind": "progress"})
    for _ in range(2):
        await enroller.report(machines[2], {"kind": "progress"})
    with pytest.raises(RateLimited):
        await enroller.report(machines[2], {"kind": "progress"})
    assert len(enroller._reports) == 3
    now[0] = 1001.0  # the first two full again; the third a token short
    enroller.forget_idle()
    assert len(enroller._reports) == 1
    for machine in machines[:2]:
        for _ in range(2):
            await enroller.report(machine, {"kind": "progress"})
        with pytest.raises(RateLimited):
            await enroller.report(machine, {"kind": "progress"})
    await enroller.report(machines[2], {"kind": "progress"})
    with pytest.raises(RateLimited):
        await enroller.report(machines[2], {"kind": "progress"})


# -- the kinds netboot writes, found in its source ----------------------------------------
# enroll.NETBOOT_KINDS owns which kinds a device may not report; the writers keep their
# literals (a name looked up in the boot loop costs instructions for nothing). So that a kind
# added to a writer is not forgotten in that list, the source is read: every call that makes
# an event (Event, EventRun, model.event_of, and the functions that pass a ``kind`` parameter
# on to them, found by following it) and the kind it writes.
# The kind's position among the arguments:
_EVENT_MAKERS = {"Event": 2, "EventRun": 2, "event_of": 2}
# Where a kind that is not netboot's own is written: the device's report (what report()
# checks). netboot/inventory/ carries kinds it reads back or copies, and writes none of its own.
_FOREIGN_KINDS = {("enroll.py", "report")}


def _called(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _kind_argument(call: ast.Call, position: int) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "kind":
            return keyword.value
    return call.args[position] if len(call.args) > position else None


def _kinds_netboot_writes() -> dict[str, list[str]]:
    """Each kind netboot's source writes, with the places (file:line) that write it; an
    AssertionError names a place whose kind cannot be told from the source."""
    root = pathlib.Path(enroll.__file__).parent
    functions = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Module-level dicts of kinds (boot._NOTED: the decision's action → its event).
        tables = {t.id: n.value for n in tree.body if isinstance(n, ast.Assign)
                  and isinstance(n.value, ast.Dict) for t in n.targets if isinstance(t, ast.Name)}
        functions += [(path.relative_to(root), tables, f) for f in ast.walk(tree)
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    makers = dict(_EVENT_MAKERS)
    grown = True
    while grown:  # a function whose ``kind`` parameter reaches a maker's kind is one too
        grown = False
        for _, _, f in functions:
            params = [a.arg for a in f.args.args]
            if f.name in makers or "kind" not in params:
                continue
            if any(isinstance(c, ast.Call) and _called(c) in makers
                   and isinstance(a := _kind_argument(c, makers[_called(c)]), ast.Name)
                   and a.id == "kind" for c in ast.walk(f)):
                makers[f.name] = params.index("kind") - (params[0] in ("self", "cls"))
                grown = True

    def values(expr: ast.expr, f: ast.AST, tables: dict[str, ast.Dict]) -> list[ast.expr]:
        """The expressions ``expr`` can stand for: a local name by its assignments, a
        ``table.get(…)`` or ``table[…]`` by the table's values, a conditional by both."""
        if isinstance(expr, ast.Name) and expr.id in tables:
            return [v for v in tables[expr.id].values if v is not None]
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) \
                and expr.func.attr == "get":
            return values(expr.func.value, f, tables)
        if isinstance(expr, ast.Subscript):
            return values(expr.value, f, tables)
        if isinstance(expr, ast.IfExp):
            return values(expr.body, f, tables) + values(expr.orelse, f, tables)
        if isinstance(expr, ast.Name):
            found = [n.value for n in ast.walk(f) if isinstance(n, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
            return [v for a in found for v in values(a, f, tables)] if found else [expr]
        return [expr]

    written: dict[str, list[str]] = {}
    unknown = []
    for path, tables, f in functions:
        params = {a.arg for a in f.args.args}
        for call in ast.walk(f):
            if not isinstance(call, ast.Call) or _called(call) not in makers:
                continue
            kind = _kind_argument(call, makers[_called(call)])
            if kind is None:  # asyncio.Event(), another function of the same name
                continue
            for expr in values(kind, f, tables):
                if isinstance(expr, ast.Constant) and expr.value is None:
                    continue
                if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
                    written.setdefault(expr.value, []).append(f"{path}:{call.lineno}")
                elif isinstance(expr, ast.Name) and expr.id == "kind" and "kind" in params \
                        and f.name in makers:
                    continue  # passed on: its callers' kinds are read at their calls
                elif (path.parts[0] != "inventory"
                      and (path.name, f.name) not in _FOREIGN_KINDS):
                    unknown.append(f"{path}:{call.lineno} {ast.unparse(expr)}")
    assert not unknown, ("an event whose kind the source does not tell (write it as a "
                         f"literal, or from a module-level table of them): {unknown}")
    return written


def test_the_kinds_netboot_writes_are_found_in_its_source() -> None:
    # The reading must find the writers it exists for, or it would pass on finding nothing.
    written = _kinds_netboot_writes()
    assert {"discovered", "hold", "local-boot", "install-plan", "dhcp", "config", "registered",
            "reinstall", "enrolled", "merged", "nic-attached", "updated"} <= set(written)
    assert any(place.startswith("boot.py:") for place in written["local-boot"])


async def test_every_kind_netboot_writes_is_refused_as_a_device_s_report() -> None:
    # NETBOOT_KINDS was a list written by hand beside the literals that write those kinds: a
    # kind added to a writer and not to it would be a kind any install token could post as
    # netboot's own record (s33-attack's "registered", "reinstall"). The lifecycle's steps an
    # installer reports (REPORTED_STEPS) are the kinds both may write.
    store = MemoryStore()
    await store.open()
    machine = Machine(macs=(MacAddress.parse("52:54:00:00:00:33"),), hostname="r3", profile="p",
                      state=MachineState.INSTALLING)
    await store.create_machine(machine)
    enroller = Enroller(store, clock=lambda: 1000.0)
    taken = {}
    for kind, places in sorted(_kinds_netboot_writes().items()):
        if kind in enroll.REPORTED_STEPS:
            continue
        try:
            await enroller.report(machine, {"kind": kind})
        except ValidationError as refused:
            assert refused.field == "kind"
        else:
            taken[kind] = places
    assert not taken, ("kinds netboot writes that a device may report as its own: add them "
                       f"to enroll.NETBOOT_KINDS: {taken}")
    assert await store.list_events(machine.id) == []
    await store.close()


# --- every write of a machine read earlier is a compare-and-set on its version (s34-attack) --

@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def pair(request: pytest.FixtureRequest, tmp_path):  # type: ignore[no-untyped-def]
    """Two store objects on one inventory, as two servers (or the CLI in another process)
    have; a memory store cannot be shared between processes: there it is one object twice."""
    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(request.param, tmp_path, request, stack)
        await a.put_cluster(Cluster(name="edge", token="t"))
        await a.put_profile(Profile(name="p", kernel="vmlinuz"))
        yield a, b


@contextlib.contextmanager
def _meanwhile(a: Any, b: Any, mac: MacAddress,
               change: Any) -> Iterator[list[Machine]]:
    """While inside: before ``a`` writes a batch that updates or merges ``mac``'s machine
    for the first time, that machine is read and ``change``d (its version moved on) through
    ``b``, as another process sharing the inventory would write it between the writer's
    read and its write (an operator's PATCH, a device's fact, another server's step): made
    by a store wrapper at the write, not by a sleep. Yields the machines so read."""
    apply_batch = a.apply_batch
    read_then: list[Machine] = []

    async def change_first(batch: Any) -> None:
        touched = {m.id for m in batch.update} | {source for source, _ in batch.merge}
        if not read_then:
            read = await b.machine_by("mac", str(mac))
            if read is not None and read.id in touched:
                read_then.append(read)  # first: b's own write (one memory store) passes
                import dataclasses
                await b.update_machine(dataclasses.replace(change(read), updated=read.updated + 1),
                                       expect_state=read.state)
        await apply_batch(batch)

    a.apply_batch = change_first
    try:
        yield read_then
    finally:
        del a.apply_batch


def _rack(machine: Machine) -> Machine:
    import dataclasses
    return dataclasses.replace(machine, labels={**machine.labels, "rack": "r9"})


def _fact(machine: Machine) -> Machine:
    import dataclasses
    return dataclasses.replace(machine, facts={**machine.facts, "vendor": "acme"})


async def _stored(store: Any, mac: MacAddress) -> Machine:
    found = await store.machine_by("mac", str(mac))
    assert found is not None
    return found


@pytest.mark.parametrize("step", ["report", "register"])
async def test_a_devices_step_does_not_undo_an_edit_stored_since_its_read(  # type: ignore[no-untyped-def]
        pair, step: str) -> None:
    """An installer's report, its config fetch and the first boot's registration each write
    the whole machine derived from the read that checked their token: an operator's edit
    (``PATCH`` of labels, cluster, profile: here through another store on the inventory)
    committed between that read and the write kept the state, so the state-only
    compare-and-set let the write undo it, answered 201. Now the version read is compared
    too and the step made again on the machine as stored: both the edit and the step kept,
    one event."""
    import hashlib
    import ipaddress

    a, b = pair
    mac = MacAddress.parse("52:54:00:00:0d:01")
    state = {"report": MachineState.INSTALLING, "register": MachineState.INSTALLED}[step]
    await a.create_machine(Machine(macs=(mac,), hostname="d1", state=state, cluster="edge",
                                   profile="p", token_hash=hashlib.sha256(b"tok").hexdigest()))
    enroller = Enroller(a, clock=lambda: 1000.0)
    read = await _stored(a, mac)
    with _meanwhile(a, b, mac, _rack) as edited:
        if step == "report":
            await enroller.report(read, {"kind": "installed"})
        else:
            await enroller.register({"mac": str(mac), "token": "tok"},
                                    ipaddress.ip_address("192.0.2.61"))
    assert len(edited) == 1
    stored = await _stored(b, mac)
    assert stored.labels == {"rack": "r9"}, "the edit was undone"
    want = {"report": MachineState.INSTALLED, "register": MachineState.REGISTERED}[step]
    assert stored.state == want
    kind = {"report": "installed", "register": "registered"}[step]
    assert [e.kind for e in await b.list_events(stored.id)].count(kind) == 1
    if step == "register":
        # The install token's copy gone; in its place the machine token registration answered.
        assert stored.ipv4 == "192.0.2.61" and stored.install_token not in (None, "tok")


async def test_a_config_fetch_from_an_older_version_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    """The config fetch's step (booting -> installing) is written from the machine its
    config was planned from: refused on the version when an edit was stored since, nothing
    written (the HTTP server plans and renders it again: tests/test_flow.py)."""
    import hashlib

    from netboot.errors import StateChanged

    a, b = pair
    mac = MacAddress.parse("52:54:00:00:0d:05")
    await a.create_machine(Machine(macs=(mac,), hostname="d5", state=MachineState.BOOTING,
                                   cluster="edge", profile="p",
                                   token_hash=hashlib.sha256(b"tok").hexdigest()))
    read = await _stored(a, mac)
    with _meanwhile(a, b, mac, _rack), pytest.raises(StateChanged) as refused:
        await Enroller(a, clock=lambda: 1000.0).config_fetched(read, "k3OS config")
    assert refused.value.field == "updated"
    stored = await _stored(b, mac)
    assert stored.labels == {"rack": "r9"} and stored.state == MachineState.BOOTING
    assert [e.kind for e in await b.list_events(stored.id)] == []


async def test_a_devices_step_after_a_reinstall_meanwhile_is_still_refused(  # type: ignore[no-untyped-def]
        pair) -> None:
    """Made again only on the same state and token: a reinstall between the report's read
    and its write (a new state, the token gone) is the installer's 409, as before."""
    import dataclasses
    import hashlib

    from netboot.errors import StateChanged

    a, b = pair
    mac = MacAddress.parse("52:54:00:00:0d:02")
    await a.create_machine(Machine(macs=(mac,), hostname="d2", state=MachineState.INSTALLING,
                                   profile="p", token_hash=hashlib.sha256(b"tok").hexdigest()))
    read = await _stored(a, mac)

    def reinstalled(machine: Machine) -> Machine:
        return dataclasses.replace(machine, state=MachineState.ENROLLED, token_hash=None)

    with _meanwhile(a, b, mac, reinstalled), pytest.raises(StateChanged):
        await Enroller(a, clock=lambda: 1000.0).report(read, {"kind": "installed"})
    stored = await _stored(b, mac)
    assert stored.state == MachineState.ENROLLED
    assert [e.kind for e in await b.list_events(stored.id)] == []


@pytest.mark.parametrize("step", ["approve", "reinstall", "enroll", "import"])
async def test_an_operators_step_does_not_undo_what_a_device_stored_since_its_read(  # type: ignore[no-untyped-def]
        pair, step: str) -> None:
    """Approving a discovered machine, asking a reinstall, enrolling a device seen before
    (its discovered record taken over) and an import that changes a machine each write the
    machine read a moment before: a fact its boot stored in between (another server's DHCP
    note, here through another store) was overwritten with the old one. Now refused by the
    version read and made again on the machine as stored: the fact and the step kept."""
    a, b = pair
    mac = MacAddress.parse("52:54:00:00:0d:03")
    state = {"approve": MachineState.DISCOVERED, "reinstall": MachineState.REGISTERED,
             "enroll": MachineState.DISCOVERED, "import": MachineState.ENROLLED}[step]
    await a.create_machine(Machine(macs=(mac,), hostname="d3", state=state, cluster="edge",
                                   profile="p"))
    enroller = Enroller(a, clock=lambda: 1000.0)
    with _meanwhile(a, b, mac, _fact) as reported:
        if step == "approve":
            await enroller.approve(str(mac), cluster="edge", role=Role.AGENT, profile="p")
        elif step == "reinstall":
            await enroller.reinstall(str(mac))
        elif step == "enroll":
            await enroller.enroll(Machine(macs=(mac,), hostname="d3", profile="p",
                                          labels={"rack": "r1"}), "enrolled by hand")
        else:
            report = await enroller.import_rows([(2, {"mac": str(mac), "hostname": "d3b",
                                                      "profile": "p"})])
            assert report.applied and report.changed
    assert len(reported) == 1
    stored = await _stored(b, mac)
    assert stored.facts.get("vendor") == "acme", "the device's fact was undone"
    want = {"approve": (MachineState.ENROLLED, "d3"), "reinstall": (MachineState.REINSTALL, "d3"),
            "enroll": (MachineState.ENROLLED, "d3"),
            "import": (MachineState.ENROLLED, "d3b")}[step]
    assert (stored.state, stored.hostname) == want
    if step == "enroll":
        assert stored.labels == {"rack": "r1"}


async def test_auto_enrollment_from_an_older_version_is_refused(pair) -> None:  # type: ignore[no-untyped-def]
    """Auto-enrollment (the boot path's, under its lock) writes the discovered record as read:
    refused on the version when the record was changed since (the boot path then decides
    again from what is stored, errors.DECIDE_ATTEMPTS); nothing written."""
    from netboot.errors import StateChanged
    from netboot.model import Group

    a, b = pair
    mac = MacAddress.parse("52:54:00:00:0d:04")
    await a.create_machine(Machine(macs=(mac,), state=MachineState.DISCOVERED))
    read = await _stored(a, mac)
    group = Group(name="all", selector={"mac": (str(mac),)}, cluster="edge", profile="p")
    with _meanwhile(a, b, mac, _fact), pytest.raises(StateChanged) as refused:
        await Enroller(a, clock=lambda: 1000.0).auto_enroll(read, group)
    assert refused.value.field == "updated"
    stored = await _stored(b, mac)
    assert stored.state == MachineState.DISCOVERED and stored.facts == {"vendor": "acme"}


async def test_an_expired_token_asked_with_again_is_recorded_once_whatever_it_asks(  # type: ignore[no-untyped-def]
        store) -> None:
    """The first refusal of an expired install token for each step it asks (its config, a
    report) is recorded (``token expired``), later ones not. Only the newest event was
    compared: a holder of the expired token alternating its config and a report made each
    refusal's message differ from the newest, so every request wrote an event, without
    bound, long after the token expired (s34-attack)."""
    import hashlib

    from netboot import lifecycle
    from netboot.errors import AuthError

    mac = MacAddress.parse("52:54:00:00:0e:01")
    machine = Machine(macs=(mac,), hostname="e1", state=MachineState.INSTALLING, profile="p",
                      token_hash=hashlib.sha256(b"tok").hexdigest(), token_expires=500.0)
    await store.create_machine(machine)
    enroller = Enroller(store, clock=lambda: 1000.0)
    for n in range(30):
        with pytest.raises(AuthError, match="expired"):
            if n % 2:
                await enroller.refuse_expired(machine, "report")
            else:
                await enroller.check_token(machine, "tok", lifecycle.Trigger.CONFIG_FETCHED,
                                           refused="no")
    events = await store.list_events(machine.id)
    assert [e.kind for e in events] == ["token expired"] * 2, events
    assert "(config-fetched refused)" in events[0].message
    assert "(report refused)" in events[1].message
    # Another process (or this one restarted) finds them among the newest events.
    again = Enroller(store, clock=lambda: 1000.0)
    for what in ("report", "config-fetched"):
        with pytest.raises(AuthError):
            await again.refuse_expired(machine, what)
    assert len(await store.list_events(machine.id)) == 2


async def test_enrolling_a_device_whose_discover_is_recorded_meanwhile_takes_its_record_over(
        store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An operator enrolls a MAC as the device powers on: its DISCOVER's discovered record is
    written between the enrollment's read (which found nothing) and its write, which the
    store then refuses as the MAC's holder. That record is the same device: it is read again
    and taken over, not a 409 (seen as tests/test_metrics.py's POST refused 1 time in 6)."""
    from netboot import identity
    from netboot.model import Event

    mac = MacAddress.parse("52:54:00:00:06:01")
    seen = Machine(macs=(mac,), state=MachineState.DISCOVERED, facts={"product": "Box"})
    await store.create_machine(seen)
    await store.add_event(Event(seen.id, 1.0, "discovered"))
    real = identity.matches
    reads = []

    async def first_read_before_the_record(*args: Any, **kw: Any) -> Any:
        reads.append(1)
        return [] if len(reads) == 1 else await real(*args, **kw)

    monkeypatch.setattr(identity, "matches", first_read_before_the_record)
    made = await Enroller(store).enroll(Machine(macs=(mac,), hostname="six"), "enrolled by test")
    assert len(reads) == 2
    assert made.id == seen.id and made.state == MachineState.ENROLLED
    m = await store.machine_by("mac", str(mac))
    assert m.id == seen.id and m.hostname == "six" and m.facts["product"] == "Box"
    assert await store.count_machines() == 1


# --- registration again, and later boots (s37-register) --------------------------------------

def _audited(machine: Machine) -> Any:
    from netboot.model import AuditEntry

    return AuditEntry(time=1.0, actor=f"machine:{machine.id}", action="POST /register",
                      target=machine.id, peer="-", outcome="200")


async def test_a_registration_made_again_from_where_it_registered_is_answered_as_the_first(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """The device's connection dropped after netboot committed: its register command retries
    with the spent install token. From the address it registered (or reporting it), that is
    answered as the first was (the same machine token), nothing moved, one event saying it
    was a repeat; from another address, with another token or after a reinstall, refused as
    before."""
    import ipaddress

    from netboot.errors import AuthError, TransitionRefused

    store = every_store
    mac = await _installed(store, "52:54:00:00:37:01", "r1")
    enroller = Enroller(store, clock=lambda: 1000.0)
    at = ipaddress.ip_address("192.0.2.70")
    body = {"mac": str(mac), "token": "tok"}
    first = await enroller.register(body, at, audit=_audited)
    assert first.state == MachineState.REGISTERED and first.install_token
    enroller._clock = lambda: 2000.0  # a repeat stamps nothing: its updated stays 1000
    again = await enroller.register(body, at, audit=_audited)
    assert again.install_token == first.install_token and again.state == first.state
    # It registered from its own address (the request's): a report of that address from
    # elsewhere is no repeat (s38-attack; the proxy case, where it registered by report, is
    # test_a_spent_install_token_repeats_only_with_the_evidence_it_registered_with).
    with pytest.raises(TransitionRefused):
        await enroller.register({**body, "addresses": ["192.0.2.70"]},
                                ipaddress.ip_address("127.0.0.1"), audit=_audited)
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.updated == 1000.0 and stored.ipv4 == "192.0.2.70"
    assert stored.install_token == first.install_token
    again = await enroller.register(body, at, audit=_audited)  # its retry, repeated
    assert again.install_token == first.install_token
    kinds = [e.kind for e in await store.list_events(first.id)]
    # Once while it repeats from one place: each audited.
    assert kinds == ["registered", "registration repeated"], kinds
    assert "192.0.2.70" in (await store.list_events(first.id))[-1].message
    again = await enroller.register(body, at, audit=_audited)
    assert len(await store.list_events(first.id)) == 2
    assert [a.outcome for a in await store.list_audit()] == ["200"] * 4
    # From elsewhere: the 409 naming its state, nothing written.
    with pytest.raises(TransitionRefused) as refused:
        await enroller.register(body, ipaddress.ip_address("192.0.2.71"), audit=_audited)
    assert refused.value.state == MachineState.REGISTERED
    with pytest.raises(TransitionRefused):
        await enroller.register({**body, "addresses": ["192.0.2.71"]},
                                ipaddress.ip_address("127.0.0.1"))
    with pytest.raises(AuthError):
        await enroller.register({**body, "token": "not-its-token"}, at)
    assert len(await store.list_events(first.id)) == 2 and len(await store.list_audit()) == 4
    # After a reinstall its old token is no token of its (401), nor its machine token.
    await enroller.reinstall(str(mac))
    with pytest.raises(AuthError):
        await enroller.register(body, at)
    with pytest.raises(AuthError):
        await enroller.register({"mac": str(mac), "machine_token": first.install_token}, at)


async def test_a_repeat_from_a_new_address_within_the_hour_is_its_device_whose_lease_changed(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A registration whose answer was lost, retried from another address (the device's lease
    changed meanwhile): within an hour of the registration, with the /etc/machine-id the
    registration reported, it is answered as the first (the same machine token) and the
    machine moves there, one event saying from where to where; its next retries from there
    are repeats. Refused (409, nothing written) after the hour, with another or no
    machine-id, for a machine with fixed_ipv4. (Before s38-journey: 409 until a reinstall.)"""
    import ipaddress

    from netboot.errors import TransitionRefused

    store = every_store
    mac = await _installed(store, "52:54:00:00:38:01", "r1")
    enroller = Enroller(store, clock=lambda: 1000.0)
    body = {"mac": str(mac), "token": "tok", "machine_id": "0123abcd"}
    first = await enroller.register(body, ipaddress.ip_address("192.0.2.70"), audit=_audited)
    enroller._clock = lambda: 1000.0 + REPEAT_ELSEWHERE_SECONDS - 1
    # Not the device: another machine-id, none, an address that is no address to register.
    for other in ({**body, "machine_id": "ffff"}, {k: v for k, v in body.items()
                                                    if k != "machine_id"}):
        with pytest.raises(TransitionRefused):
            await enroller.register(other, ipaddress.ip_address("198.51.100.9"), audit=_audited)
    with pytest.raises(TransitionRefused):
        await enroller.register(body, ipaddress.ip_address("127.0.0.1"), audit=_audited)
    assert [e.kind for e in await store.list_events(first.id)] == ["registered"]
    moved = await enroller.register(body, ipaddress.ip_address("192.0.2.71"), audit=_audited)
    assert moved.install_token == first.install_token and moved.ipv4 == "192.0.2.71"
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.71"
    assert stored.state == MachineState.REGISTERED and stored.install_token == first.install_token
    event = (await store.list_events(first.id))[-1]
    assert event.kind == "registration repeated" and "192.0.2.70 -> 192.0.2.71" in event.message
    again = await enroller.register(body, ipaddress.ip_address("192.0.2.71"), audit=_audited)
    assert again.install_token == first.install_token
    # After the hour: the 409 it was.
    enroller._clock = lambda: 1000.0 + REPEAT_ELSEWHERE_SECONDS + 1
    with pytest.raises(TransitionRefused):
        await enroller.register(body, ipaddress.ip_address("192.0.2.72"), audit=_audited)
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.71"
    # A machine the operator gave its address: never from elsewhere.
    pinned = await _installed(store, "52:54:00:00:38:02", "r2")
    machine = await store.machine_by("mac", str(pinned))
    await store.update_machine(replace_machine(machine, fixed_ipv4="192.0.2.80"))
    enroller._clock = lambda: 5000.0
    fixed = {"mac": str(pinned), "token": "tok", "machine_id": "4567"}
    await enroller.register(fixed, ipaddress.ip_address("192.0.2.80"))
    with pytest.raises(TransitionRefused):
        await enroller.register(fixed, ipaddress.ip_address("192.0.2.81"))


async def test_an_installs_secret_proves_its_repeats_and_nothing_else_does(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A registration that sent the register command's per-install secret (s39-journey):
    the store keeps its sha256 alone (no copy of the secret anywhere in the document); a
    repeat with it is the same install wherever and whenever it comes (a lease changed, a
    day later, another machine-id: a k3OS boot), moved there unless fixed_ipv4; one without
    it, or with another, is the 409 even from the registered address (where a local process
    reading the config got the machine token before) and within the hour with the
    machine-id. A reinstall forgets the digest."""
    import hashlib
    import ipaddress

    from netboot.errors import AuthError, TransitionRefused
    from netboot.inventory import codec

    store = every_store
    secret = "0b6f3c1e-9a41-4c52-8d7e-2f1a6b3c4d5e"
    mac = await _installed(store, "52:54:00:00:39:01", "s1")
    enroller = Enroller(store, clock=lambda: 1000.0)
    body = {"mac": str(mac), "token": "tok", "machine_id": "c1a0", "install_secret": secret,
            "keeps": "machine_token"}
    at = ipaddress.ip_address("192.0.2.70")
    first = await enroller.register(body, at, audit=_audited)
    stored = await store.get_machine(first.id)
    assert stored is not None
    assert stored.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(stored) and secret not in codec.machine_json(stored)
    assert "secret_hash" not in codec.machine_to_dict(stored, secrets=False)
    enroller._clock = lambda: 1001.0
    # Not its install: no secret, another one, from its own address too, with its machine-id.
    for other in ({k: v for k, v in body.items() if k != "install_secret"},
                  {**body, "install_secret": ""}, {**body, "install_secret": secret + "x"}):
        for peer in ("192.0.2.70", "192.0.2.71"):
            with pytest.raises(TransitionRefused):
                await enroller.register(other, ipaddress.ip_address(peer), audit=_audited)
    # Each told once (s40-sec: a "registration contested" event, its place and its claim).
    assert [e.kind for e in await store.list_events(first.id)] == [
        "registered", *["registration contested"] * 5]
    # Its install, from where it registered: answered as the first.
    again = await enroller.register(body, at)
    assert again.install_token == first.install_token and again.ipv4 == "192.0.2.70"
    # A day later, from a new lease, with a new machine-id (k3OS's /etc is in memory).
    enroller._clock = lambda: 1000.0 + 86400
    moved = await enroller.register({**body, "machine_id": "d2b1"},
                                    ipaddress.ip_address("192.0.2.72"))
    assert moved.install_token == first.install_token and moved.ipv4 == "192.0.2.72"
    event = (await store.list_events(first.id))[-1]
    assert event.kind == "registration repeated" and "192.0.2.70 -> 192.0.2.72" in event.message
    assert "secret" in event.message and secret not in event.message
    # A fixed_ipv4 stays: answered, not moved.
    machine = await store.get_machine(first.id)
    await store.update_machine(replace_machine(machine, fixed_ipv4="192.0.2.80"))
    kept = await enroller.register(body, ipaddress.ip_address("192.0.2.73"))
    assert kept.install_token == first.install_token
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.72"
    # A reinstall: the token goes, and the secret opens nothing with it (its digest is kept,
    # inert, for a reinstall the operator takes back: s41-attack, the test below).
    await enroller.reinstall(str(mac))
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.token_hash is None and stored.install_token is None
    with pytest.raises(AuthError):
        await enroller.register(body, at)
    with pytest.raises(AuthError):  # nor its machine token with the secret, while reinstalling
        await enroller.register({"mac": str(mac), "machine_token": first.install_token,
                                 "install_secret": secret}, at)


async def test_a_reinstall_taken_back_registers_the_node_that_still_runs_it(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A registered server reinstalled by mistake, taken back with mark-installed (README:
    "a reinstall asked by mistake, taken back"; the dashboard's Mark installed): its node
    never stopped, but the reinstall voided its machine token, so each later boot's report
    was a 401 and the machine stayed ``installed`` for good: out of its cluster's endpoint
    and DNS name, every node installed next held waiting for a first server that ran all
    along (seen on a live server: ``waiting for cluster edge2's first server to register``),
    until a real reinstall wiped it. Now its install's secret, which every try sends, proves
    the install it still runs: registered again, a new machine token, moved where it is.
    Nothing else opens it: not before the operator's word, not without the secret, not once
    a new install is under way."""
    import hashlib
    import ipaddress

    from netboot.errors import AuthError

    store = every_store
    now = [1000.0]
    mac = await _installed(store, "52:54:00:00:41:11", "s41")
    enroller = Enroller(store, clock=lambda: now[0])
    secret = "5d0e2f6a-1b3c-4d5e-8f70-a1b2c3d4e5f6"
    first = await enroller.register({"mac": str(mac), "token": "tok", "install_secret": secret,
                                     "keeps": "machine_token"}, ipaddress.ip_address("192.0.2.70"))
    boot = {"mac": str(mac), "machine_token": first.install_token, "install_secret": secret,
            "keeps": "machine_token"}
    now[0] += 60
    await enroller.reinstall(str(mac))
    with pytest.raises(AuthError):  # asked: the node is refused (its reinstall stands)
        await enroller.register(boot, ipaddress.ip_address("192.0.2.71"))
    machine = await store.get_machine(first.id)
    assert machine is not None
    await enroller.report(machine, {"kind": "installed", "message": "taken back"})
    for wrong in ({**boot, "install_secret": "guess"}, {k: v for k, v in boot.items()
                                                        if k != "install_secret"}):
        with pytest.raises(AuthError):
            await enroller.register(wrong, ipaddress.ip_address("192.0.2.71"))
    now[0] += 60
    again = await enroller.register(boot, ipaddress.ip_address("192.0.2.71"))
    assert again.state == MachineState.REGISTERED and again.ipv4 == "192.0.2.71"
    assert again.install_token and again.install_token != first.install_token
    assert again.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    event = (await store.list_events(first.id))[-1]
    assert event.kind == "registered" and "taken back" in event.message
    # Its next boot reports with the new machine token, as any registered machine's.
    moved = await enroller.register({**boot, "machine_token": again.install_token},
                                    ipaddress.ip_address("192.0.2.72"))
    assert moved.ipv4 == "192.0.2.72"
    # A reinstall that goes on: once its new install is under way (an install token of its
    # own), the old install's secret opens nothing, and it is gone at the next registration.
    await enroller.reinstall(str(mac))
    machine = await store.get_machine(first.id)
    assert machine is not None
    await store.update_machine(replace_machine(
        machine, state=MachineState.INSTALLED, updated=now[0] + 1,
        token_hash=hashlib.sha256(b"tok2").hexdigest()))
    with pytest.raises(AuthError):
        await enroller.register({**boot, "machine_token": again.install_token},
                                ipaddress.ip_address("192.0.2.71"))
    newest = await enroller.register({"mac": str(mac), "token": "tok2",
                                      "install_secret": "its-new-install"},
                                     ipaddress.ip_address("192.0.2.73"))
    assert newest.secret_hash == hashlib.sha256(b"its-new-install").hexdigest()


async def _registered_then_restored(store: Any, mac_text: str, hostname: str, node: Any,
                                   now: list[float]) -> tuple[Enroller, Machine, dict[str, Any]]:
    """An installed machine registered from ``node`` (install secret "s"), then the
    inventory restored from before that registration (60 s later on ``now``): the enroller,
    the machine as registered, and its node's later-boot body (the machine token it holds)."""
    mac = await _installed(store, mac_text, hostname)
    enroller = Enroller(store, clock=lambda: now[0])
    backup = await enroller.find_mac(mac)
    assert backup is not None
    first = await enroller.register({"mac": str(mac), "token": "tok", "install_secret": "s",
                                     "keeps": "machine_token"}, node)
    boot = {"mac": str(mac), "machine_token": first.install_token, "install_secret": "s",
            "keeps": "machine_token"}
    now[0] += 60
    await store.update_machine(replace_machine(backup, updated=now[0]))  # the restore
    return enroller, first, boot


async def test_a_refused_later_boot_of_a_known_machine_is_told_on_it(store) -> None:  # type: ignore[no-untyped-def]
    """A later boot refused for its machine token (the same 401 as an unknown MAC's) is a
    ``registration refused`` event on the machine, with why and the way out: an inventory
    restored from a backup taken before the machine's registration, then marked installed,
    refused its node at every boot, and a reinstall that stands refused its node's 30 tries a
    boot, with nothing in the machine's history (s41-attack's leftovers). Told once while
    the same, bounded against a host posting the MAC from many places; never the token."""
    import ipaddress

    from netboot.enroll import REFUSED_BOOT_BURST
    from netboot.errors import AuthError

    def refusals(events: Any) -> list[Any]:
        return [e for e in events if e.kind == "registration refused"]

    now = [1000.0]
    node = ipaddress.ip_address("192.0.2.80")
    # The backup restored: the machine as it was before it registered (installed, the
    # operator's Mark installed changing nothing of it), the node's machine token unknown.
    enroller, first, boot = await _registered_then_restored(store, "52:54:00:00:42:01", "b42",
                                                            node, now)
    mac = first.mac
    for _ in range(30):  # one boot's tries
        with pytest.raises(AuthError, match="unknown machine or wrong token"):
            await enroller.register(boot, node)
    await enroller.recorder.flush()
    told = refusals(await store.list_events(first.id))
    assert len(told) == 1, told
    assert "192.0.2.80" in told[0].message and "installed" in told[0].message
    assert f"netboot machines reinstall {first.ref}" in told[0].message
    assert first.install_token not in told[0].message + repr(told[0].data)
    # Registered again, then reinstalled: the reinstall stands, the old install's node is told
    # refused, with the operator's two ways out.
    machine = await store.get_machine(first.id)
    assert machine is not None
    await store.update_machine(replace_machine(machine, state=MachineState.REGISTERED,
                                               install_token=first.install_token,
                                               updated=now[0] + 1))
    now[0] += 60
    await enroller.reinstall(str(mac))
    with pytest.raises(AuthError, match="unknown machine or wrong token"):
        await enroller.register(boot, node)
    await enroller.recorder.flush()
    newest = refusals(await store.list_events(first.id))[-1]
    assert "reinstall" in newest.message and "mark-installed" in newest.message, newest
    # A host posting the MAC from many places: bounded.
    for i in range(20):
        with pytest.raises(AuthError):
            await enroller.register({**boot, "machine_token": f"guess{i}"},
                                    ipaddress.ip_address(f"192.0.2.{100 + i}"))
    await enroller.recorder.flush()
    assert len(refusals(await store.list_events(first.id))) <= 1 + REFUSED_BOOT_BURST
    # An unknown MAC: the same answer, nothing written anywhere.
    with pytest.raises(AuthError, match="unknown machine or wrong token"):
        await enroller.register({**boot, "mac": "52:54:00:00:42:99"}, node)


async def test_a_restored_machines_node_registers_again_only_by_its_claim(store) -> None:  # type: ignore[no-untyped-def]
    """After a restore from before its registration (installed, no install's secret kept),
    the node's refused boot names the claim of its secret; only that claim, given by the
    operator, lets its next try register (a new machine token); a claim nobody made is
    refused, and another secret is refused after the claim too (s49-ha)."""
    import hashlib
    import ipaddress

    from netboot.errors import AuthError, NotFound

    now = [1000.0]
    node = ipaddress.ip_address("192.0.2.81")
    enroller, first, boot = await _registered_then_restored(store, "52:54:00:00:49:01", "r49",
                                                            node, now)
    with pytest.raises(AuthError):
        await enroller.register(boot, node)
    await enroller.recorder.flush()
    told = [e for e in await store.list_events(first.id) if e.kind == "registration refused"]
    claim = hashlib.sha256(b"s").hexdigest()
    assert told[-1].data["claim"] == claim and f"claim {first.ref} {claim}" in told[-1].message
    with pytest.raises(NotFound):
        await enroller.give_to_claim(first.ref, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(AuthError):  # nothing taken before the operator's word
        await enroller.register(boot, node)
    now[0] += 1
    given = await enroller.give_to_claim(first.ref, claim)
    assert given.state is MachineState.INSTALLED and given.token_hash is None
    with pytest.raises(AuthError):
        await enroller.register({**boot, "install_secret": "other"}, node)
    again = await enroller.register(boot, node)
    assert again.state is MachineState.REGISTERED
    assert again.install_token and again.install_token != first.install_token


async def test_a_restored_machines_refused_boot_says_whether_it_came_from_its_device(  # type: ignore[no-untyped-def]
        store) -> None:
    """A restored machine's later boot is refused without any token asked (its machine
    token is unknown to the restored inventory), and the event names the claim of the
    secret it sent with the command that gives the machine to it (s49-ha): any host on the
    VLAN that knows the MAC (every DHCP broadcast of the machine shows it) could post one,
    and before, its event read as the device's. Now each says where it came from against
    the address the machine's install was served to (the boot path's install_peer fact,
    which the backup holds): a stranger's says it is not there."""
    import hashlib
    import ipaddress

    from netboot.errors import AuthError

    now = [1000.0]
    node = ipaddress.ip_address("192.0.2.82")
    enroller, first, boot = await _registered_then_restored(store, "52:54:00:00:50:01", "r50",
                                                            node, now)
    restored = await store.get_machine(first.id)
    assert restored is not None
    await store.update_machine(replace_machine(
        restored, facts={**restored.facts, "install_peer": "192.0.2.82"}, updated=now[0] + 1))
    with pytest.raises(AuthError):
        await enroller.register({"mac": str(first.mac), "machine_token": "guess",
                                 "install_secret": "stranger"}, ipaddress.ip_address("192.0.2.99"))
    with pytest.raises(AuthError):
        await enroller.register(boot, node)
    await enroller.recorder.flush()
    told = {e.data["claim"]: e.message for e in await store.list_events(first.id)
            if e.kind == "registration refused"}
    stranger = told[hashlib.sha256(b"stranger").hexdigest()]
    device = told[hashlib.sha256(b"s").hexdigest()]
    assert ("it came from 192.0.2.99, not from 192.0.2.82, the address its install was "
            "served to: any host that knows the MAC can send one") in stranger, stranger
    assert "it came from 192.0.2.82, the address its install was served to)" in device, device


async def _registered_by_a_thief(store: Any, mac_text: str, hostname: str, now: list[float],
                                 secret: str) -> tuple[Enroller, MacAddress, dict[str, str],
                                                       Machine]:
    """An installed machine registered first by a host that read its install token, with a
    secret of its own (README "What a host on the provisioning network can take"): the
    enroller (its clock ``now[0]``), the MAC, the host's body and the machine as registered."""
    import ipaddress

    mac = await _installed(store, mac_text, hostname)
    enroller = Enroller(store, clock=lambda: now[0])
    thief = {"mac": str(mac), "token": "tok", "install_secret": secret,
             "keeps": "machine_token"}
    held = await enroller.register(thief, ipaddress.ip_address("192.0.2.66"), audit=_audited)
    return enroller, mac, thief, held


async def test_a_refused_claim_is_told_bounded_and_the_operator_gives_the_machine_to_it(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A host on the VLAN with a machine's install token registers it first, with its own
    secret; the real device's registration (its own install's secret) is refused. Before,
    nothing was recorded: the operator never learnt a second host claimed the machine. Now
    a "registration contested" event names where it came from and its claim (the digest of
    its secret, never the secret); a flood from many addresses is told at most
    CONTEST_BURST times, then one a CONTEST_EVERY; the operator gives the machine to the
    claim in one step (no reinstall): the device's next try is answered and moved to its
    address, the first host's machine token is void and its secret refused."""
    import hashlib
    import ipaddress

    from netboot.enroll import CONTEST_BURST, CONTEST_EVERY
    from netboot.errors import AuthError, NotFound, TransitionRefused

    store = every_store
    now = [1000.0]
    enroller, mac, thief, held = await _registered_by_a_thief(
        store, "52:54:00:00:40:01", "c1", now, "7e1d0c55-thief")
    device_secret = "3f0a9c2e-5b7d-4e1f-a6c8-d9e0f1a2b3c4"
    device = {**thief, "install_secret": device_secret, "machine_id": "d1"}
    claim = hashlib.sha256(device_secret.encode()).hexdigest()
    for _ in range(3):  # its retries from one place: told once
        with pytest.raises(TransitionRefused):
            await enroller.register(device, ipaddress.ip_address("192.0.2.10"))
    told = [e for e in await store.list_events(held.id) if e.kind == "registration contested"]
    assert len(told) == 1 and "192.0.2.10" in told[0].message and claim in told[0].message
    assert told[0].data == {"peer": "192.0.2.10", "claim": claim}
    assert device_secret not in repr(await store.list_events(held.id))
    # A flood from many addresses (anyone who read the config has the spent token).
    for i in range(40):
        with pytest.raises(TransitionRefused):
            await enroller.register({**device, "install_secret": f"flood-{i}"},
                                    ipaddress.ip_address(f"198.51.100.{i + 1}"))
    told = [e for e in await store.list_events(held.id) if e.kind == "registration contested"]
    assert len(told) == CONTEST_BURST
    now[0] += CONTEST_EVERY
    with pytest.raises(TransitionRefused):
        await enroller.register(device, ipaddress.ip_address("192.0.2.11"))
    told = [e for e in await store.list_events(held.id) if e.kind == "registration contested"]
    assert len(told) == CONTEST_BURST + 1 and "192.0.2.11" in told[-1].message
    # Given to the device's claim: a claim never made is a NotFound.
    with pytest.raises(NotFound):
        await enroller.give_to_claim(str(mac), "0" * 64)
    given = await enroller.give_to_claim(str(mac), claim)
    assert given.secret_hash == claim and not given.install_token
    assert (await store.list_events(held.id))[-1].kind == "registration claimed"
    answered = await enroller.register(device, ipaddress.ip_address("192.0.2.12"))
    assert answered.install_token and answered.install_token != held.install_token
    stored = await store.get_machine(held.id)
    assert stored is not None and stored.ipv4 == "192.0.2.12"
    assert stored.state == MachineState.REGISTERED
    with pytest.raises(AuthError):  # the first host's machine token is void
        await enroller.register({"mac": str(mac), "machine_token": held.install_token},
                                ipaddress.ip_address("192.0.2.66"))
    with pytest.raises(TransitionRefused):  # and its secret no longer proves anything
        await enroller.register(thief, ipaddress.ip_address("192.0.2.66"))


@pytest.mark.parametrize("where", ["here", "by the CLI", "by another server"])
async def test_a_claim_refused_before_a_reinstall_is_not_given_to_the_next_install(  # type: ignore[no-untyped-def]
        every_store, where: str) -> None:
    """A host registered the machine first and the device's registration was refused (its
    claim kept and told); the operator reinstalled the machine instead (README's other way
    out) and the device registered its new install. Before, the old install's claim (its
    event, and this server's kept copy: never forgotten but when given) could still be
    given to the new registration: the device's machine token voided and its new secret
    refused at every try, until another reinstall. Now a claim counts only against the
    registration it was refused by: a 404, and nothing of the old one is listed."""
    import hashlib
    import ipaddress

    from netboot.errors import NotFound, TransitionRefused

    store = every_store
    now = [1000.0]
    enroller, mac, thief, held = await _registered_by_a_thief(
        store, "52:54:00:00:41:01", "c41", now, "thief")
    device = {**thief, "install_secret": "first-install-of-the-device"}
    old_claim = hashlib.sha256(b"first-install-of-the-device").hexdigest()
    for _ in range(3):
        with pytest.raises(TransitionRefused):
            await enroller.register(device, ipaddress.ip_address("192.0.2.10"))
    assert [h.claim for h in enroller.claims.held(await store.get_machine(held.id))] == [old_claim]
    now[0] += 60
    other = Enroller(store, clock=lambda: now[0])  # the CLI, or the other server of a pair
    await (enroller if where == "here" else other).reinstall(str(mac))
    if where == "here":
        # GET .../claims lists none of it
        assert enroller.claims.held(await store.get_machine(held.id)) == []
    # Its new install (a new install token), registered by the device from its address.
    machine = await store.get_machine(held.id)
    await store.update_machine(replace_machine(
        machine, state=MachineState.INSTALLED, updated=now[0],
        token_hash=hashlib.sha256(b"tok2").hexdigest()))
    now[0] += 600
    second = {**device, "token": "tok2", "install_secret": "second-install"}
    registrar = other if where == "by another server" else enroller
    registered = await registrar.register(second, ipaddress.ip_address("192.0.2.10"))
    assert registered.state == MachineState.REGISTERED
    if where != "by another server":
        assert enroller.claims.held(await store.get_machine(held.id)) == []
    with pytest.raises(NotFound) as refused:
        await enroller.give_to_claim(str(mac), old_claim)
    assert f"sent {old_claim}" not in str(refused.value)  # nor offered among the kept
    # The device's new install is still the one held: its repeat is answered.
    again = await enroller.register(second, ipaddress.ip_address("192.0.2.10"))
    assert again.install_token == registered.install_token


async def _a_thief(store: Any, mac_text: str, hostname: str
                   ) -> tuple[list[float], Enroller, MacAddress, dict[str, str]]:
    """An installed machine (_installed), an enroller whose clock is the list's one value,
    and the registration body of a host that read the machine's install token and sends a
    secret of its own."""
    now = [1000.0]
    mac = await _installed(store, mac_text, hostname)
    thief = {"mac": str(mac), "token": "tok", "install_secret": "7e1d0c55-thief",
             "keeps": "machine_token"}
    return now, Enroller(store, clock=lambda: now[0]), mac, thief


async def test_a_claim_refused_against_an_earlier_registration_is_not_given_the_machine(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """give_to_claim took any claim among the machine's newest events or kept claims, also
    one refused against an earlier holder: after the machine was given to its device's
    claim, or reinstalled and registered by its new install, a flood's claim (or the old
    install's) refused before was still given the machine, taking it from its device and
    voiding its machine token (s41-review). Only a claim refused since the registration
    that holds the machine now is given it; GET .../claims lists those alone."""
    import hashlib
    import ipaddress

    from netboot.errors import NotFound, TransitionRefused

    def claim_of(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    store = every_store
    now, enroller, mac, thief = await _a_thief(store, "52:54:00:00:40:02", "c2")
    flood = {**thief, "install_secret": "flood-0c9d"}
    device = {**thief, "install_secret": "3f0a9c2e-device"}
    await enroller.register(thief, ipaddress.ip_address("192.0.2.66"))
    now[0] += 1
    for body, peer in ((flood, "198.51.100.7"), (device, "192.0.2.10")):
        with pytest.raises(TransitionRefused):
            await enroller.register(body, ipaddress.ip_address(peer))
    now[0] += 1
    await enroller.give_to_claim(str(mac), claim_of(device["install_secret"]))
    now[0] += 1
    # The flood's claim was the thief's rival, refused before the device was given it.
    with pytest.raises(NotFound, match="since its registration"):
        await enroller.give_to_claim(str(mac), claim_of(flood["install_secret"]))
    answered = await enroller.register(device, ipaddress.ip_address("192.0.2.10"))
    assert answered.secret_hash == claim_of(device["install_secret"])
    now[0] += 1
    with pytest.raises(TransitionRefused):  # the device's rival, kept and told
        await enroller.register(flood, ipaddress.ip_address("198.51.100.7"))
    assert [h.claim for h in enroller.claims.held(await store.get_machine(answered.id))] == [
        claim_of(flood["install_secret"])]
    # Reinstalled; its new install registers with its own secret.
    now[0] += 1
    await enroller.reinstall(str(mac))
    stored = await store.get_machine(answered.id)
    assert stored is not None
    await store.update_machine(replace_machine(
        stored, state=MachineState.INSTALLED, updated=now[0],
        token_hash=hashlib.sha256(b"tok2").hexdigest()))
    now[0] += 1
    second = {**device, "token": "tok2", "install_secret": "9b8a7c6d-device-2"}
    registered = await enroller.register(second, ipaddress.ip_address("192.0.2.10"))
    now[0] += 1
    with pytest.raises(NotFound):  # refused against the earlier install's registration
        await enroller.give_to_claim(str(mac), claim_of(flood["install_secret"]))
    assert enroller.claims.held(registered) == []
    # Refused again (the new install's spent token, read from its config), now against
    # this registration: given, as any rival the operator picks.
    now[0] += 1
    with pytest.raises(TransitionRefused):
        await enroller.register({**flood, "token": "tok2"},
                                ipaddress.ip_address("198.51.100.7"))
    given = await enroller.give_to_claim(str(mac), claim_of(flood["install_secret"]))
    assert given.secret_hash == claim_of(flood["install_secret"])


async def test_the_time_in_a_state_is_kept_by_every_store_and_filtered_on(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A machine's state_since (s39-journey): None while it was never changed (read as its
    creation: no slot for the unbooted machines of a storm), its step's own time when its
    state changes, untouched by a learnt fact or an edit (``updated``); read back alike by
    every store, one float with ``updated`` when the state changed at the last update; the
    listing's ``in_state_before`` and sort ``state_since`` take the creation time for
    never-changed machines."""
    from netboot.inventory.base import MachineFilter

    store = every_store
    for mac in ("52:54:00:00:39:11", "52:54:00:00:39:12"):
        await store.create_machine(Machine(macs=(MacAddress.parse(mac),), cluster="edge",
                                           profile="p", created=100.0, updated=100.0))
    still = await store.machine_by("mac", "52:54:00:00:39:11")
    assert still is not None and still.state_since is None and still.in_state_since == 100.0
    enroller = Enroller(store, clock=lambda: 1000.5)
    moved = await enroller.reinstall("52:54:00:00:39:12")
    assert moved.state_since is moved.updated == 1000.5
    stored = await store.machine_by("mac", "52:54:00:00:39:12")
    assert stored is not None and stored.state_since == 1000.5
    if not isinstance(store, MemoryStore):
        assert stored.state_since is stored.updated  # decoded as one float
    await store.update_machine(replace_machine(stored, facts={"product": "x"}, updated=2000.25))
    stored = await store.machine_by("mac", "52:54:00:00:39:12")
    assert stored is not None and stored.updated == 2000.25 and stored.state_since == 1000.5

    async def listed(**flt: Any) -> list[str]:
        return [str(m.mac) for m in await store.list_machines(MachineFilter(**flt))]

    assert await listed(in_state_before=1500.0) == ["52:54:00:00:39:11", "52:54:00:00:39:12"]
    assert await listed(in_state_before=500.0) == ["52:54:00:00:39:11"]
    assert await listed(in_state_before=50.0) == []
    assert await listed(sort="state_since", descending=True) == [
        "52:54:00:00:39:12", "52:54:00:00:39:11"]
    assert await store.count_machines(MachineFilter(in_state_before=500.0)) == 1


async def test_a_config_fetch_that_moves_the_state_stamps_its_time(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """config_fetched writes lifecycle.advance's step out (s39-http1st): a fetch that moves
    the machine's state stamps state_since with the step's own time, as advance does; one
    that keeps the state keeps the machine as it is."""
    store = every_store
    await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:00:39:21"),),
                                       state=MachineState.BOOTING, cluster="edge",
                                       profile="p", created=100.0, updated=100.0))
    read = await store.machine_by("mac", "52:54:00:00:39:21")
    assert read is not None and read.state_since is None
    await Enroller(store, clock=lambda: 1000.5).config_fetched(read, "k3OS config")
    moved = await store.machine_by("mac", "52:54:00:00:39:21")
    assert moved is not None and moved.state != MachineState.BOOTING
    assert moved.state_since == moved.updated == 1000.5


async def test_what_a_spent_token_gives_a_stranger_within_the_hour(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """The rule's cost, as README "Registration and later boots" states it. The spent
    install token alone (it is in the config and its URL) moves nothing from elsewhere, even
    a second after the registration: the 409 it was. With the machine-id too (it crossed
    plain HTTP in the registration; a read token sees it among the facts), within the hour, a
    stranger gets the machine token and the machine's address, as whoever watched that
    traffic could; the event names both addresses, and the device's next boot with its
    machine token moves it back. After the hour, the 409."""
    import ipaddress

    from netboot.errors import TransitionRefused

    store = every_store
    mac = await _installed(store, "52:54:00:00:38:03", "r3")
    enroller = Enroller(store, clock=lambda: 1000.0)
    body = {"mac": str(mac), "token": "tok", "machine_id": "89ab"}
    first = await enroller.register(body, ipaddress.ip_address("192.0.2.70"))
    enroller._clock = lambda: 1001.0
    with pytest.raises(TransitionRefused):
        await enroller.register({"mac": str(mac), "token": "tok"},
                                ipaddress.ip_address("198.51.100.9"))
    taken = await enroller.register(body, ipaddress.ip_address("198.51.100.9"))
    assert taken.install_token == first.install_token and taken.ipv4 == "198.51.100.9"
    event = (await store.list_events(first.id))[-1]
    assert "192.0.2.70 -> 198.51.100.9" in event.message
    back = await enroller.register({"mac": str(mac), "machine_token": first.install_token},
                                   ipaddress.ip_address("192.0.2.70"))
    assert back.ipv4 == "192.0.2.70"
    enroller._clock = lambda: 1000.0 + REPEAT_ELSEWHERE_SECONDS + 1
    with pytest.raises(TransitionRefused):
        await enroller.register(body, ipaddress.ip_address("198.51.100.9"))
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.70"


async def test_a_machine_id_two_machines_reported_moves_neither(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A machine-id that another machine reported too is its image's (one baked into the
    image's /etc: k3OS's squashfs, a cloned golden image), known to whoever has the image: a
    repeat from elsewhere with the spent token and that machine-id, within the hour, is the
    409 it was, nothing moved (s38-review2: before, the spent token alone moved it)."""
    import ipaddress

    from netboot.errors import TransitionRefused

    store = every_store
    first_mac = await _installed(store, "52:54:00:00:38:21", "s1")
    second_mac = await _installed(store, "52:54:00:00:38:22", "s2")
    enroller = Enroller(store, clock=lambda: 1000.0)
    shared = "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e"
    body = {"mac": str(first_mac), "token": "tok", "machine_id": shared}
    first = await enroller.register(body, ipaddress.ip_address("192.0.2.70"))
    await enroller.register({**body, "mac": str(second_mac)},
                            ipaddress.ip_address("192.0.2.75"))
    enroller._clock = lambda: 1001.0
    with pytest.raises(TransitionRefused):
        await enroller.register(body, ipaddress.ip_address("198.51.100.9"))
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.70"
    assert [e.kind for e in await store.list_events(first.id)] == ["registered"]


async def test_a_later_boot_reports_its_new_lease_with_its_machine_token(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """A site DHCP server's new lease for a registered machine: its next boot reports it with
    the machine token registration answered, and its address follows (its DNS name, a
    server's cluster endpoint: names.py reads ipv4). The same address again writes nothing
    but the request's audit entry; fixed_ipv4 stays whatever it reports."""
    import hashlib
    import ipaddress

    from netboot.errors import AuthError

    store = every_store
    mac = await _installed(store, "52:54:00:00:37:02", "r2")
    enroller = Enroller(store, clock=lambda: 1000.0)
    first = await enroller.register({"mac": str(mac), "token": "tok"},
                                    ipaddress.ip_address("192.0.2.70"))
    token = first.install_token
    assert token is not None
    later = {"mac": str(mac), "machine_token": token}
    enroller._clock = lambda: 2000.0
    moved = await enroller.register(later, ipaddress.ip_address("192.0.2.80"), audit=_audited)
    assert moved.ipv4 == "192.0.2.80" and moved.state == MachineState.REGISTERED
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.80" and stored.updated == 2000.0
    event = (await store.list_events(first.id))[-1]
    assert event.kind == "address changed" and "192.0.2.70 -> 192.0.2.80" in event.message
    assert event.data["peer"] == "192.0.2.80"
    enroller._clock = lambda: 3000.0
    same = await enroller.register(later, ipaddress.ip_address("192.0.2.80"), audit=_audited)
    assert same.ipv4 == "192.0.2.80"
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.updated == 2000.0
    assert len(await store.list_events(first.id)) == 2
    assert [a.outcome for a in await store.list_audit()] == ["200", "200"]
    # Not its machine token, the spent install token in its place, or both: refused.
    with pytest.raises(AuthError):
        await enroller.register({**later, "machine_token": "x" + token},
                                ipaddress.ip_address("192.0.2.90"))
    with pytest.raises(AuthError):
        await enroller.register({**later, "machine_token": "tok"},
                                ipaddress.ip_address("192.0.2.90"))
    with pytest.raises(ValidationError) as both:
        await enroller.register({**later, "token": "tok"}, ipaddress.ip_address("192.0.2.90"))
    assert both.value.field == "token"
    assert (await store.get_machine(first.id)).ipv4 == "192.0.2.80"  # type: ignore[union-attr]
    # An install under way holds its install token in the same field: never a machine token.
    booting = MacAddress.parse("52:54:00:00:37:03")
    await store.create_machine(Machine(
        macs=(booting,), hostname="r3", state=MachineState.BOOTING, cluster="edge",
        token_hash=hashlib.sha256(b"itok").hexdigest(), install_token="itok"))
    with pytest.raises(AuthError):
        await enroller.register({"mac": str(booting), "machine_token": "itok"},
                                ipaddress.ip_address("192.0.2.91"))
    # The operator's fixed address stays, whatever the machine reports.
    pinned = MacAddress.parse("52:54:00:00:37:04")
    await store.create_machine(Machine(
        macs=(pinned,), hostname="r4", state=MachineState.INSTALLED, cluster="edge",
        fixed_ipv4="192.0.2.44", token_hash=hashlib.sha256(b"ptok").hexdigest()))
    done = await enroller.register({"mac": str(pinned), "token": "ptok"},
                                   ipaddress.ip_address("192.0.2.44"))
    kept = await enroller.register({"mac": str(pinned), "machine_token": done.install_token},
                                   ipaddress.ip_address("192.0.2.99"))
    assert kept.ipv4 == "192.0.2.44"
    assert [e.kind for e in await store.list_events(done.id)] == ["registered"]


@pytest.mark.parametrize("name", [
    "a" * 64, ".".join(["a" * 63] * 4) + "a", "under_score", "-edge", "edge-", "edge..lab",
    "edge\n", "é", "edge 1", "x" * 100_000])
async def test_register_ignores_a_hostname_that_is_no_rfc1123_name(store, name: str) -> None:  # type: ignore[no-untyped-def]
    """The hostname a registration reports is the device's $(hostname): one that is no RFC
    1123 name (a label over 63, a name over 253, other characters) is left out of its event,
    which says it was ignored, and the registration goes on (a 400 would leave the device
    retrying for a name it cannot change); it was written into the event whatever its size."""
    import ipaddress

    mac = await _installed(store, "52:54:00:00:37:05", "r5")
    enroller = Enroller(store, clock=lambda: 1000.0)
    done = await enroller.register({"mac": str(mac), "token": "tok", "hostname": name},
                                   ipaddress.ip_address("192.0.2.70"))
    assert done.state == MachineState.REGISTERED
    event = (await store.list_events(done.id))[-1]
    assert event.kind == "registered" and " as " not in event.message
    assert "ignored its hostname" in event.message and len(event.message) < 400


async def test_register_names_a_good_hostname_and_refuses_one_that_is_no_text(store) -> None:  # type: ignore[no-untyped-def]
    import ipaddress

    mac = await _installed(store, "52:54:00:00:37:06", "r6")
    enroller = Enroller(store, clock=lambda: 1000.0)
    with pytest.raises(ValidationError) as bad:
        await enroller.register({"mac": str(mac), "token": "tok", "hostname": 7},
                                ipaddress.ip_address("192.0.2.70"))
    assert bad.value.field == "hostname"
    name = ".".join(["a" * 63] * 3) + "." + "b" * 61  # 253 characters
    done = await enroller.register({"mac": str(mac), "token": "tok", "hostname": name},
                                   ipaddress.ip_address("192.0.2.70"))
    event = (await store.list_events(done.id))[-1]
    assert f" as {name};" in event.message and "ignored" not in event.message


def test_hostname_ok_is_rfc_1123() -> None:
    assert enroll.hostname_ok("edge-1") and enroll.hostname_ok("Edge-1.Lab")
    assert enroll.hostname_ok("a" * 63) and not enroll.hostname_ok("a" * 64)
    assert enroll.hostname_ok(".".join(["a" * 63] * 3) + "." + "b" * 61)
    assert not enroll.hostname_ok(".".join(["a" * 63] * 3) + "." + "b" * 62)
    for bad in ("", "-a", "a-", "a_b", "a..b", ".a", "a\n", "a b", "é"):
        assert not enroll.hostname_ok(bad), bad


async def test_a_spent_install_token_repeats_only_with_the_evidence_it_registered_with(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """The install token is spent at registration and weak by then (it crossed plain HTTP in
    the config URL and sits in the config on the node's disk); a repeat answers the machine
    token, which moves the machine's address (a server's: its cluster's endpoint). A
    reported address stood for the registered one whatever the request came from: from a
    link-local or any IPv6 peer (a dual-stack listener), or from this host (any local user),
    the holder of the spent token got the machine token and moved the address (s38-attack).
    A report counts only where the registration itself had nothing better: its request came
    from the same peer (a proxy on this host), as the repeat's does."""
    import ipaddress

    from netboot.errors import TransitionRefused

    store = every_store
    mac = await _installed(store, "52:54:00:00:38:01", "a1")
    enroller = Enroller(store, clock=lambda: 1000.0)
    body = {"mac": str(mac), "token": "tok"}
    first = await enroller.register(body, ipaddress.ip_address("192.0.2.70"))
    assert first.ipv4 == "192.0.2.70" and first.install_token
    claim = {**body, "addresses": ["192.0.2.70"]}
    for peer in ("fe80::1", "2001:db8::66", "127.0.0.1", "169.254.7.7"):
        with pytest.raises(TransitionRefused):
            await enroller.register(claim, ipaddress.ip_address(peer))
    # Without a machine token the address stays: the holder of the spent token moves nothing.
    stored = await store.get_machine(first.id)
    assert stored is not None and stored.ipv4 == "192.0.2.70"
    assert [e.kind for e in await store.list_events(first.id)] == ["registered"]
    # From its own address it is the repeat of a lost answer, as before.
    again = await enroller.register(body, ipaddress.ip_address("192.0.2.70"))
    assert again.install_token == first.install_token

    # Behind a proxy on this host every request comes from 127.0.0.1 and the report is all
    # there is: a repeat with the same evidence is answered as the first was.
    proxied = await _installed(store, "52:54:00:00:38:02", "a2")
    loop = ipaddress.ip_address("127.0.0.1")
    pbody = {"mac": str(proxied), "token": "tok", "addresses": ["192.0.2.71"]}
    registered = await enroller.register(pbody, loop)
    assert registered.ipv4 == "192.0.2.71"
    repeated = await enroller.register(pbody, loop)
    assert repeated.install_token == registered.install_token
    with pytest.raises(TransitionRefused):  # another peer reporting it: not the same evidence
        await enroller.register(pbody, ipaddress.ip_address("fe80::2"))
    # Each such 409 reads the machine's events, before the rate limit: the newest few, not
    # the store's default of 1,000 (whoever holds the spent token sends as many as it likes).
    limits: list[int] = []
    list_events = store.list_events

    async def counted(machine_id: str, *, limit: int = 1000) -> list[Any]:
        limits.append(limit)
        return await list_events(machine_id, limit=limit)

    store.list_events = counted
    try:
        with pytest.raises(TransitionRefused):
            await enroller.register(claim, ipaddress.ip_address("127.0.0.1"))
    finally:
        del store.list_events
    assert limits and max(limits) <= 50, limits


async def test_a_machine_token_posts_at_the_report_rate_not_without_bound(  # type: ignore[no-untyped-def]
        every_store) -> None:
    """Every later boot's report with a machine token (and every repeat of a registration)
    writes an audit entry, and the log keeps the newest 100,000: without a rate, whoever
    holds one machine's token (its root, or a host that saw it cross plain HTTP) pushed the
    operator's entries out in a minute of requests (s38-attack). Now at the device reports'
    rate (enroll.report_burst at once, report_rate a second after): past it 429, the run told
    once (one ``reports limited`` event), nothing written for the refused."""
    import ipaddress

    from netboot.errors import RateLimited

    store = every_store
    mac = await _installed(store, "52:54:00:00:38:03", "a3")
    now = [1000.0]
    enroller = Enroller(store, clock=lambda: now[0], report_burst=5, report_rate=1.0)
    at = ipaddress.ip_address("192.0.2.72")
    first = await enroller.register({"mac": str(mac), "token": "tok"}, at, audit=_audited)
    later = {"mac": str(mac), "machine_token": first.install_token}
    again = {"mac": str(mac), "token": "tok"}
    taken = refused = 0
    for i in range(40):
        try:
            await enroller.register(later if i % 2 else again, at, audit=_audited)
            taken += 1
        except RateLimited as exc:
            refused += 1
            assert exc.retry_after == 1 and exc.told == (refused > 1)
    assert taken == 5 and refused == 35
    assert len(await store.list_audit()) == 1 + 5
    kinds = [e.kind for e in await store.list_events(first.id)]
    assert kinds.count("reports limited") == 1, kinds
    now[0] += 1.0  # the rate gives one more a second
    moved = await enroller.register(later, ipaddress.ip_address("192.0.2.73"), audit=_audited)
    assert moved.ipv4 == "192.0.2.73"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_an_address_another_writer_gives_meanwhile_fails_the_import_naming_its_line(
        kind: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    """An import giving a machine a new fixed_ipv4 that another server (or a CLI) gives
    another machine between the import's read and its commit: refused by the store's
    unique index at the commit, a 409 naming the file's line, the address and its holder,
    nothing of the file written (s42-integrity: the holders are read only then, no longer
    every machine with an address before each such commit)."""
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        one, two = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        enroller = Enroller(one)
        theirs = Machine(macs=(MacAddress.parse("52:54:00:42:00:99"),), id="m-theirs")

        @contextlib.asynccontextmanager
        async def after_the_other() -> Any:
            await two.create_machine(replace(theirs, fixed_ipv4="192.0.2.5"))
            yield

        enroller.fixed_lock = after_the_other()
        text = ("mac,hostname,fixed_ipv4\n52:54:00:42:00:01,a,192.0.2.4\n"
                "52:54:00:42:00:02,b,192.0.2.5\n")
        with pytest.raises(Conflict) as refused:
            await enroller.import_rows(enroll.iter_import(text, "csv"))
        assert str(refused.value).startswith(
            "line 3: fixed_ipv4 192.0.2.5 is the fixed address of 52:54:00:42:00:99 in the "
            "inventory, given it by another writer since this import read the inventory")
        assert (refused.value.field, refused.value.holder) == ("fixed_ipv4", theirs.id)
        assert [m.id for m in await one.list_machines()] == [theirs.id]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("read", ["list", "stream"])
async def test_a_template_name_another_writer_takes_meanwhile_is_chosen_again_by_an_import(
        kind: str, read: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    """An import's unnamed rows are named by the hostname template from the names free when
    it read the inventory; another server (or a CLI) giving one of those names to another
    machine before the import's commit made the store refuse the whole file ("hostname
    'edge-sn2' is used by ..."), though the file asked for no name. Now the import is made
    again from the inventory as stored then, the row given the next free name, as a single
    enrollment chooses again (s41-integrity); rows read once (a stream) cannot be read
    again: a 409 naming the row and the fix, nothing written."""
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        one, two = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        enroller = Enroller(one, hostname_template="edge-{serial}")
        theirs = Machine(macs=(MacAddress.parse("52:54:00:42:00:99"),), id="m-theirs",
                         hostname="edge-sn2")
        # The other writer between the import's read and its commit: at the store's write
        # of the import's batch (the store's method: the recorder's is native in the
        # mypyc build, which refuses a patched attribute).
        apply_batch = one.apply_batch
        taken: list[bool] = []

        async def after_the_other(batch: Any, *args: Any, **kw: Any) -> Any:
            if not taken:
                taken.append(True)
                await two.create_machine(theirs)
            return await apply_batch(batch, *args, **kw)

        one.apply_batch = after_the_other  # type: ignore[method-assign]
        text = "mac,hostname,serial\n52:54:00:42:00:01,a,SN1\n52:54:00:42:00:02,,SN2\n"
        rows = enroll.iter_import(text, "csv")
        if read == "list":
            report = await enroller.import_rows(list(rows))
            assert report.applied
            assert sorted(m.hostname for m in await one.list_machines()) == [
                "a", "edge-sn2", "edge-sn2-2"]
            return
        with pytest.raises(Conflict) as refused:
            await enroller.import_rows(iter(rows))
        assert str(refused.value).startswith(
            "line 3: hostname 'edge-sn2', chosen by the hostname template, was given to "
            "another machine by another writer")
        assert "import the file again" in str(refused.value)
        assert (refused.value.field, refused.value.holder) == ("hostname", theirs.id)
        assert [m.id for m in await one.list_machines()] == [theirs.id]


async def test_a_bare_enrollers_fixed_address_import_takes_the_inventorys_lock(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Enroller's fixed_lock is the inventory's too (SqliteStore.fixed_addresses_held)
    from its making, not once a Core is made on it (Core.__init__ swapped it in): a bare
    Enroller's import of fixed addresses (a tool's, a test's) checked and wrote under this
    process's lock alone while another process held the file's. Held past its bound, the
    import says so and writes nothing."""
    import fcntl
    import os

    from netboot.errors import StoreError
    from netboot.inventory import sqlite as sqlite_store

    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    monkeypatch.setattr(sqlite_store, "FIXED_LOCK_WAIT", 0.2)
    fd = os.open(f"{store.path}-fixed.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's check and write under way
        with pytest.raises(StoreError, match="fixed address lock"):
            await Enroller(store).import_rows(iter_import(
                "mac,fixed_ipv4\n02:00:00:00:00:41,192.0.2.41\n", "csv"))
        assert await store.list_machines() == []
    finally:
        os.close(fd)
        await store.close()


def test_an_import_reports_warnings_bounded_as_its_errors() -> None:
    """A file renaming thousands of installed machines answers the first ``most_errors``
    warnings by line and counts them all in ``warnings_total`` (only then), as its errors."""
    from netboot.enroll import ImportReport, RowError

    warned = tuple(RowError(n + 2, "hostname", f"node {n} still runs as …") for n in range(1500))
    report = ImportReport(changed=("a",), warnings=warned, applied=True)
    shown = report.as_dict(1000)
    assert len(shown["warnings"]) == 1000 and shown["warnings_total"] == 1500
    assert shown["warnings"][0] == {"line": 2, "field": "hostname",
                                    "message": "node 0 still runs as …"}
    assert "warnings_total" not in report.as_dict() and len(report.as_dict()["warnings"]) == 1500
    assert "warnings" not in ImportReport(changed=("a",)).as_dict(1000)
