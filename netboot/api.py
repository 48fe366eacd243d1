"""REST API ``/api/v1``: machines, profiles, clusters, groups, events, registration.

JSON in and out. Every route needs a bearer token whose scope grants the route's permission
(netboot.access), but two that belong to devices: registration (the install token is in the
body) and a machine's progress reports (its install token, or an operator's token). Every
change asked (allowed or not) goes to the audit log. Errors are translated in one place
(:func:`netboot.servers.aio.error_response`): 400 naming the field, 401/403, 404, 409, 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

from aiohttp import web

from netboot.access import (
    REFUSED_ALL_BURST,
    REFUSED_BURST,
    REFUSED_RATE,
    Permission,
    Principal,
    RefusalBudget,
    parse_duration,
    public_token,
)
from netboot.addresses import parse_peer
from netboot.claims import claims_out
from netboot.core import (
    Core,
    item_version,
    machine_dict,
    machine_ref,
    public_dict,
)
from netboot.enroll import (
    SERVER_NEEDS_OPERATOR,
    fleet_status,
    parse_import,
    renamed_installed,
    token_expired,
    token_is,
    token_matches,
)
from netboot.errors import (
    AuthError,
    Conflict,
    NetbootError,
    NotFound,
    OutcomeUnknown,
    RateLimited,
    ScopeRequired,
    StoreError,
    ValidationError,
)
from netboot.events import EventBus, Missed, Published, Subscription
from netboot.identity import machine_version
from netboot.inventory import codec
from netboot.inventory.base import SORT_KEYS, GroupsKept, MachineFilter
from netboot.logs import RateLimitedLog, log_line
from netboot.model import AuditEntry, Event, Machine, MachineState
from netboot.servers.aio import MAX_BODY_KEY, MAX_EVENT_KEY, OUTCOME_UNKNOWN, serve_plain
from netboot.servers.fasthttp import Reply
from netboot.servers.http import bearer_token, local_address
from netboot.standing import Standing
from netboot.web.auth import request_token

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Per request, for the audit log: who asked (a token's name, machine:<id>) and, where the path
# does not name it, what was created.
ACTOR_KEY = web.RequestKey("actor", str)
# Who the request's token is (Api.principal): what an import may do with it.
PRINCIPAL_KEY = web.RequestKey("principal", Principal)
# What a create or an approval answers a token that may not read (Api._told): the machine's
# identity and the settings it decided (Machine's required fields: id, macs, state).
_APPROVAL_SHOWN = ("id", "mac", "macs", "state", "hostname", "cluster", "role", "profile")
# Set on a refused report that is not the first of its run (RateLimited.told): not audited.
TOLD_KEY = web.RequestKey("told", bool)
TARGET_KEY = web.RequestKey("target", str)
# The machine id a hostname in the path named (api._ref): the audit entry's target, since a
# hostname may name another machine tomorrow.
REF_KEY = web.RequestKey("ref", str)
SSE_KEEPALIVE_SECONDS = 15.0
# How often an open event stream looks at the inventory's health (InventoryHealth.as_dict,
# a few attribute reads), to send ``event: inventory`` when it changed: the dashboard's
# banner, which asked GET /api/v1/status (the fleet's counts too) every 15 s per open tab.
SSE_HEALTH_SECONDS = 2.0
# How often an open event stream's token is checked again: a stream is authenticated when it
# opens and then lasts as long as its reader, so a revoked or expired token (a leaked
# dashboard token revoked, a 90 s one) kept receiving every machine event, and kept one of
# EventBus.max_subscribers, for good (s37-attack). Kubernetes ends a watch at a timeout for
# the same reason; here the stream ends within this time of the token's end.
SSE_RECHECK_SECONDS = 15.0
# Encoded SSE messages kept for the other streams (Api._frame): a subscriber's queue holds
# at most EventBus.queue_size (1,000) events, so a stream that is behind by more has been
# told "missed" for the rest.
FRAMES_KEPT = 2048
# The most bytes of event messages one write of a stream carries (Api._stream): a burst
# goes out a part at a time, each once the socket took the last.
STREAM_PART = 64 * 1024
MASKED = "********"
IMPORT_FORMATS = ("csv", "yaml", "json")
# Bad rows an import's answer lists (the first, by line; errors_total counts them all): one
# 1 MiB body of 340,000 bad rows was a 37 MB answer, ~2.8 s of the event loop's encoding,
# every DHCP, TFTP and HTTP answer held meanwhile, an enroll token's to repeat (s39-attack).
# A person fixes a file from its first errors; the CLI's own import lists every one.
ERRORS_SHOWN = 1000
# After an audit entry's status: the inventory could not say whether the change was written.
UNKNOWN = "outcome unknown"
# ... and after that, where the entry written with the change was found later: it was.
WRITTEN = "(written)"


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


def _json_reply(body: Any, status: int) -> Reply:
    """As web.json_response encodes it (json.dumps' defaults): both doors send the same."""
    return Reply(status, json.dumps(body).encode(), "application/json; charset=utf-8")


def _registered_out(machine: Machine, body: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to a registration: the machine, and its machine token, which the installed
    OS keeps (/var/lib/netboot/machine-token) and reports with at its later boots (the
    register command, netboot.content.register_texts). Only here: the API never lists it.

    Only to a command that keeps it (its body says ``"keeps": "machine_token"``, or it
    reported with one): an older netboot's register command cannot, and prints the answer
    to the boot log (k3OS's run_cmd output, cloud-init-output.log, which most images leave
    world-readable), where whoever reads it could move the machine's address (s38-journey)."""
    out = machine_dict(machine)
    if machine.install_token and machine.state is MachineState.REGISTERED \
            and (body.get("keeps") == "machine_token" or "machine_token" in body):
        out["machine_token"] = machine.install_token
    return out


def _etag(machine: Machine) -> dict[str, str]:
    """A machine's version as an ETag (RFC 9110 §8.8.3), for a later edit's If-Match."""
    return {"ETag": f'"{machine_version(machine)}"'}


def _item_etag(kind: str, item: Any) -> dict[str, str]:
    """A profile's, cluster's or group's version as an ETag (core.item_version)."""
    return {"ETag": f'"{item_version(kind, item)}"'}


def _if_match(request: web.Request) -> frozenset[str] | None:
    """The versions an edit's If-Match names (RFC 9110 §13.1.1: the edit is made only if
    the machine is at one of them, else 412), None without the header or with ``*`` (any:
    the machine exists). Two operators editing one machine: the second, who read it before
    the first's edit, is told instead of writing over it (a PATCH's labels replace the
    machine's; Kubernetes' resourceVersion, which Tinkerbell's objects have). A weak tag
    (W/"…") never matches: If-Match compares strongly."""
    header = request.headers.get("If-Match")
    if header is None:
        return None
    tags = [tag.strip() for tag in header.split(",")]
    if "*" in tags:
        return None
    return frozenset(tag[1:-1] for tag in tags
                     if len(tag) >= 2 and tag[0] == tag[-1] == '"')


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


def _float_query(request: web.Request, key: str) -> float | None:
    text = request.query.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(key, f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValidationError(key, "must be a finite number (seconds since the epoch)")
    return value


async def _awaited(work: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait for ``work`` to end though the waiter is cancelled; the cancel that came, if
    one did. A second cancel (someone insisting: asyncio.run's end after the runner's)
    cancels ``work`` too, so that a write that hangs cannot hold the process."""
    cancel = None
    while not work.done():
        try:
            await asyncio.wait((work,))
        except asyncio.CancelledError as exc:
            if cancel is not None:
                work.cancel()
            cancel = cancel or exc
    return cancel


def _outcome(work: asyncio.Future[web.StreamResponse]) -> str:
    """An audit entry's outcome: the status the handler answered or raised (and whether
    the change's outcome is unknown: :func:`_answered`), "aborted" if it ended otherwise
    (cancelled, or an error no middleware translated)."""
    if work.cancelled():
        return "aborted"
    exc = work.exception()
    if exc is None:
        answer = work.result()
        return _answered(answer.status, answer.get(OUTCOME_UNKNOWN, False))
    return str(exc.status) if isinstance(exc, web.HTTPException) else "aborted"


def _answered(status: int, unknown: bool) -> str:
    """The outcome of a change answered with ``status``; with " outcome unknown" where the
    inventory could not say whether it was written (OutcomeUnknown): its 503 is not the
    one that says nothing was changed."""
    return f"{status} {UNKNOWN}" if unknown else str(status)


# At most this many machines named by a text search are read by id (GET /machines?q=);
# more, and the store scans. With 100,000 machines (SQLite, load ~12): by id ~22-37 us a
# machine (1,000: 33-49 ms, 10,000: 0.22-0.37 s, 100,000: 1.1-1.2 s), the scan 0.7-1.1 s
# for a few matches and ~0.15 s for all (its page found at once, the count cut short);
# the view stops looking past this many (benchmarks/README.md s37-ops).
TEXT_IDS_MAX = 10_000


def _health_frame(health: Mapping[str, str | None]) -> bytes:
    """The SSE message of the inventory's health (``event: inventory``, as GET /status's
    ``inventory``: state and detail)."""
    return f"event: inventory\ndata: {json.dumps(health)}\n\n".encode()


def _warnings_frame(standing: Standing) -> bytes:
    """The SSE message of what stands (``event: warnings``, as GET /status's ``warnings``)."""
    return f"event: warnings\ndata: {json.dumps(standing.as_list())}\n\n".encode()


class Api:
    """The HTTP face of :class:`netboot.core.Core`: parses requests, answers JSON."""

    def __init__(self, core: Core, *, clock: Callable[[], float],
                 events: EventBus | None = None,
                 logger: logging.Logger | None = None,
                 standing: Standing | None = None) -> None:
        self._core = core
        # What stands that the operator must fix (netboot.standing): the server's own.
        self._standing = standing or Standing()
        self._store = core.store
        self._enroll = core.enroller
        self._access = core.access
        self._clock = clock
        self._events = events
        self._log = logger or logging.getLogger(__name__)
        self._refusals = RefusalBudget()
        self._limited = RateLimitedLog(self._log, burst=1)
        self._frames: dict[int, bytes] = {}  # SSE messages by event sequence (_frame)
        # What the fleet status's counts by group remember between calls (fleet_status).
        self._groups_kept = GroupsKept()
        self._parsing = asyncio.Lock()  # import files parsed one at a time (import_file)

    def add_to(self, app: web.Application) -> None:
        """Every route with the permission it needs (netboot.access); the audit middleware
        goes first, so that it sees the status the client got, errors translated."""
        app.middlewares.insert(0, self._audit_middleware)
        r = app.router
        p = "/api/v1"
        read, enroll, operate = Permission.READ, Permission.ENROLL, Permission.OPERATE
        configure, administer = Permission.CONFIGURE, Permission.ADMINISTER
        r.add_get(f"{p}/openapi.json", self.allow(read, self.openapi))
        r.add_get(f"{p}/machines", self.allow(read, self.list_machines))
        r.add_post(f"{p}/machines", self.allow(enroll, self.create_machine))
        r.add_post(f"{p}/machines:bulk", self.allow(enroll, self.bulk))
        r.add_post(f"{p}/machines:import", self.allow(enroll, self.import_file))
        # {ref}: one of the machine's MACs (any spelling), its id, or its hostname
        # (core.machine_ref: the id or MAC first; one that is both and names two is a 409).
        r.add_get(f"{p}/machines/{{ref}}", self.allow(read, self.get_machine))
        r.add_patch(f"{p}/machines/{{ref}}", self.allow(operate, self.patch_machine))
        r.add_delete(f"{p}/machines/{{ref}}", self.allow(operate, self.delete_machine))
        r.add_post(f"{p}/machines/{{ref}}/approve", self.allow(enroll, self.approve))
        r.add_post(f"{p}/machines/{{ref}}/reinstall", self.allow(operate, self.reinstall))
        r.add_post(f"{p}/machines/{{ref}}/claim", self.allow(operate, self.give_to_claim))
        r.add_get(f"{p}/machines/{{ref}}/claims", self.allow(read, self.refused_claims))
        r.add_get(f"{p}/machines/{{ref}}/explain", self.allow(read, self.explain))
        r.add_get(f"{p}/machines/{{ref}}/events", self.allow(read, self.list_events))
        # Masked renders: what the device gets, without its install token or the join token.
        r.add_get(f"{p}/machines/{{ref}}/render/{{kind}}", self.allow(read, self.render))
        # The device's own two routes, also on plain HTTP (its installer may have no CA): a
        # machine's installer reports with its install token (checked in the handler), and
        # registration carries it in the body. An operator reporting by hand uses HTTPS.
        serve_plain(app, r.add_post(f"{p}/machines/{{ref}}/events", self.post_event),
                    r.add_post(f"{p}/register", self.register))
        for kind in ("profiles", "clusters", "groups"):
            r.add_get(f"{p}/{kind}", self.allow(read, self._list(kind)))
            r.add_post(f"{p}/{kind}", self.allow(configure, self._put(kind, create=True)))
            r.add_get(f"{p}/{kind}/{{name}}", self.allow(read, self._get(kind)))
            r.add_put(f"{p}/{kind}/{{name}}",
                      self.allow(configure, self._put(kind, create=False)))
            r.add_delete(f"{p}/{kind}/{{name}}", self.allow(configure, self._delete(kind)))
        r.add_get(f"{p}/clusters/{{name}}/nodes", self.allow(read, self.cluster_nodes))
        r.add_post(f"{p}/clusters/{{name}}/secure-token",
                   self.allow(configure, self.secure_token))
        r.add_get(f"{p}/status", self.allow(read, self.status))
        r.add_get(f"{p}/tokens", self.allow(administer, self.list_tokens))
        r.add_post(f"{p}/tokens", self.allow(administer, self.create_token))
        r.add_delete(f"{p}/tokens/{{name}}", self.allow(administer, self.revoke_token))
        r.add_get(f"{p}/audit", self.allow(administer, self.audit_log))
        if self._events is not None:
            r.add_get(f"{p}/events/stream", self.allow(read, self.event_stream))

    # -- access -----------------------------------------------------------------------
    async def principal(self, request: web.Request) -> Principal:
        """Who sent the request (401 without a valid token); kept for the audit log."""
        # A bearer token, or the dashboard's session cookie (with its CSRF token on changes).
        found = await self._access.authenticate(request_token(request))
        request[ACTOR_KEY] = found.name
        request[PRINCIPAL_KEY] = found
        return found

    def allow(self, permission: Permission, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            who = await self.principal(request)
            who.require(permission)
            if who.allows(Permission.READ):
                return await handler(request)
            try:
                return await handler(request)
            except Conflict as exc:
                if exc.holder is None and not exc.candidates:
                    raise
                # A token that may not read (enroll: a factory-floor scanner) is told that an
                # identifier or name is taken, not which machine holds it: "serial X already
                # belongs to machine m-… (52:54:…)" mapped serials and hostnames to the MACs
                # a host on the VLAN needs to take a machine's install (s37-attack).
                raise Conflict(f"{exc.field or 'an identifier'} is held by another machine "
                               "already", field=exc.field) from None
        return guarded

    @staticmethod
    def _create_only(request: web.Request) -> bool:
        """Whether an import may only create machines (and enroll discovered ones), and no
        server: for a token that may not change them (enroll scope), Enroller.import_rows'
        create_only and Enroller.approve's enroll_only."""
        who = request.get(PRINCIPAL_KEY)
        return who is None or not who.allows(Permission.OPERATE)

    @web.middleware
    async def _audit_middleware(self, request: web.Request,
                                handler: Any) -> web.StreamResponse:
        """Every change asked of the API, allowed or not, with the status it got."""
        route = request.match_info.route.resource
        if (request.method in ("GET", "HEAD", "OPTIONS") or route is None
                or not route.canonical.startswith("/api/v1/")):
            passed: web.StreamResponse = await handler(request)
            return passed
        # Run to its end even if this request is cancelled (aiohttp cancels the handler of a
        # client that left where handler_cancellation is on, the runner those still running
        # at shutdown): a change's write goes on in the store's thread or group commit
        # whatever its caller does, so a cancel that came while it was written would leave
        # the change made and the log saying "aborted". The cancel is passed on after the
        # entry, which says what was done.
        work = asyncio.ensure_future(handler(request))
        cancel = await _awaited(work)
        outcome = _outcome(work)
        if (cancel is not None and not (outcome.isdigit() and int(outcome) < 400)
                and not outcome.endswith(UNKNOWN)):
            outcome = "aborted"  # nothing changed, and nobody was told: the client is gone
        target = (request.get(REF_KEY) or request.match_info.get("ref")
                  or request.match_info.get("name") or request.get(TARGET_KEY, ""))
        if not request.get(TOLD_KEY, False):  # a run of refused reports: audited once
            await self._audit(request.get(ACTOR_KEY, "-"), request.method, route.canonical,
                              target, request.remote, outcome)
        if cancel is not None:
            raise cancel
        done: web.StreamResponse = work.result()  # or the handler's exception, raised
        return done

    async def _audit(self, actor: str, method: str, route: str, target: str,
                     remote: str | None, outcome: str) -> None:
        peer = remote or "-"
        skipped = 0
        if actor == "-" and outcome[:1] == "4":  # refused, no valid token: budgeted per peer
            counted = self._refusals.admit(peer, self._clock())
            if counted is None:
                # One line a peer a minute (lines past it counted by the log's own limit).
                self._limited.log(logging.WARNING, peer, "audit: refused requests from %s "
                                  "past %d at once (%g a second), or all peers' past %d: "
                                  "counted, not recorded one by one (%s %s %s)", peer,
                                  REFUSED_BURST, REFUSED_RATE, REFUSED_ALL_BURST, method,
                                  route, outcome)
                return
            skipped = counted
        try:
            if skipped:
                await self._access.record("-", "refused requests not recorded", "", peer=peer,
                                          outcome=f"{skipped} refused")
            await self._access.record(actor, f"{method} {route}", target, peer=peer,
                                      outcome=outcome)
        except NetbootError as exc:
            # The change (if any) is done; refusing the answer now would only hide it.
            self._log.error("audit entry lost for %s %s: %s", method, route, exc)

    async def front_post(self, route: str, ref: str | None, bearer: str | None, body: bytes,
                         remote: str | None, translate: Callable[[Exception], Reply],
                         ) -> Reply | None:
        """:meth:`post_event` or :meth:`register` for the front door, which read the request
        itself (netboot.servers.http.FrontDoor.start_post): the same answers, errors and
        audit entry. None, having done nothing, where a report needs an operator's token
        (an unknown machine, not its install token): aiohttp's path answers it, with the
        plain-HTTP policy that decides whether such a token may be read at all."""
        # The audit entry's actor and target, as they become known; a third item once the
        # entry was written with the change itself (a device's report or registration that
        # succeeded: one commit where the change's and the entry's followed each other,
        # and the entry is on disk exactly when the change is).
        asked = ["-", ref or ""]
        made: list[AuditEntry] = []  # the entry that went with the change, if one did
        unknown = told = False
        try:
            reply = await (self._front_event(ref, bearer, body, asked, route, remote, made)
                           if ref is not None
                           else self._front_register(body, remote, asked, route, made))
        except Exception as exc:  # the one translation (netboot.servers.http.error_reply)
            reply = translate(exc)
            unknown = isinstance(exc, OutcomeUnknown)
            told = isinstance(exc, RateLimited) and exc.told
        except BaseException:
            # Cancelled before its change was made, or with its change refused: a cancel
            # that comes while the commit is under way is told only once that commit is
            # over, and a commit that was written returns (Recorder.commit): its entry,
            # written with it, is the one this request gets, not this one beside it.
            await self._audit(asked[0], "POST", route, asked[1], remote, "aborted")
            raise
        if reply is not None:
            if len(asked) > 2:
                try:
                    await self._access.recorded()  # now and then, the oldest entries pruned
                except NetbootError as exc:
                    # Written with its change: refusing the answer now would only hide that
                    # it was (a 503 says nothing was changed; a retry would find it done).
                    self._log.error("audit log prune failed after POST %s: %s", route, exc)
            elif unknown and made:
                # Its entry went with the change, which may be stored: one entry all the
                # same, that one's outcome replaced if it is (two, "201" and "503 outcome
                # unknown", told both that it was and that nobody knew).
                try:
                    await self._access.settled(made[-1], f"{_answered(reply.status, True)}"
                                               f" {WRITTEN}", _answered(reply.status, True))
                except NetbootError as exc:
                    self._log.error("audit entry lost for POST %s: %s", route, exc)
            elif not told:  # a run of refused reports is audited once, by its first
                await self._audit(asked[0], "POST", route, asked[1], remote,
                                  _answered(reply.status, unknown))
        return reply

    async def _front_event(self, ref: str, bearer: str | None, body: bytes,
                           asked: list[str], route: str, remote: str | None,
                           made: list[AuditEntry]) -> Reply | None:
        try:
            machine = await self._core.boot.machine_by_ref(ref)
        except (NotFound, ValidationError):
            return None  # only an operator learns which machines do not exist (or names
            # them by hostname): aiohttp's path answers
        if not token_matches(machine, bearer, self._clock()):
            return None  # an operator reporting by hand, or nobody
        asked[0] = f"machine:{machine.id}"
        entry = self._access.entry(asked[0], f"POST {route}", asked[1], peer=remote or "-",
                                   outcome="201")
        made.append(entry)
        event = await self._reported(machine, loads(body or b"null"), audit=(entry,))
        asked.append("written")
        return _json_reply(codec.event_to_dict(event), 201)

    async def _front_register(self, body: bytes, remote: str | None, asked: list[str],
                              route: str, made: list[AuditEntry]) -> Reply:
        if not body:
            raise ValidationError("body", "a JSON body is required")

        def entry(machine: Machine) -> AuditEntry:
            made.append(self._access.entry(f"machine:{machine.id}", f"POST {route}",
                                           machine.id, peer=remote or "-", outcome="200"))
            return made[-1]

        asked_for = _object(loads(body))
        machine = await self._enroll.register(asked_for, parse_peer(remote), audit=entry)
        asked[:] = [f"machine:{machine.id}", machine.id, "written"]
        return _json_reply(_registered_out(machine, asked_for), 200)

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: every machine event as it is recorded (``event: machine``),
        and ``event: missed`` when this reader fell behind and events were dropped (reload
        what is shown); ``event: inventory``, the inventory's health (GET /status's), as it
        opens and whenever it changes (the dashboard's banner). Needs a token (bearer or the
        dashboard's cookie): event messages name machines, addresses and clusters (read
        scope)."""
        assert self._events is not None
        token = request_token(request)  # what opened it (guarded: valid then)
        after = self._resumed_after(request)
        with self._events.subscribe(request.get(ACTOR_KEY), after=after) as sub:
            resp = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-store",
                # nginx would buffer the stream otherwise.
                "X-Accel-Buffering": "no"})
            await resp.prepare(request)
            # The reader left (a tab closed): its next write finds the connection gone
            # (aiohttp's ClientConnectionResetError). Not a bug: it was logged as one, with
            # a traceback and a 500 in the access log, per closed tab (s37-attack).
            with contextlib.suppress(ConnectionResetError):
                await self._stream(resp, sub, token, resumed=after is not None)
            return resp

    def _resumed_after(self, request: web.Request) -> int | None:
        """Where a dropped stream resumes: the seq of ``Last-Event-ID`` (EventSource sends
        the last ``id:`` it read when it reconnects, HTML's server-sent events §9.2.4), or of
        ``?last_event_id=`` (a dashboard tab that takes over the stream of a tab that
        closed: a new EventSource cannot send the header). An id of another process (a
        restart, another server behind the name) or not one of ours: -1, told ``missed``."""
        assert self._events is not None
        text = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        if not text:
            return None
        return self._events.seq_of(text)

    async def _stream(self, resp: web.StreamResponse, sub: Subscription,
                      token: str | None, *, resumed: bool = False) -> None:
        """:meth:`event_stream`'s messages until the server stops, the token ends or the
        reader leaves (ConnectionResetError)."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        # The inventory's health as the dashboard's banner shows it (GET /status's
        # "inventory"): sent as the stream opens and again whenever it changes, so that an
        # open tab asks no /status for it (s41-ops).
        health = self._core.boot.health
        told = health.as_dict()
        # The browser reconnects by itself after a drop (EventSource, 3 s by default). The
        # health in the first message, with the retry (a reader that reads one message to
        # see the stream open reads them both), then the comment that says it is open.
        # What stands, as it opens and whenever it changes: the dashboard's warnings. Sent
        # as it opens when none stands too, as the health is: a tab reconnecting (a server
        # restarted with them fixed, another server behind the same name) kept the banner
        # its last stream had shown, for good (s44-review).
        standing = self._standing
        warned = standing.version
        # A new stream's first message carries its place (the last event's id before it
        # opened) as its id: one that drops before any event resumes from there. A resumed
        # one keeps the place its reader sent.
        assert self._events is not None
        place = b"" if resumed else f"id: {self._events.event_id(sub.place)}\n".encode()
        await resp.write(b"retry: 3000\n" + place + _health_frame(told)
                         + _warnings_frame(standing) + b": connected\n\n")
        wrote = loop.time()
        while True:
            idle = False
            try:
                item = await asyncio.wait_for(sub.next(), min(SSE_HEALTH_SECONDS,
                                                              SSE_KEEPALIVE_SECONDS))
            except TimeoutError:
                item, idle = None, True
            if item is None and not idle:  # the server stops (EventBus.close)
                return
            if loop.time() - checked >= SSE_RECHECK_SECONDS:
                # Before anything more is sent: the token may have been revoked or
                # expired since the stream opened (or since the last check).
                try:
                    await self._access.authenticate(token)
                except AuthError:
                    return  # EventSource reconnects and is told 401
                except StoreError:
                    pass  # the inventory does not answer now: asked again next time
                else:
                    checked = loop.time()
            now = health.as_dict()
            if now != told:
                told = now
                await resp.write(_health_frame(now))
                wrote = loop.time()
            if standing.version != warned:
                warned = standing.version
                await resp.write(_warnings_frame(standing))
                wrote = loop.time()
            if item is None:
                if loop.time() - wrote >= SSE_KEEPALIVE_SECONDS:
                    # A comment line: keeps proxies and NAT from closing an idle stream,
                    # and finds a reader that went away.
                    await resp.write(b": keep-alive\n\n")
                    wrote = loop.time()
                continue
            # What else is queued goes in the same write: a storm's group commit
            # publishes hundreds of events at once, which were a write (a send, a TCP
            # segment) each, per open dashboard (benchmarks/README.md, s36-ops). In parts
            # of at most STREAM_PART bytes, each once the last has left (aiohttp's write
            # waits for the socket past 64 KiB): a stream resumed from 1,000 events back
            # was one write of all of them, held for a reader that does not read (~11 MB
            # of 16 KB reports, a stream; s48-attack).
            part = [self._frame(item)]
            size = len(part[0])
            for more in map(self._frame, sub.ready()):
                if size + len(more) > STREAM_PART:
                    await resp.write(b"".join(part))
                    part, size = [], 0
                part.append(more)
                size += len(more)
            await resp.write(b"".join(part))
            wrote = loop.time()

    def _frame(self, item: Published | Missed) -> bytes:
        """An SSE message. A machine event is encoded once for every stream that sends it
        (kept by its sequence number while the streams are likely to ask: each tab's
        stream encoded each event again, a JSON encoding per event per open dashboard)."""
        if isinstance(item, Missed):
            return f"event: missed\ndata: {item.count}\n\n".encode()
        frames = self._frames
        frame = frames.get(item.seq)
        if frame is None:
            data = json.dumps(codec.event_to_dict(item.event), ensure_ascii=False)
            # The id names this process too: a resume from another's (a restart) is told
            # "missed" (Api._resumed_after, EventBus.seq_of).
            assert self._events is not None
            frame = frames[item.seq] = (
                f"id: {self._events.event_id(item.seq)}\nevent: machine\n"
                f"data: {data}\n\n").encode()
            if len(frames) > FRAMES_KEPT:
                del frames[next(iter(frames))]  # the oldest (dicts keep insertion order)
        return frame

    # -- tokens and the audit log -------------------------------------------------------
    async def list_tokens(self, request: web.Request) -> web.Response:
        return web.json_response([public_token(t) for t in await self._access.list_tokens()])

    async def create_token(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        unknown = sorted(set(body) - {"name", "scope", "expires_in"})
        if unknown:
            raise ValidationError(unknown[0], "unknown field (known: name, scope, expires_in)")
        request[TARGET_KEY] = str(body.get("name", ""))[:64]
        expires = body.get("expires_in")
        token, value = await self._access.create_token(
            body.get("name"), body.get("scope"),
            expires_in=None if expires is None else parse_duration(expires, "expires_in"))
        # The value is shown this once: only its hash is kept.
        return web.json_response({**public_token(token), "token": value}, status=201)

    async def revoke_token(self, request: web.Request) -> web.Response:
        await self._access.revoke(request.match_info["name"])
        return web.Response(status=204)

    async def audit_log(self, request: web.Request) -> web.Response:
        since = _float_query(request, "since")
        limit = _int_query(request, "limit", 1000, 1, 10000)
        entries = await self._access.audit_log(since=since, limit=limit)
        return web.json_response([codec.audit_to_dict(e) for e in entries])

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
        # Machines stuck in a storm: in their state for at least this many seconds (their
        # state_since: a learnt fact or a token's change does not reset it); with a state,
        # where they are stuck (booting: a script fetched and no config; installing: no
        # "installed"; installed: never registered).
        still = _int_query(request, "unchanged_for", 0, 0, 10**9)
        flt = MachineFilter(state=st, cluster=request.query.get("cluster") or None,
                            labels=tuple(labels), text=request.query.get("q") or None,
                            in_state_before=self._clock() - still if still else None,
                            sort=sort, descending=order == "desc",
                            limit=_int_query(request, "limit", 100, 1, 1000),
                            offset=_int_query(request, "offset", 0, 0, 10**9))
        if flt.text:
            # The view finds the few machines a search names in memory (~5-30 ms with
            # 100,000); the store then reads those, with the other filters, its order and
            # its own text check. Scanned by the store, every machine: 1-2 s (s37-ops). A
            # search naming most of the fleet is left to the scan, which finds its page's
            # first rows at once: read by id, 100,000 of them took 6-13 s.
            ids = await self._core.boot.matching_text(flt.text, TEXT_IDS_MAX)
            if ids is not None:
                flt = replace(flt, ids=ids)
        items, total = await self._page(flt)
        if request.query.get("last_event") not in ("1", "true"):
            return web.json_response({"items": [self._machine_out(m) for m in items],
                                      "total": total, "limit": flt.limit, "offset": flt.offset})
        # The dashboard's "last event" column.
        items, newest = await self._with_newest_events(items)
        out = []
        for machine in items:
            row = self._machine_out(machine)
            last = newest.get(machine.id)
            row["last_event"] = codec.event_to_dict(last) if last is not None else None
            out.append(row)
        return web.json_response({"items": out, "total": total, "limit": flt.limit,
                                  "offset": flt.offset})

    async def _page(self, flt: MachineFilter) -> tuple[list[Machine], int]:
        """A page of the list and how many machines the filter names. A page in the far half
        of the default order (by MAC) is read from the other end: the same rows, reversed,
        without stepping over the offset's rows (the dashboard's "last" of 100,000 machines:
        400,163 SQLite steps, 76 ms, against 363, 0.4 ms). Only by MAC: its two directions
        are each other's mirror in every store (NULLs and ties too); another key's are not
        (machines without it last either way)."""
        if flt.sort != "mac" or not flt.offset:
            items = await self._store.list_machines(flt)
            return items, await self._store.count_machines(flt)
        total = await self._store.count_machines(flt)
        left = total - flt.offset  # rows from the page's first to the end
        if left <= 0 or left - flt.limit >= flt.offset:
            return await self._store.list_machines(flt), total
        mirror = replace(flt, descending=not flt.descending, limit=min(flt.limit, left),
                         offset=max(0, left - flt.limit))
        return (await self._store.list_machines(mirror))[::-1], total

    async def _with_newest_events(self, items: list[Machine]
                                  ) -> tuple[list[Machine], dict[str, Event]]:
        """The page's machines, each with its newest event, as of one moment. Read apart, a
        row said **booting** beside "registered: registered at ..." (s45-review: the
        registration committed between the page's read and its events'). A machine's change
        and its event are committed together (one Batch), so a machine read the same after
        its event was read as before is the one that event left; one that changed is taken
        as read again and its event read again, at most three times (a machine changing
        faster than a read of 50 events is shown as last read)."""
        ids = [m.id for m in items]
        by_id = {m.id: m for m in items}
        newest = await self._store.newest_events(ids)  # one statement for the page
        check = ids
        for _ in range(3):
            if not check:
                break
            again = await self._store.list_machines(
                MachineFilter(ids=frozenset(check), limit=len(check)))
            moved = [m.id for m in again if m != by_id[m.id]]
            by_id.update((m.id, m) for m in again)
            if moved:
                newest.update(await self._store.newest_events(moved))
            check = moved
        return [by_id[i] for i in ids], newest

    async def create_machine(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request))
        if body.get("role") == "server" and self._create_only(request):
            raise ScopeRequired("operator", SERVER_NEEDS_OPERATOR)
        machine = await self._core.create_machine(body, note="created through the API")
        request[TARGET_KEY] = machine.id
        return web.json_response(self._told(request, machine), status=201,
                                 headers=_etag(machine))

    async def get_machine(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        return web.json_response(self._machine_out(machine), headers=_etag(machine))

    async def _ref(self, request: web.Request) -> str:
        """The path's ``{ref}``, a hostname taken as the machine's id (core.machine_ref)."""
        given = request.match_info["ref"]
        who = request.get(PRINCIPAL_KEY)
        if who is None or not who.allows(Permission.READ):
            # A token that may not read (enroll: a scanner approving) names a machine by a
            # MAC or id, as before: by a guessed hostname its approval's answer, or refusal,
            # gave the machine's MAC (s37-attack's mapping; the device's own report is
            # answered by its MAC or id alone).
            return given
        ref = await machine_ref(self._store, given)
        if ref != given:
            request[REF_KEY] = ref
        return ref

    async def _machine(self, request: web.Request) -> Machine:
        return await self._core.machine(await self._ref(request))

    async def patch_machine(self, request: web.Request) -> web.Response:
        ref = await self._ref(request)
        await self._core.machine(ref)  # 404 before 400: the path is checked first
        body = _object(await read_json(request))
        read: list[Machine] = []

        def made(machine: Machine) -> Mapping[str, Any]:
            read[:] = [machine]  # the machine as the change was made from (at each try)
            return body

        machine = await self._core.update_machine(ref, made if "hostname" in body else body,
                                                  versions=_if_match(request))
        out = self._machine_out(machine)
        # A rename its installed OS does not follow, said as the CLI's `machines set` says it.
        note = renamed_installed(read[0], machine) if read else None
        if note:
            out["warnings"] = [{"field": "hostname", "error": note}]
        return web.json_response(out, headers=_etag(machine))

    async def delete_machine(self, request: web.Request) -> web.Response:
        await self._core.delete_machine(await self._ref(request), versions=_if_match(request))
        return web.Response(status=204)

    async def approve(self, request: web.Request) -> web.Response:
        body = _object(await read_json(request)) if request.body_exists else {}
        machine = await self._core.approve(await self._ref(request), body,
                                           enroll_only=self._create_only(request),
                                           versions=_if_match(request))
        return web.json_response(self._told(request, machine), headers=_etag(machine))

    def _told(self, request: web.Request, machine: Machine) -> dict[str, Any]:
        """The machine a create or an approval answers: to a token that may enroll but not
        read (a scanner), what it decided, not the machine. Its repeat of an approval on a
        machine an operator enrolled (enroll_only lets it through) answered the serial,
        labels, facts and fixed_ipv4 of any MAC it named, and a create over a discovered
        record that record's learnt facts, reads its scope lacks (s41-attack)."""
        out = self._machine_out(machine)
        who = request.get(PRINCIPAL_KEY)
        if who is None or not who.allows(Permission.READ):
            return {key: out.get(key) for key in _APPROVAL_SHOWN}
        return out

    async def give_to_claim(self, request: web.Request) -> web.Response:
        machine = await self._core.give_to_claim(await self._ref(request),
                                                 _object(await read_json(request)))
        return web.json_response(self._machine_out(machine))

    async def refused_claims(self, request: web.Request) -> web.Response:
        # The claims this server refused by address (netboot.claims), the most tried first:
        # where the device's is found when a flood used its events up (s40-claim).
        # Only those refused against its registration as it is now (a reinstalled machine's
        # old contest is history: s41-ops). By any server of the inventory, kept through
        # restarts (KeptClaims, s42-ops); Kept-Since: when this server began keeping them
        # (its start), its own counts only since.
        machine = await self._machine(request)
        enroller = self._core.enroller
        return web.json_response(
            claims_out(await enroller.kept.held(machine)),
            headers={"Kept-Since": repr(enroller.claims.since)})

    async def reinstall(self, request: web.Request) -> web.Response:
        machine = await self._core.reinstall(await self._ref(request),
                                             versions=_if_match(request))
        return web.json_response(self._machine_out(machine), headers=_etag(machine))

    async def explain(self, request: web.Request) -> web.Response:
        return web.json_response(await self._core.explain(await self._ref(request),
                                                          arch=request.query.get("arch")))

    async def render(self, request: web.Request) -> web.Response:
        """What the machine would be served now (``netboot render``), secrets masked: the
        install token and the machine's join token are placeholders (Core.render); any other
        cluster's join token that a template wrote as it is, is replaced here. Read scope
        (README's "Access")."""
        # At the address the request came in on: on a host with no address advertised, a
        # device there gets URLs naming it, not the 127.0.0.1 the base URL holds.
        text = await self._core.render(await self._ref(request), request.match_info["kind"],
                                       arch=request.query.get("arch"),
                                       local=local_address(request), join_token=MASKED)
        for cluster in await self._store.list_clusters():
            # An agent token's secret alone is what a server's config carries (agent-token).
            for secret in (cluster.token, cluster.agent_token, cluster.agent_secret):
                if secret:
                    text = text.replace(secret, MASKED)
        return web.Response(text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    async def list_events(self, request: web.Request) -> web.Response:
        machine = await self._machine(request)
        limit = _int_query(request, "limit", 1000, 1, 10000)
        await self._core.boot.drain()  # boot events are written in batches: all of them
        events = await self._store.list_events(machine.id, limit=limit)
        return web.json_response([codec.event_to_dict(e) for e in events])

    async def post_event(self, request: web.Request) -> web.Response:
        try:
            # From the boot path's view (synced): three reports per install in a storm.
            machine = await self._core.boot.machine_by_ref(request.match_info["ref"])
        except (NotFound, ValidationError):
            # Only an operator learns which machines do not exist; a stranger learns nothing.
            # An operator may name the machine by its hostname (mark-installed).
            (await self.principal(request)).require(Permission.OPERATE)
            machine = await self._core.boot.machine_by_ref(await self._ref(request))
        token = bearer_token(request)
        if token_matches(machine, token, self._clock()):
            request[ACTOR_KEY] = f"machine:{machine.id}"
        else:
            if token_is(machine, token) and token_expired(machine, self._clock()):
                # Its own token, expired: told so, as its config and registration are
                # (401 and a "token expired" event), not as a request without a token
                # (over plain HTTP from the network: "use HTTPS") (s33-attack).
                request[ACTOR_KEY] = f"machine:{machine.id}"
                await self._enroll.refuse_expired(machine, "report")
            # Not this machine's install token: an operator reporting by hand, or nobody;
            # the operator's ref read as every other route reads it (a hostname spelled as
            # a MAC that names two machines is a 409, not the one whose MAC it is).
            (await self.principal(request)).require(Permission.OPERATE)
            machine = await self._core.boot.machine_by_ref(await self._ref(request))
        limit = request.app[MAX_EVENT_KEY]
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        raw = await request.read()  # cached by the body-timeout middleware, client_max_size
        if len(raw) > request.app[MAX_EVENT_KEY]:
            raise web.HTTPRequestEntityTooLarge(max_size=request.app[MAX_EVENT_KEY],
                                                actual_size=len(raw))
        try:
            event = await self._reported(machine, loads(raw or b"null"))
        except RateLimited as exc:
            request[TOLD_KEY] = exc.told
            raise
        return web.json_response(codec.event_to_dict(event), status=201)

    async def _reported(self, machine: Machine, body: Any,
                        audit: tuple[AuditEntry, ...] = ()) -> Event:
        event = await self._enroll.report(machine, _object(body), audit=audit)
        # log_line: a storm's installers report twice each; without a LogRecord where
        # serve's text handler is the only one (~15 us a line).
        log_line(self._log, logging.INFO, "event mac=%s kind=%s message=%r", machine.mac,
                 event.kind, event.message)
        return event

    async def register(self, request: web.Request) -> web.Response:
        # Bounded as a device's report is (the front door's limit too): anyone may post
        # one, and up to http.max_body_bytes of JSON was parsed before any token was
        # looked at (~53 ms of the loop's CPU a 1 MiB body; s38-attack).
        limit = request.app[MAX_EVENT_KEY]
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        raw = await request.read()
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
        if not raw:
            raise ValidationError("body", "a JSON body is required")
        body = _object(loads(raw))
        # The transport's peer, typed here at the edge: what the device reports about its own
        # address is checked against it (k3OS reports 127.0.1.1, netboot.addresses).
        machine = await self._enroll.register(body, parse_peer(request.remote))
        request[ACTOR_KEY] = f"machine:{machine.id}"
        request[TARGET_KEY] = machine.id
        return web.json_response(_registered_out(machine, body))

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
        report = await self._enroll.import_rows(items, dry_run=dry_run,
                                                create_only=self._create_only(request))
        status = 400 if report.errors else (200 if dry_run else 201)
        return web.json_response(report.as_dict(ERRORS_SHOWN), status=status)

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
        # In a thread, one file at a time: PyYAML's parser is pure Python, and on the loop's
        # thread one 1 MiB YAML file (340,000 empty mappings) from an enroll token held
        # every DHCP, TFTP and HTTP answer for ~20 s of CPU (s38-attack). The thread shares
        # the GIL, which the loop takes back every switch interval (5 ms); one at a time, so
        # that files posted together do not split it further.
        async with self._parsing:
            rows = await asyncio.to_thread(parse_import, text, fmt)
        report = await self._enroll.import_rows(rows, dry_run=dry_run in ("1", "true"),
                                                create_only=self._create_only(request))
        status = 400 if report.errors else (200 if not report.applied else 201)
        return web.json_response(report.as_dict(ERRORS_SHOWN), status=status)

    async def status(self, request: web.Request) -> web.Response:
        status = await fleet_status(self._store, self._core.boot.counts, self._groups_kept)
        # What /healthz tells anyone only as a state, with the store's own words (while
        # its reads answer: a token is checked by one; the log has them always).
        status["inventory"] = self._core.boot.health.as_dict()
        # Start-up's warnings that still stand, and the older registrations seen live: the
        # log said them only (s42-ops).
        status["warnings"] = self._standing.as_list()
        return web.json_response(status)

    async def cluster_nodes(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self._core.get("clusters", name)
        # Paged when asked (the dashboard asks for a page: a cluster of 12,500 nodes was
        # ~8 MiB of JSON a cluster, fetched again at every reload of a storm); all of them
        # by default, as before.
        nodes = await self._store.list_machines(MachineFilter(
            cluster=name, limit=_int_query(request, "limit", 100_000, 1, 100_000),
            offset=_int_query(request, "offset", 0, 0, 10**9)))
        return web.json_response([self._machine_out(m) for m in nodes])

    async def secure_token(self, request: web.Request) -> web.Response:
        cluster = await self._core.secure_token(request.match_info["name"],
                                                versions=_if_match(request))
        return web.json_response(public_dict("clusters", cluster),
                                 headers=_item_etag("clusters", cluster))

    # -- profiles, clusters, groups -----------------------------------------------------
    def _list(self, kind: str) -> Handler:
        out = functools.partial(public_dict, kind)

        async def handler(request: web.Request) -> web.Response:
            return web.json_response([out(x) for x in await self._core.list_items(kind)])
        return handler

    def _get(self, kind: str) -> Handler:
        out = functools.partial(public_dict, kind)

        async def handler(request: web.Request) -> web.Response:
            item = await self._core.get(kind, request.match_info["name"])
            return web.json_response(out(item), headers=_item_etag(kind, item))
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
            force = request.query.get("force", "false") if kind == "clusters" else "false"
            if force not in ("true", "false"):
                raise ValidationError("force", "true or false")
            # If-Match on a replace (RFC 9110 §13.1.1): a whole replacement made on an older
            # read wrote away what another operator changed meanwhile (s40-attack).
            item = await self._core.put(kind, body, create=create, force=force == "true",
                                        versions=None if create else _if_match(request))
            request[TARGET_KEY] = item.name
            return web.json_response(out(item), status=201 if create else 200,
                                     headers=_item_etag(kind, item))
        return handler

    def _delete(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            # If-Match on a delete as on a replace (RFC 9110 §13.1.1): compared in the
            # delete's own transaction (Core.delete); it was ignored, and an item another
            # operator had changed since the caller's read was deleted unseen.
            await self._core.delete(kind, request.match_info["name"],
                                    versions=_if_match(request))
            return web.Response(status=204)
        return handler

    async def openapi(self, request: web.Request) -> web.Response:
        from netboot.openapi import document

        return web.json_response(document())
