"""Which offers wait for a ping (netboot.pingcheck) and what an address that answered becomes
in the pool (LeasePool.in_use): pure, ``now`` passed in."""

from __future__ import annotations

from netboot.model import Lease
from netboot.pingcheck import FREE_SECONDS, PingChecks
from tests.test_leases import T0, A, B, C, pool


def test_a_pool_address_is_checked_but_not_a_clients_own_lease_nor_a_fixed_address() -> None:
    checks = PingChecks()
    own = Lease(A, "192.0.2.100", T0 + 3600)
    assert checks.needed("192.0.2.100", T0, lease=None, fixed=None)
    assert not checks.needed("192.0.2.100", T0, lease=own, fixed=None)  # renewal, reboot
    assert checks.needed("192.0.2.101", T0, lease=own, fixed=None)  # another than its own
    assert not checks.needed("192.0.2.50", T0, lease=None, fixed="192.0.2.50")


def test_an_address_found_free_is_not_checked_again_for_30_seconds() -> None:
    checks = PingChecks()
    checks.found_free("192.0.2.100", T0)
    assert not checks.needed("192.0.2.100", T0 + FREE_SECONDS - 1, lease=None, fixed=None)
    assert checks.needed("192.0.2.100", T0 + FREE_SECONDS, lease=None, fixed=None)
    checks.found_free("192.0.2.101", T0 + 1)
    checks.forget("192.0.2.101")  # answered since: checked again
    assert checks.needed("192.0.2.101", T0 + 2, lease=None, fixed=None)


def test_what_is_remembered_free_is_bounded_by_the_addresses_of_the_last_30_seconds() -> None:
    checks = PingChecks()
    for i in range(10_000):
        checks.found_free(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", T0 + i)
    assert len(checks._free) <= FREE_SECONDS + 1


def test_an_address_in_use_is_kept_from_every_client_then_offered_again() -> None:
    """It answered a ping while offered to A: A's offer goes, nobody is offered it for
    decline_seconds (a DISCOVER gets the next address), then it is a candidate again."""
    p = pool()
    assert p.offer(A, T0) == "192.0.2.100"
    p.in_use("192.0.2.100", T0 + 1)
    assert p.offer(A, T0 + 1) == "192.0.2.101"
    assert p.offer(B, T0 + 2) == "192.0.2.102"
    assert p.offer(C, T0 + 3) is None  # the third address is in use: none left
    assert p.request(C, "192.0.2.100", T0 + 4) is None  # nor taken by a REQUEST
    assert p.offer(C, T0 + 602) == "192.0.2.100"
