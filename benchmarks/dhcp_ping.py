"""What dhcp.ping_check costs a storm of new devices on an authoritative VLAN: DISCOVER → OFFER
latency with the check on and off, and against another tree (main) in the same run.

    sudo python benchmarks/dhcp_ping.py [--devices 1,100,240] [--within 0.2] [--repeat 3]
                                        [--baseline /work/wt/s48-base]
                                        [--slots 60 --pings 240]  # 1,000 devices, scaled

Two namespaces joined by a veth pair (``nbp-<random>-s``: the server's end, 192.0.2.1/24;
``-c``: the devices'), created and deleted here; nothing touches the machine's interfaces.
The server is ``DhcpServer`` in authoritative mode on the veth (pool 192.0.2.10-254, leases
in memory), run from a tree (``--tree``: its ``netboot`` first on sys.path). The devices are
one UDP socket on :68 in the other namespace: each a made-up MAC that sends one DISCOVER
(spread evenly over ``--within`` seconds) and again 1, 2, 4 s after (iPXE's backoff), until
it is offered an address or 15 s have passed. Nobody holds a pool address, so each first
offer waits the probe's whole wait (the worst case: an address that answers is skipped at
once, its echo back in well under a millisecond). Printed per case: the first OFFER's
latency from each device's first DISCOVER (p50, p95, max), devices offered, DISCOVERs sent
(a retransmission is one the server did not answer in time) and echo requests the server
sent. Every wait is bounded; processes are ended by their own PID. Not part of pytest.
"""

from __future__ import annotations

import argparse
import json
import secrets
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SERVER_IP = "192.0.2.1"
RETRIES = (1.0, 2.0, 4.0)  # after the previous DISCOVER, as iPXE's timer doubles
GIVE_UP = 15.0


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def serve(tree: str, ping: bool, slots: int | None, pings: int | None) -> None:
    """The server in its namespace: READY on stdout, serve until stdin closes, then the
    echo requests sent. ``slots``, ``pings``: DECISIONS_IN_FLIGHT and PINGS_IN_FLIGHT made
    these (a storm scaled down: 240 devices against 60 and 240 stand for 1,000 against the
    256 and 1,024 a listener has)."""
    sys.path.insert(0, tree)
    import asyncio
    import inspect

    import netboot.servers.dhcp
    from netboot.pxe import DhcpSettings
    from netboot.servers.dhcp import DhcpServer

    if slots is not None:
        netboot.servers.dhcp.DECISIONS_IN_FLIGHT = slots
    if pings is not None:
        netboot.servers.dhcp.PINGS_IN_FLIGHT = pings  # type: ignore[attr-defined]

    class Leases:
        def __init__(self) -> None:
            self.leases: dict[str, object] = {}

        async def list_leases(self) -> list[object]:
            return []

        async def put_lease(self, lease: object, *, now: float | None = None,
                            ending: str | None = None) -> None:
            self.leases[lease.mac] = lease  # type: ignore[attr-defined]

        async def delete_lease(self, mac: str) -> None:
            self.leases.pop(mac, None)

    class NoBoot:
        async def first_stage(self, request: object) -> None:
            return None

    async def main() -> None:
        kwargs = dict(mode="authoritative", pool_start="192.0.2.10", pool_end="192.0.2.254",
                      netmask="255.255.255.0", lease_seconds=3600)
        if "ping_check" in inspect.signature(DhcpSettings).parameters:
            kwargs["ping_check"] = ping
        elif ping:
            raise SystemExit("this tree has no dhcp.ping_check")
        server = DhcpServer(DhcpSettings(**kwargs), NoBoot(), Leases(),  # type: ignore[arg-type]
                            interfaces=["nbs0"], advertise=None, probe=False)
        await server.start()
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        pinger = getattr(server, "_pinger", None)
        sent = getattr(pinger, "sent", 0)
        await server.close()
        print(json.dumps({"echoes": sent}), flush=True)

    asyncio.run(main())


def discover(mac: bytes, xid: int) -> bytes:
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s4s", 1, 1, 6, 0, xid, 0, 0x8000,
                       bytes(4), bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"),
                       bytes(64), bytes(128), b"\x63\x82\x53\x63")
    return (head + b"\x35\x01\x01\xff").ljust(300, b"\0")


def devices(count: int, within: float) -> None:
    """The devices in their namespace: one JSON line of what they saw."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, 25, b"nbc0")  # SO_BINDTODEVICE
    # All the devices share this one socket, where each real device has its own NIC: at the
    # default ~200 KB a burst of ~90 OFFERs (~2.3 KB each as the kernel counts) overflowed
    # it while this loop was sending, and those devices were answered only at their 3 s
    # retransmission (SO_RCVBUFFORCE: root, as this script is).
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    sock.bind(("0.0.0.0", 68))
    tag = secrets.token_bytes(2)
    macs = [b"\x02" + tag + i.to_bytes(3, "big") for i in range(count)]
    xids = {0x5A000000 + i: i for i in range(count)}
    start = time.monotonic()
    first = [start + within * i / max(count, 1) for i in range(count)]
    due = list(first)
    tries = [0] * count
    offered: list[float | None] = [None] * count
    sent = 0
    while time.monotonic() - start < within + GIVE_UP and None in offered:
        now = time.monotonic()
        for i in range(count):
            if offered[i] is None and due[i] <= now and tries[i] <= len(RETRIES):
                sock.sendto(discover(macs[i], 0x5A000000 + i), ("255.255.255.255", 67))
                sent += 1
                due[i] = now + (RETRIES[tries[i]] if tries[i] < len(RETRIES) else GIVE_UP)
                tries[i] += 1
        wake = min([d for i, d in enumerate(due) if offered[i] is None] or [now + 0.05])
        ready, _, _ = select.select([sock], [], [], max(0.0, min(wake - now, 0.05)))
        while ready:
            data = sock.recv(2048)
            if len(data) >= 240 and data[0] == 2:
                i = xids.get(struct.unpack_from("!I", data, 4)[0])
                if i is not None and offered[i] is None:
                    offered[i] = time.monotonic() - first[i]
            ready, _, _ = select.select([sock], [], [], 0)
    got = sorted(t for t in offered if t is not None)

    def pct(p: float) -> float | None:
        return got[min(len(got) - 1, int(p * len(got)))] if got else None

    print(json.dumps({"offered": len(got), "devices": count, "sent": sent,
                      "p50": pct(0.5), "p95": pct(0.95), "max": got[-1] if got else None}))


def run_case(ns: str, tree: str, ping: bool, count: int, within: float,
             slots: int | None = None, pings: int | None = None) -> dict[str, object]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", f"{ns}-s", sys.executable, str(HERE), "--serve", tree,
         "--ping", "on" if ping else "off", *(["--slots", str(slots)] if slots else []),
         *(["--pings", str(pings)] if pings else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdin is not None and server.stdout is not None
    try:
        ready, _, _ = select.select([server.stdout], [], [], 30)
        line = server.stdout.readline().decode() if ready else ""
        if not line.startswith("READY"):
            raise SystemExit(f"server did not start: {line!r}")
        client = subprocess.run(
            ["ip", "netns", "exec", f"{ns}-c", sys.executable, str(HERE), "--devices-run",
             str(count), "--within", str(within)],
            capture_output=True, timeout=within + GIVE_UP + 30, check=True)
        seen: dict[str, object] = json.loads(client.stdout)
        out, _ = server.communicate(timeout=30)  # stdin closed: the server stops
        seen.update(json.loads(out.decode().strip().splitlines()[-1]))
        return seen
    finally:
        if server.poll() is None:
            server.kill()  # this process only, by its own handle
            server.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve")
    ap.add_argument("--ping", default="off")
    ap.add_argument("--devices-run", type=int)
    ap.add_argument("--devices", default="1,100,240")
    ap.add_argument("--within", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline")
    ap.add_argument("--slots", type=int, help="DECISIONS_IN_FLIGHT in the server")
    ap.add_argument("--pings", type=int, help="PINGS_IN_FLIGHT in the server")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.ping == "on", args.slots, args.pings)
        return
    if args.devices_run is not None:
        devices(args.devices_run, args.within)
        return
    ns = f"nbp-{secrets.token_hex(3)}"
    made: list[str] = []
    try:
        for end in "sc":
            ip("netns", "add", f"{ns}-{end}")
            made.append(f"{ns}-{end}")
            ip("-n", f"{ns}-{end}", "link", "set", "lo", "up")
        ip("-n", f"{ns}-s", "link", "add", "nbs0", "type", "veth", "peer", "name", "nbc0",
           "netns", f"{ns}-c")
        ip("-n", f"{ns}-s", "addr", "add", f"{SERVER_IP}/24", "dev", "nbs0")
        ip("-n", f"{ns}-s", "link", "set", "nbs0", "up")
        ip("-n", f"{ns}-c", "link", "set", "nbc0", "up")
        cases = [("this, check on", str(HERE.parents[1]), True),
                 ("this, check off", str(HERE.parents[1]), False)]
        if args.baseline:
            cases.append(("baseline", args.baseline, False))
        for count in (int(n) for n in args.devices.split(",")):
            for round_ in range(args.repeat):
                order = cases if round_ % 2 == 0 else cases[::-1]  # both orders
                for name, tree, ping in order:
                    seen = run_case(ns, tree, ping, count, args.within, args.slots,
                                    args.pings)
                    print(f"{count:5d} devices  {name:16s} offered {seen['offered']}/"
                          f"{count}  p50 {seen['p50']:.3f}s  p95 {seen['p95']:.3f}s  max "
                          f"{seen['max']:.3f}s  DISCOVERs {seen['sent']}  echoes "
                          f"{seen['echoes']}", flush=True)
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True,
                           timeout=20)


if __name__ == "__main__":
    main()
