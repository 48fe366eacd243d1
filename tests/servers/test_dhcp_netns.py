"""The DHCP server against real clients across a veth pair between two network namespaces.

Only namespaces this test creates are touched (``nbt-<random>-s`` / ``-c``); the veth pair is
created inside them and never exists in the host namespace; addresses are from 192.0.2.0/24.
Everything is torn down in the fixture's finally, and processes are ended by their own PID.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.netns import udp_sockets, until

ROOT = Path(__file__).resolve().parents[2]
UDHCPC = shutil.which("udhcpc") or shutil.which("busybox")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.root,
    pytest.mark.requires("ip", "iproute2"),
]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@dataclass
class Link:
    server_ns: str
    client_ns: str
    server_if: str = "nbs0"
    client_if: str = "nbc0"


@pytest.fixture
def bare_link() -> Iterator[Link]:
    """Two namespaces and nothing between them yet: the test makes the veth pair."""
    tag = secrets.token_hex(3)
    lk = Link(f"nbt-{tag}-s", f"nbt-{tag}-c")
    created: list[str] = []
    try:
        for ns in (lk.server_ns, lk.client_ns):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        yield lk
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


@pytest.fixture
def link(bare_link: Link) -> Iterator[Link]:
    lk = bare_link
    # Created inside the server namespace, peer moved straight into the client's.
    ip("-n", lk.server_ns, "link", "add", lk.server_if, "type", "veth", "peer", "name",
       lk.client_if, "netns", lk.client_ns)
    ip("-n", lk.server_ns, "addr", "add", "192.0.2.1/24", "dev", lk.server_if)
    ip("-n", lk.server_ns, "link", "set", lk.server_if, "up")
    ip("-n", lk.client_ns, "link", "set", lk.client_if, "up")
    yield lk


class Server:
    def __init__(self, link: Link, mode: str, interface: str | None = None,
                 relay_networks: str | None = None, fixed: str = "",
                 advertise: str = "", machines: str = "", ping: bool = False,
                 wrap: tuple[str, ...] = (), pool_end: str = "") -> None:
        # ping: dhcp.ping_check on; wrap: a command the runner runs under (setpriv).
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", link.server_ns, *wrap, sys.executable, "-m",
             "tests.servers.dhcp_netns_runner", mode, interface or link.server_if,
             *([relay_networks] if relay_networks else [])],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT), "DHCP_RUNNER_FIXED": fixed,
                 "DHCP_RUNNER_ADVERTISE": advertise, "DHCP_RUNNER_MACHINES": machines,
                 "DHCP_RUNNER_PING": "1" if ping else "", "DHCP_RUNNER_POOL_END": pool_end},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY"):
            self.stop()
            raise AssertionError(f"server did not start: {line!r} {self.log()}")
        self.address = line.split()[1]

    def log(self) -> str:
        return self._stderr if hasattr(self, "_stderr") else ""

    def stop(self) -> str:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the runner shuts down at EOF
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # this process only, by its own handle
                self.proc.wait(timeout=10)
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.read().decode(errors="replace")
        return self._stderr


def _udhcpc(link: Link, tries: int, *extra: str) -> tuple[subprocess.CompletedProcess[bytes],
                                                          str]:
    """busybox's udhcpc on the client's side of ``link``, and what it printed."""
    assert UDHCPC is not None
    cmd = [UDHCPC] if UDHCPC.endswith("udhcpc") else [UDHCPC, "udhcpc"]
    # -n: exit if no lease, -q: quit after obtaining one, -f: foreground; bounded tries.
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, *cmd, "-i", link.client_if, "-n", "-q",
         "-f", "-t", str(tries), "-T", "2", "-s", "/bin/true", *extra],
        capture_output=True, timeout=60,
    )
    return result, (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.requires("busybox", "busybox-static")
def test_udhcpc_gets_lease_from_authoritative_mode(link: Link) -> None:
    server = Server(link, "authoritative")
    try:
        assert server.address == "192.0.2.1"
        result, out = _udhcpc(link, tries=5)
    finally:
        log = server.stop()
    assert result.returncode == 0, out + log
    assert "lease of 192.0.2.100 obtained" in out, out + log
    assert "from 192.0.2.1" in out
    assert "Traceback" not in log and "ANOTHER DHCP SERVER" not in log, log


def test_pxe_discover_gets_proxy_offer(link: Link) -> None:
    # The client side needs an address only so the kernel can send a broadcast from a UDP
    # socket; the DISCOVER itself says ciaddr 0.0.0.0 like firmware does.
    ip("-n", link.client_ns, "addr", "add", "192.0.2.50/24", "dev", link.client_if)
    server = Server(link, "proxy")
    mac = bytes.fromhex("525400000077")
    discover = dhcp.Packet(
        op=Op.REQUEST, xid=0x5EED0001, chaddr=mac, flags=dhcp.BROADCAST_FLAG,
        options=(
            dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),
            dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes((1, 3, 43, 60, 66, 67))),
            dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
            dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x00"),
            dhcp.Option(Opt.CLIENT_NDI, b"\x01\x02\x01"),
        ),
    )
    try:
        reply = _exchange_in_namespace(link, dhcp.encode(discover, pad_to=300))
    finally:
        log = server.stop()
    assert reply is not None, log
    offer = dhcp.parse(reply)
    assert offer.xid == 0x5EED0001 and offer.message_type == MessageType.OFFER
    assert offer.yiaddr == "0.0.0.0" and offer.siaddr == "192.0.2.1"
    assert offer.file_name == "undionly.kpxe"
    assert offer.option(Opt.VENDOR_SPECIFIC) == bytes((6, 1, 8, 255))
    assert offer.option(Opt.VENDOR_CLASS) == b"PXEClient"
    assert offer.option(Opt.BOOTFILE_NAME) == b"undionly.kpxe\0"
    assert len(reply) >= 300
    assert "Traceback" not in log and "proxy OFFER" in log, log


# A DHCP client's socket on port 68 of the interface named by argv[1], for both scripts.
_CLIENT_SOCKET = r"""
import socket, sys, select
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, 25, sys.argv[1].encode())  # SO_BINDTODEVICE
sock.bind(("0.0.0.0", 68))
"""

CLIENT_SCRIPT = _CLIENT_SOCKET + r"""data = bytes.fromhex(sys.argv[2])
for attempt in range(int(sys.argv[3]) if len(sys.argv) > 3 else 5):
    sock.sendto(data, ("255.255.255.255", 67))
    ready, _, _ = select.select([sock], [], [], 2)
    while ready:
        reply, _ = sock.recvfrom(4096)
        if reply[4:8] == data[4:8] and reply[0] == 2:
            print(reply.hex())
            sys.exit(0)
        ready, _, _ = select.select([sock], [], [], 0.5)
sys.exit(1)
"""


def _exchange_in_namespace(link: Link, payload: bytes) -> bytes | None:
    """Broadcast ``payload`` from the client namespace and return the first matching reply
    (a retransmitting client, like firmware: bounded to five tries)."""
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, sys.executable, "-c", CLIENT_SCRIPT,
         link.client_if, payload.hex()],
        capture_output=True, timeout=60,
    )
    if result.returncode != 0:
        return None
    return bytes.fromhex(result.stdout.decode().strip())



def test_authoritative_mode_warns_about_another_dhcp_server(link: Link, tmp_path: Path) -> None:
    """Start-up probe (issue 3): a second DHCP server on the link is reported loudly."""
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None, "dnsmasq-base is needed (tests/install-deps.sh installs it)"
    ip("-n", link.client_ns, "addr", "add", "192.0.2.2/24", "dev", link.client_if)
    other = subprocess.Popen(
        ["ip", "netns", "exec", link.client_ns, dnsmasq, "--keep-in-foreground", "--port=0",
         f"--interface={link.client_if}", "--bind-interfaces", "--no-ping",
         "--dhcp-range=192.0.2.200,192.0.2.210,255.255.255.0,5m",
         f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'pid'}",
         "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    server = None
    try:
        server = Server(link, "authoritative")
        assert server.proc.stderr is not None
        seen = ""
        for _ in range(200):  # bounded: at most 200 lines or 20 s without one
            ready, _, _ = select.select([server.proc.stderr], [], [], 20)
            if not ready:
                break
            line = server.proc.stderr.readline().decode(errors="replace")
            if not line:
                break
            seen += line
            if "ANOTHER DHCP SERVER" in line:
                break
        assert "ANOTHER DHCP SERVER (192.0.2.2)" in seen, seen
    finally:
        if server is not None:
            server.stop()
        other.terminate()  # the dnsmasq this test started, by its own handle
        other.wait(timeout=10)


STEPS_SCRIPT = _CLIENT_SOCKET + r"""for step in sys.argv[2:]:
    wanted, data = step[0] == "?", bytes.fromhex(step[1:])
    got = "-"
    for attempt in range(5 if wanted else 1):
        sock.sendto(data, ("255.255.255.255", 67))
        ready, _, _ = select.select([sock], [], [], 2 if wanted else 0.5)
        while ready:
            reply, _ = sock.recvfrom(4096)
            if reply[4:8] == data[4:8] and reply[0] == 2:
                got = reply.hex()
                break
            ready, _, _ = select.select([sock], [], [], 0.5)
        if got != "-":
            break
    print(got, flush=True)
"""


def _conversation(link: Link, steps: list[tuple[bool, bytes]]) -> list[bytes | None]:
    """Broadcast each datagram from the client namespace in turn, from one socket on port
    68; for those marked wanted, the reply with its xid (retransmitted, bounded to five
    tries), else whatever came within half a second (None: nothing)."""
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, sys.executable, "-c", STEPS_SCRIPT,
         link.client_if, *(("?" if wanted else ".") + data.hex() for wanted, data in steps)],
        capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [None if line == "-" else bytes.fromhex(line)
            for line in result.stdout.decode().split()]


def _client(mtype: MessageType, mac: bytes, xid: int, **options: bytes) -> bytes:
    opts = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((mtype,)))]
    opts += [dhcp.Option(Opt[name], value) for name, value in options.items()]
    return dhcp.encode(dhcp.Packet(op=Op.REQUEST, xid=xid, chaddr=mac,
                                   flags=dhcp.BROADCAST_FLAG, options=tuple(opts)), pad_to=300)


def test_a_decline_from_a_client_not_given_that_address_is_dropped(link: Link) -> None:
    """Authoritative mode: host B on the link sends a DHCPDECLINE naming the address A holds
    (RFC 2131 §4.3.3: a DECLINE names the address offered to its sender). It marked the
    address bad, so A's next REQUEST for it was NAKed and A lost its address. Dropped now
    (logged once), and A keeps it; B's DECLINE of the address offered to B is honoured."""
    ip("-n", link.client_ns, "addr", "add", "192.0.2.50/24", "dev", link.client_if)
    server = Server(link, "authoritative")
    a, b = bytes.fromhex("5254000000a1"), bytes.fromhex("5254000000b2")
    sid, held = bytes((192, 0, 2, 1)), bytes((192, 0, 2, 100))
    try:
        replies = _conversation(link, [
            (True, _client(MessageType.DISCOVER, a, 0x5EED0101)),
            (True, _client(MessageType.REQUEST, a, 0x5EED0102, SERVER_ID=sid,
                           REQUESTED_IP=held)),
            (False, _client(MessageType.DECLINE, b, 0x5EED0103, SERVER_ID=sid,
                            REQUESTED_IP=held)),
            # A asks for its address again (INIT-REBOOT: the address, no server id).
            (True, _client(MessageType.REQUEST, a, 0x5EED0104, REQUESTED_IP=held)),
            (True, _client(MessageType.DISCOVER, b, 0x5EED0105)),
        ])
        # B declines what it was offered: that address is marked bad, B offered another.
        offered = dhcp.parse(replies[4] or b"").yiaddr if replies[4] else None
        assert offered == "192.0.2.101", replies
        again = _conversation(link, [
            (False, _client(MessageType.DECLINE, b, 0x5EED0106, SERVER_ID=sid,
                            REQUESTED_IP=bytes((192, 0, 2, 101)))),
            (True, _client(MessageType.DISCOVER, b, 0x5EED0107)),
        ])
    finally:
        log = server.stop()
    offer, ack, dropped, renewed = (dhcp.parse(r) if r else None for r in replies[:4])
    assert offer is not None and offer.yiaddr == "192.0.2.100", log
    assert ack is not None and ack.message_type == MessageType.ACK, log
    assert dropped is None
    assert renewed is not None and renewed.message_type == MessageType.ACK, log
    assert renewed.yiaddr == "192.0.2.100"
    assert again[0] is None and again[1] is not None
    assert dhcp.parse(again[1]).yiaddr == "192.0.2.102", log
    assert log.count("DECLINE of 192.0.2.100 dropped") == 1, log
    assert "declined 192.0.2.101" in log and "Traceback" not in log, log


@pytest.mark.requires("busybox", "busybox-static")
def test_discovers_from_made_up_macs_leave_busybox_an_address(link: Link) -> None:
    """A host on the link sends one DISCOVER from each of ten made-up MACs (an attacker
    need read no reply; here each OFFER is waited for, so that all ten are held before
    udhcpc asks): each offer held one of the pool's ten addresses for a minute, and
    busybox's udhcpc then got no offer at all, "pool exhausted" (s46-attack). Now udhcpc is
    offered the oldest offer's address and leases it, as from dnsmasq, which holds nothing
    for an offer."""
    server = Server(link, "authoritative")
    try:
        offered = _conversation(link, [
            (True, _client(MessageType.DISCOVER, bytes.fromhex(f"0200000046{i:02x}"),
                           0x5EED4600 + i)) for i in range(10)])
        assert sum(reply is not None for reply in offered) == 10
        result, out = _udhcpc(link, tries=3)
    finally:
        log = server.stop()
    assert result.returncode == 0, out + log
    assert "lease of 192.0.2.100 obtained" in out, out + log
    assert "Traceback" not in log, log


def test_a_host_that_read_a_clients_offer_cannot_take_its_address(link: Link) -> None:
    """A host on the link reads client A's OFFER (broadcast: A sets the flag, as iPXE does)
    and sends a selecting REQUEST for its address from a made-up MAC, naming the server:
    since s46's shared offers it was ACKed while the pool had free addresses, and A's own
    REQUEST was NAKed; repeated at each of A's OFFERs, A never bound (s47-attack). Now an
    address only offered to another is taken only when none is free: the host is NAKed, A
    is ACKed."""
    server = Server(link, "authoritative")
    a, thief = bytes.fromhex("5254000047a1"), bytes.fromhex("0200000047ff")
    sid = bytes((192, 0, 2, 1))
    try:
        replies = _conversation(link, [
            (True, _client(MessageType.DISCOVER, a, 0x5EED4701)),
            (True, _client(MessageType.REQUEST, thief, 0x5EED4702, SERVER_ID=sid,
                           REQUESTED_IP=bytes((192, 0, 2, 100)))),
            (True, _client(MessageType.REQUEST, a, 0x5EED4703, SERVER_ID=sid,
                           REQUESTED_IP=bytes((192, 0, 2, 100)))),
        ])
    finally:
        log = server.stop()
    offer, stolen, mine = (dhcp.parse(r) if r else None for r in replies)
    assert offer is not None and offer.yiaddr == "192.0.2.100", log
    assert stolen is not None and stolen.message_type == MessageType.NAK, log
    assert mine is not None and (mine.message_type, mine.yiaddr) == (
        MessageType.ACK, "192.0.2.100"), log
    assert "Traceback" not in log, log


# Reads every OFFER on the link (argv[1]) for argv[2] seconds and REQUESTs its address from
# a made-up MAC, naming the server; prints what it got (bounded: 30 OFFERs).
THIEF_SCRIPT = _CLIENT_SOCKET + r"""import time
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
end, stolen = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end and stolen < 30:
    if not select.select([sock], [], [], 0.2)[0]:
        continue
    p = dhcp.parse(sock.recvfrom(4096)[0])
    if p.op != 2:
        continue
    if p.chaddr[:5] == bytes.fromhex("0200004700"):
        print(p.message_type.name, p.yiaddr, flush=True)
    elif p.message_type == MessageType.OFFER:
        stolen += 1
        sock.sendto(dhcp.encode(dhcp.Packet(
            op=Op.REQUEST, xid=0x7E470000 + stolen, chaddr=bytes.fromhex("0200004700")
            + bytes([stolen]), flags=dhcp.BROADCAST_FLAG, options=(
                dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.REQUEST,))),
                dhcp.Option(Opt.SERVER_ID, p.option(Opt.SERVER_ID)),
                dhcp.Option(Opt.REQUESTED_IP, bytes(map(int, p.yiaddr.split(".")))))),
            pad_to=300), ("255.255.255.255", 67))
"""


@pytest.mark.requires("busybox", "busybox-static")
def test_busybox_binds_while_a_host_requests_the_address_of_each_offer_it_sees(
        link: Link) -> None:
    """busybox udhcpc with the broadcast flag (-B, as iPXE sets it) beside a host that reads
    each OFFER and REQUESTs its address first from a made-up MAC: on 317fd9b udhcpc was
    NAKed ten times, "no lease, failing" after 37 s, the host ACKed nine addresses (s47-
    attack, the race won each time). Now the host is NAKed (an address is free for it) and
    udhcpc leases the address it was offered."""
    server = Server(link, "authoritative")
    thief = subprocess.Popen(
        ["ip", "netns", "exec", link.client_ns, sys.executable, "-c", THIEF_SCRIPT,
         link.client_if, "30"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        time.sleep(1)  # its socket bound
        result, out = _udhcpc(link, 3, "-B")
    finally:
        thief.terminate()  # the process this test started, by its own handle
        got, err = thief.communicate(timeout=10)
        log = server.stop()
    assert result.returncode == 0, out + log
    assert "lease of 192.0.2.100 obtained" in out, out + log
    assert b"ACK" not in got, got + err


def test_an_address_the_server_takes_later_inside_the_pool_is_not_leased(link: Link) -> None:
    """Authoritative mode reserved the server's addresses found at start: one an interface
    got later inside the pool (``ip addr add``) was offered to the next client, netboot
    leasing its own address. Now (dnsmasq never offers the address of the interface a
    request came in on) it is reserved within the watcher's ~0.1 s; a client already leased
    it is not offered it again and its renewal is NAKed (dnsmasq: "address not available"),
    so it moves to another; removed from the host, the address is offered again."""
    server = Server(link, "authoritative")
    a, b, c = (bytes.fromhex(f"5254000000{x}") for x in ("a3", "b3", "c3"))
    sid = bytes((192, 0, 2, 1))

    def offered(replies: list[bytes | None], at: int) -> str | None:
        reply = replies[at]
        return dhcp.parse(reply).yiaddr if reply else None

    try:
        first = _conversation(link, [
            (True, _client(MessageType.DISCOVER, a, 0x5EED0501)),
            (True, _client(MessageType.REQUEST, a, 0x5EED0502, SERVER_ID=sid,
                           REQUESTED_IP=bytes((192, 0, 2, 100)))),
        ])
        # A's address and the next free one become the server's (secondary addresses).
        for address in ("192.0.2.100", "192.0.2.101"):
            ip("-n", link.server_ns, "addr", "add", f"{address}/24", "dev", link.server_if)
        time.sleep(1.5)  # the watcher takes ~0.1 s (benchmarks/README.md, s37-net)
        later = _conversation(link, [
            (True, _client(MessageType.DISCOVER, b, 0x5EED0503)),
            # A renews its lease (INIT-REBOOT: the address, no server id), then rediscovers.
            (True, _client(MessageType.REQUEST, a, 0x5EED0504,
                           REQUESTED_IP=bytes((192, 0, 2, 100)))),
            (True, _client(MessageType.DISCOVER, a, 0x5EED0505)),
        ])
        ip("-n", link.server_ns, "addr", "del", "192.0.2.101/24", "dev", link.server_if)
        time.sleep(1.5)
        freed = _conversation(link, [(True, _client(MessageType.DISCOVER, c, 0x5EED0506))])
    finally:
        log = server.stop()
    assert offered(first, 0) == "192.0.2.100", log
    assert first[1] is not None and dhcp.parse(first[1]).message_type == MessageType.ACK, log
    assert offered(later, 0) == "192.0.2.102", log  # not .101, the server's now
    assert later[1] is not None and dhcp.parse(later[1]).message_type == MessageType.NAK, log
    assert offered(later, 2) == "192.0.2.103", log  # not its lease's .100
    assert offered(freed, 0) == "192.0.2.101", log
    assert ("dhcp: 192.0.2.100 is now an address of this host, and leased to "
            "52:54:00:00:00:a3") in log, log
    assert "Traceback" not in log, log


def _lines_of(path: Path, want: Callable[[list[str]], bool], seconds: float) -> list[str]:
    """``path``'s lines once ``want`` holds of them, or as they are after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if want(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.mark.requires("busybox", "busybox-static")
def test_busybox_whose_fixed_address_its_other_nic_took_is_naked_and_takes_it_back(
        link: Link, tmp_path: Path) -> None:
    """busybox udhcpc, the machine's NIC E1, leases its machine's fixed_ipv4; the
    machine's other NIC E2 (or a host attached to the machine by its UUID: s46-attack #4)
    is offered it and ACKed. udhcpc's renewal (SIGUSR1: RENEWING, RFC 2131 §4.4.5) was
    ACKed beside E2's: two hosts held one address. Now it is NAKed ("nak" to udhcpc's
    script), udhcpc discovers again and is bound to the address once more, E2's lease
    ended: one holder at a time, each move in the log naming both NICs."""
    real, other = "52:54:00:00:00:e1", "52:54:00:00:00:e2"
    ip("-n", link.client_ns, "link", "set", link.client_if, "address", real)
    events, script = tmp_path / "events", tmp_path / "script"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $ip" >> {events}\n'
        'case "$1" in\n'
        '  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/24" dev "$interface";;\n'
        '  deconfig|nak) ip addr flush dev "$interface";;\n'
        "esac\n")
    script.chmod(0o755)
    server = Server(link, "authoritative", fixed=f"{real}=192.0.2.50,{other}=192.0.2.50",
                    machines=f"{real}+{other}")
    assert UDHCPC is not None
    cmd = [UDHCPC] if UDHCPC.endswith("udhcpc") else [UDHCPC, "udhcpc"]
    client = subprocess.Popen(
        ["ip", "netns", "exec", link.client_ns, *cmd, "-i", link.client_if, "-f", "-t", "5",
         "-T", "2", "-s", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sid, fixed = bytes((192, 0, 2, 1)), bytes((192, 0, 2, 50))
    mac = bytes.fromhex(other.replace(":", ""))
    try:
        first = _lines_of(events, lambda lines: "bound 192.0.2.50" in lines, 30)
        assert "bound 192.0.2.50" in first, first
        replies = _conversation(link, [
            (True, _client(MessageType.DISCOVER, mac, 0x5EEDE201)),
            (True, _client(MessageType.REQUEST, mac, 0x5EEDE202, SERVER_ID=sid,
                           REQUESTED_IP=fixed))])
        client.send_signal(signal.SIGUSR1)  # udhcpc renews now (its own process)
        after = _lines_of(events, lambda lines: lines.count("bound 192.0.2.50") >= 2, 30)
    finally:
        client.terminate()  # this process only, by its own handle
        try:
            out = client.communicate(timeout=10)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            client.kill()
            out = client.communicate(timeout=10)[0].decode(errors="replace")
        log = server.stop()
    got = [dhcp.parse(r) if r else None for r in replies]
    assert got[0] is not None and got[0].yiaddr == "192.0.2.50", log
    assert got[1] is not None and got[1].message_type == MessageType.ACK, log
    later = after[len(first):]
    assert "renew 192.0.2.50" not in later, (after, out, log)  # before: ACKed beside E2
    assert later[0].startswith("nak") and later[-1] == "bound 192.0.2.50", (after, out, log)
    assert f"fixed address 192.0.2.50 moved from NIC {real} to NIC {other}" in log, log
    assert f"fixed address 192.0.2.50 moved from NIC {other} to NIC {real}" in log, log
    assert "Traceback" not in log, log


def test_a_fixed_address_of_the_server_or_another_machines_is_not_offered(link: Link) -> None:
    """Authoritative mode with two interfaces (the link's 192.0.2.1, which is also
    dhcp.router, and 198.51.100.1 on a second one): a machine whose fixed_ipv4 is one of the
    server's addresses was offered it, and one whose fixed_ipv4 another machine holds was
    offered it too (two hosts answering ARP for one address). dnsmasq refuses both ("not
    using configured address ... in use by the router or server" / "... leased to") and
    offers a pool address; so does netboot now, with a line naming the machine and why."""
    ip("-n", link.server_ns, "link", "add", "nbs1", "type", "veth", "peer", "name", "nbs1p")
    ip("-n", link.server_ns, "addr", "add", "198.51.100.1/24", "dev", "nbs1")
    ip("-n", link.server_ns, "link", "set", "nbs1", "up")
    a, b, c, d = (bytes.fromhex(f"5254000000{x}") for x in ("a4", "b4", "c4", "d4"))
    server = Server(link, "authoritative", fixed=",".join((
        "52:54:00:00:00:a4=198.51.100.1", "52:54:00:00:00:b4=192.0.2.1",
        "52:54:00:00:00:c4=192.0.2.50", "52:54:00:00:00:d4=192.0.2.50")))
    sid = bytes((192, 0, 2, 1))
    try:
        replies = _conversation(link, [
            (True, _client(MessageType.DISCOVER, a, 0x5EED0601)),
            # A asks for its fixed address all the same (INIT-REBOOT): not given.
            (True, _client(MessageType.REQUEST, a, 0x5EED0602,
                           REQUESTED_IP=bytes((198, 51, 100, 1)))),
            (True, _client(MessageType.DISCOVER, b, 0x5EED0603)),
            (True, _client(MessageType.DISCOVER, c, 0x5EED0604)),
            (True, _client(MessageType.REQUEST, c, 0x5EED0605, SERVER_ID=sid,
                           REQUESTED_IP=bytes((192, 0, 2, 50)))),
            (True, _client(MessageType.DISCOVER, d, 0x5EED0606)),
        ])
    finally:
        log = server.stop()
    got = [dhcp.parse(r) if r else None for r in replies]
    assert all(g is not None for g in got), (got, log)
    assert got[0].yiaddr == "192.0.2.100", log  # type: ignore[union-attr]
    assert got[1].message_type == MessageType.NAK, log  # type: ignore[union-attr]
    assert got[2].yiaddr == "192.0.2.101", log  # type: ignore[union-attr]
    assert got[3].yiaddr == "192.0.2.50", log  # type: ignore[union-attr]
    assert got[4].message_type == MessageType.ACK, log  # type: ignore[union-attr]
    assert got[5].yiaddr == "192.0.2.102", log  # type: ignore[union-attr]
    assert ("52:54:00:00:00:a4 xid 0x5eed0601: not using its fixed_ipv4 198.51.100.1: it is "
            "in use by this server") in log, log
    assert "not using its fixed_ipv4 192.0.2.1: it is in use by this server" in log, log
    assert ("not using its fixed_ipv4 192.0.2.50: it is leased to 52:54:00:00:00:c4; "
            "offered an address of the pool instead") in log, log
    assert "Traceback" not in log, log


def test_authoritative_on_each_interface_answers_no_link_off_the_pools_network(
        link: Link) -> None:
    """Authoritative mode, an address advertised and no interface named (serve's listeners
    on each interface since s39-net): a second NIC of the server on a management network
    (198.51.100.1/24, no pool there) heard a device's DISCOVER there and offered it an
    address of the provisioning pool (192.0.2.100), a network its link does not have: a
    second DHCP server on the management LAN. dnsmasq answers a request that came in on
    an interface only from a range of that interface's network ("no address range
    available for DHCP request via eth1"), a relayed one by its giaddr; so does netboot
    now. The provisioning link is still answered."""
    ip("-n", link.server_ns, "link", "add", "nbm0", "type", "veth", "peer", "name", "nbm1",
       "netns", link.client_ns)
    ip("-n", link.server_ns, "addr", "add", "198.51.100.1/24", "dev", "nbm0")
    ip("-n", link.server_ns, "link", "set", "nbm0", "up")
    ip("-n", link.client_ns, "link", "set", "nbm1", "up")
    server = Server(link, "authoritative", "each", advertise="192.0.2.1")
    mgmt = replace(link, client_if="nbm1")
    try:
        on_mgmt = _exchange_in_namespace(mgmt, _client(
            MessageType.DISCOVER, bytes.fromhex("5254000000e5"), 0x5EED0701))
        on_pool = _exchange_in_namespace(link, _client(
            MessageType.DISCOVER, bytes.fromhex("5254000000f5"), 0x5EED0702))
    finally:
        log = server.stop()
    assert on_mgmt is None, (dhcp.parse(on_mgmt), log)
    assert on_pool is not None, log
    assert dhcp.parse(on_pool).yiaddr == "192.0.2.100", log
    assert "no address range available for DHCP request via nbm0" in log, log
    assert "Traceback" not in log, log


# An attacker's socket on port 68 of the link, and a victim's on 198.51.100.7:68 (an address
# of the client namespace off the link's network, routed to it from the server's): each
# datagram broadcast in turn, then what reached each socket within `wait` seconds, by xid.
REFLECT_SCRIPT = _CLIENT_SOCKET + r"""victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
victim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
victim.bind(("198.51.100.7", 68))
for step in sys.argv[2:]:
    data = bytes.fromhex(step)
    sock.sendto(data, ("255.255.255.255", 67))
    got = {"link": 0, "victim": 0}
    ready, _, _ = select.select([sock, victim], [], [], 1.0)
    while ready:
        for s in ready:
            reply, _ = s.recvfrom(4096)
            if reply[4:8] == data[4:8] and reply[0] == 2:
                got["victim" if s is victim else "link"] += 1
        ready, _, _ = select.select([sock, victim], [], [], 0.3)
    print(got["link"], got["victim"], flush=True)
"""


def _reflected(link: Link, datagrams: list[bytes]) -> list[tuple[int, int]]:
    """How many replies to each datagram reached the link's broadcast and the victim."""
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, sys.executable, "-c", REFLECT_SCRIPT,
         link.client_if, *(d.hex() for d in datagrams)],
        capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    return [(int(a), int(b)) for a, b in (line.split() for line in lines)]


def _with_ciaddr(data: bytes, ciaddr: str) -> bytes:
    out = bytearray(data)
    out[12:16] = bytes(int(part) for part in ciaddr.split("."))
    return bytes(out)


_PXE = {"VENDOR_CLASS": b"PXEClient:Arch:00000:UNDI:002001", "CLIENT_ARCH": b"\x00\x00",
        "CLIENT_NDI": b"\x01\x02\x01"}


@pytest.mark.parametrize("mode", ["authoritative", "proxy"])
def test_a_ciaddr_off_the_link_does_not_aim_a_reply_at_another_host(link: Link,
                                                                    mode: str) -> None:
    """A host on the link sends a DISCOVER or an INFORM naming another host's address in
    ciaddr (198.51.100.7, off the link's network, routed from the server): the reply went
    there (RFC 2131 §4.1 unicasts to ciaddr), a reflector whose target is a field of the
    datagram, so source-address filtering does not stop it. A DISCOVER has ciaddr 0 (RFC 2131
    table 5): answered by broadcast whatever it says; an INFORM's ciaddr is checked against
    the network served (§4.3.5 "SHOULD check ... for consistency"), as dnsmasq answers only
    an address range it serves."""
    ip("-n", link.client_ns, "addr", "add", "192.0.2.50/24", "dev", link.client_if)
    ip("-n", link.client_ns, "addr", "add", "198.51.100.7/32", "dev", "lo")
    ip("-n", link.server_ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.50")
    server = Server(link, mode)
    mac = bytes.fromhex("5254000000c7")
    pxe = _PXE if mode == "proxy" else {}
    datagrams = [
        _with_ciaddr(_client(MessageType.DISCOVER, mac, 0x5EED0201, **pxe), "198.51.100.7"),
        # An INFORM from an address of the served network is answered to it, unicast.
        _with_ciaddr(_client(MessageType.INFORM, mac, 0x5EED0202), "198.51.100.7"),
    ]
    try:
        got = _reflected(link, datagrams)
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
    # The DISCOVER: its answer on the link by broadcast, none to the victim.
    assert got[0] == (1, 0), (got, log)
    # The INFORM: nothing anywhere (a proxy answers no INFORM on :67 either).
    assert got[1] == (0, 0), (got, log)


# A relay's sockets on port 67 of the addresses given (argv[2]: comma-separated), and a
# host's on port 68 of the link: each datagram (argv[3:]) broadcast from the host in turn,
# then how many replies with its xid reached each relay address within a second.
RELAY_SCRIPT = _CLIENT_SOCKET + r"""relays = {}
for address in sys.argv[2].split(","):
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    relay.bind((address, 67))
    relays[relay] = address
for step in sys.argv[3:]:
    data = bytes.fromhex(step)
    sock.sendto(data, ("255.255.255.255", 67))
    got = dict.fromkeys(relays.values(), 0)
    ready, _, _ = select.select(list(relays), [], [], 1.0)
    while ready:
        for s in ready:
            reply, _ = s.recvfrom(4096)
            if reply[4:8] == data[4:8] and reply[0] == 2:
                got[relays[s]] += 1
        ready, _, _ = select.select(list(relays), [], [], 0.3)
    print(" ".join(f"{a}={n}" for a, n in got.items()), flush=True)
"""


def _relayed_to(link: Link, relays: list[str], datagrams: list[bytes]) -> list[dict[str, int]]:
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, sys.executable, "-c", RELAY_SCRIPT,
         link.client_if, ",".join(relays), *(d.hex() for d in datagrams)],
        capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [{a: int(n) for a, n in (pair.split("=") for pair in line.split())}
            for line in result.stdout.decode().splitlines()]


def _with_giaddr(data: bytes, giaddr: str) -> bytes:
    out = bytearray(data)
    out[24:28] = bytes(int(part) for part in giaddr.split("."))
    return bytes(out)


@pytest.mark.parametrize("mode", ["proxy", "authoritative"])
def test_a_relayed_request_is_answered_only_from_a_relay_network_served(link: Link,
                                                                       mode: str) -> None:
    """A DISCOVER naming a relay (giaddr) is answered to giaddr:67 (RFC 2131 §4.1). Proxy
    mode answered whatever giaddr a host wrote: an OFFER aimed at port 67 of any address
    (~1x reflection, s36-attack). dnsmasq answers a relayed request only when giaddr lies in
    a network it serves; netboot now too: the served interface's own network (192.0.2.0/24
    here) and dhcp.relay_networks (198.51.100.0/25); a relay elsewhere (198.51.100.200) is
    dropped, with one log line and the outcome "relay not allowed". The relays' addresses
    live in the client namespace, routed from the server's."""
    ip("-n", link.client_ns, "addr", "add", "192.0.2.50/24", "dev", link.client_if)
    for address in ("198.51.100.7", "198.51.100.200"):
        ip("-n", link.client_ns, "addr", "add", f"{address}/32", "dev", "lo")
    ip("-n", link.server_ns, "route", "add", "198.51.100.0/24", "via", "192.0.2.50")
    server = Server(link, mode, relay_networks="198.51.100.0/25")
    relays = ["192.0.2.50", "198.51.100.7", "198.51.100.200"]
    pxe = _PXE if mode == "proxy" else {}
    mac = bytes.fromhex("5254000000d7")
    datagrams = [_with_giaddr(_client(MessageType.DISCOVER, mac, 0x5EED0300 + i, **pxe), relay)
                 for i, relay in enumerate([*relays, "198.51.100.201"])]
    try:
        got = _relayed_to(link, relays, datagrams)
    finally:
        log = server.stop()
    assert "Traceback" not in log, log
    nothing = dict.fromkeys(relays, 0)
    # A relay on the served interface's network: answered, as before.
    assert got[0] == {**nothing, "192.0.2.50": 1}, (got, log)
    if mode == "proxy":
        # Listed in dhcp.relay_networks: answered.
        assert got[1] == {**nothing, "198.51.100.7": 1}, (got, log)
    else:
        # Listed, but off the pool's network: no address to offer behind it.
        assert got[1] == nothing, (got, log)
        assert "1 relay off the pool's network" in log, log
    # Neither: dropped (it was answered, to 198.51.100.200:67).
    assert got[2] == nothing, (got, log)
    # A line (rate-limited under one key: any giaddr is a host's choice), and the outcome
    # counted (netboot_dhcp_outcomes_total).
    assert log.count("relayed by 198.51.100.200, which is in no network served nor in "
                     "dhcp.relay_networks: dropped") == 1, log
    assert "2 relay not allowed" in log, log


@pytest.mark.requires("ss", "iproute2")
@pytest.mark.parametrize("named", [True, False], ids=["interface-named", "each-interface"])
def test_an_interface_that_comes_up_after_start_is_served_and_let_go(bare_link: Link,
                                                                    named: bool) -> None:
    """DHCP listened on the interfaces it found at start only: one that came up later (a
    VLAN, a USB NIC, a hypervisor's bridge) was never served, and on a host without a
    default route (each interface served with its own address) not even a restart's worth
    of warning said so. Now, as dnsmasq's --bind-dynamic, netboot follows the kernel's
    address events (rtnetlink): started with no such interface, the veth that comes up with
    192.0.2.1 is listened on within about a second and a PXE DISCOVER over it gets an OFFER
    naming 192.0.2.1; the address removed, its sockets are closed (they stayed)."""
    link = bare_link
    server = Server(link, "proxy", interface=link.server_if if named else "each")
    try:
        assert server.address == "-"
        assert udp_sockets(link.server_ns, f"%{link.server_if}:") == 0
        ip("-n", link.server_ns, "link", "add", link.server_if, "type", "veth", "peer",
           "name", link.client_if, "netns", link.client_ns)
        ip("-n", link.server_ns, "link", "set", link.server_if, "up")
        ip("-n", link.client_ns, "link", "set", link.client_if, "up")
        ip("-n", link.client_ns, "addr", "add", "192.0.2.50/24", "dev", link.client_if)
        ip("-n", link.server_ns, "addr", "add", "192.0.2.1/24", "dev", link.server_if)
        came = until(lambda: udp_sockets(link.server_ns, f"%{link.server_if}:") == 2, 5)
        assert came is not None, came  # no rescan exists: until()'s bound decides
        mac = bytes.fromhex("5254000000e1")
        reply = _exchange_in_namespace(link, _client(MessageType.DISCOVER, mac, 0x5EED0401,
                                                     PARAMETER_REQUEST_LIST=bytes((1, 3, 66, 67)),
                                                     **_PXE))
        ip("-n", link.server_ns, "addr", "del", "192.0.2.1/24", "dev", link.server_if)
        went = until(lambda: udp_sockets(link.server_ns, f"%{link.server_if}:") == 0, 5)
    finally:
        log = server.stop()
    assert reply is not None, log
    offer = dhcp.parse(reply)
    assert offer.message_type == MessageType.OFFER and offer.siaddr == "192.0.2.1", log
    assert went is not None, (went, log)
    assert f"listening on 0.0.0.0:67 ({link.server_if}), advertising 192.0.2.1" in log, log
    assert f"dhcp: stopped listening on {link.server_if} (its address went away)" in log, log
    assert "Traceback" not in log, log
