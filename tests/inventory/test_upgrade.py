"""This tree started on the data directory an older netboot left (tests/data/inventory-*).

Each fixture was made by ``tests/data/make_old_inventory.py`` with an older commit's own
CLI and HTTP API (its ``made.json`` names the commit): a managed cluster, a profile, a group,
an API token used once, a machine installed and registered (its install token spent), one
whose install was asked for (a token issued, not spent), one enrolled and never seen, and a
device that booted unknown (discovered). Started on a copy, everything must be there and
work: the old API token and admin token, boots of each machine as its state says, a config
and a registration of the install under way, the cluster's join token (sealed by the old
secrets key), the CA. A ``-pg`` fixture holds the PostgreSQL inventory as ``pg_dump`` wrote
it (``inventory.sql``), restored into a fresh database of the session's cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import ssl
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from netboot.config import load
from netboot.lab.pgcluster import bindir
from netboot.service import build
from tests import pg
from tests.conftest import write_config

DATA = Path(__file__).resolve().parent.parent / "data"
SCHEMA = "netboot_old"  # the schema of a -pg fixture (tests/data/make_old_inventory.py)
FIXTURES = sorted(p.name for p in DATA.glob("inventory-*") if (p / "made.json").is_file())


async def restored(postgres: pg.Cluster, dump: Path) -> str:
    """``dump`` restored into a new database of ``postgres``: its DSN, on the dump's schema."""
    database = f"up_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres.dsn())
    try:
        await admin.execute(f"CREATE DATABASE {database}")
    finally:
        await admin.close()
    done = await asyncio.create_subprocess_exec(
        str(bindir() / "psql"), postgres.dsn(database), "-q", "-v", "ON_ERROR_STOP=1", "-f",
        str(dump), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await done.communicate()
    assert done.returncode == 0, out.decode()
    return f"{postgres.dsn(database)}&search_path={SCHEMA}"


# The fixtures' install tokens were issued when they were made and expire an install timeout
# (1 h) later: the upgrade is played as happening while the install is under way, each stored
# token_expires moved to an hour from now (nothing else changed; the tokens themselves are the
# old netboot's). Without it the test passed only within an hour of making the fixtures.
WINDOW = 3600.0


def renew_sqlite(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE machines SET data = json_set(data, '$.token_expires', ?)"
                     " WHERE json_extract(data, '$.token_expires') IS NOT NULL",
                     (time.time() + WINDOW,))
    conn.close()


async def renew_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)  # on the dump's schema: its triggers name tables bare
    try:
        await conn.execute(
            f"UPDATE {SCHEMA}.machines SET data = jsonb_set(data::jsonb, '{{token_expires}}',"
            " to_jsonb($1::float8))::text WHERE (data::jsonb) ->> 'token_expires' IS NOT NULL",
            time.time() + WINDOW)
    finally:
        await conn.close()


@pytest.mark.parametrize("fixture", FIXTURES)
async def test_an_older_netboots_inventory_is_all_there_and_works(
        tmp_path: Path, fixture: str, request: pytest.FixtureRequest) -> None:
    assert FIXTURES, "no fixture in tests/data"
    made = json.loads((DATA / fixture / "made.json").read_text())
    dump = DATA / fixture / "inventory.sql"
    extra = ""
    if dump.is_file():
        dsn = await restored(request.getfixturevalue("postgres"), dump)
        await renew_postgres(dsn)
        extra = f"inventory:\n  backend: postgresql\n  dsn: \"{dsn}\"\n"
    cfg = load(write_config(tmp_path, extra), env={})
    shutil.copytree(DATA / fixture, cfg.data_dir,
                    ignore=shutil.ignore_patterns("made.json", "inventory.sql"))
    for path in cfg.data_dir.rglob("*"):  # git keeps no modes: the keys as netboot made them
        path.chmod(0o700 if path.is_dir() else 0o600)
    if not dump.is_file():
        renew_sqlite(cfg.data_dir / "netboot.db")
    ca_before = (cfg.data_dir / "tls" / "ca.pem").read_text()
    cfg = replace(cfg, https=replace(cfg.https, port=0))
    service = await build(cfg)
    await service.start()
    out: dict[str, Any] = {}
    try:
        store = service.store
        out["profiles"] = [p.name for p in await store.list_profiles()]
        out["clusters"] = [(c.name, c.endpoint, bool(c.token)) for c in await store.list_clusters()]
        out["groups"] = [(g.name, g.profile, g.cluster) for g in await store.list_groups()]
        machines = {str(m.mac): m for m in await store.list_machines()}
        out["states"] = {mac: str(machines[mac].state) for mac in
                         (made["installed"], made["asked"], made["never"], made["unknown"])}
        base = f"http://127.0.0.1:{service.http_port}"
        admin = (cfg.data_dir / "admin.token").read_text().strip()
        async with aiohttp.ClientSession() as http:
            for name, token in (("api token", made["api_token"]), ("admin token", admin)):
                async with http.get(f"{base}/api/v1/machines",
                                    headers={"Authorization": f"Bearer {token}"}) as r:
                    out[name] = r.status
            async def ipxe(mac: str) -> str:
                async with http.get(f"{base}/ipxe?mac={mac}&arch=x86_64") as r:
                    assert r.status == 200, await r.text()
                    return await r.text()

            out["installed boots"] = await ipxe(made["installed"])
            asked = await ipxe(made["asked"])
            token = asked.split("?token=", 1)[1].split()[0]
            hexhyp = made["asked"].replace(":", "-")
            async with http.get(f"{base}/config/{hexhyp}?token={token}") as r:
                out["config"] = (r.status, await r.text())
            bearer = {"Authorization": f"Bearer {token}"}
            async with http.post(f"{base}/api/v1/machines/{made['asked']}/events",
                                 json={"kind": "installed"}, headers=bearer) as r:
                out["installed event"] = r.status
            async with http.post(f"{base}/api/v1/register", headers=bearer, json={
                    "mac": made["asked"], "token": token, "hostname": "node-2",
                    "addresses": ["192.0.2.52"], "machine_id": "m-2"}) as r:
                out["register"] = r.status
            async with http.post(f"{base}/api/v1/register", headers=bearer, json={
                    "mac": made["asked"], "token": token, "hostname": "node-2",
                    "addresses": ["192.0.2.52"], "machine_id": "m-2"}) as r:
                out["register again"] = r.status
            async with http.post(f"{base}/api/v1/register", headers=bearer, json={
                    "mac": made["asked"], "token": token, "hostname": "node-2",
                    "addresses": ["198.51.100.52"], "machine_id": "m-3"}) as r:
                out["register from elsewhere"] = r.status
            out["asked boots"] = await ipxe(made["asked"])
            # The one never seen boots by its group (rack=r1: the group's profile, cluster).
            out["never boots"] = await ipxe(made["never"])
            assert service.tls is not None
            context = ssl.create_default_context(cadata=service.tls.ca_pem)
            async with http.get(f"https://127.0.0.1:{service.https_port}/healthz",
                                ssl=context) as r:
                out["https"] = r.status
        out["ca kept"] = service.tls.ca_pem.strip() == ca_before.strip()
        out["discovered"] = [str(m.mac) for m in await store.list_machines()
                             if str(m.state) == "discovered"]
    finally:
        await service.close()
    assert out["profiles"] == ["k3os"]
    assert out["clusters"] == [("edge", "k3s.example", True)]  # its join token unsealed
    assert out["groups"] == [("rack1", "k3os", "edge")]
    assert out["states"] == {made["installed"]: "registered", made["asked"]: "booting",
                             made["never"]: "enrolled", made["unknown"]: "discovered"}
    assert out["api token"] == out["admin token"] == 200
    assert "exit" in out["installed boots"] and "kernel" not in out["installed boots"]
    status, config = out["config"]
    assert status == 200 and 'server_url: "https://k3s.example:6443"' in config
    assert '\n  token: "' in config  # the cluster's join token, sealed by the old key
    assert out["installed event"] == 201
    # Again from the same address: a repeat of a registration whose answer was lost, 200 as
    # the first; from another, the spent token is refused by state (s37-register), unless it
    # carries the machine-id the registration reported, within the hour (s38-journey).
    assert (out["register"], out["register again"], out["register from elsewhere"]) == \
        (200, 200, 409)
    assert "exit" in out["asked boots"]
    assert "kernel" in out["never boots"] and "?token=" in out["never boots"]
    assert out["https"] == 200 and out["ca kept"]
    assert out["discovered"] == [made["unknown"]]


@pytest.mark.parametrize("fixture", ["inventory-s30", "inventory-s30-pg"])
async def test_a_document_that_is_not_json_stops_the_migration_naming_its_row(
        tmp_path: Path, fixture: str, request: pytest.FixtureRequest) -> None:
    """An older netboot's inventory (SQLite schema 7, PostgreSQL 4) where hand SQL left a
    machine's document that is not JSON: the migration (SQLite 8's json_extract,
    PostgreSQL 5's data::jsonb) stopped start-up with "cannot migrate inventory: malformed
    JSON" (SQLite) or "invalid input syntax for type json" (PostgreSQL), naming no row of
    100,000. Now it names the table, the row and the fix, nothing migrated; put right, the
    next start migrates."""
    from netboot.errors import StoreError

    made = json.loads((DATA / fixture / "made.json").read_text())
    dump = DATA / fixture / "inventory.sql"
    extra, dsn = "", ""
    if dump.is_file():
        dsn = await restored(request.getfixturevalue("postgres"), dump)
        extra = f"inventory:\n  backend: postgresql\n  dsn: \"{dsn}\"\n"
    cfg = load(write_config(tmp_path, extra), env={})
    shutil.copytree(DATA / fixture, cfg.data_dir,
                    ignore=shutil.ignore_patterns("made.json", "inventory.sql"))
    for path in cfg.data_dir.rglob("*"):
        path.chmod(0o700 if path.is_dir() else 0o600)
    cfg = replace(cfg, https=replace(cfg.https, port=0))
    db = cfg.data_dir / "netboot.db"
    find = "SELECT machine FROM {}machine_keys WHERE kind = 'mac' AND value = {}"
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            ident = await conn.fetchval(find.format(f"{SCHEMA}.", "$1"), made["asked"])
            data = await conn.fetchval(f"SELECT data FROM {SCHEMA}.machines WHERE id = $1",
                                       ident)
            await conn.execute(f"UPDATE {SCHEMA}.machines SET data = $2 WHERE id = $1", ident,
                               data[:40])
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(db)) as hand, hand:
            ident = hand.execute(find.format("", "?"), (made["asked"],)).fetchone()[0]
            data = hand.execute("SELECT data FROM machines WHERE id = ?", (ident,)).fetchone()[0]
            hand.execute("UPDATE machines SET data = ? WHERE id = ?", (data[:40], ident))
    with pytest.raises(StoreError) as failed:
        await build(cfg)
    told = str(failed.value)
    assert told.startswith("cannot migrate inventory "), told
    assert (f"the machines row '{ident}' holds a data document that is not JSON (written by "
            "hand SQL or a damaged copy, not by netboot); nothing was changed. Put each such "
            "row's data right (the JSON netboot wrote, e.g. from a backup), or remove the row"
            ) in told, told
    assert f"DELETE FROM machines WHERE id = '{ident}'" in told, told
    assert told.endswith("then start netboot again"), told
    # Nothing migrated (one transaction), and once the row is put right the start migrates.
    if dsn:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_migrations") == 4
            await conn.execute(f"UPDATE {SCHEMA}.machines SET data = $2 WHERE id = $1", ident,
                               data)
        finally:
            await conn.close()
    else:
        with contextlib.closing(sqlite3.connect(db)) as hand, hand:
            assert hand.execute("PRAGMA user_version").fetchone()[0] == 7
            hand.execute("UPDATE machines SET data = ? WHERE id = ?", (data, ident))
    service = await build(cfg)
    try:
        assert str((await service.store.get_machine(ident)).mac) == made["asked"]  # type: ignore[union-attr]
    finally:
        await service.store.close()
