"""storm_memory.py, with the server's memory dumped at each of its three readings.

    sudo python benchmarks/storm_memory_dumps.py --dumps DIR [storm_memory.py's options]
    (MEMDUMP_TYPES=1 for a count per type, MEMDUMP_TRACE=1 for tracemalloc by line)

Each measured ``netboot serve`` gets benchmarks/memdump on its PYTHONPATH (its
sitecustomize.py) and is sent SIGUSR1 right after each VmRSS reading (the view loaded, the
storm's last moment, ``--settle`` seconds later); its dumps go to DIR/<pid>/dumpN.* (0, 1, 2
in that order) with the reading beside them (dumpN.vm). What s35-mem read its figures from
(benchmarks/README.md): Python's arenas and live blocks, glibc's arenas, smaps by kind.
Not part of pytest; no assertion.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import storm
import storm_memory

HOOK = Path(__file__).resolve().parent / "memdump"


def main() -> None:
    args = sys.argv[1:]
    usage = "usage: storm_memory_dumps.py --dumps DIR [storm_memory.py options]"
    if "-h" in args or "--help" in args:  # every benchmark answers --help (tests/test_benchmarks)
        print(f"{usage}\n\n{__doc__}")
        return
    if "--dumps" not in args or args.index("--dumps") + 1 >= len(args):
        raise SystemExit(usage)
    at = args.index("--dumps")
    out = Path(args[at + 1]).resolve()
    del args[at:at + 2]
    sys.argv[1:] = args
    start, vm = storm.start, storm_memory.vm
    readings: dict[int, int] = {}

    def start_hooked(name: str, ns: str, argv: list[str], log: Path,
                     env: dict[str, str] | None = None) -> storm.Proc:
        env = dict(env or {})
        if name == "netboot":
            env["PYTHONPATH"] = f"{env.get('PYTHONPATH', '')}:{HOOK}"
            (log.parent / "dumps").mkdir(exist_ok=True)
            env["MEMDUMP_DIR"] = str(log.parent / "dumps")
            for key in ("MEMDUMP_TYPES", "MEMDUMP_TRACE"):
                if os.environ.get(key):
                    env[key] = os.environ[key]
        return start(name, ns, argv, log, env)

    def vm_dumped(pid: int) -> dict[str, float]:
        reading = vm(pid)
        n = readings.get(pid, 0)
        readings[pid] = n + 1
        dumps = Path(f"/proc/{pid}/cwd").resolve() / "dumps"
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while not (dumps / f"dump{n}.done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        kept = out / str(pid)
        kept.mkdir(parents=True, exist_ok=True)
        for f in dumps.glob(f"dump{n}.*"):
            os.replace(f, kept / f.name)
        (kept / f"dump{n}.vm").write_text(repr(reading))
        return reading

    storm.start = start_hooked  # type: ignore[assignment]
    storm_memory.vm = vm_dumped  # type: ignore[assignment]
    storm_memory.main()


if __name__ == "__main__":
    main()
