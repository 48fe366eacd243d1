"""The HTTP front door's own work per request, in process, two trees side by side.

    python benchmarks/front_inproc.py --compare /work/main [--heads ipxe|wrk] [--rounds 6]

Each tree's child drives its ``FrontDoor`` (netboot.servers.http) as ``GuardedHandler``
does for a request whose answer is decided (``/ipxe``): the head parsed
(:meth:`FrontDoor.head`, new for each machine, as in a storm of first installs), the request
started (its target for the log context and the access line, the request id, the task),
the task run, the reply encoded (``finish``), the access line written through the batched
log handler (to /dev/null), on uvloop. The decision itself is a stub that returns a fixed
reply at once, and no socket is involved: what is left is the front door's part of the
main thread's CPU, which the wire benchmark (http_paths.py) cannot tell from the
decision's. ``--heads ipxe``: heads as iPXE sends them (User-Agent, Connection, its
``${...:uristring}`` query with ``%20`` escapes); ``wrk``: http_paths.py's (Host only,
plain query). Printed: the loop thread's CPU per request (``time.thread_time``) of each tree,
median and range over the rounds (the tree that goes first alternating), and the median
of the rounds' ratios. Not part of pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import asyncio, inspect, json, logging, os, sys, time
import uvloop
from netboot.logs import BatchedStreamHandler, TextFormatter
from netboot.servers import http as H
from netboot.servers.fasthttp import Reply

kind, n = sys.argv[1], int(sys.argv[2])
reply = Reply(200, b"#!ipxe\n" + b"x" * 600, "text/plain; charset=utf-8")


class Routes:
    def front(self, path, query, remote, *, accept_encoding, bearer="", large=False):
        async def decide():
            return reply
        return "/ipxe", decide()

    def ready(self, path, *, accept_encoding, large=False):
        return None


class Observer:
    def http_request(self, route, method, status, seconds):
        pass


handler = BatchedStreamHandler(open(os.devnull, "w"))
handler.setFormatter(TextFormatter())
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
access = H.AccessLogger(logging.getLogger("netboot.access"))
front = H.FrontDoor(Routes(), log=logging.getLogger("netboot.http"), observer=Observer(),
                    ids=H.RequestIds())
if kind == "ipxe":
    heads = [b"GET /ipxe?mac=02-00-00-%02x-%02x-%02x&arch=x86_64&platform=efi"
             b"&uuid=4c4c4544-0051-3010-8047-b2c04f4e4c31&serial=SN%06d"
             b"&manufacturer=Dell%%20Inc.&product=PowerEdge%%20R650 HTTP/1.1\r\n"
             b"Connection: keep-alive\r\nUser-Agent: iPXE/1.21.1+ (g6bc2)\r\n"
             b"Host: 10.0.0.1\r\n\r\n" % (i >> 16 & 255, i >> 8 & 255, i & 255, i)
             for i in range(n)]
else:
    heads = [b"GET /ipxe?mac=02-00-00-%02x-%02x-%02x&arch=x86_64&platform=efi HTTP/1.1\r\n"
             b"Host: 127.0.0.1:49099\r\n\r\n" % (i >> 16 & 255, i >> 8 & 255, i & 255)
             for i in range(n)]


async def main():
    # The running loop given as GuardedHandler gives its own, where the tree's start() takes
    # it (s31-front): each tree driven as its own connection handler drives it.
    takes_loop = "loop" in inspect.signature(front.start).parameters
    given = {"loop": asyncio.get_running_loop()} if takes_loop else {}
    for _ in range(2):  # a warm-up, then the measured pass (the head cache cleared)
        front._heads.clear()
        begin = time.thread_time()
        for buf in heads:
            head = front.head(buf)
            finish, decided = front.start(head, "10.0.0.7", **given)
            answer = finish(await decided)
            access.line("10.0.0.7", head.method, answer.target or H._front_target(head),
                        answer.status, len(answer.data), answer.seconds,
                        head.user_agent or None, answer.request_id)
        spent = time.thread_time() - begin
    print(json.dumps(spent / n * 1e6))


uvloop.run(main())
'''


def run(tree: str, heads: str, requests: int) -> float:
    env = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, "-c", CHILD, heads, str(requests)], env=env,
                          cwd="/tmp", capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{tree}: {done.stderr}")
    return float(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", required=True, help="the baseline tree")
    parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--heads", choices=("ipxe", "wrk"), default="ipxe")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()
    trees = (args.tree, args.compare)
    spent: dict[str, list[float]] = {tree: [] for tree in trees}
    for turn in range(args.rounds):
        for tree in trees if turn % 2 == 0 else trees[::-1]:
            spent[tree].append(run(tree, args.heads, args.requests))
    print(f"front door, {args.heads} heads, {args.requests} requests, {args.rounds} rounds "
          f"(load average {os.getloadavg()[0]:.1f}): loop thread CPU per request")
    for tree in trees:
        print(f"  {tree}: median {statistics.median(spent[tree]):.2f} us "
              f"[{min(spent[tree]):.2f}-{max(spent[tree]):.2f}]")
    ratios = [a / b for a, b in zip(spent[trees[0]], spent[trees[1]], strict=True)]
    print(f"  ratio (median of the rounds'): {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
