"""A profile's delete on a large SQLite inventory: the CPU its write transaction takes.

``delete_profile(unused=True)`` looks, with the write lock held, for a machine naming the
profile (s41-integrity); every boot's write waits for it meanwhile. Until s42-integrity it
read every machine's document (json_extract); since, the indexed ``profile`` column (sqlite.py
migration 8). Made on ``--machines`` machines (a third naming a profile in use), then
``--deletes`` creates and deletes of an unused profile, timed by this process's CPU clock
(the store's worker thread is this process's): the delete's CPU is its lock time.

A/B: run it with each tree first on the path::

    PYTHONPATH=/work/wt/s42-base python benchmarks/profile_delete.py
    PYTHONPATH=. python benchmarks/profile_delete.py
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import netboot
from netboot.inventory.base import Batch
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine, Profile


async def run(machines: int, deletes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "inv.db")
        await store.open()
        try:
            await store.put_profile(Profile(name="used", kernel="vmlinuz"), create=True)
            await store.apply_batch(Batch(create=[
                Machine(macs=(MacAddress((0x0200_0000_0000 + i).to_bytes(6, "big")),),
                        profile="used" if i % 3 == 0 else None) for i in range(machines)]))
            spent = []
            for _ in range(deletes):
                await store.put_profile(Profile(name="spare", kernel="vmlinuz"), create=True)
                start = time.process_time()
                await store.delete_profile("spare", unused=True)
                spent.append(time.process_time() - start)
        finally:
            await store.close()
    spent.sort()
    print(f"{netboot.__file__}: {machines} machines, delete_profile(unused=True) CPU ms: "
          f"median {spent[len(spent) // 2] * 1000:.2f}, min {spent[0] * 1000:.2f}, "
          f"max {spent[-1] * 1000:.2f} ({deletes} deletes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--deletes", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.machines, args.deletes))


if __name__ == "__main__":
    main()
