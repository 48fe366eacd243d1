"""The throwaway PostgreSQL cluster of netboot.lab.pgcluster, for pytest: a cluster that
cannot be made fails the run with what to install (the PostgreSQL tests never skip), and
store objects that share one inventory, as several servers have."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from netboot.inventory.base import Batch, Store
from netboot.lab.pgcluster import SUPERUSER, Cluster, ClusterError, fresh_schema, schema_sync
from netboot.lab.pgcluster import running as _running
from netboot.lab.pgcluster import start as _start
from netboot.model import AuditEntry, Event

__all__ = ["COMMITTING", "SLOW_COMMIT", "SUPERUSER", "Cluster", "Cutter", "bouncing",
           "committing", "cutting", "fresh_database", "fresh_schema", "pgbouncer_version",
           "running", "schema_sync", "server_pids", "slow_batch", "start", "stopped",
           "stores_on_one_inventory", "until"]


def start() -> Cluster:
    try:
        return _start()
    except ClusterError as exc:
        pytest.fail(str(exc), pytrace=False)


def running() -> contextlib.AbstractContextManager[Cluster]:
    return _running(start)


async def stores_on_one_inventory(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                  stack: contextlib.AsyncExitStack,
                                  count: int = 2) -> list[Store]:
    """``count`` open store objects on one inventory, as several servers have: SQLite
    stores on one file, or PostgreSQL stores on one fresh schema of the session's cluster
    (``request`` gives the ``postgres`` fixture); a memory store cannot be shared between
    processes: there it is one object ``count`` times. Closed when ``stack`` closes."""
    from netboot.inventory.memory import MemoryStore
    from netboot.inventory.postgres import PostgresStore
    from netboot.inventory.sqlite import SqliteStore

    stores: list[Store]
    if kind == "memory":
        memory = MemoryStore()
        await memory.open()
        return [memory] * count
    if kind == "sqlite":
        stores = [SqliteStore(tmp_path / "inv.db") for _ in range(count)]
    else:
        dsn = await stack.enter_async_context(
            fresh_schema(request.getfixturevalue("postgres")))
        stores = [PostgresStore(dsn) for _ in range(count)]
    for s in stores:
        await s.open()
        stack.push_async_callback(s.close)
    return stores


# A deferred constraint trigger makes an event's COMMIT slow: it runs in the COMMIT, before
# the commit record. "deaf" ignores the cancel asyncpg sends (as a COMMIT past the point
# where it can be stopped does) and commits; "stoppable" is stopped by it (aborted); "slow"
# commits after a third of a second; "refused" fails the COMMIT with an ERROR.
SLOW_COMMIT = (
    """CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.kind = 'deaf' THEN
            BEGIN
                PERFORM pg_sleep(30);
            EXCEPTION WHEN query_canceled THEN
                NULL;  -- the cancel heard too late: the COMMIT goes on
            END;
        ELSIF NEW.kind = 'stoppable' THEN
            PERFORM pg_sleep(30);
        ELSIF NEW.kind = 'slow' THEN
            PERFORM pg_sleep(0.3);
        ELSIF NEW.kind = 'refused' THEN
            RAISE EXCEPTION 'refused at commit';
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON events DEFERRABLE INITIALLY"
    " DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
)


def slow_batch(kind: str) -> Batch:
    """An event of ``kind`` (SLOW_COMMIT's) for machine m1, with an audit entry."""
    return Batch(events=(Event("m1", 1.0, kind, kind),), audit=(AuditEntry(
        time=1.0, actor="a", action="x", target="t", peer="p", outcome="done"),))


async def committing(admin: asyncpg.Connection, write: Callable[[], Awaitable[object]],
                     said: list[str]) -> asyncio.Task[None]:
    """SLOW_COMMIT installed (through ``admin``), a caller of ``write`` started, once its
    COMMIT is under way: it says "written" once ``write`` returns, then waits once and says
    it went on (what a cancel delivered at its next wait must stop)."""
    for sql in SLOW_COMMIT:
        await admin.execute(sql)

    async def caller() -> None:
        await write()
        said.append("written")
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    task = asyncio.ensure_future(caller())
    await until(admin, COMMITTING, "in its COMMIT")
    return task


async def until(conn: asyncpg.Connection, sql: str, what: str) -> None:
    """Wait until ``sql``, asked on ``conn``, counts something: a test cancels a write once
    the server shows it where it means it to be, not after a guessed time."""
    for _ in range(500):
        if await conn.fetchval(sql):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 5 s")


# A session in a COMMIT that SLOW_COMMIT holds.
COMMITTING = ("SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
              " AND query LIKE 'COMMIT%' AND wait_event = 'PgSleep'")


# A classic BPF program of one instruction, "return 0": a socket it is attached to takes
# no packet. On a TCP socket the kernel runs it before TCP sees the segment (tcp_filter), so
# nothing the peer sends is acknowledged and no keepalive probe is answered: to the peer, a
# host that vanished. Unprivileged (SO_ATTACH_FILTER needs no capability).
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27


class _SockFilter(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32))


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


_DROP_ALL = (_SockFilter * 1)(_SockFilter(0x06, 0, 0, 0))  # BPF_RET | BPF_K, 0
_DROP_PROGRAM = bytes(_SockFprog(1, _DROP_ALL))


class Cutter:
    """A proxy between a client and the cluster, on a Unix socket of its own (or on TCP
    loopback: :func:`cutting`'s ``tcp``), that can lose a connection at a chosen moment:
    :meth:`cut_after` arms it with a piece of a statement's text; the first client message
    that holds it is passed on to the server, then the client's connection is reset at
    once. The server runs the statement to its end (it reads what was sent before it could
    see the loss, and does not look for one while it runs); its answer never reaches the
    client, and the server's side is closed once it has answered. What a server restart or
    a failover does to a COMMIT in flight, at a moment the test chooses.

    On TCP it can also black-hole (:meth:`freeze`, :meth:`freeze_after`): stop forwarding
    without closing anything, in both directions, and its kernel drop every packet of the
    frozen connections (and, unless only those are frozen, every new connection's SYN): no
    FIN, no RST, no acknowledgement, no answer to a keepalive probe. What a pulled cable, a
    VM gone, a firewall that dropped the connections' state do; :meth:`thaw` ends it."""

    def __init__(self) -> None:
        self._armed: bytes | None = None
        self._hold = False
        self.cut = asyncio.Event()
        self._streams: list[asyncio.StreamWriter] = []
        self._held: list[asyncio.StreamWriter] = []
        # Each connection's gate: cleared, nothing is forwarded either way.
        self._gates: dict[asyncio.StreamWriter, asyncio.Event] = {}
        self.listeners: list[Any] = []  # set by cutting()
        self._freeze_armed: tuple[bytes, bool] | None = None
        self._before: tuple[bytes, Callable[[], object]] | None = None
        self._filtered: list[Any] = []

    def freeze(self, *, new: bool = True) -> None:
        """Black-hole every connection the proxy holds and, with ``new``, every connection
        made from now on (a server gone; without ``new``: a failover, the old connections
        lost, new ones reach the server)."""
        targets = []
        for client, gate in self._gates.items():
            gate.clear()
            targets.append(client.get_extra_info("socket"))
        if new:
            targets += self.listeners
        for sock in targets:
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: gone
                sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_PROGRAM)
                self._filtered.append(sock)

    def freeze_after(self, text: bytes, *, new: bool = True) -> None:
        """:meth:`freeze` once the first client message holding ``text`` was passed on."""
        self._freeze_armed = (text, new)

    def call_before(self, text: bytes, call: Callable[[], object]) -> None:
        """``call()`` once the first client message holding ``text`` has come, before it is
        passed on (e.g. the server stopped just as that statement reaches it)."""
        self._before = (text, call)

    def thaw(self) -> None:
        """The path is back: packets flow and the proxy forwards again (a connection whose
        client gave it up meanwhile is answered with a reset by the client's kernel)."""
        for sock in self._filtered:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
        self._filtered.clear()
        for gate in self._gates.values():
            gate.set()

    def cut_after(self, text: bytes, *, hold: bool = False) -> None:
        """Arm the cut; ``hold``: the client's connection is kept (its answer never comes,
        nothing more it sends is passed on) until :meth:`reset`."""
        self._armed, self._hold = text, hold

    def reset(self) -> None:
        """Reset the connections a cut holds."""
        for stream in self._held:
            stream.transport.abort()

    async def relay(self, target: str, client_in: asyncio.StreamReader,
                    client_out: asyncio.StreamWriter) -> None:
        server_in, server_out = await asyncio.open_unix_connection(target)
        self._streams += (client_out, server_out)
        gate = self._gates[client_out] = asyncio.Event()
        gate.set()
        lost = False

        async def up() -> None:
            nonlocal lost
            while data := await client_in.read(65536):
                await gate.wait()  # frozen: what the kernel took before waits
                before = self._before
                if before is not None and before[0] in data:
                    self._before = None
                    before[1]()
                server_out.write(data)
                await server_out.drain()
                frozen = self._freeze_armed
                if frozen is not None and frozen[0] in data:
                    self._freeze_armed = None
                    self.freeze(new=frozen[1])
                if self._armed is not None and self._armed in data:
                    self._armed, lost = None, True
                    if self._hold:
                        self._held.append(client_out)  # closed by reset() alone
                    else:
                        client_out.transport.abort()  # a reset: no answer will come
                    self.cut.set()
                    return
            server_out.close()  # the client left: so does its session

        async def down() -> None:
            while data := await server_in.read(65536):
                if lost:
                    break  # the server answered: its side closed, the answer dropped
                await gate.wait()
                client_out.write(data)
                await client_out.drain()
            server_out.close()
            if client_out not in self._held:
                client_out.close()  # the server ended the session

        with contextlib.suppress(OSError):
            await asyncio.gather(up(), down())

    def close(self) -> None:
        for stream in self._streams:
            stream.transport.abort()


@contextlib.asynccontextmanager
async def cutting(dsn: str, *, tcp: bool = False) -> AsyncIterator[tuple[str, Cutter]]:
    """A DSN like ``dsn`` (a cluster's, on its Unix socket) through a :class:`Cutter`
    (its connections are the server's, but for the one it cuts). Its socket is in a
    directory of its own with a short name (a Unix socket's path has 107 bytes at most);
    ``tcp``: on a port of 127.0.0.1 instead, where connections have keepalives to lose."""
    host, port = (re.search(rf"[?&]{key}=([^&]+)", dsn) for key in ("host", "port"))
    assert host is not None and port is not None
    name = f".s.PGSQL.{port[1]}"
    cutter = Cutter()
    with tempfile.TemporaryDirectory(prefix="cut") as directory:
        def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
            return cutter.relay(f"{host[1]}/{name}", r, w)

        server = await (asyncio.start_server(relay, "127.0.0.1", 0) if tcp
                        else asyncio.start_unix_server(relay, path=f"{directory}/{name}"))
        cutter.listeners = list(server.sockets)
        if tcp:
            here = server.sockets[0].getsockname()[1]
            through = dsn.replace(f"host={host[1]}", "host=127.0.0.1").replace(
                f"port={port[1]}", f"port={here}")
        else:
            through = dsn.replace(f"host={host[1]}", f"host={directory}")
        try:
            yield through, cutter
        finally:
            server.close()
            cutter.close()
            await server.wait_closed()


def server_pids(postmaster: int) -> list[int]:
    """The postmaster and its children (the backends, the checkpointer...), by /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP to each of ``pids`` (by its own PID), SIGCONT when the block ends: their
    kernel still answers (TCP's probes, acknowledgements), they do not (a server stopped
    or hung, as a proxy that lost it looks too)."""
    done = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                done.append(pid)
        yield
    finally:
        for pid in done:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def fresh_database(cluster: Cluster) -> AsyncIterator[str]:
    """A new, empty database of ``cluster`` (its name), dropped after: for a client that
    cannot be given a schema by its DSN (pgbouncer refuses a ``search_path`` startup
    parameter)."""
    name = f"d_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield name
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


# Where tests/install-deps.sh builds pgbouncer 1.21+ (Debian 12 ships 1.18).
NEWER_PGBOUNCER = "/opt/netboot-tests/pgbouncer/bin/pgbouncer"


def _pgbouncer(at_least: tuple[int, ...] | None = None) -> str:
    """The pgbouncer binary :func:`bouncing` runs: $NETBOOT_PGBOUNCER, else Debian's; with
    ``at_least``, the first of $NETBOOT_PGBOUNCER and :data:`NEWER_PGBOUNCER` that is that
    version or newer. None there fails the test (never skips: a test skipped for a missing
    tool is a test CI never runs)."""
    if at_least is not None:
        wanted = ".".join(map(str, at_least))
        seen = []
        for candidate in (os.environ.get("NETBOOT_PGBOUNCER"), NEWER_PGBOUNCER):
            if not candidate:
                continue
            if not os.path.exists(candidate):
                seen.append(f"no {candidate}")
                continue
            version = pgbouncer_version(candidate)
            if version >= at_least:
                return candidate
            seen.append(f"{candidate} is {'.'.join(map(str, version))}")
        pytest.fail(f"pgbouncer {wanted} or newer is missing ({'; '.join(seen)}): "
                    f"tests/install-deps.sh builds it into {NEWER_PGBOUNCER} (or name one "
                    "with $NETBOOT_PGBOUNCER)", pytrace=False)
    binary = os.environ.get("NETBOOT_PGBOUNCER") or shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)
    if binary is None:
        pytest.fail("pgbouncer is missing: install the Debian package pgbouncer "
                    "(tests/install-deps.sh does)", pytrace=False)
    return binary


def _accepts(path: Path) -> bool:
    """Whether a Unix socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def pgbouncer_version(binary: str | None = None) -> tuple[int, ...]:
    """The version of ``binary``, or of the pgbouncer :func:`bouncing` runs by default
    ("PgBouncer 1.18.0" -> (1, 18, 0)); (0,) if it does not run (its libraries gone)."""
    try:
        said = subprocess.run([binary or _pgbouncer(), "--version"], capture_output=True,
                              text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (0,)
    found = re.search(r"PgBouncer (\d+(?:\.\d+)*)", said)
    if found is None:
        return (0,)
    return tuple(int(n) for n in found[1].split("."))


@contextlib.contextmanager
def bouncing(cluster: Cluster, mode: str, users: tuple[str, ...] = (SUPERUSER,),
             settings: str = "", at_least: tuple[int, ...] | None = None,
             ) -> Iterator[Callable[[str], str]]:
    """Debian's pgbouncer (tests/install-deps.sh installs it) in front of ``cluster``, in
    ``pool_mode = mode``, on a Unix socket of its own (no TCP), letting ``users`` in without
    a password (``auth_type = trust``), with ``settings`` (more lines of its [pgbouncer]
    section); yields database name -> a DSN through it. pgbouncer refuses to run as root:
    as root it runs as ``postgres``, as the cluster does. Stopped by its own PID.

    ``at_least``: a pgbouncer of that version or newer, for settings Debian 12's 1.18 does
    not know (1.21 added ``max_prepared_statements``): the one tests/install-deps.sh builds
    from Debian 13's source into :data:`NEWER_PGBOUNCER`. $NETBOOT_PGBOUNCER names another
    binary to run instead (every test, by hand: benchmarks/README.md, s35-pg)."""
    binary = _pgbouncer(at_least)
    base = Path(tempfile.mkdtemp(prefix="netboot-pgb-"))
    port = socket.socket()
    port.bind(("127.0.0.1", 0))  # only names the socket file, as the cluster's does
    number = port.getsockname()[1]
    port.close()
    (base / "users.txt").write_text("".join(f'"{u}" ""\n' for u in users))
    (base / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={cluster.socket_dir} port={cluster.port}\n"
        f"[pgbouncer]\nlisten_addr =\nlisten_port = {number}\nunix_socket_dir = {base}\n"
        f"auth_type = trust\nauth_file = {base}/users.txt\npool_mode = {mode}\n"
        f"logfile = {base}/pgbouncer.log\npidfile = {base}/pgbouncer.pid\n{settings}")
    as_owner: dict[str, Any] = {}
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for path in (base, *base.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        as_owner = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    process = subprocess.Popen([binary, str(base / "pgbouncer.ini")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               **as_owner)
    try:
        listening = base / f".s.PGSQL.{number}"
        deadline = time.monotonic() + 10
        # Until it accepts a connection, not only until its socket file is there: with
        # pgbouncer 1.24 a store opened at once was refused now and then (ECONNREFUSED, 1 run
        # in 4 of the pgbouncer tests, 0 in 6 since; s35-pg): the file made before listen().
        while not _accepts(listening):
            if process.poll() is not None or time.monotonic() > deadline:
                log = base / "pgbouncer.log"
                pytest.fail(f"pgbouncer did not start: "
                            f"{log.read_text()[-2000:] if log.exists() else ''}",
                            pytrace=False)
            time.sleep(0.02)
        yield lambda database: f"postgresql://{SUPERUSER}@/{database}?host={base}&port={number}"
    finally:
        process.terminate()  # SIGTERM: pgbouncer's immediate shutdown
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def repool(dsn: str, mode: str) -> None:
    """The pgbouncer of ``dsn`` (one :func:`bouncing` made) switched to ``pool_mode = mode``
    while it runs, as an operator would: its configuration rewritten, then SIGHUP (its
    RELOAD). Clients connected already stay connected."""
    base = Path(dsn.partition("host=")[2].partition("&")[0])
    ini = base / "pgbouncer.ini"
    ini.write_text(re.sub(r"(?m)^pool_mode = .*$", f"pool_mode = {mode}", ini.read_text()))
    os.kill(int((base / "pgbouncer.pid").read_text()), signal.SIGHUP)


@contextlib.asynccontextmanager
async def tiny_tablespace(cluster: Cluster, size: str) -> AsyncIterator[str]:
    """A tablespace of ``cluster`` on a tmpfs of ``size`` (``mount``'s words: "3m"), its
    name: a disk that a test fills (``fill_tablespace``) without touching any other. Mounted
    in the cluster's own directory, which the server's user reaches (not pytest's 0700 one);
    root only. Dropped and unmounted after, the schemas using it gone first."""
    mount = cluster.base / f"tiny-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(mount)], check=True)
    space = f"tiny_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(cluster.dsn())
    try:
        entry = pwd.getpwnam("postgres")
        os.chown(mount, entry.pw_uid, entry.pw_gid)
        await admin.execute(f"CREATE TABLESPACE {space} LOCATION '{mount}'")
        yield space
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await admin.execute(f"DROP TABLESPACE IF EXISTS {space}")
        await admin.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


async def fill_tablespace(admin: asyncpg.Connection, schema: str, space: str) -> None:
    """Fill ``space`` (``tiny_tablespace``) with the table ``{schema}.filler`` (uncompressed
    random text) until the server says its disk is full; dropping that table frees it."""
    await admin.execute(f"CREATE TABLE {schema}.filler (t text) TABLESPACE {space};"
                        f" ALTER TABLE {schema}.filler ALTER t SET STORAGE PLAIN")
    with pytest.raises(asyncpg.DiskFullError):
        for _ in range(10_000):  # bounded: 8 MiB is ~4,300 rows
            await admin.execute(
                f"INSERT INTO {schema}.filler SELECT (SELECT string_agg("
                "md5(random()::text || g || h), '') FROM generate_series(1, 60) h) "
                "FROM generate_series(1, 50) g")
