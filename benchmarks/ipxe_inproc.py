"""`/ipxe` first installs in process, two trees at the same time: the event loop's CPU per
request beside a baseline's, under the same load.

    python benchmarks/ipxe_inproc.py --compare /work/main [--requests 10000] [--rounds 3]
                                     [--managed | --config | --again 1000]

Each tree's child builds the service as ``netboot serve`` does (``service.build``, the view
loaded, the heap frozen, uvloop, the batched log handler writing to a file) on its own copy
of a seeded inventory (``storm.Workload``, 100,000 machines by default, clusters with a fixed
server URL so that every request is a first install, as http_paths.py ``--fixed-url``; with
``--managed``, managed clusters whose first machine is a registered server, as http_paths.py's
``ipxe`` row: first installs that look up their cluster's servers to join) and calls
``DeviceRoutes._ipxe`` from 50 tasks, each for a random enrolled MAC (the same MACs in both
trees), without sockets: the decision, the render, the group commit on the store's writer
thread, the log line. ``--config``: first config fetches instead, on http_paths.py's
"installing" seed (managed clusters with their registered servers, every other machine's
install under way with its token minted): ``DeviceRoutes._config`` of a random machine with
its token (the token check, the join, the k3OS render and its YAML check, the booting ->
installing commit before the answer). As the HTTP front door does, a request is read in
one loop iteration and decided in the next, and says when it arrived (``netboot.arrival``),
so that one loop iteration's requests share one store probe.

Why both at once: on a shared 2-core machine the load of other processes drifts within a
minute, and two runs taken one after the other measured the drift (session 15: a sequential
A/B of two trees showed one 5-10 % ahead in 3 of 4 rounds; run side by side, the same two
trees were within 1-3 %). Side by side, both children meet the same load at the same moment;
they also share the two CPUs with each other, so the figures are a comparison, not an
absolute rate. Printed per round: each child's loop CPU per request (``time.thread_time``
of the loop's thread), the other threads' (the store's writer, its checkpointer, its reader),
the wall rate, the group commits (how many, how many of 5 commits or fewer) and the share of
the time the writer spent in their transactions; then the medians and the median of the
rounds' ratios.

``--instructions``: each child under valgrind's callgrind, counting the instructions of each
thread over the measured requests only (the warm-up and the view's load are not counted),
where the timed figures moved ±5 % a round with the load of other processes (session 24).
Not exact: two children of the same code differed by 0.1-1.3 % of the loop's count a
first install at load 7-24 (session 49, PYTHONHASHSEED=0 too; likely how requests fall
into loop iterations and group commits, which moves with timing). A change below ~1.5 %
needs rounds in both orders, or a deterministic micro-count. An instruction is weighed
alike wherever it is (no cache miss, no system call's kernel side), so the count says which
way and how far a change moves the interpreter's work; the timed A/B says what that is
worth. ~50x slower: ``--requests 1000 --rounds 1`` takes ~1.5 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from http_paths import MINT, TOKEN_TAIL
from storm import REPO, Workload

CONCURRENCY = 50

CHILD = r"""
import asyncio, json, logging, os, random, statistics, sys, time

run, count, seed, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
first = int(sys.argv[6])
config = sys.argv[7] == "1"
top = int(sys.argv[9]) or int(sys.argv[5])  # --again: the first machines only
from netboot.logs import BatchedStreamHandler, TextFormatter

handler = BatchedStreamHandler(open(os.path.join(run, "netboot.log"), "w"))
handler.setFormatter(TextFormatter())
logging.basicConfig(level="INFO", handlers=[handler])
logging._srcfile = None  # as netboot.cli sets it for serve
logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
from netboot import config as configs
TOKEN_TAIL = sys.argv[8]
from netboot.arrival import arrived
from netboot.servers.http import DeviceRoutes
from netboot.service import FrozenHeap, build, loop_factory


def threads():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def watch_groups():
    # Each group commit's size, and the writer's transactions (wall time on its thread):
    # what a first install's answer waits for besides the loop.
    from netboot.inventory.sqlite import SqliteStore
    from netboot.recorder import Recorder

    sizes, spans = [], []
    group_commit, apply_here = Recorder._commit_group, SqliteStore._apply_here

    async def counted(self, group):
        await group_commit(self, group)
        sizes.append(len(group.batches))  # every commit it gathered, written or refused

    def timed(self, *args):
        # The thread's CPU beside the wall time: what is left is waiting, mostly for the
        # GIL, which _sqlite gives up around every step and reset (s27-gil).
        began, cpu = time.perf_counter(), time.thread_time()
        try:
            return apply_here(self, *args)
        finally:
            spans.append((began, time.perf_counter(), time.thread_time() - cpu))

    Recorder._commit_group, SqliteStore._apply_here = counted, timed
    return sizes, spans


async def main():
    sizes, spans = watch_groups()
    service = await build(configs.load(os.path.join(run, "netboot.yaml")), app=False)
    await service.boot.load_view()
    FrozenHeap().start()
    devices = DeviceRoutes(service.content)
    draw = random.Random(seed)
    # --again: every machine asked once first (its install started: unmeasured), then
    # asked again at random, as http_paths.py's ipxe-1k row.
    machines = iter([*(range(first, top) if top < int(sys.argv[5]) else ()),
                     *(draw.randrange(first, top) for _ in range(count + 2 * conc * 40))])

    async def worker(n):
        for _ in range(n):
            i = next(machines)
            mac = f"02-00-00-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}"
            came = time.monotonic()  # read in this iteration, decided in the next
            await asyncio.sleep(0)
            with arrived(came):
                if config:  # k3OS's fetch, by the URL its install script gives
                    await devices._config(mac, f"{i:06d}{TOKEN_TAIL}", "127.0.0.1")
                else:
                    await devices._ipxe(f"mac={mac}", "127.0.0.1")

    if top < int(sys.argv[5]):
        await asyncio.gather(*(worker((top - first) // conc) for _ in range(conc)),
                             worker((top - first) % conc))
    await asyncio.gather(*(worker(40) for _ in range(conc)))  # warm-up
    del sizes[:], spans[:]
    counting = os.environ.get("NB_CALLGRIND") == "1"
    if counting:  # under callgrind (--instructions): the measured requests alone counted
        import subprocess
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True,
                       capture_output=True)
    before, t0, c0 = threads(), time.perf_counter(), time.thread_time()
    per = count // conc
    await asyncio.gather(*(worker(per) for _ in range(conc)))
    c1, t1, after = time.thread_time(), time.perf_counter(), threads()
    if counting:
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True,
                       capture_output=True)
    done = per * conc
    loop_tid = str(os.getpid())
    others = sorted(((after[t] - before.get(t, 0.0)) * 1e6 / done for t in after
                     if t != loop_tid), reverse=True)
    groups = sizes
    busy = sum(min(b, t1) - a for a, b, _ in spans if a < t1)
    txns = [(b - a, cpu) for a, b, cpu in spans if b <= t1]
    print(json.dumps({"loop_us": (c1 - c0) * 1e6 / done, "others_us": others,
                      "rps": done / (t1 - t0), "groups": len(groups),
                      "small": sum(n <= 5 for n in groups), "writer_busy": busy / (t1 - t0),
                      # A transaction's wall time and the part of it its thread did not run
                      # (the GIL, the OS), ms: medians over the groups.
                      "txn_ms": statistics.median(w for w, _ in txns) * 1e3 if txns else 0.0,
                      "txn_wait_ms": statistics.median(w - c for w, c in txns) * 1e3
                      if txns else 0.0,
                      # ... and its mean, the tail's weight included.
                      "txn_wait_mean_ms": statistics.fmean(w - c for w, c in txns) * 1e3
                      if txns else 0.0,
                      # A compiled recorder (NETBOOT_MYPYC=1) calls its own _commit_group
                      # natively: the watch above does not see its groups.
                      "counted": not sys.modules["netboot.recorder"].__file__.endswith(".so")}),
          flush=True)
    handler.flush()
    await service.close()


with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
    runner.run(main())
"""

CONFIG = """{{"server": {{"advertise": "127.0.0.1", "data_dir": "{data}", "log_level": "info"}},
 "http": {{"listen": "127.0.0.1", "port": 0, "access_log": false}}, "https": {{"port": 0}},
 "dhcp": {{"mode": "off"}}, "tftp": {{"enabled": false}}, "dns": {{"enabled": false}},
 "assets": {{"dirs": ["{assets}"]}}}}
"""


def start(python: str, tree: Path, run: Path, seed: Path, assets: Path, requests: int,
          draw: int, enrolled: int, first: int, config: bool, instructions: bool,
          again: int = 0) -> subprocess.Popen[str]:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copytree(seed, run / "data")
    (run / "netboot.yaml").write_text(CONFIG.format(data=run / "data", assets=assets))
    # --instructions: each thread's instructions in a file of its own (cg.out-01 is the
    # loop's), counted only between the child's callgrind_control -i on and off.
    counted = (["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={run / 'cg.out'}", "--log-file=/dev/null"]
               if instructions else [])
    return subprocess.Popen([*counted, python, "-c", CHILD, str(run), str(requests), str(draw),
                             str(CONCURRENCY), str(enrolled), str(first),
                             "1" if config else "0", TOKEN_TAIL, str(again)], cwd=run,
                            text=True,
                            stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(tree),
                                 "NB_CALLGRIND": "1" if instructions else "0"})


def instructions_of(run: Path, requests: int) -> tuple[float, float]:
    """The loop thread's instructions per request, and the other threads' together, from
    callgrind's per-thread files (``totals:``)."""
    per_thread = []
    for path in sorted(run.glob("cg.out-*")):
        totals = [line for line in path.read_text().splitlines() if line.startswith("totals:")]
        per_thread.append(int(totals[0].split()[1]) if totals else 0)
    if not per_thread:
        raise SystemExit(f"no callgrind output in {run}")
    return per_thread[0] / requests, sum(per_thread[1:]) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, required=True, metavar="TREE",
                        help="the other checkout, run at the same time as this one")
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=10_000, help="measured, per child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--managed", action="store_true",
                        help="managed clusters, each with a registered server (its first "
                             "machine, never asked for), as http_paths.py's ipxe row without "
                             "--fixed-url: first installs that join a cluster")
    parser.add_argument("--config", action="store_true",
                        help="first config fetches instead (implies --managed): every machine "
                             "with its install under way and token minted, as http_paths.py's "
                             "config row; each request is DeviceRoutes._config of a random "
                             "machine with its token (the booting -> installing commit)")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions instead of timing (valgrind's callgrind, "
                             "~50x slower: use --requests 1000): the loop thread's and the "
                             "other threads' per request, within ~1.5 %% between two children of "
                             "the same code at any load (the timed figures move ±5 %%; it "
                             "weighs no cache miss or system call's kernel side)")
    parser.add_argument("--again", type=int, default=0, metavar="N",
                        help="installs under way asked again, as http_paths.py's ipxe-1k row "
                             "(implies --managed): each of the first N machines asked once "
                             "(unmeasured: its install starts), then a random one of them "
                             "per request, whose answer is decided from the view (no commit)")
    parser.add_argument("--clusters", type=int, default=0, metavar="N",
                        help="the fleet in N clusters (default: one per 12,500 machines, "
                             "8 of 100,000): --config --clusters 200, a fleet of hundreds of "
                             "clusters' first configs (s43-config)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="with --instructions: callgrind's files copied into "
                             "DIR/<child>-<round>/ (callgrind_annotate: where they go)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    args.managed = args.managed or args.config or bool(args.again)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trees = {"netboot": REPO, "compare": args.compare.resolve()}
    unit = "instructions/req" if args.instructions else "µs/req"
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="netboot-ipxe-inproc-") as tmp_text:
        tmp = Path(tmp_text)
        work = Workload(tmp, args.enrolled, args.enrolled, 1 << 20, 1 << 20,
                        managed=args.managed, clusters=args.clusters)
        work.build()
        # Seeded by the other checkout (the older schema, as a rule): a tree opens, and
        # migrates, a file its baseline wrote; the baseline refuses a newer schema.
        older = trees["compare"]
        took = work.netboot_seed(args.python, older)
        print(f"netboot import of {args.enrolled} machines: {took:.1f} s", flush=True)
        seed = work.root / "netboot-seed"
        # Without a registered server a managed cluster's agents are held (nothing written):
        # its first machine is made one, as http_paths.py's seed does (MINT, no tokens).
        first = work.cluster_count if args.managed else 0
        if first:
            subprocess.run([args.python, "-c", MINT, str(seed), TOKEN_TAIL, str(first),
                            "1" if args.config else "0"],
                           check=True, timeout=900, env={**os.environ, "PYTHONPATH": str(older)},
                           # Not the harness's: ``-c`` puts the working directory first on
                           # the path, so run from a checkout the seed was minted by its
                           # netboot, not the baseline's (an older tree could not read it).
                           cwd=work.root)
        for r in range(1, args.rounds + 1):
            children = {name: start(args.python, tree, tmp / f"run-{name}", seed, work.assets,
                                    args.requests, r, args.enrolled, first, args.config,
                                    args.instructions, args.again)
                        for name, tree in trees.items()}
            line = f"round {r}:"
            for name, child in children.items():
                out, _ = child.communicate(timeout=1800)
                if child.returncode != 0:
                    raise SystemExit(f"{name}'s child failed ({child.returncode})")
                got = json.loads(out.strip().splitlines()[-1])
                if args.instructions:
                    done = args.requests // CONCURRENCY * CONCURRENCY
                    loop_i, others_i = instructions_of(tmp / f"run-{name}", done)
                    if args.keep is not None:
                        kept = args.keep / f"{name}-{r}"
                        kept.mkdir(parents=True, exist_ok=True)
                        for path in (tmp / f"run-{name}").glob("cg.out-*"):
                            shutil.copy(path, kept)
                    print(f"round {r}: {name} loop {loop_i:,.0f} instructions/req, other "
                          f"threads {others_i:,.0f}", flush=True)
                    got["loop_us"], got["others_us"] = loop_i, [others_i]
                results[name].append(got)
                others = " ".join(f"{o:.0f}" for o in got["others_us"] if o >= 0.5)
                groups = (f"{got['groups']} groups ({got['small']} of ≤ 5)"
                          if got.get("counted", True) else "groups not counted (compiled)")
                line += (f"  {name} loop {got['loop_us']:,.1f} {unit} (others {others})"
                         f" {got['rps']:,.0f} req/s, {groups}, writer"
                         f" {100 * got['writer_busy']:.0f} % busy, transaction"
                         f" {got.get('txn_ms', 0.0):.2f} ms (not running"
                         f" {got.get('txn_wait_ms', 0.0):.2f}, mean"
                         f" {got.get('txn_wait_mean_ms', 0.0):.2f})")
            print(f"{line}  (load average {os.getloadavg()[0]:.1f})", flush=True)
    ratios = [a["loop_us"] / b["loop_us"] for a, b in zip(results["netboot"],
                                                            results["compare"], strict=True)]
    for name in trees:
        print(f"{name}: loop {statistics.median(g['loop_us'] for g in results[name]):,.1f} "
              f"{unit}, {statistics.median(g['rps'] for g in results[name]):,.0f} req/s "
              f"(medians of {args.rounds})")
    what = "instructions" if args.instructions else "CPU"
    print(f"netboot ÷ compare, loop {what} per request: {statistics.median(ratios):.3f}x "
          f"(median of the rounds' ratios: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
