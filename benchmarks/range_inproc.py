"""What a file GET costs the server, with and without Range, two trees side by side.

    python benchmarks/range_inproc.py --compare /work/wt/s46-base [--requests 200] [--rounds 2]

Each tree's child runs ``netboot serve`` in process (uvloop, access log off) under valgrind's
callgrind. For each kind of request a client (another process, not counted) opens one
keep-alive connection, sends 20 requests (a warm-up: the file held or opened, each code path
taken once), then, with instrumentation on, ``--requests`` more, reading every answer whole;
the counts are dumped after each kind. Kinds: ``boot.ipxe`` (the front door's generated
script), ``kernel`` (an 8 MiB file: the front door's sendfile), ``kernel-range`` (``Range:
bytes=4194304-``, a resumed download: aiohttp's path), ``small-range`` (``bytes=100-`` of a
1,000-byte file held in memory), ``kernel-2ranges`` (``bytes=0-1023,4194304-4195327``:
main answers it 416, so its figure is not comparable). Printed: instructions per request of
all the server's threads (the loop's and the executor's, which aiohttp's FileResponse uses
to stat and open), per tree and kind (the median over the rounds, the tree that starts
first alternating), and this tree ÷ the baseline: counts that the machine's load does not
move. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ipxe_inproc  # this directory's (a script's sys.path[0])

KINDS = {
    "boot.ipxe": ("/boot.ipxe", ""),
    "kernel": ("/assets/vmlinuz", ""),
    "kernel-range": ("/assets/vmlinuz", "bytes=4194304-"),
    "small-range": ("/assets/small.txt", "bytes=100-"),
    "kernel-2ranges": ("/assets/vmlinuz", "bytes=0-1023,4194304-4195327"),
}

CLIENT = r'''
import socket, sys
port, target, rng, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port))
head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: iPXE/1.21.1\r\n"
head += (f"Range: {rng}\r\n" if rng else "") + "\r\n"
buf = bytearray(1 << 20)
view = memoryview(buf)


def ask(count):
    statuses = set()
    for _ in range(count):
        s.sendall(head.encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        top, _, rest = got.partition(b"\r\n\r\n")
        statuses.add(top.split(b" ", 2)[1].decode())
        length = [l.split(b":")[1] for l in top.split(b"\r\n")
                  if l.lower().startswith(b"content-length:")]
        if not length:  # main's 416 of several ranges: chunked, an empty body
            while not rest.endswith(b"0\r\n\r\n"):
                rest += s.recv(65536)
            continue
        left = int(length[0]) - len(rest)
        while left > 0:
            left -= s.recv_into(view, min(left, len(buf)))
    return ",".join(sorted(statuses))


ask(20)
print("ready", flush=True)
sys.stdin.readline()  # counted from here
print(ask(n), flush=True)
'''

CHILD = r'''
import asyncio, json, os, subprocess, sys
from pathlib import Path
from netboot.config import load
from netboot.service import build, loop_factory

run, n, client = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
kinds = json.loads(sys.argv[4])


async def serve():
    service = await build(load(run / "netboot.yaml", env={}))
    await service.start()
    port = service.http_port
    out = {}
    pid = str(os.getpid())
    for name, (target, rng) in kinds.items():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", client, str(port), target, rng, str(n),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert (await proc.stdout.readline()).strip() == b"ready"
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        proc.stdin.write(b"go\n")
        out[name] = (await proc.stdout.readline()).decode().strip()
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", name, pid], check=True,
                       capture_output=True)
        await proc.wait()
    await service.close()
    print(json.dumps(out), flush=True)


with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
    runner.run(serve())
'''

# ipxe_inproc.py's server (loopback, access log off), quieter: no line a request.
CONFIG = ipxe_inproc.CONFIG.replace('"log_level": "info"', '"log_level": "warning"')


def start(python: str, tree: Path, run: Path, assets: Path, requests: int
          ) -> subprocess.Popen[str]:
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "netboot.yaml").write_text(CONFIG.format(data=run / "data", assets=assets))
    counted = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
               f"--callgrind-out-file={run / 'cg.out'}", "--log-file=/dev/null"]
    return subprocess.Popen([*counted, python, "-c", CHILD, str(run), str(requests), CLIENT,
                             json.dumps(KINDS)], cwd=run, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(tree),
                                 "PYTHONHASHSEED": "0"})


def counts(run: Path, requests: int) -> dict[str, float]:
    """Instructions per request of every thread, from each kind's dump
    (``cg.out.<n>-<thread>``: the n-th dump is the n-th kind's; its ``totals:``)."""
    out: dict[str, float] = {}
    names = list(KINDS)
    for path in run.glob("cg.out.*-*"):
        dump = int(path.name.split(".")[2].split("-")[0])
        totals = [line for line in path.read_text(errors="replace").splitlines()
                  if line.startswith("totals:")]
        if totals and dump <= len(names):
            kind = names[dump - 1]
            out[kind] = out.get(kind, 0.0) + int(totals[0].split()[1]) / requests
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, required=True, metavar="TREE")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="range-inproc-"))
    assets = work / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(os.urandom(8 << 20))
    (assets / "small.txt").write_bytes(b"0123456789" * 100)
    trees = {"tree": args.tree.resolve(), "base": args.compare.resolve()}
    figures: dict[str, dict[str, list[float]]] = {t: {k: [] for k in KINDS} for t in trees}
    try:
        for turn in range(args.rounds):
            order = list(trees) if turn % 2 == 0 else list(reversed(trees))
            procs = {t: start(args.python, trees[t], work / f"{t}-{turn}", assets,
                              args.requests) for t in order}
            for t, proc in procs.items():
                said, _ = proc.communicate(timeout=3600)
                print(f"round {turn} {t}: statuses {said.strip()}", flush=True)
                for kind, value in counts(work / f"{t}-{turn}", args.requests).items():
                    figures[t][kind].append(value)
        print(f"{'kind':16} {'tree instr/req':>16} {'base instr/req':>16} {'tree / base':>12}")
        for kind in KINDS:
            a, b = figures["tree"][kind], figures["base"][kind]
            if a and b:
                ta, tb = sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]
                print(f"{kind:16} {ta:16,.0f} {tb:16,.0f} {ta / tb:12.3f}   "
                      f"(rounds: {[f'{x:,.0f}' for x in a]} / {[f'{x:,.0f}' for x in b]})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
