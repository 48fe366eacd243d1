"""REST API /api/v1 through aiohttp's test client: every endpoint and its error paths."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netboot import api as api_module
from netboot.inventory import codec
from netboot.inventory.base import Batch, MachineFilter
from netboot.inventory.sqlite import SqliteStore
from netboot.lifecycle import Trigger, advance
from netboot.model import Event, MacAddress, Machine, Scope
from netboot.openapi import document
from tests.conftest import (
    Env,
    EnvFactory,
    Reply,
    boot,
    call,
    install_token,
    registered_beside_enrolled,
)
from tests.held_store import begun, held_writer, write_lock, writes_waiting

MAC = "52:54:00:12:34:56"
MAC2 = "52:54:00:12:34:57"


async def machine(env: Env, **fields: Any) -> dict[str, Any]:
    body = {"mac": MAC, **fields}
    out: dict[str, Any] = await env.post("/api/v1/machines", body, status=201)
    return out


def error(reply: Reply, status: int, field: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.text)
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    body: dict[str, Any] = reply.json()
    assert isinstance(body.get("error"), str) and body["error"]
    if field is not None:
        assert body.get("field") == field, body
    return body


# --- the OpenAPI document matches the router -------------------------------------------------


def api_routes(env: Env) -> set[tuple[str, str]]:
    out = set()
    for route in env.service.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/api/v1") and route.method != "HEAD":
            out.add((path, route.method.lower()))
    return out


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "patch", "delete", "head", "options"}
    return {(path, m) for path, item in doc["paths"].items() for m in item if m in methods}


async def test_openapi_served_and_matches_the_router_both_ways(env: Env) -> None:
    served = await env.get("/api/v1/openapi.json")
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"].startswith("3.")
    routes = api_routes(env)
    docs = documented(served)
    assert routes - docs == set(), "routes without documentation"
    assert docs - routes == set(), "documented operations without a route"


async def test_openapi_path_parameters_and_refs_are_consistent(env: Env) -> None:
    doc = document()
    for path, item in doc["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == declared, path
    text = json.dumps(doc)
    for ref in re.findall(r'"#/components/schemas/(\w+)"', text):
        assert ref in doc["components"]["schemas"], ref


async def test_openapi_security_marks_every_operation_but_the_devices_own(env: Env) -> None:
    doc = document()
    assert "security" not in doc  # each operation says, none inherits by accident
    open_ops = {(p, m) for p, m in documented(doc) if not doc["paths"][p][m]["security"]}
    assert open_ops == {("/api/v1/register", "post")}
    events = doc["paths"]["/api/v1/machines/{ref}/events"]["post"]["security"]
    assert {"installToken": []} in events
    for path, method in documented(doc):
        for requirement in doc["paths"][path][method]["security"]:
            for scheme, scopes in requirement.items():
                assert scheme in doc["components"]["securitySchemes"]
                assert set(scopes) <= {s.value for s in Scope}
                assert scheme != "bearer" or len(scopes) == 1  # alternatives, one scope each


async def test_every_ref_operation_documents_the_409_of_a_ref_that_names_two_machines(
        env: Env) -> None:
    """A ``{ref}`` that is one machine's hostname and another's MAC (bare form) is a 409
    listing both (core.machine_ref) on every operation that takes one, as the path
    parameter's description says; the document listed no 409 for GET, DELETE, explain,
    events or claims, and its Error had no ``candidates``: a client checking the answer
    against the document (schemathesis's status_code_conformance) refused it (s41-review)."""
    await env.seed()
    a = await machine(env, hostname="edge-1", cluster="edge", profile="k3os")
    compact = MAC.replace(":", "")
    b = await env.post("/api/v1/machines", {"mac": MAC2, "hostname": compact}, status=201)
    doc = document()
    error_schema = doc["components"]["schemas"]["Error"]["properties"]
    assert error_schema["candidates"]["type"] == "array", error_schema
    checked = []
    for path, method in sorted(documented(doc)):
        if "{ref}" not in path:
            continue
        body = {"kind": "progress"} if path.endswith("/events") else (
            {"claim": "0" * 64} if path.endswith("/claim") else {})
        r = await call(env, method.upper(), path.replace("{ref}", compact).replace(
            "{kind}", "ipxe"), json_body=body)
        answered = error(r, 409, "ref")
        assert sorted(answered["candidates"]) == sorted([a["id"], b["id"]]), (path, answered)
        assert "409" in doc["paths"][path][method]["responses"], (method, path)
        checked.append((method, path))
    assert len(checked) >= 11, checked
    assert (await env.get(f"/api/v1/machines/{MAC}"))["hostname"] == "edge-1"  # none taken


# --- auth: every documented operation refuses without / with a wrong token --------------------


def concrete(path: str) -> str:
    return path.replace("{ref}", MAC).replace("{name}", "edge").replace("{kind}", "config")


async def test_every_operation_needs_a_token(env: Env) -> None:
    await env.seed()
    await machine(env)
    doc = document()
    checked = 0
    for path, method in sorted(documented(doc)):
        if not doc["paths"][path][method]["security"]:
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"},
                        {"Authorization": f"Bearer {env.admin}x"},
                        {"Authorization": "Bearer"}):
            r = await call(env, method.upper(), concrete(path), json_body={"kind": "x"},
                           headers=headers, admin=False)
            error(r, 401)
            assert r.headers.get("www-authenticate") == "Bearer"
            assert env.admin not in r.text
        checked += 1
    assert checked >= 28
    # Nothing was changed by the refused calls.
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "enrolled"
    assert len(await env.get("/api/v1/clusters")) == 1


async def scoped_token(env: Env, scope: str, name: str | None = None) -> str:
    made = await env.post("/api/v1/tokens", {"name": name or f"t-{scope}", "scope": scope},
                          status=201)
    value: str = made["token"]
    return value


async def test_each_scope_is_refused_exactly_what_the_document_does_not_grant(env: Env) -> None:
    """The document's security requirements are what the server enforces, operation by
    operation: a scope not listed gets 403 naming one that is; a listed one gets past."""
    await env.seed()
    await machine(env)
    tokens = {s.value: await scoped_token(env, s.value) for s in Scope}
    doc = document()
    refused = 0
    for path, method in sorted(documented(doc)):
        allowed = {scope for req in doc["paths"][path][method]["security"]
                   for scheme, scopes in req.items() if scheme == "bearer" for scope in scopes}
        if not doc["paths"][path][method]["security"]:
            continue
        # The event stream never ends once let in: its scopes are checked without reading it.
        stream = path == "/api/v1/events/stream"
        for scope, token in tokens.items():
            if stream and scope in allowed:
                continue
            r = await call(env, method.upper(), concrete(path), json_body={"kind": "x"},
                           headers={"Authorization": f"Bearer {token}"}, admin=False)
            if scope in allowed:
                assert r.status not in (401, 403), (path, method, scope, r.text)
            else:
                body = error(r, 403)
                assert body["scope"] in allowed, (path, method, body)
                assert body["scope"] == doc["paths"][path][method]["x-netboot-scope"]
                assert r.headers["www-authenticate"] == (
                    f'Bearer error="insufficient_scope", scope="{body["scope"]}"')
                refused += 1
    assert refused >= 40


async def test_admin_token_is_accepted_case_insensitive_scheme(env: Env) -> None:
    r = await call(env, "POST", "/api/v1/profiles", json_body={"name": "p", "kernel": "vmlinuz"},
                   headers={"Authorization": f"bearer {env.admin}"}, admin=False)
    assert r.status == 201


# --- machines --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["52:54:00:12:34:56", "52-54-00-12-34-56", "52:54:00:12:34:56",
                                  "5254.0012.3456", "525400123456", "52:54:00:12:34:56 ",
                                  "52-54-00-12-34-56".upper()])
async def test_mac_is_normalised_whatever_the_form(env: Env, form: str) -> None:
    created = await env.post("/api/v1/machines", {"mac": form.upper() if "." not in form
                                                  else form}, status=201)
    assert created["mac"] == MAC
    assert created["mac_hexhyp"] == "52-54-00-12-34-56"
    for path_form in ("52-54-00-12-34-56", "52:54:00:12:34:56", "5254.0012.3456",
                      "525400123456", "52-54-00-12-34-56".upper()):
        assert (await env.get(f"/api/v1/machines/{path_form}"))["mac"] == MAC
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": "5254.0012.3456"})
    error(r, 409)


async def test_machine_crud(env: Env) -> None:
    await env.seed()
    created = await machine(env, hostname="Edge-1", labels={"rack": "r1"}, cluster="edge",
                            role="server", profile="k3os", serial="S1",
                            uuid="4C4C4544-0000-1000-8000-000000000001",
                            fixed_ipv4="192.0.2.101")
    assert created["hostname"] == "edge-1"  # hostnames are lowercased
    assert created["uuid"] == "4c4c4544-0000-1000-8000-000000000001"
    assert created["state"] == "enrolled"
    assert "token_hash" not in created
    got = await env.get(f"/api/v1/machines/{MAC}")
    assert got == created
    patched = await call(env, "PATCH", f"/api/v1/machines/{MAC}",
                         json_body={"labels": {"rack": "r2"}, "role": "agent"})
    assert patched.status == 200, patched.text
    assert patched.json()["labels"] == {"rack": "r2"}
    assert patched.json()["role"] == "agent"
    assert patched.json()["hostname"] == "edge-1"  # untouched fields kept
    assert (await env.get(f"/api/v1/machines/{MAC}"))["role"] == "agent"
    r = await call(env, "DELETE", f"/api/v1/machines/{MAC}")
    assert r.status == 204
    error(await call(env, "GET", f"/api/v1/machines/{MAC}"), 404)
    error(await call(env, "DELETE", f"/api/v1/machines/{MAC}"), 404)
    error(await call(env, "PATCH", f"/api/v1/machines/{MAC}", json_body={"role": "agent"}), 404)


async def test_machine_gets_a_hostname_from_the_template(env: Env) -> None:
    created = await machine(env)
    assert created["hostname"] == "node-123456"
    second = await env.post("/api/v1/machines", {"mac": "aa:bb:cc:12:34:56"}, status=201)
    assert second["hostname"] not in (None, "node-123456")


BAD_MACHINES: list[tuple[Any, str]] = [
    ({"mac": "zz:zz:zz:zz:zz:zz"}, "mac"),
    ({"mac": "52:54:00:12:34"}, "mac"),
    ({"mac": "52:54:00-12:34:56"}, "mac"),
    ({"mac": 525400123456}, "mac"),
    ({"mac": None}, "mac"),
    ({}, "mac"),
    ({"mac": MAC, "hostname": 5}, "hostname"),
    ({"mac": MAC, "hostname": "bad_name!"}, "hostname"),
    ({"mac": MAC, "hostname": "-x"}, "hostname"),
    ({"mac": MAC, "labels": {"a": 1}}, "labels.a"),
    ({"mac": MAC, "labels": ["a"]}, "labels"),
    ({"mac": MAC, "role": "master"}, "role"),
    ({"mac": MAC, "role": 1}, "role"),
    ({"mac": MAC, "state": "exploded"}, "state"),
    ({"mac": MAC, "state": None}, "state"),
    ({"mac": MAC, "cluster": "nope"}, "cluster"),
    ({"mac": MAC, "profile": "nope"}, "profile"),
    ({"mac": MAC, "cluster": 3}, "cluster"),
    ({"mac": MAC, "fixed_ipv4": "300.1.1.1"}, "fixed_ipv4"),
    ({"mac": MAC, "uuid": "not-a-uuid"}, "uuid"),
    ({"mac": MAC, "colour": "red"}, "colour"),
    ({"mac": MAC, "token_hash": "x"}, "token_hash"),  # read-only
    ({"mac": MAC, "ipv4": "192.0.2.1"}, "ipv4"),  # read-only
    ({"mac": MAC, "created": 1}, "created"),  # read-only
    ([{"mac": MAC}], "body"),
    ("52:54:00:12:34:56", "body"),
    (None, "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD_MACHINES)
async def test_create_machine_bad_input_names_the_field(env: Env, body: Any, field: str) -> None:
    await env.seed()
    r = await call(env, "POST", "/api/v1/machines", data=json.dumps(body),
                   headers={"Content-Type": "application/json"})
    error(r, 400, field)
    assert (await env.get("/api/v1/machines"))["total"] == 0


@pytest.mark.parametrize("raw", [b"", b"{", b"{'mac': 1}", b"\xff\xfe", b"[1,]", b"NaN x",
                                 b'{"mac": NaN}', b'{"mac": "52:54:00:12:34:56", "x": Infinity}',
                                 b'{"mac": "\\ud800"}', b"[" * 100_000 + b"]" * 100_000])
async def test_bad_json_is_400_body(env: Env, raw: bytes) -> None:
    for path in ("/api/v1/machines", "/api/v1/profiles", "/api/v1/clusters", "/api/v1/groups",
                 "/api/v1/machines:bulk", "/api/v1/register"):
        r = await call(env, "POST", path, data=raw, headers={"Content-Type": "application/json"})
        # A registration is bounded as a device's report is (16 KiB): larger, 413 unread.
        error(r, 413 if path == "/api/v1/register" and len(raw) > 16_384 else 400, "body")


async def test_machine_conflicts(env: Env) -> None:
    await machine(env, hostname="edge-1")
    error(await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}), 409)
    error(await call(env, "POST", "/api/v1/machines",
                     json_body={"mac": MAC2, "hostname": "EDGE-1"}), 409)
    await env.post("/api/v1/machines", {"mac": MAC2, "hostname": "edge-2"}, status=201)
    error(await call(env, "PATCH", f"/api/v1/machines/{MAC2}",
                     json_body={"hostname": "edge-1"}), 409)
    assert (await env.get(f"/api/v1/machines/{MAC2}"))["hostname"] == "edge-2"


async def test_patch_machine_errors(env: Env) -> None:
    await env.seed()
    await machine(env)
    path = f"/api/v1/machines/{MAC}"
    error(await call(env, "PATCH", path, json_body={"mac": MAC2}), 400, "mac")
    error(await call(env, "PATCH", path, json_body={"mac": "nonsense"}), 400, "mac")
    error(await call(env, "PATCH", path, json_body={"cluster": "nope"}), 400, "cluster")
    error(await call(env, "PATCH", path, json_body={"role": "boss"}), 400, "role")
    error(await call(env, "PATCH", path, json_body={"state": "melted"}), 400, "state")
    error(await call(env, "PATCH", path, json_body={"arch": "x86_64"}), 400, "arch")
    error(await call(env, "PATCH", path, json_body=[1]), 400, "body")
    error(await call(env, "PATCH", "/api/v1/machines/not_a_mac", json_body={}), 400, "mac")
    # A text that may be a hostname is looked up as one (core.machine_ref): nobody has it.
    error(await call(env, "PATCH", "/api/v1/machines/not-a-mac", json_body={}), 404)
    # A state is not a setting: PATCH refuses it and points at the endpoints that change it.
    refused = error(await call(env, "PATCH", path, json_body={"mac": "5254.0012.3456",
                                                              "state": "installed"}), 400, "state")
    assert "approve" in refused["error"] and "reinstall" in refused["error"]
    assert (await env.get(path))["state"] == "enrolled"
    r = await call(env, "PATCH", path, json_body={"mac": "5254.0012.3456", "role": "server"})
    assert r.status == 200, r.text
    assert (r.json()["state"], r.json()["role"]) == ("enrolled", "server")


async def test_an_empty_hostname_is_a_400_naming_it_not_a_stored_name(env: Env) -> None:
    """A hostname "" is no host name (OpenAPI's pattern refuses it): a create or PATCH
    giving it is a 400 naming ``hostname`` and saying how to have none, as an invalid name
    is. It was stored as it was: a machine named "", whose name a second "" was then refused
    for (a 409 'hostname '' is used by ...'), and whose install script and configs a frame
    made for a machine without a name could be filled in for."""
    await env.seed()
    for body in ({"mac": MAC, "hostname": ""}, {"mac": MAC, "hostname": "", "cluster": "edge"}):
        refused = error(await call(env, "POST", "/api/v1/machines", json_body=body), 400,
                        "hostname")
        assert "null" in refused["error"], refused
    await machine(env, hostname="n-1")
    path = f"/api/v1/machines/{MAC}"
    refused = error(await call(env, "PATCH", path, json_body={"hostname": ""}), 400,
                    "hostname")
    assert "null" in refused["error"], refused
    assert (await env.get(path))["hostname"] == "n-1"
    r = await call(env, "PATCH", path, json_body={"hostname": None})  # how to have none
    assert r.status == 200 and r.json()["hostname"] is None, r.text
    # One stored before (by this API, hand SQL, an older backup) is no bar to an edit of
    # another field: it goes, as none.
    store = env.service.store
    stored = await store.machine_by("mac", MAC)
    assert stored is not None
    await store.update_machine(replace(stored, hostname=""))
    r = await call(env, "PATCH", path, json_body={"role": "server"})
    assert r.status == 200 and (r.json()["role"], r.json()["hostname"]) == ("server", None), r.text


async def test_bad_mac_in_path_is_400(env: Env) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/events"), ("GET", "/explain"),
                           ("POST", "/approve"), ("POST", "/reinstall"), ("POST", "/events")):
        r = await call(env, method, f"/api/v1/machines/not_a_mac{suffix}", json_body={})
        assert "nor a hostname" in error(r, 400, "mac")["error"]
        # A hostname nobody has ('not-a-mac' may be one): 404 (core.machine_ref).
        r = await call(env, method, f"/api/v1/machines/not-a-mac{suffix}", json_body={})
        error(r, 404)


async def test_unknown_machine_is_404_everywhere(env: Env) -> None:
    for method, suffix, body in (("GET", "", None), ("DELETE", "", None),
                                 ("GET", "/events", None),
                                 ("POST", "/approve", {}), ("POST", "/reinstall", None),
                                 ("POST", "/events", {"kind": "installing"})):
        r = await call(env, method, f"/api/v1/machines/{MAC}{suffix}", json_body=body)
        error(r, 404)


async def test_list_machines_paginates_and_filters(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "core", "server_url": "managed"}, status=201)
    for i in range(7):
        await env.post("/api/v1/machines", {
            "mac": f"52:54:00:00:00:{i:02x}",
            "cluster": "edge" if i % 2 else "core",
            "labels": {"rack": f"r{i % 3}", "zone": "a"},
        }, status=201)
    for i in range(2):  # two of them installed, through the steps that get a machine there
        m = await env.service.store.machine_by("mac", f"52:54:00:00:00:{i:02x}")
        assert m is not None
        for step in (Trigger.INSTALL_PLAN, Trigger.INSTALLED):
            m = advance(m, step, 1.0)
        await env.service.store.update_machine(m)
    page = await env.get("/api/v1/machines?limit=3")
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (7, 3, 0, 3)
    seen = [m["mac"] for m in page["items"]]
    page2 = await env.get("/api/v1/machines?limit=3&offset=3")
    page3 = await env.get("/api/v1/machines?limit=3&offset=6")
    seen += [m["mac"] for m in page2["items"] + page3["items"]]
    assert sorted(seen) == [f"52:54:00:00:00:{i:02x}" for i in range(7)]
    assert (await env.get("/api/v1/machines?offset=100"))["items"] == []
    installed = await env.get("/api/v1/machines?state=installed")
    assert installed["total"] == 2
    assert {m["state"] for m in installed["items"]} == {"installed"}
    edge = await env.get("/api/v1/machines?cluster=edge")
    assert edge["total"] == 3
    assert {m["cluster"] for m in edge["items"]} == {"edge"}
    r0 = await env.get("/api/v1/machines?label=rack%3Dr0")
    assert r0["total"] == 3
    both = await env.get("/api/v1/machines?label=rack%3Dr0&label=zone%3Da&cluster=core")
    assert {m["mac"] for m in both["items"]} == {"52:54:00:00:00:00", "52:54:00:00:00:06"}
    assert (await env.get("/api/v1/machines?label=rack%3Dnone"))["total"] == 0
    combined = await env.get("/api/v1/machines?state=enrolled&cluster=edge&limit=1")
    assert (combined["total"], len(combined["items"])) == (2, 1)


async def test_a_text_search_reads_only_the_machines_the_view_found(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /machines?q=``: once the view is loaded, the machines the text names are found
    in memory and the store reads only those (with 100,000 machines it read every one,
    ~1 s a search: benchmarks/README.md s37-ops); the answer is the store's as before, and
    a machine committed a moment ago (here by another writer of the store) is found."""
    await env.seed()
    for i in range(6):
        await env.post("/api/v1/machines", {
            "mac": f"52:54:00:00:00:{i:02x}", "hostname": f"rack{i % 2}-n{i}",
            "labels": {"rack": f"r{i % 2}"}}, status=201)
    before = await env.get("/api/v1/machines?q=RACK1&sort=hostname")
    await env.service.boot.load_view()
    asked: list[MachineFilter] = []
    listed = env.service.store.list_machines

    async def spy(flt: MachineFilter | None = None) -> list[Machine]:
        assert flt is not None
        asked.append(flt)
        return await listed(flt)

    monkeypatch.setattr(env.service.store, "list_machines", spy)
    after = await env.get("/api/v1/machines?q=RACK1&sort=hostname")
    assert after == before
    assert [m["hostname"] for m in after["items"]] == ["rack1-n1", "rack1-n3", "rack1-n5"]
    ids = {m["id"] for m in after["items"]}
    assert asked[-1].ids == ids
    late = Machine(macs=(MacAddress.parse("52:54:00:00:01:00"),), hostname="rack1-late")
    await env.service.store.create_machine(late)
    found = await env.get("/api/v1/machines?q=rack1-l&label=rack%3Dr1")
    assert found["total"] == 0  # every filter still holds: the late one has no label
    found = await env.get("/api/v1/machines?q=rack1-l")
    assert [m["id"] for m in found["items"]] == [late.id]
    assert asked[-1].ids == {late.id}
    # Naming more machines than TEXT_IDS_MAX: the store's scan, which finds a page at once.
    monkeypatch.setattr(api_module, "TEXT_IDS_MAX", 2)
    assert await env.get("/api/v1/machines?q=RACK1&sort=hostname") == {
        **after, "items": [found["items"][0], *after["items"]], "total": 4}
    assert asked[-1].ids is None


@pytest.mark.parametrize(("query", "field"), [
    ("state=exploded", "state"), ("label=norack", "label"), ("label==x", "label"),
    ("limit=0", "limit"), ("limit=100000", "limit"), ("limit=ten", "limit"),
    ("offset=-1", "offset"), ("offset=x", "offset"),
])
async def test_list_machines_bad_query(env: Env, query: str, field: str) -> None:
    error(await call(env, "GET", f"/api/v1/machines?{query}"), 400, field)


# --- profiles, clusters, groups --------------------------------------------------------------


async def test_profile_crud(env: Env) -> None:
    body = {"name": "k3os", "kernel": "vmlinuz", "initrds": ["initrd.img"],
            "ssh_authorized_keys": ["ssh-ed25519 AAAA test"]}
    created = await env.post("/api/v1/profiles", body, status=201)
    assert created["kernel"] == "vmlinuz"
    assert await env.get("/api/v1/profiles/k3os") == created
    assert await env.get("/api/v1/profiles") == [created]
    error(await call(env, "POST", "/api/v1/profiles", json_body=body), 409)
    r = await call(env, "PUT", "/api/v1/profiles/k3os", json_body={"kernel": "vmlinuz-2"})
    assert r.status == 200, r.text
    assert (await env.get("/api/v1/profiles/k3os"))["kernel"] == "vmlinuz-2"
    error(await call(env, "PUT", "/api/v1/profiles/k3os",
                     json_body={"name": "other", "kernel": "v"}), 400, "name")
    error(await call(env, "PUT", "/api/v1/profiles/missing", json_body={"kernel": "v"}), 404)
    error(await call(env, "GET", "/api/v1/profiles/missing"), 404)
    assert (await call(env, "DELETE", "/api/v1/profiles/k3os")).status == 204
    error(await call(env, "GET", "/api/v1/profiles/k3os"), 404)
    error(await call(env, "DELETE", "/api/v1/profiles/k3os"), 404)


@pytest.mark.parametrize(("body", "field"), [
    ({"kernel": "vmlinuz"}, "name"),
    ({"name": "p"}, "kernel"),
    ({"name": "", "kernel": "v"}, "name"),
    ({"name": "p", "kernel": 1}, "kernel"),
    ({"name": "p", "kernel": "v", "initrds": "initrd.img"}, "initrds"),
    ({"name": "p", "kernel": "v", "initrds": [1]}, "initrds[0]"),
    ({"name": "p", "kernel": "v", "assets": [{"path": "x", "md5": "y"}]}, "assets[0].md5"),
    ({"name": "p", "kernel": "v", "wat": 1}, "wat"),
    # Was stored, and rendered as k3os (s35-user).
    ({"name": "p", "kernel": "v", "config_template": "cloudinit"}, "config_template"),
])
async def test_profile_bad_input(env: Env, body: dict[str, Any], field: str) -> None:
    error(await call(env, "POST", "/api/v1/profiles", json_body=body), 400, field)


@pytest.mark.parametrize("kind", ["profiles", "clusters", "groups"])
@pytest.mark.parametrize("name", ["a/b", "line\nkernel http://evil/x", " padded", "x\x00",
                                  "n" * 254])
async def test_unaddressable_or_unsafe_names_are_refused(env: Env, kind: str, name: str) -> None:
    body: dict[str, Any] = {"name": name}
    if kind == "profiles":
        body["kernel"] = "vmlinuz"
    error(await call(env, "POST", f"/api/v1/{kind}", json_body=body), 400, "name")
    assert await env.get(f"/api/v1/{kind}") == []


async def test_cluster_token_never_returned(env: Env) -> None:
    secret = "k3s-very-secret-token"
    created = await env.post("/api/v1/clusters", {"name": "ext", "server_url":
                                                  "https://192.0.2.50:6443", "token": secret},
                             status=201)
    assert "token" not in created
    for path in ("/api/v1/clusters", "/api/v1/clusters/ext", "/api/v1/clusters/ext/nodes",
                 "/api/v1/openapi.json"):
        r = await call(env, "GET", path)
        assert r.status == 200
        assert secret not in r.text
    # Replacing without a token keeps the old one; the store still has it.
    r = await call(env, "PUT", "/api/v1/clusters/ext",
                   json_body={"server_url": "https://192.0.2.51:6443", "labels": {"a": "b"}})
    assert r.status == 200, r.text
    assert secret not in r.text
    stored = await env.service.store.get_cluster("ext")
    assert stored is not None
    assert stored.token == secret
    assert stored.server_url == "https://192.0.2.51:6443"


@pytest.mark.parametrize("url", ["https://\u00c7]>\x05", "https://", "https://[fd00::1",
                                 "https://[:]:6443", "https://k3s.example:65536",
                                 "https://k3s.example:6443\n", "https://k3s example",
                                 "https://k3s.example/a b"])
async def test_an_external_clusters_server_url_is_a_url_k3s_can_join(env: Env,
                                                                     url: str) -> None:
    """An external cluster's server_url goes into every agent's config as k3s's --server:
    "https://" and anything after it was taken (control characters, no host, a bracket
    left open), and each agent's k3s failed to parse it; a URL parser in an API client
    raised reading it back (schemathesis's own). The forms k3s takes still are."""
    body = {"name": "ext", "server_url": url, "token": "k3s-external-token-9f3c"}
    error(await call(env, "POST", "/api/v1/clusters", json_body=body), 400, "server_url")
    for good in ("https://k3s.example:6443", "https://192.0.2.50", "https://[fd00::1]:6443/x"):
        await env.post("/api/v1/clusters", {**body, "server_url": good}, status=201)
        await call(env, "DELETE", "/api/v1/clusters/ext")


async def test_managed_cluster_gets_a_generated_token(env: Env) -> None:
    created = await env.post("/api/v1/clusters", {"name": "m"}, status=201)
    assert created["server_url"] == "managed"
    assert "token" not in created
    other = await env.post("/api/v1/clusters", {"name": "n", "server_url": "managed"}, status=201)
    assert "token" not in other
    m = await env.service.store.get_cluster("m")
    n = await env.service.store.get_cluster("n")
    assert m is not None and n is not None
    assert len(m.token) >= 32
    assert m.token != n.token
    listing = await call(env, "GET", "/api/v1/clusters")
    assert m.token not in listing.text and n.token not in listing.text
    # A PUT without a token keeps the generated one.
    await call(env, "PUT", "/api/v1/clusters/m", json_body={"labels": {"x": "y"}})
    again = await env.service.store.get_cluster("m")
    assert again is not None and again.token == m.token


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "c", "server_url": "http://insecure:6443", "token": "t"}, "server_url"),
    ({"name": "c", "server_url": "192.0.2.50", "token": "t"}, "server_url"),
    ({"name": "c", "server_url": "https://192.0.2.50:6443"}, "token"),
    ({"name": "c", "server_url": 6443}, "server_url"),
    ({"name": "c", "labels": {"a": 1}}, "labels.a"),
    ({"name": "c", "taints": "x"}, "taints"),
    ({"server_url": "managed"}, "name"),
    ({"name": "c", "secret": "x"}, "secret"),
    ({"name": "c", "endpoint": "127.0.1.1"}, "endpoint"),
    ({"name": "c", "endpoint": "http://vip.example"}, "endpoint"),
    ({"name": "c", "endpoint": "vip.example/k8s"}, "endpoint"),
    ({"name": "c", "endpoint": "vip.example:0"}, "endpoint"),
    ({"name": "c", "endpoint": "under_score.example"}, "endpoint"),
    ({"name": "c", "endpoint": 6443}, "endpoint"),
    ({"name": "c", "server_url": "https://192.0.2.50:6443", "token": "t",
      "endpoint": "vip.example"}, "endpoint"),
])
async def test_cluster_bad_input(env: Env, body: dict[str, Any], field: str) -> None:
    error(await call(env, "POST", "/api/v1/clusters", json_body=body), 400, field)


async def test_cluster_endpoint_is_stored_canonical_and_returned(env: Env) -> None:
    created = await env.post("/api/v1/clusters", {"name": "m", "endpoint": "VIP.Example"},
                             status=201)
    assert created["endpoint"] == "vip.example"
    r = await call(env, "PUT", "/api/v1/clusters/m",
                   json_body={"endpoint": "2001:db8::10"})
    assert r.status == 200 and r.json()["endpoint"] == "[2001:db8::10]"
    assert (await env.get("/api/v1/clusters/m"))["endpoint"] == "[2001:db8::10]"
    stored = await env.service.store.get_cluster("m")
    assert stored is not None and stored.endpoint == "[2001:db8::10]" and stored.token


async def _register_from(env: Env, peer: str, body: dict[str, Any]) -> bytes:
    """POST /api/v1/register on its own connection from ``peer`` (a loopback address): the
    transport's peer is the registration's source. The raw reply."""
    import asyncio

    raw_body = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(env.client.host, env.client.port,
                                                   local_addr=(peer, 0))
    try:
        writer.write(b"POST /api/v1/register HTTP/1.1\r\nHost: 192.0.2.10\r\n"
                     b"Content-Type: application/json\r\nConnection: close\r\n"
                     + f"Content-Length: {len(raw_body)}\r\n\r\n".encode() + raw_body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return raw


async def test_register_records_the_peer_not_a_claimed_loopback(env: Env) -> None:
    """The transport's peer reaches the registration decision: the request is sent from
    127.0.0.2, so the refused peer in the event is that address, not the test client's."""
    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    raw = await _register_from(env, "127.0.0.2", {"mac": MAC, "token": token,
                                                  "addresses": ["127.0.0.1", "198.51.100.7"]})
    assert raw.startswith(b"HTTP/1.1 200"), raw
    registered = await env.get(f"/api/v1/machines/{MAC}")
    assert registered["ipv4"] == "198.51.100.7"  # a loopback peer: the routable claim
    event = (await env.get(f"/api/v1/machines/{MAC}/events"))[-1]
    assert event["kind"] == "registered" and event["data"]["peer"] == "127.0.0.2"
    assert {(r["address"], r["source"], r["reason"]) for r in event["data"]["refused"]} == {
        ("127.0.0.2", "peer", "loopback"), ("127.0.0.1", "reported", "loopback")}
    assert "ignored reported address '127.0.0.1' (loopback)" in event["message"]


async def test_a_flood_of_random_claims_cannot_hide_the_devices(env: Env) -> None:
    """A host with a machine's spent install token registers it first; then a flood of
    1,000 refused registrations with random secrets, from 100 addresses (s40-review), uses
    every rate-limited "registration contested" event up; the real device's register
    command tries after them, twice (it retries every 10 s with its one secret), then 300
    more random ones come. Before (s40-sec), its claim was recorded nowhere: the operator's
    claim was a 404 and the machine could never be given to it. Now each refused claim is
    kept by its address, a flood's one-off claims dropped first: the 404 of a wrong claim
    and GET .../claims name the device's address and its claim, the most tried; given to
    it, its next try is answered and the machine moves to it.
    Real sockets, the real SQLite store."""
    import hashlib
    import secrets

    from netboot.enroll import CONTEST_BURST

    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    thief = {"mac": MAC, "token": token, "install_secret": "thief-" + secrets.token_hex(8),
             "addresses": ["198.51.100.66"], "keeps": "machine_token"}

    async def status(peer: str, body: dict[str, Any]) -> int:
        return int((await _register_from(env, peer, body)).split(b" ", 2)[1])

    assert await status("127.0.0.66", thief) == 200
    flood = [f"127.0.1.{i % 100 + 1}" for i in range(1300)]
    for peer in flood[:1000]:
        assert await status(peer, {**thief, "install_secret": secrets.token_hex(16)}) == 409
    device_secret = "3f0a9c2e-5b7d-4e1f-a6c8-" + secrets.token_hex(6)
    claim = hashlib.sha256(device_secret.encode()).hexdigest()
    device = {**thief, "install_secret": device_secret, "addresses": ["198.51.100.7"]}
    for _ in range(2):
        assert await status("127.0.0.7", device) == 409
    for peer in flood[1000:]:
        assert await status(peer, {**thief, "install_secret": secrets.token_hex(16)}) == 409
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    told = [e for e in events if e["kind"] == "registration contested"]
    assert len(told) == CONTEST_BURST  # the store bounded: the device's is not among them
    assert all(e["data"]["claim"] != claim for e in told)
    wrong = error(await call(env, "POST", f"/api/v1/machines/{MAC}/claim",
                             json_body={"claim": "0" * 64}), 404)
    assert f"127.0.0.7 sent {claim} 2 times" in json.dumps(wrong)
    kept = await env.get(f"/api/v1/machines/{MAC}/claims")
    assert len(kept) <= 32 and kept[0]["peer"] == "127.0.0.7"  # the most tried first
    assert (kept[0]["claim"], kept[0]["tries"]) == (claim, 2)
    assert all(k["tries"] == 1 for k in kept[1:])
    given = await env.post(f"/api/v1/machines/{MAC}/claim", {"claim": claim})
    assert given["state"] == "registered"
    last = (await env.get(f"/api/v1/machines/{MAC}/events"))[-1]
    assert last["kind"] == "registration claimed" and "127.0.0.7" in last["message"]
    assert await status("127.0.0.7", device) == 200
    assert (await env.get(f"/api/v1/machines/{MAC}"))["ipv4"] == "198.51.100.7"
    assert await status("127.0.0.66", thief) == 409


async def test_a_reinstalled_machines_old_contest_is_history_not_a_claim(env: Env) -> None:
    """A refused registration's claim is kept (and its event written) against the
    registration that held the machine then. After a reinstall and the new install's
    registration, GET .../claims still listed it as current and POST .../claim gave the
    new registration's machine to it (s41-ops): now it is history, a 404 that says where
    claims are kept; a refusal of the new registration is kept and given.
    Kept-Since: when the server began keeping them. Real sockets, the real SQLite store."""
    import hashlib

    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    first = {"mac": MAC, "token": token, "install_secret": "first-install",
             "addresses": ["198.51.100.6"], "keeps": "machine_token"}

    async def status(peer: str, body: dict[str, Any]) -> int:
        return int((await _register_from(env, peer, body)).split(b" ", 2)[1])

    async def kept() -> list[str]:
        resp = await env.client.get(f"/api/v1/machines/{MAC}/claims", headers=env.auth)
        assert resp.status == 200
        assert 0 < float(resp.headers["Kept-Since"]) <= time.time()
        return [k["claim"] for k in await resp.json()]

    assert await status("127.0.0.6", first) == 200
    old = hashlib.sha256(b"another-host").hexdigest()
    assert await status("127.0.0.7", {**first, "install_secret": "another-host"}) == 409
    assert await kept() == [old]
    await env.post(f"/api/v1/machines/{MAC}/reinstall", None)
    assert await kept() == []
    token = install_token(await boot(env, MAC))
    second = {**first, "token": token, "install_secret": "second-install"}
    assert await status("127.0.0.6", second) == 200
    assert await kept() == []  # the old contest is not this registration's
    refused = error(await call(env, "POST", f"/api/v1/machines/{MAC}/claim",
                               json_body={"claim": old}), 404)
    assert "since its registration" in refused["error"], refused
    # Kept by the servers of the inventory, not this one since its start (s42-ops).
    assert "the claims the servers kept" in refused["error"], refused
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "registered"
    new = hashlib.sha256(b"a-third-host").hexdigest()
    assert await status("127.0.0.8", {**second, "install_secret": "a-third-host"}) == 409
    assert await kept() == [new]
    given = await env.post(f"/api/v1/machines/{MAC}/claim", {"claim": new})
    assert given["state"] == "registered"
    assert await kept() == []


async def test_machines_unchanged_for_a_while_are_the_stuck_ones(env: Env) -> None:
    """GET /machines?state=booting&unchanged_for=600: which machines fetched their script
    ten minutes ago or more and are still booting (s36-ops): by the time in their state
    (state_since), which a learnt fact or an edit since (``updated``) does not reset: the
    third learnt one five minutes ago and is as stuck (s39-journey; before, it was left
    out). Each machine's state_since is in the API's answer; sorted by it, oldest first."""
    await env.seed()
    for n in (1, 2, 3):
        await env.post("/api/v1/machines", {"mac": f"52:54:00:ab:00:0{n}"}, status=201)
        await boot(env, f"52:54:00:ab:00:0{n}")
    store = env.service.store
    now = time.time()
    for n, age, touched in ((1, 3600.0, 3600.0), (3, 900.0, 300.0)):
        m = await store.machine_by("mac", f"52:54:00:ab:00:0{n}")
        assert m is not None and m.state.value == "booting"
        assert m.state_since is m.updated  # set by its step to booting, one float
        await store.update_machine(replace(m, state_since=now - age, updated=now - touched))
    listed = await env.get("/api/v1/machines?state=booting&unchanged_for=600&last_event=1")
    assert [m["macs"] for m in listed["items"]] == [["52:54:00:ab:00:01"], ["52:54:00:ab:00:03"]]
    assert listed["total"] == 2
    assert [round(now - m["state_since"]) for m in listed["items"]] == [3600, 900]
    ordered = await env.get("/api/v1/machines?sort=state_since&order=desc")
    assert [m["macs"][0] for m in ordered["items"]][-2:] == [
        "52:54:00:ab:00:03", "52:54:00:ab:00:01"]
    assert listed["items"][0]["last_event"]["kind"] == "install-plan"  # where it stopped
    listed = await env.get("/api/v1/machines?unchanged_for=1800")
    assert [m["macs"] for m in listed["items"]] == [["52:54:00:ab:00:01"]]
    assert (await env.get("/api/v1/machines?state=booting"))["total"] == 3
    error(await call(env, "GET", "/api/v1/machines?unchanged_for=-1"), 400)


async def test_a_rows_state_and_its_last_event_are_read_as_of_one_moment(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's list (GET /machines?last_event=1) while a device registers: the
    registration is committed (a real POST /api/v1/register on its own connection) just after
    the page of machines is read and before its events are. The row said **installed** beside
    "registered: registered at ..." (s45-review saw **booting** beside **registered**
    mid-storm); now both are the registration's."""
    await env.seed()
    await machine(env, hostname="edge-1")
    token = install_token(await boot(env, MAC))
    for kind in ("installing", "installed"):
        await env.post(f"/api/v1/machines/{MAC}/events", {"kind": kind}, status=201,
                       headers={"Authorization": f"Bearer {token}"})
    store = env.service.store
    page_read = store.list_machines
    raced: list[bytes] = []

    async def a_registration_right_after(flt: MachineFilter | None = None) -> list[Machine]:
        page = await page_read(flt)
        if not raced:
            raced.append(await _register_from(env, "127.0.0.1", {"mac": MAC, "token": token}))
        return page

    monkeypatch.setattr(store, "list_machines", a_registration_right_after)
    row = (await env.get("/api/v1/machines?last_event=1"))["items"][0]
    assert raced[0].startswith(b"HTTP/1.1 200"), raced
    assert (row["state"], row["last_event"]["kind"]) == ("registered", "registered"), row
    # and with no registration between: as before
    monkeypatch.setattr(store, "list_machines", page_read)
    row = (await env.get("/api/v1/machines?last_event=1"))["items"][0]
    assert (row["state"], row["last_event"]["kind"]) == ("registered", "registered"), row


async def test_cluster_nodes_are_paged_when_asked(env: Env) -> None:
    """The dashboard asks for a page of a cluster's nodes (s36-ops); all by default."""
    await env.seed()
    rows = [{"mac": f"52:54:00:ee:00:{i:02x}", "cluster": "edge"} for i in range(5)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    every = [n["mac"] for n in await env.get("/api/v1/clusters/edge/nodes")]
    assert every == [r["mac"] for r in rows]
    assert [n["mac"] for n in await env.get("/api/v1/clusters/edge/nodes?limit=2")] == every[:2]
    assert [n["mac"] for n in await env.get(
        "/api/v1/clusters/edge/nodes?limit=2&offset=4")] == every[4:]
    error(await call(env, "GET", "/api/v1/clusters/edge/nodes?limit=0"), 400)


async def test_cluster_crud_and_nodes(env: Env) -> None:
    await env.seed()
    error(await call(env, "POST", "/api/v1/clusters", json_body={"name": "edge"}), 409)
    await machine(env, cluster="edge")
    nodes = await env.get("/api/v1/clusters/edge/nodes")
    assert [n["mac"] for n in nodes] == [MAC]
    error(await call(env, "GET", "/api/v1/clusters/nope/nodes"), 404)
    error(await call(env, "GET", "/api/v1/clusters/nope"), 404)
    error(await call(env, "PUT", "/api/v1/clusters/nope", json_body={}), 404)
    # In use by a group: refused, not silently orphaning the group.
    error(await call(env, "DELETE", "/api/v1/clusters/edge"), 409)
    error(await call(env, "DELETE", "/api/v1/profiles/k3os"), 409)
    assert (await call(env, "DELETE", "/api/v1/groups/all-x86")).status == 204
    assert (await call(env, "DELETE", "/api/v1/profiles/k3os")).status == 204
    error(await call(env, "DELETE", "/api/v1/clusters/nope"), 404)


async def test_a_group_giving_an_install_under_way_its_profile_is_not_deleted(
        env: Env) -> None:
    """Deleting the group that gave a machine its profile while its install is under way
    (its script served, its config not yet fetched) broke the install midway: the plan binds
    the cluster and role, not the profile, so its config was a 409 "no profile"
    (s41-attack's leftover). Now a 409 naming the machine and the way out; with the profile
    given to the machine itself the group goes and the config is still served."""
    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    refused = error(await call(env, "DELETE", "/api/v1/groups/all-x86"), 409, "name")
    assert MAC in refused["error"] and "--profile k3os" in refused["error"], refused
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "booting"
    r = await call(env, "PATCH", f"/api/v1/machines/{MAC}", json_body={"profile": "k3os"})
    assert r.status == 200, r.text
    assert (await call(env, "DELETE", "/api/v1/groups/all-x86")).status == 204
    r = await call(env, "GET", f"/config/{MAC}?token={token}", admin=False)
    assert r.status == 200, r.text


async def test_cluster_used_by_a_machine_cannot_be_deleted(env: Env) -> None:
    await env.post("/api/v1/clusters", {"name": "edge"}, status=201)
    await machine(env, cluster="edge")
    r = await call(env, "DELETE", "/api/v1/clusters/edge")
    error(r, 409)
    assert (await env.get(f"/api/v1/machines/{MAC}"))["cluster"] == "edge"
    assert (await env.get("/api/v1/clusters/edge"))["name"] == "edge"


async def test_profile_used_by_a_machine_cannot_be_deleted(env: Env) -> None:
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    await machine(env, profile="k3os")
    error(await call(env, "DELETE", "/api/v1/profiles/k3os"), 409)


async def test_group_crud_and_errors(env: Env) -> None:
    await env.seed()
    group = await env.get("/api/v1/groups/all-x86")
    assert group["selector"] == {"arch": ["x86_64"]}
    assert [g["name"] for g in await env.get("/api/v1/groups")] == ["all-x86"]
    # Equally specific and overlapping: a conflict at load time, not a coin toss at boot.
    error(await call(env, "POST", "/api/v1/groups", json_body={
        "name": "amd64", "selector": {"arch": ["x86_64", "arm64"]}, "profile": "k3os"}), 409)
    # Disjoint, or more specific: fine.
    await env.post("/api/v1/groups", {"name": "arm", "selector": {"arch": ["arm64"]}},
                   status=201)
    await env.post("/api/v1/groups", {"name": "rack1", "selector": {"arch": ["x86_64"],
                                                                    "rack": ["r1"]}},
                   status=201)
    error(await call(env, "POST", "/api/v1/groups", json_body={"name": "arm"}), 409)
    # Changing a group into a tie with another one is refused too.
    error(await call(env, "PUT", "/api/v1/groups/arm",
                     json_body={"selector": {"arch": ["x86_64"]}}), 409)
    assert (await env.get("/api/v1/groups/arm"))["selector"] == {"arch": ["arm64"]}
    for body, field in (
        ({"name": "g", "profile": "nope"}, "profile"),
        ({"name": "g", "cluster": "nope"}, "cluster"),
        ({"name": "g", "role": "boss"}, "role"),
        ({"name": "g", "selector": {"arch": "x86_64"}}, "selector.arch"),
        ({"name": "g", "selector": ["arch"]}, "selector"),
        ({"name": "g", "priority": 1}, "priority"),
        ({"selector": {}}, "name"),
    ):
        error(await call(env, "POST", "/api/v1/groups", json_body=body), 400, field)
    error(await call(env, "GET", "/api/v1/groups/nope"), 404)
    assert (await call(env, "DELETE", "/api/v1/groups/rack1")).status == 204
    error(await call(env, "DELETE", "/api/v1/groups/rack1"), 404)


# --- approve, reinstall, explain, events, register -------------------------------------------


async def test_approve_errors(env: Env) -> None:
    await env.seed()
    await boot(env, MAC)  # discovered (policy ignore still records it)
    path = f"/api/v1/machines/{MAC}/approve"
    error(await call(env, "POST", path, json_body={"role": "boss"}), 400, "role")
    error(await call(env, "POST", path, json_body={"cluster": "nope"}), 400, "cluster")
    error(await call(env, "POST", path, json_body={"profile": "nope"}), 400, "profile")
    error(await call(env, "POST", path, json_body={"colour": "red"}), 400, "colour")
    error(await call(env, "POST", path, json_body={"hostname": "bad name"}), 400, "hostname")
    error(await call(env, "POST", path, json_body={"cluster": 1}), 400, "cluster")
    error(await call(env, "POST", path, json_body={"hostname": 7}), 400, "hostname")
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "discovered"
    r = await call(env, "POST", path, json_body={"cluster": "edge", "role": "server",
                                                 "hostname": "edge-1"})
    assert r.status == 200, r.text
    assert (r.json()["state"], r.json()["role"], r.json()["hostname"]) == ("enrolled", "server",
                                                                           "edge-1")
    await env.post("/api/v1/machines", {"mac": MAC2}, status=201)
    error(await call(env, "POST", f"/api/v1/machines/{MAC2}/approve",
                     json_body={"hostname": "edge-1", "profile": "k3os"}), 409)
    token = install_token(await boot(env, MAC))
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/events",
                   json_body={"kind": "installed"}, headers={"Authorization": f"Bearer {token}"},
                   admin=False)
    assert r.status == 201, r.text
    refused = error(await call(env, "POST", path, json_body={}), 409)
    assert refused["state"] == "installed" and "is installed" in refused["error"]


async def test_approve_without_body(env: Env) -> None:
    await env.seed()  # its group gives it a profile: nothing else to name
    await boot(env, MAC)
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve")
    assert r.status == 200, r.text
    assert r.json()["state"] == "enrolled"


async def test_a_repeated_approval_changes_nothing(env: Env) -> None:
    """Approving an enrolled machine again with nothing new is a repeated PUT: the same
    answer, and no second ``enrolled`` event (its history said "approved" twice, its
    ``updated`` moved). A new cluster, role or profile is still taken, and told."""
    await env.seed()
    await boot(env, MAC)
    first = await call(env, "POST", f"/api/v1/machines/{MAC}/approve")
    again = await call(env, "POST", f"/api/v1/machines/{MAC}/approve")
    assert (first.status, again.status) == (200, 200), again.text
    assert again.json() == first.json()
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    assert [e["kind"] for e in events].count("enrolled") == 1, events
    await env.post("/api/v1/profiles", {"name": "other", "kernel": "vmlinuz"}, status=201)
    moved = await call(env, "POST", f"/api/v1/machines/{MAC}/approve",
                       json_body={"profile": "other"})
    assert moved.status == 200 and moved.json()["profile"] == "other", moved.text
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    assert [e["kind"] for e in events].count("enrolled") == 2, events


async def test_an_enroll_tokens_approval_answers_what_it_decided_not_the_machine(
        env: Env) -> None:
    """A token that may enroll but not read (a scanner) repeating an approval of a machine an
    operator enrolled (allowed: a repeat that changes nothing) is told the machine's id and
    what its approval decided, not its serial, labels, facts or fixed address, which its
    scope may not read (s41-attack's leftover); its create over a discovered record, not
    that record's learnt facts. A reader is answered the whole machine."""
    await env.seed()
    await machine(env, hostname="n1", cluster="edge", role="agent", profile="k3os",
                  serial="SN-HIDDEN-1", labels={"rack": "r9"}, fixed_ipv4="192.0.2.77")
    scanner = {"Authorization": f"Bearer {await scoped_token(env, 'enroll')}"}
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={},
                   headers=scanner, admin=False)
    assert r.status == 200, r.text
    told = r.json()
    assert told["state"] == "enrolled" and told["macs"] == [MAC] and told["hostname"] == "n1"
    assert not {"serial", "labels", "facts", "fixed_ipv4", "uuid", "ipv4"} & set(told), told
    assert "SN-HIDDEN-1" not in r.text and "192.0.2.77" not in r.text and "r9" not in r.text
    # A discovered machine's first approval by the scanner: the same shape.
    await boot(env, MAC2)
    first = await call(env, "POST", f"/api/v1/machines/{MAC2}/approve", json_body={},
                       headers=scanner, admin=False)
    assert first.status == 200 and set(first.json()) == set(told), first.text
    whole = await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={})
    assert whole.json()["serial"] == "SN-HIDDEN-1" and whole.json()["fixed_ipv4"] == "192.0.2.77"
    # A create over a discovered record (its learnt facts): the same shape.
    await env.client.get("/ipxe", params={"mac": "52:54:00:00:00:77", "arch": "x86_64",
                                          "manufacturer": "HiddenCorp"})
    made = await call(env, "POST", "/api/v1/machines", json_body={"mac": "52:54:00:00:00:77"},
                      headers=scanner, admin=False)
    assert made.status == 201 and set(made.json()) == set(told), made.text
    assert "HiddenCorp" not in made.text


async def test_reinstall_errors(env: Env) -> None:
    await boot(env, MAC)
    error(await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall"), 409)
    error(await call(env, "POST", f"/api/v1/machines/{MAC2}/reinstall"), 404)


async def test_explain(env: Env) -> None:
    await env.seed()
    unknown = await env.get(f"/api/v1/machines/{MAC}/explain")
    assert unknown["known"] is False
    await machine(env)
    await boot(env, MAC)
    known = await env.get(f"/api/v1/machines/{MAC}/explain")
    assert (known["group"], known["profile"], known["cluster"], known["decision"]) == (
        "all-x86", "k3os", "edge", "install")
    assert known["profile_source"] == "group"
    # Explaining does not change anything.
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    await env.get(f"/api/v1/machines/{MAC}/explain")
    assert await env.get(f"/api/v1/machines/{MAC}/events") == events


async def test_events_list_and_post_errors(env: Env) -> None:
    await machine(env)
    path = f"/api/v1/machines/{MAC}/events"
    for body, field in (({"message": "x"}, "kind"), ({"kind": "Has Spaces"}, "kind"),
                        ({"kind": "k" * 65}, "kind"), ({"kind": 1}, "kind"),
                        ({"kind": "progress", "message": 5}, "message"),
                        ({"kind": "progress", "message": "m" * 3000}, "message"),
                        ({"kind": "progress", "data": []}, "data"),
                        ({"kind": "progress", "extra": 1}, "extra"), ([], "body")):
        error(await call(env, "POST", path, json_body=body), 400, field)
    error(await call(env, "POST", path, data=b"{nope",
                     headers={"Content-Type": "application/json"}), 400, "body")
    r = await call(env, "POST", path, json_body={"kind": "progress", "message": "m",
                                                 "data": {"pct": 50}})
    assert r.status == 201, r.text
    events = await env.get(path)
    assert [e["kind"] for e in events] == ["enrolled", "progress"]
    assert events[1]["data"] == {"pct": 50}
    assert len(await env.get(f"{path}?limit=1")) == 1
    error(await call(env, "GET", f"{path}?limit=0"), 400, "limit")


async def test_register_errors_leak_nothing(env: Env) -> None:
    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    for body, field in (({"token": token}, "mac"), ({"mac": MAC}, "token"),
                        ({"mac": "nope", "token": token}, "mac"),
                        ({"mac": MAC, "token": token, "addresses": "192.0.2.1"}, "addresses"),
                        ({"mac": MAC, "token": token, "addresses": [1]}, "addresses"),
                        ({"mac": MAC, "token": token, "hostname": 1}, "hostname"),
                        ({"mac": MAC, "token": token, "machine_id": 1}, "machine_id")):
        error(await call(env, "POST", "/api/v1/register", json_body=body, admin=False), 400,
              field)
    wrong = await call(env, "POST", "/api/v1/register",
                       json_body={"mac": MAC, "token": "wrong"}, admin=False)
    unknown = await call(env, "POST", "/api/v1/register",
                         json_body={"mac": MAC2, "token": token}, admin=False)
    error(wrong, 401)
    error(unknown, 401)
    assert wrong.body == unknown.body
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "booting"


# --- bodies too large -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/machines", "/api/v1/profiles", "/api/v1/clusters",
                                  "/api/v1/groups", "/api/v1/machines:bulk", "/api/v1/register"])
async def test_oversized_body_is_413(env: Env, path: str) -> None:
    big = json.dumps({"mac": MAC, "hostname": "x" * (1_048_576 + 10)})
    r = await call(env, "POST", path, data=big, headers={"Content-Type": "application/json"})
    error(r, 413, "body")


async def test_oversized_chunked_body_is_413(env: Env) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"mac": "52:54:00:12:34:56", "hostname": "'
        for _ in range(1100):
            yield b"x" * 1024
        yield b'"}'

    resp = await env.client.post("/api/v1/machines", data=chunks(),
                                 headers={**env.auth, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await env.get("/api/v1/machines"))["total"] == 0


# --- bulk ------------------------------------------------------------------------------------


async def test_bulk_all_or_nothing_with_per_row_errors(env: Env) -> None:
    await env.seed()
    rows = [
        {"mac": "52:54:00:00:00:01", "hostname": "a1", "cluster": "edge", "role": "agent"},
        {"mac": "bad-mac"},
        {"mac": "52:54:00:00:00:03", "cluster": "nope"},
        {"mac": "52-54-00-00-00-01"},  # duplicate of row 1
        {"mac": "52:54:00:00:00:05", "hostname": "a1"},  # duplicate hostname
        {"mac": "52:54:00:00:00:06", "role": "boss"},
        {"mac": "52:54:00:00:00:07", "colour": "red"},
        {"mac": "52:54:00:00:00:08"},
    ]
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows})
    assert r.status == 400, r.text
    report = r.json()
    assert report["applied"] is False
    assert [(e["line"], e["field"]) for e in report["errors"]] == [
        (2, "mac"), (3, "cluster"), (4, "mac"), (5, "hostname"), (6, "role"), (7, "colour")]
    assert (await env.get("/api/v1/machines"))["total"] == 0


async def test_bulk_dry_run_apply_and_idempotent_reimport(env: Env) -> None:
    await env.seed()
    rows: list[dict[str, Any]] = [{"mac": f"52:54:00:00:00:{i:02x}", "cluster": "edge",
                                   "labels": {"rack": "r1"}} for i in range(1, 4)]
    rows[0]["hostname"] = "first"
    dry = await call(env, "POST", "/api/v1/machines:bulk",
                     json_body={"machines": rows, "dry_run": True})
    assert dry.status == 200, dry.text
    assert dry.json()["applied"] is False
    assert len(dry.json()["created"]) == 3
    assert (await env.get("/api/v1/machines"))["total"] == 0
    applied = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows})
    assert applied.status == 201, applied.text
    assert applied.json()["applied"] is True
    assert sorted(applied.json()["created"]) == sorted(r["mac"] for r in rows)
    listing = await env.get("/api/v1/machines")
    assert listing["total"] == 3
    names = {m["hostname"] for m in listing["items"]}
    assert "first" in names and None not in names and len(names) == 3
    again = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows})
    assert again.status == 201, again.text
    assert again.json()["created"] == [] and again.json()["changed"] == []
    assert sorted(again.json()["unchanged"]) == sorted(r["mac"] for r in rows)
    assert await env.get("/api/v1/machines") == listing
    events = await env.get("/api/v1/machines/52:54:00:00:00:01/events")
    assert [e["kind"] for e in events] == ["enrolled"]


async def test_bulk_rows_with_wrong_types_are_row_errors(env: Env) -> None:
    await env.seed()
    rows = [{"mac": "52:54:00:00:00:01", "cluster": ["edge"]},
            {"mac": "52:54:00:00:00:02", "serial": {"a": 1}},
            {"mac": "52:54:00:00:00:03", "hostname": True},
            {"mac": "52:54:00:00:00:04", "labels": {"rack": None}},
            {"mac": ["52:54:00:00:00:05"]},
            {"mac": "52:54:00:00:00:06", "labels": "rack=r1"},
            {"mac": "52:54:00:00:00:07", "fixed_ipv4": "999.1.1.1"},
            {"mac": "52:54:00:00:00:08", "uuid": "nope"}]
    r = await call(env, "POST", "/api/v1/machines:bulk",
                   json_body={"machines": rows})
    assert r.status == 400, r.text
    assert [(e["line"], e["field"]) for e in r.json()["errors"]] == [
        (1, "cluster"), (2, "serial"), (3, "hostname"), (4, "labels.rack"), (5, "mac"),
        (6, "labels"), (7, "fixed_ipv4"), (8, "uuid")]
    assert (await env.get("/api/v1/machines"))["total"] == 0


async def test_bulk_bad_envelope(env: Env) -> None:
    for body, field in (({}, "machines"), ({"machines": {}}, "machines"),
                        ({"machines": [1]}, "machines[0]"),
                        ({"machines": [], "dry_run": "yes"}, "dry_run"),
                        ({"machines": [], "extra": 1}, "extra"),
                        ([], "body")):
        error(await call(env, "POST", "/api/v1/machines:bulk", json_body=body), 400, field)


# --- secrets never appear in responses -------------------------------------------------------


async def test_no_api_response_contains_a_cluster_token(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "m", "server_url": "managed"}, status=201)
    await machine(env, cluster="m", role="server")
    token = install_token(await boot(env, MAC))
    await env.get(f"/config/{MAC}?token={token}")
    await env.post("/api/v1/register", {"mac": MAC, "token": token,
                                        "addresses": ["192.0.2.101"]}, status=200)
    managed = await env.service.store.get_cluster("m")
    assert managed is not None
    secrets = ["k3s-secret-token", managed.token, token]
    doc = document()
    for path, method in sorted(documented(doc)):
        if method != "get" or path == "/api/v1/events/stream":
            continue  # the stream never ends; tests/web/test_auth.py reads it
        names = {"groups": ["all-x86"], "profiles": ["k3os"]}.get(path.split("/")[3],
                                                                   ["edge", "m"])
        for name in names:
            r = await call(env, "GET", path.replace("{ref}", MAC).replace("{name}", name)
                           .replace("{kind}", "config"))
            assert r.status == 200, (path, r.status)
            for secret in secrets:
                assert secret not in r.text, (path, secret)
            if method == "get" and "token_hash" in r.text:
                pytest.fail(f"{path} lists token_hash")


# --- never a 500 for bad input ----------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["mac", "hostname", "uuid", "serial", "asset", "labels", "cluster",
                        "role", "profile", "fixed_ipv4", "state", "name", "kernel", "initrds",
                        "selector", "server_url", "token", "taints", "machines", "dry_run",
                        "kind", "message", "data", "addresses", "cmdline", "assets"])
VALUES = st.one_of(JSON, st.sampled_from([MAC, "edge", "k3os", "server", "agent", "managed",
                                          "https://x:6443", "installed", "{{ x }}"]))
BODIES = st.one_of(JSON, st.dictionaries(KEYS, VALUES, max_size=6))
ENDPOINTS = [("POST", "/api/v1/machines"), ("PATCH", f"/api/v1/machines/{MAC}"),
             ("POST", "/api/v1/profiles"), ("PUT", "/api/v1/profiles/k3os"),
             ("POST", "/api/v1/clusters"), ("PUT", "/api/v1/clusters/edge"),
             ("POST", "/api/v1/groups"), ("PUT", "/api/v1/groups/all-x86"),
             ("POST", "/api/v1/machines:bulk"), ("POST", f"/api/v1/machines/{MAC}/approve"),
             ("POST", f"/api/v1/machines/{MAC}/events"), ("POST", "/api/v1/register")]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(endpoint=st.sampled_from(ENDPOINTS), body=BODIES)
async def test_fuzzed_bodies_never_500(env: Env, endpoint: tuple[str, str], body: Any) -> None:
    if not await env.service.store.list_clusters():
        await env.seed()
        await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    method, path = endpoint
    r = await call(env, method, path, json_body=None, data=json.dumps(body),
                   headers={"Content-Type": "application/json"})
    assert r.status < 500, (method, path, body, r.status, r.text)
    if r.status >= 400:
        assert "error" in r.json()


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=st.lists(st.dictionaries(KEYS, VALUES, max_size=5), max_size=5),
       dry_run=st.booleans())
async def test_fuzzed_bulk_rows_never_500(env: Env, rows: list[Any], dry_run: bool) -> None:
    if not await env.service.store.list_clusters():
        await env.seed()
    r = await call(env, "POST", "/api/v1/machines:bulk",
                   json_body={"machines": rows, "dry_run": dry_run})
    assert r.status < 500, (rows, r.status, r.text)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(query=st.dictionaries(st.sampled_from(["state", "cluster", "label", "limit", "offset",
                                              "mac", "arch", "uuid", "serial", "product"]),
                             st.text(max_size=30), max_size=5))
async def test_fuzzed_queries_never_500(env: Env, query: dict[str, str]) -> None:
    for path in ("/api/v1/machines", "/ipxe", f"/api/v1/machines/{MAC}/events"):
        headers = env.auth if path.startswith("/api/") else None
        resp = await env.client.get(path, params=query, headers=headers)
        assert resp.status < 500, (path, query, resp.status, await resp.text())


async def test_bulk_dry_run_agrees_with_the_real_import(env: Env) -> None:
    rows = [{"mac": "52:54:00:00:00:01", "fixed_ipv4": "999.1.1.1"}]
    dry = await call(env, "POST", "/api/v1/machines:bulk",
                     json_body={"machines": rows, "dry_run": True})
    real = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows})
    assert dry.status == real.status == 400, (dry.text, real.text)
    assert dry.json()["errors"] == real.json()["errors"] == [
        {"line": 1, "field": "fixed_ipv4", "message": "'999.1.1.1' is not an IPv4 address"}]


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A request schema with $ref and allOf resolved (enough for the shapes used here)."""
    if "$ref" in schema:
        return resolve(doc, doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]])
    if "allOf" in schema:
        merged: dict[str, Any] = {"type": "object", "properties": {}}
        for part in schema["allOf"]:
            merged["properties"].update(resolve(doc, part).get("properties", {}))
        return merged
    return schema


async def test_openapi_request_bodies_match_what_the_server_accepts(env: Env) -> None:
    """Each documented body field is known to the server; undocumented ones are refused."""
    await env.seed()
    await machine(env)
    doc = document()
    checked = 0
    for path, method in sorted(documented(doc)):
        op = doc["paths"][path][method]
        if "application/json" not in op.get("requestBody", {}).get("content", {}):
            continue  # no body, or a file as it is (machines:import)
        schema = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])
        url = concrete(path).replace("/groups/edge", "/groups/all-x86").replace(
            "/profiles/edge", "/profiles/k3os")
        for prop in schema["properties"]:
            r = await call(env, method.upper(), url, json_body={prop: {"not": "valid"}})
            if r.status == 400:
                body = r.json()
                assert not (body.get("field") == prop and "unknown" in body["error"]), (
                    f"{method.upper()} {path}: documented field {prop!r} refused as unknown")
        if schema.get("additionalProperties") is False:
            r = await call(env, method.upper(), url, json_body={"zz_undocumented": 1})
            assert r.status == 400 and r.json()["field"] == "zz_undocumented", (path, r.text)
        checked += 1
    assert checked >= 10


async def test_openapi_optional_request_bodies_are_documented_as_optional(env: Env) -> None:
    await env.seed()
    await boot(env, MAC)
    doc = document()
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve")
    assert r.status == 200
    assert doc["paths"]["/api/v1/machines/{ref}/approve"]["post"]["requestBody"][
        "required"] is False
    r = await call(env, "PATCH", f"/api/v1/machines/{MAC}", json_body={"labels": {"a": "b"}})
    assert r.status == 200
    patch = resolve(doc, doc["paths"]["/api/v1/machines/{ref}"]["patch"]["requestBody"][
        "content"]["application/json"]["schema"])
    assert "mac" not in patch.get("required", [])


async def test_responses_validate_against_the_documented_schemas(env: Env) -> None:
    import jsonschema
    doc = document()

    def check(path: str, method: str, reply: Reply) -> None:
        responses = doc["paths"][path][method]["responses"]
        assert str(reply.status) in responses, (path, method, reply.status, reply.text)
        content = responses[str(reply.status)].get("content")
        if content is None:
            return
        schema = {**content["application/json"]["schema"], "components": doc["components"]}
        jsonschema.Draft202012Validator(schema).validate(reply.json())

    await env.seed()
    created = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC,
                                                                       "labels": {"a": "b"}})
    check("/api/v1/machines", "post", created)
    token = install_token(await boot(env, MAC))
    for path in ("/api/v1/machines", "/api/v1/machines/{ref}", "/api/v1/machines/{ref}/events",
                 "/api/v1/machines/{ref}/explain", "/api/v1/profiles", "/api/v1/profiles/{name}",
                 "/api/v1/clusters", "/api/v1/clusters/{name}", "/api/v1/groups",
                 "/api/v1/groups/{name}", "/api/v1/clusters/{name}/nodes"):
        name = {"profiles": "k3os", "groups": "all-x86"}.get(path.split("/")[3], "edge")
        url = path.replace("{ref}", MAC).replace("{name}", name)
        check(path, "get", await call(env, "GET", url))
    check("/api/v1/machines/{ref}/events", "post",
          await call(env, "POST", f"/api/v1/machines/{MAC}/events",
                     json_body={"kind": "installing"}))
    check("/api/v1/register", "post",
          await call(env, "POST", "/api/v1/register", json_body={"mac": MAC, "token": token},
                     admin=False))
    check("/api/v1/machines/{ref}", "patch",
          await call(env, "PATCH", f"/api/v1/machines/{MAC}", json_body={"serial": "s"}))
    check("/api/v1/machines:bulk", "post",
          await call(env, "POST", "/api/v1/machines:bulk",
                     json_body={"machines": [{"mac": MAC2}], "dry_run": False}))
    check("/api/v1/machines:bulk", "post",
          await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [{}]}))
    check("/api/v1/machines/{ref}/reinstall", "post",
          await call(env, "POST", f"/api/v1/machines/{MAC}/reinstall"))
    check("/api/v1/machines", "post", await call(env, "POST", "/api/v1/machines",
                                                 json_body={"mac": "x"}))
    check("/api/v1/machines", "post", await call(env, "POST", "/api/v1/machines",
                                                 json_body={"mac": MAC}))
    check("/api/v1/machines/{ref}", "get", await call(env, "GET", "/api/v1/machines/"
                                                                   "00:00:00:00:00:09"))
    for kind in ("profiles", "clusters", "groups"):
        check(f"/api/v1/{kind}", "post",
              await call(env, "POST", f"/api/v1/{kind}", json_body={"name": f"new-{kind}",
                                                                    "kernel": "vmlinuz"}
                         if kind == "profiles" else {"name": f"new-{kind}"}))
        check(f"/api/v1/{kind}/{{name}}", "put",
              await call(env, "PUT", f"/api/v1/{kind}/new-{kind}",
                         json_body={"kernel": "vmlinuz"} if kind == "profiles" else {}))
        check(f"/api/v1/{kind}/{{name}}", "delete",
              await call(env, "DELETE", f"/api/v1/{kind}/new-{kind}"))
    check("/api/v1/machines/{ref}", "delete", await call(env, "DELETE", f"/api/v1/machines/{MAC2}"))


async def test_status_endpoint(env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:00:11", "cluster": "edge"},
                   status=201)
    status = await env.get("/api/v1/status")
    assert status["total"] == 1 and status["by_state"]["enrolled"] == 1
    assert status["clusters"] == {"edge": {"enrolled": 1}} and status["failed"] == []


async def test_a_discovered_machine_counts_in_no_cluster_of_a_group_that_matches_it(
        env: Env) -> None:
    """A device the firmware made known (discovered, held or ignored) matched by a group's
    selector on what it told (arch) was counted in that group's cluster, in ``netboot
    status`` and the dashboard's cluster table: a rack held for approval showed as nodes of
    the cluster. It boots nothing of that cluster until approved (matchbox and Tinkerbell
    count no hardware that no profile or workflow names); once approved, it counts there.
    From the server's loaded view and from the store alone (the CLI's), the same."""
    from netboot.enroll import fleet_status

    await env.seed()  # group all-x86: arch x86_64 -> cluster edge
    await env.client.get("/ipxe", params={"mac": MAC, "arch": "x86_64"})
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "discovered"
    await env.post("/api/v1/machines", {"mac": MAC2}, status=201)
    await env.client.get("/ipxe", params={"mac": MAC2, "arch": "x86_64"})
    status = await env.get("/api/v1/status")
    assert status["by_state"]["discovered"] == 1, status
    assert status["clusters"] == {"edge": {"booting": 1}}, status
    assert (await fleet_status(env.service.store))["clusters"] == status["clusters"]
    await env.post(f"/api/v1/machines/{MAC}/approve", {}, status=200)
    status = await env.get("/api/v1/status")
    assert status["clusters"] == {"edge": {"booting": 1, "enrolled": 1}}, status
    assert (await fleet_status(env.service.store))["clusters"] == status["clusters"]


async def test_healthz_tells_anyone_the_state_and_only_a_token_what_the_store_said(
        env: Env) -> None:
    """The store's words name the database's host, user and locks: public ``/healthz`` says
    the state, ``GET /api/v1/status`` (a read token) says the state and those words."""
    said = "connection to server at db.internal (10.1.2.3), port 5432 failed: user netboot"
    health = env.service.boot.health
    status = await env.get("/api/v1/status")
    assert status["inventory"] == {"state": "ok", "detail": None}
    health.doubt(f"cannot tell: {said}")
    reply = await call(env, "GET", "/healthz", admin=False)
    assert reply.status == 200 and reply.text.startswith("unknown: "), reply.text
    assert "db.internal" not in reply.text and "10.1.2.3" not in reply.text, reply.text
    status = await env.get("/api/v1/status")
    assert status["inventory"] == {"state": "unknown", "detail": f"cannot tell: {said}"}
    health.doubt(None)
    health.failed(said)
    reply = await call(env, "GET", "/healthz", admin=False)
    assert reply.status == 503, reply.text
    assert reply.text.startswith("degraded: the inventory is unreachable since "), reply.text
    assert "db.internal" not in reply.text and "10.1.2.3" not in reply.text, reply.text
    assert "boots of known machines are answered from memory" in reply.text
    status = await env.get("/api/v1/status")
    assert status["inventory"]["state"] == "degraded"
    assert said in status["inventory"]["detail"]
    assert (await call(env, "GET", "/api/v1/status", admin=False)).status == 401


# --- identity: several NICs, enrollment by serial / asset / UUID, conflicts ------------------


async def test_machine_with_several_nics_is_addressed_by_any_of_them_or_its_id(
        env: Env) -> None:
    await env.seed()
    created = await env.post("/api/v1/machines", {"macs": [MAC, "52-54-00-12-34-57"],
                                                  "hostname": "two"}, status=201)
    assert created["macs"] == [MAC, MAC2] and created["mac"] == MAC
    assert created["id"].startswith("m-")
    for ref in (MAC, MAC2.replace(":", "-"), created["id"]):
        assert (await env.get(f"/api/v1/machines/{ref}"))["id"] == created["id"]
    # "mac" and "macs" together: mac is the first NIC, not listed twice.
    both = await env.post("/api/v1/machines", {"mac": "52:54:00:00:aa:02",
                                               "macs": ["52:54:00:00:aa:01",
                                                        "52:54:00:00:aa:02"]}, status=201)
    assert both["macs"] == ["52:54:00:00:aa:02", "52:54:00:00:aa:01"]


@pytest.mark.parametrize("ident", [{"serial": "CZ2048XYZ"}, {"asset": "A-0042"},
                                   {"uuid": "8D3A0C51-3B6B-4F0E-9D4C-52E5C1A2B3C4"}])
async def test_machine_enrolled_without_a_mac(env: Env, ident: dict[str, str]) -> None:
    await env.seed()
    created = await env.post("/api/v1/machines", {**ident, "cluster": "edge"}, status=201)
    assert created["macs"] == [] and created["mac"] is None and created["mac_hexhyp"] is None
    assert created["hostname"]  # named by the template all the same
    got = await env.get(f"/api/v1/machines/{created['id']}")
    assert got == created
    events = await env.get(f"/api/v1/machines/{created['id']}/events")
    assert [e["kind"] for e in events] == ["enrolled"]
    assert events[0]["machine"] == created["id"]


async def test_serial_enrolled_machine_boots_and_gets_its_nic(env: Env) -> None:
    await env.seed()
    created = await env.post("/api/v1/machines", {"serial": "CZ2048XYZ"}, status=201)
    script = await boot(env, MAC2.replace(":", "-"), serial="CZ2048XYZ")
    # Attached and held until an operator lists it (anyone can send a serial).
    assert "kernel " not in script and f"--add-mac {MAC2}" in script, script
    got = await env.get(f"/api/v1/machines/{MAC2}")
    assert got["id"] == created["id"] and got["macs"] == [MAC2]
    kinds = [e["kind"] for e in await env.get(f"/api/v1/machines/{created['id']}/events")]
    assert "nic-attached" in kinds
    listed = await call(env, "PATCH", f"/api/v1/machines/{created['id']}",
                        json_body={"macs": [MAC2]})
    assert listed.status == 200, listed.body
    assert "kernel " in await boot(env, MAC2.replace(":", "-"), serial="CZ2048XYZ")  # install


@pytest.mark.parametrize(("first", "second", "field"), [
    ({"mac": MAC}, {"macs": [MAC2, MAC]}, "mac"),
    ({"mac": MAC, "serial": "SN-1"}, {"mac": MAC2, "serial": "SN-1"}, "serial"),
    ({"serial": "SN-2", "asset": "A-9"}, {"asset": "A-9"}, "asset"),
    ({"uuid": "8d3a0c51-3b6b-4f0e-9d4c-52e5c1a2b3c4"},
     {"uuid": "8D3A0C51-3B6B-4F0E-9D4C-52E5C1A2B3C4"}, "uuid"),
])
async def test_identifier_of_another_machine_is_409_naming_field_and_machine(
        env: Env, first: dict[str, Any], second: dict[str, Any], field: str) -> None:
    holder = await env.post("/api/v1/machines", first, status=201)
    body = error(await call(env, "POST", "/api/v1/machines", json_body=second), 409)
    assert body["field"] == field and body["holder"] == holder["id"]
    assert holder["id"] in body["error"]
    assert (await env.get("/api/v1/machines"))["total"] == 1


async def test_placeholder_identifiers_are_refused_at_enrollment(env: Env) -> None:
    for body, field in (({"serial": "To be filled by O.E.M."}, "serial"),
                        ({"mac": MAC, "asset": "Default string"}, "asset"),
                        ({"uuid": "00000000-0000-0000-0000-000000000000"}, "uuid"),
                        ({"hostname": "no-id"}, "mac"), ({"macs": []}, "mac"),
                        ({"macs": [MAC, MAC]}, "macs[1]"), ({"macs": MAC}, "macs"),
                        # No NIC has these: an odd first byte (a typo) was enrolled and never
                        # matched a boot (s35-user).
                        ({"mac": "53:54:00:12:34:56"}, "mac"),
                        ({"mac": "ff-ff-ff-ff-ff-ff"}, "mac"),
                        ({"macs": [MAC, "01:00:5e:00:00:01"]}, "macs"),
                        ({"mac": "0000.0000.0000"}, "mac")):
        error(await call(env, "POST", "/api/v1/machines", json_body=body), 400, field)
    assert (await env.get("/api/v1/machines"))["total"] == 0
    created = await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    error(await call(env, "PATCH", f"/api/v1/machines/{MAC}",
                     json_body={"macs": [MAC, "03:00:00:00:00:01"]}), 400, "macs")
    assert (await env.get(f"/api/v1/machines/{MAC}"))["macs"] == created["macs"]


async def test_enrolling_a_discovered_device_by_serial_merges_its_record(env: Env) -> None:
    await env.seed()
    # Held by the discovery policy? Here "ignore": the record is made all the same.
    await env.client.get("/ipxe", params={"mac": MAC, "serial": "SN-42", "arch": "x86_64"})
    found = await env.get(f"/api/v1/machines/{MAC}")
    assert found["state"] == "discovered" and found["serial"] == "SN-42"
    created = await env.post("/api/v1/machines", {"serial": "SN-42"}, status=201)
    # The discovered record is the machine now: its id, NIC and history stay.
    assert created["id"] == found["id"] and created["macs"] == [MAC]
    assert created["state"] == "enrolled"
    kinds = [e["kind"] for e in await env.get(f"/api/v1/machines/{created['id']}/events")]
    assert kinds[0] == "discovered" and kinds[-1] == "enrolled"
    assert "kernel " in await boot(env, MAC, serial="SN-42")


async def test_patch_macs_replaces_the_nics_and_conflicts_are_409(env: Env) -> None:
    m = await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:00:bb:01"}, status=201)
    r = await call(env, "PATCH", f"/api/v1/machines/{m['id']}",
                   json_body={"macs": [MAC2, MAC]})
    assert r.status == 200 and r.json()["macs"] == [MAC2, MAC], r.text
    body = error(await call(env, "PATCH", f"/api/v1/machines/{MAC2}",
                            json_body={"macs": [MAC2, "52:54:00:00:bb:01"]}), 409)
    assert body["field"] == "mac"
    error(await call(env, "PATCH", f"/api/v1/machines/{MAC2}", json_body={"macs": []}),
          400, "mac")
    assert (await env.get(f"/api/v1/machines/{MAC}"))["macs"] == [MAC2, MAC]



async def test_an_edit_made_on_an_older_read_is_refused_with_if_match(env: Env) -> None:
    """Two operators edit one machine: each read it, the first changed its labels, and the
    second's PATCH (its labels replace the machine's) wrote the first's away, with no way
    for a client to ask otherwise: If-Match was not looked at (RFC 9110 §13.1.1: a server
    that receives it evaluates it before the method). Found by s40-attack. Each read now
    carries the machine's version as an ETag; an edit with If-Match of another is a 412 and
    changes nothing; without If-Match, or with ``*``, an edit is made as before."""
    m = await env.post("/api/v1/machines", {"mac": MAC, "labels": {"rack": "r1"}}, status=201)
    ref = f"/api/v1/machines/{m['id']}"
    seen = await call(env, "GET", ref)  # both operators read it
    tag = seen.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"') and len(tag) > 2, seen.headers
    first = await call(env, "PATCH", ref, json_body={"labels": {"rack": "r1", "owner": "a"}},
                       headers={"If-Match": tag})
    assert first.status == 200 and first.headers["etag"] != tag, first.text
    second = await call(env, "PATCH", ref, json_body={"labels": {"rack": "r2"}},
                        headers={"If-Match": tag})
    assert second.status == 412 and second.json()["field"] == "If-Match", second.text
    assert (await env.get(ref))["labels"] == {"rack": "r1", "owner": "a"}
    for stale in ("W/" + first.headers["etag"], '"0.5"'):  # If-Match compares strongly
        r = await call(env, "PATCH", ref, json_body={"hostname": "x"},
                       headers={"If-Match": stale})
        assert r.status == 412, (stale, r.text)
    # Read again, then made; one of several tags, and "*" (the machine exists), are met.
    now = (await call(env, "GET", ref)).headers["etag"]
    assert now == first.headers["etag"]
    r = await call(env, "PATCH", ref, json_body={"labels": {"rack": "r2", "owner": "a"}},
                   headers={"If-Match": f'"0.5", {now}'})
    assert r.status == 200 and r.json()["labels"] == {"rack": "r2", "owner": "a"}, r.text
    r = await call(env, "PATCH", ref, json_body={"hostname": "n1"}, headers={"If-Match": "*"})
    assert r.status == 200, r.text
    r = await call(env, "PATCH", ref, json_body={"hostname": "n2"})
    assert r.status == 200 and r.json()["hostname"] == "n2", r.text
    # The one on a machine that is gone is its 404, as without If-Match.
    r = await call(env, "PATCH", "/api/v1/machines/52:54:00:00:0f:0f",
                   json_body={"hostname": "x"}, headers={"If-Match": now})
    assert r.status == 404, r.text

async def test_a_delete_reinstall_or_approve_made_on_an_older_read_is_refused_with_if_match(
        env: Env) -> None:
    """s40-attack's If-Match was honoured on a machine's PATCH alone: an operator's DELETE,
    reinstall or approve made on a read from before another operator's edit was made over
    it. Each now takes If-Match (RFC 9110 §13.1.1): another version is a 412 and nothing is
    written; the current one, "*" or none, as before; approve and reinstall answer the
    machine's new ETag."""
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    m = await env.post("/api/v1/machines", {"mac": MAC, "profile": "k3os"}, status=201)
    ref = f"/api/v1/machines/{m['id']}"
    old = (await call(env, "GET", ref)).headers["etag"]
    edited = await call(env, "PATCH", ref, json_body={"hostname": "by-the-other"})
    assert edited.status == 200, edited.text
    before = await env.service.store.get_machine(m["id"])
    for method, path, body in (("POST", f"{ref}/approve", {"hostname": "mine"}),
                               ("POST", f"{ref}/reinstall", None),
                               ("DELETE", ref, None)):
        r = await call(env, method, path, json_body=body, headers={"If-Match": old})
        assert r.status == 412 and r.json()["field"] == "If-Match", (path, r.text)
        assert await env.service.store.get_machine(m["id"]) == before, path
    now = edited.headers["etag"]
    r = await call(env, "POST", f"{ref}/approve", json_body={"hostname": "mine"},
                   headers={"If-Match": now})
    assert r.status == 200 and r.json()["hostname"] == "mine", r.text
    r = await call(env, "POST", f"{ref}/reinstall", headers={"If-Match": r.headers["etag"]})
    assert r.status == 200 and r.json()["state"] == "reinstall", r.text
    r = await call(env, "DELETE", ref, headers={"If-Match": now})  # older than reinstall's
    assert r.status == 412, r.text
    current = (await call(env, "GET", ref)).headers["etag"]
    r = await call(env, "DELETE", ref, headers={"If-Match": f'"0.5", {current}'})
    assert r.status == 204, r.text
    assert await env.service.store.get_machine(m["id"]) is None


@pytest.mark.parametrize("kind,body,key,first,second", [
    ("profiles", {"name": "k3os", "kernel": "vmlinuz"}, "description", "first's", "second's"),
    ("clusters", {"name": "edge", "server_url": "managed"}, "description", "first's",
     "second's"),
    ("groups", {"name": "rack1", "selector": {"rack": ["1"]}, "profile": "k3os"}, "labels",
     {"owner": "first"}, {"owner": "second"})])
async def test_a_replace_made_on_an_older_read_is_refused_with_if_match(
        env: Env, kind: str, body: dict[str, Any], key: str, first: Any, second: Any) -> None:
    """A PUT replaces a profile, cluster or group whole: two operators who read one, the
    second's PUT wrote away the first's change (s40-attack, left). A GET and a PUT answer
    its version as an ETag; a PUT with If-Match of another is a 412, nothing written."""
    if kind != "profiles":
        await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    await env.post(f"/api/v1/{kind}", body, status=201)
    path = f"/api/v1/{kind}/{body['name']}"
    read = await call(env, "GET", path)  # both operators read it
    tag = read.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"') and len(tag) > 2, read.headers
    r = await call(env, "PUT", path, json_body={**body, key: first}, headers={"If-Match": tag})
    assert r.status == 200 and r.headers["etag"] not in (None, tag), r.text
    made = r.headers["etag"]
    kept = await env.get(path)
    r = await call(env, "PUT", path, json_body={**body, key: second}, headers={"If-Match": tag})
    assert r.status == 412 and r.json()["field"] == "If-Match", r.text
    assert await env.get(path) == kept and kept[key] == first
    now = (await call(env, "GET", path)).headers["etag"]
    assert now == made
    r = await call(env, "PUT", path, json_body={**body, key: second},
                   headers={"If-Match": f'"0.5", {now}'})
    assert r.status == 200 and r.json()[key] == second, r.text
    r = await call(env, "PUT", path, json_body=body, headers={"If-Match": "*"})
    assert r.status == 200, r.text
    r = await call(env, "PUT", path, json_body=body)
    assert r.status == 200, r.text


@pytest.mark.parametrize("kind,body,key,changed", [
    ("profiles", {"name": "k3os", "kernel": "vmlinuz"}, "description", "theirs"),
    ("clusters", {"name": "edge", "server_url": "managed"}, "description", "theirs"),
    ("groups", {"name": "rack1", "selector": {"rack": ["1"]}, "profile": "k3os"}, "labels",
     {"owner": "theirs"})])
async def test_a_delete_made_on_an_older_read_is_refused_with_if_match(
        env: Env, kind: str, body: dict[str, Any], key: str, changed: Any) -> None:
    """A DELETE of a profile, cluster or group ignored If-Match (s41-integrity): an operator
    who read it, then saw another change it, deleted the changed one unseen; a PUT already
    took it. Another version is a 412 naming If-Match and nothing deleted; the current one,
    one of a list, or ``*`` deletes it."""
    if kind != "profiles":
        await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    await env.post(f"/api/v1/{kind}", body, status=201)
    path = f"/api/v1/{kind}/{body['name']}"
    tag = (await call(env, "GET", path)).headers["etag"]
    r = await call(env, "PUT", path, json_body={**body, key: changed})  # another's change
    assert r.status == 200, r.text
    now = r.headers["etag"]
    kept = await env.get(path)
    r = await call(env, "DELETE", path, headers={"If-Match": tag})
    assert r.status == 412 and r.json()["field"] == "If-Match", r.text
    assert await env.get(path) == kept
    r = await call(env, "DELETE", path, headers={"If-Match": f'"0.5", {now}'})
    assert r.status == 204, r.text
    assert (await call(env, "GET", path)).status == 404
    await env.post(f"/api/v1/{kind}", body, status=201)
    assert (await call(env, "DELETE", path, headers={"If-Match": "*"})).status == 204


# Each operation answering its item's version as an ETag (api._etag, api._item_etag).
_ETAGGED = {("/api/v1/machines", "post"), ("/api/v1/machines/{ref}", "get"),
            ("/api/v1/machines/{ref}", "patch"), ("/api/v1/machines/{ref}/approve", "post"),
            ("/api/v1/machines/{ref}/reinstall", "post"),
            ("/api/v1/clusters/{name}/secure-token", "post"),
            *((f"/api/v1/{kind}", "post") for kind in ("profiles", "clusters", "groups")),
            *((f"/api/v1/{kind}/{{name}}", method) for kind in ("profiles", "clusters", "groups")
              for method in ("get", "put"))}


async def test_the_etag_every_change_compares_is_declared_where_it_is_answered(env: Env) -> None:
    """The ETag an If-Match names was answered by the server but not declared in the
    OpenAPI document (s41-integrity): a client generated from it had no way to read it.
    Each operation that answers one declares it, and each one declared is answered; every
    operation taking If-Match is one of an item that a GET gives an ETag of."""
    doc = document()
    declared = {(p, m) for p, m in documented(doc)
                if "ETag" in next(iter(doc["paths"][p][m]["responses"].values())).get(
                    "headers", {})}
    assert declared == _ETAGGED
    for path, method in documented(doc):
        op = doc["paths"][path][method]
        if any(p["name"] == "If-Match" for p in op.get("parameters", [])):
            assert (path, "get") in _ETAGGED or path.endswith(("/approve", "/reinstall",
                                                               "/secure-token")), path
            assert "412" in op["responses"], path
    for kind in ("profiles", "clusters", "groups"):
        delete = doc["paths"][f"/api/v1/{kind}/{{name}}"]["delete"]
        assert [p["name"] for p in delete["parameters"]] == ["If-Match"], kind
    # Answered by the server where declared: one call of each.
    await env.post("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz"}, status=201)
    calls: list[tuple[str, str, Any, int]] = [
        ("POST", "/api/v1/machines", {"mac": MAC}, 201),
        ("GET", f"/api/v1/machines/{MAC}", None, 200),
        ("PATCH", f"/api/v1/machines/{MAC}", {"hostname": "n1"}, 200),
        ("POST", f"/api/v1/machines/{MAC}/reinstall", None, 200),
        ("POST", "/api/v1/clusters", {"name": "edge", "server_url": "managed"}, 201),
        ("POST", "/api/v1/clusters/edge/secure-token", None, 200),
        ("POST", "/api/v1/groups", {"name": "g", "selector": {"rack": ["1"]}}, 201)]
    calls += [(method, f"/api/v1/{kind}/{name}", body, 200)
              for kind, name, body in (("profiles", "k3os", {"kernel": "vmlinuz"}),
                                       ("clusters", "edge", {"server_url": "managed"}),
                                       ("groups", "g", {"selector": {"rack": ["1"]}}))
              for method in ("GET", "PUT")]
    for method, path, body, status in calls:
        r = await call(env, method, path, json_body=body)
        assert r.status == status, (method, path, r.text)
        assert r.headers.get("etag", "").startswith('"'), (method, path, r.headers)


# --- tokens, scopes and the audit log through the API ----------------------------------------


async def test_tokens_are_created_listed_and_revoked_by_an_admin(env: Env) -> None:
    made = await env.post("/api/v1/tokens", {"name": "dash", "scope": "read",
                                             "expires_in": "12h"}, status=201)
    assert made["token"].startswith("nbt_") and made["expires"] - made["created"] == 43200
    listed = await env.get("/api/v1/tokens")
    assert {t["name"] for t in listed} == {"admin", "dash"}
    assert all(set(t) == {"name", "scope", "created", "expires", "last_used"} for t in listed)
    assert made["token"] not in json.dumps(listed)
    reader = {"Authorization": f"Bearer {made['token']}"}
    assert (await env.get("/api/v1/status", headers=reader))["total"] == 0
    used = {t["name"]: t for t in await env.get("/api/v1/tokens")}["dash"]
    assert used["last_used"] is not None
    r = await call(env, "GET", "/api/v1/tokens", headers=reader, admin=False)
    assert error(r, 403)["scope"] == "admin"
    error(await call(env, "POST", "/api/v1/tokens", json_body={"name": "dash",
                                                               "scope": "admin"}), 409)
    assert {t["name"]: t["scope"] for t in await env.get("/api/v1/tokens")}["dash"] == "read"
    r = await call(env, "DELETE", "/api/v1/tokens/dash")
    assert r.status == 204
    error(await call(env, "DELETE", "/api/v1/tokens/dash"), 404)
    r = await call(env, "GET", "/api/v1/status", headers=reader, admin=False)
    assert error(r, 401)["error"] == "unknown or revoked token"


@pytest.mark.parametrize(("body", "field"), [
    ({"scope": "read"}, "name"), ({"name": "a b", "scope": "read"}, "name"),
    ({"name": "x" * 65, "scope": "read"}, "name"), ({"name": "ok\n", "scope": "read"}, "name"),
    ({"name": "ok"}, "scope"), ({"name": "ok", "scope": "root"}, "scope"),
    ({"name": "ok", "scope": "read", "expires_in": "0d"}, "expires_in"),
    ({"name": "ok", "scope": "read", "expires_in": 3600}, "expires_in"),
    ({"name": "ok", "scope": "read", "owner": "me"}, "owner"),
])
async def test_bad_token_requests_name_the_field(env: Env, body: dict[str, Any],
                                                 field: str) -> None:
    error(await call(env, "POST", "/api/v1/tokens", json_body=body), 400, field)
    assert [t["name"] for t in await env.get("/api/v1/tokens")] == ["admin"]


async def test_scopes_through_the_api(env: Env) -> None:
    await env.seed()
    scanner = {"Authorization": f"Bearer {await scoped_token(env, 'enroll')}"}
    operator = {"Authorization": f"Bearer {await scoped_token(env, 'operator')}"}
    reader = {"Authorization": f"Bearer {await scoped_token(env, 'read')}"}
    # A factory-floor scanner adds and approves machines, and reads nothing.
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}, headers=scanner,
                   admin=False)
    assert r.status == 201
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC2}, headers=reader,
                   admin=False)
    assert error(r, 403)["scope"] == "enroll"
    for path in ("/api/v1/machines", f"/api/v1/machines/{MAC}", "/api/v1/status"):
        r = await call(env, "GET", path, headers=scanner, admin=False)
        assert error(r, 403)["scope"] == "read"
    # An operator reinstalls and removes machines but touches no cluster (its join secret).
    assert (await env.get(f"/api/v1/machines/{MAC}", headers=operator))["mac"] == MAC
    r = await call(env, "PUT", "/api/v1/clusters/edge", json_body={
        "name": "edge", "server_url": "https://192.0.2.99:6443", "token": "stolen"},
        headers=operator, admin=False)
    assert error(r, 403)["scope"] == "admin"
    r = await call(env, "DELETE", f"/api/v1/machines/{MAC}", headers=reader, admin=False)
    assert error(r, 403)["scope"] == "operator"
    assert (await call(env, "DELETE", f"/api/v1/machines/{MAC}", headers=operator,
                       admin=False)).status == 204
    assert (await env.get("/api/v1/clusters/edge"))["server_url"] == "https://192.0.2.50:6443"


async def test_every_change_is_audited_with_who_what_where_and_outcome(env: Env) -> None:
    token = await scoped_token(env, "read", "viewer")
    created = await machine(env)
    r = await call(env, "DELETE", f"/api/v1/machines/{MAC}",
                   headers={"Authorization": f"Bearer {token}"}, admin=False)
    assert r.status == 403
    r = await call(env, "DELETE", f"/api/v1/machines/{MAC}", admin=False)
    assert r.status == 401
    await env.get("/api/v1/machines")  # reads are not audited
    r = await call(env, "POST", "/api/v1/profiles", json_body={"name": "p"})
    assert r.status == 400
    log = await env.get("/api/v1/audit")
    rows = [(e["actor"], e["action"], e["target"], e["outcome"]) for e in log]
    assert rows == [
        ("admin", "POST /api/v1/tokens", "viewer", "201"),
        ("admin", "POST /api/v1/machines", created["id"], "201"),
        ("viewer", "DELETE /api/v1/machines/{ref}", MAC, "403"),
        ("-", "DELETE /api/v1/machines/{ref}", MAC, "401"),
        ("admin", "POST /api/v1/profiles", "", "400"),
    ]
    assert all(e["peer"] == "127.0.0.1" and e["time"] > 0 for e in log)
    assert token not in json.dumps(log)
    later = await env.get(f"/api/v1/audit?since={log[2]['time']}&limit=2")
    assert [e["outcome"] for e in later] == ["401", "400"]
    error(await call(env, "GET", "/api/v1/audit?since=nan"), 400, "since")
    error(await call(env, "GET", "/api/v1/audit?limit=0"), 400, "limit")
    r = await call(env, "GET", "/api/v1/audit", headers={"Authorization": f"Bearer {token}"},
                   admin=False)
    assert error(r, 403)["scope"] == "admin"


async def test_a_machines_own_reports_are_audited_as_the_machine(env: Env) -> None:
    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/events",
                   json_body={"kind": "progress"}, headers={"Authorization": f"Bearer {token}"},
                   admin=False)
    assert r.status == 201
    last = (await env.get("/api/v1/audit"))[-1]
    machine_id = (await env.get(f"/api/v1/machines/{MAC}"))["id"]
    assert (last["actor"], last["action"], last["outcome"]) == (
        f"machine:{machine_id}", "POST /api/v1/machines/{ref}/events", "201")


async def test_attack_chain_reads_without_a_token_end_in_401(env: Env) -> None:
    """Issue 11's first chain began by listing every MAC without a credential."""
    await env.seed()
    await machine(env, serial="SN-1")
    for path in ("/api/v1/machines", f"/api/v1/machines/{MAC}", f"/api/v1/machines/{MAC}/events",
                 f"/api/v1/machines/{MAC}/explain", "/api/v1/status", "/api/v1/clusters",
                 "/api/v1/clusters/edge/nodes", "/api/v1/groups", "/api/v1/profiles",
                 "/api/v1/openapi.json", "/api/v1/audit", "/api/v1/tokens"):
        r = await call(env, "GET", path, admin=False)
        error(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"
        assert MAC not in r.text and "SN-1" not in r.text
    # An event post for an unknown machine does not tell a stranger it is unknown.
    r = await call(env, "POST", "/api/v1/machines/02:00:00:00:00:99/events",
                   json_body={"kind": "installed"}, admin=False)
    error(r, 401)


async def test_render_of_a_config_without_profile_is_a_conflict_not_a_500(env: Env) -> None:
    """Found by schemathesis: a machine with no profile has no config to render; that is the
    operator's state to fix (409 naming it), never a template failure (500)."""
    await env.post("/api/v1/machines", {"mac": "02:00:00:00:09:01"}, status=201)
    for kind in ("config", "nocloud"):
        body = await env.get(f"/api/v1/machines/02:00:00:00:09:01/render/{kind}", status=409)
        assert "no profile" in body["error"], (kind, body)


def test_openapi_render_kinds_are_the_core_s() -> None:
    from netboot import core, openapi

    assert openapi.RENDER_KIND_NAMES == core.RENDER_KINDS


# --- what a schema cannot say: each constraint the operation descriptions name ---------------

_GROUP = {"selector": {"product": ["X"]}, "profile": "k3os", "cluster": "edge"}


@pytest.mark.parametrize(("method", "path", "body", "status", "field"), [
    # A body's name must be the URL's (profiles, clusters, groups).
    ("PUT", "/api/v1/profiles/k3os", {"name": "other", "kernel": "vmlinuz"}, 400, "name"),
    ("PUT", "/api/v1/clusters/edge", {"name": "other"}, 400, "name"),
    ("PUT", "/api/v1/groups/all-x86", {"name": "other", **_GROUP}, 400, "name"),
    # References that must exist: a group's profile and cluster, on create and replace.
    ("POST", "/api/v1/groups", {"name": "g", **_GROUP, "profile": "nope"}, 400, "profile"),
    ("POST", "/api/v1/groups", {"name": "g", **_GROUP, "cluster": "nope"}, 400, "cluster"),
    ("PUT", "/api/v1/groups/all-x86", {**_GROUP, "profile": "nope"}, 400, "profile"),
    ("PUT", "/api/v1/groups/all-x86", {**_GROUP, "cluster": "nope"}, 400, "cluster"),
    # ... and a machine's, on enroll, change and approve, one by one and in bulk.
    ("POST", "/api/v1/machines", {"mac": MAC2, "profile": "nope"}, 400, "profile"),
    ("POST", "/api/v1/machines", {"mac": MAC2, "cluster": "nope"}, 400, "cluster"),
    ("PATCH", f"/api/v1/machines/{MAC}", {"profile": "nope"}, 400, "profile"),
    ("PATCH", f"/api/v1/machines/{MAC}", {"cluster": "nope"}, 400, "cluster"),
    ("POST", f"/api/v1/machines/{MAC}/approve", {"cluster": "nope"}, 400, "cluster"),
    ("POST", f"/api/v1/machines/{MAC}/approve", {"profile": "nope"}, 400, "profile"),
    # Overlapping groups: as specific as all-x86 ({arch}) and able to match the same machine.
    ("POST", "/api/v1/groups", {"name": "g", "selector": {"arch": ["x86_64", "arm64"]}},
     409, "selector"),
    # Hostname templates: fields that exist, in valid syntax.
    ("POST", "/api/v1/groups", {"name": "g", **_GROUP, "hostname_template": "n-{nope}"},
     400, "hostname_template"),
    ("POST", "/api/v1/groups", {"name": "g", **_GROUP, "hostname_template": "n-{mac"},
     400, "hostname_template"),
    ("PUT", "/api/v1/groups/all-x86", {**_GROUP, "hostname_template": "{serial:d}"},
     400, "hostname_template"),
])
async def test_a_constraint_the_schema_cannot_say_names_its_field(
        env: Env, method: str, path: str, body: dict[str, Any], status: int,
        field: str) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC}, status=201)
    before = {kind: await env.get(f"/api/v1/{kind}") for kind in ("profiles", "clusters",
                                                                  "groups")}
    r = await call(env, method, path, json_body=body)
    assert r.status == status and r.json()["field"] == field, (r.status, r.text)
    # Refused whole: nothing was created or changed.
    for kind, items in before.items():
        assert await env.get(f"/api/v1/{kind}") == items
    assert (await env.get(f"/api/v1/machines/{MAC}"))["profile"] is None


async def test_replacing_a_group_so_that_it_overlaps_another_is_409_naming_selector(
        env: Env) -> None:
    await env.seed()
    await env.post("/api/v1/groups", {"name": "arm", "selector": {"arch": ["arm64"]}},
                   status=201)
    r = await call(env, "PUT", "/api/v1/groups/arm", json_body={"selector": {"arch": ["x86_*"]}})
    assert r.status == 409 and r.json()["field"] == "selector", r.text
    assert "all-x86" in r.json()["error"]
    assert (await env.get("/api/v1/groups/arm"))["selector"] == {"arch": ["arm64"]}


async def test_a_hostname_another_machine_holds_is_409_naming_hostname_and_holder(
        env: Env) -> None:
    holder = await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1"}, status=201)
    other = await env.post("/api/v1/machines", {"mac": MAC2}, status=201)
    for method, path, body in (("POST", "/api/v1/machines", {"serial": "SN-9",
                                                             "hostname": "edge-1"}),
                               ("PATCH", f"/api/v1/machines/{other['id']}",
                                {"hostname": "edge-1"})):
        r = await call(env, method, path, json_body=body)
        assert r.status == 409, (method, r.text)
        assert r.json()["field"] == "hostname" and r.json()["holder"] == holder["id"]
    assert (await env.get(f"/api/v1/machines/{MAC2}"))["hostname"] != "edge-1"


@pytest.mark.parametrize("kind", ["profiles", "clusters"])
async def test_removing_a_profile_or_cluster_in_use_is_409_naming_its_users(
        env: Env, kind: str) -> None:
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC, "profile": "k3os", "cluster": "edge"},
                   status=201)
    name = "k3os" if kind == "profiles" else "edge"
    r = await call(env, "DELETE", f"/api/v1/{kind}/{name}")
    assert r.status == 409, r.text
    assert "group 'all-x86'" in r.json()["error"] and MAC in r.json()["error"]
    await env.get(f"/api/v1/{kind}/{name}")  # still there


# --- a change whose request is cancelled while it is written: said once, as it ended --------
#
# The inventory's writer is held (tests/held_store.py) while the request's change waits for
# it; the request is then cancelled (aiohttp cancels the handler of a client that leaves; the
# front door's task is cancelled when the server stops), and the writer let go. The change is
# then on disk: the audit log must say so, once, with the outcome it got, and no "aborted".


async def until(found: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if found():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within 5 s: {what}")


def cancelling() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.cancelling() and not t.done()]


def front_post_task() -> asyncio.Task[Any] | None:
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "") == "Api.front_post":
            return task
    return None


async def send(env: Env, head: str, body: bytes) -> asyncio.StreamWriter:
    """A real client on a real socket: the request, sent whole; its writer to close."""
    _, writer = await asyncio.open_connection(env.client.host, env.client.port)
    writer.write(f"{head}\r\nHost: 192.0.2.10\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    return writer


def entries(log: list[dict[str, Any]], action: str) -> list[tuple[str, str, str]]:
    return [(e["actor"], e["target"], e["outcome"]) for e in log if e["action"] == action]


def store(env: Env) -> SqliteStore:
    found = env.service.store
    assert isinstance(found, SqliteStore)
    return found


async def test_a_report_cancelled_while_its_commit_is_held_is_audited_once(env: Env) -> None:
    """The front door's report: its entry is written in its own commit; cancelled while that
    commit waits for the writer, it is still written, and nothing says "aborted"."""
    await env.seed()
    created = await machine(env)
    token = install_token(await boot(env, MAC))
    gate = held_writer(store(env))
    try:
        writer = await send(env, f"POST /api/v1/machines/{MAC}/events HTTP/1.1\r\n"
                            f"Authorization: Bearer {token}", b'{"kind": "installed"}')
        await until(lambda: front_post_task() is not None, "the front door's report")
        task = front_post_task()
        assert task is not None
        await until(lambda: writes_waiting(store(env)) > 0, "its commit at the writer")
        task.cancel()  # as the server stopping does
        await asyncio.sleep(0.05)
    finally:
        gate.set()
    await until(task.done, "the cancelled report")
    # Its commit done, it ends with no wait left for the cancel: answered (unstoppable).
    assert not task.cancelled() and task.exception() is None
    writer.close()
    log = await env.get("/api/v1/audit")
    assert entries(log, "POST /api/v1/machines/{ref}/events") == [
        (f"machine:{created['id']}", MAC, "201")]
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "installed"
    events = await env.get(f"/api/v1/machines/{MAC}/events")
    assert [e["kind"] for e in events].count("installed") == 1


async def test_a_registration_cancelled_while_its_commit_is_held_is_audited_once(
        env: Env) -> None:
    await env.seed()
    created = await machine(env)
    token = install_token(await boot(env, MAC))
    await env.post(f"/api/v1/machines/{MAC}/events", {"kind": "installed"}, status=201,
                   headers={"Authorization": f"Bearer {token}"})
    gate = held_writer(store(env))
    try:
        body = json.dumps({"mac": MAC, "token": token, "hostname": "n1"}).encode()
        writer = await send(env, "POST /api/v1/register HTTP/1.1", body)
        await until(lambda: front_post_task() is not None, "the front door's registration")
        task = front_post_task()
        assert task is not None
        await until(lambda: writes_waiting(store(env)) > 0, "its commit at the writer")
        task.cancel()
        await asyncio.sleep(0.05)
    finally:
        gate.set()
    await until(task.done, "the cancelled registration")
    writer.close()
    log = await env.get("/api/v1/audit")
    assert entries(log, "POST /api/v1/register") == [
        (f"machine:{created['id']}", created["id"], "200")]
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "registered"


async def left(env: Env, head: str, body: bytes) -> None:
    """Send a change while the writer is held, and leave before the answer: aiohttp cancels
    the handler (the test server cancels a gone client's handler, as aiohttp's
    handler_cancellation does); then the writer goes on."""
    gate = held_writer(store(env))
    try:
        writer = await send(env, head, body)
        await until(lambda: writes_waiting(store(env)) > 0, "the change at the writer")
        writer.close()
        await until(lambda: bool(cancelling()), "the handler cancelled")
    finally:
        gate.set()
    await until(lambda: not cancelling(), "the cancelled handler finished")


CHANGES = [
    ("POST /api/v1/profiles", "POST /api/v1/profiles", {"name": "p1", "kernel": "vmlinuz"},
     "p1", "201"),
    ("PUT /api/v1/clusters/edge", "PUT /api/v1/clusters/{name}",
     {"server_url": "https://192.0.2.51:6443", "token": "t2"}, "edge", "200"),
    ("POST /api/v1/machines", "POST /api/v1/machines", {"mac": MAC2}, None, "201"),
    ("POST /api/v1/machines:bulk", "POST /api/v1/machines:bulk",
     {"machines": [{"mac": MAC2}]}, "", "201"),
    ("DELETE /api/v1/machines/" + MAC, "DELETE /api/v1/machines/{ref}", None, MAC, "204"),
    ("POST /api/v1/tokens", "POST /api/v1/tokens", {"name": "ci2", "scope": "read"},
     "ci2", "201"),
    ("DELETE /api/v1/tokens/ci", "DELETE /api/v1/tokens/{name}", None, "ci", "204"),
]


@pytest.mark.parametrize(("request_line", "action", "body", "target", "outcome"), CHANGES,
                         ids=[c[0] for c in CHANGES])
async def test_a_change_whose_client_left_while_it_was_written_is_audited_once(
        env: Env, request_line: str, action: str, body: dict[str, Any] | None,
        target: str | None, outcome: str) -> None:
    await env.seed()
    await machine(env)
    await env.post("/api/v1/tokens", {"name": "ci", "scope": "read"}, status=201)
    method, path = request_line.split(" ", 1)
    before = entries(await env.get("/api/v1/audit"), action)
    await left(env, f"{method} {path} HTTP/1.1\r\nAuthorization: Bearer {env.admin}",
               b"" if body is None else json.dumps(body).encode())
    after = entries(await env.get("/api/v1/audit"), action)[len(before):]
    assert [(actor, outcome_) for actor, _, outcome_ in after] == [("admin", outcome)]
    if target is not None:
        assert after[0][1] == target
    # ... and the change was made.
    if path.startswith("/api/v1/machines"):
        status = 404 if method == "DELETE" else 200
        await env.get(f"/api/v1/machines/{MAC2 if method == 'POST' else MAC}", status=status)
    elif path == "/api/v1/profiles":
        await env.get("/api/v1/profiles/p1")
    elif path.startswith("/api/v1/clusters"):
        assert (await env.get("/api/v1/clusters/edge"))["server_url"].endswith(".51:6443")
    else:
        names = [t["name"] for t in await env.get("/api/v1/tokens")]
        assert ("ci2" in names, "ci" in names) == ((True, True) if method == "POST"
                                                   else (False, False))


async def test_a_change_cancelled_with_its_handler_while_written_is_audited_as_made(
        env: Env) -> None:
    """asyncio.run's end cancels every task at once: the request's and the handler's that
    the audit middleware runs to its end, while the change is written. The change is made,
    and the log says so with its status: the handler, its write done with no wait left for
    the cancel, ends with its answer (before: re-armed at once, the cancel ended it
    cancelled, and the entry said "aborted" of a change that was made)."""
    await env.seed()  # the admin token used once: its touch is not the write held below
    before = entries(await env.get("/api/v1/audit"), "POST /api/v1/profiles")
    tasks: list[asyncio.Task[Any]] = []
    mine = asyncio.all_tasks()
    gate = held_writer(store(env))
    with write_lock(store(env)) as release:
        try:
            writer = await send(env, f"POST /api/v1/profiles HTTP/1.1\r\n"
                                f"Authorization: Bearer {env.admin}",
                                json.dumps({"name": "p1", "kernel": "vmlinuz"}).encode())
            await until(lambda: writes_waiting(store(env)) > 0, "the change at the writer")
        finally:
            gate.set()
        await begun(store(env))  # the thread writes it: it waits for the file's lock
        tasks = [t for t in asyncio.all_tasks() - mine if not t.done()]
        for task in tasks:  # as asyncio.runners._cancel_all_tasks
            task.cancel()
        await asyncio.sleep(0.05)
        release()
        await asyncio.wait(tasks, timeout=5)
    writer.close()
    after = entries(await env.get("/api/v1/audit"), "POST /api/v1/profiles")[len(before):]
    assert after == [("admin", "p1", "201")]
    await env.get("/api/v1/profiles/p1")


async def test_a_change_whose_client_left_before_it_was_made_is_aborted(env: Env) -> None:
    """Gone before its body was whole: nothing was changed, and the log says "aborted"."""
    gate = held_writer(store(env))
    try:
        _, writer = await asyncio.open_connection(env.client.host, env.client.port)
        writer.write(f"POST /api/v1/profiles HTTP/1.1\r\nHost: 192.0.2.10\r\n"
                     f"Authorization: Bearer {env.admin}\r\nContent-Type: application/json"
                     "\r\nContent-Length: 100\r\n\r\n{\"name\": ".encode())
        await writer.drain()
        await asyncio.sleep(0.3)  # its head read, its body awaited
        writer.close()
        await until(lambda: bool(cancelling()), "the handler cancelled")
    finally:
        gate.set()
    await until(lambda: not cancelling(), "the cancelled handler finished")
    log = await env.get("/api/v1/audit")
    # Its token is read after its body: nobody known asked.
    assert entries(log, "POST /api/v1/profiles") == [("-", "", "aborted")]
    assert await env.get("/api/v1/profiles") == []


# --- a change whose outcome the inventory cannot tell ----------------------------------------


async def front_report(env: Env, token: str, *, register: bool = False) -> dict[str, Any]:
    """An installer's report (or its registration) through the front door (a real socket:
    Api.front_post), answered 503: its body."""
    reader, writer = await asyncio.open_connection(env.client.host, env.client.port)
    path, body, bearer = ((f"/api/v1/machines/{MAC}/events", b'{"kind": "installed"}',
                           f"Authorization: Bearer {token}\r\n") if not register else
                          ("/api/v1/register", json.dumps({"mac": MAC, "token": token}).encode(),
                           ""))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 192.0.2.10\r\n"
                 f"{bearer}Content-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = re.search(r"(?i)\r\ncontent-length: *(\d+)", head)
    assert head.startswith("HTTP/1.1 503 ") and length is not None, head
    answer: dict[str, Any] = json.loads(await reader.readexactly(int(length[1])))
    writer.close()
    return answer


@pytest.mark.parametrize("unknown", [True, False])
async def test_a_change_whose_outcome_is_unknown_is_answered_and_audited_so(
        env: Env, monkeypatch: pytest.MonkeyPatch, unknown: bool) -> None:
    """The inventory's connection failed while the change was being committed and the
    database could not say whether it was (OutcomeUnknown): the 503 says so, not "nothing
    was changed", and the audit entry says "503 outcome unknown", not the plain "503" of a
    change that failed (the other case, unchanged)."""
    from netboot.errors import OutcomeUnknown, StoreError

    failure = (OutcomeUnknown("connection lost during COMMIT") if unknown
               else StoreError("database is locked"))

    async def broken(*args: object, **kwargs: object) -> None:
        raise failure

    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    apply_batch = store(env).apply_batch

    async def report_broken(batch: Batch) -> None:
        if batch.events:
            raise failure  # the report and its entry: the audit entries after it are written
        await apply_batch(batch)

    monkeypatch.setattr(store(env), "put_profile", broken)
    monkeypatch.setattr(store(env), "apply_batch", report_broken)
    profile = error(await call(env, "POST", "/api/v1/profiles",
                               json_body={"name": "p", "kernel": "vmlinuz"}), 503)
    report = error(await call(env, "POST", f"/api/v1/machines/{MAC}/events",
                              json_body={"kind": "installed"},
                              headers={"Authorization": f"Bearer {token}"}, admin=False), 503)
    # The same report through the front door (a real socket: Api.front_post).
    front = await front_report(env, token)
    for answer in (profile, report, front):
        assert answer.get("outcome") == ("unknown" if unknown else None), answer
        assert ("nothing was changed" in answer["error"]) is not unknown
    monkeypatch.undo()
    log = await env.get("/api/v1/audit")
    outcome = "503 outcome unknown" if unknown else "503"
    assert entries(log, "POST /api/v1/profiles")[-1] == ("admin", "", outcome)  # after seed's
    assert [e for _, _, e in entries(log, "POST /api/v1/machines/{ref}/events")] == [
        outcome, outcome]


@pytest.mark.parametrize("register", [False, True])
async def test_a_report_told_unknown_that_was_written_is_audited_once(
        env: Env, monkeypatch: pytest.MonkeyPatch, register: bool) -> None:
    """A device's report (or registration) through the front door whose commit, with its
    own audit entry ("201", "200"), was written though the store could not say so
    (OutcomeUnknown): one entry, "503 outcome unknown (written)": the client's status, and
    what became of the change. Before: two entries for one request, the change's and "503
    outcome unknown"."""
    from netboot.errors import OutcomeUnknown

    await env.seed()
    await machine(env)
    token = install_token(await boot(env, MAC))
    apply_batch = store(env).apply_batch

    async def report_lost(batch: Batch) -> None:
        await apply_batch(batch)
        if batch.events and batch.audit:  # the change and its entry: committed, then lost
            raise OutcomeUnknown("connection lost during COMMIT")

    monkeypatch.setattr(store(env), "apply_batch", report_lost)
    answer = await front_report(env, token, register=register)
    assert answer.get("outcome") == "unknown", answer
    monkeypatch.undo()
    log = await env.get("/api/v1/audit")
    route = "POST /api/v1/register" if register else "POST /api/v1/machines/{ref}/events"
    assert [e for _, _, e in entries(log, route)] == ["503 outcome unknown (written)"]
    kinds = [e["kind"] for e in await env.get(f"/api/v1/machines/{MAC}/events")]
    assert kinds.count("registered" if register else "installed") == 1


async def test_refused_requests_of_one_peer_cannot_flush_the_audit_log(env: Env) -> None:
    """Every API change asked, refused or not, is an audit entry, and the newest 100,000 are
    kept: any host on the provisioning network could send 100,000 refused POSTs (a
    registration without a body, a report about no machine, no token: a write each) and
    push every earlier entry out, an operator's deletions among them, in about a minute
    (s34-attack). A peer's refused requests are recorded up to access.REFUSED_BURST at once
    (REFUSED_RATE a second after); past it they are counted, told in one log line and in
    one entry when the peer is recorded again, and what others do is recorded as ever."""
    from netboot.access import REFUSED_BURST, REFUSED_RATE

    store = env.service.store
    before = len(await store.list_audit(limit=1_000_000))
    started = time.monotonic()
    for n in range(3 * REFUSED_BURST):
        r = await call(env, "POST", "/api/v1/register" if n % 2 else
                       "/api/v1/machines/52:54:00:99:99:99/events",
                       json_body={"kind": "x"} if n % 2 == 0 else {"mac": "nope"}, admin=False)
        assert r.status in (400, 401, 403), (r.status, r.text)
    # The budget refills at REFUSED_RATE while the requests are sent (a loaded machine takes
    # seconds over them): that much more may be recorded, never the 3x a flood sends.
    refill = int((time.monotonic() - started) * REFUSED_RATE) + 1
    refused = (await store.list_audit(limit=1_000_000))[before:]
    assert REFUSED_BURST <= len(refused) <= REFUSED_BURST + 1 + refill, (len(refused), refill)
    # An operator's change is recorded as ever.
    await env.post("/api/v1/clusters", {"name": "after", "token": "t"}, status=201)
    last = (await store.list_audit(limit=1))[-1]
    assert last.action == "POST /api/v1/clusters" and last.outcome == "201"


async def test_refused_requests_from_many_addresses_cannot_flush_the_audit_log(env: Env) -> None:
    """The budget above was per address, and a host on the provisioning network can take
    many: 1,700 addresses' bursts pushed out every entry kept (s35-attack). All peers'
    refused requests together are recorded up to access.REFUSED_ALL_BURST at once. Real
    connections from 70 loopback addresses (127.0.5.x), 10 refused POSTs each: under each
    address's own budget, over all's."""
    import aiohttp

    from netboot.access import REFUSED_ALL_BURST, REFUSED_ALL_RATE

    store = env.service.store
    before = len(await store.list_audit(limit=1_000_000))
    url = f"http://{env.client.host}:{env.client.port}/api/v1/register"
    started = time.monotonic()
    sent = 0
    for host in range(70):
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.5.{host + 1}", 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(10):
                async with session.post(url, json={"mac": "nope"}) as resp:
                    assert resp.status == 400
                sent += 1
    assert sent > REFUSED_ALL_BURST
    refill = int((time.monotonic() - started) * REFUSED_ALL_RATE) + 1
    refused = (await store.list_audit(limit=1_000_000))[before:]
    assert {e.peer for e in refused} <= {f"127.0.5.{h}" for h in range(1, 71)}
    assert REFUSED_ALL_BURST <= len(refused) <= REFUSED_ALL_BURST + refill, (len(refused),
                                                                           refill)


# --- the event stream (GET /api/v1/events/stream) at fleet scale (s36-ops) --------------------


async def _open_stream(env: Env) -> Any:
    resp = await env.client.get("/api/v1/events/stream", headers=env.auth)
    assert resp.status == 200
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"retry: 3000")
    # Then what stands (sent as it opens, an empty list too), and the comment saying so.
    assert (await resp.content.readuntil(b"\n\n")).startswith(b"event: warnings\n")
    assert await resp.content.readuntil(b"\n\n") == b": connected\n\n"
    return resp


async def test_a_page_far_down_the_list_by_mac_is_the_same_read_from_the_other_end(
        env: Env) -> None:
    """A page in the far half of the list by MAC is read from the list's other end and
    reversed (the dashboard's "last" of 100,000 machines stepped over 99,950 rows): every
    page, both directions, a filter too, is the slice of the whole list it was (machines
    without a MAC included), and a page past the end is empty."""
    rows = [{"mac": f"52:54:00:ee:00:{i:02x}", "hostname": f"p{i:02d}",
             "labels": {"rack": "a" if i % 3 else "b"}} for i in range(23)]
    rows += [{"uuid": f"4c4c4544-0000-1000-8000-0000000000{i:02d}", "hostname": f"u{i}",
              "labels": {"rack": "a"}} for i in range(4)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    for query in ("", "&label=rack=a"):
        for order in ("asc", "desc"):
            whole = await env.get(f"/api/v1/machines?limit=1000&order={order}{query}")
            names = [m["hostname"] for m in whole["items"]]
            assert len(names) == whole["total"] == (27 if not query else 19)
            # No MAC: last, and first the other way (the order's mirror).
            assert (names[-4:] if order == "asc" else names[:4][::-1]) == [
                "u0", "u1", "u2", "u3"]
            for limit in (1, 5, 10):
                for offset in range(0, len(names) + 2):
                    page = await env.get(f"/api/v1/machines?limit={limit}&offset={offset}"
                                         f"&order={order}{query}")
                    assert [m["hostname"] for m in page["items"]] == \
                        names[offset:offset + limit], (order, query, limit, offset)
                    assert page["total"] == len(names) and page["offset"] == offset


async def test_a_stream_resumed_by_its_last_event_id_is_given_its_gap_or_told_missed(
        env: Env) -> None:
    """EventSource reconnects with the last id it read (``Last-Event-ID``, HTML's server-sent
    events): the stream resumes there, with what was published in the gap (nobody was
    subscribed then); a takeover's ``?last_event_id=`` likewise. A place of another process
    (a restart) or not an id of ours is told ``missed`` (the dashboard reloads what it
    shows). Before, every stream started at the present: the gap's events were lost."""
    async def frames_until(resp: Any, kind: bytes) -> dict[str, str]:
        while True:
            frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            fields = dict(line.split(": ", 1) for line in frame.decode().strip().split("\n")
                          if not line.startswith(":") and ": " in line)
            if fields.get("event") == kind.decode():
                return fields

    resp = await env.client.get("/api/v1/events/stream", headers=env.auth)
    first = await resp.content.readuntil(b"\n\n")
    place = re.search(rb"\nid: (\S+)\n", first)
    assert place is not None, first  # a new stream's place, before any event
    resp.close()
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "gap-1"}, status=201)
    for how in ({"headers": {**env.auth, "Last-Event-ID": place.group(1).decode()}},
                {"headers": env.auth, "params": {"last_event_id": place.group(1).decode()}}):
        resp = await env.client.get("/api/v1/events/stream", **how)
        try:
            given = await frames_until(resp, b"machine")
            assert json.loads(given["data"])["kind"] == "enrolled"
            assert given["id"].split(".")[0] == place.group(1).decode().split(".")[0]
        finally:
            resp.close()
    for foreign in ("0badf00d.1", "not-an-id", "x." + "9" * 30):
        resp = await env.client.get("/api/v1/events/stream",
                                    headers={**env.auth, "Last-Event-ID": foreign})
        try:
            assert resp.status == 200
            assert (await frames_until(resp, b"missed"))["data"] == "0"
        finally:
            resp.close()


async def test_a_resumed_stream_its_reader_does_not_read_holds_a_bounded_part_of_its_gap(
        env: Env) -> None:
    """960 events of ~16 KB are kept (16 machines' burst of 60 reports each, a log in each
    one's data, each under http.max_event_bytes: their install tokens' or an operator's);
    a read credential opens a stream resuming from before them (Last-Event-ID) and does
    not read. The gap was written as one chunk, every event of it joined: ~15 MB, of which
    the kernel's socket buffer takes at most 4 MB (tcp_wmem) and the rest, ~11 MB, was held
    in the server's memory for that reader, per stream (32 a token, 256 in all). Now it is
    written a part at a time, each once the last has left; a reader that reads gets all
    of it, in order (s48-attack). Real sockets, the real report route."""
    macs = [f"52:54:00:48:00:{i:02x}" for i in range(16)]
    for mac in macs:
        await env.post("/api/v1/machines", {"mac": mac}, status=201)
    resp = await env.client.get("/api/v1/events/stream", headers=env.auth)
    first = await resp.content.readuntil(b"\n\n")
    place = re.search(rb"\nid: (\S+)\n", first)
    assert place is not None, first
    resp.close()
    for i in range(960):  # in order: the reader is to be given them in this order
        await env.post(f"/api/v1/machines/{macs[i // 60]}/events",
                       {"kind": "progress", "message": f"{i:03d}",
                        "data": {"log": "x" * 15_900}}, status=201)
    server = env.client.server.runner.server  # type: ignore[union-attr]
    assert server is not None

    def buffered() -> int:
        return sum(h.transport.get_write_buffer_size() for h in server.connections
                   if h.transport is not None)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, ("127.0.0.1", env.client.port))
        await loop.sock_sendall(sock, (
            f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {env.admin}\r\n"
            f"Last-Event-ID: {place.group(1).decode()}\r\n\r\n").encode())
        most = 0
        for _ in range(100):  # the stream's first writes, the reader reading nothing
            await asyncio.sleep(0.01)
            most = max(most, buffered())
        got = bytearray()
        mark, frames = b"event: machine\n", 0
        while frames < 960 or not got.endswith(b"\n\n\r\n"):  # a chunk's end
            most = max(most, buffered())
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10)
            assert chunk, bytes(got[-200:])
            got += chunk
            frames += got.count(mark, max(0, len(got) - len(chunk) - len(mark) + 1))
    finally:
        sock.close()
    told = re.findall(rb'"message": ?"(\d{3})", ?"data": ?{"log": ?"x{15900}"}', got)
    assert told == [f"{i:03d}".encode() for i in range(960)]
    assert most <= 1 << 20, most  # main: ~11 MB


async def test_the_event_stream_tells_the_inventorys_health_as_it_opens_and_changes(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's banner asked GET /api/v1/status (the fleet's counts too) every 15 s
    per open tab (s41-ops). Now the stream it has open says the inventory's health as
    GET /status's ``inventory`` does: as it opens, then when it changes (down, then up
    again), and nothing more while it stays. Real HTTP."""
    from netboot import api

    monkeypatch.setattr(api, "SSE_HEALTH_SECONDS", 0.05)

    async def told(resp: Any) -> dict[str, Any]:
        while True:
            frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            if b"\nevent: inventory\n" in b"\n" + frame:
                return dict(json.loads(frame.split(b"data: ", 1)[1]))
            if frame == b"event: warnings\ndata: []\n\n":
                continue  # as it opens: nothing stands
            assert frame.startswith(b":"), frame  # nothing else is sent meanwhile

    stream = await env.client.get("/api/v1/events/stream", headers=env.auth)
    assert stream.status == 200
    try:
        status = (await env.get("/api/v1/status"))["inventory"]
        assert await told(stream) == status == {"state": "ok", "detail": None}
        health = env.service.boot.health
        health.failed("disk full: No space left on device", answers=True)
        degraded = await told(stream)
        assert degraded["state"] == "degraded" and "No space left" in degraded["detail"]
        assert degraded == (await env.get("/api/v1/status"))["inventory"]
        health.restored()
        assert await told(stream) == {"state": "ok", "detail": None}
    finally:
        stream.close()


async def test_one_token_holds_at_most_its_share_of_the_event_streams(env: Env) -> None:
    """One read token could hold every one of the server's 256 streams (and every other
    dashboard was refused): now ``max_per_holder`` a token, told with a 429 that names the
    limit; another token still opens one (tests/test_events.py: a slot given back)."""
    bus = env.service.events
    bus.max_per_holder = 2
    made = await env.post("/api/v1/tokens", {"name": "wall", "scope": "read"}, status=201)
    wall = {"Authorization": f"Bearer {made['token']}"}
    held = []
    try:
        for _ in range(2):
            resp = await env.client.get("/api/v1/events/stream", headers=wall)
            assert resp.status == 200
            held.append(resp)
        refused = await env.client.get("/api/v1/events/stream", headers=wall)
        assert refused.status == 429 and refused.headers["Retry-After"] == "30"
        said = (await refused.json())["error"]
        assert "token 'wall' holds 2 event streams already" in said, said
        assert "256 in all" in said, said
        held.append(await _open_stream(env))  # the admin token: its own share
        assert bus.subscribers == 3
    finally:
        for resp in held:
            resp.close()


def _burst(n: int, start: int = 0) -> list[Event]:
    return [Event(f"m-{i}", 1_800_000_000.0 + i, "dhcp", f"seen {i}") for i in
            range(start, start + n)]


async def test_a_burst_of_events_is_one_write_and_one_encoding_for_every_stream(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A storm's group commit publishes hundreds of events at once: each open dashboard
    got a write per event (a send and a TCP segment each) and each event was encoded once
    per open dashboard. Now: one write a burst a stream, one encoding an event."""
    streams = [await _open_stream(env) for _ in range(3)]
    try:
        encoded: list[str] = []
        real = codec.event_to_dict
        monkeypatch.setattr(codec, "event_to_dict",
                            lambda e: encoded.append(e.machine) or real(e))
        writes: list[bytes] = []
        write = web.StreamResponse.write

        async def counted(self: web.StreamResponse, data: bytes) -> None:
            if b"event: machine" in data:
                writes.append(bytes(data))
            await write(self, data)

        monkeypatch.setattr(web.StreamResponse, "write", counted)
        env.service.events.published(_burst(200))
        for resp in streams:
            got = b""
            while got.count(b"event: machine") < 200:
                got += await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            messages = [json.loads(line[6:]) for line in got.split(b"\n")
                        if line.startswith(b"data: ")]
            assert [m["message"] for m in messages] == [f"seen {i}" for i in range(200)]
        assert len(writes) == 3  # one per stream
        assert sorted(encoded) == sorted(f"m-{i}" for i in range(200))  # once each
    finally:
        for resp in streams:
            resp.close()


async def test_a_stream_that_never_reads_holds_bounded_memory_and_is_let_go(
        make_env: EnvFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dashboard tab that stopped reading (a frozen browser, a suspended laptop) while a
    storm publishes: what the server buffers for it is bounded (its queue, then "missed";
    the connection's write buffer at its high-water mark), and once its data stays
    unacknowledged for http.send_timeout its connection is dropped and its stream's slot
    given back (EventBus.max_subscribers)."""
    env = await make_env(http="  send_timeout: 3\n")
    bus = env.service.events
    buffered: list[int] = []
    write = web.StreamResponse.write

    async def watched(self: web.StreamResponse, data: bytes) -> None:
        await write(self, data)
        assert self._req is not None and self._req.transport is not None
        buffered.append(self._req.transport.get_write_buffer_size())

    monkeypatch.setattr(web.StreamResponse, "write", watched)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (env.client.host, env.client.port))
        await loop.sock_sendall(sock, (
            f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {env.admin}\r\n\r\n").encode())
        for _ in range(100):
            if bus.subscribers:
                break
            await asyncio.sleep(0.02)
        assert bus.subscribers == 1
        for k in range(40):  # 20,000 events; the reader takes none past its few KiB
            bus.published(_burst(500, k * 500))
            await asyncio.sleep(0.01)
        assert buffered and max(buffered) < 1 << 20, max(buffered)
        # Dropped by the kernel (TCP_USER_TIMEOUT = send_timeout), the slot is free again.
        for _ in range(200):
            if not bus.subscribers:
                break
            await asyncio.sleep(0.05)
        assert bus.subscribers == 0
    finally:
        sock.close()


async def test_a_stream_opened_with_a_token_ends_once_the_token_is_revoked(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An event stream was authenticated when it opened, then lasted as long as its reader:
    a revoked (or expired) token's stream kept receiving every machine event, and kept its
    slot of EventBus.max_subscribers, for good (s37-attack). Now its token is checked again
    before anything more is sent, and the stream ends; a valid token's stream goes on."""
    from netboot import api

    monkeypatch.setattr(api, "SSE_RECHECK_SECONDS", 0.2)
    monkeypatch.setattr(api, "SSE_KEEPALIVE_SECONDS", 0.2)
    made = await env.post("/api/v1/tokens", {"name": "leaked", "scope": "read"}, status=201)
    reader = {"Authorization": f"Bearer {made['token']}"}
    leaked = await env.client.get("/api/v1/events/stream", headers=reader)
    kept = await _open_stream(env)
    assert leaked.status == 200
    assert (await leaked.content.readuntil(b"\n\n")).startswith(b"retry: 3000")
    try:
        r = await call(env, "DELETE", "/api/v1/tokens/leaked")
        assert r.status == 204
        await asyncio.sleep(0.5)
        env.service.events.published(_burst(3))
        got = b""
        while got.count(b"event: machine") < 3:
            got += await asyncio.wait_for(kept.content.readuntil(b"\n\n"), 10)
        rest = await asyncio.wait_for(leaked.content.read(), 10)  # ends: b"" at its end
        assert b"event: machine" not in rest, rest
        assert leaked.content.at_eof()
        for _ in range(100):
            if env.service.events.subscribers == 1:
                break
            await asyncio.sleep(0.02)
        assert env.service.events.subscribers == 1  # the revoked one's slot given back
    finally:
        leaked.close()
        kept.close()



# --- an enroll token (a factory-floor scanner) changes and reads nothing (s37-attack) --------


async def _scanner(env: Env) -> dict[str, str]:
    made = await env.post("/api/v1/tokens", {"name": "scanner", "scope": "enroll"}, status=201)
    return {"Authorization": f"Bearer {made['token']}"}


@pytest.mark.parametrize("route", ["import", "bulk"])
async def test_an_enroll_token_cannot_change_a_machine_through_an_import(
        env: Env, route: str) -> None:
    """PATCH needs scope operator; an enroll token's import of a row naming an enrolled
    machine updated it all the same: renamed, made a server, labelled and pinned to an
    address of the token holder's choosing (a machine with fixed_ipv4 installs only from
    that address and registers it: its install, the cluster's join token and the
    endpoint's name go there). Now such a row is an error naming no machine; new machines
    and discovered records are enrolled as before."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1", "serial": "SN-1"},
                   status=201)
    await env.client.get("/ipxe", params={"mac": "52:54:00:00:00:77", "arch": "x86_64"})
    scanner = await _scanner(env)
    rows = [{"mac": MAC, "hostname": "evil-1", "role": "server", "fixed_ipv4": "192.0.2.66",
             "labels": {"owned": "yes"}},
            {"serial": "SN-1", "hostname": "evil-2"}]
    for row in rows:
        if route == "bulk":
            r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [row]},
                           headers=scanner, admin=False)
        else:
            body = json.dumps([row])
            r = await call(env, "POST", "/api/v1/machines:import?format=json", data=body,
                           headers={**scanner, "Content-Type": "application/json"},
                           admin=False)
        assert r.status == 400, (r.status, r.text)
        report = r.json()
        assert report["changed"] == [] and report["applied"] is False, report
        assert "scope operator" in report["errors"][0]["message"], report
        assert MAC not in r.text and "edge-1" not in r.text, r.text
    stored = await env.get(f"/api/v1/machines/{MAC}")
    assert (stored["hostname"], stored["role"], stored["fixed_ipv4"], stored["labels"]) == (
        "edge-1", None, None, {})
    # What a scanner is for still works: a new machine, and a discovered record enrolled.
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [
        {"mac": "52:54:00:00:00:88", "hostname": "new-1"}, {"mac": "52:54:00:00:00:77"}]},
        headers=scanner, admin=False)
    assert r.status == 201, r.text
    assert (await env.get("/api/v1/machines/52:54:00:00:00:77"))["state"] == "enrolled"
    # An operator's import still updates.
    r = await call(env, "POST", "/api/v1/machines:bulk",
                   json_body={"machines": [{"mac": MAC, "hostname": "edge-9"}]})
    assert r.status == 201 and r.json()["changed"] == [MAC], r.text


async def test_an_enroll_token_makes_no_server_node_and_changes_no_enrolled_machine(
        env: Env) -> None:
    """A scanner's token made k3s **server** nodes: created, imported or approved with
    ``role: server`` (S38 left it). The first server of a managed cluster forms it, its
    registered address is the cluster's endpoint (where every later node sends its join
    token) and its config carries the cluster's k3s CA key: a control-plane join from a
    factory-floor credential. And its approval of a machine enrolled already (not yet
    booted) changed that machine's cluster, role, profile and hostname, which PATCH and an
    import refuse it (s39-attack). Now both need scope operator; what a scanner is for
    (agents, discovered records approved, an approval repeated) still works."""
    await env.seed(server_url="managed")
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1"}, status=201)
    discovered = "52:54:00:00:00:77"
    await env.client.get("/ipxe", params={"mac": discovered, "arch": "x86_64"})
    scanner = await _scanner(env)
    server = {"cluster": "edge", "role": "server", "profile": "k3os"}
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC2, **server},
                   headers=scanner, admin=False)
    assert error(r, 403)["scope"] == "operator" and "server" in r.text, r.text
    for route in ("bulk", "import"):
        rows = [{"mac": "52:54:00:00:00:88", **server}]
        if route == "bulk":
            r = await call(env, "POST", "/api/v1/machines:bulk",
                           json_body={"machines": rows}, headers=scanner, admin=False)
        else:
            r = await call(env, "POST", "/api/v1/machines:import?format=json",
                           data=json.dumps(rows), admin=False,
                           headers={**scanner, "Content-Type": "application/json"})
        assert r.status == 400, (route, r.status, r.text)
        assert [(e["field"], "scope operator" in e["message"]) for e in r.json()["errors"]] \
            == [("role", True)], r.text
    for ref, body in ((discovered, {"role": "server"}), (MAC, {"role": "server"}),
                      (MAC, {"cluster": "edge", "hostname": "evil-1"})):
        r = await call(env, "POST", f"/api/v1/machines/{ref}/approve", json_body=body,
                       headers=scanner, admin=False)
        assert error(r, 403)["scope"] == "operator", (ref, body, r.text)
    for ref in (MAC2, "52:54:00:00:00:88"):
        assert (await call(env, "GET", f"/api/v1/machines/{ref}")).status == 404
    stored = await env.get(f"/api/v1/machines/{MAC}")
    assert (stored["hostname"], stored["cluster"], stored["role"]) == ("edge-1", None, None)
    assert (await env.get(f"/api/v1/machines/{discovered}"))["state"] == "discovered"
    # What a scanner is for: an agent, a discovered record approved, the approval repeated.
    r = await call(env, "POST", "/api/v1/machines", json_body={
        "mac": MAC2, "cluster": "edge", "role": "agent"}, headers=scanner, admin=False)
    assert r.status == 201, r.text
    for _ in range(2):
        r = await call(env, "POST", f"/api/v1/machines/{discovered}/approve",
                       json_body={"hostname": "found-1"}, headers=scanner, admin=False)
        assert r.status == 200, r.text
    assert (await env.get(f"/api/v1/machines/{discovered}"))["state"] == "enrolled"
    # An operator makes servers and changes enrolled machines, as before.
    operator = {"Authorization": f"Bearer {await scoped_token(env, 'operator')}"}
    r = await call(env, "POST", "/api/v1/machines", json_body={
        "mac": "52:54:00:00:00:99", **server}, headers=operator, admin=False)
    assert r.status == 201, r.text
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={
        "role": "server", "cluster": "edge", "profile": "k3os"}, headers=operator, admin=False)
    assert r.status == 200 and r.json()["role"] == "server", r.text


async def test_an_enroll_token_is_not_told_which_machine_holds_a_name(env: Env) -> None:
    """A scanner's create of a serial or hostname another machine holds is refused (409) and
    its import row too, without naming the holder: "serial SN-1 already belongs to machine
    m-… (52:54:…)" and "'edge-1' is used by 52:54:…" mapped the fleet's serials and
    hostnames to the MACs with which a host on the VLAN asks for a machine's install."""
    await env.seed()
    await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1", "serial": "SN-1"},
                   status=201)
    scanner = await _scanner(env)
    for body in ({"serial": "SN-1"}, {"mac": "52:54:00:00:00:99", "hostname": "edge-1"},
                 {"mac": MAC}):
        r = await call(env, "POST", "/api/v1/machines", json_body=body, headers=scanner,
                       admin=False)
        found = error(r, 409)
        assert "holder" not in found and MAC not in r.text and "m-" not in r.text, r.text
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [
        {"mac": "52:54:00:00:00:99", "hostname": "edge-1"}]}, headers=scanner, admin=False)
    assert r.status == 400 and MAC not in r.text, r.text
    # An operator is told, as before.
    r = await call(env, "POST", "/api/v1/machines", json_body={"serial": "SN-1"})
    assert error(r, 409)["holder"] and MAC in r.text


async def test_an_enroll_token_cannot_name_a_machine_by_its_hostname(env: Env) -> None:
    """A hostname in the path (core.machine_ref, s40-ops) let a scanner's token, which may
    approve, learn the MAC of any machine whose hostname it guessed (``edge-1``, ``rack1-a``):
    an approval repeated on an enrolled machine answers the machine, and one refused names
    it by its MAC, the mapping s37-attack took away from this token (a host on the VLAN asks
    for a machine's install with its MAC). A token that may not read names machines by MAC
    or id, as before; an operator's hostname still works."""
    await env.seed()
    machine_id = (await env.post("/api/v1/machines", {
        "mac": MAC, "hostname": "edge-1", "profile": "k3os"}, status=201))["id"]
    scanner = await _scanner(env)
    for body in ({}, {"hostname": "edge-1"}):
        r = await call(env, "POST", "/api/v1/machines/edge-1/approve", json_body=body,
                       headers=scanner, admin=False)
        assert r.status == 400 and MAC not in r.text and machine_id not in r.text, r.text
    r = await call(env, "POST", "/api/v1/machines/nobody-9/approve", json_body={},
                   headers=scanner, admin=False)
    assert r.status == 400, r.text  # a hostname nobody has: told as one somebody has
    r = await call(env, "POST", f"/api/v1/machines/{MAC}/approve", json_body={},
                   headers=scanner, admin=False)
    assert r.status == 200, r.text  # by its MAC, as before
    operator = {"Authorization": f"Bearer {await scoped_token(env, 'operator')}"}
    r = await call(env, "POST", "/api/v1/machines/edge-1/approve", json_body={},
                   headers=operator, admin=False)
    assert r.status == 200 and r.json()["mac"] == MAC, r.text


async def test_a_read_token_never_sees_a_join_token_in_a_render_whatever_its_characters(
        env: Env) -> None:
    """``render`` masked the join token by replacing its text in the rendered output; the
    configs write it through ``tojson``, which escapes ``<``, ``>``, ``&`` and ``'`` as
    ``\\u003c``… (Jinja2) and ``"``, ``\\`` and non-ASCII as JSON does: a token an operator
    chose with such a character was handed whole, escaped, to any read token
    (checked on the wire, s37-attack). Now the token is replaced before rendering."""
    secret = "K10pa<ss>&w0rd'Z\"q\\é-5f3a"
    await env.seed()
    await env.post("/api/v1/clusters", {"name": "lab", "server_url": "https://192.0.2.50:6443",
                                        "token": secret}, status=201)
    await env.post("/api/v1/machines", {"mac": MAC, "cluster": "lab", "role": "agent",
                                        "profile": "k3os"}, status=201)
    made = await env.post("/api/v1/tokens", {"name": "dash", "scope": "read"}, status=201)
    reader = {"Authorization": f"Bearer {made['token']}"}
    for kind in ("config", "nocloud"):
        text = await env.get(f"/api/v1/machines/{MAC}/render/{kind}?arch=x86_64",
                             headers=reader)
        assert "w0rd" not in text and "5f3a" not in text, text
        assert "********" in text, text


async def test_an_import_file_is_parsed_while_the_server_goes_on_answering(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import file was parsed on the event loop's thread: one 1 MiB YAML file (a flow
    list of 340,000 empty mappings) from an ``enroll`` token, the weakest that may post
    one, held every DHCP, TFTP and HTTP answer for 20 s of CPU (PyYAML's pure-Python
    parser, twice), on the wire 91 s at the VM's load with /healthz unanswered
    (s38-attack). Now it is parsed in a thread: here the parse waits for a request the
    loop answers meanwhile, which a parse on the loop's thread would hold up."""
    import threading

    from netboot import api as api_module

    answered = threading.Event()
    real = api_module.parse_import
    threads = []

    def parse(text: str, fmt: str) -> list[tuple[int, dict[str, Any]]]:
        threads.append(threading.get_ident())
        assert answered.wait(5), "the loop answered nothing while the file was parsed"
        return real(text, fmt)

    monkeypatch.setattr(api_module, "parse_import", parse)
    scanner = await _scanner(env)
    importing = asyncio.ensure_future(call(
        env, "POST", "/api/v1/machines:import?format=yaml",
        data="- mac: 52:54:00:00:38:09\n  hostname: scanned-9\n",
        headers={**scanner, "Content-Type": "application/yaml"}, admin=False))
    for _ in range(500):  # until the parse started (on the loop's thread, it holds it 5 s)
        if threads:
            break
        await asyncio.sleep(0.01)
    healthz = await env.client.get("/healthz")
    assert healthz.status == 200
    answered.set()
    r = await importing
    assert r.status == 201 and r.json()["created"] == ["52:54:00:00:38:09"], r.text
    assert threads and threads[0] != threading.get_ident()


async def test_an_imports_row_checks_let_the_loop_answer_between_them(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """An import's rows were checked in one run of the loop's thread: 340,000 rows of a
    1 MiB file (every one an error) held every DHCP, TFTP and HTTP answer for ~1.4 s, an
    ``enroll`` token's to repeat (s38-attack, left). Now the loop takes its other work
    between chunks of rows: a datagram sent to this loop once the check began is received
    before it ends."""
    import socket

    from netboot.enroll import Enroller

    got: list[bytes] = []

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.append(data)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    seen: list[bool] = []
    real = Enroller._row_values

    def checked(self: Enroller, row: Any, *args: Any) -> Any:
        if not seen:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"dhcp", ("127.0.0.1", port))
        seen.append(bool(got))
        return real(self, row, *args)

    monkeypatch.setattr(Enroller, "_row_values", checked)
    try:
        scanner = await _scanner(env)
        r = await call(env, "POST", "/api/v1/machines:bulk",
                       json_body={"machines": [{}] * 3000}, headers=scanner, admin=False)
    finally:
        transport.close()
    assert r.status == 400 and r.json()["errors_total"] == 3000, r.text[:300]
    assert len(seen) == 3000 and seen[-1], "the datagram waited for every row's check"


@pytest.mark.parametrize("route", ["bulk", "import"])
async def test_an_imports_answer_lists_the_first_thousand_bad_rows(env: Env, route: str) -> None:
    """An import's answer listed every bad row: one 1 MiB body of 340,000 (``[{},{},…]``)
    was a 37 MB answer and ~2.8 s of the event loop's JSON encoding, every DHCP, TFTP and
    HTTP answer held meanwhile, an ``enroll`` token's to repeat (s39-attack). Now it lists
    the first ERRORS_SHOWN by line and counts them all in ``errors_total`` (only then)."""
    scanner = await _scanner(env)
    rows = [{}] * 1500 + [{"mac": "not-a-mac"}]
    if route == "bulk":
        r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows},
                       headers=scanner, admin=False)
    else:
        r = await call(env, "POST", "/api/v1/machines:import?format=json",
                       data=json.dumps(rows), admin=False,
                       headers={**scanner, "Content-Type": "application/json"})
    assert r.status == 400, r.text[:300]
    report = r.json()
    assert len(report["errors"]) == 1000, len(report["errors"])
    assert api_module.ERRORS_SHOWN == 1000
    assert report["errors_total"] == 1501 and report["applied"] is False
    lines = [e["line"] for e in report["errors"]]
    assert lines == sorted(lines) and "not-a-mac" not in r.text  # the first, by line
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [{}]},
                   headers=scanner, admin=False)
    assert r.status == 400 and "errors_total" not in r.json(), r.text


async def test_a_registration_body_is_bounded_as_a_report_is(env: Env) -> None:
    """Anyone on the provisioning network may POST /api/v1/register over plain HTTP, and
    its body was parsed up to http.max_body_bytes (1 MiB of JSON: ~53 ms of the one event
    loop's CPU per request, before any token is looked at; s37-attack left it). A device's
    registration is a few hundred bytes: bounded by http.max_event_bytes (16 KiB), as its
    reports are, at both doors (the front door hands a larger one to aiohttp's, which
    answers 413 without reading it) (s38-attack)."""
    await env.seed()
    big = json.dumps({"mac": MAC, "token": "nope", "addresses": ["192.0.2.9" * 2000]})
    assert 16_384 < len(big) < 1_048_576
    r = await call(env, "POST", "/api/v1/register", data=big,
                   headers={"Content-Type": "application/json"}, admin=False)
    error(r, 413, "body")
    small = json.dumps({"mac": MAC, "token": "nope", "addresses": ["192.0.2.9"] * 100})
    r = await call(env, "POST", "/api/v1/register", data=small,
                   headers={"Content-Type": "application/json"}, admin=False)
    error(r, 401)


async def test_two_machines_are_never_given_one_fixed_address(make_env: EnvFactory) -> None:
    """A fixed_ipv4 another machine has was stored (create, PATCH, bulk, import): two hosts
    answering ARP for one address, which DHCP only logged at offer time. dnsmasq refuses a
    dhcp-host address given twice unless both are one host's MACs. Now a 409 naming the
    other machine (create, PATCH) or the row's error (bulk, import, also two rows of one
    file), on SQLite and PostgreSQL; one machine's two NICs share its address, and a machine
    given its own address again is no conflict."""
    await one_fixed_address_each(await make_env())


async def test_two_machines_are_never_given_one_fixed_address_postgresql(
        make_env: EnvFactory, pg_dsn: str) -> None:
    await one_fixed_address_each(
        await make_env(f'inventory:\n  backend: postgresql\n  dsn: "{pg_dsn}"\n'))


async def one_fixed_address_each(env: Env) -> None:
    await env.post("/api/v1/machines", {"macs": ["52:54:00:40:00:01", "52:54:00:40:00:02"],
                                        "hostname": "holder", "fixed_ipv4": "192.0.2.50"},
                   status=201)
    reply = await call(env, "POST", "/api/v1/machines",
                       json_body={"mac": "52:54:00:40:00:03", "fixed_ipv4": "192.0.2.50"})
    body = error(reply, 409, "fixed_ipv4")
    assert "52:54:00:40:00:01 (holder)" in body["error"], body
    await env.post("/api/v1/machines", {"mac": "52:54:00:40:00:03",
                                        "fixed_ipv4": "192.0.2.51"}, status=201)
    reply = await call(env, "PATCH", "/api/v1/machines/52:54:00:40:00:03",
                       json_body={"fixed_ipv4": "192.0.2.50"})
    assert "holder" in json.dumps(error(reply, 409, "fixed_ipv4"))
    # Its own address again, and a PATCH of another field of the holder: no conflict.
    reply = await call(env, "PATCH", "/api/v1/machines/52:54:00:40:00:01",
                       json_body={"fixed_ipv4": "192.0.2.50", "hostname": "holder2"})
    assert reply.status == 200, reply.text
    reply = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [
        {"mac": "52:54:00:40:00:04", "fixed_ipv4": "192.0.2.50"},
        {"mac": "52:54:00:40:00:05", "fixed_ipv4": "192.0.2.60"},
        {"mac": "52:54:00:40:00:06", "fixed_ipv4": "192.0.2.60"}]})
    assert reply.status == 400, reply.text
    errors = reply.json()["errors"]
    assert [(e["line"], e["field"]) for e in errors] == [(1, "fixed_ipv4"), (3, "fixed_ipv4")]
    assert "52:54:00:40:00:01" in errors[0]["message"] and "line 2" in errors[1]["message"]
    reply = await call(env, "POST", "/api/v1/machines:import?format=csv",
                       data="mac,fixed_ipv4\n52:54:00:40:00:07,192.0.2.51\n",
                       headers={"Content-Type": "text/csv"})
    assert reply.status == 400 and "52:54:00:40:00:03" in reply.text, reply.text
    held = sorted((m.fixed_ipv4, m.ref) for m in await env.service.store.list_machines()
                  if m.fixed_ipv4)
    assert held == [("192.0.2.50", "52:54:00:40:00:01"), ("192.0.2.51", "52:54:00:40:00:03")]


async def test_an_imports_names_meet_the_inventorys_hostnames_in_any_case(
        make_env: EnvFactory) -> None:
    """Hostnames are one name in any case (RFC 4343; the store's unique index folds them,
    and a single enrollment's template asks the store by its case-folded look-up). An
    import compared its names with the inventory's case-sensitively: an inventory's
    ``Edge-SN2`` (written by an older netboot or by hand: the API stores names in lower
    case) made the template choose ``edge-sn2`` for an unnamed row, which the store refused
    at every one of import_rows' attempts (a 409 for a file that asked for no name), and a
    row naming ``edge-sn2`` for another machine was the store's 409 for the whole file, not
    the row's error. Now the template takes the next free name and the row is its line's
    error naming the holder, as for a name spelt alike (dnsmasq's dhcp-host names compare
    without case too)."""
    await names_in_any_case(make_env, "")


async def test_an_imports_names_meet_the_inventorys_hostnames_in_any_case_postgresql(
        make_env: EnvFactory, pg_dsn: str) -> None:
    await names_in_any_case(
        make_env, f'inventory:\n  backend: postgresql\n  dsn: "{pg_dsn}"\n')


async def names_in_any_case(make_env: EnvFactory, extra: str) -> None:
    env = await make_env(extra + 'enroll:\n  hostname_template: "edge-{serial}"\n')
    # As an older netboot stored it: the name as typed.
    await env.service.store.create_machine(Machine(
        macs=(MacAddress.parse("52:54:00:43:00:99"),), id="m-older", hostname="Edge-SN2"))
    reply = await call(env, "POST", "/api/v1/machines:import?format=csv",
                       data="mac,hostname\n52:54:00:43:00:01,EDGE-sn2\n",
                       headers={"Content-Type": "text/csv"})
    assert reply.status == 400, reply.text
    assert [(e["line"], e["field"]) for e in reply.json()["errors"]] == [(2, "hostname")]
    assert "'edge-sn2' is used by 52:54:00:43:00:99" in reply.json()["errors"][0]["message"]
    reply = await call(env, "POST", "/api/v1/machines:import?format=csv",
                       data="mac,serial\n52:54:00:43:00:02,SN2\n52:54:00:43:00:03,SN3\n",
                       headers={"Content-Type": "text/csv"})
    assert reply.status == 201, reply.text
    named = {m.ref: m.hostname for m in await env.service.store.list_machines()}
    assert named == {"52:54:00:43:00:99": "Edge-SN2", "52:54:00:43:00:02": "edge-sn2-2",
                     "52:54:00:43:00:03": "edge-sn3"}


async def test_two_machines_given_one_fixed_address_at_once_one_is_refused(
        env: Env) -> None:
    """Two API calls at once, each giving a machine 192.0.2.70: both read that no machine
    had it before either wrote, and both were stored. The check and the write now hold one
    lock of the server's: one 201 (or 200), the others 409, one machine holds it."""
    for n in range(4):
        await env.post("/api/v1/machines", {"mac": f"52:54:00:40:01:0{n}"}, status=201)
    replies = await asyncio.gather(
        *(call(env, "POST", "/api/v1/machines",
               json_body={"mac": f"52:54:00:40:02:0{n}", "fixed_ipv4": "192.0.2.70"})
          for n in range(3)),
        *(call(env, "PATCH", f"/api/v1/machines/52:54:00:40:01:0{n}",
               json_body={"fixed_ipv4": "192.0.2.70"}) for n in range(4)),
        call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": [
            {"mac": "52:54:00:40:03:01", "fixed_ipv4": "192.0.2.70"}]}))
    statuses = sorted(r.status for r in replies)
    assert statuses.count(409) + statuses.count(400) == len(replies) - 1, statuses
    held = [m.ref for m in await env.service.store.list_machines()
            if m.fixed_ipv4 == "192.0.2.70"]
    assert len(held) == 1, held


async def test_two_servers_on_one_postgresql_give_one_fixed_address_once(
        make_env: EnvFactory, pg_dsn: str, tmp_path: Any) -> None:
    """Two servers on one PostgreSQL, each asked at once to give a machine 192.0.2.71: each
    server's own lock let one call of each through, and both were stored. The check and
    the write hold a lock of the database's too (PostgresStore.fixed_addresses_held)."""
    extra = f'inventory:\n  backend: postgresql\n  dsn: "{pg_dsn}"\n'
    a = await make_env(extra, sub="a")
    (tmp_path / "b" / "data").mkdir(parents=True)
    key = a.service.config.data_dir / "secret.key"
    (tmp_path / "b" / "data" / "secret.key").write_bytes(key.read_bytes())
    (tmp_path / "b" / "data" / "secret.key").chmod(0o600)
    # The inventory's admin token is a's (made once per inventory): b's client sends it.
    token = a.service.config.data_dir / "admin.token"
    (tmp_path / "b" / "data" / "admin.token").write_bytes(token.read_bytes())
    b = await make_env(extra, sub="b")
    for n in range(6):
        await a.post("/api/v1/machines", {"mac": f"52:54:00:40:04:0{n}"}, status=201)
    replies = await asyncio.gather(*(
        call(env, "PATCH", f"/api/v1/machines/52:54:00:40:04:0{n}",
             json_body={"fixed_ipv4": "192.0.2.71"})
        for n, env in zip(range(6), (a, b) * 3, strict=True)))
    statuses = sorted(r.status for r in replies)
    assert statuses == [200, 409, 409, 409, 409, 409], statuses
    held = [m.ref for m in await a.service.store.list_machines()
            if m.fixed_ipv4 == "192.0.2.71"]
    assert len(held) == 1, held
async def test_a_machine_is_named_by_its_hostname_in_every_ref_route(env: Env) -> None:
    """Operators type hostnames (the dashboard and ``events`` name machines by them): every
    ``{ref}`` route takes one, any case. The id or MAC is looked up first, then the hostname;
    a hostname spelled as another machine's MAC (or id) is a 409 listing both, never either
    one: a DELETE must not take the machine the operator did not mean."""
    await env.seed()
    a = await machine(env, hostname="Edge-1", cluster="edge", profile="k3os")
    assert (await env.get("/api/v1/machines/EDGE-1"))["id"] == a["id"]
    patched = await call(env, "PATCH", "/api/v1/machines/edge-1",
                         json_body={"labels": {"rack": "r2"}})
    assert patched.status == 200, patched.text
    assert patched.json()["id"] == a["id"] and patched.json()["labels"] == {"rack": "r2"}
    explained = await env.get("/api/v1/machines/edge-1/explain")
    assert explained["known"] and explained["id"] == a["id"]
    rendered = await call(env, "GET", "/api/v1/machines/edge-1/render/ipxe")
    assert rendered.status == 200 and "#!ipxe" in rendered.text, rendered.text
    assert isinstance(await env.get("/api/v1/machines/edge-1/events"), list)
    # mark-installed by hand (an operator's report), as the CLI's does.
    marked = await call(env, "POST", "/api/v1/machines/Edge-1/events",
                        json_body={"kind": "installed"})
    assert marked.status == 201, marked.text
    assert (await env.get(f"/api/v1/machines/{MAC}"))["state"] == "installed"
    reinstalled = await call(env, "POST", "/api/v1/machines/edge-1/reinstall")
    assert reinstalled.status == 200 and reinstalled.json()["id"] == a["id"], reinstalled.text
    # A stranger learns nothing of a hostname: no token, 401, as for an unknown MAC.
    stranger = await env.client.post("/api/v1/machines/edge-1/events",
                                     json={"kind": "installed"})
    assert stranger.status == 401
    # A hostname nobody has: 404 saying what a ref may be.
    gone = error(await call(env, "GET", "/api/v1/machines/edge-9"), 404)
    assert "hostname" in gone["error"]
    error(await call(env, "DELETE", "/api/v1/machines/edge-9"), 404)

    # A hostname that is another machine's MAC in its bare form: both named, neither taken.
    compact = MAC.replace(":", "")
    b = await env.post("/api/v1/machines", {"mac": MAC2, "hostname": compact}, status=201)
    for method, path in (("GET", compact), ("DELETE", compact), ("GET", compact.upper()),
                         ("POST", f"{compact}/reinstall"), ("GET", f"{compact}/explain")):
        body = error(await call(env, method, f"/api/v1/machines/{path}"), 409, "ref")
        assert sorted(body["candidates"]) == sorted([a["id"], b["id"]]), body
    assert (await env.get(f"/api/v1/machines/{a['id']}"))["hostname"] == "edge-1"
    assert (await env.get(f"/api/v1/machines/{b['id']}"))["hostname"] == compact
    # The colon form cannot be a hostname: always the MAC, no 409; nor can the hyphen form
    # here (no machine has that hostname).
    assert (await env.get(f"/api/v1/machines/{MAC}"))["id"] == a["id"]
    assert (await env.get("/api/v1/machines/52-54-00-12-34-56"))["id"] == a["id"]
    # A MAC-shaped hostname whose MAC nobody has is that machine's name alone.
    c = await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:58",
                                            "hostname": "5254000000ff"}, status=201)
    assert (await env.get("/api/v1/machines/5254000000FF"))["id"] == c["id"]
    # ... and so is a hostname that starts as an id does, where no machine has that id.
    d = await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:59",
                                            "hostname": "m-rack1"}, status=201)
    assert (await env.get("/api/v1/machines/m-rack1"))["id"] == d["id"]
    r = await call(env, "DELETE", "/api/v1/machines/m-rack1")
    assert r.status == 204
    error(await call(env, "GET", f"/api/v1/machines/{d['id']}"), 404)
    # The audit names the machine a hostname named by its id (a hostname may be given to
    # another machine later).
    audit = await env.get("/api/v1/audit")
    entries = audit if isinstance(audit, list) else audit["items"]
    (removed,) = [e for e in entries
                  if e["action"].startswith("DELETE") and e["outcome"] == "204"]
    assert removed["target"] == d["id"], removed


async def test_the_event_stream_tells_what_stands_as_it_opens_even_when_nothing_does(
        env: Env) -> None:
    """The stream's ``event: warnings`` was sent as it opened only when a warning stood: a
    tab whose stream had shown one and reconnected (its server restarted with it fixed,
    another server behind the same name) was told nothing and kept the banner for good.
    Now it is sent as the stream opens whatever stands, an empty list too (as the
    inventory's health is), and agrees with GET /status. Real HTTP."""
    from netboot.standing import Notice

    async def opening(resp: Any) -> list[Any]:
        frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert frame.startswith(b"retry: 3000"), frame
        frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
        assert frame.startswith(b"event: warnings\n"), frame
        return list(json.loads(frame.split(b"data: ", 1)[1]))

    standing = env.service.standing
    standing.set("clusters-alike", [Notice("clusters-alike", "clusters edge, Edge ...",
                                           ("Edge", "edge"))])
    stream = await env.client.get("/api/v1/events/stream", headers=env.auth)
    try:
        said = await opening(stream)
        assert [w["kind"] for w in said] == ["clusters-alike"]
    finally:
        stream.close()
    standing.set("clusters-alike", ())  # fixed while the tab was away
    again = await env.client.get("/api/v1/events/stream", headers=env.auth)
    try:
        assert await opening(again) == [] == (await env.get("/api/v1/status"))["warnings"]
    finally:
        again.close()


async def test_refusals_give_the_operator_the_way_out(env: Env) -> None:
    """An unknown cluster, an approval refused by the machine's state and an identifier
    another machine holds: each 4xx named the problem and not what to do ("unknown cluster
    'other'", "'approve' is not allowed (allowed: install-plan, installed, reinstall)", "serial
    SN-1 already belongs to machine m-… (52:54:…)", s47-review). The body keeps its error,
    field and holder; its error says the command and the request that get past it."""
    await env.seed()
    body = error(await call(env, "POST", "/api/v1/machines", json_body={
        "mac": MAC, "cluster": "other"}), 400, "cluster")
    assert body["error"] == (
        "unknown cluster 'other': add it first (netboot clusters add other --server-url "
        "managed|https://SERVER:6443, POST /api/v1/clusters), or give one that exists "
        "(netboot clusters ls)")
    body = error(await call(env, "POST", "/api/v1/machines", json_body={
        "mac": MAC, "profile": "k3s"}), 400, "profile")
    assert body["error"].startswith("unknown profile 'k3s' (did you mean 'k3os'?): add it "
                                    "first (netboot profiles add k3s --kernel PATH"), body
    held = await env.post("/api/v1/machines", {"mac": MAC, "hostname": "edge-1",
                                               "serial": "SN-1"}, status=201)
    body = error(await call(env, "POST", "/api/v1/machines", json_body={
        "mac": "52:54:00:00:00:99", "serial": "SN-1"}), 409, "serial")
    assert body["holder"] == held["id"]
    assert body["error"] == (
        f"serial SN-1 already belongs to machine {held['id']} (edge-1, {MAC}): edit that one "
        f"(netboot machines set {MAC}; PATCH /api/v1/machines/{held['id']}), remove it if its "
        f"hardware is gone (netboot machines rm {MAC}), or give the right serial")
    await env.post(f"/api/v1/machines/{MAC}/reinstall", None)
    body = error(await call(env, "POST", f"/api/v1/machines/{MAC}/approve",
                            json_body={"cluster": "edge"}), 409)
    assert body["error"] == (
        f"{MAC} is reinstall; 'approve' is not allowed: a reinstall is asked and its next "
        f"network boot installs it; to change its cluster, role or profile first: netboot "
        f"machines set {MAC} (PATCH /api/v1/machines/{MAC}) (steps allowed in reinstall: "
        "install-plan, installed, reinstall)")


async def test_renaming_an_installed_machine_answers_that_its_node_keeps_the_old_name(
        env: Env) -> None:
    """The CLI's `machines set --hostname` says that an installed machine's OS and k3s node
    keep the name it installed with (s47-review); the API's PATCH, which scripts and other
    tools use, answered the new name alone. Its answer has ``warnings`` now, with the field;
    a machine not installed yet (it installs under the new name) has none."""
    await registered_beside_enrolled(env, MAC, "edge-7", "52:54:00:12:34:57", "edge-8")
    r = await call(env, "PATCH", "/api/v1/machines/edge-7", json_body={"hostname": "rack1-a"})
    assert r.status == 200, r.text
    assert r.json()["hostname"] == "rack1-a" and r.json()["warnings"] == [{
        "field": "hostname", "error": (
            f"rack1-a still runs as edge-7: its installed OS keeps that hostname and k3s node "
            f"name until it installs again (netboot machines reinstall {MAC}); netboot's DNS "
            "name and views follow the new one now")}]
    for ref, name in (("rack1-a", "edge-7"), ("edge-8", "rack1-b")):  # its own; enrolled
        r = await call(env, "PATCH", f"/api/v1/machines/{ref}", json_body={"hostname": name})
        assert r.status == 200 and "warnings" not in r.json(), r.text
    r = await call(env, "PATCH", f"/api/v1/machines/{MAC}", json_body={"labels": {"a": "b"}})
    assert r.status == 200 and "warnings" not in r.json(), r.text


@pytest.mark.parametrize("route", ["import", "bulk"])
async def test_an_import_renaming_an_installed_machine_says_its_node_keeps_the_old_name(
        env: Env, route: str) -> None:
    """A bulk import (a file, or the JSON bulk route) that renames a registered machine
    answers with PATCH's note in ``warnings``, by the row's line, in the dry run too (where
    it can still be changed); the enrolled machine renamed beside it gets none (s49-ha:
    the import said nothing, s48-review's leftover)."""
    await registered_beside_enrolled(env, MAC, "edge-7", "52:54:00:12:34:57", "edge-8")
    rows = [{"mac": MAC, "hostname": "rack1-a"}, {"mac": "52:54:00:12:34:57",
                                                 "hostname": "rack1-b"}]
    note = (f"rack1-a still runs as edge-7: its installed OS keeps that hostname and k3s node "
            f"name until it installs again (netboot machines reinstall {MAC}); netboot's DNS "
            "name and views follow the new one now")
    for dry in (True, False):
        if route == "bulk":
            r = await call(env, "POST", "/api/v1/machines:bulk",
                           json_body={"machines": rows, "dry_run": dry})
        else:
            r = await call(env, "POST", "/api/v1/machines:import?format=csv"
                           f"&dry_run={int(dry)}",
                           data="mac,hostname\n" + "".join(
                               f"{row['mac']},{row['hostname']}\n" for row in rows),
                           headers={"Content-Type": "text/csv"})
        assert r.status == (200 if dry else 201), r.text
        report = r.json()
        assert report["warnings"] == [{"line": 1 if route == "bulk" else 2,
                                       "field": "hostname", "message": note}], report
        assert report["applied"] is not dry and len(report["changed"]) == 2, report
    assert (await env.get(f"/api/v1/machines/{MAC}"))["hostname"] == "rack1-a"
    # Again: nothing renamed, nothing said.
    r = await call(env, "POST", "/api/v1/machines:bulk", json_body={"machines": rows})
    assert r.status == 201 and r.json()["unchanged"] and "warnings" not in r.json(), r.text
