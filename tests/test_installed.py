"""tests/installed.py: what lets tests/install-deps.sh skip pip on a machine that has
everything (it must never skip when something is missing or is another checkout's)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tests.installed import not_this_checkout, unmet


def test_met_requirements_are_not_reported_and_unmet_ones_are() -> None:
    pytest_version = importlib.metadata.version("pytest")
    assert unmet(["pytest>=1", "pyyaml", f"pytest=={pytest_version}"]) == []
    assert unmet(["pytest>=9999"]) == [f"pytest>=9999: {pytest_version} installed"]
    assert unmet(["netboot-no-such-distribution>=1"]) == [
        "netboot-no-such-distribution>=1: not installed"]


def test_a_requirement_whose_marker_does_not_hold_here_is_not_asked_for() -> None:
    assert unmet(['netboot-no-such-distribution; python_version < "3"']) == []
    assert unmet(['netboot-no-such-distribution; python_version >= "3"']) != []


def test_netboot_installed_from_another_checkout_or_at_another_version_is_reported(
        tmp_path: Path) -> None:
    elsewhere = not_this_checkout(tmp_path, "0.0.0")
    assert any("pyproject.toml says 0.0.0" in line for line in elsewhere), elsewhere
    assert any(f"not {tmp_path}" in line for line in elsewhere), elsewhere


def test_every_tool_a_test_requires_is_installed_by_install_deps() -> None:
    """A test marked ``requires(tool, package)`` fails where the tool is missing: its
    package must be in tests/install-deps.sh's list, not left to another package's
    dependencies (a fresh CI machine has only what the list names)."""
    import re

    root = Path(__file__).resolve().parent
    script = (root / "install-deps.sh").read_text()
    listed = set(re.search(r'PKGS="([^"]*)"', script).group(1).replace("\\\n", " ").split())  # type: ignore[union-attr]
    marked = {package for path in root.rglob("*.py")
              for package in re.findall(r'requires\("[^"]+", *"([^"]+)"\)', path.read_text())}
    assert marked, "no requires marks found"
    assert marked - listed == set(), sorted(marked - listed)
