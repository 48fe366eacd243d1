"""A host without a default route: DNS's own name, ``netboot render``, and interfaces that
come up after ``netboot serve`` started (s37-net).

The same namespaces as tests/test_service_reached_netns.py: ``netboot serve`` in one of its
own with an interface on 192.0.2.0/24 and one on 198.51.100.0/24 (veth pairs to a client
namespace each), no default route, nothing advertised: it advertises 127.0.0.1 and answers
each device with the address its request came in on.
"""

# No wall-clock threshold on how soon an address is followed: netboot has no rescan (the
# rtnetlink watcher alone adds and drops listeners), so an address not followed is never
# served and `until`'s bound decides; a "< 3 s" read the machine's load (3.009 s at load
# ~20, a clean-clone CI of main in session 45), not the code.

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import INITRD, KERNEL
from tests.netns import udp_sockets, until
from tests.test_service_reached_netns import (
    MAC_A,
    MAC_B,
    SUBNETS,
    connect,
    curl,
    env,
    ip,
    namespaces,
    netboot,
    pxe_offer,
    serving,
)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl"), pytest.mark.requires("ss", "iproute2")]


@pytest.fixture
def subnets() -> Iterator[dict[str, str]]:
    yield from namespaces("s37net", ("a", "b"))


@pytest.fixture
def one_subnet() -> Iterator[dict[str, str]]:
    """Side a connected; side b's namespace is there, its link made by the test."""
    yield from namespaces("s37net", ("a",))


# A stub resolver's query (dig sends again every few seconds, glibc's resolver waits 5 s,
# twice): sent again each second from one socket, the first answer taken, for 10 s at most.
# A single send given 1 s (2 s forwarded or over IPv6) took a loaded machine's later
# answer for none (s49-flake). Either family; each address may carry a %scope. Prints the
# answers' data, sorted; the rcode's name when none, or the error's.
ASK = ("import socket, sys, dns.message, dns.rcode\n"
       "server, source, name, qtype = sys.argv[1:5]\n"
       "family, _, _, _, dst = socket.getaddrinfo(server, 53, type=socket.SOCK_DGRAM)[0]\n"
       "s = socket.socket(family, socket.SOCK_DGRAM)\n"
       "s.settimeout(1)\n"
       "if source:\n"
       "    s.bind(socket.getaddrinfo(source, 0, family, socket.SOCK_DGRAM)[0][4])\n"
       "q = dns.message.make_query(name, qtype)\n"
       "try:\n"
       "    for sent in range(10):\n"
       "        s.sendto(q.to_wire(), dst)\n"
       "        try:\n"
       "            r = dns.message.from_wire(s.recv(65535))\n"
       "            break\n"
       "        except TimeoutError:\n"
       "            if sent == 9:\n"
       "                raise\n"
       "    found = sorted(i.to_text() for x in r.answer for i in x)\n"
       "    print(' '.join(found) or dns.rcode.to_text(r.rcode()))\n"
       "except Exception as exc:\n"
       "    print(type(exc).__name__)\n")


def ask(ns: str, server: str, name: str, qtype: str, source: str = "") -> str:
    """The answers' data (addresses, names) to ``name`` ``qtype`` asked from ``ns`` (from
    ``source``, an address of it, if given) of ``server``:53, sorted; the rcode's name when
    none, or the error's."""
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", ASK, server,
                           source, name, qtype], capture_output=True, timeout=60, text=True,
                          env=env())
    return done.stdout.strip() or done.stderr.strip()


def resolve(ns: str, server: str, name: str = "netboot.netboot.lan") -> str:
    """The A records of ``name`` asked from ``ns`` of ``server``:53."""
    return ask(ns, server, name, "A")


def reverse(ns: str, server: str, address: str) -> str:
    """The PTR names of ``address`` asked from ``ns`` of ``server``:53."""
    return ask(ns, server, ipaddress.ip_address(address).reverse_pointer, "PTR")


def config(tmp_path: Path, dhcp: bool = True, *, interfaces: tuple[str, ...] = (),
           tftp: bool = False, https: bool = False) -> tuple[str, ...]:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "vmlinuz").write_bytes(KERNEL)
    (assets / "initrd.img").write_bytes(INITRD)
    (assets / "undionly.kpxe").write_bytes(b"UNDI" * 100)
    path = tmp_path / "netboot.yaml"
    # No server.advertise, no interfaces: a newcomer's first run; DNS on.
    path.write_text(f"server:\n  data_dir: {tmp_path / 'data'}\n"
                    + (f"  interfaces: [{', '.join(interfaces)}]\n" if interfaces else "")
                    + f"tftp:\n  enabled: {str(tftp).lower()}\n"
                    f"https:\n  enabled: {str(https).lower()}\n"
                    f"dns:\n  enabled: true\n"
                    + ("" if dhcp else "dhcp:\n  mode: \"off\"\n")
                    + f"assets:\n  dirs: [{assets}]\n")
    cfg = ("--config", str(path))
    for args in (("clusters", "add", "edge", "--endpoint", "k3s.example"),
                 ("profiles", "add", "p", "--kernel", "vmlinuz", "--initrd", "initrd.img"),
                 ("machines", "add", MAC_A, "--profile", "p", "--cluster", "edge"),
                 # Known on b's network (its fixed address): render names b's interface.
                 ("machines", "add", MAC_B, "--profile", "p", "--cluster", "edge",
                  "--fixed-ipv4", "198.51.100.60")):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    return cfg


def test_the_servers_own_name_and_render_name_the_interface_a_device_reaches(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """DNS listened on each interface (s36-user) but the server's own name held 127.0.0.1
    there: a device resolving netboot.<zone> was told itself. Now each listener answers
    its own address (dnsmasq's --localise-queries), 127.0.0.1 still for this host.
    ``netboot render`` named the first interface's address for every machine: now, for a
    machine known at an address (198.51.100.60), the interface on that network's."""
    cfg = config(tmp_path, dhcp=False)
    rendered = subprocess.run(netboot("render", *cfg, MAC_B, "pxelinux", ns=subnets["srv"]),
                              env=env(), capture_output=True, timeout=60, text=True)
    assert rendered.returncode == 0, rendered.stderr
    assert "http://198.51.100.10:8080/config/" in rendered.stdout, rendered.stdout
    assert "192.0.2.10" not in rendered.stdout and "127.0.0.1" not in rendered.stdout
    assert "rendered as the device at 198.51.100.60 gets it, over vb (198.51.100.10)" \
        in rendered.stderr, rendered.stderr
    # A machine known nowhere: the first interface's, as before, the others named.
    first = subprocess.run(netboot("render", *cfg, MAC_A, "pxelinux", ns=subnets["srv"]),
                           env=env(), capture_output=True, timeout=60, text=True)
    assert "http://192.0.2.10:8080/config/" in first.stdout, first.stdout
    assert "rendered as a device on va gets it (192.0.2.10); on vb 198.51.100.10" \
        in first.stderr, first.stderr
    with serving(cfg, subnets, tmp_path):
        got = {side: resolve(subnets[side], SUBNETS[side][0]) for side in SUBNETS}
        got["srv"] = resolve(subnets["srv"], "127.0.0.1")
    assert got == {"a": "192.0.2.10", "b": "198.51.100.10", "srv": "127.0.0.1"}, got


def test_an_interface_that_comes_up_after_start_gets_dhcp_and_dns(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """``netboot serve`` started with one interface (va); vb comes up later. DHCP and DNS
    were never served on it (a restart was needed) and, the address gone, their sockets
    stayed. Now within about a second of its address a PXE DISCOVER over it gets an OFFER
    naming 198.51.100.10 and DNS there answers the server's name with that address; the
    address removed, both let go of it."""
    subnets = one_subnet
    cfg = config(tmp_path)
    with serving(cfg, subnets, tmp_path):
        connect(subnets, "b")
        came = until(lambda: resolve(subnets["b"], "198.51.100.10") == "198.51.100.10", 10)
        offer = pxe_offer(subnets["b"], MAC_B)
        ip("-n", subnets["srv"], "addr", "del", "198.51.100.10/24", "dev", "vb")
        went = until(lambda: udp_sockets(subnets["srv"], "198.51.100.10:53") == 0
                      and udp_sockets(subnets["srv"], "%vb:67") == 0, 5)
        # Side a served throughout.
        still = resolve(subnets["a"], "192.0.2.10")
    log = (tmp_path / "serve.log").read_text()
    assert came is not None, (came, log)
    assert offer is not None and offer.siaddr == "198.51.100.10", (offer, log)
    assert went is not None, (went, log)
    assert still == "192.0.2.10"
    assert "dhcp: proxy mode listening on 0.0.0.0:67 (vb), advertising 198.51.100.10" in log
    assert "dns: listening on 198.51.100.10:53" in log, log
    assert "dhcp: stopped listening on vb (its address went away)" in log, log
    assert "dns: stopped listening on 198.51.100.10 (the address went away)" in log, log
    assert "Traceback" not in log, log


def test_each_interfaces_address_has_a_ptr_to_the_server_following_it(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """Each DNS listener answered the server's name with its interface's address (s37-net),
    but the reverse was unknown: a PTR query for 192.0.2.10 got NXDOMAIN (the reverse zones
    held 127.0.0.1's alone). Now each interface's address has a PTR to netboot.<zone>, as
    dnsmasq's --interface-name answers both ways, following the addresses: one that comes
    up after start gets its PTR within about a second, one removed loses it."""
    subnets = one_subnet
    cfg = config(tmp_path, dhcp=False)
    server = "netboot.netboot.lan."
    with serving(cfg, subnets, tmp_path):
        at_start = reverse(subnets["a"], "192.0.2.10", "192.0.2.10")
        connect(subnets, "b")
        came = until(lambda: reverse(subnets["a"], "192.0.2.10", "198.51.100.10") == server,
                     10)
        over_b = reverse(subnets["b"], "198.51.100.10", "198.51.100.10")
        ip("-n", subnets["srv"], "addr", "del", "198.51.100.10/24", "dev", "vb")
        went = until(lambda: reverse(subnets["a"], "192.0.2.10", "198.51.100.10")
                     == "NXDOMAIN", 10)
    log = (tmp_path / "serve.log").read_text()
    assert at_start == server, (at_start, log)
    assert came is not None, (came, log)
    assert over_b == server, over_b
    assert went is not None, (went, log)
    assert "Traceback" not in log, log


def tftp_get(ns: str, server: str, name: str) -> bytes:
    """``name`` fetched over TFTP from ``ns`` (curl; empty when it failed)."""
    done = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-m", "5", "-o", "-",
                           f"tftp://{server}/{name}"], capture_output=True, timeout=20)
    return done.stdout if done.returncode == 0 else b""


def test_tftp_on_named_interfaces_follows_one_that_comes_up_after_start(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """``server.interfaces: [va, vb]``, vb made after ``netboot serve`` started (a VLAN, a
    USB NIC). TFTP bound each named interface once at start: vb, not there yet, failed the
    start (SO_BINDTODEVICE: no such device) and one made again later was never heard (its
    socket held the old device's index). Now, as DHCP and DNS since S37 (dnsmasq's
    --bind-dynamic), TFTP listens on a named interface while it has an IPv4 address: vb's
    RRQ is answered within about a second of its address; the interface deleted, its
    sockets go; made again, it is served again. The start line named vb as listened on
    (s39-net): it names va only."""
    subnets = one_subnet
    cfg = config(tmp_path, interfaces=("va", "vb"), tftp=True)
    want = b"UNDI" * 100
    with serving(cfg, subnets, tmp_path):
        at_a = tftp_get(subnets["a"], "192.0.2.10", "undionly.kpxe")
        connect(subnets, "b")
        came = until(lambda: udp_sockets(subnets["srv"], "%vb:69") == 1, 10)
        at_b = tftp_get(subnets["b"], "198.51.100.10", "undionly.kpxe")
        ip("-n", subnets["srv"], "link", "del", "vb")
        went = until(lambda: udp_sockets(subnets["srv"], "%vb:") == 0, 10)
        connect(subnets, "b")  # the same name, a new device
        again = until(lambda: tftp_get(subnets["b"], "198.51.100.10", "undionly.kpxe")
                      == want, 10)
    log = (tmp_path / "serve.log").read_text()
    assert at_a == want, log
    assert came is not None, (came, log)
    assert at_b == want, log
    assert went is not None, (went, log)
    assert again is not None, (again, log)
    assert "tftp: interface vb has no IPv4 address (yet): served once it has one" in log, log
    # The start line names what is listened on: va, not vb (not up yet).
    assert "tftp listening on 0.0.0.0:69 on va (max blksize" in log, log
    assert "tftp listening on 0.0.0.0:69 on vb" in log, log
    assert "tftp: stopped listening on vb (its address went away)" in log, log
    assert "Traceback" not in log, log


# One TLS connection kept open: a request, its certificate's addresses, then (a line on
# stdin) a second request on the same connection.
KEPT_TLS = r"""import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
sock = ctx.wrap_socket(socket.create_connection((sys.argv[1], 8443), timeout=10),
                       server_hostname=sys.argv[1])
def get():
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    return head.split(b" ")[1].decode()
names = sorted(v for k, v in sock.getpeercert()["subjectAltName"] if k == "IP Address")
print(get(), ",".join(names), flush=True)
sys.stdin.readline()
print(get(), flush=True)
"""


def test_the_https_certificate_names_an_interface_that_comes_up_after_start(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """No default route, netboot's own CA: the certificate names each interface's address
    (s36-user), but only those found at start; vb, up later, was served over DHCP, DNS and
    plain HTTP, and its HTTPS clients refused the certificate (curl: no alternative subject
    name matches, exit 60) until a restart. Now the certificate is re-issued by netboot's
    CA within about a second of the address and loaded for new connections; a connection
    open already goes on with the certificate it was given."""
    subnets = one_subnet
    cfg = config(tmp_path, dhcp=False, https=True)
    ca = str(tmp_path / "data" / "tls" / "ca.pem")
    with serving(cfg, subnets, tmp_path):
        kept = subprocess.Popen(["ip", "netns", "exec", subnets["a"], sys.executable, "-c",
                                 KEPT_TLS, "192.0.2.10", ca], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert kept.stdout is not None and kept.stdin is not None
            first = kept.stdout.readline().split()
            connect(subnets, "b")
            came = until(lambda: curl(subnets["b"], "https://198.51.100.10:8443/healthz",
                                      "--cacert", ca)[0] == 200, 10)
            kept.stdin.write("\n")
            kept.stdin.flush()
            second = kept.stdout.readline().split()
            kept.wait(20)
        finally:
            if kept.poll() is None:
                kept.kill()  # this test's own client, by its handle
                kept.wait(10)
        side_a = curl(subnets["a"], "https://192.0.2.10:8443/healthz", "--cacert", ca)[0]
    log = (tmp_path / "serve.log").read_text()
    assert first == ["200", "0:0:0:0:0:0:0:1,127.0.0.1,192.0.2.10"], first
    assert came is not None, (came, log)
    assert second == ["200"], (second, log)
    assert side_a == 200
    assert "https: the certificate now names 192.0.2.10, 198.51.100.10; new connections " \
        "get it" in log, log
    assert "Traceback" not in log, log


def ask_from(ns: str, source: str, name: str) -> str:
    """The A records of ``name`` asked of 192.0.2.10:53 from ``source`` in ``ns``."""
    return ask(ns, "192.0.2.10", name, "A", source)


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
def test_names_outside_the_zone_are_forwarded_for_this_hosts_networks_only(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """s45-attack: with ``dns.upstreams``, netboot forwarded every name outside its zone for
    whoever reached the address it listens on: a host routed to it from another network
    had an open resolver (BIND's allow-recursion default is "localnets; localhost",
    unbound's localhost). Now forwarded for clients on a network of the server's
    interfaces (192.0.2.0/24 here), loopback, dhcp.relay_networks, the authoritative pool
    and ``dns.forward_networks``; another source (198.51.100.60, routed through the client
    on va) gets REFUSED for those, the zone's names still. The upstream is a real dnsmasq
    in the server's namespace."""
    subnets = one_subnet
    ip("-n", subnets["a"], "addr", "add", "198.51.100.60/32", "dev", "eth0")
    ip("-n", subnets["srv"], "route", "add", "198.51.100.0/24", "via", "192.0.2.60")
    upstream = subprocess.Popen(
        ["ip", "netns", "exec", subnets["srv"], "dnsmasq", "--keep-in-foreground",
         "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=", "--port=5353",
         "--listen-address=127.0.0.1", "--bind-interfaces",
         "--address=/example.org/192.0.2.77"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = config(tmp_path, dhcp=False)
    path = Path(cfg[1])
    text = path.read_text().replace("dns:\n  enabled: true\n",
                                    'dns:\n  enabled: true\n  upstreams: ["127.0.0.1#5353"]\n')
    got: dict[str, dict[str, str]] = {}
    try:
        for case, extra in (("default", ""),
                            ("listed", "  forward_networks: [198.51.100.0/24]\n")):
            path.write_text(text.replace("  upstreams:", extra + "  upstreams:"))
            with serving(cfg, subnets, tmp_path):
                got[case] = {f"{source} {name}": ask_from(subnets["a"], source, name)
                             for source in ("192.0.2.60", "198.51.100.60")
                             for name in ("www.example.org", "netboot.netboot.lan")}
            log = (tmp_path / "serve.log").read_text()
            assert "Traceback" not in log, log
            if case == "default":
                assert got[case] == {"192.0.2.60 www.example.org": "192.0.2.77",
                                     "192.0.2.60 netboot.netboot.lan": "192.0.2.10",
                                     "198.51.100.60 www.example.org": "REFUSED",
                                     "198.51.100.60 netboot.netboot.lan": "192.0.2.10"}, got
                assert "dns: 198.51.100.60 is on none of the networks whose names outside " \
                    "the zone are forwarded" in log, log
    finally:
        upstream.terminate()  # this test's own dnsmasq, by its handle
        upstream.wait(10)
    assert got["listed"]["198.51.100.60 www.example.org"] == "192.0.2.77", got
