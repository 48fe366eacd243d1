"""Log helpers every server shares: escaping untrusted text, rate limits, periodic summaries.

A provisioning network is not a trusted place: paths, user agents and firmware strings come
from whoever sends a packet, so they are escaped before they reach a log line (a ``%0a`` in a
URL must not forge a second access line, an ESC must not drive the operator's terminal). A
flood must not turn into a flood of log lines either: repeated lines from one peer are
rate-limited, and per-packet lines become a periodic summary.

Nothing here is global: each server holds its own limiter and summary.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

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


class RateLimitedLog:
    """Logs at most ``burst`` lines per key every ``window`` seconds, then counts silently.

    The key is usually the peer's address, or a fixed word for a condition that is not one
    peer's ("busy"). When a window with suppressed lines ends, one line says how many were
    dropped. The table of keys is bounded (least recently used goes first), so a flood from
    spoofed addresses cannot grow memory.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        window: float = 60.0,
        max_peers: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._burst = burst
        self._window = window
        self._max_peers = max_peers
        self._clock = clock
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()

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
        if count <= self._burst:
            self._logger.log(level, msg, *args)
            return True
        return False


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
        self._since = clock()

    @property
    def counts(self) -> Counter[str]:
        """What was counted since the last summary line."""
        return self._counts

    def note(self, kind: str) -> None:
        self._counts[kind] += 1
        if self._clock() - self._since >= self.interval:
            self.flush()

    def flush(self) -> None:
        now = self._clock()
        if self._counts:
            parts = ", ".join(f"{n} {kind}" for kind, n in sorted(self._counts.items()))
            self._logger.info("%s: last %.0f s: %s", self._what, now - self._since, parts)
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


class _LogContext:
    """log_context's manager: a class, not a @contextmanager generator, which cost ~20x
    more; the DHCP path enters one per datagram."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: dict[str, Any]) -> None:
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
