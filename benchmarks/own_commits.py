"""What a server's view reads back of its own group commits when another server commits too.

    python benchmarks/own_commits.py [--store sqlite|postgresql] [--machines 2000]
                                     [--group 128] [--rounds 40] [--baseline OTHER_TREE]

Two store objects on one inventory, as two servers (SQLite: two connections to one file;
PostgreSQL: two pools on one schema of a throwaway cluster, netboot.lab.pgcluster): "this"
server, whose view is loaded, and "another". Each round, this server commits a group of
``--group`` machines (a recorder's group commit: each machine's facts changed), the other
server commits a group of other machines, and this server's view syncs: the sync's feed
range holds an own commit and another's, what a storm served by two servers meets at
nearly every sync. Said per sync: the machines the store decoded (read back) and the CPU
of the sync (the process's, the store's reader thread included), medians over the rounds.
``--baseline``: the same in another checkout, alternating round by round in child
processes (one process per tree per run, the rounds interleaved by running both
children at once). Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def measure(kind: str, where: str, machines: int, group: int,
                  rounds: int) -> dict[str, float]:
    from dataclasses import replace

    from netboot.inventory.base import Batch
    from netboot.inventory.view import InventoryView
    from netboot.model import MacAddress, Machine

    if kind == "sqlite":
        from netboot.inventory.sqlite import SqliteStore

        this, other = SqliteStore(Path(where) / "netboot.db"), SqliteStore(
            Path(where) / "netboot.db")
    else:
        from netboot.inventory.postgres import PostgresStore

        this, other = PostgresStore(where), PostgresStore(where)
    await this.open()
    await other.open()
    try:
        fleet = [Machine(macs=(MacAddress.parse(f"02:00:00:{i >> 16 & 255:02x}:"
                                                f"{i >> 8 & 255:02x}:{i & 255:02x}"),),
                         hostname=f"n{i}") for i in range(machines)]
        await this.apply_batch(Batch(create=fleet))
        view = InventoryView(this)
        await view.load()
        decoded = [0]
        if kind == "sqlite":
            sealed = this._sealed  # type: ignore[attr-defined]
            opened = sealed.open_machine

            def counted_open(machine: object, **kw: object) -> object:
                decoded[0] += machine is not None
                return opened(machine, **kw)

            sealed.open_machine = counted_open
        else:
            decode = this._machine  # type: ignore[attr-defined]

            def counted_decode(text: object, *args: object) -> object:
                decoded[0] += text is not None
                return decode(text, *args)

            this._machine = counted_decode  # type: ignore[attr-defined]
        per_sync: list[int] = []
        cpu: list[float] = []
        half = machines // 2
        for r in range(rounds):
            mine = [replace(m, facts={"round": str(r)}, updated=float(r + 1))
                    for m in fleet[(r * group) % half:][:group]]
            theirs = [replace(m, facts={"round": str(r)}, updated=float(r + 1))
                      for m in fleet[half + (r * group) % half:][:group]]
            await this.apply_batch(Batch(update=mine))
            view.adopt(mine, {})  # as the recorder adopts its group commit
            await other.apply_batch(Batch(update=theirs))
            before, t0 = decoded[0], time.process_time()
            await view.sync()
            cpu.append(time.process_time() - t0)
            per_sync.append(decoded[0] - before)
            held = await view.get_machine(theirs[0].id)
            assert held is not None and held.facts == {"round": str(r)}
        return {"decoded": statistics.median(per_sync),
                "cpu_us": statistics.median(cpu) * 1e6,
                "cpu_mean_us": statistics.fmean(cpu) * 1e6}
    finally:
        await this.close()
        await other.close()


def child(args: argparse.Namespace) -> None:
    print(json.dumps(asyncio.run(measure(args.store, args.where, args.machines, args.group,
                                         args.rounds))), flush=True)


def _fresh(kind: str, stack: contextlib.ExitStack) -> list[str]:
    """Two places to run in, one per tree: SQLite directories, PostgreSQL schemas."""
    if kind == "sqlite":
        return [stack.enter_context(tempfile.TemporaryDirectory()) for _ in range(2)]
    from netboot.lab.pgcluster import running, schema_sync

    cluster = stack.enter_context(running())
    return [stack.enter_context(schema_sync(cluster)) for _ in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--machines", type=int, default=2000)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, metavar="TREE")
    parser.add_argument("--child", metavar="WHERE", dest="where", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.where:
        child(args)
        return
    trees = {"netboot": REPO, **({"baseline": args.baseline.resolve()} if args.baseline
                                  else {})}
    for run in range(1, args.runs + 1):
        with contextlib.ExitStack() as stack:
            places = _fresh(args.store, stack)
            children = {
                name: subprocess.Popen(
                    [sys.executable, __file__, "--store", args.store, "--machines",
                     str(args.machines), "--group", str(args.group), "--rounds",
                     str(args.rounds), "--child", where], stdout=subprocess.PIPE, text=True,
                    env={**os.environ, "PYTHONPATH": str(tree)})
                for (name, tree), where in zip(trees.items(), places, strict=False)}
            line = f"run {run} ({args.store}, load {os.getloadavg()[0]:.1f}):"
            for name, proc in children.items():
                out, _ = proc.communicate(timeout=1800)
                if proc.returncode != 0:
                    raise SystemExit(f"{name}'s child failed ({proc.returncode})")
                got = json.loads(out.strip().splitlines()[-1])
                line += (f"  {name}: {got['decoded']:.0f} machines decoded a sync,"
                         f" CPU {got['cpu_us']:,.0f} µs a sync (mean {got['cpu_mean_us']:,.0f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()
