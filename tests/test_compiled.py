"""The mypyc build of the DHCP and TFTP paths (setup.py with ``NETBOOT_MYPYC=1``) passes the
same tests.

mypyc's native classes are stricter than CPython's (no instance ``__dict__``, argument types
checked as annotated), so a module that passes its tests as Python can still fail compiled:
the compiled modules are built in a copy of the checkout and the DHCP and TFTP tests are run
there against them, with a probe that fails unless the compiled modules are the ones imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py's COMPILED, as import names.
COMPILED = ("netboot.wire.dhcp", "netboot.pxe", "netboot.wire.tftp", "netboot.servers.tftp")
TESTS = (
    "tests/wire/test_dhcp.py",
    "tests/test_pxe.py",
    "tests/test_pxe_replies.py",
    "tests/servers/test_dhcp.py",
    "tests/servers/test_dhcp_inventory.py",
    "tests/wire/test_tftp.py",
    "tests/servers/test_tftp.py",
)
PROBE = f"""
import importlib


def test_the_compiled_modules_are_the_ones_imported() -> None:
    for name in {COMPILED!r}:
        assert importlib.import_module(name).__file__.endswith(".so"), name
"""


@pytest.mark.timeout(1500)
def test_the_compiled_packet_paths_pass_their_tests(tmp_path: Path) -> None:
    copy = tmp_path / "checkout"
    copy.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, copy / name)
    for name in ("netboot", "templates", "boot_assets", "tests"):
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    env = {**os.environ, "NETBOOT_MYPYC": "1", "PYTHONPATH": str(copy)}

    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=900, check=False)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    for name in COMPILED:
        built = list((copy / Path(*name.split(".")).parent).glob(name.rsplit(".", 1)[1]
                                                                  + ".*.so"))
        assert built, f"{name} was not compiled"

    (copy / "tests" / "test_compiled_probe.py").write_text(PROBE)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_compiled_probe.py", *TESTS], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
