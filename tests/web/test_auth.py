"""Dashboard sessions over HTTP: login, the cookie's attributes, CSRF on cookie-authenticated
changes, the SSE stream's authentication, request ids."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from netboot.access import SESSION_COOKIE
from netboot.errors import PlainHttpRefused
from netboot.servers.aio import PLAIN_HTTP_KEY, PLAINTEXT
from netboot.servers.http import PlainHttp
from netboot.web.auth import CSRF_COOKIE, CSRF_HEADER, request_token
from tests.conftest import Env, call

MAC = "52:54:00:dd:00:01"


async def login(env: Env, token: str) -> tuple[int, str, list[str]]:
    resp = await env.client.post("/login", data={"token": token}, allow_redirects=False)
    return resp.status, resp.headers.get("Location", ""), resp.headers.getall("Set-Cookie", [])


async def test_pages_need_a_session(env: Env) -> None:
    resp = await env.client.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/login"
    resp = await env.client.get("/login")
    assert resp.status == 200 and 'name="token"' in await resp.text()
    # The assets hold no data: the login page needs its stylesheet before anyone logs in.
    resp = await env.client.get("/ui/style.css")
    assert resp.status == 200


async def test_wrong_token_is_refused(env: Env) -> None:
    status, location, cookies = await login(env, "guess")
    assert (status, location, cookies) == (303, "/login?error=1", [])


async def test_login_sets_a_strict_http_only_cookie(env: Env) -> None:
    status, location, cookies = await login(env, env.admin)
    assert (status, location) == (303, "/")
    session = next(c for c in cookies if c.startswith(f"{SESSION_COOKIE}="))
    csrf = next(c for c in cookies if c.startswith(f"{CSRF_COOKIE}="))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "Secure" not in session  # plain HTTP here; over HTTPS it is Secure
    assert "HttpOnly" not in csrf and "SameSite=Strict" in csrf  # the page's script reads it
    resp = await env.client.get("/")
    assert resp.status == 200 and "app.js" in await resp.text()
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


async def test_cookie_over_https_is_secure(env: Env) -> None:
    resp = await env.client.post("/login", data={"token": env.admin}, allow_redirects=False,
                                 headers={"X-Forwarded-Proto": "https"})
    assert all("Secure" in c for c in resp.headers.getall("Set-Cookie"))


async def test_cookie_mutations_need_the_csrf_token(env: Env) -> None:
    await login(env, env.admin)
    csrf = env.client.session.cookie_jar.filter_cookies(env.client.make_url("/"))[CSRF_COOKIE]
    # Reading needs no CSRF token.
    r = await call(env, "GET", "/api/v1/machines", admin=False)
    assert r.status == 200
    # A change with the cookie alone is what a cross-site form would send: refused.
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}, admin=False)
    assert r.status == 401 and CSRF_HEADER in r.json()["error"]
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}, admin=False,
                   headers={CSRF_HEADER: "not-it"})
    assert r.status == 401
    assert (await env.get("/api/v1/machines"))["total"] == 0
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}, admin=False,
                   headers={CSRF_HEADER: csrf.value})
    assert r.status == 201, r.text


async def test_logout_ends_the_session(env: Env) -> None:
    await login(env, env.admin)
    resp = await env.client.post("/logout", allow_redirects=False)
    assert resp.status == 303
    resp = await env.client.get("/", allow_redirects=False)
    assert resp.status == 302


async def session_alive(env: Env) -> bool:
    resp = await env.client.get("/", allow_redirects=False)
    return resp.status == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "http://evil.example", "Referer": "{own}/"},  # the Origin decides
    {"Origin": "null"},  # a sandboxed frame, a privacy redirect: no host of ours
    {"Referer": "https://evil.example/page"},  # no Origin (an older browser): the Referer
    {"Origin": "{own}.evil.example"},
    {"Origin": "http://evil.example", "X-Forwarded-Host": "evil.example:1"},
    {"Origin": "not a url at all"},
])
async def test_a_form_from_another_site_neither_ends_nor_opens_a_session(
        env: Env, headers: dict[str, str]) -> None:
    """``POST /logout`` needs no cookie: any site the operator visits could end the
    session with a form of its own; ``POST /login`` from another site would log the browser
    into the attacker's token. Both answer 403 unless the form came from this host."""
    own = str(env.client.make_url("")).rstrip("/")
    sent = {k: v.replace("{own}", own) for k, v in headers.items()}
    if "X-Forwarded-Host" in sent:  # a proxy's header names where the browser was: not evil
        sent["X-Forwarded-Host"] = "netboot.example"
    await login(env, env.admin)
    resp = await env.client.post("/logout", allow_redirects=False, headers=sent)
    assert resp.status == 403
    assert not resp.headers.getall("Set-Cookie", [])
    assert await session_alive(env)
    made = await env.post("/api/v1/tokens", {"name": "theirs", "scope": "read"}, status=201)
    resp = await env.client.post("/login", data={"token": made["token"]},
                                 allow_redirects=False, headers=sent)
    assert resp.status == 403
    assert not resp.headers.getall("Set-Cookie", [])


@pytest.mark.parametrize("headers", [
    {"Origin": "{own}"},
    {"Origin": "{own}", "Referer": "https://evil.example/"},  # the Origin decides
    {"Referer": "{own}/"},
    {"Origin": "https://netboot.example", "X-Forwarded-Host": "netboot.example",
     "X-Forwarded-Proto": "https"},  # behind a proxy that ends TLS
    {"Origin": "https://netboot.example:443", "X-Forwarded-Host": "NetBoot.example",
     "X-Forwarded-Proto": "https"},
    {},  # no browser's form: a script
])
async def test_the_dashboards_own_forms_end_and_open_a_session(
        env: Env, headers: dict[str, str]) -> None:
    own = str(env.client.make_url("")).rstrip("/")
    sent = {k: v.replace("{own}", own) for k, v in headers.items()}
    resp = await env.client.post("/login", data={"token": env.admin}, allow_redirects=False,
                                 headers=sent)
    assert resp.status == 303 and resp.headers["Location"] == "/"
    assert any(c.startswith(f"{SESSION_COOKIE}=") for c in resp.headers.getall("Set-Cookie"))
    # (Behind the TLS proxy the cookie is Secure: this plain HTTP client keeps it unsent.)
    assert await session_alive(env) != ("X-Forwarded-Proto" in sent)
    resp = await env.client.post("/logout", allow_redirects=False, headers=sent)
    assert resp.status == 303
    assert any(c.startswith(f'{SESSION_COOKIE}=""') for c in resp.headers.getall("Set-Cookie"))
    assert not await session_alive(env)


async def test_a_session_has_its_tokens_scope_and_ends_with_it(env: Env) -> None:
    made = await env.post("/api/v1/tokens", {"name": "wall-screen", "scope": "read"},
                          status=201)
    await login(env, made["token"])
    csrf = env.client.session.cookie_jar.filter_cookies(env.client.make_url("/"))[CSRF_COOKIE]
    r = await call(env, "GET", "/api/v1/machines", admin=False)
    assert r.status == 200
    r = await call(env, "POST", "/api/v1/machines", json_body={"mac": MAC}, admin=False,
                   headers={CSRF_HEADER: csrf.value})
    assert r.status == 403  # a read token's session reads, and only reads
    r = await call(env, "DELETE", "/api/v1/tokens/wall-screen")
    assert r.status == 204
    resp = await env.client.get("/", allow_redirects=False)
    assert resp.status == 302
    r = await call(env, "GET", "/api/v1/events/stream", admin=False)
    assert r.status == 401


async def test_event_stream_needs_a_token_and_carries_events(env: Env) -> None:
    r = await call(env, "GET", "/api/v1/events/stream", admin=False)
    assert r.status == 401
    resp = await env.client.get("/api/v1/events/stream", headers=env.auth)
    try:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        assert (await resp.content.readuntil(b"\n\n")).startswith(b"retry: 3000")
        await env.post("/api/v1/machines", {"mac": MAC, "hostname": "sse-1"}, status=201)
        # The stream's other messages (its ": connected" comment, the inventory's health
        # that s41-ops sends as it opens, what stands) come first; the machine's event follows.
        fields: dict[str, str] = {}
        while fields.get("event") != "machine":
            block = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 10)
            lines = [line for line in block.decode().strip().split("\n")
                     if not line.startswith(":")]
            fields = dict(line.split(": ", 1) for line in lines)
            assert fields.get("event") in (None, "inventory", "warnings", "machine"), block
        # This process's name and the event's place (a resume names them: Last-Event-ID).
        assert re.fullmatch(r"[0-9a-f]{8}\.[1-9][0-9]*", fields["id"]), fields
        event = json.loads(fields["data"])
        assert event["kind"] == "enrolled" and event["machine"].startswith("m-")
    finally:
        resp.close()


async def test_request_id_is_echoed_or_made(env: Env) -> None:
    r = await call(env, "GET", "/healthz", headers={"X-Request-Id": "trace-42.a"})
    assert r.headers["x-request-id"] == "trace-42.a"
    # Text that could forge a header or a log field is replaced by a fresh id.
    r = await call(env, "GET", "/healthz", headers={"X-Request-Id": "a b\tc" + "x" * 100})
    assert len(r.headers["x-request-id"]) == 16 and " " not in r.headers["x-request-id"]
    r = await call(env, "GET", "/no/such/page")
    assert r.status == 404 and r.headers["x-request-id"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-its-install-token"}])
def test_a_devices_report_without_its_install_token_over_plain_http_says_so(
        headers: dict[str, str]) -> None:
    # A device's report over plain HTTP from the network without this machine's valid
    # install token (none sent, another machine's, an expired one) needs an operator's
    # token, which goes over HTTPS: the refusal said "an API token over plain HTTP is
    # refused" to an installer that sent none (s33-attack).
    app = web.Application()
    app[PLAIN_HTTP_KEY] = PlainHttp(https_url=lambda: "https://192.0.2.10:8443")
    request = make_mocked_request("POST", f"/api/v1/machines/{MAC}/events", headers=headers,
                                  app=app)
    request[PLAINTEXT] = True
    with pytest.raises(PlainHttpRefused) as refused:
        request_token(request)
    message = str(refused.value)
    assert "API token" not in message and "install token" in message, message
    assert refused.value.https_url == f"https://192.0.2.10:8443/api/v1/machines/{MAC}/events"
