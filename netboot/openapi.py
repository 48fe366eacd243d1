"""The OpenAPI 3 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

A test walks the aiohttp router and this document both ways, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LIST = {"type": "array", "items": {"type": "string"}}

_MACHINE_PROPS: dict[str, Any] = {
    "mac": {"type": ["string", "null"],
            "description": "its first NIC, any common MAC form; normalised"},
    "macs": {"type": "array", "items": _STR,
             "description": "every NIC; a boot from any of them is this machine"},
    "hostname": _NSTR, "uuid": _NSTR, "serial": _NSTR, "asset": _NSTR,
    "labels": _MAP, "cluster": _NSTR,
    "role": {"type": ["string", "null"], "enum": ["server", "agent", None]},
    "profile": _NSTR, "fixed_ipv4": _NSTR,
}
# Read-only: a state changes only by what happens to the machine (netboot.lifecycle), so the
# input schemas do not have it and the API answers 400 naming "state".
_STATE = {"type": "string", "readOnly": True,
          "enum": ["discovered", "enrolled", "booting", "installing", "installed", "registered",
                   "failed", "reinstall"]}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": _STR, "field": _STR,
                             "holder": {"type": "string",
                                        "description": "409: id of the machine that has it"},
                             "state": {**_STATE, "description": "409 of a refused lifecycle "
                                       "step: the machine's current state"},
                             "event": {"type": "string", "readOnly": True}}},
    # At least one of mac, macs, serial, asset, uuid (a 400 names "mac" otherwise).
    "MachineInput": {"type": "object", "additionalProperties": False,
                     "anyOf": [{"required": [k]} for k in ("mac", "macs", "serial", "asset",
                                                           "uuid")],
                     "properties": _MACHINE_PROPS},
    # PATCH merges into the stored machine: every field optional; "macs" replaces the NICs,
    # "mac" alone may only repeat one of them.
    "MachinePatch": {"type": "object", "additionalProperties": False,
                     "properties": _MACHINE_PROPS},
    "Approve": {"type": "object", "additionalProperties": False, "properties": {
        "cluster": _NSTR, "role": {"type": ["string", "null"], "enum": ["server", "agent", None]},
        "profile": _NSTR, "hostname": _NSTR}},
    # Not allOf MachineInput: its additionalProperties=false would reject every response.
    "Machine": {"type": "object", "required": ["id", "macs", "state"], "properties": {
        **_MACHINE_PROPS, "id": _STR, "state": _STATE, "mac_hexhyp": _NSTR, "arch": _NSTR,
        "firmware": _NSTR, "ipv4": _NSTR,
        "facts": _MAP, "token_expires": {"type": ["number", "null"]},
        "created": {"type": "number"}, "updated": {"type": "number"}}},
    "MachineList": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/Machine"}},
        "total": {"type": "integer"}, "limit": {"type": "integer"},
        "offset": {"type": "integer"}}},
    "Profile": {"type": "object", "required": ["name", "kernel"], "properties": {
        "name": _STR, "kernel": _STR, "initrds": _LIST, "cmdline": _STR,
        "config_template": {"type": "string", "enum": ["k3os", "cloud-init"]},
        "assets": {"type": "array", "items": {"type": "object", "properties": {
            "path": _STR, "sha256": _NSTR}}},
        "install_device": _STR, "iso_url": _NSTR, "ssh_authorized_keys": _LIST,
        "fdtdir": _NSTR, "description": _STR}},
    "Cluster": {"type": "object", "required": ["name"], "properties": {
        "name": _STR, "server_url": {"type": "string",
                                     "description": "https://… of the k3s API, or 'managed'"},
        "token": {"type": "string", "writeOnly": True}, "labels": _MAP, "taints": _LIST,
        "description": _STR,
        "endpoint": {"type": ["string", "null"], "description":
                     "managed clusters: where nodes reach the servers (a VIP or DNS name): "
                     "host, host:port or https://host[:port]; unset, the first registered "
                     "server's address, and nodes wait until one registers"}}},
    "Group": {"type": "object", "required": ["name"], "properties": {
        "name": _STR, "selector": {"type": "object", "additionalProperties": _LIST},
        "profile": _NSTR, "cluster": _NSTR, "role": _NSTR, "labels": _MAP, "taints": _LIST,
        "hostname_template": _NSTR}},
    "Event": {"type": "object", "properties": {
        "machine": _STR, "time": {"type": "number"}, "kind": _STR, "message": _STR,
        "data": {"type": "object"}}},
    "EventInput": {"type": "object", "required": ["kind"], "properties": {
        "kind": _STR, "message": _STR, "data": {"type": "object"}}},
    "Register": {"type": "object", "required": ["mac", "token"], "properties": {
        "mac": _STR, "token": _STR, "hostname": _STR,
        "addresses": {**_LIST, "description":
                      "the device's own addresses; the request's source address wins unless "
                      "it is not routable. Entries that are loopback, link-local, unspecified, "
                      "multicast, broadcast or not addresses are ignored (an event says so)"},
        "machine_id": _STR, "node_name": _STR, "os": _STR}},
    "Bulk": {"type": "object", "required": ["machines"], "additionalProperties": False,
             "properties": {
        "machines": {"type": "array", "items": {"$ref": "#/components/schemas/MachineInput"}},
        "dry_run": {"type": "boolean"}}},
    "ImportReport": {"type": "object", "properties": {
        "created": _LIST, "changed": _LIST, "unchanged": _LIST, "applied": {"type": "boolean"},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "line": {"type": "integer"}, "field": _STR, "message": _STR}}}}},
    "Explanation": {"type": "object"},
    "Status": {"type": "object", "required": ["total", "by_state", "clusters", "failed"],
               "properties": {
                   "total": {"type": "integer"},
                   "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                   "clusters": {"type": "object", "additionalProperties": {
                       "type": "object", "additionalProperties": {"type": "integer"}}},
                   "failed": {"type": "array", "items": {"type": "object"}}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, *, body: str | None = None, ok: int = 200, out: str | None = None,
        admin: bool = False, errors: tuple[int, ...] = (400, 404),
        params: tuple[str, ...] = (), body_required: bool = True) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {}}
    if out == "array:Machine" or (out and out.startswith("array:")):
        schema: dict[str, Any] = {"type": "array", "items": _ref(out.split(":", 1)[1])}
    else:
        schema = _ref(out) if out else {}
    op["responses"][str(ok)] = {"description": "success",
                                **({"content": {"application/json": {"schema": schema}}}
                                   if out else {})}
    codes = set(errors) | ({401} if admin else set())
    for code in sorted(codes):
        op["responses"][str(code)] = {"description": "error", "content": {
            "application/json": {"schema": _ref("Error")}}}
    if body:
        op["requestBody"] = {"required": body_required,
                             "content": {"application/json": {"schema": _ref(body)}}}
    if admin:
        op["security"] = [{"bearer": []}, {"session": []}]
    if params:
        op["parameters"] = [{"name": p, "in": "query", "required": False,
                             "schema": {"type": "string"}} for p in params]
    return op


def _path_param(name: str) -> dict[str, Any]:
    out = {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
    if name == "ref":
        out["description"] = "one of the machine's MACs (any common form), or its id"
    return out


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/v1/openapi.json": {"get": {"summary": "this document",
                                         "responses": {"200": {"description": "OpenAPI 3"}}}},
        "/api/v1/machines": {
            "get": _op("list machines: q searches hostname, id, MACs, UUID, serial, asset; "
                       "sort (mac, hostname, state, cluster, updated, created) and order "
                       "(asc, desc); last_event=1 adds each machine's last event",
                       out="MachineList",
                       params=("state", "cluster", "label", "q", "sort", "order", "last_event",
                               "limit", "offset")),
            "post": _op("enroll a machine", body="MachineInput", ok=201, out="Machine",
                        admin=True, errors=(400, 409, 413)),
        },
        "/api/v1/machines:bulk": {
            "post": _op("bulk enrollment in one transaction", body="Bulk", ok=201,
                        out="ImportReport", admin=True, errors=(400, 413)),
        },
        "/api/v1/machines:import": {
            "post": _op("an import file (CSV, YAML or JSON) as the body; dry_run=1 checks it",
                        ok=201, out="ImportReport", admin=True, errors=(400, 413),
                        params=("format", "dry_run")),
        },
        "/api/v1/machines/{ref}/render/{kind}": {
            "parameters": [_path_param("ref"), _path_param("kind")],
            "get": _op("what the machine would be served now (ipxe, pxelinux, config, "
                       "nocloud), install and join tokens masked", admin=True,
                       params=("arch",)),
        },
        "/api/v1/events/stream": {
            "get": {**_op("every machine event as it is recorded: Server-Sent Events "
                          "(event: machine, data: an Event; event: missed when this reader "
                          "fell behind)", admin=True, errors=(503,)),
                    "responses": {"200": {"description": "text/event-stream"},
                                  "401": {"description": "no or wrong token"},
                                  "503": {"description": "too many streams open"}}},
        },
        "/api/v1/machines/{ref}": {
            "parameters": [_path_param("ref")],
            "get": _op("one machine", out="Machine"),
            "patch": _op("change a machine", body="MachinePatch", out="Machine", admin=True,
                         errors=(400, 404, 409)),
            "delete": {**_op("remove a machine", ok=204, admin=True)},
        },
        "/api/v1/machines/{ref}/approve": {
            "parameters": [_path_param("ref")],
            "post": _op("approve a discovered machine", body="Approve", out="Machine",
                        admin=True, errors=(400, 404, 409), body_required=False),
        },
        "/api/v1/machines/{ref}/reinstall": {
            "parameters": [_path_param("ref")],
            "post": _op("install again on next boot", out="Machine", admin=True,
                        errors=(404, 409)),
        },
        "/api/v1/machines/{ref}/explain": {
            "parameters": [_path_param("ref")],
            "get": _op("which group, profile and decision, and why", out="Explanation",
                       params=("arch",)),
        },
        "/api/v1/machines/{ref}/events": {
            "parameters": [_path_param("ref")],
            "get": _op("events, oldest first", out="array:Event", params=("limit",)),
            "post": _op("progress report (install token or admin token)", body="EventInput",
                        ok=201, out="Event", admin=True, errors=(400, 404, 409, 413)),
        },
        "/api/v1/register": {
            "post": _op("first boot of the installed OS, with its install token",
                        body="Register", out="Machine", errors=(400, 401, 409)),
        },
        "/api/v1/status": {
            "get": _op("machines per state, overall and per cluster; the failed ones",
                       out="Status", errors=()),
        },
        "/api/v1/clusters/{name}/nodes": {
            "parameters": [_path_param("name")],
            "get": _op("machines of a cluster", out="array:Machine"),
        },
    }
    # Bulk: 200 for a dry run, and 400 carries the per-row report (or an Error for a bad
    # envelope).
    bulk = paths["/api/v1/machines:bulk"]["post"]["responses"]
    bulk["200"] = {"description": "dry run: what would change",
                   "content": {"application/json": {"schema": _ref("ImportReport")}}}
    bulk["400"]["content"]["application/json"]["schema"] = {
        "anyOf": [_ref("ImportReport"), _ref("Error")]}
    imported = paths["/api/v1/machines:import"]["post"]
    imported["responses"]["200"] = bulk["200"]
    imported["responses"]["400"] = bulk["400"]
    # The file as it is (the format is the query's, whatever the content type says).
    imported["requestBody"] = {"required": True, "content": {
        "text/plain": {"schema": {"type": "string"}},
        "text/csv": {"schema": {"type": "string"}},
        "application/yaml": {"schema": {"type": "string"}}}}
    paths["/api/v1/machines/{ref}/render/{kind}"]["get"]["responses"]["200"] = {
        "description": "the text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    for kind, schema in (("profiles", "Profile"), ("clusters", "Cluster"), ("groups", "Group")):
        paths[f"/api/v1/{kind}"] = {
            "get": _op(f"list {kind}", out=f"array:{schema}"),
            "post": _op(f"create a {kind[:-1]}", body=schema, ok=201, out=schema, admin=True,
                        errors=(400, 409, 413)),
        }
        paths[f"/api/v1/{kind}/{{name}}"] = {
            "parameters": [_path_param("name")],
            "get": _op(f"one {kind[:-1]}", out=schema),
            "put": _op(f"replace a {kind[:-1]}", body=schema, out=schema, admin=True,
                       errors=(400, 404, 409)),
            "delete": _op(f"remove a {kind[:-1]}", ok=204, admin=True, errors=(404, 409)),
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "netboot", "version": "1",
                 "description": "Enrollment and inventory API of the netboot provisioning "
                                "server."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {
                           "bearer": {"type": "http", "scheme": "bearer"},
                           # The dashboard's session; changes also need X-CSRF-Token.
                           "session": {"type": "apiKey", "in": "cookie",
                                       "name": "netboot_session"}}},
    }
