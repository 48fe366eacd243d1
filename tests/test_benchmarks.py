"""The benchmarks are not part of pass/fail, but each one's command line is: the README and
benchmarks/README.md tell a user to run them, and a script whose ``--help`` crashes (a bare
``%`` in an argparse help string did, in ipxe_inproc.py) or that reads ``--help`` as a row
count is found here, not by the user."""

from __future__ import annotations

import collections
import contextlib
import http.server
import importlib
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# Run by the others, not by a user: peers.py is imported, storm_probe_hook.py is the text
# storm_probe.py runs inside `netboot serve`.
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())


def test_every_script_is_found() -> None:
    assert {"storm.py", "http_paths.py", "ipxe_inproc.py", "tftp_throughput.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_answers_help(script: str) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:"), done.stdout


# wrk 4.1's reports of two runs against `netboot serve` (s26-errors), -t2 -c50 -d10s: the
# server stopped (SIGSTOP) 3 s with --timeout 2s; the wall clock stepped +21 s for wrk alone
# (a gettimeofday shim) with --timeout 10s: session 25's round of 50 errors looked so.
STALLED = """\
  187306 requests in 10.02s, 265.09MB read
  Socket errors: connect 0, read 0, write 0, timeout 50
Requests/sec:  18686.44
"""
STEPPED = """\
     99%    4.87ms
  376319 requests in 31.05s, 532.59MB read
  Socket errors: connect 0, read 0, write 0, timeout 50
Requests/sec:  12121.29
"""


def test_http_paths_tells_a_clock_step_from_the_servers_errors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    http_paths = importlib.import_module("http_paths")
    stalled = http_paths.read_wrk(STALLED, 10.05)
    assert (stalled.errors, stalled.clock_step, stalled.requests) == (50, 0.0, 187306)
    assert stalled.rps == 18686.44
    assert "50 timeout: answers later than --timeout" in stalled.detail
    stepped = http_paths.read_wrk(STEPPED, 10.05)
    assert stepped.errors == 0  # the step's timeouts are wrk's clock, not the server
    assert stepped.clock_step == pytest.approx(21.0)
    assert stepped.rps == pytest.approx(376319 / 10.05)  # not wrk's 12,121
    assert stepped.p99_ms == 4.87
    assert stepped.detail.startswith("the wall clock moved +21.0 s during this run")
    stopped = http_paths.read_wrk(STEPPED, 31.1, 10)  # wrk stopped 21 s: both clocks moved
    assert (stopped.errors, stopped.clock_step) == (50, 0.0)
    assert stopped.detail.startswith("this 10 s wrk run took 31.1 s")



def test_http_paths_several_processes_listen_as_the_service_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--processes N`` runs ``netboot serve`` with its listen() swapped for one that sets
    SO_REUSEPORT; since session 46 the service passes ``start_serving``, which the wrapper did
    not take: every ``--processes`` run failed to start ("did not answer within 120 s";
    found by s47-bigfile). The wrapper takes every parameter netboot's own listen() has."""
    import inspect

    from netboot.servers.http import listen

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    http_paths = importlib.import_module("http_paths")
    wrapper: dict[str, object] = {}
    exec(http_paths.REUSE_PORT.split("netboot.service.listen = listen")[0], wrapper)
    ours = inspect.signature(wrapper["listen"]).parameters  # type: ignore[arg-type]
    assert set(inspect.signature(listen).parameters) <= set(ours)

def test_http_paths_first_request_slices_never_ask_a_machine_twice(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Session 32 (s32-ceiling): each round drew machines at random with repeats on servers
    # kept through the rounds, so rounds 2-5 of the first-install rows were mostly repeats.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    http_paths = importlib.import_module("http_paths")
    slices = http_paths.first_request_slices(9, 10_000, 2, "ipxe/0")
    asked = [i for piece in slices for i in piece]
    assert len(asked) == len(set(asked)) == 10_000 - 9  # every machine, none twice
    assert set(asked) == set(range(9, 10_000))
    assert [len(piece) for piece in slices] == [4995, 4996]
    assert asked != sorted(asked)  # shuffled: each thread spread over the whole fleet
    # Every server of a round is asked the same sequence; another round, another.
    assert http_paths.first_request_slices(9, 10_000, 2, "ipxe/0") == slices
    assert http_paths.first_request_slices(9, 10_000, 2, "ipxe/1") != slices
    http_paths.write_order(tmp_path / "order", slices)
    for t, piece in enumerate(slices, 1):
        assert (tmp_path / f"order-{t}").read_text().split() == [str(i) for i in piece]


def _run_the_lua_script(http_paths: types.ModuleType, tmp_path: Path, order: bool
                        ) -> tuple[collections.Counter[str], str]:
    """wrk with http_paths.py's Lua script for 2 s at a loopback server that counts the
    paths it is asked: machines 2-299, each thread's slice used up well within the run."""
    asked: collections.Counter[str] = collections.Counter()

    class Counting(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            asked[self.path] += 1
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def log_message(self, *args: object) -> None:
            pass

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # wrk resets its connections as it exits

    server = Quiet(("127.0.0.1", 0), Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = tmp_path / "random_mac.lua"
    script.write_text(http_paths.RANDOM_MAC_LUA)
    env = {**os.environ, "NB_ENROLLED": "300", "NB_FIRST": "1", "NB_KIND": "ipxe",
           "NB_SEED": "0", "NB_TOKEN_TAIL": "-t", "NB_ORDER": ""}
    if order:
        env["NB_ORDER"] = str(tmp_path / "order")
        http_paths.write_order(tmp_path / "order",
                               http_paths.first_request_slices(2, 300, 2, "ipxe/0"))
    try:
        # 2 s: a loaded machine's Python server answers the 298 requests well within it.
        out = subprocess.run(["wrk", "-t2", "-c4", "-d2s", "-s", str(script),
                              f"http://127.0.0.1:{server.server_address[1]}/"],
                             capture_output=True, text=True, env=env, timeout=60,
                             check=True).stdout
    finally:
        server.shutdown()
        server.server_close()
    return asked, out


def test_http_paths_lua_script_asks_each_machine_once_and_stops_when_out(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    http_paths = importlib.import_module("http_paths")
    asked, out = _run_the_lua_script(http_paths, tmp_path, order=True)
    machines = {path: n for path, n in asked.items() if path.startswith("/ipxe?mac=")}
    assert max(machines.values()) == 1  # no machine asked twice
    # All but the one wrk's check of the request takes (never sent); none outside.
    assert len(machines) == 297
    assert set(asked) - set(machines) <= {"/boot.ipxe"}  # what a stopping thread sends
    drawn = http_paths.read_order_counts(out)
    assert [(d.drawn, d.slice) for d in drawn] == [(149, 149), (149, 149)]
    assert all(d.out_at > 0 for d in drawn)  # both ran out, and said so
    assert sum(d.spare for d in drawn) == asked["/boot.ipxe"]
    # Without an order (the rows meant to repeat): random machines, repeats and all.
    asked, out = _run_the_lua_script(http_paths, tmp_path, order=False)
    assert max(asked.values()) > 1
    assert [d.slice for d in http_paths.read_order_counts(out)] == [0, 0]


def test_storm_reads_the_downloads_bulk_rate_not_the_initrd_stage(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Two targets sending at the same rate, shared fairly: every download ends at 40 s. The
    # one whose devices reached the initrd sooner has the longer initrd stage (p99 30 s
    # against 20 s); the bulk rate, first kernel begun to last initrd ended, is the same.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    storm = importlib.import_module("storm")
    spec = storm.Spec(100, 1.0, 100, 8 << 20, 32 << 20, 0.0, 0.0, 120.0, 7, None)
    early = [(5.0 + k / 100, 10.0 + k / 100, 40.0) for k in range(100)]
    late = [(5.0 + k / 100, 20.0 + k / 100, 40.0) for k in range(100)]
    assert storm.pct([end - begun for _, begun, end in early], .99) > 29
    assert storm.pct([end - begun for _, begun, end in late], .99) <= 20
    rate = 100 * (40 << 20) / 35.0
    assert storm.bulk_rate(early, spec) == pytest.approx(rate)
    assert storm.bulk_rate(late, spec) == pytest.approx(rate)
    line = storm.downloads_line(late, spec)
    assert line.startswith("kernel begun 5.0 / 5.5 / 6.0, initrd begun 20.0 / 20.5 / 21.0, "
                           "ended 40.0 / 40.0 / 40.0; 100 devices' 40 MiB in 35.0 s: ")
    assert line.endswith(f"{rate / (1 << 30):.2f} GiB/s")


SS_SAMPLES = """\
=== 100.000
ESTAB 0      1048576 192.0.2.1:8080  192.0.2.10:40000
\t skmem:(r0,rb131072,t0,tb2097152,f0,w1060000,o0,bl0,d0) bbr wscale:3,10 rto:204 \
bytes_acked:1000000 notsent:786432 pacing_rate 52000000bps
ESTAB 0      0      192.0.2.1:8080  192.0.2.11:40001
\t skmem:(r0,rb131072,t0,tb65536,f0,w0,o0,bl0,d0) bbr bytes_acked:2000000 \
pacing_rate 40000000bps
ESTAB 104    0      192.0.2.1:8080  192.0.2.12:40002
\t skmem:(r936,rb131072,t0,tb65536,f0,w0,o0,bl0,d0) bbr pacing_rate 40000000bps
LISTEN 5      4096   192.0.2.1:8080  0.0.0.0:*
=== 100.500
ESTAB 0      524288 192.0.2.1:8080  192.0.2.10:40000
\t skmem:(r0,rb131072,t0,tb2097152,f0,w530000,o0,bl0,d0) bbr bytes_acked:3097152 \
notsent:262144 pacing_rate 52000000bps
ESTAB 0      0      192.0.2.1:8080  192.0.2.11:40001
\t skmem:(r0,rb131072,t0,tb65536,f0,w0,o0,bl0,d0) bbr bytes_acked:2000000 \
pacing_rate 40000000bps
"""


def test_bigfiles_storm_reads_the_servers_send_queues(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `ss -tinmH` of the server's side twice: one connection moved 2 MiB, one none (a
    # device the server starves shows so: nothing queued, no progress); in the first, a
    # connection whose request the server has not read yet and five it has not accepted
    # (the listener's Recv-Q: uvloop's listener took one a turn of a busy loop, s44-storm).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bigfiles = importlib.import_module("bigfiles_storm")
    samples = tmp_path / "ss.txt"
    samples.write_text(SS_SAMPLES)
    first, second = bigfiles.ss_summary(samples)
    assert " ".join(first.split()) == (
        "0.0s conns 3 sending 1 sendq p50 0K notsent p50 0K max 768K sndbuf p50 64K "
        "progress p10/p50/p90 0/0/0K none 0 pacing p50 40 Mbit/s not accepted 5 "
        "request unread 1")
    assert " ".join(second.split()) == (
        "0.5s conns 2 sending 1 sendq p50 0K notsent p50 0K max 256K sndbuf p50 64K "
        "progress p10/p50/p90 0/0/0K none 1 pacing p50 40 Mbit/s not accepted 0 "
        "request unread 0")


def test_bigfiles_storm_reads_the_kernels_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    # A namespace's /proc/net/snmp and /proc/net/netstat (abridged, the kernel's layout: a
    # row of names, a row of values): the server dropped 3 connections on TCP_USER_TIMEOUT
    # mid-transfer (s45-bulk: 89 in one round of 1,000 devices); a name this kernel does
    # not count reads 0.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bigfiles = importlib.import_module("bigfiles_storm")
    snmp = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm ActiveOpens InSegs OutSegs RetransSegs\n"
            "Tcp: 1 0 907593 23366337 29127\n")
    netstat = ("TcpExt: SyncookiesSent TCPLossProbes TCPAbortOnTimeout TCPWinProbe\n"
               "TcpExt: 0 28160 3 67676\n"
               "IpExt: InNoRoutes OutOctets\nIpExt: 0 123\n")
    assert bigfiles.kernel_counts(snmp, netstat, bigfiles.SERVER_COUNTERS) == {
        "RetransSegs": 29127, "TCPLossProbes": 28160, "TCPWinProbe": 67676,
        "TCPAbortOnTimeout": 3}
    assert bigfiles.kernel_counts(snmp, netstat, ("TCPWantZeroWindowAdv",)) == {
        "TCPWantZeroWindowAdv": 0}

def test_wire_counts_windows_of_a_first_request_row_never_ask_a_machine_twice(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Session 34: wire_counts.py kept its servers through the rounds and each window drew
    # machines at random with repeats, so its later windows of `ipxe` were mostly repeats,
    # not first installs (as http_paths.py's rounds were before s33-harness).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    wire_counts = importlib.import_module("wire_counts")
    http_paths = importlib.import_module("http_paths")
    ipxe = next(r for r in http_paths.ROWS if r.name == "ipxe")
    orders = wire_counts.window_orders(ipxe, 8, 1000, 4, tmp_path / "held")
    asked = [int(i) for order in orders for t in range(1, http_paths.WRK_THREADS + 1)
             for i in Path(f"{order}-{t}").read_text().split()]
    assert len(asked) == len(set(asked)) == 1000 - 8  # every machine once over all windows
    assert set(asked) == set(range(8, 1000))
    repeats = next(r for r in http_paths.ROWS if r.name == "ipxe-1k")
    assert wire_counts.window_orders(repeats, 8, 1000, 4, tmp_path / "r") == [None] * 4


def test_wire_counts_hands_each_window_its_own_slices(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """main() end to end with the servers and wrk left out: what order each window of each
    row on each server walks (read as the window starts: the files go with the run)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    wire_counts = importlib.import_module("wire_counts")
    walked: dict[tuple[str, int], list[tuple[int, ...] | None]] = collections.defaultdict(list)

    def clean(port: int, pid: int, row: types.SimpleNamespace, args: object, script: Path,
              first: int, seed: int, order: Path | None = None) -> dict[str, float]:
        walked[row.name, port].append(None if order is None else tuple(
            int(i) for t in (1, 2) for i in Path(f"{order}-{t}").read_text().split()))
        return {"req/s": 1.0}

    def traced(port: int, pid: int, row: types.SimpleNamespace, args: object, script: Path,
               first: int, seed: int, tmp: Path, order: Path | None = None
               ) -> dict[str, float]:
        return clean(port, pid, row, args, script, first, seed, order)

    @contextlib.contextmanager
    def server(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        server.port += 1  # type: ignore[attr-defined]
        yield server.port, [os.getpid()]  # type: ignore[attr-defined]

    server.port = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(wire_counts, "netboot", server)
    monkeypatch.setattr(wire_counts, "clean_window", clean)
    monkeypatch.setattr(wire_counts, "traced_window", traced)
    monkeypatch.setattr(wire_counts, "wrk", lambda *a, **k: None)  # ipxe-1k's warm-up
    keep = tmp_path / "keep"
    for seed in ("netboot-seed", "netboot-seed-servers"):  # seeds kept: nothing built
        (keep / seed).mkdir(parents=True)
    monkeypatch.setattr(sys, "argv", ["wire_counts.py", "--only", "ipxe,ipxe-1k",
                                      "--rounds", "3", "--enrolled", "2000", "--keep",
                                      str(keep), "--baseline", str(tmp_path)])
    wire_counts.main()
    first = {port: orders for (name, port), orders in walked.items() if name == "ipxe"}
    assert len(first) == 2  # netboot and baseline, each its own server
    for orders in first.values():
        assert len(orders) == 6  # 3 rounds, a clean and a traced window each
        asked = [i for order in orders for i in order or ()]
        assert None not in orders
        assert len(asked) == len(set(asked))  # no machine twice in the server's life
    one, other = first.values()
    assert one == other  # both servers asked the same machines in the same order
    assert all(o is None for (name, _), orders in walked.items() if name == "ipxe-1k"
               for o in orders)  # the rows meant to repeat draw at random


def test_dns_qps_takes_each_pass_median_by_its_own_qps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Session 34: the run of median warm qps gave the cold (first answers) figure too, so
    # the target's ratio was whichever cold pass that run had, not the median.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    dns_qps = importlib.import_module("dns_qps")

    def run(cold_qps: int, warm_qps: int) -> tuple[object, object, float, float]:
        return (dns_qps.Result("t", 100, cold_qps, 0, 1.0),
                dns_qps.Result("t", 100, warm_qps, 0, 1.0), float(cold_qps), float(warm_qps))

    cold, warm, cold_cpu, warm_cpu = dns_qps.medians([run(10, 200), run(30, 100), run(20, 300)])
    assert (cold.qps, warm.qps) == (20, 200)  # each pass's own median
    assert (cold_cpu, warm_cpu) == (20.0, 200.0)  # with that pass's CPU


# Excerpts of the benchmarks' own output (session 34's run of benchmarks/targets.py, load
# 6-11): what targets.py reads into its one line a target.
HTTP_TABLE = """\
path        conns  netboot req/s   p99 ms    MiB/s errors  µs CPU baseline req/s   p99 ms    \
MiB/s errors  µs CPU    nginx req/s   p99 ms    MiB/s errors  µs CPU  netboot ÷ baseline  \
netboot ÷ nginx
boot.ipxe      50         29,046    175.0        -      0      19         28,628     13.5        \
-      0      18         47,805     23.9        -      0      17                0.97x             \
0.64x
32MiBx10       10             39    652.8     1240      0   3,522             37    792.1     \
1184      0   3,068             43    852.0     1375      0   3,466                0.98x        \
     0.91x
boot.ipxe netboot ÷ baseline a round: 0.97, 1.41, 0.92
boot.ipxe netboot ÷ nginx a round: 0.64, 0.72, 0.36
32MiBx10 netboot ÷ baseline a round: 0.98, 1.83, 0.85
32MiBx10 netboot ÷ nginx a round: 0.91, 1.27, 0.81
"""
DHCP_TABLE = """\
target                  offers/s  CPU µs/offer  ÷ dnsmasq  storm answered  p50 ms  p99 ms  \
max ms  µs/device
netboot+enrolled-uvloop     4,056           130      0.46x       1000/1000    0.22   15.46   \
31.32        930
dnsmasq                    8,868            22      1.00x       1000/1000    0.06    0.35    \
0.41         40
baseline+enrolled-uvloop     7,235            97      0.82x       1000/1000    5.68   50.81   \
50.97        780
"""
TFTP_SINGLE = """\
server           window  placed  seconds   MiB/s  CPU ms/MiB  user %  client  failed  dup DATA\
          time ÷ netboot  spread
netboot               8    free     0.08   250.5        1.75       -    1.58       0         0\
                          0.057-0.125
baseline              8    free     0.06   331.5        1.64      33    1.38       0         0\
                   0.76x  0.056-0.124
atftpd                8    free     0.18   108.3        5.24       3    3.91       0         0\
                   2.31x  0.173-0.315
"""
TFTP_LOSS = """\
server           window  seconds   MiB/s  CPU ms/MiB  user %  client  failed  dup DATA\
          time ÷ netboot
netboot               1     1.13     8.8        7.16      57    5.63       0        68
baseline              1     1.11     9.0        7.35      57    5.61       0        77\
                   0.99x
tftpd-hpa             1    16.09     0.6       10.43      50    8.70       2        64\
                  14.23x  (1,000 kB moved)
"""


def test_targets_reads_each_benchmarks_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    targets = importlib.import_module("targets")
    boot, large = (line for line in targets.http_lines(HTTP_TABLE) if line.met is not None)
    assert (boot.figure, boot.peer, boot.met) == ("29,046 req/s, 19 µs", "nginx 47,805, 17 µs",
                                                  True)
    assert boot.ratio.startswith("0.64x (0.36-0.72); B 0.51x")  # B's own: 0.64 ÷ 0.97 ...
    assert large.figure.startswith("1,240 MiB/s") and large.met is False  # 0.91x < 0.95
    first, = targets.dhcp_lines(DHCP_TABLE, [("netboot+enrolled-uvloop", "seen first")])
    assert (first.ratio, first.met) == ("0.46x; B 0.82x", False)
    free, = targets.tftp_faster_lines(TFTP_SINGLE, "atftpd", 8, 1.5, "windowsize 8")
    # The printed ratio (unrounded times), not 0.18 / 0.08; B's own 2.31 ÷ 0.76.
    assert (free.ratio, free.met) == ("2.31x; B 3.04x", True)
    loss = targets.tftp_time_line(TFTP_LOSS, 1, 0.0, "1 % loss", "tftpd-hpa", 0.5)
    assert (loss.figure, loss.peer, loss.met) == ("1.13 s, 0 failed",
                                                  "tftpd-hpa 16.09 s, 2 failed", True)
    assert loss.ratio == "0.07x its time; B 1.11 s"
    alone = targets.tftp_time_line(TFTP_LOSS, 1, 1.0, "under 1 s")
    assert (alone.met, alone.ratio) == (False, "B 1.11 s")
    import_line = ("import of 100000 CSV rows: 3.61 s wall, 3.51 s CPU (27,719 rows/s), peak "
                   "RSS 166 MiB (CSV text included); re-import (no change): 2.23 s wall, 2.21 s "
                   "CPU, peak RSS 205 MiB\n")
    runs = targets.import_runs(import_line * 3)
    assert runs == [(3.61, 3.51, 166.0, 205.0)] * 3
    imported, = targets.import_lines(runs, [])
    assert imported.met is False  # the re-import's peak is over 200 MiB
    missing, = targets.startup_lines("netboot serve exited with 1")
    assert missing.met is None  # a part that printed nothing is said, not met
