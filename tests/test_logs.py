"""netboot.logs: escaping untrusted text, per-key rate limits, periodic summaries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from netboot.logs import (
    TEXT_FORMAT,
    BatchedStreamHandler,
    JsonFormatter,
    RateLimitedLog,
    Summary,
    TextFormatter,
    escape,
    log_line,
)

REPO = Path(__file__).resolve().parents[1]


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


def test_all_keys_together_write_at_most_overall_lines_a_window(
        caplog: pytest.LogCaptureFixture) -> None:
    # A key per datagram (spoofed sources, made-up MACs) wrote a line per datagram.
    caplog.set_level(logging.INFO)
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t"), burst=5, window=10, overall=3,
                             clock=clock)
    written = [limited.log(logging.INFO, f"10.0.0.{i}", "line %d", i) for i in range(100)]
    assert written == [True] * 3 + [False] * 97
    clock.now = 11
    assert limited.log(logging.INFO, "10.0.1.1", "later")
    assert [r.getMessage() for r in caplog.records] == [
        "line 0", "line 1", "line 2",
        "97 more lines suppressed (over 3 a window from all sources)", "later"]


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
    # The counts since the start, the metrics' (netboot_dhcp_outcomes_total), lines or not.
    summary.note("silent")
    assert summary.totals() == {"proxy OFFER": 300, "proxy ACK": 1, "silent": 2}


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


# --- the server's log stream: formatted cheaply, written once per loop iteration ---------

class Writes(io.StringIO):
    """A stream that remembers each write (what the handler hands the OS in one call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def batched(max_lines: int = 256) -> tuple[logging.Logger, BatchedStreamHandler, Writes]:
    stream = Writes()
    handler = BatchedStreamHandler(stream, max_lines=max_lines)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("batched-test")  # not in the manager: no other handler
    logger.addHandler(handler)
    return logger, handler, stream


@pytest.mark.parametrize("created", [1764641401.0, 1764641401.0009, 1764641401.9994,
                                     1764641402.5, 951782400.123])
def test_text_formatter_writes_what_loggings_formatter_writes(created: float) -> None:
    ours, theirs = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for at in (created, created, created + 0.001, created + 1, created - 1):
        record = logging.LogRecord("netboot.access", logging.INFO, "", 0, "GET %s %d",
                                   ("/boot.ipxe", 200), None)
        record.created, record.msecs = at, (at - int(at)) * 1000
        assert ours.format(record) == theirs.format(record)
    failed = logging.LogRecord("x", logging.ERROR, "", 0, "bad", (), None)
    try:
        raise ValueError("boom")
    except ValueError:
        failed.exc_info = sys.exc_info()
    assert ours.format(failed) == theirs.format(failed)


@pytest.mark.parametrize("created", [1764641401.0, 1764641401.0009, 1764641401.9994,
                                     1764641401.9999999, 1764641402.5, 951782400.123,
                                     1764641401.999, 1764641401.99999999999])
def test_a_record_less_lines_time_is_loggings(created: float,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # BatchedStreamHandler.text_line takes the time and writes its text itself: the text of
    # a LogRecord made at that time (its msecs as LogRecord.__init__ computes them).
    stream = Writes()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    theirs = logging.Formatter(TEXT_FORMAT)
    for at in (created, created, created + 0.001, created + 1, created - 1):
        monkeypatch.setattr(time, "time", lambda at=at: at)
        handler.text_line(logging.INFO, "netboot.access", "GET /boot.ipxe 200")
        record = logging.LogRecord("netboot.access", logging.INFO, "", 0, "GET %s %d",
                                   ("/boot.ipxe", 200), None)
        record.created, record.msecs = at, int((at - int(at)) * 1000) + 0.0
        monkeypatch.undo()
        handler.flush()
        assert stream.getvalue().splitlines()[-1] == theirs.format(record)


async def test_a_loop_iterations_lines_leave_in_one_write_in_order() -> None:
    logger, _, stream = batched()
    for i in range(5):
        logger.info("line %d", i)
    assert stream.calls == []  # kept until the loop comes round
    await asyncio.sleep(0)  # the loop's next iteration
    assert stream.calls == ["".join(f"line {i}\n" for i in range(5))]
    logger.info("next")
    await asyncio.sleep(0)
    assert stream.calls[1:] == ["next\n"]


async def test_lines_from_threads_without_a_loop_are_written_at_once_after_kept_ones() -> None:
    logger, _, stream = batched()
    logger.info("on the loop")
    await asyncio.to_thread(logger.info, "from a thread")
    assert stream.getvalue() == "on the loop\nfrom a thread\n"  # logged order, nothing kept
    await asyncio.sleep(0)
    assert stream.getvalue() == "on the loop\nfrom a thread\n"  # nothing written twice


async def test_at_most_max_lines_are_kept() -> None:
    logger, _, stream = batched(max_lines=3)
    for i in range(7):
        logger.info("%d", i)
    assert stream.calls == ["0\n1\n2\n", "3\n4\n5\n"]
    await asyncio.sleep(0)
    assert stream.getvalue() == "".join(f"{i}\n" for i in range(7))


async def test_record_less_lines_are_kept_as_records_lines_are() -> None:
    """log_line's way (BatchedStreamHandler.text_line) keeps a loop iteration's lines with
    the records' in the order logged, at most ``max_lines``, under the level's name as
    logging's table has it then."""
    stream = Writes()
    handler = BatchedStreamHandler(stream, max_lines=3)
    handler.setFormatter(TextFormatter())
    logger = logging.Logger("netboot.batched-test", logging.DEBUG)
    logger.addHandler(handler)
    logging.addLevelName(25, "NOTICE")
    try:
        log_line(logger, logging.INFO, "a %d", 0)
        logger.info("b %d", 1)
        log_line(logger, 25, "c %d", 2)
        log_line(logger, logging.INFO, "d %d", 3)
        assert len(stream.calls) == 1  # the first three, at max_lines
        log_line(logger, logging.INFO, "e %d", 4)
        assert len(stream.calls) == 1  # kept until the loop comes round
        await asyncio.sleep(0)
        assert len(stream.calls) == 2
    finally:
        del logging._levelToName[25], logging._nameToLevel["NOTICE"]
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    lines = [stamp.sub("", line) for line in stream.getvalue().splitlines()]
    assert lines == ["INFO netboot.batched-test: a 0", "INFO netboot.batched-test: b 1",
                     "NOTICE netboot.batched-test: c 2", "INFO netboot.batched-test: d 3",
                     "INFO netboot.batched-test: e 4"]
    assert stream.calls[1] == stream.getvalue().splitlines(keepends=True)[3] + \
        stream.getvalue().splitlines(keepends=True)[4]


def test_lines_a_stopped_loop_kept_are_written_first_and_on_flush() -> None:
    logger, handler, stream = batched()

    async def last_words() -> None:
        logger.info("last words")  # its flush would run in an iteration to come

    def stopped_loop() -> None:
        loop = asyncio.new_event_loop()

        def stop() -> None:
            logger.info("last words")
            loop.stop()  # after this iteration: the flush it scheduled never runs

        try:
            loop.call_soon(stop)
            loop.run_forever()
        finally:
            loop.close()

    stopped_loop()
    assert stream.getvalue() == ""
    stopped_loop()
    assert stream.getvalue() == ""
    asyncio.run(last_words())  # another loop: its flush writes the old lines first
    assert stream.getvalue() == "last words\n" * 3
    stopped_loop()
    handler.flush()  # what logging.shutdown and the CLI do at the end
    assert stream.getvalue() == "last words\n" * 4


def test_record_less_lines_are_kept_only_while_their_loop_runs_on_their_thread() -> None:
    """text_line keeps a line for the loop's next write only where that loop runs now, on
    this thread: not from another thread while it runs, not on its thread once it stopped
    with its flush pending (then the line, and those kept before it, are written at once)."""
    stream = Writes()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    loop = asyncio.new_event_loop()
    elsewhere: list[int] = []

    def on_the_loop() -> None:
        handler.text_line(logging.INFO, "netboot.access", "a")
        handler.text_line(logging.INFO, "netboot.access", "b")
        elsewhere.append(len(stream.calls))  # kept: nothing written yet
        thread = threading.Thread(
            target=handler.text_line, args=(logging.INFO, "netboot.access", "c"))
        thread.start()
        thread.join()
        elsewhere.append(len(stream.calls))  # another thread's: written at once, a, b first
        handler.text_line(logging.INFO, "netboot.access", "d")
        loop.stop()  # after this iteration: the flush scheduled for "d" never runs

    try:
        loop.call_soon(on_the_loop)
        loop.run_forever()
    finally:
        loop.close()
    assert elsewhere == [0, 1]
    assert len(stream.calls) == 1
    handler.text_line(logging.INFO, "netboot.access", "e")  # the loop's thread, no loop
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO netboot.access: ")
    assert [stamp.sub("", line) for line in stream.getvalue().splitlines()] == list("abcde")
    assert len(stream.calls) == 2


@pytest.mark.parametrize("ending", ["return", "raise", "sigterm"])
def test_nothing_logged_is_lost_when_the_process_ends(tmp_path: Path, ending: str) -> None:
    """A process ending normally, by an uncaught exception or by SIGTERM's default action
    (logging's shutdown does not run then: the handler must have written on its own by the
    time the loop waited) loses no line."""
    script = tmp_path / "ends.py"
    script.write_text(f"""
import asyncio, logging, os, signal, sys
from netboot.logs import BatchedStreamHandler, TextFormatter
handler = BatchedStreamHandler(sys.stderr)
handler.setFormatter(TextFormatter())
logging.basicConfig(level="INFO", handlers=[handler])
log = logging.getLogger("netboot.access")

async def main():
    for i in range(1000):
        log.info("request %d", i)
        if i % 100 == 99:
            await asyncio.sleep(0)
    if {ending!r} == "sigterm":
        await asyncio.sleep(0.05)  # the loop waits: what it kept is written by now
        os.kill(os.getpid(), signal.SIGTERM)
    if {ending!r} == "raise":
        raise RuntimeError("crash")

asyncio.run(main())
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in proc.stderr.splitlines() if " INFO netboot.access: " in line]
    assert [line.rsplit(" ", 1)[1] for line in lines] == [str(i) for i in range(1000)], \
        proc.stderr[-2000:]
    assert proc.returncode == {"return": 0, "raise": 1, "sigterm": -signal.SIGTERM}[ending]


def test_log_line_writes_what_the_logger_writes() -> None:
    """The record-less way (one BatchedStreamHandler in the text format) and logging's own
    give the same line but for the time, in the order they were logged."""
    stream = Writes()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    parent = logging.Logger("netboot", logging.INFO)
    logger = logging.Logger("netboot.access")
    logger.parent = parent
    parent.addHandler(handler)
    args = ("192.0.2.7", "GET", "/ipxe?mac=52-54-00-12-34-56", 200, 512, 0.0123, "iPXE/1.21")
    fmt = '%s %s %s %d %d %.3f "%s"'
    log_line(logger, logging.INFO, fmt, *args, extra={"request_id": "r1"})
    logger.info(fmt, *args, extra={"request_id": "r1"})
    log_line(logger, logging.INFO, "reason=%r", "it's")
    logger.info("reason=%r", "it's")
    log_line(logger, logging.INFO, "no arguments: 100%")
    logger.info("no arguments: 100%")
    log_line(logger, logging.DEBUG, "not enabled")
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    assert all(stamp.match(line) for line in lines), lines
    bare = [stamp.sub("", line) for line in lines]
    assert bare[0] == bare[1] == ('INFO netboot.access: 192.0.2.7 GET '
                                  '/ipxe?mac=52-54-00-12-34-56 200 512 0.012 "iPXE/1.21"')
    assert bare[2] == bare[3] == "INFO netboot.access: reason=\"it's\""
    assert bare[4] == bare[5] == "INFO netboot.access: no arguments: 100%"


def test_log_line_takes_loggings_way_wherever_that_could_differ(
        caplog: pytest.LogCaptureFixture) -> None:
    stream = Writes()
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.Logger("netboot.http")
    logger.addHandler(handler)
    seen: list[logging.LogRecord] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    # A second handler (pytest's caplog, an operator's), a filter, another formatter: each
    # must see a real record, with its extras.
    other = Seen()
    logger.addHandler(other)
    log_line(logger, logging.INFO, "a %s", "line", extra={"mac": "m"})
    logger.removeHandler(other)
    logger.addFilter(lambda r: True)
    log_line(logger, logging.INFO, "b %s", "line")
    logger.filters.clear()
    handler.setFormatter(JsonFormatter())
    log_line(logger, logging.INFO, "c %s", "line", extra={"mac": "m"})
    handler.setFormatter(TextFormatter())
    log_line(logger, logging.INFO, "d %(x)s", {"x": "mapped"})  # LogRecord's mapping rule
    log_line(logger, logging.INFO, "e %d", "not a number")  # reported as logging reports it
    handler.flush()
    assert [r.getMessage() for r in seen] == ["a line"] and seen[0].mac == "m"  # type: ignore[attr-defined]
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(" INFO netboot.http: a line")
    assert lines[1].endswith(" INFO netboot.http: b line")
    assert json.loads(lines[2])["mac"] == "m" and json.loads(lines[2])["message"] == "c line"
    assert lines[3].endswith(" INFO netboot.http: d mapped")
    assert len(lines) == 4  # the bad one: logging's error report on stderr, no line


def test_handlers_and_formatters_are_weakly_referenced_and_freed_as_loggings_own() -> None:
    """logging keeps a weak reference to every handler (its shutdown list, its fork lock
    set): one of netboot's freed and its reference cleared must leave the interpreter whole.
    (Compiled by mypyc as native classes on logging's Python bases, session 20, the freed
    handler left a dangling weak reference and the next handler made crashed the process;
    such a build must keep them Python classes: ``mypyc_attr(native_class=False)``.)"""
    import gc
    import weakref

    for _ in range(3):
        handler = BatchedStreamHandler(io.StringIO())
        handler.setFormatter(TextFormatter())
        refs = [weakref.ref(handler), weakref.ref(TextFormatter()), weakref.ref(JsonFormatter())]
        handler.close()
        del handler
        gc.collect()
        assert [ref() for ref in refs] == [None, None, None]
        logging.StreamHandler(io.StringIO()).close()  # logging's own, after the freed one
