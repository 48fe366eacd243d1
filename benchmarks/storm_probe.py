"""Where a storm's resident memory goes: one storm.py storm (``--loaded``) against a
``netboot serve`` run through storm_probe_hook.py, with readings of the server before, during
and after it.

    sudo python benchmarks/storm_probe.py --out DIR [--devices 1000] [--enrolled 100000]
                                          [--trace N] [--peakwatch] [--mid 1,2,4]
                                          [--idle 2,12] [--release _seen,_ended,...]
                                          [--census [--compact] [--evict]]
                                          [--exec FILE ...]

Each reading (a JSON line in DIR/records.jsonl, and printed) has VmRSS, RssAnon and RssFile
(/proc/PID/status), the RSS per mapping (/proc/PID/smaps: [heap], the anonymous mappings
that hold pymalloc's 1 MiB arenas, glibc's thread arenas and the view's large dicts, each
shared library), glibc's mallinfo2 over every arena, pymalloc's arenas and its bytes in
allocated and free blocks, SQLite's memory. ``--trace N`` starts tracemalloc (N frames) once
the view is loaded, so that what it traces is the storm's, and dumps snapshots after the
storm and when idle (DIR/after.snap, DIR/idle.snap: read them with tracemalloc's
Snapshot.load; ``--peakwatch``: also DIR/peak.snap near the traced peak); tracemalloc slows
the storm 1.5-6x. ``--census``: after the idle readings, the objects in pymalloc pools that
held none once the view was loaded, by type (DIR/census.json: what keeps the arenas a storm
added). ``--release NAMES``: after the idle readings, the dicts of those attribute names on
netboot's objects are cleared (what dropping the caches would give back). ``--compact``
(with ``--census``, after the release if any): each machine of the view in a pool not marked
(a version adopted in the storm) replaced by a copy of new objects, in the view and in the
caches that hold it by identity, then the census again (DIR/census.compacted.json).
``--evict`` (with ``--census``): those machines taken out of the process (kept as one stored
text) and decoded back: pymalloc's arenas without them, the bound of any compaction.
Last, after a collection and ``malloc_trim``, DIR/smaps.trimmed and DIR/minfo.trimmed.xml;
then each ``--exec FILE`` (Python run in the server: what a release would give, before it is
built) and a reading and DIR/smaps.STEM after it. The hook's own thread has a glibc arena of
its own (its readings of /proc: ~3 MiB resident of a free top that malloc_trim leaves):
count it out of the thread arenas. Needs root (storm.py's namespaces); every process is
stopped by its own PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import storm
from storm_memory import generator, stop_generator

HOOK = Path(__file__).with_name("storm_probe_hook.py")


class Probe:
    def __init__(self, out: Path, pid: int) -> None:
        self.dir = out / "probe"
        self.dir.mkdir()
        self.out = out
        self.pid = pid

    def ask(self, command: str, timeout: float = 120) -> str:
        (self.dir / "cmd.tmp").write_text(command)
        os.rename(self.dir / "cmd.tmp", self.dir / "cmd")
        deadline = time.monotonic() + timeout
        answer = self.dir / "out"
        while not answer.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the probe did not answer {command!r}")
            time.sleep(0.02)
        text = answer.read_text()
        answer.unlink()
        return text

    def maps(self) -> dict[str, int]:
        """RSS KiB per mapping name (the file's base name, [anon], [heap])."""
        kinds: dict[str, int] = {}
        name = ""
        for line in Path(f"/proc/{self.pid}/smaps").read_text().splitlines():
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                name = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
            elif parts[0] == "Rss:":
                kinds[name] = kinds.get(name, 0) + int(parts[1])
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:30])

    def reading(self, tag: str) -> None:
        status = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                status[key] = int(value.split()[0])
        record = {"tag": tag, "time": time.time(), **status, "maps": self.maps(),
                  **json.loads(self.ask("stats"))}
        with (self.out / "records.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        m, p = record["mallinfo2"], record["pymalloc"]
        mib, heap = 1 << 20, record["maps"].get("[heap]", 0) / 1024
        print(f"{tag:>9} RSS {status['VmRSS'] / 1024:6.1f} anon {status['RssAnon'] / 1024:6.1f}"
              f" file {status['RssFile'] / 1024:5.1f} [heap] {heap:5.1f}"
              f" | pymalloc arenas {p.get('arenas allocated current', '-')}"
              f" used {p.get('bytes in allocated blocks', 0) / mib:5.1f}"
              f" free in pools {p.get('bytes in available blocks', 0) / mib:4.1f}"
              f" | glibc arenas {m['arena'] / mib:5.1f} used {m['uordblks'] / mib:5.1f}"
              f" free {m['fordblks'] / mib:4.1f} mmap {m['hblkhd'] / mib:5.1f}"
              f" | SQLite {record['sqlite_mem'][0] / mib:4.1f}"
              + " (caches " + " ".join(f"{k.strip('_')} {v / mib:.2f}" for k, v in
                                     record.get("sqlite_caches", {}).items()) + ")"
              + f" | threads {status['Threads']}"
              + (f" | traced {record['traced'][0] / mib:.1f} (peak {record['traced'][1] / mib:.1f})"
                 if record["traced"] else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new directory for the readings")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc frames (0: off)")
    parser.add_argument("--peakwatch", action="store_true")
    parser.add_argument("--mid", default="", help="seconds after GO of readings in the storm")
    parser.add_argument("--idle", default="2,12", help="seconds after the storm of readings")
    parser.add_argument("--release", default="", help="attribute names of dicts to clear")
    parser.add_argument("--compact", action="store_true",
                        help="with --census: the storm's machine versions copied anew")
    parser.add_argument("--evict", action="store_true",
                        help="with --census: the storm's machine versions out of the view "
                             "and back (as stored text): the arenas without them")
    parser.add_argument("--census", action="store_true",
                        help="after the idle readings, the objects in pools the storm added")
    parser.add_argument("--python", default=sys.executable, help="interpreter for netboot")
    parser.add_argument("--exec", action="append", default=[], metavar="FILE",
                        help="Python run in the server after the trimmed reading (it may set "
                             "``answer``), then a reading named by the file's stem")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates network namespaces")
    out = args.out
    out.mkdir(parents=True)
    work = storm.Workload(out / "work", args.devices, args.enrolled, 1 << 20, 4 << 20)
    work.build()
    print(f"netboot import: {work.netboot_seed(args.python):.1f} s", flush=True)
    spec = storm.Spec(args.devices, 1.0, args.enrolled, 1 << 20, 4 << 20, 0.0, 0.0, 120.0, 7)
    try:
        with storm.namespaces() as (server_ns, client_ns):
            run = out / "run"
            run.mkdir()
            spec = storm.Spec(**{**spec.__dict__, "started": time.monotonic()})
            conf = work.netboot_config(run, "info")
            proc = storm.start("netboot", server_ns, [args.python, "-c", HOOK.read_text(), "serve",
                                                      "--config", str(conf)],
                               run / "netboot.log", {"PYTHONPATH": str(storm.REPO),
                                                     "PYTHONUNBUFFERED": "1",
                                                     "PROBE_DIR": str(out / "probe")})
            probe = Probe(out, proc.popen.pid)
            gen = generator(client_ns, spec, run)
            try:
                run_storm(args, probe, gen, run)
            finally:
                stop_generator(gen)
                proc.stop()
    finally:
        shutil.rmtree(out / "work", ignore_errors=True)


def run_storm(args: argparse.Namespace, probe: Probe, gen: subprocess.Popen[str],
              run: Path) -> None:
    assert gen.stdin is not None and gen.stdout is not None
    line = gen.stdout.readline()
    if not line.startswith("READY"):
        raise RuntimeError(f"not ready: {line!r}; see {run}")
    storm.view_loaded(run / "netboot.log")
    time.sleep(1.0)
    probe.reading("loaded")
    probe.ask(f"minfo {probe.out}/minfo.loaded.xml")
    if args.census:
        print("census mark:", probe.ask("census mark"), "pools", flush=True)
    if args.trace:
        probe.ask(f"trace {args.trace}")
        if args.peakwatch:
            probe.ask(f"peakwatch {probe.out}/peak.snap")

    def during() -> None:
        t0 = time.monotonic()
        for at in [float(x) for x in args.mid.split(",") if x]:
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            probe.reading(f"mid{at:g}")

    threading.Thread(target=during, daemon=True).start()
    gen.stdin.write("GO\n")
    gen.stdin.flush()
    data = json.loads(gen.stdout.readline())
    failed = sum(sum(v.values()) for v in data["failures"].values())
    print(f"storm: {data['wall']:.1f} s, {failed} failed", flush=True)
    probe.reading("after")
    if args.trace:
        probe.ask(f"snap {probe.out}/after.snap")
    t0 = time.monotonic()
    for at in [float(x) for x in args.idle.split(",") if x]:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        probe.reading(f"idle{at:g}")
    print("live objects by type:", probe.ask("types"), flush=True)
    probe.ask(f"modules {probe.out}/modules.txt")
    shutil.copyfile(f"/proc/{probe.pid}/smaps", probe.out / "smaps.idle")
    if args.census:
        print("census:", probe.ask(f"census {probe.out}/census.json"), flush=True)
    if args.trace:
        probe.ask(f"snap {probe.out}/idle.snap")
    probe.ask(f"minfo {probe.out}/minfo.after.xml")
    probe.ask("collect")
    probe.reading("collected")
    if args.release:
        print("released:", probe.ask(f"release {args.release}"), flush=True)
        probe.reading("released")
        if args.census:
            print("census after the release:",
                  probe.ask(f"census {probe.out}/census.released.json"), flush=True)
    if args.compact:  # after the release, if any: what compaction gives on its own then
        print(probe.ask("compact"), flush=True)
        probe.reading("compacted")
        print("census after compaction:",
              probe.ask(f"census {probe.out}/census.compacted.json"), flush=True)
    if args.evict:
        print("evicted:", probe.ask("evict"), flush=True)
        probe.reading("evicted")
    probe.ask("trim")
    probe.reading("trimmed")
    shutil.copyfile(f"/proc/{probe.pid}/smaps", probe.out / "smaps.trimmed")
    probe.ask(f"minfo {probe.out}/minfo.trimmed.xml")
    for path in args.exec:
        print(f"exec {path}:", probe.ask(f"exec {path}"), flush=True)
        probe.reading(Path(path).stem)
        shutil.copyfile(f"/proc/{probe.pid}/smaps", probe.out / f"smaps.{Path(path).stem}")


if __name__ == "__main__":
    main()
