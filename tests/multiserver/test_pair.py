"""Two netboot servers, one inventory: what one server learns, the other answers with at once.

Every test runs two real ``netboot serve`` processes (tests/multiserver/conftest.py) and speaks
HTTP to them over loopback, as devices and operators would.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp

from netboot.pki import Authority
from netboot.sealing import read_key
from tests.conftest import install_token
from tests.multiserver.conftest import Inventory, Pair, Server, running_pair, server_config

MAC = "52:54:00:13:00:01"


async def seed(pair: Pair, server: Server, *, cluster: dict[str, Any] | None = None,
               role: str = "agent") -> None:
    """A cluster, a profile and a group selecting every x86_64 machine, through ``server``."""
    await pair.call(server, "POST", "/api/v1/clusters", body=cluster or {
        "name": "edge", "server_url": "https://192.0.2.50:6443", "token": "k3s-secret"},
        status=201)
    await pair.call(server, "POST", "/api/v1/profiles", body={
        "name": "k3os", "kernel": "vmlinuz", "initrds": ["initrd.img"],
        "config_template": "k3os"}, status=201)
    await pair.call(server, "POST", "/api/v1/groups", body={
        "name": "all-x86", "selector": {"arch": ["x86_64"]}, "profile": "k3os",
        "cluster": (cluster or {}).get("name", "edge"), "role": role}, status=201)


def is_install(script: str) -> bool:
    return "vmlinuz" in script and "?token=" in script


async def test_enrolled_through_a_boots_through_b_at_once(pair: Pair) -> None:
    await seed(pair, pair.a)
    # B has seen this NIC as unknown (and remembers that in its view) before A enrolls it.
    assert not is_install(await pair.boot(pair.b, MAC))
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC, "hostname": "n1"},
                    status=201)
    script = await pair.boot(pair.b, MAC)
    assert is_install(script), script
    # The install token B issued is the inventory's: A accepts it for the config.
    config = await pair.call(pair.a, "GET", f"/config/{MAC}?token={install_token(script)}",
                             admin=False, status=200)
    assert "k3s-secret" in config


async def test_bulk_import_through_a_is_seen_by_b(pair: Pair) -> None:
    await seed(pair, pair.a)
    macs = [f"52:54:00:13:01:{i:02x}" for i in range(40)]
    for mac in macs[:5]:  # remembered as unknown by B's view
        assert not is_install(await pair.boot(pair.b, mac))
    report = await pair.call(pair.a, "POST", "/api/v1/machines:bulk", body={
        "machines": [{"mac": m, "hostname": f"bulk-{i}"} for i, m in enumerate(macs)]},
        status=201)
    # The five B saw were recorded as discovered: the import takes them over.
    assert len(report["created"]) + len(report["changed"]) == len(macs), report
    listed = await pair.call(pair.b, "GET", "/api/v1/machines?limit=1000", status=200)
    assert {m["hostname"] for m in listed["items"]} >= {f"bulk-{i}" for i in range(len(macs))}
    scripts = await asyncio.gather(*(pair.boot(pair.b, m) for m in macs))
    assert all(is_install(s) for s in scripts)


async def sse_events(resp: aiohttp.ClientResponse) -> Any:
    """The ``event: machine`` payloads of a Server-Sent Events stream, as they come."""
    kind = None
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: ") and kind == "machine":
            yield json.loads(line[len("data: "):])
        elif not line:
            kind = None


async def test_registration_through_b_is_live_on_a(pair: Pair) -> None:
    await seed(pair, pair.a)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC, "hostname": "n1"},
                    status=201)
    async with pair.http.get(pair.a.base + "/api/v1/events/stream", headers=pair.auth,
                             timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as stream:
        assert stream.status == 200
        await stream.content.readline()  # "retry:": subscribed from here on
        token = install_token(await pair.boot(pair.b, MAC))
        await pair.call(pair.b, "POST", "/api/v1/register", admin=False, status=200,
                        body={"mac": MAC, "token": token, "addresses": ["192.0.2.61"]})
        seen: list[str] = []

        async def until_registered() -> None:
            async for event in sse_events(stream):
                seen.append(event["kind"])
                if event["kind"] == "registered":
                    return

        try:
            await asyncio.wait_for(until_registered(), 60)  # a bound, not a timing claim
        except TimeoutError:
            raise AssertionError(f"A's stream showed only {seen}") from None
        assert "install-plan" in seen and seen[-1] == "registered", seen
    machine = await pair.call(pair.a, "GET", f"/api/v1/machines/{MAC}", status=200)
    assert machine["state"] == "registered" and machine["ipv4"] == "192.0.2.61"
    status = await pair.call(pair.a, "GET", "/api/v1/status", status=200)
    assert "registered" in json.dumps(status), status


async def test_two_first_servers_through_a_and_b_get_one_cluster_init(pair: Pair) -> None:
    """Managed clusters whose two first servers boot at the same moment, one through each
    netboot server: exactly one of each pair is told to initialise the cluster (the other is
    held until it can join). Several clusters at once, so that the race is really run."""
    clusters = [f"m{i}" for i in range(8)]
    await pair.call(pair.a, "POST", "/api/v1/profiles", body={
        "name": "k3os", "kernel": "vmlinuz", "initrds": ["initrd.img"],
        "config_template": "k3os"}, status=201)
    macs: dict[str, tuple[str, str]] = {}
    for i, name in enumerate(clusters):
        await pair.call(pair.a, "POST", "/api/v1/clusters",
                        body={"name": name, "server_url": "managed"}, status=201)
        macs[name] = (f"52:54:00:13:02:{2 * i:02x}", f"52:54:00:13:02:{2 * i + 1:02x}")
        for j, mac in enumerate(macs[name]):
            await pair.call(pair.a, "POST", "/api/v1/machines", status=201, body={
                "mac": mac, "hostname": f"{name}-s{j}", "cluster": name, "role": "server",
                "profile": "k3os"})
    boots = [(name, server, mac) for name in clusters
             for server, mac in zip((pair.a, pair.b), macs[name], strict=True)]
    scripts = []
    for name in clusters:  # the two of a cluster at the same moment, one cluster at a time
        scripts += await asyncio.gather(*(pair.boot(server, mac)
                                          for n, server, mac in boots if n == name))
    # Per cluster: who was given an install, and what its config says (a node whose claim
    # was overwritten by the other server gets a 409 "waiting" for its config).
    told: dict[str, list[str]] = {name: [] for name in clusters}
    for (name, server, mac), script in zip(boots, scripts, strict=True):
        if not is_install(script):
            assert "waiting for cluster" in script, script
            continue
        async with pair.http.get(f"{server.base}/config/{mac}?token={install_token(script)}",
                                 ) as resp:
            config = await resp.text()
        init = "cluster-init" if "cluster-init" in config else f"{resp.status} {config[:60]}"
        told[name].append(f"{mac} via {server.name}: {init}")
    wrong = {name: t for name, t in told.items()
             if len(t) != 1 or not t[0].endswith(": cluster-init")}
    assert not wrong, wrong


async def test_one_registration_through_a_and_b_at_once_is_answered_by_both(
        pair: Pair) -> None:
    """A device's registration sent again while the first was being written (its retry
    after a timeout, taken by the other server of the pair): both get a 200 with the same
    machine token, one registration is recorded. (Before s39-multi: the one that lost the
    compare-and-set was a 409 "registered now, not booting as read", which the register
    command retries until its hour is out.) Several machines: the race is really run."""
    await seed(pair, pair.a)
    macs = [f"52:54:00:13:03:{i:02x}" for i in range(8)]
    for mac in macs:
        await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": mac}, status=201)
    for mac in macs:
        body = {"mac": mac, "token": install_token(await pair.boot(pair.a, mac)),
                "addresses": ["192.0.2.61"], "keeps": "machine_token"}
        answers = await asyncio.gather(*(
            pair.call(server, "POST", "/api/v1/register", body=body, admin=False)
            for server in (pair.a, pair.b)))
        assert all(isinstance(a, dict) and a.get("state") == "registered"
                   for a in answers), (mac, answers)
        assert answers[0]["machine_token"] == answers[1]["machine_token"], answers
        events = await pair.call(pair.b, "GET", f"/api/v1/machines/{mac}/events", status=200)
        assert [e["kind"] for e in events].count("registered") == 1, events


async def test_the_servers_of_one_inventory_share_one_ca(pair: Pair, tmp_path: Path,
                                                         inventory: Inventory) -> None:
    """Each server made a CA of its own, so a device or client trusting one (an iPXE built
    with it, the installed system its config gave it, an operator's CURL_CA_BUNDLE) did not
    verify the other behind one name (s39-multi). Now the second takes the first's from the
    inventory, issues its own certificate with it, and hands it in its configs; a server
    that had a CA of its own before keeps it and is told so."""
    from cryptography import x509

    ca_pem = (pair.a.data_dir / "tls" / "ca.pem").read_bytes()
    assert (pair.b.data_dir / "tls" / "ca.pem").read_bytes() == ca_pem
    leaf = x509.load_pem_x509_certificates(
        (pair.b.data_dir / "tls" / "server.pem").read_bytes())[0]
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    await seed(pair, pair.a)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC}, status=201)
    script = await pair.boot(pair.b, MAC)
    config = await pair.call(pair.b, "GET", f"/config/{MAC}?token={install_token(script)}",
                             admin=False, status=200)
    assert json.dumps(ca_pem.decode()) in config

    # A third server whose data dir has a CA of its own already (set up before sharing).
    c = server_config(tmp_path, "c", inventory)
    c.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(pair.a.data_dir / "secret.key", c.data_dir / "secret.key")
    sealer = read_key(c.data_dir / "secret.key")
    assert sealer is not None
    Authority(c.data_dir / "tls", sealer.derive("ca key passphrase")).load_or_create()
    own = (c.data_dir / "tls" / "ca.pem").read_bytes()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, c.start)
    try:
        assert (c.data_dir / "tls" / "ca.pem").read_bytes() == own
        assert "is not the one of the other netboot servers sharing the inventory" in c.log()
    finally:
        c.stop()


AUTO_RULE = """discovery:
  policy: auto
  rules:
    - {selector: {arch: [x86_64]}, cluster: edge, role: agent, profile: k3os,
       trust_firmware_strings: true}
"""


async def test_a_new_nic_through_a_and_b_at_once_is_auto_enrolled_once(
        tmp_path: Path, inventory: Inventory) -> None:
    """Under ``discovery.policy: auto``, a NIC never seen asks both servers at the same
    moment (a broadcast DHCP both answer, then iPXE's request to either): one machine,
    enrolled once, and both answers the same install. (Before s39-multi: the server whose
    discovered record lost to the other's read back a machine the other had enrolled
    meanwhile, and auto-enrolled it again: 409 "is enrolled; 'auto-enroll' is not allowed"
    to the device.) Several NICs: the race is really run."""
    servers = (server_config(tmp_path, "a", inventory, AUTO_RULE),
               server_config(tmp_path, "b", inventory, AUTO_RULE))
    async with running_pair(tmp_path, inventory, servers=servers) as pair:
        await seed(pair, pair.a)
        macs = [f"52:54:00:13:04:{i:02x}" for i in range(12)]
        for mac in macs:
            scripts = await asyncio.gather(pair.boot(pair.a, mac), pair.boot(pair.b, mac))
            assert all(is_install(s) for s in scripts), (mac, scripts)
            assert install_token(scripts[0]) == install_token(scripts[1]), scripts
            events = await pair.call(pair.b, "GET", f"/api/v1/machines/{mac}/events",
                                     status=200)
            assert [e["kind"] for e in events].count("enrolled") == 1, events
        listed = await pair.call(pair.a, "GET", "/api/v1/machines?limit=100&q=52:54:00:13:04",
                                 status=200)
        assert sorted(m["mac"] for m in listed["items"]) == macs


async def test_one_first_install_through_a_and_b_at_once_is_planned_once(pair: Pair) -> None:
    """Enrolled machines whose first ``/ipxe`` reaches A and B at the same moment (a retry
    taken by the other server of a pair behind one address), all machines at once so that
    the plans' compare-and-set is really raced: one install token, the same in both scripts
    (the node holds the only live one), one plan event ("install profile …") per machine;
    the other answer is the install under way asked again, noted as one server notes a
    second fetch. (s40-multi: what s39-multi left as "two install-plan events" is that
    note, the same as through one server; nothing else is written twice.)"""
    await seed(pair, pair.a)
    macs = [f"52:54:00:13:05:{i:02x}" for i in range(16)]
    await pair.call(pair.a, "POST", "/api/v1/machines:bulk", status=201,
                    body={"machines": [{"mac": m} for m in macs]})
    scripts = await asyncio.gather(*(pair.boot(server, mac)
                                     for mac in macs for server in (pair.a, pair.b)))
    for i, mac in enumerate(macs):
        through_a, through_b = scripts[2 * i], scripts[2 * i + 1]
        assert is_install(through_a) and is_install(through_b), (mac, through_a, through_b)
        assert install_token(through_a) == install_token(through_b), mac
        # The token both were given is the stored one: the config is served with it.
        await pair.call(pair.b, "GET", f"/config/{mac}?token={install_token(through_a)}",
                        admin=False, status=200)
        plans: list[str] = []
        for _ in range(100):  # the note is written within the recorder's delay (bounded)
            events = await pair.call(pair.a, "GET", f"/api/v1/machines/{mac}/events",
                                     status=200)
            plans = [e["message"] for e in events if e["kind"] == "install-plan"]
            if len(plans) >= 2:
                break
            await asyncio.sleep(0.1)
        planned = [p for p in plans if p.startswith("install profile ")]
        again = [p for p in plans if p.startswith("install script again ")]
        assert len(planned) == 1 and len(again) <= 1 and len(plans) == 1 + len(again), plans
