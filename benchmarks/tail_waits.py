"""What a storm's tail commits waited for: the files benchmarks/tailwaits writes (s39-tail).

    TAILWAITS=tailwaits storm.py --keep --only netboot --python benchmarks/tailwaits/python ...
    tail_waits.py [--window 3] /tmp/netboot-storm-XXXX/run-*/tailwaits.*.json

For each ``Recorder.commit`` that returned in the last ``--window`` seconds of the storm
(a config fetch, an installer's event, a registration: each answered once durable), its time
split at its group's write: waiting for that write to begin (the group before it, and the
loop turns between), the write's loop side before the writer thread takes it (the batch
merged, events and tokens encoded, the hand-over), the writer thread (wall and CPU), back to
the loop (the thread's answer, two loop turns), and to its caller; p50 and mean. Then the
groups' sizes, the notes and facts queued when each began (background work a commit could
queue behind), checkpoints in the window, and the loop thread's CPU and its time runnable
but not running (schedstat) over the window: whether the tail is the server's work or its
wait for a CPU. Not part of pytest.
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
from pathlib import Path
from typing import Any

PARTS = ("to its write", "write's loop side", "writer wall", "writer CPU", "back to loop",
         "to its caller", "total")


def summary(path: Path, window: float) -> str:
    found: dict[str, list[Any]] = json.loads(path.read_text())
    commits = found["commits"]
    if not commits:
        return f"{path}: no commits"
    writes = sorted(w for w in found["writes"] if w[2] == 1)
    applies = sorted(found["applies"])
    starts, applied = [w[0] for w in writes], [a[0] for a in applies]
    end = max(c[1] for c in commits)
    since = end - window * 1e9
    rows = []
    for c in commits:
        i = bisect.bisect_left(starts, c[0])  # its group's write begins after it asked
        if c[1] < since or i >= len(writes):
            continue
        w = writes[i]
        j = bisect.bisect_left(applied, w[0])
        if j >= len(applies) or applies[j][0] > w[1]:
            continue
        a = applies[j]
        rows.append((w[0] - c[0], a[0] - w[0], a[1] - a[0], a[2], w[1] - a[1], c[1] - w[1],
                     c[1] - c[0]))
    lines = [f"{path}: {len(rows)} commits in the last {window:g} s"]
    for k, name in enumerate(PARTS):
        values = sorted(r[k] for r in rows)
        if values:
            lines.append(f"  {name:18s} p50 {values[len(values) // 2] / 1e6:7.1f} ms, "
                         f"mean {statistics.mean(values) / 1e6:7.1f} ms")
    late = [w for w in found["writes"] if w[1] > since]
    sizes = sorted(w[3] for w in late if w[2] == 1)
    if sizes:
        lines.append(f"  group commits {len(sizes)}, commits each p50 {sizes[len(sizes) // 2]}"
                     f" max {sizes[-1]}; background flushes {sum(w[2] == 0 for w in late)}; "
                     f"notes queued as a write began max {max(w[4] for w in late)}, "
                     f"facts max {max(w[5] for w in late)}; checkpoints "
                     f"{sum(c[1] > since for c in found['checkpoints'])}")
    marks = sorted((c[1], *c[4:]) for c in commits if c[1] > since)
    if len(marks) > 1 and len(marks[0]) >= 5:
        (t0, *first), (t1, *last) = marks[0], marks[-1]
        wall = (t1 - t0) / 1e9
        line = (f"  over {wall:.2f} s: loop thread CPU {(last[0] - first[0]) / 1e9:.2f} s, "
                f"process CPU {(last[1] - first[1]) / 1e9:.2f} s")
        if len(first) >= 4:
            line += f", loop runnable but not running {(last[3] - first[3]) / 1e9:.2f} s"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="tailwaits.PID.json files")
    parser.add_argument("--window", type=float, default=3.0,
                        help="seconds before the last commit's return (default 3)")
    args = parser.parse_args()
    for path in args.files:
        print(summary(path, args.window))


if __name__ == "__main__":
    main()
