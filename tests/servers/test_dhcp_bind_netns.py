"""A second DHCP server on one interface of this host is refused at start, as dnsmasq does;
a proxyDHCP beside the site's DHCP server on this host starts and both answer.

Since DHCP listens per interface (one 0.0.0.0 socket bound to each device, s39-net), two
``netboot serve`` on the same interface, or netboot beside a dnsmasq run with
``--bind-interfaces``, both bound port 67 (SO_REUSEADDR on both) and both answered, each
client taking whichever offer came first. dnsmasq refuses the second: "failed to bind DHCP
server socket: Address in use". Real sockets, real dnsmasq, in a namespace of the test's own
(``tests.netns``) with veth pairs made inside it; nothing touches the host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import subprocess
import sys
import time

import pytest

from netboot.errors import ConfigError
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.dhcp_fakes import MemoryLeaseStore, TableDecider
from tests.netns import in_namespace, ip, namespace, udp_sockets, until

__all__ = ["namespace"]  # the fixture, used by name

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]


def dnsmasq_args(ns: str) -> list[str]:
    """The site's DHCP server on d0: a dnsmasq run as libvirt runs its own on virbr0."""
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None
    return ["ip", "netns", "exec", ns, dnsmasq, "--no-daemon", "--port=0",
            "--bind-interfaces", "--interface=d0", "--except-interface=lo",
            "--dhcp-range=192.0.2.100,192.0.2.150,1h", "--leasefile-ro",
            "--conf-file=/dev/null", "--pid-file=", "--log-facility=-"]


def stopped(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    return proc.stdout.read() if proc.stdout else ""


def interfaces(ns: str, *names: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                    "net.ipv4.conf.all.promote_secondaries=1",
                    "net.ipv4.conf.default.promote_secondaries=1"], check=True, timeout=20)
    for number, name in enumerate(names):
        # A veth pair with both ends in the namespace (no dummy module on every kernel).
        ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        ip("-n", ns, "link", "set", f"{name}p", "up")
        ip("-n", ns, "addr", "add", f"198.51.100.{number + 1}/24" if number else
           "192.0.2.1/24", "dev", name)
        ip("-n", ns, "link", "set", name, "up")


# Authoritative DHCP: the mode that is a DHCP server (a proxyDHCP is made to run beside one).
AUTHORITATIVE = DhcpSettings(mode="authoritative", pool_start="192.0.2.100",
                             pool_end="192.0.2.109")


def server(*interfaces: str, settings: DhcpSettings = AUTHORITATIVE) -> DhcpServer:
    return DhcpServer(settings, TableDecider(), MemoryLeaseStore(),
                      interfaces=list(interfaces), advertise=None, probe=False)


async def refused(second: DhcpServer) -> ConfigError | None:
    try:
        await second.start()
    except ConfigError as exc:
        return exc
    await second.close()
    return None


def test_a_second_dhcp_server_on_the_same_interface_is_refused(namespace: str) -> None:
    """Two authoritative netboots on d0: the second stops with the port, the interface and the fix.
    netboot's own listeners (d0 and d1 in one server, :67 and :4011 each), a second netboot
    on another interface, and a listener made again when its interface is readdressed
    still bind."""
    interfaces(namespace, "d0", "d1")

    async def scenario() -> tuple[dict[str | None, str], ConfigError | None,
                                  dict[str | None, str]]:
        first = server("d0")
        await first.start()
        try:
            second = await refused(server("d0"))
            other = server("d1")  # the other interface: another network, another server
            await other.start()
            elsewhere = dict(other.interfaces)
            await other.close()
            both = server("d0", "d1")
            both_error = await refused(both)  # d0 is the first's
            assert both_error is not None
        finally:
            await first.close()
        both = server("d0", "d1")
        await both.start()
        try:
            listening = dict(both.interfaces)
            # Readdressed in one step (the secondary promoted as the primary goes): d0's
            # listeners are let go and bound again on the same device at once.
            await asyncio.to_thread(ip, "-n", namespace, "addr", "add", "192.0.2.5/24",
                                    "dev", "d0")
            await asyncio.to_thread(ip, "-n", namespace, "addr", "del", "192.0.2.1/24",
                                    "dev", "d0")
            for _ in range(100):
                if both.interfaces.get("d0") == "192.0.2.5":
                    break
                await asyncio.sleep(0.05)
            listening["again"] = both.interfaces.get("d0") or ""
        finally:
            await both.close()
        return listening, second, elsewhere

    listening, second, elsewhere = in_namespace(namespace, scenario)
    assert second is not None, "a second DHCP server on d0 was let start"
    text = str(second)
    assert "UDP 0.0.0.0:67 on d0" in text and "already" in text, text
    assert second.fix is not None and "d0" in second.fix, text
    assert elsewhere == {"d1": "198.51.100.2"}
    assert listening == {"d0": "192.0.2.1", "d1": "198.51.100.2", "again": "192.0.2.5"}


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
def test_netboot_beside_dnsmasq_on_the_same_interface_is_refused(namespace: str) -> None:
    """dnsmasq with --bind-interfaces (SO_REUSEADDR and SO_REUSEPORT on its 0.0.0.0:67) on
    d0: authoritative netboot on d0 is refused, on d1 it starts; and dnsmasq started after
    authoritative netboot on d0 fails to bind, as it does beside another dnsmasq."""
    interfaces(namespace, "d0", "d1")
    args = dnsmasq_args(namespace)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # dnsmasq with one interface binds it: "0.0.0.0%d0:67" in ss.
        assert until(lambda: b"%d0:67 " in subprocess.run(
            ["ip", "netns", "exec", namespace, "ss", "-uanHp"], capture_output=True,
            timeout=20).stdout, 10) is not None, "dnsmasq did not listen"

        async def beside() -> tuple[ConfigError | None, dict[str | None, str]]:
            error = await refused(server("d0"))
            other = server("d1")
            await other.start()
            await other.close()
            return error, dict(other.interfaces)

        error, _ = in_namespace(namespace, beside)
    finally:
        stopped(proc)
    assert error is not None, "netboot started on d0 beside dnsmasq on d0"
    assert "UDP 0.0.0.0:67 on d0" in str(error), str(error)

    async def first_then_dnsmasq() -> tuple[int | None, str]:
        first = server("d0")
        await first.start()
        try:
            late = await asyncio.create_subprocess_exec(
                *args[4:], stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(late.communicate(), 10)
            except TimeoutError:
                late.terminate()
                out, _ = await late.communicate()
                return None, out.decode()
            return late.returncode, out.decode()
        finally:
            await first.close()

    started = time.monotonic()
    code, out = in_namespace(namespace, first_then_dnsmasq)
    assert time.monotonic() - started < 30
    assert code not in (None, 0) and "Address already in use" in out, (code, out)


# A PXE client on the far end of d0 (d0p, moved to a namespace of its own): it broadcasts one
# DISCOVER (broadcast flag: both servers answer by broadcast) and prints each reply in hex
# (two at most: the two servers').
_PXE_CLIENT = r"""
import select, socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, 25, b"d0p")  # SO_BINDTODEVICE
sock.bind(("0.0.0.0", 68))
sock.sendto(bytes.fromhex(sys.argv[1]), ("255.255.255.255", 67))
end, replies = time.monotonic() + 5, 0
while time.monotonic() < end and replies < 2:
    if select.select([sock], [], [], 0.2)[0]:
        print(sock.recv(4096).hex(), flush=True)
        replies += 1
"""


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
def test_a_proxydhcp_beside_the_sites_dhcp_server_on_the_same_interface_starts(
        namespace: str) -> None:
    """A proxyDHCP is made to run beside the site's DHCP server, which may be on this host
    (libvirt's dnsmasq on virbr0, a router's dnsmasq): netboot in proxy mode on d0 beside a
    dnsmasq serving addresses on d0 starts, whichever starts first, and a PXE client's
    DISCOVER gets both offers, dnsmasq's address and netboot's boot file, as with dnsmasq's
    own proxy mode beside another dnsmasq."""
    interfaces(namespace, "d0", "d1")
    client_ns = f"{namespace}-c"
    ip("netns", "add", client_ns)
    try:
        ip("-n", namespace, "link", "set", "d0p", "netns", client_ns)
        ip("-n", client_ns, "addr", "add", "192.0.2.50/24", "dev", "d0p")
        ip("-n", client_ns, "link", "set", "d0p", "up")
        discover = dhcp.Packet(
            op=Op.REQUEST, xid=0x5EED0040, chaddr=bytes.fromhex("525400004040"),
            flags=dhcp.BROADCAST_FLAG, options=(
                dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.DISCOVER,))),
                dhcp.Option(Opt.PARAMETER_REQUEST_LIST, bytes((1, 3, 43, 60, 66, 67))),
                dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00000:UNDI:002001"),
                dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x00"),
                dhcp.Option(Opt.CLIENT_NDI, b"\x01\x02\x01")))
        client = ["ip", "netns", "exec", client_ns, sys.executable, "-c", _PXE_CLIENT,
                  dhcp.encode(discover, pad_to=300).hex()]
        proxy = DhcpSettings()
        for dnsmasq_first in (True, False):
            proc: subprocess.Popen[str] | None = None
            if dnsmasq_first:
                proc = subprocess.Popen(dnsmasq_args(namespace), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
                assert until(lambda: udp_sockets(namespace, "%d0:67") > 0, 10) is not None

            async def scenario(proc: subprocess.Popen[str] | None) -> tuple[
                    ConfigError | None, subprocess.Popen[str] | None, list[str]]:
                netboot = server("d0", settings=proxy)
                error = await refused_or_kept(netboot)
                if error is not None:
                    return error, proc, []
                try:
                    if proc is None:
                        proc = subprocess.Popen(dnsmasq_args(namespace),
                                                stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True)
                        for _ in range(200):
                            if udp_sockets(namespace, "%d0:67") > 1 or proc.poll() is not None:
                                break
                            await asyncio.sleep(0.05)
                    out = await asyncio.to_thread(subprocess.run, client, capture_output=True,
                                                  text=True, timeout=30)
                    return None, proc, out.stdout.split()
                finally:
                    await netboot.close()

            try:
                error, proc, replies = in_namespace(namespace, functools.partial(scenario, proc))
            finally:
                log = stopped(proc) if proc is not None else ""
            assert error is None, f"proxy netboot refused beside the site's dnsmasq: {error}"
            offers = [dhcp.parse(bytes.fromhex(r)) for r in replies]
            assert sorted((o.yiaddr == "0.0.0.0", o.file_name or "") for o in offers
                          if o.xid == 0x5EED0040 and o.message_type == MessageType.OFFER) == [
                (False, ""), (True, "undionly.kpxe")], (dnsmasq_first, offers, log)
    finally:
        subprocess.run(["ip", "netns", "del", client_ns], capture_output=True, timeout=20)


async def refused_or_kept(netboot: DhcpServer) -> ConfigError | None:
    """``netboot`` started (and kept, for the caller to close), or the ConfigError that
    refused it."""
    try:
        await netboot.start()
    except ConfigError as exc:
        return exc
    return None


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
def test_a_proxydhcp_that_cannot_share_port_67_names_the_fix(namespace: str) -> None:
    """Where the site's DHCP server on this host does not let port 67 be shared, the error
    said "stop the other service or choose another port with --dhcp-port": a proxyDHCP on
    another port answers no client, and stopping the site's DHCP server is no fix. Without
    server.interfaces (dnsmasq --bind-interfaces on d0): name the interface. On d0 beside a
    dnsmasq that binds every interface (no --bind-interfaces: no SO_REUSEADDR): that one
    does not share it."""
    interfaces(namespace, "d0", "d1")
    proxy = DhcpSettings()
    errors: list[ConfigError | None] = []
    for args in (dnsmasq_args(namespace),
                 [a for a in dnsmasq_args(namespace) if a != "--bind-interfaces"]):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            assert until(lambda: udp_sockets(namespace, ":67") > 0, 10) is not None
            netboot = (DhcpServer(proxy, TableDecider(), MemoryLeaseStore(), interfaces=[],
                                  advertise="192.0.2.1", probe=False)
                       if "--bind-interfaces" in args else server("d0", settings=proxy))
            errors.append(in_namespace(namespace, lambda netboot=netboot: refused(netboot)))
        finally:
            stopped(proc)
    unnamed, named = errors
    assert unnamed is not None and unnamed.fix is not None, unnamed
    assert "--interface" in unnamed.fix and "--dhcp-port" not in unnamed.fix, unnamed
    assert named is not None and named.fix is not None, named
    assert "--bind-interfaces" in named.fix and "on d0" in str(named), named
