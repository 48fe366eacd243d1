"""The refused claims of two real servers on one inventory (s42-ops): a claim one server
refused is listed and given by the other, kept through a restart, listed by the CLI on the
database, and bounded however many addresses flood it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from netboot.claims import PLACES
from netboot.enroll import CONTEST_BURST
from tests.conftest import install_token
from tests.multiserver.conftest import Pair, Server, netboot_cli
from tests.multiserver.test_pair import MAC, seed
from tests.test_api import _register_from


async def register_from(server: Server, peer: str, body: dict[str, Any]) -> int:
    """POST /api/v1/register to ``server`` on a connection of its own from ``peer`` (a
    loopback address: the registration's source), as tests/test_api.py sends it. Its
    status."""
    at = SimpleNamespace(client=SimpleNamespace(host="127.0.0.1", port=server.port))
    return int((await _register_from(at, peer, body)).split(b" ", 2)[1])  # type: ignore[arg-type]


async def listed_until(pair: Pair, server: Server, claim: str) -> list[dict[str, Any]]:
    """``server``'s GET .../claims once it lists ``claim`` (written within
    claims.WRITE_EVERY: polled, bounded at 60 s, not a timing claim)."""
    listed: list[dict[str, Any]] = []
    for _ in range(120):
        listed = await pair.call(server, "GET", f"/api/v1/machines/{MAC}/claims", status=200)
        if any(k["claim"] == claim for k in listed):
            return listed
        await asyncio.sleep(0.5)
    raise AssertionError(f"{server.name} never listed {claim}: {listed}\n{pair.logs()}")


async def cli(server: Server, *args: str) -> tuple[int, str, str]:
    """``netboot machines claim MAC ARGS`` as its own process, with ``server``'s config and
    no token nor --server: on the database, as every other command."""
    return await netboot_cli(server.config, "machines", "claim", MAC, *args)


async def test_a_claim_refused_by_a_is_listed_and_given_by_b_and_outlives_a_restart(
        pair: Pair) -> None:
    """A host with the spent token uses the rate-limited events up through A; the device's
    refusal (twice, through A) is then a kept claim only. It was kept in A's memory: B's
    list was empty, B's claim a 404, A's restart lost it, and the CLI asked A's API alone
    (s41-ops). Now B lists it (tried twice), the CLI on the database lists it, A lists it
    after a restart, and B gives the machine to it: the device's next try through A is
    answered. A flood from more addresses than PLACES keeps the list bounded, the device's
    retried claim in it."""
    await seed(pair, pair.a)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC}, status=201)
    token = install_token(await pair.boot(pair.a, MAC))
    body = {"mac": MAC, "token": token, "addresses": ["198.51.100.6"],
            "keeps": "machine_token"}

    async def register(server: Server, peer: str, secret: str) -> int:
        return await register_from(server, peer, {**body, "install_secret": secret})

    assert await register(pair.a, "127.0.0.66", "holder") == 200
    for i in range(CONTEST_BURST):
        assert await register(pair.a, f"127.0.1.{i + 1}", secrets.token_hex(16)) == 409
    device = "device-" + secrets.token_hex(8)
    claim = hashlib.sha256(device.encode()).hexdigest()
    for _ in range(2):
        assert await register(pair.a, "127.0.0.7", device) == 409
    events = await pair.call(pair.b, "GET", f"/api/v1/machines/{MAC}/events", status=200)
    assert claim not in json.dumps(events)  # the events were used up: a kept claim only

    listed = await listed_until(pair, pair.b, claim)
    assert [(k["peer"], k["tries"]) for k in listed if k["claim"] == claim] == [
        ("127.0.0.7", 2)], listed
    rc, out, err = await cli(pair.b, "--json")
    assert rc == 0, err
    assert [(k["peer"], k["tries"]) for k in json.loads(out) if k["claim"] == claim] == [
        ("127.0.0.7", 2)], out

    # A flood from more addresses than a machine keeps, through B: bounded, the device's
    # retried claim kept (a flood's come once each).
    for i in range(PLACES + 8):
        assert await register(pair.b, f"127.0.2.{i + 1}", secrets.token_hex(16)) == 409
    last = secrets.token_hex(16)
    assert await register(pair.b, "127.0.3.1", last) == 409
    listed = await listed_until(pair, pair.a, hashlib.sha256(last.encode()).hexdigest())
    assert len(listed) <= PLACES and listed[0]["claim"] == claim, listed

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pair.a.stop)
    await loop.run_in_executor(None, pair.a.start)
    listed = await listed_until(pair, pair.a, claim)
    assert listed[0]["claim"] == claim and listed[0]["tries"] == 2, listed

    await pair.call(pair.b, "POST", f"/api/v1/machines/{MAC}/claim", body={"claim": claim},
                    status=200)
    assert await register(pair.a, "127.0.0.7", device) == 200
    # Given: history on both servers (refused against the registration no longer held).
    for server in (pair.a, pair.b):
        assert await pair.call(server, "GET", f"/api/v1/machines/{MAC}/claims",
                               status=200) == []
    rc, out, err = await cli(pair.b)
    assert rc == 0 and "no refused claim kept" in out, (rc, out, err)


async def test_the_cli_names_the_database_not_a_server_that_is_not_there(
        pair: Pair, tmp_path: Path) -> None:
    """`machines claim REF CLAIM` with no server of this host listening (the config of a
    host whose server is stopped): given on the database, as every other command; it
    asked this host's server only and, finding none, looked in the events alone (s41-ops)."""
    await seed(pair, pair.a)
    await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC}, status=201)
    token = install_token(await pair.boot(pair.a, MAC))
    body = {"mac": MAC, "token": token, "addresses": ["198.51.100.6"],
            "keeps": "machine_token"}
    assert await register_from(pair.a, "127.0.0.66", {**body, "install_secret": "h"}) == 200
    for i in range(CONTEST_BURST):
        assert await register_from(pair.a, f"127.0.1.{i + 1}",
                                   {**body, "install_secret": secrets.token_hex(16)}) == 409
    device = "device-" + secrets.token_hex(8)
    claim = hashlib.sha256(device.encode()).hexdigest()
    assert await register_from(pair.a, "127.0.0.7", {**body, "install_secret": device}) == 409
    await listed_until(pair, pair.b, claim)  # B's memory has none: in the database
    await asyncio.get_running_loop().run_in_executor(None, pair.b.stop)
    rc, out, err = await cli(pair.b, claim)
    assert rc == 0 and "is given to the install" in out, (rc, out, err)
    assert await register_from(pair.a, "127.0.0.7", {**body, "install_secret": device}) == 200


async def tries_until(pair: Pair, server: Server, claim: str, tries: int) -> list[dict[str, Any]]:
    """``server``'s GET .../claims once ``claim`` is listed with ``tries`` (polled, bounded at
    30 s: each server writes its counts within claims.WRITE_EVERY)."""
    listed: list[dict[str, Any]] = []
    for _ in range(60):
        listed = await pair.call(server, "GET", f"/api/v1/machines/{MAC}/claims", status=200)
        if [k["tries"] for k in listed if k["claim"] == claim] == [tries]:
            return listed
        await asyncio.sleep(0.5)
    raise AssertionError(f"{server.name} never listed {claim} tried {tries}: {listed}")


async def test_a_devices_tries_through_both_servers_add_up_and_go_with_its_machine(
        pair: Pair) -> None:
    """The device's register command retries its one secret; its tries reach one server or
    the other. Each server counted its own and the setting kept the most either counted:
    four tries, two through each, were listed as 2 (s42-ops' note). Now both servers and the
    CLI on the database list 4. Deleting the machine removes its refused-claims row (it
    stayed, read by no one: the store had no setting delete), and a server's start drops
    the rows of machines already gone and the older_registrations_none marker an earlier
    netboot wrote, a live machine's row kept."""
    from netboot.claims import SETTING
    from netboot.config import load
    from netboot.service import open_inventory

    await seed(pair, pair.a)
    made = await pair.call(pair.a, "POST", "/api/v1/machines", body={"mac": MAC}, status=201)
    token = install_token(await pair.boot(pair.a, MAC))
    body = {"mac": MAC, "token": token, "addresses": ["198.51.100.6"],
            "keeps": "machine_token"}
    assert await register_from(pair.a, "127.0.0.66", {**body, "install_secret": "h"}) == 200
    device = "device-" + secrets.token_hex(8)
    claim = hashlib.sha256(device.encode()).hexdigest()
    for server in (pair.a, pair.b, pair.a, pair.b):
        assert await register_from(server, "127.0.0.7",
                                   {**body, "install_secret": device}) == 409
    for server in (pair.a, pair.b):
        await tries_until(pair, server, claim, 4)
    rc, out, err = await cli(pair.b, "--json")
    assert rc == 0, err
    assert [k["tries"] for k in json.loads(out) if k["claim"] == claim] == [4], out

    store, _ = await open_inventory(load(pair.a.config, env={}))
    try:
        assert await store.get_setting(SETTING + made["id"]) is not None
        await pair.call(pair.b, "DELETE", f"/api/v1/machines/{MAC}", status=204)
        assert await store.get_setting(SETTING + made["id"]) is None
        # Rows a netboot before this one left: a deleted machine's, the old marker; and a
        # live machine's, kept.
        other = await pair.call(pair.a, "POST", "/api/v1/machines",
                                body={"mac": "52:54:00:42:00:09"}, status=201)
        await store.put_setting(SETTING + "m-gone", '{"against": [1, null], "held": []}')
        await store.put_setting(SETTING + other["id"], '{"against": [1, null], "held": []}')
        await store.put_setting("older_registrations_none", "1")
    finally:
        await store.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pair.a.stop)
    await loop.run_in_executor(None, pair.a.start)
    store, _ = await open_inventory(load(pair.a.config, env={}))
    try:
        assert await store.get_setting(SETTING + "m-gone") is None
        assert await store.get_setting("older_registrations_none") is None
        assert await store.get_setting(SETTING + other["id"]) is not None
    finally:
        await store.close()
