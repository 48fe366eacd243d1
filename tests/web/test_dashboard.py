"""The dashboard's pages and assets (netboot.web.dashboard): its icon, its columns' names."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.web.dashboard import STATIC
from tests.conftest import Env
from tests.servers.test_http_front import serving
from tests.servers.test_http_ranges import byteranges, curl, header, status


async def test_the_pages_have_an_icon_and_favicon_ico_is_no_404(env: Env) -> None:
    """Every dashboard load asked /favicon.ico and got a 404 (a console error each time):
    the pages name an icon of their own, and /favicon.ico answers 204."""
    for page in ("/login", "/ui/index.html"):
        resp = await env.client.get(page)
        assert resp.status == 200
        assert '<link rel="icon" href="/ui/favicon.svg"' in await resp.text(), page
    resp = await env.client.get("/ui/favicon.svg")
    assert resp.status == 200 and resp.content_type == "image/svg+xml"
    resp = await env.client.get("/favicon.ico")
    assert resp.status == 204 and "max-age" in resp.headers["Cache-Control"]


async def test_the_machines_column_says_what_its_time_is(env: Env) -> None:
    """The column is the time in the machine's state (state_since, s39-journey: a label
    edit or a learnt fact no longer resets it), and sorts by it."""
    resp = await env.client.get("/ui/app.js")
    script = await resp.text()
    assert '"Unchanged for", "state_since"' in script
    # age(): the same text, counted on every 10 s (s46-operator)
    assert 'h("td", {title: iso(m.state_since)}, age(m.state_since))' in script
    assert 'h("td", {title: iso(m.updated)}' not in script


@pytest.mark.requires("curl", "curl")
async def test_the_dashboards_files_answer_range_as_the_boot_files_do(tmp_path: Path) -> None:
    """``/ui/…`` and the pages went through aiohttp's own FileResponse (add_static): several
    ranges got 416 and If-Range was read as a date only, where ``/assets/…`` answers as nginx
    (s46-range). Asked by a real curl of a real server: 206 multipart/byteranges framed as
    nginx frames it, If-Range by the entity-tag; a name not among the files is 404 and
    nothing outside them is reached, however the path is spelt (fails on main 317fd9b: 416)."""
    script = (STATIC / "app.js").read_bytes()
    async with serving(tmp_path, seeded=False) as service:
        base = f"http://127.0.0.1:{service.http_port}"
        head, body = await curl(f"{base}/ui/app.js")
        assert status(head) == 200 and body == script
        kind, etag = header(head, "Content-Type"), header(head, "ETag")
        assert kind is not None and etag is not None
        spans = [(0, 99), (200, 299), (len(script) - 10, len(script) - 1)]
        for target in ("/ui/app.js", "/ui/%61pp.js"):
            head, body = await curl("-r", "0-99,200-299,-10", base + target)
            assert status(head) == 206, head
            multi = header(head, "Content-Type")
            assert multi is not None and multi.startswith("multipart/byteranges; boundary=")
            boundary = multi.split("boundary=", 1)[1]
            assert body == byteranges(script, spans, boundary, kind)
            assert header(head, "Content-Length") == str(len(body))
        # HEAD says what the GET would send.
        head, _ = await curl("-I", "-r", "0-99,200-299,-10", f"{base}/ui/app.js")
        assert status(head) == 206 and header(head, "Content-Length") == str(len(body))
        # If-Range: the same entity-tag resumes, another one (the file replaced) gets it whole.
        head, body = await curl("-r", "100-", "-H", f"If-Range: {etag}", f"{base}/ui/app.js")
        assert (status(head), body) == (206, script[100:])
        head, body = await curl("-r", "100-", "-H", 'If-Range: "other"', f"{base}/ui/app.js")
        assert (status(head), body) == (200, script)
        # The login page too (a file of its own, no-store).
        page = (STATIC / "login.html").read_bytes()
        head, body = await curl("-r", "0-9,20-29", f"{base}/login")
        assert status(head) == 206 and header(head, "Cache-Control") == "no-store"
        assert page[:10] in body and page[20:30] in body
        # Only the package's files: anything else is 404, never a file outside them.
        (tmp_path / "secret.txt").write_text("not the dashboard's")
        for target in ("/ui/nope.js", "/ui/", "/ui/..%2Fsecret.txt", "/ui/%2e%2e/netboot.yaml",
                       "/ui/../../secret.txt", "/ui/app.js/", "/ui/static/app.js"):
            head, body = await curl("--path-as-is", base + target)
            assert status(head) == 404, (target, head)
            assert b"not the dashboard's" not in body
