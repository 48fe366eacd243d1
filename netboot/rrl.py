"""DNS response-rate limiting (RRL), as BIND 9's ``rate-limit`` and Knot's ``rrl`` do it.

Pure: no sockets, no clock (the caller passes ``now``, in seconds). A zone answer is bigger
than the query that asked for it, and UDP's source address is whatever the sender wrote: a
host on the provisioning VLAN could aim netboot's answers at a victim by forging its address.
RRL bounds what one client network gets of one *identical* answer a second; past it a query
is dropped, or every ``slip``-th one answered with an empty TC=1 reply (RFC 1035 §4.2.1),
which a real client follows with the same question over TCP (which a forged source cannot
open, and which is never limited).

The accounts, as BIND's: one per (client prefix, answer), the prefix a /24 for IPv4 and a
/56 for IPv6 (one site's allocation, RFC 6177), the answer the question's name and type for
a positive or NODATA answer, the prefix alone for NXDOMAIN (a flood of random names is one
account, where BIND keys it by the zone: netboot's zones are one server's) and for errors
(REFUSED, FORMERR, SERVFAIL, NOTIMP: BIND's ``errors-per-second``). Each account earns
``rate`` responses a second, holds at most one second's worth, and falls at most ``window``
seconds' worth into debt: a flood must be quiet for up to ``window`` seconds before its
answers come back.

Why devices behind one address are not starved: the account is per answer, so a thousand
devices behind one NAT or relay asking each its own name, or the cluster's name A and AAAA,
share no account but the identical answer's, and the default rate (``config.RateLimitConfig``)
is above what a storm of the whole fleet asks of one answer. A limited device that is
slipped a TC answer gets its answer over TCP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# What happens to one response.
SEND = 0
DROP = 1
SLIP = 2  # send an empty TC=1 answer instead: a real client asks again over TCP

_NXDOMAIN = b"\x00nxdomain"  # the account of NXDOMAIN answers (no name is one)
_ERROR = b"\x00error"  # the account of errors


@dataclass(frozen=True, slots=True)
class Limits:
    """One server's RRL settings (``dns.rate_limit``); 0 for a rate means unlimited."""

    responses_per_second: int = 10_000
    nxdomains_per_second: int = 10_000
    errors_per_second: int = 10_000
    window: int = 15
    slip: int = 1
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56
    max_accounts: int = 100_000  # BIND's max-table-size is 20,000 by default


class _Account:
    __slots__ = ("balance", "limited", "seen")

    def __init__(self, balance: float, seen: float) -> None:
        self.balance = balance
        self.seen = seen
        self.limited = 0  # responses limited since the account last had credit


class ResponseRateLimiter:
    """Decides SEND, DROP or SLIP for each UDP response; counts what it limited.

    ``check`` is on the path of every UDP answer: one dictionary lookup for the prefix (the
    client's address is turned into its network once), one for the account, arithmetic.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Read on every answer: plain attributes, not the frozen settings' (one lookup less).
        self._responses = limits.responses_per_second
        self._nxdomains = limits.nxdomains_per_second
        self._errors = limits.errors_per_second
        self._accounts: dict[tuple[str, bytes], _Account] = {}
        self._prefixes: dict[str, str] = {}
        self._logged: dict[str, float] = {}  # prefix -> when its limiting was last told
        self.dropped = 0
        self.slipped = 0

    def prefix(self, address: str) -> str:
        """``192.0.2.7`` → ``192.0.2.0/24``; ``2001:db8::1%eth0`` → ``2001:db8::/56``."""
        found = self._prefixes.get(address)
        if found is None:
            found = self._network(address)
            if len(self._prefixes) >= self.limits.max_accounts:
                self._prefixes.clear()  # a flood from forged sources: forget, never grow
            self._prefixes[address] = found
        return found

    def _network(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return address
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
            ip = ip.ipv4_mapped
        length = self.limits.ipv4_prefix_length if ip.version == 4 else \
            self.limits.ipv6_prefix_length
        return str(ipaddress.ip_network(f"{ip}/{length}", strict=False))

    def check(self, address: str, answer: bytes, rcode: int, now: float) -> int:
        """SEND, DROP or SLIP for a response with ``rcode`` to ``address``.

        ``answer`` names the answer (the question's lowercased wire name and type), used
        for NOERROR only: an NXDOMAIN or an error is counted by the client's prefix alone.
        """
        if rcode == 0:
            rate, token = self._responses, answer
        elif rcode == 3:
            rate, token = self._nxdomains, _NXDOMAIN
        else:
            rate, token = self._errors, _ERROR
        if not rate:
            return SEND
        prefix = self._prefixes.get(address)
        key = (self.prefix(address) if prefix is None else prefix, token)
        account = self._accounts.get(key)
        if account is None:
            if len(self._accounts) >= self.limits.max_accounts:
                self._sweep(now)
            self._accounts[key] = _Account(rate - 1, now)
            return SEND
        elapsed = now - account.seen
        balance = account.balance
        if elapsed > 0:
            account.seen = now
            # Earned at the rate, at most one second's worth held (BIND's credit).
            balance = min(rate, balance + elapsed * rate)
        balance -= 1
        if balance >= 0:
            account.balance = balance
            account.limited = 0
            return SEND
        # In debt: at most window seconds' worth, so a flood that stops is answered again
        # within the window.
        limits = self.limits
        account.balance = max(balance, -limits.window * rate)
        account.limited += 1
        if limits.slip and account.limited % limits.slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP

    def first_in_window(self, address: str, now: float) -> bool:
        """Whether a limited response to ``address``'s prefix is the first one told in this
        window: one log line per limited prefix per window, never one per query."""
        prefix = self.prefix(address)
        told = self._logged.get(prefix)
        if told is not None and now - told < self.limits.window:
            return False
        if len(self._logged) >= self.limits.max_accounts:
            self._logged.clear()
        self._logged[prefix] = now
        return True

    def _sweep(self, now: float) -> None:
        """The table is full: an account idle for ``window`` seconds has paid any debt and
        holds full credit, the same as none; if that frees too little (a flood from many
        forged prefixes), the oldest half goes. Halving keeps a full table's cost per
        response constant."""
        window = self.limits.window
        self._accounts = {k: a for k, a in self._accounts.items() if now - a.seen < window}
        excess = len(self._accounts) - self.limits.max_accounts // 2
        if excess > 0:
            for key in list(self._accounts)[:excess]:
                del self._accounts[key]

    def __len__(self) -> int:
        return len(self._accounts)


def question_end(reply: bytes) -> int:
    """Where the question of one of our replies ends (12 when it has none: a FORMERR). The
    first name of a message is never compressed (nothing precedes it to point at)."""
    if reply[4:6] != b"\x00\x01":
        return 12
    i = 12
    while i < len(reply) and reply[i]:
        i += 1 + reply[i]
    return min(i + 5, len(reply))


def answer_token(reply: bytes) -> bytes:
    """The answer's account name from one of our replies: its question's name and type."""
    return reply[12:question_end(reply) - 2].lower()


def slip_reply(reply: bytes) -> bytes:
    """The empty TC=1 answer for a slipped ``reply`` (ours, so well formed): its header with
    TC set and no records, its question, and its OPT record when it ends with ours (RFC 6891
    §7: a query with EDNS gets EDNS back; without it a client may take us for a server
    without EDNS)."""
    qend = question_end(reply)
    has_opt = (reply[10:12] != b"\x00\x00" and reply[-11:-8] == b"\x00\x00\x29"
               and reply[-2:] == b"\x00\x00")
    header = (reply[:2] + bytes([reply[2] | 0x02, reply[3]])
              + (b"\x00\x01" if qend > 12 else b"\x00\x00") + b"\x00\x00\x00\x00"
              + (b"\x00\x01" if has_opt else b"\x00\x00"))
    return header + reply[12:qend] + (reply[-11:] if has_opt else b"")
