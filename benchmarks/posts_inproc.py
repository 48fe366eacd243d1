"""A storm's installer POSTs in process: each of ``N`` machines reports ``installing`` and
``installed`` and registers, ``C`` machines at a time, on SQLite, as the front door's
``Api.front_post`` does them: the change, then its audit entry (the trees before session 23),
or the entry in the change's own batch (where ``Enroller.report`` takes ``audit``). Prints
the process's CPU (every thread: the loop and the store's writer) per machine, and the wall.

    PYTHONPATH=TREE python benchmarks/posts_inproc.py [N] [C]

Run it from /tmp for each tree, alternating. No root; not part of pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import ipaddress
import tempfile
import time
from pathlib import Path

from netboot.access import Access
from netboot.enroll import Enroller
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Cluster, MacAddress, Machine, MachineState, Profile

EVENTS = "POST /api/v1/machines/{ref}/events"
REGISTER = "POST /api/v1/register"
PEER = "192.0.2.9"


async def main(n: int, at_once: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "db.sqlite")
        await store.open()
        await store.put_cluster(Cluster(name="edge", token="t"))
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        machines = [Machine(macs=(MacAddress((0x020000000000 + i).to_bytes(6, "big")),),
                            hostname=f"h{i}", state=MachineState.INSTALLING, cluster="edge",
                            token_hash=hashlib.sha256(f"tok{i}".encode()).hexdigest(),
                            token_expires=None) for i in range(n)]
        for m in machines:
            await store.create_machine(m)
        enroller = Enroller(store, clock=time.time)
        access = Access(store, commit=enroller.recorder.commit)
        folded = "audit" in inspect.signature(enroller.report).parameters
        peer = ipaddress.ip_address(PEER)

        async def device(i: int, m: Machine) -> None:
            ref = str(m.macs[0]).replace(":", "-")
            actor = f"machine:{m.id}"
            current: Machine | None = m
            for kind in ("installing", "installed"):
                assert current is not None
                if folded:
                    entry = access.entry(actor, EVENTS, ref, peer=PEER, outcome="201")
                    await enroller.report(current, {"kind": kind}, audit=(entry,))
                    await access.recorded()
                else:
                    await enroller.report(current, {"kind": kind})
                    await access.record(actor, EVENTS, ref, peer=PEER, outcome="201")
                current = await store.get_machine(m.id)
            # As the register command posts it since s38-journey (older trees ignore "keeps").
            body = {"mac": str(m.macs[0]), "token": f"tok{i}", "keeps": "machine_token"}
            if folded:
                await enroller.register(body, peer, audit=lambda r: access.entry(
                    f"machine:{r.id}", REGISTER, r.id, peer=PEER, outcome="200"))
                await access.recorded()
            else:
                done = await enroller.register(body, peer)
                await access.record(f"machine:{done.id}", REGISTER, done.id, peer=PEER,
                                    outcome="200")

        gate = asyncio.Semaphore(at_once)

        async def one(i: int, m: Machine) -> None:
            async with gate:
                await device(i, m)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(i, m) for i, m in enumerate(machines)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stored = [await store.get_machine(m.id) for m in machines]
        assert all(s is not None and s.state == MachineState.REGISTERED for s in stored)
        print(f"{'entry in the batch' if folded else 'entry apart'}: {n} machines x 3 POSTs, "
              f"{at_once} at a time: {cpu / n * 1e6:.0f} us CPU per machine, {wall:.2f} s wall")
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", nargs="?", type=int, default=2000, help="machines (default: 2,000)")
    parser.add_argument("at_once", nargs="?", type=int, default=100,
                        help="machines at a time (default: 100)")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.at_once))
