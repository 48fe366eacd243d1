"""One core below the CLI and the API: the same case through both faces, the same outcome.

Each test runs the CLI against the very inventory (SQLite file, same config file) that the
HTTP server in the test serves, so a rule kept by one face and not the other shows up here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from netboot.cli import main
from netboot.core import NOCLOUD_FILES, TOKEN_PLACEHOLDER
from netboot.errors import ConfigError
from netboot.model import MacAddress, Machine, MachineState, Role
from tests import pg
from tests.conftest import BASE, Env, EnvFactory, Reply, boot, call, install_token, write_config

MAC = "52:54:00:12:34:56"
HEXHYP = "52-54-00-12-34-56"
PUBLIC = f"  public_url: {BASE}\n"  # the URL the test server's scripts use, for both faces


class Cli:
    """``netboot …`` with the server's config file, run in a thread (it runs its own loop)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = str(config)
        self.capsys = capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = await asyncio.to_thread(main, [*args, "--config", self.config])
        out, err = self.capsys.readouterr()
        return rc, out, err


async def start(make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                extra: str = "") -> tuple[Env, Cli]:
    env = await make_env(extra, http=PUBLIC)
    return env, Cli(tmp_path / "a" / "netboot.yaml", capsys)


def same_refusal(cli: tuple[int, str, str], api: Reply, status: int,
                 field: str | None = None) -> str:
    """Both refused: non-zero exit and the error status, with the same message."""
    rc, _, err = cli
    assert api.status == status, (api.status, api.text)
    body = api.json()
    assert rc != 0, err
    assert body.get("field") == field, body
    # (The CLI names the field of a 400, a ValidationError's; a 409's message names it.)
    expected = (f"netboot: {field}: {body['error']}" if field and status == 400
                else f"netboot: {body['error']}")
    assert err.strip() == expected
    message: str = body["error"]
    return message


# --- referential integrity: rm while in use ----------------------------------------------------


@pytest.mark.parametrize(("kind", "name", "user"), [
    ("profiles", "k3os", "machine"), ("profiles", "k3os", "group"),
    ("clusters", "edge", "machine"), ("clusters", "edge", "group"),
])
async def test_rm_in_use_is_refused_by_both(make_env: EnvFactory, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str], kind: str,
                                           name: str, user: str) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    await env.seed()
    if user == "machine":
        await call(env, "DELETE", "/api/v1/groups/all-x86")
        await env.post("/api/v1/machines", {"mac": MAC, kind[:-1]: name}, status=201)
    api = await call(env, "DELETE", f"/api/v1/{kind}/{name}")
    message = same_refusal(await cli(kind, "rm", name), api, 409, field=kind[:-1])
    assert (f"machine {MAC}" if user == "machine" else "group 'all-x86'") in message
    # The field, and the machine using it as holder (s42-review: the 409 named neither).
    machine = await env.get(f"/api/v1/machines/{MAC}") if user == "machine" else None
    assert api.json().get("holder") == (machine["id"] if machine else None)
    assert (await env.get(f"/api/v1/{kind}/{name}"))["name"] == name  # nothing removed
    # Once nothing uses it, both remove it.
    if user == "machine":
        await call(env, "DELETE", f"/api/v1/machines/{MAC}")
    else:
        await call(env, "DELETE", "/api/v1/groups/all-x86")
    assert (await cli(kind, "rm", name))[0] == 0
    assert (await call(env, "DELETE", f"/api/v1/{kind}/{name}")).status == 404


async def test_default_profile_cannot_be_removed(make_env: EnvFactory, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    extra = "enroll:\n  default_profile: k3os\n"
    cli = Cli(write_config(tmp_path / "a", extra, http=PUBLIC), capsys)
    assert (await cli("profiles", "add", "k3os", "--kernel", "vmlinuz"))[0] == 0
    env = await make_env(extra, http=PUBLIC)
    message = same_refusal(await cli("profiles", "rm", "k3os"),
                           await call(env, "DELETE", "/api/v1/profiles/k3os"), 409, "profile")
    assert "enroll.default_profile" in message


# --- validation: the same field named by both ---------------------------------------------------


@pytest.mark.parametrize(("flags", "body", "field"), [
    (["--server-url", "ftp://nope"], {"server_url": "ftp://nope"}, "server_url"),
    (["--server-url", "ftp://nope", "--token", "t"], {"server_url": "ftp://nope", "token": "t"},
     "server_url"),
    (["--server-url", "https://192.0.2.50:6443"], {"server_url": "https://192.0.2.50:6443"},
     "token"),
])
async def test_bad_cluster_is_refused_by_both(make_env: EnvFactory, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              flags: list[str], body: dict[str, Any],
                                              field: str) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    same_refusal(await cli("clusters", "add", "c", *flags),
                 await call(env, "POST", "/api/v1/clusters", json_body={"name": "c", **body}),
                 400, field)
    assert await env.get("/api/v1/clusters") == []


@pytest.mark.parametrize(("flags", "body", "field"), [
    (["--uuid", "not-a-uuid"], {"uuid": "not-a-uuid"}, "uuid"),
    (["--fixed-ipv4", "300.1.1.1"], {"fixed_ipv4": "300.1.1.1"}, "fixed_ipv4"),
    (["--profile", "nope"], {"profile": "nope"}, "profile"),
    (["--hostname", "bad_name!"], {"hostname": "bad_name!"}, "hostname"),
])
async def test_bad_machine_is_refused_by_both(make_env: EnvFactory, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              flags: list[str], body: dict[str, Any],
                                              field: str) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    same_refusal(await cli("machines", "add", MAC, *flags),
                 await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC, **body}),
                 400, field)
    assert (await env.get("/api/v1/machines"))["total"] == 0


# Each was stored and every boot of the profile refused when served (403 for '..', 404 for the
# rest: a leading '/' is the assets' root, a tftp:// or file: URL a path under it) (s35-user).
@pytest.mark.parametrize(("flags", "body", "field"), [
    (["--kernel", "../../etc/passwd"], {"kernel": "../../etc/passwd"}, "kernel"),
    (["--kernel", "k3os/../../x"], {"kernel": "k3os/../../x"}, "kernel"),
    (["--kernel", "..\\x"], {"kernel": "..\\x"}, "kernel"),
    (["--kernel", "/etc/passwd"], {"kernel": "/etc/passwd"}, "kernel"),
    (["--kernel", "/assets/k3os/vmlinuz"], {"kernel": "/assets/k3os/vmlinuz"}, "kernel"),
    (["--kernel", "tftp://192.0.2.10/vmlinuz"], {"kernel": "tftp://192.0.2.10/vmlinuz"},
     "kernel"),
    (["--kernel", "file:///boot/vmlinuz"], {"kernel": "file:///boot/vmlinuz"}, "kernel"),
    (["--kernel", "http:///vmlinuz"], {"kernel": "http:///vmlinuz"}, "kernel"),
    (["--kernel", "vmlinuz\nchain http://192.0.2.99/x"],
     {"kernel": "vmlinuz\nchain http://192.0.2.99/x"}, "kernel"),
    (["--kernel", "v", "--initrd", "ok", "--initrd", "../initrd"],
     {"kernel": "v", "initrds": ["ok", "../initrd"]}, "initrds[1]"),
    (["--kernel", "v", "--initrd", "/initrd"], {"kernel": "v", "initrds": ["/initrd"]},
     "initrds[0]"),
    (["--kernel", "http://192.0.2.10/a b"], {"kernel": "http://192.0.2.10/a b"}, "kernel"),
])
async def test_a_boot_file_netboot_cannot_serve_is_refused_by_both(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        flags: list[str], body: dict[str, Any], field: str) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    same_refusal(await cli("profiles", "add", "p", *flags),
                 await call(env, "POST", "/api/v1/profiles", json_body={"name": "p", **body}),
                 400, field)
    assert await env.get("/api/v1/profiles") == []


async def test_an_asset_path_is_relative_and_not_a_url(env: Env) -> None:
    for path in ("../x", "/x", "http://192.0.2.10/x"):
        r = await call(env, "POST", "/api/v1/profiles", json_body={
            "name": "p", "kernel": "v", "assets": [{"path": "ok"}, {"path": path}]})
        assert r.status == 400, (path, r.text)
        assert r.json()["field"] == "assets[1].path", r.text


@pytest.mark.parametrize(("field", "value"), [
    # U-Boot's FDTDIR, fetched over TFTP from the assets as the kernel is: a path, not a URL.
    ("fdtdir", "../../etc"), ("fdtdir", "dtbs/../../x"), ("fdtdir", "/boot/dtbs"),
    ("fdtdir", "tftp://192.0.2.10/dtbs"), ("fdtdir", "http://192.0.2.10/dtbs"),
    ("fdtdir", "dtbs\nKERNEL http://192.0.2.99/x"),
    # What the installer fetches (k3os.install.iso_url=): an http(s) URL, no space.
    ("iso_url", "k3os.iso"), ("iso_url", "/var/lib/netboot/assets/k3os.iso"),
    ("iso_url", "ftp://mirror.example/k3os.iso"), ("iso_url", "http:///k3os.iso"),
    ("iso_url", "http://mirror.example/k3 os.iso"),
    ("iso_url", "http://mirror.example/k3os.iso\nx"),
])
async def test_a_profiles_fdtdir_and_iso_url_are_checked_as_its_files(
        env: Env, field: str, value: str) -> None:
    # s35-user2 checked kernel, initrds and assets; these two were stored as given.
    r = await call(env, "POST", "/api/v1/profiles",
                   json_body={"name": "p", "kernel": "v", field: value})
    assert r.status == 400 and r.json()["field"] == field, r.text
    assert await env.get("/api/v1/profiles") == []


async def test_a_profiles_fdtdir_and_iso_url_in_their_forms_are_kept(env: Env) -> None:
    await env.post("/api/v1/profiles", {"name": "p", "kernel": "v"}, status=201)
    for fdtdir, iso_url in (("dtbs", "https://github.com/rancher/k3os/releases/k3os.iso"),
                            ("rpi/dtbs/", "http://192.0.2.10:8080/assets/k3os.iso"),
                            (None, None), ("", "")):
        body = {"name": "p", "kernel": "v", "fdtdir": fdtdir, "iso_url": iso_url}
        r = await call(env, "PUT", "/api/v1/profiles/p", json_body=body)
        assert r.status in (200, 201), r.text
        assert (r.json()["fdtdir"], r.json()["iso_url"]) == (fdtdir, iso_url)


async def test_a_profile_stored_before_the_checks_says_why_it_is_refused(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    # Written by a netboot before s35-user2 (or into the store directly): kept and loaded,
    # its boots refused when served, and a PUT of it unchanged refused. Its GET, `netboot
    # assets` and the start-up log say which file and why, so the refusal is no surprise.
    from dataclasses import replace as with_

    from netboot.model import Asset, Profile
    from netboot.service import warn_of_unservable_profiles

    env, cli = await start(make_env, tmp_path, capsys)
    old = Profile(name="old", kernel="../../etc/passwd", initrds=("ok.img", "/initrd.img"),
                  assets=(Asset(path="vmlinuz"),), fdtdir="/boot/dtbs",
                  iso_url="k3os.iso")
    await env.service.store.put_profile(old, create=True)
    shown = await env.get("/api/v1/profiles/old")
    assert [p["field"] for p in shown["problems"]] == [
        "kernel", "initrds[1]", "fdtdir", "iso_url"]
    assert "'..' is refused when served" in shown["problems"][0]["error"]
    assert (await env.get("/api/v1/profiles"))[0]["problems"] == shown["problems"]
    # Written back as read: refused, naming the first.
    r = await call(env, "PUT", "/api/v1/profiles/old", json_body=shown)
    assert r.status == 400 and r.json()["field"] == "kernel", r.text
    # `netboot assets`: refused and why, not "missing".
    rc, out, _ = await cli("assets", "--json")
    rows = {r["name"]: r["status"] for r in json.loads(out) if r["kind"] == "profile old"}
    assert rc == 1
    assert rows["../../etc/passwd"].startswith("refused ('../../etc/passwd' leaves the assets")
    assert rows["/initrd.img"].startswith("refused ('/initrd.img' is not relative")
    assert rows["vmlinuz"] == "ok"
    rc, out, _ = await cli("profiles", "show", "old", "--json")
    assert rc == 0 and json.loads(out)["problems"] == shown["problems"]
    # The start-up log names each.
    caplog.clear()
    await warn_of_unservable_profiles(env.service.store)
    told = [r.getMessage() for r in caplog.records]
    assert len(told) == 4 and told[0].startswith("profile old: kernel: '../../etc/passwd' "
                                                 "leaves the assets"), told
    # Corrected, the same body (its problems still in it: shown, never taken) is taken.
    fixed = {**shown, "kernel": "vmlinuz", "initrds": ["ok.img", "initrd.img"],
             "fdtdir": "dtbs", "iso_url": "http://192.0.2.10/k3os.iso"}
    r = await call(env, "PUT", "/api/v1/profiles/old", json_body=fixed)
    assert r.status == 200 and "problems" not in r.json(), r.text
    assert "problems" not in await env.get("/api/v1/profiles/old")
    assert await env.service.store.get_profile("old") == with_(
        old, kernel="vmlinuz", initrds=("ok.img", "initrd.img"), fdtdir="dtbs",
        iso_url="http://192.0.2.10/k3os.iso")
    caplog.clear()
    await warn_of_unservable_profiles(env.service.store)
    assert not caplog.records


@pytest.mark.parametrize("kernel", [
    "vmlinuz", "k3os/vmlinuz", "k3os/v1.2/vmlinuz-5.15", "a..b/vmlinuz", "a b/vmlinuz",
    "http://192.0.2.10:8080/assets/k3os/vmlinuz", "https://mirror.example/k3os/vmlinuz",
    "http://[2001:db8::1]/vmlinuz"])
async def test_the_forms_a_profile_names_its_files_in_are_kept(env: Env, kernel: str) -> None:
    body = {"name": "p", "kernel": kernel, "initrds": [kernel], "assets": [{"path": "k/i"}]}
    created = await env.post("/api/v1/profiles", body, status=201)
    assert created["kernel"] == kernel and created["initrds"] == [kernel]


async def test_uuid_is_stored_in_one_form_by_both(make_env: EnvFactory, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    upper = "4C4C4544-0000-1000-8000-000000000001"
    assert (await cli("machines", "add", MAC, "--uuid", upper))[0] == 0
    await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:57", "uuid": upper.replace(
        "01", "02")}, status=201)
    got = (await env.get("/api/v1/machines"))["items"]
    assert [m["uuid"] for m in got] == [upper.lower(), upper.lower().replace("01", "02")]


# --- approve: a profile or a clear error; the console's command works ---------------------------


async def test_approve_without_any_profile_is_refused_by_both(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env, cli = await start(make_env, tmp_path, capsys, "discovery:\n  policy: hold\n")
    await env.post("/api/v1/clusters", {"name": "edge", "server_url": "managed"}, status=201)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    await env.post("/api/v1/profiles", {"name": "ubuntu", "kernel": "vmlinuz"}, status=201)
    await boot(env, MAC)
    message = same_refusal(
        await cli("machines", "approve", MAC, "--cluster", "edge", "--role", "agent"),
        await call(env, "POST", f"/api/v1/machines/{MAC}/approve",
                   json_body={"cluster": "edge", "role": "agent"}), 400, "profile")
    assert "--profile" in message and "enroll.default_profile" in message
    assert "k3os, ubuntu" in message
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "discovered"


async def test_the_held_machines_console_prints_a_command_that_works(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env, cli = await start(make_env, tmp_path, capsys, "discovery:\n  policy: hold\n")
    # An endpoint, so that the approved agent installs at once instead of waiting for the
    # cluster's first server (the waiting is tested in test_flow).
    await env.post("/api/v1/clusters", {"name": "edge", "server_url": "managed",
                                        "endpoint": "192.0.2.50"}, status=201)
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    held = await boot(env, MAC)
    lines = [line for line in held.splitlines() if "netboot machines approve" in line]
    assert len(lines) == 1, held
    command = lines[0].split("run: ", 1)[1]
    assert command == f"netboot machines approve {MAC} --cluster edge --role agent " \
                      "--profile k3os"
    argv = shlex.split(command)[1:]
    rc, _, err = await cli(*argv[:3], "52:54:00:12:34:57", *argv[3:], "--hostname", "edge-1")
    assert rc == 2 and "--hostname" in err  # one name for two machines
    rc, out, err = await cli(*argv, "--hostname", "edge-1")
    assert rc == 0 and out.startswith(f"approved {MAC}"), err
    script = await boot(env, MAC)
    assert "kernel " in script and install_token(script)
    got = await env.get(f"/api/v1/machines/{MAC}")
    assert (got["state"], got["hostname"], got["profile"]) == ("booting", "edge-1", "k3os")


@pytest.mark.parametrize(("rule", "key", "fix"), [
    ("{name: a, selector: {arch: [arm64]}, cluster: nope}", "discovery.rules[0].cluster",
     "netboot clusters add nope --server-url managed"),
    ("{name: a, selector: {arch: [arm64]}, role: agent}\n"
     "    - {name: b, selector: {arch: [x86_64]}, profile: nada}",
     "discovery.rules[1].profile", "netboot profiles add nada --kernel ..."),
])
async def test_an_auto_rules_cluster_and_profile_are_checked_at_start_up(
        make_env: EnvFactory, rule: str, key: str, fix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # Started without a word: each device the rule matched was held, its console telling
    # an approve with the missing cluster (refused). Told, not refused: it may be created
    # through the API once the server runs.
    extra = f"discovery:\n  policy: auto\n  rules:\n    - {rule}\n"
    with caplog.at_level(logging.WARNING, logger="netboot.service"):
        await make_env(extra, sub="empty", http=PUBLIC)
    told = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(told) == 1 and fix in told[0] and "devices this rule matches are held" \
        in told[0] and re.search(r"netboot\.yaml:\d+: " + re.escape(key), told[0]), told
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="netboot.service"):
        await make_env(extra.replace("auto", "hold"), sub="empty", http=PUBLIC)  # inert
    assert not [r for r in caplog.records if key in r.getMessage()]


async def test_an_auto_rules_cluster_and_profile_cannot_be_removed(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Removed while serving, every device the rule matches is held (the test above).
    extra = ("discovery:\n  policy: auto\n  rules:\n"
             "    - {name: a, selector: {arch: [arm64]}, cluster: line-3, profile: k3os}\n")
    cli = Cli(write_config(tmp_path / "a", extra, http=PUBLIC), capsys)
    assert (await cli("profiles", "add", "k3os", "--kernel", "vmlinuz"))[0] == 0
    assert (await cli("clusters", "add", "line-3"))[0] == 0
    env = await make_env(extra, http=PUBLIC)
    for kind, name in (("profiles", "k3os"), ("clusters", "line-3")):
        message = same_refusal(await cli(kind, "rm", name),
                               await call(env, "DELETE", f"/api/v1/{kind}/{name}"), 409,
                               kind[:-1])
        assert f"the configuration (discovery.rules[0].{kind[:-1]})" in message


async def test_default_profile_is_used_and_checked_at_start_up(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = "discovery:\n  policy: hold\nenroll:\n  default_profile: k3os\n"
    with pytest.raises(ConfigError) as info:
        await make_env(extra, sub="empty", http=PUBLIC)
    assert info.value.key == "enroll.default_profile" and "profiles add k3os" in str(info.value)
    cli = Cli(write_config(tmp_path / "a", extra, http=PUBLIC), capsys)
    assert (await cli("profiles", "add", "k3os", "--kernel", "vmlinuz"))[0] == 0
    assert (await cli("profiles", "add", "other", "--kernel", "vmlinuz"))[0] == 0
    # With an endpoint, the approved agent installs at once rather than waiting for a server.
    assert (await cli("clusters", "add", "edge", "--endpoint", "192.0.2.50"))[0] == 0
    env = await make_env(extra, http=PUBLIC)
    held = await boot(env, MAC)
    command = next(line.split("run: ", 1)[1] for line in held.splitlines() if "run: " in line)
    assert "--profile" not in command  # the default gives it one
    rc, _, err = await cli(*shlex.split(command)[1:])
    assert rc == 0, err
    explained = await env.get(f"/api/v1/machines/{MAC}/explain")
    assert (explained["profile"], explained["profile_source"]) == ("k3os", "default")
    assert "kernel " in await boot(env, MAC)


# --- render and explain: exactly what the server serves -----------------------------------------


async def test_render_and_explain_give_what_the_server_serves(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env, cli = await start(make_env, tmp_path, capsys, "dns:\n  enabled: true\n")
    await env.seed(server_url="managed")
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1"}, status=201)
    # A registered server, so that netboot's DNS answers edge.netboot.lan (with none, the
    # agent would wait rather than be sent to a name that resolves to nothing).
    await env.service.store.create_machine(Machine(
        macs=(MacAddress.parse("52:54:00:00:00:60"),), hostname="server-1", cluster="edge",
        role=Role.SERVER, state=MachineState.REGISTERED, ipv4="192.0.2.60"))

    rc, explained, err = await cli("explain", MAC, "--arch", "x86_64", "--json")
    assert rc == 0, err
    assert json.loads(explained) == await env.get(f"/api/v1/machines/{MAC}/explain?arch=x86_64")
    rc, ipxe, err = await cli("render", MAC, "ipxe", "--arch", "x86_64")
    assert rc == 0, err
    served = await boot(env, HEXHYP)
    token = install_token(served)
    assert ipxe == served.replace(token, TOKEN_PLACEHOLDER)

    # The machine is booting now; what its installer fetches next, rendered first by the CLI
    # (fetching it moves the machine on, and the reason in the config's comment with it).
    rc, config, err = await cli("render", MAC, "config")
    assert rc == 0, err
    served_config = await env.get(f"/config/{HEXHYP}?token={token}")
    assert config == served_config.replace(token, TOKEN_PLACEHOLDER)
    assert 'server_url: "https://edge.netboot.lan:6443"' in config  # netboot's DNS name
    rc, nocloud, err = await cli("render", MAC, "nocloud")
    assert rc == 0, err
    files = [(name, await env.get(f"/nocloud/{HEXHYP}/{token}/{name}"))
             for name in NOCLOUD_FILES]
    assert nocloud == "".join(f"--- {name}\n{text}" for name, text in files).replace(
        token, TOKEN_PLACEHOLDER)


@pytest.mark.parametrize("kind", ["profiles", "clusters"])
async def test_rm_names_a_few_users_and_counts_the_rest(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        kind: str) -> None:
    env, cli = await start(make_env, tmp_path, capsys)
    await env.seed()
    await call(env, "DELETE", "/api/v1/groups/all-x86")
    name = "k3os" if kind == "profiles" else "edge"
    for i in range(7):
        await env.post("/api/v1/machines", {"mac": f"52:54:00:00:00:{i:02x}", kind[:-1]: name},
                       status=201)
    message = same_refusal(await cli(kind, "rm", name),
                           await call(env, "DELETE", f"/api/v1/{kind}/{name}"), 409,
                           kind[:-1])
    assert message.count("machine 52:54:00:00:00:") == 5 and "2 more machines" in message


async def test_render_grub_and_explain_the_chain(
        make_env: EnvFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env, cli = await start(make_env, tmp_path, capsys, "")
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1",
                                        "loader": "shim-grub"}, status=201)
    rc, text, err = await cli("render", MAC, "grub", "--arch", "x86_64")
    assert rc == 0, err
    assert "linux '/vmlinuz'" in text and "INSTALL-TOKEN" in text and text.endswith("boot\n")
    rc, explained, err = await cli("explain", MAC, "--arch", "x86_64", "--json")
    assert rc == 0, err
    why = json.loads(explained)
    assert (why["loader"], why["loader_source"]) == ("shim-grub", "set on the machine")


# --- an old cluster's agent token, given by several servers starting at once (s40-sec) ---

@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("first", ["start-up", "edit"])
async def test_an_old_clusters_agent_token_given_by_one_server_is_kept_by_the_others(
        kind: str, first: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two servers on one inventory: one gives a cluster an older netboot made its agent
    token (Core.give_agent_tokens, at its start) and may serve a server's config naming it
    at once. The other read the cluster before that write, either starting too (it made a
    token of its own) or for an operator's edit (which, no node having a config, made one
    too): it wrote its own over the first (agents given one secret were then refused by a
    server configured with the other). Now both writes are compare-and-sets, made again on
    the cluster as stored. Ordered by a store wrapper, not a sleep: the second server's
    first write waits until the first server has given its token."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.model import Cluster

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        await a.put_cluster(Cluster(name="old", token="o" * 32), create=True)
        writing, first_given = asyncio.Event(), asyncio.Event()
        put = a.put_cluster

        async def after_the_other(cluster: Cluster, **kw: Any) -> None:
            if not writing.is_set():
                writing.set()  # a has read the cluster and made its token: b writes first
                await first_given.wait()
            await put(cluster, **kw)

        a.put_cluster = after_the_other  # type: ignore[method-assign]
        core_a, core_b = (Core(s, Enroller(s), None, None)  # type: ignore[arg-type]
                          for s in (a, b))
        slow = asyncio.ensure_future(core_a.give_agent_tokens() if first == "start-up" else
                                     core_a.put("clusters", {"name": "old",
                                                             "server_url": "managed",
                                                             "description": "rack 4"},
                                                create=False))
        await writing.wait()
        assert await core_b.give_agent_tokens() == ["old"]
        given = await b.get_cluster("old")
        assert given is not None and len(given.agent_token) == 64
        first_given.set()
        done = await slow
        if first == "start-up":
            assert done == []  # it read the other's and kept it
        else:
            given = replace(given, description="rack 4")
            assert done == given
        for store in (a, b):
            assert await store.get_cluster("old") == given


# --- one fixed_ipv4, given at once by two processes on one inventory (s40-review) --------

@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_fixed_address_given_at_once_by_the_cli_and_a_server_is_given_once(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`netboot machines set B --fixed-ipv4 X` (a CLI process) beside a server's PATCH of A
    to X, on one SQLite file: the check that no other machine has X and the write held
    only a lock of each process's (s40-net's asyncio lock; PostgreSQL's advisory lock
    covered servers there), so both read "free" and both were stored: two machines answer
    ARP for X. Ordered by a store wrapper: the first's check waits until the second has
    checked too (bounded: with the lock the second cannot check before the first writes)."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.base import MachineFilter

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        core_a, core_b = (Core(s, Enroller(s), None, None)  # type: ignore[arg-type]
                          for s in (a, b))
        for n in (1, 2):
            await core_a.create_machine({"mac": f"52:54:00:40:0f:0{n}"}, note="enrolled")
        checking, checked = asyncio.Event(), asyncio.Event()
        list_a, list_b = a.list_machines, b.list_machines

        async def a_waits(flt: MachineFilter | None = None, **kw: Any) -> list[Machine]:
            found = await list_a(flt, **kw)
            if flt is not None and flt.fixed_ipv4 is not None:
                checking.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(checked.wait(), 2)
            return found

        async def b_checks(flt: MachineFilter | None = None, **kw: Any) -> list[Machine]:
            found = await list_b(flt, **kw)
            if flt is not None and flt.fixed_ipv4 is not None:
                checked.set()
            return found

        a.list_machines = a_waits  # type: ignore[method-assign]
        b.list_machines = b_checks  # type: ignore[method-assign]
        first = asyncio.ensure_future(core_a.update_machine("52:54:00:40:0f:01",
                                                            {"fixed_ipv4": "192.0.2.72"}))
        await checking.wait()  # a has checked, not written
        outcomes = await asyncio.gather(
            first, core_b.update_machine("52:54:00:40:0f:02", {"fixed_ipv4": "192.0.2.72"}),
            return_exceptions=True)
        held = [m.ref for m in await list_a(MachineFilter(fixed_ipv4="192.0.2.72"))]
        assert len(held) == 1, (held, outcomes)
        assert sum(isinstance(o, Conflict) for o in outcomes) == 1, outcomes


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_second_core_on_one_enroller_takes_the_stores_fixed_lock_once(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A second Core made on a server's enroller (tests/test_pki.py's) wrapped its fixed
    lock again: every write setting a fixed_ipv4 then failed (AttributeError: the inner
    wrapper is no asyncio.Lock), and had it been one, the store's lock taken twice in one
    task, the second on another connection or descriptor, waits for the first forever."""
    from netboot.core import Core
    from netboot.enroll import Enroller

    async with contextlib.AsyncExitStack() as stack:
        (store,) = await pg.stores_on_one_inventory(kind, tmp_path, request, stack, count=1)
        enroller = Enroller(store)
        Core(store, enroller, None, None)  # type: ignore[arg-type]
        core = Core(store, enroller, None, None)  # type: ignore[arg-type]
        machine = await asyncio.wait_for(core.create_machine(
            {"mac": "52:54:00:40:0f:11", "fixed_ipv4": "192.0.2.73"}, note="enrolled"), 30)
        assert machine.fixed_ipv4 == "192.0.2.73"


# --- If-Match on a profile's or group's replace and a machine's delete, compared on write ---

@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["profiles", "groups", "machine"])
async def test_a_change_between_if_match_and_the_write_is_a_412_and_nothing_written(
        kind: str, what: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two stores on one inventory (two servers, or a CLI beside a server): the API's
    If-Match was checked on a read, then the other wrote the item (a replace, an edit of the
    machine) before this one's write. The write compares what was read in its own
    transaction: a 412 and nothing written; before, the replace was written over the
    other's and the edited machine deleted. Ordered by a store wrapper, not a sleep."""
    from netboot.core import Core, item_version
    from netboot.enroll import Enroller
    from netboot.errors import PreconditionFailed
    from netboot.identity import machine_version
    from netboot.inventory import codec
    from netboot.model import Group, Profile

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        core_a = Core(a, Enroller(a), None, None)  # type: ignore[arg-type]
        if what == "machine":
            machine = Machine(id="m-1", macs=(MacAddress.parse("52:54:00:41:00:01"),),
                              hostname="edge-1", updated=100.0)
            await a.create_machine(machine)
            read = await a.get_machine("m-1")
            assert read is not None
            version = machine_version(read)
            theirs: Any = replace(read, hostname="edge-2", updated=read.updated + 1)
            write = "delete_machine"

            async def other() -> None:
                await b.update_machine(theirs)
        else:
            item: Any = (Profile(name="p", kernel="vmlinuz") if what == "profiles"
                         else Group(name="g", selector={"arch": ("arm64",)}))
            single = what[:-1]
            await getattr(a, f"put_{single}")(item, create=True)
            version = item_version(what, item)
            theirs = (replace(item, description="theirs") if what == "profiles"
                      else replace(item, labels={"rack": "theirs"}))
            write = f"put_{single}"

            async def other() -> None:
                await getattr(b, f"put_{single}")(theirs)
        original = getattr(a, write)

        async def after_the_other(*args: Any, **kw: Any) -> None:
            if not injected:
                injected.append(True)
                await other()  # between this server's If-Match check and its write
            await original(*args, **kw)

        injected: list[bool] = []
        setattr(a, write, after_the_other)
        with pytest.raises(PreconditionFailed):
            if what == "machine":
                await core_a.delete_machine("m-1", versions={version})
            else:
                mine = (codec.profile_to_dict(replace(item, description="mine"))
                        if what == "profiles"
                        else codec.group_to_dict(replace(item, labels={"rack": "mine"})))
                await core_a.put(what, mine, create=False, versions={version})
        assert injected
        for store in (a, b):
            stored = (await store.get_machine("m-1") if what == "machine" else
                      await getattr(store, f"get_{what[:-1]}")(theirs.name))
            assert stored == theirs


async def test_two_processes_on_one_sqlite_file_give_one_fixed_address_once(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A server and a CLI beside it (two stores on one SQLite file, each with its own Core
    and so its own lock), each asked at once to give a machine 192.0.2.71: both checks read
    "free" before either wrote, and two machines were stored with one address (s40-net
    closed it within a server and across PostgreSQL servers only). Now the check and the
    write hold the file's lock too (SqliteStore.fixed_addresses_held): one wins, the others
    get the API's 409 naming the holder."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory("sqlite", tmp_path, request, stack)
        cores = [Core(s, Enroller(s), None, None) for s in (a, b)]  # type: ignore[arg-type]
        macs = [f"52:54:00:40:05:0{n}" for n in range(6)]
        for n, text in enumerate(macs):
            await a.create_machine(Machine(id=f"m-{n}", macs=(MacAddress.parse(text),),
                                           updated=1.0))
        outcomes = await asyncio.gather(*(
            core.update_machine(text, {"fixed_ipv4": "192.0.2.71"})
            for text, core in zip(macs, cores * 3, strict=True)), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, Conflict)]
        assert len(refused) == 5, outcomes
        assert {(type(c), c.field) for c in refused} == {(Conflict, "fixed_ipv4")}, refused
        assert all("192.0.2.71 is the fixed address of machine" in str(c) for c in refused)
        for store in (a, b):
            held = [m.id for m in await store.list_machines() if m.fixed_ipv4 == "192.0.2.71"]
            assert len(held) == 1, held


async def test_a_fixed_address_written_by_another_process_under_its_lock_is_a_409(
        tmp_path: Path) -> None:
    """The same across real processes: a child Python (a CLI beside the server) holds the
    file's fixed-address lock, passes its check and stores machine m-a with 192.0.2.72.
    This process's PATCH of m-b, asked meanwhile, waits for the lock, then reads m-a's
    address: a 409 naming m-a, and one machine holds it (without the lock its check read
    "free" before the child's write and both were stored)."""
    import sys

    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.sqlite import SqliteStore
    from tests.conftest import this_checkout

    path = tmp_path / "inv.db"
    store = SqliteStore(path)
    await store.open()
    try:
        for n, text in enumerate(("52:54:00:40:06:01", "52:54:00:40:06:02")):
            await store.create_machine(Machine(id=f"m-{'ab'[n]}", updated=1.0,
                                               macs=(MacAddress.parse(text),)))
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"""
import asyncio, contextlib, dataclasses, sys
from netboot.inventory.sqlite import SqliteStore
async def main():
    store = SqliteStore({str(path)!r})
    await store.open()
    held = getattr(store, "fixed_addresses_held", contextlib.nullcontext)  # as Core's
    async with held():
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        machine = await store.get_machine("m-a")
        await store.update_machine(dataclasses.replace(machine, fixed_ipv4="192.0.2.72",
                                                       updated=2.0))
    await store.close()
asyncio.run(main())
""", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=this_checkout())
        assert child.stdout is not None and child.stdin is not None
        assert await asyncio.wait_for(child.stdout.readline(), 60) == b"held\n"
        # The child writes once this PATCH is waiting for the lock or (without one) has
        # made its check: whichever comes first, not a sleep.
        waiting, checked = asyncio.Event(), asyncio.Event()
        held, listed = getattr(store, "fixed_addresses_held", None), store.list_machines
        if held is not None:
            def waiting_held() -> Any:
                waiting.set()
                return held()
            store.fixed_addresses_held = waiting_held  # type: ignore[method-assign]

        async def checking(*args: Any, **kw: Any) -> Any:
            checked.set()
            return await listed(*args, **kw)

        store.list_machines = checking  # type: ignore[method-assign]
        core = Core(store, Enroller(store), None, None)  # type: ignore[arg-type]
        patch = asyncio.ensure_future(core.update_machine("m-b", {"fixed_ipv4": "192.0.2.72"}))
        first = [asyncio.ensure_future(e.wait()) for e in (waiting, checked)]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        for f in first:
            f.cancel()
        store.list_machines = listed  # type: ignore[method-assign]
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.wait(), 60) == 0
        with pytest.raises(Conflict, match=r"192\.0\.2\.72 is the fixed address of machine") as c:
            await asyncio.wait_for(patch, 60)
        assert c.value.field == "fixed_ipv4" and c.value.holder == "m-a"
        held = [m.id for m in await store.list_machines() if m.fixed_ipv4 == "192.0.2.72"]
        assert held == ["m-a"], held
    finally:
        await store.close()


async def test_a_cluster_named_as_another_but_for_case_is_refused() -> None:
    """Clusters "edge" and "Edge" were both taken: one DNS name, edge.<zone>, answered the
    servers of both (netboot.names reads a machine's cluster in lower case) and the nodes of
    each were told it (boot's serves_cluster), so a node joined, or was refused by, the
    other cluster's server. Now the second is a 409 naming the field; other names, and a
    replace of the cluster itself, as before."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    core = Core(store, Enroller(store), None, None)  # type: ignore[arg-type]
    external = {"server_url": "https://192.0.2.50:6443", "token": "a-token-of-its-servers"}
    await core.put("clusters", {"name": "edge", **external}, create=True)
    for name in ("Edge", "EDGE"):
        with pytest.raises(Conflict) as refused:
            await core.put("clusters", {"name": name, **external}, create=True)
        assert refused.value.field == "name" and "'edge'" in str(refused.value)
    assert [c.name for c in await store.list_clusters()] == ["edge"]
    await core.put("clusters", {"name": "edge-2", **external}, create=True)
    await core.put("clusters", {"name": "edge", **external, "description": "x"}, create=False)


async def test_an_id_names_its_machine_whatever_another_hostname_spells() -> None:
    """A hostname spelled as another machine's id (``m-`` and 12 hex digits: a valid
    hostname, which an enroll token may give) made that id a 409 on every {ref} route and
    CLI REF, whose remedy, "give the one you mean by its id", was the very text refused: a
    machine enrolled by serial alone, with no hostname, had no name left. An id now names
    its machine; the other is named by its own id, and its hostname where no id is it."""
    from netboot.core import machine_ref
    from netboot.inventory.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    serial_only = Machine(serial="CZ41ATK01")
    await store.create_machine(serial_only)
    squatter = Machine(macs=(MacAddress.parse("52:54:00:41:0a:01"),),
                       hostname=serial_only.id)
    await store.create_machine(squatter)
    assert await machine_ref(store, serial_only.id) == serial_only.id
    assert await machine_ref(store, squatter.id) == squatter.id
    # An id-shaped hostname no machine's id is: that machine's name alone.
    named = Machine(macs=(MacAddress.parse("52:54:00:41:0a:02"),), hostname="m-00000000abcd")
    await store.create_machine(named)
    assert await machine_ref(store, "m-00000000abcd") == named.id
# --- rules that are check-then-write across writers (s41-integrity) -----------------------

def _settings_only() -> Any:
    """What Core._users reads of a BootService: its settings (no default profile, no rule)."""
    from types import SimpleNamespace

    return SimpleNamespace(settings=SimpleNamespace(default_profile=None, policy="manual",
                                                    rules=()))


async def _two_cores_with_p_and_c(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                  stack: contextlib.AsyncExitStack) -> tuple[Any, Any, Any, Any]:
    """Two servers' stores on one inventory holding profile ``p`` and cluster ``c``, and a
    Core on each: the delete-against-a-writer races' set-up (both directions)."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.model import Cluster, Profile

    a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
    await a.put_profile(Profile(name="p", kernel="vmlinuz"), create=True)
    await a.put_cluster(Cluster(name="c", token="t" * 32), create=True)
    core_a, core_b = (Core(s, Enroller(s), _settings_only(), None)  # type: ignore[arg-type]
                      for s in (a, b))
    return a, b, core_a, core_b


@pytest.mark.parametrize("server_url", ["managed", "https://192.0.2.50:6443"])
async def test_a_cluster_replace_reads_the_cluster_once_a_try_and_writes_on_that_read(
        server_url: str) -> None:
    """Core.put of a cluster: its checks (_check_cluster, _managed_join) and its
    compare-and-set write all on one read of the cluster, the If-Match-checked one of the
    first try, read again only for a try after another writer's change. Each try read it
    three times (s41-review): three round trips to PostgreSQL, and checks decided on reads
    other than the one the write compared."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.inventory.memory import MemoryStore
    from netboot.model import Cluster

    store = MemoryStore()
    await store.open()
    token = "K10" + "0" * 64 + "::server:secret" if server_url != "managed" else "t" * 32
    await store.put_cluster(Cluster(name="c", server_url=server_url, token=token),
                            create=True)
    core = Core(store, Enroller(store), _settings_only(), None)  # type: ignore[arg-type]
    real, reads = store.get_cluster, [0]

    async def get_cluster(name: str) -> Cluster | None:
        reads[0] += 1
        return await real(name)

    store.get_cluster = get_cluster  # type: ignore[method-assign]
    await core.put("clusters", {"name": "c", "server_url": server_url,
                                "description": "rack 1"}, create=False)
    assert reads[0] == 1
    stored = await real("c")
    assert stored is not None and stored.description == "rack 1" and stored.token
    put, raced = store.put_cluster, [1]

    async def after_another(cluster: Cluster, *, create: bool = False,
                            expect: Cluster | None = None) -> None:
        if raced[0]:  # another writer's edit just before this write: refused, read again
            raced[0] = 0
            edited = await real("c")
            assert edited is not None
            await put(replace(edited, labels={"by": "other"}))
        await put(cluster, create=create, expect=expect)

    store.put_cluster = after_another  # type: ignore[method-assign]
    reads[0] = 0
    await core.put("clusters", {"name": "c", "server_url": server_url,
                                "description": "rack 2"}, create=False)
    assert reads[0] == 2  # the first try's, the second's
    stored = await real("c")
    assert stored is not None and stored.description == "rack 2"


@pytest.mark.parametrize("what", ["profiles", "clusters"])
async def test_a_delete_refused_for_its_users_names_the_field_and_a_machine_holder(
        what: str) -> None:
    """A profile or cluster still used: the 409 of Core.delete's own check names the field
    and the first machine using it (holder), as the delete's transaction's (base.in_use)
    does; it named neither, so only the rare race's 409 said which field, and a script
    had the message to parse. A group alone using it: no holder (a machine's id only)."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.memory import MemoryStore
    from netboot.model import Cluster, Group, Profile

    store = MemoryStore()
    await store.open()
    await store.put_profile(Profile(name="p", kernel="vmlinuz"), create=True)
    await store.put_cluster(Cluster(name="c", token="t" * 32), create=True)
    core = Core(store, Enroller(store), _settings_only(), None)  # type: ignore[arg-type]
    single, name = what[:-1], "p" if what == "profiles" else "c"
    await store.put_group(Group(name="rack1", selector={"rack": ("1",)}, **{single: name}),
                          create=True)
    with pytest.raises(Conflict, match="used by group 'rack1'") as refused:
        await core.delete(what, name)
    assert refused.value.field == single and refused.value.holder is None
    user = await core.create_machine({"mac": MAC, single: name}, note="enrolled")
    with pytest.raises(Conflict, match=f"used by group 'rack1', machine {MAC}") as refused:
        await core.delete(what, name)
    assert refused.value.field == single and refused.value.holder == user.id


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["profiles", "clusters"])
@pytest.mark.parametrize("user", ["machine", "group"])
async def test_a_user_given_it_between_the_delete_check_and_the_delete_keeps_it(
        kind: str, what: str, user: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """Core.delete checked that no machine or group used the profile or cluster, then
    deleted it: another server (or a CLI beside this one) that enrolled a machine into it,
    or made a group of it, between the two left that machine naming one that is gone (held
    at its next boot, "does not exist"). The delete now finds its users in its own
    transaction: a 409 naming the machine or group, and nothing deleted. Ordered by a
    store wrapper: the other writes between this one's check and its delete."""
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, b, core_a, core_b = await _two_cores_with_p_and_c(kind, tmp_path, request, stack)
        single = what[:-1]
        name = "p" if single == "profile" else "c"
        given: list[str] = []
        # Between this server's check (Core._users) and its delete: not in the store's
        # delete itself, which Core.delete makes under the lock a machine's write holds
        # from its check to its commit (Core._refs_still): the other's write would wait
        # for it there.
        users = core_a._users

        async def checked_then_the_other(*args: Any, **kw: Any) -> list[str]:
            found = await users(*args, **kw)
            await after_the_other()
            return found

        async def after_the_other() -> None:
            if not given:  # this server found no user; the other gives it one now
                if user == "machine":
                    made = await core_b.create_machine({"mac": MAC, single: name},
                                                       note="enrolled")
                    given.append(made.id)
                else:
                    await core_b.put("groups", {"name": "rack1", "selector": {"rack": ["1"]},
                                                single: name}, create=True)
                    given.append("rack1")

        core_a._users = checked_then_the_other  # type: ignore[method-assign]
        with pytest.raises(Conflict) as refused:
            await core_a.delete(what, name)
        assert given
        assert refused.value.field == single
        assert refused.value.holder == (given[0] if user == "machine" else None)
        assert (f"machine {MAC}" if user == "machine" else "group 'rack1'") in str(refused.value)
        for store in (a, b):
            assert await getattr(store, f"get_{single}")(name) is not None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["profiles", "clusters"])
@pytest.mark.parametrize("write", ["create", "approve"])
async def test_a_machine_written_after_its_cluster_or_profile_was_deleted_is_refused(
        kind: str, what: str, write: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """The other direction (s41-integrity's left item): a server checked that the cluster
    (or profile) a new machine names exists, then another server (or a CLI) deleted it,
    finding no machine naming it yet, then the first wrote its machine: left naming one
    that is gone (held at its next boot). Now the write checks the name again under the
    lock it holds to its commit, which the delete holds too: a 409 naming it, nothing
    written. Ordered by a store wrapper: the delete commits right after the first check."""
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, b, core_a, core_b = await _two_cores_with_p_and_c(kind, tmp_path, request, stack)
        single = what[:-1]
        name = "p" if single == "profile" else "c"
        if write == "approve":
            await a.create_machine(Machine(macs=(MacAddress.parse(MAC),),
                                           state=MachineState.DISCOVERED))
        read = getattr(a, f"get_{single}")
        deleted: list[bool] = []

        async def checked_then_deleted(wanted: str) -> Any:
            found = await read(wanted)
            if not deleted:  # this server saw it; the other deletes it now
                deleted.append(True)
                await core_b.delete(what, name)
            return found

        setattr(a, f"get_{single}", checked_then_deleted)
        core_a._check_installable = _nothing  # type: ignore[method-assign]
        with pytest.raises(Conflict) as refused:
            if write == "create":
                await core_a.create_machine({"mac": MAC, single: name}, note="enrolled")
            else:
                await core_a.approve(MAC, {single: name})
        assert deleted
        # No holder: a Conflict's holder is a machine's id (errors.Conflict, OpenAPI's
        # Error); it named the deleted profile or cluster there (s43-review).
        assert (refused.value.field, refused.value.holder) == (single, None)
        assert f"{single} {name!r} was deleted by another writer" in str(refused.value)
        for store in (a, b):
            assert await read(name) is None
            assert [getattr(m, single) for m in await store.list_machines()] in ([], [None])


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_profiles_users_are_read_by_its_index_not_every_machine(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Core._users listed a profile's users by paging through every machine of the
    inventory (all 100,000 documents decoded for a refused ``profiles rm``), since machines
    were not indexed by profile; S42 gave them the indexed ``profile`` column. Now it asks
    the store for the machines naming it (MachineFilter.profile): a few named, the rest
    counted, and the store reads only them (SQLite's plan: the index, no scan)."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.base import Batch, MachineFilter
    from netboot.model import Profile

    async with contextlib.AsyncExitStack() as stack:
        (store,) = await pg.stores_on_one_inventory(kind, tmp_path, request, stack, count=1)
        await store.put_profile(Profile(name="p", kernel="vmlinuz"), create=True)

        def nic(i: int) -> tuple[MacAddress, ...]:
            return (MacAddress((0x0200_0043_0000 + i).to_bytes(6, "big")),)
        await store.apply_batch(Batch(create=[
            Machine(macs=nic(i), profile="p" if i % 150 == 0 else None)
            for i in range(1050)]))
        core = Core(store, Enroller(store), _settings_only(), None)  # type: ignore[arg-type]
        listed, real = [0], store.list_machines

        async def counted(*args: Any, **kw: Any) -> Any:
            found = await real(*args, **kw)
            listed[0] += len(found)
            return found

        store.list_machines = counted  # type: ignore[method-assign]
        with pytest.raises(Conflict) as refused:
            await core.delete("profiles", "p")
        assert str(refused.value).count("machine 02:00:00:43:") == 5, refused.value
        assert "2 more machines" in str(refused.value)
        assert listed[0] == 5
        if kind == "sqlite":
            from netboot.inventory.sqlite import _where

            where, params = _where(MachineFilter(profile="p"))
            plan = await store._run(lambda conn: [row[3] for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT data FROM machines m{where}", params)])
            assert plan and not any(step.startswith("SCAN") for step in plan), plan


async def _deleted_by_another_process(store: Any, tmp_path: Path, what: str,
                                      name: str) -> None:
    """``netboot {what} rm NAME`` run as its own process on ``store``'s inventory (its
    SQLite file, its PostgreSQL schema): a CLI beside the server, with the CLI's own locks
    (the file's flock, the database's advisory lock); it must say the item was removed."""
    import os
    import sys

    if hasattr(store, "path"):
        inventory = f'inventory:\n  path: "{store.path}"\n'
    else:
        inventory = f'inventory:\n  backend: postgresql\n  dsn: "{store._dsn}"\n'
    cfg = write_config(tmp_path / "cli", inventory)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", what, "rm", name, "--config", str(cfg),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, (out, err)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["profiles", "clusters"])
@pytest.mark.parametrize("write", ["import", "group"])
async def test_an_import_or_group_naming_one_deleted_by_another_process_is_refused(
        kind: str, what: str, write: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """What s42-integrity left of the delete-against-a-writer race: an import (its rows'
    clusters and profiles read once, at its start) and a group's write (checked by
    _check_group) did not take the lock the delete holds, so a CLI's ``netboot clusters rm
    c`` in another process between that check and the commit, finding nothing naming it
    yet, deleted it, and the import's machines (or the group, and every machine it then
    enrolled) were written naming one that was gone: held at their next boot. Now both
    check the names again under the lock, held to their commit: a 409 naming the
    cluster or profile (an import's, its line), nothing written. Two real writers: this
    server's store, and a ``netboot`` process on its SQLite file or PostgreSQL schema."""
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, _b, core_a, _core_b = await _two_cores_with_p_and_c(kind, tmp_path, request, stack)
        single = what[:-1]
        name = "p" if single == "profile" else "c"
        # The other process deletes it right after this server read it: the import's read
        # of the inventory's names, the group's check.
        read = getattr(a, f"list_{what}" if write == "import" else f"get_{single}")
        deleted: list[bool] = []

        async def checked_then_deleted(*args: Any) -> Any:
            found = await read(*args)
            if not deleted and (write == "import" or args == (name,)):
                deleted.append(True)
                await _deleted_by_another_process(a, tmp_path, what, name)
            return found

        setattr(a, read.__name__, checked_then_deleted)
        with pytest.raises(Conflict) as refused:
            if write == "import":
                await core_a.enroller.import_rows(
                    [(2, {"mac": "52:54:00:43:00:01"}), (3, {"mac": MAC, single: name})])
            else:
                await core_a.put("groups", {"name": "g", "selector": {"arch": ["arm64"]},
                                            single: name}, create=True)
        assert deleted
        # The name in the message; no holder (a Conflict's holder is a machine's id).
        assert (refused.value.field, refused.value.holder) == (single, None)
        assert "was deleted by another writer" in str(refused.value)
        if write == "import":
            assert str(refused.value).startswith(f"line 3: {single} {name!r}")
        setattr(a, read.__name__, read)
        assert await getattr(a, f"get_{single}")(name) is None
        assert await a.list_machines() == [] and await a.list_groups() == []


async def _nothing(*args: Any) -> None:
    return None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("what", ["profiles", "clusters", "groups"])
async def test_a_change_between_if_match_and_the_delete_is_a_412_and_nothing_deleted(
        kind: str, what: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A DELETE's If-Match checked on a read, then another server (or a CLI) changed the
    item before the delete: the delete compares the read in its own transaction, a 412 and
    the other's change kept; before, If-Match was not even looked at, and the item changed
    meanwhile was deleted unseen."""
    from netboot.core import Core, item_version
    from netboot.enroll import Enroller
    from netboot.errors import PreconditionFailed
    from netboot.model import Cluster, Group, Profile

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        core_a = Core(a, Enroller(a), _settings_only(), None)  # type: ignore[arg-type]
        item: Any = {"profiles": Profile(name="p", kernel="vmlinuz"),
                     "clusters": Cluster(name="c", token="t" * 32),
                     "groups": Group(name="g", selector={"arch": ("arm64",)})}[what]
        single = what[:-1]
        await getattr(a, f"put_{single}")(item, create=True)
        version = item_version(what, item)
        theirs = (replace(item, labels={"rack": "theirs"}) if what == "groups"
                  else replace(item, description="theirs"))
        original = getattr(a, f"delete_{single}")
        changed: list[bool] = []

        async def after_the_other(*args: Any, **kw: Any) -> None:
            if not changed:
                changed.append(True)
                await getattr(b, f"put_{single}")(theirs)
            await original(*args, **kw)

        setattr(a, f"delete_{single}", after_the_other)
        with pytest.raises(PreconditionFailed):
            await core_a.delete(what, item.name, versions={version})
        assert changed
        for store in (a, b):
            assert await getattr(store, f"get_{single}")(item.name) == theirs


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_secure_token_given_while_another_writer_edits_the_cluster_keeps_both(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`netboot clusters set old --secure-token` (Core.secure_token) wrote the cluster whole
    with no compare-and-set, unlike every other cluster write: an edit another server or a
    CLI committed between its read and its write (a description here; the agent token a
    starting server gives an old cluster) was undone. Now a compare-and-set on the read,
    made again on the cluster as stored: both the edit and the new CA are kept. Ordered by a
    store wrapper: the other's edit commits between this one's read and its write."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.model import Cluster
    from netboot.pki import k3s_ca_hash

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        await a.put_cluster(Cluster(name="old", token="o" * 32), create=True)
        core_a = Core(a, Enroller(a), _settings_only(), None)  # type: ignore[arg-type]
        put, edited = a.put_cluster, []

        async def after_the_other(cluster: Cluster, **kw: Any) -> None:
            if not edited:
                stored = await b.get_cluster("old")
                assert stored is not None
                edited.append(True)
                await b.put_cluster(replace(stored, description="rack 4"))
            await put(cluster, **kw)

        a.put_cluster = after_the_other  # type: ignore[method-assign]
        made = await core_a.secure_token("old")
        assert edited and made.ca_cert
        assert made.token.startswith(f"K10{k3s_ca_hash(made.ca_cert)}::")
        for store in (a, b):
            stored = await store.get_cluster("old")
            assert stored == made and stored.description == "rack 4"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_two_secure_tokens_asked_at_once_both_answer_the_one_stored(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two `--secure-token` at once (a CLI and a server's POST .../secure-token): each made
    a CA and wrote it, the last one stored; the first caller was shown a CA hash (and a
    token) that was no longer the cluster's. Now the loser's compare-and-set fails, it reads
    the winner's cluster, which has a CA, and keeps it: both answer the one stored."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.model import Cluster

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        await a.put_cluster(Cluster(name="old", token="o" * 32), create=True)
        cores = [Core(s, Enroller(s), _settings_only(), None)  # type: ignore[arg-type]
                 for s in (a, b)]
        both_made, puts = asyncio.Event(), []
        for store in (a, b):
            put = store.put_cluster

            async def when_both_made(cluster: Cluster, *, _put: Any = put, **kw: Any) -> None:
                puts.append(cluster.ca_cert)
                if len(puts) == 2:
                    both_made.set()
                with contextlib.suppress(TimeoutError):  # bounded: one may never come
                    await asyncio.wait_for(both_made.wait(), 5)
                await _put(cluster, **kw)

            store.put_cluster = when_both_made  # type: ignore[method-assign]
        made = await asyncio.gather(*(core.secure_token("old") for core in cores))
        assert len(set(puts[:2])) == 2  # each made a CA of its own, both read the short one
        stored = await a.get_cluster("old")
        assert stored is not None and stored.ca_cert
        assert made == [stored, stored]
        assert await b.get_cluster("old") == stored


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_one_hostname_given_at_once_by_two_writers_is_given_once(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two servers (or a CLI beside a server) enrolling two machines with one hostname at
    once: the store's unique index on the case-folded hostname decides in the committing
    transaction, so one is stored and the other is a 409 naming the field and the holder
    (two machines with one name: DNS answers one of them, dnsmasq's "duplicate name")."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        cores = [Core(s, Enroller(s), None, None) for s in (a, b)]  # type: ignore[arg-type]
        macs = [f"52:54:00:41:0a:0{n}" for n in range(4)]
        outcomes = await asyncio.gather(*(
            core.create_machine({"mac": text, "hostname": "Edge-1" if n % 2 else "edge-1"},
                                note="enrolled")
            for n, (text, core) in enumerate(zip(macs, cores * 2, strict=True))),
            return_exceptions=True)
        made = [o for o in outcomes if isinstance(o, Machine)]
        refused = [o for o in outcomes if isinstance(o, Conflict)]
        assert len(made) == 1 and len(refused) == 3, outcomes
        assert all(c.field == "hostname" and c.holder == made[0].id for c in refused), refused
        for store in (a, b):
            named = [m.id for m in await store.list_machines() if m.hostname is not None]
            assert named == [made[0].id]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_a_template_name_taken_by_another_writer_meanwhile_is_chosen_again(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A machine enrolled without a hostname is named by the template, the first free name
    read; another writer (a server, a CLI) that gave that name to another machine between
    the read and this write made the store refuse it, and the enrollment, which named no
    hostname, failed with "hostname 'node-123456' is used by …" (here two NICs of two
    vendors with one low half). The name is now chosen again: the next free one."""
    from netboot.core import Core
    from netboot.enroll import Enroller

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        core_a, core_b = (Core(s, Enroller(s), None, None)  # type: ignore[arg-type]
                          for s in (a, b))
        by_hostname, theirs = a.get_machine_by_hostname, []

        async def then_the_other(hostname: str) -> Machine | None:
            found = await by_hostname(hostname)
            if found is None and not theirs:  # read as free: the other takes it now
                theirs.append(await core_b.create_machine({"mac": "02:00:00:12:34:56"},
                                                          note="enrolled"))
            return found

        a.get_machine_by_hostname = then_the_other  # type: ignore[method-assign]
        mine = await core_a.create_machine({"mac": MAC}, note="enrolled")
        assert [m.hostname for m in theirs] == ["node-123456"]
        assert mine.hostname == "node-123456-2"
        for store in (a, b):
            assert {m.hostname for m in await store.list_machines()} == {
                "node-123456", "node-123456-2"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_an_import_swapping_two_machines_fixed_addresses_is_made(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An import giving A B's fixed_ipv4 and B A's (renumbering two hosts) was refused on
    both rows ("is the fixed address of …"): each row was checked against the inventory as
    read, where the other still held it. A file is read as a whole, as dnsmasq reads its
    dhcp-host lines: an address held by a machine the file gives another is free. One held
    by a machine the file leaves as it is stays refused, naming it."""
    from netboot.enroll import Enroller

    async with contextlib.AsyncExitStack() as stack:
        (store,) = await pg.stores_on_one_inventory(kind, tmp_path, request, stack, count=1)
        enroller = Enroller(store)
        macs = [f"52:54:00:41:0b:0{n}" for n in range(3)]
        for n, text in enumerate(macs):
            await store.create_machine(Machine(id=f"m-{n}", macs=(MacAddress.parse(text),),
                                               fixed_ipv4=f"192.0.2.8{n}", updated=1.0))
        report = await enroller.import_rows([
            (1, {"mac": macs[0], "fixed_ipv4": "192.0.2.81"}),
            (2, {"mac": macs[1], "fixed_ipv4": "192.0.2.80"})])
        assert report.applied and not report.errors, report
        report = await enroller.import_rows([
            (1, {"mac": macs[0], "fixed_ipv4": "192.0.2.82"}),
            (2, {"mac": macs[1], "fixed_ipv4": "192.0.2.83"})])
        assert not report.applied
        assert [(e.line, e.field) for e in report.errors] == [(1, "fixed_ipv4")], report
        assert f"192.0.2.82 is the fixed address of {macs[2]}" in report.errors[0].message
        assert {m.id: m.fixed_ipv4 for m in await store.list_machines()} == {
            "m-0": "192.0.2.81", "m-1": "192.0.2.80", "m-2": "192.0.2.82"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_an_import_holds_the_fixed_address_lock_only_to_check_and_commit(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An import held the inventory's fixed-address lock (PostgreSQL's advisory lock, the
    flock beside a SQLite file) for its whole run: every other server's and CLI's write of a
    fixed_ipv4 waited for a large file's parse and checks (up to FIXED_LOCK_WAIT, then
    failed). Now only its check of the addresses against their holders as stored then, and
    its commit, hold it: another process's write made while the import reads and checks
    goes through at once, and the import, whose file gives the same address, is a 409 naming
    that machine, never a second holder."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict

    async with contextlib.AsyncExitStack() as stack:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
        core_a, core_b = (Core(s, Enroller(s), None, None)  # type: ignore[arg-type]
                          for s in (a, b))
        for n in range(2):
            await a.create_machine(Machine(id=f"m-{n}", macs=(MacAddress.parse(
                f"52:54:00:41:0c:0{n}"),), updated=1.0))
        list_groups, other = a.list_groups, []

        async def the_other_meanwhile() -> Any:
            if not other:  # the import has read and checked its rows, not yet written
                other.append(await asyncio.wait_for(core_b.update_machine(
                    "m-1", {"fixed_ipv4": "192.0.2.90"}), 30))
            return await list_groups()

        a.list_groups = the_other_meanwhile  # type: ignore[method-assign]
        with pytest.raises(Conflict, match=r"line 1: fixed_ipv4 192\.0\.2\.90 is the fixed "
                                           r"address of 52:54:00:41:0c:01") as refused:
            await core_a.enroller.import_rows([(1, {"mac": "52:54:00:41:0c:00",
                                                    "fixed_ipv4": "192.0.2.90"})])
        assert refused.value.field == "fixed_ipv4"
        assert [m.id for m in other] == ["m-1"]
        for store in (a, b):
            assert {m.id: m.fixed_ipv4 for m in await store.list_machines()} == {
                "m-0": None, "m-1": "192.0.2.90"}


async def _two_writers_with_racks(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                  stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
    """Two servers' stores on one inventory (the memory store: one object twice) holding
    profile ``p`` and groups ``rack-a`` and ``rack-b`` giving it (by label ``rack``): the
    group delete's races' set-up."""
    from netboot.inventory.memory import MemoryStore
    from netboot.model import Group, Profile

    if kind == "memory":
        a = b = MemoryStore()
        await a.open()
        stack.push_async_callback(a.close)
    else:
        a, b = await pg.stores_on_one_inventory(kind, tmp_path, request, stack)
    await a.put_profile(Profile(name="p", kernel="vmlinuz"), create=True)
    for rack in ("a", "b"):
        await a.put_group(Group(name=f"rack-{rack}", selector={"rack": (rack,)}, profile="p"),
                          create=True)
    return a, b


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
@pytest.mark.parametrize("after", ["look", "catch-up"])
async def test_an_install_planned_by_another_server_during_a_groups_delete_keeps_the_group(
        after: str, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A group's delete looked for the installs under way it gives their profile
    (Core._installing_with) before the delete's transaction: another server's boot path
    (which takes no lock) planning a machine's install in between was not seen, and the
    group was deleted under it (its installer's config then a 409 naming no profile, the
    install broken midway). The delete's transaction now looks again at the machines
    written since the look began (the change feed): a 409 naming the machine, the group
    kept. Two real writers: this server's store and another's on one SQLite file or
    PostgreSQL schema; the other's install plan lands right after this server's look at
    every machine under way, or after its catch-up on those written during that look (the
    last read before the delete's transaction, which alone sees it then)."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.base import MachineFilter

    async with contextlib.AsyncExitStack() as stack:
        a, b = await _two_writers_with_racks(kind, tmp_path, request, stack)
        planned = Machine(macs=(MacAddress.parse("52:54:00:44:0e:01"),), labels={"rack": "a"},
                          state=MachineState.ENROLLED)
        elsewhere = Machine(macs=(MacAddress.parse("52:54:00:44:0e:02"),),
                            labels={"rack": "b"}, state=MachineState.ENROLLED)
        await a.create_machine(planned)
        await a.create_machine(elsewhere)
        core = Core(a, Enroller(a), _settings_only(), None)  # type: ignore[arg-type]
        looked: list[bool] = []

        async def plan_elsewhere() -> None:
            looked.append(True)
            stored = await b.get_machine(planned.id)
            await b.update_machine(replace(stored, state=MachineState.BOOTING),
                                   expect_state=MachineState.ENROLLED)

        read, caught_up = a.list_machines, a.under_way_since

        async def looked_then_planned(flt: MachineFilter | None = None) -> list[Machine]:
            found = await read(flt)
            if (after == "look" and flt is not None and flt.state == MachineState.INSTALLING
                    and not looked):
                await plan_elsewhere()  # the look's last page read
            return found

        async def caught_up_then_planned(seq: int) -> tuple[int, list[Machine]]:
            found = await caught_up(seq)
            if after == "catch-up" and not looked:
                await plan_elsewhere()  # the catch-up read: next, the delete's transaction
            return found

        a.list_machines = looked_then_planned  # type: ignore[method-assign]
        a.under_way_since = caught_up_then_planned  # type: ignore[method-assign]
        with pytest.raises(Conflict, match="52:54:00:44:0e:01, whose install is under way"):
            await core.delete("groups", "rack-a")
        assert looked
        assert await a.get_group("rack-a") is not None
        # An install another group gives is no reason: rack-b's machine booting, rack-a
        # with none of its own under way is deleted.
        stored = await b.get_machine(elsewhere.id)
        await b.update_machine(replace(stored, state=MachineState.BOOTING))
        stored = await b.get_machine(planned.id)
        await b.update_machine(replace(stored, state=MachineState.INSTALLED))
        await core.delete("groups", "rack-a")
        assert await a.get_group("rack-a") is None


@pytest.mark.parametrize("kind", ["memory", "sqlite", "postgresql"])
async def test_an_install_the_group_delete_pages_past_as_another_leaves_booting_is_seen(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The group delete's look at the installs under way read them by offset, a page at a
    time: a machine leaving booting between two pages (a storm's machines move on to
    installing) moved every later one a place back, and the one then first of the next
    page was skipped. Unchanged, it is not among the machines written since the look (the
    transaction's own look): the group was deleted under its install. Pages now start
    after the last id read. Two writers on one inventory; pages of 2."""
    from netboot import core as core_module
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.base import MachineFilter

    monkeypatch.setattr(core_module, "_PAGE", 2)
    async with contextlib.AsyncExitStack() as stack:
        a, b = await _two_writers_with_racks(kind, tmp_path, request, stack)
        # By id: two of rack b booting, then rack a's (its install under way), then one more.
        booting = [Machine(id=f"m-00000000000{n}",
                           macs=(MacAddress.parse(f"52:54:00:44:0f:0{n}"),),
                           labels={"rack": "a" if n == 3 else "b"},
                           state=MachineState.BOOTING) for n in (1, 2, 3, 4)]
        for machine in booting:
            await a.create_machine(machine)
        core = Core(a, Enroller(a), _settings_only(), None)  # type: ignore[arg-type]
        read, pages = a.list_machines, []

        async def paged_as_one_leaves(flt: MachineFilter | None = None) -> list[Machine]:
            found = await read(flt)
            if flt is not None and flt.state == MachineState.BOOTING:
                pages.append([m.id for m in found])
                if len(pages) == 1:  # the first page read: another server moves one on
                    first = await b.get_machine(booting[0].id)
                    await b.update_machine(replace(first, state=MachineState.INSTALLING))
            return found

        a.list_machines = paged_as_one_leaves  # type: ignore[method-assign]
        with pytest.raises(Conflict, match="52:54:00:44:0f:03, whose install is under way"):
            await core.delete("groups", "rack-a")
        assert booting[2].id in {i for page in pages for i in page}, pages
        assert await a.get_group("rack-a") is not None


async def test_a_group_giving_an_install_past_the_first_ten_thousand_is_not_deleted() -> None:
    """The group delete's look for installs under way that it gives their profile
    (Core._installing_with) read the first 10,000 booting machines alone: a storm with
    more of them under way (a 100,000-machine fleet's) hid those past it, and the group
    was deleted under their installs. Every one is read, a page at a time."""
    from netboot.core import Core
    from netboot.enroll import Enroller
    from netboot.errors import Conflict
    from netboot.inventory.base import Batch
    from netboot.inventory.memory import MemoryStore
    from netboot.model import Group, Profile

    store = MemoryStore()
    await store.open()
    await store.put_profile(Profile(name="p", kernel="vmlinuz"), create=True)
    for rack in ("a", "b"):
        await store.put_group(Group(name=f"rack-{rack}", selector={"rack": (rack,)},
                                    profile="p"), create=True)
    others = [Machine(macs=(MacAddress.parse(f"52:54:00:00:{n >> 8:02x}:{n & 255:02x}"),),
                      labels={"rack": "b"}, state=MachineState.BOOTING) for n in range(10_000)]
    last = Machine(macs=(MacAddress.parse("52:54:00:ff:ff:ff"),), labels={"rack": "a"},
                   state=MachineState.BOOTING)  # after the others in the listing's order
    await store.apply_batch(Batch(create=(*others, last)))
    core = Core(store, Enroller(store), None, None)  # type: ignore[arg-type]
    with pytest.raises(Conflict, match="52:54:00:ff:ff:ff"):
        await core.delete("groups", "rack-a")
    assert await store.get_group("rack-a") is not None
    await store.close()
