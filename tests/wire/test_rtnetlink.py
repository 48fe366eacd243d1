"""rtnetlink's IPv4 address messages: the codec against hand-made and kernel-made bytes."""

from __future__ import annotations

import socket
import struct

import pytest

from netboot.errors import DecodeError
from netboot.wire import rtnetlink
from netboot.wire.rtnetlink import AddressMessage, Done, Failed


def test_an_added_and_a_removed_address_in_one_datagram() -> None:
    data = (rtnetlink.address_message(new=True, ifindex=3, name="eth1", address="192.0.2.1",
                                      prefixlen=24)
            + rtnetlink.address_message(new=False, ifindex=4, name="vlan7:1",
                                        address="198.51.100.9", prefixlen=25, secondary=True))
    assert rtnetlink.parse(data) == [
        AddressMessage(True, 3, "eth1", "192.0.2.1", 24),
        # An alias's label ("vlan7:1") is its interface's name and a suffix.
        AddressMessage(False, 4, "vlan7", "198.51.100.9", 25, secondary=True),
    ]


def _message(kind: int, body: bytes, seq: int = 7) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_the_end_of_a_dump_errors_and_other_families() -> None:
    ipv6 = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2)
    data = (_message(rtnetlink.RTM_NEWADDR, ipv6) + _message(rtnetlink.NLMSG_NOOP, b"")
            + _message(rtnetlink.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)  # an ack
            + _message(rtnetlink.NLMSG_ERROR, struct.pack("=i", -1) + b"\0" * 16)
            + _message(rtnetlink.NLMSG_DONE, struct.pack("=i", 0)))
    assert rtnetlink.parse(data) == [Failed(7, 1), Done(7)]


def test_a_point_to_point_address_is_the_local_one() -> None:
    # IFA_ADDRESS is the peer's on a point-to-point link; IFA_LOCAL is ours (rtnetlink(7)).
    attrs = (struct.pack("=HH", 8, rtnetlink.IFA_ADDRESS) + socket.inet_aton("192.0.2.2")
             + struct.pack("=HH", 8, rtnetlink.IFA_LOCAL) + socket.inet_aton("192.0.2.1")
             + struct.pack("=HH", 8, rtnetlink.IFA_LABEL) + b"tun0"
             + struct.pack("=HH", 5, 99) + b"x" + b"\0\0\0")  # unknown, padded
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, 9) + attrs
    [message] = rtnetlink.parse(_message(rtnetlink.RTM_NEWADDR, body))
    assert message == AddressMessage(True, 9, "tun0", "192.0.2.1", 32)


@pytest.mark.parametrize("data", [
    struct.pack("=IHHII", 40, rtnetlink.RTM_NEWADDR, 0, 0, 0),  # longer than the datagram
    struct.pack("=IHHII", 8, rtnetlink.RTM_NEWADDR, 0, 0, 0),  # shorter than its header
    _message(rtnetlink.RTM_NEWADDR, b"\x02\x18"),  # no whole ifaddrmsg
    _message(rtnetlink.RTM_NEWADDR, struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 1)
             + struct.pack("=HH", 40, rtnetlink.IFA_LOCAL) + b"\0" * 4),  # attribute overrun
    _message(rtnetlink.NLMSG_ERROR, b"\0\0"),
])
def test_a_malformed_message_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        rtnetlink.parse(data)


def test_the_dump_request_is_what_iproute2_sends() -> None:
    # `ip -4 addr show`'s request (strace): RTM_GETADDR, NLM_F_REQUEST|NLM_F_DUMP, AF_INET.
    assert rtnetlink.dump_request(5) == struct.pack("=IHHIIBBBBI", 24, 22, 0x301, 5, 0,
                                                    socket.AF_INET, 0, 0, 0, 0)
