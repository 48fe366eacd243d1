"""The PE/COFF certificate-table check behind ``netboot assets``' signature column."""

from __future__ import annotations

import struct

import pytest

from netboot.errors import ValidationError
from netboot.wire.pe import WIN_CERT_TYPE_PKCS_SIGNED_DATA, signature


def pe_image(*, plus: bool = True, cert: bytes | None = None, cert_type: int =
             WIN_CERT_TYPE_PKCS_SIGNED_DATA, machine: int = 0x8664, dirs: int = 16) -> bytes:
    """A minimal PE image: DOS stub, PE header, optional header, data directories, and a
    WIN_CERTIFICATE appended at the end (where signing tools put it)."""
    pe_at = 0x80
    opt_fixed = 112 if plus else 96
    opt_size = opt_fixed + 8 * dirs
    dos = bytearray(pe_at)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, pe_at)
    coff = b"PE\0\0" + struct.pack("<HHIIIHH", machine, 0, 0, 0, 0, opt_size, 0x22)
    opt = bytearray(opt_size)
    struct.pack_into("<H", opt, 0, 0x20B if plus else 0x10B)
    struct.pack_into("<I", opt, opt_fixed - 4, dirs)
    body = bytes(dos) + coff + bytes(opt)
    if cert is None:
        return body
    offset = len(body)
    blob = struct.pack("<IHH", 8 + len(cert), 0x0200, cert_type) + cert
    struct.pack_into("<II", opt, opt_fixed + 8 * 4, offset, len(blob))
    return bytes(dos) + coff + bytes(opt) + blob


def test_unsigned_image() -> None:
    sig = signature(pe_image())
    assert not sig.signed and sig.arch == "x86_64"


@pytest.mark.parametrize("plus", [True, False])
def test_signed_image_pe32_and_pe32plus(plus: bool) -> None:
    sig = signature(pe_image(plus=plus, cert=b"\x30\x82" + bytes(100), machine=0xAA64))
    assert sig.signed and sig.arch == "arm64" and sig.cert_size == 8 + 102


def test_certificate_of_another_type_is_not_authenticode() -> None:
    assert not signature(pe_image(cert=bytes(16), cert_type=0x0001)).signed


def test_image_without_a_security_directory() -> None:
    assert not signature(pe_image(dirs=4)).signed


@pytest.mark.parametrize("data", [b"", b"MZ" + bytes(100), b"\x7fELF" + bytes(200),
                                  pe_image()[:0x90]])
def test_not_pe_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValidationError, match="not a PE/COFF image"):
        signature(data)


def test_certificate_table_past_the_end_is_refused() -> None:
    image = pe_image(cert=bytes(32))
    with pytest.raises(ValidationError, match="beyond the end"):
        signature(image[:-40])
