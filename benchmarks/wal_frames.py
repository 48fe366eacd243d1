"""WAL frames a first install writes to the SQLite inventory, and which tables and indexes they are.

    python benchmarks/wal_frames.py [--enrolled 100000] [--installs 3000] [--group 25]
                                    [--seed DIR] [--compare /path/to/other/checkout]
                                    [--what-if SQL] [--then STATE] [--pagetype]

A first ``/ipxe`` of an enrolled machine commits its install plan (the machine with its sealed
install token, its hash, expiry and the request's facts; its ``install-plan`` event;
compare-and-set on the state it was read in) in the recorder's group commit, ~25 machines a
transaction in a storm. This seeds ``--enrolled`` machines with ``netboot import`` as
``http_paths.py`` does (``--seed``: an existing seed's data dir, used read-only), copies the
inventory, and commits ``--installs`` random machines' install plans as ``BootService`` builds
them, ``--group`` per ``apply_batch`` (the recorder's merged batch), with the store's
checkpoints off so that the WAL keeps every frame. It then reads the WAL file (frame headers:
page number, commit marker) and ``dbstat`` (which table or index owns each page, before and after:
a page freed and reused by another during the step is named ``before -> after``) and prints the
frames per install, the commits, the store's writer thread's read and write system calls per
install (/proc/self/task/<tid>/io: the pages its cache does not hold, read back by ``pread``,
and two ``pwrite`` a frame, its header and its page), the pages a checkpoint every N frames
would copy per install (each page once, its last frame: the checkpointer's ``pread`` and
``pwrite`` a page), and per table/index (``--pagetype``: and b-tree page type, leaf or
internal) the frames and distinct pages. Each frame
is a whole page (4 KiB): the checkpoints copy them again into the database. The figure is
deterministic (seeded choice, no load dependence). With ``--compare`` the same on the other
checkout (PYTHONPATH), on its own copy of the same seed. ``--what-if SQL``: run on this tree's
copy first (e.g. ``DROP INDEX machines_state``, or a page size: ``PRAGMA journal_mode=DELETE;
PRAGMA page_size=8192; VACUUM; PRAGMA journal_mode=WAL``), to see what a schema would write.
``--then STATE``: the frames counted are those of a second step of the same machines (each
moved to STATE with an event, e.g. ``installing`` as a config fetch does), after the installs.
Not part of pytest; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import asyncio, collections, dataclasses, json, random, secrets, sqlite3, struct, sys, time
import threading
from pathlib import Path
from typing import Any
from netboot import lifecycle
from netboot.boot import INSTALL_PEER, hash_token
from netboot.inventory import sqlite as nsqlite
from netboot.inventory.base import Batch, MachineFilter
from netboot.model import Event, MachineState
from netboot.sealing import read_key

data, installs, group = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
then = sys.argv[5]
# --pagetype: each page named with its b-tree page's type (leaf, internal, overflow)
owned = ("SELECT pageno, name || ' ' || pagetype FROM dbstat" if sys.argv[6]
         else "SELECT pageno, name FROM dbstat")
db = data / "netboot.db"
if sys.argv[4]:  # --what-if: SQL run on the copy first
    what = sqlite3.connect(db, isolation_level=None)
    what.executescript(sys.argv[4])
    what.close()
nsqlite.SqliteStore._checkpoint_due = lambda self: None  # the WAL keeps every frame

def syscalls(tid):
    # The writer thread's read and write system calls so far (pread, pwrite included).
    fields = dict(line.split(": ") for line in
                  Path(f"/proc/self/task/{tid}/io").read_text().splitlines())
    return [int(fields["syscr"]), int(fields["syscw"])]

async def main():
    store = nsqlite.SqliteStore(db, sealer=read_key(data / "secret.key"))
    await store.open()
    machines = await store.list_machines(MachineFilter(limit=10_000_000))
    chosen = random.Random(12).sample(machines, installs)
    side = sqlite3.connect(db, isolation_level=None)
    side.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # an empty WAL to count from
    before = dict(side.execute(owned))
    writer = store._executor.submit(threading.get_native_id).result()
    io = syscalls(writer)
    cpu = time.process_time()
    for k in range(0, installs, group):
        now = time.time()
        update, events, expect = [], [], {}
        for m in chosen[k:k + group]:
            token = secrets.token_urlsafe(32)
            facts = {**m.facts, "remote_addr": "127.0.0.1", INSTALL_PEER: "127.0.0.1"}
            new = lifecycle.advance(m, lifecycle.Trigger.INSTALL_PLAN, now, facts=facts,
                                    token_hash=hash_token(token), install_token=token,
                                    token_expires=now + 3600, cluster=m.cluster, role=m.role)
            update.append(new)
            events.append(Event(new.id, now, "install-plan", "install profile storm",
                                {"via": "http", "firmware": "unknown", "arch": "unknown",
                                 "mac": str(m.mac), "peer": "127.0.0.1"}))
            expect[m.id] = m.state
        await store.apply_batch(Batch(update=update, events=events, expect=expect))
    cpu = time.process_time() - cpu
    io = [b - a for a, b in zip(io, syscalls(writer))]
    if then:  # the next step of each install (a config fetch: booting -> installing)
        side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        before = dict(side.execute(owned))
        current = {m.id: m for m in await store.list_machines(MachineFilter(limit=10_000_000))}
        io = syscalls(writer)
        cpu = time.process_time()
        for k in range(0, installs, group):
            now = time.time()
            moved = [dataclasses.replace(current[m.id], state=MachineState(then), updated=now)
                     for m in chosen[k:k + group]]
            await store.apply_batch(Batch(update=moved, events=[
                Event(m.id, now, "config", "config fetched", {"peer": "127.0.0.1"})
                for m in moved], expect={m.id: current[m.id].state for m in moved}))
        cpu = time.process_time() - cpu
        io = [b - a for a, b in zip(io, syscalls(writer))]
    wal = Path(str(db) + "-wal").read_bytes()
    page_size = struct.unpack(">I", wal[8:12])[0]
    frames, commits, pages = 0, 0, []
    for off in range(32, len(wal) - 24 - page_size + 1, 24 + page_size):
        pgno, commit = struct.unpack(">II", wal[off:off + 8])
        frames += 1
        commits += commit != 0
        pages.append(pgno)
    owner = dict(side.execute(owned))
    by = collections.defaultdict(lambda: [0, set()])
    for p in pages:
        name = owner.get(p, "(free list / header)" if p != 1 else "(page 1: header, schema)")
        if p in before and before[p] != name:  # freed and taken by another during the step
            name = f"{before[p]} -> {name}"
        by[name][0] += 1
        by[name][1].add(p)
    sizes = {name: [n, len(s)] for name, (n, s) in by.items()}
    # What a checkpoint every N frames copies: each page once, its last frame (the
    # checkpointer's pread from the WAL and pwrite into the database, per page).
    copies = {n: sum(len(set(pages[k:k + n])) for k in range(0, len(pages), n))
              for n in (1000, 2000, 4000, 12000)}
    doc = side.execute("SELECT avg(length(data)) FROM machines").fetchone()[0]
    side.close()
    await store.close()
    print(json.dumps({"frames": frames, "commits": commits, "page_size": page_size,
                      "wal_bytes": len(wal), "by": sizes, "cpu": cpu, "doc": doc, "io": io,
                      "copies": copies}))

asyncio.run(main())
"""


def run(tree: Path, seed: Path, tmp: Path, installs: int, group: int, python: str,
        what_if: str = "", then: str = "", pagetype: bool = False) -> dict[str, Any]:
    data = tmp / f"data-{tree.name}"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(seed, data)
    out = subprocess.run([python, "-c", CHILD, str(data), str(installs), str(group),
                          what_if, then, "1" if pagetype else ""],
                         check=True, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(tree)})
    shutil.rmtree(data)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def show(label: str, r: dict[str, Any], installs: int) -> None:
    print(f"{label}: {r['frames']} frames in {r['commits']} commits, "
          f"{r['frames'] / installs:.2f} frames per install "
          f"({r['wal_bytes'] / installs / 1024:.1f} KiB of WAL), page {r['page_size']} B, "
          f"CPU {r['cpu'] / installs * 1e6:.0f} µs per install, "
          f"machine document {r['doc']:.0f} B on average")
    reads, writes = r["io"]
    print(f"  the writer thread's read and write system calls per install: "
          f"{reads / installs:.2f} and {writes / installs:.2f}")
    print("  page copies per install of a checkpoint every N frames: " + ", ".join(
        f"{n}: {c / installs:.2f}" for n, c in r["copies"].items()))
    print(f"  {'table or index':44} {'frames':>7} {'/install':>9} {'pages':>7}")
    for name, (n, distinct) in sorted(r["by"].items(), key=lambda kv: -kv[1][0]):
        print(f"  {name:44} {n:7} {n / installs:9.2f} {distinct:7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--installs", type=int, default=3000)
    parser.add_argument("--group", type=int, default=25)
    parser.add_argument("--seed", type=Path, help="an existing seed's data dir (read only)")
    parser.add_argument("--compare", type=Path, help="another checkout, run on the same seed")
    parser.add_argument("--what-if", default="", metavar="SQL",
                        help="SQL run on this tree's copy of the seed first (a schema to try)")
    parser.add_argument("--then", default="", metavar="STATE",
                        help="count instead a second step of the same machines, to STATE "
                             "(e.g. installing: a config fetch), each with its event")
    parser.add_argument("--pagetype", action="store_true",
                        help="name each page with its b-tree page type (leaf, internal)")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="netboot-wal-") as tmp_text:
        tmp = Path(tmp_text)
        seed = args.seed
        if seed is None:
            from storm import Workload
            work = Workload(tmp, args.enrolled, args.enrolled, 1 << 16, 1 << 16, managed=False)
            work.build()
            took = work.netboot_seed(args.python)
            print(f"netboot import of {args.enrolled} machines: {took:.1f} s", flush=True)
            seed = work.root / "netboot-seed"
        print(f"{args.installs} first installs of {args.enrolled} machines, "
              f"{args.group} per transaction")
        trees = [("this tree", REPO)] + ([("compare", args.compare)] if args.compare else [])
        for label, tree in trees:
            show(f"{label} ({tree})", run(tree.resolve(), seed, tmp, args.installs, args.group,
                                         args.python, args.what_if if tree == REPO else "",
                                         args.then, args.pagetype),
                 args.installs)


if __name__ == "__main__":
    main()
