"""The dashboard and ``/metrics``, served by the same aiohttp application as the API.

The dashboard is static HTML, CSS and JavaScript shipped inside the package
(``netboot/web/static``): no CDN, no build step. Its script calls the REST API with the session
cookie (:mod:`netboot.web.auth`) and follows ``/api/v1/events/stream`` (Server-Sent Events: one
stream per browser, held by a SharedWorker, ``static/stream.js``; no polling). Every page but
the login needs a valid session; the assets themselves hold no data and are served to
anyone, so the login page can be styled.

``/metrics`` follows the Prometheus convention of an unauthenticated scrape on the
provisioning network (``metrics.public``, the default); with ``metrics.public: false`` it
needs a token like the API (``Authorization: Bearer``, any scope), which Prometheus sends with
``authorization: {credentials_file: ...}``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web

from netboot.access import Permission, Principal
from netboot.errors import AuthError
from netboot.inventory.base import StateCounts
from netboot.logs import RateLimitedLog
from netboot.metrics import CONTENT_TYPE, Metrics
from netboot.servers.aio import CountingFileResponse, serve_plain
from netboot.web.auth import (
    TokenCheck,
    end_session,
    request_token,
    require_same_origin,
    session,
    start_session,
)

STATIC = Path(__file__).resolve().parent / "static"
# A token is at most a few hundred characters; anything longer is not one.
MAX_TOKEN = 1024


class Dashboard:
    def __init__(self, auth: TokenCheck, counts: StateCounts, metrics: Metrics, *,
                 metrics_public: bool = True, logger: logging.Logger | None = None) -> None:
        self._auth = auth
        self._counts = counts  # machines by state, for the scrape
        self._metrics = metrics
        self._metrics_public = metrics_public
        self._log = logger or logging.getLogger(__name__)
        # A token is 256 random bits: guessing is futile, but a guessing script must not
        # write a line per attempt.
        self._failed = RateLimitedLog(self._log)
        # The package's own files, by name: a client's path never reaches the file system
        # (nothing to traverse), and each is answered as the boot files are (ui_file).
        self._files = {path.name: path for path in STATIC.iterdir() if path.is_file()}

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/ui/{name}", self.ui_file)
        # The pages name their icon (/ui/favicon.svg); a browser that asks the old place
        # anyway (a JSON answer opened in a tab) is told there is none, not a 404 per visit.
        r.add_get("/favicon.ico", _no_icon)
        scrape = r.add_get("/metrics", self.scrape)
        if self._metrics_public:
            # Prometheus scrapes over plain HTTP by convention (matchbox and Tinkerbell's
            # smee serve /metrics beside their firmware files, without credentials); with
            # metrics.public false a scrape carries a token, which goes over HTTPS.
            serve_plain(app, scrape)

    async def index(self, request: web.Request) -> web.StreamResponse:
        if await session(self._auth, request) is None:
            raise web.HTTPFound("/login")
        return _page("index.html")

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        return _page("login.html")

    async def ui_file(self, request: web.Request) -> web.StreamResponse:
        # Not aiohttp's add_static: its FileResponse answered several ranges 416 and read
        # If-Range as a date only, where /assets/ answers as nginx (206 multipart, the
        # entity-tag: netboot.wire.ranges, benchmarks/README.md s46-range, s47-bigfile).
        path = self._files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return CountingFileResponse(path)

    async def login(self, request: web.Request) -> web.StreamResponse:
        # Another site's form would log this browser into a session of its own token.
        require_same_origin(request)
        form = await request.post()
        token = form.get("token")
        token = token.strip() if isinstance(token, str) else ""
        who = await session_of(self._auth, token) if 0 < len(token) <= MAX_TOKEN else None
        if who is None:
            self._failed.log(logging.WARNING, request.remote or "-",
                             "dashboard: failed login from %s", request.remote)
            raise web.HTTPSeeOther("/login?error=1")
        self._log.info("dashboard: %s (%s) logged in from %s", who.name, who.scope,
                       request.remote)
        resp = web.HTTPSeeOther("/")
        start_session(request, resp, token)
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        # A form needs no cookie to end the session: only the dashboard's own may.
        require_same_origin(request)
        resp = web.HTTPSeeOther("/login")
        end_session(resp)
        raise resp

    async def scrape(self, request: web.Request) -> web.StreamResponse:
        if not self._metrics_public:
            token = request_token(request)
            if token is None:
                raise AuthError("metrics.public is false: send 'Authorization: Bearer <token>'")
            (await self._auth.authenticate(token)).require(Permission.READ)
        body = await self._metrics.render(self._counts)
        resp = web.Response(body=body, headers={"Cache-Control": "no-store"})
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp


async def session_of(check: TokenCheck, token: str) -> Principal | None:
    try:
        return await check.authenticate(token)
    except AuthError:
        return None


def _page(name: str) -> web.StreamResponse:
    # no-store: a page seen after logout must come from the server, which redirects.
    return CountingFileResponse(STATIC / name, headers={
        "Cache-Control": "no-store",
        # Everything the dashboard loads is its own: a defence in depth against injected
        # markup (the page also never builds HTML from strings).
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                   "frame-ancestors 'none'; form-action 'self'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})


async def _no_icon(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})
