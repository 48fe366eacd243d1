"""What open dashboards cost the server while a storm of installs runs: server CPU per event
with 0, 1 and 5 dashboards open (real chromium tabs, each its own operator's session).

    python benchmarks/dashboard_storm.py --make-seed DIR [--machines 100000]
    python benchmarks/dashboard_storm.py --seed DIR [--tree A --tree B] [--tabs 0,1,5]
                                         [--devices 1000] [--runs 1]

``--make-seed`` enrolls the fleet in DIR with ``netboot import`` (8 clusters, one profile,
as benchmarks/storm.py seeds it). Then, for each tree and each number of tabs (the trees
alternating, the order reversed each run): ``netboot serve`` on loopback HTTP on a copy of
the seed (sse_fanout.start), that many chromium pages (Playwright, Debian's chromium, one
browser each: five operators, not five tabs of one browser; ``--same-browser``: tabs of one
browser, sharing its session and, on this branch, its event stream) logged in on the
machines view, and ``--devices`` machines of the fleet installed over the HTTP boot path as
a device does it (GET /ipxe, the config, the installer's two reports, the registration; no
kernel or initrd bytes, which no dashboard sees), 100 at a time. Reported: the events the
storm wrote, the server's CPU (utime + stime from /proc) from the storm's start until it is
idle again (its CPU under 5 % of a core for 1 s, at most 60 s), that per event, the API
requests the tabs made meanwhile by kind (``--streams N``: N raw readers of the event
stream too, their messages and reads), each tab's main-thread busy time (CDP's
TaskDuration) and JavaScript heap after a GC.

Loopback only; every process started here is ended by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dashboard_load import CHROMIUM, CHROMIUM_ARGS  # this script's folder is on sys.path
from sse_fanout import REPO, Reader, cpu_seconds, read_stream, start, stop

CLUSTERS = 8


def mac_of(i: int) -> str:
    return (0x02_00_00_00_00_00 + i).to_bytes(6, "big").hex(":")


def make_seed(seed: Path, machines: int, python: str) -> None:
    seed.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> None:
        subprocess.run([python, "-m", "netboot", *args, "--data-dir", str(seed)], check=True,
                       capture_output=True, timeout=1200, env=env, cwd=seed.parent)

    for c in range(CLUSTERS):
        cli("clusters", "add", f"line-{c}", "--server-url", f"https://192.0.2.{200 + c}:6443",
            "--token", f"storm-{c}")
    cli("profiles", "add", "storm", "--kernel", "storm/vmlinuz", "--initrd", "storm/initrd")
    rows = ["mac,hostname,serial,cluster,role,profile,label.rack"]
    rows += [f"{mac_of(i)},edge-{i:06d},SN{i:07d},line-{i % CLUSTERS},agent,storm,r{i // 40}"
             for i in range(machines)]
    csv = seed.parent / f"{seed.name}.csv"
    csv.write_text("\n".join(rows) + "\n")
    t0 = time.perf_counter()
    cli("import", str(csv))
    print(f"seeded {machines} machines in {time.perf_counter() - t0:.1f} s", flush=True)


def family_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (chromium's renderers)."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


async def device(http: Any, base: str, i: int, k: int) -> int:
    """One machine's install over HTTP, as benchmarks/storm.py's devices make it; the
    events it writes (install-plan, config, installing, installed, registered)."""
    mac = mac_of(i)
    hexhyp = mac.replace(":", "-")
    async with http.get(f"{base}/ipxe?mac={hexhyp}&arch=x86_64&platform=efi") as r:
        script = await r.text()
    config = re.search(r"config_url=(\S+)", script)
    token = re.search(r"[?&]token=([^\s&]+)", config.group(1)) if config else None
    if not (config and token):
        raise RuntimeError(f"no install for {mac}: {script[:200]!r}")
    async with http.get(config.group(1)) as r:
        await r.read()
    tok = token.group(1)
    auth = {"Authorization": f"Bearer {tok}"}
    for kind in ("installing", "installed"):
        async with http.post(f"{base}/api/v1/machines/{hexhyp}/events",
                             json={"kind": kind, "message": "storm"}, headers=auth) as r:
            if r.status != 201:
                raise RuntimeError(f"{kind} {r.status}: {await r.text()}")
    async with http.post(f"{base}/api/v1/register", json={
            "mac": mac, "token": tok, "hostname": f"edge-{i:06d}",
            "addresses": [f"198.51.100.{k % 250 + 1}"], "machine_id": f"{i:032x}",
            "keeps": "machine_token", "install_secret": f"{i:08x}-0000-4000-8000-000000000000",
            "node_name": f"edge-{i:06d}"}, headers=auth) as r:
        if r.status != 200:
            raise RuntimeError(f"register {r.status}: {await r.text()}")
    return 5


async def storm(base: str, devices: int, spread: int) -> tuple[int, float]:
    import aiohttp

    sem = asyncio.Semaphore(100)
    written = 0

    async def one(k: int) -> None:
        nonlocal written
        async with sem:
            n = await device(http, base, k * spread, k)  # read written after the await
            written += n

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(one(k) for k in range(devices)))
    return written, time.perf_counter() - t0


async def idle(pid: int, limit: float = 60.0) -> None:
    """Until the server's CPU is under 5 % of a core for 1 s (at most ``limit`` s)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        c0 = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        if cpu_seconds(pid) - c0 < 0.05:
            return


async def one(tree: Path, tabs: int, args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    with tempfile.TemporaryDirectory(prefix="dashboard-storm-") as tmp:
        work = Path(tmp)
        (work / "storm").mkdir()
        (work / "storm" / "vmlinuz").write_bytes(b"\x00" * 4096)
        (work / "storm" / "initrd").write_bytes(b"\x00" * 4096)
        proc, port, token = start(tree, work, args.python, args.seed)
        base = f"http://127.0.0.1:{port}"
        try:
            await idle(proc.pid)  # the view's load, begun at start
            async with async_playwright() as pw:
                browsers = []
                pages = []
                asked = [0]
                kinds: dict[str, int] = {}

                def count(url: str) -> None:
                    if "/api/v1/" not in url or "stream" in url:
                        return
                    asked[0] += 1
                    path = url.split("/api/v1/", 1)[1]
                    kind = ("discovered count" if "state=discovered&limit=1" in path
                            else path.split("?")[0])
                    kinds[kind] = kinds.get(kind, 0) + 1
                shared = None  # --same-browser: the tabs of one browser, one session
                for n in range(tabs):
                    if shared is None:
                        browser = await pw.chromium.launch(executable_path=CHROMIUM,
                                                           args=CHROMIUM_ARGS)
                        browsers.append(browser)
                        context = await browser.new_context(
                            viewport={"width": 1360, "height": 900})
                        if args.same_browser:
                            shared = context
                    page = await (shared or context).new_page()
                    page.set_default_timeout(120_000)
                    if n == 0 or not args.same_browser:
                        await page.goto(f"{base}/login")
                        await page.fill("#token", token)
                        await page.click("button[type=submit]")
                    else:
                        await page.goto(f"{base}/")
                    await page.locator("table.machines tbody tr").nth(49).wait_for()
                    await page.locator("#live.on").wait_for()
                    page.on("request", lambda r: count(r.url))
                    pages.append(page)
                readers = [Reader() for _ in range(args.streams)]
                readies = [asyncio.Event() for _ in readers]
                ended = asyncio.Event()
                streams = [asyncio.ensure_future(read_stream(port, token, rd, ev, 10**9, ended))
                           for rd, ev in zip(readers, readies, strict=True)]
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
                await idle(proc.pid)
                cdps = []
                for page in pages:
                    cdp = await page.context.new_cdp_session(page)
                    await cdp.send("Performance.enable")
                    cdps.append(cdp)

                async def metric(cdp: Any, name: str) -> float:
                    metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
                    return float(next(m["value"] for m in metrics if m["name"] == name))
                busy0 = [await metric(c, "TaskDuration") for c in cdps]
                asked[0] = 0
                kinds.clear()
                cpu0 = cpu_seconds(proc.pid)
                wall0 = time.monotonic()
                written, storm_s = await storm(base, args.devices,
                                               max(1, args.machines // args.devices))
                await idle(proc.pid)
                cpu = cpu_seconds(proc.pid) - cpu0
                ended.set()
                await asyncio.gather(*streams)
                wall = time.monotonic() - wall0
                busy = [await metric(c, "TaskDuration") - b
                        for c, b in zip(cdps, busy0, strict=True)]
                heaps = []
                for cdp in cdps:
                    await cdp.send("HeapProfiler.collectGarbage")
                    heaps.append(await metric(cdp, "JSHeapUsedSize") / 2**20)
                shown = [await p.locator(".pager span").inner_text() for p in pages]
                for b in browsers:
                    await b.close()
            return {"tabs": tabs, "events": written, "storm s": round(storm_s, 1),
                    "server CPU s": round(cpu, 2), "wall s": round(wall, 1),
                    "us CPU an event": round(cpu / max(written, 1) * 1e6),
                    "API requests by the tabs": asked[0], "by kind": dict(kinds),
                    "same browser": args.same_browser, "streams": args.streams,
                    "stream messages": sum(r.messages for r in readers),
                    "stream reads": sum(r.reads for r in readers),
                    "tab busy s": [round(b, 2) for b in busy],
                    "tab heap MiB": [round(h, 1) for h in heaps], "pager": shown[:1]}
        finally:
            stop(proc)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-seed", type=Path)
    parser.add_argument("--seed", type=Path)
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--tabs", default="0,1,5")
    parser.add_argument("--same-browser", action="store_true",
                        help="the tabs in one browser (one session), not one browser each")
    parser.add_argument("--streams", type=int, default=0,
                        help="raw readers of the event stream besides the tabs (sse_fanout's)")
    parser.add_argument("--tree", type=Path, action="append")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    if args.make_seed:
        make_seed(args.make_seed, args.machines, args.python)
        return
    if args.seed is None:
        parser.error("--seed or --make-seed")
    trees = args.tree or [REPO]
    for run in range(args.runs):
        for tabs in (int(t) for t in args.tabs.split(",")):
            for tree in trees if run % 2 == 0 else list(reversed(trees)):
                r = await one(tree, tabs, args)
                print(f"run {run + 1} {tree} {json.dumps(r)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
