"""Where a storm's server CPU went, by thread, and what the cyclic collector cost it: the
files benchmarks/threadprobe writes, summed over each storm (s36-storm).

    THREADPROBE=probe storm.py --keep --only netboot --python benchmarks/threadprobe/python ...
    storm_threads.py /tmp/netboot-storm-XXXX/run-*

The storm is from its start (the generator's ``t0_wall``, slow.json) to a second after the
last register netboot logged; per thread: CPU (schedstat), user and system seconds, read and
write calls and bytes (a SQLite thread's page reads are its reads: 4 KiB each); per
generation and thread: collections, their thread CPU (total, longest) and, probed with
THREADPROBE_WALK=1, the objects they walked; each full collection with who started it.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

FIELDS = 7  # run ns, syscr, syscw, rchar, wchar, user ticks, system ticks
TICK = 100  # /proc's clock ticks a second (USER_HZ)


def window(run: Path) -> tuple[float, float]:
    t0 = float(json.loads((run / "slow.json").read_text())["t0_wall"])
    last = None
    for line in (run / "netboot.log").read_text(errors="replace").splitlines():
        if "POST /api/v1/register" in line:
            last = line[:19]
    if last is None:
        raise SystemExit(f"{run}: no register in netboot.log")
    return t0, time.mktime(time.strptime(last, "%Y-%m-%d %H:%M:%S")) + 1.0  # local time


def nearest(series: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return min(series, key=lambda row: abs(row["t"] - t))


def report(run: Path) -> None:
    probes = sorted(run.glob("probe.*.json"))
    if not probes:
        print(f"{run}: no probe file (THREADPROBE unset?)")
        return
    data = json.loads(probes[0].read_text())
    t0, end = window(run)
    first, last = nearest(data["series"], t0), nearest(data["series"], end)
    threads: dict[str, list[int]] = defaultdict(lambda: [0] * FIELDS)
    for key, now in last.items():
        if not isinstance(now, list) or len(now) < FIELDS:
            continue  # the time
        before = first.get(key, [0] * FIELDS)
        name = re.sub(r"(_\d+)?/\d+$", "", key)  # a pool's threads and ids summed
        for i in range(FIELDS):
            threads[name][i] += now[i] - before[i]
    print(f"== {run}: storm {last['t'] - first['t']:.1f} s")
    total = 0
    for name, v in sorted(threads.items(), key=lambda kv: -kv[1][0]):
        if name == "threadprobe":  # the probe's own sampling: not the server's
            print(f"  ({name}: CPU {v[0] / 1e9:.3f} s, not counted)")
            continue
        total += v[0]
        if v[0] >= 1e6:
            print(f"  {name:<20} CPU {v[0] / 1e9:6.3f} s (user {v[5] / TICK:5.2f}, system "
                  f"{v[6] / TICK:5.2f}); reads {v[1]:>7} {v[3] / 1e6:8.1f} MB, writes {v[2]:>7} "
                  f"{v[4] / 1e6:8.1f} MB")
    print(f"  {'all':<20} CPU {total / 1e9:6.3f} s")
    gens: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])
    for when, generation, _wall, _found, thread, cpu, walked, where in data["gc"]:
        if not t0 <= when <= end:
            continue
        g = gens[(generation, re.sub(r"_\d+$", "", thread))]
        g[0] += 1
        g[1] += cpu
        g[2] = max(g[2], cpu)
        g[3] += walked
        if generation == 2:
            print(f"  full collection at {when - t0:5.1f} s: CPU {cpu * 1e3:.1f} ms"
                  + (f", walked {walked}" if walked >= 0 else "") + f", from {where}")
    for (generation, thread), (n, cpu, longest, walked) in sorted(gens.items()):
        print(f"  generation {generation} on {thread:<20} {int(n):>4} collections, CPU "
              f"{cpu * 1e3:7.1f} ms (longest {longest * 1e3:5.1f})"
              + (f", walked {int(walked)}" if walked >= 0 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="storm.py's kept run dirs")
    for run in parser.parse_args().runs:
        report(run)


if __name__ == "__main__":
    main()
