"""What a running TFTP transfer costs ``netboot serve``: descriptors and resident memory.

    python benchmarks/tftp_slots.py [--transfers 1100] [--baseline /path/to/other/checkout]

Starts ``netboot serve`` (loopback, DHCP off, its embedded defaults otherwise) and holds
``--transfers`` transfers open at once, one kind at a time, from as many client sockets spread
over 127.0.x.y addresses (under ``tftp.max_per_client``): ``probe`` (an RRQ with tsize, its
OACK left unanswered, as an EDK2 size probe before its ERROR), ``cached`` (a download of a
settled 1 MiB loader, held after its first DATA: its datagrams are the packet cache's shared
copy), ``streamed`` (the same of a 20 MiB image, above ``cache_file_size``: read from a
descriptor held per transfer) and ``fresh`` (a 1 MiB file whose mtime is in the future, as a
file written a moment ago: streamed too). For each it reads /proc/PID/fd and VmRSS/RssAnon
while the transfers are held and prints the cost per transfer beyond the idle server's, and
the server's ``netboot_tftp_errors{kind="busy"}`` (RRQs dropped at ``tftp.max_transfers``).
Loopback only; every socket and the server are closed by this process. No assertion.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
KINDS = ("probe", "cached", "streamed", "fresh")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rrq(name: str, **options: int) -> bytes:
    out = struct.pack("!H", 1) + name.encode() + b"\0octet\0"
    for k, v in options.items():
        out += k.encode() + b"\0" + str(v).encode() + b"\0"
    return out


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mem(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


def busy(http_port: int) -> int:
    body = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read()
    for line in body.decode().splitlines():
        if line.startswith('netboot_tftp_errors_total{kind="busy"}'):
            return int(float(line.split()[-1]))
    raise RuntimeError("no busy counter in /metrics")


def clients(n: int) -> list[socket.socket]:
    """``n`` UDP sockets, at most 32 per 127.0.x.y address (tftp.max_per_client is 64)."""
    out = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.{1 + i // 32 // 250}.{1 + i // 32 % 250}", 0))
        s.setblocking(False)
        out.append(s)
    return out


def wait_replies(socks: list[socket.socket], timeout: float) -> dict[int, tuple[bytes, Any]]:
    """The first datagram each socket receives (by index), within ``timeout`` seconds."""
    got: dict[int, tuple[bytes, Any]] = {}
    index = {s.fileno(): i for i, s in enumerate(socks)}
    poll = select.epoll()
    for s in socks:
        poll.register(s.fileno(), select.EPOLLIN)
    end = time.monotonic() + timeout
    try:
        while len(got) < len(socks) and time.monotonic() < end:
            for fd, _ in poll.poll(0.05):
                i = index[fd]
                data, peer = socks[i].recvfrom(2048)
                if i not in got:
                    got[i] = (data, peer)
                    poll.unregister(fd)
    finally:
        poll.close()
    return got


def hold(kind: str, n: int, port: int, pid: int, idle_fds: int) -> dict[str, float]:
    name = {"probe": "loader.efi", "cached": "loader.efi", "streamed": "big.img",
            "fresh": "fresh.efi"}[kind]
    socks = clients(n)
    try:
        before = mem(pid)
        t0 = time.monotonic()
        for s in socks:
            s.sendto(rrq(name, tsize=0, blksize=1468), ("127.0.0.1", port))
        got = wait_replies(socks, 5.0)
        if kind != "probe":  # ACK 0: DATA 1 comes, and is left unacknowledged
            for i, (_, peer) in got.items():
                socks[i].sendto(struct.pack("!HH", 4, 0), peer)
            got = wait_replies([socks[i] for i in got], 5.0)
        held = time.monotonic() - t0
        count = fds(pid)
        during = mem(pid)
        for i, (_, peer) in got.items():  # end them, as the probe's ERROR 8 does
            socks[i].sendto(struct.pack("!HH", 5, 8) + b"done\0", peer)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while fds(pid) > idle_fds + 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"answered": len(got), "fds": count - idle_fds, "rss": during["VmRSS"] - before["VmRSS"],
            "anon": during["RssAnon"] - before["RssAnon"], "seconds": held}


def serve(tree: Path, conf: Path, log: Path, http_port: int) -> subprocess.Popen[bytes]:
    """``netboot serve`` of ``tree`` with ``conf``, once its HTTP port answers (60 s)."""
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "netboot", "serve", "--config", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(tree)})
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2).read()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"netboot did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.2)


def each_tree(doc: str, count: str, default: int,
              run_tree: Callable[[Path, int, Path], None]) -> None:
    """The command line of a *_slots benchmark: ``run_tree`` for this checkout, then the
    baseline, with the open-files limit raised for the clients' sockets."""
    p = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    p.add_argument(f"--{count}", type=int, default=default)
    p.add_argument("--baseline", type=Path, help="another checkout, measured after this one")
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the clients' sockets
    with tempfile.TemporaryDirectory(prefix="slots-") as tmp:
        for tree in [HERE, *([args.baseline] if args.baseline else [])]:
            run_tree(tree.resolve(), getattr(args, count), Path(tmp))


def run_tree(tree: Path, n: int, work: Path) -> None:
    assets = work / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    loader = assets / "loader.efi"
    loader.write_bytes(os.urandom(1 << 20))
    (assets / "big.img").write_bytes(os.urandom(20 << 20))
    fresh = assets / "fresh.efi"
    fresh.write_bytes(os.urandom(1 << 20))
    past = time.time() - 60
    for p in (loader, assets / "big.img"):
        os.utime(p, (past, past))
    future = time.time() + 3600  # "modified a moment ago" for as long as this runs
    os.utime(fresh, (future, future))
    tftp_port, http_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    conf = work / f"netboot-{tree.name}.yaml"
    conf.write_text(
        f"server: {{data_dir: {work / ('data-' + tree.name)}, log_level: warning}}\n"
        f"http: {{listen: 127.0.0.1, port: {http_port}, access_log: false}}\n"
        f"https: {{enabled: false}}\ndhcp: {{mode: 'off'}}\ntftp: {{port: {tftp_port}}}\n"
        f"assets: {{dirs: [{assets}]}}\n")
    proc = serve(tree, conf, work / f"netboot-{tree.name}.log", http_port)
    try:
        # One of each first: the packet cache's copy of the loader is built, modules loaded.
        for kind in KINDS:
            hold(kind, 1, tftp_port, proc.pid, fds(proc.pid))
        time.sleep(0.5)
        idle_fds, idle = fds(proc.pid), mem(proc.pid)
        soft = int(Path(f"/proc/{proc.pid}/limits").read_text().split("Max open files")[1]
                   .split()[0])
        print(f"{tree}: idle {idle_fds} descriptors, VmRSS {idle['VmRSS']:.1f} MiB, "
              f"soft open-files limit {soft}")
        print(f"{'kind':<9} {'held':>5} {'s':>5} {'fds/transfer':>12} {'VmRSS KiB/tr':>12} "
              f"{'RssAnon KiB/tr':>14}")
        for kind in KINDS:
            r = hold(kind, n, tftp_port, proc.pid, idle_fds)
            held = max(1, int(r["answered"]))
            print(f"{kind:<9} {int(r['answered']):>5} {r['seconds']:>5.2f} "
                  f"{r['fds'] / held:>12.2f} {r['rss'] * 1024 / held:>12.1f} "
                  f"{r['anon'] * 1024 / held:>14.1f}")
        after = mem(proc.pid)
        print(f"after: VmRSS {after['VmRSS']:.1f} MiB; busy (RRQs dropped at "
              f"tftp.max_transfers): {busy(http_port)}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    each_tree(__doc__, "transfers", 1100, run_tree)


if __name__ == "__main__":
    main()
