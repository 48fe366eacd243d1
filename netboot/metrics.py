"""Prometheus metrics: ``GET /metrics`` in the text exposition format, names ``netboot_*``.

One :class:`Metrics` per running service, with its own ``CollectorRegistry`` (never
prometheus_client's process-wide default registry, so two services in one process, as in the
tests, count separately). It is fed three ways, none of which touches the store on a hot path:

* the servers call it through their narrow observer protocols (``DhcpObserver``,
  ``TftpObserver``, ``HttpObserver``), one call per reply, transfer or request;
* the event bus hands it every committed machine event, from which the install and
  registration durations are measured (event times, not wall-clock at scrape);
* at scrape time, machines by state are counted (``StateCounts``: the serving process's
  in-memory view, kept exact by the change feed; no index of the store holds the state) and
  the TFTP server's own counters are read.

Label values are bounded: DHCP firmware and arch are enums, HTTP routes are route patterns
(an unmatched path is ``unmatched``), error kinds are a fixed vocabulary.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from netboot.errors import StoreError
from netboot.health import InventoryHealth
from netboot.inventory.base import StateCounts, by_state
from netboot.model import Event, MachineState

# prometheus_client is imported at the first scrape (Metrics.registry): its package imports
# its HTTP exposition server too (http.server, urllib.request, wsgiref), ~0.04 s of CPU and
# ~1 MiB resident that a ``netboot serve`` nobody scrapes does without.
if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import Collector as _CollectorBase
else:
    _CollectorBase = object

# The classic text format, which generate_latest writes and every Prometheus version reads
# (prometheus_client >= 0.22 names its default "version=1.0.0", an older server refuses it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# An install takes minutes (kernel + image download, disk write, reboot); registration
# follows the first boot of the installed OS. Buckets from 10 s to 2 h.
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, float("inf"))
# TftpStats fields that are refusals or failures, reported as netboot_errors_total{kind}.
TFTP_ERROR_FIELDS = ("not_found", "refused", "busy", "failed", "unknown_tid")


class _TftpCollector(_CollectorBase):
    """Reads the TFTP server's own counters at scrape time: nothing is counted twice."""

    def __init__(self) -> None:
        self.stats: Callable[[], Any | None] = lambda: None

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily

        stats = self.stats()
        if stats is None:
            return []
        requests = CounterMetricFamily("netboot_tftp_requests", "TFTP read requests received")
        requests.add_metric([], stats.requests)
        errors = CounterMetricFamily("netboot_tftp_errors",
                                     "TFTP requests refused or transfers failed, by kind",
                                     labels=["kind"])
        for name in TFTP_ERROR_FIELDS:
            errors.add_metric([name], getattr(stats, name))
        return [requests, errors]


# prometheus_client's default histogram buckets (seconds), which the HTTP durations had.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, float("inf"))


# The inventory writer's group commits (Recorder.committed): seconds from a write's start to
# its commit (a storm's SQLite group commit ~0.2-5 ms, a PostgreSQL one a round trip or
# three more; past a second the boot answers waiting on it miss DHCP's), and rows (machines
# and events) a commit: a storm gathers ~256 first sightings, an import 100,000.
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, float("inf"))
COMMIT_ROWS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000, float("inf"))


def _bounds(buckets: tuple[float, ...]) -> tuple[str, ...]:
    """Each bucket's ``le`` label value, as prometheus_client writes it."""
    return tuple("+Inf" if b == float("inf") else repr(float(b)) for b in buckets)


_HTTP_BOUNDS = _bounds(HTTP_BUCKETS)
_DURATION_BOUNDS = _bounds(DURATION_BUCKETS)
_COMMIT_BOUNDS = _bounds(COMMIT_BUCKETS)
_COMMIT_ROWS_BOUNDS = _bounds(COMMIT_ROWS_BUCKETS)


class _Durations:
    """A histogram's bucket counts (not cumulative), sum and creation time."""

    __slots__ = ("buckets", "created", "sum")

    def __init__(self, buckets: int, created: float = 0.0) -> None:
        self.buckets = [0] * buckets
        self.sum = 0.0
        self.created = created

    def observe(self, buckets: tuple[float, ...], seconds: float) -> None:
        # The first bucket whose bound is not below it, as prometheus_client's observe().
        self.buckets[bisect_left(buckets, seconds)] += 1
        self.sum += seconds

    def cumulative(self, bounds: tuple[str, ...]) -> list[tuple[str, int]]:
        """(le, count up to that bound) per bucket, as a histogram is exposed."""
        total, out = 0, []
        for bound, n in zip(bounds, self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class _HttpCount:
    """Requests of one (route, method, status), and their route's durations."""

    __slots__ = ("created", "durations", "n")

    def __init__(self, durations: _Durations, created: float) -> None:
        self.n = 0
        self.durations = durations
        self.created = created


class _HttpCollector(_CollectorBase):
    """netboot_http_requests_total and netboot_http_request_duration_seconds, made at
    scrape from plain counts (:meth:`Metrics.http_request`): a storm's every request
    then costs an increment and a bucket's, not prometheus_client's counter and histogram
    (a lock each, checks, a bucket search in Python: ~a tenth of a small asset's Python)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], _HttpCount] = {}
        self.durations: dict[str, _Durations] = {}

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily("netboot_http_requests", "HTTP requests handled, by "
                                       "route pattern, method and status",
                                       labels=["route", "method", "status"])
        for (route, method, status), count in list(self.counts.items()):
            requests.add_metric([route, method, str(status)], count.n, created=count.created)
        seconds = HistogramMetricFamily("netboot_http_request_duration_seconds",
                                        "time to handle an HTTP request (for a stream: its "
                                        "lifetime), by route pattern", labels=["route"])
        for route, durations in list(self.durations.items()):
            seconds.add_metric([route], durations.cumulative(_HTTP_BOUNDS), durations.sum)
        return [requests, seconds]


class _Count:
    """One counter's value (for one set of label values) and when it was first counted, as
    prometheus_client's Counter child has them."""

    __slots__ = ("created", "n")

    def __init__(self, created: float) -> None:
        self.n = 0.0
        self.created = created


# Event kinds counted apart (netboot_events_total): netboot's own, a dozen, and those
# devices name their reports (any word: "progress", "k3s-standin"), which an install token
# could make without end, a series each (s33-attack). Past these, a new kind is "other".
EVENT_KINDS = 256


def _count(counts: dict[tuple[str, ...], _Count], labels: tuple[str, ...]) -> _Count:
    count = counts.get(labels)
    if count is None:
        count = counts[labels] = _Count(time.time())
    return count


class Metrics:
    """The service's metrics; implements the DHCP, TFTP and HTTP observer protocols.

    Counted as plain numbers; prometheus_client is imported at the first scrape (its
    ``registry``), where the counts are exposed as the Counters, Gauges and Histograms
    it would have kept (tests/test_metrics.py holds the two to the same samples). A
    ``netboot serve`` that nobody scrapes never imports it: ~1 MiB resident (with what it
    imports: http.server, urllib.request, wsgiref) that a boot storm does not use."""

    def __init__(self, *, max_tracked: int = 100_000) -> None:
        # machine id → (time its install began, time it was installed); bounded, oldest first
        # out: a machine that never finishes must not be remembered forever.
        self._started: OrderedDict[str, tuple[float | None, float | None]] = OrderedDict()
        self._max_tracked = max_tracked
        self._health: InventoryHealth | None = None
        self._queued_now: Callable[[], int] | None = None
        self._backlog_now: Callable[[], int] | None = None
        self._dhcp_outcomes: Callable[[], Mapping[str, int]] | None = None
        self._clock_skew: Callable[[], float | None] | None = None
        self._dns_limited: Callable[[], Mapping[str, int]] | None = None
        self._send_threads: Callable[[], tuple[int, int, int]] | None = None
        self._tftp = _TftpCollector()
        self._http_counts = _HttpCollector()
        now = time.time()
        self._dhcp: dict[tuple[str, ...], _Count] = {}  # (type, firmware, arch)
        self._transfers: dict[tuple[str, ...], _Count] = {}  # (outcome,)
        self._tftp_bytes = _Count(now)
        self._machines: dict[str, float] = {}  # state → count at the last scrape
        self._install = _Durations(len(DURATION_BUCKETS), now)
        self._register = _Durations(len(DURATION_BUCKETS), now)
        self._commit_seconds = _Durations(len(COMMIT_BUCKETS), now)
        self._commit_rows = _Durations(len(COMMIT_ROWS_BUCKETS), now)
        self._errors: dict[tuple[str, ...], _Count] = {}  # (kind,)
        self._events: dict[tuple[str, ...], _Count] = {}  # (kind,)
        self._registry: Any = None

    @property
    def registry(self) -> Any:
        """prometheus_client's CollectorRegistry of these metrics (made, and the package
        imported, at the first use: a scrape)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=True)
            registry.register(_Collector(self))
            self._registry = registry
        return self._registry

    def watch_inventory(self, health: InventoryHealth, queued: Callable[[], int],
                        backlog: Callable[[], int] | None = None) -> None:
        """Where the inventory's health and the recorder's queue (its events; ``backlog``:
        with the machines' learnt facts) are read at scrape."""
        self._health, self._queued_now, self._backlog_now = health, queued, backlog

    def read_dhcp_outcomes(self, outcomes: Callable[[], Mapping[str, int]]) -> None:
        """Where the DHCP server's outcomes so far are read at scrape (its summary line's
        counts: each reply sent, and each request left unanswered and why)."""
        self._dhcp_outcomes = outcomes

    def read_clock_skew(self, skew: Callable[[], float | None]) -> None:
        """Where the shared database's clock minus this host's is read at scrape (None:
        not measured, as with SQLite: health.ClockSkew)."""
        self._clock_skew = skew

    def read_dns_limited(self, limited: Callable[[], Mapping[str, int]]) -> None:
        """Where the DNS rate limiter's counts (answers dropped, sent truncated) are read at
        scrape."""
        self._dns_limited = limited

    def read_send_threads(self, read: Callable[[], tuple[int, int, int]]) -> None:
        """Where the send threads' counts (bodies given ever, bodies being sent, threads
        running) are read at scrape (http.send_threads; servers/sendthreads.py)."""
        self._send_threads = read

    def read_tftp_stats(self, stats: Callable[[], Any | None]) -> None:
        """Where the TFTP server's counters are read from at scrape (None: TFTP is off)."""
        self._tftp.stats = stats

    # -- observer protocols ---------------------------------------------------------------
    def dhcp_reply(self, kind: str, firmware: str, arch: str) -> None:
        _count(self._dhcp, (kind, firmware, arch)).n += 1
        if kind == "NAK":
            _count(self._errors, ("dhcp_nak",)).n += 1

    def tftp_transfer(self, outcome: str, size: int) -> None:
        _count(self._transfers, (outcome,)).n += 1
        self._tftp_bytes.n += size

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        count = self._http_counts.counts.get((route, method, status))
        if count is None:
            count = self._http_count(route, method, status)
        count.n += 1
        count.durations.observe(HTTP_BUCKETS, seconds)
        if status >= 500:
            _count(self._errors, ("http_5xx",)).n += 1

    def _http_count(self, route: str, method: str, status: int) -> _HttpCount:
        """A new (route, method, status): label values are bounded (routes are patterns,
        never raw paths, and statuses few), so these are too."""
        now = time.time()
        collector = self._http_counts
        durations = collector.durations.get(route)
        if durations is None:
            durations = collector.durations[route] = _Durations(len(HTTP_BUCKETS))
        count = collector.counts[route, method, status] = _HttpCount(durations, now)
        return count

    def inventory_commit(self, rows: int, seconds: float) -> None:
        """A group commit of the inventory's writer (Recorder.committed): its size, its time."""
        self._commit_seconds.observe(COMMIT_BUCKETS, seconds)
        self._commit_rows.observe(COMMIT_ROWS_BUCKETS, rows)

    def plain_http_credential(self) -> None:
        _count(self._errors, ("http_plaintext_credential",)).n += 1

    # -- events (netboot.events.EventBus.listen) ---------------------------------------------
    def event(self, event: Event) -> None:
        # A kind counted already is counted in place, without _count's call (every first
        # install's and first config's event: ~860 loop instructions, s38-install).
        events, kind = self._events, event.kind
        count = events.get((kind,))
        if count is None:
            count = _count(events, (kind,) if len(events) < EVENT_KINDS else ("other",))
        count.n += 1
        began, installed = self._started.get(event.machine, (None, None))
        if kind == "install-plan":
            # A machine that reboots mid-install gets a new script: the install began at
            # the first one.
            if began is None or installed is not None:
                began, installed = event.time, None
        elif kind == "installed" and began is not None and installed is None:
            self._install.observe(DURATION_BUCKETS, max(0.0, event.time - began))
            installed = event.time
        elif kind == "registered":
            if installed is not None:
                self._register.observe(DURATION_BUCKETS, max(0.0, event.time - installed))
            elif began is not None:
                self._install.observe(DURATION_BUCKETS, max(0.0, event.time - began))
            self._started.pop(event.machine, None)
            return
        elif kind == "failed":
            _count(self._errors, ("install_failed",)).n += 1
            self._started.pop(event.machine, None)
            return
        elif kind == "reinstall":
            self._started.pop(event.machine, None)
            return
        else:
            return
        self._started[event.machine] = (began, installed)
        self._started.move_to_end(event.machine)
        while len(self._started) > self._max_tracked:
            self._started.popitem(last=False)

    # -- scrape -----------------------------------------------------------------------------
    async def render(self, machines: StateCounts) -> bytes:
        """The exposition text, with machines by state counted now (kept from the last
        scrape while the inventory does not answer: the rest is still worth reading)."""
        counts: dict[MachineState, int] = {}
        if self._health is None or self._health.up:  # else no wait for a dead database
            with contextlib.suppress(StoreError):
                counts = by_state(await machines.state_counts())
        for state, count in counts.items():
            self._machines[state.value] = float(count)
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)


class _Collector(_CollectorBase):
    """A :class:`Metrics`' counts as prometheus_client's metric families, at scrape: the
    samples its Counters, Gauges and Histograms would give (names, help, labels, values,
    creation times), in the order they were registered in."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self._m

        def counter(name: str, doc: str, labels: list[str],
                    counts: dict[tuple[str, ...], _Count]) -> Metric:
            family = CounterMetricFamily(name, doc, labels=labels)
            for values, count in list(counts.items()):
                family.add_metric(list(values), count.n, created=count.created)
            return family

        yield counter("netboot_dhcp_replies", "DHCP replies sent (OFFER, ACK, NAK), by "
                      "firmware and architecture of the client",
                      ["type", "firmware", "arch"], m._dhcp)
        yield counter("netboot_tftp_transfers", "TFTP transfers ended, by outcome "
                      "(complete, probe, client-error, timed-out, source-error)",
                      ["outcome"], m._transfers)
        yield CounterMetricFamily("netboot_tftp_bytes", "bytes acknowledged by TFTP clients",
                                  value=m._tftp_bytes.n, created=m._tftp_bytes.created)
        yield from m._http_counts.collect()
        machines = GaugeMetricFamily("netboot_machines", "machines in the inventory, by state",
                                     labels=["state"])
        for state, count in list(m._machines.items()):
            machines.add_metric([state], count)
        yield machines
        yield _histogram("netboot_install_duration_seconds", "from the first install "
                         "script handed out (booting) to installed (or registered "
                         "when the installer reported nothing)", m._install)
        yield _histogram("netboot_registration_duration_seconds", "from installed "
                         "to registered (first boot of the installed OS)", m._register)
        yield _histogram("netboot_inventory_commit_seconds", "the inventory writer's group "
                         "commits of boot events, facts and states: from a write's start to "
                         "its commit", m._commit_seconds, _COMMIT_BOUNDS)
        yield _histogram("netboot_inventory_commit_rows", "the inventory writer's group "
                         "commits: machines and events written by each",
                         m._commit_rows, _COMMIT_ROWS_BOUNDS)
        yield counter("netboot_errors", "errors by kind: http_5xx, install_failed, "
                      "dhcp_nak, http_plaintext_credential", ["kind"], m._errors)
        yield counter("netboot_events", "machine events recorded, by kind", ["kind"],
                      m._events)
        health, queued = m._health, m._queued_now
        yield GaugeMetricFamily("netboot_inventory_up", "1 while the inventory answers, 0 "
                                "while it is unreachable (boots of known machines are "
                                "answered from memory, writes refused)",
                                value=0.0 if health is None else 1.0 if health.up else 0.0)
        yield GaugeMetricFamily("netboot_inventory_queued_events", "boot events waiting to "
                                "be written (they pile up while the inventory is "
                                "unreachable)",
                                value=0.0 if queued is None else float(queued()))
        # Its own gauge, not a value of netboot_inventory_up: writes are accepted (they wait
        # for a lock holder this role may not see, each bounded by statement_timeout), so
        # "up" stays true, and an alert on up == 0 would never see it (s34-pg2).
        yield GaugeMetricFamily("netboot_inventory_unknown", "1 while the inventory "
                                "answers but cannot tell whether its writes are stuck "
                                "(/healthz: 200 unknown), else 0",
                                value=0.0 if health is None or health.unknown is None
                                else 1.0)
        if m._backlog_now is not None:
            yield GaugeMetricFamily("netboot_inventory_backlog", "boot notes and learnt facts "
                                    "waiting for the inventory's writer (at its bound, boot "
                                    "answers are paced until it writes)",
                                    value=float(m._backlog_now()))
        skew = m._clock_skew() if m._clock_skew is not None else None
        if skew is not None:
            yield GaugeMetricFamily("netboot_inventory_clock_skew_seconds", "the inventory "
                                    "database's clock minus this host's, at the last check "
                                    "(PostgreSQL: at start and every 5 minutes)", value=skew)
        if m._dhcp_outcomes is not None:
            # Replies and silences alike, as the DHCP summary line counts them: a fixed
            # vocabulary ("proxy OFFER", "silent (no boot)", "decision timed out",
            # "pool exhausted", ...), never a MAC or an address. Where netboot_dhcp_replies
            # says what was sent, this also says what was not (dnsmasq logs "ignored").
            outcomes = CounterMetricFamily("netboot_dhcp_outcomes", "DHCP requests by "
                                           "outcome: a reply sent, or why none was",
                                           labels=["outcome"])
            for outcome, n in sorted(m._dhcp_outcomes().items()):
                outcomes.add_metric([outcome], n)
            yield outcomes
        if m._dns_limited is not None:
            # RRL (dns.rate_limit): UDP answers not sent as they were, by action: dropped,
            # or sent empty with TC so that a real client asks again over TCP.
            limited = CounterMetricFamily("netboot_dns_rate_limited", "DNS answers over UDP "
                                          "held back by dns.rate_limit, by action (dropped, "
                                          "truncated)", labels=["action"])
            for action, n in sorted(m._dns_limited().items()):
                limited.add_metric([action], n)
            yield limited
        if m._send_threads is not None:
            # A thread that ended on a bug is given nothing more (its bodies go out from the
            # loop, slower): "running" below http.send_threads is the alert, as nginx's
            # master restarting a worker is its log's.
            given, sending, running = m._send_threads()
            yield CounterMetricFamily("netboot_http_send_thread_bodies", "large file bodies "
                                      "(768 KiB and more) handed to the send threads",
                                      value=given)
            yield GaugeMetricFamily("netboot_http_send_thread_bodies_sending", "bodies the "
                                    "send threads are sending now (a slow client's waits "
                                    "for its socket's room)", value=float(sending))
            yield GaugeMetricFamily("netboot_http_send_threads_running", "send threads "
                                    "running (http.send_threads while all is well)",
                                    value=float(running))
        yield from m._tftp.collect()


def _histogram(name: str, doc: str, durations: _Durations,
               bounds: tuple[str, ...] = _DURATION_BOUNDS) -> Metric:
    from prometheus_client.core import Metric as Family

    family = Family(name, doc, "histogram")
    total = 0
    for bound, total in durations.cumulative(bounds):
        family.add_sample(f"{name}_bucket", {"le": bound}, total)
    family.add_sample(f"{name}_count", {}, total)
    family.add_sample(f"{name}_sum", {}, durations.sum)
    family.add_sample(f"{name}_created", {}, durations.created)
    return family
