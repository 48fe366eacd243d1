"""Authoritative DHCP with an address advertised and no interface named (DHCP listens on
each interface, s39-net), or with interfaces named: the pool answers only on an interface
whose network holds it.

The namespaces of tests/test_service_reached_netns.py: ``netboot serve`` in one of its own
with va on 192.0.2.0/24 (the pool's network) and vb on 198.51.100.0/24 (say a management
NIC), veth pairs to a client namespace each.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_service_interfaces_netns import config
from tests.test_service_reached_netns import (
    MAC_A,
    MAC_B,
    env,
    namespaces,
    netboot,
    pxe_offer,
    serving,
)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("curl", "curl")]


@pytest.fixture
def subnets() -> Iterator[dict[str, str]]:
    yield from namespaces("s39pool", ("a", "b"))


@pytest.mark.parametrize("named", [False, True])
def test_the_pool_is_offered_only_on_an_interface_of_its_network(
        subnets: dict[str, str], tmp_path: Path, named: bool) -> None:
    """A DISCOVER on vb (198.51.100.0/24) was offered 192.0.2.x of the pool: a host on the
    management network given an address of another network, with the provisioning
    network's router. dnsmasq answers only where a dhcp-range's network holds the
    interface's address ("no address range available for DHCP request via vb"); now so does
    netboot, saying why once per interface. The same with both interfaces named
    (``server.interfaces: [va, vb]``)."""
    cfg = config(tmp_path, dhcp="authoritative", named=named)
    with serving(cfg, subnets, tmp_path):
        on_a = pxe_offer(subnets["a"], MAC_A)
        # Two tries each (4 s): an answer on this host's own link comes in milliseconds, and
        # a request that gets none waits its tries out (the whole suite's time: 2 x 10 s).
        on_b = [pxe_offer(subnets["b"], MAC_B, tries=2) for _ in range(2)]
    log = (tmp_path / "serve.log").read_text()
    assert on_a is not None and on_a.yiaddr == "192.0.2.100", log
    assert on_b == [None, None], (on_b, log)
    told = [line for line in log.splitlines()
            if "no address range available for DHCP request via" in line]
    assert len(told) == 1 and "via vb:" in told[0] and "192.0.2.0/24" in told[0], log
    assert "via va" not in log, log
    assert "Traceback" not in log, log


def test_a_named_interface_off_the_pools_network_is_told_at_start(
        subnets: dict[str, str], tmp_path: Path) -> None:
    """``server.interfaces: [va, vb]`` with vb on 198.51.100.0/24, off the pool's network:
    vb answers no direct request, which was said only at its first request. Now start-up
    says it before any request comes, and ``check-config`` on the host says it too, each
    with the file and line of the setting and the fix; serve still starts (dnsmasq starts
    with such an interface and logs only its range)."""
    cfg = config(tmp_path, dhcp="authoritative", named=True)
    with serving(cfg, subnets, tmp_path):
        log = (tmp_path / "serve.log").read_text()
    path = cfg[1]
    line = Path(path).read_text().splitlines().index("  interfaces: [va, vb]") + 1
    told = [text for text in log.splitlines()
            if "has no address on the pool's network" in text]
    assert len(told) == 1, log
    assert f"{path}:{line}: server.interfaces: authoritative DHCP: interface vb " in told[0]
    assert "192.0.2.0/24" in told[0] and "fix: give vb an address on 192.0.2.0/24" in told[0]
    assert "no address range available" not in log, log  # no request came
    checked = subprocess.run(netboot("check-config", path, ns=subnets["srv"]), env=env(),
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert f"{path}:{line}: server.interfaces: authoritative DHCP: interface vb " \
        in checked.stderr and "interface va" not in checked.stderr, checked.stderr
