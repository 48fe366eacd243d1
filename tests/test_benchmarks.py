"""The benchmarks are not part of pass/fail, but each one's command line is: the README and
benchmarks/README.md tell a user to run them, and a script whose ``--help`` crashes (a bare
``%`` in an argparse help string did, in ipxe_inproc.py) or that reads ``--help`` as a row
count is found here, not by the user."""

from __future__ import annotations

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
