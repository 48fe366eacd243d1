"""``netboot serve`` with a probe of its event loop, for storm.py ``--loop-probe``: run as
``python benchmarks/storm_loop_probe.py serve --config X`` (the tree's netboot imported as
``python -m netboot`` imports it). Nothing of netboot's behaviour is changed: its methods are
wrapped to count.

Per half second of the run, in ``probe.json`` beside the config (rewritten every 2 s and at
exit): the loop's lag (a 2 ms timer's lateness: a turn's length once turns are longer than
that), the timer's firings (turns, roughly), the TFTP link's wake-ups (``_Link._ready``), the
ACK events they polled and their time, the large files' ``sendfile`` steps
(``FileSender._step``) and their time, and the HTTP connections made (``Doorway.__call__``).
:func:`summary` reads it: how often the TFTP transfers were served while downloads ran, and
how many sendfile steps the loop made between two of their wake-ups (s46-accept: the reason
a storm's lock-step devices gave up at the TFTP loader).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

BUCKET = 0.5  # seconds
FIELDS = ("lag_max", "lag_sum", "ticks", "tftp_wakes", "tftp_events", "tftp_s", "sends",
          "sends_s", "connections")


def summary(path: Path) -> str:
    """One line: the TFTP transfers' service while large files were being sent."""
    data = json.loads(path.read_text())
    buckets = [data["b"][k] for k in sorted(data["b"], key=int)]
    served = [i for i, b in enumerate(buckets) if b["tftp_events"]]
    if not served:
        return "loop probe: no TFTP transfer served"
    window = buckets[served[0]:served[-1] + 1]
    both = [b for b in window if b["sends"]]
    span = len(window) * BUCKET
    overlap = len(both) * BUCKET

    def total(rows: list[dict[str, Any]], field: str) -> float:
        return float(sum(b[field] for b in rows))

    wakes = total(both, "tftp_wakes")
    return (f"loop probe: TFTP served over {span:.1f} s: {total(window, 'tftp_wakes'):.0f} "
            f"wake-ups, {total(window, 'tftp_events') / span:.0f} ACKs/s; while files were "
            f"sent ({overlap:.1f} s of it): {wakes / max(overlap, BUCKET):.1f} wake-ups/s, "
            f"{total(both, 'tftp_events') / max(overlap, BUCKET):.0f} ACKs/s, "
            f"{total(both, 'sends') / max(wakes, 1):.1f} sendfile steps between two "
            f"({total(both, 'sends_s'):.1f} s of them); the longest turn "
            f"{max(b['lag_max'] for b in window) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"], help="netboot's command")
    parser.add_argument("--config", required=True, type=Path, help="netboot's config")
    known, _ = parser.parse_known_args()  # the rest is netboot's
    out = known.config.parent / "probe.json"
    buckets: dict[int, dict[str, float]] = {}
    clock = time.monotonic

    def at(now: float) -> dict[str, float]:
        key = int(now / BUCKET)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = dict.fromkeys(FIELDS, 0.0)
        return bucket

    def dump() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"bucket": BUCKET, "b": buckets}))
        os.replace(tmp, out)

    atexit.register(dump)

    import netboot.servers.http as http
    import netboot.servers.tftp as tftp
    import netboot.service as service

    link_init, link_ready = tftp._Link.__init__, tftp._Link._ready
    step, door = http.FileSender._step, http.Doorway.__call__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        link_init(self, *args, **kwargs)
        poll = self._poll

        def counted(timeout: float, most: int) -> list[tuple[int, int]]:
            events: list[tuple[int, int]] = poll(timeout, most)
            at(clock())["tftp_events"] += len(events)
            return events

        self._poll = counted

    def ready(self: Any) -> None:
        began = clock()
        try:
            link_ready(self)
        finally:
            bucket = at(began)
            bucket["tftp_wakes"] += 1
            bucket["tftp_s"] += clock() - began

    def sending(self: Any) -> bool:
        began = clock()
        try:
            return bool(step(self))
        finally:
            bucket = at(began)
            bucket["sends"] += 1
            bucket["sends_s"] += clock() - began

    def made(self: Any) -> Any:
        at(clock())["connections"] += 1
        return door(self)

    tftp._Link.__init__ = init  # type: ignore[method-assign]
    tftp._Link._ready = ready  # type: ignore[method-assign]
    http.FileSender._step = sending  # type: ignore[method-assign]
    http.Doorway.__call__ = made  # type: ignore[method-assign]
    serve = service.serve

    async def probed(cfg: Any) -> None:
        loop = asyncio.get_running_loop()

        def tick(due: float) -> None:
            now = clock()
            bucket = at(now)
            lag = max(0.0, now - due)
            bucket["ticks"] += 1
            bucket["lag_sum"] += lag
            bucket["lag_max"] = max(bucket["lag_max"], lag)
            loop.call_later(0.002, tick, clock() + 0.002)

        def every() -> None:
            dump()
            loop.call_later(2.0, every)

        loop.call_later(0.002, tick, clock() + 0.002)
        loop.call_later(2.0, every)
        await serve(cfg)

    service.serve = probed  # type: ignore[assignment]
    sys.argv = ["netboot", *sys.argv[1:]]
    runpy.run_module("netboot", run_name="__main__")


if __name__ == "__main__":
    main()
