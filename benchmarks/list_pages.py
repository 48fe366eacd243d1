"""What a page of the dashboard's machine list costs the store, by how far down the list it
is: the reads ``GET /api/v1/machines?offset=N&limit=50`` makes (the page and the count), on
a copy of a seeded SQLite inventory, in the process's CPU time (the store's reader thread
included), median of ``--rounds``.

    python benchmarks/list_pages.py --seed DIR [--rounds 15] [--sort mac]

DIR: ``benchmarks/dashboard_storm.py --make-seed DIR`` (100,000 machines). Run it from each
tree with ``PYTHONPATH=<tree>`` (its ``netboot`` imported, not the venv's editable one) to
compare them, side by side: a tree whose Api has ``_page``
reads a far page from the list's other end (s47-dash); before, the page and the count.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from netboot.api import Api
from netboot.inventory.base import MachineFilter
from netboot.inventory.sqlite import SqliteStore


async def page(store: SqliteStore, flt: MachineFilter) -> tuple[list[Any], int]:
    """The reads the API makes for a page (``Api._page`` where the tree has it)."""
    read = getattr(Api, "_page", None)
    if read is not None:
        result: tuple[list[Any], int] = await read(SimpleNamespace(_store=store), flt)
        return result
    return await store.list_machines(flt), await store.count_machines(flt)


async def main(seed: Path, rounds: int, sort: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(seed / "netboot.db", Path(tmp) / "netboot.db")
        store = SqliteStore(Path(tmp) / "netboot.db")
        await store.open()
        try:
            total = await store.count_machines(MachineFilter())
            for name, offset in (("first", 0), ("middle", total // 2),
                                 ("1,000 from the end", total - 1000), ("last", total - 50)):
                flt = MachineFilter(sort=sort, limit=50, offset=offset)
                times = []
                for _ in range(rounds):
                    start = time.process_time()
                    items, _ = await page(store, flt)
                    times.append(time.process_time() - start)
                print(f"{sort} {name:>20} (offset {offset:>6}): "
                      f"{statistics.median(times) * 1000:7.2f} ms CPU, {len(items)} rows, "
                      f"first {items[0].hostname if items else '-'}")
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sort", default="mac")
    args = parser.parse_args()
    asyncio.run(main(args.seed, args.rounds, args.sort))
