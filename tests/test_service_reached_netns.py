"""A device's URLs on a host without a default route and no --advertise (s36-user).

``netboot serve`` runs in a network namespace of its own with two interfaces, one on
192.0.2.0/24 and one on 198.51.100.0/24 (veth pairs to a client namespace each), and no
default route: it advertises 127.0.0.1 (start-up warns of it). Before, every device got
``http://127.0.0.1:8080/…`` in its bootstrap script, its install script (kernel, initrds,
config URL) and its config, which on its side is itself: its boot failed, silently. Now a
device gets the address its request came in on, and fetching every URL works; a script or
config kept for one interface is never served to the other's clients. Its PXE firmware's
proxyDHCP offer names the same address (it named 127.0.0.1), and the HTTPS certificate
names both addresses (it named 127.0.0.1, localhost and ::1 only).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.conftest import INITRD, KERNEL
from tests.servers.test_dhcp_netns import CLIENT_SCRIPT

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl")]

ROOT = Path(__file__).resolve().parent.parent
SUBNETS = {"a": ("192.0.2.10", "192.0.2.60"), "b": ("198.51.100.10", "198.51.100.60")}
MAC_A = "52:54:00:36:00:0a"
MAC_B = "52:54:00:36:00:0b"
MAC_HELD = "52:54:00:36:00:0c"  # enrolled without a profile: held, its script kept per NIC


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def namespaces(prefix: str, sides: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """The server's namespace and a client's for each side of SUBNETS, no default route in
    any; ``sides`` connected (a test may connect the others later); all deleted after."""
    tag = secrets.token_hex(3)
    names = {"srv": f"{prefix}-{tag}-s", "a": f"{prefix}-{tag}-a", "b": f"{prefix}-{tag}-b"}
    made: list[str] = []
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for side in sides:
            connect(names, side)
        yield names
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def connect(names: dict[str, str], side: str) -> None:
    """The veth pair between the server's namespace and ``side``'s, addressed and up."""
    server, client = SUBNETS[side]
    ip("-n", names["srv"], "link", "add", f"v{side}", "type", "veth", "peer", "name", "eth0",
       "netns", names[side])
    ip("-n", names[side], "addr", "add", f"{client}/24", "dev", "eth0")
    ip("-n", names[side], "link", "set", "eth0", "up")
    ip("-n", names["srv"], "link", "set", f"v{side}", "up")
    ip("-n", names["srv"], "addr", "add", f"{server}/24", "dev", f"v{side}")


@pytest.fixture
def subnets() -> Iterator[dict[str, str]]:
    """The server's namespace and a client's on each subnet, no default route in any."""
    yield from namespaces("s36user", tuple(SUBNETS))


def netboot(*args: str, ns: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "netboot", *args]
    return ["ip", "netns", "exec", ns, *command] if ns else command


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def curl(ns: str, url: str, *args: str) -> tuple[int, bytes]:
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "-o", "-",
                           "-w", "\n%{http_code}", *args, url], capture_output=True,
                          timeout=20)
    body, _, status = done.stdout.rpartition(b"\n")
    return int(status or 0), body


@contextlib.contextmanager
def serving(cfg: tuple[str, ...], subnets: dict[str, str], tmp_path: Path) -> Iterator[None]:
    """``netboot serve`` in the server's namespace (its log in serve.log), once it answers."""
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(netboot("serve", *cfg, ns=subnets["srv"]), env=env(),
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while curl(subnets["a"], "http://192.0.2.10:8080/healthz")[0] != 200:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "netboot did not start"
            time.sleep(0.2)
        yield
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


def pxe_offer(ns: str, mac: str, *extra: dhcp.Option, tries: int = 5) -> dhcp.Packet | None:
    """A BIOS PXE ROM's DISCOVER broadcast from ``ns``'s eth0, and the proxy offer;
    ``extra``: options more (iPXE's user class: its boot file is then a URL); ``tries``: 2 s
    each (a request that must get no answer waits them all out)."""
    discover = dhcp.Packet(
        op=Op.REQUEST, xid=0x36005EED, chaddr=bytes.fromhex(mac.replace(":", "")),
        flags=dhcp.BROADCAST_FLAG, options=(
            dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),
            dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes((1, 3, 43, 60, 66, 67))),
            dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x00"),
            dhcp.Option(Opt.CLIENT_NDI, b"\x01\x02\x01"), *extra))
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT_SCRIPT,
                           "eth0", dhcp.encode(discover, pad_to=300).hex(), str(tries)],
                          capture_output=True, timeout=60)
    return dhcp.parse(bytes.fromhex(done.stdout.decode().strip())) if done.returncode == 0 \
        else None


def test_each_subnets_device_gets_urls_of_the_address_it_reached(
        subnets: dict[str, str], tmp_path: Path) -> None:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)  # what a BIOS PXE ROM is offered
    config = tmp_path / "netboot.yaml"
    # No server.advertise, no interfaces: what a newcomer's first run has (proxyDHCP).
    config.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\n"
                      f"tftp:\n  enabled: false\nassets:\n  dirs: [{assets}]\n")
    cfg = ("--config", str(config))
    for args in (("clusters", "add", "edge", "--endpoint", "k3s.example"),
                 ("profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img"),
                 ("machines", "add", MAC_A, "--profile", "p", "--cluster", "edge"),
                 ("machines", "add", MAC_B, "--profile", "p", "--cluster", "edge"),
                 ("machines", "add", MAC_HELD)):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    with serving(cfg, subnets, tmp_path):
        seen: dict[str, dict[str, str]] = {}
        offers = {side: pxe_offer(subnets[side], mac)
                  for side, mac in (("a", MAC_A), ("b", MAC_B))}
        ca = tmp_path / "data" / "tls" / "ca.pem"
        https = {side: curl(subnets[side], f"https://{SUBNETS[side][0]}:8443/healthz",
                            "--cacert", str(ca))[0] for side in SUBNETS}
        for side, mac in (("a", MAC_A), ("b", MAC_B)):
            server_ip = SUBNETS[side][0]
            base = f"http://{server_ip}:8080"
            got = seen[side] = {}
            status, body = curl(subnets[side], f"{base}/boot.ipxe")
            assert status == 200
            got["boot.ipxe"] = body.decode()
            status, body = curl(subnets[side], f"{base}/ipxe?mac={mac}&arch=x86_64")
            assert status == 200
            got["ipxe"] = script = body.decode()
            # Every URL in it is fetched from the device's side, as iPXE and k3OS would.
            urls = re.findall(r"https?://[^\s\"']+", script)
            assert urls, script
            for url in urls:
                assert url.startswith(f"{base}/"), (url, script)
                status, body = curl(subnets[side], url)
                assert status == 200, (url, body)
                if "/config/" in url:
                    got["config"] = body.decode()
            assert "config" in got, script
        # The dashboard's preview of what a machine gets (the API's render, asked over HTTPS
        # at each address): it named 127.0.0.1, which the device never gets (s37-user).
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        previews = {(side, kind): curl(subnets[side], f"https://{SUBNETS[side][0]}:8443/api/v1/"
                               f"machines/{MAC_A}/render/{kind}", "--cacert", str(ca), "-H",
                               f"Authorization: Bearer {admin}")
                    for side in SUBNETS for kind in ("ipxe", "config")}
        # The server's own clients keep the advertised address.
        status, body = curl(subnets["srv"], "http://127.0.0.1:8080/boot.ipxe")
        assert status == 200 and "http://127.0.0.1:8080/" in body.decode()
        # One NIC's script asked on one subnet, then on the other (a held machine's is
        # kept per NIC; an install's too, asked again): each time the address it reached.
        for mac in (MAC_HELD, MAC_A):
            for side in ("a", "b", "a"):
                server_ip = SUBNETS[side][0]
                status, body = curl(subnets[side],
                                    f"http://{server_ip}:8080/ipxe?mac={mac}&arch=x86_64")
                assert status == 200
                hosts = set(re.findall(r"https?://([^/:\s]+)", body.decode()))
                assert hosts <= {server_ip}, (mac, side, body)
    for side, got in seen.items():
        server_ip = SUBNETS[side][0]
        for what, text in got.items():
            assert "127.0.0.1" not in text, (side, what, text)
        assert f"http://{server_ip}:8080/ipxe" in got["boot.ipxe"], got["boot.ipxe"]
        assert f"http://{server_ip}:8080/assets/vmlinuz" in got["ipxe"]
        assert f"http://{server_ip}:8080/config/" in got["ipxe"]
    for (side, kind), (status, body) in previews.items():
        text = body.decode()
        hosts = set(re.findall(r"https?://([^/:\s]+)", text)) - {"k3s.example"}
        assert status == 200 and hosts == {SUBNETS[side][0]}, (side, kind, status, text)
    for side, offer in offers.items():
        assert offer is not None and offer.siaddr == SUBNETS[side][0], (side, offer)
        assert offer.file_name == "undionly.kpxe"
    assert https == {"a": 200, "b": 200}
    served = (tmp_path / "serve.log").read_text()
    # The warning names the addresses the banner does, not 127.0.0.1 (s40-net).
    (warning,) = [line for line in served.splitlines() if "no default route" in line]
    assert "no one address advertised; each device is answered with the address" in warning
    assert "192.0.2.10 on " in warning and "198.51.100.10 on " in warning, warning
    assert "netboot serving on 192.0.2.10, 198.51.100.10 " in served, served


def tftp(ns: str, url: str) -> tuple[int, bytes]:
    """A TFTP read by curl from ``ns`` (curl's exit status: 0 when the file came)."""
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "10", "-o", "-",
                           url], capture_output=True, timeout=20)
    return done.returncode, done.stdout


def soa(ns: str, server: str) -> str:
    """The rcode of an SOA query for netboot.lan sent from ``ns`` to ``server``:53."""
    script = ("import sys, dns.message, dns.query, dns.rcode\n"
              "q = dns.message.make_query('netboot.lan', 'SOA')\n"
              "try:\n"
              "    print(dns.rcode.to_text(dns.query.udp(q, sys.argv[1], timeout=3).rcode()))\n"
              "except Exception as exc:\n"
              "    print(type(exc).__name__)\n")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script, server],
                          capture_output=True, timeout=30, text=True, env=env())
    return done.stdout.strip() or done.stderr.strip()


def test_each_subnets_device_gets_tftp_configs_naming_the_address_it_reached(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """U-Boot's pxelinux config and GRUB's per-NIC config, read over TFTP, carry the kernel
    command line's config URL: on such a host it named http://127.0.0.1:8080 (the device
    itself) where HTTP's answers already named the address reached (s36-user). Now the
    address the TFTP request came in on, each subnet's its own, asked in turn. ``netboot
    render`` and the start-up summary printed 127.0.0.1 there too: now what a device on
    the first interface gets (the others named), and each interface's address. DNS
    listened on 127.0.0.1 only: now on each interface's address too."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    config = tmp_path / "netboot.yaml"
    # No server.advertise, no interfaces, no DHCP; TFTP on (its default port, 69).
    config.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\n"
                      f"dhcp:\n  mode: \"off\"\nhttps:\n  enabled: false\n"
                      f"dns:\n  enabled: true\n"
                      f"assets:\n  dirs: [{assets}]\n")
    cfg = ("--config", str(config))
    for args in (("clusters", "add", "edge", "--endpoint", "k3s.example"),
                 ("profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img"),
                 ("machines", "add", MAC_A, "--profile", "p", "--cluster", "edge"),
                 ("machines", "add", MAC_B, "--profile", "p", "--cluster", "edge")):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    # netboot render on that host: what a device on its first interface gets (it printed
    # 127.0.0.1), the other named on stderr.
    rendered = subprocess.run(netboot("render", *cfg, MAC_A, "pxelinux", ns=subnets["srv"]),
                              env=env(), capture_output=True, timeout=60, text=True)
    assert rendered.returncode == 0, rendered.stderr
    assert "http://192.0.2.10:8080/config/" in rendered.stdout, rendered.stdout
    assert "127.0.0.1" not in rendered.stdout, rendered.stdout
    assert "rendered as a device on va gets it (192.0.2.10); on vb 198.51.100.10" \
        in rendered.stderr, rendered.stderr
    got: list[tuple[str, str, str, int, bytes]] = []
    with serving(cfg, subnets, tmp_path):
        # Each subnet's machine in turn, twice (its install under way: the second is the
        # same plan's config again): the caches the two addresses' views share (a profile's
        # and a cluster's values, the plan's) filled by one, then read by the other.
        for _ in range(2):
            for side, mac in (("a", MAC_A), ("b", MAC_B)):
                server_ip = SUBNETS[side][0]
                for path in (f"pxelinux.cfg/01-{mac.replace(':', '-')}",
                             f"grub/grub.cfg-01-{mac}"):
                    status, body = tftp(subnets[side], f"tftp://{server_ip}/{path}")
                    got.append((mac, side, path, status, body))
        # DNS's default listen was the advertised address, 127.0.0.1 here: no device
        # reached it. Now each interface's too (and 127.0.0.1 still, for this host).
        zone = {side: soa(subnets[side], SUBNETS[side][0]) for side in SUBNETS}
        zone["srv"] = soa(subnets["srv"], "127.0.0.1")
    assert len(got) == 8
    assert zone == {"a": "NOERROR", "b": "NOERROR", "srv": "NOERROR"}, zone
    # The start-up summary names each address a device may reach, not 127.0.0.1.
    served = (tmp_path / "serve.log").read_text()
    summary = served[served.index("netboot serving on"):]
    assert summary.startswith("netboot serving on 192.0.2.10, 198.51.100.10 (no address "
                              "advertised: each device gets the one it reaches)\n"), served
    assert "  HTTP   http://192.0.2.10:8080/, http://198.51.100.10:8080/  (iPXE chain URL: " \
        "http://192.0.2.10:8080/boot.ipxe, http://198.51.100.10:8080/boot.ipxe)\n" in summary, \
        served
    for mac, side, path, status, body in got:
        server_ip = SUBNETS[side][0]
        text = body.decode()
        assert status == 0, (mac, side, path, status, (tmp_path / "serve.log").read_text())
        assert f"http://{server_ip}:8080/config/" in text, (mac, side, path, text)
        hosts = set(re.findall(r"https?://([^/:\s]+)", text))
        assert hosts == {server_ip}, (mac, side, path, text)
