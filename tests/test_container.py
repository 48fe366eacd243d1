"""The container image, built by container/build.sh and run with podman as the Containerfile
documents: host networking, an unprivileged user with NET_BIND_SERVICE only, data on a volume.

Network safety: DHCP is off and the container is told `--interface lo`, so TFTP binds to the
loopback device only; HTTP listens on 127.0.0.1. Nothing leaves the machine and no bridge is
created (the build runs with --network=none, and podman's default here is no network).

The image is cached between runs, tagged by a digest of everything it is built from, so only a
change to netboot, the Containerfile or the build script rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.wheels import ROOT, build_netboot_wheel, dependency_wheels, source_digest

pytestmark = [pytest.mark.requires("podman", "podman"),
              pytest.mark.requires("mmdebstrap", "mmdebstrap"),
              pytest.mark.requires("runc", "runc"),
              pytest.mark.root]

IMAGE = "localhost/netboot-test"
# Hosts with a hybrid cgroup layout (as CI's) cannot let podman pick its defaults: crun and the
# systemd cgroup manager fail there, and rlimits cannot be raised; no journald to log events to.
# netns "none": a container that is not told otherwise gets no network, so never a bridge.
CONTAINERS_CONF = """\
[containers]
default_ulimits = []
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF, encoding="utf-8")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict[str, str], *args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    build_script = ROOT / "container" / "build.sh"
    tag = f"{IMAGE}:{source_digest(ROOT / 'Containerfile', build_script)}"
    if podman(podman_env, "image", "exists", tag, check=False).returncode != 0:
        work = tmp_path_factory.mktemp("container")
        deps = dependency_wheels()
        wheel = build_netboot_wheel(work / "dist", deps)
        wheelhouse = work / "wheelhouse"
        shutil.copytree(deps, wheelhouse)
        shutil.copy2(wheel, wheelhouse)
        result = subprocess.run([str(build_script), tag], env={**podman_env,
                                "WHEELHOUSE": str(wheelhouse)}, capture_output=True,
                                text=True, timeout=540, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        # Older test images are stale: keep only this one.
        listed = podman(podman_env, "images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE)
        for old in set(listed.stdout.split()) - {tag}:
            podman(podman_env, "rmi", old, check=False)
    return tag


def free_port(kind: socket.SocketKind, ports: range) -> int:
    for port in ports:
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {ports}")


@pytest.fixture
def container(podman_env: dict[str, str],
              image: str) -> Iterator[tuple[str, str, int, int, int]]:
    name = f"netboot-test-{os.getpid()}"
    volume = f"{name}-data"
    # A privileged HTTP port: binding it proves NET_BIND_SERVICE reaches the unprivileged user.
    http_port = free_port(socket.SOCK_STREAM, range(1023, 1000, -1))
    tftp_port = free_port(socket.SOCK_DGRAM, range(46_900, 47_000))
    # Host networking: the default 8443 could be someone else's; HTTPS listens like HTTP.
    https_port = free_port(socket.SOCK_STREAM, range(47_000, 47_100))
    podman(podman_env, "rm", "--force", "--ignore", name)
    podman(podman_env, "volume", "rm", "--force", volume)
    try:
        podman(podman_env, "run", "--detach", "--name", name, "--network=host",
               "--cap-drop=all", "--cap-add=NET_BIND_SERVICE",
               "--volume", f"{volume}:/var/lib/netboot",
               "--env", "NETBOOT_HTTP_LISTEN=127.0.0.1",
               image, "serve", "--interface", "lo", "--dhcp-mode", "off",
               "--http-port", str(http_port), "--tftp-port", str(tftp_port),
               "--https-port", str(https_port))
        yield name, volume, http_port, tftp_port, https_port
    finally:
        podman(podman_env, "rm", "--force", "--time", "5", name, check=False)
        podman(podman_env, "volume", "rm", "--force", volume, check=False)


def fetch(url: str, name: str, env: dict[str, str]) -> str:
    for _ in range(300):  # bounded: at most ~60 s for a cold start on a loaded machine
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            state = podman(env, "inspect", "--format", "{{.State.Status}}", name).stdout
            if state.strip() != "running":
                break
            time.sleep(0.2)
    logs = podman(env, "logs", name, check=False)
    raise AssertionError(f"no answer from {url}:\n{logs.stdout}{logs.stderr}")


def test_container_serves_as_an_unprivileged_user(
        container: tuple[str, str, int, int, int], podman_env: dict[str, str],
        tmp_path: Path) -> None:
    name, volume, http_port, tftp_port, https_port = container
    body = fetch(f"http://127.0.0.1:{http_port}/boot.ipxe", name, podman_env)
    assert body.startswith("#!ipxe") and f"http://127.0.0.1:{http_port}/ipxe?" in body
    metrics = fetch(f"http://127.0.0.1:{http_port}/metrics", name, podman_env)
    assert 'netboot_machines{state="registered"} 0.0' in metrics
    assert 'netboot_http_requests_total{method="GET",route="/boot.ipxe",status="200"}' in metrics

    # Not root, and no capability beyond NET_BIND_SERVICE (bit 10).
    status = podman(podman_env, "exec", name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[1] != "0", fields["Uid"]
    assert int(fields["CapEff"], 16) == 1 << 10, fields["CapEff"]

    # Debian's iPXE loader comes from the image's ipxe package, over TFTP.
    import tftpy

    out = tmp_path / "undionly.kpxe"
    tftpy.TftpClient("127.0.0.1", tftp_port).download("undionly.kpxe", str(out), timeout=5)
    known = (ROOT / "boot_assets" / "checksums.sha256").read_text(encoding="utf-8")
    assert f"{hashlib.sha256(out.read_bytes()).hexdigest()}  undionly.kpxe" in known

    # The inventory and the admin token are on the volume, owned by the container's user.
    mount = json.loads(podman(podman_env, "volume", "inspect", volume).stdout)[0]["Mountpoint"]
    token = Path(mount) / "admin.token"
    assert token.stat().st_uid != 0 and (token.stat().st_mode & 0o077) == 0
    assert (Path(mount) / "netboot.db").is_file()
    for private in ("netboot.db", "secret.key", "tls/ca.key"):
        assert (Path(mount) / private).stat().st_mode & 0o077 == 0, private

    # The API over HTTPS, verified with the CA netboot made on the volume (the certificate
    # names 127.0.0.1, the address of --interface lo that netboot advertises).
    import ssl
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(Path(mount) / "tls" / "ca.pem"))
    with urllib.request.urlopen(f"https://127.0.0.1:{https_port}/healthz", context=ctx,
                                timeout=10) as resp:
        assert resp.status == 200

    # The CLI by its name (README: podman exec netboot netboot ...): it was not on PATH.
    exported = podman(podman_env, "exec", name, "netboot", "ca", "export").stdout
    assert exported.startswith("# SHA256 Fingerprint=") and "BEGIN CERTIFICATE" in exported

    # The postgresql extra is installed: the image can share a PostgreSQL inventory.
    found = podman(podman_env, "exec", name, "/opt/netboot/bin/python", "-c",
                   "import asyncpg, netboot.inventory.postgres; print(asyncpg.__version__)")
    assert found.stdout.strip(), found.stderr
    # The fast extra is installed, and serve (PID 1) runs on uvloop (server.event_loop: auto).
    maps = podman(podman_env, "exec", name, "cat", "/proc/1/maps").stdout
    assert "/uvloop/loop." in maps, "serve does not run on uvloop in the image"

    # SIGTERM (podman stop) shuts it down cleanly.
    podman(podman_env, "stop", "--time", "30", name)
    code = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout
    assert code.strip() == "0", podman(podman_env, "logs", name).stderr
