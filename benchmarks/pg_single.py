"""What a PostgreSQL single-statement write costs: round trips and wall time per call.

    python benchmarks/pg_single.py [--calls 2000] [--rounds 5] [--compare /other/checkout ...]

A token's touch (``touch_token``: every API request with a bearer token, at most every
TOUCH_EVERY per token) and an audit entry (``add_audit``: every API change) are each one
statement. On the throwaway cluster of :mod:`netboot.lab.pgcluster` (a unix socket, no
fsync), each checkout in turn (PYTHONPATH; order alternating by round) opens a store on a
fresh schema, counts the queries one call sends (asyncpg's ``execute``/``fetch*`` counted:
BEGIN, COMMIT and the pool's reset at release each go through ``execute``; one query is one
round trip), then times ``--calls`` sequential touches (wall, and the client process's
CPU for the touches), audit entries and reads of a token
(``token_by_hash``: a query, then the connection's release). Prints each
checkout's median µs per call over the rounds, and the ratio to the first checkout.
Not part of pytest; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import asyncio, json, sys, time
import asyncpg
from netboot.inventory.postgres import PostgresStore
from netboot.model import ApiToken, AuditEntry, Scope

dsn, calls = sys.argv[1], int(sys.argv[2])

async def main():
    store = PostgresStore(dsn)
    await store.open()
    await store.create_token(ApiToken(name="t", sha256="0" * 64, scope=Scope.ADMIN,
                                      created=1.0))
    entry = AuditEntry(time=1.0, actor="a", action="x", target="t", peer="p", outcome="done")
    sent = []
    real = {m: getattr(asyncpg.Connection, m) for m in ("execute", "fetch", "fetchrow",
                                                         "fetchval")}
    def counting(m):
        def counted(self, query, *a, **kw):
            sent.append(query)
            return real[m](self, query, *a, **kw)
        return counted
    for m in real:
        setattr(asyncpg.Connection, m, counting(m))
    await store.touch_token("t", 2.0)
    touch = list(sent); sent.clear()
    await store.add_audit(entry)
    audit = list(sent)
    for m, f in real.items():
        setattr(asyncpg.Connection, m, f)
    for i in range(50):  # warm: statements prepared, pool connection open
        await store.touch_token("t", float(i))
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(calls):
        await store.touch_token("t", float(i))
    c1, t1 = time.process_time(), time.perf_counter()
    for i in range(calls):
        await store.add_audit(entry)
    t2 = time.perf_counter()
    for i in range(calls):
        await store.token_by_hash("0" * 64)
    t3 = time.perf_counter()
    await store.close()
    print(json.dumps({"touch_queries": touch, "audit_queries": audit,
                      "touch_us": (t1 - t0) / calls * 1e6,
                      "touch_cpu_us": (c1 - c0) / calls * 1e6, "audit_us": (t2 - t1) / calls * 1e6,
                      "read_us": (t3 - t2) / calls * 1e6}))

asyncio.run(main())
"""


def main() -> None:
    from netboot.lab.pgcluster import running, schema_sync

    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", action="append", default=[], type=Path)
    args = ap.parse_args()
    trees = [REPO, *(p.resolve() for p in args.compare)]
    results: dict[Path, list[dict[str, object]]] = {t: [] for t in trees}
    with running() as cluster:
        for r in range(args.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for tree in order:
                with schema_sync(cluster) as dsn:
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, dsn, str(args.calls)], check=True,
                        capture_output=True, text=True, cwd=tree,
                        env={**os.environ, "PYTHONPATH": str(tree)})
                results[tree].append(json.loads(out.stdout))
    first: tuple[float, float, float] | None = None
    for tree in trees:
        rows = results[tree]
        touches = [float(str(x["touch_us"])) for x in rows]
        audits = [float(str(x["audit_us"])) for x in rows]
        reads = [float(str(x["read_us"])) for x in rows]
        cpus = [float(str(x["touch_cpu_us"])) for x in rows]
        touch, audit = statistics.median(touches), statistics.median(audits)
        read = statistics.median(reads)
        first = first or (touch, audit, read)
        print(tree)
        for what in ("touch", "audit"):
            queries = rows[0][f"{what}_queries"]
            assert isinstance(queries, list)
            print(f"  queries per {what}: {len(queries)} {queries}")
        print(f"  touch_token {touch:.0f} us/call, x{touch / first[0]:.2f};"
              f" rounds {[round(x) for x in touches]}")
        print(f"  touch_token client CPU {statistics.median(cpus):.0f} us/call;"
              f" rounds {[round(x) for x in cpus]}")
        print(f"  add_audit {audit:.0f} us/call, x{audit / first[1]:.2f};"
              f" rounds {[round(x) for x in audits]}")
        print(f"  token_by_hash (a read) {read:.0f} us/call, x{read / first[2]:.2f};"
              f" rounds {[round(x) for x in reads]}")

if __name__ == "__main__":
    main()
