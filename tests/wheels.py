"""netboot's wheel and a wheelhouse of what it needs, for the packaging and container tests.

The runtime dependencies, those of the extras the container image installs, and the build
backend are wheels in a cache directory keyed by the
requirements and the Python version. Filling it is the one step that needs a package index:
``tests/install-deps.sh`` does it (``python -m tests.wheels``), so that the test run itself
installs with ``--no-index``, the way a site without PyPI would; a cold cache is filled on first
use rather than failing. netboot's own wheel is always built fresh, from a copy of the sources,
so that a stale ``build/`` directory of the checkout cannot leak into it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a build reads: pyproject.toml and setup.py, and what they put into the wheel.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "netboot", "templates",
           "boot_assets")


# The extras the container image installs (netboot[postgresql,fast]: an image must be able to
# share a PostgreSQL inventory, and runs on uvloop as the README's install does), so their
# wheels are in the wheelhouse too.
IMAGE_EXTRAS = ("postgresql", "fast")


def requirements() -> list[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = meta["project"]["optional-dependencies"]
    return [*meta["build-system"]["requires"], *meta["project"]["dependencies"],
            *(req for extra in IMAGE_EXTRAS for req in extras[extra])]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "netboot-tests"


def pip(*args: str | Path) -> None:
    """Run this interpreter's pip; its output is shown only when it fails."""
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check",
                             *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"pip {' '.join(map(str, args))} failed:\n"
                           f"{result.stdout[-3000:]}{result.stderr[-3000:]}")


def dependency_wheels() -> Path:
    """A directory of wheels for the build backend and every runtime dependency."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    key = hashlib.sha256("\n".join([tag, *requirements()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"wheelhouse-{key}"
    if target.is_dir():
        return target
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    pip("wheel", "--quiet", "--wheel-dir", partial, *requirements())
    try:
        # Renamed whole: a half-filled wheelhouse is never used.
        partial.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(partial)  # another run filled it first
    return target


def source_digest(*extra: Path) -> str:
    """A digest of what a build reads (the sources, plus ``extra`` files): a cache key."""
    h = hashlib.sha256()
    for path in sorted(p for name in SOURCES for p in
                       ((ROOT / name).rglob("*") if (ROOT / name).is_dir() else [ROOT / name])):
        if path.is_file() and not {"__pycache__", "_shipped"} & set(path.parts):
            h.update(f"{path.relative_to(ROOT)}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    for path in extra:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_netboot_wheel(dest: Path, deps: Path) -> Path:
    """Build netboot's wheel into ``dest`` without an index (the backend comes from ``deps``)."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "_shipped"))
        else:
            shutil.copy2(path, src / name)
    pip("wheel", "--quiet", "--no-deps", "--no-index", "--find-links", deps,
        "--wheel-dir", dest, src)
    (wheel,) = dest.glob("netboot-*.whl")
    return wheel


if __name__ == "__main__":
    # tests/install-deps.sh: fill the cache while the index is reachable.
    print(dependency_wheels())
