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
that held none at the mark, by type), ``exec PATH`` (a file of Python run here, the prober's
own; what it leaves in ``answer`` is the answer).
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
from typing import Any

_DIR = os.environ["PROBE_DIR"]
_LIBC = ctypes.CDLL(None)
_IMPORTED_BY: dict[str, list[str]] = {}


class _ImportTracer:
    """Records, for each module imported after the hook, the importing frames (file:line)."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name not in _IMPORTED_BY:
            frames = []
            f = sys._getframe(1)
            while f is not None:
                file = f.f_code.co_filename
                if "importlib" not in file and "<frozen" not in file:
                    frames.append(f"{file.rsplit('site-packages/', 1)[-1]}:{f.f_lineno}")
                f = f.f_back
            _IMPORTED_BY[name] = frames[:12]


sys.meta_path.insert(0, _ImportTracer)


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


def _new_text(text: str | None) -> str | None:
    # A new string object of the same value ("" and one Latin-1 character are singletons).
    return None if text is None else (text + " ")[:-1]


def _fresh_copy(machine: Any) -> Any:
    """An equal machine whose own objects are new: the machine, its facts (a new dict, the
    names interned, new value strings), its last address, token hash, install token, token
    expiry and update time. What it shares is kept: the MACs and the identifiers (the view's
    index keys), the hostname, the labels (SharedMaps), the interned cluster and profile,
    the creation time (SharedMaps.time; an update time equal to it stays that object)."""
    from netboot.model import machine_of_values

    m = machine
    facts = m.facts
    if facts:
        facts = {sys.intern(k): (v + " ")[:-1] for k, v in facts.items()}
    expires = None if m.token_expires is None else m.token_expires * 1.0
    return machine_of_values((
        m.macs, m.id, m.state, m.hostname, m.uuid, m.serial, m.asset, m.labels, m.cluster,
        m.role, m.profile, m.loader, m.arch, m.firmware, _new_text(m.ipv4), m.fixed_ipv4,
        facts, _new_text(m.token_hash), expires, _new_text(m.install_token), m.created,
        m.updated if m.updated is m.created else m.updated * 1.0))


def _compact() -> str:
    """Experiment (session 14, s14-compact): each machine of the view in a pool not marked
    (a version adopted during the storm) replaced by a fresh copy (_fresh_copy), in the
    view and in the caches that hold it by identity (BootService._seen, Recorder._last);
    then what still holds the old objects. Run from the probe's thread: only once the
    server is quiet."""
    gc.unfreeze()
    try:
        objects = gc.get_objects()
        views = [o for o in objects if type(o).__name__ == "InventoryView"]
        boots = [o for o in objects if type(o).__name__ == "BootService"]
        recorders = [o for o in objects if type(o).__name__ == "Recorder"]
        del objects
        swap: dict[int, object] = {}
        old = []
        t0 = time.perf_counter()
        for view in views:
            held = view._machines
            for mid, m in list(held.items()):
                if m is not None and id(m) >> 14 not in _POOLS:
                    new = _fresh_copy(m)
                    held[mid] = new
                    swap[id(m)] = new
                    old.append(m)
            for servers in view._servers.values():
                for mid, m in list(servers.items()):
                    if id(m) in swap:
                        servers[mid] = swap[id(m)]
        took = time.perf_counter() - t0
        t0 = time.perf_counter()
        copies = [_fresh_copy(m) for m in old]
        copying = time.perf_counter() - t0
        del copies
        for boot in boots:
            for seen in boot._seen.values():
                if id(seen.machine) in swap:
                    seen.machine = swap[id(seen.machine)]
                if id(seen.quiet) in swap:
                    seen.quiet = swap[id(seen.quiet)]
                if seen.news is not None and id(seen.news[0]) in swap:
                    seen.news = (swap[id(seen.news[0])], *seen.news[1:])
        for rec in recorders:
            for key, (said, version) in list(rec._last.items()):
                if id(version) in swap:
                    rec._last[key] = (said, swap[id(version)])
        gc.collect()
        still = collections.Counter()
        for m in old[:200]:
            for r in gc.get_referrers(m):
                if r is not old:
                    still[_kind(r)] += 1
        n = len(old)
        del old, swap
    finally:
        gc.collect()
        gc.freeze()
    return (f"compacted {n} machines in {took * 1000:.1f} ms (the walk of the view "
            f"included; copies alone {copying * 1000:.1f} ms); old held by {dict(still)}")


def _evict() -> str:
    """Experiment (s14-compact): the upper bound of any compaction. The view's machines in
    pools not marked written as stored text into one string (glibc's, not pymalloc's),
    taken out of the view (None), collected: pymalloc's arenas and the machines alive in
    pools not marked then; then decoded (new objects: the MACs and ids too) and put back,
    and the arenas again."""
    import io

    from netboot.inventory import codec

    arenas = "arenas allocated current"
    before = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # the loop's thread waits meanwhile (a quiet server)
    gc.unfreeze()
    try:
        start = _pymalloc()[arenas]
        views = [o for o in gc.get_objects() if type(o).__name__ == "InventoryView"]
        out = []
        for view in views:
            held = view._machines
            ids = [mid for mid, m in held.items()
                   if m is not None and id(m) >> 14 not in _POOLS]
            text = io.StringIO()
            for mid in ids:
                text.write(codec.machine_json(held[mid]))
                text.write("\n")
            blob = text.getvalue()
            del text
            for mid in ids:
                held[mid] = None
            gc.collect()
            without = _pymalloc()[arenas]
            left = sum(1 for o in gc.get_objects()
                       if type(o).__name__ == "Machine" and id(o) >> 14 not in _POOLS)
            for mid, line in zip(ids, blob.splitlines(), strict=True):
                held[mid] = codec.machine_from_document(codec.loads_document(line))
            del blob
            gc.collect()
            out.append(f"{len(ids)} machines: arenas {start}, without them {without} "
                       f"({left} machines left in new pools), put back {_pymalloc()[arenas]}")
    finally:
        gc.freeze()
        sys.setswitchinterval(before)
    return "; ".join(out)


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
    elif word == "evict":
        return _evict()
    elif word == "compact":
        return _compact()
    elif word == "census":
        return _census(arg)
    elif word == "minfo":
        _malloc_info(arg)
    elif word == "threads":
        return json.dumps([t.name for t in threading.enumerate()])
    elif word == "modules":
        with open(arg, "w") as fh:
            for k in sorted(k for k, v in sys.modules.items() if v is not None):
                fh.write(f"{k}\t{' < '.join(_IMPORTED_BY.get(k, []))}\n")
    elif word == "collect":
        return str(gc.collect())
    elif word == "exec":  # a file of Python run here; it sets ``answer``
        scope: dict[str, Any] = {}
        with open(arg) as fh:
            exec(fh.read(), scope)
        return str(scope.get("answer", "ok"))
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
