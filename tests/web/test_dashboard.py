"""The dashboard's pages and assets (netboot.web.dashboard): its icon, its columns' names."""

from __future__ import annotations

from tests.conftest import Env


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
