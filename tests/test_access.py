"""Tokens, scopes and the audit log (netboot.access), over a real store, without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from netboot.access import (
    AUDIT_KEEP,
    AUDIT_PRUNE_EVERY,
    GRANTS,
    TOKEN_PREFIX,
    Access,
    Permission,
    Principal,
    parse_duration,
    public_token,
    scope_needed,
    token_hash,
)
from netboot.errors import AuthError, Conflict, NotFound, ScopeRequired, ValidationError
from netboot.inventory.memory import MemoryStore
from netboot.model import Scope


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def access(store: MemoryStore, clock: Clock) -> Access:
    return Access(store, clock=clock)


async def test_a_created_token_authenticates_as_its_name_and_scope(access: Access,
                                                                   store: MemoryStore) -> None:
    record, value = await access.create_token("scanner-1", "enroll")
    assert value.startswith(TOKEN_PREFIX) and len(value) > 40
    assert record.sha256 == token_hash(value) and value not in str(record)
    assert await access.authenticate(value) == Principal("scanner-1", Scope.ENROLL)
    # Only the hash is kept: nothing the store holds contains the value.
    assert all(value not in repr(t) for t in await store.list_tokens())
    assert "sha256" not in public_token(record)


@pytest.mark.parametrize("presented", [None, "", "nbt_nope", "Bearer x"])
async def test_absent_or_unknown_tokens_are_refused(access: Access, presented: str | None) -> None:
    await access.create_token("ci", "admin")
    with pytest.raises(AuthError):
        await access.authenticate(presented)


async def test_a_revoked_token_is_refused(access: Access) -> None:
    _, value = await access.create_token("ci", "read")
    assert (await access.revoke("ci")).name == "ci"
    with pytest.raises(AuthError, match="unknown or revoked"):
        await access.authenticate(value)
    with pytest.raises(NotFound):
        await access.revoke("ci")


async def test_a_token_ends_at_its_expiry(access: Access, clock: Clock) -> None:
    record, value = await access.create_token("temp", "operator", expires_in=parse_duration("2h"))
    assert record.expires == clock.now + 7200
    clock.now += 7199
    assert (await access.authenticate(value)).name == "temp"
    clock.now += 1
    with pytest.raises(AuthError, match="'temp' has expired"):
        await access.authenticate(value)


async def test_last_use_is_recorded_at_most_once_a_minute(access: Access, clock: Clock,
                                                          store: MemoryStore) -> None:
    _, value = await access.create_token("dash", "read")
    await access.authenticate(value)
    first = (await store.list_tokens())[0].last_used
    assert first == clock.now
    clock.now += 30
    await access.authenticate(value)
    assert (await store.list_tokens())[0].last_used == first
    clock.now += 30
    await access.authenticate(value)
    assert (await store.list_tokens())[0].last_used == clock.now


@pytest.mark.parametrize(("name", "scope", "field"), [
    ("", "read", "name"), ("a b", "read", "name"), ("x" * 65, "read", "name"),
    ("-lead", "read", "name"), ("ok", "root", "scope"), ("ok", None, "scope"),
])
async def test_bad_token_requests_name_the_field(access: Access, name: str, scope: object,
                                                 field: str) -> None:
    with pytest.raises(ValidationError) as err:
        await access.create_token(name, scope)
    assert err.value.field == field
    assert await access.list_tokens() == []


async def test_token_names_are_unique(access: Access) -> None:
    await access.create_token("ci", "read")
    with pytest.raises(Conflict):
        await access.create_token("ci", "admin")
    assert [(t.name, t.scope) for t in await access.list_tokens()] == [("ci", Scope.READ)]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("30m", 1800), ("12h", 43200),
                                               ("30d", 2592000), ("2w", 1209600)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0d", "30", "1y", "-1d", "1.5h", 30, None])
def test_bad_durations_name_expires(text: object) -> None:
    with pytest.raises(ValidationError) as err:
        parse_duration(text)
    assert err.value.field == "expires"


def test_scopes_grant_what_the_documentation_says() -> None:
    admin, operator = Principal("a", Scope.ADMIN), Principal("o", Scope.OPERATOR)
    reader, scanner = Principal("r", Scope.READ), Principal("s", Scope.ENROLL)
    assert all(admin.allows(p) for p in Permission)
    assert {p for p in Permission if operator.allows(p)} == {
        Permission.READ, Permission.ENROLL, Permission.OPERATE}
    assert {p for p in Permission if reader.allows(p)} == {Permission.READ}
    assert {p for p in Permission if scanner.allows(p)} == {Permission.ENROLL}
    assert set(GRANTS) == set(Scope)


@pytest.mark.parametrize(("permission", "scope"), [
    (Permission.READ, Scope.READ), (Permission.ENROLL, Scope.ENROLL),
    (Permission.OPERATE, Scope.OPERATOR), (Permission.CONFIGURE, Scope.ADMIN),
    (Permission.ADMINISTER, Scope.ADMIN)])
def test_a_refusal_names_the_narrowest_scope_that_would_do(permission: Permission,
                                                           scope: Scope) -> None:
    assert scope_needed(permission) == scope
    nobody = Principal("scanner", Scope.ENROLL if scope != Scope.ENROLL else Scope.READ)
    with pytest.raises(ScopeRequired) as err:
        nobody.require(permission)
    assert err.value.scope == scope and f"needs scope {scope}" in str(err.value)


def test_the_command_line_is_admin_under_its_user() -> None:
    assert Access.local("ops") == Principal("cli:ops", Scope.ADMIN)


async def test_audit_records_and_reads_back(access: Access, clock: Clock) -> None:
    await access.record("ci", "POST /api/v1/machines", "02:00:00:00:00:01", peer="192.0.2.7",
                        outcome="201")
    clock.now += 10
    await access.record("cli:ops", "tokens revoke", "ci", peer="local", outcome="ok")
    log = await access.audit_log()
    assert [(e.actor, e.outcome) for e in log] == [("ci", "201"), ("cli:ops", "ok")]
    assert [e.actor for e in await access.audit_log(since=clock.now)] == ["cli:ops"]


async def test_audit_log_is_bounded(store: MemoryStore, clock: Clock) -> None:
    access = Access(store, clock=clock, audit_keep=3)  # inventory.audit_keep
    for i in range(AUDIT_PRUNE_EVERY):
        await access.record("x", "POST /api/v1/machines", str(i), peer="p", outcome="401")
    log = await store.list_audit(limit=10 * AUDIT_PRUNE_EVERY)
    assert [e.target for e in log] == [str(AUDIT_PRUNE_EVERY - i) for i in (3, 2, 1)]
    assert AUDIT_KEEP >= 10_000  # the real bound keeps months of an operator's changes


async def test_has_admin_ignores_expired_and_narrow_tokens(access: Access, clock: Clock) -> None:
    assert not await access.has_admin()
    await access.create_token("r", "read")
    await access.create_token("soon", "admin", expires_in=60)
    assert await access.has_admin()
    clock.now += 60
    assert not await access.has_admin()


def test_a_peers_refusals_past_its_budget_are_counted_and_told_with_its_next_entry() -> None:
    from netboot.access import RefusalBudget

    budget = RefusalBudget(burst=2, rate=1.0, max_peers=2)
    assert [budget.admit("192.0.2.60", 10.0) for _ in range(5)] == [0, 0, None, None, None]
    assert budget.admit("192.0.2.61", 10.0) == 0  # another peer: its own budget
    assert budget.admit("192.0.2.60", 11.0) == 3  # a token again: three were not recorded
    assert budget.admit("192.0.2.60", 11.0) is None


def test_refusals_from_many_peers_are_bounded_together_and_a_v6_peer_by_its_64() -> None:
    # A host with many addresses had a burst per address (s35-attack).
    from netboot.access import RefusalBudget
    from netboot.discovery import peer_key

    budget = RefusalBudget(burst=2, rate=1.0, max_peers=100, all_burst=5, all_rate=1.0)
    admitted = [budget.admit(f"192.0.2.{i}", 10.0) for i in range(8)]
    assert admitted == [0] * 5 + [None] * 3
    assert budget.admit("192.0.2.5", 11.0) == 1  # a token for all again: its one told
    assert budget.admit("192.0.2.6", 11.0) is None
    # A peer over its own budget does not spend the others' share.
    budget = RefusalBudget(burst=2, rate=1.0, max_peers=100, all_burst=5, all_rate=1.0)
    assert [budget.admit("2001:db8::1", 10.0) for _ in range(4)] == [0, 0, None, None]
    assert budget.admit("2001:db8::2:3", 10.0) is None  # the same /64
    assert budget.admit("2001:db8:0:1::1", 10.0) == 0  # another /64
    assert budget.admit("::ffff:192.0.2.1", 10.0) == 0
    assert budget.admit("192.0.2.1", 10.0) == 0
    assert budget.admit("192.0.2.1", 10.0) is None  # the mapped address was the same peer
    assert peer_key("fe80::1%eth0") == "fe80::1%eth0"  # link-local: each its own


async def test_the_audit_bound_is_the_configs(tmp_path: Path) -> None:
    """inventory.audit_keep reaches the server's Access (s36-ops): the default keeps ~33
    days of a daily 1,000-device pallet (3 entries an install), a year needs ~1,100,000."""
    from netboot.config import load
    from netboot.service import build_core

    conf = tmp_path / "netboot.yaml"
    conf.write_text(f"server:\n  data_dir: {tmp_path}\ninventory:\n  audit_keep: 2\n")
    store = MemoryStore()
    await store.open()
    core = build_core(load(conf, env={}), store, lambda: "http://192.0.2.10:8080",
                      check_templates=False)
    for i in range(AUDIT_PRUNE_EVERY):
        await core.access.record("x", "POST /api/v1/machines", str(i), peer="p", outcome="401")
    log = await store.list_audit(limit=10 * AUDIT_PRUNE_EVERY)
    assert [e.target for e in log] == [str(AUDIT_PRUNE_EVERY - i) for i in (2, 1)]
