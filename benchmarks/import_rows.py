"""How fast a bulk import lands: 100,000 machines in one ``apply_batch`` into a fresh SQLite file.

Run from the repository root: ``PYTHONPATH=. python benchmarks/import_rows.py [rows]`` (or
without PYTHONPATH once netboot is installed). Prints rows/second for the batch alone (the
transaction, encoding included) and the file size, so a regression to per-row commits (minutes
instead of seconds) shows at once.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from netboot.inventory.base import Batch, MachineFilter
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Arch, MacAddress, Machine, MachineState, Role


def machines(count: int) -> list[Machine]:
    return [
        Machine(
            macs=(MacAddress((0x02_00_00_00_00_00 + i).to_bytes(6, "big")),),
            state=MachineState.ENROLLED,
            hostname=f"node-{i:06d}",
            labels={"rack": f"r{i % 40}", "site": "edge-1"},
            cluster=f"c{i % 10}",
            role=Role.AGENT,
            profile="k3os",
            arch=Arch.X86_64,
            created=1_700_000_000.0,
            updated=1_700_000_000.0,
        )
        for i in range(count)
    ]


async def main(count: int) -> None:
    rows = machines(count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inventory.db"
        store = SqliteStore(path)
        await store.open()
        try:
            start = time.perf_counter()
            await store.apply_batch(Batch(create=rows))
            elapsed = time.perf_counter() - start
            stored = await store.count_machines(MachineFilter())
        finally:
            await store.close()
        assert stored == count, (stored, count)
        size = path.stat().st_size
    rate = count / elapsed
    print(f"{count} machines in {elapsed:.2f} s: {rate:,.0f} rows/s ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs="?", type=int, default=100_000,
                        help="machines in the batch (default: 100,000)")
    asyncio.run(main(parser.parse_args().rows))
