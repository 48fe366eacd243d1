"""One send thread's work for large bodies, counted: instructions (callgrind) and sendfile calls.

    python benchmarks/sendthread_count.py [--tree REPO] [--clients 20] [--size 32M]
                                          [--window 256K] [--sndbuf 0] [--rounds 1]
    python benchmarks/sendthread_count.py --eagain 10000

The storm's initrd stage without the HTTP server: ``--clients`` loopback connections, each
with iPXE's 256 KiB receive buffer (storm.DEVICE_WINDOW) and read to the end by a reader
process outside valgrind (``recv`` with MSG_TRUNC, as the storm's devices), each sent a
``--size`` file by ``--tree``'s ``netboot.servers.sendthreads.SendThreads(1)``. This process
runs itself under ``valgrind --tool=callgrind --separate-threads=yes``, counting only the
send thread (its own ``callgrind.out-NN``: the one that calls ``os.sendfile``), and ``perf
stat`` counts its ``sendfile64`` calls. Prints the send thread's instructions, the calls,
and both per MiB sent. Under valgrind the thread is slower than the reader, so each call
moves more than on a real server: read the instructions a call, and the calls' ratio
between trees, not the absolute calls; or hold the server's send buffers to ``--sndbuf``
(SO_SNDBUF; 0, the default, leaves Linux's autotuning, as netboot does): a 1,000-device
storm's calls moved ~320 KiB each on S48, ~190 KiB on S49 (s50-bisect). Loopback only; every
child ends by its own PID. Not part of pytest.

``--eagain N``: what one ``os.sendfile`` that fails with EAGAIN costs (s49-attack's second
call after a short write): N such calls into a full loopback socket, under callgrind, less
the same run with none (instructions a call, deterministic), then 200,000 calls timed by
getrusage (user and system µs a call: the kernel's share, which callgrind does not see).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MSG_TRUNC = int(socket.MSG_TRUNC)


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def eagain(mode: str, n: int) -> None:
    """``n`` sendfile calls into a full socket, each EAGAIN (``mode`` "none": the set-up alone);
    prints the user and system seconds of the calls."""
    import resource
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    client.setblocking(False)
    with tempfile.TemporaryFile() as f:
        f.truncate(16 << 20)
        sent = 0
        try:
            while True:
                sent += os.sendfile(client.fileno(), f.fileno(), sent, (16 << 20) - sent)
        except BlockingIOError:
            pass  # full: the peer reads nothing
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(n if mode == "eagain" else 0):
            try:  # noqa: SIM105 (as the send thread catches it: a with costs its own)
                os.sendfile(client.fileno(), f.fileno(), sent, 1 << 20)
            except BlockingIOError:
                pass
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    peer.close()
    client.close()
    listener.close()
    print(f"{r1.ru_utime - r0.ru_utime} {r1.ru_stime - r0.ru_stime}")


def count_eagain(n: int) -> None:
    totals = {}
    for mode in ("none", "eagain"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--eagain-run", mode, "--eagain",
                            str(n)], check=True, timeout=1800, capture_output=True)
            m = re.search(r"^(?:totals|summary): (\d+)", out.read_text(), re.M)
            totals[mode] = int(m.group(1)) if m else 0
    timed = subprocess.run([sys.executable, __file__, "--eagain-run", "eagain", "--eagain",
                            "200000"], check=True, timeout=600, capture_output=True, text=True)
    user, system = map(float, timed.stdout.split())
    print(f"an EAGAIN sendfile: {(totals['eagain'] - totals['none']) / n:,.0f} instructions "
          f"(callgrind, {n:,} calls); {user / 200000 * 1e6:.2f} us user, "
          f"{system / 200000 * 1e6:.2f} us system (getrusage, 200,000 calls; load "
          f"{os.getloadavg()[0]:.1f})")


def reader(port: int, clients: int, window: int) -> None:
    """The devices: connect, then read every connection to its end; prints the bytes."""
    import selectors
    sel = selectors.DefaultSelector()
    for _ in range(clients):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    got, open_ = 0, clients
    buf = bytearray(1 << 20)
    while open_:
        for key, _ in sel.select(60):
            n = key.fileobj.recv_into(buf, len(buf), MSG_TRUNC)  # type: ignore[union-attr]
            if n:
                got += n
            else:
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
                open_ -= 1
    print(got, flush=True)


async def serve(clients: int, size: int, window: int, sndbuf: int) -> None:
    from netboot.servers.sendthreads import SendThreads
    with tempfile.TemporaryFile() as f:
        f.truncate(size)  # sparse: the page cache's zero page, no disk
        listener = socket.create_server(("127.0.0.1", 0), backlog=clients)
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, __file__, "--reader", str(port),
                                  "--clients", str(clients), "--window", str(window)],
                                 stdout=subprocess.PIPE, text=True)
        threads = SendThreads(1)
        threads.start()
        loop = asyncio.get_running_loop()
        socks = [listener.accept()[0] for _ in range(clients)]
        ended: asyncio.Queue[tuple[int, bool]] = asyncio.Queue()
        for s in socks:
            s.setblocking(False)
            if sndbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            given = threads.send(loop, s.fileno(), f.fileno(), 0, size,
                                 lambda sent, failed: ended.put_nowait((sent, failed)))
            assert given is not None
        outcomes = [await asyncio.wait_for(ended.get(), 600) for _ in socks]
        for s in socks:
            s.close()
        out, _ = child.communicate(timeout=120)
        threads.close()
        assert all(sent == size and not failed for sent, failed in outcomes), outcomes
        assert int(out) == size * clients, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=REPO)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=size_arg, default=32 << 20)
    parser.add_argument("--window", type=size_arg, default=256 << 10)
    parser.add_argument("--sndbuf", type=size_arg, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--eagain", type=int, metavar="N")
    parser.add_argument("--eagain-run", help=argparse.SUPPRESS)
    parser.add_argument("--reader", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eagain_run:
        eagain(args.eagain_run, args.eagain)
        return
    if args.eagain:
        count_eagain(args.eagain)
        return
    if args.reader:
        reader(args.reader, args.clients, args.window)
        return
    if args.serve:
        asyncio.run(serve(args.clients, args.size, args.window, args.sndbuf))
        return
    mib = args.clients * args.size / (1 << 20)
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            cmd = ["perf", "stat", "-e", "syscalls:sys_enter_sendfile64", "-o",
                   str(Path(tmp) / "perf.txt"), "valgrind", "--tool=callgrind",
                   "--separate-threads=yes", f"--callgrind-out-file={out}",
                   sys.executable, __file__, "--serve", "--clients", str(args.clients),
                   "--size", str(args.size), "--window", str(args.window),
                   "--sndbuf", str(args.sndbuf)]
            subprocess.run(cmd, check=True, timeout=1800, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(args.tree)})
            sends = 0
            for path in glob.glob(f"{out}-*"):
                if int(path.rsplit("-", 1)[1]) > 1:  # 01: the loop's thread
                    text = Path(path).read_text(errors="replace")
                    if "os_sendfile" in text:
                        m = re.search(r"^totals: (\d+)", text, re.M)
                        sends += int(m.group(1)) if m else 0
            perf = (Path(tmp) / "perf.txt").read_text()
            calls = int(re.search(r"([\d,]+)\s+syscalls:sys_enter_sendfile64", perf)
                        .group(1).replace(",", ""))  # type: ignore[union-attr]
        print(f"round {n + 1} {args.tree}: send thread {sends:,} instructions, sendfile64 "
              f"{calls:,} calls; per MiB {sends / mib:,.0f} instructions, {calls / mib:.2f} "
              f"calls; {sends / calls:,.0f} instructions a call", flush=True)


if __name__ == "__main__":
    main()
