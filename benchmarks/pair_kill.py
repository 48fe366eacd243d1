"""Two netboot servers on one PostgreSQL through a storm, one killed (SIGKILL) mid-way.

tests/multiserver/test_storm_kill.py's storm at a size of its own: ``--clusters`` managed
clusters of two servers and ``--agents`` agents each (20 x 48: 1,000 devices), played as
PXE/TFTP, iPXE, k3OS's installer and its register loop against two real ``netboot serve``
processes (A on 127.0.0.1, B on 127.0.0.2) sharing a fresh schema of Debian's PostgreSQL
(tests/pg.py). A is killed by its own PID once the test's gated devices hold at their stages
and ``--registered-first`` devices are registered (the clusters past the gated four powered on
once the gates are reached, unless ``--power-on at-once``; ``--fault freeze`` stops A with
SIGSTOP instead), and started again once every device but
those retrying A's own URL is registered. Printed: the phases' times, how many devices booted
again and through which server they registered, and the test's outcome checks (every device
registered once in its cluster, one cluster-init each, one plan per machine, A's tokens taken
by B, B healthy throughout, A caught up, rows whole). Loops bounded (``--bound``); servers
ended by their own PID. Needs PostgreSQL's server binaries (tests/install-deps.sh).

    python benchmarks/pair_kill.py --clusters 20 --agents 48
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import pg  # noqa: E402
from tests.multiserver import test_storm_kill as storm_test  # noqa: E402


async def run(args: argparse.Namespace) -> int:
    # SIGTERM (timeout(1), a CI's stop) cancels the run: the servers and PostgreSQL are
    # stopped by the context managers on the way out, not left behind.
    main = asyncio.current_task()
    assert main is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    devs = storm_test.devices(args.clusters, args.agents, late=args.power_on == "late")
    with pg.running() as cluster, tempfile.TemporaryDirectory(prefix="pair-kill-") as tmp:
        async with pg.fresh_schema(cluster) as dsn, \
                storm_test.running_storm(Path(tmp), dsn) as storm:
            storm.scale = args.scale
            storm.freeze = args.fault == "freeze"
            await storm_test.seed(storm, devs)
            health = await storm_test.kill_mid_way(
                storm, devs, registered_first=args.registered_first, bound=args.bound)
            checked = time.monotonic()
            failure = None
            try:
                await storm_test.outcomes(storm, devs, health)
            except AssertionError as exc:
                failure = str(exc)[:2000]
            checked = time.monotonic() - checked
            print(f"\n{len(devs)} devices ({args.clusters} clusters x {2 + args.agents}), "
                  f"scale {args.scale}")
            for at, what in storm.marks:
                print(f"  {at:8.2f} s  {what}")
            boots = Counter(d.boots for d in devs)
            print("  boots per device: " + ", ".join(f"{n}: {c}" for n, c in sorted(boots.items())))
            via = Counter(f"config from {d.config_from}, registered via {d.registered_via}"
                          for d in devs)
            for what, count in sorted(via.items()):
                print(f"  {count:5d}  {what}")
            down = sum(x.endswith(" down") for d in devs for x in d.register_answers)
            print(f"  register attempts that found A down: {down}; B's /healthz polled "
                  f"{len(health)} times, {sum(s != 200 for s, _ in health)} not 200")
            print(f"  outcome checks ({checked:.1f} s): "
                  + ("all passed" if failure is None else f"FAILED: {failure}"))
            return 0 if failure is None else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=20, help="at least 4")
    parser.add_argument("--agents", type=int, default=48, help="per cluster; even, >= 12")
    parser.add_argument("--registered-first", type=int, default=250,
                        help="devices registered before A is killed")
    parser.add_argument("--power-on", choices=("late", "at-once"), default="late",
                        help="late: the clusters past the gated four once their gates are "
                        "reached, so that A dies in the middle of their storm; at-once: "
                        "every device at the start")
    parser.add_argument("--fault", choices=("kill", "freeze"), default="kill",
                        help="kill: SIGKILL A; freeze: SIGSTOP it (a host that hangs: its "
                        "PostgreSQL sessions stay open), SIGKILL before it is started again")
    parser.add_argument("--scale", type=float, default=0.1,
                        help="the devices' real sleeps (iPXE 5 s, hold 15 s, register 10 s) "
                        "times this")
    parser.add_argument("--bound", type=float, default=300,
                        help="seconds any phase may take before the run is called failed")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
