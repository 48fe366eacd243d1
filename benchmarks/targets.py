"""Issue 10's targets that README.md's table cites from old sessions, measured again in one run.

    python benchmarks/targets.py [--base B] [--out DIR] [--only http,dhcp,...] [--no-base-slow]

Measures this checkout's netboot (T: the tree this script is in) beside the peer each target
names (nginx, dnsmasq, atftpd, tftpd-hpa), in the same run, and beside another checkout B
(``--base``, e.g. the session's base) where the benchmark can run two trees in its turns. One
part a benchmark, each already written and documented in benchmarks/README.md; this script
only runs them with the fewest repeats that give a ratio worth printing, keeps their whole
output in ``--out`` (default: ``$OUT``, else a new temporary directory), and prints one line a
target: the figure, the peer's, the ratio, the target and whether it is met.

Parts (each prints its duration and the load average before and after it):

  http     http_paths.py, /boot.ipxe, a 300 B asset, 1 MiB x 50 and 32 MiB x 10 connections,
           3 rounds of 4 s, 100,000 machines enrolled: netboot ÷ nginx, median of the rounds'
  dhcp     dhcp_offers.py --uvloop (as ``netboot serve`` runs): through the store (unknown
           machines) and enrolled machines, 1,000 MACs cycled (the S15 row's set-up), 3 runs
  dhcp1st  the same with 20,000 enrolled MACs, each DISCOVERed once: every offer is an
           enrolled machine seen for the first time (the row's "seen first", which the
           1,000-MAC run is only for its first 5 %)
  dns      dns_qps.py --uvloop, 3 runs: first answers (cold) and repeats (warm) ÷ dnsmasq
  startup  startup.py, 5 runs a tree alternating: process start to the first /healthz 200
  import   import_csv.py, 100,000 rows, 3 runs a tree alternating: wall and peak RSS
  tftp8    tftp_throughput.py single --windows 8, placements free, split, shared, 3 rounds:
           atftpd's time ÷ netboot's
  loss8    tftp_throughput.py loss --windows 8 (10 x 1 MiB, 1 % loss each way), 3 rounds
  loss1    the same at windowsize 1 beside tftpd-hpa, 1 round (tftpd-hpa takes ~20 s)
  loss10   tftp_throughput.py loss --clients 1 --size 10 MiB --loss 0.1 --windows 1, netboot
           alone, 1 round (the target is absolute; B beside only without --no-base-slow)

The benchmarks make their own network namespaces (dhcp) and servers, and stop them by their
PID; after each part this script says which namespaces appeared and were left, and which
processes of the part's session outlived it (then ends them, by PID: they are its own). It
runs every part from ``--out`` (no stray .py files: ``-m`` puts the working directory first
on sys.path). Not part of pytest; needs root for the dhcp parts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IN_TFTPD = "/opt/tftpd-hpa/usr/sbin/in.tftpd"
DURATIONS = "durations.txt"
PARTS = ("http", "dhcp", "dhcp1st", "dns", "startup", "import", "tftp8", "loss8", "loss1",
         "loss10")


@dataclass
class Line:
    """One target's summary: what was measured, against what, and the verdict."""
    target: str
    figure: str
    peer: str
    ratio: str
    met: bool | None  # None: not measured (the part failed or its row is missing)

    def __str__(self) -> str:
        verdict = {True: "met", False: "MISSED", None: "NOT MEASURED"}[self.met]
        return (f"{self.target:<62} {self.figure:<44} {self.peer:<32} {self.ratio:<26} "
                f"{verdict}")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30,
                         check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def session_pids(sid: int) -> list[int]:
    """Processes still in session ``sid`` (the part's: it was started as its leader)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[3]) == sid:
                pids.append(int(entry))
    return pids


def run_part(name: str, argv: list[str], out: Path, timeout: float,
             env: dict[str, str] | None = None) -> str:
    """Run one benchmark from ``out``, its stdout and stderr into ``out/<name>.txt``; returns
    the text. Bounded by ``timeout``; says its duration, the load, and what it left. With
    ``--summary``: the text a former run left there, nothing run."""
    log = out / f"{name}.txt"
    if os.environ.get("NETBOOT_TARGETS_READ_ONLY"):
        return log.read_text(errors="replace") if log.exists() else ""
    before_ns, t0, load0 = namespaces(), time.monotonic(), load()
    print(f"[{name}] {' '.join(argv)}", flush=True)
    print(f"[{name}] load before {load0}", flush=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=out,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the benchmarks unwind on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = f"timed out after {timeout:.0f} s"
    left = session_pids(proc.pid)
    for pid in left:  # started by this part, outliving it: ours to end, by PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    new_ns = namespaces() - before_ns
    took = f"{time.monotonic() - t0:.0f} s, exit {code}, load {load0} before, {load()} after"
    print(f"[{name}] {took}; namespaces left: {', '.join(sorted(new_ns)) or 'none'}; "
          f"processes left: {', '.join(map(str, left)) or 'none'}", flush=True)
    with (out / DURATIONS).open("a") as fh:  # the run's summary lists them
        fh.write(f"{name:<12} {took}\n")
    return log.read_text(errors="replace")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def num(text: str) -> float:
    return float(text.replace(",", ""))


# ---- http_paths.py


def http_table(text: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """The final table: row -> server -> (req/s, MiB/s or nan, µs CPU a request)."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("path ") and "conns" in line]
    if not heads:
        return {}
    head = lines[heads[-1]].split()
    servers = [head[i - 1] for i, word in enumerate(head) if word == "req/s"]
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for line in lines[heads[-1] + 1:]:
        words = line.split()
        if len(words) < 2 + 5 * len(servers) or not words[1].isdigit():
            break
        table[words[0]] = {}
        for k, server in enumerate(servers):
            rps, _p99, mib, _errors, cpu = words[2 + 5 * k:7 + 5 * k]
            table[words[0]][server] = (num(rps), num(mib) if mib != "-" else float("nan"),
                                       num(cpu))
    return table


def http_rounds(text: str, row: str, peer: str) -> list[float]:
    found = re.search(rf"^{re.escape(row)} netboot ÷ {peer} a round: (.*)$", text, re.M)
    return [float(x) for x in found.group(1).split(", ")] if found else []


def http_lines(text: str) -> list[Line]:
    table = http_table(text)
    out = []
    for row, what, line in (("boot.ipxe", "small files: /boot.ipxe", 0.5),
                            ("asset300", "small files: a 300 B asset", 0.5),
                            ("1MiBx50", "large files: 1 MiB x 50 connections", 0.95),
                            ("32MiBx10", "large files: 32 MiB x 10 connections", 0.95)):
        target = f"{what} ≥ {line:g}x nginx"
        got = table.get(row, {})
        rounds = http_rounds(text, row, "nginx")
        if "netboot" not in got or "nginx" not in got or not rounds:
            out.append(Line(target, "-", "-", "-", None))
            continue
        unit, k = ("MiB/s", 1) if row == "32MiBx10" else ("req/s", 0)
        ratio = median(rounds)
        # B's own ratio a round: (T ÷ nginx) ÷ (T ÷ B), the same round's runs.
        base = [r / b for r, b in zip(rounds, http_rounds(text, row, "baseline"), strict=False)]
        # The CPU a request beside the rate: on a loaded machine the rate follows the
        # scheduler, the CPU much less.
        out.append(Line(target, f"{got['netboot'][k]:,.0f} {unit}, {got['netboot'][2]:,.0f} µs",
                        f"nginx {got['nginx'][k]:,.0f}, {got['nginx'][2]:,.0f} µs",
                        f"{ratio:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
                        + (f"; B {median(base):.2f}x" if base else ""),
                        ratio >= line))
    return out


# ---- dhcp_offers.py


def dhcp_table(text: str) -> dict[str, tuple[float, float]]:
    """The median table: target -> (offers/s, CPU µs an offer)."""
    return {m.group(1): (num(m.group(2)), num(m.group(3))) for m in re.finditer(
        r"^(\S+)\s+([\d,]+)\s+(\d+)\s+\S+\s+\d+/\d+", text, re.M)}


def dhcp_lines(text: str, rows: list[tuple[str, str]]) -> list[Line]:
    table = dhcp_table(text)
    out = []
    for name, what in rows:
        target = f"proxyDHCP {what} ≥ 0.5x dnsmasq"
        if name not in table or "dnsmasq" not in table:
            out.append(Line(target, "-", "-", "-", None))
            continue
        (rate, cpu), (peer, peer_cpu) = table[name], table["dnsmasq"]
        base = table.get(name.replace("netboot", "baseline"))
        out.append(Line(target, f"{rate:,.0f} offers/s, {cpu:.0f} µs",
                        f"dnsmasq {peer:,.0f}, {peer_cpu:.0f} µs",
                        f"{rate / peer:.2f}x" + (f"; B {base[0] / peer:.2f}x" if base else ""),
                        rate / peer >= 0.5))
    return out


# ---- dns_qps.py


def dns_lines(text: str) -> list[Line]:
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^(\S+)\s+([\d,]+)\s+([\d,]+)\s+\d+\s+([\d.]+)\s+([\d.]+)\s+(\S+)x\s+(\S+)x$",
        text, re.M)}
    out = []
    for pass_, k, cpu in (("first answers (cold)", 0, 2), ("repeats (warm)", 1, 3)):
        target = f"DNS {pass_} ≥ 0.8x dnsmasq"
        if "netboot-uvloop" not in rows or "dnsmasq" not in rows:
            out.append(Line(target, "-", "-", "-", None))
            continue
        ours, peer = rows["netboot-uvloop"], rows["dnsmasq"]
        ratio = num(ours[k]) / num(peer[k])
        out.append(Line(target, f"{num(ours[k]):,.0f} qps, {ours[cpu]} µs",
                        f"dnsmasq {num(peer[k]):,.0f}, {peer[cpu]} µs", f"{ratio:.2f}x",
                        ratio >= 0.8))
    return out


# ---- startup.py


def startup_lines(text: str) -> list[Line]:
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4)) for m in re.finditer(
        r"^(this|other)\s+([\d.]+)\s+([\d.]+)\s+(\S+)", text, re.M)}
    target = "`netboot serve` ready < 0.5 s"
    if "this" not in rows:
        return [Line(target, "-", "-", "-", None)]
    wall, cpu, spread = rows["this"]
    other = rows.get("other")
    return [Line(target, f"{wall:.3f} s ({spread}), CPU {cpu:.2f} s", "-",
                 f"B {other[0]:.3f} s ({other[2]}), CPU {other[1]:.2f} s" if other else "-",
                 wall < 0.5)]


# ---- import_csv.py

IMPORT = re.compile(r"import of (\d+) CSV rows: ([\d.]+) s wall, ([\d.]+) s CPU .*?peak RSS "
                    r"(\d+) MiB.*?re-import \(no change\): ([\d.]+) s wall, [\d.]+ s CPU, "
                    r"peak RSS (\d+) MiB")


def import_runs(text: str) -> list[tuple[float, float, float, float]]:
    """(wall, CPU, peak MiB, the re-import's peak MiB) of each run."""
    return [(float(m.group(2)), float(m.group(3)), float(m.group(4)), float(m.group(6)))
            for m in IMPORT.finditer(text)]


def import_lines(ours: list[tuple[float, float, float, float]],
                 base: list[tuple[float, float, float, float]]) -> list[Line]:
    if not ours:
        return [Line("bulk import of 100,000 rows < 5 s, < 200 MiB", "-", "-", "-", None)]
    wall, cpu = median([r[0] for r in ours]), median([r[1] for r in ours])
    # Both imports are of 100,000 rows: the re-import, which holds the inventory it
    # compares with, peaks higher (session 9), and is held to the line too.
    peak = max(max(r[2], r[3]) for r in ours)
    b = f"B {median([r[0] for r in base]):.2f} s, {max(max(r[2], r[3]) for r in base):.0f} MiB" \
        if base else "-"
    return [Line("bulk import of 100,000 rows < 5 s, < 200 MiB",
                 f"{wall:.2f} s ({min(r[0] for r in ours):.2f}-{max(r[0] for r in ours):.2f}), "
                 f"CPU {cpu:.2f} s, peak {max(r[2] for r in ours):.0f} MiB "
                 f"(re-import {max(r[3] for r in ours):.0f})", "-", b,
                 wall < 5 and peak < 200)]


# ---- tftp_throughput.py


def tftp_table(text: str) -> dict[tuple[str, int, str], tuple[float, int, str, float]]:
    """(server, window, placement) -> (seconds, failures, kB moved if it failed, its time ÷
    netboot's as printed: from the unrounded times, where a windowed transfer's 0.06 s
    printed with two decimals is ±8 %; nan on netboot's own line)."""
    rows = {}
    placed = bool(re.search(r"^server\s+window\s+placed", text, re.M))
    for line in text.splitlines():
        words = line.split()
        if len(words) < 9 or not words[1].isdigit() or words[0] in ("check", "server"):
            continue
        at = 3 if placed else 2
        placement = words[2] if placed else "free"
        try:
            seconds, failures = float(words[at]), int(words[at + 5])
        except ValueError:
            continue
        moved = re.search(r"\(([\d,]+) kB moved\)", line)
        ratios = [float(w[:-1]) for w in words[at + 7:] if re.fullmatch(r"[\d.]+x", w)]
        rows[words[0], int(words[1]), placement] = (seconds, failures,
                                                    moved.group(1) if moved else "",
                                                    ratios[0] if ratios else float("nan"))
    return rows


def tftp_faster_lines(text: str, peer: str, window: int, line: float, what: str
                      ) -> list[Line]:
    """``peer``'s time ÷ netboot's ≥ ``line``, per placement measured."""
    table = tftp_table(text)
    out = []
    for placement in ("free", "split", "shared"):
        ours, theirs = table.get(("netboot", window, placement)), table.get(
            (peer, window, placement))
        if ours is None and placement != "free":
            continue
        target = f"{what} ≥ {line:g}x {peer} ({placement})"
        if ours is None or theirs is None:
            out.append(Line(target, "-", "-", "-", None))
            continue
        base = table.get(("baseline", window, placement))
        ratio = theirs[3]  # the peer's time ÷ netboot's; B's own: ÷ (B's ÷ netboot's)
        out.append(Line(target, f"{ours[0]:.2f} s, {ours[1]} failed",
                        f"{peer} {theirs[0]:.2f} s, {theirs[1]} failed",
                        f"{ratio:.2f}x" + (f"; B {ratio / base[3]:.2f}x" if base else ""),
                        ratio >= line and ours[1] == 0))
    return out


def tftp_time_line(text: str, window: int, limit: float, what: str, peer: str = "",
                   share: float = 0.0) -> Line:
    """netboot's time within ``limit`` seconds, or with ``share`` within that share of
    ``peer``'s (else ``peer`` is only shown), and 0 failures."""
    table = tftp_table(text)
    ours = table.get(("netboot", window, "free"))
    theirs = table.get((peer, window, "free")) if peer else None
    base = table.get(("baseline", window, "free"))
    if ours is None or (peer and theirs is None):
        return Line(what, "-", "-", "-", None)
    figure = f"{ours[0]:.2f} s, {ours[1]} failed" + (f" ({ours[2]} kB moved)" if ours[1] else "")
    b = f"B {base[0]:.2f} s" if base else ""
    if theirs is not None and share:
        ratio = 1 / theirs[3]
        return Line(what, figure, f"{peer} {theirs[0]:.2f} s, {theirs[1]} failed",
                    f"{ratio:.2f}x its time" + (f"; {b}" if b else ""),
                    ratio <= share and ours[1] == 0)
    told = f"{peer} {theirs[0]:.2f} s, {theirs[1]} failed" if theirs is not None else "-"
    return Line(what, figure, told, b or "-", ours[0] < limit and ours[1] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, metavar="B",
                        help="another checkout measured beside this one where a part can")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                        help="raw outputs (default: $OUT, else a new temporary directory)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts: " + ",".join(PARTS))
    parser.add_argument("--no-base-slow", action="store_true",
                        help="leave B out of loss10 (its ~20-50 s a tree)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--summary", action="store_true",
                        help="run nothing: the summary of the outputs a run left in --out")
    args = parser.parse_args()
    if args.summary:
        if args.out is None:
            parser.error("--summary reads --out (or $OUT)")
        os.environ["NETBOOT_TARGETS_READ_ONLY"] = "1"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parts = args.only.split(",")
    for part in parts:
        if part not in PARTS:
            parser.error(f"--only: {part!r} is none of {', '.join(PARTS)}")
    out = (args.out or Path(tempfile.mkdtemp(prefix="netboot-targets-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stray = sorted(p.name for p in out.glob("*.py"))
    if stray:
        sys.exit(f"{out} holds .py files ({', '.join(stray)}): `-m` would import them")
    py, b = args.python, args.base.resolve() if args.base else None
    base = ["--baseline", str(b)] if b else []
    env = {"PYTHONPATH": str(REPO)}

    def bench(script: str, *more: str) -> list[str]:
        return [py, str(HERE / script), *more]

    print(f"targets: T {REPO}, B {b or '-'}, raw outputs in {out}; load {load()}", flush=True)
    if not args.summary:
        (out / DURATIONS).write_text("")
    t0 = time.monotonic()
    lines: list[Line] = []
    runs: dict[str, Callable[[], list[Line]]] = {
        "http": lambda: http_lines(run_part("http", bench(
            "http_paths.py", "--only", "boot.ipxe,asset300,1MiBx50,32MiBx10", "--rounds", "3",
            "--duration", "4", *base), out, 420, env)),
        "dhcp": lambda: dhcp_lines(run_part("dhcp", bench(
            "dhcp_offers.py", "--uvloop", "--repeat", "3", "--only", ",".join(
                ["netboot+store-uvloop", "netboot+enrolled-uvloop", "dnsmasq"]
                + (["baseline+store-uvloop", "baseline+enrolled-uvloop"] if b else [])),
            *base), out, 300, env),
            [("netboot+store-uvloop", "through the store (unknown machines)"),
             ("netboot+enrolled-uvloop", "enrolled machines, 1,000 MACs cycled")]),
        "dhcp1st": lambda: dhcp_lines(run_part("dhcp1st", bench(
            "dhcp_offers.py", "--uvloop", "--repeat", "3", "--macs", "20000", "--only",
            ",".join(["netboot+enrolled-uvloop", "dnsmasq"]
                     + (["baseline+enrolled-uvloop"] if b else [])), *base), out, 300, env),
            [("netboot+enrolled-uvloop", "enrolled machines, each seen first")]),
        "dns": lambda: dns_lines(run_part("dns", bench(
            "dns_qps.py", "--uvloop", "--repeat", "3"), out, 300, env)),
        "startup": lambda: startup_lines(run_part("startup", bench(
            "startup.py", "--runs", "5", *(["--compare", str(b)] if b else [])),
            out, 300, env)),
        "import": lambda: import_part(py, out, b),
        "tftp8": lambda: tftp_faster_lines(run_part("tftp8", bench(
            "tftp_throughput.py", "single", "--windows", "8", "--only", "netboot,atftpd",
            "--repeat", "3", *base), out, 300, env), "atftpd", 8, 1.5, "TFTP windowsize 8"),
        "loss8": lambda: [tftp_time_line(run_part("loss8", bench(
            "tftp_throughput.py", "loss", "--windows", "8", "--only", "netboot,atftpd",
            "--repeat", "3", "--cap", "60", *base), out, 300, env), 8, 4.0,
            "1 % loss, windowsize 8 (10 x 1 MiB) ≤ 4 s, 0 failed", "atftpd")],
        "loss1": lambda: [tftp_time_line(run_part("loss1", bench(
            "tftp_throughput.py", "loss", "--windows", "1", "--only", "netboot,tftpd-hpa",
            "--in-tftpd", IN_TFTPD, "--repeat", "1", "--cap", "60", *base), out, 200, env),
            1, 0.0, "10 x 1 MiB at 1 % loss ≤ 0.5x tftpd-hpa", "tftpd-hpa", 0.5)],
        "loss10": lambda: [tftp_time_line(run_part("loss10", bench(
            "tftp_throughput.py", "loss", "--clients", "1", "--size", "10485760", "--loss",
            "0.1", "--windows", "1", "--only", "netboot", "--repeat", "1", "--cap", "90",
            *([] if args.no_base_slow else base)), out, 240, env), 1, 60.0,
            "10 MiB lock-step at 10 % loss < 60 s, 0 failed")],
    }
    for part in parts:
        try:
            lines += runs[part]()
        except Exception as e:  # one part's failure must not hide the others' lines
            print(f"[{part}] failed: {e!r}", flush=True)
            lines.append(Line(f"({part})", "-", "-", "-", None))
    print(f"\nissue 10's targets, T {REPO} (B {b or '-'}); whole run {time.monotonic() - t0:.0f} "
          f"s, load now {load()}; raw outputs in {out}")
    print(f"{'target':<62} {'figure (T)':<44} {'peer (same run)':<32} {'ratio (B: its own)':<26} "
          "status")
    for line in lines:
        print(line)
    if (out / DURATIONS).exists():
        print("\nparts (seconds, exit, load average 1 5 15 min before and after):")
        print((out / DURATIONS).read_text(), end="")


def import_part(py: str, out: Path, b: Path | None) -> list[Line]:
    """import_csv.py 3 times a tree, alternating (each run its own process: its peak RSS
    is its own). import_csv.py imports netboot from PYTHONPATH: each tree's own."""
    trees = {"T": REPO} | ({"B": b} if b else {})
    texts: dict[str, str] = {name: "" for name in trees}
    for i in range(3):
        for name in (list(trees) if i % 2 == 0 else list(trees)[::-1]):
            texts[name] += run_part(f"import-{name}-{i + 1}", [py, str(HERE / "import_csv.py")],
                                    out, 120, {"PYTHONPATH": str(trees[name])})
    return import_lines(import_runs(texts["T"]), import_runs(texts.get("B", "")))


if __name__ == "__main__":
    main()
