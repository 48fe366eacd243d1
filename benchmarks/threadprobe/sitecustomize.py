"""Imported by a ``netboot serve`` whose PYTHONPATH ends with this folder (storm.py's
``--python benchmarks/threadprobe/python``): with $THREADPROBE set, the server writes
``$THREADPROBE.<pid>.json`` at exit (relative paths: the run's directory, where storm.py
starts it):

- ``series``: every 0.2 s, per thread (``name/native id``): its CPU (schedstat's run time,
  ns), its read and write system calls and bytes (/proc task io: syscr, syscw, rchar,
  wchar) and its user and system ticks (stat), with the wall time;
- ``gc``: every collection of the cyclic collector: when it ended (wall), its generation,
  its wall and thread CPU seconds, what it collected, its thread, and for a full one the
  six innermost Python frames that were running when it started (who allocated); with
  THREADPROBE_WALK=1 also the objects it walked (len(gc.get_objects(g)) at its start: a cost
  of its own).

``storm_threads.py RUN_DIR...`` sums them over each storm (s36-storm). Diagnosis only: the
sampling thread costs ~0.2 s of CPU in a 1,000-device storm.
"""

from __future__ import annotations

import os


def _probe() -> None:
    out = os.environ.get("THREADPROBE")
    if not out:
        return
    try:
        with open("/proc/self/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return
    if b"serve" not in argv:  # the CLI's other commands (the seed's import) run unprobed
        return
    import atexit
    import gc
    import json
    import sys
    import threading
    import time
    from typing import Any

    walk = os.environ.get("THREADPROBE_WALK") == "1"
    events: list[Any] = []
    starts: dict[int, tuple[float, float, int, list[str]]] = {}

    def collected(phase: str, info: dict[str, int]) -> None:
        generation = info["generation"]
        if phase == "start":
            walked = sum(len(gc.get_objects(g)) for g in range(generation + 1)) if walk else -1
            frame, where = sys._getframe(1), []
            while frame is not None and len(where) < 6:
                where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            starts[generation] = (time.perf_counter(), time.thread_time(), walked, where)
            return
        now, cpu = time.perf_counter(), time.thread_time()
        began, cpu0, walked, where = starts.pop(generation, (now, cpu, -1, []))
        events.append((time.time(), generation, now - began, info.get("collected", 0),
                       threading.current_thread().name, cpu - cpu0, walked,
                       where if generation == 2 else None))

    gc.callbacks.insert(0, collected)
    series: list[dict[str, Any]] = []
    stop: list[bool] = []

    def thread_row(tid: int) -> list[int]:
        with open(f"/proc/self/task/{tid}/schedstat") as fh:
            run_ns = int(fh.read().split()[0])
        with open(f"/proc/self/task/{tid}/stat") as fh:
            stat = fh.read().rsplit(")", 1)[1].split()
        io: dict[str, int] = {}
        with open(f"/proc/self/task/{tid}/io") as fh:
            for line in fh:
                key, value = line.split(":")
                io[key] = int(value)
        return [run_ns, io.get("syscr", 0), io.get("syscw", 0), io.get("rchar", 0),
                io.get("wchar", 0), int(stat[11]), int(stat[12])]

    def sample() -> None:
        while not stop:
            row: dict[str, Any] = {"t": time.time()}
            for thread in threading.enumerate():
                try:
                    row[f"{thread.name}/{thread.native_id}"] = thread_row(thread.native_id or 0)
                except (OSError, ValueError):
                    continue  # ended meanwhile
            series.append(row)
            time.sleep(0.2)

    def dump() -> None:
        stop.append(True)
        with open(f"{out}.{os.getpid()}.json", "w") as fh:
            json.dump({"gc": events, "series": series}, fh)

    threading.Thread(target=sample, name="threadprobe", daemon=True).start()
    atexit.register(dump)


_probe()
