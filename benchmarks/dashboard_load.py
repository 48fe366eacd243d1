"""The operator's view with a fleet in the inventory: the dashboard in a real browser and
``/metrics`` as Prometheus scrapes it.

    python benchmarks/dashboard_load.py --seed DIR [--tree A --tree B] [--runs 2]

``--seed`` is a data dir with the fleet imported (``netboot import``, e.g. 100,000 machines
in 8 clusters as benchmarks/storm.py makes them). For each tree (alternating): ``netboot serve``
on a copy of it (loopback HTTP only), then Debian's chromium (Playwright, as
tests/web/test_dashboard_browser.py drives it) logs in and opens each view: machines (the
first load), a search by MAC, by hostname and by label, the clusters view, the discovered
queue. For each: the bytes the page fetched (response bodies), the time until it showed
what it asks for, and the page's JavaScript heap; then 20 scrapes of /metrics: bytes and the
server's CPU per scrape.

Loopback only; the server is ended by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from sse_fanout import REPO, cpu_seconds, start, stop  # this script's folder is on sys.path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


async def browse(port: int, token: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(120_000)
            fetched = [0]

            async def on_response(resp: Any) -> None:
                with contextlib.suppress(Exception):  # a stream, a redirect: no body
                    fetched[0] += len(await resp.body())
            page.on("response", lambda r: asyncio.ensure_future(on_response(r)))
            cdp = await page.context.new_cdp_session(page)
            await cdp.send("Performance.enable")

            async def heap() -> float:
                await cdp.send("HeapProfiler.collectGarbage")
                metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
                return next(m["value"] for m in metrics if m["name"] == "JSHeapUsedSize") / 2**20

            async def step(name: str, action: Any, ready: Any) -> None:
                await asyncio.sleep(1.0)  # what the previous step fetched is counted
                fetched[0] = 0
                t0 = time.perf_counter()
                await action()
                await ready()
                seconds = time.perf_counter() - t0
                await asyncio.sleep(1.0)
                out[name] = {"seconds": round(seconds, 3), "KiB": round(fetched[0] / 1024, 1),
                             "heap MiB": round(await heap(), 1)}
                print(f"  {name}: {out[name]}", flush=True)

            await page.goto(f"{base}/login")
            await page.fill("#token", token)
            rows = page.locator("table.machines tbody tr")

            async def login() -> None:
                await page.click("button[type=submit]")

            async def first_page() -> None:
                await rows.nth(49).wait_for()
                await page.locator(".pager").get_by_text("of ").wait_for()
            await step("first load", login, first_page)

            fleet = await page.locator(".pager span").inner_text()  # "1-50 of N": all

            async def search(text: str, found: int) -> Any:
                async def act() -> None:
                    await page.fill("input[type=search]", "")  # back to the whole fleet
                    await page.locator(".pager span", has_text=fleet).wait_for()
                    await page.fill("input[type=search]", text)

                async def done() -> None:
                    # The answer is in: the pager no longer counts the whole fleet (a search
                    # the tree does not understand shows "0 machines").
                    await page.wait_for_function(
                        "fleet => document.querySelector('.pager span').textContent !== fleet",
                        arg=fleet)
                    shown = await page.locator(".pager span").inner_text()
                    print(f"  {text!r}: {shown} (expected {found})", flush=True)
                return act, done
            await step("search MAC", *(await search("52:54:00:01:86:9f", 1)))
            await step("search hostname", *(await search("edge-099999", 1)))
            await step("search label", *(await search("rack=r2499", 40)))

            async def clusters() -> None:
                await page.click("nav a[data-nav=clusters]")

            async def clusters_shown() -> None:
                await page.locator("section.cluster").nth(7).wait_for()
                await page.locator("section.cluster table tbody tr").first.wait_for()
            await step("clusters view", clusters, clusters_shown)

            async def discovered() -> None:
                await page.click("nav a[data-nav=discovered]")

            async def discovered_shown() -> None:
                await page.get_by_text("No machine is waiting").wait_for()
            await step("discovered view", discovered, discovered_shown)
        finally:
            await browser.close()
    return out


def scrapes(pid: int, port: int, n: int = 20) -> dict[str, float]:
    sizes = []
    cpu0 = cpu_seconds(pid)
    for _ in range(n):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            body = r.read()
        sizes.append(len(body))
    cpu = cpu_seconds(pid) - cpu0
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    return {"bytes": sizes[-1], "series": series, "ms CPU a scrape": round(cpu / n * 1000, 2)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=Path, required=True)
    parser.add_argument("--tree", type=Path, action="append")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    trees = args.tree or [REPO]
    for run in range(args.runs):
        for tree in trees if run % 2 == 0 else list(reversed(trees)):
            with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp:
                proc, port, token = start(tree, Path(tmp), args.python, args.seed)
                time.sleep(3)  # the view's load, begun at start
                try:
                    print(f"run {run + 1} {tree}:", flush=True)
                    await browse(port, token)
                    print(f"  /metrics: {scrapes(proc.pid, port)}", flush=True)
                    rss = int(Path(f"/proc/{proc.pid}/status").read_text().split(
                        "VmRSS:")[1].split()[0]) / 1024
                    print(f"  server RSS after: {rss:.1f} MiB", flush=True)
                finally:
                    stop(proc)


if __name__ == "__main__":
    asyncio.run(main())
