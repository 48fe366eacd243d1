"""A process killed with SIGKILL once it has said what it acknowledged (kill -9 tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import netboot

T = TypeVar("T")


def killed_after(code: str, args: list[str], read: Callable[[IO[str]], T]) -> T:
    """Run Python ``code`` with ``args`` (netboot importable), ``read`` its output (what it
    acknowledged), then kill it with SIGKILL, as a crash or an OOM kill would; ``read``'s
    result."""
    env = {**os.environ, "PYTHONPATH": str(Path(netboot.__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None
        got = read(proc.stdout)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()  # this process only, by its own handle
        proc.wait(timeout=30)
    return got
