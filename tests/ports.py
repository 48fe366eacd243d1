"""TCP ports a test names before its server binds them (a child's ``--http-port``, a config's
``port:``): reserved, not probed.

A probe (bind port 0, read the port, close) leaves the port to whoever binds next: another
process's bind to port 0 (the other lane of ``pytest -n 2``, a child ``netboot serve``) may be
given it before the test's server binds it, and the server then fails, or (two listeners
with SO_REUSEADDR, one not yet listening; uvloop's silent listen: netboot.servers.http._held)
the test's client reaches the other process. A reserved port has had a connection closed on
its side: that connection waits in TIME_WAIT (60 s on Linux), and the kernel gives no bind
to port 0 a port with a TIME_WAIT connection on it, while a bind of that very port with
SO_REUSEADDR (asyncio's and aiohttp's default, libuv's and dnsmasq's always) is let through.

UDP has no TIME_WAIT: a UDP port a test must name is still a probe (a taken one fails its
server's bind, loudly).
"""

from __future__ import annotations

import socket


def reserved_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that no bind to port 0 is given for the next 60 s, for a server
    that binds it with SO_REUSEADDR."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        with socket.create_connection((host, port), timeout=10):
            accepted, _ = listener.accept()
            # Closed first on this side: the connection's TIME_WAIT holds host:port.
            accepted.close()
    return port
