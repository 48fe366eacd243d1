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

Tokens are checked by :mod:`netboot.access`, whatever carries them: a session has the scope
of the token it was opened with.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Protocol

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
