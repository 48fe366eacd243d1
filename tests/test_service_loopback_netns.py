"""``netboot serve --advertise 127.0.0.1`` without ``--interface``: a trial on this host only
(s43-attack; found by s42-attack).

The server runs in a namespace of its own with one interface on 192.0.2.0/24 (a veth to a
client's namespace, the LAN). Before, DHCP listened on every interface with an IPv4 address
and TFTP on 0.0.0.0: a PXE ROM on the LAN got a proxyDHCP offer naming 127.0.0.1 as its boot
server (itself: beside the LAN's own PXE server, its boot taken and broken), and TFTP served
the LAN the boot files. dnsmasq's ``dhcp-range=127.0.0.1,proxy`` answers on no interface but
the one holding that network, and its ``listen-address`` keeps TFTP there. Now DHCP listens
on ``lo`` and TFTP on 127.0.0.1; this host is served as before.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import INITRD, KERNEL
from tests.test_service_reached_netns import (
    SUBNETS,
    env,
    namespaces,
    netboot,
    pxe_offer,
    serving,
    tftp,
)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl")]

MAC = "52:54:00:43:00:0a"


def test_a_loopback_advertised_server_answers_no_dhcp_or_tftp_on_the_lan(
        tmp_path: Path) -> None:
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
                 ("machines", "add", MAC, "--profile", "p")):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    for subnets in namespaces("s43atk", ("a",)):
        with serving(cfg, subnets, tmp_path):
            lan_offer = pxe_offer(subnets["a"], MAC, tries=2)
            lan_tftp = tftp(subnets["a"], f"tftp://{SUBNETS['a'][0]}/undionly.kpxe")
            own_tftp = tftp(subnets["srv"], "tftp://127.0.0.1/undionly.kpxe")
    assert lan_offer is None, lan_offer
    assert lan_tftp[0] != 0 and not lan_tftp[1], lan_tftp
    assert own_tftp == (0, b"UNDI" * 100), own_tftp
    served = (tmp_path / "serve.log").read_text()
    assert "tftp listening on 127.0.0.1:69" in served, served
    assert "proxy mode listening on 0.0.0.0:67 (lo), advertising 127.0.0.1" in served, served
    assert "(va)" not in served, served
    # The start-up summary says so.
    assert "  TFTP   udp/69 on lo only (a loopback address advertised)\n" in served, served
    assert "  DHCP   proxy on udp/67 + udp/4011 on lo only (a loopback address advertised)\n" \
        in served, served
