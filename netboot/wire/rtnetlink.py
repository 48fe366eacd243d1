"""rtnetlink's IPv4 address messages (rtnetlink(7), netlink(7)): a pure codec.

What netboot needs to follow interfaces as dnsmasq's ``--bind-dynamic`` does: the request for
a dump of every IPv4 address (``RTM_GETADDR`` with ``NLM_F_DUMP``), and the messages that
answer it and that the kernel multicasts to ``RTMGRP_IPV4_IFADDR`` whenever an address is
added or removed (``RTM_NEWADDR``/``RTM_DELADDR``). No sockets here: the adapter is
:mod:`netboot.servers.interfaces`.

Layout (linux/netlink.h, linux/if_addr.h), host byte order: ``nlmsghdr`` (length u32, type
u16, flags u16, seq u32, pid u32), then ``ifaddrmsg`` (family u8, prefixlen u8, flags u8,
scope u8, index u32), then attributes (``rtattr``: length u16, type u16, value), each padded
to 4 bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from netboot.errors import DecodeError

AF_INET = 2  # linux/socket.h (a codec imports no socket module: DESIGN.md)
RTMGRP_IPV4_IFADDR = 0x10
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_F_SECONDARY = 0x01

_HEADER = struct.Struct("=IHHII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")


# NamedTuples, not dataclasses: made at import, a frozen dataclass costs ~0.7 ms and
# `serve` imports this at start (the ready time is a target); a NamedTuple ~0.15 ms.
class AddressMessage(NamedTuple):
    """One IPv4 address added (``new``) or removed on an interface."""

    new: bool
    ifindex: int
    name: str  # the interface's name (from IFA_LABEL; "" when the kernel sent none)
    address: str
    prefixlen: int
    secondary: bool = False


class Done(NamedTuple):
    """The end of a dump (``seq`` is the request's)."""

    seq: int


class Failed(NamedTuple):
    """An ``NLMSG_ERROR`` with a non-zero errno (an acknowledgement has errno 0: dropped)."""

    seq: int
    errno: int


Message = AddressMessage | Done | Failed


def _align(n: int) -> int:
    return (n + 3) & ~3


def dump_request(seq: int) -> bytes:
    """``RTM_GETADDR`` asking for every IPv4 address (answered by a dump ending in Done)."""
    body = _IFADDRMSG.pack(AF_INET, 0, 0, 0, 0)
    return _HEADER.pack(_HEADER.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                        seq, 0) + body


def address_message(*, new: bool, ifindex: int, name: str, address: str, prefixlen: int,
                    seq: int = 0, secondary: bool = False) -> bytes:
    """What the kernel sends for one address (tests; the inverse of :func:`parse`)."""
    packed = ipaddress.IPv4Address(address).packed
    label = name.encode() + b"\0"
    attrs = b""
    for kind, value in ((IFA_ADDRESS, packed), (IFA_LOCAL, packed), (IFA_LABEL, label)):
        attr = _RTATTR.pack(_RTATTR.size + len(value), kind) + value
        attrs += attr + b"\0" * (_align(len(attr)) - len(attr))
    body = _IFADDRMSG.pack(AF_INET, prefixlen,
                           IFA_F_SECONDARY if secondary else 0, 0, ifindex) + attrs
    return _HEADER.pack(_HEADER.size + len(body), RTM_NEWADDR if new else RTM_DELADDR, 0,
                        seq, 0) + body


def parse(data: bytes) -> list[Message]:
    """Every message of one datagram the socket read: IPv4 address messages, the end of a
    dump and errors; others (IPv6, no-ops, acknowledgements) are left out. A truncated or
    inconsistent message raises DecodeError (the kernel never sends one: a bug to log)."""
    out: list[Message] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise DecodeError(f"netlink message of {length} bytes at {offset} of {len(data)}")
        body = data[offset + _HEADER.size:offset + length]
        offset += _align(length)
        if kind == NLMSG_DONE:
            out.append(Done(seq))
        elif kind == NLMSG_ERROR:
            if len(body) < 4:
                raise DecodeError("netlink error message without its errno")
            errno = -struct.unpack_from("=i", body)[0]
            if errno:
                out.append(Failed(seq, errno))
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            message = _address(body, new=kind == RTM_NEWADDR)
            if message is not None:
                out.append(message)
    return out


def _address(body: bytes, *, new: bool) -> AddressMessage | None:
    if len(body) < _IFADDRMSG.size:
        raise DecodeError("address message shorter than its ifaddrmsg")
    family, prefixlen, flags, _scope, index = _IFADDRMSG.unpack_from(body)
    if family != AF_INET:
        return None
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(body):
        size, kind = _RTATTR.unpack_from(body, offset)
        if size < _RTATTR.size or offset + size > len(body):
            raise DecodeError(f"address attribute of {size} bytes at {offset}")
        attrs[kind] = body[offset + _RTATTR.size:offset + size]
        offset += _align(size)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
    # point-to-point link, and the same as IFA_LOCAL elsewhere (rtnetlink(7)).
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or len(raw) != 4:
        return None
    # An alias's label is "eth0:1"; an interface name never holds ':' (the kernel's
    # dev_valid_name), so what precedes it is the interface.
    label = attrs.get(IFA_LABEL, b"").split(b"\0", 1)[0].decode("ascii", "replace")
    return AddressMessage(new, index, label.split(":", 1)[0], str(ipaddress.IPv4Address(raw)),
                          prefixlen, bool(flags & IFA_F_SECONDARY))
