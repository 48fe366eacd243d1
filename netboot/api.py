"""REST API ``/api/v1``: machines, profiles, clusters, groups, events, registration.

JSON in and out. Mutations need the admin bearer token; an installer's progress report may use
its machine's install token instead. Errors are translated in one place
(:func:`netboot.servers.http.error_response`): 400 naming the field, 401/403, 404, 409, 413.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from netboot.addresses import parse_peer
from netboot.core import Core, machine_dict, public_dict
from netboot.enroll import fleet_status, parse_import, token_matches
from netboot.errors import AuthError, Forbidden, ValidationError
from netboot.events import EventBus, Missed
from netboot.inventory import codec
from netboot.inventory.base import SORT_KEYS, MachineFilter
from netboot.model import Machine, MachineState
from netboot.servers.http import MAX_BODY_KEY, MAX_EVENT_KEY, bearer_token
from netboot.web.auth import ADMIN_TOKEN_KEY, AdminTokenVerifier, Authenticator

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
__all__ = ["ADMIN_TOKEN_KEY", "Api"]
SSE_KEEPALIVE_SECONDS = 15.0
MASKED = "********"
IMPORT_FORMATS = ("csv", "yaml", "json")


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


class Api:
    """The HTTP face of :class:`netboot.core.Core`: parses requests, answers JSON."""

    def __init__(self, core: Core, *, clock: Callable[[], float],
                 auth: Authenticator | None = None, events: EventBus | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._core = core
        self._store = core.store
        self._enroll = core.enroller
        self._clock = clock
        self._auth = auth or Authenticator(AdminTokenVerifier(core.store))
        self._events = events
        self._log = logger or logging.getLogger(__name__)

    def add_to(self, app: web.Application) -> None:
        r = app.router
        p = "/api/v1"
        r.add_get(f"{p}/openapi.json", self.openapi)
        r.add_get(f"{p}/machines", self.list_machines)
        r.add_post(f"{p}/machines", self.admin(self.create_machine))
        r.add_post(f"{p}/machines:bulk", self.admin(self.bulk))
        r.add_post(f"{p}/machines:import", self.admin(self.import_file))
        # {ref}: one of the machine's MACs (any spelling) or its id (netboot.identity.by_ref).
        r.add_get(f"{p}/machines/{{ref}}", self.get_machine)
        r.add_patch(f"{p}/machines/{{ref}}", self.admin(self.patch_machine))
        r.add_delete(f"{p}/machines/{{ref}}", self.admin(self.delete_machine))
        r.add_post(f"{p}/machines/{{ref}}/approve", self.admin(self.approve))
        r.add_post(f"{p}/machines/{{ref}}/reinstall", self.admin(self.reinstall))
        r.add_get(f"{p}/machines/{{ref}}/explain", self.explain)
        r.add_get(f"{p}/machines/{{ref}}/events", self.list_events)
        r.add_get(f"{p}/machines/{{ref}}/render/{{kind}}", self.admin(self.render))
        r.add_post(f"{p}/machines/{{ref}}/events", self.post_event)
        r.add_post(f"{p}/register", self.register)
        for kind in ("profiles", "clusters", "groups"):
            r.add_get(f"{p}/{kind}", self._list(kind))
            r.add_post(f"{p}/{kind}", self.admin(self._put(kind, create=True)))
            r.add_get(f"{p}/{kind}/{{name}}", self._get(kind))
            r.add_put(f"{p}/{kind}/{{name}}", self.admin(self._put(kind, create=False)))
            r.add_delete(f"{p}/{kind}/{{name}}", self.admin(self._delete(kind)))
        r.add_get(f"{p}/clusters/{{name}}/nodes", self.cluster_nodes)
        r.add_get(f"{p}/status", self.status)
        if self._events is not None:
            r.add_get(f"{p}/events/stream", self.event_stream)

    # -- auth -------------------------------------------------------------------------
    async def is_admin(self, request: web.Request) -> bool:
        caller = await self._auth.caller(request)
        return caller is not None and caller.scope == "admin"

    def admin(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            caller = await self._auth.caller(request)
            if caller is None:
                raise AuthError("this call changes the inventory: send "
                                "'Authorization: Bearer <admin token>'")
            if caller.scope != "admin":
                raise Forbidden(f"a {caller.scope!r} token cannot change the inventory")
            return await handler(request)
        return guarded

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every machine event as it is recorded (``event: machine``),
        and ``event: missed`` when this reader fell behind and events were dropped (reload
        what is shown). Needs a token (bearer or the dashboard's cookie): event messages
        name machines, addresses and clusters."""
        if await self._auth.caller(request) is None:
            raise AuthError("send 'Authorization: Bearer <token>' or log in to the dashboard")
        assert self._events is not None
        with self._events.subscribe() as sub:
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-store",
                # nginx would buffer the stream otherwise.
                "X-Accel-Buffering": "no"})
            await resp.prepare(request)
            # The browser reconnects by itself after a drop (EventSource, 3 s by default).
            await resp.write(b"retry: 3000\n: connected\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(sub.next(), SSE_KEEPALIVE_SECONDS)
                except TimeoutError:
                    # A comment line: keeps proxies and NAT from closing an idle stream,
                    # and finds a reader that went away.
                    await resp.write(b": keep-alive\n\n")
                    continue
                if isinstance(item, Missed):
                    await resp.write(f"event: missed\ndata: {item.count}\n\n".encode())
                    continue
                data = json.dumps(codec.event_to_dict(item.event), ensure_ascii=False)
                await resp.write(f"id: {item.seq}\nevent: machine\ndata: {data}\n\n".encode())

    # -- machines ---------------------------------------------------------------------
    def _machine_out(self, m: Machine) -> dict[str, Any]:
        return machine_dict(m)

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
        sort = request.query.get("sort", "mac")
        if sort not in SORT_KEYS:
            raise ValidationError("sort", f"{sort!r} is not one of {', '.join(SORT_KEYS)}")
        order = request.query.get("order", "asc")
        if order not in ("asc", "desc"):
            raise ValidationError("order", f"{order!r} is not asc or desc")
        flt = MachineFilter(state=st, cluster=request.query.get("cluster") or None,
                            labels=tuple(labels), text=request.query.get("q") or None,
                            sort=sort, descending=order == "desc",
                            limit=_int_query(request, "limit", 100, 1, 1000),
                            offset=_int_query(request, "offset", 0, 0, 10**9))
        items = await self._store.list_machines(flt)
        total = await self._store.count_machines(flt)
        out = [self._machine_out(m) for m in items]
        if request.query.get("last_event") in ("1", "true"):
            # One indexed read per machine of the page (at most ``limit``), for the
            # dashboard's "last event" column.
            for row, machine in zip(out, items, strict=True):
                last = await self._store.list_events(machine.id, limit=1)
                row["last_event"] = codec.event_to_dict(last[0]) if last else None
        return web.json_response({"items": out, "total": total, "limit": flt.limit,
                                  "offset": flt.offset})

    async def create_machine(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        machine = await self._core.create_machine(body, note="created through the API")
        return web.json_response(self._machine_out(machine), status=201)

    async def get_machine(self, request: web.Request) -> web.Response:
        return web.json_response(self._machine_out(await self._machine(request)))

    async def _machine(self, request: web.Request) -> Machine:
        return await self._core.machine(request.match_info["ref"])

    async def patch_machine(self, request: web.Request) -> web.Response:
        await self._machine(request)  # 404 before 400: the path is checked first
        body = _object(await read_json(request))
        machine = await self._core.update_machine(request.match_info["ref"], body)
        return web.json_response(self._machine_out(machine))

    async def delete_machine(self, request: web.Request) -> web.Response:
        await self._core.delete_machine(request.match_info["ref"])
        return web.Response(status=204)

    async def approve(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request)) if request.body_exists else {}
        machine = await self._core.approve(request.match_info["ref"], body)
        return web.json_response(self._machine_out(machine))

    async def reinstall(self, request: web.Request) -> web.Response:
        machine = await self._core.reinstall(request.match_info["ref"])
        return web.json_response(self._machine_out(machine))

    async def explain(self, request: web.Request) -> web.Response:
        return web.json_response(await self._core.explain(request.match_info["ref"],
                                                          arch=request.query.get("arch")))

    async def render(self, request: web.Request) -> web.Response:
        """What the machine would be served now (``netboot render``), secrets masked: the
        install token is a placeholder already, cluster join tokens are replaced here. Admin
        only all the same: a config names the cluster's servers and the machine's setup."""
        text = await self._core.render(request.match_info["ref"], request.match_info["kind"],
                                       arch=request.query.get("arch"))
        for cluster in await self._store.list_clusters():
            if cluster.token:
                text = text.replace(cluster.token, MASKED)
        return web.Response(text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    async def list_events(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        limit = _int_query(request, "limit", 1000, 1, 10000)
        events = await self._store.list_events(machine.id, limit=limit)
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
        raw = await request.read()  # cached by the body-timeout middleware, client_max_size
        if len(raw) > request.app[MAX_EVENT_KEY]:
            raise web.HTTPRequestEntityTooLarge(max_size=request.app[MAX_EVENT_KEY],
                                                actual_size=len(raw))
        body = loads(raw or b"null")
        event = await self._enroll.report(machine.id, _object(body))
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

    async def import_file(self, request: web.Request) -> web.Response:
        """An import file as ``netboot import`` reads it (CSV, YAML or JSON, ``?format=``),
        sent as the request body; ``?dry_run=1`` checks every row and changes nothing. The
        answer is the bulk report, errors by the file's line numbers."""
        fmt = request.query.get("format", "")
        if fmt not in IMPORT_FORMATS:
            raise ValidationError("format", f"{fmt!r} is not one of {', '.join(IMPORT_FORMATS)}")
        dry_run = request.query.get("dry_run", "0")
        if dry_run not in ("0", "1", "true", "false"):
            raise ValidationError("dry_run", "must be 1/true or 0/false")
        limit = request.app[MAX_BODY_KEY]
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        raw = await request.read()
        try:
            text = raw.decode("utf-8-sig")  # a BOM, as spreadsheet exports write one
        except UnicodeDecodeError:
            raise ValidationError("body", "the file is not UTF-8 text") from None
        rows = parse_import(text, fmt)
        report = await self._enroll.import_rows(rows, dry_run=dry_run in ("1", "true"))
        status = 400 if report.errors else (200 if not report.applied else 201)
        return web.json_response(report.as_dict(), status=status)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await fleet_status(self._store))

    async def cluster_nodes(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._core.get("clusters", name)
        nodes = await self._store.list_machines(MachineFilter(cluster=name, limit=100_000))
        return web.json_response([self._machine_out(m) for m in nodes])

    # -- profiles, clusters, groups -----------------------------------------------------
    def _list(self, kind: str) -> Handler:
        out = functools.partial(public_dict, kind)

        async def handler(request: web.Request) -> web.Response:
            return web.json_response([out(x) for x in await self._core.list_items(kind)])
        return handler

    def _get(self, kind: str) -> Handler:
        out = functools.partial(public_dict, kind)

        async def handler(request: web.Request) -> web.Response:
            return web.json_response(out(await self._core.get(kind, request.match_info["name"])))
        return handler

    def _put(self, kind: str, *, create: bool) -> Handler:
        out = functools.partial(public_dict, kind)

        async def handler(request: web.Request) -> web.Response:
            body = _object(await read_json(request))
            if not create:
                name = request.match_info["name"]
                if "name" in body and body["name"] != name:
                    raise ValidationError("name", "does not match the URL")
                body = {**body, "name": name}
            item = await self._core.put(kind, body, create=create)
            return web.json_response(out(item), status=201 if create else 200)
        return handler

    def _delete(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            await self._core.delete(kind, request.match_info["name"])
            return web.Response(status=204)
        return handler

    async def openapi(self, request: web.Request) -> web.Response:
        from netboot.openapi import document

        return web.json_response(document())
