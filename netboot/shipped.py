"""Where the templates and default boot assets that come with netboot are.

An installed wheel carries them as package data in ``netboot/_shipped/`` (copied there from the
repository's top-level ``templates/`` and ``boot_assets/`` at build time, see setup.py); a source
checkout or an editable install uses those top-level directories themselves. Both are plain
directories on disk: Jinja2's FileSystemLoader and the TFTP/HTTP file trees need real paths, and
pip always installs wheels unpacked.
"""

from __future__ import annotations

from pathlib import Path


def shipped_root() -> Path:
    """The directory holding ``templates/`` and ``boot_assets/``."""
    package = Path(__file__).resolve().parent
    packaged = package / "_shipped"
    return packaged if packaged.is_dir() else package.parent


def templates_dir() -> Path:
    return shipped_root() / "templates"


def boot_assets_dir() -> Path:
    return shipped_root() / "boot_assets"


def build() -> str | None:
    """The build an installed wheel names (a digest of its files, written by setup.py at
    build time); None in a source checkout or an editable install."""
    try:
        return (Path(__file__).resolve().parent / "_shipped" / "BUILD").read_text(
            encoding="ascii").strip() or None
    except OSError:
        return None
