"""The benchmarks are not part of pass/fail, but each one's command line is: the README and
benchmarks/README.md tell a user to run them, and a script whose ``--help`` crashes (a bare
``%`` in an argparse help string did, in ipxe_inproc.py) or that reads ``--help`` as a row
count is found here, not by the user."""

from __future__ import annotations

import importlib
import subprocess
import sys
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
