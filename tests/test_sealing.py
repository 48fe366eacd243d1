"""Secrets at rest: the sealing key, the sealed join token in SQLite, file modes, the
migration of clear tokens, a lost key, and the join token in no file byte and no log line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import yaml

from netboot.config import Config, load
from netboot.errors import ConfigError, StoreError
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sealed import join_token_context
from netboot.inventory.sqlite import SqliteStore
from netboot.model import Cluster, MacAddress, Machine, MachineState
from netboot.sealing import Sealer, read_key, write_key
from netboot.service import SEAL_KEY_SETTING, Service, build, open_inventory
from tests import pg
from tests.conftest import write_config

# Shaped like a k3s server token, and long enough that a chance match is impossible.
JOIN_TOKEN = "K10c5d2a8e6f41b9d3a7e0f8c2b1d4e6a9f3c7b5d8e2a1f4c6b9d0e3a7f5c8b2d1e4::server:9f2c"
MAC = "52:54:00:aa:bb:01"
HEXHYP = "52-54-00-aa-bb-01"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def db_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal"),
                                             db.with_name(db.name + "-shm")) if p.exists())


# --- the sealer -------------------------------------------------------------------------------


def test_seal_round_trip_is_bound_to_key_and_context() -> None:
    sealer = Sealer.generate()
    sealed = sealer.seal(JOIN_TOKEN, context="a")
    assert JOIN_TOKEN not in sealed and sealer.is_sealed(sealed)
    assert sealer.seal(JOIN_TOKEN, context="a") != sealed  # a fresh nonce every time
    assert sealer.unseal(sealed, context="a") == JOIN_TOKEN
    with pytest.raises(StoreError, match="damaged"):
        sealer.unseal(sealed, context="b")  # moved to another cluster's row
    with pytest.raises(StoreError, match="sealed with key"):
        Sealer.generate().unseal(sealed, context="a")
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(StoreError, match="damaged"):
        sealer.unseal(tampered, context="a")
    assert sealer.unseal("clear, from an older release", context="a") == (
        "clear, from an older release")


def test_key_file_is_0600_never_replaced_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    assert read_key(path) is None
    sealer = Sealer.generate()
    write_key(path, sealer)
    assert mode(path) == 0o600
    again = read_key(path)
    assert again is not None and again.key_id == sealer.key_id
    with pytest.raises(FileExistsError):
        write_key(path, Sealer.generate())
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a netboot secrets key") as err:
        read_key(path)
    assert err.value.fix and "backup" in err.value.fix


# --- the SQLite store seals the join token only -------------------------------------------------


async def test_sqlite_store_keeps_the_join_token_sealed(tmp_path: Path) -> None:
    db = tmp_path / "inv.db"
    sealer = Sealer.generate()
    store = SqliteStore(db, sealer=sealer)
    await store.open()
    try:
        await store.put_cluster(Cluster(name="edge", server_url="managed", token=JOIN_TOKEN),
                                create=True)
        got = await store.get_cluster("edge")
        assert got is not None and got.token == JOIN_TOKEN
        assert [c.token for c in await store.list_clusters()] == [JOIN_TOKEN]
        assert JOIN_TOKEN.encode() not in db_bytes(db)
    finally:
        await store.close()
    assert JOIN_TOKEN.encode() not in db_bytes(db)
    # Without the key the store gives the sealed text, never something that looks like a token.
    bare = SqliteStore(db)
    await bare.open()
    try:
        raw = await bare.get_cluster("edge")
        assert raw is not None and raw.token.startswith("nbs1:")
    finally:
        await bare.close()
    wrong = SqliteStore(db, sealer=Sealer.generate())
    await wrong.open()
    try:
        with pytest.raises(StoreError, match="sealed with key"):
            await wrong.get_cluster("edge")
    finally:
        await wrong.close()


async def test_sqlite_store_keeps_an_install_token_sealed_to_its_machine(tmp_path: Path,
                                                                        ) -> None:
    db = tmp_path / "inv.db"
    sealer = Sealer.generate()
    store = SqliteStore(db, sealer=sealer)
    await store.open()
    install = "Zq3x9Lw0-install-token-of-one-machine"
    machine = Machine(macs=(MacAddress.parse(MAC),), state=MachineState.BOOTING,
                      install_token=install)
    try:
        await store.create_machine(machine)
        got = await store.machine_by("mac", MAC)
        assert got is not None and got.install_token == install
        assert [m.install_token for m in await store.list_machines()] == [install]
        assert install.encode() not in db_bytes(db)
        # Written back as read (the state moves on): sealed again, never in clear.
        await store.update_machine(replace(got, hostname="n1"))
        assert install.encode() not in db_bytes(db)
        raw = json.loads(sqlite3.connect(db).execute("SELECT data FROM machines").fetchone()[0])
        assert raw["install_token"].startswith("nbs1:")
        # Sealed to its machine: copied onto another machine's row it does not open.
        other = Machine(macs=(MacAddress.parse("52:54:00:aa:bb:02"),), hostname="n2",
                        state=MachineState.BOOTING, install_token=raw["install_token"])
        await store.create_machine(other)
        with pytest.raises(StoreError, match="damaged"):
            await store.get_machine(other.id)
    finally:
        await store.close()


async def test_clear_tokens_of_an_older_inventory_are_sealed_on_first_start(
        tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    cfg.data_dir.mkdir(parents=True)
    old = SqliteStore(cfg.db_path)  # an older netboot: no sealing, 0644 files
    await old.open()
    await old.put_cluster(Cluster(name="edge", server_url="managed", token=JOIN_TOKEN))
    # A long description puts the row on overflow pages, which a rewrite frees whole: without
    # secure_delete their old bytes (the clear token) would stay in the file.
    await old.put_cluster(Cluster(name="ext", server_url="https://192.0.2.50:6443",
                                  token=JOIN_TOKEN + "x", description="d" * 20_000))
    await old.close()
    os.chmod(cfg.db_path, 0o644)
    os.chmod(cfg.data_dir, 0o755)
    assert JOIN_TOKEN.encode() in db_bytes(cfg.db_path)

    service = await build(cfg)
    try:
        assert JOIN_TOKEN.encode() not in db_bytes(cfg.db_path)
        tokens = {c.name: c.token for c in await service.store.list_clusters()}
        assert tokens == {"edge": JOIN_TOKEN, "ext": JOIN_TOKEN + "x"}
        key = read_key(cfg.data_dir / "secret.key")
        assert key is not None
        assert await service.store.get_setting(SEAL_KEY_SETTING) == key.key_id
        assert mode(cfg.data_dir) == 0o700 and mode(cfg.db_path) == 0o600
    finally:
        await service.close()
    assert JOIN_TOKEN.encode() not in db_bytes(cfg.db_path)
    again = await build(cfg)  # a second start changes nothing and reads the same tokens
    try:
        got = await again.store.get_cluster("edge")
        assert got is not None and got.token == JOIN_TOKEN
    finally:
        await again.close()


async def an_older_inventory(tmp_path: Path, dsn: str | None) -> tuple[Path, Config]:
    """A config file and its config whose inventory (a new SQLite file, or the PostgreSQL
    schema ``dsn``) holds a cluster's join token in clear, as an older netboot (no sealing)
    or a tool wrote it, and no secrets key yet."""
    extra = f'inventory:\n  backend: postgresql\n  dsn: "{dsn}"\n' if dsn else ""
    path = write_config(tmp_path, extra)
    cfg = load(path, env={})
    cfg.data_dir.mkdir(parents=True)
    old: SqliteStore | PostgresStore = PostgresStore(dsn) if dsn else SqliteStore(cfg.db_path)
    await old.open()
    try:
        await old.put_cluster(Cluster(name="edge", server_url="managed", token=JOIN_TOKEN))
    finally:
        await old.close()
    return path, cfg


async def stored_token(cfg: Config) -> str | None:
    """The cluster's join token as the inventory holds it (its text, sealed or not)."""
    if cfg.inventory.backend == "postgresql":
        conn = await asyncpg.connect(cfg.inventory.dsn or "")
        try:
            text = await conn.fetchval("SELECT data FROM clusters WHERE name = 'edge'")
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(cfg.db_path)) as conn:
            text = conn.execute("SELECT data FROM clusters WHERE name = 'edge'").fetchone()[0]
    return json.loads(text).get("token")


# Where strace kills the ``netboot`` process making its new key file (``-P`` the key's
# path: the calls naming it, or a descriptor of it): "made", as the name comes to be (its
# create, the open after the read that found none; or the link of a key written whole
# under another name); "written", as its bytes are written into it (or, written whole
# elsewhere, its link: no write names it).
KILLED_AT = {
    "made": ["-e", "inject=openat:signal=KILL:when=2", "-e", "inject=link,linkat:signal=KILL"],
    "written": ["-e", "inject=write:signal=KILL", "-e", "inject=link,linkat:signal=KILL"],
}


@pytest.mark.parametrize("at", list(KILLED_AT))
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_first_start_killed_as_it_writes_its_new_key_loses_no_join_token(
        tmp_path: Path, backend: str, at: str, request: pytest.FixtureRequest) -> None:
    """The first start of netboot on an inventory whose join tokens are in clear, killed
    (kill -9; systemd's stop timeout) as it makes the secrets key: the next start makes
    one and reads every token. Before s45-integrity: killed as it was "made", the store
    had sealed the tokens as it opened, with the key not yet in its file: sealed with a
    key nobody held, the next start made another and every read of the cluster failed
    ("sealed with key X, but the key file is Y: restore the secret.key that belongs to
    this inventory", a key never written); killed as it was "written", an empty key file
    that every start refused ("not a netboot secrets key ... restore the file from a
    backup"). The kill is strace's, in a real ``netboot`` process (KILLED_AT)."""
    async with contextlib.AsyncExitStack() as stack:
        dsn = None
        if backend == "postgresql":  # a fresh schema of the session's cluster (tests/pg.py)
            dsn = await stack.enter_async_context(
                pg.fresh_schema(request.getfixturevalue("postgres")))
        await killed_as_it_writes_its_key(*await an_older_inventory(tmp_path, dsn),
                                          KILLED_AT[at])


async def killed_as_it_writes_its_key(path: Path, cfg: Config, inject: list[str]) -> None:
    key = cfg.data_dir / "secret.key"
    netboot = [sys.executable, "-m", "netboot", "clusters", "ls", "--config", str(path)]
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(key),
         "-e", "trace=openat,write,link,linkat", *inject, *netboot],
        capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # strace dies as netboot did
    again = subprocess.run(netboot, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert "edge" in again.stdout
    sealer = read_key(key)
    assert sealer is not None
    text = await stored_token(cfg)
    assert text is not None and sealer.is_sealed(text)  # sealed now, with the key on disk
    assert sealer.unseal(text, context=join_token_context("edge")) == JOIN_TOKEN


async def test_a_key_file_that_is_a_link_to_nothing_stops_start_up_naming_it(
        tmp_path: Path) -> None:
    """secret.key a symbolic link to a file that is not there (a secrets volume not yet
    mounted): the read finds none, the write finds one. A ConfigError naming the file, and
    the inventory's clear tokens left as they were. Before: open_inventory called itself
    again without end (a RecursionError after opening the store each time), and the
    first turn sealed the tokens with a key it never wrote."""
    _, cfg = await an_older_inventory(tmp_path, None)
    key = cfg.data_dir / "secret.key"
    key.symlink_to(tmp_path / "not-mounted" / "secret.key")
    with pytest.raises(ConfigError) as err:
        await open_inventory(cfg)
    assert str(key) in str(err.value) and "cannot be read" in str(err.value)
    assert err.value.fix and "mount" in err.value.fix
    assert await stored_token(cfg) == JOIN_TOKEN  # not sealed with a key nobody holds


async def test_a_lost_or_wrong_key_file_stops_start_up_naming_it(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    service = await build(cfg)
    await service.store.put_cluster(Cluster(name="edge", server_url="managed", token=JOIN_TOKEN))
    await service.close()
    key = cfg.data_dir / "secret.key"
    saved = key.read_bytes()

    key.unlink()
    with pytest.raises(ConfigError) as err:
        await build(cfg)
    assert "secret.key is missing" in str(err.value) and str(key) in str(err.value)
    assert err.value.fix and "restore" in err.value.fix
    assert not key.exists()  # no new key that would hide the lost one

    write_key(key, Sealer.generate())
    with pytest.raises(ConfigError, match="was sealed with key"):
        await build(cfg)

    key.unlink()
    key.write_bytes(saved)
    os.chmod(key, 0o600)
    service = await build(cfg)
    try:
        got = await service.store.get_cluster("edge")
        assert got is not None and got.token == JOIN_TOKEN
    finally:
        await service.close()


async def test_first_start_makes_private_files(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path), env={})
    service = await build(cfg)
    try:
        await service.store.put_cluster(Cluster(name="edge", server_url="managed",
                                                token=JOIN_TOKEN))
        db = cfg.db_path
        assert mode(cfg.data_dir) == 0o700
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"),
                     cfg.data_dir / "secret.key", cfg.data_dir / "admin.token",
                     cfg.data_dir / "tls" / "ca.key", cfg.data_dir / "tls" / "server.key"):
            assert mode(path) == 0o600, path
        for path in (cfg.data_dir / "tls" / "ca.pem", cfg.data_dir / "tls" / "server.pem"):
            assert mode(path) == 0o644, path
    finally:
        await service.close()


# --- a whole install: the token reaches the device and nothing else ------------------------------


Call = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[Service, Call, dict[str, str], str]]:
    """``netboot serve`` as it runs (its SQLite store and sealer): the service, a ``call``
    over real sockets checking the status, the admin's header and token."""
    cfg = load(write_config(tmp_path, "dns:\n  enabled: false\n"), env={})
    service = await build(cfg)
    await service.start()
    admin = (cfg.data_dir / "admin.token").read_text().strip()
    base = f"http://127.0.0.1:{service.http_port}"
    service.base_url = base
    try:
        async with aiohttp.ClientSession() as http:
            async def call(method: str, path: str, status: int, **kw: object) -> str:
                async with http.request(method, base + path, **kw) as resp:  # type: ignore[arg-type]
                    text = await resp.text()
                    assert resp.status == status, (path, resp.status, text)
                    return text

            yield service, call, {"Authorization": f"Bearer {admin}"}, admin
    finally:
        await service.close()


async def installs(call: Call, auth: dict[str, str]) -> str:
    """A cluster, a profile, the machine of MAC enrolled in them, its install script asked
    for: its install token."""
    await call("POST", "/api/v1/clusters", 201, headers=auth, json={
        "name": "edge", "server_url": "https://192.0.2.50:6443", "token": JOIN_TOKEN})
    await call("POST", "/api/v1/profiles", 201, headers=auth, json={
        "name": "k3os", "kernel": "vmlinuz", "initrds": ["initrd.img"]})
    await call("POST", "/api/v1/machines", 201, headers=auth, json={
        "mac": MAC, "cluster": "edge", "profile": "k3os", "role": "agent"})
    script = await call("GET", f"/ipxe?mac={HEXHYP}&arch=x86_64", 200)
    return script.split("token=", 1)[1].split()[0].split("&")[0]


async def test_join_token_is_in_the_config_and_in_no_log_line_or_file_byte(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with served(tmp_path) as (service, call, auth, admin):
        db = service.config.db_path
        token = await installs(call, auth)
        listed = await call("GET", "/api/v1/clusters", 200, headers=auth)
        shown = await call("GET", "/api/v1/clusters/edge", 200, headers=auth)
        assert JOIN_TOKEN not in listed + shown
        # Kept (for a device that reboots mid-install) only sealed.
        assert token.encode() not in db_bytes(db)
        config = await call("GET", f"/config/{HEXHYP}?token={token}", 200)
        assert yaml.safe_load(config)["k3os"]["token"] == JOIN_TOKEN
        user_data = await call("GET", f"/nocloud/{HEXHYP}/{token}/user-data", 200)
        assert JOIN_TOKEN in user_data
        await call("POST", f"/api/v1/machines/{HEXHYP}/events", 201,
                   headers={"Authorization": f"Bearer {token}"},
                   json={"kind": "installed", "message": "done"})
        await call("POST", "/api/v1/register", 200, json={
            "mac": MAC, "token": token, "hostname": "n1", "addresses": ["192.0.2.77"]})
        await call("GET", "/api/v1/machines", 200, headers=auth)
        await call("GET", f"/api/v1/machines/{HEXHYP}/events", 200, headers=auth)
        assert JOIN_TOKEN.encode() not in db_bytes(db)
    assert JOIN_TOKEN.encode() not in db_bytes(db)
    lines = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("config" in line for line in lines)  # the flow was logged, and
    assert not [line for line in lines if JOIN_TOKEN in line or admin in line]


async def test_a_machine_that_registered_leaves_no_sealed_form_kept(tmp_path: Path) -> None:
    """Through the served journey (script, config, installer's reports, registration, on a
    real SQLite store with the service's sealer): the install token's sealed form is kept
    while the install is under way (each write of the machine writes it again) and let go
    at its registration, whose machine token is not kept either. A storm's registered
    machines kept two each until the store's bound (131,072) pushed them out (s41-mem)."""
    async with served(tmp_path) as (service, call, auth, _):
        store = service.store
        kept = store._sealed._seals  # type: ignore[attr-defined]
        token = await installs(call, auth)
        assert len(kept) == 1
        await call("GET", f"/config/{HEXHYP}?token={token}", 200)
        for kind in ("installing", "installed"):
            await call("POST", f"/api/v1/machines/{HEXHYP}/events", 201,
                       headers={"Authorization": f"Bearer {token}"},
                       json={"kind": kind, "message": kind})
        assert len(kept) == 1  # one a machine, its install's
        await call("POST", "/api/v1/register", 200, json={
            "mac": MAC, "token": token, "hostname": "n1", "addresses": ["192.0.2.77"]})
        assert len(kept) == 0
        (registered,) = await store.list_machines()
        assert registered.state is MachineState.REGISTERED
        assert registered.install_token and registered.install_token != token


def test_a_cluster_or_join_plan_in_a_log_line_does_not_carry_the_token() -> None:
    from netboot.model import K3sJoin, Role

    cluster = Cluster(name="edge", server_url="managed", token=JOIN_TOKEN)
    join = K3sJoin(Role.AGENT, "https://192.0.2.50:6443", False, JOIN_TOKEN)
    assert JOIN_TOKEN not in repr(cluster) + str(cluster) + repr(join) + str(join)
    assert "edge" in repr(cluster) and "192.0.2.50" in repr(join)
