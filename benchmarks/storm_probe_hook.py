"""Run inside ``netboot serve`` by storm_probe.py (``python -c <this file's text> serve ...``):
a thread polls ``$PROBE_DIR/cmd`` and writes each command's answer to ``$PROBE_DIR/out``.
Nothing of netboot is changed; the server runs as ``python -m netboot`` would run it.

Commands: ``stats`` (glibc's mallinfo2 over every arena, pymalloc's counts from
sys._debugmallocstats, SQLite's memory, threads, the collector's counts), ``trace N``
(tracemalloc.start(N)), ``snap PATH`` (a tracemalloc snapshot), ``peakwatch PATH`` (a
snapshot each time the traced memory passed its last by 1 MiB, and the series), ``release
NAMES`` (clears the dicts of those attribute names on netboot's objects: what dropping the
caches would give back), ``minfo PATH`` (malloc_info's XML), ``threads``, ``collect``,
``trim`` (malloc_trim(0)), ``census mark`` / ``census PATH`` (the objects in pymalloc pools
that held none at the mark, by type).
"""

import collections
import ctypes
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator

_DIR = os.environ["PROBE_DIR"]
_LIBC = ctypes.CDLL(None)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LIBC.mallinfo2.restype = _MallInfo2
_PYMALLOC_KEYS = ("arenas allocated current", "bytes in allocated blocks",
                  "bytes in available blocks", "unused pools", "bytes lost to pool headers",
                  "bytes lost to quantization", "bytes lost to arena alignment")


def _mallinfo() -> dict[str, int]:
    m = _LIBC.mallinfo2()
    return {k: getattr(m, k) for k, _ in _MallInfo2._fields_}


def _pymalloc() -> dict[str, int]:
    path = f"{_DIR}/pymalloc.txt"
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    out = {}
    with open(path) as fh:
        for raw in fh:
            line = raw.lstrip("# ")
            for key in _PYMALLOC_KEYS:
                if line.startswith(key):
                    out[key] = int(line.split("=")[-1].strip().replace(",", ""))
    return out


def _sqlite_memory() -> list[int]:
    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    lib.sqlite3_memory_highwater.restype = ctypes.c_int64
    return [lib.sqlite3_memory_used(), lib.sqlite3_memory_highwater(0)]


def _sqlite_caches() -> dict[str, int]:
    """Bytes of page cache each of SqliteStore's connections holds (sqlite3_db_status,
    SQLITE_DBSTATUS_CACHE_USED): the writer, reader, pager, probe and checkpointer. The
    handle is read from the Connection object (CPython's struct: the sqlite3 pointer follows
    the object's header); a reading, not netboot's business."""
    import sqlite3

    lib = ctypes.CDLL("libsqlite3.so.0")
    lib.sqlite3_db_status.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_int),
                                      ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    out = {}
    frozen = gc.get_freeze_count()
    gc.unfreeze()  # netboot freezes its heap: the store is in the permanent generation
    found = [o for o in gc.get_objects() if type(o).__name__ == "SqliteStore"]
    if frozen:
        gc.freeze()
    for o in found:
        if type(o).__name__ != "SqliteStore":
            continue
        for name in ("_conn", "_rconn", "_pconn", "_probe", "_cconn"):
            conn = getattr(o, name, None)
            if isinstance(conn, sqlite3.Connection):
                db = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
                cur, high = ctypes.c_int(), ctypes.c_int()
                lib.sqlite3_db_status(db, 1, ctypes.byref(cur), ctypes.byref(high), 0)
                out[name] = cur.value
    return out


def _release(names: list[str]) -> str:
    gc.unfreeze()
    done = []
    try:
        for o in gc.get_objects():
            module = type(o).__dict__.get("__module__", "")
            if not isinstance(module, str) or not module.startswith("netboot"):
                continue
            for name in names:
                value = getattr(o, name, None)
                if isinstance(value, dict):
                    if name == "_answers":  # the DHCP server's: one OrderedDict per listener
                        count = sum(len(v) for v in value.values())
                        for v in value.values():
                            v.clear()
                    else:
                        count = len(value)
                        value.clear()
                    done.append(f"{type(o).__name__}.{name}={count}")
    finally:
        gc.collect()
        gc.freeze()
    return " ".join(done)


_POOLS: set[int] = set()  # "census mark": pymalloc pools (16 KiB) holding objects then


def _each_object() -> Iterator[tuple[object, object]]:
    """Every object the collector tracks (the frozen ones too) and what each refers to
    (strings, bytes, numbers: untracked), some more than once; each with the object that
    refers to it (None: listed by the collector)."""
    gc.unfreeze()  # frozen objects are not listed; netboot freezes again (FrozenHeap)
    try:
        objects = gc.get_objects()
    finally:
        gc.freeze()
    for o in objects:
        yield o, None
        for r in gc.get_referents(o):
            yield r, o


def _kind(o: object) -> str:
    return type(o).__module__ + "." + type(o).__qualname__


def _census(arg: str) -> str:
    """``mark``: remember the pools objects are in now. ``PATH``: the objects (up to 512
    bytes, pymalloc's) in pools not marked, by type: what holds the arenas a storm added."""
    if arg == "mark":
        _POOLS.clear()
        _POOLS.update(id(o) >> 14 for o, _ in _each_object())
        return str(len(_POOLS))
    seen: set[int] = set()
    count: collections.Counter[str] = collections.Counter()
    size: collections.Counter[str] = collections.Counter()
    pools: set[int] = set()
    holders: collections.Counter[str] = collections.Counter()
    big: dict[int, object] = {}  # large containers holding objects in new pools
    for o, holder in _each_object():
        ident = id(o)
        if ident >> 14 in _POOLS:
            continue
        if holder is not None and sys.getsizeof(o) <= 512:
            holders[f"{_kind(o)} <- {_kind(holder)}"] += 1
            if type(holder) in (set, dict, list) and len(holder) > 100:  # type: ignore[arg-type]
                big[id(holder)] = holder
        if ident in seen:
            continue
        n = sys.getsizeof(o)
        if n > 512:
            continue
        seen.add(ident)
        pools.add(ident >> 14)
        name = _kind(o)
        count[name] += 1
        size[name] += n
    with open(arg, "w") as fh:
        json.dump({"pools": len(pools), "objects": len(seen), "bytes": sum(size.values()),
                   "types": [(k, count[k], v) for k, v in size.most_common(60)],
                   "holders": holders.most_common(80),
                   "containers": [(_kind(c), len(c), _owners(c))  # type: ignore[arg-type]
                                  for c in big.values()]}, fh)
    return f"{len(pools)} new pools, {len(seen)} objects, {sum(size.values())} bytes"


def _owners(container: object) -> list[str]:
    """What refers to ``container``: the attribute names of netboot's objects that hold it,
    else the referrers' types."""
    out = []
    for r in gc.get_referrers(container):
        if isinstance(r, dict):
            for owner in gc.get_referrers(r):
                if getattr(owner, "__dict__", None) is r:
                    names = [k for k, v in r.items() if v is container]
                    out.append(f"{_kind(owner)}.{','.join(names)}")
        elif not isinstance(r, list) or len(r) < 100000:
            out.append(_kind(r))
    return out[:6]


def _watch_peak(path: str) -> None:
    best, series = 0, []
    t0 = time.monotonic()
    while True:
        now = tracemalloc.get_traced_memory()[0]
        series.append((round(time.monotonic() - t0, 3), now))
        if now > best + (1 << 20):
            best = now
            tracemalloc.take_snapshot().dump(path)
            series.append(("snap", now))
        if len(series) % 50 == 0:
            with open(path + ".series", "w") as fh:
                json.dump(series, fh)
        time.sleep(0.02)


def _malloc_info(path: str) -> None:
    _LIBC.fopen.restype = ctypes.c_void_p
    _LIBC.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _LIBC.fclose.argtypes = [ctypes.c_void_p]
    fp = _LIBC.fopen(path.encode(), b"w")
    _LIBC.malloc_info(0, fp)
    _LIBC.fclose(fp)


def _handle(command: str) -> str:
    word, _, arg = command.partition(" ")
    if word == "stats":
        return json.dumps({
            "mallinfo2": _mallinfo(), "pymalloc": _pymalloc(), "sqlite_mem": _sqlite_memory(),
            "sqlite_caches": _sqlite_caches(),
            "threads": threading.active_count(), "gc_counts": gc.get_count(),
            "frozen": gc.get_freeze_count(), "gc_objects": len(gc.get_objects()),
            "traced": tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else None})
    if word == "trace":
        tracemalloc.start(int(arg or 16))
    elif word == "snap":
        tracemalloc.take_snapshot().dump(arg)
    elif word == "peakwatch":
        threading.Thread(target=_watch_peak, args=(arg,), daemon=True, name="peakwatch").start()
    elif word == "types":
        return json.dumps(collections.Counter(
            type(o).__name__ for o in gc.get_objects()).most_common(40))
    elif word == "release":
        return _release(arg.split(","))
    elif word == "census":
        return _census(arg)
    elif word == "minfo":
        _malloc_info(arg)
    elif word == "threads":
        return json.dumps([t.name for t in threading.enumerate()])
    elif word == "collect":
        return str(gc.collect())
    elif word == "trim":
        return str(_LIBC.malloc_trim(0))
    else:
        return "?"
    return "ok"


def _poll() -> None:
    while True:
        path = f"{_DIR}/cmd"
        if os.path.exists(path):
            with open(path) as fh:
                command = fh.read().strip()
            os.unlink(path)
            try:
                answer = _handle(command)
            except Exception as exc:  # reported to the prober, the server keeps running
                answer = f"error {exc!r}"
            with open(f"{_DIR}/out.tmp", "w") as fh:
                fh.write(answer)
            os.rename(f"{_DIR}/out.tmp", f"{_DIR}/out")
        time.sleep(0.02)


threading.Thread(target=_poll, daemon=True, name="probe").start()
sys.argv[0] = "netboot"
runpy.run_module("netboot", run_name="__main__")
