"""Who is asking: a bearer token, or the dashboard's session cookie with its CSRF token.

The API and the dashboard accept the same tokens. A script sends ``Authorization: Bearer``;
a browser logs in once and keeps the token in a cookie that page scripts cannot read
(HttpOnly), that other sites cannot send (SameSite=Strict) and that is sent only over TLS when
the dashboard is reached over HTTPS (Secure).

A cookie is sent by the browser whatever page made the request, so a request that changes
something and is authenticated by the cookie alone must also prove it came from the
dashboard's own script: the double-submit pattern (OWASP CSRF cheat sheet). At login a second,
readable cookie holds a random CSRF token; the page's script echoes it in ``X-CSRF-Token``; a
cross-site page can neither read that cookie nor set the header on a cross-site request
without a CORS preflight, which netboot never grants. SameSite=Strict alone would stop most
of this; the header is the defence for browsers and proxies that do not honour it.

The dashboard's two plain HTML forms, ``POST /login`` and ``POST /logout``, carry no header
(a form cannot set one) and need no cookie, yet each changes the session: any site the
operator visits could end it with a form of its own, or log the browser into a session of
the attacker's token (login CSRF). They check where the form came from instead (OWASP's
"verifying origin with standard headers"): the ``Origin`` header a browser sends with every
cross-origin POST, else its ``Referer``, must name this host, or the answer is 403.

Tokens are checked by :mod:`netboot.access`, whatever carries them: a session has the scope
of the token it was opened with.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol
from urllib.parse import urlsplit

from aiohttp import web

from netboot.access import SESSION_COOKIE, Principal
from netboot.errors import AuthError, PlainHttpRefused
from netboot.servers.aio import PLAIN_HTTP_KEY, PLAINTEXT
from netboot.servers.http import bearer_token

CSRF_COOKIE = "netboot_csrf"
CSRF_HEADER = "X-CSRF-Token"
# Methods that change nothing (RFC 9110 §9.2.1): no CSRF token needed for them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class TokenCheck(Protocol):
    """What checks a token and says what it may do (:class:`netboot.access.Access`)."""

    async def authenticate(self, token: str | None) -> Principal: ...


def request_token(request: web.Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, else the session cookie. A
    change (any method but GET/HEAD/OPTIONS) made with the cookie must carry the CSRF
    cookie's value in :data:`CSRF_HEADER`, or it is refused (401) before anything else.

    Over plain HTTP from a peer that must use HTTPS (netboot.servers.http.PlainHttp) nothing
    is read: a 403 naming HTTPS, even where a route lets an install token through."""
    if request.get(PLAINTEXT):
        # Only a device's own route comes here so (the plain-HTTP middleware refuses the
        # rest first, an API token among them): a device's report without its machine's
        # valid install token, which is then an operator's. It said "an API token" to an
        # installer that sent none, or an expired install token (s33-attack).
        what = ("without this machine's valid install token (none, another machine's or an "
                "expired one), a request that needs an operator's token")
        policy = request.app.get(PLAIN_HTTP_KEY)
        raise (policy.refusal(request, what) if policy is not None else
               PlainHttpRefused(f"{what} over plain HTTP is refused", None))
    token = bearer_token(request)
    if token is not None:
        return token
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    if request.method not in SAFE_METHODS:
        expected = request.cookies.get(CSRF_COOKIE, "")
        given = request.headers.get(CSRF_HEADER, "")
        if not expected or not hmac.compare_digest(expected, given):
            raise AuthError(f"a change made with the session cookie needs the {CSRF_HEADER} "
                            f"header (the {CSRF_COOKIE} cookie's value)")
    return cookie


async def session(check: TokenCheck, request: web.Request) -> Principal | None:
    """The principal of a page request's session cookie, or None (a page redirects)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie or request.get(PLAINTEXT):
        return None
    try:
        return await check.authenticate(cookie)
    except AuthError:
        return None


def same_origin(request: web.Request) -> bool:
    """Whether a form's POST came from a page of this host: its ``Origin`` (every browser
    sends one with a cross-origin POST; ``null`` from a sandboxed frame or a privacy
    redirect is no host), else its ``Referer``, names the host the request was sent to
    (``Host``, or a proxy's ``X-Forwarded-Host``; the scheme is not compared, as a proxy
    that ends TLS sends plain HTTP on). A request with neither is no browser's cross-site
    form, and passes (a script, ``curl``)."""
    source = request.headers.get("Origin")
    if source is None:
        source = request.headers.get("Referer")
        if source is None:
            return True
    try:
        parts = urlsplit(source.strip())
        given = _netloc(parts.scheme, parts.netloc)
    except ValueError:
        return False
    if not given:
        return False
    scheme = "https" if request.secure else "http"
    own = {_netloc(scheme, request.host)}
    forwarded = request.headers.get("X-Forwarded-Host")
    if forwarded:
        own.add(_netloc(request.headers.get("X-Forwarded-Proto", scheme),
                        forwarded.split(",")[0].strip()))
    return given in own


def _netloc(scheme: str, netloc: str) -> str:
    """``host[:port]`` lowered, the scheme's default port left out (as an Origin has it)."""
    netloc = netloc.rpartition("@")[2].lower()
    default = {"http": ":80", "https": ":443"}.get(scheme.lower())
    if default is not None and netloc.endswith(default):
        netloc = netloc[: -len(default)]
    return netloc


def require_same_origin(request: web.Request) -> None:
    """403 for a form posted from another site (:func:`same_origin`)."""
    if not same_origin(request):
        raise web.HTTPForbidden(text="refused: this form was posted from another site "
                                     "(its Origin or Referer is not this host)\n")


def start_session(request: web.Request, response: web.StreamResponse, token: str) -> None:
    """Set the session and CSRF cookies on ``response`` (the login's answer)."""
    secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict",
                        secure=secure, path="/")
    # Readable by the page's script (that is the point), useless to anyone else.
    response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), httponly=False,
                        samesite="Strict", secure=secure, path="/")


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path="/")
    response.del_cookie(CSRF_COOKIE, path="/")
