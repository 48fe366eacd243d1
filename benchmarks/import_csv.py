"""A factory-floor import end to end: ``netboot import`` of a 100,000-row CSV into SQLite.

Measures what an operator waits for: parsing the CSV, validating every row (MAC, hostname,
cluster/profile references, duplicates in the file and against the inventory), hostname
templates for unnamed rows, and the one transaction. Then imports the same file again, which
must change nothing. Run: ``python benchmarks/import_csv.py [rows]``.

``--fixed``: every row gives its machine a fixed_ipv4 (10.x.y.z by row), and a third import
moves ``--moved`` rows (1,000) to new addresses: the import that writes new addresses, under
the fixed-address lock (s41-integrity: 6.1 s of CPU on main then, 8.2 with its re-check of
every holder; s42-integrity leaves that check to the store's unique index). A/B: run it with
each tree first on the path (``PYTHONPATH=TREE``; the script's own directory, not the
working directory, is ``sys.path[0]``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from netboot.enroll import Enroller, iter_import
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Cluster, Profile


def csv_text(rows: int, fixed: bool = False, moved: int = 0) -> str:
    lines = ["mac,hostname,serial,cluster,role,profile,label.rack"
             + (",fixed_ipv4" if fixed else "")]
    for i in range(rows):
        mac = (0x02_00_00_00_00_00 + i).to_bytes(6, "big").hex(":")
        # Every fourth row has no hostname: the template names it.
        host = f"edge-{i:06d}" if i % 4 else ""
        line = f"{mac},{host},SN{i:07d},line-{i % 8},agent,k3os,r{i % 40}"
        if fixed:  # 10.x.y.z by row; the first ``moved`` rows to 10.128+.y.z
            n = i + (1 << 23 if i < moved else 0)
            line += f",10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        lines.append(line)
    return "\n".join(lines) + "\n"


async def main(rows: int, fixed: bool = False, moved: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db")
        await store.open()
        for c in range(8):
            await store.put_cluster(Cluster(name=f"line-{c}", token="t"))
        await store.put_profile(Profile(name="k3os", kernel="vmlinuz"))
        enroller = Enroller(store, hostname_template="edge-{serial}")
        text = csv_text(rows, fixed)
        t0, c0 = time.perf_counter(), time.process_time()
        parsed = iter_import(text, "csv")
        report = await enroller.import_rows(parsed)
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        del parsed
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert report.applied and len(report.created) == rows, report.errors[:3]
        t0, c0 = time.perf_counter(), time.process_time()
        again = await enroller.import_rows(iter_import(text, "csv"))
        second, second_cpu = time.perf_counter() - t0, time.process_time() - c0
        assert not again.created and not again.changed
        third = ""
        if fixed:
            text = csv_text(rows, fixed, moved)
            t0, c0 = time.perf_counter(), time.process_time()
            report = await enroller.import_rows(iter_import(text, "csv"))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            assert report.applied and len(report.changed) == moved, report.errors[:3]
            third = (f"; re-import giving {moved} machines new fixed addresses: {wall:.2f} s "
                     f"wall, {cpu:.2f} s CPU")
        # The process's peak so far: the re-import's, where it exceeds the first import's (a
        # re-import holds the inventory it compares with).
        peak_again = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        await store.close()
    # CPU seconds (all threads) beside wall time: on a shared machine the wall time says as
    # much about the neighbours as about the import.
    print(f"import of {rows} CSV rows: {first:.2f} s wall, {first_cpu:.2f} s CPU "
          f"({rows / first:,.0f} rows/s), peak RSS {peak:.0f} MiB (CSV text included); "
          f"re-import (no change): {second:.2f} s wall, {second_cpu:.2f} s CPU, "
          f"peak RSS {peak_again:.0f} MiB{third}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="?", type=int, default=100_000,
                        help="rows in the CSV (default: 100,000)")
    parser.add_argument("--fixed", action="store_true",
                        help="a fixed_ipv4 on every row, and a third import moving --moved")
    parser.add_argument("--moved", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.fixed, args.moved))
