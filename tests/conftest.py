"""Shared fixtures: a real netboot service (SQLite file) behind aiohttp's test client."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings

import netboot
from netboot.config import Config, load
from netboot.servers.aio import AiohttpHandler
from netboot.servers.http import ConnectionGuard
from netboot.service import Service, build
from tests import pg

# Every landing runs the same examples (a flaky test blocks them all), and no per-example
# deadline: a loaded 2-core CI machine is not a bug in the code under test.
settings.register_profile("netboot", deadline=None, derandomize=True, database=None,
                          print_blob=True)
settings.load_profile("netboot")

# The ``namespace`` fixture of the tests that put servers and clients on addresses of their
# own network namespace; the two lanes of ``pytest -n 2`` (tests/lanes.py).
pytest_plugins = ["tests.netns", "tests.lanes"]

KERNEL = b"\x7fKERNEL" + bytes(range(256)) * 64  # 16 KiB + 7 bytes of not-quite-random data
INITRD = b"070701" + b"\x00" * 5000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(tool, package): the test runs this tool; missing, it fails")
    config.addinivalue_line("markers", "root: the test needs root (network namespaces)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A missing tool fails the test with the package to install, never skips it: a suite
    that quietly skips on a machine without the tool proves nothing there."""
    for mark in item.iter_markers("requires"):
        tool, package = mark.args
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package {package} "
                        "(tests/install-deps.sh does)", pytrace=False)
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail("needs root (network namespaces); run the suite as root, as CI does",
                    pytrace=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The compiled build of tests/test_compiled.py starts now, beside the tests before it.
    In an xdist worker every worker collects every test: the build starts with the first
    test of the lane that runs it instead (``pytest_runtest_protocol``)."""
    from tests import lanes, test_compiled

    if not lanes.in_worker(session.config):
        test_compiled.start_early(session)


_LANE_STARTED = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    """Under ``-n 2``: the worker given the lane of tests/test_compiled.py starts its build
    as that lane's first test starts (the end-to-end tests run meanwhile)."""
    from tests import lanes, test_compiled

    config = item.config
    if (lanes.in_worker(config) and not config.stash.get(_LANE_STARTED, False)
            and lanes.lane(item.nodeid) == lanes.BESIDE_LANE):
        config.stash[_LANE_STARTED] = True
        test_compiled.start_early(item.session)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Once a test's fixtures are torn down, aiohttp forgets the handlers it has seen.

    aiohttp keeps each (handler, apps) it built middlewares for in a module-wide LRU cache
    of 1,024 (``web_app._cached_build_middleware``): a test's service, whose routes are bound
    methods of it, lived on after the test, with its renderer's inotify instance (128 per
    user, shared by every process of the user), its inventory view and its Jinja templates.
    In ``pytest -n 2`` a serial lane held 87 instances by tests/test_render.py, and with the
    other lane's the user's 128 ran out (test_a_kept_split_form_answers_at_once_...[free]
    failed: "no inotify watch"); every full collection also walked the dead services."""
    yield
    from aiohttp import web_app

    cache = getattr(web_app, "_cached_build_middleware", None)
    if cache is not None:
        cache.cache_clear()


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests import test_compiled

    test_compiled.stop_early(config)


class RsaKeys:
    """RSA keys for this test process, each of the first ``size`` made by cryptography, then
    given out again in turn: every service a test builds makes its CA's and its server's key
    (netboot.pki), ~60 ms of CPU each, hundreds of services a run (benchmarks/README.md,
    s36-ci). Keys of the same parameters only; two keys asked for one after the other are
    never the same one, so a test's CA and server key, a renewed key and the keys of a
    test's first eight services all differ, as freshly made ones would."""

    def __init__(self, make: Callable[..., Any], size: int = 16) -> None:
        self._make = make
        self._size = size
        self._kept: dict[tuple[int, int], list[Any]] = {}
        self._next: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()  # a service may make its keys on a worker thread

    def __call__(self, public_exponent: int, key_size: int, backend: Any = None) -> Any:
        params = (public_exponent, key_size)
        with self._lock:
            kept = self._kept.setdefault(params, [])
            if len(kept) < self._size:
                kept.append(self._make(public_exponent=public_exponent, key_size=key_size))
                return kept[-1]
            turn = self._next.get(params, 0)
            self._next[params] = (turn + 1) % self._size
            return kept[turn]


@pytest.fixture(autouse=True, scope="session")
def _rsa_keys_made_once() -> Iterator[None]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rsa, "generate_private_key", RsaKeys(rsa.generate_private_key))
        yield


def this_checkout() -> dict[str, str]:
    """The environment for a child Python that must import this checkout's netboot (the
    venv's editable install may point at another)."""
    return {**os.environ, "PYTHONPATH": str(Path(netboot.__file__).resolve().parent.parent)}


def child_json(script: str, *, timeout: float = 300) -> Any:
    """Run ``script`` in a child Python importing this checkout; the JSON value of the last
    line it printed (for what only a fresh process shows: what it imported, mapped)."""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                         env=this_checkout(), text=True, timeout=timeout).stdout
    return json.loads(out.splitlines()[-1])


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[Service]:
    """The service of the config file at ``path``, built and started as ``netboot serve``
    does; closed after."""
    service = await build(load(path, env={}))
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def write_config(tmp: Path, extra: str = "", *, http: str = "", https: str = "") -> Path:
    """A config for tests; ``extra`` adds sections, ``http`` and ``https`` add indented lines
    to ``http:`` and ``https:`` (HTTPS listens on loopback, on a free port)."""
    assets = tmp / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)
    (assets / "snponly.efi").write_bytes(b"MZ" + b"\x00" * 300)
    (assets / "ipxe.efi").write_bytes(b"MZ" + b"\x01" * 300)
    path = tmp / "netboot.yaml"
    path.write_text(
        f"""server:
  advertise: 192.0.2.10
  data_dir: {tmp / "data"}
http:
  port: 0
{http}https:
  port: 0
  listen: 127.0.0.1
{https}dhcp:
  mode: "off"
tftp:
  enabled: false
assets:
  dirs: [{assets}]
{extra}""",
        encoding="utf-8",
    )
    return path


@dataclass
class Env:
    service: Service
    client: TestClient[Any, Any]
    admin: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin}"}

    async def post(self, path: str, body: Any, *, status: int | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        resp = await self.client.post(path, json=body, headers=self.auth
                                      if headers is None else headers)
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        if status is not None:
            assert resp.status == status, (resp.status, data)
        return data

    async def get(self, path: str, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> Any:
        """GET, with the admin token on /api/ paths (every API read needs one); device paths
        get none, as devices send none (a bearer token there is taken as an install token)."""
        if headers is None:
            headers = self.auth if path.startswith("/api/") else {}
        resp = await self.client.get(path, headers=headers)
        data = await resp.json() if resp.content_type == "application/json" else await resp.text()
        assert resp.status == status, (resp.status, data)
        return data

    async def seed(self, *, role: str = "agent", server_url: str = "https://192.0.2.50:6443",
                   cmdline: str | None = None) -> None:
        cluster: dict[str, Any] = {"name": "edge", "server_url": server_url,
                                   "labels": {"site": "lab"}}
        if server_url != "managed":
            cluster["token"] = "k3s-secret-token"
        await self.post("/api/v1/clusters", cluster, status=201)
        profile: dict[str, Any] = {"name": "k3os", "kernel": "vmlinuz",
                                   "initrds": ["initrd.img"], "config_template": "k3os"}
        if cmdline is not None:
            profile["cmdline"] = cmdline
        await self.post("/api/v1/profiles", profile, status=201)
        await self.post("/api/v1/groups", {"name": "all-x86", "selector": {"arch": ["x86_64"]},
                                           "profile": "k3os", "cluster": "edge", "role": role},
                        status=201)


EnvFactory = Callable[..., Awaitable[Env]]


class FrontTestServer(TestServer):
    """aiohttp's test server on netboot's own connection handler and front door, as
    ``netboot serve`` runs them: a device route asked by a test takes the path a device's
    request takes (netboot.servers.fasthttp), everything else reaches aiohttp through it."""

    def __init__(self, service: Service) -> None:
        super().__init__(service.app, host="127.0.0.1")
        self.service = service

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return _FrontRunner(self.service, self.app, **kwargs)


class _FrontRunner(web.AppRunner):
    def __init__(self, service: Service, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.service = service

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp's Server makes a plain RequestHandler per connection; this one makes
        # netboot's, with the limits of the service's config and its front door.
        guard = self.service.connection_guard()
        server.__class__ = _FrontServer
        assert isinstance(server, _FrontServer)
        server.guard, server.front = guard, self.service.front
        return server


class _FrontServer(web.Server):
    guard: ConnectionGuard
    front: Any

    def __call__(self) -> AiohttpHandler:
        return AiohttpHandler(self, guard=self.guard, loop=self._loop, front=self.front,
                              **self._kwargs)


@pytest.fixture
async def make_env(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[EnvFactory]:
    services: list[Service] = []

    async def factory(extra: str = "", *, sub: str = "a", http: str = "") -> Env:
        cfg: Config = load(write_config(tmp_path / sub, extra, http=http), env={})
        service = await build(cfg)
        services.append(service)
        client = await aiohttp_client(FrontTestServer(service))
        token = (cfg.data_dir / "admin.token").read_text().strip()
        service.base_url = "http://192.0.2.10:8080"
        return Env(service, client, token)

    yield factory
    for service in services:
        await service.boot.drain()
        # Its renderer's inotify instance given back now, not whenever the collector finds
        # the service's cycles (never, once a view's load froze them: gc.freeze): a run of
        # the suite held 87 of the user's 128 by tests/test_render.py, whose inotify tests
        # then found none free.
        service.content.close()
        await service.store.close()


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


# --- helpers added for the HTTP surface tests ------------------------------------------------
#
# ``Env.post``/``Env.get`` cover the common cases; the helpers below give the status, the
# headers and the body of any request, and a raw HTTP/1.1 request over loopback for request
# targets that an HTTP client library would normalise before sending (``..``, ``%2e%2e``).


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def call(env: Env, method: str, path: str, *, json_body: Any = None,
               data: bytes | str | None = None, headers: dict[str, str] | None = None,
               admin: bool = True) -> Reply:
    """Any request through the test client; the admin token is sent unless ``admin=False``."""
    hdrs = dict(env.auth if admin else {})
    hdrs.update(headers or {})
    kwargs: dict[str, Any] = {"headers": hdrs}
    if json_body is not None:
        kwargs["json"] = json_body
    if data is not None:
        kwargs["data"] = data
    resp = await env.client.request(method, path, **kwargs)
    body = await resp.read()
    return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)


async def raw_get(env: Env, target: str, *, method: str = "GET") -> Reply:
    """Send ``target`` byte for byte (no client-side normalisation) to the test server."""
    import asyncio

    reader, writer = await asyncio.open_connection(env.client.host, env.client.port)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: 192.0.2.10\r\n"
                     "Connection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(status, headers, body)


BASE = "http://192.0.2.10:8080"


def ipxe_uristring(value: str) -> str:
    """``${setting:uristring}`` as iPXE formats it (core/uri.c ``uri_encode`` field 0): %XX
    for non-printing bytes, space, '%' and ``/#:@?=&``; everything else, '+' included, as is.
    (aiohttp's ``params=`` would form-encode a space as '+', which iPXE never sends.)"""
    return "".join(f"%{b:02X}" if b <= 0x20 or b >= 0x7f or chr(b) in "%/#:@?=&" else chr(b)
                   for b in value.encode())


async def boot(env: Env, mac: str, *, arch: str = "x86_64", **facts: str) -> str:
    """What iPXE gets from ``GET /ipxe`` for this machine (the query /boot.ipxe builds)."""
    from yarl import URL

    query = "&".join(f"{k}={ipxe_uristring(v)}"
                     for k, v in {"mac": mac, "arch": arch, **facts}.items())
    resp = await env.client.get(URL(f"/ipxe?{query}", encoded=True))
    text = await resp.text()
    assert resp.status == 200, (resp.status, text)
    assert text.startswith("#!ipxe"), text
    return text


def install_token(script: str) -> str:
    """The install token in the kernel command line of an install script."""
    import re

    found = re.search(r"/config/[0-9a-f-]{17}\?token=([A-Za-z0-9_-]+)", script) or re.search(
        r"/nocloud/[0-9a-f-]{17}/([A-Za-z0-9_-]+)/", script)
    assert found is not None, script
    return found.group(1)


async def registered_beside_enrolled(env: Env, mac: str, name: str, enrolled_mac: str,
                                     enrolled_name: str) -> None:
    """On ``env.seed()``'s inventory: ``mac`` installed and registered as ``name`` (its
    hostname and k3s node name, reported back as its ``node_name``), and ``enrolled_mac``
    enrolled as ``enrolled_name``, not booted yet (the renaming tests)."""
    await env.seed()
    await env.post("/api/v1/machines", {"macs": [mac], "hostname": name}, status=201)
    await env.post("/api/v1/machines", {"macs": [enrolled_mac], "hostname": enrolled_name},
                   status=201)
    token = install_token(await boot(env, mac))
    await env.post("/api/v1/register", {"mac": mac, "token": token, "hostname": name,
                                        "node_name": name}, status=200, headers={})
    await env.service.boot.drain()


# --- PostgreSQL: one throwaway cluster per test session (tests/pg.py) ---------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.Cluster]:
    with pg.running() as cluster:
        yield cluster


@pytest.fixture
async def pg_dsn(postgres: pg.Cluster) -> AsyncIterator[str]:
    """A DSN of a fresh, empty schema of the session's cluster, dropped after the test."""
    async with pg.fresh_schema(postgres) as dsn:
        yield dsn


def inotify_instances() -> int:
    """This process's inotify instances (each one of the 128 a user has by default), once
    the garbage collector has closed those of renderers earlier tests left in reference
    cycles: collected between two counts of one test, they made it fail (83 before, 79
    after, in a full run)."""
    gc.collect()
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            continue
    return count
