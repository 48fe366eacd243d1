"""``netboot db migrate`` and ``netboot db copy``: SQLite → PostgreSQL → SQLite, verified."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from netboot.cli import main
from netboot.errors import StoreError
from netboot.inventory.base import Batch, MachineFilter, Store
from netboot.inventory.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION
from netboot.inventory.postgres import PostgresStore
from netboot.inventory.sqlite import SCHEMA_VERSION, SqliteStore
from netboot.model import (
    ApiToken,
    AuditEntry,
    Cluster,
    Event,
    Group,
    Lease,
    MacAddress,
    Machine,
    MachineState,
    Profile,
    Scope,
)
from netboot.sealing import Sealer
from tests import pg
from tests.conftest import write_config

SEALER = Sealer.generate()


async def fill(store: Store) -> None:
    machines = [Machine(macs=(MacAddress.parse(f"02:00:00:00:01:{i:02x}"),),
                        hostname=f"n{i}", labels={"rack": str(i % 3)}, serial=f"SN{i}",
                        state=MachineState.INSTALLING if i % 2 else MachineState.ENROLLED,
                        install_token=f"install-{i}" if i % 2 else None, created=i + 0.5)
                for i in range(40)]
    machines.append(Machine(serial="no-nic", hostname="bare"))
    await store.apply_batch(Batch(create=machines))
    await store.put_profile(Profile(name="p", kernel="vmlinuz", cmdline="quiet ünïcode"))
    await store.put_cluster(Cluster(name="edge", token="join-secret"))
    await store.put_group(Group(name="g", selector={"arch": ("x86_64",)}, profile="p"))
    for i in range(5):
        await store.add_event(Event(machines[0].id, 10.0 - i, f"k{i}", data={"i": i}))
    await store.add_event(Event("m-nobody", 1.0, "discovered"))  # a machine nobody enrolled
    await store.put_lease(Lease(mac="02:00:00:00:09:01", ipv4="192.0.2.50", expires=99.0))
    await store.put_setting("cluster-init/edge", machines[1].id)
    await store.create_token(ApiToken(name="ci", sha256="a" * 64, scope=Scope.READ,
                                      created=5.0, expires=500))
    await store.add_audit(AuditEntry(time=3, actor="ci", action="POST /x", target="t",
                                     peer="192.0.2.1", outcome="201"))


async def snapshot(store: Store) -> dict[str, Any]:
    machines = await store.list_machines(MachineFilter(limit=10_000))
    return {
        "machines": machines,
        "profiles": await store.list_profiles(),
        "clusters": await store.list_clusters(),
        "groups": await store.list_groups(),
        "events": {m.id: await store.list_events(m.id) for m in machines},
        "unknown": await store.list_events("m-nobody"),
        "leases": await store.list_leases(),
        "setting": await store.get_setting("cluster-init/edge"),
        "tokens": await store.list_tokens(),
        "audit": await store.list_audit(),
    }


async def opened(store: Store, work: Any) -> Any:
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_sqlite_to_postgresql_and_back_is_exact(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    first, back = tmp_path / "first.db", tmp_path / "back.db"
    asyncio.run(opened(SqliteStore(first, sealer=SEALER), fill))
    before = asyncio.run(opened(SqliteStore(first, sealer=SEALER), snapshot))
    with pg.schema_sync(postgres) as dsn:
        secret = tmp_path / "dsn"
        secret.write_text(dsn)
        rc, out, err = run(capsys, "db", "copy", "--from", str(first), "--to", f"@{secret}")
        assert rc == 0, err
        assert "machines              41 rows" in out and "counts and checksums equal" in out
        assert asyncio.run(opened(PostgresStore(dsn, sealer=SEALER), snapshot)) == before

        async def later_event(store: Store) -> list[str]:
            # The copied ids came first: a new event still lists after them.
            machine = before["machines"][0].id
            await store.add_event(Event(machine, 0.0, "after-copy"))
            return [e.kind for e in await store.list_events(machine)]

        kinds = asyncio.run(opened(PostgresStore(dsn), later_event))
        assert kinds == ["k0", "k1", "k2", "k3", "k4", "after-copy"]
        rc, out, err = run(capsys, "db", "copy", "--from", f"@{secret}", "--to", str(back),
                           "--json")
        assert rc == 0, err
        tables = {t["table"]: t["rows"] for t in json.loads(out)["tables"]}
        assert tables["events"] == 7 and tables["machine_keys"] == 81
    after = asyncio.run(opened(SqliteStore(back, sealer=SEALER), snapshot))
    assert after["events"][before["machines"][0].id][-1].kind == "after-copy"
    after["events"][before["machines"][0].id].pop()
    assert after == before


def test_a_non_empty_target_is_refused_without_force(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source.db"
    asyncio.run(opened(SqliteStore(source), fill))
    with pg.schema_sync(postgres) as dsn:
        asyncio.run(opened(PostgresStore(dsn), lambda s: s.put_profile(
            Profile(name="there-before", kernel="k"))))
        rc, _, err = run(capsys, "db", "copy", "--from", str(source), "--to", dsn)
        assert rc == 1 and "is not empty (1 profiles" in err and "--force" in err
        names = asyncio.run(opened(PostgresStore(dsn), lambda s: s.list_profiles()))
        assert [p.name for p in names] == ["there-before"]  # untouched
        rc, _, err = run(capsys, "db", "copy", "--from", str(source), "--to", dsn, "--force")
        assert rc == 0, err
        names = asyncio.run(opened(PostgresStore(dsn), lambda s: s.list_profiles()))
        assert [p.name for p in names] == ["p"]
    rc, _, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(source))
    assert rc == 1 and "same inventory" in err


def test_db_migrate_says_which_steps_it_applied(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write_config(tmp_path))
    rc, out, _ = run(capsys, "db", "migrate", "--config", cfg)
    steps = ", ".join(str(i) for i in range(1, SCHEMA_VERSION + 1))
    assert rc == 0 and f"applied migrations {steps}; schema version {SCHEMA_VERSION}" in out
    rc, out, _ = run(capsys, "db", "migrate", "--config", cfg)
    assert rc == 0 and "up to date" in out
    with pg.schema_sync(postgres) as dsn:
        cfg = str(write_config(tmp_path / "pg", "inventory:\n  backend: postgresql\n"
                                                 f'  dsn: "{dsn}"\n'))
        rc, out, _ = run(capsys, "db", "migrate", "--json", "--config", cfg)
        assert rc == 0 and json.loads(out)["applied"] == list(range(1, PG_SCHEMA_VERSION + 1))
        rc, out, _ = run(capsys, "db", "migrate", "--config", cfg)
        assert rc == 0 and "up to date" in out and "postgresql://netboot@" in out


def test_db_copy_connects_with_the_configured_peer_settings(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``netboot db copy``'s connections (the copy's own, its check's, the migration's
    store's) are set up by the configured inventory.postgresql (here from the file and its
    NETBOOT_INVENTORY_POSTGRESQL_* variable), as the servers' are, not by the defaults."""
    from netboot.inventory import postgres as store_module
    from netboot.inventory.dsn import PeerSettings

    seen: list[PeerSettings] = []
    connect = store_module.connect

    async def spying(dsn: str, peer: PeerSettings, **kw: Any) -> Any:
        seen.append(peer)
        return await connect(dsn, peer, **kw)

    monkeypatch.setattr(store_module, "connect", spying)
    adopt = PostgresStore._adopt_session

    async def adopting(self: PostgresStore, conn: Any) -> None:
        seen.append(self._peer)
        await adopt(self, conn)

    monkeypatch.setattr(PostgresStore, "_adopt_session", adopting)
    monkeypatch.setenv("NETBOOT_INVENTORY_POSTGRESQL_TCP_USER_TIMEOUT", "21")
    cfg = str(write_config(tmp_path, "inventory:\n  postgresql:\n    check_interval: 1\n"))
    source = tmp_path / "source.db"
    asyncio.run(opened(SqliteStore(source), fill))
    with pg.schema_sync(postgres) as dsn:
        rc, _, err = run(capsys, "db", "copy", "--config", cfg, "--from", str(source),
                         "--to", dsn)
    assert rc == 0, err
    assert seen and {(p.tcp_user_timeout, p.check_interval) for p in seen} == {(21, 1)}


async def test_a_copy_whose_server_stops_answering_fails_within_the_checks_bound() -> None:
    """``netboot db copy``'s connection is watched as a store's are: its server stopped
    (SIGSTOP, behind a proxy that keeps the client's side open: every probe answered), a
    statement under way fails within check_interval + check_timeout, saying why, rather
    than waiting for ever. (Without the check, check_interval 0: still waiting after 20 s.)"""
    from netboot.inventory import transfer
    from netboot.inventory.dsn import PeerSettings

    peer = PeerSettings(connect_timeout=1, keepalives_idle=1, keepalives_interval=1,
                        keepalives_count=2, tcp_user_timeout=2, check_interval=1,
                        check_timeout=1)
    cluster = await asyncio.to_thread(pg.start)  # its own: all of it is stopped
    try:
        async with pg.cutting(cluster.dsn(), tcp=True) as (dsn, _cutter):
            async def work(conn: Any) -> None:
                assert await conn.fetchval("SELECT 1") == 1
                with pg.stopped(pg.server_pids(cluster.process.pid)):
                    await conn.fetchval("SELECT 2")

            copying = asyncio.ensure_future(transfer._pg(dsn, work, peer))
            done, _ = await asyncio.wait((copying,), timeout=20)
            assert copying in done, "still waiting after 20 s"
            with pytest.raises(StoreError, match="no answer to a check within 1 s"):
                copying.result()
    finally:
        await asyncio.to_thread(cluster.stop)


def test_a_backup_copy_is_readable_by_its_owner_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README "Backup, restore and upgrades": ``db copy`` of the running server's inventory
    is the backup. It holds what netboot.db holds (the audit log, serials, sealed secrets),
    which the server keeps 0600: the copy was made with the umask's 0644, every user's to
    read. A restore (--force onto an existing file) keeps that file's mode."""
    import os
    import stat

    source = tmp_path / "netboot.db"
    asyncio.run(opened(SqliteStore(source, sealer=SEALER), fill))
    backup = tmp_path / "backup.db"
    old = os.umask(0o022)
    try:
        rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(backup))
    finally:
        os.umask(old)
    assert rc == 0 and "counts and checksums equal" in out, err
    for path in (backup, *(backup.with_name(backup.name + s) for s in ("-wal", "-shm"))):
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    restored = tmp_path / "restored.db"
    restored.touch(mode=0o640)
    rc, _, err = run(capsys, "db", "copy", "--from", str(backup), "--to", str(restored),
                     "--force")
    assert rc == 0, err
    assert stat.S_IMODE(restored.stat().st_mode) == 0o640
    before = asyncio.run(opened(SqliteStore(source, sealer=SEALER), snapshot))
    assert asyncio.run(opened(SqliteStore(restored, sealer=SEALER), snapshot)) == before


# Where strace kills ``netboot db copy`` making a backup into a new file (``-P`` the
# backup's path and its -wal's: the calls naming them, or a descriptor of them; a signal
# injected at a call's entry, so the call is not made): "made", once the file is there
# (SQLite's open of the file the copy created; or the link of a copy made whole under
# another name); "written", as its first bytes are written (or that link, when nothing is
# written under its name).
COPY_KILLED_AT = {"made": "inject=openat:signal=KILL:when=2",
                  "written": "inject=pwrite64:signal=KILL"}


@pytest.mark.parametrize("at", list(COPY_KILLED_AT))
def test_a_backup_copy_killed_midway_leaves_nothing_a_restore_would_take(
        tmp_path: Path, at: str) -> None:
    """A nightly ``db copy`` killed midway (kill -9, the OOM killer, a reboot): no file is
    left under the backup's name, so a restore from it is refused ("no such inventory
    file") and the next copy to that name makes a whole backup. Before s45-integrity the
    copy made and migrated the file first and filled it in one transaction: killed
    between the two, it left a valid, empty inventory, which a restore copied without a
    word ("counts and checksums equal", 0 machines) over the inventory it was to bring
    back. The kill is strace's, in a real ``netboot`` process (COPY_KILLED_AT)."""
    import signal
    import subprocess
    import sys

    source = tmp_path / "netboot.db"
    asyncio.run(opened(SqliteStore(source, sealer=SEALER), fill))
    backup = tmp_path / "backup.db"
    netboot = [sys.executable, "-m", "netboot", "db", "copy"]
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(backup), "-P", f"{backup}-wal",
         "-e", "trace=openat,pwrite64,link,linkat", "-e", COPY_KILLED_AT[at],
         "-e", "inject=link,linkat:signal=KILL", *netboot,
         "--from", str(source), "--to", str(backup)],
        capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr  # strace dies as netboot did
    restored = tmp_path / "restored.db"
    restore = subprocess.run([*netboot, "--from", str(backup), "--to", str(restored)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert restore.returncode != 0, restore.stdout  # not an empty inventory, copied
    assert "no such inventory file" in restore.stderr, restore.stderr
    again = subprocess.run([*netboot, "--from", str(source), "--to", str(backup)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0 and "counts and checksums equal" in again.stdout, again.stderr
    before = asyncio.run(opened(SqliteStore(source, sealer=SEALER), snapshot))
    assert asyncio.run(opened(SqliteStore(backup, sealer=SEALER), snapshot)) == before


def test_an_empty_file_is_no_inventory_to_copy_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file of 0 bytes as ``--from`` (what a copy killed as it gave its file the name
    leaves where the file system has no hard links, durable.link_new; a ``touch``): refused,
    the target untouched. Before, it was migrated into an empty inventory and copied as one
    ("counts and checksums equal"), over a restore's target with --force."""
    target = tmp_path / "netboot.db"
    asyncio.run(opened(SqliteStore(target, sealer=SEALER), fill))
    empty = tmp_path / "backup.db"
    empty.touch()
    rc, out, err = run(capsys, "db", "copy", "--from", str(empty), "--to", str(target),
                       "--force")
    assert rc != 0 and "an empty file, not an inventory" in err, (out, err)
    assert empty.stat().st_size == 0
    assert len(asyncio.run(opened(SqliteStore(target, sealer=SEALER), snapshot))["machines"]) == 41


def test_a_postgresql_copy_without_the_driver_says_how_to_install_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's install (``.[fast]``) has no asyncpg; its step to PostgreSQL (``db copy
    --to postgresql://…``) printed the driver's ImportError traceback. And never by the
    name ``netboot[postgresql]``: PyPI's "netboot" is another project."""
    import sys

    source = tmp_path / "netboot.db"
    asyncio.run(opened(SqliteStore(source), fill))
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg raises ImportError
    monkeypatch.delitem(sys.modules, "netboot.inventory.postgres")
    for args in (("--from", str(source), "--to", "postgresql://netboot@127.0.0.1:1/netboot"),
                 ("--from", "postgresql://netboot@127.0.0.1:1/netboot", "--to",
                  str(tmp_path / "back.db"))):
        rc, _, err = run(capsys, "db", "copy", *args)
        assert rc == 2, err
        assert "Traceback" not in err and "--from/--to" in err, err
        assert "asyncpg" in err and "pip install '.[postgresql]'" in err, err
        assert "netboot[" not in err, err
    assert not (tmp_path / "back.db").exists()


def test_a_copy_warns_of_the_machines_whose_next_boot_installs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A restored backup brings machines back as they were: one that installed after the
    backup was taken is enrolled (or booting) again, and reinstalls at its next network boot.
    The copy says how many would, by state, and what avoids it; not for installed ones."""
    source, target, done = tmp_path / "source.db", tmp_path / "target.db", tmp_path / "d.db"

    async def machines(store: Store, states: tuple[MachineState, ...]) -> None:
        for i, state in enumerate(states):
            await store.create_machine(Machine(macs=(MacAddress.parse(f"52:54:00:00:0a:{i:02x}"),),
                                               hostname=f"n{i}", state=state))

    asyncio.run(opened(SqliteStore(source), lambda s: machines(s, (
        MachineState.ENROLLED, MachineState.BOOTING, MachineState.ENROLLED,
        MachineState.REGISTERED, MachineState.INSTALLED, MachineState.DISCOVERED))))
    rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(target))
    assert rc == 0 and "counts and checksums equal" in out, err
    assert err.startswith("netboot: warning: 3 machines in the copy install at the next "
                          "network boot (1 booting, 2 enrolled): if this restores a backup"), err
    assert "netboot machines mark-installed REF" in err
    # Each state's list: the booting one (its install under way at the backup) was left out.
    assert ("`netboot machines ls --state booting`, `netboot machines ls --state enrolled` "
            "list them" in err), err
    assert '"Backup, restore and upgrades"' in err  # README.md's section, by its title
    rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(target),
                       "--force", "--json")
    assert rc == 0 and json.loads(out)["installs_on_boot"] == {"booting": 1, "enrolled": 2}
    installed = tmp_path / "installed.db"
    asyncio.run(opened(SqliteStore(installed), lambda s: machines(s, (
        MachineState.REGISTERED, MachineState.INSTALLED))))
    rc, out, err = run(capsys, "db", "copy", "--from", str(installed), "--to", str(done))
    assert (rc, err) == (0, ""), err


def test_machines_that_installed_after_the_backup_are_marked_installed_after_a_restore(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The restore's way out (matchbox's and Tinkerbell's allowPXE: false): an enrolled or
    booting machine of a restored backup that had installed since is marked installed by the
    operator, and its next network boot goes to its disk. Before, an enrolled machine had no
    step to installed: its disk was wiped at its next network boot, or kept off the network."""
    backup, data = tmp_path / "backup.db", tmp_path / "data"
    data.mkdir(mode=0o700)

    async def machines(store: Store) -> None:
        for i, state in enumerate((MachineState.ENROLLED, MachineState.BOOTING,
                                   MachineState.DISCOVERED, MachineState.ENROLLED)):
            await store.create_machine(Machine(macs=(MacAddress.parse(f"52:54:00:00:0b:{i:02x}"),),
                                               hostname=f"r{i}", state=state))

    asyncio.run(opened(SqliteStore(backup), machines))
    rc, _, err = run(capsys, "db", "copy", "--from", str(backup), "--to",
                     str(data / "netboot.db"))
    assert rc == 0 and "3 machines in the copy install" in err, err
    dd = ("--data-dir", str(data))
    rc, out, err = run(capsys, "machines", "mark-installed", "52:54:00:00:0b:00",
                       "52-54-00-00-0b-01", *dd)
    assert rc == 0, err
    assert out.splitlines() == [
        "52:54:00:00:0b:00 is installed: its next network boot goes to its disk (was enrolled)",
        "52:54:00:00:0b:01 is installed: its next network boot goes to its disk (was booting)"]
    rc, out, _ = run(capsys, "explain", "52:54:00:00:0b:00", "--arch", "x86_64", "--json", *dd)
    assert rc == 0 and json.loads(out)["decision"] == "local", out
    rc, out, _ = run(capsys, "machines", "show", "52:54:00:00:0b:00", "--json", *dd)
    shown = json.loads(out)
    assert shown["state"] == "installed"
    assert [(e["kind"], e["message"]) for e in shown["events"]][-1] == (
        "installed", "marked installed by the operator (was enrolled)")
    # A discovered machine was never enrolled: refused, naming its state; nothing written.
    rc, out, err = run(capsys, "machines", "mark-installed", "52:54:00:00:0b:02", *dd)
    assert rc == 1 and "52:54:00:00:0b:02 is discovered; 'installed' is not allowed" in err, err
    # Marked again: a repeated report, still installed.
    rc, _, err = run(capsys, "machines", "mark-installed", "52:54:00:00:0b:00", *dd)
    assert rc == 0, err
    # Who marked them is in the audit log, as for every CLI change.
    rc, out, _ = run(capsys, "audit", "--json", *dd)
    assert [e["action"] for e in json.loads(out)].count("machines mark-installed") == 3, out
    # The next copy (a backup of the restored inventory) counts only the one left enrolled.
    rc, _, err = run(capsys, "db", "copy", "--from", str(data / "netboot.db"), "--to",
                     str(tmp_path / "again.db"))
    assert rc == 0 and "1 machine in the copy installs at the next network boot " \
        "(1 enrolled)" in err, err


def test_a_machine_in_reinstall_at_the_backup_is_marked_installed_after_a_restore(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One in reinstall when the backup was taken, reinstalled since: the restore's warning
    counts it (its next network boot installs) and says to mark it installed, which was
    refused ("reinstall; 'installed' is not allowed"): its disk was wiped again (s39-review).
    A reinstall voids the install token, so only the operator's word gets there."""
    backup, data = tmp_path / "backup.db", tmp_path / "data"
    data.mkdir(mode=0o700)

    async def machines(store: Store) -> None:
        await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:00:0c:00"),),
                                           hostname="again", state=MachineState.REINSTALL))

    asyncio.run(opened(SqliteStore(backup), machines))
    rc, _, err = run(capsys, "db", "copy", "--from", str(backup), "--to",
                     str(data / "netboot.db"))
    assert rc == 0 and "1 machine in the copy installs at the next network boot " \
        "(1 reinstall)" in err and "mark-installed" in err, err
    dd = ("--data-dir", str(data))
    rc, out, err = run(capsys, "machines", "mark-installed", "again", *dd)
    assert rc == 0, err
    assert out.splitlines() == ["52:54:00:00:0c:00 is installed: its next network boot goes "
                                "to its disk (was reinstall)"]
    rc, out, _ = run(capsys, "explain", "again", "--arch", "x86_64", "--json", *dd)
    assert rc == 0 and json.loads(out)["decision"] == "local", out
    rc, _, err = run(capsys, "db", "copy", "--from", str(data / "netboot.db"), "--to",
                     str(tmp_path / "again.db"))
    assert (rc, err) == (0, ""), err


def test_a_backup_into_a_directory_not_made_yet_says_to_make_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's first backup goes to /backup, which a fresh host has not: the copy said
    to "point server.data_dir (--data-dir) or inventory.path elsewhere" (the server's own
    inventory's message), which is not what `db copy --to` was given."""
    source = tmp_path / "netboot.db"
    asyncio.run(opened(SqliteStore(source), fill))
    target = tmp_path / "backup" / "netboot-2026-12-06.db"
    rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(target))
    assert (rc, out) == (2, ""), err
    assert err.strip() == (
        f"netboot: configuration error: --to: the directory {target.parent} does not exist "
        f"(fix: create it (install -d -m 0700 {target.parent}), or name a file in another "
        "directory)")
    assert "data_dir" not in err and not target.parent.exists()


@pytest.mark.parametrize("assets", [True, False], ids=["assets", "all-urls"])
def test_the_readmes_backup_block_runs_as_it_stands_on_a_fresh_host(
        tmp_path: Path, assets: bool) -> None:
    """README "Backup, restore and upgrades": its back-up block, run line after line by bash
    on a host where no /backup exists yet (a fresh one), with sudo as root has it and the
    paths moved under tmp_path. It named /backup without making it: the copy and the cp both
    failed there (s39-user). ``all-urls``: a server whose profiles' kernels are all URLs
    never made ``assets/``, and its ``cp -a …/assets`` failed, the restore's too (s39-review)."""
    import base64
    import os
    import re
    import shutil
    import subprocess
    import sys

    import netboot

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Backup, restore and upgrades", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\*\*Back up\*\*.*?```sh\n(.*?)```", section, re.S)
    assert block is not None
    data, backup, bin_dir = tmp_path / "data", tmp_path / "backup", tmp_path / "venv" / "bin"
    data.mkdir(mode=0o700)
    asyncio.run(opened(SqliteStore(data / "netboot.db"), fill))
    (data / "tls").mkdir()
    for name in ("admin.token", "tls/ca.pem"):
        (data / name).write_text("x\n")
    key = base64.b64encode(os.urandom(32)).decode() + "\n"  # as the server writes it
    (data / "secret.key").write_text(key)
    if assets:
        (data / "assets" / "k3os").mkdir(parents=True)  # the quickstart's kernel
        (data / "assets" / "k3os" / "vmlinuz").write_bytes(b"kernel")
    bin_dir.mkdir(parents=True)
    (bin_dir / "netboot").write_text(f"#!/bin/sh\nexec {sys.executable} -m netboot \"$@\"\n")
    (bin_dir / "netboot").chmod(0o755)
    script = backup_script = (block.group(1).replace("/var/lib/netboot", str(data))
                              .replace("/backup", str(backup))
                              .replace(".venv/bin/", f"{bin_dir}/"))
    # The data directory a command names by default (mark-installed), moved too.
    env = {**os.environ, "PYTHONPATH": str(Path(netboot.__file__).resolve().parents[1]),
           "NETBOOT_SERVER_DATA_DIR": str(data)}
    env.pop("NETBOOT_CONFIG", None)
    done = subprocess.run(["bash", "-euc", "sudo() { \"$@\"; }\n" + script], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    copies = sorted(p.name for p in backup.glob("netboot-*.db"))
    assert len(copies) == 1 and {"secret.key", "admin.token", "tls"} <= {
        p.name for p in backup.iterdir()}, copies
    assert backup.stat().st_mode & 0o077 == 0  # the backups' directory is root's alone
    # Its restore block on a new host (no data directory; systemctl played by a no-op, the
    # README's example date by the backup's, its REF by a machine of the copy): the keys,
    # the CA and the assets back, and the inventory as it was.
    restore = re.search(r"\*\*Restore\*\*.*?```sh\n(.*?)```", section, re.S)
    assert restore is not None
    shutil.rmtree(data)
    script = (restore.group(1).replace("/var/lib/netboot", str(data))
              .replace("/backup", str(backup)).replace(".venv/bin/", f"{bin_dir}/")
              .replace("netboot-2026-12-06T031500.db", sorted(backup.glob("netboot-*.db"))[-1].name)
              .replace("REF ...", "02:00:00:00:01:00"))
    done = subprocess.run(["bash", "-euc", "sudo() { \"$@\"; }\nsystemctl() { :; }\n" + script],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert data.stat().st_mode & 0o077 == 0
    assert (data / "secret.key").read_text() == key
    if assets:
        assert (data / "assets" / "k3os" / "vmlinuz").read_bytes() == b"kernel"
    assert (data / "assets").is_dir()
    assert "counts and checksums equal" in done.stdout
    assert "02:00:00:00:01:00 is installed" in done.stdout
    # Twice a day (an hourly cron job): each backup its own file, none refused as not empty.
    again = subprocess.run(["bash", "-euc", "sudo() { \"$@\"; }\nsleep 1\n" + backup_script],
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr
    assert len(list(backup.glob("netboot-*.db"))) == 2


def test_a_backup_of_the_served_inventory_warns_of_nothing_and_its_restore_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's nightly backup copies the served inventory, as current as the server:
    its enrolled and booting machines' next boots are the server's own, yet every backup
    warned that they would "install again" (a cron job's mail each night). The warning is
    for a copy from elsewhere (a backup restored, another server's inventory)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)

    async def machines(store: Store) -> None:
        for i, state in enumerate((MachineState.ENROLLED, MachineState.BOOTING)):
            await store.create_machine(Machine(macs=(MacAddress.parse(f"52:54:00:00:0c:{i:02x}"),),
                                               state=state))

    asyncio.run(opened(SqliteStore(data / "netboot.db"), machines))
    backup = tmp_path / "backup.db"
    rc, out, err = run(capsys, "db", "copy", "--from", str(data / "netboot.db"), "--to",
                       str(backup), "--data-dir", str(data))
    assert (rc, err) == (0, ""), err
    assert "counts and checksums equal" in out
    # The same, named another way (a relative path through the data directory).
    rc, _, err = run(capsys, "db", "copy", "--from", f"{data}/../data/netboot.db", "--to",
                     str(tmp_path / "b2.db"), "--data-dir", str(data))
    assert (rc, err) == (0, ""), err
    rc, _, err = run(capsys, "db", "copy", "--from", str(backup), "--to",
                     str(data / "netboot.db"), "--force", "--data-dir", str(data))
    assert rc == 0 and err.startswith("netboot: warning: 2 machines in the copy install"), err


def test_a_copy_keeps_the_columns_the_inventorys_rules_are_kept_by(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """The fixed_ipv4 and profile columns beside each machine's document (S42: the unique
    index of addresses, the index a profile's delete finds its users by) were not among the
    columns a copy moves: a restored inventory held every machine's address and profile in
    its document alone, so the database let a second machine have an address and a CLI's
    `profiles rm` delete a profile its machines name (held at their next boot), until a
    server's start mended the columns, telling each machine as one hand SQL had changed.
    Each way, SQLite to PostgreSQL and back."""
    from netboot.errors import Conflict

    source, back = tmp_path / "source.db", tmp_path / "back.db"

    async def fill_rules(store: Store) -> None:
        await store.put_profile(Profile(name="p", kernel="vmlinuz"))
        await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:44:0c:01"),),
                                           fixed_ipv4="192.0.2.44", profile="p"))

    async def rules_held(store: Store) -> None:
        assert await store.mend_stray_columns() == []  # type: ignore[attr-defined]
        with pytest.raises(Conflict, match="is used by machine 52:54:00:44:0c:01"):
            await store.delete_profile("p", unused=True)
        with pytest.raises(Conflict, match=r"fixed_ipv4 192\.0\.2\.44 is the fixed address"):
            await store.create_machine(Machine(macs=(MacAddress.parse("52:54:00:44:0c:02"),),
                                               fixed_ipv4="192.0.2.44"))

    asyncio.run(opened(SqliteStore(source), fill_rules))
    with pg.schema_sync(postgres) as dsn:
        rc, _, err = run(capsys, "db", "copy", "--from", str(source), "--to", dsn)
        assert rc == 0, err
        asyncio.run(opened(PostgresStore(dsn), rules_held))
        rc, _, err = run(capsys, "db", "copy", "--from", dsn, "--to", str(back))
        assert rc == 0, err
    asyncio.run(opened(SqliteStore(back), rules_held))


def test_a_hostname_the_api_refuses_is_copied_as_none_and_said(
        tmp_path: Path, postgres: pg.Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    """A machine stored with the hostname "" (an API before S43 stored it; the API now
    refuses it: null is none) went across as it was, so a restore or a move to PostgreSQL
    carried a name the API refuses. Now the copy makes it none, in its column and document,
    the checksums proving the target holds what was written, and says which machines."""
    source, back = tmp_path / "source.db", tmp_path / "back.db"

    async def fill_names(store: Store) -> None:
        done = MachineState.INSTALLED  # no "installs at the next boot" warning beside
        await store.apply_batch(Batch(create=[
            Machine(macs=(MacAddress.parse("52:54:00:44:0d:01"),), hostname="",
                    labels={"hostname": ""}, state=done),
            Machine(macs=(MacAddress.parse("52:54:00:44:0d:02"),), hostname="n2",
                    labels={"hostname": ""}, state=done),
            Machine(serial="SN-NAMELESS", state=done)]))

    async def names(store: Store) -> dict[str, str | None]:
        return {m.ref: m.hostname for m in await store.list_machines()}

    asyncio.run(opened(SqliteStore(source), fill_names))
    assert asyncio.run(opened(SqliteStore(source), names))["52:54:00:44:0d:01"] == ""
    with pg.schema_sync(postgres) as dsn:
        rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", dsn)
        assert rc == 0 and "counts and checksums equal" in out, err
        assert err == ("netboot: note: 1 machine stored with the hostname '' (which the API "
                       "refuses: null is none) copied with none: 52:54:00:44:0d:01\n"), err
        copied = asyncio.run(opened(PostgresStore(dsn), names))
        rc, out, err = run(capsys, "db", "copy", "--from", dsn, "--to", str(back), "--json")
        assert rc == 0 and json.loads(out)["hostnames_unset"] == [], err
    assert copied["52:54:00:44:0d:01"] is None and copied["52:54:00:44:0d:02"] == "n2"
    assert asyncio.run(opened(SqliteStore(back), names)) == copied
    rc, out, err = run(capsys, "db", "copy", "--from", str(source), "--to", str(back),
                       "--force", "--json")
    assert rc == 0 and json.loads(out)["hostnames_unset"] == ["52:54:00:44:0d:01"], err
