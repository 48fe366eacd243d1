"""The CLI against a real SQLite inventory: tables for people, --json for scripts."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from netboot.access import Access, Principal
from netboot.cli import COMMANDS, build_parser, main
from netboot.config import load
from netboot.errors import AuthError
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Scope
from tests import pg
from tests.conftest import (
    Env,
    boot,
    install_token,
    registered_beside_enrolled,
    this_checkout,
    write_config,
)


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    return str(write_config(tmp_path))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_enroll_render_explain(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "clusters", "add", "edge", "--server-url", "https://192.0.2.50:6443",
               "--token", "sekret", "--config", cfg)[0] == 0
    assert run(capsys, "profiles", "add", "k3os", "--kernel", "vmlinuz", "--initrd",
               "initrd.img", "--config", cfg)[0] == 0
    assert run(capsys, "groups", "add", "x86", "--selector", "arch=x86_64", "--profile", "k3os",
               "--cluster", "edge", "--role", "agent", "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "machines", "add", "AA-BB-CC-DD-EE-01", "--hostname", "edge-1",
                     "--label", "rack=r1", "--cluster", "edge", "--config", cfg)
    assert rc == 0 and "aa:bb:cc:dd:ee:01" in out
    rc, out, _ = run(capsys, "machines", "ls", "--config", cfg)
    assert "MAC" in out and "edge-1" in out and "enrolled" in out
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--label", "rack=r1", "--config", cfg)
    assert json.loads(out)[0]["hostname"] == "edge-1"
    rc, out, _ = run(capsys, "render", "aabbccddee01", "ipxe", "--config", cfg)
    assert rc == 0 and "no profile" in out and "approve" not in out  # arch not seen yet
    rc, out, _ = run(capsys, "render", "aabbccddee01", "ipxe", "--arch", "x86_64",
                     "--config", cfg)
    assert rc == 0 and out.startswith("#!ipxe") and "kernel http://192.0.2.10:" in out
    rc, out, _ = run(capsys, "render", "aa:bb:cc:dd:ee:01", "config", "--arch", "x86_64",
                     "--config", cfg)
    assert rc == 0 and "server_url: \"https://192.0.2.50:6443\"" in out
    rc, out, _ = run(capsys, "render", "aa:bb:cc:dd:ee:01", "nocloud", "--arch", "x86_64",
                     "--config", cfg)
    assert "--- user-data" in out and "#cloud-config" in out
    rc, out, _ = run(capsys, "render", "aa:bb:cc:dd:ee:01", "pxelinux", "--arch", "x86_64",
                     "--config", cfg)
    assert "LABEL install" in out
    rc, out, _ = run(capsys, "explain", "aa:bb:cc:dd:ee:01", "--json", "--config", cfg)
    explained = json.loads(out)
    assert explained["group"] == "x86" or explained["decision"] in ("install", "hold")
    # render is read-only: the machine is still enrolled, not booting.
    rc, out, _ = run(capsys, "machines", "show", "aa:bb:cc:dd:ee:01", "--json", "--config", cfg)
    shown = json.loads(out)
    assert shown["state"] == "enrolled" and [e["kind"] for e in shown["events"]] == ["enrolled"]
    # Its history names it as the operator knows it (its hostname), not by its id.
    rc, out, _ = run(capsys, "events", "aa:bb:cc:dd:ee:01", "--config", cfg)
    assert rc == 0 and out.split("  ")[1:3] == ["edge-1", "enrolled"], out
    rc, out, _ = run(capsys, "clusters", "show", "edge", "--config", cfg)
    assert "nodes (1)" in out and "edge-1" in out and "sekret" not in out
    rc, out, _ = run(capsys, "machines", "reinstall", "aa:bb:cc:dd:ee:01", "--config", cfg)
    assert rc == 0
    assert run(capsys, "machines", "rm", "aa:bb:cc:dd:ee:01", "--config", cfg)[0] == 0


def test_errors_are_one_line(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "machines", "add", "not-a-mac", "--config", cfg)
    assert rc == 2 and err.startswith("netboot: mac:")
    rc, _, err = run(capsys, "machines", "show", "aa:bb:cc:dd:ee:09", "--config", cfg)
    assert rc == 1 and "not found" in err
    rc, _, err = run(capsys, "machines", "add", "aa:bb:cc:dd:ee:02", "--cluster", "nope",
                     "--config", cfg)
    assert rc == 2 and "unknown cluster" in err


def test_serve_names_the_file_and_line_of_a_setting_start_up_refuses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What start-up finds wrong (here a TLS file that is not there) is told with the file
    and line that set it, as a syntax or type error in the file is (s35-user)."""
    path = write_config(tmp_path, https="  cert_file: /nonexistent/cert.pem\n"
                                        "  key_file: /nonexistent/key.pem\n")
    line = path.read_text().splitlines().index("  cert_file: /nonexistent/cert.pem") + 1
    told = f"netboot: configuration error: {path}:{line}: https.cert_file: cannot read " \
        "/nonexistent/cert.pem"
    # serve sets the root logger's level (server.log_level, info) for the process: put back,
    # or aiohttp's own access log (the test servers') is on in every later test of the
    # session, and tests/test_flow.py::test_install_tokens_are_not_logged finds a token in it.
    root = logging.getLogger()
    level = root.level
    try:
        rc, _, err = run(capsys, "serve", "--config", str(path))
    finally:
        root.setLevel(level)
    assert rc == 2 and told in err, err
    rc, _, err = run(capsys, "check-config", str(path))  # which checks the files as serve does
    assert rc == 2 and told in err, err


def a_default_route_on_lo(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's default route, as these tests need one: the address found is loopback's.
    They read the machine's own route table, and failed where it has no default route (a
    container with no network, `unshare -n`: s45-review); the case without one is
    test_render_without_a_default_route_says_only_the_address_it_names."""
    import netboot.servers.sockets
    import netboot.service

    real = netboot.servers.sockets.interface_ipv4
    monkeypatch.setattr(netboot.service, "default_route_interface", lambda *a: "lo")
    # lo has no address in a namespace where it is down.
    monkeypatch.setattr(netboot.servers.sockets, "interface_ipv4",
                        lambda name: "127.0.0.1" if name == "lo" else real(name))


def test_render_warns_once_about_the_advertised_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --advertise, the address found is warned about once per command, not once
    per URL base (s35-user)."""
    a_default_route_on_lo(monkeypatch)
    text = write_config(tmp_path).read_text().replace("  advertise: 192.0.2.10\n", "")
    path = tmp_path / "noadvertise.yaml"
    path.write_text(text)
    assert run(capsys, "machines", "add", "aa:bb:cc:dd:ee:01", "--config", str(path))[0] == 0

    async def make_ca() -> None:  # as the server's first start does: renders then carry it
        from netboot.service import open_inventory, prepare_tls

        store, sealer = await open_inventory(load(path, env={}))
        prepare_tls(load(path, env={}), "192.0.2.10", sealer)
        await store.close()

    asyncio.run(make_ca())
    caplog.clear()
    rc, out, err = run(capsys, "render", "aa:bb:cc:dd:ee:01", "ipxe", "--config", str(path))
    assert rc == 0 and out.startswith("#!ipxe"), err
    told = [r for r in caplog.records if "no --interface or --advertise given" in r.message]
    assert len(told) == 1, told


def test_render_without_a_default_route_says_only_the_address_it_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's quickstart on a host without a default route: ``netboot render`` logged
    the server's "advertising 127.0.0.1 ... --interface to fix it", then said it rendered as a
    device on the first interface gets it, above a script naming that interface's address:
    two lines, the first wrong for what it printed (s38-user). Now the second alone; with no
    interface address at all, a line says the script names 127.0.0.1."""
    import netboot.service

    text = write_config(tmp_path).read_text().replace("  advertise: 192.0.2.10\n", "")
    path = tmp_path / "noadvertise.yaml"
    path.write_text(text)
    assert run(capsys, "machines", "add", "aa:bb:cc:dd:ee:01", "--config", str(path))[0] == 0
    monkeypatch.setattr(netboot.service, "default_route_interface", lambda *a: None)
    monkeypatch.setattr(netboot.service, "reached_at", lambda cfg, adv: [("eth9", "192.0.2.77")])
    caplog.clear()
    rc, out, err = run(capsys, "render", "aa:bb:cc:dd:ee:01", "ipxe", "--config", str(path))
    assert rc == 0 and "http://192.0.2.77:" in out, err
    assert "rendered as a device on eth9 gets it (192.0.2.77)" in err, err
    assert not [r for r in caplog.records if "advertising 127.0.0.1" in r.message]
    monkeypatch.setattr(netboot.service, "reached_at", lambda cfg, adv: [])
    rc, out, err = run(capsys, "render", "aa:bb:cc:dd:ee:01", "ipxe", "--config", str(path))
    assert rc == 0 and "http://127.0.0.1:" in out, err
    assert "rendered with 127.0.0.1, which no device reaches" in err, err
    # The server itself still warns: it advertises 127.0.0.1 to what asks it by that name.
    from netboot.config import load as load_config

    caplog.clear()
    assert netboot.service.advertised_address(load_config(path, env={})) == "127.0.0.1"
    assert [r for r in caplog.records if "advertising 127.0.0.1" in r.message]


def test_import_dry_run_errors_and_idempotence(cfg: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "fleet.csv"
    good.write_text("mac,serial\n02:00:00:00:00:01,S1\n02:00:00:00:00:02,S2\n")
    rc, out, _ = run(capsys, "import", str(good), "--dry-run", "--config", cfg)
    assert rc == 0 and "2 would be created" in out
    rc, out, _ = run(capsys, "import", str(good), "--config", cfg)
    assert rc == 0 and "2 were created" in out
    rc, out, _ = run(capsys, "import", str(good), "--config", cfg)
    assert "0 were created, 0 changed, 2 left" in out
    bad = tmp_path / "bad.csv"
    bad.write_text("mac,role\n02:00:00:00:00:03,agent\nxx,agent\n02:00:00:00:00:04,king\n")
    rc, out, err = run(capsys, "import", str(bad), "--config", cfg)
    assert rc == 1
    # FILE:LINE:, the form of every other error (the user asked for it in place of
    # "FILE:line 3:", s35-user2).
    assert f"{bad}:3: mac:" in err and f"{bad}:4: role:" in err
    assert "\n2 bad rows: nothing was imported" in err
    bad.write_text("mac,role\n02:00:00:00:00:03,agent\n02:00:00:00:00:04,king\n")
    rc, out, err = run(capsys, "import", str(bad), "--config", cfg)
    assert rc == 1 and f"{bad}:3: role:" in err
    assert "\n1 bad row: nothing was imported" in err
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--config", cfg)
    assert len(json.loads(out)) == 2


def test_an_import_of_fixed_addresses_takes_the_inventorys_fixed_lock(
        cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`netboot import` beside a server on one SQLite file: its rows' fixed_ipv4 were checked
    against the inventory and written under the command's own lock alone (a bare Enroller:
    Core puts the file's lock in the wiring's), so a server's PATCH giving another machine
    the address at once could read it free too, and both stored it (s41-review; s40-net and
    s40-cas closed it for the API and `machines set`). The import takes the file's lock as
    they do: held by another process past its bound, the import says so, nothing written."""
    import fcntl

    from netboot.inventory import sqlite as sqlite_store

    rows = tmp_path / "fleet.csv"
    rows.write_text("mac,fixed_ipv4\n02:00:00:00:00:41,192.0.2.41\n")
    assert run(capsys, "machines", "ls", "--config", cfg)[0] == 0  # the inventory made
    (db,) = (tmp_path / "data").glob("*.db")
    monkeypatch.setattr(sqlite_store, "FIXED_LOCK_WAIT", 0.2)
    fd = os.open(f"{db}-fixed.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process's check and write under way
        rc, out, err = run(capsys, "import", str(rows), "--config", cfg)
    finally:
        os.close(fd)
    assert rc != 0 and "fixed address lock" in err, (rc, out, err)
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--config", cfg)
    assert rc == 0 and json.loads(out) == []
    rc, out, err = run(capsys, "import", str(rows), "--config", cfg)  # let go: imported
    assert rc == 0 and "1 were created" in out, err


@pytest.mark.parametrize(("name", "text", "line", "message"), [
    ("fleet.csv", "mac,hostname\n02:00:00:00:00:01,a,extra\n", 2,
     "more values than header columns"),
    ("fleet.csv", "mac\n02:00:00:00:00:01\n02:00:00:00:00:02\n02:00:00:00:00:03,x\n", 4,
     "more values than header columns"),
    ("fleet.yaml", "machines:\n  - mac: 02:00:00:00:00:01\n    hostname: [a\n", 3,
     "cannot parse yaml: expected ',' or ']', but got '<stream end>' (while parsing a flow "
     "sequence on line 3, column 15)"),
    ("fleet.yaml", "- mac: 02:00:00:00:00:01\n  hostname: a: b\n", 2,
     "cannot parse yaml: mapping values are not allowed here (column 14)"),
    ("fleet.yaml", "- mac: 02:00:00:00:00:01\n- just a string\n", 2,
     "expected a mapping (a machine's fields)"),
    ("fleet.json", '[\n  {"mac": "02:00:00:00:00:01",}\n]\n', 2,
     "cannot parse json: Expecting property name enclosed in double quotes (column 31)"),
    ("fleet.yaml", "mac: 02:00:00:00:00:01\n", None,
     "expected a list of machines (or {machines: [...]})"),
])
def test_import_names_a_whole_file_error_by_file_and_line(
        cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str,
        line: int | None, message: str) -> None:
    # As its rows' errors: FILE:LINE: (s35-user2 left `netboot: file: line 2: ...` and
    # PyYAML's `in "<unicode string>", line 3`).
    path = tmp_path / name
    path.write_text(text)
    rc, _out, err = run(capsys, "import", str(path), "--config", cfg)
    where = f"{path}:{line}" if line is not None else f"{path}"
    assert (rc, err) == (2, f"{where}: {message}\n")
    assert "unicode string" not in err and "netboot: file" not in err


def test_import_reads_a_spreadsheets_file_and_names_one_it_cannot(
        cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A spreadsheet's "CSV UTF-8" export: a byte-order mark and CRLF line ends. The mark was
    # read as part of the first column's name, so every row was "unknown column '\ufeffmac'".
    fleet = tmp_path / "fleet.csv"
    fleet.write_bytes("\ufeffmac,hostname\r\n5254.00aa.0001,cafe-1\r\n".encode())
    rc, out, err = run(capsys, "import", str(fleet), "--config", cfg)
    assert (rc, err) == (0, "") and "1 were created" in out
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:01", "--json", "--config", cfg)
    assert json.loads(out)["hostname"] == "cafe-1"
    # What cannot be read is the file's error (FILE[:LINE]: ..., exit 2), not a traceback.
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"mac,hostname\n52:54:00:aa:00:02,caf\xe9\n")
    cases = [(latin, f"{latin}:2: not UTF-8 text (byte 0xe9); save it as UTF-8 "
                     "(a spreadsheet's \"CSV UTF-8\")\n"),
             (tmp_path / "missing.csv",
              f"{tmp_path / 'missing.csv'}: cannot read it: No such file or directory\n"),
             (tmp_path, f"{tmp_path}: cannot read it: Is a directory\n")]
    for path, message in cases:
        assert run(capsys, "import", str(path), "--config", cfg)[::2] == (2, message)


def test_import_reads_standard_input_given_as_a_dash(
        cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The container's CLI (podman exec -i NAME netboot import - < fleet.csv) sees no file of
    # the host's: "-" was read as a file named "-".
    import io

    def stdin(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    stdin(b"\xef\xbb\xbfmac,hostname\r\n52:54:00:aa:00:01,a\r\n")
    rc, out, err = run(capsys, "import", "-", "--config", cfg)
    assert (rc, err) == (0, "") and "1 were created" in out
    stdin(b"- {mac: 52:54:00:aa:00:02, hostname: b}\n- {mac: 52:54:00:aa:00:02}\n")
    rc, out, err = run(capsys, "import", "-", "--format", "yaml", "--config", cfg)
    assert rc == 1 and err.startswith("<stdin>:2: mac: duplicate of line 1")


def test_profiles_add_sets_what_the_api_sets(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The README's CLI quickstart made a k3OS profile without the iso_url its API one has
    # (a k3OS install booted over the network has nothing to install without it), and an
    # Arm board's profile could not be made at all: no --fdtdir, no --install-device.
    rc, out, err = run(capsys, "profiles", "add", "rpi", "--kernel", "k3os/vmlinuz-arm64",
                       "--initrd", "k3os/initrd-arm64", "--iso-url",
                       "http://192.0.2.10:8080/assets/k3os/k3os-arm64.iso", "--fdtdir",
                       "dtbs", "--install-device", "/dev/mmcblk0", "--install-timeout", "5400",
                       "--ssh-authorized-key", "ssh-ed25519 AAAA a@b", "--description",
                       "Pi 4 racks", "--json", "--config", cfg)
    assert (rc, err) == (0, "")
    made = json.loads(out)
    assert {k: made[k] for k in ("iso_url", "fdtdir", "install_device", "install_timeout",
                                 "ssh_authorized_keys", "description")} == {
        "iso_url": "http://192.0.2.10:8080/assets/k3os/k3os-arm64.iso", "fdtdir": "dtbs",
        "install_device": "/dev/mmcblk0", "install_timeout": 5400,
        "ssh_authorized_keys": ["ssh-ed25519 AAAA a@b"], "description": "Pi 4 racks"}
    # Checked as the API checks them: the field named, exit 2.
    rc, _, err = run(capsys, "profiles", "add", "bad", "--kernel", "vmlinuz", "--iso-url",
                     "ftp://x/k3os.iso", "--config", cfg)
    assert rc == 2 and err.startswith("netboot: iso_url: ")
    rc, _, err = run(capsys, "profiles", "add", "bad", "--kernel", "vmlinuz", "--fdtdir",
                     "../../etc", "--config", cfg)
    assert rc == 2 and err.startswith("netboot: fdtdir: ")


def test_machines_set_adds_to_the_labels_and_nics_as_stored_when_it_writes(
        cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`machines set --label` (and `--add-mac`) made the machine's whole label map (NIC
    list) from a read of its own, before the edit's compare-and-set loop: what another
    writer stored between that read and the write (an operator's label through the API, a
    NIC attached) was written away, the retry reapplying the stale map. Found by
    s40-attack: the map is made from each read of the loop. The other writer here commits
    right after the command's first read of the machine."""
    from dataclasses import replace

    from netboot import identity
    from netboot.inventory.base import Batch

    assert run(capsys, "machines", "add", "52:54:00:aa:00:21", "--label", "rack=r1",
               "--config", cfg)[0] == 0
    real = identity.require_ref
    reads: list[str] = []

    async def read_then_another_writes(store: Any, ref: str) -> Any:
        machine = await real(store, ref)
        if not reads:
            other = replace(machine, labels={**machine.labels, "owner": "ops"},
                            macs=(*machine.macs, MacAddress.parse("52:54:00:aa:00:22")),
                            updated=machine.updated + 1)
            await store.apply_batch(Batch(update=(other,),
                                          versions={machine.id: machine.updated}))
        reads.append(ref)
        return machine

    monkeypatch.setattr(identity, "require_ref", read_then_another_writes)
    rc, out, err = run(capsys, "machines", "set", "52:54:00:aa:00:21", "--label", "room=a",
                       "--add-mac", "52:54:00:aa:00:23", "--config", cfg)
    assert rc == 0, err
    monkeypatch.setattr(identity, "require_ref", real)
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:21", "--json", "--config", cfg)
    shown = json.loads(out)
    assert shown["labels"] == {"rack": "r1", "owner": "ops", "room": "a"}
    assert shown["macs"] == ["52:54:00:aa:00:21", "52:54:00:aa:00:22", "52:54:00:aa:00:23"]


def test_machines_set_hostname_empty_unsets_it_and_add_refuses_it(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``machines set --hostname ''`` unsets the hostname, as '' unsets --cluster: it was
    stored as a name "" (the API took it). ``machines add --hostname ''`` is refused naming
    the field, as the API's create is."""
    assert run(capsys, "machines", "add", "52:54:00:aa:00:31", "--hostname", "n-31",
               "--config", cfg)[0] == 0
    rc, out, err = run(capsys, "machines", "set", "52:54:00:aa:00:31", "--hostname", "",
                       "--config", cfg)
    assert (rc, out, err) == (0, "52:54:00:aa:00:31: hostname -\n", "")
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:31", "--json", "--config", cfg)
    assert json.loads(out)["hostname"] is None
    rc, _, err = run(capsys, "machines", "add", "52:54:00:aa:00:32", "--hostname", "",
                     "--config", cfg)
    assert rc == 2 and err.startswith("netboot: hostname: "), err


def test_machines_set_moves_a_machine_and_changes_only_what_is_given(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `machines add` of an enrolled MAC is a 409 and there was no other command: moving a
    # machine to another cluster (README "Moving a machine to another cluster") needed the
    # API's PATCH or a file import.
    for name in ("edge", "lab"):
        assert run(capsys, "clusters", "add", name, "--config", cfg)[0] == 0
    assert run(capsys, "profiles", "add", "k3os", "--kernel", "vmlinuz", "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "52:54:00:aa:00:11", "--hostname", "agent-1",
               "--cluster", "edge", "--role", "agent", "--label", "rack=r1", "--label",
               "room=a", "--config", cfg)[0] == 0
    rc, out, err = run(capsys, "machines", "set", "5254.00aa.0011", "--cluster", "lab",
                       "--label", "rack=r9", "--remove-label", "room", "--config", cfg)
    assert (rc, out, err) == (0, "52:54:00:aa:00:11: cluster lab, labels rack=r9\n", "")
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:11", "--json", "--config", cfg)
    shown = json.loads(out)
    assert (shown["cluster"], shown["role"], shown["hostname"], shown["labels"]) == (
        "lab", "agent", "agent-1", {"rack": "r9"})
    rc, out, _ = run(capsys, "machines", "set", "52:54:00:aa:00:11", "--cluster", "",
                     "--profile", "k3os", "--fixed-ipv4", "192.0.2.77", "--config", cfg)
    assert (rc, out) == (0, "52:54:00:aa:00:11: cluster -, profile k3os, "
                            "fixed_ipv4 192.0.2.77\n")
    # Checked as the API checks them; nothing given is said, not a silent success.
    rc, _, err = run(capsys, "machines", "set", "52:54:00:aa:00:11", "--cluster", "nope",
                     "--config", cfg)
    assert rc == 2 and err.startswith("netboot: cluster: unknown cluster 'nope': add it first")
    rc, _, err = run(capsys, "machines", "set", "52:54:00:aa:00:11", "--config", cfg)
    assert rc == 2 and "nothing to change" in err
    # A NIC more: a machine enrolled by serial alone (a Raspberry Pi's TFTP carries none).
    assert run(capsys, "machines", "add", "--serial", "0a1b2c3d", "--hostname", "pi-1",
               "--config", cfg)[0] == 0
    # Named by its hostname (a CLI REF is a MAC, an id or a hostname: s39-user), or its id.
    rc, out, err = run(capsys, "machines", "set", "pi-1", "--add-mac", "dc-a6-32-01-36-c2",
                       "--config", cfg)
    assert (rc, out) == (0, "dc:a6:32:01:36:c2: macs dc:a6:32:01:36:c2\n"), err
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--config", cfg)
    pi = next(m for m in json.loads(out) if m["hostname"] == "pi-1")
    rc, out, _ = run(capsys, "machines", "set", pi["id"], "--add-mac", "dc-a6-32-01-36-c3",
                     "--config", cfg)
    assert (rc, out) == (0, "dc:a6:32:01:36:c2: macs dc:a6:32:01:36:c2,dc:a6:32:01:36:c3\n")
    # One it has already (a NIC a boot attached by the machine's UUID or serial, which is
    # not given its fixed address until listed: identity.UNLISTED) is listed, not refused
    # as named twice (a 2, "listed twice", before).
    rc, out, err = run(capsys, "machines", "set", pi["id"], "--add-mac", "dc:a6:32:01:36:c3",
                       "--config", cfg)
    assert (rc, out) == (0, "dc:a6:32:01:36:c2: macs dc:a6:32:01:36:c2,dc:a6:32:01:36:c3\n"), err
    rc, _, err = run(capsys, "machines", "set", "52:54:00:aa:00:99", "--role", "server",
                     "--config", cfg)
    assert rc == 1 and "52:54:00:aa:00:99" in err
    rc, out, _ = run(capsys, "audit", "--json", "--config", cfg)
    sets = [(e["action"], e["target"], e["outcome"]) for e in json.loads(out)
            if e["action"] == "machines set"]
    assert sets[0] == ("machines set", "5254.00aa.0011", "ok") and len(sets) == 8


async def _ipxe_asks(cfg: str, assets: Path, uuid: str, *macs: str) -> list[tuple[str, str]]:
    """What each NIC's iPXE is answered when it reports ``uuid`` (boot.ipxe's
    ``/ipxe?mac=…&uuid=${uuid}``), through the real boot path on the CLI's inventory: (the
    action, the unlisted NICs the machine's facts name after it)."""
    from netboot.boot import BootService, BootSettings
    from netboot.enroll import Enroller
    from netboot.files import FileTree
    from netboot.identity import UNLISTED
    from netboot.model import Arch, BootRequest, Firmware

    store = SqliteStore(load(cfg, env={}).db_path)
    await store.open()
    try:
        boot = BootService(store, FileTree([assets]), BootSettings(policy="hold"),
                           Enroller(store), new_token=lambda: "tok")
        out = []
        for mac in macs:
            plan = await boot.plan(BootRequest(
                mac=MacAddress.parse(mac), firmware=Firmware.IPXE, arch=Arch.X86_64,
                via="http", uuid=uuid, remote_addr="192.0.2.77"))
            await boot.drain()
            machine = await store.machine_by("uuid", uuid)
            assert machine is not None
            out.append((str(plan.action), machine.facts.get(UNLISTED, "")))
        return out
    finally:
        await store.close()


def test_an_operator_lists_the_nics_the_command_or_file_names_and_no_other(
        cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A machine enrolled by its UUID alone: two NICs that report it are attached and held
    (identity.UNLISTED). ``machines set --add-mac X`` lists X, not the machine's other NIC
    it sends back in the whole list (s49 listed both); an import row naming the other lists
    it, as PATCH macs does (s49 left it unlisted, and a row changing nothing else was not
    even written)."""
    uuid, first, second = ("8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c9", "52:54:00:aa:50:01",
                           "52:54:00:aa:50:02")
    for line in (("clusters", "add", "edge", "--server-url", "https://192.0.2.50:6443",
                  "--token", "sekret"), ("profiles", "add", "k3os", "--kernel", "vmlinuz"),
                 ("machines", "add", "--uuid", uuid, "--hostname", "floor-2", "--cluster",
                  "edge", "--profile", "k3os")):
        assert run(capsys, *line, "--config", cfg)[0] == 0
    assets = tmp_path / "assets"
    assert asyncio.run(_ipxe_asks(cfg, assets, uuid, first, second)) == [
        ("hold", first), ("hold", f"{first},{second}")]
    rc, out, err = run(capsys, "machines", "set", "floor-2", "--add-mac", first,
                       "--config", cfg)
    assert (rc, out) == (0, f"{first}: macs {first},{second}\n"), err
    assert asyncio.run(_ipxe_asks(cfg, assets, uuid, second, first)) == [
        ("hold", second), ("install", second)]
    fleet = tmp_path / "fleet.csv"
    fleet.write_text(f"mac,hostname\n{second},floor-2\n")
    rc, out, err = run(capsys, "import", str(fleet), "--config", cfg)
    assert rc == 0 and "1 changed" in out, (out, err)
    # The same install, from the same address: its token again (the install under way).
    assert asyncio.run(_ipxe_asks(cfg, assets, uuid, second)) == [("install", "")]


def test_assets_command(cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib

    from tests.conftest import KERNEL

    digest = hashlib.sha256(KERNEL).hexdigest()
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img",
               "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "assets", "--json", "--config", cfg)
    rows = {r["name"]: r for r in json.loads(out)}
    assert rc == 0
    assert rows["vmlinuz"]["status"] == "ok" and rows["vmlinuz"]["sha256"] == digest
    assert rows["undionly.kpxe"]["status"] in ("ok (known build)", "unknown build")
    assert rows["arm64/ipxe.efi"]["status"] == "missing"
    (tmp_path / "assets" / "initrd.img").unlink()
    rc, out, _ = run(capsys, "assets", "--config", cfg)
    assert rc == 1 and "missing" in out


def test_assets_checks_a_profiles_iso_url_on_this_server(
        cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's profile has ``iso_url http://192.0.2.10:8080/assets/k3os/k3os.iso``,
    which k3OS's installer fetches once its kernel runs: a user who put the kernel and
    initrd in place (as the README said) and not the ISO saw `netboot assets` say ok, and
    every install failed on its console (s38-user). A URL of another server is not
    netboot's to check."""
    monkeypatch.setenv("NETBOOT_HTTP_PORT", "8080")
    iso = "http://192.0.2.10:8080/assets/k3os/k3os%2Dx.iso"
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img",
               "--iso-url", iso, "--config", cfg)[0] == 0
    assert run(capsys, "profiles", "add", "q", "--kernel", "vmlinuz",
               "--iso-url", "https://releases.example/k3os.iso", "--config", cfg)[0] == 0
    rc, out, err = run(capsys, "assets", "--json", "--config", cfg)
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rc == 1 and rows[("profile p", "k3os/k3os-x.iso")]["status"].startswith("missing")
    assert not [k for k in rows if k[0] == "profile q" and "iso" in k[1]]
    # Where they are looked for, and where to put them (a new user knew neither: s39-user).
    first = tmp_path / "data" / "assets"  # the data directory's, then the config's dirs
    assert err.strip() == (
        f"netboot: 1 profile file missing, looked for under {first}, {tmp_path / 'assets'} "
        f"(assets.dirs): put them under {first}, e.g. {first / 'k3os' / 'k3os-x.iso'}"), err
    (tmp_path / "assets" / "k3os").mkdir()
    (tmp_path / "assets" / "k3os" / "k3os-x.iso").write_bytes(b"ISO")
    rc, out, _ = run(capsys, "assets", "--json", "--config", cfg)
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    assert rc == 0 and rows[("profile p", "k3os/k3os-x.iso")]["status"] == "ok"


def test_render_does_not_claim_the_managed_cluster(cfg: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """'render' shows what a device would get without deciding anything for it."""
    assert run(capsys, "clusters", "add", "m", "--config", cfg)[0] == 0  # managed
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--config", cfg)[0] == 0
    for mac, name in (("02:00:00:00:00:01", "s1"), ("02:00:00:00:00:02", "s2")):
        assert run(capsys, "machines", "add", mac, "--hostname", name, "--cluster", "m",
                   "--role", "server", "--profile", "p", "--config", cfg)[0] == 0
    for mac in ("02:00:00:00:00:01", "02:00:00:00:00:02"):
        rc, out, err = run(capsys, "render", mac, "config", "--config", cfg)
        assert rc == 0, err
        assert '"--cluster-init"' in out  # each would init: neither rendering claimed it


def test_status_counts_per_state_and_cluster(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "clusters", "add", "edge", "--config", cfg)[0] == 0
    for i in range(3):
        assert run(capsys, "machines", "add", f"02:00:00:00:00:0{i}", "--cluster", "edge",
                   "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "02:00:00:00:01:00", "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "status", "--json", "--config", cfg)
    status = json.loads(out)
    assert rc == 0 and status["total"] == 4 and status["by_state"]["enrolled"] == 4
    assert status["clusters"] == {"edge": {"enrolled": 3}}
    rc, out, _ = run(capsys, "status", "--config", cfg)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["CLUSTER", "MACHINES", "DISCOVERED", "ENROLLED"]
    assert lines[1].split()[:4] == ["all", "4", "0", "4"]
    assert lines[2].split()[:4] == ["edge", "3", "0", "3"]


def test_explain_for_an_architecture_not_seen_yet(cfg: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--config", cfg)[0] == 0
    assert run(capsys, "groups", "add", "x86", "--selector", "arch=x86_64", "--profile", "p",
               "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "02:00:00:00:00:01", "--config", cfg)[0] == 0
    _, out, _ = run(capsys, "explain", "02:00:00:00:00:01", "--json", "--config", cfg)
    before = json.loads(out)
    assert before["group"] is None and before["arch"] == "unknown (not seen yet)"
    # Its loader is not known yet either; it was "no ipxe loader installed for
    # uefi/unknown: the firmware gets no answer" (s37-user), for every machine not booted.
    assert (before["first_stage"], before["first_stage_reason"]) == (
        None, "not known until it boots: its firmware's request names its architecture "
        "(netboot explain 02:00:00:00:00:01 --arch x86_64 or arm64 shows one)")
    rc, out, _ = run(capsys, "explain", "02:00:00:00:00:01", "--arch", "x86_64", "--json",
                     "--config", cfg)
    assert rc == 0
    after = json.loads(out)
    assert (after["group"], after["profile"], after["decision"]) == ("x86", "p", "install")


def test_import_shows_a_progress_bar_on_a_terminal(cfg: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    rows = "\n".join(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}" for i in range(2500))
    fleet = tmp_path / "big.csv"
    fleet.write_text("mac\n" + rows + "\n")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, out, err = run(capsys, "import", str(fleet), "--config", cfg)
    assert rc == 0 and "2500 were created" in out
    assert "] 1000/2500" in err and "] 2500/2500" in err  # the bar advanced, then finished


def test_machines_add_by_several_macs_or_serial_and_refs(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "machines", "add", "--mac", "02:00:00:00:0a:01", "--mac",
                     "02-00-00-00-0a-02", "--hostname", "two", "--config", cfg)
    assert rc == 0 and "02:00:00:00:0a:01" in out
    rc, out, _ = run(capsys, "machines", "add", "--serial", "CZ-9", "--config", cfg)
    assert rc == 0
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--config", cfg)
    listed = json.loads(out)
    assert [m["macs"] for m in listed] == [["02:00:00:00:0a:01", "02:00:00:00:0a:02"], []]
    serial_only = listed[1]
    assert serial_only["serial"] == "CZ-9" and serial_only["id"].startswith("m-")
    # show / explain / render take the second NIC or the id.
    rc, out, _ = run(capsys, "machines", "show", "02:00:00:00:0a:02", "--json", "--config", cfg)
    assert rc == 0 and json.loads(out)["hostname"] == "two"
    rc, out, _ = run(capsys, "explain", serial_only["id"], "--json", "--config", cfg)
    assert rc == 0 and json.loads(out)["id"] == serial_only["id"]
    rc, out, _ = run(capsys, "render", serial_only["id"], "ipxe", "--config", cfg)
    assert rc == 0 and out.startswith("#!ipxe")
    # Conflicts and missing identity: one line naming the field and the other machine.
    rc, _, err = run(capsys, "machines", "add", "02:00:00:00:0b:01", "--serial", "CZ-9",
                     "--config", cfg)
    assert rc != 0 and "serial CZ-9" in err and serial_only["id"] in err
    assert err.count("\n") == 1
    rc, _, err = run(capsys, "machines", "add", "--hostname", "anon", "--config", cfg)
    assert rc == 2 and err.startswith("netboot: mac:")
    rc, _, err = run(capsys, "machines", "add", "--serial", "Default string", "--config", cfg)
    assert rc == 2 and err.startswith("netboot: serial:")
    assert run(capsys, "machines", "rm", serial_only["id"], "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "machines", "ls", "--json", "--config", cfg)
    assert len(json.loads(out)) == 1


def test_a_machine_enrolled_without_a_mac_is_named_by_what_it_was_enrolled_by(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """README's `netboot machines add --serial CZ2048XYZ --cluster edge` said "enrolled
    m-e7a7adfa1a28 as node-fa1a28 (id m-e7a7adfa1a28)": the id twice, not the serial the
    operator typed (s45-review)."""
    rc, out, _ = run(capsys, "machines", "add", "--serial", "CZ2048XYZ", "--config", cfg)
    made = json.loads(run(capsys, "machines", "ls", "--json", "--config", cfg)[1])[0]
    assert rc == 0 and out == f"enrolled serial CZ2048XYZ as {made['hostname']} (id {made['id']})\n"
    rc, out, _ = run(capsys, "machines", "add", "--uuid", "4c4c4544-0042-3510-8052-b4c04f4d4d31",
                     "--config", cfg)
    assert rc == 0 and out.startswith("enrolled uuid 4c4c4544-0042-3510-8052-b4c04f4d4d31 as ")
    rc, out, _ = run(capsys, "machines", "add", "52-54-00-12-34-56", "--serial", "CZ1",
                     "--config", cfg)
    assert rc == 0 and out.startswith("enrolled 52:54:00:12:34:56 as ")


def test_explain_keeps_its_values_in_one_column(cfg: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """README's quickstart `netboot explain 52:54:00:12:34:56 --arch x86_64` printed
    `first_stage_reason uefi/x86_64 ...` one column right of every other value: its key is
    longer than the 16 columns the keys were given (s45-review)."""
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--config", cfg)[0] == 0
    assert run(capsys, "groups", "add", "x86", "--selector", "arch=x86_64", "--profile", "p",
               "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "52:54:00:12:34:56", "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "explain", "52:54:00:12:34:56", "--arch", "x86_64",
                     "--config", cfg)
    lines = out.splitlines()
    assert rc == 0 and any(line.startswith("first_stage_reason ") for line in lines), out
    columns = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}
    assert columns == {len("first_stage_reason ")}, out


def test_status_counts_a_machine_in_the_cluster_its_group_gives_it(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("edge", "lab"):
        assert run(capsys, "clusters", "add", name, "--config", cfg)[0] == 0
    assert run(capsys, "groups", "add", "rack1", "--selector", "rack=r1", "--cluster", "edge",
               "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "02:00:00:00:00:01", "--label", "rack=r1",
               "--config", cfg)[0] == 0  # in edge by its group
    assert run(capsys, "machines", "add", "02:00:00:00:00:02", "--label", "rack=r1",
               "--cluster", "lab", "--config", cfg)[0] == 0  # its own cluster wins
    assert run(capsys, "machines", "add", "02:00:00:00:00:03", "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "status", "--json", "--config", cfg)
    status = json.loads(out)
    assert rc == 0 and status["total"] == 3
    assert status["clusters"] == {"edge": {"enrolled": 1}, "lab": {"enrolled": 1}}
    lines = run(capsys, "status", "--config", cfg)[1].splitlines()
    assert [line.split()[:2] for line in lines[1:4]] == [["all", "3"], ["edge", "1"],
                                                         ["lab", "1"]]


def test_times_are_iso_8601_and_relative_for_people_unix_seconds_in_json(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    assert run(capsys, "machines", "add", "02:00:00:00:00:01", "--label", "rack=r1",
               "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "machines", "show", "02:00:00:00:00:01", "--config", cfg)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d \((just now|\d+ s ago)\)"
    assert rc == 0 and re.search(r"^created +" + stamp + "$", out, re.M), out
    assert re.search(r"^" + stamp + "  enrolled  added with the CLI$", out, re.M), out
    assert re.search(r"^labels +rack=r1$", out, re.M), out
    assert not re.search(r"\d{10}\.\d", out), "a raw Unix time was printed"
    shown = json.loads(run(capsys, "machines", "show", "02:00:00:00:00:01", "--json",
                           "--config", cfg)[1])
    assert isinstance(shown["created"], float) and isinstance(shown["events"][0]["time"], float)
    out = run(capsys, "machines", "ls", "--config", cfg)[1]
    assert out.splitlines()[0].split()[-1] == "UPDATED"
    assert re.search(r"(just now|\d+ s ago)$", out.splitlines()[1]), out


def test_relative_times_use_their_largest_unit() -> None:
    from netboot.cli import _ago

    now = 1_800_000_000.0
    assert _ago(now - 0.2, now) == "just now"
    assert _ago(now - 59, now) == "59 s ago"
    assert _ago(now - 90, now) == "1 min ago"
    assert _ago(now - 3 * 3600 - 5, now) == "3 h ago"
    assert _ago(now - 2 * 86_400, now) == "2 d ago"
    assert _ago(now + 5 * 3600, now) == "in 5 h"  # an expiry


def test_every_command_that_reports_a_result_speaks_json(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    def js(*args: str) -> object:
        rc, out, err = run(capsys, *args, "--json", "--config", cfg)
        assert rc == 0, err
        return json.loads(out)

    cluster = js("clusters", "add", "edge")
    assert isinstance(cluster, dict) and cluster["name"] == "edge" and "token" not in cluster
    added = js("machines", "add", "02:00:00:00:00:01", "--hostname", "n1")
    assert isinstance(added, dict) and added["hostname"] == "n1" and "token_hash" not in added
    reinstalled = js("machines", "reinstall", "02:00:00:00:00:01")
    assert isinstance(reinstalled, list) and reinstalled[0]["mac"] == "02:00:00:00:00:01"
    assert js("machines", "rm", "02:00:00:00:00:01") == {"removed": ["02:00:00:00:00:01"]}
    assert js("clusters", "rm", "edge") == {"removed": "edge"}
    rc, out, _ = run(capsys, "check-config", cfg, "--json")
    assert rc == 0 and json.loads(out) == {"file": cfg, "ok": True}


def test_address_warning_only_where_an_address_is_used(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inventory commands serve nothing and say nothing about addresses; render prints URLs,
    so it warns when it has to guess, and takes the same --advertise as serve."""
    a_default_route_on_lo(monkeypatch)
    data = str(tmp_path / "data")
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--data-dir", data)[0] == 0
    assert run(capsys, "machines", "add", "02:00:00:00:00:01", "--profile", "p",
               "--data-dir", data)[0] == 0
    for args in (("machines", "ls"), ("machines", "show", "02:00:00:00:00:01"), ("status",),
                 ("explain", "02:00:00:00:00:01"), ("profiles", "ls")):
        assert run(capsys, *args, "--data-dir", data)[0] == 0
    assert not [r for r in caplog.records if "advertis" in r.getMessage()]
    rc, out, _ = run(capsys, "render", "02:00:00:00:00:01", "ipxe", "--arch", "x86_64",
                     "--advertise", "192.0.2.77", "--data-dir", data)
    assert rc == 0 and "kernel http://192.0.2.77:8080/assets/vmlinuz" in out
    assert not [r for r in caplog.records if "advertis" in r.getMessage()]
    run(capsys, "render", "02:00:00:00:00:01", "ipxe", "--arch", "x86_64", "--data-dir", data)
    assert [r for r in caplog.records if "advertising" in r.getMessage()]
    with pytest.raises(SystemExit):
        main(["serve", "--json"])  # serve prints no result to format


def test_cluster_endpoint_add_set_and_refused(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "clusters", "add", "edge", "--endpoint", "VIP.example:7443",
               "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)
    shown = json.loads(out)
    assert shown["endpoint"] == "vip.example:7443" and "token" not in shown
    rc, _, err = run(capsys, "clusters", "add", "bad", "--endpoint", "127.0.1.1",
                     "--config", cfg)
    assert rc == 2 and err.startswith("netboot: endpoint: ")
    rc, _, err = run(capsys, "clusters", "add", "ext", "--server-url", "https://192.0.2.50:6443",
                     "--token", "t", "--endpoint", "vip.example", "--config", cfg)
    assert rc == 2 and "endpoint" in err
    assert run(capsys, "clusters", "set", "edge", "--endpoint", "https://192.0.2.5",
               "--config", cfg)[0] == 0
    rc, _, err = run(capsys, "clusters", "set", "edge", "--endpoint", "ftp://x", "--config", cfg)
    assert rc == 2 and "endpoint" in err
    rc, out, _ = run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)
    assert json.loads(out)["endpoint"] == "https://192.0.2.5"
    assert run(capsys, "clusters", "set", "edge", "--endpoint", "", "--config", cfg)[0] == 0
    rc, out, _ = run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)
    assert json.loads(out)["endpoint"] is None
    rc, _, err = run(capsys, "clusters", "set", "nope", "--endpoint", "x", "--config", cfg)
    assert rc == 1 and "not found" in err


def test_cluster_secure_token_by_default_and_opted_in_later(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "clusters", "add", "edge", "--config", cfg)[0] == 0
    shown = json.loads(run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)[1])
    assert len(shown["ca_hash"]) == 64 and "ca_key" not in shown and "token" not in shown
    # A server configured for the short token, as every netboot before made them.
    short = tmp_path / "short.yaml"
    short.write_text(Path(cfg).read_text() + "enroll:\n  k3s_secure_token: false\n")
    assert run(capsys, "clusters", "add", "old", "--config", str(short))[0] == 0
    shown = json.loads(run(capsys, "clusters", "show", "old", "--json", "--config", cfg)[1])
    assert shown["ca_hash"] is None
    rc, out, _ = run(capsys, "clusters", "set", "old", "--endpoint", "vip.example",
                     "--config", cfg)
    assert rc == 0 and "short token" in out
    rc, out, _ = run(capsys, "clusters", "set", "old", "--secure-token", "--config", cfg)
    shown = json.loads(run(capsys, "clusters", "show", "old", "--json", "--config", cfg)[1])
    assert rc == 0 and shown["ca_hash"] in out and shown["endpoint"] == "vip.example"


def test_a_cluster_with_the_short_token_is_named_by_clusters_ls_and_show(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A cluster made before netboot made k3s CAs keeps the short join token until its
    operator opts in: `clusters ls` says so under its table, with the way out, and `show`
    (and the API, the same public form) lists it among its problems; a cluster with the
    secure token, or given one, says nothing. The token itself is never printed
    (s38-journey)."""
    assert run(capsys, "clusters", "add", "edge", "--config", cfg)[0] == 0
    short = tmp_path / "short.yaml"
    short.write_text(Path(cfg).read_text() + "enroll:\n  k3s_secure_token: false\n")
    # (A secret of 16 characters or more: a shorter one is weak too, said beside it.)
    assert run(capsys, "clusters", "add", "old", "--token", "short-form-secret-4c1e",
               "--config", str(short))[0] == 0
    rc, out, _ = run(capsys, "clusters", "ls", "--config", cfg)
    assert rc == 0 and "cluster old: the short k3s join token" in out, out
    assert "netboot clusters set old --secure-token" in out and "cluster edge:" not in out
    assert "short-form-secret-4c1e" not in out
    shown = json.loads(run(capsys, "clusters", "show", "old", "--json", "--config", cfg)[1])
    assert [p["field"] for p in shown["problems"]] == ["token"]
    assert "problems" not in json.loads(
        run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)[1])
    # Read, changed and written back with its problems: they are shown, never taken.
    rc, out, _ = run(capsys, "clusters", "set", "old", "--endpoint", "vip.example",
                     "--config", cfg)
    assert rc == 0, out
    rc, out, _ = run(capsys, "clusters", "set", "old", "--secure-token", "--config", cfg)
    assert rc == 0
    rc, out, _ = run(capsys, "clusters", "ls", "--config", cfg)
    assert "cluster old:" not in out


def test_a_weak_cluster_token_is_warned_of_where_it_is_given_and_listed(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A k3s join token whose secret is short (k3s bounds no guesses at its join endpoints)
    or one character repeated, in either form: `clusters add` warns on stderr as it takes
    it, `ls` and `show` (and the API's public form) name it among the problems, never the
    token; a 32-character random one says nothing (s39-journey)."""
    k3s_hash = "ab" * 32
    for name, token, weak in (("ext1", "abc123", True), ("ext2", "x" * 40, True),
                              ("ext3", f"K10{k3s_hash}::server:hunter2", True),
                              ("ext4", f"K10{k3s_hash}::server:{'5e' * 16}", False)):
        rc, out, err = run(capsys, "clusters", "add", name, "--server-url",
                           "https://192.0.2.50:6443", "--token", token, "--config", cfg)
        assert rc == 0, err
        assert ("a weak k3s join token" in err) is weak, err
        assert token not in out + err and "hunter2" not in err
        shown = json.loads(run(capsys, "clusters", "show", name, "--json", "--config", cfg)[1])
        errors = [p["error"] for p in shown.get("problems", ())]
        assert any("weak" in e for e in errors) is weak, errors
    rc, out, _ = run(capsys, "clusters", "ls", "--config", cfg)
    assert "cluster ext1: a weak k3s join token: its secret is 6 characters" in out, out
    assert "cluster ext3: a weak k3s join token: its secret is 7 characters" in out
    assert "cluster ext2: a weak k3s join token: its secret is one character" in out
    assert "cluster ext4:" not in out and "hunter2" not in out


def test_check_config_warns_of_a_config_that_makes_short_tokens(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`enroll.k3s_secure_token: false` makes every new managed cluster's token the short
    form: check-config takes the file (exit 0) and says so on stderr and in --json; the
    default says nothing (s39-journey)."""
    short = tmp_path / "short.yaml"
    short.write_text(Path(cfg).read_text() + "enroll:\n  k3s_secure_token: false\n")
    rc, out, err = run(capsys, "check-config", str(short))
    assert rc == 0 and out.strip() == f"{short}: OK", out
    assert f"netboot: warning: {short}: enroll.k3s_secure_token is false" in err, err
    rc, out, _ = run(capsys, "check-config", str(short), "--json")
    assert rc == 0 and "short join token" in json.loads(out)["warnings"][0]
    rc, out, err = run(capsys, "check-config", cfg)
    assert rc == 0 and "warning" not in err, err


def test_check_config_warns_of_trusting_a_mac_less_machines_first_nic(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`enroll.trust_first_nic: true` gives the first NIC sending a MAC-less machine's UUID
    or serial its install: check-config takes it and says what it trusts."""
    trusting = tmp_path / "trusting.yaml"
    trusting.write_text(Path(cfg).read_text() + "enroll:\n  trust_first_nic: true\n")
    rc, out, err = run(capsys, "check-config", str(trusting))
    assert rc == 0 and out.strip() == f"{trusting}: OK", out
    assert f"netboot: warning: {trusting}: enroll.trust_first_nic is true" in err, err


def test_tokens_create_list_revoke_and_the_audit_log(
        cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    rc, value, err = run(capsys, "tokens", "create", "scanner-1", "--scope", "enroll",
                         "--expires", "30d", "--config", cfg)
    assert rc == 0, err
    value = value.strip()
    # Only the value on stdout (for $(...)); what it is on stderr.
    assert value.startswith("nbt_") and "\n" not in value and "scanner-1" in err
    rc, out, _ = run(capsys, "tokens", "ls", "--json", "--config", cfg)
    listed = json.loads(out)
    assert [(t["name"], t["scope"]) for t in listed] == [("scanner-1", "enroll")]
    assert listed[0]["expires"] - listed[0]["created"] == 30 * 86400
    assert value not in out and "sha256" not in out
    # The CLI's token opens the API: the same store, the same rules.
    principal = asyncio.run(_authenticate(cfg, value))
    assert (principal.name, principal.scope) == ("scanner-1", Scope.ENROLL)

    rc, _, err = run(capsys, "tokens", "create", "scanner-1", "--scope", "read", "--config", cfg)
    assert rc == 1 and "already exists" in err
    rc, _, err = run(capsys, "tokens", "create", "x", "--scope", "read", "--expires", "soon",
                     "--config", cfg)
    assert rc == 2 and "--expires" in err
    assert run(capsys, "tokens", "revoke", "scanner-1", "--config", cfg)[0] == 0
    rc, _, err = run(capsys, "tokens", "revoke", "scanner-1", "--config", cfg)
    assert rc == 1 and "not found" in err
    with pytest.raises(AuthError):
        asyncio.run(_authenticate(cfg, value))
    assert run(capsys, "machines", "add", "02:00:00:00:00:07", "--config", cfg)[0] == 0
    assert run(capsys, "machines", "ls", "--config", cfg)[0] == 0  # a read: not audited

    rc, out, _ = run(capsys, "audit", "--json", "--config", cfg)
    log = json.loads(out)
    assert [(e["action"], e["target"], e["outcome"].split(":")[0]) for e in log] == [
        ("tokens create", "scanner-1", "ok"), ("tokens create", "scanner-1", "error"),
        ("tokens create", "x", "error"), ("tokens revoke", "scanner-1", "ok"),
        ("tokens revoke", "scanner-1", "error"), ("machines add", "02:00:00:00:00:07", "ok")]
    assert all(e["actor"].startswith("cli:") and e["actor"].endswith("(sudo:alice)")
               and e["peer"] == "local" for e in log)
    assert value not in out
    rc, out, _ = run(capsys, "audit", "--since", "1h", "--config", cfg)
    assert rc == 0 and out.count("\n") == 1 + len(log) and "machines add" in out
    rc, out, _ = run(capsys, "audit", "--since", str(time.time() + 60), "--json", "--config", cfg)
    assert json.loads(out) == []
    rc, _, err = run(capsys, "audit", "--since", "yesterday", "--config", cfg)
    assert rc == 2 and "--since" in err


def test_a_machine_added_by_its_flags_is_named_in_the_audit_log(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """README's "Machines and their identity" enrolls by ``--mac A --mac B`` and by
    ``--serial`` alone: each was audited with an empty target, so `netboot audit` said that
    root added a machine and not which (s47-review)."""
    rc, out, err = run(capsys, "machines", "add", "--mac", "52:54:00:00:01:01", "--mac",
                       "52:54:00:00:01:02", "--hostname", "edge-2", "--json", "--config", cfg)
    assert rc == 0, err
    made = json.loads(out)["id"]
    assert run(capsys, "machines", "add", "--serial", "CZ2048XYZ", "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "--serial", "CZ2048XYZ", "--config", cfg)[0] == 1

    rc, out, _ = run(capsys, "audit", "--json", "--config", cfg)
    assert [(e["action"], e["target"], e["outcome"].split(":")[0]) for e in json.loads(out)] \
        == [("machines add", "52:54:00:00:01:01", "ok"), ("machines add", "CZ2048XYZ", "ok"),
            ("machines add", "CZ2048XYZ", "error")]
    assert json.loads(out)[0]["machine"] == made
    rc, out, _ = run(capsys, "audit", "--config", cfg)
    assert [line.split()[4] for line in out.splitlines()[1:]] == [
        "edge-2", "CZ2048XYZ", "CZ2048XYZ"], out


async def _discovered(cfg: str, mac: str) -> None:
    """An unknown x86_64 box as the servers record it under discovery policy hold."""
    from netboot.model import Arch, Machine, MachineState

    store = SqliteStore(load(cfg, env={}).db_path)
    await store.open()
    try:
        await store.create_machine(Machine(macs=(MacAddress.parse(mac),), arch=Arch.X86_64,
                                           state=MachineState.DISCOVERED))
    finally:
        await store.close()


def test_approve_says_the_cluster_and_next_boot_a_group_gives(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """README's quickstart group x86 gives every x86_64 box cluster edge: an approved
    discovered box was told "approved ... (no cluster)", and installs into edge on its next
    boot (s47-review)."""
    for line in (("clusters", "add", "edge", "--server-url", "managed"),
                 ("profiles", "add", "k3os", "--kernel", "k3os/vmlinuz"),
                 ("groups", "add", "x86", "--selector", "arch=x86_64", "--profile", "k3os",
                  "--cluster", "edge", "--role", "server")):
        assert run(capsys, *line, "--config", cfg)[0] == 0
    asyncio.run(_discovered(cfg, "52:54:00:00:06:01"))
    rc, out, err = run(capsys, "machines", "approve", "52:54:00:00:06:01", "--config", cfg)
    assert rc == 0, err
    assert out.strip() == ("approved 52:54:00:00:06:01 as node-000601: cluster edge as server, "
                           "group x86; its next network boot: install (enrolled: install "
                           "profile k3os (group x86))"), out
    rc, out, _ = run(capsys, "explain", "52:54:00:00:06:01", "--config", cfg)
    assert "cluster            edge" in out and "decision           install" in out


async def test_audit_names_each_machine_one_way_whatever_the_request_named_it_by(
        env: Env, tmp_path: Path) -> None:
    """An install as a device makes it: enrolled over the API (the entry's target its id),
    the installer's reports through the front door by its MAC as iPXE's ${mac:hexhyp} spells
    it, its registration (target its id), an operator's reinstall by its hostname, and a
    stranger's report about a MAC nobody has. The table named the one machine
    ``52-54-00-12-34-56`` in one row and ``m-…`` in the next (s45-review)."""
    mac, dashed = "52:54:00:12:34:56", "52-54-00-12-34-56"
    await env.seed()
    made = await env.post("/api/v1/machines", {"macs": [mac], "hostname": "edge-7"},
                          status=201)
    token = install_token(await boot(env, mac))
    device = {"Authorization": f"Bearer {token}"}
    for kind in ("installing", "installed"):
        await env.post(f"/api/v1/machines/{dashed}/events", {"kind": kind}, status=201,
                       headers=device)
    await env.post("/api/v1/register", {"mac": mac, "token": token}, status=200, headers={})
    await env.post("/api/v1/machines/edge-7/reinstall", {}, status=200)
    await env.post("/api/v1/machines/02-00-00-00-00-99/events", {"kind": "installed"},
                   headers={"Authorization": "Bearer nbt_forged"})
    await env.service.boot.drain()

    def audit(*more: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "netboot", "audit", "--config",
             str(tmp_path / "a" / "netboot.yaml"), *more], capture_output=True, text=True,
            check=True, env=this_checkout(), timeout=120).stdout

    rows = [line.split() for line in audit().splitlines()[1:]]
    mine = [r for r in rows if "edge-7" in r or any(m in " ".join(r) for m in (
        made["id"], dashed, mac))]
    # who, what, target: one name for the machine in every row, as `netboot events` has it
    assert [(r[1], r[3], r[4]) for r in mine] == [
        ("admin", "/api/v1/machines", "edge-7"),
        ("machine:edge-7", "/api/v1/machines/{ref}/events", "edge-7"),
        ("machine:edge-7", "/api/v1/machines/{ref}/events", "edge-7"),
        ("machine:edge-7", "/api/v1/register", "edge-7"),
        ("admin", "/api/v1/machines/{ref}/reinstall", "edge-7")], rows
    # a MAC nobody has is shown as the request named it
    assert ["/api/v1/machines/{ref}/events", "02-00-00-00-00-99"] in [r[3:5] for r in rows]
    # --json keeps what was recorded, and says which machine each row is about
    log = json.loads(audit("--json"))
    assert [(e["target"], e["machine"]) for e in log if e["machine"]] == [
        (made["id"], made["id"]), (dashed, made["id"]), (dashed, made["id"]),
        (made["id"], made["id"]), (made["id"], made["id"])], log
    assert [e["machine"] for e in log if e["target"] == "02-00-00-00-00-99"] == [None]


async def test_renaming_an_installed_machine_says_its_node_keeps_the_old_name(
        env: Env, tmp_path: Path) -> None:
    """A machine registers as its config made it (hostname and k3s --node-name edge-7, sent
    back as its node_name); renamed afterwards, the inventory and netboot's DNS follow at once
    and the node does not: the CLI said only "hostname rack1-a" (s47-review). A machine not
    installed yet installs under the new name: nothing to say."""
    mac = "52:54:00:12:34:56"
    await registered_beside_enrolled(env, mac, "edge-7", "52:54:00:12:34:57", "edge-8")

    def rename(ref: str, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "netboot", "machines", "set", ref, "--hostname", name,
             "--config", str(tmp_path / "a" / "netboot.yaml")], capture_output=True,
            text=True, check=True, env=this_checkout(), timeout=120)

    done = rename("edge-7", "rack1-a")
    assert done.stdout == f"{mac}: hostname rack1-a\n"
    assert done.stderr == (
        "netboot: rack1-a still runs as edge-7: its installed OS keeps that hostname and k3s "
        f"node name until it installs again (netboot machines reinstall {mac}); netboot's DNS "
        "name and views follow the new one now\n"), done.stderr
    assert rename("rack1-a", "edge-7").stderr == ""  # its own name again
    assert rename("edge-8", "rack1-b").stderr == ""  # enrolled: installs as rack1-b


async def test_an_import_renaming_an_installed_machine_says_its_node_keeps_the_old_name(
        env: Env, tmp_path: Path) -> None:
    """`netboot import` of a file renaming a registered machine says what `machines set`
    says, as FILE:LINE: warning:, in the dry run and the import; the enrolled machine renamed
    on the next line gets nothing, and a file with a bad row says only the bad row (nothing
    is imported). Before s49-ha the import said "0 created, 2 changed" and nothing else."""
    mac = "52:54:00:12:34:56"
    await registered_beside_enrolled(env, mac, "edge-7", "52:54:00:12:34:57", "edge-8")
    good = tmp_path / "rename.csv"
    good.write_text(f"mac,hostname\n{mac},rack1-a\n52:54:00:12:34:57,rack1-b\n")
    bad = tmp_path / "bad.csv"
    bad.write_text(f"mac,hostname\n{mac},rack1-a\n52:54:zz:12:34:57,rack1-b\n")

    def imported(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "netboot", "import", str(path), *extra,
             "--config", str(tmp_path / "a" / "netboot.yaml")], capture_output=True,
            text=True, env=this_checkout(), timeout=120)

    note = (f"{good}:2: warning: hostname: rack1-a still runs as edge-7: its installed OS "
            "keeps that hostname and k3s node name until it installs again (netboot machines "
            f"reinstall {mac}); netboot's DNS name and views follow the new one now\n")
    dry = imported(good, "--dry-run")
    assert (dry.returncode, dry.stderr) == (0, note), dry
    refused = imported(bad)
    assert refused.returncode == 1 and "warning" not in refused.stderr, refused.stderr
    done = imported(good)
    assert (done.returncode, done.stderr) == (0, note), done
    assert done.stdout == "0 were created, 2 changed, 0 left as they are\n", done.stdout
    assert json.loads(imported(good, "--json").stdout).get("warnings") is None  # done now


async def _strangers_text(cfg: str) -> None:
    """What a stranger on the provisioning network can put in the inventory, written as the
    servers write it: a discovered machine's serial and DHCP hostname (a boot request's
    strings), its installer's event message, and the audit entry of a refused request whose
    path it chose (``POST /api/v1/machines/<ref>/events``: the target is the ref)."""
    from netboot.inventory.base import Batch
    from netboot.model import Event, MacAddress, Machine, MachineState

    store = SqliteStore(load(cfg, env={}).db_path)
    await store.open()
    try:
        machine = Machine(macs=(MacAddress.parse("02:00:00:00:00:09"),),
                          serial="S1\nstate          registered\x1b[2J",
                          facts={"dhcp_hostname": "h\x1b]0;title\x07\r\nforged-fact x"})
        await store.create_machine(machine)
        await store.apply_batch(Batch(events=(Event(machine.id, time.time(), "progress",
                                                    "ok\x1b[1A\rforged event"),)))
        await Access(store).record("-", "POST /api/v1/machines/{ref}/events",
                                   "\x1b[2J\nforged target", peer="192.0.2.9", outcome="400")
        # As an enroll token's import makes one (a factory scanner: create only), with labels
        # of its choosing: the API takes any text in a label.
        await store.create_machine(Machine(
            macs=(MacAddress.parse("02:00:00:00:00:0a"),), state=MachineState.ENROLLED,
            hostname="scanned-1", labels={"rack": "r1\x1b]52;c;Y3VybCBldmlsfHNo\x07\nforged"}))
    finally:
        await store.close()


def test_a_strangers_text_cannot_drive_the_operators_terminal(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    # printed as it was, an ESC drove the terminal (cleared it, set its title) and a line
    # break forged a field, a row or an audit entry (s36-attack).
    assert run(capsys, "machines", "ls", "--config", cfg)[0] == 0  # the inventory made
    asyncio.run(_strangers_text(cfg))
    for args in (("machines", "show", "02:00:00:00:00:09"), ("audit",)):
        rc, out, err = run(capsys, *args, "--config", cfg)
        assert rc == 0, err
        assert all(line.isprintable() for line in out.splitlines()), out
        assert not any(line.startswith(("state          registered", "forged"))
                       for line in out.splitlines()), out
    assert "S1\\x0astate          registered\\x1b[2J" in run(
        capsys, "machines", "show", "02:00:00:00:00:09", "--config", cfg)[1]
    # `machines set --label` prints every label the machine keeps: as they were, a scanner's
    # label wrote the operator's clipboard (OSC 52) and forged a line (s38-attack).
    rc, out, err = run(capsys, "machines", "set", "02:00:00:00:00:0a", "--label", "room=a",
                       "--config", cfg)
    assert rc == 0, err
    assert all(line.isprintable() for line in out.splitlines()), out
    assert len(out.splitlines()) == 1 and "\\x1b]52" in out, out


async def _authenticate(cfg: str, token: str) -> Principal:
    store = SqliteStore(load(cfg, env={}).db_path)
    await store.open()
    try:
        return await Access(store).authenticate(token)
    finally:
        await store.close()


def test_the_cli_uses_the_configured_postgresql_inventory(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    with pg.schema_sync(postgres) as dsn:
        # A password the trust-authenticated test server never asks for: it must show nowhere.
        dsn = dsn.replace(f"{pg.SUPERUSER}@", f"{pg.SUPERUSER}:hunter2@")
        cfg = str(write_config(tmp_path, "inventory:\n  backend: postgresql\n"))
        env = {"NETBOOT_INVENTORY_DSN": dsn}
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            rc, out, err = run(capsys, "machines", "add", "AA-BB-CC-DD-EE-01", "--hostname",
                               "edge-1", "--config", cfg)
            assert rc == 0, err
            rc, out, err = run(capsys, "machines", "ls", "--config", cfg)
            assert rc == 0 and "edge-1" in out

        async def stored() -> list[str]:
            store = PostgresStore(dsn)
            await store.open()
            try:
                return [m.hostname or "" for m in await store.list_machines()]
            finally:
                await store.close()

        assert asyncio.run(stored()) == ["edge-1"]
        assert not (tmp_path / "data" / "netboot.db").exists()
        assert "hunter2" not in out + err + caplog.text


def test_commands_lists_every_sub_command_but_lab() -> None:
    # main() builds the parser without ``lab`` for the commands in COMMANDS: a command added
    # to build_parser but not there would still work (it gets the whole parser), only slower.
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == COMMANDS | {"lab"}
    lean = build_parser(lab=False)
    sub = next(a for a in lean._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == COMMANDS


def test_every_command_and_sub_command_has_its_line_in_help() -> None:
    # argparse lists a sub-command under its parent's --help only when given help=: `netboot
    # machines --help` showed "{add,ls,show,rm,reinstall,approve}" and a line for add alone
    # (s35-user).
    missing = []
    parsers = [("netboot", build_parser())]
    while parsers:
        name, parser = parsers.pop()
        for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
            helped = {a.dest: a.help for a in sub._choices_actions}
            for word, child in sub.choices.items():
                if not helped.get(word):
                    missing.append(f"{name} {word}")
                parsers.append((f"{name} {word}", child))
    assert missing == []
    out = build_parser().format_help()
    assert "    machines " in out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "    ls " in sub.choices["machines"].format_help()


def test_serve_parses_as_with_the_whole_command_line() -> None:
    # main() builds only serve's parser for serve: the same options, defaults and help.
    words = ["serve", "--config", "x.yaml", "-i", "eth1", "--advertise", "192.0.2.10",
             "--http-port", "8081", "--dhcp-mode", "off", "--log-format", "json"]
    whole, lean = build_parser(lab=False), build_parser(lab=False, serve_only=True)
    assert vars(lean.parse_args(words)) == vars(whole.parse_args(words))

    def serve_help(parser: argparse.ArgumentParser) -> str:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return sub.choices["serve"].format_help()

    assert serve_help(lean) == serve_help(whole)


def test_serve_does_not_import_the_lab() -> None:
    # A fresh interpreter: the test process has imported the lab already.
    code = ("import sys; from netboot.cli import build_parser, COMMANDS\n"
            "build_parser(lab=False).parse_args(['serve', '--config', 'x.yaml'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('netboot.lab')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip() == "[]"


def test_help_and_lab_still_get_the_lab(capsys: pytest.CaptureFixture[str]) -> None:
    for words in (["--help"], ["lab", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(words)
        assert exc.value.code == 0
        assert "lab" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["lba"])  # misspelt: argparse's own error, naming the choices, lab among them
    assert exc.value.code == 2
    assert "'lab'" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback(cfg: str, tmp_path: Path) -> None:
    # `netboot explain MAC | head -3` printed a BrokenPipeError traceback (s36-user): the
    # reader is gone before the first line is written here. Buffered, as a user's shell
    # runs it: with PYTHONUNBUFFERED (set where these tests ran) the answer was written
    # inside main() and caught there; buffered, Python wrote it at exit, "Exception ignored
    # ... BrokenPipeError", exit 120 (a fresh Debian 12, s45-review).
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "netboot", "explain", "52:54:00:12:34:56",
                             "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Traceback" not in err and "Broken pipe" not in err, err
    # --help's text, printed by argparse before its exit, alike.
    proc = subprocess.Popen([sys.executable, "-m", "netboot", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and "Broken pipe" not in err, err


def test_no_readme_block_enrolls_one_identifier_twice() -> None:
    """A README block is run as it stands, line after line: "Machines and their identity"
    enrolled 52:54:00:00:01:01 and CZ2048XYZ with the CLI, then both again with curl -sf,
    which failed with a 409 and printed nothing (s38-user). The quickstart's API block and
    its CLI block are alternatives, each its own block."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    mac = r"(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}"
    repeated = []
    for block in re.findall(r"```sh\n(.*?)```", readme, re.S):
        seen: dict[str, str] = {}
        for line in block.splitlines():
            if "machines add" in line:
                ids = re.findall(mac, line.split("#")[0], re.I) + re.findall(
                    r"--(?:serial|uuid|asset) (\S+)", line)
            elif re.search(r"curl .*\$NB/machines -d", line):
                body = line.split(" -d ", 1)[1]
                ids = re.findall(mac, body, re.I) + re.findall(
                    r'"(?:serial|uuid|asset)":\s*"([^"]+)"', body)
            else:
                continue
            for ident in ids:
                key = ident.lower().replace("-", ":")
                if key in seen:
                    repeated.append(f"{ident}: {seen[key]!r} then {line!r}")
                seen[key] = line
    assert repeated == [], repeated


def test_a_user_who_cannot_read_the_data_dir_is_told_to_run_it_as_its_owner(
        cfg: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The README runs the CLI with sudo; a user who forgot it met the first file's own
    error: `cannot read the secrets key ...: Permission denied (fix: make it readable by the
    netboot user (mode 0600))`, which invites opening the key to others, or for `ca export`
    `(fix: give a PEM certificate)`, or for `events --follow` no fix at all (s38-user). As
    root every file is readable, so the user's view of the data dir is played here."""
    import os

    import netboot.cli
    from netboot.config import load as load_config

    assert run(capsys, "machines", "add", "aa:bb:cc:dd:ee:01", "--config", cfg)[0] == 0
    data_dir = load_config(Path(cfg), env={}).data_dir
    real = os.access

    def access(path: object, mode: int, **kw: object) -> bool:
        return False if Path(str(path)) == data_dir else real(path, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(netboot.cli.os, "access", access)
    monkeypatch.delenv("NETBOOT_TOKEN", raising=False)
    for command in (["machines", "ls"], ["ca", "export"], ["events", "--follow"],
                    ["render", "aa:bb:cc:dd:ee:01", "ipxe"]):
        rc, out, err = run(capsys, *command, "--config", cfg)
        assert rc == 2 and out == "", (command, err)
        assert f"{data_dir} (owner " in err and "who cannot read it" in err, (command, err)
        assert "(fix: run the command as " in err and "sudo netboot" in err, (command, err)
        assert f"{cfg}:" in err, err  # where it was set: the file and its line


def test_the_readmes_https_ipxe_templates_keep_the_installers_urls_on_http(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """README "iPXE with netboot's CA" said to set http.public_url to the HTTPS base: that
    base also names k3OS's config URL and the registration URL, fetched by curl and busybox
    wget without netboot's CA, so every install failed there (s38-user). Its recipe now is a
    site template from the shipped ones, as this test makes it: iPXE's fetches over HTTPS,
    the installer's on HTTP."""
    from netboot.shipped import templates_dir

    site = tmp_path / "site"
    (site / "ipxe").mkdir(parents=True)
    for name in ("boot.ipxe", "hold.ipxe", "install.ipxe"):
        text = (templates_dir() / "ipxe" / name).read_text(encoding="utf-8")
        text = text.replace("{{ kernel_url }}",
                            "{{ kernel_url | replace(base_url, https_base_url, 1) }}")
        text = text.replace("{{ url }}", "{{ url | replace(base_url, https_base_url, 1) }}")
        (site / "ipxe" / name).write_text(text.replace("{{ base_url }}", "{{ https_base_url }}"),
                                          encoding="utf-8")
    path = write_config(tmp_path, f"templates:\n  dir: {site}\n")
    monkeypatch.setenv("NETBOOT_HTTP_PORT", "8080")
    monkeypatch.setenv("NETBOOT_HTTPS_PORT", "8443")
    assert run(capsys, "profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img",
               "--config", str(path))[0] == 0
    assert run(capsys, "machines", "add", "aa:bb:cc:dd:ee:01", "--profile", "p",
               "--config", str(path))[0] == 0

    async def make_ca() -> None:  # the server's first start makes it; renders carry it
        from netboot.service import open_inventory, prepare_tls

        cfg = load(path, env={"NETBOOT_HTTPS_PORT": "8443"})
        store, sealer = await open_inventory(cfg)
        prepare_tls(cfg, "192.0.2.10", sealer)
        await store.close()

    asyncio.run(make_ca())
    rc, out, err = run(capsys, "render", "aa:bb:cc:dd:ee:01", "ipxe", "--config", str(path))
    assert rc == 0, err
    assert "kernel https://192.0.2.10:8443/assets/vmlinuz " in out, out
    assert "initrd --name initrd.img https://192.0.2.10:8443/assets/initrd.img" in out, out
    assert "config_url=http://192.0.2.10:8080/config/" in out, out
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("**iPXE with netboot's CA**")[1].split("**Secrets at rest.**")[0]
    assert "https_base_url" in section and "set\n`http.public_url` to the HTTPS" not in section


def test_the_programs_the_readmes_quickstart_runs_are_installed_by_its_install_line() -> None:
    """The quickstart's API form runs curl, which a minimal Debian 12 (a container's, a
    debootstrap's, a netinst without its standard utilities) does not have: the README's
    install line, run as written in such a system, left `curl: command not found` at the
    first line after `netboot serve` (s39-user)."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    install = re.search(r"apt-get install -y ([^&]+)&&", readme)
    assert install is not None
    packages = set(install.group(1).split())
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    used = {word for block in re.findall(r"```sh\n(.*?)```", quickstart, re.S)
            for word in re.findall(r"(?:^|[;&|(]\s*|\$\()\s*(curl|wget|jq|dig)\b", block, re.M)}
    assert used and used <= packages, (used, packages)


def test_every_option_of_every_command_says_what_it_takes() -> None:
    """`--help` of each command and subcommand, read as a new user does: 42 options said
    nothing (`clusters add --server-url SERVER_URL`, whose "managed" a user could only learn
    from the README; `serve --discovery {ignore,hold,auto}`; `import --dry-run`; the label
    options' KEY=VALUE). Each option now has a help; a positional NAME of a profile,
    cluster, group or token is its own help."""
    import argparse

    from netboot.cli import build_parser

    silent = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help and not (action.dest == "name" and not action.option_strings):
                silent.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "netboot")
    assert silent == [], silent
    text = build_parser().parse_args(["clusters", "add", "x"])  # the default stays
    assert text.server_url == "managed"


def test_a_machine_is_named_by_its_hostname_where_a_ref_is_asked(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`netboot machines show edge-1`: hostnames are unique in the inventory and are what the
    dashboard and `events` name machines by, yet a REF was only a MAC or an id ("'edge-1' is
    neither a MAC address (aa:bb:cc:dd:ee:ff) nor a machine id (m-…)"). A MAC stays a MAC."""
    assert run(capsys, "machines", "add", "02:00:00:00:0e:01", "--hostname", "Edge-1",
               "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "02:00:00:00:0e:02", "--hostname", "edge-2",
               "--config", cfg)[0] == 0
    rc, out, err = run(capsys, "machines", "show", "edge-1", "--json", "--config", cfg)
    assert rc == 0, err
    assert json.loads(out)["macs"] == ["02:00:00:00:0e:01"]
    rc, out, err = run(capsys, "explain", "EDGE-2", "--arch", "x86_64", "--json",
                       "--config", cfg)
    assert rc == 0 and json.loads(out)["mac"] == "02:00:00:00:0e:02", err
    rc, out, err = run(capsys, "machines", "mark-installed", "edge-1", "edge-2", "--config", cfg)
    assert rc == 0, err
    assert out.splitlines()[1].startswith("02:00:00:00:0e:02 is installed"), out
    rc, out, err = run(capsys, "events", "edge-2", "--config", cfg)
    assert rc == 0 and "marked installed by the operator" in out, err
    rc, _, err = run(capsys, "machines", "rm", "edge-9", "--config", cfg)
    assert rc != 0 and err.strip() == ("netboot: machine edge-9 not found (give one of its "
                                       "MACs, its id or its hostname)"), err
    rc, _, err = run(capsys, "machines", "show", "not a name", "--config", cfg)
    assert rc != 0 and "neither a MAC address" in err, err
    # `machines add`'s MAC is a new machine's, never looked up as a hostname.
    assert run(capsys, "machines", "add", "edge-1", "--config", cfg)[0] != 0
    # A hostname spelled as another machine's MAC names both: refused, neither removed
    # (the API's {ref} rule, core.machine_ref); the colon form is the MAC alone.
    assert run(capsys, "machines", "add", "02:00:00:00:0e:03", "--hostname", "02000000"
               "0e01", "--config", cfg)[0] == 0
    rc, _, err = run(capsys, "machines", "rm", "020000000e01", "--config", cfg)
    assert rc != 0 and "names two machines" in err, err
    rc, out, err = run(capsys, "machines", "ls", "--json", "--config", cfg)
    assert rc == 0 and len(json.loads(out)) == 3, (out, err)
    rc, out, err = run(capsys, "machines", "show", "02:00:00:00:0e:01", "--json", "--config", cfg)
    assert rc == 0 and json.loads(out)["hostname"] == "edge-1", err


def test_clusters_set_changes_a_running_clusters_tokens_only_by_force_as_the_api_does(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """s40-sec's and s40-token's refusal of a running managed cluster's token or agent token
    changed, and its `force`, had no command: `clusters set --token/--agent-token` says the
    API's 409 (naming the fix) and changes nothing; with `--force` takes it, and each node
    that had its config is told in its history; `clusters add --agent-token` gives an
    external cluster its servers' agent token."""
    assert run(capsys, "clusters", "add", "edge", "--config", cfg)[0] == 0
    assert run(capsys, "profiles", "add", "k3os", "--kernel", "k3os/vmlinuz",
               "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "52:54:00:aa:00:31", "--cluster", "edge",
               "--role", "server", "--profile", "k3os", "--config", cfg)[0] == 0
    assert run(capsys, "machines", "mark-installed", "52:54:00:aa:00:31", "--config", cfg)[0] == 0
    before = json.loads(run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)[1])
    for flag, value in (("--token", "n3w-server-secret-9b7d1e"),
                        ("--agent-token", "n3w-agent-secret-4f9a2c")):
        rc, out, err = run(capsys, "clusters", "set", "edge", flag, value, "--config", cfg)
        assert rc != 0 and "reinstall" in err and "?force=true" in err, (rc, out, err)
        # The command's own way to force it named too (s41-review: only the API's was).
        assert f"netboot clusters set edge {flag} ... --force" in err, err
        assert "52:54:00:aa:00:31" in err and value not in out + err
        after = json.loads(run(capsys, "clusters", "show", "edge", "--json", "--config", cfg)[1])
        assert after == before
        rc, out, err = run(capsys, "clusters", "set", "edge", flag, value, "--force",
                           "--config", cfg)
        assert rc == 0, err
        assert value not in out + err
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:31", "--json", "--config", cfg)
    kinds = [e["kind"] for e in json.loads(out)["events"]]
    assert "token changed" in kinds and "agent token changed" in kinds, kinds
    rc, out, err = run(capsys, "clusters", "add", "ext", "--server-url",
                       "https://192.0.2.50:6443", "--token", "K10" + "ab" * 32 + "::server:"
                       + "5e" * 16, "--agent-token", "4f" * 4, "--config", cfg)
    assert rc == 0, err  # taken: its (weak) agent token is warned of as it is given
    assert "cluster ext: a weak k3s agent token" in err and "4f" * 4 not in out + err, err


def test_machines_claim_gives_the_machine_to_a_refused_registration_as_the_api_does(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """s40-sec's claim had no command: `machines claim REF CLAIM` gives a registered
    machine to the install whose registration a `registration contested` event names,
    with the API's words; a claim no refused registration made is its 404's message, one
    not 64 hex digits its 400 naming claim."""
    claim = "c1" * 32
    assert run(capsys, "machines", "ls", "--config", cfg)[0] == 0  # the inventory made
    asyncio.run(_contested(cfg, claim))
    rc, out, err = run(capsys, "machines", "claim", "52:54:00:aa:00:41", "ab" * 32,
                       "--config", cfg)
    assert rc != 0 and "no refused registration" in err, (rc, out, err)
    rc, out, err = run(capsys, "machines", "claim", "52:54:00:aa:00:41", "nope", "--config", cfg)
    assert rc != 0 and "claim" in err and "64 hexadecimal" in err, (rc, out, err)
    rc, out, err = run(capsys, "machines", "claim", "52:54:00:aa:00:41", claim, "--config", cfg)
    assert rc == 0, err
    assert "its next try is answered" in out and "192.0.2.30 is void" in out, out
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:aa:00:41", "--json", "--config", cfg)
    assert "registration claimed" in [e["kind"] for e in json.loads(out)["events"]]


async def _contested(cfg: str, claim: str) -> None:
    """A registered machine and the event of a registration refused with ``claim``, as
    enroll._contested writes it."""
    from netboot.model import Event, Machine, MachineState

    store = SqliteStore(load(cfg, env={}).db_path)
    await store.open()
    try:
        machine = Machine(macs=(MacAddress.parse("52:54:00:aa:00:41"),), hostname="n41",
                          state=MachineState.REGISTERED, ipv4="192.0.2.30",
                          secret_hash="00" * 32)
        await store.create_machine(machine)
        await store.add_event(Event(machine.id, time.time(), "registration contested",
                                    "refused", {"peer": "192.0.2.31", "claim": claim}))
    finally:
        await store.close()


async def test_machines_claim_reaches_the_claims_the_running_server_keeps(
        make_env: Any, tmp_path: Path) -> None:
    """A host with the spent install token uses every rate-limited "registration contested"
    event up; the device's refusal (twice) is then kept by the server only (netboot.claims).
    `netboot machines claim` worked on the database and read the events only: the device's
    claim was a 404 there (s41-ops). Now it goes through the running server's API: without
    CLAIM it lists the kept claims (the device's, tried twice), with it the machine is
    given. The CLI as its own process, the server over real HTTP."""
    import hashlib
    import secrets

    from netboot.enroll import CONTEST_BURST
    from tests.conftest import boot, install_token
    from tests.test_api import _register_from

    env = await make_env()
    await env.seed()
    mac = "52:54:00:41:00:02"
    await env.post("/api/v1/machines", {"mac": mac}, status=201)
    token = install_token(await boot(env, mac))
    body = {"mac": mac, "token": token, "install_secret": "holder",
            "addresses": ["198.51.100.6"], "keeps": "machine_token"}

    async def register(peer: str, secret: str) -> int:
        raw = await _register_from(env, peer, {**body, "install_secret": secret})
        return int(raw.split(b" ", 2)[1])
    assert await register("127.0.0.66", "holder") == 200
    for i in range(CONTEST_BURST):
        assert await register(f"127.0.1.{i + 1}", secrets.token_hex(16)) == 409
    device = "device-" + secrets.token_hex(8)
    claim = hashlib.sha256(device.encode()).hexdigest()
    for _ in range(2):
        assert await register("127.0.0.7", device) == 409
    events = await env.get(f"/api/v1/machines/{mac}/events")
    assert claim not in json.dumps(events)  # the events were used up: kept only

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "netboot", "machines", "claim", mac, *args,
            "--server", f"http://127.0.0.1:{env.client.port}",
            "--config", str(tmp_path / "a" / "netboot.yaml"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "NETBOOT_TOKEN": env.admin,
                 "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await cli("--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert (listed[0]["claim"], listed[0]["tries"]) == (claim, 2), listed
    rc, out, err = await cli()
    assert rc == 0 and claim in out and "kept by http://127.0.0.1:" in err, (out, err)
    rc, out, err = await cli("0" * 64)
    assert rc == 1 and "HTTP 404" in err and f"sent {claim} 2 times" in err, (rc, out, err)
    rc, out, err = await cli(claim)
    assert rc == 0 and "is given to the install" in out, (rc, out, err)
    assert await register("127.0.0.7", device) == 200


def test_refusals_print_the_way_out(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """What the CLI prints where the API gives a 4xx: the problem and the command past it
    (an unknown cluster, an approval its state refuses, a serial another machine holds;
    each named the problem alone, s47-review)."""
    assert run(capsys, "clusters", "add", "edge", "--server-url", "managed", "--config",
               cfg)[0] == 0
    rc, _, err = run(capsys, "machines", "add", "52:54:00:aa:00:21", "--cluster", "egde",
                     "--config", cfg)
    assert (rc, err) == (2, "netboot: cluster: unknown cluster 'egde' (did you mean 'edge'?): "
                            "add it first (netboot "
                            "clusters add egde --server-url managed|https://SERVER:6443, POST "
                            "/api/v1/clusters), or give one that exists (netboot clusters "
                            "ls)\n")
    assert run(capsys, "machines", "add", "52:54:00:aa:00:21", "--hostname", "rack1-a",
               "--serial", "CZ1", "--cluster", "edge", "--config", cfg)[0] == 0
    rc, _, err = run(capsys, "machines", "add", "--serial", "CZ1", "--mac",
                     "52:54:00:aa:00:22", "--config", cfg)
    assert rc != 0 and "serial CZ1 already belongs to machine m-" in err, err
    assert "(rack1-a, 52:54:00:aa:00:21): edit that one (netboot machines set " in err and (
        "remove it if its hardware is gone (netboot machines rm 52:54:00:aa:00:21)" in err), err
    assert run(capsys, "machines", "reinstall", "52:54:00:aa:00:21", "--config", cfg)[0] == 0
    rc, _, err = run(capsys, "machines", "approve", "rack1-a", "--config", cfg)
    assert rc != 0 and err == (
        "netboot: 52:54:00:aa:00:21 is reinstall; 'approve' is not allowed: a reinstall is "
        "asked and its next network boot installs it; to change its cluster, role or profile "
        "first: netboot machines set 52:54:00:aa:00:21 (PATCH /api/v1/machines/"
        "52:54:00:aa:00:21) (steps allowed in reinstall: install-plan, installed, "
        "reinstall)\n"), err


def test_render_names_the_servers_the_inventory_records_as_a_server_does(
        tmp_path: Path, cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``netboot render``'s config names, after this server, the servers the inventory's
    record holds (netboot.inventory.peers), as a served one does, and writes nothing: one
    not heard of for 10 minutes is left out, and the record is as it was (s48-ha)."""
    from netboot.inventory.base import SERVERS

    assert run(capsys, "profiles", "add", "k3os", "--kernel", "vmlinuz", "--config", cfg)[0] == 0
    assert run(capsys, "machines", "add", "aa:bb:cc:dd:ee:02", "--profile", "k3os",
               "--config", cfg)[0] == 0
    record = json.dumps({"http://192.0.2.11:8080": time.time(),
                         "http://192.0.2.12:8080": time.time() - 3600})

    async def put() -> None:
        store = SqliteStore(tmp_path / "data" / "netboot.db")
        await store.open()
        try:
            await store.put_setting(SERVERS, record)
        finally:
            await store.close()

    asyncio.run(put())
    rc, out, _ = run(capsys, "render", "aa:bb:cc:dd:ee:02", "config", "--arch", "x86_64",
                     "--config", cfg)
    assert rc == 0, out
    import re

    assert re.search(r"for u in http://192\.0\.2\.10:\d+/api/v1/register "
                     r"http://192\.0\.2\.11:8080/api/v1/register; do", out), out
    assert "192.0.2.12" not in out

    async def get() -> str | None:
        store = SqliteStore(tmp_path / "data" / "netboot.db")
        await store.open()
        try:
            return await store.get_setting(SERVERS)
        finally:
            await store.close()

    assert asyncio.run(get()) == record
