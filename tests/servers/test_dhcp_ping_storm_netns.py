"""A storm of new devices on an authoritative VLAN with dhcp.ping_check: every DISCOVER waits
for its echo at once, none behind another's. Real UDP through a veth pair between two
namespaces this test creates (the server's, tests.netns's, where the scenario runs, and the
devices'); the probe is held by the test, so what is counted is how many DISCOVERs wait on a
ping together, not how long they wait."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from netboot.pxe import DhcpSettings
from netboot.servers import dhcp as dhcp_server
from netboot.servers.dhcp import DhcpServer
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
from tests.netns import in_namespace, ip, namespace  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 100
SLOTS = 20  # DECISIONS_IN_FLIGHT scaled down with the storm: 100 against 20, as 1,280 to 256


# The devices: one DISCOVER each from a made-up MAC, broadcast on their end of the link.
DEVICES_SCRIPT = """
import socket, sys
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"nbd1")
sock.bind(("0.0.0.0", 68))
for i in range(int(sys.argv[1])):
    sock.sendto(dhcp.encode(dhcp.Packet(
        op=Op.REQUEST, xid=i, chaddr=bytes.fromhex("0200005e") + i.to_bytes(2, "big"),
        flags=dhcp.BROADCAST_FLAG,
        options=(dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),)),
        pad_to=dhcp.MIN_PACKET_SIZE), ("255.255.255.255", 67))
"""


@pytest.fixture
def devices(namespace: str) -> Iterator[tuple[str, str]]:  # noqa: F811 (the fixture above)
    """The server's namespace (nbd0, 192.0.2.1/24) and the devices' (nbd1), joined."""
    other = f"nbt-{secrets.token_hex(3)}-d"
    ip("netns", "add", other)
    try:
        ip("-n", namespace, "link", "add", "nbd0", "type", "veth", "peer", "name", "nbd1",
           "netns", other)
        ip("-n", namespace, "addr", "add", "192.0.2.1/24", "dev", "nbd0")
        ip("-n", namespace, "link", "set", "nbd0", "up")
        ip("-n", other, "link", "set", "nbd1", "up")
        yield namespace, other
    finally:
        subprocess.run(["ip", "netns", "del", other], capture_output=True, timeout=20)


class Held:
    """An AddressProbe that answers nobody until the test lets it."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.release = asyncio.Event()

    async def answers(self, ip: str, interface: str | None) -> bool | None:
        self.asked.append(ip)
        await self.release.wait()
        return False

    def close(self) -> None:
        self.release.set()


def test_a_storm_of_new_devices_waits_for_its_pings_together(
        devices: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A DISCOVER waiting for its echo held one of the listener's decisions in flight
    (DECISIONS_IN_FLIGHT, 256): past them a storm's DISCOVERs waited for the first probes to
    end before theirs began, offers came ~256 a second (1,000 devices: p50 3 s, max 4 s,
    scaled; benchmarks/README.md, s48-ping). A listener that pings has PINGS_IN_FLIGHT more:
    all 100 of this storm wait on their pings at once against 20 decisions."""
    monkeypatch.setattr(dhcp_server, "DECISIONS_IN_FLIGHT", SLOTS)
    settings = DhcpSettings(mode="authoritative", pool_start="192.0.2.100",
                            pool_end="192.0.2.254", lease_seconds=3600, ping_check=True)
    server_ns, devices_ns = devices

    async def scenario() -> tuple[int, int, int]:
        probe = Held()
        server = DhcpServer(settings, TableDecider(), MemoryLeaseStore(), interfaces=["nbd0"],
                            advertise=None, probe=False, pinger=probe)
        await server.start()
        try:
            sent = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", devices_ns, sys.executable, "-c", DEVICES_SCRIPT,
                str(DEVICES), env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert await sent.wait() == 0
            (listener,) = [p for p in server._protocols if p.name.endswith(":67")]
            while listener.received < DEVICES:  # each datagram in (bounded: in_namespace)
                await asyncio.sleep(0.01)
            for _ in range(500):  # the loop's turns for each to reach its ping; no clock
                await asyncio.sleep(0)
            asked = len(probe.asked)
            probe.release.set()
            await listener.drain()
            return listener.received, asked, server.summary.totals()["OFFER"]
        finally:
            await server.close()

    received, asked, offers = in_namespace(server_ns, scenario)
    assert received == DEVICES
    assert asked == DEVICES, f"{asked} of {DEVICES} DISCOVERs waited on a ping at once"
    assert offers == DEVICES
