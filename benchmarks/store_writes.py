"""What a boot storm's machine writes cost the SQLite store: CPU per machine update.

    python benchmarks/store_writes.py [--machines 20000] [--updates 3000] [--group 16]
                                      [--runs 2] [--compare /path/to/other/checkout] [--view]

A storm updates each machine four or five times (install plan, config fetched, installing,
installed, registered), each with its event, in group commits of a few machines. This fills
a fresh SQLite inventory with ``--machines`` (two labels, a MAC and a serial each), then
moves ``--updates`` random ones through three states, ``--group`` machines and their events
per transaction, and prints the process's CPU seconds for those updates (user + system; the
comparable figure on a shared machine), the wall time, and each transaction's wall time
(p50/p99/max: what the answers of a group commit wait for). With ``--compare`` the other
checkout runs alternately in the same session (PYTHONPATH), and the ratio is printed.
``--view``: an inventory view, loaded first, syncs after every transaction, as ``netboot
serve``'s does after each group commit; the CPU of those syncs is printed apart (what the
view costs to follow the process's own writes).
Files in a temporary directory, removed at the end. Not part of pytest; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, dataclasses, json, os, random, sys, time
from netboot.inventory.base import Batch
from netboot.inventory.sqlite import SqliteStore
from netboot.inventory.view import InventoryView
from netboot.model import Event, MacAddress, Machine, MachineState

machines, updates, group, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
follow = sys.argv[5] == "view"

async def main():
    store = SqliteStore(path)
    await store.open()
    fleet = [Machine(macs=(MacAddress.parse("02:00:00:%02x:%02x:%02x"
                                            % (i >> 16, (i >> 8) & 255, i & 255)),),
                     hostname=f"edge-{i}", serial=f"SN{i:07d}",
                     labels={"rack": str(i % 40), "site": "a"}) for i in range(machines)]
    await store.apply_batch(Batch(create=fleet))
    view = InventoryView(store)
    if follow:
        await view.load()
    current = random.Random(7).sample(fleet, updates)
    synced = 0.0
    waits = []  # each transaction's wall time: what the answers of a group commit wait for
    cpu, wall = time.process_time(), time.perf_counter()
    for state in (MachineState.BOOTING, MachineState.INSTALLING, MachineState.INSTALLED):
        moved = [dataclasses.replace(m, state=state, updated=time.time()) for m in current]
        for i in range(0, len(moved), group):
            part = moved[i:i + group]
            began = time.perf_counter()
            await store.apply_batch(Batch(
                update=tuple(part), events=tuple(Event(m.id, time.time(), str(state))
                                                 for m in part)))
            waits.append(time.perf_counter() - began)
            if follow:
                began = time.process_time()
                await view.sync()
                synced += time.process_time() - began
        current = moved
    waits.sort()
    print(json.dumps({"cpu": time.process_time() - cpu - synced,
                      "wall": time.perf_counter() - wall, "sync": synced,
                      "p50": waits[len(waits) // 2], "p99": waits[len(waits) * 99 // 100],
                      "max": waits[-1]}))
    await store.close()

asyncio.run(main())
"""


def run(checkout: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="netboot-store-writes-") as tmp:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.machines), str(args.updates),
             str(args.group), str(Path(tmp) / "netboot.db"), "view" if args.view else "-"],
            # cwd: ``-c`` puts the working directory first on sys.path, before PYTHONPATH.
            cwd=tmp, env={**os.environ, "PYTHONPATH": str(checkout)}, check=True,
            capture_output=True, text=True, timeout=1200)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=20_000)
    parser.add_argument("--updates", type=int, default=3_000)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--compare", type=Path, help="another checkout, run alternately")
    parser.add_argument("--view", action="store_true",
                        help="a loaded inventory view syncs after each transaction")
    args = parser.parse_args()
    targets = [("this checkout", REPO)] + ([("compared", args.compare)] if args.compare else [])
    got: dict[str, list[dict[str, float]]] = {name: [] for name, _ in targets}
    for _ in range(args.runs):
        for name, checkout in targets:
            got[name].append(run(checkout, args))
    n = 3 * args.updates
    print(f"{n} machine updates ({args.updates} of {args.machines} machines, three states), "
          f"{args.group} per transaction, each with its event; load average "
          f"{os.getloadavg()[0]:.1f}")
    medians = {}
    for name, results in got.items():
        cpu = statistics.median(r["cpu"] for r in results)
        wall = statistics.median(r["wall"] for r in results)
        waits = "/".join(f"{statistics.median(r[k] for r in results) * 1e3:.1f}"
                         for k in ("p50", "p99", "max"))
        sync = statistics.median(r["sync"] for r in results)
        medians[name] = cpu
        medians[name + " sync"] = sync
        print(f"{name:<14} CPU {cpu:6.2f} s ({cpu / n * 1e6:5.0f} µs per update)  "
              f"wall {wall:6.2f} s  transaction p50/p99/max {waits} ms   runs: "
              + ", ".join(f"{r['cpu']:.2f}" for r in results)
              + (f"\n{'':<14} view syncs {sync:6.2f} s CPU ({sync / n * 1e6:5.0f} µs per "
                 "update)" if args.view else ""))
    if args.compare:
        print(f"this ÷ compared, CPU: {medians['this checkout'] / medians['compared']:.2f}x"
              + (f", view syncs: {medians['this checkout sync'] / medians['compared sync']:.2f}x"
                 if args.view else ""))


if __name__ == "__main__":
    main()
