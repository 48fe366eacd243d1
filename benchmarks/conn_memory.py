"""What an open HTTP connection costs ``netboot serve`` in Python's small-object heap.

    python benchmarks/conn_memory.py [--connections 960] [--path /boot.ipxe] [--trace 3]
                                     [--compare /path/to/other/checkout]

The storm's resident memory after it follows its peak of small objects (pymalloc's arenas
stay once the fleet's new state is spread over them; benchmarks/README, session 12), and most
of that peak is per connection: ~1,570 HTTP connections open at once. This measures it
alone: ``netboot serve`` (empty inventory; HTTP on loopback, DHCP, TFTP and DNS off) run
through storm_probe_hook.py, ``--connections`` keep-alive connections opened from 127.0.0.2
to 127.0.0.9 (under the per-source cap), each sends one ``GET --path`` and reads its answer
and stays open; pymalloc's bytes in allocated blocks (sys._debugmallocstats) are read
before and after, and printed per connection. ``--trace N``: tracemalloc (N frames) over the
connections, the largest sources printed. Then ``--cycles`` rounds of as many connections
opened one at a time, asked once and closed (a storm device's pattern): the server's CPU a
connection (/proc, 10 ms ticks). With ``--compare``, the same for another checkout
in the same run (PYTHONPATH). Loopback only; the server is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from startup import HOST, cpu_seconds, free_port, healthz, stop
from storm_probe import HOOK, Probe

REPO = Path(__file__).resolve().parent.parent


def pymalloc(probe: Probe) -> tuple[int, int]:
    p = json.loads(probe.ask("stats"))["pymalloc"]
    return p["bytes in allocated blocks"], p["arenas allocated current"]


def measure(python: str, repo: Path, run: Path, count: int, path: str, trace: int,
            cycles: int) -> dict[str, float]:
    data = run / "data"
    port = free_port()
    conf = run / "netboot.yaml"
    conf.write_text(json.dumps({
        "server": {"advertise": HOST, "data_dir": str(data), "log_level": "warning"},
        "http": {"listen": HOST, "port": port}, "https": {"port": free_port()},
        "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "dns": {"enabled": False},
    }))
    env = {**os.environ, "PYTHONPATH": str(repo), "PROBE_DIR": str(run / "probe")}
    probe = Probe(run, 0)  # makes run/probe, where the hook looks
    with (run / "netboot.log").open("ab") as out:
        proc = subprocess.Popen([python, "-c", HOOK.read_text(), "serve", "--config",
                                 str(conf)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=run, stdin=subprocess.DEVNULL, env=env)
    probe.pid = proc.pid
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while not healthz(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"netboot serve did not answer: see {run}")
            time.sleep(0.02)
        # aiohttp's application answers (imported after the listeners), and a few
        # requests of each kind warmed up.
        while "401" not in _get(port, "/api/v1/machines"):
            time.sleep(0.05)
        for _ in range(20):
            _get(port, path)
        probe.ask("collect")
        time.sleep(0.5)
        before, arenas0 = pymalloc(probe)
        if trace:
            probe.ask(f"trace {trace}")
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for i in range(count):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.connect((HOST, port))
            s.sendall(request)
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            got = s.recv(65536)
            if not got.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"not answered: {got[:80]!r}")
        time.sleep(0.5)
        if trace:  # (sys._debugmallocstats says nothing of pymalloc while tracing)
            probe.ask(f"snap {run}/conns.snap")
            return {"per": 0, "arenas": 0, "cpu_us": 0.0}  # (no cycles run while tracing)
        after, arenas1 = pymalloc(probe)
        # Then the server's CPU for connections opened, asked once and closed (a storm's
        # devices' pattern): ``cycles`` rounds of ``count``, a connection at a time.
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(0.5)
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(cycles):
            for i in range(count):
                with socket.socket() as s:
                    s.bind((f"127.0.0.{2 + i % 8}", 0))
                    s.connect((HOST, port))
                    s.sendall(request)
                    if not s.recv(65536).startswith(b"HTTP/1.1 200"):
                        raise RuntimeError("not answered")
        time.sleep(0.5)
        per_cpu = (cpu_seconds(proc.pid) - cpu0) / (cycles * count) if cycles else 0.0
        return {"per": (after - before) / count, "arenas": arenas1 - arenas0,
                "cpu_us": per_cpu * 1e6}
    finally:
        for s in socks:
            s.close()
        stop(proc)  # type: ignore[arg-type]


def _get(port: int, path: str) -> str:
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return s.recv(64).decode(errors="replace")


def top(snap: Path, n: int = 25) -> None:
    import tracemalloc
    s = tracemalloc.Snapshot.load(str(snap))
    for stat in s.statistics("traceback")[:n]:
        where = " < ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}"
                           for f in stat.traceback)
        print(f"  {stat.size / 1024:8.1f} KiB {stat.count:6d}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=960)
    parser.add_argument("--path", default="/boot.ipxe")
    parser.add_argument("--trace", type=int, default=0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=5,
                        help="rounds of --connections opened, asked once, closed: CPU each")
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    trees = {"this": REPO}
    if args.compare:
        trees["other"] = args.compare.resolve()
    with tempfile.TemporaryDirectory(prefix="netboot-conn-memory-") as tmp:
        for n in range(args.runs):
            for name in (trees if n % 2 == 0 else reversed(trees)):
                run = Path(tmp) / f"{name}-{n}"
                run.mkdir()
                r = measure(args.python, trees[name], run, args.connections, args.path,
                            args.trace, args.cycles)
                print(f"{name:<6} {args.connections} connections, GET {args.path}: "
                      f"{r['per']:6.0f} bytes a connection in pymalloc's blocks, "
                      f"+{r['arenas']} arenas; {r['cpu_us']:5.0f} µs server CPU a connection "
                      f"opened, asked once, closed (load {os.getloadavg()[0]:.1f})  "
                      f"{trees[name]}", flush=True)
                if args.trace:
                    top(run / "conns.snap")


if __name__ == "__main__":
    main()
