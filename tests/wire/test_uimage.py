"""U-Boot script images, byte-compared with Debian's mkimage (u-boot-tools)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netboot.errors import DecodeError
from netboot.wire.uimage import (
    ARCH_ARM,
    ARCH_ARM64,
    ScriptImage,
    decode,
    encode,
    script_image,
)

STAMP = 1_700_000_000
BOOT_TXT = (
    "setenv bootargs console=ttyAMA0,115200 ds=nocloud;s=http://10.0.0.1/nc/\n"
    "tftpboot ${kernel_addr_r} k/Image\n"
    "tftpboot ${fdt_addr_r} dtbs/${fdtfile}\n"
    "booti ${kernel_addr_r} - ${fdt_addr_r}\n"
)

needs_mkimage = pytest.mark.requires("mkimage", "u-boot-tools")


def mkimage(tmp_path: Path, files: list[bytes], *args: str) -> bytes:
    names = []
    for i, content in enumerate(files):
        p = tmp_path / f"script{i}.txt"
        p.write_bytes(content)
        names.append(str(p))
    out = tmp_path / "boot.scr.uimg"
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(STAMP))
    subprocess.run(
        ["mkimage", *args, "-T", "script", "-C", "none", "-d", ":".join(names), str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=30,
    )
    return out.read_bytes()


@needs_mkimage
@pytest.mark.parametrize(
    "script",
    [BOOT_TXT.encode(), b"echo hi\nboot", b"echo hi\nboot1", b"x", b"ab\x00cd"],
    ids=["boot.txt", "aligned", "unaligned", "one-byte", "nul"],
)
def test_byte_identical_to_mkimage(tmp_path: Path, script: bytes) -> None:
    theirs = mkimage(tmp_path, [script], "-A", "arm64", "-O", "linux")
    ours = script_image(script, timestamp=STAMP)
    assert ours == theirs


@needs_mkimage
def test_name_and_arch_match_mkimage(tmp_path: Path) -> None:
    theirs = mkimage(tmp_path, [b"boot\n"], "-A", "arm", "-O", "linux", "-n", "netboot boot")
    assert script_image(b"boot\n", timestamp=STAMP, name="netboot boot", arch=ARCH_ARM) == theirs


@needs_mkimage
def test_multi_script_padding_matches_mkimage(tmp_path: Path) -> None:
    # Every script but the last is padded to 4 bytes; the last is not (mkimage copy_file).
    scripts = (b"abcde", b"fg", b"hij")
    theirs = mkimage(tmp_path, list(scripts), "-A", "arm64", "-O", "linux")
    assert encode(ScriptImage(scripts, STAMP)) == theirs
    assert decode(theirs).scripts == scripts


@needs_mkimage
def test_mkimage_lists_it_as_a_script(tmp_path: Path) -> None:
    image = tmp_path / "boot.scr.uimg"
    image.write_bytes(script_image(BOOT_TXT, timestamp=STAMP, name="netboot"))
    listing = subprocess.run(
        ["mkimage", "-l", str(image)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    assert "AArch64 Linux Script (uncompressed)" in listing
    assert "Image Name:   netboot" in listing
    assert f"Data Size:    {len(BOOT_TXT) + 8} Bytes" in listing


@needs_mkimage
@pytest.mark.requires("dumpimage", "u-boot-tools")
def test_dumpimage_extracts_the_script(tmp_path: Path) -> None:
    image = tmp_path / "boot.scr.uimg"
    image.write_bytes(script_image(BOOT_TXT, timestamp=STAMP))
    out = tmp_path / "extracted.txt"
    subprocess.run(
        ["dumpimage", "-T", "script", "-p", "0", "-o", str(out), str(image)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # dumpimage 2023.01 writes the whole script payload: the size table, then the script.
    script = BOOT_TXT.encode()
    assert out.read_bytes() == len(script).to_bytes(4, "big") + b"\x00" * 4 + script


def test_decode_round_trip() -> None:
    image = ScriptImage((b"one", b"second script"), STAMP, "n", arch=ARCH_ARM64)
    assert decode(encode(image)) == image


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(ValueError):
        encode(ScriptImage((), STAMP))
    with pytest.raises(ValueError):
        script_image(b"x", timestamp=STAMP, name="n" * 33)
    with pytest.raises(ValueError):
        script_image(b"x", timestamp=-1)


def _corrupt(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    out[offset] = value
    return bytes(out)


def _rehash(header: bytes) -> bytes:
    zeroed = header[:4] + b"\x00" * 4 + header[8:64]
    return header[:4] + zlib.crc32(zeroed).to_bytes(4, "big") + header[8:]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d[:40], "header"),
        (lambda d: _corrupt(d, 0, 0), "magic"),
        (lambda d: _corrupt(d, 9, 0xAA), "hcrc"),
        (lambda d: _rehash(_corrupt(d, 30, 2)), "type"),
        (lambda d: _rehash(_corrupt(d, 31, 1)), "comp"),
        (lambda d: d[:-1], "size"),
        (lambda d: d[:-1] + b"!", "dcrc"),
    ],
)
def test_decode_errors(mutate: object, field: str) -> None:
    data = script_image(b"echo hello", timestamp=STAMP)
    with pytest.raises(DecodeError) as info:
        decode(mutate(data))  # type: ignore[operator]
    assert info.value.field == field


@given(st.binary(max_size=200))
def test_fuzz_decode_raises_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode(data)


@given(
    st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=4), st.integers(0, 2**32 - 1)
)
def test_fuzz_round_trip(scripts: list[bytes], stamp: int) -> None:
    image = ScriptImage(tuple(scripts), stamp)
    assert decode(encode(image)) == image
