"""Authoritative DHCP from two netboot servers for one pool: no address is handed out twice.

Both servers and a client sit on one link (a bridge in a namespace of the test's own, each
party in its own namespace, joined by veth pairs made inside them; 192.0.2.0/24 only). Two
clients ask at the same time for leases for many MACs, one taking A's offers and the other
B's, as real clients take whichever offer comes first; every ACK is collected.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.multiserver.conftest import Inventory, Pair, Server, running_pair
from tests.servers.test_dhcp_netns import ip

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]

MACS = 12


@dataclass
class Link:
    switch: str
    a: str
    b: str
    client: str


@pytest.fixture
def link() -> Iterator[Link]:
    tag = secrets.token_hex(3)
    lk = Link(f"nbt-{tag}-sw", f"nbt-{tag}-a", f"nbt-{tag}-b", f"nbt-{tag}-c")
    made: list[str] = []
    try:
        for ns in (lk.switch, lk.a, lk.b, lk.client):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", lk.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", lk.switch, "link", "set", "br0", "up")
        for ns, dev, addr in ((lk.a, "nba0", "192.0.2.1/24"), (lk.b, "nbb0", "192.0.2.2/24"),
                              (lk.client, "nbc0", "192.0.2.50/24")):
            # Made in the switch's namespace, one end moved straight into the party's.
            port = f"sw-{dev}"
            ip("-n", lk.switch, "link", "add", port, "type", "veth", "peer", "name", dev,
               "netns", ns)
            ip("-n", lk.switch, "link", "set", port, "master", "br0", "up")
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        yield lk
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def dhcp_server(tmp: Path, name: str, ns: str, dev: str, inventory: Inventory) -> Server:
    where = tmp / name
    config = write_config(where, f"inventory:\n{inventory.lines}",
                          http="  listen: 127.0.0.1\n")
    text = config.read_text().replace('dhcp:\n  mode: "off"\n', (
        "dhcp:\n  mode: authoritative\n  authoritative:\n    pool_start: 192.0.2.100\n"
        "    pool_end: 192.0.2.139\n    lease_seconds: 600\n"))
    text = text.replace("  advertise: 192.0.2.10\n", f"  interfaces: [{dev}]\n")
    config.write_text(text)
    return Server(name, config, where / "data", netns=ns)


@pytest.fixture
async def dhcp_pair(tmp_path: Path, link: Link, inventory: Inventory) -> AsyncIterator[Pair]:
    servers = (dhcp_server(tmp_path, "a", link.a, "nba0", inventory),
               dhcp_server(tmp_path, "b", link.b, "nbb0", inventory))
    async with running_pair(tmp_path, inventory, servers) as pair:
        yield pair


# Runs in the client's namespace, twice at once (one client per server, sockets sharing port 68
# by SO_REUSEADDR, each keeping the replies to its own xids): for each of its MACs, DISCOVER,
# take the offer of its server, REQUEST it, and note the ACK; a NAK starts over (RFC 2131
# §4.3.2), at most 4 rounds per MAC, every wait bounded.
CLIENT = r"""
import json, select, socket, sys, time
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt

servers = {"a": "192.0.2.1", "b": "192.0.2.2"}
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, 25, b"nbc0")  # SO_BINDTODEVICE
sock.bind(("0.0.0.0", 68))

def send(xid, mac, kind, extra=()):
    packet = dhcp.Packet(op=Op.REQUEST, xid=xid, chaddr=mac, flags=dhcp.BROADCAST_FLAG,
        options=(dhcp.Option(Opt.MESSAGE_TYPE, bytes((kind,))), *extra))
    sock.sendto(dhcp.encode(packet, pad_to=300), ("255.255.255.255", 67))

def replies(xid, seconds):
    # Until this client's server answers, or ``seconds``: the other server's reply may come
    # first and its own later (an authoritative offer waits up to 1 s for its ping check,
    # dhcp.ping_check), so the first reply does not end the wait.
    end = time.monotonic() + seconds
    out = []
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return out
        data, _ = sock.recvfrom(4096)
        reply = dhcp.parse(data)
        if reply.xid == xid and reply.op == Op.REPLY:
            out.append(reply)
            if reply.option(Opt.SERVER_ID) == socket.inet_aton(servers[want]):
                return out
    return out

acks = []
want = sys.argv[2]
for i in range(int(sys.argv[1])):
    i = 2 * i + (want == "b")
    mac = bytes.fromhex("5254001320%02x" % i)
    for attempt in range(4):
        xid = (i << 8) | attempt | 0x13000000
        send(xid, mac, MessageType.DISCOVER)
        offers = [r for r in replies(xid, 3) if r.message_type == MessageType.OFFER
                  and r.option(Opt.SERVER_ID) == socket.inet_aton(servers[want])]
        if not offers:
            continue
        send(xid, mac, MessageType.REQUEST, (
            dhcp.Option(Opt.SERVER_ID, socket.inet_aton(servers[want])),
            dhcp.Option(Opt.REQUESTED_IP, socket.inet_aton(offers[0].yiaddr))))
        answers = [r for r in replies(xid, 3)
                   if r.option(Opt.SERVER_ID) == socket.inet_aton(servers[want])]
        if answers and answers[0].message_type == MessageType.ACK:
            acks.append({"mac": mac.hex(":"), "server": want, "ip": answers[0].yiaddr})
            break
print(json.dumps(acks))
"""


async def test_leases_for_one_pool_from_two_servers_never_collide(
        dhcp_pair: Pair, link: Link) -> None:
    root = Path(__file__).resolve().parents[2]
    clients = [subprocess.Popen(["ip", "netns", "exec", link.client, sys.executable, "-c",
                                 CLIENT, str(MACS // 2), want], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=root,
                                env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
               for want in ("a", "b")]
    acks = []
    for client in clients:  # each ends by itself: every wait in it is bounded
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err + dhcp_pair.logs()
        acks += json.loads(out)
    assert {a["server"] for a in acks} == {"a", "b"}, acks
    assert len(acks) == MACS, acks
    by_ip: dict[str, list[str]] = {}
    for ack in acks:
        by_ip.setdefault(ack["ip"], []).append(f"{ack['mac']} via {ack['server']}")
    assert all(len(v) == 1 for v in by_ip.values()), {k: v for k, v in by_ip.items()
                                                      if len(v) > 1}
