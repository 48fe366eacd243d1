"""Where a 1,000-DISCOVER storm of enrolled machines waits: each DISCOVER's time split on the
server's side, against what the event loop and the writer thread did meanwhile.

    sudo python benchmarks/dhcp_storm_probe.py [--baseline TREE] [--repeat 3] [--storm 1000]
                                               [--writer-nice N] [--keep DIR]

The server is ``dhcp_offers.py``'s ``netboot+enrolled`` (``BootService`` over SQLite, every
MAC of the load enrolled, asyncio's own loop), warmed as that benchmark warms it (200
DISCOVERs, then its closed loop of 20,000 over 1,000 MACs), then ``--storm`` first
DISCOVERs spread over 1 s. Both processes read CLOCK_MONOTONIC (``time.perf_counter``), so
each DISCOVER's time splits into: the client's send to the server's ``datagram_received``
(in the kernel, or queued while the loop ran something else or waited), that call to the
reply's ``sendto`` (the server's own work), and back to the client.

What the server ran meanwhile, recorded in it: every loop callback over 0.2 ms (asyncio's
``Handle._run``: wall time, the loop thread's CPU time, and its run-queue delay from
``/proc/self/task/<tid>/schedstat``: runnable, no CPU given); what is left of the wall time
is neither running nor runnable: waiting for the GIL (or a blocking call). Also each
collection of the cyclic GC, and each transaction of the SQLite writer thread (wall and its
thread's CPU). ``--writer-nice N`` gives the writer thread nice N (an experiment: is the
loop queued behind its own writer?). Rounds alternate the trees' order. Not part of pytest;
namespaces and processes are its own (dhcp_offers.namespaces), stopped by their PIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
CALLBACK_OVER = 0.0002  # loop callbacks recorded: longer than this (s)
LONG = 0.0015  # callbacks summed as long ones (s)


def serve(out: str, nice: int | None) -> None:
    """The server (in the server namespace), its records written to ``out`` at SIGTERM."""
    import asyncio
    import asyncio.events
    import gc
    import threading

    sys.path.insert(0, str(HERE.parent))
    import dhcp_offers as bench  # its NETBOOT_TREE: this run's tree

    pc, tt = time.perf_counter, time.thread_time
    rec: dict[str, list[Any]] = {"in": [], "out": [], "callbacks": [], "gc": [], "writes": [],
                                 "threads": []}
    gc.callbacks.append(lambda phase, info: rec["gc"].append(
        (phase, pc(), info.get("generation"))))
    stat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)

    def queued() -> float:
        return int(os.pread(stat, 100, 0).split()[1]) / 1e9

    run = asyncio.events.Handle._run

    def timed(handle: Any) -> None:
        t0, c0, q0 = pc(), tt(), queued()
        run(handle)
        t1 = pc()
        if t1 - t0 > CALLBACK_OVER:
            callback = getattr(handle, "_callback", None)
            owner = getattr(callback, "__self__", None)
            name = (owner.get_coro().__qualname__ if hasattr(owner, "get_coro")
                    else getattr(callback, "__qualname__", repr(callback)[:60]))
            rec["callbacks"].append((t0, t1, name, tt() - c0, queued() - q0))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            server = await bench.make_server("store", bench.SERVER_IF, Path(tmp),
                                             enroll=bench.enrolled_macs(1000, 1000))
            made = server._protocol

            def protocol(*args: Any, **kwargs: Any) -> Any:
                p = made(*args, **kwargs)
                received, send = p.datagram_received, p._send

                def datagram_received(data: bytes, addr: Any) -> None:
                    rec["in"].append((int.from_bytes(data[4:8], "big"), pc()))
                    received(data, addr)

                def sent(replies: Any) -> None:
                    replies = list(replies)
                    send(replies)
                    now = pc()
                    rec["out"].extend((int.from_bytes(r[0][4:8], "big"), now) for r in replies)

                p.datagram_received, p._send = datagram_received, sent
                return p

            server._protocol = protocol
            store = server._first_stage.__self__._store
            apply = store._apply_here
            niced: list[int] = []

            def apply_here(*args: Any) -> Any:
                if nice is not None and not niced:
                    niced.append(threading.get_native_id())
                    os.setpriority(os.PRIO_PROCESS, niced[0], nice)
                t0, c0 = pc(), tt()
                try:
                    return apply(*args)
                finally:
                    rec["writes"].append((t0, pc(), len(args[2]), tt() - c0))

            store._apply_here = apply_here
            await server.start()
            print("ready", flush=True)
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            # Each thread's id as the kernel names it (perf sched, /proc): which of them
            # took the loop's CPU.
            rec["threads"] = [(t.name, t.native_id) for t in threading.enumerate()]
            Path(out).write_text(json.dumps(rec))
            await server.close()

    asyncio.run(main())


def storm_client(devices: int, within: float, out: str) -> None:
    """``devices`` DISCOVERs spread over ``within`` s (dhcp_offers.storm's), each xid's send
    and answer time written to ``out``."""
    sys.path.insert(0, str(HERE.parent))
    import dhcp_offers as bench

    sock = bench.client_socket()
    sock.setblocking(False)
    Path(out + ".pid").write_text(str(os.getpid()))
    xid0 = int.from_bytes(os.urandom(2), "big") << 16
    sent: dict[int, float] = {}
    got: dict[int, float] = {}
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < within + 2.0 and len(got) < devices:
        now = time.perf_counter()
        while i < devices and now >= t0 + within * i / devices:
            sock.sendto(bench.discover(bench.mac_of(bench.STORM_MAC0 + i), xid0 + i),
                        ("255.255.255.255", 67))
            sent[xid0 + i] = time.perf_counter()
            i += 1
        wait = max(0.0, t0 + within * i / devices - time.perf_counter()) if i < devices else 0.05
        if select.select([sock], [], [], min(wait, 0.05))[0]:
            for xid, at in bench.offers(sock):
                if xid in sent and xid not in got:
                    got[xid] = at
    Path(out).write_text(json.dumps({"sent": sent, "got": got}))


def one_run(tree: Path, storm: int, nice: int | None, keep: Path,
            ahead: int | None = None) -> dict[str, float]:
    """One server of ``tree``, warmed, then the storm; its figures. ``ahead``: server and
    clients run under ``nice -n ahead`` (negative: ahead of the machine's other work)."""
    first = ["nice", "-n", str(ahead)] if ahead is not None else []
    sys.path.insert(0, str(HERE.parent))
    import dhcp_offers as bench
    from peers import stop

    keep.mkdir(parents=True, exist_ok=True)
    with bench.namespaces() as (sns, cns):
        argv = [sys.executable, str(HERE), "--serve", str(keep / "server.json")]
        if nice is not None:
            argv += ["--writer-nice", str(nice)]
        log = open(keep / "server.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([*first, "ip", "netns", "exec", sns, "env",
                                 f"NETBOOT_TREE={tree}",
                                 "PYTHONUNBUFFERED=1", *argv], stdout=subprocess.PIPE,
                                stderr=log)
        try:
            assert proc.stdout is not None
            ready = select.select([proc.stdout], [], [], 60)[0]
            if not ready or proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"the server did not start: {keep / 'server.log'}")

            def client(*args: str) -> None:
                subprocess.run([*first, "ip", "netns", "exec", cns, sys.executable, *args],
                               check=True, capture_output=True, timeout=120)

            client(bench.__file__, "--client", "offers", "--count", "200", "--outstanding", "8")
            client(bench.__file__, "--client", "offers", "--count", "20000", "--outstanding",
                   "64", "--macs", "1000")
            client(str(HERE), "--client", str(keep / "client.json"), "--storm", str(storm))
            time.sleep(0.5)  # the storm's records, written after its answers
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                stop(proc)
            log.close()
    return figures(keep)


def figures(keep: Path) -> dict[str, float]:
    server = json.loads((keep / "server.json").read_text())
    client = json.loads((keep / "client.json").read_text())
    sent = {int(x): t for x, t in client["sent"].items()}
    got = {int(x): t for x, t in client["got"].items()}
    came: dict[int, float] = {}
    for xid, t in server["in"]:
        came.setdefault(xid, t)
    went: dict[int, float] = {}
    for xid, t in server["out"]:
        went.setdefault(xid, t)
    start, end = min(sent.values()), max(got.values(), default=min(sent.values()))

    def p(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(len(values) * q))] * 1000 if values else 0.0

    answered = [x for x in got if x in came and x in went]
    during = [c for c in server["callbacks"] if c[1] >= start and c[0] <= end]
    writes = [w for w in server["writes"] if w[1] >= start and w[0] <= end]
    long = [c for c in during if c[1] - c[0] > LONG]

    def beside_write(c: list[Any]) -> bool:
        return any(w[0] < c[1] and w[1] > c[0] for w in writes)

    collections: list[float] = []
    began: dict[int, float] = {}
    for phase, t, generation in server["gc"]:
        if phase == "start":
            began[generation] = t
        elif generation in began and t >= start and began[generation] <= end:
            collections.append(t - began.pop(generation))
    return {
        "answered": len(got), "sent": len(sent),
        "p50": p([got[x] - sent[x] for x in got], 0.5),
        "p99": p([got[x] - sent[x] for x in got], 0.99),
        "max": p([got[x] - sent[x] for x in got], 1.0),
        "to_server_p99": p([came[x] - sent[x] for x in answered], 0.99),
        "in_server_p99": p([went[x] - came[x] for x in answered], 0.99),
        "long": len(long),
        "long_cpu": sum(c[3] for c in long) * 1000,
        "long_runq": sum(c[4] for c in long) * 1000,
        "long_other": sum(max(0.0, c[1] - c[0] - c[3] - c[4]) for c in long) * 1000,
        "long_beside_write": sum(1 for c in long if beside_write(c)),
        "runq": sum(c[4] for c in during) * 1000,
        "gc_max": max(collections, default=0.0) * 1000,
        "writes": len(writes), "write_cpu": sum(w[3] for w in writes) * 1000,
        "write_max": max((w[1] - w[0] for w in writes), default=0.0) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="another checkout, run beside this one")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--storm", type=int, default=1000)
    parser.add_argument("--writer-nice", type=int, help="the writer thread's nice value")
    parser.add_argument("--keep", type=Path, help="keep each run's records here")
    parser.add_argument("--ahead", type=int,
                        help="run server and clients under nice -n AHEAD (e.g. -15: the "
                             "machine's other work out of the way, to see the server's own "
                             "causes on a busy machine)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.writer_nice)
        return
    if args.client:
        storm_client(args.storm, 1.0, args.client)
        return
    if os.geteuid() != 0:
        sys.exit("needs root for the network namespaces")
    trees = [("this", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline
                                else [])
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        for rep in range(args.repeat):
            order = trees[rep % len(trees):] + trees[:rep % len(trees)]
            for name, tree in order:
                f = one_run(tree, args.storm, args.writer_nice, keep / f"{name}-{rep + 1}",
                            args.ahead)
                print(f"run {rep + 1} {name:8} answered {f['answered']:.0f}/{f['sent']:.0f} "
                      f"p50 {f['p50']:.2f} p99 {f['p99']:.2f} max {f['max']:.2f} ms; to the "
                      f"server p99 {f['to_server_p99']:.2f}, in it p99 {f['in_server_p99']:.2f}"
                      f"; {f['long']:.0f} loop callbacks over {LONG * 1000:g} ms (CPU "
                      f"{f['long_cpu']:.1f}, run queue {f['long_runq']:.1f}, neither "
                      f"{f['long_other']:.1f} ms; {f['long_beside_write']:.0f} beside a "
                      f"write); loop run queue {f['runq']:.1f} ms; GC max {f['gc_max']:.2f} "
                      f"ms; {f['writes']:.0f} writes, CPU {f['write_cpu']:.1f} ms, longest "
                      f"{f['write_max']:.2f} ms (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
