"""A site with two NICs named (``server.interfaces: [va, vb]``): the HTTPS certificate and
the machines' fixed addresses (s39-net).

The namespaces of tests/test_service_reached_netns.py: ``netboot serve`` in one of its own
with va on 192.0.2.0/24 and vb on 198.51.100.0/24 (veth pairs to a client namespace each).
With interfaces named, va's address (the first's) is advertised.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netboot.wire import dhcp
from netboot.wire.dhcp import Opt
from tests.conftest import INITRD, KERNEL
from tests.netns import until
from tests.test_service_follow_netns import config as enrolled_config
from tests.test_service_follow_netns import resolve, reverse
from tests.test_service_reached_netns import (
    MAC_A,
    MAC_B,
    MAC_HELD,
    SUBNETS,
    curl,
    env,
    ip,
    namespaces,
    netboot,
    pxe_offer,
    serving,
    tftp,
)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl")]


@pytest.fixture
def subnets() -> Iterator[dict[str, str]]:
    yield from namespaces("s39net", ("a", "b"))


def config(tmp_path: Path, dhcp: str = "off", *, named: bool = True,
           dns: bool = False, tftp_on: bool = False) -> tuple[str, ...]:
    """``named``: ``server.interfaces: [va, vb]``, else ``server.advertise: 192.0.2.10``
    and no interface named (one 0.0.0.0 socket each). ``dhcp``: "off", "proxy" or
    "authoritative"; with ``tftp_on``, TFTP on its port 69 and a BIOS loader among the assets."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)  # what a BIOS PXE ROM is offered
    path = tmp_path / "netboot.yaml"
    text = (f"server:\n  data_dir: {tmp_path / 'data'}\n"
            + ("  interfaces: [va, vb]\n" if named else "  advertise: 192.0.2.10\n")
            + f"tftp:\n  enabled: {str(tftp_on).lower()}\nhttps:\n  enabled: true\n"
            f"dns:\n  enabled: {str(dns).lower()}\nassets:\n  dirs: [{assets}]\n")
    if dhcp == "authoritative":
        text += ("dhcp:\n  mode: authoritative\n  authoritative:\n"
                 "    pool_start: 192.0.2.100\n    pool_end: 192.0.2.150\n"
                 "    netmask: 255.255.255.0\n    router: 192.0.2.1\n")
    else:
        text += f'dhcp:\n  mode: "{dhcp}"\n'
    path.write_text(text)
    cfg = ("--config", str(path))
    for args in (("profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img"),
                 ("machines", "add", MAC_A, "--profile", "p"),
                 ("machines", "add", MAC_B, "--profile", "p"),
                 ("machines", "add", MAC_HELD)):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    return cfg


def names_in_certificate(tmp_path: Path) -> set[str]:
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate((tmp_path / "data" / "tls" / "server.pem")
                                          .read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.IPAddress)}


def test_the_certificate_names_every_named_interfaces_addresses_as_they_change(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """With interfaces named, the certificate named the advertised address (va's) only: a
    device on vb's network reaching 198.51.100.10 failed TLS (curl exit 60). Now it names
    each named interface's addresses, followed: 198.51.100.20 added to vb is named within a
    second; vb readdressed (.10 removed, which takes its secondary .20 with it, then .30
    added), the certificate is re-issued naming .30, and .10 and .20, gone from the host,
    are left out of it (nginx or matchbox serve the operator's files, which name
    what the operator wrote; dnsmasq has no HTTPS)."""
    cfg = config(tmp_path)
    ca = str(tmp_path / "data" / "tls" / "ca.pem")
    with serving(cfg, subnets, tmp_path):
        on_b = curl(subnets["b"], "https://198.51.100.10:8443/healthz", "--cacert", ca)[0]
        on_a = curl(subnets["a"], "https://192.0.2.10:8443/healthz", "--cacert", ca)[0]
        ip("-n", subnets["srv"], "addr", "add", "198.51.100.20/24", "dev", "vb")
        came = until(lambda: curl(subnets["b"], "https://198.51.100.20:8443/healthz",
                                  "--cacert", ca)[0] == 200, 10)
        ip("-n", subnets["srv"], "addr", "del", "198.51.100.10/24", "dev", "vb")
        ip("-n", subnets["srv"], "addr", "add", "198.51.100.30/24", "dev", "vb")
        again = until(lambda: curl(subnets["b"], "https://198.51.100.30:8443/healthz",
                                   "--cacert", ca)[0] == 200, 10)
        named = names_in_certificate(tmp_path)
    log = (tmp_path / "serve.log").read_text()
    assert (on_a, on_b) == (200, 200), log
    assert came is not None and again is not None, log
    assert {"192.0.2.10", "198.51.100.30"} <= named, named
    assert not {"198.51.100.10", "198.51.100.20"} & named, named
    assert "Traceback" not in log, log


def test_a_fixed_address_of_the_server_or_its_router_is_refused_by_the_api(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """Authoritative DHCP with two named interfaces: a machine's fixed_ipv4 set to vb's
    address, the advertised one or the router's was stored, and the machine was offered
    the server's own address (dnsmasq refuses such a ``dhcp-host``). Now PATCH, POST and
    the bulk import answer 400 naming ``fixed_ipv4``; an address of the machine's own is
    taken."""
    cfg = config(tmp_path, dhcp="authoritative")
    ca = str(tmp_path / "data" / "tls" / "ca.pem")
    with serving(cfg, subnets, tmp_path):
        admin = (tmp_path / "data" / "admin.token").read_text().strip()

        def call(method: str, path: str, body: object) -> tuple[int, dict[str, object]]:
            status, out = curl(subnets["a"], f"https://192.0.2.10:8443/api/v1/{path}",
                               "--cacert", ca, "-X", method, "-H",
                               f"Authorization: Bearer {admin}", "-H",
                               "Content-Type: application/json", "-d", json.dumps(body))
            return status, json.loads(out or b"{}")

        answers = {
            "patch vb": call("PATCH", f"machines/{MAC_A}", {"fixed_ipv4": "198.51.100.10"}),
            "patch advertised": call("PATCH", f"machines/{MAC_A}",
                                     {"fixed_ipv4": "192.0.2.10"}),
            "post router": call("POST", "machines", {"mac": "52:54:00:39:00:01",
                                                     "fixed_ipv4": "192.0.2.1"}),
            "import vb": call("POST", "machines:bulk", {"machines": [
                {"mac": "52:54:00:39:00:02", "fixed_ipv4": "198.51.100.10"}]}),
            "patch own": call("PATCH", f"machines/{MAC_A}", {"fixed_ipv4": "192.0.2.70"}),
        }
    log = (tmp_path / "serve.log").read_text()
    for what in ("patch vb", "patch advertised", "post router"):
        status, body = answers[what]
        assert status == 400, (what, body, log)
        assert "fixed_ipv4" in json.dumps(body), (what, body)
        assert "an address of this netboot server" in json.dumps(body), (what, body)
    status, body = answers["import vb"]
    assert status == 400, (body, log)
    assert body["errors"] == [{"line": 1, "field": "fixed_ipv4", "message": (
        "198.51.100.10 is an address of this netboot server or its DHCP router: give the "
        "machine an address of its own")}], body
    assert answers["patch own"][0] == 200, answers["patch own"]
    assert "Traceback" not in log, log


def test_with_an_address_advertised_each_interfaces_address_has_a_ptr(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """``server.advertise: 192.0.2.10``, no interface named, DHCP off: HTTP and TFTP listen
    on 0.0.0.0, so devices reach the server at vb's 198.51.100.10 too, but only the
    advertised address had a PTR (the addresses were followed only with interfaces named,
    no default route, or DHCP on). Now each interface's address points back at the
    server's name, followed: one added later too, one removed no more."""
    cfg = config(tmp_path, named=False, dns=True)
    with serving(cfg, subnets, tmp_path):
        ptrs = {address: reverse(subnets["a"], "192.0.2.10", address)
                for address in ("192.0.2.10", "198.51.100.10")}
        ip("-n", subnets["srv"], "addr", "add", "198.51.100.20/24", "dev", "vb")
        came = until(lambda: reverse(subnets["a"], "192.0.2.10", "198.51.100.20")
                     == "netboot.netboot.lan.", 10)
        ip("-n", subnets["srv"], "addr", "del", "198.51.100.20/24", "dev", "vb")
        went = until(lambda: reverse(subnets["a"], "192.0.2.10", "198.51.100.20")
                     != "netboot.netboot.lan.", 10)
    log = (tmp_path / "serve.log").read_text()
    assert ptrs == {"192.0.2.10": "netboot.netboot.lan.",
                    "198.51.100.10": "netboot.netboot.lan."}, (ptrs, log)
    assert came is not None and went is not None, log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("default_route", [True, False])
def test_with_an_address_advertised_a_dhcp_answer_leaves_the_interface_asked_on(
        subnets: dict[str, str], tmp_path: Path, default_route: bool) -> None:
    """``server.advertise: 192.0.2.10``, no interface named, proxyDHCP: DHCP listened on one
    0.0.0.0 socket, and its broadcast offers went where the route to 255.255.255.255 goes:
    with a default route via va, a PXE device on vb's network got none; with no default
    route (an isolated provisioning network), no device got one. dnsmasq answers out of
    the interface the request came in on (IP_PKTINFO); now DHCP listens on each interface
    with an IPv4 address, each answering with the advertised address."""
    cfg = enrolled_config(tmp_path)
    path = Path(cfg[1])
    path.write_text(path.read_text().replace("server:\n", "server:\n  advertise: 192.0.2.10\n"))
    if default_route:
        ip("-n", subnets["srv"], "route", "add", "default", "via", "192.0.2.60")
    with serving(cfg, subnets, tmp_path):
        offers = {side: pxe_offer(subnets[side], mac)
                  for side, mac in (("a", MAC_A), ("b", MAC_B))}
    log = (tmp_path / "serve.log").read_text()
    got = {side: offer and (offer.siaddr, offer.file_name) for side, offer in offers.items()}
    assert got == {"a": ("192.0.2.10", "undionly.kpxe"),
                   "b": ("192.0.2.10", "undionly.kpxe")}, (got, log)
    assert "dhcp: proxy mode listening on 0.0.0.0:67 (vb), advertising 192.0.2.10" in log, log
    # Loopback still heard, as the 0.0.0.0 socket heard it (a relay on this host).
    assert "dhcp: proxy mode listening on 0.0.0.0:67 (lo), advertising 192.0.2.10" in log, log
    # The user did not choose every network: told at start, naming each and the fix
    # (s44-attack; dnsmasq answers a proxy range only on the interface holding it).
    told = [line for line in log.splitlines() if "answers on every interface" in line]
    assert len(told) == 1, log
    assert "DHCP (proxy)" in told[0] and "va (192.0.2.10)" in told[0], told
    assert "vb (198.51.100.10)" in told[0] and "netboot serve --interface " in told[0], told
    assert "HTTP listens on 0.0.0.0 (http.listen)" in told[0], told
    assert "Traceback" not in log, log


def test_with_interfaces_named_dns_answers_on_each_named_interface(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """``server.interfaces: [va, vb]``, DNS on: DNS listened on the advertised address (va's)
    only, so a device on vb's network (198.51.100.0/24, no route to va's) found no DNS
    there. Now each named interface's address is listened on, followed as it comes and
    goes, and the server's own name answers the address asked (as with no default route:
    dnsmasq's --localise-queries)."""
    cfg = config(tmp_path, dns=True)
    with serving(cfg, subnets, tmp_path):
        got = {side: resolve(subnets[side], address)
               for side, address in (("a", "192.0.2.10"), ("b", "198.51.100.10"))}
        ip("-n", subnets["srv"], "addr", "add", "198.51.100.20/24", "dev", "vb")
        came = until(lambda: resolve(subnets["b"], "198.51.100.20") == "198.51.100.20", 10)
    log = (tmp_path / "serve.log").read_text()
    assert got == {"a": "192.0.2.10", "b": "198.51.100.10"}, (got, log)
    assert came is not None, log
    assert "Traceback" not in log, log


def test_with_interfaces_named_each_device_is_answered_with_the_address_it_asked_at(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """``server.interfaces: [va, vb]``, no address given, proxyDHCP and TFTP on: a device on
    vb's network (198.51.100.0/24, no route to va's) got option 54 and next-server
    192.0.2.10 (va's, the advertised one), iPXE a boot file URL naming it, and scripts
    and TFTP configs whose URLs named it: its boot stopped at the first download. dnsmasq
    answers with the address of the interface a request came in on (next-server and
    option 54 default to it), pixiecore likewise. Now each device gets the address of its
    own side, in its offers, its scripts and configs, and fetches its loader, its script
    and every URL in it from there; a device on va keeps va's."""
    cfg = config(tmp_path, "proxy", tftp_on=True)
    # netboot render on that host: what a device on va gets, vb's address said on stderr
    # (it said nothing: a reader took va's URLs for every device's).
    rendered = subprocess.run(netboot("render", *cfg, MAC_B, "pxelinux", ns=subnets["srv"]),
                              env=env(), capture_output=True, timeout=60, text=True)
    assert rendered.returncode == 0, rendered.stderr
    assert "http://192.0.2.10:8080/config/" in rendered.stdout, rendered.stdout
    assert "rendered as a device on va gets it (192.0.2.10); on vb 198.51.100.10" \
        in rendered.stderr, rendered.stderr
    ca = str(tmp_path / "data" / "tls" / "ca.pem")
    got: dict[str, dict[str, object]] = {}
    with serving(cfg, subnets, tmp_path):
        for side, mac in (("a", MAC_A), ("b", MAC_B)):
            server_ip = SUBNETS[side][0]
            ns = subnets[side]
            seen = got[side] = {}
            offer = pxe_offer(ns, mac)
            seen["pxe"] = offer and (offer.siaddr, offer.option(Opt.SERVER_ID),
                                     offer.file_name)
            if offer is not None:  # the ROM's next step: its loader over TFTP from siaddr
                seen["loader"] = tftp(ns, f"tftp://{offer.siaddr}/{offer.file_name}")[0]
            chained = pxe_offer(ns, mac, dhcp.Option(Opt.USER_CLASS, b"iPXE"))
            seen["ipxe"] = chained and (chained.siaddr, chained.option(Opt.SERVER_ID),
                                        chained.file_name)
            if chained is None:
                continue
            status, body = curl(ns, chained.file_name)  # iPXE chains to the boot file's URL
            seen["boot.ipxe"] = status, set(re.findall(r"https?://([^/:\s]+)", body.decode()))
            status, body = curl(ns, f"http://{server_ip}:8080/ipxe?mac={mac}&arch=x86_64")
            script = body.decode()
            urls = re.findall(r"https?://[^\s\"']+", script)
            seen["script"] = status, {re.sub(r"^https?://([^/:]+).*", r"\1", u) for u in urls}
            # Every URL in it fetched from the device's side, as iPXE and k3OS would.
            seen["fetched"] = {curl(ns, url, "--cacert", ca)[0] for url in urls}
            # U-Boot's per-NIC pxelinux config over TFTP carries the config URL.
            status, body = tftp(ns, f"tftp://{server_ip}/pxelinux.cfg/01-"
                                        f"{mac.replace(':', '-')}")
            seen["pxelinux"] = status, set(re.findall(r"https?://([^/:\s]+)", body.decode()))
        # The API over plain HTTP from each side: refused, naming the HTTPS URL to use.
        refused = {side: curl(subnets[side], f"http://{SUBNETS[side][0]}:8080/api/v1/"
                              "machines") for side in SUBNETS}
        # One NIC's script asked on one side, then the other, then the first again (a
        # held machine's is kept per NIC, an install's too): each time naming the address
        # asked, never the other's (an install's on another side than its token's is held).
        crossed = [(mac, side, curl(subnets[side], f"http://{SUBNETS[side][0]}:8080/ipxe?"
                                    f"mac={mac}&arch=x86_64"))
                   for mac in (MAC_HELD, MAC_A) for side in ("b", "a", "b")]
    log = (tmp_path / "serve.log").read_text()
    for side, (status, body) in refused.items():
        assert status == 403 and f"use https://{SUBNETS[side][0]}:8443/api/v1/machines" \
            in body.decode(), (side, status, body)
    for mac, side, (status, body) in crossed:
        hosts = set(re.findall(r"https?://([^/:\s]+)", body.decode()))
        assert status == 200 and hosts == {SUBNETS[side][0]}, (mac, side, body)
    for side, seen in got.items():
        server_ip = SUBNETS[side][0]
        packed = socket.inet_aton(server_ip)
        assert seen == {
            "pxe": (server_ip, packed, "undionly.kpxe"), "loader": 0,
            "ipxe": (server_ip, packed, f"http://{server_ip}:8080/boot.ipxe"),
            "boot.ipxe": (200, {server_ip}), "script": (200, {server_ip}),
            "fetched": {200}, "pxelinux": (0, {server_ip})}, (side, seen, log)
    assert "dhcp: proxy mode listening on 0.0.0.0:67 (vb), advertising 198.51.100.10" in log, log
    # The start-up summary names each address a device may reach, not va's only.
    summary = log[log.index("netboot serving on"):]
    assert summary.startswith("netboot serving on 192.0.2.10, 198.51.100.10 (no address "
                              "advertised: each device gets the one it reaches)\n"), log
    assert "  HTTP   http://192.0.2.10:8080/, http://198.51.100.10:8080/  (iPXE chain URL: " \
        "http://192.0.2.10:8080/boot.ipxe, http://198.51.100.10:8080/boot.ipxe)\n" in summary, log
    assert "Traceback" not in log, log


MAC_LOOP = "52:54:00:43:00:0a"


def test_a_loopback_advertised_server_answers_no_dhcp_or_tftp_on_the_lan(
        tmp_path: Path) -> None:
    """``netboot serve --advertise 127.0.0.1`` without ``--interface``: a trial on this host
    only (s43-attack; found by s42-attack). Before, DHCP listened on every interface with an
    IPv4 address and TFTP on 0.0.0.0: a PXE ROM on the LAN got a proxyDHCP offer naming
    127.0.0.1 as its boot server (itself: beside the LAN's own PXE server, its boot taken
    and broken), and TFTP served the LAN the boot files. dnsmasq's
    ``dhcp-range=127.0.0.1,proxy`` answers on no interface but the one holding that
    network. Now DHCP listens on ``lo`` and TFTP on 127.0.0.1; this host is served."""
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    config = tmp_path / "netboot.yaml"
    config.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\n  advertise: 127.0.0.1\n"
                      f"assets:\n  dirs: [{assets}]\n")
    cfg = ("--config", str(config))
    # An enrolled machine with a profile: an unknown one gets no proxy offer anyway.
    for args in (("profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img"),
                 ("machines", "add", MAC_LOOP, "--profile", "p")):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    for subnets in namespaces("s43atk", ("a",)):
        with serving(cfg, subnets, tmp_path):
            lan_offer = pxe_offer(subnets["a"], MAC_LOOP, tries=2)
            lan_tftp = tftp(subnets["a"], f"tftp://{SUBNETS['a'][0]}/undionly.kpxe")
            own_tftp = tftp(subnets["srv"], "tftp://127.0.0.1/undionly.kpxe")
    assert lan_offer is None, lan_offer
    assert lan_tftp[0] != 0 and not lan_tftp[1], lan_tftp
    assert own_tftp == (0, b"UNDI" * 100), own_tftp
    served = (tmp_path / "serve.log").read_text()
    assert "tftp listening on 127.0.0.1:69" in served, served
    assert "proxy mode listening on 0.0.0.0:67 (lo), advertising 127.0.0.1" in served, served
    assert "(va)" not in served, served
    assert "answers on every interface" not in served, served
    # The start-up summary says so.
    assert "  TFTP   udp/69 on lo only (a loopback address advertised)\n" in served, served
    assert "  DHCP   proxy on udp/67 + udp/4011 on lo only (a loopback address advertised)\n" \
        in served, served


def test_a_pool_address_a_host_answers_for_is_skipped_and_stands_in_status(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """``netboot serve``, authoritative, dhcp.ping_check left at its default (on): a host on
    va's link holds 192.0.2.100, the pool's first address, by hand. A PXE ROM's DISCOVER is
    offered 192.0.2.101 (192.0.2.100 answered the server's ping), and GET /status names the
    address in use while it is kept from clients (kind address-in-use), with the log's line.
    On main the DISCOVER was offered 192.0.2.100. The wait is the configuration's
    (dhcp.ping_timeout_ms: 400, an unknown key on main). ``netboot status`` (the CLI, from the
    inventory: the server recorded it there) names it too, with the same line; before
    session 49 it did not (the notice was the serving server's memory only)."""
    cfg = config(tmp_path, dhcp="authoritative")
    path = Path(cfg[1])  # the wait set (dhcp.ping_timeout_ms), which the log names
    path.write_text(path.read_text().replace("  mode: authoritative\n",
                                             "  mode: authoritative\n  ping_timeout_ms: 400\n"))
    ca = str(tmp_path / "data" / "tls" / "ca.pem")
    ip("-n", subnets["a"], "addr", "add", "192.0.2.100/24", "dev", "eth0")
    with serving(cfg, subnets, tmp_path):
        offer = pxe_offer(subnets["a"], MAC_A)
        admin = (tmp_path / "data" / "admin.token").read_text().strip()
        status, body = curl(subnets["a"], "https://192.0.2.10:8443/api/v1/status",
                            "--cacert", ca, "-H", f"Authorization: Bearer {admin}")
    log = (tmp_path / "serve.log").read_text()
    assert offer is not None and offer.yiaddr == "192.0.2.101", log
    assert status == 200, body
    notices = [w for w in json.loads(body)["warnings"] if w["kind"] == "address-in-use"]
    assert [n["refs"] for n in notices] == [["192.0.2.100"]], body
    assert "192.0.2.100 answered a ping on va: in use by a host" in notices[0]["message"]
    assert "ping check on va: raw ICMP socket, answers waited for 400 ms" in log, log
    assert "Traceback" not in log, log
    # The server stopped (its last record written as it closed): the CLI reads the
    # inventory, the address still kept from clients for its 600 s.
    done = subprocess.run(netboot("status", *cfg, "--json"), env=env(), capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    told = [w for w in json.loads(done.stdout)["warnings"] if w["kind"] == "address-in-use"]
    assert [(n["refs"], n["message"]) for n in told] == [
        (n["refs"], n["message"]) for n in notices], done.stdout
    shown = subprocess.run(netboot("status", *cfg), env=env(), capture_output=True,
                           timeout=60).stdout.decode()
    assert "warning (address-in-use): dhcp: 192.0.2.100 answered a ping on va" in shown, shown
