"""The test harness itself (tests/conftest.py): what one test leaves for the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_tests_service_and_its_inotify_instance_do_not_outlive_it() -> None:
    """A test's service (make_env) rendered a script, so its renderer holds an inotify
    instance (128 per user, shared by every process of the user). Once the test is over,
    the instance is given back and the service is garbage. Before: aiohttp's module-wide
    cache of the handlers it built middlewares for kept every test's service alive, with its
    watch open; a serial lane of ``pytest -n 2`` held 87 by tests/test_render.py and, with
    the other lane's, ran the user out of them (a test then failed: s41-ci)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                          "tests/harness_pair.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout, run.stdout[-2000:]
