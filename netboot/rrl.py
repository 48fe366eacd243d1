"""DNS response-rate limiting (RRL), as BIND 9's ``rate-limit`` and Knot's ``rrl`` do it.

Pure: no sockets, no clock (the caller passes ``now``, in seconds). A zone answer is bigger
than the query that asked for it, and UDP's source address is whatever the sender wrote: a
host on the provisioning VLAN could aim netboot's answers at a victim by forging its address.
RRL bounds what one client network gets of one *identical* answer a second; past it a query
is dropped, or every ``slip``-th one answered with an empty TC=1 reply (RFC 1035 §4.2.1),
which a real client follows with the same question over TCP (which a forged source cannot
open, and which is never limited).

The accounts, as BIND's (lib/dns/rrl.c ``make_key``): one per (client prefix, answer), the
prefix a /24 for IPv4 and a /56 for IPv6 (one site's allocation, RFC 6177), the answer
- for a positive answer, the question's name and type;
- for NODATA (NOERROR, no answer records), the name alone: its empty answer names no type,
  and a flood of one name with every qtype would otherwise be 65,536 accounts;
- for NXDOMAIN, the zone (the SOA's owner in the authority section), never the name: a
  flood of random names (``<random>.netboot.lan``) is one account, as in BIND, which keys
  NXDOMAIN by the zone's origin;
- for an error (REFUSED, FORMERR, SERVFAIL, NOTIMP: BIND's ``errors-per-second``), the
  prefix alone.
Each account earns its rate a second, holds at most one second's worth, and falls at most
``window`` seconds' worth into debt: a flood must be quiet for up to ``window`` seconds
before its answers come back. ``all_per_second`` (0: off, BIND's default) is one more
account per prefix, debited by every answer whatever its kind; past it an answer is
dropped, never slipped (BIND's ``debit_rrl_entry``: an all-per-second flood is not told to
retry). ``exempt_clients`` are networks never limited (BIND's ``exempt-clients``: the
site's resolvers, monitoring).

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

# An account's kind is its first byte: a question's name starts with a label's length
# (0-63), so these markers can be no name's. A positive answer's token is its name and type.
_NODATA = 0xFF  # + the name: NODATA
_NODATA_MARK = bytes((_NODATA,))
_NXDOMAIN = b"\xfe"  # + the zone's name: NXDOMAIN (alone: a zone not found in the reply)
_ERROR = b"\xfd"  # errors, per prefix
_ALL = b"\xfc"  # all-per-second, per prefix


@dataclass(frozen=True, slots=True)
class Limits:
    """One server's RRL settings (``dns.rate_limit``); 0 for a rate means unlimited."""

    responses_per_second: int = 10_000
    nxdomains_per_second: int = 10_000
    errors_per_second: int = 10_000
    nodata_per_second: int = 10_000
    all_per_second: int = 0
    window: int = 15
    slip: int = 1
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56
    exempt_clients: tuple[str, ...] = ()  # networks never limited, e.g. "192.0.2.53/32"
    # Client addresses and networks remembered (BIND's max-table-size default); past it they
    # are forgotten and found again. The accounts themselves are one second's answers and
    # the debts: forgetting one can only let an answer out sooner, never starve a client.
    max_accounts: int = 20_000


Key = tuple[str, bytes]  # (client prefix, answer): one account


class ResponseRateLimiter:
    """Decides SEND, DROP or SLIP for each UDP response; counts what it limited.

    ``check`` is on the path of every UDP answer, so an account is a count of this second's
    responses, the debt carried from the seconds before included, in a table of the client's
    network that its address finds (one lookup), then one get and one set of the count.
    Once a second (:meth:`_roll`) the accounts past their rate carry what they owe, at most
    ``window`` seconds' worth, less a second's rate for each second gone; the others start
    at 0 (a second's credit, never more: BIND's). Per-second counts, as NSD keeps them: a
    token bucket per account (float credit, an object, a (network, answer) key built per
    answer) cost ~1.8x these counts per check in process (s46-dns).
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Read on every answer: plain attributes, not the frozen settings' (one lookup less).
        self._responses = limits.responses_per_second
        self._nodata = limits.nodata_per_second
        self._nxdomains = limits.nxdomains_per_second
        self._errors = limits.errors_per_second
        self._all = limits.all_per_second
        self._kinds = {_NODATA: self._nodata, _NXDOMAIN[0]: self._nxdomains,
                       _ERROR[0]: self._errors, _ALL[0]: self._all}
        self._exempt = tuple(ipaddress.ip_network(n, strict=False)
                             for n in limits.exempt_clients)
        # An exempt client's table, found by its address as any other's: never counted.
        self._exempt_table: dict[bytes, int] = {}
        # This second's responses (and debt) of each answer, a table a client network;
        # each address's table found by the address itself (no key to build an answer).
        self._tables: dict[str, dict[bytes, int]] = {}
        self._by_address: dict[str, dict[bytes, int]] = {}
        self._over: set[Key] = set()  # accounts past their rate this second, or in debt
        self._second: int | None = None
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

    @staticmethod
    def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return None
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack socket's IPv4 peer
            return ip.ipv4_mapped
        return ip

    def _network(self, address: str) -> str:
        ip = self._ip(address)
        if ip is None:
            return address
        length = self.limits.ipv4_prefix_length if ip.version == 4 else \
            self.limits.ipv6_prefix_length
        return str(ipaddress.ip_network(f"{ip}/{length}", strict=False))

    def exempt(self, address: str) -> bool:
        """Whether ``address`` is in ``exempt_clients`` (BIND's ``exempt-clients``)."""
        ip = self._ip(address)
        return ip is not None and any(ip in net for net in self._exempt)

    def _rate(self, token: bytes) -> int:
        return self._kinds.get(token[0], self._responses) if token else self._responses

    def tick(self, now: float) -> None:
        """The clock, told (the server's timer, a few times a second): a new second rolls
        the accounts over. An answer reads no clock: a call less on every answer."""
        second = int(now)
        if second != self._second:
            self._roll(second)

    def check(self, address: str, answer: bytes, rcode: int) -> int:
        """SEND, DROP or SLIP for a response with ``rcode`` to ``address``, in the second
        the last :meth:`tick` told.

        ``answer`` is the reply's :func:`answer_token` (the account within the client's
        prefix); for an error it is not read: errors are counted by the prefix alone.
        """
        if rcode == 0:
            rate = self._nodata if answer[0] == _NODATA else self._responses
            token = answer
        elif rcode == 3:
            rate = self._nxdomains
            token = answer if answer[:1] == _NXDOMAIN else _NXDOMAIN
        else:
            rate = self._errors
            token = _ERROR
        everything = self._all
        if not rate and not everything:
            return SEND
        counts = self._by_address.get(address)
        if counts is None:
            counts = self._table(address)
        if counts is self._exempt_table:
            return SEND
        n = 0
        if rate:
            n = counts.get(token, 0) + 1
            counts[token] = n
            if n > rate:
                self._over.add((self.prefix(address), token))
        if everything:
            # BIND debits all-per-second's account with every answer; past it, the answer
            # is dropped, never slipped, whatever its own account says.
            m = counts.get(_ALL, 0) + 1
            counts[_ALL] = m
            if m > everything:
                self._over.add((self.prefix(address), _ALL))
                self.dropped += 1
                return DROP
        if n <= rate:
            return SEND
        slip = self.limits.slip
        if slip and (n - rate) % slip == 0:
            self.slipped += 1
            return SLIP
        self.dropped += 1
        return DROP

    def _table(self, address: str) -> dict[bytes, int]:
        if len(self._by_address) >= self.limits.max_accounts:
            self._by_address.clear()  # forged sources: forget, never grow
        if self._exempt and self.exempt(address):
            self._by_address[address] = self._exempt_table
            return self._exempt_table
        prefix = self.prefix(address)
        table = self._tables.get(prefix)
        if table is None:
            table = self._tables[prefix] = {}
        self._by_address[address] = table
        return table

    def _roll(self, second: int) -> None:
        """A new second: each account past its rate owes what it took beyond it (at most
        ``window`` seconds' worth), less a second's rate for each second gone since."""
        gone = 1 if self._second is None else max(1, second - self._second)
        self._second = second
        window = self.limits.window
        carried: dict[Key, int] = {}
        tables = self._tables
        for key in self._over:
            rate = self._rate(key[1])
            owed = min(tables[key[0]].get(key[1], 0), (window + 1) * rate) - rate * gone
            if owed > 0:
                carried[key] = owed
        if len(tables) > self.limits.max_accounts:  # many networks: start again, bounded
            tables.clear()
            self._by_address.clear()
        for table in tables.values():  # one second's answers at most, each second
            table.clear()
        for (prefix, token), owed in carried.items():
            tables.setdefault(prefix, {})[token] = owed
        self._over = set(carried)

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

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables.values())


def question_end(reply: bytes) -> int:
    """Where the question of one of our replies ends (12 when it has none: a FORMERR). The
    first name of a message is never compressed (nothing precedes it to point at)."""
    if reply[4:6] != b"\x00\x01":
        return 12
    i = 12
    while i < len(reply) and reply[i]:
        i += 1 + reply[i]
    return min(i + 5, len(reply))


def answer_token(reply: bytes, asked: bytes | None = None) -> bytes:
    """The account, within a client's prefix, of one of our replies (module docstring): a
    positive answer's question name and type, NODATA's name, NXDOMAIN's zone, lowercased.
    Errors are counted by the prefix alone (:meth:`ResponseRateLimiter.check`). ``asked``
    is the question's lowercased name and type where the caller has it (the answer cache's
    key holds it): not read from the reply again."""
    rcode = reply[3] & 0x0F
    if rcode == 0:
        if asked is None:
            qend = question_end(reply)
            if qend <= 12:
                return b"\x00"
            asked = reply[12:qend - 2].lower()
        return asked if reply[6:8] != b"\x00\x00" else _NODATA_MARK + asked[:-2]
    if rcode == 3 and reply[8:10] != b"\x00\x00":
        qend = question_end(reply) if asked is None else 14 + len(asked)
        # The SOA's owner (RFC 2308 §3): the zone. Ours is a pointer into the question's
        # name (the zone is its suffix): that suffix, lowercased, without reading labels.
        at = qend
        if len(reply) > at + 1 and reply[at] >= 0xC0:
            to = (reply[at] & 0x3F) << 8 | reply[at + 1]
            if 12 <= to < qend - 4:
                return _NXDOMAIN + (reply[to:qend - 4].lower() if asked is None
                                    else asked[to - 12:-2])
        zone = _name_at(reply, at)
        if zone is not None:
            return _NXDOMAIN + zone.lower()
    return _NXDOMAIN if rcode == 3 else _ERROR


def _name_at(message: bytes, at: int) -> bytes | None:
    """The uncompressed wire name at ``at`` (RFC 1035 §4.1.4 pointers followed, at most a
    few: our replies point into the question), or None when it does not read."""
    name = b""
    for _ in range(256):  # 127 labels at most, and a pointer loop ends
        if at >= len(message):
            return None
        n = message[at]
        if n >= 0xC0:
            if at + 1 >= len(message):
                return None
            at = (n & 0x3F) << 8 | message[at + 1]
            continue
        if n == 0:
            return name + b"\x00"
        name += message[at:at + 1 + n]
        at += 1 + n
    return None


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
