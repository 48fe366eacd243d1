"""The host's IPv4 addresses, followed as they come and go: an rtnetlink socket in asyncio.

dnsmasq's ``--bind-dynamic`` listens on an interface that comes up after it started and
lets go of one that went away, following the kernel's address events; netboot's DHCP and
DNS listeners were made once, at start, so an interface brought up later (a VLAN, a USB
NIC, a bridge made by a hypervisor after boot) was never served, and a socket bound to an
address that went away stayed open. :class:`InterfaceWatcher` reads every IPv4 address once
(a dump) and then the kernel's ``RTM_NEWADDR``/``RTM_DELADDR`` multicasts
(``RTMGRP_IPV4_IFADDR``), and tells its subscribers the new set whenever it changed: within
milliseconds of ``ip addr add``, not at a rescan's next tick. The codec is
:mod:`netboot.wire.rtnetlink`; subscribing to the group needs no privilege.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable

from netboot.errors import DecodeError
from netboot.wire import rtnetlink
from netboot.wire.rtnetlink import AddressMessage, Done, Failed

_log = logging.getLogger(__name__)

SIOCGIFNETMASK = 0x891B
# How long start() waits for the first dump: the kernel answers in microseconds.
DUMP_TIMEOUT = 2.0

Addresses = tuple[AddressMessage, ...]  # every IPv4 address, in the kernel's order


def network(entry: AddressMessage) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{entry.address}/{entry.prefixlen}", strict=False)


def first_address(addresses: Iterable[AddressMessage], name: str) -> str | None:
    """An interface's primary address (what SIOCGIFADDR reads): its first that is not a
    secondary one, else its first."""
    mine = [a for a in addresses if a.name == name]
    return next((a.address for a in mine if not a.secondary),
                mine[0].address if mine else None)


IF_INET6 = "/proc/net/if_inet6"  # Linux: every IPv6 address of this namespace, one a line


def ipv6_networks(text: str) -> tuple[ipaddress.IPv6Network, ...]:
    """The on-link networks of ``/proc/net/if_inet6`` lines (``<32 hex digits> <ifindex>
    <prefix length> <scope> <flags> <name>``, all hex), loopback and link-local left out:
    a link-local source is on a link of this host by definition (RFC 4291 §2.5.6: no router
    forwards it), which the caller knows without a table."""
    found: list[ipaddress.IPv6Network] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or len(fields[0]) != 32:
            continue
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            net = ipaddress.IPv6Network(f"{address}/{int(fields[2], 16)}", strict=False)
        except ValueError:
            continue
        if not (address.is_loopback or address.is_link_local) and net not in found:
            found.append(net)
    return tuple(found)


class Ipv6Networks:
    """This host's IPv6 on-link networks, for "is this client on one of my networks"
    (the watcher follows IPv4 only: its listeners, DHCP's and DNS's, are IPv4). Read from
    ``/proc/net/if_inet6`` (of the namespace: a few microseconds, no I/O that blocks) at the
    first question, and again when asked about an address none holds, at most once a
    second: an address added later counts within a second, and a flood of strangers' queries
    costs one read a second."""

    def __init__(self, path: str = IF_INET6, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._nets: tuple[ipaddress.IPv6Network, ...] = ()
        self._read_at: float | None = None

    def holds(self, ip: ipaddress.IPv6Address) -> bool:
        if any(ip in net for net in self._nets):
            return True
        now = self._clock()
        if self._read_at is not None and now - self._read_at < 1.0:
            return False
        self._read_at = now
        try:
            with open(self._path, encoding="ascii") as file:
                self._nets = ipv6_networks(file.read())
        except OSError:  # no IPv6 in this kernel or namespace: no IPv6 network is ours
            self._nets = ()
        return any(ip in net for net in self._nets)


class _Table:
    """The addresses as the kernel's messages describe them (pure)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, str, int], AddressMessage] = {}

    def apply(self, message: AddressMessage) -> None:
        key = (message.ifindex, message.address, message.prefixlen)
        if message.new:
            self.entries[key] = message
        else:
            self.entries.pop(key, None)

    def addresses(self) -> Addresses:
        return tuple(self.entries.values())


def snapshot_by_ioctl() -> Addresses:
    """Each interface's primary IPv4 address and its mask (SIOCGIFADDR, SIOCGIFNETMASK):
    what is known where no netlink socket can be had."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), 0x8915, request)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK,
                                                    request)[20:24])
            except OSError:
                continue
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
            found.append(AddressMessage(True, index, name, address, prefix))
    return tuple(found)


class InterfaceWatcher:
    """Every IPv4 address of the host, kept current from rtnetlink; subscribers are called
    (on the event loop) with the new set each time it changes."""

    def __init__(self) -> None:
        self._table = _Table()
        self._dumping: _Table | None = None
        self._seq = 0
        self._sock: socket.socket | None = None
        self._subscribers: list[Callable[[Addresses], None]] = []
        self._dumped: asyncio.Event | None = None
        self.following = False  # False: a snapshot at start only (no netlink socket)

    def addresses(self) -> Addresses:
        return self._table.addresses()

    def subscribe(self, callback: Callable[[Addresses], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[Addresses], None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    async def start(self) -> None:
        if self._sock is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.NETLINK_ROUTE)
        except (OSError, AttributeError) as exc:
            _log.warning("interfaces: no rtnetlink socket (%s): serving the interfaces found "
                         "now; one that comes up later needs a restart", exc)
            for entry in snapshot_by_ioctl():
                self._table.apply(entry)
            return
        try:
            # Subscribed before the dump is asked: no change falls between the two.
            sock.bind((0, rtnetlink.RTMGRP_IPV4_IFADDR))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._dumped = asyncio.Event()
        loop.add_reader(sock.fileno(), self._readable)
        self._dump()
        try:
            async with asyncio.timeout(DUMP_TIMEOUT):
                await self._dumped.wait()
        except TimeoutError:
            _log.warning("interfaces: the kernel did not list the addresses within %.0f s",
                         DUMP_TIMEOUT)
        self.following = True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        self._subscribers.clear()

    def _dump(self) -> None:
        assert self._sock is not None
        self._seq += 1
        self._dumping = _Table()
        try:
            self._sock.send(rtnetlink.dump_request(self._seq))
        except OSError as exc:
            _log.warning("interfaces: asking the kernel for the addresses failed: %s", exc)
            self._dumping = None

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        before = self._table.addresses()
        for _ in range(64):  # bounded: the loop serves DHCP between reads
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The kernel dropped events (a burst beyond the socket's buffer): what
                    # is known may be wrong, so ask for the whole list again.
                    _log.warning("interfaces: address events lost; listing them again")
                    self._dump()
                    continue
                _log.error("interfaces: reading the address events failed: %s", exc)
                break
            try:
                messages = rtnetlink.parse(data)
            except DecodeError as exc:
                _log.error("interfaces: unreadable address event: %s", exc)
                continue
            self._take(messages)
        after = self._table.addresses()
        if after != before:
            self._changed(before, after)

    def _take(self, messages: list[rtnetlink.Message]) -> None:
        for message in messages:
            if isinstance(message, AddressMessage):
                entry = message
                if not entry.name:  # the kernel always labels IPv4 addresses; in case not
                    try:
                        name = socket.if_indextoname(entry.ifindex)
                    except OSError:
                        name = ""
                    entry = entry._replace(name=name)
                if self._dumping is not None:
                    self._dumping.apply(entry)
                self._table.apply(entry)
            elif isinstance(message, Done) and message.seq == self._seq:
                if self._dumping is not None:
                    self._table = self._dumping
                    self._dumping = None
                if self._dumped is not None:
                    self._dumped.set()
            elif isinstance(message, Failed):
                _log.warning("interfaces: the kernel refused the address listing: errno %d",
                             message.errno)
                if self._dumped is not None:
                    self._dumped.set()

    def _changed(self, before: Addresses, after: Addresses) -> None:
        if not self.following:
            return  # the first listing, at start: the listeners say what they serve
        old = {(a.name, a.address, a.prefixlen) for a in before}
        new = {(a.name, a.address, a.prefixlen) for a in after}
        for name, address, prefix in sorted(new - old):
            _log.info("interfaces: %s/%d added on %s", address, prefix, name)
        for name, address, prefix in sorted(old - new):
            _log.info("interfaces: %s/%d removed from %s", address, prefix, name)
        for callback in list(self._subscribers):
            try:
                callback(after)
            except Exception:  # one subscriber's bug never stops the others
                _log.exception("interfaces: a listener failed to follow the change")
