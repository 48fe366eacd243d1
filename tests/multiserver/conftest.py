"""Two real ``netboot serve`` processes sharing one inventory (issue 13).

Each server has its own data dir (its TLS certificate, its own view in memory) and the same
secrets key, as two hosts would: the key is copied from the first server's data dir before the
second starts, as an operator copies ``secret.key`` to the second host. The inventory they
share is given by ``backend``: an SQLite file (two servers on one host, a valid topology), and
PostgreSQL once its store exists. Both listen on loopback on ports of their own choosing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import pg
from tests.conftest import write_config

ROOT = Path(__file__).resolve().parents[2]
# How long a server may take to start on a loaded 2-core machine (a readiness bound, not a
# timed assertion: it starts as soon as it prints its summary).
START_SECONDS = 60


@dataclass
class Inventory:
    """How both servers reach the shared inventory: config lines under ``inventory:``."""

    name: str
    lines: str


@pytest.fixture(params=["sqlite", "postgresql"])
async def inventory(request: pytest.FixtureRequest, tmp_path: Path,
                    ) -> AsyncIterator[Inventory]:
    if request.param == "sqlite":
        yield Inventory("sqlite", f"  path: {tmp_path / 'shared.db'}\n")
    else:
        # A fresh schema of the session's cluster (tests/pg.py).
        async with pg.fresh_schema(request.getfixturevalue("postgres")) as dsn:
            yield Inventory("postgresql", f"  backend: postgresql\n  dsn: {dsn!r}\n")


@dataclass
class Server:
    """One ``netboot serve`` process, ended by its own PID."""

    name: str
    config: Path
    data_dir: Path
    netns: str | None = None  # a network namespace the test made, to run it in
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path = field(default_factory=Path)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path = self.config.parent / f"{self.name}.log"
        log = self.log_path.open("ab")
        # `ip netns exec` execs the command: the PID is netboot's own.
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "netboot", "serve", "--config", str(self.config)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("NETBOOT_")},
                 "PYTHONPATH": str(ROOT)})
        log.close()
        # The summary's first lines name the HTTP port (chosen by the kernel: port 0). Read
        # on a thread: the whole summary arrives in one write.
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read_stdout, args=(lines,), daemon=True).start()
        found = None
        seen = []
        for _ in range(50):  # bounded: the summary is a dozen lines
            try:
                line = lines.get(timeout=START_SECONDS)
            except queue.Empty:
                break
            seen.append(line)
            found = re.search(r"HTTP\s+http://[^:/]+:(\d+)/", line)
            if found or not line:
                break
        if found is None:
            self.stop()
            raise AssertionError(f"{self.name} did not start: {''.join(seen)}\n{self.log()}")
        self.port = int(found.group(1))

    def _read_stdout(self, lines: queue.Queue[str]) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace"))
        lines.put("")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # this process only, by its own handle
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Pair:
    a: Server
    b: Server
    admin: str
    http: aiohttp.ClientSession

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}

    async def call(self, server: Server, method: str, path: str, *, body: Any = None,
                   data: str | None = None, status: int | None = None,
                   admin: bool = True) -> Any:
        headers = dict(self.auth) if admin else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        if data is not None:
            kwargs["data"] = data
        async with self.http.request(method, server.base + path, **kwargs) as resp:
            out = (await resp.json() if resp.content_type == "application/json"
                   else await resp.text())
            if status is not None:
                assert resp.status == status, (server.name, method, path, resp.status, out)
            return out

    async def boot(self, server: Server, mac: str, *, arch: str = "x86_64") -> str:
        """What iPXE gets from ``GET /ipxe`` on ``server`` for this NIC."""
        text: str = await self.call(server, "GET", f"/ipxe?mac={mac}&arch={arch}",
                                    admin=False, status=200)
        assert text.startswith("#!ipxe"), text
        return text

    def logs(self) -> str:
        return f"--- {self.a.name}\n{self.a.log()}\n--- {self.b.name}\n{self.b.log()}"


async def netboot_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """``netboot ARGS --config CONFIG`` as its own process, no token nor --server: on the
    database the config names. Its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "netboot", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NETBOOT_")},
             "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def server_config(tmp: Path, name: str, inventory: Inventory, extra: str = "") -> Server:
    where = tmp / name
    config = write_config(where, f"inventory:\n{inventory.lines}{extra}",
                          http="  listen: 127.0.0.1\n")
    return Server(name, config, where / "data")


async def start_pair(tmp: Path, inventory: Inventory, extra: str = "",
                     servers: tuple[Server, Server] | None = None) -> tuple[Server, Server]:
    a, b = servers or (server_config(tmp, "a", inventory, extra),
                       server_config(tmp, "b", inventory, extra))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, a.start)
    try:
        # The second host gets the first one's secrets key (the inventory's join tokens are
        # sealed with it); its admin token is the inventory's, so none is made for it.
        b.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copy2(a.data_dir / "secret.key", b.data_dir / "secret.key")
        await loop.run_in_executor(None, b.start)
    except BaseException:
        a.stop()
        raise
    return a, b


@contextlib.asynccontextmanager
async def running_pair(tmp: Path, inventory: Inventory,
                       servers: tuple[Server, Server] | None = None) -> AsyncIterator[Pair]:
    a, b = await start_pair(tmp, inventory, servers=servers)
    try:
        admin = (a.data_dir / "admin.token").read_text().strip()
        assert not (b.data_dir / "admin.token").exists()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            yield Pair(a, b, admin, http)
    finally:
        loop = asyncio.get_running_loop()
        await asyncio.gather(loop.run_in_executor(None, a.stop),
                             loop.run_in_executor(None, b.stop))


@pytest.fixture
async def pair(tmp_path: Path, inventory: Inventory) -> AsyncIterator[Pair]:
    async with running_pair(tmp_path, inventory) as running:
        yield running
