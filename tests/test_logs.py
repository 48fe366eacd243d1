"""netboot.logs: escaping untrusted text, per-key rate limits, periodic summaries."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from netboot.logs import RateLimitedLog, Summary, escape


@pytest.mark.parametrize(("raw", "logged"), [
    ("/assets/vmlinuz", "/assets/vmlinuz"),
    ("/x\n127.0.0.1 GET /healthz 200", "/x\\n127.0.0.1 GET /healthz 200"),
    ("a\rb\tc\x00d\x1b[31m", "a\\rb\\tc\\x00d\\x1b[31m"),
    ("del\x7f c1\x85 ls\u2028 ps\u2029", "del\\x7f c1\\x85 ls\\u2028 ps\\u2029"),
    ("a\\x0a", "a\\\\x0a"),  # a literal backslash cannot pass for an escape
    ("Standard PC (Q35 + ICH9, 2009) caf\u00e9", "Standard PC (Q35 + ICH9, 2009) caf\u00e9"),
    ("\u00a0nbsp \ufeffbom \U000e0001tag", "\\u00a0nbsp \\ufeffbom \\ue0001tag"),
    (None, "-"),
])
def test_escape(raw: str | None, logged: str) -> None:
    assert escape(raw) == logged
    assert "\n" not in escape(raw) and "\r" not in escape(raw)


def test_escape_cuts_long_text() -> None:
    assert escape("a" * 5000, limit=10) == "a" * 10 + "..."


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_per_key_then_a_count_of_what_was_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t"), burst=2, window=10, clock=clock)
    written = [limited.log(logging.INFO, "10.0.0.1", "line %d", i) for i in range(50)]
    assert written == [True, True] + [False] * 48
    assert limited.log(logging.INFO, "10.0.0.2", "other peer")
    clock.now = 11
    assert limited.log(logging.INFO, "10.0.0.1", "again")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["line 0", "line 1", "other peer", "10.0.0.1: 48 more lines suppressed",
                        "again"]


def test_rate_limit_table_is_bounded() -> None:
    limited = RateLimitedLog(logging.getLogger("t"), max_peers=16)
    for i in range(10_000):
        limited.log(logging.DEBUG, f"10.0.{i >> 8}.{i & 255}", "x")
    assert len(limited._peers) == 16


def test_summary_counts_per_kind_and_flushes_on_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    summary = Summary(logging.getLogger("t"), "dhcp", interval=60, clock=clock)
    for _ in range(300):
        summary.note("proxy OFFER")
    summary.note("silent")
    assert caplog.records == []
    clock.now = 61
    summary.note("proxy ACK")
    assert [r.getMessage() for r in caplog.records] == [
        "dhcp: last 61 s: 1 proxy ACK, 300 proxy OFFER, 1 silent"]
    summary.flush()
    summary.flush()  # nothing pending: no line
    assert len(caplog.records) == 1


# --- --log-format json ---------------------------------------------------------------------


def _json_line(logger_name: str, emit: Any) -> dict[str, Any]:
    import io
    import json

    from netboot.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    out: dict[str, Any] = json.loads(lines[0])
    return out


def test_json_line_has_the_fields_and_the_context() -> None:
    from netboot.logs import log_context

    def emit(log: logging.Logger) -> None:
        with log_context(request_id="r-1", peer="192.0.2.5", path="/ipxe"):
            log.info("served %s\nforged line", "x", extra={"mac": "52:54:00:00:00:01",
                                                             "xid": 0x1234})

    line = _json_line("netboot.test.json", emit)
    assert line["level"] == "info" and line["logger"] == "netboot.test.json"
    assert line["message"] == "served x\nforged line"  # one JSON line: the newline is escaped
    assert line["time"].endswith("Z") and "T" in line["time"]
    assert (line["request_id"], line["peer"], line["path"]) == ("r-1", "192.0.2.5", "/ipxe")
    assert (line["mac"], line["xid"]) == ("52:54:00:00:00:01", 0x1234)


def test_json_line_without_context_has_no_empty_fields() -> None:
    line = _json_line("netboot.test.json2", lambda log: log.warning("plain"))
    assert set(line) == {"time", "level", "logger", "message"}


async def test_dhcp_lines_carry_mac_xid_and_peer() -> None:
    """A datagram through the real DHCP server on loopback: its lines name who it is about."""
    import io
    import json

    from netboot.logs import JsonFormatter
    from netboot.pxe import DhcpSettings
    from netboot.servers.dhcp import DhcpServer
    from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
    from tests.servers.test_dhcp import LOOPBACK, Client, payload

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("netboot.servers.dhcp")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    client = Client()
    server = DhcpServer(DhcpSettings(), TableDecider(), MemoryLeaseStore(), interfaces=None,
                        advertise=None, host=LOOPBACK, port=0, pxe_port=0,
                        broadcast_address=LOOPBACK, client_port=client.port)
    await server.start()
    try:
        await client.send(payload("uefi-edk2pxe", 8), server.ports[0])
        await client.receive()
    finally:
        await server.close()
        client.close()
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    offer = next(line for line in lines if "OFFER" in line["message"])
    assert offer["mac"] == "52:54:00:00:00:11" and offer["peer"] == LOOPBACK
    assert offer["xid"] == 3797733299
