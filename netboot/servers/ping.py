"""asyncio adapter for the DHCP server's check that an address is free: one ICMP echo request
to it on the provisioning interface, and whether an echo reply came back within ``wait``.

dnsmasq (dhcp.c ``do_icmp_ping``/``icmp_ping``) and ISC dhcpd (``ping-check``) ping an
address before they offer it for the first time: a box given that address by hand, a
forgotten laptop, a device whose lease file was lost answers, and the address goes to no
second host (two hosts answering ARP for one address cut both off, and an install that
fetches its image over it fails half way). Which addresses are checked is decided purely
(:mod:`netboot.pingcheck`); this module only sends and listens, on the event loop: dnsmasq
stops serving DHCP for the whole wait (``delay_dhcp``), here the DISCOVER whose offer waits
is the only one that waits, and probes of different addresses run at once.

The socket, per interface (``SO_BINDTODEVICE``: the echo leaves by the link the DISCOVER came
in on, never another; for a relayed DISCOVER, or the one socket for every interface, one bound
to none: the kernel's route to the address picks the link), is the first of these that opens:

- an unprivileged ping socket (``SOCK_DGRAM``, ``IPPROTO_ICMP``) where
  ``net.ipv4.ping_group_range`` holds the process's group: the kernel hands it only the
  replies to its own requests;
- a raw ICMP socket (root or CAP_NET_RAW): it reads every ICMP message of the interface, so
  it asks the kernel for echo replies only (``ICMP_FILTER``) and matches its identifier.

Neither: the check is off, said once with the fix, and every offer goes out as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
from dataclasses import dataclass, field

from netboot.errors import DecodeError
from netboot.servers import sockets
from netboot.wire import icmp

_log = logging.getLogger(__name__)

# dnsmasq waits PING_WAIT = 3 s (config.h) and ISC dhcpd's ping-timeout is 1 s. A host on the
# link answers an echo in well under a millisecond once its address is resolved, and ARP is
# the slow part (the kernel's first probe is answered at once by a host that is there; it
# retries after 1 s, net.ipv4.neigh.*.retrans_time_ms). 1 s, as ISC's, is a second of every
# new device's first offer: under the 2 s iPXE waits before it sends its DISCOVER again.
PING_WAIT = 1.0
# Probes waiting at once (each ~0.3 KB: a future, a timer, a dict entry); past it an offer
# is not checked, as dnsmasq stops pinging under load (do_icmp_ping's "high-load mode").
# The DHCP server gives its own (servers/dhcp.PINGS_IN_FLIGHT).
PROBES_IN_FLIGHT = 1024
# ICMP_FILTER (linux/icmp.h) on a raw socket: a bit set per ICMP type not to deliver.
_SOL_RAW = 255
_ICMP_FILTER = 1


@dataclass
class _Socket:
    sock: socket.socket
    raw: bool
    identifier: int
    sequence: int = 0
    # address -> the probe waiting for its reply (or answered within the last wait: _done)
    waiting: dict[str, asyncio.Future[bool]] = field(default_factory=dict)


class Pinger:
    """Whether an address answers an ICMP echo within ``wait`` seconds, on an interface.

    Asked again for an address whose probe is still waiting (a DISCOVER sent again, two
    clients), the same probe answers both: one echo request per address at a time."""

    def __init__(self, *, wait: float = PING_WAIT, max_probes: int = PROBES_IN_FLIGHT) -> None:
        self.wait = wait
        self._max = max_probes
        self._sockets: dict[str | None, _Socket] = {}
        self._off: str | None = None  # why no socket opens (said once)
        self.sent = 0  # echo requests sent (tests, benchmarks)
        self.answered = 0

    @property
    def off(self) -> str | None:
        """Why the check is off (no ICMP socket could be opened), or None."""
        return self._off

    def prepare(self, interface: str | None) -> None:
        """Open ``interface``'s socket now (start-up: the log says at once whether the check
        is on, and how), not at the first DISCOVER."""
        if interface not in self._sockets and self._off is None:
            self._open(interface)

    def kind(self, interface: str | None) -> str | None:
        """The socket the check uses on ``interface``: "raw", "ping", or None (none yet)."""
        entry = self._sockets.get(interface)
        return None if entry is None else "raw" if entry.raw else "ping"

    def _in_flight(self) -> int:
        """Probes kept: those waiting and those just answered (_done)."""
        return sum(len(s.waiting) for s in self._sockets.values())

    async def answers(self, ip: str, interface: str | None) -> bool | None:
        """True: ``ip`` answered (in use); False: nothing within ``wait``; None: not
        checked (no ICMP socket, too many probes waiting, the send refused)."""
        entry = self._sockets.get(interface)
        if entry is None:
            if self._off is not None:
                return None
            entry = self._open(interface)
            if entry is None:
                return None
        probe = entry.waiting.get(ip)
        if probe is None:
            if self._in_flight() >= self._max:
                _log.debug("dhcp: ping of %s not sent: %d probes waiting", ip, self._max)
                return None
            loop = asyncio.get_running_loop()
            entry.sequence = (entry.sequence + 1) & 0xFFFF
            try:
                entry.sock.sendto(icmp.echo_request(entry.identifier, entry.sequence,
                                                    b"netboot"), (ip, 0))
            except OSError as exc:
                # EHOSTUNREACH/ENETUNREACH: no neighbour or route there, nobody to answer;
                # EPERM: a firewall rule; EAGAIN: the socket's buffer full. Offered as before.
                _log.debug("dhcp: ping of %s on %s not sent: %s", ip, interface, exc)
                return None
            self.sent += 1
            probe = loop.create_future()
            entry.waiting[ip] = probe
            timer = loop.call_later(self.wait, _settle, probe, False)
            probe.add_done_callback(functools.partial(_done, entry, ip, timer, self.wait))
        # Shielded: a request's task cancelled (the server stopping) leaves the probe to the
        # others that wait on it.
        return await asyncio.shield(probe)

    def _open(self, interface: str | None) -> _Socket | None:
        errors = []
        for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
            try:
                sock = socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP)
            except OSError as exc:
                errors.append(f"{'raw' if raw else 'ping'} socket: {exc.strerror or exc}")
                continue
            try:
                if interface is not None:
                    sock.setsockopt(socket.SOL_SOCKET, sockets.SO_BINDTODEVICE,
                                    interface.encode())
                if raw:
                    sock.setsockopt(_SOL_RAW, _ICMP_FILTER,
                                    (~(1 << icmp.ECHO_REPLY) & 0xFFFFFFFF).to_bytes(4, "little"))
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                errors.append(f"{'raw' if raw else 'ping'} socket on {interface}: "
                              f"{exc.strerror or exc}")
                continue
            # A ping socket's identifier is the kernel's (its "port"); a raw socket's ours.
            entry = _Socket(sock, raw, int.from_bytes(os.urandom(2), "big"))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._read, entry)
            self._sockets[interface] = entry
            _log.info("dhcp: ping check on %s: %s socket, answers waited for %d ms",
                      interface or "the interface the routes choose",
                      "raw ICMP" if raw else "unprivileged ping", round(self.wait * 1000))
            return entry
        self._off = "; ".join(errors)
        _log.warning(
            "dhcp: ping check off: no ICMP socket opens (%s). Addresses are offered without "
            "checking that no host already uses them. Run netboot as root or with "
            "CAP_NET_RAW, or let its group open ping sockets (sysctl -w "
            "net.ipv4.ping_group_range='0 2147483647'), or set dhcp.ping_check: false",
            self._off)
        return None

    def _read(self, entry: _Socket) -> None:
        for _ in range(64):  # bounded per wake-up: other sockets are served meanwhile
            try:
                data, peer = entry.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # A ping socket reports ICMP errors (host unreachable) this way.
                if exc.errno not in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                     errno.ECONNREFUSED):
                    _log.debug("dhcp: ICMP socket: %s", exc)
                continue
            try:
                reply = icmp.parse_echo_reply(data, ip_header=entry.raw)
            except DecodeError as exc:
                _log.debug("dhcp: ICMP from %s dropped: %s", peer[0], exc)
                continue
            if reply is None or (entry.raw and reply.identifier != entry.identifier):
                continue  # another program's echo (a raw socket reads them all)
            probe = entry.waiting.get(peer[0])
            if probe is not None and not probe.done():
                self.answered += 1
                probe.set_result(True)

    def close(self) -> None:
        for entry in self._sockets.values():
            with contextlib.suppress(RuntimeError):  # the loop closed already
                asyncio.get_running_loop().remove_reader(entry.sock.fileno())
            entry.sock.close()
            for probe in entry.waiting.values():
                if not probe.done():
                    probe.set_result(False)
        self._sockets.clear()


def _settle(probe: asyncio.Future[bool], answered: bool) -> None:
    if not probe.done():
        probe.set_result(answered)


def _done(entry: _Socket, ip: str, timer: asyncio.TimerHandle, wait: float,
          probe: asyncio.Future[bool]) -> None:
    """The probe's answer is kept for another ``wait``: a DISCOVER sent again just as it
    ended (its waiter not yet resumed to record it, pingcheck.PingChecks) is told at once,
    not sent a second echo and kept waiting (10 of 240 in a storm, benchmarks/dhcp_ping.py)."""
    timer.cancel()
    asyncio.get_running_loop().call_later(wait, _forget, entry, ip, probe)


def _forget(entry: _Socket, ip: str, probe: asyncio.Future[bool]) -> None:
    if entry.waiting.get(ip) is probe:
        del entry.waiting[ip]

