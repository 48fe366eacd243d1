"""Imported by a ``netboot serve`` that storm_memory_dumps.py starts (this folder on its
PYTHONPATH): on SIGUSR1 the process writes what its memory is made of into $MEMDUMP_DIR, as
``dumpN.*`` (N counting the signals): ``.pymalloc`` (sys._debugmallocstats() and glibc's
malloc_stats()), ``.smaps`` (/proc/self/smaps), with MEMDUMP_TYPES=1 ``.types.json`` (a
count and a sys.getsizeof sum per type over gc.get_objects(), the frozen heap thawed for
it and frozen again; with MEMDUMP_BIG=N too, its N largest dicts, lists, sets and deques by
sys.getsizeof, each with its length and who holds it: an object's type and attribute),
with MEMDUMP_TRACE=N a tracemalloc snapshot ``.trace`` (tracing of N
frames starts at the first signal: what is traced is what came after it); ``.done`` last.
Diagnosis only (s35-mem): the dumps cost the server time; tracing slows a storm severalfold.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

_DIR = os.environ.get("MEMDUMP_DIR")


def _dump(signum: int, frame: FrameType | None) -> None:
    import collections
    import contextlib
    import ctypes
    import gc
    import json
    import shutil
    import tracemalloc
    from collections import deque

    n = _count[0]
    _count[0] += 1
    assert _DIR is not None
    base = os.path.join(_DIR, f"dump{n}")
    fd = os.open(base + ".pymalloc", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)  # both write to the C stderr
    try:
        sys._debugmallocstats()
        with contextlib.suppress(AttributeError, OSError):  # not glibc
            ctypes.CDLL(None).malloc_stats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    shutil.copyfile(f"/proc/{os.getpid()}/smaps", base + ".smaps")
    if os.environ.get("MEMDUMP_TYPES"):
        frozen = gc.get_freeze_count()
        gc.unfreeze()  # gc.get_objects() leaves the frozen (permanent) generation out
        objects = gc.get_objects()
        counts: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for o in objects:
            name = type(o).__qualname__
            counts[name] += 1
            sizes[name] += sys.getsizeof(o)
        big = []
        if os.environ.get("MEMDUMP_BIG"):  # the largest containers, by their holder
            sized = sorted((o for o in objects if isinstance(o, (dict, list, set, deque))),
                           key=sys.getsizeof, reverse=True)[:int(os.environ["MEMDUMP_BIG"])]
            for o in sized:
                holders = []
                for r in gc.get_referrers(o):
                    if r is objects or r is sized:
                        continue
                    if isinstance(r, dict):
                        names = [k for k, v in r.items() if v is o][:1]
                        owners = [type(h).__qualname__ for h in gc.get_referrers(r)
                                  if getattr(h, "__dict__", None) is r][:1]
                        holders.append(f"{owners}.{names}")
                    else:
                        holders.append(type(r).__qualname__)
                big.append([type(o).__qualname__, sys.getsizeof(o), len(o), holders[:3]])
            del sized
        del objects
        gc.freeze()
        with open(base + ".types.json", "w") as out:
            json.dump({"frozen": frozen, "count": counts.most_common(300),
                       "size": sizes.most_common(300), "big": big}, out)
    if os.environ.get("MEMDUMP_TRACE"):
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(base + ".trace")
        else:
            tracemalloc.start(int(os.environ["MEMDUMP_TRACE"]))
    open(base + ".done", "w").close()


_count = [0]
if _DIR:
    signal.signal(signal.SIGUSR1, _dump)
