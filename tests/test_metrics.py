"""``GET /metrics`` after a simulated boot: the DHCP server answers captured firmware packets,
the device fetches its script over HTTP, installs and registers; the scrape is parsed with
prometheus_client's own parser and checked value by value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from netboot.health import InventoryHealth
from netboot.metrics import (
    COMMIT_BUCKETS,
    COMMIT_ROWS_BUCKETS,
    DURATION_BUCKETS,
    EVENT_KINDS,
    Metrics,
)
from netboot.model import Event
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from tests.conftest import Env, EnvFactory, boot, call, child_json, install_token
from tests.dhcp_fakes import MemoryLeaseStore
from tests.servers.test_dhcp import payload

LOOPBACK = "127.0.0.1"
PCAP_MAC = "52:54:00:00:00:11"  # the client of tests/data/pcaps/uefi-edk2pxe.pcap


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(env: Env, **kwargs: Any) -> dict[Any, float]:
    r = await call(env, "GET", "/metrics", admin=False, **kwargs)
    assert r.status == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(r.text)


async def test_a_simulated_boot_is_counted(make_env: EnvFactory) -> None:
    env = await make_env()
    await env.seed()
    await env.post("/api/v1/machines", {"mac": PCAP_MAC, "hostname": "edge-1"}, status=201)
    dhcp = DhcpServer(DhcpSettings(), env.service.boot, MemoryLeaseStore(), interfaces=None,
                      advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0,
                      broadcast_address=LOOPBACK, observer=env.service.metrics)
    await dhcp.start()
    try:
        # EDK2's DISCOVER (proxy OFFER on :67), then its REQUEST to :4011 (ACK).
        offers = await dhcp.handle(payload("uefi-edk2pxe", 8), ("0.0.0.0", 68),
                                   server_ip=LOOPBACK, pxe_port=False)
        acks = await dhcp.handle(payload("uefi-edk2pxe", 19), ("0.0.0.0", 68),
                                 server_ip=LOOPBACK, pxe_port=True)
        assert offers and acks
    finally:
        await dhcp.close()
    script = await boot(env, PCAP_MAC.replace(":", "-"))
    token = install_token(script)
    r = await call(env, "POST", f"/api/v1/machines/{PCAP_MAC}/events", admin=False,
                   json_body={"kind": "installed"},
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201
    r = await call(env, "POST", "/api/v1/register", admin=False,
                   json_body={"mac": PCAP_MAC, "token": token, "addresses": ["192.0.2.31"]})
    assert r.status == 200
    r = await call(env, "GET", "/api/v1/machines/52:54:00:99:99:99")
    assert r.status == 404

    m = await scrape(env)
    assert value(m, "netboot_dhcp_replies_total", type="OFFER", firmware="uefi",
                 arch="x86_64") == 1
    assert value(m, "netboot_dhcp_replies_total", type="ACK", firmware="uefi",
                 arch="x86_64") == 1
    # Routes are patterns: the 404 above is counted under {ref}, not its raw path.
    assert value(m, "netboot_http_requests_total", route="/ipxe", method="GET",
                 status="200") == 1
    assert value(m, "netboot_http_requests_total", route="/api/v1/machines/{ref}",
                 method="GET", status="404") == 1
    assert value(m, "netboot_http_requests_total", route="/api/v1/register", method="POST",
                 status="200") == 1
    assert value(m, "netboot_machines", state="registered") == 1
    assert value(m, "netboot_machines", state="enrolled") == 0
    assert value(m, "netboot_install_duration_seconds_count") == 1
    assert value(m, "netboot_registration_duration_seconds_count") == 1
    assert value(m, "netboot_events_total", kind="registered") == 1
    # A second scrape counts itself: /metrics is a route like the others.
    again = await scrape(env)
    assert value(again, "netboot_http_requests_total", route="/metrics", method="GET",
                 status="200") == 1


async def test_metrics_can_require_a_token(make_env: EnvFactory) -> None:
    env = await make_env("metrics:\n  public: false\n")
    r = await call(env, "GET", "/metrics", admin=False)
    assert r.status == 401
    r = await call(env, "GET", "/metrics")
    assert r.status == 200 and "netboot_machines" in r.text


async def test_durations_follow_event_times_and_restart_on_reinstall() -> None:
    metrics = Metrics()
    metrics.event(Event("m1", 100.0, "install-plan"))
    metrics.event(Event("m1", 130.0, "install-plan"))  # rebooted mid-install: began at 100
    metrics.event(Event("m1", 400.0, "installed"))
    metrics.event(Event("m1", 460.0, "registered"))
    metrics.event(Event("m2", 100.0, "install-plan"))
    metrics.event(Event("m2", 150.0, "failed"))
    metrics.event(Event("m2", 200.0, "registered"))  # no install began after the failure
    m = samples(_text(metrics))
    assert value(m, "netboot_install_duration_seconds_sum") == 300
    assert value(m, "netboot_install_duration_seconds_count") == 1
    assert value(m, "netboot_registration_duration_seconds_sum") == 60
    assert value(m, "netboot_errors_total", kind="install_failed") == 1


def test_two_services_count_apart() -> None:
    a, b = Metrics(), Metrics()
    a.http_request("/healthz", "GET", 200, 0.001)
    assert value(samples(_text(a)), "netboot_http_requests_total", route="/healthz",
                 method="GET", status="200") == 1
    assert value(samples(_text(b)), "netboot_http_requests_total", route="/healthz",
                 method="GET", status="200") == 0


def test_event_kinds_counted_apart_are_bounded() -> None:
    # A device names its reports' kinds ("progress", "k3s-standin"): each a new series of
    # netboot_events_total, without end, from one install token (s33-attack). Past the
    # bound, new kinds are counted as "other"; the kinds seen first keep their own.
    metrics = Metrics()
    metrics.event(Event("m1", 1.0, "registered"))
    for i in range(5000):
        metrics.event(Event("m1", 2.0, f"step-{i}"))
    metrics.event(Event("m1", 3.0, "registered"))
    m = samples(_text(metrics))
    counted = {dict(labels)["kind"]: v for (name, labels), v in m.items()
               if name == "netboot_events_total"}
    assert len(counted) <= EVENT_KINDS + 1 and "other" in counted
    assert counted["registered"] == 2 and counted["step-0"] == 1
    assert sum(counted.values()) == 5002


def test_the_inventory_s_health_is_a_gauge_each_for_down_and_unknown() -> None:
    """netboot_inventory_up is 0 in an outage; netboot_inventory_unknown is 1 while the
    inventory answers but cannot tell whether its writes are stuck (/healthz "200 unknown":
    a lock holder this role may not see), where netboot_inventory_up stays 1: without it
    an alert could not tell that state from "ok"."""
    metrics, health = Metrics(), InventoryHealth()
    metrics.watch_inventory(health, lambda: 3)

    def gauges() -> tuple[float, float, float]:
        m = samples(_text(metrics))
        return (value(m, "netboot_inventory_up"), value(m, "netboot_inventory_unknown"),
                value(m, "netboot_inventory_queued_events"))

    assert gauges() == (1, 0, 3)
    health.doubt("it lacks pg_read_all_stats (GRANT pg_read_all_stats TO netboot)")
    assert gauges() == (1, 1, 3)
    health.doubt(None)
    assert gauges() == (1, 0, 3)
    health.failed("connection refused")
    assert gauges() == (0, 0, 3)


def test_tracked_installs_are_bounded() -> None:
    metrics = Metrics(max_tracked=10)
    for i in range(100):
        metrics.event(Event(f"m{i}", float(i), "install-plan"))
    assert len(metrics._started) == 10


def _text(metrics: Metrics) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(metrics.registry).decode()


def test_prometheus_client_is_imported_at_the_first_scrape_only() -> None:
    """``netboot serve`` counts without prometheus_client (~1 MiB resident a storm does not
    use); what was observed before the first scrape is in it."""
    script = (
        "import json, sys\n"
        "from netboot.metrics import Metrics\n"
        "from netboot.model import Event\n"
        "m = Metrics()\n"
        "m.http_request('/healthz', 'GET', 200, 0.001)\n"
        "m.http_request('/boot.ipxe', 'GET', 503, 0.002)\n"
        "m.dhcp_reply('NAK', 'ipxe', 'x86_64')\n"
        "m.tftp_transfer('complete', 1000)\n"
        "m.plain_http_credential()\n"
        "m.event(Event('m1', 100.0, 'install-plan'))\n"
        "m.event(Event('m1', 160.0, 'installed'))\n"
        "before = 'prometheus_client' in sys.modules\n"
        "from prometheus_client.exposition import generate_latest\n"
        "print(json.dumps([before, generate_latest(m.registry).decode()]))\n"
    )
    before, text = child_json(script, timeout=120)
    assert before is False
    scraped = samples(text)
    assert value(scraped, "netboot_http_requests_total", route="/healthz", method="GET",
                 status="200") == 1
    assert value(scraped, "netboot_errors_total", kind="http_5xx") == 1
    assert value(scraped, "netboot_errors_total", kind="dhcp_nak") == 1
    assert value(scraped, "netboot_errors_total", kind="http_plaintext_credential") == 1
    assert value(scraped, "netboot_tftp_bytes_total") == 1000
    assert value(scraped, "netboot_install_duration_seconds_count") == 1
    assert value(scraped, "netboot_install_duration_seconds_sum") == 60.0


def _reference() -> tuple[Any, Callable[..., None]]:
    """The Counters, Gauges and Histograms Metrics had as prometheus_client's own objects
    (before it counted plain numbers), and a function feeding both the same observation."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    r = CollectorRegistry()
    dhcp = Counter("netboot_dhcp_replies", "DHCP replies sent (OFFER, ACK, NAK), by "
                   "firmware and architecture of the client", ["type", "firmware", "arch"],
                   registry=r)
    transfers = Counter("netboot_tftp_transfers", "TFTP transfers ended, by outcome "
                        "(complete, probe, client-error, timed-out, source-error)",
                        ["outcome"], registry=r)
    tftp_bytes = Counter("netboot_tftp_bytes", "bytes acknowledged by TFTP clients",
                         registry=r)
    machines = Gauge("netboot_machines", "machines in the inventory, by state", ["state"],
                     registry=r)
    install = Histogram("netboot_install_duration_seconds", "from the first install "
                        "script handed out (booting) to installed (or registered "
                        "when the installer reported nothing)", buckets=DURATION_BUCKETS,
                        registry=r)
    register = Histogram("netboot_registration_duration_seconds", "from installed "
                         "to registered (first boot of the installed OS)",
                         buckets=DURATION_BUCKETS, registry=r)
    commit_seconds = Histogram("netboot_inventory_commit_seconds", "the inventory writer's "
                               "group commits of boot events, facts and states: from a "
                               "write's start to its commit", buckets=COMMIT_BUCKETS,
                               registry=r)
    commit_rows = Histogram("netboot_inventory_commit_rows", "the inventory writer's group "
                            "commits: machines and events written by each",
                            buckets=COMMIT_ROWS_BUCKETS, registry=r)
    errors = Counter("netboot_errors", "errors by kind: http_5xx, install_failed, "
                     "dhcp_nak, http_plaintext_credential", ["kind"], registry=r)
    events = Counter("netboot_events", "machine events recorded, by kind", ["kind"],
                     registry=r)
    Gauge("netboot_inventory_up", "1 while the inventory answers, 0 while it is "
          "unreachable (boots of known machines are answered from memory, writes refused)",
          registry=r)
    Gauge("netboot_inventory_queued_events", "boot events waiting to be written (they pile "
          "up while the inventory is unreachable)", registry=r)
    Gauge("netboot_inventory_unknown", "1 while the inventory answers but cannot tell "
          "whether its writes are stuck (/healthz: 200 unknown), else 0", registry=r)

    def feed(metrics: Metrics, kind: str, *args: Any) -> None:
        if kind == "dhcp":
            metrics.dhcp_reply(*args)
            dhcp.labels(*args).inc()
            if args[0] == "NAK":
                errors.labels("dhcp_nak").inc()
        elif kind == "tftp":
            metrics.tftp_transfer(*args)
            transfers.labels(args[0]).inc()
            tftp_bytes.inc(args[1])
        elif kind == "credential":
            metrics.plain_http_credential()
            errors.labels("http_plaintext_credential").inc()
        elif kind == "state":
            metrics._machines[args[0]] = float(args[1])
            machines.labels(args[0]).set(args[1])
        elif kind == "commit":
            metrics.inventory_commit(*args)
            commit_rows.observe(args[0])
            commit_seconds.observe(args[1])
        else:  # an event, with the durations it ends
            metrics.event(Event(args[0], args[1], kind))
            events.labels(kind).inc()
            if kind == "failed":
                errors.labels("install_failed").inc()
            for name, seconds in args[2:]:
                (install if name == "install" else register).observe(seconds)

    return r, feed


def test_the_plain_counts_are_exposed_as_prometheus_clients_own_metrics() -> None:
    """Every family but HTTP's (held by the next test) as the Counters, Gauges and
    Histograms Metrics kept before: the same names, help, types, labels and values, and a
    creation time where they had one; durations on and around every bucket bound."""
    from prometheus_client.exposition import generate_latest

    reference, feed = _reference()
    metrics = Metrics()
    feed(metrics, "dhcp", "OFFER", "uefi", "x86_64")
    feed(metrics, "dhcp", "OFFER", "uefi", "x86_64")
    feed(metrics, "dhcp", "NAK", "bios", "x86")
    feed(metrics, "tftp", "complete", 1000)
    feed(metrics, "tftp", "timed-out", 7)
    feed(metrics, "credential")
    feed(metrics, "state", "enrolled", 5)
    feed(metrics, "state", "registered", 0)
    t = 0.0
    for i, seconds in enumerate([0.0, 9.99, 10.0, 10.5, 30.0, 3600.0, 7200.0, 7200.5]):
        feed(metrics, "install-plan", f"m{i}", t)
        feed(metrics, "installed", f"m{i}", t + seconds, ("install", seconds))
        feed(metrics, "registered", f"m{i}", t + 2 * seconds, ("register", seconds))
    feed(metrics, "install-plan", "f", 1.0)
    feed(metrics, "failed", "f", 2.0)
    feed(metrics, "booted", "x", 3.0)
    # Group commits on and around every bucket bound of both.
    for rows, seconds in [(1, 0.0), (2, 0.001), (3, 0.0011), (256, 0.0049), (10_000, 0.5),
                          (100_000, 10.0), (0, 12.5), (7, 0.025)]:
        feed(metrics, "commit", rows, seconds)

    def families(registry: Any) -> list[tuple[Any, ...]]:
        out = []
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            if family.name.startswith(("netboot_http_", "netboot_tftp_requests",
                                       "netboot_tftp_errors")):
                continue
            out.append((family.name, family.documentation, family.type, sorted(
                (s.name, tuple(sorted(s.labels.items())),
                 "created" if s.name.endswith("_created") else s.value)
                for s in family.samples)))
        return out

    expected = families(reference)
    assert len(expected) == 22  # 13 families; the 5 counters' and 4 histograms' _created
    assert families(metrics.registry) == expected


def test_http_requests_are_exposed_as_prometheus_clients_counter_and_histogram() -> None:
    """The HTTP counts are kept as plain numbers and exposed at scrape: the same samples a
    prometheus_client Counter and Histogram fed the same requests expose (every value on
    and around a bucket bound)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reference = CollectorRegistry()
    counter = Counter("netboot_http_requests", "", ["route", "method", "status"],
                      registry=reference)
    histogram = Histogram("netboot_http_request_duration_seconds", "", ["route"],
                          registry=reference)
    metrics = Metrics()
    durations = [0.0, 1e-9, 0.005, 0.0050001, 0.1, 0.75, 1.0, 9.99, 10.0, 10.5, 3600.0]
    for i, seconds in enumerate(durations * 3):
        route, status = ("/ipxe", 200) if i % 3 else ("/assets/{path}", 404 + i % 2)
        metrics.http_request(route, "GET", status, seconds)
        counter.labels(route, "GET", str(status)).inc()
        histogram.labels(route).observe(seconds)
    from prometheus_client.exposition import generate_latest

    def http(text: str) -> dict[Any, float]:
        return {k: v for k, v in samples(text).items()
                if k[0].startswith("netboot_http_request") and not k[0].endswith("_created")}

    expected = http(generate_latest(reference).decode())
    assert len(expected) == 3 + 2 * (15 + 2)  # 3 counters, 2 routes' buckets, sum, count
    assert http(_text(metrics)) == expected
    assert value(samples(_text(metrics)), "netboot_errors_total", kind="http_5xx") == 0
    metrics.http_request("/ipxe", "GET", 503, 0.2)
    assert value(samples(_text(metrics)), "netboot_errors_total", kind="http_5xx") == 1


async def test_dhcp_requests_left_unanswered_are_counted_by_why(make_env: EnvFactory) -> None:
    """netboot_dhcp_outcomes_total: what the DHCP summary line counts, replies and silences
    alike: an operator sees a storm's unknown devices ignored (discovery policy ignore)
    without reading the log (s36-ops)."""
    env = await make_env()
    await env.seed()
    dhcp = DhcpServer(DhcpSettings(), env.service.boot, MemoryLeaseStore(), interfaces=None,
                      advertise=LOOPBACK, host=LOOPBACK, port=0, pxe_port=0,
                      broadcast_address=LOOPBACK, observer=env.service.metrics,
                      summary_seconds=0.0)
    env.service.metrics.read_dhcp_outcomes(dhcp.summary.totals)
    await dhcp.start()
    try:
        # Unknown to the inventory: ignored (twice: a line logged between, counted on).
        for _ in range(2):
            assert await dhcp.handle(payload("uefi-edk2pxe", 8), ("0.0.0.0", 68),
                                     server_ip=LOOPBACK, pxe_port=False) == []
        await env.post("/api/v1/machines", {"mac": PCAP_MAC}, status=201)
        assert await dhcp.handle(payload("uefi-edk2pxe", 8), ("0.0.0.0", 68),
                                 server_ip=LOOPBACK, pxe_port=False)
    finally:
        await dhcp.close()
    m = await scrape(env)
    assert value(m, "netboot_dhcp_outcomes_total", outcome="silent (no boot)") == 2
    assert value(m, "netboot_dhcp_outcomes_total", outcome="proxy OFFER") == 1
    assert ("netboot_inventory_backlog", ()) in m


async def test_the_writers_group_commits_are_counted_with_their_size_and_time(
        make_env: EnvFactory) -> None:
    """netboot_inventory_commit_seconds and _rows: each group commit of the recorder
    (boot events, learnt facts, a first install's state) once committed, its machines and
    events, its time from the write's start (s37-ops)."""
    env = await make_env()
    await env.seed()
    await env.service.boot.drain()
    before = await scrape(env)

    def grew(m: dict[Any, float], name: str, **labels: str) -> float:
        return value(m, name, **labels) - value(before, name, **labels)

    recorder = env.service.boot._recorder
    for i in range(3):
        recorder.record(Event("m-nobody", float(i), "held", f"note {i}"))
    await recorder.flush()
    m = await scrape(env)
    assert grew(m, "netboot_inventory_commit_rows_count") == 1
    assert grew(m, "netboot_inventory_commit_rows_sum") == 3
    assert grew(m, "netboot_inventory_commit_rows_bucket", le="2.0") == 0
    assert grew(m, "netboot_inventory_commit_rows_bucket", le="5.0") == 1
    assert grew(m, "netboot_inventory_commit_seconds_count") == 1
    assert 0 < grew(m, "netboot_inventory_commit_seconds_sum") < 10
    assert grew(m, "netboot_inventory_commit_seconds_bucket", le="+Inf") == 1
