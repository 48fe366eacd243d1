"""Resident memory of ``netboot serve`` holding the whole inventory in its view.

    python benchmarks/view_memory.py [--enrolled 100000] [--compare /path/to/other/checkout]
                                     [--seed DIR]

Issue 10's target is < 150 MiB resident with 100,000 machines. The data dir is filled as the
storm benchmark fills it (``netboot import`` of machines with MAC, hostname, serial, UUID,
cluster, role and profile: storm.Workload), or taken from ``--seed`` (a data dir filled so
before; it is copied, never changed). netboot runs as ``python -m netboot serve`` (HTTP and
HTTPS on free loopback ports, DHCP, TFTP and DNS off); once it logs that its inventory view
is loaded, and a second later, its VmRSS and VmHWM (peak) are read from /proc, and how long
the load took after readiness, in wall and in the process's CPU seconds (the figure that a
loaded machine disturbs least; it includes aiohttp's import in the background). With
``--compare``, the same for another checkout (PYTHONPATH) in the same run. Prints MiB and
bytes per machine above the RSS at readiness. Loopback only; servers stopped by their own
PID. Not part of pytest; no assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from startup import (
    HOST,
    checkouts_of,
    free_port,
    healthz,
    parse_with_checkouts,
    spawn,
    stop,
)
from storm import Workload


def status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of ``pid`` in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(python: str, repo: Path, seed: Path, run: Path, timeout: float = 900
            ) -> dict[str, float]:
    data = run / "data"
    shutil.copytree(seed, data)
    port = free_port()
    conf = run / "netboot.yaml"
    conf.write_text(json.dumps({  # YAML is a superset of JSON
        "server": {"advertise": HOST, "data_dir": str(data), "log_level": "info"},
        "http": {"listen": HOST, "port": port}, "https": {"port": free_port()},
        "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "dns": {"enabled": False},
    }))
    log = run / "netboot.log"
    proc = spawn(python, repo, conf, log)
    try:
        deadline = time.monotonic() + timeout
        while not healthz(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"netboot serve did not answer: see {log}")
            time.sleep(0.01)
        ready = status(proc.pid)["VmRSS"]
        t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid)
        while "inventory view loaded" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the inventory view did not load: see {log}")
            time.sleep(0.05)
        loaded_after, load_cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - cpu0
        time.sleep(1.0)  # a watch round or two: what the server holds while it runs
        if not healthz(port):
            raise RuntimeError(f"netboot serve stopped answering: see {log}")
        now = status(proc.pid)
        return {"ready": ready, "rss": now["VmRSS"], "peak": now["VmHWM"],
                "load_s": loaded_after, "load_cpu": load_cpu}
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--seed", type=Path, metavar="DATA_DIR",
                        help="a data dir already holding the machines (copied, not changed)")
    args = parse_with_checkouts(parser)
    checkouts = checkouts_of(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="netboot-memory-") as tmp_text:
        tmp = Path(tmp_text)
        seed = args.seed
        if seed is None:
            work = Workload(tmp / "work", args.enrolled, args.enrolled, 1024, 1024,
                            managed=True)
            work.build()
            took = work.netboot_seed(args.python)
            print(f"netboot import of {args.enrolled} machines: {took:.1f} s", flush=True)
            seed = work.root / "netboot-seed"
        for name, repo in checkouts.items():
            run = tmp / name
            run.mkdir()
            results[name] = measure(args.python, repo, seed, run)
    load = os.getloadavg()
    print(f"netboot serve with {args.enrolled} machines in its view "
          f"(load average {load[0]:.2f} {load[1]:.2f})")
    print(f"{'checkout':<10} {'ready MiB':>9} {'loaded MiB':>10} {'peak MiB':>9} "
          f"{'B/machine':>9} {'load s':>7} {'CPU s':>6}  path")
    for name, r in results.items():
        per = (r["rss"] - r["ready"]) * (1 << 20) / max(1, args.enrolled)
        print(f"{name:<10} {r['ready']:9.1f} {r['rss']:10.1f} {r['peak']:9.1f} {per:9.0f} "
              f"{r['load_s']:7.1f} {r['load_cpu']:6.2f}  {checkouts[name]}")


if __name__ == "__main__":
    main()
