"""Instructions of each piece of a first k3OS config's work on the event loop, in process.

    python benchmarks/config_parts.py --seeds DIR [--tree REPO] [--parts a,b,...] [--calls 2000]

A first ``/config`` fetch (http_paths.py's ``config`` row) is its token check and plan
(``Content.authorised_plan``: the machine's look-up, ``Enroller.check_token``, the plan), its
render (``Content.k3os_config``: the context, the split fill and its checks) and its commit
(not counted here: it waits for the group commit). Each piece is called ``--calls`` times,
for as many machines of the ``installing`` seed (every install under way, its token minted),
under valgrind's callgrind, counting only between ``callgrind_control -i on`` and ``off``
around those calls (after 200 unmeasured calls); what is printed is the loop thread's
instructions per call, the harness's own ~800 included (part ``none``). Pieces are counted
apart (one process each, two at a time), so their sum is not a request's: wire_instructions.py
counts whole requests, ipxe_inproc.py ``--config --instructions`` them in process.

``--seeds``: a directory of wire_instructions.py's ``--keep`` (its ``netboot-seed-installing``
and ``assets``; the 20,000-machine default). Loopback and files only; not part of pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from http_paths import TOKEN_TAIL
from ipxe_inproc import CONFIG
from storm import REPO

CHILD = r"""
import asyncio, logging, os, subprocess, sys

run, part, calls, tail = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
logging.basicConfig(level="WARNING")
from netboot import config as configs, lifecycle
from netboot.model import MacAddress
from netboot.service import build, loop_factory


def mac(i):
    return f"02-00-00-{i >> 16 & 255:02x}-{i >> 8 & 255:02x}-{i & 255:02x}"


async def main():
    service = await build(configs.load(os.path.join(run, "netboot.yaml")), app=False)
    await service.boot.load_view()
    content, r = service.content, service.content._render
    n = calls + 200
    macs = [mac(i) for i in range(2, 2 + n)]  # machine 1 is its cluster's server
    tokens = [f"{i:06d}{tail}" for i in range(2, 2 + n)]
    nics = [MacAddress.parse(m) for m in macs]
    machines = [await service.boot.machine_by_mac(m) for m in nics]
    plans = [await content.authorised_plan(m, t) for m, t in zip(macs, tokens)]
    name = "cloud-config/k3os.yaml"
    template, names = r.reads(name)
    ctxs = [content.context(p, names=names) for p in plans]
    split = r._split_of(template, r.volatile, name, config=True)
    fetched = lifecycle.Trigger.CONFIG_FETCHED
    parts = {
        "none": lambda i: None,
        "k3os_config": lambda i: content.k3os_config(plans[i]),
        "context": lambda i: content.context(plans[i], names=names),
        "fill": lambda i: split.fill(ctxs[i], r._frozen),
        # _Split.text since session 32 (yaml_text before it)
        "yaml_text": (lambda i: split.text(ctxs[i], r._frozen, True)) if hasattr(split, "text")
        else (lambda i: split.yaml_text(ctxs[i], r._frozen)),
    }
    waited = {
        "authorised_plan": lambda i: content.authorised_plan(macs[i], tokens[i]),
        "machine_by_mac": lambda i: service.boot.machine_by_mac(nics[i]),
        "check_token": lambda i: content._enroller.check_token(
            machines[i], tokens[i], fetched, refused="refused"),
        "config_plan": lambda i: content.config_plan(machines[i], tokens[i], mac=nics[i],
                                                     synced=True),
    }

    def counting(on):
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                       check=True, capture_output=True)

    if part in waited:
        call = waited[part]
        for i in range(200):
            await call(i)
        counting(True)
        for i in range(200, n):
            await call(i)
    else:
        call = parts[part]
        for i in range(200):
            call(i)
        counting(True)
        for i in range(200, n):
            call(i)
    counting(False)
    await service.close()


with asyncio.Runner(loop_factory=loop_factory("uvloop")) as runner:
    runner.run(main())
"""

PARTS = ("none", "k3os_config", "context", "fill", "yaml_text", "authorised_plan",
         "machine_by_mac", "check_token", "config_plan")


def count(python: str, tree: Path, seeds: Path, part: str, calls: int, tmp: Path) -> float:
    run = tmp / part
    shutil.copytree(seeds / "netboot-seed-installing", run / "data")
    (run / "netboot.yaml").write_text(CONFIG.format(data=run / "data", assets=seeds / "assets"))
    out = run / "cg.out"
    subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                    "--separate-threads=yes", f"--callgrind-out-file={out}",
                    "--log-file=/dev/null", python, "-c", CHILD, str(run), part, str(calls),
                    TOKEN_TAIL], cwd=run, check=True, timeout=1800,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(tree)})
    totals = [line for line in (run / "cg.out-01").read_text().splitlines()
              if line.startswith("totals:")]
    return int(totals[0].split()[1]) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=Path, required=True,
                        help="wire_instructions.py's --keep directory")
    parser.add_argument("--tree", type=Path, default=REPO, help="the netboot checkout run")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    with tempfile.TemporaryDirectory(prefix="netboot-config-parts-") as tmp_text, \
            ThreadPoolExecutor(2) as pool:
        tmp = Path(tmp_text)
        counts = pool.map(lambda p: count(args.python, args.tree.resolve(), args.seeds, p,
                                          args.calls, tmp), parts)
        for part, per_call in zip(parts, counts, strict=True):
            print(f"{part:16} {per_call:>10,.0f} instructions a call", flush=True)


if __name__ == "__main__":
    main()
