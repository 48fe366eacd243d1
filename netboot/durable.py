"""A new file given its name whole: written under a name of its own, then linked.

A file made at its name and then written is, killed between the two (kill -9, systemd's stop
timeout, the OOM killer), a file of that name holding nothing or half: an empty
``secret.key`` that every start refused, an empty inventory under a backup's name that a
restore copied over the real one (s45-integrity). Written and synced beside it first, then
``link(2)``: the name appears with the whole file or not at all, and a name another process
made meanwhile is refused (FileExistsError), as ``O_EXCL`` refused it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# link(2) refused by a file system without hard links (vfat, exFAT: a backup's USB disk).
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS})


def link_new(spare: Path, path: Path) -> None:
    """Give the synced file ``spare`` the name ``path``, which must not exist
    (FileExistsError), and sync the directory, so that the name outlives a power loss too.
    ``spare`` keeps its own name (its caller removes it). Where the file system has no
    hard links, ``path`` is claimed by an exclusive create and ``spare`` renamed over it:
    whole or empty there, never half."""
    try:
        os.link(spare, path)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(spare, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
