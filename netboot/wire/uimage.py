"""U-Boot legacy script images (``boot.scr.uimg``): a pure encoder and decoder.

U-Boot's ``source`` command only runs a legacy uImage of type ``IH_TYPE_SCRIPT`` (or a FIT);
anything else fails with "Wrong image format for "source" command" (protocols.md §3.6). The
bytes produced here equal those of ``mkimage -A arm64 -O linux -T script -C none -d boot.txt``
given the same timestamp (``SOURCE_DATE_EPOCH``); the tests compare them with Debian's
u-boot-tools.

Layout (``include/image.h`` ``image_header_t``, all big-endian)::

    0  magic 0x27051956   4  header CRC32 (computed with this field zero)
    8  timestamp          12 data size       16 load address   20 entry point
    24 data CRC32         28 os  29 arch  30 type  31 compression
    32 name (32 bytes, NUL-padded)
    64 payload: a table of 4-byte sizes ended by a 0 entry, then each script; every script
       but the last is padded to 4 bytes (mkimage's ``copy_file(..., pad)``), the last is not.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from netboot.errors import DecodeError

MAGIC = 0x27051956
HEADER_SIZE = 64
NAME_SIZE = 32
OS_LINUX = 5
ARCH_ARM = 2
ARCH_X86 = 3
ARCH_X86_64 = 24
ARCH_ARM64 = 22
ARCH_RISCV = 26
TYPE_SCRIPT = 6
COMP_NONE = 0

_HEADER = struct.Struct(">7I4B32s")
_SIZE = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ScriptImage:
    """A decoded (or to-be-encoded) script image."""

    scripts: tuple[bytes, ...]
    timestamp: int
    name: str = ""
    os: int = OS_LINUX
    arch: int = ARCH_ARM64
    load: int = 0
    entry: int = 0


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def encode(image: ScriptImage) -> bytes:
    """Build the image bytes; ValueError for values that do not fit the header."""
    if not image.scripts:
        raise ValueError("a script image holds at least one script")
    name = image.name.encode("utf-8")
    if len(name) > NAME_SIZE:
        # mkimage truncates silently; refusing is kinder than a cut-off name.
        raise ValueError(f"image name is {len(name)} bytes, at most {NAME_SIZE}")
    if not 0 <= image.timestamp <= 0xFFFFFFFF:
        raise ValueError("timestamp does not fit 32 bits")
    payload = bytearray()
    for script in image.scripts:
        payload += _SIZE.pack(len(script))
    payload += _SIZE.pack(0)
    last = len(image.scripts) - 1
    for i, script in enumerate(image.scripts):
        payload += script
        if i != last:
            payload += b"\x00" * _pad4(len(script))
    dcrc = zlib.crc32(payload)
    fields = (
        image.timestamp,
        len(payload),
        image.load,
        image.entry,
        dcrc,
        image.os,
        image.arch,
        TYPE_SCRIPT,
        COMP_NONE,
        name,
    )
    header = _HEADER.pack(MAGIC, 0, *fields)
    header = _HEADER.pack(MAGIC, zlib.crc32(header), *fields)
    return header + bytes(payload)


def script_image(
    script: bytes | str, *, timestamp: int, name: str = "", arch: int = ARCH_ARM64
) -> bytes:
    """The usual case: one boot script, as ``mkimage -T script -d boot.txt`` would write."""
    body = script.encode("utf-8") if isinstance(script, str) else script
    return encode(ScriptImage((body,), timestamp, name, arch=arch))


def decode(data: bytes) -> ScriptImage:
    """Parse and verify a script image; DecodeError names the field and offset."""
    if len(data) < HEADER_SIZE:
        raise DecodeError("shorter than the 64-byte header", field="header", offset=len(data))
    (magic, hcrc, timestamp, size, load, entry, dcrc, os_, arch, type_, comp, raw_name) = (
        _HEADER.unpack_from(data, 0)
    )
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic:#010x}", field="magic", offset=0)
    zeroed = data[:4] + b"\x00\x00\x00\x00" + data[8:HEADER_SIZE]
    if zlib.crc32(zeroed) != hcrc:
        raise DecodeError("header CRC mismatch", field="hcrc", offset=4)
    if type_ != TYPE_SCRIPT:
        raise DecodeError(f"image type {type_} is not a script (6)", field="type", offset=30)
    if comp != COMP_NONE:
        raise DecodeError(f"compression {comp} is not supported", field="comp", offset=31)
    payload = data[HEADER_SIZE : HEADER_SIZE + size]
    if len(payload) != size:
        raise DecodeError(
            f"data size {size} but {len(payload)} bytes follow", field="size", offset=12
        )
    if zlib.crc32(payload) != dcrc:
        raise DecodeError("data CRC mismatch", field="dcrc", offset=24)
    sizes: list[int] = []
    pos = 0
    while True:
        if pos + 4 > len(payload):
            raise DecodeError(
                "size table not terminated", field="sizes", offset=HEADER_SIZE + pos
            )
        (n,) = _SIZE.unpack_from(payload, pos)
        pos += 4
        if n == 0:
            break
        sizes.append(n)
    if not sizes:
        raise DecodeError("no script in the image", field="sizes", offset=HEADER_SIZE)
    scripts = []
    for i, n in enumerate(sizes):
        if pos + n > len(payload):
            raise DecodeError(
                f"script {i} runs past the data", field="scripts", offset=HEADER_SIZE + pos
            )
        scripts.append(bytes(payload[pos : pos + n]))
        pos += n + _pad4(n)
    name = raw_name.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
    return ScriptImage(tuple(scripts), timestamp, name, os_, arch, load, entry)
