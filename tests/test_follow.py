"""``netboot events``: a machine's history, and ``--follow`` against a real server's stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from netboot import follow
from netboot.errors import NetbootError
from netboot.model import MacAddress, Machine
from tests.conftest import Env, EnvFactory, boot

MAC = "52:54:00:ee:00:01"


async def subscribed(env: Env, count: int = 1) -> None:
    for _ in range(200):  # bounded: 10 s
        if env.service.events.subscribers >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the follower never connected")


async def test_follow_prints_each_event_as_it_is_recorded(env: Env, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(env.admin + "\n")
    base = f"http://{env.client.host}:{env.client.port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", "events", "--follow", "--json", "--server", base,
        "--token-file", str(token_file), "--data-dir", str(tmp_path / "cli"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "NETBOOT_CONFIG"})
    try:
        await subscribed(env)
        await env.post("/api/v1/machines", {"mac": MAC, "hostname": "follow-1"}, status=201)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        event = json.loads(line)
        assert event["kind"] == "enrolled" and event["message"] == "created through the API"
    finally:
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
    assert b"Traceback" not in err, err


async def test_follow_one_machine_in_human_lines(env: Env) -> None:
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "a"}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:ee:00:02", "hostname": "b"}, status=201)
    base = f"http://{env.client.host}:{env.client.port}"
    wanted = await follow.machine_id(base, env.admin, MAC)
    lines: list[str] = []

    def emit(event: dict[str, Any]) -> None:
        lines.append(follow.event_line(event, as_json=False))

    task = asyncio.ensure_future(follow.follow(base, env.admin, machine=wanted, emit=emit,
                                               stop=lambda: bool(lines)))
    await subscribed(env)
    await env.post("/api/v1/machines/52:54:00:ee:00:02/reinstall", {}, status=200)
    await env.post(f"/api/v1/machines/{MAC}/reinstall", {}, status=200)
    await asyncio.wait_for(task, 20)
    (line,) = lines
    when, who, kind, message = line.split("  ", 3)
    assert "T" in when and when[-6] in "+-"  # local ISO 8601 with its offset
    assert (who, kind) == (wanted, "reinstall") and message.startswith("reinstall requested")


async def test_follow_names_machines_as_the_dashboard_does(env: Env) -> None:
    """Lines named machines by id (m-33de7d19b390), which an operator does not know: now by
    hostname, else by first MAC (a discovered machine), as the dashboard shows them; asked
    of the server once per machine and again when an event may rename it, not per event."""
    await env.seed()  # its group gives the machine a profile: approving needs nothing else
    base = f"http://{env.client.host}:{env.client.port}"
    known = await env.post("/api/v1/machines", {"mac": "52:54:00:ee:00:02", "hostname": "b"},
                           status=201)
    names = {known["id"]: "as-told-before"}
    lines: list[str] = []

    def emit(event: dict[str, Any]) -> None:
        lines.append(follow.event_line(event, as_json=False, names=names))

    task = asyncio.ensure_future(follow.follow(base, env.admin, emit=emit, names=names,
                                               stop=lambda: len(lines) >= 3))
    await subscribed(env)
    await env.post("/api/v1/machines/52:54:00:ee:00:02/reinstall", {}, status=200)
    await boot(env, MAC)  # discovered: no hostname yet
    await env.post(f"/api/v1/machines/{MAC}/approve", {"hostname": "rack1-n1"}, status=200)
    await asyncio.wait_for(task, 20)
    who = [(line.split("  ")[1], line.split("  ")[2]) for line in lines]
    # A machine already named is not asked again for an event that does not rename it.
    assert who == [("as-told-before", "reinstall"), (MAC, "discovered"),
                   ("rack1-n1", "enrolled")], lines


@pytest.mark.parametrize("how", ["import", "edit"])
async def test_follow_names_a_machine_again_after_an_import_or_an_edit_renames_it(
        env: Env, how: str) -> None:
    """An import that changes a machine (its hostname too) writes "updated": its name is
    asked again, or every later line of it kept the old name, and two machines whose names
    an import swapped were each shown by the other's (s38-review3). An edit (PATCH,
    ``machines set``) wrote no event at all: the machine's history skipped it (its hostname,
    cluster or fixed address moved with no line) and a follower kept the old name
    (s38-review3, left). Now it writes "updated" naming the fields it changed, and an edit
    that changes nothing writes none (s39-attack)."""
    base = f"http://{env.client.host}:{env.client.port}"
    known = await env.post("/api/v1/machines", {"mac": "52:54:00:ee:00:02", "hostname": "b"},
                           status=201)
    names = {known["id"]: "b"}
    lines: list[str] = []

    def emit(event: dict[str, Any]) -> None:
        lines.append(follow.event_line(event, as_json=False, names=names))

    task = asyncio.ensure_future(follow.follow(base, env.admin, emit=emit, names=names,
                                               stop=lambda: len(lines) >= 1))
    await subscribed(env)
    path = f"/api/v1/machines/{known['id']}"
    if how == "import":
        resp = await env.client.post("/api/v1/machines:import?format=csv",
                                     data="mac,hostname\n52:54:00:ee:00:02,c\n",
                                     headers=env.auth)
        assert resp.status in (200, 201), await resp.text()
    else:
        for body in ({"hostname": "c", "fixed_ipv4": "192.0.2.31"}, {"hostname": "c"}):
            resp = await env.client.patch(path, json=body, headers=env.auth)
            assert resp.status == 200, await resp.text()
    await asyncio.wait_for(task, 20)
    assert [line.split("  ")[1:3] for line in lines] == [["c", "updated"]], lines
    edits = [e["message"] for e in await env.get(f"{path}/events") if e["kind"] == "updated"]
    assert edits == (["changed by an import"] if how == "import"
                     else ["changed hostname b to c, fixed_ipv4 none to 192.0.2.31"]), edits


async def test_follow_with_a_wrong_token_says_so(env: Env) -> None:
    base = f"http://{env.client.host}:{env.client.port}"
    try:
        await follow.follow(base, "wrong", emit=lambda e: None)
    except Exception as exc:
        assert "refused the token" in str(exc)
    else:
        raise AssertionError("no error")


def test_event_line_keeps_one_line_per_event() -> None:
    line = follow.event_line({"time": 0, "machine": "m-1", "kind": "progress",
                              "message": "a\nforged"}, as_json=False)
    assert "\n" not in line and line.endswith("a\\nforged")
    # An ESC (an installer's message, the hostname a registration names) drove the
    # operator's terminal: written as its escape (s36-attack).
    line = follow.event_line({"time": 0, "machine": "m-1", "kind": "progress",
                              "message": "ok\x1b]0;title\x07\x1b[2J\u2028x"}, as_json=False)
    assert line.isprintable() and line.endswith("ok\\x1b]0;title\\x07\\x1b[2J\\u2028x")
    # The machine's name too: a server's answer, printed on the operator's terminal.
    line = follow.event_line({"time": 0, "machine": "m-1", "kind": "progress", "message": ""},
                             as_json=False, names={"m-1": "n\x1b[2Jx"})
    assert line.isprintable() and line.split("  ")[1] == "n\\x1b[2Jx", line


async def test_follow_over_https_trusts_netboots_ca(tmp_path: Path) -> None:
    from netboot.config import load
    from netboot.service import build
    from tests.conftest import write_config

    cfg = load(write_config(tmp_path), env={})
    service = await build(cfg)
    try:
        await service.start()
        admin = (cfg.data_dir / "admin.token").read_text().strip()
        base = f"https://127.0.0.1:{service.https_port}"
        await service.store.create_machine(Machine(macs=(MacAddress.parse(MAC),)))
        ca = cfg.data_dir / "tls" / "ca.pem"
        wanted = await follow.machine_id(base, admin, MAC, ca_file=ca)
        assert wanted == (await service.store.machine_by("mac", MAC)).id  # type: ignore[union-attr]
        # Without netboot's CA the system's do not know its certificate.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await follow.machine_id(base, admin, MAC)
    finally:
        await service.close()


async def test_follow_repeats_the_servers_reason_for_a_refusal(make_env: EnvFactory) -> None:
    env = await make_env(http="  plain_api: refuse\n")
    base = f"http://{env.client.host}:{env.client.port}"
    with pytest.raises(NetbootError) as info:
        await follow.follow(base, env.admin, emit=lambda e: None)
    assert "HTTP 403" in str(info.value) and "use https://" in str(info.value)
    with pytest.raises(NetbootError) as info:
        await follow.machine_id(base, env.admin, MAC)
    assert "HTTP 403" in str(info.value) and "plain_api: refuse" in str(info.value)


async def test_follow_reads_the_stream_on_while_names_are_asked(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a storm of new machines each first event asked the machine's name before the
    stream was read further, one round trip at a time: watched from afar, the follower fell
    behind until the server's queue for it overflowed and dropped events (s38-review3). Now
    the stream is read on and the names are asked side by side, the lines still in order,
    each with its machine's name. Played here with a lookup that answers only once several
    are under way (or after 2 s alone): one at a time, every name took the 2 s."""
    base = f"http://{env.client.host}:{env.client.port}"
    want = 6
    under_way, most = 0, 0
    enough = asyncio.Event()
    real = follow.machine_name_of

    async def far(http: aiohttp.ClientSession, base_url: str, authorization: str,
                  ident: str) -> str:
        nonlocal under_way, most
        under_way += 1
        most = max(most, under_way)
        if under_way >= 4:
            enough.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(enough.wait(), 2)
            return await real(http, base_url, authorization, ident)
        finally:
            under_way -= 1

    monkeypatch.setattr(follow, "machine_name_of", far)
    names: dict[str, str] = {}
    lines: list[str] = []

    def emit(event: dict[str, Any]) -> None:
        lines.append(follow.event_line(event, as_json=False, names=names))

    task = asyncio.ensure_future(follow.follow(base, env.admin, emit=emit, names=names,
                                               stop=lambda: len(lines) >= want))
    await subscribed(env)
    rows = "".join(f"52:54:00:ee:01:{i:02x},host-{i}\n" for i in range(want))
    resp = await env.client.post("/api/v1/machines:import?format=csv",
                                 data="mac,hostname\n" + rows, headers=env.auth)
    assert resp.status in (200, 201), await resp.text()
    await asyncio.wait_for(task, 60)
    assert sorted(line.split("  ")[1:3] for line in lines) == sorted(
        [f"host-{i}", "enrolled"] for i in range(want)), lines
    assert most >= 4, f"the names were asked one at a time ({most} at most under way)"


async def test_follow_takes_a_machine_by_its_hostname_as_the_other_commands_do(
        env: Env) -> None:
    """README: the CLI's commands take a machine's hostname where a REF is asked
    (`netboot machines show edge-1`); `netboot events edge-1 --follow` asked the API, whose
    {ref} is a MAC or an id, and failed ("neither a MAC address nor a machine id"). A name
    no machine has is still refused with the server's words."""
    created = await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1"},
                             status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:ee:00:02", "hostname": "edge-10"},
                   status=201)
    base = f"http://{env.client.host}:{env.client.port}"
    assert await follow.machine_id(base, env.admin, "edge-1") == created["id"]
    assert await follow.machine_id(base, env.admin, MAC) == created["id"]
    with pytest.raises(NetbootError, match="HTTP 40"):
        await follow.machine_id(base, env.admin, "edge-2")


async def test_follow_resumes_after_its_stream_drops_with_the_events_of_the_gap(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream drops (the server ends it, as a proxy's idle timeout would) and a machine
    is made before the follower reconnects: it sends the last event's id (Last-Event-ID),
    as a browser's EventSource does, and prints the gap's event. Before, it reconnected at
    the present and the event was never printed."""
    monkeypatch.setattr(follow, "RECONNECT_SECONDS", 0.5)
    base = f"http://{env.client.host}:{env.client.port}"
    seen: list[dict[str, Any]] = []
    task = asyncio.ensure_future(follow.follow(base, env.admin, emit=seen.append,
                                               stop=lambda: len(seen) >= 2))
    try:
        await subscribed(env)
        await env.post("/api/v1/machines", {"mac": MAC, "hostname": "before"}, status=201)
        for _ in range(200):  # bounded: 10 s
            if seen:
                break
            await asyncio.sleep(0.05)
        assert [e["kind"] for e in seen] == ["enrolled"]
        for sub in list(env.service.events._subscribers):
            sub._end()  # the server ends the stream
        for _ in range(200):
            if not env.service.events.subscribers:
                break
            await asyncio.sleep(0.01)
        await env.post("/api/v1/machines", {"mac": "52:54:00:ee:00:02", "hostname": "gap"},
                       status=201)
        assert env.service.events.subscribers == 0  # made while nobody followed
        await asyncio.wait_for(task, 20)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [e["message"] for e in seen] == ["created through the API"] * 2
    assert seen[1]["machine"] != seen[0]["machine"]
