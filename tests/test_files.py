"""The root-restricted file tree shared by TFTP and HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from netboot.errors import Forbidden, NotFound
from netboot.files import FileTree, clean_relative, content_type, sha256_file


@pytest.mark.parametrize(("raw", "clean"), [
    ("vmlinuz", "vmlinuz"), ("/vmlinuz", "vmlinuz"), ("a//b/./c", "a/b/c"),
    ("pxelinux.cfg\\default", "pxelinux.cfg/default"),  # Windows-style clients (dnsmasq too)
])
def test_clean_relative(raw: str, clean: str) -> None:
    assert clean_relative(raw) == clean


@pytest.mark.parametrize("raw", ["..", "a/../b", "..\\x", "a\x00b"])
def test_clean_relative_refuses(raw: str) -> None:
    with pytest.raises(Forbidden):
        clean_relative(raw)


def test_percent_decoding_only_when_asked() -> None:
    with pytest.raises(Forbidden):
        clean_relative("%2e%2e/etc/passwd", decode_percent=True)
    assert clean_relative("%2e%2e", decode_percent=False) == "%2e%2e"


def test_search_path_first_root_wins_and_symlinks_stay_inside(tmp_path: Path) -> None:
    a, b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    for d in (a, b, outside):
        d.mkdir()
    (a / "x").write_text("from a")
    (b / "x").write_text("from b")
    (b / "y").write_text("only b")
    (outside / "secret").write_text("no")
    (a / "inside-link").symlink_to(a / "x")
    (a / "escape").symlink_to(outside / "secret")
    (a / "dir").mkdir()
    tree = FileTree([a, b, tmp_path / "missing"])
    assert Path(tree.blob("x").path or "").read_text() == "from a"
    assert Path(tree.blob("y").path or "").read_text() == "only b"
    assert tree.blob("inside-link").size == len("from a")
    with pytest.raises(Forbidden):
        tree.blob("escape")
    with pytest.raises(NotFound):
        tree.blob("dir")  # a directory is not a file to serve
    with pytest.raises(NotFound):
        tree.blob("nope")


def test_content_types_for_uefi_http_boot() -> None:
    # EDK2 decides the image type from Content-Type, else the extension (protocols.md §4).
    assert content_type("ipxe.efi") == "application/efi"
    assert content_type("installer.iso") == "application/vnd.efi-iso"
    assert content_type("disk.img") == "application/vnd.efi-img"
    assert content_type("boot.ipxe").startswith("text/plain")


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_refusals_that_a_resolve_on_strings_must_keep(tmp_path: Path) -> None:
    """What the string-based lookup (FileTree._find) must refuse as the Path one did."""
    root, sibling = tmp_path / "a", tmp_path / "ab"  # a sibling whose name extends the root's
    root.mkdir()
    sibling.mkdir()
    (sibling / "secret").write_text("no")
    (root / "prefix-trick").symlink_to(sibling / "secret")  # "…/ab/secret" starts with "…/a"
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    (root / "itself").symlink_to(root)
    (root / "f").write_text("data")
    linked_root = tmp_path / "link-to-a"
    linked_root.symlink_to(root)  # a root given through a symlink still serves its files
    tree = FileTree([linked_root])
    with pytest.raises(Forbidden, match="outside"):
        tree.blob("prefix-trick")
    with pytest.raises(Forbidden, match="symlink loop"):
        tree.blob("loop1")
    with pytest.raises(NotFound):
        tree.blob("itself")  # the root is a directory, not a file to serve
    with pytest.raises(NotFound):
        tree.blob("x" * 300)  # ENAMETOOLONG: a name that cannot exist
    blob = tree.blob("f")
    assert (blob.path, blob.size) == (str(root / "f"), 4)
    assert tree.resolve("f") == root / "f"


def test_a_pinned_file_removed_after_start_up_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "ipxe.efi").write_bytes(b"x" * 10)
    tree = FileTree([tmp_path], pinned=["ipxe.efi"])
    assert tree.blob("/ipxe.efi").size == 10
    (tmp_path / "ipxe.efi").unlink()
    with pytest.raises(NotFound):
        tree.blob("ipxe.efi")
