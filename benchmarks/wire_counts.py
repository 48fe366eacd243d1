"""Where a request's cost on the wire goes, per thread: counts the machine's load moves little.

    python benchmarks/wire_counts.py [--enrolled 100000] [--duration 4] [--rounds 2]
                                     [--only ipxe,ipxe-1k,ipxe-held] [--baseline REPO]
                                     [--no-trace] [--gil] [--keep DIR] [--access-log]

A real ``netboot serve`` (http_paths.py's, on http_paths.py's seeds) under wrk (http_paths.py's
rows and Lua script, 50 connections). Each row, each round, on each server:

- a clean window: per thread of the server (the event loop's, the store's writer, the
  others) its CPU (utime + stime) and system CPU per request, voluntary and involuntary
  context switches per request (/proc/<pid>/task/<tid>/status), and from
  /proc/<pid>/task/<tid>/schedstat the share of the window it was on a core and the share it
  was runnable but waiting for one (the rest it slept: in epoll, or waiting for the GIL);
  the whole machine's busy share (/proc/stat) and wrk's own CPU per request;
- a traced window (unless ``--no-trace``): ``perf trace -s`` on the server, system calls per
  request per thread by name, and the µs spent in each (inflated by the tracing; the counts
  are what to read);
- with ``--gil``: the loop thread's waits for the GIL per request, by the C call that had
  let the GIL go (``perf record`` of its futex waits on a condition variable, user stacks by
  DWARF unwinding; gil_window).

Every figure is per request wrk counted in that window. A first-request row's windows (``ipxe``,
``config``: every window of every round, on servers kept through the rounds) each walk their
own disjoint slices of one shuffled order of the machines (window_orders, on http_paths.py's
first_request_slices), so no machine is asked twice in a server's life and every request
counted is a first one; a window whose wrk thread used up its slice says so (``threads ran
out``: its figures are then partly of /boot.ipxe). Before session 34 each window drew machines
at random with repeats (the Lua seed), so the later windows were mostly repeats, not first
installs. Rows meant to repeat (``ipxe-1k``, ``ipxe-held``) still draw at random. This VM
has no hardware counters (perf's ``instructions`` is "not supported"): the loop's
instructions on the wire are wire_instructions.py's (callgrind). Loopback only; servers
stopped by their own PID. Not part of pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from http_paths import (
    MINT,
    RANDOM_MAC_LUA,
    ROWS,
    SEEDS,
    TOKEN_TAIL,
    WRK_THREADS,
    Row,
    first_request_slices,
    netboot,
    write_order,
    wrk,
)
from storm import PER_CLUSTER, REPO, Workload

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, str]:
    """tid -> Python thread name (py-spy dump), else the kernel's comm."""
    names: dict[int, str] = {}
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        out = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid",
                              str(pid)], check=False, capture_output=True, text=True,
                             timeout=30).stdout
        # Thread 12345 (idle): "netboot-sqlite_0"
        for tid, name in re.findall(r'Thread (\d+|0x[0-9A-Fa-f]+) \([^)]*\): "([^"]*)"', out):
            names[int(tid, 0)] = name
    for entry in os.listdir(f"/proc/{pid}/task"):
        tid = int(entry)
        if tid not in names:
            names[tid] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    names[pid] = "loop"
    return names


def task_counts(pid: int) -> dict[int, tuple[float, int, int, float, float, float]]:
    """tid -> (CPU seconds, voluntary, involuntary switches, and from schedstat: seconds on a
    core, seconds runnable waiting for one; then its system CPU seconds (stime))."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/task/{entry}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            status = Path(f"/proc/{pid}/task/{entry}/status").read_text()
            vol = int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            inv = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
            on, waited, _ = Path(f"/proc/{pid}/task/{entry}/schedstat").read_text().split()
            out[int(entry)] = ((int(fields[11]) + int(fields[12])) / TICK, vol, inv,
                               int(on) / 1e9, int(waited) / 1e9, int(fields[12]) / TICK)
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every core (/proc/stat's first line)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def children_cpu() -> float:
    """This process's waited-for children's CPU (wrk's, after each run)."""
    r = os.times()
    return r.children_user + r.children_system


def label(names: dict[int, str], tid: int) -> str:
    name = names.get(tid, "?")
    if name == "loop":
        return "loop"
    if name.startswith("netboot-sqlite_"):
        return "writer"
    return "other"


def window_orders(row: Row, first: int, end: int, windows: int, tmp: Path
                  ) -> list[Path | None]:
    """The order each of a server's ``windows`` walks (every window of its life: rounds
    times clean, traced and GIL windows). A first-request row: one shuffled order of the
    machines ``first`` .. ``end - 1`` (first_request_slices, seeded by the row, so every
    server is asked the same machines) cut into ``WRK_THREADS`` slices a window, disjoint:
    a server kept through the rounds is asked each machine at most once. A row meant to
    repeat: None, random draws."""
    if not row.first:
        return [None] * windows
    slices = first_request_slices(first, end, WRK_THREADS * windows, row.name)
    tmp.mkdir(parents=True, exist_ok=True)
    orders: list[Path | None] = []
    for w in range(windows):
        path = tmp / f"order-{row.name}-{w}"
        write_order(path, slices[w * WRK_THREADS:(w + 1) * WRK_THREADS])
        orders.append(path)
    return orders


def clean_window(port: int, pid: int, row: Row, args: argparse.Namespace, script: Path,
                 first: int, seed: int, order: Path | None = None) -> dict[str, float]:
    names = threads(pid)
    before, busy0, wrk0 = task_counts(pid), machine_busy(), children_cpu()
    t0 = time.monotonic()
    m = wrk(port, row, args.duration, script, args.enrolled, first, seed, order)
    wall = time.monotonic() - t0
    after, busy1, wrk1 = task_counts(pid), machine_busy(), children_cpu()
    n = max(1, m.requests)
    out: dict[str, float] = {"req/s": m.rps, "errors": m.errors,
                             # A thread that used up its slice stopped: said, not hidden.
                             "threads ran out": sum(1 for d in m.drawn if d.out_at)}
    for tid, (cpu, vol, inv, on, waited, sys_) in after.items():
        c0, v0, i0, on0, w0, s0 = before.get(tid, (0.0, 0, 0, 0.0, 0.0, 0.0))
        who = label(names, tid)
        out[f"{who} sys µs"] = out.get(f"{who} sys µs", 0.0) + (sys_ - s0) / n * 1e6
        out[f"{who} on-core %"] = out.get(f"{who} on-core %", 0.0) + (on - on0) / wall * 100
        out[f"{who} runnable-waiting %"] = (out.get(f"{who} runnable-waiting %", 0.0)
                                            + (waited - w0) / wall * 100)
        out[f"{who} runqueue µs"] = out.get(f"{who} runqueue µs", 0.0) + (waited - w0) / n * 1e6
        out[f"{who} µs"] = out.get(f"{who} µs", 0.0) + (cpu - c0) / n * 1e6
        out[f"{who} vol"] = out.get(f"{who} vol", 0.0) + (vol - v0) / n
        out[f"{who} inv"] = out.get(f"{who} inv", 0.0) + (inv - i0) / n
    out["loop busy %"] = out.get("loop µs", 0.0) * m.rps / 1e4
    out["machine busy %"] = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * 100
    out["wrk µs"] = (wrk1 - wrk0) / n * 1e6
    return out


_TRACE_HEAD = re.compile(r"^\s*(\S.*?)\s+\((\d+)\), (\d+) events")
_TRACE_ROW = re.compile(r"^\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+")


def traced_window(port: int, pid: int, row: Row, args: argparse.Namespace, script: Path,
                  first: int, seed: int, tmp: Path, order: Path | None = None
                  ) -> dict[str, float]:
    """Syscalls per request per thread, and the ms spent in each (perf trace -s)."""
    names = threads(pid)
    out_file = tmp / "trace.txt"
    perf = subprocess.Popen(["perf", "trace", "-s", "-p", str(pid), "-o", str(out_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # perf trace attaches to every thread
    try:
        m = wrk(port, row, args.duration, script, args.enrolled, first, seed, order)
    finally:
        perf.send_signal(signal.SIGINT)  # our own child, by its handle
        perf.wait(timeout=60)
    n = max(1, m.requests)
    out: dict[str, float] = {}
    who = None
    for line in out_file.read_text(errors="replace").splitlines():
        head = _TRACE_HEAD.match(line)
        if head:
            who = label(names, int(head.group(2)))
            continue
        r = _TRACE_ROW.match(line)
        if r and who:
            name, calls, total_ms = r.group(1), int(r.group(2)), float(r.group(4))
            out[f"{who} {name}"] = out.get(f"{who} {name}", 0.0) + calls / n
            out[f"{who} {name} µs"] = out.get(f"{who} {name} µs", 0.0) + total_ms * 1e3 / n
    return out


# futex(2) operations of pthread_cond_wait / pthread_cond_timedwait (glibc, private): the
# event loop's thread asleep in CPython's take_gil, waiting for another thread to drop the GIL.
_COND_WAITS = "op == 137 || op == 393"  # FUTEX_WAIT_BITSET_PRIVATE (| FUTEX_CLOCK_REALTIME)
# Frames between take_gil and the call that had dropped the GIL: not the site.
_GIL_GLUE = ("take_gil", "PyEval_RestoreThread", "PyGILState_Ensure", "PyEval_AcquireThread",
             "PyCOND_TIMEDWAIT", "PyCOND_WAIT")


def gil_window(port: int, pid: int, row: Row, args: argparse.Namespace, script: Path,
               first: int, seed: int, tmp: Path, order: Path | None = None
               ) -> dict[str, float]:
    """The loop thread's waits for the GIL per request, by the call that had let it go (the
    C function that dropped the GIL: a file write, a sqlite3 step, uvloop's read callback):
    ``perf record`` of the thread's futex waits on a condition variable, user stacks by
    DWARF unwinding. A wait here is the store's writer (or another thread) running Python
    while the loop has work."""
    data = tmp / "gil.data"
    perf = subprocess.Popen(["perf", "record", "-e", "syscalls:sys_enter_futex", "--filter",
                             _COND_WAITS, "--call-graph", "dwarf,16384", "-t", str(pid),
                             "-o", str(data), "--", "sleep", str(args.duration + 1.5)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    m = wrk(port, row, args.duration, script, args.enrolled, first, seed, order)
    perf.wait(timeout=120)
    text = subprocess.run(["perf", "script", "-i", str(data)], check=True,
                          capture_output=True, text=True, timeout=600).stdout
    n = max(1, m.requests)
    out: dict[str, float] = {}
    for event in text.split("\n\n"):
        frames = [re.sub(r"\+0x[0-9a-f]+$", "", line.split()[1])
                  for line in event.splitlines()[1:] if len(line.split()) > 1]
        if "take_gil" not in frames:
            continue
        site = [f for f in frames[frames.index("take_gil"):] if f not in _GIL_GLUE]
        key = f"GIL wait after {site[0] if site else '?'}"
        out[key] = out.get(key, 0.0) + 1 / n
        out["GIL waits"] = out.get("GIL waits", 0.0) + 1 / n
    return out


def shown(key: str, value: float) -> bool:
    """What is printed: rates and shares, the GIL's waits, and counts of 0.05 a request or
    more (the rest is a system call some requests make)."""
    return value >= 0.05 or "%" in key or key == "req/s" or key.startswith("GIL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="ipxe,ipxe-1k,ipxe-held")
    parser.add_argument("--baseline", type=Path, metavar="REPO")
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--gil", action="store_true",
                        help="also a window counting the loop's GIL waits by call site")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", type=Path, help="reuse/keep the seeds in this directory")
    parser.add_argument("--access-log", action="store_true",
                        help="the servers write their access log (netboot's default; off as "
                             "in http_paths.py unless told)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [r for r in ROWS if r.name in args.only.split(",")]
    trees = {"netboot": REPO} | ({"baseline": args.baseline} if args.baseline else {})
    with tempfile.TemporaryDirectory(prefix="netboot-wire-") as tmp_text:
        tmp = Path(tmp_text)
        root = args.keep or tmp / "work"
        work = Workload(root, args.enrolled, args.enrolled, 1 << 20, 1 << 20, managed=True)
        servers_seeded = max(1, args.enrolled // PER_CLUSTER)
        older = args.baseline.resolve() if args.baseline else REPO
        seeds = {"held": root / "netboot-seed"}
        if not seeds["held"].exists():
            work.build()
            (work.assets / "small.txt").write_bytes(b"x" * 299 + b"\n")
            print(f"import: {work.netboot_seed(args.python, older):.1f} s", flush=True)
        for name in SEEDS[1:]:
            seeds[name] = root / f"netboot-seed-{name}"
            if seeds[name].exists() or not any(r.seed == name for r in rows):
                continue
            shutil.copytree(seeds["held"], seeds[name])
            subprocess.run([args.python, "-c", MINT, str(seeds[name]), TOKEN_TAIL,
                            str(servers_seeded), "1" if name == "installing" else "0"],
                           check=True, timeout=900, env={**os.environ, "PYTHONPATH": str(older)})
        script = tmp / "random_mac.lua"
        script.write_text(RANDOM_MAC_LUA)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for name in SEEDS:
            todo = [r for r in rows if r.seed == name]
            if not todo:
                continue
            first = 0 if name == "held" else servers_seeded
            with contextlib.ExitStack() as stack:
                ports = {}
                for server, tree in trees.items():
                    run = tmp / f"{name}-{server}"
                    run.mkdir()
                    ports[server] = stack.enter_context(
                        netboot(work, run, args.python, args.access_log, seeds[name], tree))
                # Each window draws its own machines (the Lua seed; a first-request row its
                # own slices of one order): windows numbered apart.
                kinds = 1 + (not args.no_trace) + args.gil
                orders = {row.name: window_orders(row, first, args.enrolled,
                                                  args.rounds * kinds, tmp / name)
                          for row in todo}
                for round_ in range(args.rounds):
                    for row in todo:
                        at = orders[row.name][round_ * kinds:(round_ + 1) * kinds]
                        turn = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
                        for server in turn:
                            port, (pid,) = ports[server]
                            if row.machines and round_ == 0:
                                wrk(port, row, args.duration, script, args.enrolled, first)
                            got = clean_window(port, pid, row, args, script, first,
                                               3 * round_, at[0])
                            if not args.no_trace:
                                got |= traced_window(port, pid, row, args, script, first,
                                                     3 * round_ + 1, tmp, at[1])
                            if args.gil:
                                got |= gil_window(port, pid, row, args, script, first,
                                                  3 * round_ + 2, tmp, at[-1])
                            results.setdefault((server, row.name), []).append(got)
                            print(f"  {server} {row.name} round {round_}: "
                                  + ", ".join(f"{k} {v:.3g}" for k, v in sorted(got.items())
                                              if shown(k, v)),
                                  flush=True)
    print(f"\nmedians of {args.rounds} round(s), per request (load average "
          f"{os.getloadavg()[0]:.1f})")
    for (server, row_name), windows in results.items():
        medians = {k: statistics.median(w.get(k, 0.0) for w in windows)
                   for k in sorted({k for w in windows for k in w})}
        line = ", ".join(f"{k} {v:.3g}" for k, v in medians.items()
                         if shown(k, v))
        print(f"{server} {row_name}: {line}")


if __name__ == "__main__":
    main()
