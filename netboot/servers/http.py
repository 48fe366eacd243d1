"""HTTP endpoints used by devices: iPXE scripts, assets, per-machine configs.

A thin aiohttp adapter over the ``DeviceContent`` protocol: it parses requests, maps errors to
status codes and streams files; what a machine gets is decided elsewhere. Assets are served with
aiohttp's FileResponse, which gives Content-Length, HEAD, single Range requests (UEFI HTTP boot
resumes with Range, protocols.md §4), ETag/Last-Modified and sendfile.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from netboot.errors import (
    AuthError,
    Conflict,
    DecodeError,
    Forbidden,
    NotFound,
    RenderError,
    StoreError,
    TransitionRefused,
    ValidationError,
)
from netboot.model import Arch, Blob, BootPlan, BootRequest, Firmware, MacAddress, normalise_uuid

# Typed keys for what the wiring puts on the application (aiohttp's AppKey).
LOG_KEY = web.AppKey("log", logging.Logger)
MAX_BODY_KEY = web.AppKey("max_body", int)
MAX_EVENT_KEY = web.AppKey("max_event", int)

_BUILDARCH = {"i386": Arch.X86, "x86_64": Arch.X86_64, "arm32": Arch.ARM32,
              "arm64": Arch.ARM64, "riscv64": Arch.RISCV64}


class DeviceContent(Protocol):
    def bootstrap_ipxe(self) -> str: ...

    async def ipxe_script(self, request: BootRequest) -> tuple[BootPlan, str]: ...

    async def authorised_plan(self, mac_text: str, token: str | None) -> BootPlan: ...

    def k3os_config(self, plan: BootPlan) -> str: ...

    def nocloud(self, plan: BootPlan, name: str) -> str: ...

    async def config_fetched(self, plan: BootPlan, what: str) -> None: ...

    def asset(self, path: str) -> Blob: ...


def ipxe_request(query: Any, remote: str | None) -> BootRequest:
    """A BootRequest from the query string iPXE fills in from its settings (protocols.md §2.4)."""
    mac_text = query.get("mac")
    if not mac_text:
        raise ValidationError("mac", "required (iPXE fills it from ${net0/mac:hexhyp})")
    mac = MacAddress.parse(mac_text)
    uuid = query.get("uuid") or None
    if uuid:
        try:
            uuid = normalise_uuid(uuid)
        except ValidationError:
            uuid = None  # firmware without SMBIOS UUID sends garbage; not worth refusing a boot
    build = (query.get("arch") or "").lower()
    platform = (query.get("platform") or "").lower() or None

    def text(key: str) -> str | None:
        value = (query.get(key) or "").strip()
        return value[:128] or None

    return BootRequest(
        mac=mac, arch=_BUILDARCH.get(build, Arch.UNKNOWN), firmware=Firmware.IPXE,
        uuid=uuid, serial=text("serial"), manufacturer=text("manufacturer"),
        product=text("product"), asset=text("asset"), platform=platform,
        remote_addr=remote, via="http",
    )


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def loggable_target(request: web.Request) -> str:
    """The request target without the install token (in the query or the NoCloud path).

    The install token opens a machine's config, which carries the cluster join secret, so it
    must not end up in log files.
    """
    path = request.path
    token = request.match_info.get("token")
    if token:
        path = path.replace(f"/{token}/", "/<token>/")
    query = ["token=<redacted>" if key.lower() == "token" else f"{key}={value}"
             for key, value in request.query.items()]
    return path + ("?" + "&".join(query) if query else "")


class AccessLogger(AbstractAccessLogger):
    """One line per request: peer, method, target without the install token, status, bytes,
    seconds. What a device fetched, and how long its kernel took, is the first thing a failed
    or slow boot needs."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = loggable_target(request) if isinstance(request, web.Request) else request.path
        self.logger.info("%s %s %s %d %s %.3f", request.remote, request.method, target,
                         response.status, response.body_length, time)


def error_response(exc: Exception, log: logging.Logger, request: web.Request) -> web.Response:
    """The one place HTTP errors are translated (DESIGN.md §4.5)."""
    if isinstance(exc, ValidationError):
        return web.json_response({"error": exc.message, "field": exc.field}, status=400)
    if isinstance(exc, DecodeError):
        return web.json_response({"error": str(exc), "field": exc.field or "body"}, status=400)
    if isinstance(exc, AuthError):
        return web.json_response({"error": str(exc)}, status=401,
                                 headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, Forbidden):
        # The detail names the server's own directories ("resolves outside /srv/..."): log it,
        # answer generically, as TFTP does with "access violation".
        log.info("refused %s %s from %s: %s", request.method, loggable_target(request),
                 request.remote, exc)
        return web.json_response({"error": "access denied"}, status=403)
    if isinstance(exc, NotFound):
        return web.json_response({"error": str(exc)}, status=404)
    if isinstance(exc, TransitionRefused):
        # The current state, machine-readable: a client can tell "already installed" from
        # "failed, reinstall first" without parsing the message.
        return web.json_response({"error": str(exc), "state": exc.state, "event": exc.event},
                                 status=409)
    if isinstance(exc, Conflict):
        return web.json_response({"error": str(exc)}, status=409)
    if isinstance(exc, RenderError):
        log.error("render failed for %s %s: %s", request.method, loggable_target(request), exc)
        return web.json_response({"error": f"render failed: {exc}"}, status=500)
    if isinstance(exc, StoreError):
        log.error("inventory failed for %s %s: %s", request.method, loggable_target(request), exc)
        return web.json_response({"error": "inventory unavailable"}, status=503)
    log.exception("bug handling %s %s", request.method, loggable_target(request))
    return web.json_response({"error": "internal error"}, status=500)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    log = request.app[LOG_KEY]
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException as exc:
        if exc.status == 413:
            return web.json_response({"error": "request body too large", "field": "body"},
                                     status=413)
        raise
    except Exception as exc:
        return error_response(exc, log, request)


class DeviceRoutes:
    def __init__(self, content: DeviceContent, *, logger: logging.Logger | None = None) -> None:
        self._content = content
        self._log = logger or logging.getLogger(__name__)

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/boot.ipxe", self.boot_ipxe)
        # These have effects (an install token, a state change): HEAD must not run them.
        app.router.add_get("/ipxe", self.ipxe, allow_head=False)
        app.router.add_get("/assets/{path:.+}", self.asset)  # also answers HEAD
        app.router.add_get("/config/{mac}", self.config, allow_head=False)
        app.router.add_get("/nocloud/{mac}/{name}", self.nocloud, allow_head=False)
        app.router.add_get("/nocloud/{mac}/{token}/{name}", self.nocloud, allow_head=False)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def boot_ipxe(self, request: web.Request) -> web.Response:
        return web.Response(text=self._content.bootstrap_ipxe(), content_type="text/plain")

    async def ipxe(self, request: web.Request) -> web.Response:
        boot = ipxe_request(request.query, request.remote)
        plan, script = await self._content.ipxe_script(boot)
        self._log.info("ipxe mac=%s peer=%s action=%s reason=%r", boot.mac, request.remote,
                       plan.action, plan.reason)
        return web.Response(text=script, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    async def asset(self, request: web.Request) -> web.StreamResponse:
        # match_info is already percent-decoded by aiohttp; check the decoded form so that
        # %2e%2e and %00 are refused like their literal forms.
        blob = self._content.asset(request.match_info["path"])
        if blob.data is not None:
            return web.Response(body=blob.data, content_type=blob.content_type.split(";")[0])
        assert blob.path is not None
        resp = web.FileResponse(blob.path)
        resp.content_type = blob.content_type.split(";")[0]
        return resp

    def _token(self, request: web.Request) -> str | None:
        # Installers that can send headers use Bearer; cloud-init's NoCloud seed URL and a
        # kernel command line can only carry it in the path or the query.
        return (bearer_token(request) or request.match_info.get("token")
                or request.query.get("token"))

    async def config(self, request: web.Request) -> web.Response:
        plan = await self._content.authorised_plan(request.match_info["mac"], self._token(request))
        text = self._content.k3os_config(plan)
        await self._content.config_fetched(plan, "k3OS config")
        self._log.info("config mac=%s peer=%s served", plan.mac, request.remote)
        return web.Response(text=text, content_type="text/yaml",
                            headers={"Cache-Control": "no-store"})

    async def nocloud(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        plan = await self._content.authorised_plan(request.match_info["mac"], self._token(request))
        text = self._content.nocloud(plan, name)
        if name == "user-data":
            await self._content.config_fetched(plan, "cloud-init user-data")
        return web.Response(text=text, content_type="text/plain",
                            headers={"Cache-Control": "no-store"})
