"""The inventory's health records: the database's clock against this host's (ClockSkew)."""

from __future__ import annotations

import pytest

from netboot.health import CLOCK_SKEW_WARN, ClockSkew

T = 1_796_000_000.0  # 2026-11-30: a float holds its fractions to ~0.2 us


def test_a_database_clock_out_of_step_is_told_once_naming_both_times() -> None:
    skew = ClockSkew()
    assert skew.seconds is None  # not measured yet: no gauge
    assert skew.observe(T + 0.4, T) is None  # within the threshold: nothing to say
    assert skew.seconds == pytest.approx(0.4)
    said = skew.observe(T + 7.25, T)
    assert said is not None
    level, message = said
    assert level == "warning"
    assert f"({_iso(T + 7.25)})" in message and f"({_iso(T)})" in message
    assert "7.2 s ahead of this host's" in message and "install_timeout" in message
    assert skew.observe(T + 8.0, T) is None  # told once while it lasts
    assert skew.seconds == 8.0
    # Back in step (past the hysteresis: half the threshold): said so, once.
    assert skew.observe(T + CLOCK_SKEW_WARN * 0.75, T) is None
    back = skew.observe(T - 0.01, T)
    assert back is not None and back[0] == "info" and "in step again (-0.010 s)" in back[1]
    assert skew.observe(T, T) is None
    behind = skew.observe(T - 60, T)
    assert behind is not None and "60.0 s behind this host's" in behind[1]


def test_a_slow_round_trip_is_no_evidence_of_skew() -> None:
    """The database's time was read somewhere within the round trip: half of it is the
    reading's uncertainty, given the benefit of the doubt."""
    skew = ClockSkew(threshold=3.0)
    assert skew.observe(T + 4.0, T, round_trip=3.0) is None
    assert skew.seconds == 4.0
    assert skew.observe(T + 4.0, T, round_trip=1.0) is not None


def _iso(seconds: float) -> str:
    import time

    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds % 1 * 1000):03d}Z"
