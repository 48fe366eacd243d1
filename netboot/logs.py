"""Log helpers every server shares: escaping untrusted text, rate limits, periodic summaries.

A provisioning network is not a trusted place: paths, user agents and firmware strings come
from whoever sends a packet, so they are escaped before they reach a log line (a ``%0a`` in a
URL must not forge a second access line, an ESC must not drive the operator's terminal). A
flood must not turn into a flood of log lines either: repeated lines from one peer are
rate-limited, and per-packet lines become a periodic summary.

Nothing here is global: each server holds its own limiter and summary.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from threading import get_ident
from types import MappingProxyType
from typing import Any, TextIO

# C0 controls, DEL, C1 controls, and the Unicode line/paragraph separators that some log
# viewers also break lines on. Backslash is escaped too, so that an escaped line can be told
# apart from one that was sent with a literal "\x0a" in it.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({0x5C: "\\\\", 0x2028: "\\u2028", 0x2029: "\\u2029",
                 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})


def escape(text: str | None, limit: int = 512) -> str:
    """``text`` with control and non-printable characters escaped, cut at ``limit``."""
    if text is None:
        return "-"
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and "\\" not in text:
        return text  # the common case, without building a new string
    return "".join(_ESCAPES.get(ord(c)) or (c if c.isprintable() else f"\\u{ord(c):04x}")
                   for c in text)


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as its escape (``\\x0a``,
    ``\\x1b``, ``\\u2028``), everything else as it is (a backslash too: unlike
    :func:`escape`, a printable text is returned unchanged, so a serial an operator typed
    still matches). For strings a stranger chose, kept or shown where a line break or an ESC
    would forge a line: a firmware string of a boot request, a table in a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" for c in text)


class RateLimitedLog:
    """Logs at most ``burst`` lines per key every ``window`` seconds, then counts silently.

    The key is usually the peer's address, or a fixed word for a condition that is not one
    peer's ("busy"). When a window with suppressed lines ends, one line says how many were
    dropped. The table of keys is bounded (least recently used goes first), so a flood from
    spoofed addresses cannot grow memory.

    All keys together write at most ``overall`` lines a window, then one line says how many
    more there were: a key is an address or a MAC, which a host on the provisioning network
    chooses per datagram (a spoofed UDP source, a made-up chaddr), so a budget per key alone
    let a flood write a line a datagram (TFTP RRQs for a missing file from 10,000 source
    addresses: 10,000 lines, s35-attack).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        window: float = 60.0,
        max_peers: int = 1024,
        overall: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._max_peers = max_peers
        self._overall = overall
        self._clock = clock
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._all: tuple[float, int] = (0.0, 0)  # every key's lines: window start, count

    def log(self, level: int, peer: str, msg: str, *args: Any) -> bool:
        """Log unless ``peer`` is over its budget; returns whether the line was written."""
        now = self._clock()
        start, count = self._peers.get(peer, (now, 0))
        if now - start > self._window:
            if count > self._burst:
                self._logger.log(level, "%s: %d more lines suppressed", peer, count - self._burst)
            start, count = now, 0
        count += 1
        self._peers[peer] = (start, count)
        self._peers.move_to_end(peer)
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)
        if count > self._burst:
            return False
        start, count = self._all
        if now - start > self._window:
            if count > self._overall:
                self._logger.log(level, "%d more lines suppressed (over %d a window from all "
                                 "sources)", count - self._overall, self._overall)
            start, count = now, 0
        self._all = (start, count + 1)
        if count >= self._overall:
            return False
        self._logger.log(level, msg, *args)
        return True


class Summary:
    """Counts events by kind and logs one line per ``interval`` instead of one per event.

    DHCP sees every broadcast on the segment; one INFO line per packet is 100 MB of log in a
    boot storm. Each event is still logged at DEBUG by the caller; this class gives the
    operator the INFO view: ``dhcp: last 60 s: 812 proxy OFFER, 3 silent``. ``note``
    flushes when the interval has passed; the owner also calls ``flush`` on a timer (so a
    burst followed by silence is reported) and at shutdown.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._what = what
        self.interval = interval
        self._clock = clock
        self._counts: Counter[str] = Counter()
        self._totals: Counter[str] = Counter()  # of the lines logged so far
        self._since = clock()

    @property
    def counts(self) -> Counter[str]:
        """What was counted since the last summary line."""
        return self._counts

    def totals(self) -> Counter[str]:
        """Everything counted since the start, by kind (the metrics' counters, at scrape)."""
        return self._totals + self._counts

    def note(self, kind: str) -> None:
        self._counts[kind] += 1
        if self._clock() - self._since >= self.interval:
            self.flush()

    def flush(self) -> None:
        now = self._clock()
        if self._counts:
            parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self._counts.items()))
            self._logger.info("%s: last %.0f s: %s", self._what, now - self._since, parts)
            self._totals.update(self._counts)
            self._counts = Counter()
        self._since = now


# What a log line is about, when the code that writes it knows: set by the HTTP request
# middleware (request id, peer, path) and by whoever else wraps a unit of work. A ContextVar,
# not a global, so that concurrent requests on one loop keep their own (each asyncio task has
# its own copy of the context).
CONTEXT_FIELDS = ("request_id", "mac", "peer", "xid", "path")
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "netboot_log", default=MappingProxyType({}))


def log_context(**fields: Any) -> _LogContext:
    """Attach ``fields`` (see :data:`CONTEXT_FIELDS`) to every line logged inside."""
    return _LogContext({k: v for k, v in fields.items() if v is not None})


def log_fields(fields: Mapping[str, Any]) -> _LogContext:
    """:func:`log_context` of a dict the caller made, with no None value, taken as it is (not
    to be changed after): the DHCP path makes one per datagram, and log_context's keywords
    and the dict it makes of them were ~8,600 of the ~18,000 instructions each datagram's
    context cost (callgrind, benchmarks/README.md, s37-dhcp1st)."""
    return _LogContext(fields)


def set_log_context(fields: Mapping[str, Any]) -> None:
    """:func:`log_context`'s ``fields`` (none None) attached for the rest of the current
    context, with no way back: for a context made for one unit of work, which ends with it
    (``contextvars.copy_context().run``, a task's context): the HTTP front door's
    decisions, once a request (netboot.servers.http.FrontDoor.start)."""
    outer = _context.get()
    _context.set({**outer, **fields} if outer else fields)


class _LogContext:
    """log_context's manager: a class, not a @contextmanager generator, which cost ~20x
    more; the DHCP path enters one per datagram."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> None:
        outer = _context.get()
        self._token = _context.set({**outer, **self._fields} if outer else self._fields)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _context.reset(self._token)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, and mac, peer,
    xid, path and request_id where known, from ``extra=`` or :func:`log_context`.

    The message is rendered with its arguments as in the text format, then JSON-escaped, so a
    control character sent by a device cannot break the line (json.dumps escapes them all).
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                    .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = _context.get()
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key, context.get(key))
            if value is not None:
                out[key] = value if isinstance(value, int | float) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


# The text format of every command's log (netboot.cli).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A line's milliseconds as logging writes them ("%03d"), by their number (1000 where the
# float's product rounds up to it): an int's format parsed its spec again at every line,
# ~1,500 of a first config's ~448,000 loop instructions (callgrind).
_MSECS = tuple(f"{ms:03d}" for ms in range(1001))
# logging's table of level names (addLevelName writes it; getLevelName looks here first).
_LEVEL_NAMES = logging._levelToName


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, with the local time's text made once a second: logging's own
    ``formatTime`` converts and formats the time of every record, most of a line's formatting.
    The same text: the date changes only on a whole second, the milliseconds are appended
    as logging appends them."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        """The asctime of a record made at ``created``."""
        # logging's default_msec_format, "%s,%03d"
        return f"{self.second_text(int(created))},{int(msecs):03d}"

    def second_text(self, second: int) -> str:
        """The asctime of a whole ``second``, without its milliseconds."""
        known = self._second
        if known[0] != second:
            known = self._second = (second, time.strftime(self.default_time_format,
                                                          self.converter(second)))
        return known[1]


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that writes what an event loop's thread logs once per iteration of
    its loop, not once per line.

    A boot storm logs a line per HTTP request (the access log, each ``/ipxe`` decision):
    thousands a second, each its own ``write(2)`` on the loop's thread. Here a line logged
    on a thread running an event loop is kept, and everything kept is written with one
    write at the start of the loop's next iteration (``call_soon``: before the loop waits
    for anything), or at once when ``max_lines`` are kept. Lines logged where no loop runs
    (the store's threads, start-up, another command) are written at once, after those kept:
    the order of lines is the order they were logged. Kept lines are written by
    :meth:`flush`, which logging's shutdown (``atexit``, also after an uncaught exception)
    calls, and which the CLI calls when ``serve`` ends however it ends. What a ``kill -9``
    or a crash in C code takes with it is at most the lines of the loop's current
    iteration (faulthandler's traceback is written beside the handler).
    """

    def __init__(self, stream: TextIO, *, max_lines: int = 256) -> None:
        super().__init__(stream)
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._last: logging.LogRecord | None = None  # for handleError, when a write fails
        self._scheduled: asyncio.AbstractEventLoop | None = None  # whose loop will flush
        self._scheduled_on = 0  # the thread that loop ran on when its flush was scheduled

    def emit(self, record: logging.LogRecord) -> None:
        # Called with self.lock held (Handler.handle).
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._last = record
        self._keep(line)

    def _keep(self, line: str) -> None:
        self._lines.append(line)
        loop = asyncio._get_running_loop()
        if loop is None or len(self._lines) >= self.max_lines:
            self.flush()
        elif self._scheduled is not loop:
            # (A loop that stopped with a flush pending, as asyncio.run's last iteration
            # leaves it, never runs it: this one does, with those lines first.)
            self._scheduled = loop
            self._scheduled_on = get_ident()
            loop.call_soon(self.flush)

    def text_line(self, level: int, name: str, message: str) -> None:
        """What :meth:`emit` writes for a record of ``level`` from logger ``name`` with
        ``message``, formatted by :class:`TextFormatter`, without making the record (see
        :func:`log_line`): the time is taken as a LogRecord takes it."""
        formatter = self.formatter
        assert isinstance(formatter, TextFormatter)
        created = time.time()
        second = int(created)
        # TextFormatter.stamp's text, in one f-string: the milliseconds as LogRecord.__init__
        # (3.11) computes them, int((created - int(created)) * 1000). The second's text and
        # the level's name looked up in place, without a call for either (getLevelName's
        # own first lookup, in the table addLevelName writes), the lock taken without its
        # context manager, _keep's common case in place: ~2,000 of a line's ~22,400
        # instructions (callgrind, benchmarks/README.md s30-front).
        known = formatter._second
        msecs = int((created - second) * 1000)
        line = (f"{known[1] if known[0] == second else formatter.second_text(second)},"
                f"{_MSECS[msecs] if 0 <= msecs <= 1000 else format(msecs, '03d')} "
                f"{_LEVEL_NAMES.get(level) or logging.getLevelName(level)} {name}: {message}")
        lock = self.lock
        assert lock is not None  # made by Handler.__init__
        lock.acquire()
        try:
            # _keep's common case in place: a line of the loop's iteration whose flush is
            # scheduled already. That loop runs this thread's iteration when it runs and
            # ran on this thread when the flush was scheduled (a thread runs one loop at a
            # time): asked so, not by asyncio._get_running_loop(), which in CPython 3.11
            # makes a getpid(2) system call each time, two a first install with the access
            # log (perf trace; benchmarks/README.md, s31-front).
            lines = self._lines
            scheduled = self._scheduled
            if (scheduled is not None and len(lines) < self.max_lines - 1
                    and self._scheduled_on == get_ident() and scheduled.is_running()):
                lines.append(line)
            else:
                self._keep(line)
        finally:
            lock.release()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._scheduled = None
            lines, self._lines = self._lines, []
            if not lines:
                super().flush()
                return
            lines.append("")
            try:
                self.stream.write(self.terminator.join(lines))
                super().flush()
            except Exception:
                if self._last is not None:
                    self.handleError(self._last)


def log_line(logger: logging.Logger, level: int, msg: str, *args: object,
             extra: Mapping[str, object] | None = None) -> None:
    """``logger.log(level, msg, *args, extra=extra)``, written the same, and without making
    a LogRecord where the line would go to one :class:`BatchedStreamHandler` in the text
    format and nowhere else, with no filter on the way (how ``serve`` logs): then the line
    is handed to that handler written out. For lines logged once per request (the access
    log, a decision): the record, its extras, the handler chain and the formatter cost
    ~15 µs a line, as much as answering a small file. ``extra`` only reaches the JSON
    format, which takes the ordinary way."""
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        pass  # LogRecord formats with the mapping itself: its way
    elif wrote_text(logger, level, msg, args):
        return
    logger.log(level, msg, *args, extra=extra)


def wrote_text(logger: logging.Logger, level: int, msg: str, args: tuple[object, ...]) -> bool:
    """``msg % args`` handed to the line's one text handler (:func:`text_handler`) without a
    LogRecord; False where there is none, or the text does not format (then the caller logs
    it the ordinary way, and logging reports it: Handler.handleError). log_line's way, and
    the access log's, whose extras are made only when this says False (s46-install)."""
    direct = text_handler(logger, level)
    if direct is None:
        return False
    try:
        message = msg % args if args else msg
    except Exception:
        return False
    direct.text_line(level, logger.name, message)
    return True


def text_handler(logger: logging.Logger, level: int) -> BatchedStreamHandler | None:
    """The one :class:`BatchedStreamHandler` a line of ``level`` from ``logger`` goes to,
    in the text format and nowhere else, with no filter on the way (how ``serve`` logs);
    None where it goes elsewhere too, or is not enabled (then ``logger.log`` writes or drops
    it). Enabled asked here, not by a call of its own before: a line's call was ~1,000 of
    an access line's ~22,000 loop instructions (callgrind, benchmarks/README.md s46-install)."""
    if not logger.isEnabledFor(level):
        return None
    found: BatchedStreamHandler | None = None
    node: logging.Logger | None = logger
    while node is not None:
        if node.filters:
            return None
        for handler in node.handlers:
            if (found is not None or type(handler) is not BatchedStreamHandler
                    or handler.filters or level < handler.level
                    or type(handler.formatter) is not TextFormatter):
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    return found
