"""How long a rate-limited client takes to get its answer: UDP, TC=1, then TCP (slip 1).

    python benchmarks/dns_slip_retry.py [--runs 40]

This tree's ``DnsServer`` on loopback (in a thread of its own, its own event loop), with
``dns.rate_limit`` at 1 answer a second and slip 1, its clock held still: once an account
is spent, every UDP answer to its network is an empty TC answer, and nothing is earned
while the benchmark runs. 127.0.1.0/24 is in ``exempt_clients``: the same query from there
is answered in full over UDP, the control. Each is timed ``--runs`` times, alternating:

- ``dig``: BIND's dig (bind9-dnsutils), one process a query, as a shell script or a
  device's tooling asks (dig's own start-up is most of its time); limited, it prints
  ";; Truncated, retrying in TCP mode." and asks again over TCP (checked each run).
- ``stub``: a stub as getaddrinfo's resolvers do it (glibc's res_send, busybox's, musl's
  on TC): a UDP query; on TC=1 a TCP connection, the query again, the answer, close.

Prints the median and 90th percentile of each in milliseconds, and limited ÷ exempt.
Loopback only. Not part of pytest; no assertion on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dns_qps import inventory

from netboot.names import ZoneHolder
from netboot.rrl import Limits, ResponseRateLimiter
from netboot.servers.dns import DnsServer

NAME = "node5.netboot.lan"
LIMITED, EXEMPT = "127.0.0.1", "127.0.1.1"


def serve(ready: threading.Event, box: dict[str, object], stop: threading.Event) -> None:
    async def run() -> None:
        rrl = ResponseRateLimiter(Limits(responses_per_second=1, slip=1,
                                         exempt_clients=("127.0.1.0/24",)))
        server = DnsServer(ZoneHolder(inventory(100)), host=LIMITED, port=0, forward=False,
                           rate_limiter=rrl, clock=lambda: 1000.0)
        await server.start()
        box["port"], box["rrl"] = server.port, rrl
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.close()

    asyncio.run(run())


def query(qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in NAME.split("."))
    return qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + \
        b"\x00\x00\x01\x00\x01"


def stub(port: int, source: str, qid: int) -> tuple[float, bool]:
    """Seconds to an answer, and whether it came over TCP after a TC answer."""
    start = time.perf_counter()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.bind((source, 0))
        udp.sendto(query(qid), (LIMITED, port))
        reply = udp.recv(4096)
    if not reply[2] & 0x02:
        assert int.from_bytes(reply[6:8], "big") == 1, reply
        return time.perf_counter() - start, False
    with socket.create_connection((LIMITED, port), timeout=5,
                                  source_address=(source, 0)) as tcp:
        message = query(qid)
        tcp.sendall(len(message).to_bytes(2, "big") + message)
        size = int.from_bytes(recv_exactly(tcp, 2), "big")
        reply = recv_exactly(tcp, size)
    assert int.from_bytes(reply[6:8], "big") == 1 and not reply[2] & 0x02, reply
    return time.perf_counter() - start, True


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def dig(binary: str, port: int, source: str) -> tuple[float, bool]:
    start = time.perf_counter()
    out = subprocess.run([binary, "-b", source, f"@{LIMITED}", "-p", str(port), NAME, "A",
                          "+tries=1", "+time=5"], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    took = time.perf_counter() - start
    assert "10.0.0.5" in out, out
    return took, "Truncated, retrying in TCP mode" in out


def summary(label: str, limited: list[float], exempt: list[float]) -> str:
    def pct(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000

    lm, em = statistics.median(limited) * 1000, statistics.median(exempt) * 1000
    return (f"  {label}: limited (UDP TC, then TCP) median {lm:.2f} ms, p90 "
            f"{pct(limited, 0.9):.2f}; exempt (UDP) median {em:.2f} ms, p90 "
            f"{pct(exempt, 0.9):.2f}; limited ÷ exempt {lm / em:.2f}x "
            f"(+{lm - em:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    binary = shutil.which("dig")
    if binary is None:
        raise SystemExit("dig not found: apt-get install bind9-dnsutils")
    ready, stop, box = threading.Event(), threading.Event(), {}
    thread = threading.Thread(target=serve, args=(ready, box, stop), daemon=True)
    thread.start()
    if not ready.wait(30):
        raise SystemExit("the DNS server did not start")
    port = int(box["port"])  # type: ignore[call-overload]
    try:
        for qid in (1, 2):  # spend the account: 1 a second, the clock held
            stub(port, LIMITED, qid)
        times: dict[str, list[float]] = {"dig-l": [], "dig-e": [], "stub-l": [], "stub-e": []}
        for i in range(args.runs):
            for kind, source in (("l", LIMITED), ("e", EXEMPT))[:: 1 if i % 2 else -1]:
                took, by_tcp = dig(binary, port, source)
                assert by_tcp == (kind == "l"), (kind, by_tcp)
                times[f"dig-{kind}"].append(took)
                took, by_tcp = stub(port, source, 100 + i)
                assert by_tcp == (kind == "l"), (kind, by_tcp)
                times[f"stub-{kind}"].append(took)
    finally:
        stop.set()
        thread.join(10)
    rrl = box["rrl"]
    print(f"dns_slip_retry: {args.runs} runs each; load average {os.getloadavg()[0]:.1f}; "
          f"the limiter slipped {rrl.slipped} and dropped {rrl.dropped}")  # type: ignore[attr-defined]
    print(summary("dig ", times["dig-l"], times["dig-e"]))
    print(summary("stub", times["stub-l"], times["stub-e"]))


if __name__ == "__main__":
    main()
