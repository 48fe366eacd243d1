"""A node that registered after the backup an inventory is restored from registers again
without a reinstall, on the operator's word and only on it (s49-ha; s48-review's leftover).

README's "Backup, restore and upgrades" walked with real parts: a real ``netboot serve``
(SQLite, in a network namespace of the test's own, on 192.0.2.10), ``netboot db copy`` for
the backup while it serves and for the restore with it stopped, ``netboot machines
mark-installed`` and ``netboot machines claim`` as an operator types them, and the device's
register command as its config serves it, under busybox ``sh`` with busybox ``wget``.

The node holds a machine token the restored inventory never gave, and its install's secret
(root's alone on the node), whose digest the restored inventory does not hold either:
nothing the node sends proves it. Its refused boot is told on the machine with the claim of
the secret it sent (its sha256, as a contested registration's); ``netboot machines claim REF
CLAIM`` takes it, and the node's next try is registered with a new machine token. A host
posting the MAC with another secret gets the 401 before and after, and its claim gives it
nothing unless the operator gives the machine to it. Before s49-ha: "reinstall it".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import write_config
from tests.device import device_shell
from tests.multiserver.conftest import ROOT
from tests.multiserver.test_register_elsewhere import first_server
from tests.multiserver.test_storm_kill import Host
from tests.netns import in_namespace, namespace  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MAC = "52:54:00:49:0b:01"
HOST = "192.0.2.10"
IP = shutil.which("ip") or "ip"


def _netboot(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's command, as typed (the server's config names the data dir)."""
    return subprocess.run(
        [sys.executable, "-m", "netboot", *args, "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("NETBOOT_")},
             "PYTHONPATH": str(ROOT)})


def test_a_node_registered_after_the_backup_registers_again_once_the_operator_claims_it(
        tmp_path: Path, namespace: str) -> None:  # noqa: F811
    ns = namespace
    config = write_config(tmp_path, http=f"  listen: {HOST}\n  plain_api: allow\n")
    # One port across the restart (the config's URLs name it); the namespace is the test's.
    config.write_text(config.read_text().replace("http:\n  port: 0\n", "http:\n  port: 8080\n"))
    data = tmp_path / "data"
    server = Host("s", config, data, netns=ns, host=HOST)
    shell, env = device_shell(tmp_path)
    root = tmp_path / "device-root"
    backup = tmp_path / "backup" / "netboot.db"
    backup.parent.mkdir(mode=0o700)

    def device(command: str) -> tuple[int, str]:
        """The installed OS's boot: the config's command, its root the test's directory,
        its tries 2 a second apart, in the foreground (a later boot's runs in the
        background: ``r &``)."""
        command = (command.replace("/var/lib/netboot", str(root))
                   .replace("n=360", "n=2").replace("n=30", "n=2")
                   .replace("sleep 10", "sleep 1").replace("then r & elif", "then r; elif"))
        done = subprocess.run([IP, "netns", "exec", ns, *shell, command], env=env,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    async def api(method: str, path: str, body: Any = None, admin: bool = True) -> Any:
        token = (data / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"} if admin else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                http.request(method, server.base + path, json=body, headers=headers) as resp:
            out = (await resp.json() if resp.content_type == "application/json"
                   else await resp.text())
            return resp.status, out

    def call(method: str, path: str, body: Any = None, admin: bool = True) -> Any:
        return in_namespace(ns, lambda: api(method, path, body, admin), seconds=60)

    def events() -> list[dict[str, Any]]:
        status, out = call("GET", f"/api/v1/machines/{MAC}/events")
        assert status == 200, out
        return list(out)

    server.start()
    try:
        for path, body in first_server(MAC, "edge-1"):
            status, out = call("POST", path, body)
            assert status == 201, (path, status, out)
        # The nightly backup, while it serves: the machine enrolled, not booted yet.
        copied = _netboot(config, "db", "copy", "--from", str(data / "netboot.db"),
                          "--to", str(backup))
        assert copied.returncode == 0, copied.stderr
        # The device installs and its first boot registers (the install token).
        status, script = call("GET", f"/ipxe?mac={MAC}&arch=x86_64", admin=False)
        assert status == 200 and "?token=" in script, script
        token = script.split("?token=", 1)[1].split()[0]
        status, text = call("GET", f"/config/{MAC.replace(':', '-')}?token={token}",
                            admin=False)
        assert status == 200, text
        command = yaml.safe_load(text)["run_cmd"][0]
        rc, printed = device(command)
        assert rc == 0, printed
        first_token = (root / "machine-token").read_text()
        assert call("GET", f"/api/v1/machines/{MAC}")[1]["state"] == "registered"
    finally:
        server.stop()
    # The restore, as README's block: the server stopped, the backup copied over, the one
    # that installed since marked installed, the server started.
    restored = _netboot(config, "db", "copy", "--from", str(backup),
                        "--to", str(data / "netboot.db"), "--force")
    assert restored.returncode == 0, restored.stderr
    marked = _netboot(config, "machines", "mark-installed", "edge-1")
    assert marked.returncode == 0, marked.stderr
    server.start()
    try:
        # Its next boot: the machine token the restored inventory never gave, refused;
        # told on the machine with the claim of the secret it sent and the command to type.
        # (Its status is the loop's, 0 after its tries: what it printed says the answer.)
        rc, printed = device(command)
        assert "401 Unauthorized" in printed, printed
        secret = (root / "install-secret").read_text().strip()
        told = [e for e in events() if e["kind"] == "registration refused"]
        assert told, events()
        claim = told[-1]["data"].get("claim")
        assert isinstance(claim, str) and re.fullmatch(r"[0-9a-f]{64}", claim), told[-1]
        assert f"netboot machines claim {MAC} {claim}" in told[-1]["message"], told[-1]
        assert first_token not in json.dumps(told) and secret not in json.dumps(told)
        # A host on the VLAN posting the MAC with a secret of its own: refused; its claim is
        # not the node's.
        stranger = {"mac": MAC, "machine_token": "x" * 32, "install_secret": "stranger",
                    "keeps": "machine_token"}
        assert call("POST", "/api/v1/register", stranger, admin=False)[0] == 401
        # The operator's word, as typed; then the node's next try is registered.
        given = _netboot(config, "machines", "claim", "edge-1", claim)
        assert given.returncode == 0, (given.stdout, given.stderr)
        assert call("POST", "/api/v1/register", stranger, admin=False)[0] == 401
        rc, printed = device(command)
        assert rc == 0 and "401" not in printed, printed
        machine = call("GET", f"/api/v1/machines/{MAC}")[1]
        assert machine["state"] == "registered" and machine["cluster"] == "edge", machine
        again = (root / "machine-token").read_text()
        assert again and again != first_token
        # A later boot with the new machine token: answered (its address reported).
        rc, printed = device(command)
        assert rc == 0 and "401" not in printed, printed
        kinds = [e["kind"] for e in events()]
        assert kinds.count("registration claimed") == 1 and kinds[-1] != "registration " \
            "refused", kinds
    finally:
        server.stop()
