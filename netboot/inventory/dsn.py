"""PostgreSQL connection strings: checked and shown without their secrets; how long a
connection waits for a peer that stopped answering.

Apart from the PostgreSQL store so that the configuration can check a DSN and hold the
connection settings, and messages can name a database, without importing the driver (an
optional dependency).
"""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass

SCHEMES = ("postgresql", "postgres")

# How to get the driver (the ``postgresql`` extra's one requirement). Never "pip install
# 'netboot[postgresql]'": a pip without netboot installed fetches the PyPI project of that
# name, which is another one.
INSTALL_ASYNCPG = ("install asyncpg into netboot's environment (from the source checkout: "
                   "pip install '.[postgresql]')")


def problem(dsn: str) -> str | None:
    """What is wrong with ``dsn`` (None: nothing), in words that never repeat it."""
    try:
        parts = urllib.parse.urlsplit(dsn.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return "is not a valid URL (is its port a number? are [ ] only around an IPv6 host?)"
    if parts.scheme not in SCHEMES:
        return "does not start with postgresql://"
    if parts.fragment:
        return "has a '#' part, which a DSN never has (write a '#' in a password as %23)"
    return None


def redact(dsn: str) -> str:
    """``dsn`` without its password, nor any query parameter that might hold one."""
    try:
        parts = urllib.parse.urlsplit(dsn.strip())
    except ValueError:
        return "postgresql://(unparsable DSN)"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    shown = "&".join(f"{k}={'***' if 'pass' in k.lower() else v}" for k, v in query)
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, shown, ""))


@dataclass(frozen=True)
class PeerSettings:
    """How every connection to PostgreSQL notices a server (or the network to it) that
    vanished without a FIN or RST (a pulled cable, a failed-over VM, a firewall that dropped
    the connection's state): libpq's ``connect_timeout``, ``keepalives*`` and
    ``tcp_user_timeout`` (in seconds here, where libpq counts milliseconds), which asyncpg
    does not read from a DSN. Without them a query, a COMMIT or the LISTEN connection
    waits for the kernel's own bounds: ~15 minutes of retransmissions for data sent, two
    hours of silence before an idle connection is probed.

    The kernel does the watching, so a statement that runs long on a server that is there
    (a bulk import's COPY, a slow index scan) is not cut by it: the server's kernel
    answers every probe and acknowledges every byte while its backend works (the server's
    own ``statement_timeout``, below, bounds it, 60 s by default). Only a peer
    whose kernel answers nothing for ``tcp_user_timeout`` seconds ends the connection (the
    user timeout also bounds a zero window, a server that reads nothing of what was sent
    for that long: a COPY's rows are sent without it while the checks run,
    postgres.copy_records). With the
    defaults an idle connection is probed after 5 s of silence, every 2 s, and given up
    15 s after the peer's last word; data sent and not acknowledged for 15 s ends it too.
    A server whose kernel answers for it is asked by ``check_interval``/``check_timeout``
    (below): a silent one ends every connection within 15 s with the defaults."""

    connect_timeout: int = 10  # seconds for TCP, TLS and authentication, or the connect fails
    keepalives: bool = True  # false: no probes (then keepalives_* do nothing)
    keepalives_idle: int = 5  # seconds of silence before the first probe
    keepalives_interval: int = 2  # seconds between probes
    keepalives_count: int = 5  # unanswered probes that end the connection
    # Seconds sent data may stay unacknowledged (and, with probes on, the peer silent once
    # probing began) before the connection ends; 0: the kernel's own (~15 minutes).
    tcp_user_timeout: int = 15
    # A server whose kernel answers but which does not (its processes stopped or hung, a
    # proxy such as pgbouncer or HAProxy that keeps the client's side open after losing the
    # server): the kernel's probes are answered, so none of the above notices. Every
    # ``check_interval`` seconds the store asks it one round trip on its LISTEN connection
    # (Npgsql's ``Keepalive``, a query, not a TCP probe; libpq has none); unanswered
    # within ``check_timeout`` seconds, the server is taken as silent: every connection of
    # the store is ended, as a server restart would, and listened, asked and connected
    # again. The same check also looks at a pool session whose statement has waited longer
    # than ``check_timeout`` (its backend hung alone; a lock held by a session stuck in its
    # transaction: postgres.PostgresStore._look). 0: no checks (and a COPY's rows are sent
    # with the user timeout, the one bound left: postgres.copy_records).
    check_interval: int = 5
    check_timeout: int = 10
    # The server's own bounds on the store's pool sessions (PostgreSQL's settings of those
    # names, in seconds here; 0: none), set with the keepalives as a session is made. A
    # statement (a query, a write's, its lock wait, its COMMIT) running longer than
    # ``statement_timeout`` is cancelled by its backend: an ERROR, the write told failed.
    # A backend that cannot (stopped, hung: it shows "active" as one at work does) is the
    # check's: a statement waited for ``check_timeout`` past it is ended, and its backend
    # with it (postgres.PostgresStore._look). A session idle in its transaction for longer
    # than ``idle_in_transaction_session_timeout`` (this netboot stopped or hung
    # mid-write: it held the writers' lock, and every server's writes behind it) is ended
    # by the server, its transaction rolled back, the write told failed. A bulk import's
    # COPY is one statement: one larger than ``statement_timeout`` allows needs it raised.
    statement_timeout: int = 60
    idle_in_transaction_session_timeout: int = 30

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) for a value no kernel takes, else None."""
        # Linux's own bounds for the three probe settings (tcp(7)); a day for the others.
        for name, least, most in (("connect_timeout", 1, 86_400),
                                  ("keepalives_idle", 1, 32_767),
                                  ("keepalives_interval", 1, 32_767),
                                  ("keepalives_count", 1, 127),
                                  ("tcp_user_timeout", 0, 86_400),
                                  ("check_interval", 0, 86_400),
                                  ("check_timeout", 1, 86_400),
                                  ("statement_timeout", 0, 86_400),
                                  ("idle_in_transaction_session_timeout", 0, 86_400)):
            value = getattr(self, name)
            if not least <= value <= most:
                return name, f"{value} is not between {least} and {most}"
        return None

    def socket_options(self) -> list[tuple[int, int, int]]:
        """(level, option, value) to set on a TCP connection's socket; those the platform
        lacks (TCP_USER_TIMEOUT and TCP_KEEPIDLE are Linux's) are left out."""
        wanted = [(socket.SOL_SOCKET, "SO_KEEPALIVE", int(self.keepalives))]
        if self.keepalives:
            wanted += [(socket.IPPROTO_TCP, "TCP_KEEPIDLE", self.keepalives_idle),
                       (socket.IPPROTO_TCP, "TCP_KEEPINTVL", self.keepalives_interval),
                       (socket.IPPROTO_TCP, "TCP_KEEPCNT", self.keepalives_count)]
        wanted.append((socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", self.tcp_user_timeout * 1000))
        return [(level, getattr(socket, name), value) for level, name, value in wanted
                if hasattr(socket, name)]
