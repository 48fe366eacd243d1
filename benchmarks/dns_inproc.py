"""Instructions (or CPU) per UDP answer of netboot's DNS server, in process, two trees.

    python benchmarks/dns_inproc.py --compare /work/wt/s46-base [--instructions]
                                    [--requests 20000] [--rounds 3]

Each tree's ``DnsServer`` (as ``netboot serve`` makes it: with its tree's default
``dns.rate_limit`` where the tree has one) answers ``--requests`` queries of dns_qps.py's mix
(10,000 machines: A by hostname, PTR, SRV, NXDOMAIN) handed to its datagram handler
(``_on_datagram``: the zone's answer, the answer cache, the rate limiter; no socket), from
one client address, twice: ``cold`` (each query's first time: the answer cache empty) and
``warm`` (the same again: cached). ``--instructions`` runs each child under valgrind's
callgrind and counts only the measured loop (``callgrind_control -i on``/``off``): a count
the machine's load does not move. Without it, CPU time per answer (``time.process_time``).
The trees alternate, the first one swapped each round (A B, B A, ...). Not part of pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(tree: Path, requests: int, counting: bool, measured: str) -> None:
    sys.path[:0] = [str(tree), str(HERE)]
    import asyncio
    import importlib

    # netboot first: dns_qps puts its own tree first on sys.path as it is imported, and the
    # tree measured must be ``tree`` (checked: its path is printed and compared).
    dns_module = importlib.import_module("netboot.servers.dns")
    zone_holder = importlib.import_module("netboot.names").ZoneHolder
    workload = importlib.import_module("dns_qps")
    print(f"tree {Path(dns_module.__file__).resolve().parents[2]}", flush=True)

    limiter = None
    if hasattr(dns_module, "rate_limiter"):  # a tree with dns.rate_limit: its default
        from netboot.config import DnsRateLimitConfig

        limiter = dns_module.rate_limiter(DnsRateLimitConfig())
    payloads = workload.queries(requests, 10_000)
    peer = ("192.0.2.60", 40000)

    async def run() -> None:
        kwargs = {} if limiter is None else {"rate_limiter": limiter}
        server = dns_module.DnsServer(zone_holder(workload.inventory()), host="127.0.0.1", port=0,
                                      forward=False, **kwargs)
        handle = server._on_datagram
        for name in ("cold", "warm"):
            counting_now = counting and name == measured
            if counting_now:
                # What turning the count on and off costs (a subprocess each), counted alone
                # and dumped: the parent takes it off the measured loop's count.
                for command in (["-i", "on"], ["-i", "off"], ["-d"], ["-i", "on"]):
                    subprocess.run(["callgrind_control", *command, str(os.getpid())],
                                   check=True, capture_output=True)
            start = time.process_time()
            answered = 0
            for data in payloads:
                if handle(data, peer):
                    answered += 1
            cpu = time.process_time() - start
            if counting_now:
                subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())],
                               check=True, capture_output=True)
            print(f"{name} {answered} {cpu / requests * 1e6:.3f}", flush=True)
        if limiter is not None:
            print(f"limited {limiter.dropped} {limiter.slipped}", flush=True)

    asyncio.run(run())


def run_child(tree: Path, requests: int, counting: bool, measured: str,
              out: Path) -> dict[str, float]:
    prefix = (["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={out}", "--log-file=/dev/null"] if counting else [])
    done = subprocess.run([*prefix, sys.executable, __file__, "--child", str(tree),
                           "--requests", str(requests), "--measured", measured]
                          + (["--counting"] if counting else []),
                          capture_output=True, text=True, check=True, timeout=3600)
    result: dict[str, float] = {}
    for line in done.stdout.splitlines():
        kind, *values = line.split()
        if kind == "tree":
            assert Path(values[0]) == tree.resolve(), f"{tree} measured {values[0]}"
            continue
        if kind == "limited":
            assert values == ["0", "0"], f"{tree}: the rate limiter limited {values}"
            continue
        assert int(values[0]) == requests, f"{tree}: {kind} answered {values[0]}"
        result[kind] = float(values[1])
    return result


def measure(tree: Path, requests: int, counting: bool) -> dict[str, float]:
    """CPU µs per answer of each pass, or (counting) instructions: one child a pass, the
    measured pass alone counted (callgrind's totals at exit)."""
    if not counting:
        return run_child(tree, requests, False, "", Path())
    result: dict[str, float] = {}
    for kind in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "cg.out"
            run_child(tree, requests, True, kind, out)
            counts = []
            for dump in sorted(Path(tmp).glob("cg.out*")):
                totals = next(line for line in dump.read_text(errors="replace").splitlines()
                              if line.startswith("totals:"))
                counts.append(int(totals.split()[1]))
            # cg.out: the loop and one on/off; cg.out.1: an on/off alone (dumped before).
            assert len(counts) == 2, counts
            result[kind] = (counts[0] - counts[1]) / requests
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, action="append", default=[],
                        help="another tree (e.g. main's); may be given again")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instructions", action="store_true")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--counting", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measured", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests, args.counting, args.measured)
        return
    trees = {"this": HERE.parent,
             **{f"other{i or ''}": tree.resolve() for i, tree in enumerate(args.compare)}}
    got: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    names = list(trees)
    unit = "instructions/answer" if args.instructions else "CPU µs/answer"
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]  # each tree first in turn
        for name in order:
            figures = measure(trees[name], args.requests, args.instructions)
            got[name].append(figures)
            print(f"round {r}: {name} ({trees[name]}) " + ", ".join(
                f"{k} {v:,.1f}" for k, v in figures.items()) + f" {unit}", flush=True)
    print(f"dns_inproc: {args.requests} queries a pass, medians of {args.rounds} rounds "
          f"({unit}); load average {os.getloadavg()[0]:.1f}")
    for kind in ("cold", "warm"):
        med = {name: statistics.median(f[kind] for f in got[name]) for name in names}
        line = f"  {kind}: " + ", ".join(f"{n} {v:,.1f}" for n, v in med.items())
        for other in names[1:]:
            ratios = [a[kind] / b[kind] for a, b in zip(got["this"], got[other], strict=True)]
            line += (f"; this ÷ {other} {med['this'] / med[other]:.3f}x (rounds "
                     + ", ".join(f"{x:.3f}" for x in ratios) + ")")
        print(line)


if __name__ == "__main__":
    main()
