"""Bounds on discovered records: per-source token buckets, a cap with the oldest evicted, and
a flood of random MACs that neither grows the inventory past the cap nor keeps an enrolled
machine from its plan."""

from __future__ import annotations

import random

import pytest

from netboot.discovery import DiscoveryGuard, DiscoveryLimits, TokenBuckets, source_of
from netboot.inventory.base import MachineFilter
from netboot.inventory.memory import MemoryStore
from netboot.model import (
    Arch,
    BootRequest,
    Firmware,
    MacAddress,
    Machine,
    MachineState,
)
from tests.conftest import EnvFactory, boot, install_token

MAC = MacAddress.parse("52:54:00:00:00:01")


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(rate=2, burst=3, max_keys=10)
    assert [buckets.take("a", 100.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b", 100.0)  # another source has its own bucket
    assert not buckets.take("a", 100.4)  # 0.8 of a token so far
    assert buckets.take("a", 100.5)  # 1.0: one more
    assert not buckets.take("a", 100.5)
    # Idle for long, a source gets its burst back, never more.
    assert [buckets.take("a", 1000.0) for _ in range(4)] == [True, True, True, False]


def test_buckets_are_bounded_in_number() -> None:
    buckets = TokenBuckets(rate=1, burst=1, max_keys=2)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    buckets.take("b", 0.0)
    buckets.take("c", 0.0)  # "a", least recently used, is forgotten
    assert buckets.take("a", 0.0)


def test_a_bucket_full_again_is_forgotten_and_gives_its_burst_as_before() -> None:
    # A storm's machines each took from a budget of their own (enroll.py's reports), and
    # every bucket stayed until max_keys others came: now one full again is no bucket, and
    # forget_full (when quiet: Service.forget_idle) drops those.
    buckets = TokenBuckets(rate=2, burst=3, max_keys=100)
    for key in ("a", "b", "c"):
        assert buckets.take(key, 10.0)
    assert buckets.take("a", 10.0) and buckets.take("a", 10.0) and not buckets.take("a", 10.0)
    assert len(buckets) == 3
    buckets.forget_full(10.4)  # "b" and "c" owe 0.5 s until 10.5, "a" 1.5 s
    assert len(buckets) == 3
    buckets.forget_full(10.5)
    assert len(buckets) == 1  # "a" still owes a second: kept, as spent as it was
    assert buckets.take("a", 10.5) and not buckets.take("a", 10.5)  # one token, as before
    # "b", forgotten, has its burst again, as it would have had by now anyway.
    assert [buckets.take("b", 11.0) for _ in range(4)] == [True, True, True, False]


def test_a_clock_stepped_back_leaves_a_bucket_empty_at_worst() -> None:
    buckets = TokenBuckets(rate=1, burst=2, max_keys=10)
    assert buckets.take("a", 1000.0) and buckets.take("a", 1000.0)
    assert not buckets.take("a", 10.0)  # the clock 990 s back: empty, not 990 s of debt
    assert buckets.take("a", 11.0)  # a token back after a second, as at any rate
    assert buckets.would_take("a", 13.0) and not buckets.would_take("a", 11.5)


def test_the_source_is_the_address_a_request_came_from_then_the_interface() -> None:
    # A relay sends from its own address (RFC 1542 §4.1.1), giaddr in the datagram.
    assert source_of(BootRequest(mac=MAC, relay="198.51.100.1",
                                 remote_addr="198.51.100.1")) == "relay 198.51.100.1"
    assert source_of(BootRequest(mac=MAC, remote_addr="192.0.2.7")) == "192.0.2.7"
    assert source_of(BootRequest(mac=MAC, remote_addr="0.0.0.0",
                                 interface="eth1")) == "broadcast on eth1"


@pytest.mark.parametrize("remote", ["192.0.2.60", "0.0.0.0"])
def test_a_giaddr_of_its_own_choosing_gives_a_host_no_budget_of_its_own(remote: str) -> None:
    # giaddr is a field of the datagram, which any host on the segment fills as it likes
    # (no raw socket needed): one host varying it had a bucket per value, 200 records at
    # once from 192.0.2.60 where 20 were its budget, filling max_discovered and evicting
    # the machines held for approval (s33-attack). It counts against where it came from.
    sources = {source_of(BootRequest(mac=MAC, relay=f"198.51.100.{i}", remote_addr=remote,
                                     interface="eth1")) for i in range(1, 201)}
    assert len(sources) == 1


def test_an_ipv6_host_has_one_budget_for_its_64() -> None:
    # A host picks any number of addresses in its /64 (SLAAC, privacy addresses): a budget
    # per address was a budget per request (s35-attack).
    sources = {source_of(BootRequest(mac=MAC, remote_addr=f"2001:db8::{i:x}"))
               for i in range(1, 201)}
    assert sources == {"2001:db8::/64"}
    assert source_of(BootRequest(mac=MAC, remote_addr="::ffff:192.0.2.7")) == "192.0.2.7"
    assert source_of(BootRequest(mac=MAC, remote_addr="fe80::7")) == "fe80::7"


def discovered(n: int, created: float) -> Machine:
    return Machine(macs=(MacAddress(bytes([2, 0, 0, 0, 0, n])),), created=created,
                   state=MachineState.DISCOVERED)


async def test_the_oldest_discovered_record_makes_room() -> None:
    store = MemoryStore()
    await store.open()
    # Created out of MAC order: eviction follows age, not the store's listing order.
    old, older, approved = discovered(9, 20.0), discovered(8, 10.0), discovered(7, 5.0)
    for m in (old, older, approved):
        await store.create_machine(m)
    # The oldest left "discovered" (an operator approved it): not counted, never evicted.
    await store.update_machine(Machine(macs=approved.macs, id=approved.id, created=5.0,
                                       state=MachineState.ENROLLED))
    guard = DiscoveryGuard(store, DiscoveryLimits(max_discovered=2, burst_per_source=100))
    new = discovered(1, 30.0)
    request = BootRequest(mac=new.macs[0], remote_addr="192.0.2.9")
    assert await guard.reserve(request, new.id, 30.0)
    await store.create_machine(new)
    assert await store.get_machine(approved.id) is not None
    assert await store.get_machine(older.id) is None  # the oldest discovered one went
    assert await store.get_machine(old.id) is not None
    assert guard.evicted == 1 and guard.refused == 0
    assert await store.count_machines(MachineFilter(state=MachineState.DISCOVERED)) == 2


async def test_a_flood_of_random_macs_is_bounded_and_real_machines_still_boot(
        make_env: EnvFactory) -> None:
    env = await make_env("discovery:\n  policy: hold\n  max_discovered: 40\n"
                         "  burst_per_source: 10\n  rate_per_source: 1\n")
    await env.seed()
    await env.post("/api/v1/machines", {"mac": "52:54:00:12:34:56"}, status=201)
    rng = random.Random(11)

    def random_mac() -> str:
        return "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))

    # /ipxe from one host: its burst is recorded, the rest answered but not written.
    store = env.service.store
    guard = env.service.boot.discovery
    for _ in range(60):
        assert "netboot machines approve" in await boot(env, random_mac())
    recorded = await store.count_machines(MachineFilter(state=MachineState.DISCOVERED))
    assert recorded + guard.refused == 60 and guard.refused > 0 and recorded >= 10
    # DHCP from many relays (each with its own bucket, so none is refused): the cap holds,
    # the oldest go.
    for i in range(150):
        relay = f"198.51.100.{i % 50 + 1}"  # a relay sends from its own address
        request = BootRequest(mac=MacAddress.parse(random_mac()), firmware=Firmware.BIOS,
                              arch=Arch.X86, via="dhcp", remote_addr=relay, relay=relay)
        await env.service.boot.first_stage(request)
    await env.service.boot.drain()
    count = await store.count_machines(MachineFilter(state=MachineState.DISCOVERED))
    assert count == 40
    assert guard.evicted == recorded + 150 - count
    # The enrolled machine boots as ever, and nobody's flood evicted it.
    token = install_token(await boot(env, "52:54:00:12:34:56"))
    await env.get(f"/config/52-54-00-12-34-56?token={token}")
    assert await store.count_machines(MachineFilter(state=MachineState.INSTALLING)) == 1
