"""Prometheus metrics: ``GET /metrics`` in the text exposition format, names ``netboot_*``.

One :class:`Metrics` per running service, with its own ``CollectorRegistry`` (never
prometheus_client's process-wide default registry, so two services in one process, as in the
tests, count separately). It is fed three ways, none of which touches the store on a hot path:

* the servers call it through their narrow observer protocols (``DhcpObserver``,
  ``TftpObserver``, ``HttpObserver``), one call per reply, transfer or request;
* the event bus hands it every committed machine event, from which the install and
  registration durations are measured (event times, not wall-clock at scrape);
* at scrape time, machines by state are counted by the store (one ``count`` per state, indexed)
  and the TFTP server's own counters are read.

Label values are bounded: DHCP firmware and arch are enums, HTTP routes are route patterns
(an unmatched path is ``unmatched``), error kinds are a fixed vocabulary.
"""

from __future__ import annotations

import contextlib
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from netboot.errors import StoreError
from netboot.health import InventoryHealth
from netboot.inventory.base import MachineFilter, Store
from netboot.model import Event, MachineState

# prometheus_client is imported by Metrics.open(): its package imports its HTTP exposition
# server too (http.server, urllib.request, wsgiref), ~0.04 s of CPU that ``netboot serve``
# spends after it answers (Metrics(deferred=True)), not before.
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
_HTTP_BOUNDS = tuple("+Inf" if b == float("inf") else repr(b) for b in HTTP_BUCKETS)  # le=


class _HttpDurations:
    """One route's request durations: a histogram's bucket counts (not cumulative) and sum."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(HTTP_BUCKETS)
        self.sum = 0.0


class _HttpCount:
    """Requests of one (route, method, status), and their route's durations."""

    __slots__ = ("created", "durations", "n")

    def __init__(self, durations: _HttpDurations, created: float) -> None:
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
        self.durations: dict[str, _HttpDurations] = {}

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
            total, buckets = 0, []
            for bound, n in zip(_HTTP_BOUNDS, durations.buckets, strict=True):
                total += n
                buckets.append((bound, total))
            seconds.add_metric([route], buckets, durations.sum)
        return [requests, seconds]


class Metrics:
    """The service's metrics; implements the DHCP, TFTP and HTTP observer protocols.

    ``deferred``: the collectors (and prometheus_client) wait for :meth:`open`; what is
    observed before is kept and counted then (``netboot serve`` answers before it opens
    them: its first requests are counted all the same)."""

    def __init__(self, *, max_tracked: int = 100_000, deferred: bool = False) -> None:
        # machine id → (time its install began, time it was installed); bounded, oldest first
        # out: a machine that never finishes must not be remembered forever.
        self._started: OrderedDict[str, tuple[float | None, float | None]] = OrderedDict()
        self._max_tracked = max_tracked
        self._health: InventoryHealth | None = None
        self._queued_now: Callable[[], int] | None = None
        self._tftp = _TftpCollector()
        self._http_counts = _HttpCollector()
        self._early: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = []
        if not deferred:
            self.open()

    def open(self) -> None:
        """Make the collectors and count what was observed meanwhile (once)."""
        if self._early is None:
            return
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._dhcp = Counter("netboot_dhcp_replies", "DHCP replies sent (OFFER, ACK, NAK), by "
                             "firmware and architecture of the client",
                             ["type", "firmware", "arch"], registry=r)
        self._transfers = Counter("netboot_tftp_transfers", "TFTP transfers ended, by outcome "
                             "(complete, probe, client-error, timed-out, source-error)",
                             ["outcome"], registry=r)
        self._tftp_bytes = Counter("netboot_tftp_bytes", "bytes acknowledged by TFTP clients",
                                   registry=r)
        r.register(self._http_counts)
        self._machines = Gauge("netboot_machines", "machines in the inventory, by state",
                               ["state"], registry=r)
        self._install = Histogram("netboot_install_duration_seconds", "from the first install "
                                  "script handed out (booting) to installed (or registered "
                                  "when the installer reported nothing)",
                                  buckets=DURATION_BUCKETS, registry=r)
        self._register = Histogram("netboot_registration_duration_seconds", "from installed "
                                   "to registered (first boot of the installed OS)",
                                   buckets=DURATION_BUCKETS, registry=r)
        self._errors = Counter("netboot_errors", "errors by kind: http_5xx, install_failed, "
                               "dhcp_nak, http_plaintext_credential", ["kind"], registry=r)
        self._events = Counter("netboot_events", "machine events recorded, by kind",
                               ["kind"], registry=r)
        self._inventory_up = Gauge("netboot_inventory_up", "1 while the inventory answers, 0 "
                                   "while it is unreachable (boots of known machines are "
                                   "answered from memory, writes refused)", registry=r)
        self._queued = Gauge("netboot_inventory_queued_events", "boot events waiting to be "
                             "written (they pile up while the inventory is unreachable)",
                             registry=r)
        r.register(self._tftp)
        early, self._early = self._early, None
        if self._health is not None and self._queued_now is not None:
            self.watch_inventory(self._health, self._queued_now)
        for observe, args in early:
            observe(*args)

    def _defer(self, observe: Callable[..., None], *args: Any) -> None:
        """Keep an observation for :meth:`open` (bounded: a start that never opens)."""
        assert self._early is not None
        if len(self._early) < 1 << 16:
            self._early.append((observe, args))

    def watch_inventory(self, health: InventoryHealth, queued: Callable[[], int]) -> None:
        """Where the inventory's health and the recorder's queue are read at scrape."""
        self._health, self._queued_now = health, queued
        if self._early is None:
            self._inventory_up.set_function(lambda: 1.0 if health.up else 0.0)
            self._queued.set_function(lambda: float(queued()))

    def read_tftp_stats(self, stats: Callable[[], Any | None]) -> None:
        """Where the TFTP server's counters are read from at scrape (None: TFTP is off)."""
        self._tftp.stats = stats

    # -- observer protocols ---------------------------------------------------------------
    def dhcp_reply(self, kind: str, firmware: str, arch: str) -> None:
        if self._early is not None:
            self._defer(self.dhcp_reply, kind, firmware, arch)
            return
        self._dhcp.labels(kind, firmware, arch).inc()
        if kind == "NAK":
            self._errors.labels("dhcp_nak").inc()

    def tftp_transfer(self, outcome: str, size: int) -> None:
        if self._early is not None:
            self._defer(self.tftp_transfer, outcome, size)
            return
        self._transfers.labels(outcome).inc()
        self._tftp_bytes.inc(size)

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        # Counted here, also before open(): the collector reads these at scrape.
        count = self._http_counts.counts.get((route, method, status))
        if count is None:
            count = self._http_count(route, method, status)
        count.n += 1
        durations = count.durations
        durations.sum += seconds
        # The first bucket whose bound is not below it, as prometheus_client's observe().
        durations.buckets[bisect_left(HTTP_BUCKETS, seconds)] += 1
        if status >= 500:
            if self._early is not None:
                self._defer(self._errors_http_5xx)
            else:
                self._errors_http_5xx()

    def _http_count(self, route: str, method: str, status: int) -> _HttpCount:
        """A new (route, method, status): label values are bounded (routes are patterns,
        never raw paths, and statuses few), so these are too."""
        now = time.time()
        collector = self._http_counts
        durations = collector.durations.get(route)
        if durations is None:
            durations = collector.durations[route] = _HttpDurations()
        count = collector.counts[route, method, status] = _HttpCount(durations, now)
        return count

    def _errors_http_5xx(self) -> None:
        self._errors.labels("http_5xx").inc()

    def plain_http_credential(self) -> None:
        if self._early is not None:
            self._defer(self.plain_http_credential)
            return
        self._errors.labels("http_plaintext_credential").inc()

    # -- events (netboot.events.EventBus.listen) ---------------------------------------------
    def event(self, event: Event) -> None:
        if self._early is not None:
            self._defer(self.event, event)
            return
        self._events.labels(event.kind).inc()
        began, installed = self._started.get(event.machine, (None, None))
        if event.kind == "install-plan":
            # A machine that reboots mid-install gets a new script: the install began at
            # the first one.
            if began is None or installed is not None:
                began, installed = event.time, None
        elif event.kind == "installed" and began is not None and installed is None:
            self._install.observe(max(0.0, event.time - began))
            installed = event.time
        elif event.kind == "registered":
            if installed is not None:
                self._register.observe(max(0.0, event.time - installed))
            elif began is not None:
                self._install.observe(max(0.0, event.time - began))
            self._started.pop(event.machine, None)
            return
        elif event.kind == "failed":
            self._errors.labels("install_failed").inc()
            self._started.pop(event.machine, None)
            return
        elif event.kind == "reinstall":
            self._started.pop(event.machine, None)
            return
        else:
            return
        self._started[event.machine] = (began, installed)
        self._started.move_to_end(event.machine)
        while len(self._started) > self._max_tracked:
            self._started.popitem(last=False)

    # -- scrape -----------------------------------------------------------------------------
    async def render(self, store: Store) -> bytes:
        """The exposition text, with machines by state counted now (kept from the last
        scrape while the inventory does not answer: the rest is still worth reading)."""
        counts: dict[MachineState, int] = {}
        if self._health is None or self._health.up:  # else no wait for a dead database
            with contextlib.suppress(StoreError):
                counts = {state: await store.count_machines(MachineFilter(state=state))
                          for state in MachineState}
        for state, count in counts.items():
            self._machines.labels(state.value).set(count)
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)
