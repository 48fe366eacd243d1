"""REST API ``/api/v1``: machines, profiles, clusters, groups, events, registration.

JSON in and out. Mutations need the admin bearer token; an installer's progress report may use
its machine's install token instead. Errors are translated in one place
(:func:`netboot.servers.http.error_response`): 400 naming the field, 401/403, 404, 409, 413.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from netboot import groups as grouping
from netboot.addresses import parse_peer
from netboot.boot import BootService
from netboot.enroll import (
    Enroller,
    check_hostname,
    check_hostname_template,
    fleet_status,
    token_matches,
)
from netboot.errors import AuthError, Conflict, NotFound, ValidationError
from netboot.inventory import codec
from netboot.inventory.base import MachineFilter, Store
from netboot.model import Arch, Cluster, MacAddress, Machine, MachineState, Role, normalise_uuid
from netboot.servers.http import MAX_BODY_KEY, MAX_EVENT_KEY, bearer_token

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMIN_TOKEN_KEY = "admin-token-sha256"
MACHINE_INPUT = {"mac", "hostname", "uuid", "serial", "asset", "labels", "cluster", "role",
                 "profile", "fixed_ipv4", "state"}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def read_json(request: web.Request) -> Any:
    limit = request.app[MAX_BODY_KEY]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                            actual_size=request.content_length)
    raw = await request.read()
    if not raw:
        raise ValidationError("body", "a JSON body is required")
    return loads(raw)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes) -> Any:
    """Strict JSON: Python's json accepts NaN/Infinity and lone surrogates (\\ud800), which
    no store or client can take back; refuse them here as a 400 naming the body."""
    try:
        value = json.loads(raw, parse_constant=_no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("body", "not valid JSON: text with a lone surrogate") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValidationError("body", f"not valid JSON: {exc}") from exc
    return value


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object")
    return body


def _int_query(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValidationError(key, f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise ValidationError(key, f"must be between {low} and {high}")
    return value


def _check_name(name: str) -> None:
    # Names are path segments of /api/v1/<kind>/<name> and appear in iPXE script comments:
    # a '/' would make the object unaddressable, a newline would end the comment line.
    if ("/" in name or name != name.strip() or len(name) > 253
            or any(not ch.isprintable() for ch in name)):
        raise ValidationError("name", f"{name!r}: use printable text without '/' or "
                                      "surrounding spaces (at most 253 characters)")


class Api:
    def __init__(self, store: Store, enroller: Enroller, boot: BootService, *,
                 clock: Callable[[], float], logger: logging.Logger | None = None) -> None:
        self._store = store
        self._enroll = enroller
        self._boot = boot
        self._clock = clock
        self._log = logger or logging.getLogger(__name__)

    def add_to(self, app: web.Application) -> None:
        r = app.router
        p = "/api/v1"
        r.add_get(f"{p}/openapi.json", self.openapi)
        r.add_get(f"{p}/machines", self.list_machines)
        r.add_post(f"{p}/machines", self.admin(self.create_machine))
        r.add_post(f"{p}/machines:bulk", self.admin(self.bulk))
        r.add_get(f"{p}/machines/{{mac}}", self.get_machine)
        r.add_patch(f"{p}/machines/{{mac}}", self.admin(self.patch_machine))
        r.add_delete(f"{p}/machines/{{mac}}", self.admin(self.delete_machine))
        r.add_post(f"{p}/machines/{{mac}}/approve", self.admin(self.approve))
        r.add_post(f"{p}/machines/{{mac}}/reinstall", self.admin(self.reinstall))
        r.add_get(f"{p}/machines/{{mac}}/explain", self.explain)
        r.add_get(f"{p}/machines/{{mac}}/events", self.list_events)
        r.add_post(f"{p}/machines/{{mac}}/events", self.post_event)
        r.add_post(f"{p}/register", self.register)
        for kind in ("profiles", "clusters", "groups"):
            r.add_get(f"{p}/{kind}", self._list(kind))
            r.add_post(f"{p}/{kind}", self.admin(self._put(kind, create=True)))
            r.add_get(f"{p}/{kind}/{{name}}", self._get(kind))
            r.add_put(f"{p}/{kind}/{{name}}", self.admin(self._put(kind, create=False)))
            r.add_delete(f"{p}/{kind}/{{name}}", self.admin(self._delete(kind)))
        r.add_get(f"{p}/clusters/{{name}}/nodes", self.cluster_nodes)
        r.add_get(f"{p}/status", self.status)

    # -- auth -------------------------------------------------------------------------
    async def is_admin(self, request: web.Request) -> bool:
        token = bearer_token(request)
        if token is None:
            return False
        stored = await self._store.get_setting(ADMIN_TOKEN_KEY)
        return stored is not None and hmac.compare_digest(_sha(token), stored)

    def admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not request.headers.get("Authorization"):
                raise AuthError("this call changes the inventory: send "
                                "'Authorization: Bearer <admin token>'")
            if not await self.is_admin(request):
                raise AuthError("wrong admin token")
            return await handler(request)
        return guarded

    # -- machines ---------------------------------------------------------------------
    def _machine_out(self, m: Machine) -> dict[str, Any]:
        out = codec.machine_to_dict(m, secrets=False)
        out["mac_hexhyp"] = m.mac.hexhyp
        return out

    async def list_machines(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        labels = []
        for item in request.query.getall("label", []):
            k, sep, v = item.partition("=")
            if not sep or not k:
                raise ValidationError("label", f"{item!r} is not key=value")
            labels.append((k, v))
        try:
            st = MachineState(state) if state else None
        except ValueError:
            raise ValidationError("state", f"{state!r} is not one of "
                                  f"{', '.join(s.value for s in MachineState)}") from None
        flt = MachineFilter(state=st, cluster=request.query.get("cluster") or None,
                            labels=tuple(labels),
                            limit=_int_query(request, "limit", 100, 1, 1000),
                            offset=_int_query(request, "offset", 0, 0, 10**9))
        items = await self._store.list_machines(flt)
        total = await self._store.count_machines(flt)
        return web.json_response({"items": [self._machine_out(m) for m in items],
                                  "total": total, "limit": flt.limit, "offset": flt.offset})

    async def _parse_machine(self, body: dict[str, Any], *, mac: str | None = None) -> Machine:
        unknown = sorted(set(body) - MACHINE_INPUT)
        if unknown:
            raise ValidationError(unknown[0], "unknown or read-only field")
        if mac is not None:
            body = {**body, "mac": mac}
        machine = codec.machine_from_dict(body)
        if machine.hostname:
            machine = replace(machine, hostname=check_hostname(machine.hostname))
        if machine.uuid:
            # Canonical form, as firmware UUIDs are normalised before they are matched
            # (bulk import does the same); garbage is a 400, not a machine no request matches.
            machine = replace(machine, uuid=normalise_uuid(machine.uuid))
        await self._enroll.validate_refs(machine.cluster, machine.profile)
        return machine

    async def create_machine(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        machine = await self._parse_machine(body)
        now = self._clock()
        machine = replace(machine, created=now, updated=now)
        if machine.hostname is None:
            machine = replace(machine, hostname=await self._enroll.name_for(
                machine, cluster=machine.cluster,
                role=str(machine.role) if machine.role else None))
        await self._store.create_machine(machine)
        await self._enroll.event(str(machine.mac), "enrolled", "created through the API")
        return web.json_response(self._machine_out(machine), status=201)

    async def _machine(self, request: web.Request) -> Machine:
        mac = str(MacAddress.parse(request.match_info["mac"]))
        machine = await self._store.get_machine(mac)
        if machine is None:
            raise NotFound(f"machine {mac} not found")
        return machine

    async def get_machine(self, request: web.Request) -> web.Response:
        return web.json_response(self._machine_out(await self._machine(request)))

    async def patch_machine(self, request: web.Request) -> web.Response:
        old = await self._machine(request)
        body = _object(await read_json(request))
        if "mac" in body and str(MacAddress.parse(str(body["mac"]))) != str(old.mac):
            raise ValidationError("mac", "cannot change a machine's MAC; delete and re-add")
        merged = {k: v for k, v in codec.machine_to_dict(old).items() if k in MACHINE_INPUT}
        merged.update(body)
        parsed = await self._parse_machine(merged)
        machine = replace(old, hostname=parsed.hostname, uuid=parsed.uuid, serial=parsed.serial,
                          asset=parsed.asset, labels=parsed.labels, cluster=parsed.cluster,
                          role=parsed.role, profile=parsed.profile,
                          fixed_ipv4=parsed.fixed_ipv4, state=parsed.state,
                          updated=self._clock())
        await self._store.update_machine(machine)
        return web.json_response(self._machine_out(machine))

    async def delete_machine(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        await self._store.delete_machine(str(machine.mac))
        return web.Response(status=204)

    async def approve(self, request: web.Request) -> web.Response:
        mac = request.match_info["mac"]
        body = _object(await read_json(request)) if request.can_read_body else {}
        unknown = sorted(set(body) - {"cluster", "role", "profile", "hostname"})
        if unknown:
            raise ValidationError(unknown[0], "unknown field")
        for key in ("cluster", "role", "profile", "hostname"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise ValidationError(key, "must be a string or null")
        role = body.get("role")
        if role is not None and role not in ("server", "agent"):
            raise ValidationError("role", f"{role!r} is not server or agent")
        machine = await self._enroll.approve(
            mac, cluster=body.get("cluster"), role=Role(role) if role else None,
            profile=body.get("profile"), hostname=body.get("hostname"))
        return web.json_response(self._machine_out(machine))

    async def reinstall(self, request: web.Request) -> web.Response:
        machine = await self._enroll.reinstall(request.match_info["mac"])
        return web.json_response(self._machine_out(machine))

    async def explain(self, request: web.Request) -> web.Response:
        mac = str(MacAddress.parse(request.match_info["mac"]))
        arch_text = request.query.get("arch")
        try:
            arch = Arch(arch_text) if arch_text else None
        except ValueError:
            raise ValidationError("arch", f"{arch_text!r} is not one of "
                                  f"{', '.join(a.value for a in Arch)}") from None
        return web.json_response(await self._boot.explain(mac, arch=arch))

    async def list_events(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        limit = _int_query(request, "limit", 1000, 1, 10000)
        events = await self._store.list_events(str(machine.mac), limit=limit)
        return web.json_response([codec.event_to_dict(e) for e in events])

    async def post_event(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        token = bearer_token(request)
        if not (token_matches(machine, token, self._clock()) or await self.is_admin(request)):
            raise AuthError("send 'Authorization: Bearer <install token>' of this machine")
        limit = request.app[MAX_EVENT_KEY]
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        raw = await request.content.read(request.app[MAX_EVENT_KEY] + 1)
        if len(raw) > request.app[MAX_EVENT_KEY]:
            raise web.HTTPRequestEntityTooLarge(max_size=request.app[MAX_EVENT_KEY],
                                                actual_size=len(raw))
        body = loads(raw or b"null")
        event = await self._enroll.report(str(machine.mac), _object(body))
        self._log.info("event mac=%s kind=%s message=%r", machine.mac, event.kind, event.message)
        return web.json_response(codec.event_to_dict(event), status=201)

    async def register(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        # The transport's peer, typed here at the edge: what the device reports about its own
        # address is checked against it (k3OS reports 127.0.1.1, netboot.addresses).
        machine = await self._enroll.register(body, parse_peer(request.remote))
        return web.json_response(self._machine_out(machine))

    async def bulk(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        unknown = sorted(set(body) - {"machines", "dry_run"})
        if unknown:
            raise ValidationError(unknown[0], "unknown field (known: machines, dry_run)")
        rows = body.get("machines")
        if not isinstance(rows, list):
            raise ValidationError("machines", "required: a list of machine objects")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ValidationError("dry_run", "must be true or false")
        items = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValidationError(f"machines[{i}]", "expected an object")
            items.append((i + 1, row))
        report = await self._enroll.import_rows(items, dry_run=dry_run)
        status = 400 if report.errors else (200 if dry_run else 201)
        return web.json_response(report.as_dict(), status=status)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await fleet_status(self._store))

    async def cluster_nodes(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if await self._store.get_cluster(name) is None:
            raise NotFound(f"cluster {name!r} not found")
        nodes = await self._store.list_machines(MachineFilter(cluster=name, limit=100_000))
        return web.json_response([self._machine_out(m) for m in nodes])

    # -- profiles, clusters, groups -----------------------------------------------------
    def _codec(self, kind: str) -> tuple[Callable[[Any], Any], Callable[[Any], dict[str, Any]]]:
        if kind == "profiles":
            return codec.profile_from_dict, codec.profile_to_dict
        if kind == "clusters":
            return codec.cluster_from_dict, lambda c: codec.cluster_to_dict(c, secrets=False)
        return codec.group_from_dict, codec.group_to_dict

    def _list(self, kind: str) -> Handler:
        _, out = self._codec(kind)

        async def handler(request: web.Request) -> web.Response:
            items = await getattr(self._store, f"list_{kind}")()
            return web.json_response([out(x) for x in items])
        return handler

    def _get(self, kind: str) -> Handler:
        _, out = self._codec(kind)

        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            item = await getattr(self._store, f"get_{kind[:-1]}")(name)
            if item is None:
                raise NotFound(f"{kind[:-1]} {name!r} not found")
            return web.json_response(out(item))
        return handler

    def _put(self, kind: str, *, create: bool) -> Handler:
        parse, out = self._codec(kind)

        async def handler(request: web.Request) -> web.Response:
            body = _object(await read_json(request))
            if not create:
                name = request.match_info["name"]
                if "name" in body and body["name"] != name:
                    raise ValidationError("name", "does not match the URL")
                body = {**body, "name": name}
                if await getattr(self._store, f"get_{kind[:-1]}")(name) is None:
                    raise NotFound(f"{kind[:-1]} {name!r} not found")
            item = parse(body)
            _check_name(item.name)
            if kind == "clusters":
                item = await self._check_cluster(item, body, create=create)
            elif kind == "groups":
                await self._check_group(item)
            await getattr(self._store, f"put_{kind[:-1]}")(item, create=create)
            return web.json_response(out(item), status=201 if create else 200)
        return handler

    async def _check_cluster(self, cluster: Cluster, body: dict[str, Any], *,
                             create: bool) -> Cluster:
        if not cluster.managed and not cluster.server_url.startswith("https://"):
            raise ValidationError("server_url", "an https:// URL of the k3s API, or 'managed'")
        if not cluster.token:
            if not create and "token" not in body:
                old = await self._store.get_cluster(cluster.name)
                if old is not None:
                    return replace(cluster, token=old.token)
            if cluster.managed:
                import secrets

                # Managed clusters get a generated join secret; it is never returned or logged.
                return replace(cluster, token=secrets.token_hex(32))
            raise ValidationError("token", "required for an external cluster (k3s node token)")
        return cluster

    async def _check_group(self, group: Any) -> None:
        if group.hostname_template:
            check_hostname_template(group.hostname_template)
        if group.profile and await self._store.get_profile(group.profile) is None:
            raise ValidationError("profile", f"unknown profile {group.profile!r}")
        if group.cluster and await self._store.get_cluster(group.cluster) is None:
            raise ValidationError("cluster", f"unknown cluster {group.cluster!r}")
        others = [g for g in await self._store.list_groups() if g.name != group.name]
        grouping.check_groups([*others, group])

    def _delete(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if kind in ("profiles", "clusters"):
                ref = "profile" if kind == "profiles" else "cluster"
                for g in await self._store.list_groups():
                    if getattr(g, ref) == name:
                        raise Conflict(f"{ref} {name!r} is used by group {g.name!r}")
                # Machines name their cluster/profile directly too; deleting it under them
                # would silently boot them without one (effective() finds nothing).
                user = await self._machine_using(ref, name)
                if user is not None:
                    raise Conflict(f"{ref} {name!r} is used by machine {user}")
            await getattr(self._store, f"delete_{kind[:-1]}")(name)
            return web.Response(status=204)
        return handler

    async def _machine_using(self, ref: str, name: str) -> str | None:
        if ref == "cluster":
            found = await self._store.list_machines(MachineFilter(cluster=name, limit=1))
            return str(found[0].mac) if found else None
        offset = 0
        while True:
            page = await self._store.list_machines(MachineFilter(limit=1000, offset=offset))
            for m in page:
                if m.profile == name:
                    return str(m.mac)
            if len(page) < 1000:
                return None
            offset += 1000

    async def openapi(self, request: web.Request) -> web.Response:
        from netboot.openapi import document

        return web.json_response(document())
