"""Which address a registering device is reachable at: a pure decision over what the wire saw.

A device registers with ``POST /api/v1/register`` and may report its addresses. What it reports
is a claim made from inside the OS, and often a wrong one: k3OS's ``hostname -i`` answers
``127.0.1.1`` (its ``/etc/hosts`` maps the hostname to that loopback address, as Debian's
does), a DHCP-less NIC reports ``169.254.x.y``, a shell expansion that failed reports ``""``.
The address the request came from on the provisioning network is a fact: it is what other
nodes of the same network reach the device at.

The rule: the peer address wins when it is a routable unicast address. A reported address is
used only when the peer is not (netboot behind a reverse proxy on the same host sees
``127.0.0.1``); then the first routable unicast address the device reports, IPv4 first.
Loopback, link-local, unspecified, multicast, broadcast (limited or a reserved range's) and
unparsable entries are never stored; each one is named with the reason, for an event.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from netboot.errors import ValidationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# "This host on this network" (RFC 1122 §3.2.1.3): a source address only, never a destination.
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
# The limited broadcast (RFC 919), made once: an address parsed from its text is ~30,000
# instructions, and unusable() made it twice a registration (the reported address and the
# peer), half of what choosing a registration's address cost (benchmarks/README.md,
# s42-tail: the register POSTs of a storm's tail).
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(frozen=True, slots=True)
class Refused:
    text: str  # the address as given (untrusted; repr it when printing)
    reason: str
    source: str  # "peer" | "reported"


@dataclass(frozen=True, slots=True)
class AddressChoice:
    """The registered addresses and what was refused on the way."""

    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    source: str | None  # "peer" | "reported" | None (no usable address)
    refused: tuple[Refused, ...] = ()

    @property
    def address(self) -> IPAddress | None:
        """The one address other nodes should use: IPv4 when there is one."""
        return self.ipv4 or self.ipv6


def parse_peer(text: str | None) -> IPAddress | None:
    """The peer of a transport, as an address; an IPv4-mapped IPv6 peer (``::ffff:192.0.2.60``,
    seen when the server listens on a dual-stack socket) is the IPv4 address it maps."""
    if not text:
        return None
    try:
        address = _address(text)
    except ValueError:
        return None  # a UNIX socket or a proxy's odd peer: not an address we can use
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def unusable(address: IPAddress) -> str | None:
    """Why other nodes cannot reach a device at this address, or None if they can."""
    if address.is_unspecified or address in _THIS_NETWORK:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and (
            address == _BROADCAST or address.is_reserved):
        # 240.0.0.0/4 (RFC 1112 §4) holds the limited broadcast and nothing routable.
        return "broadcast or reserved"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return unusable(address.ipv4_mapped)
    return None


def _address(text: str) -> IPAddress:
    """``ipaddress.ip_address(text)``, a dotted-quad IPv4 address from its four bytes: the
    address built from bytes skips ipaddress's parse of the text, ~15,000 instructions
    (benchmarks/README.md, s42-tail). Only a text that is the bytes' own canonical spelling
    (inet_ntoa of what inet_pton read: four decimal parts of at most 255, no leading zero,
    nothing around them, whatever a C library's inet_pton also takes) is read so; anything
    else is ipaddress's to parse or refuse (ValueError)."""
    try:
        packed = socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return ipaddress.ip_address(text)
    if socket.inet_ntoa(packed) != text:
        return ipaddress.ip_address(text)
    return ipaddress.IPv4Address(packed)


def _parse(text: str) -> IPAddress | str:
    try:
        return _address(text.strip())
    except ValueError:
        return "not an IP address"


def choose(peer: IPAddress | None, reported: Sequence[str]) -> AddressChoice:
    """The addresses to register for a device, from its peer address and its own report."""
    refused: list[Refused] = []
    usable: list[IPAddress] = []
    peer_reason = None if peer is None else unusable(peer)
    # The peer's own address as the device reports it (the register command reports the
    # address it has; the storm's devices all do): the peer is taken for its version below,
    # so that text parsed and checked again changes nothing (~35,000 instructions a
    # registration; benchmarks/README.md, s42-tail).
    own = str(peer) if peer is not None and peer_reason is None else None
    for text in reported:
        if text == own:
            continue
        parsed = _parse(text)
        reason = parsed if isinstance(parsed, str) else unusable(parsed)
        if reason is not None:
            refused.append(Refused(text, reason, "reported"))
        elif not isinstance(parsed, str) and parsed not in usable:
            usable.append(parsed)
    if peer is not None:
        if peer_reason is None:
            other = [a for a in usable if a.version != peer.version]
            v4 = peer if isinstance(peer, ipaddress.IPv4Address) else _first_v4(other)
            v6 = peer if isinstance(peer, ipaddress.IPv6Address) else _first_v6(other)
            return AddressChoice(v4, v6, "peer", tuple(refused))
        refused.insert(0, Refused(str(peer), peer_reason, "peer"))
    if not usable:
        return AddressChoice(None, None, None, tuple(refused))
    return AddressChoice(_first_v4(usable), _first_v6(usable), "reported", tuple(refused))


def _first_v4(items: Sequence[IPAddress]) -> ipaddress.IPv4Address | None:
    return next((a for a in items if isinstance(a, ipaddress.IPv4Address)), None)


def _first_v6(items: Sequence[IPAddress]) -> ipaddress.IPv6Address | None:
    return next((a for a in items if isinstance(a, ipaddress.IPv6Address)), None)


def check_fixed_ipv4(fixed: str | None, server: Collection[str]) -> None:
    """A machine's ``fixed_ipv4`` must not be an address of the netboot server itself (any
    of its interfaces', the advertised one) or the DHCP router's (``server``: what the
    running server knows; empty where nothing is known, the CLI on its own): a device given
    it clashes with the server on the wire, and authoritative DHCP refuses it at offer time
    as dnsmasq does (LeasePool.fixed_refused). A 400 naming the field, not a machine that
    never gets its address."""
    if fixed is not None and fixed in server:
        raise ValidationError("fixed_ipv4", f"{fixed} is an address of this netboot server "
                              "or its DHCP router: give the machine an address of its own")
