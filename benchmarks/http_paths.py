"""HTTP paths of a boot storm under wrk: netboot and nginx side by side on loopback.

    python benchmarks/http_paths.py [--enrolled 100000] [--duration 10] [--rounds 3]
                                    [--only ipxe,asset300,config] [--processes 2] [--no-nginx]
                                    [--nginx-workers auto]

Rows (issue 10's table), each at 50 connections unless said. Two kinds, told apart by
``Row.first``:

*First requests* (``ipxe``, ``ipxe-real``, ``config``, ``user-data``): every request of a
round is the first any server of that round is asked for its machine. Each round of such a
row starts its netboot servers afresh on a new copy of the seed and stops them after it, and
wrk's two threads each walk their own disjoint slice of one shuffled order of the machines
(first_request_slices, seeded by the row and the round: every server of the round is asked
the same machines in the same order). A thread that has asked every machine of its slice
stops (never wraps around into repeats) and the run says so: its req/s is then low, not of
first requests alone; at 100,000 enrolled a thread's ~50,000 machines last 10 s up to ~10,000
req/s. Each run prints how many first requests the server made (machines its inventory
moved to the row's state) beside wrk's answers and the machines the script drew. Session 32
(s32-ceiling) found the former draws, at random with repeats on servers kept through the
rounds, ~75 % first installs in round 1 and ~40, 20, 10, 5 % in rounds 2-5: those medians
overstated first installs, the more for the faster tree. ``ipxe``: ``/ipxe?mac=`` first
installs (each managed cluster has a registered server, so that its agents have an endpoint
to join, get an install token and commit it before the answer); ``ipxe-real``: the same asked
by the whole query and headers iPXE sends (templates/ipxe/boot.ipxe's chain on a QEMU VM:
escaped product name, empty identifiers). ``config``: a machine's first fetch of its k3OS
config.yaml, by the URL its install script gives (``/config/<mac>?token=<its install
token>``), as k3OS's installer does; ``user-data``: the same for cloud-init NoCloud's
``/nocloud/<mac>/<token>/user-data``. For the config rows the seed gives every machine an
install under way (booting, its install token minted, as its /ipxe answer leaves it: MINT), so
that they measure the config (the token check, the cluster's join decision, the render and its
check, the booting -> installing commit of a first fetch), not the token's commit; in a
managed cluster its first machine is a registered server, whose address the others join.

*Rows meant to repeat*, on servers started once for all the rounds, a random machine a
request (with repeats; the Lua script seeded per thread and round): ``ipxe-held``, agents
whose cluster has no server yet (held in iPXE's retry loop, nothing committed: a hold event
and what the request told are queued for the next group commit), each asking again as iPXE
does every few seconds; ``ipxe-1k``: a random one of the first 1,000 machines (after one
unmeasured run over them that starts their installs: requests that change nothing);
``config-1k`` re-fetches the configs of 1,000 machines (after one unmeasured run over them),
as an installer's retry does; ``/boot.ipxe``; a 300 B asset; 1 MiB at 50 and 32 MiB at 10
connections (MiB/s). nginx is started once and draws at random in every row (a static file
whatever the machine). netboot runs as ``netboot serve`` (DHCP and TFTP off) on a data
dir filled by ``netboot import`` (managed clusters of 12,500 machines, as in the issue's
measurement); nginx serves the same asset files, one static iPXE script for every MAC and one
static config.yaml and user-data of the size netboot answers, so its /ipxe and config rows are
the floor: a file served, nothing decided. The servers run at once and every row is measured
in ``--rounds`` turns, the server that goes first alternating; the ratio printed is the median
of the turns' ratios (the machine's load drifts between runs a minute apart), each turn's
ratio printed after the table, and each first-request row's counts of first requests a
round. ``µs CPU`` is
each server's CPU (utime + stime of the process and its workers) per request answered, median
of the turns: steadier than req/s on a loaded machine. ``--baseline REPO`` runs a second
netboot from another checkout (e.g. main's worktree) in the same turns. ``--processes N`` runs
netboot a second time in the same turns as N ``serve`` processes on one data dir (one SQLite
inventory, each its own view kept by the change feed) sharing the HTTP port by SO_REUSEPORT
(REUSE_PORT), and prints its rate ÷ one process's, each process's RSS and PSS after the rows,
and, during the first-install rows, a check beside wrk: machines installed through one process
fetch their config by that token on new connections, which process answered each told by the
accepted socket's inode (how many landed on the other one; every answer must be 200).
Needs ``wrk`` and ``nginx`` (``apt-get install wrk nginx-light``); a missing one is said and
left out. Loopback only; servers stopped by their own PID. Not part of pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from storm import PER_CLUSTER, REPO, Workload, mac_of

HOST = "127.0.0.1"
SEVERAL = "processes"  # --processes N: netboot as N processes on one port

# ``python -c REUSE_PORT serve ...``: netboot as ``python -m netboot`` runs it, but its plain
# HTTP listener is bound with SO_REUSEPORT, so that several serve processes share one port and
# the kernel spreads connections among them. netboot has no such setting: measured, two
# processes on this 2-core VM answered first installs at 0.61x one process (benchmarks/
# README.md, s24-reuseport); this lets the figure be taken again on a larger machine. The
# listener's arguments are netboot.servers.http.listen's, with reuse_port.
REUSE_PORT = """
import asyncio, runpy, sys
import netboot.service

async def listen(doorway, host, port, *, ssl_context=None, start_serving=True):
    return await asyncio.get_running_loop().create_server(
        doorway, host, port, reuse_address=True, backlog=4096, ssl=ssl_context,
        start_serving=start_serving,  # (netboot.servers.http.listen's since session 46)
        reuse_port=ssl_context is None)  # not HTTPS: its port 0 with SO_REUSEPORT may be
                                         # one another process of this user holds

netboot.service.listen = listen
sys.argv[0] = "netboot"
runpy.run_module("netboot", run_name="__main__")
"""

# wrk runs LuaJIT (Lua 5.1: no bit operators); MACs as storm.mac_of numbers them, install
# tokens as token_of below. NB_FIRST: the machines before it are not asked for (the seed's
# registered servers).
RANDOM_MAC_LUA = """
-- Each of wrk's threads has its own Lua state; setup numbers them (in wrk's main state, which
-- keeps them for done).
local threads = {}
setup = function(thread)
  table.insert(threads, thread)
  thread:set("nb_thread", #threads)
end
-- NB_ORDER set (the first-request rows): this thread asks, in order, the machines of its own
-- slice of the round's shuffled order, written by http_paths.py (first_request_slices) to
-- NB_ORDER-<thread>, one index a line: every machine at most once in a server's life, the
-- same sequence on every server of the round. NB_ORDER empty (rows meant to repeat, nginx,
-- wire_counts.py): a random machine each request, with repeats, seeded per thread (two
-- threads seeded alike asked the same machines) and per round (NB_SEED).
local order = nil
init = function(args)
  math.randomseed(1000 * tonumber(os.getenv("NB_SEED")) + nb_thread)
  nb_drawn, nb_slice, nb_out_at, nb_spare = 0, 0, 0, 0
  local path = os.getenv("NB_ORDER")
  if path ~= nil and path ~= "" then
    order = {}
    for line in io.lines(path .. "-" .. nb_thread) do
      order[#order + 1] = tonumber(line)
    end
    nb_slice = #order
  end
end
local n = tonumber(os.getenv("NB_ENROLLED"))
local first = tonumber(os.getenv("NB_FIRST"))
local kind = os.getenv("NB_KIND")
local tail = os.getenv("NB_TOKEN_TAIL")
request = function()
  local i
  if order == nil then
    i = math.random(first, n - 1)
  elseif nb_drawn < nb_slice then
    nb_drawn = nb_drawn + 1
    i = order[nb_drawn]
  else
    -- The slice is used up: never wrap around into repeats. The thread stops (its loop ends
    -- after this turn; done says when); what this turn still sends is a request that decides
    -- and changes nothing, counted.
    if nb_out_at == 0 then
      nb_out_at = os.time()
      wrk.thread:stop()
    end
    nb_spare = nb_spare + 1
    return wrk.format("GET", "/boot.ipxe")
  end
  local mac = string.format("02-00-00-%02x-%02x-%02x", math.floor(i / 65536) % 256,
                            math.floor(i / 256) % 256, i % 256)
  if kind == "config" then
    return wrk.format("GET", "/config/" .. mac .. "?token=" .. string.format("%06d", i)
                      .. tail)
  elseif kind == "user-data" then
    return wrk.format("GET", "/nocloud/" .. mac .. "/" .. string.format("%06d", i)
                      .. tail .. "/user-data")
  end
  if kind == "ipxe-real" then
    return wrk.format("GET", "/ipxe?mac=" .. mac .. IPXE_TAIL, IPXE_HEADERS)
  end
  return wrk.format("GET", "/ipxe?mac=" .. mac .. "&arch=x86_64&platform=efi")
end
-- Read by http_paths.read_order_counts: how many machines each thread took from its slice
-- (wrk's check of the first request, before the run, takes one of thread 1's unsent), and
-- when it ran out (epoch seconds; 0: never).
done = function(summary, latency, requests)
  for t, thread in ipairs(threads) do
    io.write(string.format("nb-thread %d: drew %d of %d, out at %d, spare %d\\n", t,
                           thread:get("nb_drawn"), thread:get("nb_slice"),
                           thread:get("nb_out_at"), thread:get("nb_spare")))
  end
end
-- What iPXE sends by templates/ipxe/boot.ipxe's chain on a QEMU q35 VM with no SMBIOS UUID,
-- serial or asset tag (its :uristring escapes the product's spaces and punctuation), with
-- its own headers.
IPXE_TAIL = "&uuid=&arch=x86_64&platform=efi&serial=&manufacturer=QEMU"
  .. "&product=Standard%20PC%20%28Q35%20%2B%20ICH9%2C%202009%29&asset="
IPXE_HEADERS = {["Connection"] = "keep-alive", ["User-Agent"] = "iPXE/1.21.1+"}
"""
# The install token the seed mints for machine i: as long as a real one (token_urlsafe(24)),
# made of URL-safe characters, and predictable by the Lua script above.
TOKEN_TAIL = "-bench-install-token-abcdef"


def token_of(i: int) -> str:
    return f"{i:06d}{TOKEN_TAIL}"


# wrk's threads (-t2): the first-request rows' order is cut into as many slices.
WRK_THREADS = 2


def first_request_slices(first: int, end: int, threads: int, seed: str) -> list[list[int]]:
    """The machines ``first`` .. ``end - 1`` in an order shuffled by ``seed``, cut into
    ``threads`` disjoint slices, one for each of wrk's threads (the Lua script walks its own):
    no machine in two slices or twice in one, so a server started on a fresh copy of the seed
    sees every machine it is asked for for the first time. The same ``seed`` gives the same
    slices, so every server of a round is asked the same machines in the same order.
    Contiguous slices of one shuffle: each thread's requests spread over the whole fleet
    (clusters, pages of the store), as a storm's devices do."""
    order = list(range(first, end))
    random.Random(seed).shuffle(order)
    return [order[t * len(order) // threads:(t + 1) * len(order) // threads]
            for t in range(threads)]


def write_order(path: Path, slices: list[list[int]]) -> None:
    """Each slice to ``<path>-<thread>`` (threads numbered from 1, as the Lua script's
    setup numbers them), one machine index a line."""
    for t, machines in enumerate(slices, 1):
        Path(f"{path}-{t}").write_text("".join(f"{i}\n" for i in machines))


@dataclass(frozen=True)
class Drawn:
    """What one of wrk's threads took from its slice (the Lua script's done)."""
    drawn: int  # machines taken from the slice (each at most once)
    slice: int  # machines in the slice (0: no order, random draws)
    out_at: int  # epoch seconds when it had taken them all and stopped, 0 if never
    spare: int  # requests sent after that (/boot.ipxe: nothing decided, nothing changed)


def read_order_counts(out: str) -> list[Drawn]:
    """The Lua script's ``nb-thread`` lines in wrk's output."""
    return [Drawn(*map(int, m)) for m in re.findall(
        r"^nb-thread \d+: drew (\d+) of (\d+), out at (\d+), spare (\d+)$", out, re.M)]


# Run inside netboot's interpreter on a copy of the seed: in a managed cluster its first
# machine is a registered server, so that the others have an endpoint to join (else a
# managed cluster's agents are held: /ipxe answers a hold, config a 409); with ``mint`` 1
# every other machine gets an install under way too (booting, with its install token
# minted, as /ipxe leaves it). Written with netboot's own store.
MINT = """
import asyncio, dataclasses, sys, time
from pathlib import Path
from netboot import lifecycle
from netboot.boot import hash_token
from netboot.inventory.base import Batch, MachineFilter
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MachineState, Role
from netboot.sealing import read_key

data, tail, servers, mint = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"

async def main():
    store = SqliteStore(data / "netboot.db", sealer=read_key(data / "secret.key"))
    await store.open()
    now, updates = time.time(), []
    for m in await store.list_machines(MachineFilter(limit=10_000_000)):
        i = int(m.hostname.rsplit("-", 1)[1])  # edge-000123
        if i < servers:
            updates.append(dataclasses.replace(m, state=MachineState.REGISTERED,
                role=Role.SERVER, ipv4=f"198.51.100.{1 + i}", updated=now))
            continue
        if not mint:
            continue
        token = f"{i:06d}{tail}"
        updates.append(lifecycle.advance(m, lifecycle.Trigger.INSTALL_PLAN, now,
            token_hash=hash_token(token), install_token=token, token_expires=now + 86400,
            cluster=m.cluster, role=m.role))
    for k in range(0, len(updates), 5000):
        await store.apply_batch(Batch(update=updates[k:k + 5000]))
    await store.close()

asyncio.run(main())
"""


@dataclass(frozen=True)
class Row:
    name: str
    path: str  # "" = the Lua script decides
    connections: int
    size: int = 0  # bytes per response, for MiB/s
    machines: int = 0  # /ipxe: MACs drawn from the first this many (0: every enrolled one)
    kind: str = "ipxe"  # what the Lua script asks for: ipxe, ipxe-real, config, user-data
    # The inventory it is measured on (SEEDS): "servers", each managed cluster with its
    # registered server (MINT without tokens); "held", no server anywhere; "installing",
    # servers and every other machine's install under way (MINT).
    seed: str = "servers"
    # A row of first requests: the state its first request leaves a machine in (counted in
    # the server's inventory). Each round on fresh servers, each machine asked at most once
    # (first_request_slices). "": a row meant to repeat (random machines, servers kept).
    first: str = ""


SEEDS = ("held", "servers", "installing")  # measured in this order


ROWS = [
    Row("ipxe", "", 50, first="booting"),
    # Agents powered on before their cluster's first server registered: each is held (a hold
    # event, its facts queued), its iPXE asks again every few seconds.
    Row("ipxe-held", "", 50, seed="held"),
    # First installs asked as iPXE asks (boot.ipxe's whole query, its escapes and headers):
    # the row asks /ipxe?mac= alone, as wrk would.
    Row("ipxe-real", "", 50, kind="ipxe-real", first="booting"),
    # The same 1,000 machines again and again (installers asking for their script again, a
    # storm's second minute): the answer changes nothing, so nothing is written or read.
    Row("ipxe-1k", "", 50, machines=1000),
    Row("boot.ipxe", "/boot.ipxe", 50),
    Row("asset300", "/assets/small.txt", 50),
    Row("1MiBx50", "/assets/1m.bin", 50, 1 << 20),
    Row("32MiBx10", "/assets/32m.bin", 10, 32 << 20),
    # An installer's fetch of its per-machine config, the URL as its install script gives it
    # (token in the query): k3OS's config.yaml, cloud-init NoCloud's user-data.
    Row("config", "", 50, kind="config", seed="installing", first="installing"),
    # An installer's retry: the same 1,000 machines again and again after one unmeasured
    # run over them, which moved them to installing (nothing committed, an event queued).
    Row("config-1k", "", 50, machines=1000, kind="config", seed="installing"),
    Row("user-data", "", 50, kind="user-data", seed="installing", first="installing"),
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
        # cwd: ``-m`` puts the working directory first on sys.path, before PYTHONPATH: run
        # from a checkout, --baseline's server imported that checkout's netboot, not its own.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
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
def netboot(work: Workload, run: Path, python: str, access_log: bool, seed: Path,
            repo: Path = REPO, processes: int = 1) -> Iterator[tuple[int, list[int]]]:
    """``processes`` > 1: as many ``netboot serve`` on one data dir (one SQLite inventory),
    sharing the HTTP port (REUSE_PORT); each started once the one before has loaded its
    view (the first makes the data dir's TLS files)."""
    port = free_port()
    data = run / "data"
    shutil.copytree(seed, data)
    conf = run / "netboot.yaml"
    conf.write_text(json.dumps({
        "server": {"advertise": HOST, "data_dir": str(data), "log_level": "info"},
        # Like for like: nginx below runs with access_log off (--access-log: netboot's on).
        "http": {"listen": HOST, "port": port, "access_log": access_log},
        "https": {"port": 0},  # not measured: any free port, never 8443 taken by another
        "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "dns": {"enabled": False},
        "assets": {"dirs": [str(work.assets)]},
    }))
    with contextlib.ExitStack() as stack:
        pids = []
        for n in range(processes):
            log = run / f"netboot-{n}.log"
            run_it = ["-m", "netboot"] if processes == 1 else ["-c", REUSE_PORT]
            proc = stack.enter_context(process(
                [python, *run_it, "serve", "--config", str(conf)], log,
                {"PYTHONPATH": str(repo)}))
            wait_http(f"http://{HOST}:{port}/boot.ipxe")
            # serve answers at once and loads the inventory view in the background (until
            # then decisions read the store): measure the server as it runs, once loaded.
            started = time.monotonic()
            deadline = started + 600
            while "inventory view loaded" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"netboot's inventory view did not load ({log})")
                time.sleep(0.5)
            print(f"netboot view of the inventory loaded {time.monotonic() - started:.1f} s "
                  "after serve answered", flush=True)
            pids.append(proc.pid)
        yield port, pids


@contextlib.contextmanager
def nginx(work: Workload, run: Path, configs: dict[str, str], workers: str = "auto"
          ) -> Iterator[tuple[int, int]]:
    """``configs``: the text of one per-machine config per route (config, user-data), served
    for every machine like the iPXE script. ``workers``: nginx's worker_processes (``auto``,
    Debian's default: one a CPU; netboot serves from one event loop, benchmarks/README.md
    s47-bigfile)."""
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
    for name, text in configs.items():
        (www / f"{name}.yaml").write_text(text)
    tmp = run / "nginx"
    tmp.mkdir()
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
user root root;
worker_processes {workers};
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
    location /config/ {{ default_type text/yaml; try_files /config.yaml =404; }}
    location /nocloud/ {{ default_type text/plain; try_files /user-data.yaml =404; }}
  }}
}}
""")
    with process(["nginx", "-c", str(conf), "-p", str(tmp)], run / "nginx.log") as proc:
        wait_http(f"http://{HOST}:{port}/boot.ipxe")
        yield port, [proc.pid]


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


def loop_seconds(pid: int) -> float:
    """utime + stime of ``pid``'s main thread (netboot's event loop; nginx's master), 0 once
    it is gone."""
    path = Path(f"/proc/{pid}/task/{pid}/stat")
    fields = path.read_text().rpartition(")")[2].split() if path.exists() else []
    return sum(int(f) for f in fields[11:13]) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    return sum(map(cpu_seconds, pids))


def memory_of(pid: int) -> str:
    """RSS and PSS (pages shared with the other processes counted by share) of ``pid``."""
    kib = {line.split(":")[0]: int(line.split()[1])
           for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]}
    return f"RSS {kib['Rss'] / 1024:.1f} MiB, PSS {kib['Pss'] / 1024:.1f} MiB"


def answering_pid(local_port: int, server_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the accepted end of the loopback connection from
    ``local_port``: its inode in /proc/net/tcp, then the process whose descriptor it is."""
    want = (f"{local_port:04X}", f"{server_port:04X}")
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if (f[2].rsplit(":", 1)[1], f[1].rsplit(":", 1)[1]) == want and f[9] != "0":
            inode = f"socket:[{f[9]}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == inode:
                        return pid
    return None


def get(port: int, path: str, pids: list[int]) -> tuple[int, bytes, int | None]:
    """One GET on a connection of its own: (status, body, the process that answered)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read()
        assert conn.sock is not None  # still open (kept alive): its accepted end is found
        return r.status, body, answering_pid(conn.sock.getsockname()[1], port, pids)
    finally:
        conn.close()


# The machines at the end of the fleet the cross-process check installs (at most ~10 a second:
# one install, four configs, 0.1 s), left out of wrk's slices when --processes is on.
CROSSING = 2000


@contextlib.contextmanager
def crossing(server: str, port: int, pids: list[int], row: Row, first: int, enrolled: int
             ) -> Iterator[list[str]]:
    """While wrk's first installs run on several processes: machines installed through one
    process fetch their config by the token it minted, each fetch on a new connection (the
    kernel picks the process); every answer must be 200. Yields what it found (after).
    Its machines are the last CROSSING of the fleet, which wrk's slices leave out (a first
    install of each); not on held agents (no install, no config to fetch)."""
    found: list[str] = []
    if server != SEVERAL or not row.first or not row.kind.startswith("ipxe"):
        yield found
        return
    stop = threading.Event()
    counts = {"installs": 0, "configs": 0, "crossed": 0, "unknown": 0, "failed": 0}

    def run() -> None:
        # Machines from the end of the range, one each, a few per second: the device's
        # next connection may land on either process.
        i = enrolled - 1
        while not stop.is_set() and i >= max(first, enrolled - CROSSING):
            mac = mac_of(i).replace(":", "-")
            i -= 1
            status, body, minted = get(port, f"/ipxe?mac={mac}&arch=x86_64&platform=efi",
                                       pids)
            url = re.search(rb"config_url=http://[^/]+(/config/\S+)", body)
            if status != 200 or url is None:
                counts["failed"] += 1
                continue
            counts["installs"] += 1
            for _ in range(4):
                status, _body, answered = get(port, url.group(1).decode(), pids)
                counts["configs"] += 1
                counts["failed"] += status != 200
                counts["crossed"] += None not in (minted, answered) and answered != minted
                counts["unknown"] += answered is None
            stop.wait(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join(60)
        found.append(f"cross-process check: {counts['installs']} installs, "
                     f"{counts['configs']} config fetches on new connections, "
                     f"{counts['crossed']} on the other process than the token's "
                     f"({counts['unknown']} not told), "
                     f"{counts['failed']} failed")


@dataclass
class Measured:
    rps: float
    p99_ms: float
    errors: int
    cpu_us: float = float("nan")  # the server's CPU per request
    detail: str = ""  # wrk's lines that counted the errors, if any, and what each kind is
    requests: int = 0  # answers wrk read (0: not said)
    clock_step: float = 0.0  # how far the wall clock moved beyond the run's own time (s)
    drawn: list[Drawn] = field(default_factory=list)  # the Lua script's, a thread each
    started: float = 0.0  # the run's start, epoch seconds (for Drawn.out_at)
    firsts: int | None = None  # first requests by the server's count (its inventory)


# wrk's time units (its format_time_us).
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# wrk's runtime off from the monotonic clock's by more than this: the wall clock was stepped.
CLOCK_STEP = 1.0
# What each of wrk's error counts is (wrk 4.1's src/wrk.c). A server that closes a connection
# cleanly (FIN), even with a request unanswered, is counted nowhere: wrk reconnects quietly.
KINDS = {
    "connect": "connect: the connection was refused or failed",
    "read": "read: the connection was reset (RST) or its response was malformed",
    "write": "write: a request could not be sent (the connection was reset)",
    "timeout": "timeout: answers later than --timeout, timed by wrk's wall clock "
               "(gettimeofday): one per connection waiting when the server stalled that long, "
               "or when the clock was stepped (wrk's count, no error of the server's)",
    "status": "status: answers with a status of 400 or more (the server's)",
}


def read_wrk(out: str, elapsed: float, duration: float | None = None) -> Measured:
    """wrk's report, and ``elapsed``: the run's time on the monotonic clock. wrk times
    everything with gettimeofday: a step of the wall clock during a run (a time sync) makes
    its runtime, so its req/s, wrong, and turns each request waiting at the step into a
    "timeout" (it measures > --timeout, or < 0 seen unsigned): 50 timeouts at 50 connections
    for one step, req/s and CPU/request off by the same factor (benchmarks/README.md,
    s26-errors: reproduced with the clock stepped for wrk alone). Such a run's req/s is then
    its answers over the monotonic time, and its timeouts are not counted as errors. A run
    that took much longer than its ``duration`` (wrk, or the whole machine, stopped: both
    clocks move on) is said: its timeouts are that stop's."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", out)
    requests = int(done.group(1)) if done else 0
    step = float(done.group(2)) * _UNITS[done.group(3)] - elapsed if done else 0.0
    stepped = abs(step) > CLOCK_STEP
    if stepped:
        rps = requests / elapsed
    counts = dict.fromkeys(KINDS, 0)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    if sock:
        for kind, n in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            counts[kind] = int(n)
    status = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if status:
        counts["status"] = int(status.group(1))
    said = [f"{n} {KINDS[kind]}" for kind, n in counts.items() if n]
    if stepped:
        said.insert(0, f"the wall clock moved {step:+.1f} s during this run (wrk's runtime "
                       f"{elapsed + step:.1f} s, the run's {elapsed:.1f} s): req/s taken as "
                       f"{requests:,} answers over {elapsed:.1f} s, its timeouts not counted")
    if duration is not None and elapsed > duration + CLOCK_STEP + 1.0:
        said.insert(0, f"this {duration:g} s wrk run took {elapsed:.1f} s: wrk itself (or "
                       "the whole machine) was stopped meanwhile")
    errors = sum(n for kind, n in counts.items() if not (stepped and kind == "timeout"))
    return Measured(rps, p99_ms, errors, detail="; ".join(said), requests=requests,
                    clock_step=step if stepped else 0.0)


def wrk(port: int, row: Row, duration: float, script: Path, enrolled: int,
        first: int = 0, seed: int = 0, order: Path | None = None) -> Measured:
    """One wrk run of ``row``. ``order``: the first-request rows' slices (write_order), one
    a thread, walked in order; without it the Lua script draws machines at random."""
    argv = ["wrk", "-t2", f"-c{row.connections}", f"-d{duration:g}s", "--latency",
            "--timeout", "10s"]
    if not row.path:
        argv += ["-s", str(script)]
    argv.append(f"http://{HOST}:{port}{row.path or '/'}")
    started, wall = time.monotonic(), time.time()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         env={**os.environ, "NB_ENROLLED": str(row.machines or enrolled),
                              "NB_FIRST": str(first), "NB_KIND": row.kind,
                              "NB_SEED": str(seed), "NB_ORDER": str(order or ""),
                              "NB_TOKEN_TAIL": TOKEN_TAIL},
                         check=True).stdout
    m = read_wrk(out, time.monotonic() - started, duration)
    m.drawn, m.started = read_order_counts(out), wall
    return m


def log_problems(run: Path, last: int = 20) -> list[str]:
    """The server's own warnings and errors (its log files under ``run``), the last ones:
    printed beside a row that counted errors, so that a round's failures say what they
    were (session 25: one round's 50 errors said nothing, and the run's files were gone)."""
    lines = [line for log in sorted(run.glob("netboot-*.log"))
             for line in log.read_text(errors="replace").splitlines()
             if re.search(r'\b(WARNING|ERROR|CRITICAL)\b|"level": "(warning|error|critical)"'
                         r"|Traceback", line)]
    return lines[-last:]


def median_of(runs: list[Measured]) -> Measured:
    """The run of median req/s (its p99 and errors with it)."""
    return sorted(runs, key=lambda m: m.rps)[len(runs) // 2]


def states_of(data: Path) -> dict[str, int]:
    """Machines by state in the inventory of a server's data dir (read-only, beside the
    running server: SQLite's WAL lets a reader in)."""
    db = sqlite3.connect(f"file:{data / 'netboot.db'}?mode=ro", uri=True, timeout=30)
    try:
        return dict(db.execute("SELECT state, COUNT(*) FROM machines GROUP BY state"))
    finally:
        db.close()


def settled(data: Path, state: str, seconds: float = 15.0) -> int:
    """Machines in ``state`` once the count stops moving (wrk has stopped; the requests
    still in the server are decided and their group committed), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    last = -1
    while True:
        n = states_of(data).get(state, 0)
        if n == last or time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.3)


def told_firsts(m: Measured, row: Row, duration: float) -> str:
    """A first-request run's count of them: the server's (machines its inventory moved to
    ``row.first``), the script's (machines it took from its slices, each once: wrk's check
    of the request before the run takes one it never sends) and wrk's answers; and a thread
    that ran out of machines, said."""
    drawn = sum(d.drawn for d in m.drawn)
    said = (f"first requests: {m.firsts:,} machines moved to {row.first} by the server, "
            f"{drawn:,} drawn by wrk's script (none twice), {m.requests:,} answers")
    for t, d in enumerate(m.drawn, 1):
        if d.out_at:
            said += (f"; THREAD {t} RAN OUT of machines ({d.slice:,}) ~{d.out_at - m.started:.0f}"
                     f" s into this {duration:g} s run and stopped ({d.spare} /boot.ipxe sent"
                     " as it stopped): this run's req/s is low, not of first requests alone")
    return said


def measure(args: argparse.Namespace, servers: list[str], work: Workload, tmp: Path,
            seed: Path, rows: list[Row], script: Path, first: int,
            runs: dict[tuple[str, str], list[Measured]], ratios: dict[str, list[float]]
            ) -> None:
    """Every row of ``rows`` in ``args.rounds`` turns on every server, started on ``seed``.

    Rows meant to repeat run on servers started once for all the rounds. A first-request
    row (``Row.first``) runs each round on netboot servers started for it on a fresh copy of
    ``seed`` and stopped after it, every server asked the same slices of one shuffled order
    of the machines (first_request_slices, seeded by the row and the round), so that every
    request of the round is a machine's first in that server's life. Session 32 (s32-ceiling)
    found the old draws, uniform with repeats on servers kept through the rounds, ~75 % first
    installs in round 1 and ~40, 20, 10, 5 % in rounds 2-5 (repeats are ~4x cheaper): the
    medians overstated first installs, the more for the faster tree. nginx (a static file for
    every machine, nothing decided) is started once and draws at random."""
    netboots = [s for s in servers if s != "nginx"]
    # The machine whose config nginx serves for every machine (sample_configs), asked on a
    # netboot before nginx starts, and the cross-process check's: never in wrk's slices.
    end = args.enrolled - (CROSSING if SEVERAL in servers else 0)
    tmp.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        # Both servers up together, measured row by row in turns (the first server of a
        # turn alternating): on a shared machine the load drifts within seconds, and a
        # ratio of two runs taken a minute apart says more about the drift.
        kept: dict[str, tuple[int, list[int]]] = {}

        def start(server: str, run: Path, into: contextlib.ExitStack
                  ) -> tuple[int, list[int]]:
            run.mkdir(parents=True)
            return into.enter_context(netboot(
                work, run, args.python, args.access_log, seed,
                args.baseline if server == "baseline" else REPO,
                args.processes if server == SEVERAL else 1))

        def start_nginx(netboot_port: int) -> None:
            if "nginx" in servers and "nginx" not in kept:
                run = tmp / "nginx"
                run.mkdir(parents=True)
                kept["nginx"] = stack.enter_context(
                    nginx(work, run, sample_configs(netboot_port, rows, first),
                          args.nginx_workers))

        if any(not row.first for row in rows):
            for server in netboots:
                kept[server] = start(server, tmp / server, stack)
            start_nginx(kept["netboot"][0])
        for round_ in range(args.rounds):
            turn = servers if round_ % 2 == 0 else servers[::-1]
            for row in rows:
                ports, logs, order = kept, {s: tmp / s for s in netboots}, None
                with contextlib.ExitStack() as fresh:
                    if row.first:
                        order = tmp / f"order-{row.name}-{round_}"
                        write_order(order, first_request_slices(
                            first + 1, end, WRK_THREADS, f"{row.name}/{round_}"))
                        logs = {s: tmp / f"{row.name}-{round_}" / s for s in netboots}
                        ports = {s: start(s, logs[s], fresh) for s in turn if s in netboots}
                        start_nginx(ports["netboot"][0])
                        ports["nginx"] = kept.get("nginx", (0, []))
                    for server in turn:
                        m = one_run(args, server, ports[server], row, round_, script, first,
                                    order if server != "nginx" else None,
                                    logs.get(server))
                        runs.setdefault((server, row.name), []).append(m)
                    if row.first and round_ == args.rounds - 1:
                        show_memory({s: ports[s] for s in netboots})
                for server in logs if row.first else ():
                    shutil.rmtree(logs[server] / "data")  # its copy of the seed: disk
                for peer in servers[1:]:
                    ratio = runs["netboot", row.name][-1].rps / runs[peer, row.name][-1].rps
                    ratios.setdefault(f"{row.name}/{peer}", []).append(
                        1 / ratio if peer == SEVERAL else ratio)
        show_memory(kept)  # what each process holds after the rows


def show_memory(servers: dict[str, tuple[int, list[int]]]) -> None:
    for server, (_port, pids) in servers.items():
        for pid in pids:
            print(f"  {server} pid {pid}: {memory_of(pid)}", flush=True)


def one_run(args: argparse.Namespace, server: str, at: tuple[int, list[int]], row: Row,
            round_: int, script: Path, first: int, order: Path | None, run: Path | None
            ) -> Measured:
    """One wrk run of ``row`` on ``server`` (its port and processes ``at``, its files in
    ``run``), printed; a first-request run with its count of first requests."""
    port, pids = at
    if row.machines and round_ == 0:  # first requests change things
        wrk(port, row, args.duration, script, args.enrolled, first)
    data = run / "data" if run is not None and order is not None else None
    before = states_of(data).get(row.first, 0) if data else 0
    cpu, loop = cpu_of(pids), sum(map(loop_seconds, pids))
    with crossing(server, port, pids, row, first, args.enrolled) as crossed:
        m = wrk(port, row, args.duration, script, args.enrolled, first, round_, order)
    # wrk's count, not req/s times the duration: that is off when the wall clock was
    # stepped during the run (read_wrk).
    answered = max(1.0, m.requests or m.rps * args.duration)
    m.cpu_us = (cpu_of(pids) - cpu) / answered * 1e6
    loop_us = (sum(map(loop_seconds, pids)) - loop) / answered * 1e6
    if data:
        m.firsts = settled(data, row.first) - before
    print(f"  {server} {row.name} round {round_ + 1}: {m.rps:,.0f} req/s, p99 "
          f"{m.p99_ms:.1f} ms, {m.errors} errors, "
          f"{m.cpu_us:,.0f} µs CPU/request (main thread {loop_us:,.0f})"
          + (f"; {told_firsts(m, row, args.duration)}" if data else "")
          + "".join(f"; {c}" for c in crossed), flush=True)
    if m.detail:
        print(f"    wrk: {m.detail}", flush=True)
        if run is not None:
            for line in log_problems(run):
                print(f"    log: {line}", flush=True)
    return m


def sample_configs(port: int, rows: list[Row], first: int) -> dict[str, str]:
    """What netboot answers machine ``first`` for each config row: the file nginx serves for
    every machine (the same size)."""
    mac = mac_of(first).replace(":", "-")
    paths = {"config": f"/config/{mac}?token={token_of(first)}",
             "user-data": f"/nocloud/{mac}/{token_of(first)}/user-data"}
    out = {}
    for row in rows:
        if row.kind in paths:
            with urllib.request.urlopen(f"http://{HOST}:{port}{paths[row.kind]}",
                                        timeout=30) as r:
                out[row.kind] = r.read().decode()
    return out


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
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="also run netboot as N serve processes on one data dir and one "
                             "port (SO_REUSEPORT set by this benchmark's wrapper: netboot has "
                             "no such setting), as 'processes', in the same turns")
    parser.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    parser.add_argument("--nginx-workers", default="auto", metavar="N",
                        help="nginx's worker_processes (default auto: one a CPU, as Debian's "
                             "nginx.conf; netboot serves from one event loop)")
    args = parser.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds: servers stopped, the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for tool in ("wrk",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk)")
    rows = [r for r in ROWS if not args.only or r.name in args.only.split(",")]
    servers = ["netboot"] + (["baseline"] if args.baseline else []) + (
        [SEVERAL] if args.processes > 1 else []) + (
        ["nginx"] if shutil.which("nginx") and not args.no_nginx else [])
    if "nginx" not in servers and not args.no_nginx:
        print("nginx left out: not installed (apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="netboot-http-") as tmp_text:
        tmp = Path(tmp_text)
        work = Workload(tmp, args.enrolled, args.enrolled, 1 << 20, 1 << 20,
                        managed=not args.fixed_url)
        work.build()
        (work.assets / "small.txt").write_bytes(b"x" * 299 + b"\n")
        (work.assets / "1m.bin").write_bytes(os.urandom(1 << 20))
        (work.assets / "32m.bin").write_bytes(os.urandom(32 << 20))
        # Seeded by the baseline when there is one (the older schema, as a rule): a tree
        # opens, and migrates, a file its baseline wrote; the baseline refuses a newer one.
        older = args.baseline.resolve() if args.baseline else REPO
        took = work.netboot_seed(args.python, older)
        print(f"netboot import of {args.enrolled} machines: {took:.1f} s", flush=True)
        script = tmp / "random_mac.lua"
        script.write_text(RANDOM_MAC_LUA)
        # The managed clusters' registered servers: the first machine of each (none in the
        # "held" seed); never asked for by the Lua script (NB_FIRST).
        servers_seeded = max(1, args.enrolled // PER_CLUSTER) if not args.fixed_url else 0
        seeds = {"held": work.root / "netboot-seed"}
        for name in SEEDS[1:]:
            if not any(r.seed == name for r in rows):
                continue
            seeds[name] = work.root / f"netboot-seed-{name}"
            shutil.copytree(seeds["held"], seeds[name])
            t0 = time.perf_counter()
            subprocess.run([args.python, "-c", MINT, str(seeds[name]), TOKEN_TAIL,
                            str(servers_seeded), "1" if name == "installing" else "0"],
                           check=True, timeout=900, env={**os.environ, "PYTHONPATH": str(older)},
                           cwd=work.root)  # not the harness's checkout (-c: first on the path)
            print(f"seed {name}: {servers_seeded} registered servers"
                  + (f", install tokens minted for {args.enrolled - servers_seeded} machines"
                     if name == "installing" else "")
                  + f": {time.perf_counter() - t0:.1f} s", flush=True)
        runs: dict[tuple[str, str], list[Measured]] = {}
        ratios: dict[str, list[float]] = {}
        for name in SEEDS:
            todo = [r for r in rows if r.seed == name]
            if todo:
                measure(args, servers, work, tmp / f"seed-{name}", seeds[name], todo, script,
                        0 if name == "held" else servers_seeded, runs, ratios)
    results = {key: median_of(ms) for key, ms in runs.items()}
    firsts = ", ".join(r.name for r in rows if r.first)
    print(f"\n{args.enrolled} machines enrolled, wrk -t2, {args.duration:g} s a row, "
          f"medians of {args.rounds} round(s); the ratio is the median of each round's "
          f"(load average {os.getloadavg()[0]:.1f})"
          + (f"; {firsts} each round on fresh servers, every request a machine's first"
             if firsts else ""))
    head = f"{'path':<11} {'conns':>5}"
    for s in servers:
        head += f" {s + ' req/s':>14} {'p99 ms':>8} {'MiB/s':>8} {'errors':>6} {'µs CPU':>7}"
    print(head + "".join(f"  {SEVERAL} ÷ netboot" if peer == SEVERAL else f"  netboot ÷ {peer}"
                         for peer in servers[1:]))
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
    for row in rows:  # the rounds behind each median ratio, in order
        for peer in servers[1:]:
            who = f"{SEVERAL} ÷ netboot" if peer == SEVERAL else f"netboot ÷ {peer}"
            print(f"{row.name} {who} a round: "
                  + ", ".join(f"{r:.2f}" for r in ratios[f"{row.name}/{peer}"]))
    for row in rows:  # the first-request rows' own check: were they?
        for s in servers:
            if not row.first or s == "nginx":
                continue
            ms = runs[s, row.name]
            out = sum(any(d.out_at for d in m.drawn) for m in ms)
            print(f"{row.name} {s}: first requests by the server's count "
                  + ", ".join(f"{m.firsts:,}" for m in ms) + " of "
                  + ", ".join(f"{m.requests:,}" for m in ms) + " answers a round"
                  + (f"; {out} round(s) RAN OUT of machines (their req/s low)" if out else
                     "; no round ran out of machines"))


if __name__ == "__main__":
    main()
