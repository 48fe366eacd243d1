"""Root-restricted file lookup shared by TFTP and HTTP.

A request path is untrusted text. It is resolved against each root of a search path in order;
a path that is absolute, contains NUL, a ``..`` segment, a backslash trick, or that resolves
(through symlinks) outside its root is refused with :class:`Forbidden`, never served.
"""

from __future__ import annotations

import errno
import hashlib
import mimetypes
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

from netboot.errors import Forbidden, NotFound
from netboot.model import Blob

_TYPES = {
    ".ipxe": "text/plain; charset=utf-8",
    ".efi": "application/efi",
    ".iso": "application/vnd.efi-iso",
    ".img": "application/vnd.efi-img",
    ".kpxe": "application/octet-stream",
    ".pxe": "application/octet-stream",
    ".cfg": "text/plain; charset=utf-8",
    ".yaml": "text/yaml; charset=utf-8",
}


_NOT_FIRST = ("", "/", ".")  # a first character that sends a path the long way (below)


def clean_relative(path: str, *, decode_percent: bool = False) -> str:
    """Return a normalised relative path, or raise Forbidden naming what is wrong.

    TFTP clients from the Windows world send ``\\`` as separator (dnsmasq converts it too), so
    it is treated as ``/``. A leading ``/`` is accepted and stripped (PXE ROMs often send it),
    but ``..`` anywhere is refused rather than collapsed: it is never a legitimate boot path.
    """
    if decode_percent:
        path = unquote(path)
    elif (path[:1] not in _NOT_FIRST and path[-1] != "/" and "//" not in path
          and "/." not in path and "\\" not in path and "\x00" not in path):
        # Already clean, as a TFTP RRQ's name mostly is and as every caller after the first
        # passes it (a TFTP request is cleaned three times: the server, the content layer,
        # the file tree): no empty segment (no "//", no "/" first or last), none that
        # starts with "." (so no "." nor ".."), no backslash, no NUL. What this turns away
        # is cleaned below as before.
        return path
    if "\x00" in path:
        raise Forbidden("path contains a NUL byte")
    path = path.replace("\\", "/")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Forbidden("path contains '..'")
    if not parts:
        raise NotFound("empty path")
    return "/".join(parts)


def _is_clean(path: str) -> bool:
    try:
        return clean_relative(path) == path
    except (Forbidden, NotFound):
        return False


class FileTree:
    """A search path of directories; the first root that has the file wins.

    ``pinned`` names (the well-known first-stage loaders) are resolved once, at start-up, with
    symlinks followed: distribution packages link them out of their directory (Debian's
    ``/usr/lib/ipxe/ipxe.efi`` → ``/boot/ipxe.efi``). Only those exact names get that trust;
    every other request path must stay inside its root.
    """

    def __init__(self, roots: Sequence[Path], *,
                 pinned: Sequence[str] | Mapping[str, Sequence[str]] = ()) -> None:
        self.roots = [Path(r) for r in roots]
        self._root_texts = [str(r) for r in self.roots]
        self.pinned: dict[str, Path] = {}
        # A pinned name may be found under other names (Debian installs the signed GRUB as
        # x86_64-efi-signed/grubnetx64.efi.signed; shim asks for grubx64.efi): each root is
        # searched for each of them, in order, before the next root.
        aliases = pinned if isinstance(pinned, Mapping) else {name: (name,) for name in pinned}
        for name, alternatives in aliases.items():
            found = self._first(alternatives)
            if found is not None:
                self.pinned[name] = found
        # Pinned names that are their own clean form: exists() answers those without
        # cleaning them again (the DHCP path asks for a loader on every DISCOVER).
        self._clean_pinned = frozenset(n for n in self.pinned if _is_clean(n))
        # Their path's text and content type, made once: blob() serves a storm's every
        # TFTP request for its loader.
        self._pinned_files = {name: (str(path), content_type(str(path)))
                              for name, path in self.pinned.items()}

    def _first(self, names: Sequence[str]) -> Path | None:
        for root in self.roots:
            for name in names:
                candidate = root / name
                try:
                    if candidate.is_file():
                        return candidate.resolve(strict=True)
                except OSError:
                    continue
        return None

    def resolve(self, path: str, *, decode_percent: bool = False) -> Path:
        rel = clean_relative(path, decode_percent=decode_percent)
        if rel in self.pinned:
            return self.pinned[rel]
        return Path(self._find(rel)[0])

    def _find(self, rel: str) -> tuple[str, os.stat_result]:
        """The real path of clean relative path ``rel`` in the first root that has it as a
        regular file, and its one ``stat``. On strings, not ``Path``: each TFTP RRQ and each
        asset's HTTP GET comes here, and ``Path.resolve`` stats the result once more, its
        ``parents`` build a ``Path`` per level (two thirds of a TFTP transfer's start-up
        instructions, benchmarks/README.md s18-tftp); ``os.path.realpath`` is what it calls."""
        for root in self._root_texts:
            try:
                real_root = os.path.realpath(root, strict=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            candidate = os.path.realpath(os.path.join(real_root, rel))
            inside = real_root if real_root.endswith("/") else real_root + "/"
            if candidate != real_root and not candidate.startswith(inside):
                # A symlink inside the root points outside it.
                raise Forbidden(f"{rel!r} resolves outside {root}")
            try:
                st = os.stat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError:
                raise Forbidden(f"{rel!r} is not readable by netboot") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # realpath leaves a loop unresolved
                    raise Forbidden(f"{rel!r} is a symlink loop") from None
                # ENAMETOOLONG (a 300-byte file name): a request for a name that cannot
                # exist is "not found", not a server failure.
                raise NotFound(f"{rel[:64]!r}...: {exc.strerror}") from None
            if stat.S_ISREG(st.st_mode):
                return candidate, st
        raise NotFound(f"{rel!r} not found")

    def blob(self, path: str, *, decode_percent: bool = False) -> Blob:
        rel = clean_relative(path, decode_percent=decode_percent)
        pinned = self._pinned_files.get(rel)
        if pinned is None:
            found, st = self._find(rel)
            kind = content_type(found)
        else:
            found, kind = pinned
            try:
                st = os.stat(found)
            except OSError as exc:  # removed or replaced since start-up
                raise NotFound(f"{path[:64]!r}: {exc.strerror}") from None
        return Blob(
            size=st.st_size,
            path=found,
            content_type=kind,
            mtime=st.st_mtime,
            stat=st,
        )

    def exists(self, path: str) -> bool:
        if path in self._clean_pinned:
            return True
        try:
            self.resolve(path)
        except (NotFound, Forbidden):
            return False
        return True


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (kernels and images are large)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_type(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    if ext in _TYPES:
        return _TYPES[ext]
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"
