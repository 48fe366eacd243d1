"""Who may do what: API tokens, their scopes, and the audit log of every change.

The rules live here, below every face (REST API, CLI, dashboard): a face turns its credential
into a :class:`Principal` with :meth:`Access.authenticate` (or :meth:`Access.local` for the
command line, whose user already holds the files), asks :meth:`Principal.allows` (or
:meth:`Principal.require`) for the :class:`Permission` an operation needs, and records what it
changed with :meth:`Access.record`.

Tokens are 256-bit random values (``secrets.token_urlsafe(32)`` behind a ``nbt_`` prefix that
secret scanners can match); only their sha256 is stored, so a copy of the database opens
nothing. A presented token is found by its hash and the hash compared again with
``hmac.compare_digest``, as GitHub and Kubernetes bootstrap tokens do: an index lookup on a
hash of a high-entropy value leaks nothing useful about the value through timing.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from netboot.discovery import TokenBuckets, peer_key
from netboot.errors import AuthError, NotFound, ScopeRequired, ValidationError
from netboot.inventory.base import Batch, Store
from netboot.model import ApiToken, AuditEntry, Scope

TOKEN_PREFIX = "nbt_"
# The dashboard's session cookie (netboot.web.auth); here for the plain-HTTP policy, which
# `netboot serve` makes before it imports aiohttp.
SESSION_COOKIE = "netboot_session"
# Names are path segments (/api/v1/tokens/{name}), table cells and audit actors.
TOKEN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
# A token's last use is written at most this often: a busy dashboard polling every second
# must not turn every read into a database write.
TOUCH_EVERY = 60.0
# The audit log keeps this many entries (the oldest go first), checked every AUDIT_PRUNE_EVERY
# writes, so a flood of refused requests cannot grow the database without bound. The default
# of inventory.audit_keep: an install writes 3 (the installer's two reports, its
# registration), so 100,000 hold ~33 days of a 1,000-device pallet a day (s36-ops); a year
# of them is ~1,100,000 (~130 MiB of SQLite, ~127 bytes an entry with its index).
AUDIT_KEEP = 100_000
AUDIT_PRUNE_EVERY = 1000
# Refused requests without a valid token, recorded per peer address: this many at once, then
# this many a second; past it they are counted and told in one entry when the peer is
# recorded again. Without it any host on the provisioning network pushed every entry out of
# the AUDIT_KEEP newest with 100,000 refused POSTs (a minute's work), an operator's among
# them (s34-attack). Requests with a valid token (an operator's, a device's own) are all
# recorded.
REFUSED_BURST = 60
REFUSED_RATE = 1.0
_REFUSED_PEERS = 4096
# ... and all peers together: this many at once, then one peer's rate. A peer is an address,
# and a host on the provisioning network can take many (the VLAN's spare IPv4 addresses, a
# whole IPv6 /64): with a budget per address alone, 1,700 addresses' bursts pushed out every
# entry kept (s35-attack). At one a second, refused strangers need a day to push out an
# operator's entry. An IPv6 peer is budgeted by its /64 (one interface's SLAAC and privacy
# addresses), an IPv4-mapped one as the IPv4 address it is.
REFUSED_ALL_BURST = 600
REFUSED_ALL_RATE = REFUSED_RATE
# A positive count and a unit; also the pattern the OpenAPI document declares.
DURATION_PATTERN = r"^[1-9][0-9]{0,5}[smhdw]$"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class Permission(enum.StrEnum):
    """What an operation needs; each scope grants a set of these (:data:`GRANTS`)."""

    READ = "read"  # the inventory, without secrets: machines, events, profiles, status
    ENROLL = "enroll"  # create (and bulk-create) machines, approve discovered ones
    OPERATE = "operate"  # change, reinstall and remove machines; report their events
    CONFIGURE = "configure"  # profiles, clusters (join secrets), groups
    ADMINISTER = "administer"  # API tokens and the audit log


GRANTS: dict[Scope, frozenset[Permission]] = {
    Scope.ADMIN: frozenset(Permission),
    Scope.OPERATOR: frozenset({Permission.READ, Permission.ENROLL, Permission.OPERATE}),
    Scope.READ: frozenset({Permission.READ}),
    # A factory-floor scanner adds what it scans and lets it install; it reads nothing back
    # beyond the machine it just wrote, so a stolen scanner does not map the fleet.
    Scope.ENROLL: frozenset({Permission.ENROLL}),
}


def scope_needed(permission: Permission) -> Scope:
    """The narrowest scope that grants ``permission`` (what a 403 tells the client)."""
    return min((s for s, granted in GRANTS.items() if permission in granted),
               key=lambda s: len(GRANTS[s]))


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a token's name (or ``cli:<user>``) and its scope."""

    name: str
    scope: Scope

    def allows(self, permission: Permission) -> bool:
        return permission in GRANTS[self.scope]

    def require(self, permission: Permission) -> None:
        """ScopeRequired (403) naming the scope that would do, unless allowed."""
        if not self.allows(permission):
            needed = scope_needed(permission)
            raise ScopeRequired(str(needed), f"token {self.name!r} has scope {self.scope}; "
                                f"this needs scope {needed} (or admin)")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_scope(text: object) -> Scope:
    for scope in Scope:
        if text == scope.value:
            return scope
    raise ValidationError("scope", f"{text!r} is not one of {', '.join(s.value for s in Scope)}")


def check_token_name(name: object) -> str:
    # fullmatch: "$" alone would let a trailing newline through.
    if not isinstance(name, str) or not re.fullmatch(TOKEN_NAME_PATTERN[1:-1], name):
        raise ValidationError("name", f"{name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
                              "starting with a letter or digit")
    return name


def parse_duration(text: object, field: str = "expires") -> float:
    """``90s``, ``30m``, ``12h``, ``30d``, ``2w`` → seconds (a token's lifetime)."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN[1:-1], text):
        raise ValidationError(field, f"{text!r}: a positive duration such as 12h, 30d, 2w")
    return float(int(text[:-1]) * _UNITS[text[-1]])


class RefusalBudget:
    """Which refused, unauthenticated requests get an audit entry of their own: a token
    bucket per peer (REFUSED_BURST, REFUSED_RATE; an IPv6 peer by its /64), the peers held
    bounded (the least recently refused forgotten: a full bucket again, its count lost), and
    one bucket for all (REFUSED_ALL_BURST, REFUSED_ALL_RATE), spent only by the entries it
    admits: a peer over its own budget does not take the others' share."""

    def __init__(self, *, burst: int = REFUSED_BURST, rate: float = REFUSED_RATE,
                 max_peers: int = _REFUSED_PEERS, all_burst: int = REFUSED_ALL_BURST,
                 all_rate: float = REFUSED_ALL_RATE) -> None:
        self._buckets = TokenBuckets(rate, burst, max_peers)
        self._all = TokenBuckets(all_rate, all_burst, 1)
        self._max_peers = max_peers
        self._unrecorded: OrderedDict[str, int] = OrderedDict()  # peer -> refusals not recorded

    def admit(self, peer: str, now: float) -> int | None:
        """None: not recorded (counted); else how many of this peer's refusals were not
        recorded before this one (0 mostly), which its entry's caller tells."""
        peer = peer_key(peer)
        if self._all.would_take("", now) and self._buckets.take(peer, now):
            self._all.take("", now)
            return self._unrecorded.pop(peer, 0)
        count = self._unrecorded.pop(peer, 0) + 1
        self._unrecorded[peer] = count
        if len(self._unrecorded) > self._max_peers:
            self._unrecorded.popitem(last=False)
        return None


class Access:
    """Tokens and the audit log over a :class:`~netboot.inventory.base.Store`."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(32),
                 commit: Callable[[Batch], Awaitable[None]] | None = None,
                 audit_keep: int = AUDIT_KEEP) -> None:
        self._store = store
        self._audit_keep = audit_keep
        self._clock = clock
        self._new_secret = new_secret
        self._writes = 0
        # How an audit entry is committed: alone (the CLI), or with the recorder's group
        # commits (a server: the installer's reports and registrations of a storm each
        # wrote a transaction of their own for their entry, a few per cent of its CPU).
        self._commit = commit or store.apply_batch

    # -- who is asking --------------------------------------------------------------------
    async def authenticate(self, token: str | None) -> Principal:
        """The principal of a presented bearer token; AuthError (401) if absent, unknown,
        revoked or expired. The message never echoes the token."""
        if not token:
            raise AuthError("send 'Authorization: Bearer <token>' (netboot tokens create)")
        digest = token_hash(token)
        found = await self._store.token_by_hash(digest)
        if found is None or not hmac.compare_digest(found.sha256, digest):
            raise AuthError("unknown or revoked token")
        now = self._clock()
        if found.expires is not None and now >= found.expires:
            raise AuthError(f"token {found.name!r} has expired")
        if found.last_used is None or now - found.last_used >= TOUCH_EVERY:
            await self._store.touch_token(found.name, now)
        return Principal(found.name, found.scope)

    @staticmethod
    def local(user: str) -> Principal:
        """The command line: whoever can open the inventory file already holds everything."""
        return Principal(f"cli:{user}", Scope.ADMIN)

    # -- tokens ---------------------------------------------------------------------------
    async def create_token(self, name: object, scope: object, *,
                           expires_in: float | None = None) -> tuple[ApiToken, str]:
        """A new token; returns its record and its value, which is shown this once."""
        checked = check_token_name(name)
        sc = parse_scope(scope)
        if expires_in is not None and not expires_in > 0:
            raise ValidationError("expires", "must be a positive duration")
        now = self._clock()
        value = TOKEN_PREFIX + self._new_secret()
        token = ApiToken(name=checked, sha256=token_hash(value), scope=sc, created=now,
                         expires=None if expires_in is None else now + expires_in)
        await self._store.create_token(token)
        return token, value

    async def list_tokens(self) -> list[ApiToken]:
        return await self._store.list_tokens()

    async def revoke(self, name: str) -> ApiToken:
        for token in await self._store.list_tokens():
            if token.name == name:
                await self._store.delete_token(name)
                return token
        raise NotFound(f"token {name!r} not found")

    async def has_admin(self) -> bool:
        """Whether some unexpired admin token exists (else start-up makes one)."""
        now = self._clock()
        return any(t.scope == Scope.ADMIN and (t.expires is None or t.expires > now)
                   for t in await self._store.list_tokens())

    # -- audit ----------------------------------------------------------------------------
    async def record(self, actor: str, action: str, target: str, *, peer: str,
                     outcome: str) -> AuditEntry:
        """Append one entry to the audit log (and now and then drop the oldest)."""
        entry = self.entry(actor, action, target, peer=peer, outcome=outcome)
        await self._commit(Batch(audit=(entry,)))  # on disk before the answer goes
        await self.recorded()
        return entry

    async def settled(self, entry: AuditEntry, written: str, otherwise: str) -> None:
        """The one entry of a request answered that its change's outcome is unknown, whose
        ``entry`` (:meth:`entry`) went with the change: its outcome becomes ``written`` if
        it is stored, else it is added with ``otherwise`` (Store.settle_audit)."""
        await self._store.settle_audit(entry, written, otherwise)
        await self.recorded()

    def entry(self, actor: str, action: str, target: str, *, peer: str,
              outcome: str) -> AuditEntry:
        """An entry for a change's own batch to write (then :meth:`recorded`): the change
        and its entry in one transaction, one commit where two followed each other."""
        return AuditEntry(time=self._clock(), actor=actor, action=action, target=target,
                          peer=peer, outcome=outcome)

    async def recorded(self) -> None:
        """One more entry written: now and then the oldest are dropped."""
        self._writes += 1
        if self._writes % AUDIT_PRUNE_EVERY == 0:
            await self._store.prune_audit(self._audit_keep)

    async def audit_log(self, *, since: float | None = None,
                        limit: int = 1000) -> list[AuditEntry]:
        return await self._store.list_audit(since=since, limit=limit)


def public_token(token: ApiToken) -> dict[str, object]:
    """A token as the API and ``--json`` show it: never its hash."""
    return {"name": token.name, "scope": str(token.scope), "created": token.created,
            "expires": token.expires, "last_used": token.last_used}
