"""Exit 0 when this interpreter already has what ``pip install -e '.[test]'`` installs:
netboot installed editable from this checkout at pyproject.toml's version, and every
requirement of its dependencies and its test extra installed at a version the requirement
accepts (markers honoured). Anything else, or anything unreadable, exits 1:
tests/install-deps.sh then runs pip as before. A dependency's own dependencies are not
walked: pip checked them when it installed it."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def unmet(requirements: Iterable[str]) -> list[str]:
    """The requirements this interpreter does not meet, each with why."""
    from packaging.requirements import Requirement  # pytest's own dependency

    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{text}: not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{text}: {version} installed")
    return out


def not_this_checkout(root: Path, version: str) -> list[str]:
    """Why the installed netboot is not ``root``'s editable install of ``version``."""
    # The installed one, not the checkout's own build leftovers (netboot.egg-info, found
    # first when the checkout is on sys.path).
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != root]
    dist = next(iter(importlib.metadata.distributions(name="netboot", path=elsewhere)), None)
    if dist is None:
        return ["netboot: not installed"]
    out = []
    if dist.version != version:
        out.append(f"netboot: {dist.version} installed, pyproject.toml says {version}")
    # Where the editable install points (PEP 610's direct_url.json), not where `import
    # netboot` finds it: run as `python -m` from the checkout, the checkout is first on
    # sys.path whatever the venv holds.
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    editable = direct.get("dir_info", {}).get("editable", False)
    if not editable or direct.get("url") != root.as_uri():
        out.append(f"netboot: installed from {direct.get('url')!r}"
                   f"{'' if editable else ' (not editable)'}, not {root}")
    return out


def missing(root: Path = ROOT) -> list[str]:
    """What ``pip install -e '.[test]'`` in ``root`` would still have to do."""
    meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*unmet([*meta["dependencies"], *meta["optional-dependencies"]["test"]]),
            *not_this_checkout(root, meta["version"])]


if __name__ == "__main__":
    try:
        problems = missing()
    except Exception as exc:  # unreadable: let pip decide
        problems = [repr(exc)]
    for problem in problems:
        print(problem, file=sys.stderr)
    sys.exit(1 if problems else 0)
