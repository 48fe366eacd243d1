"""A dashboard search by text with 100,000 machines: ``GET /machines?q=`` as the store answers
it (``list_machines`` for the first page of 50, then ``count_machines``, as api.py asks).

    PYTHONPATH=. python benchmarks/search_text.py [--machines N] [--runs R] [--dsn DSN]

Builds a fleet once (SQLite in a temporary directory, or the PostgreSQL of ``--dsn``: its
tables are emptied first, use a scratch database) with MACs, hostnames, serials, UUIDs,
asset tags and labels, then times each search ``--runs`` times: a whole MAC, a MAC's tail,
a hostname, a hostname's middle, a serial, a UUID's head, a string that matches nothing,
one that matches a tenth of the fleet and one that matches all of it; as api.py asks, so on
a tree whose view finds the ids (``InventoryView.matching_text``) the view is loaded first
and searched. Prints the median and spread in ms, and the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import statistics
import tempfile
import time
import uuid as uuidlib
from pathlib import Path

from netboot import api
from netboot.inventory.base import Batch, MachineFilter, Store
from netboot.inventory.view import InventoryView
from netboot.model import Arch, MacAddress, Machine, MachineState, Role


def _uuid(i: int) -> str:
    return str(uuidlib.UUID(bytes=hashlib.md5(str(i).encode()).digest(), version=4))


def machines(count: int) -> list[Machine]:
    return [
        Machine(
            macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
            state=MachineState.ENROLLED,
            hostname=f"node-{i:06d}",
            serial=f"SN{i * 7919 % 10**8:08d}",
            uuid=_uuid(i),
            asset=f"AT-{i:06d}",
            labels={"rack": f"r{i % 2500}", "site": "edge-1"},
            cluster=f"c{i % 8}",
            role=Role.AGENT,
            profile="k3os",
            arch=Arch.X86_64,
            created=1_700_000_000.0,
            updated=1_700_000_000.0,
        )
        for i in range(count)
    ]


def searches(count: int) -> list[str]:
    mid = count // 2
    mac = str(MacAddress((0x02_00_00_00_00_00 + mid).to_bytes(6, "big")))
    return [mac, mac[-5:], f"node-{mid:06d}", f"de-{mid:06d}"[:7], f"SN{mid * 7919 % 10**8:08d}",
            _uuid(mid)[:8],
            "no-such-thing", "node-01", "node"]


async def run(store: Store, count: int, runs: int) -> None:
    await store.open()
    try:
        if await store.count_machines(MachineFilter()) != count:
            t0 = time.perf_counter()
            await store.apply_batch(Batch(create=machines(count)))
            print(f"built {count} machines in {time.perf_counter() - t0:.1f} s", flush=True)
        view = InventoryView(store)
        if hasattr(view, "matching_text"):  # this tree finds the ids in the loaded view
            t0 = time.perf_counter()
            await view.load()
            print(f"view loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        for text in searches(count):
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                flt = MachineFilter(text=text, limit=50)
                if view.loaded:  # as api.py asks (Boot.matching_text, TEXT_IDS_MAX)
                    await view.sync()
                    found = view.matching_text(text, getattr(api, "TEXT_IDS_MAX", None))
                    if found is not None:
                        flt = dataclasses.replace(flt, ids=frozenset(found))
                page = await store.list_machines(flt)
                total = await store.count_machines(flt)
                times.append((time.perf_counter() - t0) * 1000)
            print(f"{text!r:>40}: {statistics.median(times):8.1f} ms"
                  f" ({min(times):.1f}-{max(times):.1f}) page {len(page)} total {total}",
                  flush=True)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dsn", help="a scratch PostgreSQL database (emptied)")
    parser.add_argument("--db", type=Path, help="a SQLite file to build or reuse")
    args = parser.parse_args()
    if args.dsn:
        from netboot.inventory.postgres import PostgresStore
        asyncio.run(run(PostgresStore(args.dsn), args.machines, args.runs))
        return
    from netboot.inventory.sqlite import SqliteStore
    if args.db:
        asyncio.run(run(SqliteStore(args.db), args.machines, args.runs))
        return
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(SqliteStore(Path(tmp) / "inventory.db"), args.machines, args.runs))


if __name__ == "__main__":
    main()
