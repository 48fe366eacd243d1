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

Verifying a token is a seam (:class:`TokenVerifier`): today the one admin token, whose
SHA-256 is stored in the inventory settings; scoped tokens fit the same shape.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from netboot.errors import AuthError
from netboot.servers.http import bearer_token

SESSION_COOKIE = "netboot_session"
CSRF_COOKIE = "netboot_csrf"
CSRF_HEADER = "X-CSRF-Token"
ADMIN_TOKEN_KEY = "admin-token-sha256"
# Methods that change nothing (RFC 9110 §9.2.1): no CSRF token needed for them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Settings(Protocol):
    async def get_setting(self, key: str) -> str | None: ...


class TokenVerifier(Protocol):
    async def verify(self, token: str) -> str | None:
        """The token's scope ("admin", ...), or None when it is not a valid token."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AdminTokenVerifier:
    """The admin token: valid when its SHA-256 is the one stored at first start."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    async def verify(self, token: str) -> str | None:
        stored = await self._settings.get_setting(ADMIN_TOKEN_KEY)
        if stored is not None and hmac.compare_digest(sha256_hex(token), stored):
            return "admin"
        return None


@dataclass(frozen=True, slots=True)
class Caller:
    scope: str
    via: str  # "bearer" or "cookie"


class Authenticator:
    """Finds and checks the caller's credentials on a request."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def caller(self, request: web.Request) -> Caller | None:
        """The verified caller, or None when the request carries no credentials. A wrong
        token, or a cookie-authenticated mutation without its CSRF token, is an AuthError."""
        token = bearer_token(request)
        if token is not None:
            scope = await self.verifier.verify(token)
            if scope is None:
                raise AuthError("wrong token")
            return Caller(scope, "bearer")
        cookie = request.cookies.get(SESSION_COOKIE)
        if not cookie:
            return None
        scope = await self.verifier.verify(cookie)
        if scope is None:
            raise AuthError("the session has expired or its token was replaced: log in again")
        if request.method not in SAFE_METHODS:
            expected = request.cookies.get(CSRF_COOKIE, "")
            given = request.headers.get(CSRF_HEADER, "")
            if not expected or not hmac.compare_digest(expected, given):
                raise AuthError(f"a change made with the session cookie needs the "
                                f"{CSRF_HEADER} header (the {CSRF_COOKIE} cookie's value)")
        return Caller(scope, "cookie")

    async def session_scope(self, request: web.Request) -> str | None:
        """The scope of a page request's session cookie (no AuthError: a page redirects)."""
        cookie = request.cookies.get(SESSION_COOKIE)
        return await self.verifier.verify(cookie) if cookie else None


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
