"""What a first install or config fetch waited for, on the wire: ``netboot serve`` with
timestamps of every request and of what may stall one (for a boot storm's p99).

    python benchmarks/tail_marks.py --marks OUT serve --config netboot.yaml   # then run wrk
    python benchmarks/tail_marks.py --stats OUT [OUT ...]

The first form runs ``python -m netboot`` with, in the process, a mark (monotonic ns, into
an array: no tracked objects, so the marks themselves bring no collections) at each
``DeviceRoutes._ipxe`` / ``_config`` (a request's time in its handler), each write and read
of the SQLite store's threads, each pass of the WAL's checkpointer, each of the writer's
own catch-up checkpoints (``SqliteStore._checkpoint_here``), each group commit
(``Recorder._write``, with its size) and each collection of the cyclic GC (generation);
they are written to OUT when serve exits (SIGTERM). The second prints, per file, the
requests' p50 and p99 in the handler, and the share of requests whose time in the handler
overlapped a writer's catch-up or a full collection (over 1 %, such stalls set the p99).
Diagnosis only: the wrappers cost the loop a few µs a request. Not part of pytest.
"""

from __future__ import annotations

import argparse
import array
import atexit
import functools
import gc
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = ("ipxe", "config", "write", "read", "ckpt", "ckpt_writer", "group", "gc0", "gc1",
         "gc2")


def install(out: str) -> None:
    from netboot.inventory import sqlite
    from netboot.recorder import Recorder
    from netboot.servers.http import DeviceRoutes

    marks = array.array("q")  # begin ns, kind, duration ns, detail
    ns = time.perf_counter_ns
    code = {k: i for i, k in enumerate(KINDS)}
    began: dict[int, int] = {}

    def collected(phase: str, info: dict[str, int]) -> None:
        g = info["generation"]
        if phase == "start":
            began[g] = ns()
        elif g in began:
            t = began.pop(g)
            # detail: the objects the collection found unreachable and freed
            marks.extend((t, code[f"gc{g}"], ns() - t, info["collected"]))

    gc.callbacks.append(collected)

    def timed(cls: Any, name: str, kind: str, detail: Callable[..., int] | None = None
              ) -> None:
        f = getattr(cls, name)

        @functools.wraps(f)
        def sync(*a: Any, **k: Any) -> Any:
            t = ns()
            try:
                return f(*a, **k)
            finally:
                marks.extend((t, code[kind], ns() - t, 0))

        @functools.wraps(f)
        async def coro(*a: Any, **k: Any) -> Any:
            t = ns()
            try:
                return await f(*a, **k)
            finally:
                marks.extend((t, code[kind], ns() - t, detail(a, k) if detail else 0))

        import inspect
        setattr(cls, name, coro if inspect.iscoroutinefunction(f) else sync)

    guard = sqlite.SqliteStore._guard

    def guarded(self: Any, fn: Any, args: Any, reader: bool) -> Any:
        t = ns()
        try:
            return guard(self, fn, args, reader)
        finally:
            marks.extend((t, code["read" if reader else "write"], ns() - t, 0))

    sqlite.SqliteStore._guard = guarded  # type: ignore[method-assign]
    timed(sqlite.SqliteStore, "_checkpoint", "ckpt")
    timed(sqlite.SqliteStore, "_checkpoint_here", "ckpt_writer")
    timed(Recorder, "_write", "group", lambda a, k: len(k.get("commits", ())))
    timed(DeviceRoutes, "_ipxe", "ipxe")
    timed(DeviceRoutes, "_config", "config")

    def dump() -> None:
        with open(out, "w") as fh:
            for i in range(0, len(marks), 4):
                t, c, d, x = marks[i:i + 4]
                fh.write(f"{t} {KINDS[c]} {d} {x}\n")

    atexit.register(dump)


def stats(path: str) -> str:
    marks = sorted((int(t), k, int(d)) for t, k, d, _ in
                   (line.split() for line in Path(path).read_text().splitlines()))
    kind = max(("ipxe", "config"), key=lambda k: sum(m[1] == k for m in marks))
    req = [(t, d) for t, k, d in marks if k == kind]
    if not req:
        return f"{path}: no requests"
    s0, s1 = req[0][0], req[-1][0] + req[-1][1]
    during = [(t, t + d, k) for t, k, d in marks if s0 <= t <= s1]

    def share(kinds: tuple[str, ...], longer_than: float = 1e6) -> tuple[int, float, float]:
        stalls = sorted((b, e) for b, e, k in during if k in kinds and e - b > longer_than)
        hit = j = 0
        for t, d in req:  # requests in begin order; stalls too
            while j < len(stalls) and stalls[j][1] <= t:
                j += 1
            hit += any(b < t + d for b, _ in stalls[j:j + 3])
        return len(stalls), sum(e - b for b, e in stalls) / 1e6, 100 * hit / len(req)

    lat = sorted(d for _, d in req)
    cw, cw_ms, cw_share = share(("ckpt_writer",))
    g2, g2_ms, g2_share = share(("gc2",), 0)
    passes = sum(k == "ckpt" for _, _, k in during)
    return (f"{path}: {len(req)} {kind}, in the handler p50 {lat[len(lat) // 2] / 1e6:.1f} "
            f"p99 {lat[int(.99 * len(lat))] / 1e6:.1f} ms; the writer's catch-ups {cw} "
            f"({cw_ms:.0f} ms), {cw_share:.1f} % of requests in one; full collections {g2} "
            f"({g2_ms:.0f} ms), {g2_share:.1f} %; checkpointer passes {passes}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--marks", help="run serve with marks written to this file")
    parser.add_argument("--stats", nargs="+", help="summarise these marks files")
    args, rest = parser.parse_known_args()
    if args.stats:
        for path in args.stats:
            print(stats(path))
        return
    if not args.marks:
        parser.error("--marks OUT serve ... or --stats FILE ...")
    install(os.path.abspath(args.marks))
    sys.argv = ["netboot", *rest]
    runpy.run_module("netboot", run_name="__main__")


if __name__ == "__main__":
    main()
