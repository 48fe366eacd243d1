"""A throwaway PostgreSQL cluster, made with Debian's own binaries: for the tests
(``tests/pg.py`` wraps it for pytest) and the storm benchmark (``benchmarks/storm.py
--inventory postgresql``), which runs from a checkout without the test suite.

``initdb`` refuses to run as root, so as root the cluster belongs to the ``postgres`` user
that Debian's ``postgresql`` package creates (tests/install-deps.sh installs it); as anyone
else it belongs to that user. The server listens only on a unix socket in a private
directory (no TCP at all, so nothing on the host can reach it and no port can clash), runs
without fsync (a throwaway database need not survive a power cut; CREATE DATABASE or SCHEMA
is then quick), and is stopped by its own PID. Missing binaries, a failed ``initdb`` or a
server that does not come up raise :class:`ClusterError` naming what to install or the
server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "netboot"


class ClusterError(RuntimeError):
    """The throwaway cluster could not be made or started (the message says why)."""


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if not found:
        raise ClusterError("PostgreSQL is missing: install the Debian package postgresql "
                           "(tests/install-deps.sh does)")
    return Path(found[-1]).parent


@dataclass
class Cluster:
    """A running cluster: its socket directory and port, and the server process."""

    base: Path
    socket_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def halt(self) -> None:
        """SIGINT is PostgreSQL's "fast shutdown": sessions are ended, the server exits.
        Its data stays, for :meth:`restart`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def restart(self) -> None:
        """The same cluster again, on the same socket (a database server restart)."""
        self.halt()
        self.process = _launch(self.base, self.socket_dir, self.port)
        _wait_ready(self)

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.base, ignore_errors=True)


def _owner() -> tuple[int, int] | None:
    """The uid/gid to run as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError("no postgres user: install the Debian package postgresql "
                           "(tests/install-deps.sh does)") from None
    return entry.pw_uid, entry.pw_gid


def _free_port() -> int:
    # Only names the socket file (.s.PGSQL.<port>); a free TCP port keeps it unique anyway.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start() -> Cluster:
    bins = bindir()
    owner = _owner()
    # Short, under /tmp: a unix socket path is limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="netboot-pg-"))
    data, sockets = base / "data", base / "run"
    sockets.mkdir()
    as_owner: dict[str, object] = {}
    if owner is not None:
        for path in (base, sockets):
            os.chown(path, *owner)
        as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    done = subprocess.run(
        [str(bins / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
         "--locale=C", "--no-sync"],
        capture_output=True, text=True, env=env, cwd=base, check=False,
        **as_owner)  # type: ignore[call-overload]
    if done.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        raise ClusterError(f"initdb failed: {done.stderr[-2000:]}")
    port = _free_port()
    cluster = Cluster(base, sockets, port, _launch(base, sockets, port))
    _wait_ready(cluster)
    return cluster


def _launch(base: Path, sockets: Path, port: int) -> subprocess.Popen[bytes]:
    owner = _owner()
    as_owner: dict[str, object] = {}
    if owner is not None:
        as_owner = {"user": owner[0], "group": owner[1], "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    with open(base / "server.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [str(bindir() / "postgres"), "-D", str(base / "data"), "-k", str(sockets),
             "-p", str(port), "-c", "listen_addresses=", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "logging_collector=off"],
            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=base, **as_owner)


def _wait_ready(cluster: Cluster) -> None:
    """Until the server accepts connections (pg_isready), bounded; a dead server fails at
    once with its log."""
    isready = bindir() / "pg_isready"
    deadline = time.monotonic() + 60
    while True:
        if cluster.process.poll() is not None:
            log = (cluster.base / "server.log").read_text(errors="replace")[-3000:]
            cluster.stop()
            raise ClusterError(f"postgres exited at start-up:\n{log}")
        ready = subprocess.run([str(isready), "-q", "-h", str(cluster.socket_dir), "-p",
                                str(cluster.port), "-U", SUPERUSER], check=False)
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            cluster.stop()
            raise ClusterError("postgres did not accept connections within 60 s")
        time.sleep(0.05)


@contextlib.contextmanager
def running(begin: Callable[[], Cluster] = start) -> Iterator[Cluster]:
    """A cluster made by ``begin`` (tests pass one that fails the test instead of raising),
    stopped by its own PID when the block ends."""
    cluster = begin()
    try:
        yield cluster
    finally:
        cluster.stop()


async def _admin(cluster: Cluster, sql: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_schema(cluster: Cluster) -> AsyncIterator[str]:
    """A DSN whose connections see only a new, empty schema (``search_path``, which asyncpg
    passes on to the server): much quicker than a database per test, and as separate."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    await _admin(cluster, f"CREATE SCHEMA {name}")
    yield f"{cluster.dsn()}&search_path={name}"
    await _admin(cluster, f"DROP SCHEMA {name} CASCADE")


@contextlib.contextmanager
def schema_sync(cluster: Cluster) -> Iterator[str]:
    """:func:`fresh_schema` for a caller without an event loop (a test that runs the CLI)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    asyncio.run(_admin(cluster, f"CREATE SCHEMA {name}"))
    yield f"{cluster.dsn()}&search_path={name}"
    asyncio.run(_admin(cluster, f"DROP SCHEMA {name} CASCADE"))
