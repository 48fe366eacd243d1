"""A tiny capture reader for tests: classic pcap and pcapng, Ethernet / IPv4 / UDP only.

Enough to pull the DHCP datagrams out of the lab captures in tests/data/pcaps (no scapy).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PCAPS = Path(__file__).parent / "data" / "pcaps"
LINKTYPE_ETHERNET = 1


@dataclass(frozen=True)
class Datagram:
    frame: int  # 1-based, as tshark numbers frames
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def _frames_pcap(data: bytes) -> Iterator[bytes]:
    magic = data[:4]
    if magic == b"\xd4\xc3\xb2\xa1":
        endian = "<"
    elif magic == b"\xa1\xb2\xc3\xd4":
        endian = ">"
    else:
        raise ValueError("not a pcap file")
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    if linktype != LINKTYPE_ETHERNET:
        raise ValueError(f"link type {linktype} is not Ethernet")
    offset = 24
    while offset + 16 <= len(data):
        _, _, incl, _ = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        yield data[offset : offset + incl]
        offset += incl


def _frames_pcapng(data: bytes) -> Iterator[bytes]:
    offset = 0
    endian = "<"
    linktypes: list[int] = []
    while offset + 12 <= len(data):
        block_type = struct.unpack_from(endian + "I", data, offset)[0]
        if block_type == 0x0A0D0D0A:  # section header: byte-order magic decides endianness
            endian = "<" if data[offset + 8 : offset + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            linktypes = []
        length = struct.unpack_from(endian + "I", data, offset + 4)[0]
        if length < 12:
            raise ValueError(f"bad pcapng block length at {offset}")
        body = data[offset + 8 : offset + length - 4]
        if block_type == 1:  # interface description
            linktypes.append(struct.unpack_from(endian + "H", body, 0)[0])
        elif block_type == 6:  # enhanced packet
            iface, _, _, caplen, _ = struct.unpack_from(endian + "IIIII", body, 0)
            if linktypes[iface] == LINKTYPE_ETHERNET:
                yield body[20 : 20 + caplen]
        elif block_type == 3:  # simple packet
            yield body[4:]
        offset += length


def frames(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        return list(_frames_pcapng(data))
    return list(_frames_pcap(data))


def udp_datagrams(path: Path) -> Iterator[Datagram]:
    for number, frame in enumerate(frames(path), start=1):
        if len(frame) < 14:
            continue
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        offset = 14
        if ethertype == 0x8100:  # 802.1Q tag
            ethertype = struct.unpack_from("!H", frame, 16)[0]
            offset = 18
        if ethertype != 0x0800:
            continue
        ip = frame[offset:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[9] != 17:  # UDP
            continue
        src = ".".join(str(b) for b in ip[12:16])
        dst = ".".join(str(b) for b in ip[16:20])
        udp = ip[ihl:total]
        sport, dport, length = struct.unpack_from("!HHH", udp, 0)
        yield Datagram(number, src, sport, dst, dport, bytes(udp[8:length]))


def dhcp_datagrams(path: Path) -> list[Datagram]:
    """Every UDP datagram to or from ports 67, 68 or 4011."""
    ports = {67, 68, 4011}
    return [d for d in udp_datagrams(path) if d.sport in ports or d.dport in ports]


def capture(name: str) -> Path:
    return PCAPS / f"{name}.pcap"


def all_captures() -> list[Path]:
    return sorted(PCAPS.glob("*.pcap"))
