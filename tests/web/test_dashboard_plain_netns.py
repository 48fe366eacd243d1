"""The dashboard over plain HTTP from another host: chromium and netboot in a network
namespace this test creates (tests.netns), the page at ``http://192.0.2.1:<port>/``.

Loopback (127.0.0.0/8, ``localhost``) is "potentially trustworthy" to a browser, so the
loopback tests of test_dashboard_browser.py run in a secure context, where Web Locks exist.
An operator who opens the dashboard by the server's address over plain HTTP
(``http.plain_api: allow``: an isolated provisioning network) is not in one: no Web Locks,
and each tab held its own event stream, one of chromium's six HTTP/1.1 connections to the
server, until the seventh tab loaded nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import async_playwright, expect

from netboot.config import load
from netboot.service import build
from tests.conftest import write_config
from tests.netns import in_namespace
from tests.web.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

SERVER = "192.0.2.1"
TABS = 8  # machine tabs, besides the list's: nine in all


@pytest.mark.parametrize("way", ["shared-worker", "neither"])
def test_nine_tabs_over_plain_http_from_another_host_are_all_live_on_one_stream(
        namespace: str, tmp_path: Path, way: str) -> None:
    """Nine tabs of one browser at http://192.0.2.1 (no secure context: no Web Locks): every
    tab loads and follows a device live, on one event stream for the browser (held by a
    SharedWorker), and still after the tab that opened it closes. A browser without
    SharedWorker there ("neither") still works, a stream a tab: four tabs, under the six
    connections chromium allows a host."""
    tabs_opened = TABS if way == "shared-worker" else 3

    async def scenario() -> dict[str, Any]:
        cfg = load(write_config(tmp_path, http="  plain_api: allow\n"), env={})
        service = await build(cfg)
        await service.start()
        out: dict[str, Any] = {}
        try:
            admin = (cfg.data_dir / "admin.token").read_text().strip()
            base = f"http://{SERVER}:{service.http_port}"
            bearer = {"Authorization": f"Bearer {admin}"}
            async with aiohttp.ClientSession(base_url=base) as http:
                for path, body in (
                        ("/api/v1/clusters", {"name": "edge", "token": "k3s-secret-token",
                                              "server_url": "https://192.0.2.50:6443"}),
                        ("/api/v1/profiles", {"name": "k3os", "kernel": "vmlinuz",
                                              "initrds": ["initrd.img"],
                                              "config_template": "k3os"}),
                        ("/api/v1/machines:bulk", {"machines": [
                            {"mac": f"52:54:00:dd:00:{i:02x}", "hostname": f"t{i:02d}",
                             "cluster": "edge", "role": "agent", "profile": "k3os"}
                            for i in range(TABS)]})):
                    async with http.post(path, json=body, headers=bearer) as resp:
                        assert resp.status == 201, await resp.text()

                async def boot(mac: str) -> None:
                    async with http.get(f"/ipxe?mac={mac}&arch=x86_64") as resp:
                        assert resp.status == 200 and (await resp.text()).startswith("#!ipxe")

                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=CHROMIUM,
                                                       args=CHROMIUM_ARGS)
                    try:
                        context = await browser.new_context()
                        if way == "neither":
                            await context.add_init_script("delete window.SharedWorker;")
                        first = await context.new_page()
                        first.set_default_timeout(TIMEOUT_MS)
                        await first.goto(f"{base}/login")
                        await first.fill("#token", admin)
                        await first.click("button[type=submit]")
                        await expect(first).to_have_url(f"{base}/")
                        await expect(first.locator("#live")).to_have_text("live")
                        # Really the case: no secure context, so no Web Locks.
                        out["secure"] = await first.evaluate(
                            "[window.isSecureContext, 'locks' in navigator]")
                        tabs = [first]
                        for i in range(TABS - tabs_opened, TABS):
                            tab = await context.new_page()
                            tab.set_default_timeout(TIMEOUT_MS)
                            await tab.goto(f"{base}/#/machine/52:54:00:dd:00:{i:02x}")
                            tabs.append(tab)
                        for i, tab in enumerate(tabs[1:], TABS - tabs_opened):
                            await expect(tab.locator("h1")).to_contain_text(f"t{i:02d}")
                        for tab in tabs:
                            await expect(tab.locator("#live")).to_have_text("live")
                        out["streams"] = service.events.subscribers
                        await boot("52-54-00-dd-00-07")
                        row = first.locator("table.machines tbody tr", has_text="t07")
                        await expect(row).to_contain_text("booting")
                        await expect(tabs[-1].locator("h1")).to_contain_text("booting")
                        await expect(tabs[-1].locator("ol.timeline")).to_contain_text(
                            "install-plan")
                        # The tab that opened the stream closes: the others still follow.
                        await first.close()
                        await boot("52-54-00-dd-00-06")
                        await expect(tabs[-2].locator("h1")).to_contain_text("booting")
                        out["streams_after"] = service.events.subscribers
                    finally:
                        await browser.close()
        finally:
            await service.close()
        return out

    out = in_namespace(namespace, scenario, seconds=150)
    assert out["secure"] == [False, False]
    if way == "shared-worker":
        # One stream for the nine tabs (main: one a tab, and the seventh never loaded).
        assert out["streams"] == 1 and out["streams_after"] == 1
    else:  # a stream a tab
        assert out["streams"] == tabs_opened + 1
