"""Imported by a ``netboot serve`` whose PYTHONPATH ends with this folder (storm.py's
``--python benchmarks/tailwaits/python``): the server writes ``$TAILWAITS.<pid>.json`` (in
the run's directory) at exit, with, in perf_counter ns:

- ``commits``: each ``Recorder.commit`` (what a request that must be durable waits for):
  entered, returned, its updates and events, and as it returned the loop thread's CPU, the
  process's CPU and the loop thread's schedstat (on a CPU, waiting for one);
- ``writes``: each ``Recorder._write``: begun, ended, strict (a group commit) or not (the
  background notes' flush), its commits, the notes and learnt facts queued as it began,
  its updates and events;
- ``applies``: each ``SqliteStore._apply_here`` on the writer thread: begun, ended, its
  thread CPU, updates and creates;
- ``checkpoints``: each WAL checkpoint (the checkpointer's passes, the writer's own).

``tail_waits.py RUN_DIR/tailwaits.*.json`` says what a tail commit waited for (s39-tail).
Diagnosis only: the wrappers cost the loop a few µs a commit.
"""

from __future__ import annotations

import os


def _probe() -> None:
    out = os.environ.get("TAILWAITS")
    if not out:
        return
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            if b"serve" not in fh.read().split(b"\0"):
                return
    except OSError:
        return
    import atexit
    import json
    import threading
    import time
    from typing import Any

    from netboot import recorder
    from netboot.inventory import sqlite

    ns = time.perf_counter_ns
    found: dict[str, list[Any]] = {"commits": [], "writes": [], "applies": [],
                                   "checkpoints": []}
    tid = threading.get_native_id()

    def sched() -> list[int]:
        with open(f"/proc/self/task/{tid}/schedstat") as fh:
            return [int(x) for x in fh.read().split()[:2]]

    commit = recorder.Recorder.commit

    async def committing(self: Any, batch: Any, **kw: Any) -> None:
        t = ns()
        try:
            await commit(self, batch, **kw)
        finally:
            found["commits"].append((t, ns(), len(batch.update), len(batch.events),
                                     time.thread_time_ns(), time.process_time_ns(), *sched()))

    write = recorder.Recorder._write

    async def writing(self: Any, batch: Any, *, strict: bool = False, commits: Any = ()
                      ) -> None:
        t, queued, learned = ns(), len(self._queue), len(self._learned)
        try:
            await write(self, batch, strict=strict, commits=commits)
        finally:
            found["writes"].append((t, ns(), int(strict), len(commits), queued, learned,
                                    len(batch.update), len(batch.events)))

    apply = sqlite.SqliteStore._apply_here

    def applying(self: Any, conn: Any, create: Any, update: Any, *rest: Any) -> None:
        t, cpu = ns(), time.thread_time_ns()
        try:
            apply(self, conn, create, update, *rest)
        finally:
            found["applies"].append((t, ns(), time.thread_time_ns() - cpu, len(update),
                                     len(create)))

    def timed(name: str) -> None:
        f = getattr(sqlite.SqliteStore, name)

        def run(self: Any, *a: Any) -> None:
            t = ns()
            try:
                f(self, *a)
            finally:
                found["checkpoints"].append((t, ns(), name))

        setattr(sqlite.SqliteStore, name, run)

    recorder.Recorder.commit = committing  # type: ignore[method-assign]
    recorder.Recorder._write = writing  # type: ignore[method-assign]
    sqlite.SqliteStore._apply_here = applying  # type: ignore[method-assign]
    timed("_checkpoint")
    timed("_checkpoint_here")

    def dump() -> None:
        with open(f"{out}.{os.getpid()}.json", "w") as fh:
            json.dump(found, fh)

    atexit.register(dump)


_probe()
