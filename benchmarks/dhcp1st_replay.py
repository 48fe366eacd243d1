"""Instructions a first DHCP sighting of an enrolled machine costs, by phase and thread.

    python benchmarks/dhcp1st_replay.py [--count 1000] [--compare OTHER_TREE]
    python benchmarks/dhcp1st_replay.py --only record [--compare OTHER_TREE]  # one phase
    python benchmarks/dhcp1st_replay.py --phase record [--count 1000]   # one phase, once

``--count`` enrolled machines each send one UEFI x86-64 DISCOVER (dhcp_offers.py's), handed
to the DHCP server's datagram handler as the listener hands it over (``BootService`` over
SQLite, its view loaded and frozen as ``dhcp_offers.py`` builds the ``+enrolled`` server),
after ``--warm`` others went through the same three phases (templates, stage descriptions):

  datagram  every datagram parsed, classified, decided and answered (one loop iteration)
  record    the paced records: each machine's step noted and its facts queued
  commit    the group commit: the loop's side, the SQLite writer and reader threads

Each phase is run under ``valgrind --tool=callgrind`` alone (``--toggle-collect`` of the
``sorted()`` it is wrapped in, in the loop thread and in the store's threads for their
jobs of the commit); the figure is each thread's instructions divided by ``--count``. The
recorder's delay and backlog are lifted so that nothing is written before the commit phase,
the paced records all run in one loop turn (``boot.RECORD_SLICE``), and the view's
background sync every 50 ms (``boot.DHCP_VIEW_AGE``: one per ~500 first
DISCOVERs when serving, one per few under callgrind's slowdown) is not started. Runs of one
tree agree within ~0.2 % on the loop, ~1 % on the writer (the machine ids are random, and so
are SQLite's page splits). ``--compare``: another checkout (``/work/wt/s39-base``) beside
this one. Not part of pytest; needs valgrind. (benchmarks/README.md, s39-sighting.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PHASES = ("datagram", "record", "commit")


def counted_call(fn: Callable[[], Any]) -> Any:
    """``fn()`` inside builtin ``sorted``, whose C function callgrind toggles collection on."""
    box: list[Any] = []

    def key(_: int) -> int:
        box.append(fn())
        return 0

    sorted((0,), key=key)
    return box[0]


def replay(count: int, warm: int, measured: str) -> None:
    """Child: the replay of one tree (NETBOOT_TREE), ``measured`` wrapped in sorted()."""
    import dhcp_offers as d  # this tree's, which puts NETBOOT_TREE first on sys.path

    import netboot.boot
    from netboot.servers.dhcp import _Listener
    from netboot.servers.udp import BoundaryProtocol

    netboot.boot.DHCP_VIEW_AGE = 1e9
    # The records paced by wall time (1 ms a loop turn): under callgrind a turn held one or
    # two of them as the machine's load had it, and the turns' count moved the record phase's
    # figure by ~5 % between runs of one tree. All in one turn: what serving amortises.
    netboot.boot.RECORD_SLICE = 1e9

    def run(name: str, fn: Callable[[], Any]) -> Any:
        if name != measured:
            return fn()
        return counted_call(fn)

    class Counting:
        sent = 0

        def sendto(self, data: bytes, addr: Any) -> None:
            self.sent += 1

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    with tempfile.TemporaryDirectory() as tmp:
        server = loop.run_until_complete(d.make_server(
            "store", "", Path(tmp), enroll=d.enrolled_macs(warm + count, 0)))
        service = server._decider
        recorder = service._recorder
        recorder._delay, recorder._backlog = 1e6, 1 << 30
        store = service._store
        guard = store._guard
        threads = [False]

        def guarded(fn: Any, args: Any, reader: bool) -> Any:
            if not threads[0]:
                return guard(fn, args, reader)
            return counted_call(lambda: guard(fn, args, reader))

        store._guard = guarded
        protocol = BoundaryProtocol("bench", server._handler(_Listener(None, d.SERVER_IP, False)),
                                    logger=logging.getLogger("bench"), max_in_flight=1 << 30)
        transport = Counting()
        protocol.connection_made(transport)  # type: ignore[arg-type]

        def one_round(first: int, n: int, measure: bool) -> None:
            packets = [d.discover(d.mac_of(first + i), first + i) for i in range(n)]

            async def datagrams() -> None:
                for packet in packets:
                    protocol.datagram_received(packet, ("0.0.0.0", 68))
                loop.stop()  # before the records' first turn

            async def records() -> None:
                while service._pacer is not None:
                    await asyncio.sleep(0)

            task = loop.create_task(datagrams())
            run("datagram" if measure else "", loop.run_forever)
            assert task.done()
            run("record" if measure else "", lambda: loop.run_until_complete(records()))
            threads[0] = measure and measured == "commit"
            run("commit" if measure else "", lambda: loop.run_until_complete(recorder.flush()))
            threads[0] = False

        one_round(0, warm, False)
        loop.run_until_complete(service._view.sync())
        one_round(warm, count, True)
        print(f"{transport.sent} replies ({warm} warm-up)", flush=True)
        loop.run_until_complete(service.drain())
        loop.run_until_complete(server.close())
    loop.close()


def counted(tree: Path, phase: str, count: int, warm: int, out: Path) -> list[int]:
    """Each thread's instructions a first DISCOVER in ``phase`` (threads that ran none left
    out), the loop's first."""
    for old in out.glob(f"{phase}.*"):
        old.unlink()
    env = {**os.environ, "NETBOOT_TREE": str(tree)}
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--collect-atstart=no",
         "--toggle-collect=builtin_sorted", f"--callgrind-out-file={out}/{phase}.%p",
         sys.executable, str(Path(__file__).resolve()), "--child", phase, "--count", str(count),
         "--warm", str(warm)],
        env=env, check=True, capture_output=True, timeout=3600)
    figures = []
    for path in sorted(out.glob(f"{phase}.*-*")):
        found = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"),
                          re.MULTILINE)
        if found and int(found[1]):
            figures.append(int(found[1]) // count)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--compare", type=Path, metavar="TREE",
                        help="another checkout, counted beside this one")
    parser.add_argument("--phase", choices=PHASES, help="run this phase once, uncounted")
    parser.add_argument("--only", choices=PHASES, help="count this phase alone")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.phase:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        replay(args.count, args.warm, args.child or "")
        return
    trees = [("this", REPO)] + ([("compare", args.compare.resolve())] if args.compare else [])
    print(f"instructions a first DISCOVER ({args.count}, {args.warm} warm-up); threads: the "
          "loop's first, then the store's that ran")
    with tempfile.TemporaryDirectory() as tmp:
        for phase in (args.only,) if args.only else PHASES:
            for name, tree in trees:
                figures = counted(tree, phase, args.count, args.warm, Path(tmp))
                print(f"{phase:9} {name:8} {tree}: " + " / ".join(f"{f:,}" for f in figures),
                      flush=True)


if __name__ == "__main__":
    main()
