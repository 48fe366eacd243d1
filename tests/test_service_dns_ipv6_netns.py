"""IPv6 DNS clients on the server's own links are forwarded for, as IPv4 ones are (s46-dns).

``netboot serve`` in a network namespace of its own (``dns.listen: "::"``, a real dnsmasq
upstream beside it on 127.0.0.1#5353), a client namespace on a veth pair the test makes with
2001:db8:a::/64 on both ends (RFC 3849's documentation prefix), explicit link-local
addresses, and one more address on the client, 2001:db8:ff::60, routed to the server through
the client: a host on no network of the server's. s45-attack made the forwarder refuse names
outside the zone to a host on none of the server's networks; it left IPv6 clients refused
but for loopback and ``dns.forward_networks``: a host on the server's own IPv6 prefix, or a
link-local one, got REFUSED where an IPv4 client on the same link was served.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_service_follow_netns import ask, config
from tests.test_service_reached_netns import ip, namespaces, serving

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl"), pytest.mark.requires("dnsmasq", "dnsmasq-base")]

@pytest.fixture
def one_subnet() -> Iterator[dict[str, str]]:
    yield from namespaces("s46dns", ("a",))


def ask_from(ns: str, server: str, source: str, name: str) -> str:
    """The A records of ``name`` asked of ``server``:53 from ``source`` in ``ns``."""
    return ask(ns, server, name, "A", source)


def test_ipv6_clients_on_the_servers_links_are_forwarded_for(
        one_subnet: dict[str, str], tmp_path: Path) -> None:
    """On main: 2001:db8:a::60 (on the server's own /64) and fe80::60 (link-local, on the
    link the query came in on) were REFUSED www.example.org; now forwarded (dnsmasq's
    192.0.2.77), as 192.0.2.60 is. 2001:db8:ff::60, routed from elsewhere, still REFUSED;
    the zone's names answer each."""
    subnets = one_subnet
    srv, cli = subnets["srv"], subnets["a"]
    for ns, dev, addr in ((srv, "va", "2001:db8:a::10/64"), (srv, "va", "fe80::10/64"),
                          (cli, "eth0", "2001:db8:a::60/64"), (cli, "eth0", "fe80::60/64"),
                          (cli, "eth0", "2001:db8:ff::60/128")):
        ip("-n", ns, "addr", "add", addr, "dev", dev, "nodad")
    ip("-n", srv, "-6", "route", "add", "2001:db8:ff::/64", "via", "2001:db8:a::60")
    upstream = subprocess.Popen(
        ["ip", "netns", "exec", srv, "dnsmasq", "--keep-in-foreground",
         "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=",
         "--port=5353", "--listen-address=127.0.0.1", "--bind-interfaces",
         "--address=/example.org/192.0.2.77"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = config(tmp_path, dhcp=False)
    path = Path(cfg[1])
    path.write_text(path.read_text().replace(
        "dns:\n  enabled: true\n",
        'dns:\n  enabled: true\n  listen: "::"\n  upstreams: ["127.0.0.1#5353"]\n'))
    try:
        with serving(cfg, subnets, tmp_path):
            got = {f"{source} {name}": ask_from(cli, server, source, name)
                   for server, source in (("2001:db8:a::10", "2001:db8:a::60"),
                                          ("fe80::10%eth0", "fe80::60%eth0"),
                                          ("2001:db8:a::10", "2001:db8:ff::60"),
                                          ("::ffff:192.0.2.10", "::ffff:192.0.2.60"))
                   for name in ("www.example.org", "netboot.netboot.lan")}
    finally:
        upstream.terminate()  # this test's own dnsmasq, by its handle
        upstream.wait(10)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log, log
    forwarded = {key: value for key, value in got.items() if "example.org" in key}
    assert forwarded == {
        "2001:db8:a::60 www.example.org": "192.0.2.77",
        "fe80::60%eth0 www.example.org": "192.0.2.77",
        "2001:db8:ff::60 www.example.org": "REFUSED",
        "::ffff:192.0.2.60 www.example.org": "192.0.2.77",
    }, (got, log)
    # The zone's names answer everyone (the server's name: its advertised address).
    zone = {value for key, value in got.items() if "netboot.lan" in key}
    assert len(zone) == 1 and ipaddress.ip_address(zone.pop()), (got, log)
    assert "dns: 2001:db8:ff::60 is on none of the networks" in log, log
