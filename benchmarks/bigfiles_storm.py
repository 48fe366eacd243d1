"""The boot storm's initrd stage alone: N devices each GET one large file at once, netboot
(one or more trees) against nginx, over a veth pair between two fresh network namespaces.

    sudo python benchmarks/bigfiles_storm.py [--devices 1000] [--size 32M] [--within 1]
                                             [--window 256K] [--rounds 3]
                                             [--tree A --tree B ...] [--no-nginx]
                                             [--ss] [--perf]

What the whole storm (benchmarks/storm.py) does in its ``initrd`` stage and nothing else: each
device opens a connection from one of the storm's client addresses, its receive buffer held to
iPXE's window (256 KiB, storm.DEVICE_WINDOW), sends one GET of the initrd, and receives every
byte of the answer (the body counted and dropped by the kernel with MSG_TRUNC, as the storm's
devices do). The devices power on within ``--within`` seconds. One client process (the storm's
default generator count), a plain epoll loop, so that it costs less than the servers it
measures.

The servers are the storm's: ``netboot serve`` of each ``--tree`` (storm.start_netboot, the
same config) and nginx with the stand-ins' config (storm.start_standins; dnsmasq runs beside
it as in the storm). Each round runs every target once in fresh namespaces, the order rotated
each round; reported per target: wall (first request to last byte), the devices' times p50 /
p90 / p99 / max, the server's CPU seconds, and the medians of the rounds. ``--ss`` samples
``ss -tinm`` in the server's namespace twice a second (the connections' send queues, bytes
not sent, send buffer, progress); ``--perf`` counts the server's sendfile / epoll / write
system calls during the round (perf stat). Not part of pytest: speed is never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import storm  # the storm's servers, namespaces and files

MSG_TRUNC = int(socket.MSG_TRUNC)
HEAD_READ = 4096


def client(spec: dict[str, Any]) -> None:
    """Inside the client namespace: the devices' downloads; prints one JSON line."""
    devices, within, window = spec["devices"], spec["within"], spec["window"]
    path, ips = spec["path"], storm.CLIENT_IPS
    request = (f"GET {path} HTTP/1.1\r\nHost: {storm.SERVER_IP}:{storm.HTTP_PORT}\r\n"
               "User-Agent: netboot-bigfiles/1\r\nAccept: */*\r\n\r\n").encode()
    sel = selectors.EpollSelector()
    buf = bytearray(256 << 10)
    view = memoryview(buf)
    start = time.monotonic()
    due = [start + within * k / devices for k in range(devices)]
    state: dict[int, dict[str, Any]] = {}
    times: list[float] = []
    failed = recvs = selects = 0
    k = 0
    while (k < devices or state) and time.monotonic() - start < spec["timeout"]:
        now = time.monotonic()
        while k < devices and due[k] <= now:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if window:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
            s.bind((ips[k % len(ips)], 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # connecting
                s.connect((storm.SERVER_IP, storm.HTTP_PORT))
            st = {"k": k, "t0": now, "sent": False, "head": b"", "left": -1}
            state[s.fileno()] = st
            sel.register(s, selectors.EVENT_WRITE, (s, st))
            k += 1
        wait = max(0.0, min(0.05, (due[k] - now) if k < devices else 0.05))
        selects += 1
        for key, _ in sel.select(wait):
            s, st = key.data
            try:
                if not st["sent"]:
                    s.send(request)
                    st["sent"] = True
                    sel.modify(s, selectors.EVENT_READ, (s, st))
                    continue
                if st["left"] < 0:
                    n = s.recv_into(view, HEAD_READ)
                    if not n:
                        raise ConnectionError("closed before the head")
                    st["head"] += bytes(view[:n])
                    end = st["head"].find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", st["head"][:end])
                    if not st["head"].startswith(b"HTTP/1.1 200") or not m:
                        raise ConnectionError(st["head"][:80])
                    st["left"] = int(m.group(1)) - (len(st["head"]) - end - 4)
                else:
                    recvs += 1
                    n = s.recv_into(view, min(st["left"], len(buf)), MSG_TRUNC)
                    if not n:
                        raise ConnectionError("closed in the body")
                    st["left"] -= n
                if st["left"] == 0:
                    times.append(time.monotonic() - st["t0"])
                    sel.unregister(s)
                    del state[s.fileno()]
                    s.close()
            except OSError:
                failed += 1
                sel.unregister(s)
                del state[s.fileno()]
                s.close()
    failed += len(state)
    usage = os.times()
    print(json.dumps({"wall": time.monotonic() - start, "times": times, "failed": failed,
                      "cpu": usage.user + usage.system, "recvs": recvs, "selects": selects,
                      "user": usage.user}))


def sample_ss(ns: str, client_ns: str, out: Path, stop: threading.Event) -> None:
    with out.open("a") as fh, out.with_name("ss-client.txt").open("a") as cfh:
        while not stop.is_set():
            text = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinmH",
                                   f"sport = :{storm.HTTP_PORT}"], capture_output=True,
                                  text=True, timeout=10, check=False).stdout
            # the listening socket's Recv-Q: connections the kernel completed that the
            # server has not accepted yet
            listen = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnH",
                                     f"sport = :{storm.HTTP_PORT}"], capture_output=True,
                                    text=True, timeout=10, check=False).stdout
            fh.write(f"=== {time.time():.3f}\n{text}{listen}")
            # the devices' side: what their receive queues hold unread
            text = subprocess.run(["ip", "netns", "exec", client_ns, "ss", "-tnH",
                                   f"dport = :{storm.HTTP_PORT}"], capture_output=True,
                                  text=True, timeout=10, check=False).stdout
            recvq = sorted(int(f.split()[1]) for f in text.splitlines() if f.split())
            if recvq:
                cfh.write(f"{time.time():.3f} conns {len(recvq)} recvq>0 "
                          f"{sum(1 for r in recvq if r)} p50 {recvq[len(recvq) // 2] >> 10}K "
                          f"p90 {recvq[int(.9 * (len(recvq) - 1))] >> 10}K\n")
            stop.wait(0.5)


def ss_summary(path: Path) -> list[str]:
    """Per sample: connections sending, Send-Q and notsent p50, send buffer p50, the
    progress (bytes acknowledged) of the connections since the last sample."""
    lines, prev, rows = [], {}, path.read_text().split("=== ")[1:]
    t0 = None
    for row in rows:
        head, _, body = row.partition("\n")
        t = float(head)
        t0 = t if t0 is None else t0
        conns = re.split(r"\n(?=ESTAB|FIN|CLOSE|LAST|SYN|LISTEN)", body.strip())
        sendq, notsent, tb, prog, now, pacing = [], [], [], [], {}, []
        backlog = unread = 0
        for c in conns:
            f = c.split()
            if len(f) >= 2 and f[0] == "LISTEN":
                backlog += int(f[1])
                continue
            if len(f) >= 5 and f[0] == "ESTAB" and int(f[1]) and not re.search(
                    r"bytes_acked:", c):
                unread += 1  # its request in the socket, nothing sent yet
            if len(f) < 5 or f[0] != "ESTAB":
                continue
            sendq.append(int(f[2]))
            m = re.search(r"notsent:(\d+)", c)
            notsent.append(int(m.group(1)) if m else 0)
            m = re.search(r"skmem:\([^)]*\btb(\d+)", c)
            tb.append(int(m.group(1)) if m else 0)
            m = re.search(r"pacing_rate (\d+)bps", c)
            pacing.append(int(m.group(1)) if m else 0)
            m = re.search(r"bytes_acked:(\d+)", c)
            acked = int(m.group(1)) if m else 0
            now[f[4]] = acked
            if f[4] in prev:
                prog.append(acked - prev[f[4]])
        prev = now
        if not sendq:
            continue

        def q(v: list[int], p: float) -> int:
            v = sorted(v)
            return v[int(p * (len(v) - 1))] if v else 0
        lines.append(f"  {t - t0:5.1f}s conns {len(sendq):4d} sending "
                     f"{sum(1 for x in sendq if x):4d} sendq p50 {q(sendq, .5) >> 10:5d}K "
                     f"notsent p50 {q(notsent, .5) >> 10:5d}K max {max(notsent) >> 10:5d}K "
                     f"sndbuf p50 {q(tb, .5) >> 10:5d}K progress p10/p50/p90 "
                     f"{q(prog, .1) >> 10}/{q(prog, .5) >> 10}/{q(prog, .9) >> 10}K "
                     f"none {sum(1 for x in prog if x == 0)} pacing p50 "
                     f"{q(pacing, .5) / 1e6:.0f} Mbit/s not accepted {backlog} "
                     f"request unread {unread}")
    return lines


def perf_stat(pid: int, out: Path) -> subprocess.Popen[bytes]:
    events = ",".join(f"syscalls:sys_enter_{n}" for n in (
        "sendfile64", "epoll_wait", "epoll_pwait", "epoll_ctl", "sendto", "write", "read",
        "recvfrom", "writev", "futex"))
    pids = ",".join(str(p) for p in [pid, *storm._children(pid)])  # nginx's workers too
    return subprocess.Popen(["perf", "stat", "-e", events, "-p", pids, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_http(ns: str, timeout: float = 60) -> None:
    probe = (f"import socket,sys; s=socket.create_connection(('{storm.SERVER_IP}',"
             f"{storm.HTTP_PORT}),1); "
             "s.sendall(b'GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); "
             "sys.exit(0 if s.recv(100) else 1)")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                          capture_output=True, timeout=10, check=False).returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit("the server did not answer")


def run_one(name: str, tree: Path | None, work: storm.Workload, args: argparse.Namespace,
            run: Path) -> dict[str, Any]:
    run.mkdir(parents=True)
    with storm.namespaces() as (server_ns, client_ns):
        if tree is None:
            procs = storm.start_standins(server_ns, run, work, quiet=False)
        else:
            work.tree = tree
            procs = storm.start_netboot(server_ns, run, work, args.python, "info")
        try:
            wait_http(server_ns)
            pid = procs[-1].popen.pid
            storm.settle(lambda: storm.cpu_seconds(pid))
            cpu0 = storm.cpu_seconds(pid)
            packets0 = veth_packets(server_ns)
            stop = threading.Event()
            sampler = None
            if args.ss:
                sampler = threading.Thread(target=sample_ss,
                                           args=(server_ns, client_ns, run / "ss.txt", stop))
                sampler.start()
            perf = perf_stat(pid, run / "perf.txt") if args.perf else None
            record = None
            if args.record:  # the whole machine's CPU, by process and symbol, mid-transfer
                record = threading.Timer(args.record, subprocess.run, args=(
                    ["perf", "record", "-a", "-g", "-o", str(run / "perf.data"), "--",
                     "sleep", "4"],), kwargs={"capture_output": True, "timeout": 60})
                record.start()
            spec = {"devices": args.devices, "within": args.within, "window": args.window,
                    "path": "/assets/storm/initrd", "timeout": args.timeout}
            out = subprocess.run(["ip", "netns", "exec", client_ns, sys.executable, __file__,
                                  "--client", json.dumps(spec)], capture_output=True,
                                 text=True, timeout=args.timeout + 60, check=False)
            if record is not None:
                record.join()
            if perf is not None:
                perf.send_signal(2)
                perf.wait(timeout=30)
            stop.set()
            if sampler is not None:
                sampler.join()
            cpu = storm.cpu_seconds(pid) - cpu0
            packets = [b - a for a, b in zip(packets0, veth_packets(server_ns), strict=True)]
            kernel = {"server": namespace_counts(server_ns, SERVER_COUNTERS),
                      "devices": namespace_counts(client_ns, DEVICE_COUNTERS)}
        finally:
            for proc in reversed(procs):
                proc.stop()
    if out.returncode != 0:
        raise SystemExit(f"{name}: client failed: {out.stderr[-2000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["server_cpu"] = cpu
    got["packets"] = packets
    got["kernel"] = kernel
    got["name"] = name
    if args.ss:
        got["ss"] = ss_summary(run / "ss.txt")
    if args.perf:
        got["perf"] = (run / "perf.txt").read_text()
    return got


def veth_packets(ns: str) -> list[int]:
    """The server's veth: packets sent (the files' segments, a GSO packet counted once: on a
    veth a segment of up to 64 KiB crosses whole) and received (the devices' ACKs)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "cat",
                          f"/sys/class/net/{storm.SERVER_IF}/statistics/tx_packets",
                          f"/sys/class/net/{storm.SERVER_IF}/statistics/rx_packets"],
                         capture_output=True, text=True, timeout=10, check=True).stdout.split()
    return [int(x) for x in out]


# What each side's kernel did besides the files' segments (its namespace's counters, fresh in
# each round): the server's retransmissions (tail loss probes, answered by the devices'
# DSACKs), zero-window probes and connections it dropped on TCP_USER_TIMEOUT
# (HttpLimits.send_timeout) mid-transfer; the devices' zero windows, and the windows they
# could not shrink to zero (their receive memory full: WantZeroWindowAdv).
SERVER_COUNTERS = ("RetransSegs", "TCPLossProbes", "TCPWinProbe", "TCPAbortOnTimeout")
DEVICE_COUNTERS = ("TCPToZeroWindowAdv", "TCPWantZeroWindowAdv", "DelayedACKs")


def kernel_counts(snmp: str, netstat: str, names: tuple[str, ...]) -> dict[str, int]:
    """``names`` from a namespace's /proc/net/snmp (Tcp) and /proc/net/netstat (TcpExt)
    texts; 0 for one its kernel does not count."""
    found: dict[str, int] = {}
    for text, table in ((snmp, "Tcp:"), (netstat, "TcpExt:")):
        rows = [line.split()[1:] for line in text.splitlines() if line.startswith(table)]
        if len(rows) >= 2:
            found.update(zip(rows[0], map(int, rows[1]), strict=False))
    return {name: found.get(name, 0) for name in names}


def namespace_counts(ns: str, names: tuple[str, ...]) -> dict[str, int]:
    texts = [subprocess.run(["ip", "netns", "exec", ns, "cat", path], check=True,
                            capture_output=True, text=True, timeout=30).stdout
             for path in ("/proc/net/snmp", "/proc/net/netstat")]
    return kernel_counts(*texts, names)


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))] if v else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--size", type=storm.size_arg, default=32 << 20)
    parser.add_argument("--within", type=float, default=1.0)
    parser.add_argument("--window", type=storm.size_arg, default=storm.DEVICE_WINDOW)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", type=Path, action="append",
                        help="a netboot checkout whose server runs (repeatable; default: this)")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--ss", action="store_true")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (ss samples)")
    parser.add_argument("--record", type=float, metavar="S",
                        help="perf record -a -g for 4 s, S seconds into each transfer")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(json.loads(args.client))
        return
    trees = [t.resolve() for t in (args.tree or [storm.REPO])]
    targets: list[tuple[str, Path | None]] = [
        (f"netboot:{t.name}" if len(trees) > 1 else "netboot", t) for t in trees]
    if not args.no_nginx:
        targets.append(("nginx", None))
    with contextlib.ExitStack() as stack:
        tmp = (tempfile.mkdtemp(prefix="bigfiles-") if args.keep else
               stack.enter_context(tempfile.TemporaryDirectory(prefix="bigfiles-")))
        root = Path(tmp)
        work = storm.Workload(root, args.devices, 1, 1 << 20, args.size, tree=trees[0])
        work.build()
        work.netboot_seed(args.python)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in targets}
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for i, (name, tree) in enumerate(order):
                load = os.getloadavg()[0]
                got = run_one(name, tree, work, args, root / f"run-{r + 1}.{i + 1}")
                results[name].append(got)
                t = got["times"]
                print(f"round {r + 1}.{i + 1} {name:24s} load {load:4.1f} wall "
                      f"{got['wall']:6.2f} s  device p50/p90/p99/max {pct(t, .5):5.2f} / "
                      f"{pct(t, .9):5.2f} / {pct(t, .99):5.2f} / {max(t or [0]):5.2f} s  "
                      f"server CPU {got['server_cpu']:5.2f} s  client CPU "
                      f"{got['cpu']:5.2f} s (user {got['user']:.2f})  recv {got['recvs']} epoll "
                      f"{got['selects']}  packets out/in {got['packets'][0]}/{got['packets'][1]}  "
                      f"failed {got['failed']}", flush=True)
                print("    kernel: " + "; ".join(
                    f"{side} " + ", ".join(f"{k} {v}" for k, v in counts.items())
                    for side, counts in got["kernel"].items()))
                for line in got.get("ss", []):
                    print(line)
                if "perf" in got:
                    print(got["perf"])
        print("\nmedians of the rounds (per GiB: of the devices' bytes received)")
        for name, runs in results.items():
            med = statistics.median
            gib = [max(1, len(g["times"])) * args.size / (1 << 30) for g in runs]
            print(f"{name:24s} wall {med([g['wall'] for g in runs]):6.2f} s (runs "
                  + ", ".join(f"{g['wall']:.2f}" for g in runs) + ")  p99 "
                  f"{med([pct(g['times'], .99) for g in runs]):5.2f} s  server CPU "
                  f"{med([g['server_cpu'] for g in runs]):5.2f} s  client CPU "
                  f"{med([g['cpu'] for g in runs]):5.2f} s  per GiB: packets out/in "
                  f"{med([g['packets'][0] / b for g, b in zip(runs, gib, strict=True)]):.0f}/"
                  f"{med([g['packets'][1] / b for g, b in zip(runs, gib, strict=True)]):.0f}, "
                  f"client CPU {med([g['cpu'] / b for g, b in zip(runs, gib, strict=True)]):.3f}"
                  " s; failed " + ", ".join(str(g["failed"]) for g in runs))


if __name__ == "__main__":
    main()
