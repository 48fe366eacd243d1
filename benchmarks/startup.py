"""How soon ``netboot serve`` answers: process start → first 200 from ``/healthz`` on loopback.

    python benchmarks/startup.py [--runs 7] [--compare /path/to/other/checkout] [--enrolled N]

What an operator restarting the service (or systemd's restart after a crash) waits for before
devices are answered again. netboot runs as ``python -m netboot serve`` with HTTP and HTTPS
(its default; netboot's own CA and certificate are made by an unmeasured first run, as on a
server that has started before) on free loopback ports, DHCP, TFTP and DNS off; the client
polls ``/healthz`` every 2 ms from the moment the process is spawned. Per run: wall seconds to
the first 200 and the server's CPU seconds at that moment (user + system from /proc, 10 ms
ticks; on a shared machine the CPU figure is the comparable one), then the same to the first
answer of aiohttp's application (``GET /api/v1/machines`` without a token: its 401), which
``serve`` imports after its listeners answer. Prints the medians of the runs and, with
``--compare``, the same for another checkout run alternately in the same session
(PYTHONPATH), and the ratio. Each checkout's byte-code is compiled first
(``compileall``, as a wheel install does: with ``PYTHONDONTWRITEBYTECODE`` set, every start
would compile netboot's sources again). ``--enrolled`` fills the inventory first (``netboot
import``): the view loads in the background, after the server answers. Loopback only;
servers stopped by their own PID. Not part of pytest; no assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system seconds of the process so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def answers(port: int, path: str = "/healthz", status: bytes = b"200") -> bool:
    """One GET; True when it is answered with ``status`` (a refused connection, a timeout or
    another status: False)."""
    try:
        with socket.create_connection((HOST, port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      .encode())
            head = s.recv(64)
    except OSError:
        return False
    return head.startswith(b"HTTP/1.1 " + status)


def healthz(port: int) -> bool:
    """One GET /healthz; True on a 200."""
    return answers(port)


def config(data: Path, conf: Path) -> int:
    port = free_port()
    conf.write_text(json.dumps({  # YAML is a superset of JSON
        "server": {"advertise": HOST, "data_dir": str(data), "log_level": "warning"},
        "http": {"listen": HOST, "port": port},
        "https": {"port": free_port()},
        "dhcp": {"mode": "off"}, "tftp": {"enabled": False}, "dns": {"enabled": False},
    }))
    return port


def spawn(python: str, repo: Path, conf: Path, log: Path) -> subprocess.Popen[bytes]:
    """``netboot serve`` of checkout ``repo``, its output appended to ``log``. It runs in
    the log's directory: ``-m`` puts the working directory first on sys.path, and a checkout
    there would be imported instead of ``repo``."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    with log.open("ab") as out:
        return subprocess.Popen([python, "-m", "netboot", "serve", "--config", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                                stdin=subprocess.DEVNULL, env=env)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # this process only, by its own handle
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_run(python: str, repo: Path, conf: Path, port: int, log: Path,
            timeout: float = 120) -> tuple[float, float, float, float]:
    """Seconds (wall, server CPU) from spawning ``netboot serve`` to its first /healthz 200,
    then to the API's first answer (a 401)."""
    t0 = time.perf_counter()
    proc = spawn(python, repo, conf, log)
    try:
        deadline = t0 + timeout
        measured = []
        for path, status in (("/healthz", b"200"), ("/api/v1/machines", b"401")):
            while not answers(port, path, status):
                if proc.poll() is not None:
                    raise RuntimeError(f"netboot serve exited with {proc.returncode}: "
                                       f"see {log}")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"no {path} {status.decode()} within {timeout:.0f} s:"
                                       f" see {log}")
                time.sleep(0.002)
            measured += [time.perf_counter() - t0, cpu_seconds(proc.pid)]
    finally:
        stop(proc)
    return measured[0], measured[1], measured[2], measured[3]


def seed(python: str, repo: Path, data: Path, machines: int, tmp: Path) -> None:
    """``netboot import`` of ``machines`` rows (one cluster and profile) into ``data``."""
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def cli(*args: str) -> None:
        subprocess.run([python, "-m", "netboot", *args, "--data-dir", str(data)], check=True,
                       capture_output=True, timeout=1800, env=env)

    cli("clusters", "add", "line", "--server-url", "https://192.0.2.10:6443", "--token", "t")
    cli("profiles", "add", "p", "--kernel", "vmlinuz")
    csv = tmp / "fleet.csv"
    csv.write_text("mac,hostname,cluster,role,profile\n" + "".join(
        f"{(0x020000000000 + i).to_bytes(6, 'big').hex(':')},edge-{i:06d},line,agent,p\n"
        for i in range(machines)))
    cli("import", str(csv))


def parse_with_checkouts(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments with ``--compare`` and ``--python``; a SIGTERM (e.g. from
    ``timeout``) unwinds, stopping the servers and removing the temporary directory."""
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="another netboot checkout, measured in the same run")
    parser.add_argument("--python", default=sys.executable, help="interpreter for netboot")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return args


def checkouts_of(args: argparse.Namespace) -> dict[str, Path]:
    """This checkout, and the one of ``--compare``: by name, for PYTHONPATH."""
    checkouts = {"this": REPO}
    if args.compare is not None:
        checkouts["other"] = args.compare.resolve()
    return checkouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per checkout")
    parser.add_argument("--enrolled", type=int, default=0,
                        help="machines imported before (the view loads after readiness)")
    args = parse_with_checkouts(parser)
    checkouts = checkouts_of(args)
    results: dict[str, list[tuple[float, float, float, float]]] = {
        name: [] for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="netboot-startup-") as tmp_text:
        tmp = Path(tmp_text)
        seeded = tmp / "seed"
        seeded.mkdir(mode=0o700)
        if args.enrolled:
            seed(args.python, REPO, seeded, args.enrolled, tmp)
        runs = {}
        for name, repo in checkouts.items():
            subprocess.run([args.python, "-m", "compileall", "-q", str(repo / "netboot")],
                           check=True)
            data = tmp / name
            shutil.copytree(seeded, data)
            conf = tmp / f"{name}.yaml"
            port = config(data, conf)
            # Unmeasured: makes the secrets key, the CA and certificate, the admin token.
            one_run(args.python, repo, conf, port, tmp / f"{name}.log")
            runs[name] = (repo, conf, port)
        for i in range(args.runs):
            # Alternate the order so neither checkout always runs right after the other.
            order = list(runs) if i % 2 == 0 else list(reversed(runs))
            for name in order:
                repo, conf, port = runs[name]
                results[name].append(one_run(args.python, repo, conf, port,
                                             tmp / f"{name}.log"))
    load = os.getloadavg()
    print(f"netboot serve → first /healthz 200, median of {args.runs} runs "
          f"({args.enrolled} machines enrolled; load average {load[0]:.2f} {load[1]:.2f})")
    print(f"{'checkout':<10} {'wall s':>8} {'CPU s':>8}   {'min/max wall':>13}  "
          f"{'API wall':>8} {'API CPU':>8}  path")
    for name, measured in results.items():
        walls, cpus = [m[0] for m in measured], [m[1] for m in measured]
        api_walls, api_cpus = [m[2] for m in measured], [m[3] for m in measured]
        print(f"{name:<10} {statistics.median(walls):8.3f} {statistics.median(cpus):8.2f}   "
              f"{min(walls):6.3f}/{max(walls):.3f}  {statistics.median(api_walls):8.3f} "
              f"{statistics.median(api_cpus):8.2f}  {checkouts[name]}")
    if "other" in results:
        for i, what in ((0, "wall"), (1, "CPU")):
            this = statistics.median(m[i] for m in results["this"])
            other = statistics.median(m[i] for m in results["other"])
            with contextlib.suppress(ZeroDivisionError):
                print(f"this ÷ other ({what}): {this / other:.2f}x")


if __name__ == "__main__":
    main()
