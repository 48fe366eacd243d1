"""TFTP throughput on loopback: fetch a 20 MB file at several windowsizes and print MB/s.

    python benchmarks/tftp_throughput.py [--size 20000000] [--blksize 1468] [--windows 1,16]

Each server under test runs in its own process (so the client does not share its GIL) and is
described by a :class:`Peer`: how to start it on a directory and which port it listens on.
Peers run side by side with the same client and file: netboot, tftpd-hpa (``in.tftpd`` from
Debian's ``tftpd-hpa``) and dnsmasq's TFTP (``dnsmasq-base``); a peer that is not installed is
left out and said so. Ratios are netboot's rate over the peer's. Install the peers without
starting tftpd-hpa's system service, e.g. with a policy-rc.d that exits 101.
The client is a plain blocking RFC 7440 receiver; every receive has a timeout.
Not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from peers import stop, wait_for_udp_answer

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Peer:
    name: str
    start: Callable[[Path], contextlib.AbstractContextManager[int]]  # root → listening port
    binary: str | None = None  # needed on PATH; the peer is left out without it


@contextlib.contextmanager
def netboot_server(root: Path) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints its port once it is bound
        if not line.strip().isdigit():
            raise RuntimeError(f"server did not start: {line!r}")
        yield int(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _process(argv: list[str], port: int) -> Iterator[int]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Ready once a request gets an answer (an ERROR for a file that is not there).
        wait_for_udp_answer(HOST, port, b"\x00\x01no-such-file\x00octet\x00")
        yield port
    finally:
        stop(proc)


@contextlib.contextmanager
def tftpd_hpa_server(root: Path) -> Iterator[int]:
    port = _free_udp_port()
    with _process(["in.tftpd", "--listen", "--foreground", "--address", f"{HOST}:{port}",
                   "--secure", "--user", "root", str(root)], port) as p:
        yield p


@contextlib.contextmanager
def dnsmasq_server(root: Path) -> Iterator[int]:
    # dnsmasq's TFTP listens on port 69 only; bound to loopback alone.
    port = 69
    with _process(["dnsmasq", "--keep-in-foreground", "--port=0", "--enable-tftp",
                   f"--tftp-root={root}", f"--listen-address={HOST}",
                   "--bind-interfaces", "--conf-file=/dev/null", "--user=root",
                   "--pid-file="], port) as p:
        yield p


PEERS = [
    Peer("netboot", netboot_server),
    Peer("tftpd-hpa", tftpd_hpa_server, "in.tftpd"),
    Peer("dnsmasq", dnsmasq_server, "dnsmasq"),
]


def serve(root: Path) -> None:
    """Child process: netboot's server on HOST:0 until SIGTERM."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from netboot.files import FileTree
    from netboot.model import Blob
    from netboot.servers.tftp import TftpServer

    class Files:
        def __init__(self) -> None:
            self.tree = FileTree([root])

        async def tftp_open(self, path: str, peer: tuple[str, int]) -> Blob:
            return self.tree.blob(path)

    async def main() -> None:
        server = TftpServer(Files(), host=HOST, port=0)
        await server.start()
        print(server.port, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()

    asyncio.run(main())


def fetch(port: int, name: str, blksize: int, window: int, timeout: float = 5.0) -> int:
    """Download ``name``; returns the byte count."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(timeout)
    try:
        opts = b"blksize\x00%d\x00windowsize\x00%d\x00" % (blksize, window)
        sock.sendto(b"\x00\x01" + name.encode() + b"\x00octet\x00" + opts, (HOST, port))
        data, tid = sock.recvfrom(70000)
        if data[:2] != b"\x00\x06":
            raise RuntimeError(f"expected OACK, got {data[:40]!r}")
        fields = data[2:].split(b"\x00")
        granted = dict(zip(fields[0::2], fields[1::2], strict=False))
        blksize = int(granted.get(b"blksize", 512))
        window = int(granted.get(b"windowsize", 1))
        sock.sendto(b"\x00\x04\x00\x00", tid)
        expected, last_acked, total = 1, 0, 0
        while True:
            data, src = sock.recvfrom(70000)
            if src != tid:
                continue
            opcode, block = struct.unpack_from("!HH", data)
            if opcode != 3:
                raise RuntimeError(f"unexpected opcode {opcode}: {data[4:80]!r}")
            if block != expected & 0xFFFF:
                if block != (expected - 1) & 0xFFFF:
                    last_acked = expected - 1
                    sock.sendto(struct.pack("!HH", 4, last_acked & 0xFFFF), tid)
                continue
            payload = len(data) - 4
            total += payload
            expected += 1
            last = payload < blksize
            if last or expected - 1 - last_acked >= window:
                last_acked = expected - 1
                sock.sendto(struct.pack("!HH", 4, last_acked & 0xFFFF), tid)
            if last:
                return total
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20_000_000)
    parser.add_argument("--blksize", type=int, default=1468)
    parser.add_argument("--windows", default="1,16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    windows = [int(w) for w in args.windows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "big.bin").write_bytes(os.urandom(args.size))
        results: dict[tuple[str, int], float] = {}
        peers = [p for p in PEERS if p.binary is None or shutil.which(p.binary)]
        for missing in (p for p in PEERS if p not in peers):
            print(f"{missing.name}: {missing.binary} not installed, left out")
        for peer in peers:
            with peer.start(root) as port:
                for window in windows:
                    best = float("inf")
                    for _ in range(args.repeat):
                        t0 = time.perf_counter()
                        n = fetch(port, "big.bin", args.blksize, window)
                        best = min(best, time.perf_counter() - t0)
                        if n != args.size:
                            raise RuntimeError(f"{peer.name}: got {n} bytes of {args.size}")
                    results[peer.name, window] = args.size / best / 1e6
    names = [p.name for p in peers]
    others = names[1:]
    print(f"{args.size / 1e6:.0f} MB file, blksize {args.blksize}, best of {args.repeat}, MB/s"
          " (windowsize is what the client asked; a peer may grant 1)")
    print(f"{'windowsize':>10}  " + "  ".join(f"{n:>10}" for n in names)
          + "".join(f"  {'÷ ' + n:>12}" for n in others))
    for window in windows:
        row = f"{window:>10}  " + "  ".join(f"{results[n, window]:>10.1f}" for n in names)
        row += "".join(f"  {results['netboot', window] / results[n, window]:>11.2f}x"
                       for n in others)
        print(row)


if __name__ == "__main__":
    main()
