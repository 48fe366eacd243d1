"""The ICMP echo codec against echoes the kernel made (ping's request as sent, the reply as a
raw socket and a ping socket read it), and malformed input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netboot.errors import DecodeError
from netboot.wire import icmp

# Read on a raw socket in a test namespace (kernel 6.x) after echo_request(0x1234, 1,
# b"netboot") was sent to 127.0.0.1: first the request itself (loopback: a raw socket reads
# what leaves too), then the kernel's reply, checksums the kernel's.
RAW_REQUEST = bytes.fromhex(
    "4500002314034000400128d57f0000017f000001" "08001f9312340001" + b"netboot".hex())
RAW_REPLY = bytes.fromhex(
    "4500002314040000400168d47f0000017f000001" "0000279312340001" + b"netboot".hex())

def test_a_request_carries_a_checksum_that_sums_to_zero() -> None:
    data = icmp.echo_request(0x1234, 1, b"netboot")
    assert data[:2] == b"\x08\x00" and data[4:8] == b"\x12\x34\x00\x01"
    assert icmp.checksum(data) == 0  # RFC 1071: a packet with its checksum sums to 0
    assert data == RAW_REQUEST[20:]  # what the kernel sent


def test_a_reply_read_on_a_raw_socket_and_on_a_ping_socket() -> None:
    assert icmp.parse_echo_reply(RAW_REPLY, ip_header=True) == icmp.EchoReply(0x1234, 1)
    assert icmp.parse_echo_reply(RAW_REPLY[20:], ip_header=False) == icmp.EchoReply(0x1234, 1)


def test_other_icmp_messages_are_not_replies() -> None:
    unreachable = bytes.fromhex("0301fcfe00000000")  # destination (host) unreachable
    assert icmp.parse_echo_reply(unreachable, ip_header=False) is None
    assert icmp.parse_echo_reply(RAW_REQUEST, ip_header=True) is None  # our own, looped


@pytest.mark.parametrize(("data", "raw", "field"), [
    (b"\x45\x00", True, "ip"),
    (b"\x65" + bytes(27), True, "ip.version"),
    (b"\x44" + bytes(27), True, "ip.ihl"),
    (RAW_REPLY[:24], True, "icmp"),
    (b"\x00\x00\x00", False, "icmp"),
])
def test_short_or_malformed_input_is_a_decode_error(data: bytes, raw: bool,
                                                    field: str) -> None:
    with pytest.raises(DecodeError) as err:
        icmp.parse_echo_reply(data, ip_header=raw)
    assert err.value.field == field


@given(st.binary(max_size=64), st.booleans())
def test_any_bytes_parse_or_raise_decode_error(data: bytes, raw: bool) -> None:
    with contextlib.suppress(DecodeError):
        icmp.parse_echo_reply(data, ip_header=raw)
