"""The dashboard in a real headless browser: Debian's chromium driven by Playwright.

The server is the real application on a loopback port; the device side (a firmware asking
for its boot script, an installer reporting, the installed OS registering) is driven with
plain HTTP calls, as a device would make them. Screenshots of every step are kept under
``tests/artifacts/dashboard/`` (git-ignored), and their path is printed, so that a failure can
be looked at, not only read.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

import netboot
from netboot.model import Event
from tests.conftest import Env, EnvFactory, boot, call, install_token

CHROMIUM = "/usr/bin/chromium"
# What a server without a display, a GPU or network access to Google needs.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "dashboard"
HOLD = "discovery:\n  policy: hold\n"
TIMEOUT_MS = 15_000
# The dashboard's script, whose HEALTH_MS a test reads.
APP_JS = Path(netboot.__file__).resolve().parent / "web" / "static" / "app.js"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Any:
    folder = ARTIFACTS / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    count = [0]

    async def shot(page: Page, name: str) -> None:
        count[0] += 1
        await page.screenshot(path=str(folder / f"{count[0]:02d}-{name}.png"), full_page=True)
    return shot


def url(env: Env, path: str = "/") -> str:
    return f"http://{env.client.host}:{env.client.port}{path}"


async def logged_in(browser: Browser | BrowserContext, env: Env, shot: Any) -> Page:
    # A context's pages share its cookies (the tabs of one browser); a browser's new_page
    # is a context of its own.
    page = await (browser.new_page(viewport={"width": 1360, "height": 900})
                  if isinstance(browser, Browser) else browser.new_page())
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(url(env))
    # Not logged in: the dashboard sends the browser to the login page.
    await expect(page).to_have_url(url(env, "/login"))
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    await expect(page.locator("#error")).to_be_visible()
    await shot(page, "login-refused")
    await page.fill("#token", env.admin)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url(env, "/"))
    await expect(page.locator("#live")).to_have_text("live")
    return page


async def test_machine_appears_live_and_is_approved_and_registers(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    env = await make_env(HOLD)
    await env.seed()
    page = await logged_in(browser, env, shots)
    await expect(page.locator("table.machines tbody")).to_contain_text("No machines match")
    await shots(page, "empty")

    # A device boots: its firmware asks for a script, nobody knows it, it is held and
    # recorded as discovered. The open page shows it without a reload (Server-Sent Events).
    await boot(env, "52-54-00-aa-00-01", serial="SN-LIVE-1")
    row = page.locator("table.machines tbody tr", has_text="52:54:00:aa:00:01")
    await expect(row).to_contain_text("discovered")
    await expect(page.locator("#discovered-count")).to_have_text("1")
    await shots(page, "discovered-live")

    # Approve it from the discovered queue, as an agent of cluster edge with profile k3os.
    await page.click("nav a[data-nav=discovered]")
    form = page.locator("form.approve").first
    await form.locator("select[name=cluster]").select_option("edge")
    await form.locator("select[name=role]").select_option("agent")
    await form.locator("select[name=profile]").select_option("k3os")
    await shots(page, "approve-form")
    await form.locator("button[type=submit]").click()
    await expect(page.locator("#notice")).to_contain_text("approved")
    await expect(page.locator("form.approve")).to_have_count(0)
    machine = (await env.get("/api/v1/machines/52:54:00:aa:00:01"))
    assert machine["state"] == "enrolled" and machine["cluster"] == "edge"

    # Back on the list, the device installs and registers; the row follows each step.
    await page.click("nav a[data-nav=machines]")
    row = page.locator("table.machines tbody tr", has_text="52:54:00:aa:00:01")
    await expect(row).to_contain_text("enrolled")
    script = await boot(env, "52-54-00-aa-00-01", serial="SN-LIVE-1")
    token = install_token(script)
    await expect(row).to_contain_text("booting")
    r = await call(env, "POST", "/api/v1/machines/52:54:00:aa:00:01/events", admin=False,
                   json_body={"kind": "installed", "message": "disk written"},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201, r.text
    await expect(row).to_contain_text("installed")
    r = await call(env, "POST", "/api/v1/register", admin=False,
                   json_body={"mac": "52:54:00:aa:00:01", "token": token,
                              "addresses": ["192.0.2.77"]})
    assert r.status == 200, r.text
    await expect(row).to_contain_text("registered")
    await expect(row).to_contain_text("registered at 192.0.2.77")
    await shots(page, "registered-live")

    # Its page: timeline, the explain view, the rendered script and config without secrets.
    await row.locator("a").click()
    await expect(page.locator("ol.timeline")).to_contain_text("registered")
    await expect(page.locator("pre.code").first).to_contain_text('"state": "registered"')
    await expect(page.locator("pre.code").nth(1)).to_contain_text("#!ipxe")
    config = page.locator("pre.code").nth(2)
    await expect(config).to_contain_text("********")
    assert "k3s-secret-token" not in await config.inner_text()
    assert token not in await page.content()
    await shots(page, "machine-page")

    # Clusters: the node is listed under its cluster.
    await page.click("nav a[data-nav=clusters]")
    await expect(page.locator("section.cluster[data-cluster=edge]")).to_contain_text(
        "52:54:00:aa:00:01")
    await shots(page, "clusters")


async def test_bulk_upload_reports_the_bad_row_and_imports_a_clean_file(
        make_env: EnvFactory, browser: Browser, shots: Any, tmp_path: Path) -> None:
    env = await make_env()
    await env.seed()
    page = await logged_in(browser, env, shots)
    await page.click("nav a[data-nav=enroll]")
    bad = tmp_path / "rack1.csv"
    bad.write_text("mac,hostname,cluster,role\n"
                   "52:54:00:bb:00:01,rack1-a,edge,agent\n"
                   "52:54:00:bb:00:02,rack1-b,nowhere,agent\n"
                   "not-a-mac,rack1-c,edge,agent\n")
    await page.set_input_files("input[type=file]", str(bad))
    await page.click("text=Check (dry run)")
    errors = page.locator("table.errors tbody tr")
    await expect(errors).to_have_count(2)
    await expect(errors.nth(0)).to_contain_text("3")  # the file's line of the bad cluster
    await expect(errors.nth(0)).to_contain_text("cluster")
    await expect(errors.nth(1)).to_contain_text("4")
    await expect(page.locator("button:text-is('Import')")).to_be_disabled()
    await shots(page, "bulk-errors")
    assert (await env.get("/api/v1/machines"))["total"] == 0  # a dry run changes nothing

    good = tmp_path / "rack1-fixed.csv"
    good.write_text("mac,hostname,cluster,role\n"
                    "52:54:00:bb:00:01,rack1-a,edge,agent\n"
                    "52:54:00:bb:00:02,rack1-b,edge,agent\n")
    await page.set_input_files("input[type=file]", str(good))
    await page.click("text=Check (dry run)")
    await expect(page.locator(".report")).to_contain_text("2 new")
    await page.click("button:text-is('Import')")
    await expect(page.locator(".report")).to_contain_text("imported")
    assert (await env.get("/api/v1/machines"))["total"] == 2
    await shots(page, "bulk-imported")

    # One machine by hand.
    await page.fill("input[name=macs]", "52:54:00:bb:00:03")
    await page.fill("input[name=hostname]", "rack1-c")
    await page.click("form.enroll button[type=submit]")
    await expect(page.locator("#notice")).to_contain_text("enrolled rack1-c")

    # The list searches on the server: one match of three.
    await page.click("nav a[data-nav=machines]")
    await page.fill("input[type=search]", "rack1-b")
    rows = page.locator("table.machines tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("52:54:00:bb:00:02")
    await shots(page, "search")


async def numbered(env: Env, count: int) -> None:
    """``count`` machines n0000, n0001, ..., their MACs in the same order."""
    rows = [{"mac": f"52:54:00:cc:{i // 256:02x}:{i % 256:02x}", "hostname": f"n{i:04d}"}
            for i in range(count)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)


async def test_many_machines_are_paged_and_sorted_by_the_server(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    env = await make_env()
    await numbered(env, 120)
    page = await logged_in(browser, env, shots)
    body = page.locator("table.machines tbody tr")
    await expect(body).to_have_count(50)
    await expect(page.locator(".pager")).to_contain_text("1\u201350 of 120")
    await page.click("th button:text('Hostname')")
    await page.click("th button:text('Hostname')")  # descending
    await expect(body.first).to_contain_text("n0119")
    await page.click("text=next →")
    await expect(page.locator(".pager")).to_contain_text("51\u2013100 of 120")
    await expect(body.first).to_contain_text("n0069")
    await shots(page, "paged")
    assert re.search(r"n0069", await body.first.inner_text())


async def test_a_big_cluster_is_shown_a_page_at_a_time_with_a_way_to_all_of_it(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The clusters view fetched every node of every cluster (~8 MiB of JSON for a cluster of
    12,500) at each reload, several a second during a storm: now a page of each, the count,
    and a link to the machines list filtered by the cluster."""
    env = await make_env()
    await env.seed()
    rows = [{"mac": f"52:54:00:dd:{i // 256:02x}:{i % 256:02x}", "hostname": f"e{i:04d}",
             "cluster": "edge" if i < 120 else None, "role": "agent"} for i in range(130)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    page = await logged_in(browser, env, shots)
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/nodes" in r.url else None)
    await page.click("nav a[data-nav=clusters]")
    section = page.locator("section.cluster[data-cluster=edge]")
    await expect(section.locator("tbody tr")).to_have_count(50)
    await expect(section.locator(".more")).to_contain_text("the first 50 of 120")
    assert asked and all("limit=50" in u for u in asked), asked
    await shots(page, "cluster-paged")
    await section.locator(".more a").click()
    await expect(page.locator(".pager")).to_contain_text("1\u201350 of 120")
    await expect(page.locator("select[name=cluster]")).to_have_value("edge")
    await shots(page, "cluster-all")


async def test_the_machines_stuck_in_a_storm_are_one_filter_away(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """Mid-storm, which machines fetched their script and then nothing for 15 minutes, and
    what they did last: the state filter with "unchanged 15 min+" (GET
    /machines?state=booting&unchanged_for=900), the last event in its column."""
    env = await make_env()
    await env.seed()
    for n in range(1, 5):
        await env.post("/api/v1/machines", {"mac": f"52:54:00:ef:00:0{n}"}, status=201)
        await boot(env, f"52:54:00:ef:00:0{n}")
    store = env.service.store
    stuck = await store.machine_by("mac", "52:54:00:ef:00:02")
    assert stuck is not None
    # In booting for 30 minutes, a fact learnt a minute ago (s39-journey: the column and
    # the filter are the time in the state, which that does not reset).
    await store.update_machine(replace(stuck, state_since=time.time() - 1800,
                                       updated=time.time() - 60))
    page = await logged_in(browser, env, shots)
    rows = page.locator("table.machines tbody tr")
    await expect(rows).to_have_count(4)
    await page.select_option("select[name=state]", "booting")
    await page.select_option("select[name=still]", "900")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_contain_text("52:54:00:ef:00:02")
    await expect(rows.first).to_contain_text("install-plan")
    await expect(rows.first).to_contain_text("30 min")
    await shots(page, "stuck")


async def test_the_search_box_takes_a_label_as_key_value(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """Searching by label (a rack, a line): "rack=r2" in the search box is the label filter
    (GET /machines?label=rack=r2), not a part of a name (s36-ops)."""
    env = await make_env()
    rows = [{"mac": f"52:54:00:fa:00:0{i}", "hostname": f"n{i}", "labels": {"rack": f"r{i % 3}"}}
            for i in range(6)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    page = await logged_in(browser, env, shots)
    body = page.locator("table.machines tbody tr")
    await expect(body).to_have_count(6)
    await page.fill("input[type=search]", "rack=r2")
    await expect(body).to_have_count(2)
    await expect(body.nth(0)).to_contain_text("n2")
    await expect(body.nth(1)).to_contain_text("n5")
    await shots(page, "label-search")


async def test_a_slow_list_is_not_asked_again_while_it_is_answering(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A storm's events ask the open list to reload at most every 0.7 s; a search over
    100,000 machines takes ~2 s (a scan), and the page asked again meanwhile, three reloads
    running at once per tab. Now the next waits for the last to answer (s36-ops)."""
    env = await make_env()
    shown = await env.post("/api/v1/machines", {"mac": "52:54:00:fb:00:01"}, status=201)
    page = await logged_in(browser, env, shots)
    await expect(page.locator("table.machines tbody tr")).to_have_count(1)
    running = [0]
    most = [0]
    asked = [0]

    async def slow(route: Any) -> None:
        running[0] += 1
        asked[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(1.5)
        try:
            await route.continue_()
        finally:
            running[0] -= 1

    await page.route(re.compile(r".*/api/v1/machines\?.*last_event=1.*"), slow)
    for i in range(40):  # 4 s of a storm's events, about the machine shown (an event
        # about one the page does not show reloads only the counts: s46-operator)
        env.service.events.published(
            [Event(shown["id"], time.time(), "dhcp", f"seen {i}")])
        await asyncio.sleep(0.1)
    # It did reload, the next after the last answered: waited for, not for a fixed 2 s
    # (a loaded machine's browser took longer to ask the second time), bounded by 60 s.
    for _ in range(600):
        if asked[0] >= 2 and not running[0]:
            break
        await asyncio.sleep(0.1)
    assert asked[0] >= 2
    assert most[0] == 1, most[0]
# Markup a stranger sends as text: it must be shown as these characters, never run.
MARKUP = ('<img src=x onerror="window.__ran=1">', "<script>window.__ran=2</script>",
          '"><svg onload="window.__ran=3">')


async def test_a_strangers_markup_is_shown_as_text_and_never_run(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A firmware string of a boot request (anyone's), an installer's event message and the
    hostname it registers with reach the machine list, the discovered queue, the timeline
    and the live feed: shown as text, none of it run, the page's policy untouched
    (s36-attack: read in app.js, every inventory string set as textContent, and held here)."""
    env = await make_env(HOLD)
    await env.seed()
    page = await logged_in(browser, env, shots)
    await boot(env, "52-54-00-aa-00-07", serial=MARKUP[0], product=MARKUP[2])
    await page.click("nav a[data-nav=discovered]")
    await expect(page.locator("table.machines tbody")).to_contain_text(MARKUP[0])
    await shots(page, "discovered-markup")
    r = await call(env, "POST", "/api/v1/machines/52:54:00:aa:00:07/approve",
                   json_body={"cluster": "edge", "role": "agent", "profile": "k3os"})
    assert r.status == 200, r.text
    token = install_token(await boot(env, "52-54-00-aa-00-07"))
    r = await call(env, "POST", "/api/v1/machines/52:54:00:aa:00:07/events", admin=False,
                   json_body={"kind": "progress", "message": MARKUP[1]},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201, r.text
    await page.click("nav a[data-nav=machines]")
    row = page.locator("table.machines tbody tr", has_text="52:54:00:aa:00:07")
    await expect(row).to_contain_text(MARKUP[1])  # the last event's column, live
    r = await call(env, "POST", "/api/v1/register", admin=False,
                   json_body={"mac": "52:54:00:aa:00:07", "token": token,
                              "hostname": MARKUP[2], "addresses": ["192.0.2.78"]})
    assert r.status == 200, r.text
    await row.click()
    timeline = page.locator("ol.timeline")
    await expect(timeline).to_contain_text(MARKUP[1])
    # The hostname it registered with is not a name (s37-register: kept only as an RFC 1123
    # name): refused, said in the event without being repeated, so never on the page.
    await expect(timeline).to_contain_text("ignored its hostname")
    assert MARKUP[2] not in await timeline.inner_text()
    await expect(page.locator("dl.fields")).to_contain_text(MARKUP[0])
    await shots(page, "machine-markup")
    assert await page.evaluate("window.__ran") is None
    assert await page.locator("#view img, #view script, #view svg").count() == 0


async def test_a_profiles_problems_are_shown_on_profiles_and_on_a_machine_that_uses_it(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A profile stored before the path checks (s35) names files netboot refuses to serve:
    its ``problems`` (GET /profiles) are on the Profiles view and on the plan of a machine
    that boots with it, each field and why; a sound profile shows none (s37-ops)."""
    from netboot.model import Profile

    env = await make_env()
    await env.seed()
    old = Profile(name="old", kernel="../../etc/passwd", initrds=("initrd.img",))
    await env.service.store.put_profile(old, create=True)
    await env.post("/api/v1/machines", {"mac": "52:54:00:aa:00:31", "hostname": "uses-old",
                                        "cluster": "edge", "role": "agent", "profile": "old"},
                   status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:aa:00:32", "hostname": "uses-k3os",
                                        "cluster": "edge", "role": "agent", "profile": "k3os"},
                   status=201)
    page = await logged_in(browser, env, shots)
    await page.click("nav a[data-nav=profiles]")
    bad = page.locator("section.profile[data-profile=old]")
    await expect(bad.locator(".problems")).to_contain_text("kernel")
    await expect(bad.locator(".problems")).to_contain_text("'..' is refused when served")
    await expect(bad.locator("h2 .badge")).to_have_text("1 problem")
    await expect(page.locator("section.profile[data-profile=k3os]")).to_be_visible()
    await expect(page.locator("section.profile[data-profile=k3os] .problems")).to_have_count(0)
    await shots(page, "profiles")
    machine = await env.get("/api/v1/machines/52:54:00:aa:00:31")
    await page.goto(url(env, f"/#/machine/{machine['id']}"))
    plan = page.locator(".decision .problems")
    await expect(plan).to_contain_text("Its profile old has problems")
    await expect(plan).to_contain_text("kernel")
    await shots(page, "machine-with-a-bad-profile")
    sound = await env.get("/api/v1/machines/52:54:00:aa:00:32")
    await page.goto(url(env, f"/#/machine/{sound['id']}"))
    await expect(page.locator(".decision")).to_contain_text("k3os")
    await expect(page.locator(".decision .problems")).to_have_count(0)


async def test_another_sites_form_cannot_end_the_session_and_the_own_button_does(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A page of any other site the operator visits posts a form to /logout (which needs
    no cookie): chromium sends that site's Origin, netboot answers 403 and the session
    lives on. The dashboard's own "Log out" still ends it (s37-ops)."""
    env = await make_env()
    page = await logged_in(browser, env, shots)
    evil = ("<html><body><form id=f method=post action='" + url(env, "/logout") +
            "'></form><script>document.getElementById('f').submit()</script></body></html>")
    await page.route("http://evil.example/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body=evil))
    async with page.expect_response(url(env, "/logout")) as answer:
        await page.goto("http://evil.example/")
    assert (await answer.value).status == 403
    await shots(page, "cross-site-logout-refused")
    await page.goto(url(env))
    await expect(page).to_have_url(url(env, "/"))
    await expect(page.locator("#live")).to_have_text("live")
    await page.click("form.logout button[type=submit]")
    await expect(page).to_have_url(url(env, "/login"))
    await page.goto(url(env))
    await expect(page).to_have_url(url(env, "/login"))


@pytest.mark.parametrize("way", ["shared-worker", "web-locks"])
async def test_logging_out_in_one_tab_ends_the_others_and_their_stream(
        make_env: EnvFactory, browser: Browser, shots: Any, way: str) -> None:
    """An operator with two tabs of the dashboard logs out in one. The session is the API
    token it was opened with (logout deletes the cookie; the token stays valid), and the
    stream the tabs share was opened with it: the other tab stayed on the dashboard,
    following every machine's events live, for as long as it stayed open (main: still at
    /, "live", the stream open). Now every tab goes to the login page and the stream
    ends (s48-attack)."""
    env = await make_env()
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    if way == "web-locks":
        await context.add_init_script("delete window.SharedWorker;")
    try:
        first = await logged_in(context, env, shots)
        other = await context.new_page()
        other.set_default_timeout(TIMEOUT_MS)
        await other.goto(url(env))
        await expect(other.locator("#live")).to_have_text("live")
        assert env.service.events.subscribers == 1
        await first.click("form.logout button[type=submit]")
        await expect(first).to_have_url(url(env, "/login"))
        await expect(other).to_have_url(url(env, "/login"))
        await shots(other, "other-tab-logged-out")
        await other.goto(url(env))
        await expect(other).to_have_url(url(env, "/login"))  # the cookie is gone
        for _ in range(600):  # bounded: the server sees the stream's end by its next write
            if env.service.events.subscribers == 0:
                break
            await asyncio.sleep(0.1)
        assert env.service.events.subscribers == 0
    finally:
        await context.close()


async def test_a_cluster_with_the_short_k3s_token_says_so_on_the_clusters_page(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A cluster made before netboot made k3s CAs keeps the short join token until its
    operator opts in (s37-k3sca): the Clusters page says so, with the way out; a cluster with
    the secure token says nothing (s38-journey)."""
    from netboot.model import Cluster

    env = await make_env()
    await env.seed(server_url="managed")  # made now: its k3s CA and the secure token
    await env.service.store.put_cluster(Cluster(name="old", token="short-secret"),
                                        create=True)
    page = await logged_in(browser, env, shots)
    await page.click("nav a[data-nav=clusters]")
    box = page.locator("section.cluster[data-cluster=old] .problems")
    await expect(box).to_contain_text("the short k3s join token")
    await expect(box).to_contain_text("netboot clusters set old --secure-token")
    assert "short-secret" not in await page.content()
    await expect(page.locator("section.cluster[data-cluster=edge]")).to_be_visible()
    await expect(page.locator("section.cluster[data-cluster=edge] .problems")).to_have_count(0)
    await shots(page, "clusters-short-token")


async def test_an_operator_marks_a_machine_installed_from_its_page_after_confirming(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The CLI's and API's mark-installed on the machine's page (s39-user left it): a
    machine whose disk holds its install already (installed after the backup a restore
    brought back) boots that disk. As Remove, it asks first; a dismissed question changes
    nothing. As every action, the API's scope rule decides: a read token's session is
    refused (403 shown), the machine unchanged."""
    env = await make_env()
    await env.seed()
    made = await env.post("/api/v1/machines", {"mac": "52:54:00:aa:00:21",
                                               "hostname": "rack1-a", "cluster": "edge",
                                               "profile": "k3os"}, status=201)
    page_url = url(env, f"/#/machine/{made['id']}")

    # A read token's session: the button is there, the API refuses it, nothing changes.
    reader = (await env.post("/api/v1/tokens", {"name": "wall-screen", "scope": "read"},
                             status=201))["token"]
    page = await browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(url(env, "/login"))
    await page.fill("#token", reader)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url(env, "/"))
    await page.goto(page_url)
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("button.mark-installed")
    await expect(page.locator("#notice")).to_contain_text("operator")
    await shots(page, "read-session-refused")
    assert (await env.get(f"/api/v1/machines/{made['id']}"))["state"] == "enrolled"
    await page.close()

    page = await logged_in(browser, env, shots)
    await page.goto(page_url)
    button = page.locator("button.mark-installed")
    await expect(button).to_have_text("Mark installed")
    # Asked first: dismissed, nothing sent.
    asked: list[str] = []

    async def dismiss(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()
    page.once("dialog", dismiss)
    await button.click()
    await asyncio.sleep(0.5)
    assert asked and "rack1-a" in asked[0] and "local disk" in asked[0], asked
    assert (await env.get(f"/api/v1/machines/{made['id']}"))["state"] == "enrolled"
    # Accepted: installed, said so, on the timeline, and the button gone.
    page.once("dialog", lambda dialog: dialog.accept())
    await button.click()
    await expect(page.locator("#notice")).to_contain_text("rack1-a marked installed")
    await expect(page.locator("ol.timeline")).to_contain_text("marked installed by the operator")
    await expect(page.locator("button.mark-installed")).to_have_count(0)
    await shots(page, "marked-installed")
    assert (await env.get(f"/api/v1/machines/{made['id']}"))["state"] == "installed"
    # Its next network boot is its disk.
    why = await env.get(f"/api/v1/machines/{made['id']}/explain")
    assert why["state"] == "installed" and "local" in why["decision"], why


async def test_a_machine_not_booted_yet_shows_what_it_boots_as_each_architecture(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """README's quickstart enrolls edge-1 by MAC beside a group selecting arch=x86_64; its
    page said only "hold — no profile: set one on the machine, a group that selects it or
    enroll.default_profile", where the box installs as soon as it boots as an x86_64 (the
    arch is not known before its firmware asks). The page now says what it boots as each
    architecture, as `netboot explain REF --arch A` does; once it has booted, only its own
    (s45-review)."""
    env = await make_env()
    await env.seed()
    made = await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:56",
                                               "hostname": "edge-1"}, status=201)
    page = await logged_in(browser, env, shots)
    await page.goto(url(env, f"/#/machine/{made['id']}"))
    plan = page.locator("p.decision")
    await expect(plan).to_contain_text("hold")
    x86 = plan.locator("li[data-arch=x86_64]")
    await expect(x86).to_contain_text("as an x86_64 box: install")
    await expect(x86).to_contain_text("install profile k3os (group all-x86)")
    await expect(plan.locator("li[data-arch=arm64]")).to_contain_text("as an arm64 box: hold")
    await shots(page, "not-booted-yet")

    # It boots as an x86_64: its own plan, nothing by architecture.
    await boot(env, "52-54-00-12-34-56")
    await page.reload()
    await expect(plan).to_contain_text("(group all-x86")
    await expect(plan.locator("ul.by-arch")).to_have_count(0)
    await shots(page, "booted")


async def test_the_inventorys_refused_writes_are_a_banner_on_every_page_until_they_clear(
        make_env: EnvFactory, browser: Browser, shots: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes refused (a full or read-only database; with several servers, told by the one
    that found it): /healthz and the status said so, the dashboard nothing, and an operator
    found out from failing actions (s40-multi). Now a banner on every page names it, and
    goes once writes are taken. Told by the event stream the page has open (as it opens and
    when the health changes): each tab asked GET /api/v1/status (the fleet's counts too)
    every 15 s for it (s41-ops); no /status is asked here."""
    env = await make_env()
    page = await logged_in(browser, env, shots)
    banner = page.locator("#inventory-health")
    await expect(banner).to_be_hidden()
    await page.goto(url(env, "/#/profiles"))  # a page that asks nothing of the status itself
    await expect(page.locator("#live")).to_have_text("live")
    statuses: list[str] = []
    page.on("request", lambda r: statuses.append(r.url) if "/api/v1/status" in r.url else None)
    why = "inventory test: could not extend file: No space left on device"
    # The store's own answer (a PostgreSQL store sets it from a refused write, its own or
    # another server's notification); the service's watcher turns it into health.
    monkeypatch.setattr(env.service.store, "stuck_writes", lambda: why, raising=False)
    await env.service.watch_once()  # the watcher's round (the test's env runs none)
    assert not env.service.boot.health.up
    await expect(banner).to_contain_text("No space left on device", timeout=25_000)
    await expect(banner).to_contain_text("degraded")
    await shots(page, "inventory-refuses-writes")
    monkeypatch.setattr(env.service.store, "stuck_writes", lambda: None, raising=False)
    await env.service.watch_once()
    assert env.service.boot.health.up
    await expect(banner).to_be_hidden(timeout=25_000)
    assert statuses == [], statuses  # from the stream, not a GET /status


async def test_a_machine_stuck_on_a_template_error_says_so_in_the_list_and_its_timeline(
        make_env: EnvFactory, browser: Browser, shots: Any, tmp_path: Path) -> None:
    """An operator's install template with an undefined name: the device's /ipxe was a 500
    and a server log line, and the dashboard showed the machine as enrolled with nothing
    more (s41-ops). Now the list's last event (live) and the machine's timeline say that
    its iPXE script failed to render, with the template file, its line and the fix."""
    own = tmp_path / "own-templates"
    (own / "ipxe").mkdir(parents=True)
    (own / "ipxe" / "install.ipxe").write_text(
        "#!ipxe\n# a site's script\nkernel {{ kernel_urll }}\nboot\n")
    env = await make_env(f"templates:\n  dir: {own}\n")
    await env.seed()
    mac = "52:54:00:aa:00:41"
    await env.post("/api/v1/machines", {"mac": mac}, status=201)
    page = await logged_in(browser, env, shots)
    row = page.locator("table.machines tbody tr", has_text=mac)
    await expect(row).to_contain_text("enrolled")
    resp = await env.client.get(f"/ipxe?mac={mac}&arch=x86_64")
    assert resp.status == 500
    await env.service.enroller.recorder.flush()  # the note's group commit, then its event
    await expect(row).to_contain_text("render failed: its iPXE script failed to render")
    await shots(page, "render-failed-in-list")
    # The device asks on past the failures' rate limit: the list still says why it is
    # stuck (it said install-plan, the install's "asked again" note: s42-ops). Loaded
    # afresh, so that no event still on its way can pass for it.
    from netboot.enroll import RENDER_FAILED_BURST

    for _ in range(RENDER_FAILED_BURST + 2):
        resp = await env.client.get(f"/ipxe?mac={mac}&arch=x86_64")
        assert resp.status == 500
    await env.service.enroller.recorder.flush()
    await page.goto(url(env))
    await expect(page.locator("#live")).to_have_text("live")
    await expect(row).to_contain_text("render failed: its iPXE script failed to render")
    await row.click()
    timeline = page.locator("li", has_text="render failed")
    await expect(timeline).to_contain_text("'kernel_urll' is undefined")
    await expect(timeline).to_contain_text(f"{own / 'ipxe' / 'install.ipxe'}, line 3")
    await expect(timeline).to_contain_text(f"netboot render {mac} ipxe")
    await shots(page, "render-failed-in-timeline")
    # Fixed: the next ask renders, and the timeline says so (live).
    (own / "ipxe" / "install.ipxe").write_text("#!ipxe\nkernel {{ kernel_url }}\nboot\n")
    resp = await env.client.get(f"/ipxe?mac={mac}&arch=x86_64")
    assert resp.status == 200
    await env.service.enroller.recorder.flush()
    await expect(page.locator("li", has_text="rendered again")).to_contain_text(
        "its iPXE script rendered again")


async def test_an_older_registration_is_a_warning_on_every_page_until_it_is_reinstalled(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A machine an older register command registered (a rolling upgrade: another server,
    still older, registered it while this one runs) was named in the server's log only
    (s42-ops). Now the page open on another view shows it live, by the event stream, with
    the fix; a page loaded afresh shows it (GET /status); reinstalled, it goes."""
    from netboot.model import MachineState

    env = await make_env()
    await env.seed()
    mac = "52:54:00:aa:00:51"
    page = await logged_in(browser, env, shots)
    banner = page.locator("#warnings")
    await expect(banner).to_be_hidden()
    await page.goto(url(env, "/#/profiles"))  # a page that asks nothing of the status itself
    await expect(page.locator("#live")).to_have_text("live")
    await env.service.boot.load_view()  # the service's start does (the test's env does not)
    made = await env.post("/api/v1/machines", {"mac": mac, "hostname": "older-1"}, status=201)
    store = env.service.store
    machine = await store.get_machine(made["id"])
    assert machine is not None  # registered as an older server's register command does
    await store.update_machine(replace(machine, state=MachineState.REGISTERED,
                                       ipv4="192.0.2.61", secret_hash=None))
    await env.service.watch_once()  # the watcher's round (the test's env runs none)
    await expect(banner).to_contain_text("older-1", timeout=25_000)
    await expect(banner).to_contain_text("netboot machines reinstall REF")
    await shots(page, "older-registration-live")
    await page.reload()
    await expect(page.locator("#live")).to_have_text("live")
    await expect(banner).to_contain_text("1 registered machines were registered by an older")
    await page.goto(url(env, "/#/"))
    await expect(banner).to_contain_text("older-1")
    await shots(page, "older-registration-machines-page")
    await env.post(f"/api/v1/machines/{mac}/reinstall", {}, status=200)
    for _ in range(60):  # bounded at 30 s: a look every OLDER_LOOK_SECONDS at most
        await env.service.watch_once()
        if not env.service.standing.as_list():
            break
        await asyncio.sleep(0.5)
    await expect(banner).to_be_hidden(timeout=25_000)
    await shots(page, "older-registration-reinstalled")


@pytest.mark.parametrize("way", ["shared-worker", "web-locks"])
async def test_an_operator_with_many_tabs_open_gets_every_one_live(
        make_env: EnvFactory, browser: Browser, shots: Any, way: str) -> None:
    """An operator opens the list and then each suspect machine in a tab of its own (a
    middle click on each row's hostname), in one browser. Chromium opens at most 6 HTTP/1.1
    connections to one server (netboot's HTTPS is aiohttp's HTTP/1.1), and every tab held
    one for its event stream: from the sixth tab on, each request of every tab waited for a
    connection that never came free, and the tabs showed nothing, or stopped following.
    One stream for all the tabs of a browser: every tab loads and follows a device live.
    The stream is held by a SharedWorker; a browser without one (Chrome on Android) elects a
    tab by a Web Lock, whose successor resumes the stream where its predecessor's stopped."""
    env = await make_env()
    await env.seed()
    rows = [{"mac": f"52:54:00:dd:00:{i:02x}", "hostname": f"t{i:02d}", "cluster": "edge"}
            for i in range(8)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    if way == "web-locks":
        await context.add_init_script("delete window.SharedWorker;")
    try:
        tabs = [await logged_in(context, env, shots)]
        for i in range(8):
            tab = await context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            await tab.goto(url(env, f"/#/machine/52:54:00:dd:00:{i:02x}"))
            tabs.append(tab)
        for i, tab in enumerate(tabs[1:]):
            await expect(tab.locator("h1")).to_contain_text(f"t{i:02d}")
        await shots(tabs[-1], "ninth-tab")
        # A device boots: the list and that machine's own tab follow it, and so do the rest.
        await boot(env, "52-54-00-dd-00-07")
        row = tabs[0].locator("table.machines tbody tr", has_text="t07")
        await expect(row).to_contain_text("booting")
        await expect(tabs[8].locator("h1")).to_contain_text("booting")
        await expect(tabs[8].locator("ol.timeline")).to_contain_text("install-plan")
        for tab in tabs:
            await expect(tab.locator("#live")).to_have_text("live")
        assert env.service.events.subscribers == 1  # one stream for the nine tabs
        await shots(tabs[8], "followed-live")
        # The tab that held the stream is closed: another takes it over, and follows.
        await tabs[0].close()
        await boot(env, "52-54-00-dd-00-06")
        await expect(tabs[7].locator("h1")).to_contain_text("booting")
        assert env.service.events.subscribers == 1
    finally:
        await context.close()


async def test_a_machine_page_opened_by_its_mac_or_hostname_follows_it_live(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """A machine's page is opened by a link (``#/machine/52:54:00:…``, or its hostname, as
    the API's {ref} takes them), not by a row's click (its id). Events name the machine by
    its id: the page matched them against the MAC it was opened by, and never moved."""
    env = await make_env()
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:dd:01:01", "hostname": "by-mac",
                                        "cluster": "edge"}, status=201)
    await env.post("/api/v1/machines", {"mac": "52:54:00:dd:01:02", "hostname": "by-name",
                                        "cluster": "edge"}, status=201)
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    page = await logged_in(context, env, shots)
    other = await context.new_page()
    other.set_default_timeout(TIMEOUT_MS)
    await page.goto(url(env, "/#/machine/52:54:00:dd:01:01"))
    await other.goto(url(env, "/#/machine/by-name"))
    for tab, name in ((page, "by-mac"), (other, "by-name")):
        await expect(tab.locator("h1")).to_contain_text(f"{name} enrolled")
        await expect(tab.locator("#live")).to_have_text("live")
    await boot(env, "52-54-00-dd-01-01")
    await boot(env, "52-54-00-dd-01-02")
    for tab, name in ((page, "by-mac"), (other, "by-name")):
        await expect(tab.locator("h1")).to_contain_text(f"{name} booting")
        await expect(tab.locator("ol.timeline")).to_contain_text("install-plan")
    await shots(page, "followed")
    await context.close()


async def test_the_ages_on_the_page_keep_counting_when_no_event_comes(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """After a storm, nothing arrives: the page was drawn once, and its "Unchanged for" said
    "2 s" of a machine stuck booting for twenty minutes (the filter for the stuck found it,
    the column said otherwise), its timeline "2 s ago". The page's clock is moved on by
    twenty minutes (Playwright's clock: the browser's timers and Date, not the server's)."""
    env = await make_env()
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:dd:02:01", "hostname": "quiet",
                                        "cluster": "edge"}, status=201)
    await boot(env, "52-54-00-dd-02-01")  # booting from now on, and nothing after
    context = await browser.new_context(viewport={"width": 1360, "height": 900})
    try:
        await context.clock.install()
        page = await logged_in(context, env, shots)
        row = page.locator("table.machines tbody tr", has_text="quiet")
        unchanged = row.locator("td").last  # "Unchanged for"
        await expect(row).to_contain_text("booting")
        await expect(unchanged).to_have_text(re.compile(r"^\d+ s$"))
        await page.clock.fast_forward("20:00")
        await expect(unchanged).to_have_text("20 min")
        await shots(page, "list-twenty-minutes-on")
        await row.locator("a").click()
        await expect(page.locator("ol.timeline")).to_contain_text("install-plan")
        await page.clock.fast_forward("40:00")
        await expect(page.locator("ol.timeline li").last).to_contain_text("1 h 0 min ago")
        await expect(page.locator("dl.fields")).to_contain_text("1 h 0 min (since")
        await shots(page, "machine-an-hour-on")
    finally:
        await context.close()


async def test_a_storm_elsewhere_in_the_fleet_reloads_the_counts_not_the_page(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The whole fleet sorted by MAC, its first page of 50 shown: a machine past the page
    boots. The counts follow it; the page, which shows none of it, is not asked again (each
    event asked it, ~5 ms of server CPU a time at 100,000 machines, ~1.4 a second per open
    tab in a storm). A machine on the page that boots is shown booting, as before; with a
    filter by state, a machine past the page that boots is brought in."""
    env = await make_env()
    await env.seed()
    rows = [{"mac": f"52:54:00:dd:03:{i:02x}", "hostname": f"s{i:02d}", "cluster": "edge"}
            for i in range(60)]
    await env.post("/api/v1/machines:bulk", {"machines": rows}, status=201)
    page = await logged_in(browser, env, shots)
    lists: list[str] = []
    page.on("request", lambda r: lists.append(r.url) if "/api/v1/machines?" in r.url else None)
    body = page.locator("table.machines tbody tr")
    await expect(body).to_have_count(50)
    booting = page.locator(".counts button[data-state=booting] .n")
    await expect(booting).to_have_text("0")
    lists.clear()

    await boot(env, "52-54-00-dd-03-37")  # s55: past the first page
    await expect(booting).to_have_text("1")
    await boot(env, "52-54-00-dd-03-02")  # s02: on it
    await expect(body.filter(has_text="s02")).to_contain_text("booting")
    await shots(page, "one-on-the-page-booting")
    # One page asked: the one that shows s02 booting (the first event reloaded the counts).
    assert len(lists) == 1, lists

    await page.locator("select[name=state]").select_option("booting")
    await expect(body).to_have_count(2)
    await boot(env, "52-54-00-dd-03-38")  # s56 boots: now it is one the filter shows
    await expect(body.filter(has_text="s56")).to_contain_text("booting")
    await expect(page.locator(".pager")).to_contain_text("1\u20133 of 3")


def cut_streams(env: Env) -> None:
    """The server ends every open event stream (as a proxy's idle timeout, a laptop's sleep
    or a server's stream that failed would): each browser's EventSource reconnects 3 s later
    (the stream's ``retry:``)."""
    for sub in list(env.service.events._subscribers):
        sub._end()


async def test_events_made_while_the_stream_is_cut_appear_when_it_reconnects(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The stream drops; a device boots before the browser reconnects (nobody subscribed
    then). The reconnecting EventSource sends the last event's id (Last-Event-ID) and is
    given the gap's events: the row says booting, with no reload of the page. Before, the
    reconnected stream started at the present, and the row said enrolled until the next
    event about it, or a reload."""
    env = await make_env()
    await env.seed()
    for i in (1, 2):
        await env.post("/api/v1/machines", {"mac": f"52:54:00:dd:04:0{i}",
                                            "hostname": f"gap{i}", "cluster": "edge"},
                       status=201)
    page = await logged_in(browser, env, shots)
    rows = page.locator("table.machines tbody tr")
    await expect(rows.filter(has_text="gap1")).to_contain_text("enrolled")
    await page.evaluate("window.notReloaded = true")
    # One event read before the cut (its id is where the stream resumes), and then a gap.
    await boot(env, "52-54-00-dd-04-01")
    await expect(rows.filter(has_text="gap1")).to_contain_text("booting")
    cut_streams(env)
    await expect(page.locator("#live")).to_have_text("reconnecting…")
    await boot(env, "52-54-00-dd-04-02")
    assert env.service.events.subscribers == 0  # the event came while no stream was open
    await expect(page.locator("#live")).to_have_text("live")
    await expect(rows.filter(has_text="gap2")).to_contain_text("booting")
    await expect(page.locator(".counts button[data-state=booting] .n")).to_have_text("2")
    assert await page.evaluate("window.notReloaded") is True
    await shots(page, "the-gap-given")


async def test_a_stream_resumed_from_a_place_the_server_does_not_hold_reloads_the_view(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The stream drops and the server that answers the reconnect is another process (a
    restart: the id's instance is not its own, as here): what came in the gap cannot be
    given, so it says "missed" and the view reloads, rather than showing the row as it was.
    Before, the reconnected stream said nothing and the row stayed enrolled."""
    env = await make_env()
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:dd:05:01", "hostname": "restarted",
                                        "cluster": "edge"}, status=201)
    page = await logged_in(browser, env, shots)
    row = page.locator("table.machines tbody tr", has_text="restarted")
    await expect(row).to_contain_text("enrolled")
    await page.evaluate("window.notReloaded = true")
    env.service.events.instance = "0fe1e2e3"  # the ids the page holds are another process's
    cut_streams(env)
    await expect(page.locator("#live")).to_have_text("reconnecting…")
    await boot(env, "52-54-00-dd-05-01")
    assert env.service.events.subscribers == 0
    await expect(page.locator("#live")).to_have_text("live")
    await expect(row).to_contain_text("booting")
    assert await page.evaluate("window.notReloaded") is True


async def test_a_page_is_reached_by_its_number_or_as_the_first_or_the_last(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """Previous and next only: the end of 100,000 machines was 2,000 clicks away. The first,
    the last, and any page by its number (past the last: the last)."""
    env = await make_env()
    await numbered(env, 260)
    page = await logged_in(browser, env, shots)
    body = page.locator("table.machines tbody tr")
    pager = page.locator(".pager")
    await expect(pager).to_contain_text("1\u201350 of 260")
    await expect(pager).to_contain_text("of 6")
    await page.click("text=last »")
    await expect(pager).to_contain_text("251\u2013260 of 260")
    await expect(body).to_have_count(10)
    await expect(body.first).to_contain_text("n0250")
    await shots(page, "last-page")
    number = page.locator(".pager input.page-number")
    await expect(number).to_have_value("6")
    await number.fill("3")
    await number.press("Enter")
    await expect(pager).to_contain_text("101\u2013150 of 260")
    await expect(body.first).to_contain_text("n0100")
    await number.fill("999")
    await number.press("Enter")
    await expect(pager).to_contain_text("251\u2013260 of 260")
    await page.click("text=« first")
    await expect(pager).to_contain_text("1\u201350 of 260")
    await expect(body.first).to_contain_text("n0000")
    # Sorted the other way, the last page holds the first MACs.
    await page.click("th button:text('Hostname')")
    await page.click("th button:text('Hostname')")  # descending
    await page.click("text=last »")
    await expect(body.last).to_contain_text("n0000")
    await shots(page, "last-page-descending")


async def test_an_approval_says_where_it_goes_and_a_renamed_node_shows_the_name_it_runs(
        make_env: EnvFactory, browser: Browser, shots: Any) -> None:
    """The dashboard's approval said "52:54:… approved" and nothing of the cluster, role and
    next boot its group gives it, which `netboot machines approve` says (s47-review); a
    machine renamed after its install showed the new name alone, while its OS and k3s node
    keep the one it installed with (the CLI and the API's PATCH say so; s48-review)."""
    env = await make_env(HOLD)
    await env.seed()
    mac = "52:54:00:aa:00:31"
    await boot(env, mac.replace(":", "-"), serial="SN-31")
    page = await logged_in(browser, env, shots)
    await page.click("nav a[data-nav=discovered]")
    form = page.locator("form.approve").first
    await form.locator("input[name=hostname]").fill("rack3-a")
    await form.locator("button[type=submit]").click()  # the group all-x86 gives the rest
    await expect(page.locator("#notice")).to_contain_text(
        f"{mac} approved as rack3-a: cluster edge as agent; its next network boot: install "
        "(enrolled: install profile k3os (group all-x86))")
    await shots(page, "approved")

    token = install_token(await boot(env, mac.replace(":", "-"), serial="SN-31"))
    await env.post("/api/v1/register", {"mac": mac, "token": token, "hostname": "rack3-a",
                                        "node_name": "rack3-a"}, status=200, headers={})
    await env.service.boot.drain()
    made = await env.get(f"/api/v1/machines/{mac}")
    await page.goto(url(env, f"/#/machine/{made['id']}"))
    await expect(page.locator("h1")).to_contain_text("rack3-a")
    await expect(page.locator(".runs-as")).to_have_count(0)  # runs as it is named
    r = await call(env, "PATCH", f"/api/v1/machines/{mac}", json_body={"hostname": "rack3-b"})
    assert r.status == 200 and r.json()["warnings"], r.text
    await page.reload()
    await expect(page.locator(".runs-as")).to_have_text(
        "rack3-a: its installed OS and k3s node keep that name until it installs again "
        "(Reinstall)")
    await shots(page, "renamed-installed")
