"""PE/COFF: does an EFI image carry an Authenticode signature? (pure, no I/O)

UEFI Secure Boot verifies the signature in the image's *certificate table* (the security
data directory, entry 4 of the optional header's data directories; PE/COFF spec §3.4.3 and
§4.7 "The Attribute Certificate Table"). Its "address" is a file offset, not an RVA. An
unsigned image (Debian's iPXE) has the entry zeroed; a signed one (shim, Debian's GRUB and
kernels) points at one or more WIN_CERTIFICATE structures, type 0x0002 (PKCS#7 SignedData).
Presence is all this reports: whether firmware trusts the signer is its own business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netboot.errors import ValidationError

_PE32, _PE32_PLUS = 0x10B, 0x20B
_SECURITY_DIR = 4
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002


@dataclass(frozen=True, slots=True)
class PeSignature:
    machine: int  # COFF machine: 0x8664 x86-64, 0xAA64 arm64, 0x14C i386
    signed: bool  # a PKCS#7 certificate is present in the certificate table
    cert_offset: int = 0
    cert_size: int = 0

    @property
    def arch(self) -> str:
        return {0x8664: "x86_64", 0xAA64: "arm64", 0x14C: "x86", 0x1C2: "arm32",
                0x1C4: "arm32", 0x5064: "riscv64"}.get(self.machine, hex(self.machine))


def _bad(what: str) -> ValidationError:
    return ValidationError("image", f"not a PE/COFF image: {what}")


def signature(data: bytes) -> PeSignature:
    """Parse the headers of ``data`` (the first few KiB suffice for them, the certificate
    check needs the whole file). Raises ValidationError for anything that is not PE/COFF."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise _bad("no MZ header")
    (pe_at,) = struct.unpack_from("<I", data, 0x3C)
    if pe_at + 24 > len(data) or data[pe_at:pe_at + 4] != b"PE\0\0":
        raise _bad("no PE signature at e_lfanew")
    machine, _sections, _, _, _, opt_size, _ = struct.unpack_from("<HHIIIHH", data, pe_at + 4)
    opt = pe_at + 24
    if opt_size < 2 or opt + opt_size > len(data):
        raise _bad("optional header truncated")
    (magic,) = struct.unpack_from("<H", data, opt)
    if magic == _PE32:
        count_at = opt + 92
    elif magic == _PE32_PLUS:
        count_at = opt + 108
    else:
        raise _bad(f"optional header magic {magic:#x}")
    (dirs,) = struct.unpack_from("<I", data, count_at)
    entry = count_at + 4 + 8 * _SECURITY_DIR
    if dirs <= _SECURITY_DIR or entry + 8 > opt + opt_size:
        return PeSignature(machine, False)
    offset, size = struct.unpack_from("<II", data, entry)
    if offset == 0 or size < 8:
        return PeSignature(machine, False)
    if offset + 8 > len(data):
        raise _bad("certificate table beyond the end of the file")
    length, _revision, cert_type = struct.unpack_from("<IHH", data, offset)
    signed = cert_type == WIN_CERT_TYPE_PKCS_SIGNED_DATA and 8 < length <= size \
        and offset + length <= len(data)
    return PeSignature(machine, signed, offset, size)
