"""What a host on the provisioning VLAN gets by sending the SMBIOS UUID of a machine enrolled
by that UUID alone, before the machine's first boot (a vendor's manifest lists it): the whole
chain with real clients, ``netboot serve`` (authoritative DHCP, HTTP, SQLite) in a network
namespace of its own (tests/test_service_reached_netns.py's), the host in another: busybox
udhcpc from a made-up MAC with the UUID in option 97 (as a PXE ROM sends it), the address it
was leased taken, then boot.ipxe's query (``/ipxe?mac=…&uuid=…``) by curl from that address.

Only the namespaces the fixture creates are touched; addresses are from 192.0.2.0/24; the
server is ended by its own handle (``serving``).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.test_dhcp_netns import UDHCPC
from tests.test_service_interfaces_netns import config as site_config
from tests.test_service_reached_netns import curl, env, ip, namespaces, netboot, serving

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl"), pytest.mark.requires("busybox",
                                                                          "busybox-static")]

MACHINE_UUID = uuid.UUID("11111111-2222-3333-4444-555555555550")
STRANGER = "02:46:00:00:50:99"  # made up (locally administered)
FIXED = "192.0.2.50"


@pytest.fixture
def subnets() -> Iterator[dict[str, str]]:
    yield from namespaces("s50att", ("a", "b"))


def _config(tmp_path: Path) -> tuple[str, ...]:
    """tests/test_service_interfaces_netns.py's authoritative site (va and vb named, pool
    192.0.2.100-150, profile p), with a cluster whose join token is known, and a machine
    enrolled by its UUID alone with a fixed address, not booted yet."""
    cfg = site_config(tmp_path, dhcp="authoritative")
    for args in (("clusters", "add", "edge", "--server-url", "https://192.0.2.5:6443",
                  "--token", "k3s-join-secret-of-edge"),
                 ("machines", "add", "--uuid", str(MACHINE_UUID), "--hostname", "floor-5",
                  "--cluster", "edge", "--profile", "p", "--fixed-ipv4", FIXED)):
        subprocess.run(netboot(*args[:2], *cfg, *args[2:]), check=True, env=env(),
                       capture_output=True, timeout=60)
    return cfg


def _lease(ns: str) -> str:
    """One run of udhcpc on ``ns``'s eth0, its DISCOVER dressed as an EFI PXE ROM's with
    the machine's UUID (option 97); the address it was leased."""
    assert UDHCPC is not None
    cmd = [UDHCPC] if UDHCPC.endswith("udhcpc") else [UDHCPC, "udhcpc"]
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd, "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-T",
         "2", "-s", "/bin/true", "-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007",
         "-x", "0x61:00" + MACHINE_UUID.bytes_le.hex()], capture_output=True, timeout=60)
    said = (done.stdout + done.stderr).decode(errors="replace")
    found = re.search(r"lease of (\S+) obtained", said)
    assert found is not None, said
    return found.group(1)


def _ipxe_from(ns: str, address: str) -> str:
    """boot.ipxe's query for the made-up MAC with the machine's UUID, sent from
    ``address`` (taken on eth0, as iPXE configures the leased address)."""
    ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
    try:
        status, body = curl(ns, f"http://192.0.2.10:8080/ipxe?mac={STRANGER.replace(':', '-')}"
                                f"&uuid={MACHINE_UUID}&arch=x86_64", "--interface", address)
    finally:
        ip("-n", ns, "addr", "del", f"{address}/24", "dev", "eth0")
    assert status == 200, body
    return body.decode()


def test_a_host_sending_a_uuid_only_machines_uuid_gets_neither_its_address_nor_install(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """Before session 50 the host's first udhcpc run was leased the machine's fixed address
    (its MAC attached as the machine's first NIC, trusted), and its ``/ipxe`` from there was
    the install script, whose token fetched the config with the cluster's join token. Now it
    is leased pool addresses, its ``/ipxe`` is held naming the command that lists the NIC
    (each round asking DHCP again: ``dhcp netX``), and no token exists. The operator's
    ``netboot machines set … --add-mac`` (the CLI on the inventory, the server running) then
    gives the NIC the fixed address and the install."""
    cfg = _config(tmp_path)
    ns = subnets["a"]
    ip("-n", ns, "link", "set", "eth0", "address", STRANGER)
    with serving(cfg, subnets, tmp_path):
        first, second = _lease(ns), _lease(ns)
        held = _ipxe_from(ns, second)
        shown = subprocess.run(netboot("machines", "show", "floor-5", "--json", *cfg),
                               env=env(), capture_output=True, timeout=60)
        listed = subprocess.run(netboot("machines", "set", "floor-5", "--add-mac", STRANGER,
                                        *cfg), env=env(), capture_output=True, timeout=60)
        after = _lease(ns)
        script = _ipxe_from(ns, after)
        token = re.search(r"\?token=([A-Za-z0-9_-]+)", script)
        config = curl(ns, f"http://192.0.2.10:8080/config/{STRANGER.replace(':', '-')}"
                          f"?token={token.group(1) if token else 'none'}",
                      "--interface", "192.0.2.60")
    log = (tmp_path / "serve.log").read_text()
    assert FIXED not in (first, second), (first, second, log)
    assert "token=" not in held and "is held" in held, held
    # Its rounds ask DHCP again, so that once listed it asks from the fixed address.
    assert "\ndhcp netX ||\n" in held, held
    machine = json.loads(shown.stdout)
    assert "--add-mac " + STRANGER in held and machine["id"] in held, held
    assert machine["macs"] == [STRANGER] and machine["state"] == "enrolled", machine
    assert machine["facts"]["unlisted_nics"] == STRANGER, machine
    assert listed.returncode == 0, listed.stderr
    # Listed: the machine's NIC, its fixed address and its install.
    assert after == FIXED, (after, log)
    assert token is not None, script
    assert config[0] == 200 and b"k3s-join-secret-of-edge" in config[1], config
    assert "Traceback" not in log, log
