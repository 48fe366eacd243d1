"""What a pair's servers record of themselves, as their devices see it (s49-ha).

Two real ``netboot serve`` processes on one PostgreSQL (Debian's, tests/pg.py, over its Unix
socket) in a network namespace of the test's own, with two links to the device's namespace
(two VLANs: 192.0.2.0/24 and 198.51.100.0/24, veth pairs made inside the namespaces; no
default route, nothing of the host's). A is started as the embedded defaults start it (no
``advertise``, listening on every address): its base URL is ``http://127.0.0.1:PORT`` and each
device is given the address it reached. B advertises 192.0.2.2. No ``server.peers``: each
learns of the other from the inventory (netboot.inventory.peers).

- B's config names, after B, A at each address its devices reach it on, and never
  ``127.0.0.1`` (session 48 recorded A's base URL as it was: each device of B's would have
  registered to itself once B was gone).
- A stopped cleanly (SIGTERM to its own PID): its entries are taken out of the record, and
  B's next config names B alone at once, not after the 10 minutes a killed server ages out in.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests import pg
from tests.multiserver.conftest import Inventory, server_config
from tests.multiserver.test_register_elsewhere import first_server, linked, started, stopped
from tests.multiserver.test_storm_kill import Host
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:49:0a:01"
MAC2 = "52:54:00:49:0a:02"  # a device on the second VLAN
# How long the servers may take to tell each other, or of a stop (a readiness bound, not a
# timed assertion: the change feed tells within a second; a killed server is named 600 s).
TOLD_SECONDS = 60


@pytest.fixture
def vlans() -> Iterator[tuple[str, str]]:
    """The servers' namespace (192.0.2.1 and .2 on one link, 198.51.100.1 on the other) and
    the device's (192.0.2.60, 198.51.100.60), two veth pairs between them, made inside."""
    with linked((("192.0.2.1/24", "192.0.2.2/24"), "192.0.2.60/24"),
                (("198.51.100.1/24",), "198.51.100.60/24")) as both:
        yield both


def _server(tmp: Path, name: str, host: str | None, dsn: str, ns: str, at: str) -> Host:
    """Server ``name`` in ``ns``: advertising ``host`` and listening there, or (None) as the
    embedded defaults start it, reached by the test at ``at``. The API answers plain HTTP
    from any peer (the test's calls come from the device's namespace)."""
    made = server_config(tmp, name, Inventory("postgresql",
                                              f"  backend: postgresql\n  dsn: {dsn!r}\n"))
    text = made.config.read_text()
    if host is None:
        text = text.replace("  advertise: 192.0.2.10\n", "").replace(
            "  listen: 127.0.0.1\nhttps:", "  plain_api: allow\nhttps:")
    else:
        text = text.replace("  advertise: 192.0.2.10\n", f"  advertise: {host}\n").replace(
            "  listen: 127.0.0.1\nhttps:", f"  listen: {host}\n  plain_api: allow\nhttps:")
    made.config.write_text(text)
    return Host(name, made.config, made.data_dir, netns=ns, host=at)


def _told(log: str, base: str) -> str:
    """The servers the log last said besides ``base`` (Peers._take's line)."""
    said = re.findall(rf"besides this one \([^)]*{re.escape(base)}[^)]*\), which devices "
                      r"register through when it is gone: (.*)", log)
    return said[-1].strip() if said else ""


def test_a_pairs_devices_are_told_addresses_they_reach_and_not_a_stopped_server(
        tmp_path: Path, postgres: pg.Cluster, vlans: tuple[str, str]) -> None:
    servers_ns, device_ns = vlans

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with pg.fresh_schema(postgres) as dsn:
            a = _server(tmp_path, "a", None, dsn, servers_ns, "192.0.2.1")
            b = _server(tmp_path, "b", "192.0.2.2", dsn, servers_ns, "192.0.2.2")
            try:
                auth = await started(a, b)
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=30)) as http:
                    async def call(base: str, path: str, body: Any = None) -> tuple[int, Any]:
                        # (A device's GET carries no token but its install token.)
                        async with http.request("POST" if body else "GET", base + path,
                                                json=body, headers=auth if body else {}
                                                ) as resp:
                            return resp.status, (
                                await resp.json() if resp.content_type == "application/json"
                                else await resp.text())

                    for path, body in (*first_server(MAC, "edge-s1"),
                                       *first_server(MAC2, "lab-s1", "lab", profile=False)):
                        status, answer = await call(b.base, path, body)
                        assert status == 201, (path, status, answer)
                    a_urls = f"http://192.0.2.1:{a.port}, http://198.51.100.1:{a.port}"
                    deadline = time.monotonic() + TOLD_SECONDS
                    while _told(b.log(), b.base) != a_urls and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    out["b was told"] = _told(b.log(), b.base)
                    # A learns of B on its own watch of the servers record, apart from B's:
                    # its devices' configs name B only from then (CI of s49-integ: A's
                    # config was fetched before A had heard of B).
                    a_self = f"192.0.2.1:{a.port}"
                    deadline = time.monotonic() + TOLD_SECONDS
                    while ("192.0.2.2" not in _told(a.log(), a_self)
                           and time.monotonic() < deadline):
                        await asyncio.sleep(0.1)
                    out["a was told"] = _told(a.log(), a_self)

                    async def config(base: str, mac: str = MAC) -> str:
                        status, script = await call(base, f"/ipxe?mac={mac}&arch=x86_64")
                        assert status == 200 and "?token=" in script, script
                        token = script.split("?token=", 1)[1].split()[0]
                        status, text = await call(base, f"/config/{mac.replace(':', '-')}"
                                                  f"?token={token}")
                        assert status == 200, text
                        return str(yaml.safe_load(text)["run_cmd"][0])

                    out["from b"] = await config(b.base)
                    out["from a"] = await config(f"http://192.0.2.1:{a.port}")
                    out["from a, second vlan"] = await config(
                        f"http://198.51.100.1:{a.port}", MAC2)
                    # A stops cleanly (SIGTERM, its own PID): B is told it is gone.
                    a.stop()
                    deadline = time.monotonic() + TOLD_SECONDS
                    while _told(b.log(), b.base) != "none" and time.monotonic() < deadline:
                        await asyncio.sleep(0.1)
                    out["b told after"] = _told(b.log(), b.base)
                    out["from b after"] = await config(b.base)
            finally:
                out["logs"] = await stopped(a, b)
        return out

    out = in_namespace(device_ns, scenario, seconds=300)
    logs = out["logs"]
    register = "/api/v1/register"
    a1, a2 = (f"http://{h}:" for h in ("192.0.2.1", "198.51.100.1"))
    # B's devices: B, then A at each address a device reaches it on; never a loopback one.
    from_b = out["from b"]
    assert re.search(rf"for u in http://192\.0\.2\.2:\d+{register} "
                     rf"{re.escape(a1)}\d+{register} {re.escape(a2)}\d+{register}; do",
                     from_b), (from_b, logs)
    assert "127.0.0.1" not in from_b and "0.0.0.0" not in from_b
    # A's devices: the address each reached A at first, then B; not A's other address.
    assert re.search(rf"for u in {re.escape(a1)}\d+{register} "
                     rf"http://192\.0\.2\.2:\d+{register}; do", out["from a"]), out["from a"]
    assert re.search(rf"for u in {re.escape(a2)}\d+{register} "
                     rf"http://192\.0\.2\.2:\d+{register}; do",
                     out["from a, second vlan"]), out["from a, second vlan"]
    # A stopped cleanly: B says so, and its devices are given B alone (one server's command).
    assert out["b told after"] == "none", logs
    after = out["from b after"]
    assert "for u in" not in after, after
    assert {u.split(":")[1] for u in re.findall(rf"http://[^ ]+{register}", after)} \
        == {"//192.0.2.2"}, after
    assert "could not take this server" not in logs
