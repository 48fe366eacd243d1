"""PostgreSQL connection strings: checked and shown without their secrets.

Apart from the PostgreSQL store so that the configuration can check a DSN, and messages can
name a database, without importing the driver (an optional dependency).
"""

from __future__ import annotations

import urllib.parse

SCHEMES = ("postgresql", "postgres")


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
