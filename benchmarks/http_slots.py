"""What a kept-alive HTTP connection costs ``netboot serve``: descriptors and resident memory.

    python benchmarks/http_slots.py [--connections 2000] [--baseline /path/to/other/checkout]

Starts ``netboot serve`` (loopback, DHCP and HTTPS off, ``http.max_connections`` raised above
``--connections`` for the run) and opens ``--connections`` connections from 127.0.x.y
addresses (under ``http.max_connections_per_source``), each asking ``GET /boot.ipxe`` once and
then kept alive, idle, as a device's pooled connection is between its requests (or after
iPXE handed over to the kernel). While they are held it reads /proc/PID/fd, VmRSS and
RssAnon, and the kernel's TCP memory (/proc/net/sockstat, pages), and prints the cost per
connection beyond the server's before. Loopback only; every socket and the server are
closed by this process. No assertion.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from tftp_slots import each_tree, serve

ASK = b"GET /boot.ipxe HTTP/1.1\r\nHost: netboot\r\nUser-Agent: iPXE/1.21.1\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mem(pid: int) -> dict[str, float]:
    out = {"fds": float(len(os.listdir(f"/proc/{pid}/fd")))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0])  # KiB
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            out["tcp_pages"] = float(fields[fields.index("mem") + 1])
    return out


def answer(sock: socket.socket) -> None:
    """Read one response (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)


def hold(n: int, port: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.{10 + i // 100}.{1 + i % 100}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(ASK)
        answer(s)
        socks.append(s)
    return socks


def run_tree(tree: Path, n: int, work: Path) -> None:
    (work / "assets").mkdir(exist_ok=True)
    port = free_port()
    conf = work / f"netboot-{tree.name}.yaml"
    conf.write_text(
        f"server: {{data_dir: {work / ('data-' + tree.name)}, log_level: warning}}\n"
        f"http: {{listen: 127.0.0.1, port: {port}, access_log: false, "
        f"max_connections: {n + 100}}}\n"
        f"https: {{enabled: false}}\ndhcp: {{mode: 'off'}}\ntftp: {{port: {free_port()}}}\n"
        f"assets: {{dirs: [{work / 'assets'}]}}\n")
    proc = serve(tree, conf, work / f"netboot-{tree.name}.log", port)
    socks: list[socket.socket] = []
    try:
        for s in hold(50, port):  # the first connections' modules and caches, then closed
            s.close()
        time.sleep(1.0)
        before = mem(proc.pid)
        t0 = time.perf_counter()
        socks = hold(n, port)
        took = time.perf_counter() - t0
        time.sleep(1.0)
        held = mem(proc.pid)
        print(f"{tree}: {n} kept-alive connections opened and asked in {took:.2f} s; before: "
              f"{before['fds']:.0f} descriptors, VmRSS {before['VmRSS'] / 1024:.1f} MiB")
        print(f"  per connection: {(held['fds'] - before['fds']) / n:.2f} descriptors, "
              f"VmRSS {(held['VmRSS'] - before['VmRSS']) / n:.2f} KiB, "
              f"RssAnon {(held['RssAnon'] - before['RssAnon']) / n:.2f} KiB, kernel TCP "
              f"{(held['tcp_pages'] - before['tcp_pages']) * 4 / n:.2f} KiB (both ends)")
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    each_tree(__doc__, "connections", 2000, run_tree)


if __name__ == "__main__":
    main()
