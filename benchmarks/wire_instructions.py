"""Instructions per request of a real ``netboot serve`` on the wire: each thread counted.

    python benchmarks/wire_instructions.py [--enrolled 20000] [--requests 1000]
                                           [--rows first,again,held,config] [--keep DIR]
                                           [--tree REPO] [--annotate DIR] [--access-log]

ipxe_inproc.py --instructions counts a first install's loop work with the handler called
without the front door; this counts the same request as it comes on a socket: ``netboot
serve`` (HTTP on loopback, DHCP, TFTP and DNS off) runs under valgrind's callgrind
(``--separate-threads``: the event loop's thread is cg.out-01), counting only between
``callgrind_control -i on`` and ``off`` around exactly ``--requests`` answers given on 50
kept-alive connections by a client of this script's (asyncio, plain sockets, outside
valgrind: wrk's count includes answers in flight when it stops). Rows: ``first``, first
installs of machines never asked before (http_paths.py's ``ipxe`` on its ``servers`` seed);
``again``, 1,000 machines asked once (not counted), then asked again at random (``ipxe-1k``);
``held``, agents of clusters without a server (``ipxe-held``); ``config``, first k3OS config
fetches by the install token (http_paths.py's ``config`` on its ``installing`` seed: every
machine's install under way, its token minted). This VM has no hardware
counters: this is where the loop's instructions on the wire come from. Under valgrind the
threads run one at a time (its lock), so this counts work, not waits; the loop's wake-ups
are as many as its turns, fewer requests a turn than on a fast server (a turn's fixed cost
shows more). Loopback only; the server stopped by its own PID. Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from http_paths import MINT, TOKEN_TAIL, free_port, token_of
from storm import PER_CLUSTER, REPO, Workload

HOST = "127.0.0.1"
CONNECTIONS = 50


def mac(i: int) -> str:
    return f"02-00-00-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}"


async def ask(port: int, macs: list[int], *, config: bool = False) -> int:
    """Every MAC of ``macs`` asked once (its /ipxe, or with ``config`` its k3OS config by
    its install token, as http_paths.py's ``config`` row asks), on CONNECTIONS kept-alive
    connections; the answers that were 200."""
    todo = iter(macs)
    ok = 0

    async def one() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for i in todo:
                target = (f"/config/{mac(i)}?token={token_of(i)}" if config
                          else f"/ipxe?mac={mac(i)}&arch=x86_64&platform=efi")
                writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                ok += head.startswith(b"HTTP/1.1 200")
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(CONNECTIONS)))
    return ok


def totals(run: Path) -> list[tuple[str, int]]:
    out = []
    for path in sorted(run.glob("cg.out-*")):
        lines = [line for line in path.read_text().splitlines() if line.startswith("totals:")]
        out.append((path.name, int(lines[0].split()[1]) if lines else 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrolled", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rows", default="first,again,held")
    parser.add_argument("--tree", type=Path, default=REPO, help="the netboot checkout run")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--keep", type=Path, help="the seeds made or reused in this directory")
    parser.add_argument("--annotate", type=Path, help="callgrind's files copied here")
    parser.add_argument("--access-log", action="store_true",
                        help="the access log on (netboot's default; off, as http_paths.py "
                             "runs it unless told)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers = max(1, args.enrolled // PER_CLUSTER)
    with tempfile.TemporaryDirectory(prefix="netboot-wire-i-") as tmp_text:
        tmp = Path(tmp_text)
        root = args.keep or tmp / "work"
        work = Workload(root, args.enrolled, args.enrolled, 1 << 20, 1 << 20, managed=True)
        held = root / "netboot-seed"
        if not held.exists():
            work.build()
            print(f"import: {work.netboot_seed(args.python, args.tree):.1f} s", flush=True)
        seeded = root / "netboot-seed-servers"
        if not seeded.exists():
            shutil.copytree(held, seeded)
            subprocess.run([args.python, "-c", MINT, str(seeded), TOKEN_TAIL, str(servers), "0"],
                           check=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(args.tree)})
        installing = root / "netboot-seed-installing"
        if "config" in args.rows.split(",") and not installing.exists():
            shutil.copytree(held, installing)
            subprocess.run([args.python, "-c", MINT, str(installing), TOKEN_TAIL, str(servers),
                            "1"], check=True, timeout=900,
                           env={**os.environ, "PYTHONPATH": str(args.tree)})
        for row in args.rows.split(","):
            run = tmp / row
            run.mkdir()
            shutil.copytree({"held": held, "config": installing}.get(row, seeded), run / "data")
            port = free_port()
            (run / "netboot.yaml").write_text(json.dumps({
                "server": {"advertise": HOST, "data_dir": str(run / "data"),
                           "log_level": "info"},
                "http": {"listen": HOST, "port": port, "access_log": args.access_log},
                "https": {"port": 0}, "dhcp": {"mode": "off"}, "tftp": {"enabled": False},
                "dns": {"enabled": False}, "assets": {"dirs": [str(work.assets)]}}))
            log = (run / "netboot.log").open("wb")
            proc = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                 f"--callgrind-out-file={run / 'cg.out'}", "--log-file=/dev/null",
                 args.python, "-m", "netboot", "serve", "--config", str(run / "netboot.yaml")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=run,
                env={**os.environ, "PYTHONPATH": str(args.tree)})
            try:
                deadline = time.monotonic() + 1200
                while b"inventory view loaded" not in (run / "netboot.log").read_bytes():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"netboot did not load its view ({run})")
                    time.sleep(1)
                first = 0 if row == "held" else servers
                draw = random.Random(27)
                pool = list(range(first, args.enrolled))
                draw.shuffle(pool)
                if row == "again":
                    some = pool[:1000]
                    # Their installs started, then asked again twice (not counted): a kept
                    # decision is made at a repeat after the install's commit (the view's
                    # machine is then the committed one), as wrk's unmeasured run makes them.
                    for _ in range(3):
                        asyncio.run(ask(port, some))
                    measured = [draw.choice(some) for _ in range(args.requests)]
                    warm = [draw.choice(some) for _ in range(200)]
                else:  # first asks; the warm-up's machines apart from the measured ones
                    warm, measured = pool[:200], pool[200:200 + args.requests]
                config = row == "config"
                asyncio.run(ask(port, warm, config=config))
                subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                               capture_output=True)
                t0 = time.monotonic()
                ok = asyncio.run(ask(port, measured, config=config))
                took = time.monotonic() - t0
                subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                               capture_output=True)
            finally:
                proc.send_signal(signal.SIGTERM)  # our own child, by its handle
                proc.wait(timeout=300)
                log.close()
            counts = totals(run)
            n = args.requests
            print(f"{row}: {ok} of {n} answered 200 in {took:.1f} s under callgrind; "
                  f"loop {counts[0][1] / n:,.0f} instructions/request; other threads "
                  + ", ".join(f"{name} {c / n:,.0f}" for name, c in counts[1:] if c),
                  flush=True)
            if args.annotate:
                dest = args.annotate / row
                dest.mkdir(parents=True, exist_ok=True)
                for path in run.glob("cg.out-*"):
                    shutil.copy(path, dest)


if __name__ == "__main__":
    main()
