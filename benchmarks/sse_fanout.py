"""The dashboard's live feed at storm rates: what N open dashboards cost the server.

    python benchmarks/sse_fanout.py [--streams 20] [--events 40000] [--batch 500]
                                    [--tree A --tree B] [--runs 3]

For each tree (alternating, ``--runs`` times): ``netboot serve`` on loopback (HTTP only, no
DHCP, TFTP or HTTPS) on a fresh data dir; ``--streams`` readers of /api/v1/events/stream (raw
sockets, reading and discarding, in this process); then this process inserts ``--events``
machine events into the server's SQLite inventory, ``--batch`` rows a transaction (a storm's
group commits, as another server sharing the inventory would), and the server relays them to
every stream from its change feed (Service.watch_once). Reported: the server's CPU seconds
(utime + stime from /proc) from the first insert until every stream has read every event,
the messages and the read() calls the streams saw (a read returns what one or more TCP
segments brought: fewer reads, fewer writes by the server), and the CPU per event per stream.

Loopback only; the server is ended by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def start(tree: Path, work: Path, python: str, seed: Path | None = None,
          ) -> tuple[subprocess.Popen[bytes], int, str]:
    """``netboot serve`` of ``tree`` on loopback HTTP only, on a fresh data dir (a copy of
    ``seed``); its PID, port and admin token once /healthz answers."""
    data = work / "data"
    if seed is None:
        data.mkdir(parents=True)
    else:
        shutil.copytree(seed, data)
    port = free_port()
    conf = work / "netboot.yaml"
    conf.write_text(json.dumps({
        "server": {"advertise": "127.0.0.1", "data_dir": str(data), "log_level": "warning"},
        "http": {"listen": "127.0.0.1", "port": port, "access_log": False},
        "https": {"enabled": False}, "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
        "assets": {"dirs": [str(work)]}}))
    proc = subprocess.Popen([python, "-m", "netboot", "serve", "--config", str(conf)],
                            cwd=work, env={**os.environ, "PYTHONPATH": str(tree)},
                            stdout=subprocess.DEVNULL,
                            stderr=open(work / "log", "wb"))  # noqa: SIM115 - the server's
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if b"200" in s.recv(100):
                    break
        except OSError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        raise SystemExit(f"netboot did not start: {(work / 'log').read_text()[-2000:]}")
    token = (data / "admin.token").read_text().strip()
    return proc, port, token


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server this script started (its own PID only)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Reader:
    def __init__(self) -> None:
        self.messages = 0
        self.reads = 0
        self.missed = 0


async def read_stream(port: int, token: str, reader: Reader, ready: asyncio.Event,
                      want: int, stop: asyncio.Event) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode())
    await w.drain()
    tail = b""
    while not stop.is_set():
        try:
            chunk = await asyncio.wait_for(r.read(1 << 16), 1.0)
        except TimeoutError:
            continue
        if not chunk:
            break
        reader.reads += 1
        if b"retry: 3000" in chunk:
            ready.set()
        text = tail + chunk
        reader.messages += text.count(b"\nevent: machine\n")
        reader.missed += text.count(b"event: missed\n")
        tail = text[-20:]
        if reader.messages >= want:
            break
    w.close()


def insert(db: Path, start: int, n: int) -> None:
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO events (machine, time, kind, message, data) VALUES (?,?,?,?,?)",
                [(f"m-{i % 1000:04d}", time.time(), "dhcp",
                  "proxy offer: x86_64 UEFI, iPXE next", '{"via": "dhcp"}')
                 for i in range(start, start + n)])
    finally:
        conn.close()


async def one(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sse-fanout-") as tmp:
        proc, port, token = start(tree, Path(tmp), args.python)
        try:
            readers = [Reader() for _ in range(args.streams)]
            readies = [asyncio.Event() for _ in readers]
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(read_stream(port, token, rd, ev, args.events, stop))
                     for rd, ev in zip(readers, readies, strict=True)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 30)
            await asyncio.sleep(1.0)
            db = Path(tmp) / "data" / "netboot.db"
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            t1 = t0
            for k in range(0, args.events, args.batch):
                await asyncio.to_thread(insert, db, k, min(args.batch, args.events - k))
                await asyncio.sleep(args.pause)
            # Done when every stream read every event, or none read anything for 3 s (a
            # stream told "missed" will not see them all).
            last, quiet = -1, time.monotonic()
            while not all(t.done() for t in tasks) and time.monotonic() - quiet < 3:
                now = sum(rd.messages + rd.missed for rd in readers)
                if now != last:
                    last, quiet, t1 = now, time.monotonic(), time.monotonic()
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            cpu = cpu_seconds(proc.pid) - cpu0
            wall = t1 - t0
            got = sum(rd.messages for rd in readers)
            return {"cpu": cpu, "wall": wall, "messages": got,
                    "reads": sum(rd.reads for rd in readers),
                    "missed": sum(rd.missed for rd in readers),
                    "us_per_message": cpu / max(got, 1) * 1e6}
        finally:
            stop(proc)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between batches")
    parser.add_argument("--tree", type=Path, action="append")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    trees = args.tree or [REPO]
    results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    for run in range(args.runs):
        order = trees if run % 2 == 0 else list(reversed(trees))
        for tree in order:
            r = await one(tree, args)
            results[tree].append(r)
            print(f"run {run + 1} {tree}: server CPU {r['cpu']:.2f} s, wall {r['wall']:.1f} s, "
                  f"{r['messages']:.0f} messages, {r['reads']:.0f} reads, "
                  f"{r['missed']:.0f} missed, {r['us_per_message']:.1f} us CPU a message",
                  flush=True)
    for tree, rs in results.items():
        cpus = [r["cpu"] for r in rs]
        print(f"{tree}: median server CPU {statistics.median(cpus):.2f} s "
              f"({min(cpus):.2f}-{max(cpus):.2f}), median reads "
              f"{statistics.median(r['reads'] for r in rs):.0f}, us a message "
              f"{statistics.median(r['us_per_message'] for r in rs):.1f}")


if __name__ == "__main__":
    asyncio.run(main())
