"""Make the inventory an older netboot leaves behind, for tests/test_upgrade.py.

    python tests/data/make_old_inventory.py OLD_TREE OUT_DIR [--postgresql]

OLD_TREE is a checkout of an older commit (``git worktree add --detach /tmp/old <commit>``,
or ``git archive <commit> | tar -x -C /tmp/old``); OUT_DIR receives its data directory
(``netboot.db``, ``secret.key``, ``admin.token``, the CA) and ``made.json`` (what was made,
with the API token and the machines' MACs), the fixture's whole content. Run with the
Python of this repository's venv as root or not: the old tree runs on loopback only
(127.0.0.1, a free port), with DHCP, TFTP and DNS off.

What an operator of that version had: a managed cluster, a profile, a group, an API token
(used once), a machine enrolled that installed and registered (its install token spent), one
enrolled and asked for its install (its token issued, not spent), one enrolled never seen, and
a device that booted unknown (a discovered record). Only the old tree's CLI and HTTP API are
used: they are what its operators used.

With ``--postgresql`` the inventory is in PostgreSQL (a throwaway cluster of this tree's
netboot.lab.pgcluster, schema ``netboot_old``): OUT_DIR gets ``inventory.sql``
(``pg_dump --schema netboot_old --no-owner``) in place of ``netboot.db``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

KERNEL = b"\x7fKERNEL" + bytes(range(256)) * 4
INITRD = b"070701" + b"\x00" * 500
INSTALLED = "52:54:00:30:00:01"  # installed and registered: its token spent
ASKED = "52:54:00:30:00:02"  # its install asked for: a token issued, not spent
NEVER = "52:54:00:30:00:03"  # enrolled, never booted
UNKNOWN = "52:54:00:30:00:09"  # booted unknown: discovered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SCHEMA = "netboot_old"  # the PostgreSQL schema the inventory is in (--postgresql)


def main(old: Path, out: Path, postgresql: bool = False) -> None:
    if not postgresql:
        make(old, out, "")
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from netboot.lab.pgcluster import bindir, start

    cluster = start()
    try:
        subprocess.run([str(bindir() / "psql"), cluster.dsn(), "-q", "-c",
                        f"CREATE SCHEMA {SCHEMA}"], check=True, capture_output=True)
        dsn = f"{cluster.dsn()}&search_path={SCHEMA}"
        make(old, out, f"inventory:\n  backend: postgresql\n  dsn: \"{dsn}\"\n")
        subprocess.run([str(bindir() / "pg_dump"), cluster.dsn(), "--schema", SCHEMA,
                        "--no-owner", "--no-privileges", "-f", str(out / "inventory.sql")],
                       check=True, capture_output=True)
    finally:
        cluster.stop()


def make(old: Path, out: Path, inventory: str) -> None:
    out = out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    work = out.parent / (out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    (work / "assets").mkdir(parents=True)
    (work / "assets" / "vmlinuz").write_bytes(KERNEL)
    (work / "assets" / "initrd.img").write_bytes(INITRD)
    port = free_port()
    config = work / "netboot.yaml"
    config.write_text(f"server:\n  advertise: 127.0.0.1\n  data_dir: {work / 'data'}\n"
                      f"http:\n  port: {port}\nhttps:\n  port: {free_port()}\n"
                      f"  listen: 127.0.0.1\ndhcp:\n  mode: \"off\"\ntftp:\n  enabled: false\n"
                      f"assets:\n  dirs: [{work / 'assets'}]\n{inventory}")
    env = {**os.environ, "PYTHONPATH": str(old.resolve())}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "netboot", args[0], *args[1:2],
                               "--config", str(config), *args[2:]], env=env,
                              capture_output=True, text=True, timeout=120, cwd=work)
        if done.returncode != 0:
            raise SystemExit(f"netboot {' '.join(args)}: {done.returncode}\n{done.stderr}")
        return done.stdout

    cli("clusters", "add", "edge", "--endpoint", "k3s.example")
    cli("profiles", "add", "k3os", "--kernel", "vmlinuz", "--initrd", "initrd.img")
    cli("groups", "add", "rack1", "--selector", "rack=r1", "--profile", "k3os",
        "--cluster", "edge")
    cli("machines", "add", INSTALLED, "--profile", "k3os", "--cluster", "edge", "--role",
        "server", "--hostname", "node-1")
    cli("machines", "add", ASKED, "--profile", "k3os", "--cluster", "edge", "--hostname",
        "node-2")
    cli("machines", "add", NEVER, "--label", "rack=r1", "--hostname", "node-3")
    api_token = cli("tokens", "create", "ci", "--scope", "operator").split()[-1]

    log = (work / "serve.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "netboot", "serve", "--config",
                               str(config)], env=env, stdout=log, stderr=subprocess.STDOUT,
                              cwd=work)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, headers: dict[str, str] | None = None) -> str:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}),
                                    timeout=10) as r:
            return str(r.read().decode())

    def post(path: str, body: object, token: str) -> str:
        request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return str(r.read().decode())

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get("/healthz")
                break
            except (OSError, urllib.error.URLError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((work / "serve.log").read_text()) from None
                time.sleep(0.2)
        get("/api/v1/machines", {"Authorization": f"Bearer {api_token}"})  # used once
        script = get(f"/ipxe?mac={INSTALLED}&arch=x86_64")
        token = script.split("?token=", 1)[1].split()[0]
        get(f"/config/{INSTALLED.replace(':', '-')}?token={token}")
        post(f"/api/v1/machines/{INSTALLED}/events", {"kind": "installed"}, token)
        post("/api/v1/register", {"mac": INSTALLED, "token": token, "hostname": "node-1",
                                  "addresses": ["192.0.2.51"], "machine_id": "m-1"}, token)
        get(f"/ipxe?mac={ASKED}&arch=x86_64")
        get(f"/ipxe?mac={UNKNOWN}&arch=x86_64&manufacturer=QEMU&serial=S-UNKNOWN")
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    shutil.copytree(work / "data", out)
    commit = subprocess.run(["git", "-C", str(old), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    (out / "made.json").write_text(json.dumps({
        "commit": commit or old.name, "api_token": api_token, "installed": INSTALLED,
        "asked": ASKED, "never": NEVER, "unknown": UNKNOWN}, indent=1) + "\n")
    shutil.rmtree(work)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--postgresql"]
    if len(args) != 2 or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if args[:1] in (["-h"], ["--help"]) else 2)
    main(Path(args[0]), Path(args[1]), postgresql="--postgresql" in sys.argv[1:])
