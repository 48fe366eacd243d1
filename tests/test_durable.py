"""durable.link_new: a new file given its name whole, never over another's (the kill tests
of its callers are tests/test_sealing.py's and tests/inventory/test_transfer.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.durable import link_new


def test_a_new_file_takes_a_free_name_and_never_an_existing_one(tmp_path: Path) -> None:
    spare = tmp_path / ".key.spare"
    spare.write_bytes(b"whole\n")
    link_new(spare, tmp_path / "key")
    assert (tmp_path / "key").read_bytes() == b"whole\n"
    assert spare.exists()  # its caller removes it
    other = tmp_path / ".key.other"
    other.write_bytes(b"another\n")
    with pytest.raises(FileExistsError):
        link_new(other, tmp_path / "key")
    assert (tmp_path / "key").read_bytes() == b"whole\n"
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "not-there")
    with pytest.raises(FileExistsError):  # a link to nothing is a name taken, not followed
        link_new(other, dangling)
    assert not (tmp_path / "not-there").exists()
