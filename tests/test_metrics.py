"""``GET /metrics`` after a simulated boot: the DHCP server answers captured firmware packets,
the device fetches its script over HTTP, installs and registers; the scrape is parsed with
prometheus_client's own parser and checked value by value."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from netboot.metrics import Metrics
from netboot.model import Event
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from tests.conftest import Env, EnvFactory, boot, call, install_token
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


def test_tracked_installs_are_bounded() -> None:
    metrics = Metrics(max_tracked=10)
    for i in range(100):
        metrics.event(Event(f"m{i}", float(i), "install-plan"))
    assert len(metrics._started) == 10


def _text(metrics: Metrics) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(metrics.registry).decode()


def test_what_is_observed_before_the_collectors_are_made_is_counted() -> None:
    """``netboot serve`` answers before it imports prometheus_client (Metrics(deferred=True)):
    the requests, replies and events of that time are counted once it opens them."""
    metrics = Metrics(deferred=True)
    metrics.http_request("/healthz", "GET", 200, 0.001)
    metrics.http_request("/boot.ipxe", "GET", 503, 0.002)
    metrics.dhcp_reply("NAK", "ipxe", "x86_64")
    metrics.tftp_transfer("complete", 1000)
    metrics.plain_http_credential()
    metrics.event(Event("m1", 100.0, "install-plan"))
    metrics.event(Event("m1", 160.0, "installed"))
    metrics.open()
    metrics.open()  # once: nothing counted twice
    metrics.http_request("/healthz", "GET", 200, 0.001)
    scraped = samples(_text(metrics))
    assert value(scraped, "netboot_http_requests_total", route="/healthz", method="GET",
                 status="200") == 2
    assert value(scraped, "netboot_errors_total", kind="http_5xx") == 1
    assert value(scraped, "netboot_errors_total", kind="dhcp_nak") == 1
    assert value(scraped, "netboot_errors_total", kind="http_plaintext_credential") == 1
    assert value(scraped, "netboot_tftp_bytes_total") == 1000
    assert value(scraped, "netboot_install_duration_seconds_count") == 1
    assert value(scraped, "netboot_install_duration_seconds_sum") == 60.0


def test_http_requests_are_exposed_as_prometheus_clients_counter_and_histogram() -> None:
    """The HTTP counts are kept as plain numbers and exposed at scrape: the same samples a
    prometheus_client Counter and Histogram fed the same requests expose (every value on
    and around a bucket bound; counted before open() too)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reference = CollectorRegistry()
    counter = Counter("netboot_http_requests", "", ["route", "method", "status"],
                      registry=reference)
    histogram = Histogram("netboot_http_request_duration_seconds", "", ["route"],
                          registry=reference)
    metrics = Metrics(deferred=True)
    durations = [0.0, 1e-9, 0.005, 0.0050001, 0.1, 0.75, 1.0, 9.99, 10.0, 10.5, 3600.0]
    for i, seconds in enumerate(durations * 3):
        route, status = ("/ipxe", 200) if i % 3 else ("/assets/{path}", 404 + i % 2)
        metrics.http_request(route, "GET", status, seconds)
        counter.labels(route, "GET", str(status)).inc()
        histogram.labels(route).observe(seconds)
        if i == 5:
            metrics.open()
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
