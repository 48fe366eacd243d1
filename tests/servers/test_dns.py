"""The DNS server on 127.0.0.1 port 0, queried with dig (bind9-dnsutils) and dnspython.

Every upstream resolver here is a tiny asyncio responder started by the test on loopback.
Nothing waits on wall-clock time except the short upstream timeouts that a test is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.errors import ConfigError, DecodeError
from netboot.model import Cluster, MacAddress, Machine, MachineState, Role
from netboot.names import Zone, ZoneHolder
from netboot.servers.dns import DnsServer

LOOPBACK = "127.0.0.1"
DIG = shutil.which("dig")
needs_dig = pytest.mark.requires("dig", "bind9-dnsutils")


def make_zone(servers: int = 80) -> Zone:
    machines = [
        Machine(
            (MacAddress(bytes([0x52, 0x54, 0, 0, 1, i])),),
            hostname=f"node{i}",
            ipv4=f"10.0.1.{i}",
            cluster="edge",
            role=Role.SERVER,
            state=MachineState.REGISTERED,
        )
        for i in range(1, servers + 1)
    ]
    machines.append(Machine((MacAddress(bytes([0x52, 0x54, 0, 0, 2, 1])),), hostname="small",
                            ipv4="10.0.2.1", cluster="tiny", role=Role.SERVER,
                            state=MachineState.REGISTERED))
    return Zone.build(machines, [Cluster("edge"), Cluster("tiny"), Cluster("empty")],
                      zone="netboot.lan", server_addrs=["10.0.0.1", "fd00::1"], serial=2024)


@contextlib.asynccontextmanager
async def running(**kw: Any) -> AsyncIterator[DnsServer]:
    server = DnsServer(ZoneHolder(kw.pop("zone", None) or make_zone()), host=LOOPBACK, port=0,
                       **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class Upstream(asyncio.DatagramProtocol):
    """A loopback resolver: answers every A query with 192.0.2.7, or stays silent."""

    def __init__(self, behaviour: str = "answer") -> None:
        self.behaviour = behaviour
        self.seen: list[bytes] = []
        self.sources: list[tuple[str, int]] = []  # where each query came from
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.seen.append(data)
        self.sources.append((addr[0], addr[1]))
        if self.behaviour == "silent":
            return
        request = DNSRecord.parse(data)
        reply = request.reply(ra=1, aa=0)
        if self.behaviour == "wrong-question":
            reply.q.qname = "elsewhere.example"
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=30))
        self.transport.sendto(reply.pack(), addr)


@contextlib.asynccontextmanager
async def upstream(behaviour: str = "answer") -> AsyncIterator[tuple[Upstream, int]]:
    loop = asyncio.get_running_loop()
    proto = Upstream(behaviour)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(LOOPBACK, 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


async def dig(port: int, *args: str) -> str:
    assert DIG is not None
    proc = await asyncio.create_subprocess_exec(
        DIG, f"@{LOOPBACK}", "-p", str(port), "+tries=1", "+time=5", *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode()


def flags_of(out: str) -> set[str]:
    line = next(x for x in out.splitlines() if x.startswith(";; flags:"))
    return set(line.split(";")[2].split(":")[1].split())


def status_of(out: str) -> str:
    line = next(x for x in out.splitlines() if "status:" in x)
    return line.split("status:")[1].split(",")[0].strip()


async def udp_exchange(port: int, payload: bytes, *, expect_reply: bool = True) -> bytes | None:
    """Send one datagram from a fresh socket; wait (bounded) for one reply."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(LOOPBACK, port))
    try:
        transport.sendto(payload)
        if not expect_reply:
            return None
        return await asyncio.wait_for(received, 10)
    finally:
        transport.close()


# -- authoritative answers through dig ------------------------------------------------------


@needs_dig
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["node3.netboot.lan", "A", "+short"], ["10.0.1.3"]),
        (["netboot.netboot.lan", "AAAA", "+short"], ["fd00::1"]),
        (["-x", "10.0.1.3", "+short"], ["node3.netboot.lan."]),
        (["_k3s._tcp.tiny.netboot.lan", "SRV", "+short"], ["0 10 6443 small.netboot.lan."]),
        (["_kubernetes._tcp.tiny.netboot.lan", "SRV", "+short"],
         ["0 10 6443 small.netboot.lan."]),
        (["netboot.lan", "NS", "+short"], ["netboot.netboot.lan."]),
        (["netboot.lan", "SOA", "+short"],
         ["netboot.netboot.lan. hostmaster.netboot.lan. 2024 3600 600 86400 60"]),
        (["tiny.netboot.lan", "A", "+short"], ["10.0.2.1"]),
    ],
)
async def test_dig_record_types(args: list[str], expected: list[str]) -> None:
    async with running() as server:
        out = await dig(server.port, *args)
    assert out.split() == " ".join(expected).split()


@needs_dig
async def test_dig_flags_and_0x20_echo() -> None:
    async with running() as server:
        out = await dig(server.port, "NoDe3.NetBoot.Lan", "A")
    assert status_of(out) == "NOERROR"
    assert "aa" in flags_of(out)
    assert "ra" not in flags_of(out)  # no upstreams: no recursion offered
    assert ";NoDe3.NetBoot.Lan.\t" in out


@needs_dig
async def test_dig_nodata_and_nxdomain() -> None:
    async with running() as server:
        nodata = await dig(server.port, "node3.netboot.lan", "AAAA")
        nxdomain = await dig(server.port, "nobody.netboot.lan", "A")
        empty_cluster = await dig(server.port, "empty.netboot.lan", "A")
    for out in (nodata, empty_cluster):
        assert status_of(out) == "NOERROR"
        assert "ANSWER: 0" in out
        assert "AUTHORITY: 1" in out and "IN\tSOA" in out
    assert status_of(nxdomain) == "NXDOMAIN"
    assert "IN\tSOA" in nxdomain


@needs_dig
async def test_dig_truncation_then_tcp_retry() -> None:
    async with running() as server:
        udp_only = await dig(server.port, "edge.netboot.lan", "A", "+noedns", "+notcp",
                             "+ignore")
        retried = await dig(server.port, "edge.netboot.lan", "A", "+noedns")
        tcp = await dig(server.port, "edge.netboot.lan", "A", "+tcp")
    assert "tc" in flags_of(udp_only)
    assert "Truncated, retrying in TCP mode" in retried
    assert "ANSWER: 80" in retried
    assert "(TCP)" in retried
    assert "ANSWER: 80" in tcp


# -- dnspython -----------------------------------------------------------------------------


async def test_dnspython_udp_and_tcp() -> None:
    async with running() as server:
        q = dns.message.make_query("node7.netboot.lan", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR
        assert r.flags & dns.flags.AA
        assert [str(x) for x in r.answer[0]] == ["10.0.1.7"]

        big = dns.message.make_query("edge.netboot.lan", "A", use_edns=False)
        r = await dns.asyncquery.udp(big, LOOPBACK, port=server.port, timeout=5)
        assert r.flags & dns.flags.TC
        r = await dns.asyncquery.tcp(big, LOOPBACK, port=server.port, timeout=5)
        assert not r.flags & dns.flags.TC
        assert len(r.answer[0]) == 80

        ptr = dns.message.make_query("7.1.0.10.in-addr.arpa", "PTR")
        r = await dns.asyncquery.udp(ptr, LOOPBACK, port=server.port, timeout=5)
        assert [str(x) for x in r.answer[0]] == ["node7.netboot.lan."]

        nx = dns.message.make_query("ghost.netboot.lan", "A")
        r = await dns.asyncquery.udp(nx, LOOPBACK, port=server.port, timeout=5)
        assert r.rcode() == dns.rcode.NXDOMAIN
        assert r.authority[0].rdtype == dns.rdatatype.SOA


async def test_zone_swap_is_seen_by_next_query() -> None:
    holder = ZoneHolder(make_zone(servers=2))
    server = DnsServer(holder, host=LOOPBACK, port=0)
    await server.start()
    try:
        q = dns.message.make_query("edge.netboot.lan", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert len(r.answer[0]) == 2
        holder.replace(make_zone(servers=3))
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert len(r.answer[0]) == 3
    finally:
        await server.close()


async def test_tcp_several_queries_per_connection() -> None:
    async with running() as server:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        try:
            names = ["node1.netboot.lan", "node2.netboot.lan", "node3.netboot.lan"]
            for name in names:  # pipelined: all sent before any reply is read
                wire = DNSRecord.question(name).pack()
                writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            answers = []
            for _ in names:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
                reply = DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 10))
                answers.append(str(reply.rr[0].rdata))
            assert answers == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]
        finally:
            writer.close()
            await writer.wait_closed()


async def _asked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether one query over this connection is answered (False: the server closed it)."""
    wire = DNSRecord.question("node1.netboot.lan").pack()
    writer.write(len(wire).to_bytes(2, "big") + wire)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    head = await asyncio.wait_for(reader.read(2), 10)
    if len(head) < 2:
        return False
    size = int.from_bytes(head, "big")
    return bool(DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), 10)).rr)


async def _held(port: int, count: int, each: int, first: int = 2
                ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` connections, each asked once (so open and waiting for its next query),
    ``each`` from an address, from 127.0.0.<first> on."""
    held = []
    for i in range(count):
        conn = await asyncio.open_connection(
            LOOPBACK, port, local_addr=(f"127.0.0.{first + i // each}", 0))
        assert await _asked(*conn)
        held.append(conn)
    return held


async def test_tcp_connection_bound() -> None:
    """At most ``max_connections`` open: a newcomer takes the place of the connection that
    has waited longest for a query (nginx's reuse of idle keep-alive connections)."""
    async with running(max_connections=1) as server:
        first = await asyncio.open_connection(LOOPBACK, server.port)
        assert await _asked(*first)  # answered: now waiting for its next query
        second = await asyncio.open_connection(LOOPBACK, server.port)
        assert await _asked(*second)
        assert await asyncio.wait_for(first[0].read(), 10) == b""  # closed by the server
        assert len(server._writers) == 1 and server.connections_refused == 0
        for _, w in (first, second):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


async def test_hosts_holding_every_tcp_connection_do_not_keep_a_client_out() -> None:
    """s47-attack: a host with four addresses opened 16 connections from each (the most one
    address may, s45-attack), 64 in all, and kept them with a query every few seconds:
    every other client's TCP connection was closed at once, a truncated answer's retry
    too (live: 'dig +tcp' got 'end of file'). Now the one waiting longest for a query is
    closed for the newcomer, who is answered; the holder must ask without pause on every
    connection to keep them all."""
    async with running(max_connections=8, max_connections_per_source=2) as server:
        held = await _held(server.port, 8, 2)
        client = await asyncio.open_connection(LOOPBACK, server.port,
                                               local_addr=("127.0.0.9", 0))
        assert await _asked(*client)  # main: closed unanswered
        assert await asyncio.wait_for(held[0][0].read(), 10) == b""  # the longest waiting
        assert all([await _asked(*conn) for conn in held[1:]])  # the others still served
        for _, w in (*held, client):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


async def test_a_client_slow_to_ask_is_not_closed_for_another_hosts_newcomers() -> None:
    """s48-attack: with every connection open, each newcomer closed the one waiting longest
    for a query, whoever held it. A host opening connections as fast as they are accepted
    (live: 3,500-16,700 a second from four addresses) so closed any client whose query had
    not arrived within ~64 accepts of its connection: asking 50 ms after connecting, 11 of
    20 answered.
    Now the connection closed is one of the source holding the most (the longest waiting
    of those): a host's own newcomers close its own connections, not a lone client's."""
    async with running(max_connections=8, max_connections_per_source=4) as server:
        held = await _held(server.port, 7, 4)  # 127.0.0.2 holds four, .3 three: waiting
        slow = await asyncio.open_connection(LOOPBACK, server.port,
                                             local_addr=("127.0.0.9", 0))
        for _ in range(1000):  # bounded: accepted within a few turns of the loop
            if len(server._writers) == 8:
                break
            await asyncio.sleep(0.01)
        assert len(server._writers) == 8
        # The host's newcomers, from two more addresses, four each.
        held += await _held(server.port, 8, 4, first=4)
        assert await _asked(*slow)  # main: closed unanswered (the longest waiting by then)
        for _, w in (*held, slow):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


async def test_one_source_cannot_hold_every_tcp_connection() -> None:
    """s45-attack: one client address could open every TCP connection (64) and keep them,
    each idle until the timeout, then again: nobody else could ask over TCP, where a
    truncated answer (a forwarded one past 1,232 bytes since this pass) must be asked
    again. Now 16 a source (max_connections_per_source); another address is served."""
    async with running(max_connections=64, max_connections_per_source=3) as server:
        wire = DNSRecord.question("node1.netboot.lan").pack()
        held = [await asyncio.open_connection(LOOPBACK, server.port) for _ in range(3)]
        for reader, writer in held:  # each served: counted as open
            writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(2), 10)
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the 4th from 127.0.0.1
        assert server.connections_refused == 1
        other = await asyncio.open_connection(LOOPBACK, server.port, local_addr=("127.0.0.2", 0))
        other[1].write(len(wire).to_bytes(2, "big") + wire)
        await other[1].drain()
        size = int.from_bytes(await asyncio.wait_for(other[0].readexactly(2), 10), "big")
        assert DNSRecord.parse(await other[0].readexactly(size)).rr  # answered
        held[0][1].close()  # one of the first three goes: 127.0.0.1 may open one again
        await held[0][1].wait_closed()
        again = None
        for _ in range(100):  # bounded: the server sees the close within a loop turn or two
            again = await asyncio.open_connection(LOOPBACK, server.port)
            again[1].write(len(wire).to_bytes(2, "big") + wire)
            await again[1].drain()
            head = await asyncio.wait_for(again[0].read(2), 10)
            if head:
                break
            again[1].close()
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("127.0.0.1 was never served again")
        for _, w in (*held[1:], (reader, writer), other, again):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


# -- robustness ----------------------------------------------------------------------------


async def test_malformed_datagrams_do_not_stop_the_listener() -> None:
    async with running() as server:
        garbage = [b"\x00", b"\xff" * 11, b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 40,
                   bytes(range(256)), b"\x12\x34\x81\x80" + bytes(8)]
        for payload in garbage:
            await udp_exchange(server.port, payload, expect_reply=False)
        # A query header with a broken question gets FORMERR with the same ID.
        formerr = await udp_exchange(server.port, b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 40)
        assert formerr is not None
        assert formerr[:4] == b"\x12\x34\x81\x01"
        q = dns.message.make_query("node1.netboot.lan", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR


async def test_malformed_tcp_message_closes_only_that_connection() -> None:
    async with running() as server:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        junk = b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 40
        writer.write(len(junk).to_bytes(2, "big") + junk)
        await writer.drain()
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
        assert (await reader.readexactly(size))[3] & 0x0F == 1  # FORMERR
        writer.close()
        await writer.wait_closed()
        q = dns.message.make_query("node1.netboot.lan", "A")
        r = await dns.asyncquery.tcp(q, LOOPBACK, port=server.port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR


async def test_port_in_use_is_a_config_error() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind((LOOPBACK, 0))
    try:
        server = DnsServer(ZoneHolder(make_zone(2)), host=LOOPBACK, port=taken.getsockname()[1])
        with pytest.raises(ConfigError) as err:
            await server.start()
        assert err.value.key == "dns.port"
        assert str(taken.getsockname()[1]) in str(err.value)
    finally:
        taken.close()


# -- forwarding ----------------------------------------------------------------------------


async def test_forwarding_to_upstream() -> None:
    async with upstream() as (up, up_port), running(upstreams=[(LOOPBACK, up_port)]) as server:
        q = dns.message.make_query("www.example.com", "A", want_dnssec=True)
        q.id = 4321
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert r.id == 4321
        assert r.rcode() == dns.rcode.NOERROR
        assert [str(x) for x in r.answer[0]] == ["192.0.2.7"]
        assert r.flags & dns.flags.RA
        assert not r.flags & dns.flags.AA
        # The upstream got the client's bytes with only the ID rewritten (DO bit kept).
        sent = q.to_wire()
        assert len(up.seen) == 1
        assert up.seen[0][2:] == sent[2:]
        # Zone answers still come from the zone, and now advertise recursion.
        r = await dns.asyncquery.udp(dns.message.make_query("node1.netboot.lan", "A"),
                                     LOOPBACK, port=server.port, timeout=5)
        assert r.flags & dns.flags.AA and r.flags & dns.flags.RA
        assert len(up.seen) == 1


@needs_dig
async def test_forwarding_with_dig_over_udp_and_tcp() -> None:
    async with upstream() as (_, up_port), running(upstreams=[(LOOPBACK, up_port)]) as server:
        udp = await dig(server.port, "www.example.org", "A", "+short")
        tcp = await dig(server.port, "www.example.org", "A", "+short", "+tcp")
    assert udp.split() == ["192.0.2.7"]
    assert tcp.split() == ["192.0.2.7"]


async def test_each_forwarded_query_leaves_from_a_port_of_its_own() -> None:
    """s45-attack: every forwarded query left from one socket, connected at start, so from one
    source port for the process's life: a host that can forge the upstream's address had the
    16-bit ID alone to guess (each forged reply matched a query in flight with odds of
    in-flight/65,536; dnsmasq draws a random port per query unless ``--query-port`` is set,
    "less secure against DNS spoofing attacks", RFC 5452 §9.2). Seen from the upstream's
    side: 12 queries, 12 source ports (the kernel's random pick, ~28,000 of them), each
    answered."""
    async with upstream() as (up, up_port), running(upstreams=[(LOOPBACK, up_port)]) as server:
        for i in range(12):
            q = dns.message.make_query(f"www{i}.example.com", "A")
            r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
            assert [str(x) for x in r.answer[0]] == ["192.0.2.7"]
        ports = [port for _, port in up.sources]
        assert len(ports) == 12
        # Distinct but for a rare repeat of the kernel's draw (never 3 in 12 by chance).
        assert len(set(ports)) >= 10, ports
        assert server.forwarder.in_flight == 0


async def test_a_client_the_server_does_not_forward_for_is_refused_names_outside_the_zone(
) -> None:
    """s45-attack: ``forwards_for`` (service.py gives this host's networks, the relays',
    the pool's and dns.forward_networks) says whose names outside the zone go upstream;
    another client gets REFUSED for those, over UDP and TCP, and its zone names still."""
    async with upstream() as (up, up_port), running(
        upstreams=[(LOOPBACK, up_port)], forwards_for=lambda address: address != LOOPBACK
    ) as server:
        for tcp in (False, True):
            q = dns.message.make_query("www.example.com", "A")
            ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            r = await ask(q, LOOPBACK, port=server.port, timeout=5)
            assert r.rcode() == dns.rcode.REFUSED and not r.answer
            r = await ask(dns.message.make_query("node1.netboot.lan", "A"), LOOPBACK,
                          port=server.port, timeout=5)
            assert [str(x) for x in r.answer[0]] == ["10.0.1.1"]
        assert up.seen == []


async def test_upstream_timeout_gives_servfail() -> None:
    async with upstream("silent") as (up, up_port), running(
        upstreams=[(LOOPBACK, up_port)], timeout=0.2
    ) as server:
        q = dns.message.make_query("slow.example.com", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=10)
        assert r.rcode() == dns.rcode.SERVFAIL
        assert len(up.seen) == 1
        assert server.forwarder.failures == 1


async def test_next_upstream_tried_after_timeout() -> None:
    # The timeout bounds the answering upstream's reply too: 2 s, not 0.2 s (a loaded
    # machine's process can stall that long between the reply's send and its read).
    async with upstream("silent") as (_, silent), upstream() as (good, good_port), running(
        upstreams=[(LOOPBACK, silent), (LOOPBACK, good_port)], timeout=2.0
    ) as server:
        q = dns.message.make_query("www.example.net", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=10)
        assert [str(x) for x in r.answer[0]] == ["192.0.2.7"]
        assert len(good.seen) == 1


async def test_reply_with_wrong_question_is_not_accepted() -> None:
    async with upstream("wrong-question") as (_, up_port), running(
        upstreams=[(LOOPBACK, up_port)], timeout=0.2
    ) as server:
        q = dns.message.make_query("victim.example.com", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=10)
        assert r.rcode() == dns.rcode.SERVFAIL


async def test_forwarding_off_refuses() -> None:
    async with upstream() as (up, up_port), running(
        upstreams=[(LOOPBACK, up_port)], forward=False
    ) as server:
        q = dns.message.make_query("www.example.com", "A")
        r = await dns.asyncquery.udp(q, LOOPBACK, port=server.port, timeout=5)
        assert r.rcode() == dns.rcode.REFUSED
        assert not r.flags & dns.flags.RA
        assert up.seen == []


async def test_in_flight_bound_answers_servfail_at_once() -> None:
    async with upstream("silent") as (up, up_port), running(
        upstreams=[(LOOPBACK, up_port)], timeout=60, max_in_flight=2
    ) as server:
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        make: Callable[[], asyncio.DatagramProtocol] = lambda: _QueueClient(replies)  # noqa: E731
        transport, _ = await loop.create_datagram_endpoint(make,
                                                           remote_addr=(LOOPBACK, server.port))
        try:
            for i in range(3):  # loopback keeps the order: two take the slots, one is over
                transport.sendto(DNSRecord.question(f"q{i}.example.com").pack())
            reply = DNSRecord.parse(await asyncio.wait_for(replies.get(), 10))
            assert str(reply.q.qname) == "q2.example.com."
            assert reply.header.rcode == dns.rcode.SERVFAIL
            assert server.forwarder.in_flight == 2
            assert len(up.seen) <= 2
        finally:
            transport.close()


def _free_port() -> int:
    """A port free for both UDP and TCP on loopback, for a program that needs a number."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((LOOPBACK, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


@contextlib.asynccontextmanager
async def dnsmasq_upstream(*args: str) -> AsyncIterator[int]:
    """A real dnsmasq on loopback answering its own records (``--txt-record``), no upstream
    of its own; its port once it answers."""
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--pid-file=", f"--port={port}", f"--listen-address={LOOPBACK}", "--bind-interfaces",
        *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        probe = dns.message.make_query("ready.invalid", "A")
        for _ in range(100):  # bounded: 100 x 0.1 s
            with contextlib.suppress(TimeoutError, OSError, dns.exception.DNSException):
                await dns.asyncquery.udp(probe, LOOPBACK, port=port, timeout=0.1)
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("dnsmasq did not answer")
        yield port
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.requires("dnsmasq", "dnsmasq-base")
async def test_a_forwarded_answer_larger_than_the_client_takes_is_truncated_over_udp() -> None:
    """s45-attack: a client's query went upstream with its EDNS payload, and the upstream's
    answer came back to it as is, whatever its size: an upstream that answers up to the
    payload asked (dnsmasq ``--edns-packet-max=4096`` here; Windows DNS Server's default
    is 4,000) made a forged 40-byte query a ~100x reflection. Now a forwarded UDP answer is
    at most what the zone's own answers are (512 without EDNS, the client's payload up to
    1,232 with), else TC, and the client gets the whole answer over TCP."""
    text = "x" * 250
    records = [f"--txt-record=big.example.org,{i:02d}{text}" for i in range(14)]
    async with dnsmasq_upstream("--edns-packet-max=4096", *records) as up_port, running(
        upstreams=[(LOOPBACK, up_port)]
    ) as server:
        # The upstream itself answers a 4,096-byte payload with all 14 records, ~3.7 KB.
        big = dns.message.make_query("big.example.org", "TXT", use_edns=0, payload=4096)
        direct = await dns.asyncquery.udp(big, LOOPBACK, port=up_port, timeout=5)
        assert len(direct.answer[0]) == 14 and len(direct.to_wire()) > 3600
        for query, limit in ((big, 1232),
                             (dns.message.make_query("big.example.org", "TXT", use_edns=0,
                                                     payload=65000), 1232),
                             (dns.message.make_query("big.example.org", "TXT", use_edns=0,
                                                     payload=700), 700),
                             (dns.message.make_query("big.example.org", "TXT",
                                                     use_edns=False), 512)):
            raw = await udp_exchange(server.port, query.to_wire())
            assert raw is not None and len(raw) <= limit, (len(raw or b""), limit)
            reply = dns.message.from_wire(raw)
            assert reply.id == query.id and reply.flags & dns.flags.TC
            assert reply.rcode() == dns.rcode.NOERROR
            if query.payload > limit:  # ours: header and question (below it, dnsmasq's own)
                assert not reply.answer
            assert [str(q.name) for q in reply.question] == ["big.example.org."]
            assert (reply.edns >= 0) == (query.edns >= 0)
        # What fits is passed on as the upstream sent it; TCP gets everything.
        small = dns.message.make_query("small.example.org", "TXT", use_edns=0, payload=4096)
        reply = await dns.asyncquery.udp(small, LOOPBACK, port=server.port, timeout=5)
        assert not reply.flags & dns.flags.TC
        whole = await dns.asyncquery.tcp(big, LOOPBACK, port=server.port, timeout=5)
        assert len(whole.answer[0]) == 14 and not whole.flags & dns.flags.TC


class _QueueClient(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[bytes]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait(data)


def test_cache_key_shapes() -> None:
    from dnslib import DNSRecord

    from netboot.servers.dns import cache_key

    def raw(name: str, qtype: str, qid: int = 1) -> bytes:
        q = DNSRecord.question(name, qtype)
        q.header.id = qid
        return bytes(q.pack())

    a = cache_key(raw("Node1.NetBoot.lan", "A", 1))
    b = cache_key(raw("node1.netboot.LAN", "A", 2))
    assert a is not None and b is not None and a == b  # ID and name case do not matter
    # Type 65 (HTTPS, 0x0041 = "A") and type 97 must not fold together like letters would.
    h = cache_key(raw("node1.netboot.lan", "TYPE65"))
    t = cache_key(raw("node1.netboot.lan", "TYPE97"))
    assert h is not None and t is not None and h[0] != t[0]
    response = bytearray(raw("x.netboot.lan", "A"))
    response[2] |= 0x80
    assert cache_key(bytes(response)) is None  # a response is never a cache key
    assert cache_key(b"\x00" * 11) is None


def _query(name: str = "node1.netboot.lan", qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


@settings(max_examples=2000)
@given(st.one_of(st.binary(max_size=600),
                 st.tuples(st.sampled_from([_query(), _query("x.in-addr.arpa", "PTR"),
                                            _query("_k3s._tcp.edge.netboot.lan", "SRV")]),
                           st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)),
                                    max_size=6),
                           st.integers(0, 90)).map(lambda t: _mutate(*t))))
def test_fuzz_the_servers_own_decoding_never_raises(data: bytes) -> None:
    """What the DNS server reads before (the cache key) and beside (a forwarded reply's
    question) the full parser: a malformed datagram is "not this", never an exception."""
    from netboot.names import parse_query
    from netboot.servers.dns import _question_of, cache_key

    found = cache_key(data)
    if found is not None:
        key, qend = found
        assert 17 <= qend <= len(data) and key
    question = _question_of(data)
    assert question is None or len(question) == 6
    with contextlib.suppress(DecodeError):  # the one error a malformed query may give
        parse_query(data)


def _mutate(seed: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    return bytes(data[:cut]) if cut < len(data) else bytes(data)


async def test_cached_answers_echo_each_querys_id_and_case() -> None:
    from dnslib import DNSRecord

    async with running() as server:
        replies = []
        for qid, name in ((11, "NODE1.netboot.lan"), (22, "node1.NETBOOT.LAN"),
                          (33, "nOdE1.NeTbOoT.lAn")):
            q = DNSRecord.question(name, "A")
            q.header.id = qid
            data = await udp_exchange(server.port, bytes(q.pack()))
            assert data is not None
            reply = DNSRecord.parse(data)
            assert reply.header.id == qid
            assert str(reply.q.qname) == name + "."  # 0x20: the asker's case comes back
            replies.append([str(rr.rdata) for rr in reply.rr])
        assert replies[0] == replies[1] == replies[2] == ["10.0.1.1"]
        assert server._cache.hits >= 2  # the second and third came from the cache
