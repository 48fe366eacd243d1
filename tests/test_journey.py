"""The journey's outcome under orders of events netboot does not choose (session 36,
s36-journey): which cluster a node joins, which server URL it is given, whether it installs
again or boots its disk, when servers of a new cluster boot together, a first server dies,
power is lost mid-install, a machine moves to another cluster, a server changes address,
and a NIC moves to another box. Two netboot servers over one PostgreSQL claiming the init
node are tests/multiserver/test_pair.py's; the store's claim is the contract suite's."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from netboot.config import load
from netboot.model import Cluster, MacAddress, Machine, MachineState, Role
from netboot.names import Zone
from netboot.service import build
from tests.conftest import Env, boot, call, install_token, write_config

S0, S1, S2 = "52:54:00:36:00:01", "52:54:00:36:00:02", "52:54:00:36:00:03"
AGENT = "52:54:00:36:00:10"


def hexhyp(mac: str) -> str:
    return mac.replace(":", "-")


async def enroll(env: Env, mac: str, name: str, *, role: str = "server",
                 cluster: str = "edge") -> None:
    await env.post("/api/v1/machines", {"mac": mac, "hostname": name, "cluster": cluster,
                                        "role": role}, status=201)


async def managed(env: Env, *servers: str) -> None:
    """Clusters ``edge`` and ``far``, both managed; ``servers`` enrolled as edge's s0, s1, …"""
    await env.seed(server_url="managed", role="server")
    await env.post("/api/v1/clusters", {"name": "far", "server_url": "managed"}, status=201)
    for i, mac in enumerate(servers):
        await enroll(env, mac, f"s{i}")


async def config_of(env: Env, mac: str, token: str) -> tuple[int, Any]:
    r = await call(env, "GET", f"/config/{hexhyp(mac)}?token={token}", admin=False)
    return r.status, (yaml.safe_load(r.text) if r.status == 200 else r.text)


async def k3os(env: Env, mac: str, token: str) -> dict[str, Any]:
    status, config = await config_of(env, mac, token)
    assert status == 200, (status, config)
    out: dict[str, Any] = config["k3os"]
    return out


async def install(env: Env, mac: str) -> tuple[str, dict[str, Any]]:
    """Boot ``mac`` (it must be given an install) and fetch its k3OS config."""
    script = await boot(env, mac)
    assert "kernel " in script, script[-400:]
    token = install_token(script)
    return token, await k3os(env, mac, token)


async def register(env: Env, mac: str, token: str, address: str, status: int = 200) -> Any:
    r = await call(env, "POST", "/api/v1/register", admin=False, json_body={
        "mac": mac, "token": token, "hostname": "x", "addresses": [address]})
    assert r.status == status, (r.status, r.text)
    return r.json()


async def report(env: Env, mac: str, token: str, kind: str) -> None:
    r = await call(env, "POST", f"/api/v1/machines/{hexhyp(mac)}/events", admin=False,
                   json_body={"kind": kind, "message": kind},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201, (r.status, r.text)


def inits(config: dict[str, Any]) -> bool:
    return "--cluster-init" in config["k3s_args"]


# --- 1. servers of a new HA cluster power on at once ----------------------------------------


async def test_three_first_servers_at_once_make_one_cluster(env: Env) -> None:
    await managed(env, S0, S1, S2)
    scripts = dict(zip((S0, S1, S2), await asyncio.gather(*(boot(env, m) for m in (S0, S1, S2))),
                       strict=True))
    installs = {mac: install_token(s) for mac, s in scripts.items() if "kernel " in s}
    assert len(installs) == 1, scripts  # the two others are held, not told to initialise
    [(first, token)] = installs.items()
    # Its installer fetching the config twice at once (a retry) is told the same thing.
    twice = await asyncio.gather(k3os(env, first, token), k3os(env, first, token))
    assert all(inits(c) and "server_url" not in c for c in twice), twice
    for mac in {S0, S1, S2} - {first}:
        assert "waiting for cluster edge's first server" in scripts[mac]
    await register(env, first, token, "192.0.2.60")
    others = await asyncio.gather(*(install(env, m) for m in sorted({S0, S1, S2} - {first})))
    for _, config in others:  # the held ones' next retry: they join it, none initialises
        assert not inits(config) and config["server_url"] == "https://192.0.2.60:6443"
        assert config["k3s_args"][0] == "server"


async def test_a_first_server_that_never_registers_is_named_and_removing_it_frees_the_cluster(
        env: Env) -> None:
    await managed(env, S0, S1, S2)
    token, config = await install(env, S0)
    assert inits(config)
    await report(env, S0, token, "failed")  # its disk died
    held = await boot(env, S1)
    assert "kernel " not in held
    # The held servers say who they wait for and how to stop waiting: by its id, never its
    # MAC, which any host sending a held node's MAC would be told, and which its own
    # install answers (s44-attack).
    s0 = (await env.get(f"/api/v1/machines/{S0}"))["id"]
    assert f"it is s0 ({s0}), chosen to initialise it" in held, held
    assert f"netboot machines rm {s0}" in held and S0 not in held, held
    explained = await env.get(f"/api/v1/machines/{S1}/explain?arch=x86_64")
    assert explained["decision"] == "hold" and f"it is s0 ({s0}), chosen" in explained["reason"]
    hold = [e for e in await env.get(f"/api/v1/machines/{S1}/events") if e["kind"] == "hold"]
    assert len(hold) == 1 and f"netboot machines rm {s0}" in hold[0]["message"], hold
    r = await call(env, "DELETE", f"/api/v1/machines/{S0}")
    assert r.status == 204
    token1, config1 = await install(env, S1)
    assert inits(config1)
    assert "kernel " not in await boot(env, S2)  # one initialiser, still
    await register(env, S1, token1, "192.0.2.61")
    _, config2 = await install(env, S2)
    assert not inits(config2) and config2["server_url"] == "https://192.0.2.61:6443"


async def test_a_failed_first_server_made_an_agent_lets_the_next_server_initialise(
        env: Env) -> None:
    await managed(env, S0, S1, S2)
    token, config = await install(env, S0)
    assert inits(config)
    await report(env, S0, token, "failed")
    assert "kernel " not in await boot(env, S1)
    r = await call(env, "PATCH", f"/api/v1/machines/{S0}", json_body={"role": "agent"})
    assert r.status == 200, r.text
    # A server that never asked before (not S1, which waited for S0) is the next to boot.
    _, config2 = await install(env, S2)
    assert inits(config2)
    assert "kernel " not in await boot(env, S1)


# --- 2. power lost mid-install ----------------------------------------------------------------


async def test_power_lost_after_the_config_was_fetched_installs_again_with_the_same_token(
        env: Env) -> None:
    await managed(env, S0)
    token, config = await install(env, S0)
    assert inits(config)
    # Power lost: the next PXE boot is the same install, same token, same cluster role.
    again = await boot(env, S0)
    assert "kernel " in again and install_token(again) == token
    assert inits(await k3os(env, S0, token))
    await report(env, S0, token, "installed")
    # Power lost after the installer said "installed": the disk boots (one-shot install).
    assert (await boot(env, S0)).rstrip().endswith("exit")
    # A disk that does not boot after all: the operator's reinstall, a new token, the old
    # one refused, the same cluster initialised (nothing else of it ever ran).
    r = await call(env, "POST", f"/api/v1/machines/{S0}/reinstall")
    assert r.status == 200
    assert (await config_of(env, S0, token))[0] == 401
    token2, config2 = await install(env, S0)
    assert token2 != token and inits(config2)
    await register(env, S0, token2, "192.0.2.60")
    await register(env, S0, token, "192.0.2.66", status=401)  # not its token now


# --- 3. reinstall and move --------------------------------------------------------------------


async def test_a_registered_server_moves_to_another_cluster_only_through_a_reinstall(
        env: Env) -> None:
    await managed(env, S0, S1)
    edge = await env.service.store.get_cluster("edge")
    far = await env.service.store.get_cluster("far")
    assert edge is not None and far is not None and edge.token != far.token
    token0, _ = await install(env, S0)
    await register(env, S0, token0, "192.0.2.60")
    token1, _ = await install(env, S1)
    await register(env, S1, token1, "192.0.2.61")
    await enroll(env, "52:54:00:36:00:20", "far-a", role="agent", cluster="far")
    # Moved while it runs edge's k3s: refused, naming the way (else far's nodes would be
    # sent to it at once, and edge's would keep counting it).
    r = await call(env, "PATCH", f"/api/v1/machines/{S0}", json_body={"cluster": "far"})
    assert r.status == 409 and r.json()["field"] == "cluster", r.text
    assert f"netboot machines reinstall {S0}" in r.json()["error"]
    r = await call(env, "PATCH", f"/api/v1/machines/{S0}", json_body={"role": "agent"})
    assert r.status == 409 and r.json()["field"] == "role", r.text
    assert "kernel " not in await boot(env, "52:54:00:36:00:20")  # far has no server
    r = await call(env, "POST", f"/api/v1/machines/{S0}/reinstall")
    assert r.status == 200
    # Edge's view dropped it: its next node joins the server that still runs.
    await enroll(env, AGENT, "a0", role="agent")
    _, agent = await install(env, AGENT)
    assert agent["server_url"] == "https://192.0.2.61:6443"
    r = await call(env, "PATCH", f"/api/v1/machines/{S0}", json_body={"cluster": "far"})
    assert r.status == 200, r.text
    assert (await config_of(env, S0, token0))[0] == 401
    token2, moved = await install(env, S0)
    # Far's first server: it initialises far, with far's token, never edge's.
    assert inits(moved) and moved["token"] == far.token and "server_url" not in moved
    await register(env, S0, token0, "192.0.2.60", status=401)
    await register(env, S0, token2, "192.0.2.60")
    _, far_agent = await install(env, "52:54:00:36:00:20")
    assert far_agent["server_url"] == "https://192.0.2.60:6443"
    # With far's agent token (never edge's, nor a token a server's join takes).
    assert far_agent["token"] == far.agent_token != far.token
    assert far.agent_token != edge.agent_token


async def test_an_import_row_moving_a_registered_machine_is_refused_with_its_line(
        env: Env) -> None:
    await managed(env, S0)
    token, _ = await install(env, S0)
    await register(env, S0, token, "192.0.2.60")
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [
        {"mac": S0, "cluster": "far"}]})
    assert r.status == 400, r.text
    [error] = r.json()["errors"]
    assert error["field"] == "cluster" and "reinstall" in error["message"], error
    assert (await env.get(f"/api/v1/machines/{S0}"))["cluster"] == "edge"


# --- 4. the cluster endpoint changes ------------------------------------------------------------


async def test_a_server_reinstalled_at_a_new_address_is_where_later_nodes_join(env: Env) -> None:
    await managed(env, S0, S1)
    token0, _ = await install(env, S0)
    await register(env, S0, token0, "192.0.2.60")
    token1, _ = await install(env, S1)
    await register(env, S1, token1, "192.0.2.61")
    await enroll(env, AGENT, "a0", role="agent")
    assert (await install(env, AGENT))[1]["server_url"] == "https://192.0.2.60:6443"
    # The first server replaced: reinstalled, it registers from a new lease.
    assert (await call(env, "POST", f"/api/v1/machines/{S0}/reinstall")).status == 200
    await enroll(env, "52:54:00:36:00:11", "a1", role="agent")
    assert (await install(env, "52:54:00:36:00:11"))[1]["server_url"] == \
        "https://192.0.2.61:6443"  # while it reinstalls, the server that runs
    token0b, again = await install(env, S0)
    assert not inits(again) and again["server_url"] == "https://192.0.2.61:6443"
    await register(env, S0, token0b, "192.0.2.70")
    await enroll(env, "52:54:00:36:00:12", "a2", role="agent")
    url = (await install(env, "52:54:00:36:00:12"))[1]["server_url"]
    assert url in ("https://192.0.2.70:6443", "https://192.0.2.61:6443")
    assert url != "https://192.0.2.60:6443"


async def test_with_authoritative_dhcp_nodes_and_dns_follow_a_servers_new_fixed_address(
        tmp_path: Path) -> None:
    """netboot's own DHCP hands a machine its fixed address and NAKs any other
    (netboot.leases): an operator who gives a registered server a new one moves it there at
    its next renewal. Nodes installed later and the cluster's DNS name follow it; the address
    it registered from is where it was. (A site DHCP server's new lease the installed OS reports
    at its next boot with its machine token: tests/test_register_netns.py.)"""
    path = write_config(tmp_path, "dns:\n  enabled: true\n  zone: netboot.lan\n")
    cfg = load(path, env={"NETBOOT_DHCP_MODE": "authoritative",
                          "NETBOOT_DHCP_AUTHORITATIVE_POOL_START": "192.0.2.100",
                          "NETBOOT_DHCP_AUTHORITATIVE_POOL_END": "192.0.2.150"})
    service = await build(cfg)  # nothing started: no DHCP socket
    try:
        store = service.store
        await store.put_cluster(Cluster(name="edge", server_url="managed", token="t"))
        cluster = await store.get_cluster("edge")
        assert cluster is not None
        server = Machine(macs=(MacAddress.parse(S0),), hostname="s0", cluster="edge",
                         role=Role.SERVER, state=MachineState.REGISTERED, ipv4="192.0.2.60",
                         fixed_ipv4="192.0.2.60")
        agent = Machine(macs=(MacAddress.parse(AGENT),), hostname="a0", cluster="edge",
                        role=Role.AGENT)
        await store.create_machine(server)
        await store.create_machine(agent)

        async def endpoint() -> tuple[str | None, tuple[str, ...]]:
            join = await service.boot.k3s_join(agent, cluster, Role.AGENT, None)
            zone: Zone = await service._build_zone()  # what `netboot serve`'s DNS answers
            return join.server_url, zone.endpoints.get("edge", ())

        assert await endpoint() == ("https://edge.netboot.lan:6443", ("192.0.2.60",))
        await store.update_machine(dataclasses.replace(server, fixed_ipv4="192.0.2.70"))
        assert await endpoint() == ("https://edge.netboot.lan:6443", ("192.0.2.70",))
        # Without netboot's DNS, the address itself.
        service.boot.settings = dataclasses.replace(service.boot.settings, cluster_domain=None)
        assert (await endpoint())[0] == "https://192.0.2.70:6443"
    finally:
        service.content.close()
        await service.store.close()


# --- 5. clocks ---------------------------------------------------------------------------------


async def test_a_device_clock_at_1970_plays_no_part(env: Env) -> None:
    """A first boot has no NTP yet: its RTC may say 1970 or years ahead. Nothing a device
    sends carries its time; every stamp and the token's expiry are netboot's clock (the
    writing server's, over PostgreSQL: keep the servers' clocks in step)."""
    before = env.service.boot._clock()
    await managed(env, S0)
    token, _ = await install(env, S0)
    r = await call(env, "POST", f"/api/v1/machines/{hexhyp(S0)}/events", admin=False,
                   json_body={"kind": "installed", "message": "done",
                              "data": {"time": "1970-01-01T00:00:00Z"}},
                   headers={"Authorization": f"Bearer {token}",
                            "Date": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert r.status == 201, r.text
    await register(env, S0, token, "192.0.2.60")
    events = await env.get(f"/api/v1/machines/{S0}/events")
    assert events and all(e["time"] >= before for e in events), events


# --- 6. one NIC, two boxes --------------------------------------------------------------------


async def test_a_nic_moved_to_a_new_box_is_its_old_machine_until_reinstalled(env: Env) -> None:
    await managed(env, S0)
    token, _ = await install(env, S0)
    await register(env, S0, token, "192.0.2.60")
    # The NIC in a new, blank box: netboot knows only the MAC, the registered machine's.
    assert (await boot(env, S0)).rstrip().endswith("exit")
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": S0, "hostname": "new"})
    assert r.status == 409 and r.json()["field"] == "mac", r.text
    # The operator's way: a reinstall; the old box's token is void.
    assert (await call(env, "POST", f"/api/v1/machines/{S0}/reinstall")).status == 200
    token2, config = await install(env, S0)
    assert token2 != token
    await register(env, S0, token, "192.0.2.60", status=401)
    assert config["k3s_args"][0] == "server"
