"""How many pages of a file are dirty in the page cache (not yet written to disk) or under
writeback, looked at every INTERVAL seconds: a line ``<wall time> <path> pages N cached C
dirty D writeback W`` a look (s36-storm: when the copy of a 100,000-machine inventory that
storm.py makes for a run is written back, against the storm's start, slow.json's t0_wall).

    dirty_pages.py --glob '/tmp/netboot-storm-*/run-*/data/netboot.db' --seconds 300 > looks

The newest file the glob matches is looked at each time. Linux only, as root: the file is
mapped, mincore() tells which of its pages are cached, each cached page is touched (mapped
from the cache, no I/O) and its frame's flags are read from /proc/self/pagemap and
/proc/kpageflags. Diagnosis only.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import struct
import time

PAGE = 4096
KPF_DIRTY, KPF_WRITEBACK = 1 << 4, 1 << 8
PROT_READ, MAP_SHARED = 1, 1


def look(path: str) -> tuple[int, int, int, int]:
    """(pages, cached, dirty, writeback) of ``path`` now."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = size // PAGE
        if not pages:
            return 0, 0, 0, 0
        base = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vec)
            cached = dirty = writeback = 0
            with open("/proc/self/pagemap", "rb") as pagemap, \
                    open("/proc/kpageflags", "rb") as flags:
                for i in range(pages):
                    if not vec[i] & 1:
                        continue  # not in the cache: touching it would read it
                    cached += 1
                    ctypes.c_ubyte.from_address(base + i * PAGE).value  # noqa: B018
                    pagemap.seek((base // PAGE + i) * 8)
                    entry = struct.unpack("Q", pagemap.read(8))[0]
                    if not entry >> 63:  # not present after all
                        continue
                    flags.seek((entry & ((1 << 55) - 1)) * 8)
                    bits = struct.unpack("Q", flags.read(8))[0]
                    dirty += bool(bits & KPF_DIRTY)
                    writeback += bool(bits & KPF_WRITEBACK)
            return pages, cached, dirty, writeback
        finally:
            libc.munmap(ctypes.c_void_p(base), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glob", required=True, help="the file(s) to look at: the newest")
    parser.add_argument("--seconds", type=float, default=300.0, help="how long to look")
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        found = glob.glob(args.glob)
        if found:
            path = max(found, key=os.path.getmtime)
            try:
                pages, cached, dirty, writeback = look(path)
            except OSError:  # removed or replaced meanwhile
                pass
            else:
                print(f"{time.time():.2f} {path} pages {pages} cached {cached} dirty {dirty} "
                      f"writeback {writeback}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
