"""benchmarks/storm.py's runs: the order of the targets is reversed each run, so that each is
run first as often as after the other (one invocation's order biased its ratio by 10-20 %,
benchmarks/README.md s27-storm), and the reading is the ratio of each target's median."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import storm


def test_the_order_is_reversed_each_run() -> None:
    plan = storm.run_plan(["netboot", "standins"], 4)
    assert plan == [["netboot", "standins"], ["standins", "netboot"],
                    ["netboot", "standins"], ["standins", "netboot"]]
    firsts = [order[0] for order in plan]
    assert firsts.count("netboot") == firsts.count("standins")


def test_one_target_and_one_run_are_run_as_asked() -> None:
    assert storm.run_plan(["standins"], 3) == [["standins"]] * 3
    assert storm.run_plan(["standins", "netboot"], 1) == [["standins", "netboot"]]


def test_the_reading_is_the_ratio_of_medians_with_the_order_of_each_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    def result(target: str, wall: float, cpu: float) -> storm.Result:
        return storm.Result(target, wall=wall, cpu=cpu, failures={"ipxe": {"timeout": 1}}
                            if wall > 40 else {})

    runs = [[result("netboot", 24.0, 6.0), result("standins", 30.0, 3.0)],
            [result("standins", 26.0, 3.5), result("netboot", 27.0, 6.5)],
            [result("netboot", 45.0, 7.0), result("standins", 31.0, 3.2)]]
    by_target = {s.target: s for s in storm.summarize(runs)}
    assert by_target["netboot"].wall == 27.0 and by_target["standins"].wall == 30.0
    assert by_target["netboot"].failed == 1 and by_target["standins"].failed == 0
    assert [(n, place) for n, place, _ in by_target["netboot"].runs] == [(1, 1), (2, 2), (3, 1)]
    storm.report_medians(runs)
    out = capsys.readouterr().out
    assert "1: netboot, standins; 2: standins, netboot; 3: netboot, standins" in out
    assert "netboot ÷ standins, medians: wall 0.90x, server CPU 2.03x" in out
    assert "an odd number of runs" in out
    # what the order still does: netboot first 24 and 45 (median 34.5), after the other 27
    assert "netboot: median wall run first 34.50 s, run after another target 27.00 s" in out


def test_a_run_that_ended_in_an_error_is_left_out_of_the_medians() -> None:
    failed = storm.Result("standins", error="not ready")
    runs = [[storm.Result("netboot", wall=20.0), failed],
            [storm.Result("standins", wall=22.0), storm.Result("netboot", wall=30.0)]]
    by_target = {s.target: s for s in storm.summarize(runs)}
    assert by_target["standins"].walls == [22.0]
    assert by_target["netboot"].wall == 25.0


class _Clock:
    """A fake clock advanced by the fake sleep: settle() without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_storm_begins_once_the_servers_are_idle() -> None:
    """A server still starting (netboot loading its view after its first answer: ~1.5 s of
    CPU) is waited for until two looks in a row show it idle; one that is idle at once
    (dnsmasq and nginx) after two looks (benchmarks/README.md, s28-storm)."""
    clock = _Clock()
    used = iter([0.0, 0.5, 1.0, 1.3, 1.31, 1.32])  # CPU seconds at the start and each look
    waited, idle = storm.settle(lambda: next(used), sleep=clock.sleep, clock=lambda: clock.now)
    assert idle and waited == 2.5  # busy at 3 looks, then quiet at 2 (0.01 s each)
    clock = _Clock()
    waited, idle = storm.settle(lambda: 0.0, sleep=clock.sleep, clock=lambda: clock.now)
    assert idle and waited == 1.0


def test_a_server_never_idle_is_begun_at_the_limit() -> None:
    clock = _Clock()
    busy = iter(float(n) for n in range(1000))  # a core's worth of CPU each look
    waited, idle = storm.settle(lambda: next(busy), sleep=clock.sleep, clock=lambda: clock.now,
                                limit=10.0)
    assert not idle and waited == 10.0


def test_the_stand_ins_log_as_they_ship_unless_quiet(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """netboot logs at info (~14 lines a device); dnsmasq and nginx log a line per answer and
    request too, unless --quiet-standins (the harness before s28-storm)."""
    started: list[list[str]] = []

    def start(name: str, ns: str, argv: list[str], log: Path, env: object = None) -> str:
        started.append(argv)
        return name

    monkeypatch.setattr(storm, "start", start)
    work = storm.Workload(tmp_path / "work", 2, 2, 1024, 1024)
    work.build()
    for quiet in (False, True):
        run = tmp_path / f"run-{quiet}"
        run.mkdir()
        storm.start_standins("ns", run, work, quiet=quiet)
        dnsmasq = started[-2]
        nginx_conf = (run / "nginx" / "nginx.conf").read_text()
        assert ("--quiet-dhcp" in dnsmasq and "--quiet-tftp" in dnsmasq) == quiet
        assert ("access_log off;" in nginx_conf) == quiet
        assert (f"access_log {run / 'nginx' / 'access.log'};" in nginx_conf) == (not quiet)


def test_the_devices_are_shared_by_client_address_among_the_generators() -> None:
    """Each device in exactly one generator process, each client address's devices (its
    connection pool, its TFTP ports) in one, the power-on places kept."""
    spec = storm.Spec(1000, 1.0, 100_000, 1, 1, 0.0, 0.0, 120.0, 7)
    alone = storm.share_of(spec)
    assert [d.k for d in alone] == list(range(1000))
    shares = [storm.share_of(storm.Spec(**{**spec.__dict__, "share": n, "shares": 3}))
              for n in range(3)]
    assert sorted(d.k for share in shares for d in share) == list(range(1000))
    addresses = [{d.ip for d in share} for share in shares]
    assert not (addresses[0] & addresses[1] or addresses[0] & addresses[2]
                or addresses[1] & addresses[2])
    assert {d.k: d for share in shares for d in share} == {d.k: d for d in alone}
    assert all(300 <= len(share) <= 340 for share in shares)


def _part(times: list[float], failed: int, wall: float, cpu: float) -> dict[str, object]:
    return {"wall": wall, "times": {"ipxe": times, "total": times},
            "failures": {"kernel": {"timeout": failed}} if failed else {},
            "generator_cpu": cpu, "generator_cpus": [cpu], "generator_system": cpu / 2,
            "devices": len(times) + failed, "late_offers": 1, "dhcp_send_failed": 0,
            "same_port": 0, "rebound": 0, "loop_lag": [wall / 100], "retried": [],
            "slow_tftp": [], "slow": [], "http_retries": {"reopened": 1, "retry_after": 0},
            "t0_wall": 5.0, "last": [{"k": k, "end": wall - 1 + k / 10, "stages": [],
                                      "events": []} for k in range(storm.LAST_TRACED)]}


def test_the_generators_results_are_merged_exactly() -> None:
    """Percentiles of the union of the processes' latencies (not an average of their
    percentiles), failures and CPU summed, the wall the last process's."""
    fast = _part([0.1] * 98, 2, 20.0, 6.0)
    slow = _part([1.0] * 2, 1, 24.0, 5.0)
    merged = storm.merge([fast, slow])
    assert sorted(merged["times"]["ipxe"]) == [0.1] * 98 + [1.0] * 2
    # p99 of the union is a slow one; the mean of the two p99s (0.1 and 1.0) would be 0.55
    assert storm.pct(merged["times"]["ipxe"], .99) == 1.0
    assert storm.pct(merged["times"]["ipxe"], .5) == 0.1
    assert merged["failures"] == {"kernel": {"timeout": 3}}
    assert merged["wall"] == 24.0
    assert merged["generator_cpu"] == 11.0 and merged["generator_cpus"] == [6.0, 5.0]
    assert merged["devices"] == 103 and merged["late_offers"] == 2
    assert merged["http_retries"] == {"reopened": 2, "retry_after": 0}
    assert sorted(merged["loop_lag"]) == [0.2, 0.24]
    # The devices that ended last, of every process: the storm's tail, traced (s42-tail).
    assert [d["end"] for d in storm.last_devices(merged)] == [23.0, 23.1, 23.2, 23.3, 23.4]
    assert storm.merge([fast]) is fast


# -- the devices' :68 port shared by the generator processes ----------------------------------


def test_each_generators_xids_are_in_its_own_class_and_one_generators_are_the_draws() -> None:
    draws = [0, 1, 2, 7, 2**31, 2**32 - 3, 2**32 - 1]
    assert [storm.xid_of(d, 0, 1) for d in draws] == draws  # one process: as before
    for shares in (2, 3, 5):
        for share in range(shares):
            xids = [storm.xid_of(d, share, shares) for d in draws]
            assert all(x % shares == share and 0 <= x < 2**32 for x in xids)


def _dhcp_reply(xid: int) -> bytes:
    return bytes((2, 1, 6, 0)) + xid.to_bytes(4, "big") + bytes(292)


def test_a_generators_offer_filter_lets_in_only_its_devices_offers() -> None:
    import socket

    shares = 3
    for share in range(shares):
        port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            storm.attach_filter(port, storm.offer_filter(share, shares))
            port.bind(("127.0.0.1", 0))
            port.settimeout(0.5)
            xids = [storm.xid_of(d, s, shares) for d in (5, 99, 2**32 - 1) for s in range(3)]
            for xid in xids:
                sender.sendto(_dhcp_reply(xid), port.getsockname())
            got = []
            with pytest.raises(TimeoutError):
                while True:
                    got.append(int.from_bytes(port.recv(4096)[4:8], "big"))
            assert got == [x for x in xids if x % shares == share]
            # The others' were turned away and counted as the socket's drops (what the
            # devices' UDP drops are then told without).
            assert storm.socket_drops(port) == len(xids) - len(got)
        finally:
            port.close()
            sender.close()


def test_the_offer_tap_sees_the_offers_to_its_devices_with_their_receive_times() -> None:
    import os
    import socket
    import time

    if os.geteuid() != 0:
        pytest.skip("a packet socket needs CAP_NET_RAW")
    tap = storm.OfferTap(1, 2, interface="lo")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        other.bind(("127.0.0.1", 0))
        before = time.time_ns()
        # To :68 (nothing listens there: the tap sees them on the wire all the same), one
        # of another share, and one to another port.
        sender.sendto(_dhcp_reply(7), ("127.0.0.1", 68))
        sender.sendto(_dhcp_reply(8), ("127.0.0.1", 68))
        sender.sendto(_dhcp_reply(9), other.getsockname())
        time.sleep(0.1)
        seen, drops = tap.read()
        assert [xid for xid, _ in seen] == [7] and drops == 0
        assert before <= seen[0][1] <= time.time_ns()
    finally:
        tap.close()
        sender.close()
        other.close()


def test_what_the_wire_says_tells_the_generators_loss_from_the_servers() -> None:
    dhcp = storm.DhcpPort()
    dhcp.sent = {1, 2, 3, 4}
    dhcp.sent_at = {1: 1_000_000, 2: 2_000_000, 3: 3_000_000, 4: 4_000_000}
    dhcp.got = {1: 1, 2: 1}
    dhcp.got_at = {1: 4_000_000, 2: 2_500_000}
    dhcp.resumed_at = {1: 4_100_000, 2: 3_500_000}
    # On the wire: 1 (once), 2 (twice: delivered once), 3 (never delivered); 4 never
    # answered (the server's); 99 another process's.
    seen = [(1, 2_000_000), (2, 2_200_000), (2, 6_000_000), (3, 3_100_000), (99, 1)]
    said = dhcp.against(seen, retried=[3, 4])
    assert said["offers_on_wire"] == 4 and said["offers_delivered"] == 2
    assert said["offers_lost_here"] == 2  # one of 2's, 3's
    assert said["retried_lost_here"] == 1  # 3 lost here; 4 was never answered
    assert sorted(said["offer_to_wire_ms"]) == [0.2, 1.0]
    assert sorted(said["offer_wire_to_read_ms"]) == [0.3, 2.0]
    assert sorted(said["offer_read_to_device_ms"]) == [0.1, 1.0]


def test_the_generators_wire_counts_are_summed() -> None:
    a = {**_part([0.1], 0, 1.0, 1.0), "offers_on_wire": 10, "offers_delivered": 9,
         "offers_lost_here": 1, "retried_lost_here": 1, "offer_tap_drops": 0,
         "dhcp_socket_drops": 11, "offer_to_wire_ms": [0.5], "offer_wire_to_read_ms": [3.0],
         "offer_read_to_device_ms": [1.0]}
    b = {**a, "offers_lost_here": 0, "retried_lost_here": 0, "offer_to_wire_ms": [0.7]}
    merged = storm.merge([a, b])
    assert merged["offers_on_wire"] == 20 and merged["offers_lost_here"] == 1
    assert merged["dhcp_socket_drops"] == 22
    assert sorted(merged["offer_to_wire_ms"]) == [0.5, 0.7]


def test_run_and_wait_reads_the_schedulers_times_of_a_process_and_its_children() -> None:
    import os
    import subprocess
    import sys

    # The child runs 0.2 s on a CPU (however loaded the machine), says so, then sleeps.
    child = subprocess.Popen([sys.executable, "-c", "import time\n"
                              "while time.process_time() < 0.2: pass\n"
                              "print('ran', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ran\n"
        ran, waited = storm.run_and_wait([os.getpid()])
        alone, _ = storm.run_and_wait([child.pid])
        assert 0.2 <= alone <= ran  # this process's threads and its child's
        assert waited >= 0.0
    finally:
        child.kill()
        child.wait()


async def test_an_offer_wakes_its_device_in_the_loops_next_round() -> None:
    # wait_for(shield(future)) took three rounds of the generator's loop, each behind the
    # storm's ready callbacks; a future a try under asyncio.timeout takes one.
    import asyncio

    class Sent:
        def sendto(self, data: bytes, address: tuple[str, int]) -> None:
            self.data = data

    gen = storm.Generator(storm.Spec(1000, 1.0, 100_000, 1, 1, 0.0, 0.0, 120.0, 7))
    gen.dhcp = storm.DhcpPort()
    gen.dhcp_transport = Sent()  # type: ignore[assignment]
    gen.in_dhcp = 2
    device = asyncio.ensure_future(gen.dhcp_offer(storm.Device(0, 0, "192.0.2.10"), 0x1234))
    await asyncio.sleep(0)  # the DISCOVER sent, its device waiting
    gen.dhcp.datagram_received(_dhcp_reply(0x1234), ("192.0.2.1", 67))
    rounds = 0
    while not device.done():
        await asyncio.sleep(0)
        rounds += 1
    assert device.result()[4:8] == (0x1234).to_bytes(4, "big")
    assert rounds == 1
    assert 0x1234 in gen.dhcp.resumed_at and gen.retried == []


def test_with_sync_inventory_each_runs_copy_is_written_to_disk_before_its_server_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The copy of a 100,000-machine inventory (~92 MB) was otherwise written back during the
    # storm (s36-storm); without the option the copy is left as before.
    seed = tmp_path / "netboot-seed"
    (seed / "tls").mkdir(parents=True)
    for name in ("netboot.db", "secret.key", "tls/ca.pem"):
        (seed / name).write_bytes(b"x" * 10)
    synced: list[str] = []
    fsync = storm.os.fsync
    monkeypatch.setattr(storm.os, "fsync",
                        lambda fd: (synced.append(Path(f"/proc/self/fd/{fd}").resolve().name),
                                    fsync(fd))[1])
    for sync, run in ((False, "plain"), (True, "synced")):
        work = storm.Workload(tmp_path, 1, 1, 1, 1, sync_copy=sync)
        (tmp_path / run).mkdir()
        work.netboot_config(tmp_path / run, "info")
        assert (tmp_path / run / "data" / "tls" / "ca.pem").read_bytes() == b"x" * 10
        assert sorted(synced) == (["ca.pem", "netboot.db", "secret.key"] if sync else [])


def test_what_reached_the_disks_is_counted_from_the_disks_sectors(tmp_path: Path) -> None:
    # nr_written counts a large folio whole when one 4 KiB block of it was written back (82
    # MiB for 11 MiB written, s38-storm); the disks' own counters say what was written. A
    # loop or device-mapper device (no `device` link) is not counted: what it writes reaches
    # a disk that is.
    def block(name: str, sectors_written: int, disk: bool) -> None:
        (tmp_path / name).mkdir()
        if disk:
            (tmp_path / name / "device").mkdir()
        (tmp_path / name / "stat").write_text(
            f"    1234        0    56789      100 {7:8d}        0 {sectors_written:8d}      40"
            "        0      120      140        0        0        0        0\n")

    block("vda", 22_528, True)   # 11 MiB
    block("vdb", 2_048, True)    # 1 MiB
    block("loop0", 999_999, False)
    block("dm-0", 999_999, False)
    assert storm.disk_written_kib(tmp_path) == 12 * 1024


SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 {ip_in}
Tcp: RtoAlgorithm RtoMin InSegs OutSegs RetransSegs InErrs
Tcp: 1 200 {tcp_in} {tcp_out} {resent} 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors
Udp: {udp_in} 0 0 {udp_out} 0
"""
NETSTAT = """TcpExt: SyncookiesSent ListenDrops
TcpExt: 0 0
IpExt: InNoRoutes InOctets OutOctets
IpExt: 0 {octets_in} {octets_out}
"""


def test_the_servers_side_of_the_wire_is_counted_from_its_namespaces_kernel() -> None:
    # Two snapshots of a server namespace's counters, as `cat /proc/net/snmp` and
    # `/proc/net/netstat` print them there (a header row, then the values): the line says
    # what the storm sent between them, TCP segments by their size (the same bytes in more
    # segments cost the devices' kernel more) and datagrams each way (windowed TFTP).
    before = storm.wire_counts(
        SNMP.format(ip_in=5, tcp_in=10, tcp_out=20, resent=1, udp_in=3, udp_out=4),
        NETSTAT.format(octets_in=100, octets_out=1000))
    after = storm.wire_counts(
        SNMP.format(ip_in=9, tcp_in=1_010, tcp_out=1_044, resent=3, udp_in=303, udp_out=104),
        NETSTAT.format(octets_in=5_100, octets_out=1000 + 64 * 1024 * 1024))
    assert before == {"tcp_out": 20, "tcp_in": 10, "tcp_resent": 1, "udp_out": 4,
                      "udp_in": 3, "bytes_out": 1000, "bytes_in": 100}
    assert storm.wire_line("netboot", before, after) == (
        "netboot: the server's side of the wire: 1024 TCP segments out (64.0 KiB each, 64 MiB "
        "with the UDP), 2 sent again, 1000 in; UDP datagrams 100 out, 300 in")


def test_each_stages_share_is_of_the_devices_time_summed() -> None:
    # Two devices: 1 + 3 s of initrd in 2 + 6 s of total, 0.5 + 1 s of kernel: the initrd is
    # half the devices' time, the kernel three sixteenths, a stage no device reached none.
    times = {"kernel": [0.5, 1.0], "initrd": [1.0, 3.0], "total": [2.0, 6.0]}
    assert storm.stage_shares(times) == {"kernel": 1.5 / 8, "initrd": 0.5}
    assert storm.stage_shares({}) == {}


def test_the_walls_tail_is_what_comes_after_the_last_download() -> None:
    # Downloads end together (the link is shared fairly): what follows the last one (the
    # last devices' config and POSTs) adds to the wall whole. 0 without downloads.
    downloads = [(1.0, 3.0, 20.5), (1.5, 3.5, 21.0), (0.5, 2.0, 19.0)]
    assert storm.tail_after_downloads(22.25, downloads) == 1.25
    assert storm.tail_after_downloads(22.25, []) == 0.0
