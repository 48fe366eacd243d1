"""ICMP echo (RFC 792), as the DHCP server's check that an address is free sends and reads it.

Pure: :func:`echo_request` makes the bytes of an echo request, :func:`parse_echo_reply` reads
an echo reply into a frozen :class:`EchoReply` (or None for any other ICMP message: a
destination unreachable, another host's echo request on a raw socket) and raises only
:class:`DecodeError` naming the field. The adapter is ``netboot/servers/ping.py``.

Two kinds of socket hand a reply over differently (Linux, ``ip(7)``/``icmp(7)``): a raw
socket (``SOCK_RAW``, root or CAP_NET_RAW) gives the IPv4 header first; an unprivileged ping
socket (``SOCK_DGRAM`` + ``IPPROTO_ICMP``, where ``net.ipv4.ping_group_range`` holds the
process's group) gives the ICMP message alone, and the kernel writes the identifier (the
socket's "port") and the checksum into what is sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netboot.errors import DecodeError

ECHO_REPLY = 0
ECHO_REQUEST = 8
_HEADER = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence (RFC 792)


@dataclass(frozen=True, slots=True)
class EchoReply:
    identifier: int
    sequence: int


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): the ones' complement of the ones' complement sum of
    the 16-bit words (an odd last byte padded with zero)."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(identifier: int, sequence: int, payload: bytes = b"") -> bytes:
    """An echo request with its checksum (a raw socket sends it as it is; a ping socket
    puts its own identifier and checksum in)."""
    head = _HEADER.pack(ECHO_REQUEST, 0, 0, identifier & 0xFFFF, sequence & 0xFFFF)
    return _HEADER.pack(ECHO_REQUEST, 0, checksum(head + payload), identifier & 0xFFFF,
                        sequence & 0xFFFF) + payload


def parse_echo_reply(data: bytes, *, ip_header: bool) -> EchoReply | None:
    """The echo reply in ``data`` (``ip_header``: as a raw socket reads it, an IPv4 header
    first), or None when it is another ICMP message."""
    offset = 0
    if ip_header:
        if len(data) < 20:
            raise DecodeError("shorter than an IPv4 header", field="ip", offset=len(data))
        if data[0] >> 4 != 4:
            raise DecodeError(f"IP version {data[0] >> 4}, not 4", field="ip.version",
                              offset=0)
        offset = (data[0] & 0x0F) * 4
        if offset < 20:
            raise DecodeError(f"IHL {offset // 4} below 5", field="ip.ihl", offset=0)
    if len(data) < offset + _HEADER.size:
        raise DecodeError("shorter than an ICMP header", field="icmp", offset=offset)
    kind, _code, _sum, identifier, sequence = _HEADER.unpack_from(data, offset)
    if kind != ECHO_REPLY:
        return None
    return EchoReply(identifier, sequence)
