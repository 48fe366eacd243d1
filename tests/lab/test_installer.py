"""The lab installer's k3OS config reader, run with busybox awk as in the guest.

The end-to-end tests rely on it extracting ``run_cmd`` byte for byte: it is checked here
against the golden k3OS config and the command netboot renders into it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from netboot.content import register_command
from netboot.lab.installer import CONFIG_AWK

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "k3os-config.yaml"


def busybox() -> str:
    path = shutil.which("busybox")
    assert path, "busybox not installed: run tests/install-deps.sh (busybox-static)"
    return path


def read(tmp_path: Path, config: str, key: str, out: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "reader.awk").write_text(CONFIG_AWK)
    (tmp_path / "config.yaml").write_text(config)
    return subprocess.run(
        [busybox(), "awk", "-v", f"key={key}", "-v", f"out={out}", "-f",
         str(tmp_path / "reader.awk"), str(tmp_path / "config.yaml")],
        capture_output=True, text=True, timeout=30, check=False)


def test_run_cmd_extracted_exactly(tmp_path: Path) -> None:
    (tmp_path / "cmd").mkdir()
    r = read(tmp_path, GOLDEN.read_text(), "run_cmd", f"{tmp_path}/cmd/")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "cmd").iterdir()) == ["1"]
    want = register_command("http://192.0.2.10:8080/api/v1/register", "52:54:00:00:00:11",
                            "TOKEN123", "edge-1")
    assert (tmp_path / "cmd" / "1").read_text() == want


@pytest.mark.parametrize(("key", "want"), [
    ("hostname", "edge-1\n"),
    ("k3os.server_url", "https://192.0.2.50:6443\n"),
    ("k3os.token", "s3cret\n"),
    ("k3os.k3s_args", "agent\n--node-name\nedge-1\n"),
    ("k3os.taints", "dedicated=edge:NoSchedule\n"),
])
def test_values(tmp_path: Path, key: str, want: str) -> None:
    r = read(tmp_path, GOLDEN.read_text(), key)
    assert (r.returncode, r.stdout) == (0, want), r.stderr


def test_absent_key_exits_1(tmp_path: Path) -> None:
    assert read(tmp_path, GOLDEN.read_text(), "k3os.nope").returncode == 1
    assert read(tmp_path, "k3os:\n  token: \"x\"\n", "k3os.server_url").returncode == 1


@pytest.mark.parametrize("config", [
    'run_cmd:\n  - "echo \\q"\n',          # an escape YAML has and this reader does not
    'run_cmd:\n  - "echo \\u00e9"\n',      # non-ASCII
    "run_cmd:\n  - 'echo hi'\n",           # single-quoted
    'run_cmd:\n  - "echo hi\n',            # unterminated
])
def test_outside_the_subset_fails_loudly(tmp_path: Path, config: str) -> None:
    r = read(tmp_path, config, "run_cmd")
    assert r.returncode == 2 and "line 2" in r.stderr, (r.returncode, r.stderr)
