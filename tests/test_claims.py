"""netboot.claims: the refused claims kept by address, bounded (s40-claim)."""

from __future__ import annotations

from netboot.claims import RefusedClaims


def test_a_retried_claim_outlives_a_flood_of_one_off_ones_and_every_bound_holds() -> None:
    """The device's claim, tried twice from its address, stays through 10,000 one-off
    claims from 500 addresses; the machine keeps at most ``places`` addresses, the one-offs
    dropped first (oldest first); one address keeps only its latest claim, its tries reset
    when the claim changes; at most ``machines`` machines, the least recently contested
    dropped; forget drops a machine's."""
    kept = RefusedClaims(places=8, machines=3)
    assert kept.refused("m1", "192.0.2.7", "c" * 64, 1.0).tries == 1
    assert kept.refused("m1", "192.0.2.7", "c" * 64, 11.0).tries == 2
    for i in range(10_000):
        kept.refused("m1", f"198.51.100.{i % 500}", f"{i:064x}", 20.0 + i)
        assert len(kept.held("m1")) <= 8
    found = kept.find("m1", "c" * 64)
    assert found is not None and (found.peer, found.tries, found.first, found.last) == (
        "192.0.2.7", 2, 1.0, 11.0)
    assert kept.held("m1")[0] is found  # the most tried first
    assert kept.find("m1", f"{0:064x}") is None  # an old one-off: pushed out
    assert kept.find("m1", f"{9_999:064x}") is not None  # the latest: kept
    # One address: its latest claim only; a new one starts its tries again.
    assert kept.refused("m1", "192.0.2.7", "d" * 64, 12_000.0).tries == 1
    assert kept.find("m1", "c" * 64) is None
    # Machines: the least recently contested goes.
    for m in ("m2", "m3", "m4"):
        kept.refused(m, "192.0.2.1", "e" * 64, 1.0)
    assert kept.held("m1") == [] and kept.find("m4", "e" * 64) is not None
    kept.forget("m4")
    assert kept.find("m4", "e" * 64) is None and kept.held("nope") == []


def test_when_every_kept_address_retried_the_oldest_goes() -> None:
    """With no one-off left to drop, the least recently refused address goes."""
    kept = RefusedClaims(places=2)
    for peer in ("192.0.2.1", "192.0.2.2"):
        kept.refused("m", peer, peer.rjust(64, "0"), 1.0)
        kept.refused("m", peer, peer.rjust(64, "0"), 2.0)
    kept.refused("m", "192.0.2.3", "f" * 64, 3.0)
    assert [h.peer for h in kept.held("m")] == ["192.0.2.2", "192.0.2.3"]
