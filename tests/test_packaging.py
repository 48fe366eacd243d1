"""The wheel, as `pip install netboot` or pipx would give it: built, installed into a fresh venv
with no index, and run from outside the checkout (render, check-config, assets, serve)."""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ports import reserved_port
from tests.wheels import ROOT, build_netboot_wheel, dependency_wheels


@dataclass(frozen=True)
class Installed:
    wheel: Path
    bin: Path  # the venv's bin/
    home: Path  # a scratch directory outside the checkout: the commands' cwd

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(self.bin / "netboot"), *args], cwd=self.home, env=clean_env(),
                                capture_output=True, text=True, timeout=120, check=False)
        if check:
            assert result.returncode == 0, f"netboot {args}: {result.stdout}{result.stderr}"
        return result


def clean_env() -> dict[str, str]:
    """No PYTHONPATH or NETBOOT_* from the test run: only the installed package may answer."""
    return {k: v for k, v in os.environ.items()
            if k != "PYTHONPATH" and not k.startswith("NETBOOT_")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("packaging")
    deps = dependency_wheels()
    wheel = build_netboot_wheel(work / "dist", deps)
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(deps),
                    # With the extra the README's install command names (uvloop).
                    f"{wheel}[fast]"], check=True, timeout=300, capture_output=True)
    home = work / "home"
    home.mkdir()
    return Installed(wheel=wheel, bin=venv / "bin", home=home)


def test_wheel_carries_templates_and_boot_assets_as_they_are_in_the_repository(
        installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        for top in ("templates", "boot_assets"):
            files = sorted(p for p in (ROOT / top).rglob("*") if p.is_file()
                           and "__pycache__" not in p.parts)
            assert files, top
            for path in files:
                member = f"netboot/_shipped/{path.relative_to(ROOT).as_posix()}"
                assert member in names, f"{member} missing from the wheel"
                assert whl.read(member) == path.read_bytes(), member
        assert not any(n.startswith("tests/") for n in names)
        # The dashboard's pages and scripts, as they are in the repository.
        static = ROOT / "netboot" / "web" / "static"
        assert sorted(static.iterdir())
        for path in static.iterdir():
            member = f"netboot/web/static/{path.name}"
            assert member in names and whl.read(member) == path.read_bytes(), member
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    requires = email.parser.BytesParser().parsebytes(metadata).get_all("Requires-Dist") or []
    runtime = {r.split(">")[0].split("=")[0].split(";")[0].strip().lower()
               for r in requires if "extra ==" not in r}
    assert runtime == {"aiohttp", "dnslib", "pyyaml", "cryptography", "jinja2",
                       "prometheus-client"}
    # tftpy is only the tests' second TFTP client.
    assert any(r.startswith("tftpy") and 'extra == "test"' in r for r in requires)
    # A user's pip must not pick an aiohttp with a known server advisory: pipelined requests
    # queued without limit (GHSA-4fvr-rgm6-gqmc, 3.14.1), smuggling through an Upgrade
    # (GHSA-mfx4-hv73-q22v, 3.14.2). The installed aiohttp must meet the same floor.
    floor = next(r for r in requires if r.startswith("aiohttp"))
    assert floor.replace(" ", "") == "aiohttp>=3.14.3", floor
    version = tuple(int(p) for p in importlib.metadata.version("aiohttp").split(".")[:3])
    assert version >= (3, 14, 3), version


def test_installed_package_finds_its_own_templates_not_the_checkouts(
        installed: Installed) -> None:
    python = installed.bin / "python"
    out = subprocess.run([str(python), "-c", "import netboot.shipped as s; "
                          "print(s.templates_dir()); print(s.boot_assets_dir())"],
                         cwd=installed.home, env=clean_env(), capture_output=True, text=True,
                         check=True).stdout.split()
    venv = installed.bin.parent.resolve()
    for line in out:
        assert Path(line).is_relative_to(venv) and Path(line).is_dir(), line


def test_check_config_and_render(installed: Installed) -> None:
    data = installed.home / "render-data"
    config = installed.home / "netboot.yaml"
    config.write_text(f"server:\n  data_dir: {data}\n  advertise: 192.0.2.10\n"
                      "discovery:\n  policy: hold\n", encoding="utf-8")
    assert installed.run("check-config", str(config)).stdout.strip() == f"{config}: OK"
    common = ("--config", str(config))
    installed.run("clusters", "add", "edge", "--server-url", "managed", *common)
    installed.run("profiles", "add", "k3os", "--kernel", "k3os/vmlinuz", "--initrd",
                  "k3os/initrd", *common)
    installed.run("machines", "add", "52:54:00:12:34:56", "--hostname", "edge-1",
                  "--profile", "k3os", "--cluster", "edge", "--role", "server", *common)
    ipxe = installed.run("render", "52:54:00:12:34:56", "ipxe", "--arch", "x86_64", *common)
    assert ipxe.stdout.startswith("#!ipxe")
    assert "kernel http://192.0.2.10:8080/assets/k3os/vmlinuz" in ipxe.stdout
    k3os = installed.run("render", "52:54:00:12:34:56", "config", "--arch", "x86_64", *common)
    assert "hostname: \"edge-1\"" in k3os.stdout and "--cluster-init" in k3os.stdout


def test_assets_reads_the_shipped_checksums(installed: Installed) -> None:
    # checksums.sha256 is package data: without it every loader would be "unknown build".
    result = installed.run("assets", "--data-dir", str(installed.home / "assets-data"),
                           "--json", check=False)
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["undionly.kpxe"]["status"] == "ok (known build)", rows["undionly.kpxe"]


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A TCP port reserved (tests/ports.py), a UDP one probed."""
    if kind == socket.SOCK_STREAM:
        return reserved_port()
    with socket.socket(type=kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(installed: Installed) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    port = free_port()
    https_port = free_port()
    env = {**clean_env(), "NETBOOT_HTTP_LISTEN": "127.0.0.1"}
    proc = subprocess.Popen([str(installed.bin / "netboot"), "serve",
                             "--data-dir", str(installed.home / "serve-data"),
                             # The embedded defaults (proxyDHCP, TFTP, HTTP, HTTPS), loopback
                             # only: DHCP and TFTP bind to the lo device, HTTP and HTTPS to
                             # 127.0.0.1, all on free ports.
                             "--interface", "lo", "--http-port", str(port),
                             "--https-port", str(https_port),
                             "--dhcp-port", str(free_port(socket.SOCK_DGRAM)),
                             "--pxe-port", str(free_port(socket.SOCK_DGRAM)),
                             "--tftp-port", str(free_port(socket.SOCK_DGRAM))],
                            cwd=installed.home, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc, port, https_port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def answered(proc: subprocess.Popen[str], url: str) -> str:
    """The body ``url`` answers once the served netboot is up."""
    for _ in range(300):  # bounded: at most ~60 s for a cold start on a loaded machine
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return str(resp.read().decode())
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no answer from {url}; netboot said:\n" + (
        proc.stdout.read() if proc.poll() is not None and proc.stdout else "(still running)"))


def test_serve_answers_boot_ipxe_and_stops_cleanly(
        installed: Installed, served: tuple[subprocess.Popen[str], int, int]) -> None:
    proc, port, _ = served
    url = f"http://127.0.0.1:{port}/boot.ipxe"
    body = answered(proc, url)
    assert body.startswith("#!ipxe") and f"http://127.0.0.1:{port}/ipxe?" in body
    # The readiness check a load balancer or the operator asks first (README, "Access").
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.read() == b"ok\n"
    # The dashboard's assets come from the installed package, and /metrics answers.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/app.js", timeout=5) as resp:
        assert b"EventSource" in resp.read()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"netboot_machines{" in resp.read()
    # server.event_loop: auto picked uvloop, which the fast extra installed: its loop's
    # extension is mapped into the serving process.
    maps = Path(f"/proc/{proc.pid}/maps").read_text(encoding="utf-8")
    assert "/uvloop/loop." in maps, "serve does not run on uvloop"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    assert "DHCP   proxy on udp/" in output, output  # what the embedded defaults serve
    # Where README says to put a profile's files, named before it is made: a fresh install's
    # summary named only the shipped loaders' directories (s45-review).
    site = installed.home / "serve-data" / "assets"
    assert f"  assets {site} (not made yet: put a profile's files here), " in output, output


def readme_block(first_line: str) -> str:
    """The README's one ```sh block whose first line starts with ``first_line``."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = [b for b in re.findall(r"^```sh\n(.*?)^```$", readme, re.S | re.M)
             if b.startswith(first_line)]
    assert len(found) == 1, (first_line, len(found))
    return str(found[0])


def test_the_readmes_quickstart_and_import_blocks_run_as_written(
        installed: Installed, served: tuple[subprocess.Popen[str], int, int]) -> None:
    """README's quickstart (its API form with the tokens block after it, its CLI form), the
    CSV import of "Enrollment at scale" and the line that puts `netboot` on the PATH, run by
    a shell as they stand, against the wheel's netboot: only `sudo ` dropped (root here, as
    README says), the server's address and the data directory moved to this test's, and
    `.venv` the wheel's venv. The import's printed lines are the ones README shows. The
    import block and the PATH line were not in README (s45-review: a new user had only the
    column list, and every later `netboot ...` was "command not found")."""
    import re
    import shutil

    proc, port, https_port = served
    answered(proc, f"http://127.0.0.1:{port}/healthz")
    (installed.home / ".venv").unlink(missing_ok=True)
    (installed.home / ".venv").symlink_to(installed.bin.parent)
    served_data = installed.home / "serve-data"

    def sh(block: str, data: Path, extra: str = "") -> str:
        text = (block.replace("sudo ", "").replace("/var/lib/netboot", str(data))
                .replace("192.0.2.10:8443", f"127.0.0.1:{https_port}")
                .replace("192.0.2.10:8080", f"127.0.0.1:{port}"))
        env = {**clean_env(), "NETBOOT_SERVER_DATA_DIR": str(data)}
        result = subprocess.run(["bash", "-e", "-c", extra + text], cwd=installed.home, env=env,
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{text}\n{result.stdout}{result.stderr}"
        return result.stdout + result.stderr

    api_form = readme_block("sudo .venv/bin/netboot ca export > netboot-ca.pem")
    tokens = readme_block("SCANNER=$(sudo .venv/bin/netboot tokens create")
    out = sh(api_form + tokens, served_data)
    assert '"hostname": "edge-1"' in out and "POST /api/v1/machines" in out, out
    # netboot audit names a machine by its hostname, as netboot events does (s46-operator):
    # the machine the scanner made is named node-<its id's end>, not m-<id>.
    assert re.search(r"scanner-1 +POST /api/v1/machines +node-[0-9a-f]{6} ", out), out

    # The CLI form, on an inventory of its own (it makes the same cluster and machine).
    cli_data = installed.home / "cli-data"
    out = sh(readme_block("sudo .venv/bin/netboot clusters add edge"), cli_data)
    assert "#!ipxe" in out and 'hostname: "edge-1"' in out, out
    assert re.search(r"^group +x86$", out, re.M) and "events:" in out, out
    import_block = readme_block("cat > fleet.csv <<'EOF'")
    out = sh(import_block, cli_data)
    shown = re.findall(r"# (\d+ w.*)$", import_block, re.M)
    assert [line for line in out.splitlines() if line in shown] == shown, out
    listed = json.loads(installed.run("machines", "ls", "--json", "--cluster", "edge",
                                      "--data-dir", str(cli_data)).stdout)
    assert {m["serial"] for m in listed} >= {"CZ2048A01", "CZ2048A02", "CZ2048A03"}, listed

    # The PATH line, into a directory of this test's in place of /usr/local/bin.
    bindir = installed.home / "usr-local-bin"
    bindir.mkdir(exist_ok=True)
    line = readme_block('sudo ln -s "$PWD/.venv/bin/netboot" /usr/local/bin/netboot')
    sh(line.replace("/usr/local/bin", str(bindir)), cli_data)
    found = shutil.which("netboot", path=str(bindir))
    assert found is not None
    assert subprocess.run([found, "--version"], capture_output=True, text=True,
                          check=True).stdout.startswith("netboot 0.1.0 (build ")


def test_no_instruction_installs_netboot_by_its_name_from_an_index() -> None:
    """"netboot" on PyPI is another project ("PXE provisioning management", 0.4.1): an
    instruction to ``pip install netboot`` (contrib/netboot.service's comment did, into a
    fresh venv that the unit then runs as root) or ``'netboot[postgresql]'`` (a pip without
    this netboot installed fetches that one) installs someone else's code. Install from the
    checkout or a wheel built from it (``'.[postgresql]'``), or the dependency by its own
    name."""
    import re

    # One command: up to the line's end or the shell's next command (&&, ;, |).
    by_name = re.compile(r"""pip[x]? install\b[^\n&;|]*?(?<![\w./-])['"]?netboot(\[|['"\s)]|$)""",
                         re.MULTILINE)
    texts = [ROOT / "README.md", ROOT / "contrib" / "netboot.service", ROOT / "Containerfile",
             *sorted((ROOT / "netboot").rglob("*.py")), *sorted((ROOT / "container").glob("*"))]
    found = [f"{path.relative_to(ROOT)}: {m.group(0)}" for path in texts if path.is_file()
             for m in by_name.finditer(path.read_text(encoding="utf-8"))]
    assert found == [], found
    # The pattern does find the forms it is there for.
    for bad in ("pip install netboot", "/opt/netboot/bin/pip install netboot)",
                "pip install 'netboot[postgresql]'", "pipx install netboot"):
        assert by_name.search(bad), bad
    for good in ("pip install '.[postgresql]'", "pip install dist/netboot-0.1.0-py3-none-any.whl",
                 "pip install --force-reinstall ./netboot-0.1.0-py3-none-any.whl",
                 "pip install '.[fast]' && systemctl enable --now netboot"):
        assert not by_name.search(good), good


def test_a_compiled_wheels_build_says_so_and_is_another_build(tmp_path: Path) -> None:
    """setup.py names the build from the wheel's Python files, taken before build_ext makes
    the extensions: a mypyc wheel and a pure wheel of one tree named the same build, so
    ``--version`` could not tell which runs. The compiled one says "compiled", and its
    digest differs. (The function alone: a mypyc wheel takes minutes to build.)"""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("netboot_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # not __main__: setup() is not run
    package = tmp_path / "netboot"
    (package / "_shipped").mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    pure = setup_py.build_id(package, compiled=False)
    built = setup_py.build_id(package, compiled=True)
    assert re.fullmatch(r"[0-9a-f]{12}", pure), pure
    assert re.fullmatch(r"[0-9a-f]{12}, compiled", built), built
    assert built.split(",")[0] != pure
    (package / "cli.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    assert setup_py.build_id(package, compiled=True) == built  # what build_ext adds later


def test_version_names_the_wheels_build(installed: Installed) -> None:
    """Every build is version 0.1.0, and pip given a newer wheel of an installed version
    keeps the old files ("already installed", exit 0): README's upgrade says
    ``--force-reinstall``, and ``--version`` names the build that runs (a digest of the
    wheel's files) so the operator can see that it took."""
    import re

    line = installed.run("--version").stdout.strip()
    assert re.fullmatch(r"netboot 0\.1\.0 \(build [0-9a-f]{12}\)", line), line
    with zipfile.ZipFile(installed.wheel) as wheel:
        build = wheel.read("netboot/_shipped/BUILD").decode().strip()
    assert line.endswith(f"(build {build})")
