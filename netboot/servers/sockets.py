"""Socket facts every listener needs: an interface's address, and bind errors in words.

A listener that cannot bind stops start-up with a ConfigError that names the port, what is
probably holding it, the config key and the flag to change it (DESIGN.md §5): one mapping
from errno to advice, shared by DHCP, TFTP, DNS and HTTP.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

from netboot.errors import ConfigError

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
# Each datagram read with its kernel receive time, a struct timespec of CLOCK_REALTIME
# (socket(7); asm-generic's SO_TIMESTAMPNS_OLD, which Python's socket module does not name).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SIOCGIFADDR = 0x8915


# A listener's receive queue: a boot storm arrives faster than Python drains it, and at the
# kernel's default (~200 KiB, ~200 DHCP datagrams with their overhead) a burst of a thousand
# DISCOVERs was dropped before netboot saw it. dnsmasq and BIND raise theirs the same way.
LISTENER_RCVBUF = 4 << 20


def grow_receive_buffer(sock: socket.socket, size: int = LISTENER_RCVBUF) -> None:
    """Ask for ``size`` bytes of receive queue: past ``net.core.rmem_max`` when privileged
    (SO_RCVBUFFORCE needs CAP_NET_ADMIN), else as much as rmem_max allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def interface_ipv4(name: str, *, key: str = "server.interfaces") -> str:
    """The first IPv4 address of interface ``name`` (SIOCGIFADDR), or ConfigError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            raise ConfigError(
                f"cannot read an IPv4 address of interface {name!r}: {exc.strerror}",
                key=key,
                fix="give an interface that has an IPv4 address, or set --advertise",
            ) from exc
    return socket.inet_ntoa(raw[20:24])


def bind_error(
    exc: OSError,
    *,
    what: str,
    proto: str,
    host: str,
    port: int,
    key: str,
    flag: str,
    interface: str | None = None,
    interface_key: str = "server.interfaces",
    address_key: str | None = None,
    others: str = "",
) -> ConfigError:
    """Why ``what`` could not listen on ``proto`` ``host:port``, and what to do about it.

    ``others`` names the usual suspects for a port in use ("dnsmasq, tftpd-hpa").
    """
    where = f"{proto} {host}:{port}" + (f" on {interface}" if interface else "")
    if exc.errno == errno.EADDRINUSE:
        suspects = f" (another {what} server such as {others}?)" if others else ""
        return ConfigError(
            f"{what}: {where} is already in use by another service{suspects}; "
            f"see: ss -lpn '( sport = :{port} )'",
            key=key, fix=f"stop the other service or choose another port with {flag}",
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        if interface and port >= 1024:
            return ConfigError(
                f"{what}: binding to interface {interface} needs CAP_NET_RAW ({exc.strerror})",
                key=interface_key, fix="run as root, grant CAP_NET_RAW, or drop --interface",
            )
        needs = "root or CAP_NET_BIND_SERVICE" + (" and CAP_NET_RAW" if interface else "")
        return ConfigError(
            f"{what}: {where} needs {needs}", key=key,
            fix=f"run as root, grant the capability, or use {flag} with a port above 1023",
        )
    if exc.errno == errno.ENODEV:
        return ConfigError(f"{what}: no network interface named {interface!r}",
                           key=interface_key, fix="name an existing interface with --interface")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{what}: {host} is not an address of this host",
                           key=address_key or key,
                           fix="use the provisioning interface's address")
    return ConfigError(f"{what}: cannot listen on {where}: {exc.strerror or exc}", key=key,
                       fix=f"change the port ({flag}) or the address")
