"""HTTP paths of a boot storm under wrk: netboot and nginx side by side on loopback.

    python benchmarks/http_paths.py [--enrolled 100000] [--duration 10] [--rounds 3]
                                    [--only ipxe,asset300]

Rows (issue 10's table): ``/ipxe?mac=`` for a random one of the enrolled machines (a wrk Lua
script picks the MAC per request) at 50 connections, and for a random one of the first 1,000
(``ipxe-1k``, after one unmeasured run over them: requests that change nothing); each
round of ``ipxe`` draws other MACs (first installs), the same ones for every server;
``/boot.ipxe``; a 300 B asset at 50 connections; 1 MiB at 50 and 32 MiB at 10 connections
(MiB/s). netboot runs as ``netboot serve`` (DHCP and TFTP off) on a data dir filled by
``netboot import`` (managed clusters of 12,500 machines, as in the issue's measurement);
nginx serves the same asset files and one static iPXE script for every MAC, so its /ipxe row
is the floor: a file served, nothing decided. Both servers run at once and every row is
measured in ``--rounds`` turns, the server that goes first alternating; the ratio printed is
the median of the turns' ratios (the machine's load drifts between runs a minute apart).
``µs CPU`` is each server's CPU (utime + stime of the process and its workers) per request
answered, median of the turns: steadier than req/s on a loaded machine. ``--baseline REPO``
runs a second netboot from another checkout (e.g. main's worktree) in the same turns.
Needs ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``); a missing one is said and
left out. Loopback only; servers stopped by their own PID. Not part of pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storm import REPO, Workload

HOST = "127.0.0.1"

# wrk runs LuaJIT (Lua 5.1: no bit operators); MACs as storm.mac_of numbers them. Each wrk
# thread has its own Lua state: seeded alike, its two threads asked for the same MACs, so half
# of a run's "first" requests were a repeat of the other thread's (install-again); and every
# round replayed round 1's MACs, so that rounds 2 and up measured only repeats (the medians
# of --rounds 3 could not see a change of what a first install costs). Seeded per thread and
# per round (NB_SEED): the same sequence for every server of a round.
RANDOM_MAC_LUA = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  math.randomseed(tonumber(os.getenv("NB_SEED")) * 100 + id)
end
local n = tonumber(os.getenv("NB_ENROLLED"))
request = function()
  local i = math.random(0, n - 1)
  local mac = string.format("02-00-00-%02x-%02x-%02x", math.floor(i / 65536) % 256,
                            math.floor(i / 256) % 256, i % 256)
  return wrk.format("GET", "/ipxe?mac=" .. mac .. "&arch=x86_64&platform=efi")
end
"""


@dataclass(frozen=True)
class Row:
    name: str
    path: str  # "" = the Lua script decides
    connections: int
    size: int = 0  # bytes per response, for MiB/s
    machines: int = 0  # /ipxe: MACs drawn from the first this many (0: every enrolled one)


ROWS = [
    Row("ipxe", "", 50),
    # The same 1,000 machines again and again (held machines' retry loops, a storm's second
    # minute): the answer changes nothing, so nothing is written or read.
    Row("ipxe-1k", "", 50, machines=1000),
    Row("boot.ipxe", "/boot.ipxe", 50),
    Row("asset300", "/assets/small.txt", 50),
    Row("1MiBx50", "/assets/1m.bin", 50, 1 << 20),
    Row("32MiBx10", "/assets/32m.bin", 10, 32 << 20),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()  # this process only, by its own handle
                proc.wait()


@contextlib.contextmanager
def netboot(work: Workload, run: Path, python: str, access_log: bool,
            repo: Path = REPO) -> Iterator[tuple[int, int]]:
    port = free_port()
    data = run / "data"
    shutil.copytree(work.root / "netboot-seed", data)
    conf = run / "netboot.yaml"
    conf.write_text(json.dumps({
        "server": {"advertise": HOST, "data_dir": str(data), "log_level": "info"},
        # Like for like: nginx below runs with access_log off (--access-log: netboot's on).
        "http": {"listen": HOST, "port": port, "access_log": access_log},
        "https": {"port": 0},  # not measured: any free port, never 8443 taken by another
        "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "dns": {"enabled": False},
        "assets": {"dirs": [str(work.assets)]},
    }))
    log = run / "netboot.log"
    with process([python, "-m", "netboot", "serve", "--config", str(conf)], log,
                 {"PYTHONPATH": str(repo)}) as proc:
        wait_http(f"http://{HOST}:{port}/boot.ipxe")
        # serve answers at once and loads the inventory view in the background (until then
        # decisions read the store): measure the server as it runs, once it is loaded.
        started = time.monotonic()
        deadline = started + 600
        while "inventory view loaded" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("netboot's inventory view did not load within 600 s")
            time.sleep(0.5)
        print(f"netboot view of the inventory loaded {time.monotonic() - started:.1f} s "
              "after serve answered", flush=True)
        yield port, proc.pid


@contextlib.contextmanager
def nginx(work: Workload, run: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    # One static script answers every MAC: with 100,000 machines, writing a file per MAC
    # takes longer than the measurement, and for nginx a lookup among them costs the same.
    www = run / "www"
    (www / "ipxe").mkdir(parents=True)
    (www / "assets").symlink_to(work.assets)
    (www / "boot.ipxe").write_text((REPO / "templates" / "ipxe" / "boot.ipxe").read_text())
    (www / "ipxe" / "any.ipxe").write_text(
        "#!ipxe\nkernel http://192.0.2.1:8080/assets/storm/vmlinuz initrd=initrd "
        "k3os.mode=install k3os.install.config_url=http://192.0.2.1:8080/config/"
        "02-00-00-00-00-01?token=0123456789abcdef0123456789abcdef console=ttyS0\n"
        "initrd --name initrd http://192.0.2.1:8080/assets/storm/initrd\nboot\n")
    tmp = run / "nginx"
    tmp.mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
user root root;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  default_type application/octet-stream;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
    listen {HOST}:{port} backlog=4096;
    root {www};
    location = /ipxe {{ default_type text/plain; try_files /ipxe/any.ipxe =404; }}
  }}
}}
""")
    with process(["nginx", "-c", str(conf), "-p", str(tmp)], run / "nginx.log") as proc:
        wait_http(f"http://{HOST}:{port}/boot.ipxe")
        yield port, proc.pid


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its living descendants (nginx's workers), from
    /proc: what the server spent, whatever the load beside it."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(children.get(p, ()))
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    rps: float
    p99_ms: float
    errors: int
    cpu_us: float = float("nan")  # the server's CPU per request


def wrk(port: int, row: Row, duration: float, script: Path, enrolled: int,
        seed: int = 7) -> Measured:
    """``seed``: of the MACs the script draws (the same seed, the same MACs)."""
    argv = ["wrk", "-t2", f"-c{row.connections}", f"-d{duration:g}s", "--latency",
            "--timeout", "10s"]
    if not row.path:
        argv += ["-s", str(script)]
    argv.append(f"http://{HOST}:{port}{row.path or '/'}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         env={**os.environ, "NB_ENROLLED": str(row.machines or enrolled),
                              "NB_SEED": str(seed)},
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    errors = 0
    for m in re.finditer(r"Non-2xx or 3xx responses:\s+(\d+)|Socket errors: connect (\d+), "
                         r"read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups() if g)
    return Measured(rps, p99_ms, errors)


def median_of(runs: list[Measured]) -> Measured:
    """The run of median req/s (its p99 and errors with it)."""
    return sorted(runs, key=lambda m: m.rps)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrolled", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--only", help="comma-separated row names: "
                        + ",".join(r.name for r in ROWS))
    parser.add_argument("--fixed-url", action="store_true",
                        help="clusters with a fixed server URL instead of managed ones (whose "
                             "join lookup of registered servers runs on every /ipxe)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for netboot")
    parser.add_argument("--rounds", type=int, default=3,
                        help="turns of every row on every server (medians reported)")
    parser.add_argument("--access-log", action="store_true",
                        help="netboot writes its access log (nginx's stays off)")
    parser.add_argument("--baseline", type=Path, metavar="REPO",
                        help="also run netboot from this checkout (e.g. main's worktree) "
                             "in the same turns, as 'baseline'; its ratio is printed too")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds: servers stopped, the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("wrk",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk)")
    rows = [r for r in ROWS if not args.only or r.name in args.only.split(",")]
    servers = ["netboot"] + (["baseline"] if args.baseline else []) + (
        ["nginx"] if shutil.which("nginx") else [])
    if "nginx" not in servers:
        print("nginx left out: not installed (apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="netboot-http-") as tmp_text:
        tmp = Path(tmp_text)
        work = Workload(tmp, args.enrolled, args.enrolled, 1 << 20, 1 << 20,
                        managed=not args.fixed_url)
        work.build()
        (work.assets / "small.txt").write_bytes(b"x" * 299 + b"\n")
        (work.assets / "1m.bin").write_bytes(os.urandom(1 << 20))
        (work.assets / "32m.bin").write_bytes(os.urandom(32 << 20))
        took = work.netboot_seed(args.python)
        print(f"netboot import of {args.enrolled} machines: {took:.1f} s", flush=True)
        script = tmp / "random_mac.lua"
        script.write_text(RANDOM_MAC_LUA)
        runs: dict[tuple[str, str], list[Measured]] = {}
        ratios: dict[str, list[float]] = {}
        with contextlib.ExitStack() as stack:
            # Both servers up together, measured row by row in turns (the first server of a
            # turn alternating): on a shared machine the load drifts within seconds, and a
            # ratio of two runs taken a minute apart says more about the drift.
            ports = {}
            for server in servers:
                run = tmp / server
                run.mkdir()
                ports[server] = stack.enter_context(
                    netboot(work, run, args.python, args.access_log) if server == "netboot"
                    else netboot(work, run, args.python, args.access_log, args.baseline)
                    if server == "baseline" else nginx(work, run))
            for round_ in range(args.rounds):
                for row in rows:
                    turn = servers if round_ % 2 == 0 else servers[::-1]
                    for server in turn:
                        if row.machines and round_ == 0:  # first requests change things
                            wrk(ports[server][0], row, args.duration, script, args.enrolled)
                        port, pid = ports[server]
                        cpu = cpu_seconds(pid)
                        # /ipxe of all machines: each round other MACs (first installs, as
                        # in a storm), the same ones on every server of the round.
                        m = wrk(port, row, args.duration, script, args.enrolled,
                                seed=7 + round_)
                        m.cpu_us = (cpu_seconds(pid) - cpu) / max(1.0, m.rps * args.duration) * 1e6
                        runs.setdefault((server, row.name), []).append(m)
                        print(f"  {server} {row.name}: {m.rps:,.0f} req/s, p99 "
                              f"{m.p99_ms:.1f} ms, {m.errors} errors, "
                              f"{m.cpu_us:,.0f} µs CPU/request", flush=True)
                    for peer in servers[1:]:
                        ratios.setdefault(f"{row.name}/{peer}", []).append(
                            runs["netboot", row.name][-1].rps / runs[peer, row.name][-1].rps)
    results = {key: median_of(ms) for key, ms in runs.items()}
    print(f"\n{args.enrolled} machines enrolled, wrk -t2, {args.duration:g} s a row, "
          f"medians of {args.rounds} round(s); the ratio is the median of each round's "
          f"(load average {os.getloadavg()[0]:.1f})")
    head = f"{'path':<11} {'conns':>5}"
    for s in servers:
        head += f" {s + ' req/s':>14} {'p99 ms':>8} {'MiB/s':>8} {'errors':>6} {'µs CPU':>7}"
    print(head + "".join(f"  netboot ÷ {peer}" for peer in servers[1:]))
    for row in rows:
        line = f"{row.name:<11} {row.connections:>5}"
        for s in servers:
            m = results[s, row.name]
            mib = f"{m.rps * row.size / (1 << 20):.0f}" if row.size else "-"
            cpu = statistics.median(r.cpu_us for r in runs[s, row.name])
            line += f" {m.rps:>14,.0f} {m.p99_ms:>8.1f} {mib:>8} {m.errors:>6} {cpu:>7,.0f}"
        for peer in servers[1:]:
            line += f"  {statistics.median(ratios[f'{row.name}/{peer}']):>{10 + len(peer)}.2g}x"
        print(line)


if __name__ == "__main__":
    main()
