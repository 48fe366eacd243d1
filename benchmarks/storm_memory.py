"""Resident memory of ``netboot serve`` after a boot storm, with the whole fleet enrolled.

    sudo python benchmarks/storm_memory.py [--runs 3] [--devices 1000] [--enrolled 100000]
                                           [--settle 15] [--baseline /path/to/other/checkout]
                                           [--restart]

Issue 10's target: < 150 MiB resident with 100,000 machines, after the storm. Each run is
storm.py's (``--loaded``): a fresh copy of one seeded data dir, netboot in a server
namespace, the devices in a client one (storm.py's namespaces, veth pair and load
generator: DHCP, TFTP, then the HTTP stages and the installer's POSTs), the storm started
once netboot logs its view loaded. The server's VmRSS (from /proc/PID/status, as
view_memory.py reads it) is read three times: with the view loaded (a second after the log
line), as the last device finishes, and ``--settle`` seconds later, the server still
running (what it keeps, not what the storm held). With ``--baseline``, another checkout's
netboot (PYTHONPATH) runs the same storm on the same seed, the two alternating run by run;
the medians per checkout are printed. Each run is a first start on a fresh data dir (the CA
and the server's certificate made in the process that then serves the storm); ``--restart``
serves each data dir once and stops it first, so that the measured server is a restart, as
a server in service is (its certificate only read back). Needs root (namespaces); every
process is stopped by its own PID and the namespaces deleted (storm.py). Not part of
pytest; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import storm

HERE = storm.REPO


def vm(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of ``pid``, MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def smaps_kinds(path: Path) -> dict[str, float]:
    """Resident MiB of one /proc/PID/smaps copy by kind of mapping: glibc's main heap
    (``[heap]``), its other threads' arenas (anonymous, read-write and 64 MiB-aligned: what
    SQLite's page caches and the store threads' blocks live in), the other anonymous
    mappings (Python's arenas, blocks mapped alone, thread stacks) and files."""
    kinds = {"[heap]": 0, "thread arenas": 0, "other anon": 0, "files": 0}
    kind = "files"
    for line in path.read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and not head[0].endswith(":"):
            start = int(head[0].split("-")[0], 16)
            name = head[5] if len(head) > 5 else ""
            if name == "[heap]":
                kind = "[heap]"
            elif name and not name.startswith("["):
                kind = "files"
            elif not name and head[1] == "rw-p" and start % (64 << 20) == 0:
                kind = "thread arenas"
            else:
                kind = "other anon"
        elif head[0] == "Rss:":
            kinds[kind] += int(head[1])
    return {k: v / 1024 for k, v in kinds.items()}


def one_run(tree: Path, work: storm.Workload, spec: storm.Spec, server_ns: str,
            client_ns: str, run: Path, python: str, settle: float,
            restart: bool = False, smaps: Path | None = None) -> dict[str, float]:
    run.mkdir()
    conf = work.netboot_config(run, "info")
    if restart:
        # A server in service, restarted: its first start made the CA and the server's
        # certificate (and recorded the check), which a restart only reads back.
        first = storm.start("netboot", server_ns, [python, "-m", "netboot", "serve",
                                                   "--config", str(conf)],
                            run / "first-start.log",
                            {"PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"})
        try:
            storm.view_loaded(run / "first-start.log")
        finally:
            first.stop()
    spec = storm.Spec(**{**spec.__dict__, "started": time.monotonic()})
    proc = storm.start("netboot", server_ns, [python, "-m", "netboot", "serve", "--config",
                                              str(conf)],
                       run / "netboot.log", {"PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"})
    gen = generator(client_ns, spec, run)
    pid = proc.popen.pid
    try:
        assert gen.stdin is not None and gen.stdout is not None
        line = gen.stdout.readline()
        if line.split()[:1] != ["READY"]:
            raise RuntimeError(f"not ready: {line.strip()!r}; see {run}")
        storm.view_loaded(run / "netboot.log")
        time.sleep(1.0)
        loaded = vm(pid)
        gen.stdin.write("GO\n")
        gen.stdin.flush()
        out = gen.stdout.readline()
        after = vm(pid)
        if not out.strip():
            raise RuntimeError(f"the generator ended without a result; see {run}")
        data = json.loads(out)
        time.sleep(settle)
        if proc.popen.poll() is not None:
            raise RuntimeError(f"netboot stopped; see {run}")
        settled = vm(pid)
        if smaps is not None:
            shutil.copyfile(f"/proc/{pid}/smaps", smaps)
        failed = sum(sum(v.values()) for v in data["failures"].values())
        if failed:  # by stage and reason: a storm's failure is a finding, not only a count
            # The run's directory goes with the others at the end: its logs are kept
            # elsewhere, so that the failure can be read (which transfer, what the server said).
            kept = Path(tempfile.mkdtemp(prefix="netboot-storm-memory-failed-"))
            for log_name in ("netboot.log", "generator.log"):
                if (run / log_name).exists():
                    shutil.copy2(run / log_name, kept / log_name)
            print(f"  {tree.name}: failures {json.dumps(data['failures'])}; logs kept in {kept}",
                  flush=True)
        return {"loaded": loaded["VmRSS"], "after": after["VmRSS"], "peak": after["VmHWM"],
                "settled": settled["VmRSS"], "anon": settled["RssAnon"],
                "file": settled["RssFile"], "wall": data["wall"], "failed": failed,
                "ok": len(data["times"].get("total", []))}
    finally:
        stop_generator(gen)
        proc.stop()


def generator(client_ns: str, spec: storm.Spec, run: Path) -> subprocess.Popen[str]:
    """storm.py's load generator in the client namespace: says READY, storms at GO."""
    return subprocess.Popen(
        ["ip", "netns", "exec", client_ns, sys.executable, storm.__file__, "--generate",
         json.dumps(spec.__dict__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=(run / "generator.log").open("wb"),
        text=True, env={**os.environ, "PYTHONPATH": str(HERE)})


def stop_generator(gen: subprocess.Popen[str]) -> None:
    if gen.poll() is None:
        assert gen.stdin is not None
        gen.stdin.close()
        try:
            gen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            gen.kill()  # this process only, by its own handle
            gen.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--kernel-size", type=storm.size_arg, default=1 << 20)
    parser.add_argument("--initrd-size", type=storm.size_arg, default=4 << 20)
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds after the last device before the settled reading")
    parser.add_argument("--baseline", type=Path, help="another checkout, run alternately")
    parser.add_argument("--python", default=sys.executable, help="interpreter for netboot")
    parser.add_argument("--restart", action="store_true",
                        help="measure a restarted server: each run's data dir is served once "
                             "(its CA and certificate made) and stopped before the measured "
                             "start; without it, a first start on a fresh data dir")
    parser.add_argument("--smaps", type=Path,
                        help="a directory for each run's /proc/PID/smaps at the settled reading "
                             "(run-N-this, run-N-baseline): where the MiB are")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates network namespaces")
    trees = {"this": HERE}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    spec = storm.Spec(args.devices, 1.0, args.enrolled, args.kernel_size, args.initrd_size,
                      0.0, 0.0, 120.0, 7)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    tmp = Path(tempfile.mkdtemp(prefix="netboot-storm-memory-"))
    if args.smaps:
        args.smaps.mkdir(parents=True, exist_ok=True)
    try:
        work = storm.Workload(tmp, args.devices, args.enrolled, args.kernel_size,
                              args.initrd_size)
        work.build()
        # Seeded by the baseline's CLI when there is one: a tree opens (migrates) a file an
        # older schema wrote, never the other way round (session 17's migration 7).
        print(f"netboot import of {args.enrolled} machines: "
              f"{work.netboot_seed(args.python, args.baseline):.1f} s", flush=True)
        with storm.namespaces() as (server_ns, client_ns):
            for n in range(args.runs):
                order = list(trees) if n % 2 == 0 else list(reversed(trees))
                for name in order:
                    r = one_run(trees[name], work, spec, server_ns, client_ns,
                                tmp / f"run-{n}-{name}", args.python, args.settle,
                                args.restart,
                                args.smaps / f"run-{n + 1}-{name}" if args.smaps else None)
                    load = os.getloadavg()[0]
                    r["load"] = load
                    results[name].append(r)
                    print(f"run {n + 1} {name:<8} loaded {r['loaded']:6.1f}  after storm "
                          f"{r['after']:6.1f}  +{args.settle:g} s {r['settled']:6.1f} MiB "
                          f"(anon {r['anon']:.1f}, file {r['file']:.1f}; peak {r['peak']:.1f}); "
                          f"storm {r['wall']:.1f} s, {r['ok']:.0f} ok, {r['failed']:.0f} failed; "
                          f"load {load:.1f}", flush=True)
                    if args.smaps:
                        kinds = smaps_kinds(args.smaps / f"run-{n + 1}-{name}")
                        print("  settled by mapping: " + ", ".join(
                            f"{k} {v:.1f}" for k, v in kinds.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.devices} devices, {args.enrolled} machines enrolled, "
          f"{'a restarted server' if args.restart else 'a first start'}; VmRSS MiB, median "
          f"of {args.runs} run(s)")
    print(f"{'checkout':<10} {'loaded':>7} {'after':>7} {'settled':>8} {'peak':>7}  path")
    for name, rs in results.items():
        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)
        print(f"{name:<10} {med('loaded'):7.1f} {med('after'):7.1f} {med('settled'):8.1f} "
              f"{med('peak'):7.1f}  {trees[name]}")


if __name__ == "__main__":
    main()
