"""netboot.names: the zone snapshot and the answering decision, without sockets."""

from __future__ import annotations

import dataclasses

import pytest
from dnslib import CLASS, EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.errors import ConfigError, DecodeError
from netboot.model import Cluster, MacAddress, Machine, MachineState, Role
from netboot.names import (
    BADVERS,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    REFUSED,
    Answer,
    Forward,
    Ignore,
    Zone,
    ZoneHolder,
    answer,
    formerr_for,
    parse_query,
    serves_cluster,
)


def machine(i: int, **kw: object) -> Machine:
    base: dict[str, object] = {
        "macs": (MacAddress(bytes([0xAA, 0xBB, 0xCC, 0xDD, i // 256, i % 256])),),
        "hostname": f"node{i}",
        "ipv4": f"10.0.0.{10 + i}",
        "cluster": "edge",
        "role": Role.AGENT,
        "state": MachineState.REGISTERED,
    }
    base.update(kw)
    return Machine(**base)  # type: ignore[arg-type]


def inventory() -> list[Machine]:
    return [
        machine(0, role=Role.SERVER),
        machine(1, role=Role.SERVER),
        machine(2, role=Role.SERVER, state=MachineState.FAILED),
        machine(3, role=Role.SERVER, state=MachineState.INSTALLING),
        machine(4),
        machine(5, hostname=None),
        machine(6, ipv4=None),
        machine(7, hostname="not_a_label"),
        machine(8, hostname="node0"),  # duplicate of node0
    ]


def build(machines: list[Machine] | None = None, **kw: object) -> Zone:
    args: dict[str, object] = {
        "zone": "netboot.lan",
        "server_addrs": ["10.0.0.1", "fd00::1"],
        "serial": 42,
    }
    args.update(kw)
    return Zone.build(
        inventory() if machines is None else machines,
        [Cluster("edge"), Cluster("empty")],
        **args,  # type: ignore[arg-type]
    )


def ask(
    zone: Zone, name: str, qtype: str = "A", *, max_udp: int | None = 1232,
    recursion: bool = False, edns: int | None = None,
) -> DNSRecord:
    question = DNSQuestion(name, getattr(QTYPE, qtype))
    request = DNSRecord(DNSHeader(id=4242, rd=1), questions=[question])
    if edns is not None:
        request.add_ar(EDNS0(udp_len=edns))
    decision = answer(zone, parse_query(request.pack()), max_udp=max_udp, recursion=recursion)
    assert isinstance(decision, Answer), decision
    reply = DNSRecord.parse(decision.data)
    assert reply.header.rcode == decision.rcode & 0x0F
    return reply


def rdata(reply: DNSRecord, section: str = "rr") -> list[str]:
    return sorted(str(rr.rdata) for rr in getattr(reply, section))


def test_a_record_of_machine_is_authoritative() -> None:
    reply = ask(build(), "node1.netboot.lan")
    assert reply.header.rcode == NOERROR
    assert reply.header.aa == 1
    assert reply.header.ra == 0  # no recursion offered
    assert reply.header.id == 4242
    assert rdata(reply) == ["10.0.0.11"]


def test_question_is_echoed_with_its_case() -> None:
    reply = ask(build(), "NoDe1.NetBoot.LAN")
    assert reply.q.qname.label == (b"NoDe1", b"NetBoot", b"LAN")
    assert rdata(reply) == ["10.0.0.11"]


def test_server_name_has_a_and_aaaa() -> None:
    zone = build()
    assert rdata(ask(zone, "netboot.netboot.lan")) == ["10.0.0.1"]
    assert rdata(ask(zone, "netboot.netboot.lan", "AAAA")) == ["fd00::1"]


def test_soa_and_ns_at_apex() -> None:
    zone = build()
    soa = ask(zone, "netboot.lan", "SOA")
    assert len(soa.rr) == 1
    assert soa.rr[0].rdata.times[0] == 42
    assert str(soa.rr[0].rdata.mname) == "netboot.netboot.lan."
    ns = ask(zone, "netboot.lan", "NS")
    assert rdata(ns) == ["netboot.netboot.lan."]
    assert rdata(ns, "ar") == ["10.0.0.1", "fd00::1"]  # glue for the NS target


def test_nodata_is_noerror_with_soa_in_authority() -> None:
    reply = ask(build(), "node1.netboot.lan", "AAAA")
    assert reply.header.rcode == NOERROR
    assert reply.rr == []
    assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]
    assert reply.header.aa == 1


def test_nxdomain_with_soa_in_authority() -> None:
    reply = ask(build(), "nothing.netboot.lan")
    assert reply.header.rcode == NXDOMAIN
    assert [rr.rtype for rr in reply.auth] == [QTYPE.SOA]
    # RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM)
    assert reply.auth[0].ttl == 60


def test_empty_non_terminal_is_nodata() -> None:
    reply = ask(build(), "_tcp.edge.netboot.lan", "SRV")
    assert reply.header.rcode == NOERROR
    assert reply.rr == []


def test_skipped_and_conflicting_machines() -> None:
    zone = build()
    assert ask(zone, "node5.netboot.lan").header.rcode == NXDOMAIN  # no hostname
    assert ask(zone, "node6.netboot.lan").header.rcode == NXDOMAIN  # no address
    assert rdata(ask(zone, "node0.netboot.lan")) == ["10.0.0.10"]  # first claim kept
    assert any("node0" in c for c in zone.conflicts)
    assert any("not_a_label" in s for s in zone.skipped)


def test_cluster_endpoint_is_registered_servers_only() -> None:
    zone = build()
    assert rdata(ask(zone, "edge.netboot.lan")) == ["10.0.0.10", "10.0.0.11"]
    assert zone.endpoints["edge"] == ("10.0.0.10", "10.0.0.11")


def test_cluster_without_server_is_nodata() -> None:
    reply = ask(build(), "empty.netboot.lan")
    assert reply.header.rcode == NOERROR
    assert reply.rr == []
    srv = ask(build(), "_k3s._tcp.empty.netboot.lan", "SRV")
    assert srv.header.rcode == NOERROR
    assert srv.rr == []


def test_cluster_endpoint_follows_registration_and_failure() -> None:
    machines = inventory()
    holder = ZoneHolder(build(machines))
    # node3 finishes installing and registers: it joins the endpoint in the next snapshot.
    machines[3] = dataclasses.replace(machines[3], state=MachineState.REGISTERED)
    holder.replace(build(machines, serial=43))
    assert rdata(ask(holder.zone(), "edge.netboot.lan")) == ["10.0.0.10", "10.0.0.11", "10.0.0.13"]
    # node0 fails: it leaves the endpoint, but keeps its own name.
    machines[0] = dataclasses.replace(machines[0], state=MachineState.FAILED)
    holder.replace(build(machines, serial=44))
    assert rdata(ask(holder.zone(), "edge.netboot.lan")) == ["10.0.0.11", "10.0.0.13"]
    assert rdata(ask(holder.zone(), "node0.netboot.lan")) == ["10.0.0.10"]
    assert ask(holder.zone(), "netboot.lan", "SOA").rr[0].rdata.times[0] == 44


@pytest.mark.parametrize("case", ["named as its cluster", "named as another cluster",
                                  "named as the server", "named as a machine before it"])
def test_a_server_whose_name_is_taken_is_still_an_address_of_its_cluster(case: str) -> None:
    """The boot decision sends a managed cluster's nodes to <cluster>.Z once serves_cluster
    says a registered server of it has a name and an address (boot.BootService._endpoint);
    the zone left a server whose hostname another owner claimed first (its cluster, another
    cluster, the server's own name, a machine listed before it) out of <cluster>.Z too, so
    with it the sole server every agent was told a name with no address, and never joined."""
    server = machine(0, role=Role.SERVER, hostname={
        "named as its cluster": "edge", "named as another cluster": "empty",
        "named as the server": "netboot", "named as a machine before it": "node1",
    }[case])
    machines = [machine(1), server, machine(2)]
    assert serves_cluster("edge", [server])  # what the boot decision asks
    zone = build(machines)
    assert rdata(ask(zone, "edge.netboot.lan")) == ["10.0.0.10"]
    assert zone.endpoints["edge"] == ("10.0.0.10",)
    # Its SRV names only a name of its own: none here (another owner's name answers
    # another address, or the cluster's itself).
    assert ask(zone, "_k3s._tcp.edge.netboot.lan", "SRV").rr == []
    assert any("already used by" in c for c in zone.conflicts)


@pytest.mark.parametrize("service", ["_k3s", "_kubernetes"])
def test_srv_for_cluster_api(service: str) -> None:
    reply = ask(build(), f"{service}._tcp.edge.netboot.lan", "SRV")
    assert sorted((rr.rdata.port, str(rr.rdata.target)) for rr in reply.rr) == [
        (6443, "node0.netboot.lan."),
        (6443, "node1.netboot.lan."),
    ]
    assert rdata(reply, "ar") == ["10.0.0.10", "10.0.0.11"]


def test_srv_port_configurable() -> None:
    reply = ask(build(k3s_port=16443), "_k3s._tcp.edge.netboot.lan", "SRV")
    assert {rr.rdata.port for rr in reply.rr} == {16443}


def test_ptr_in_reverse_zone() -> None:
    zone = build()
    assert rdata(ask(zone, "11.0.0.10.in-addr.arpa", "PTR")) == ["node1.netboot.lan."]
    assert rdata(ask(zone, "1.0.0.10.in-addr.arpa", "PTR")) == ["netboot.netboot.lan."]
    v6 = "1." + "0." * 29 + "d.f.ip6.arpa"
    assert rdata(ask(zone, v6, "PTR")) == ["netboot.netboot.lan."]
    # Inside the reverse zone but unknown: authoritative NXDOMAIN with that zone's SOA.
    missing = ask(zone, "200.0.0.10.in-addr.arpa", "PTR")
    assert missing.header.rcode == NXDOMAIN
    assert str(missing.auth[0].rname) == "0.0.10.in-addr.arpa."
    assert rdata(ask(zone, "0.0.10.in-addr.arpa", "SOA")) != []


def test_each_interfaces_address_points_back_at_the_server() -> None:
    """server_ptrs (each interface's address, s38-net): a PTR to the server's name in its
    own reverse zone, as dnsmasq's --interface-name answers both ways; no A for it in the
    shared zone (each listener answers its own: served_at); one already a server address or
    listed twice is one PTR; a machine at one of them keeps its A, the PTR is the server's."""
    machines = [*inventory(), machine(9, hostname="squat", ipv4="198.51.100.10")]
    zone = build(machines, server_ptrs=["192.0.2.10", "198.51.100.10", "10.0.0.1",
                                        "192.0.2.10"])
    assert rdata(ask(zone, "10.2.0.192.in-addr.arpa", "PTR")) == ["netboot.netboot.lan."]
    assert rdata(ask(zone, "10.100.51.198.in-addr.arpa", "PTR")) == ["netboot.netboot.lan."]
    assert rdata(ask(zone, "1.0.0.10.in-addr.arpa", "PTR")) == ["netboot.netboot.lan."]
    assert rdata(ask(zone, "netboot.netboot.lan", "A")) == ["10.0.0.1"]
    assert rdata(ask(zone, "squat.netboot.lan", "A")) == ["198.51.100.10"]
    assert "198.51.100.10: more than one name; PTR kept for the first" in zone.conflicts
    assert ask(zone, "11.2.0.192.in-addr.arpa", "PTR").header.rcode == NXDOMAIN
    with pytest.raises(ConfigError):
        build(server_ptrs=["eth0"])


def test_explicit_reverse_networks() -> None:
    zone = build(reverse_networks=["10.0.0.0/16"])
    assert rdata(ask(zone, "11.0.0.10.in-addr.arpa", "PTR")) == ["node1.netboot.lan."]
    assert ask(zone, "9.9.0.10.in-addr.arpa", "PTR").header.rcode == NXDOMAIN
    with pytest.raises(ConfigError) as err:
        build(reverse_networks=["10.0.0.0/20"])
    assert err.value.key == "dns.reverse_networks"


def test_any_returns_every_record_of_the_name() -> None:
    reply = ask(build(), "netboot.netboot.lan", "ANY")
    assert sorted(QTYPE[rr.rtype] for rr in reply.rr) == ["A", "AAAA"]
    apex = ask(build(), "netboot.lan", "ANY")
    assert sorted(QTYPE[rr.rtype] for rr in apex.rr) == ["NS", "SOA"]


def test_outside_zone_forwards_or_refuses() -> None:
    zone = build()
    request = parse_query(DNSRecord.question("example.com").pack())
    assert isinstance(answer(zone, request, max_udp=1232, recursion=True), Forward)
    refused = ask(zone, "example.com", recursion=False)
    assert refused.header.rcode == REFUSED
    assert refused.header.ra == 0
    # Reverse names outside our reverse zones are not ours either.
    request = parse_query(DNSRecord.question("8.8.8.8.in-addr.arpa", "PTR").pack())
    assert isinstance(answer(zone, request, max_udp=1232, recursion=True), Forward)


def test_ra_set_only_with_recursion() -> None:
    assert ask(build(), "node1.netboot.lan", recursion=True).header.ra == 1
    assert ask(build(), "node1.netboot.lan", recursion=False).header.ra == 0


def big_zone() -> Zone:
    servers = [machine(i, role=Role.SERVER, ipv4=f"10.0.1.{i}") for i in range(1, 80)]
    return build(servers)


def test_large_answer_truncated_over_udp_without_edns() -> None:
    reply = ask(big_zone(), "edge.netboot.lan", max_udp=1232)
    assert reply.header.tc == 1
    assert reply.rr == []
    assert reply.q.qname == "edge.netboot.lan"  # question kept


def test_edns_size_respected_and_capped() -> None:
    zone = big_zone()
    full = ask(zone, "edge.netboot.lan", edns=4096, max_udp=4096)
    assert full.header.tc == 0
    assert len(full.rr) == 79
    capped = ask(zone, "edge.netboot.lan", edns=4096, max_udp=1232)
    assert capped.header.tc == 1
    opt = [rr for rr in capped.ar if rr.rtype == QTYPE.OPT]
    assert len(opt) == 1  # RFC 6891 §7: EDNS answered with EDNS


def test_tcp_never_truncates() -> None:
    reply = ask(big_zone(), "edge.netboot.lan", max_udp=None)
    assert reply.header.tc == 0
    assert len(reply.rr) == 79


def test_additional_dropped_before_truncating() -> None:
    servers = [machine(i, role=Role.SERVER, ipv4=f"10.0.1.{i}") for i in range(1, 21)]
    zone = build(servers)
    roomy = ask(zone, "_k3s._tcp.edge.netboot.lan", "SRV", max_udp=4096, edns=4096)
    assert len(roomy.ar) == 21  # 20 glue records + OPT
    reply = ask(zone, "_k3s._tcp.edge.netboot.lan", "SRV", max_udp=1232, edns=1232)
    assert reply.header.tc == 0
    assert len(reply.rr) == 20
    assert [rr.rtype for rr in reply.ar] == [QTYPE.OPT]


def raw_query(**header: int) -> bytes:
    request = DNSRecord(DNSHeader(id=7, **header), questions=[DNSQuestion("node1.netboot.lan")])
    return bytes(request.pack())


def test_response_is_ignored() -> None:
    assert isinstance(answer(build(), parse_query(raw_query(qr=1)), max_udp=1232), Ignore)


def test_non_query_opcode_is_notimp() -> None:
    decision = answer(build(), parse_query(raw_query(opcode=5)), max_udp=1232)
    assert isinstance(decision, Answer)
    assert decision.rcode == NOTIMP


def test_no_question_is_formerr() -> None:
    request = parse_query(bytes(DNSRecord(DNSHeader(id=9)).pack()))
    decision = answer(build(), request, max_udp=1232)
    assert isinstance(decision, Answer)
    assert decision.rcode == FORMERR


def test_edns_version_1_is_badvers() -> None:
    request = DNSRecord.question("node1.netboot.lan")
    request.add_ar(EDNS0(udp_len=1232, version=1))
    decision = answer(build(), parse_query(request.pack()), max_udp=1232)
    assert isinstance(decision, Answer)
    assert decision.rcode == BADVERS
    reply = DNSRecord.parse(decision.data)
    assert reply.ar[0].ttl >> 24 == BADVERS >> 4


def test_chaos_class_refused_and_axfr_refused() -> None:
    chaos = DNSRecord(questions=[DNSQuestion("version.bind", QTYPE.TXT, CLASS.CH)])
    decision = answer(build(), parse_query(chaos.pack()), max_udp=1232, recursion=True)
    assert isinstance(decision, Answer)
    assert decision.rcode == REFUSED
    assert ask(build(), "netboot.lan", "AXFR").header.rcode == REFUSED


def test_formerr_for_garbage() -> None:
    assert formerr_for(b"\x12\x34\x01\x00" + b"\xff" * 20) == b"\x12\x34\x81\x01" + bytes(8)
    assert formerr_for(b"\x00\x01\x80") is None  # too short
    assert formerr_for(b"\x12\x34\x81\x00" + bytes(8)) is None  # a response: stay silent


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError) as err:
        build(zone="bad zone!")
    assert err.value.key == "dns.zone"
    with pytest.raises(ConfigError):
        build(server_addrs=["not-an-ip"])
    with pytest.raises(ConfigError):
        build(server_name="-x")


def test_ten_thousand_machines_build() -> None:
    machines = [
        machine(i, hostname=f"n{i}", ipv4=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        for i in range(10_000)
    ]
    zone = build(machines)
    assert rdata(ask(zone, "n9999.netboot.lan")) == ["10.0.39.15"]
    assert rdata(ask(zone, "15.39.0.10.in-addr.arpa", "PTR")) == ["n9999.netboot.lan."]


# -- fuzzing ------------------------------------------------------------------------------


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    zone = build()
    try:
        request = parse_query(data)
    except DecodeError:
        return
    decision = answer(zone, request, max_udp=1232, recursion=True)
    assert isinstance(decision, Answer | Forward | Ignore)


names = st.lists(
    st.one_of(
        st.sampled_from([b"node1", b"NODE0", b"edge", b"_k3s", b"_tcp", b"netboot", b"lan",
                         b"in-addr", b"arpa", b"10", b"0", b"11"]),
        st.binary(min_size=1, max_size=63),
    ),
    min_size=0, max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(
    labels=names,
    qtype=st.integers(0, 65535),
    qclass=st.sampled_from([1, 3, 255, 254, 0]),
    opcode=st.integers(0, 15),
    edns=st.one_of(st.none(), st.integers(0, 65535)),
    max_udp=st.one_of(st.none(), st.integers(512, 4096)),
)
def test_structured_queries_always_get_a_decision(
    labels: list[bytes], qtype: int, qclass: int, opcode: int, edns: int | None,
    max_udp: int | None,
) -> None:
    request = DNSRecord(DNSHeader(id=1, opcode=opcode),
                        questions=[DNSQuestion(labels, qtype, qclass)])
    if edns is not None:
        request.add_ar(EDNS0(udp_len=edns))
    try:
        data = request.pack()
    except Exception:  # dnslib refuses to pack over-long names: not a query we can send
        return
    try:
        request = parse_query(data)
    except DecodeError:
        return  # e.g. dnslib accepts only UTF-8 labels: a controlled refusal, not a crash
    decision = answer(build(), request, max_udp=max_udp, recursion=False)
    assert isinstance(decision, Answer | Ignore)
    if isinstance(decision, Answer):
        reply = DNSRecord.parse(decision.data)
        udp_limit = 512 if edns is None else max(512, min(edns, max_udp or 512))
        limit = 65535 if max_udp is None else udp_limit
        assert len(decision.data) <= limit
        assert reply.header.id == 1


def test_with_authoritative_dhcp_a_machine_is_at_its_fixed_address() -> None:
    """netboot's own DHCP moves a machine to its fixed address (fixed_first): its A record
    and its cluster's name follow; otherwise the address it registered from wins, the fixed
    one standing in only before it registered (s36-journey)."""
    moved = [machine(0, role=Role.SERVER, fixed_ipv4="10.0.1.10"),
             machine(1, ipv4=None, fixed_ipv4="10.0.1.11")]
    proxy = build(moved)
    assert rdata(ask(proxy, "node0.netboot.lan")) == ["10.0.0.10"]
    assert rdata(ask(proxy, "edge.netboot.lan")) == ["10.0.0.10"]
    assert rdata(ask(proxy, "node1.netboot.lan")) == ["10.0.1.11"]
    own = build(moved, fixed_first=True)
    assert rdata(ask(own, "node0.netboot.lan")) == ["10.0.1.10"]
    assert rdata(ask(own, "edge.netboot.lan")) == ["10.0.1.10"]
    assert own.endpoints["edge"] == ("10.0.1.10",)
    assert rdata(ask(own, "node1.netboot.lan")) == ["10.0.1.11"]


def test_the_server_name_as_a_listener_on_one_address_answers_it() -> None:
    """A host without a default route advertises 127.0.0.1 and listens on each interface
    (service._start_dns): a device asking for the server's own name over one was told
    127.0.0.1 (itself). The listener on an address answers that address alone (dnsmasq's
    --localise-queries), on both answering paths; the rest of the zone is the shared one's."""
    from netboot.names import ServedAt, answer_plain
    from netboot.wire.dns import parse_plain_query

    shared = build(server_addrs=["127.0.0.1"])
    assert rdata(ask(shared, "netboot.netboot.lan")) == ["127.0.0.1"]
    holder = ZoneHolder(shared)
    source = ServedAt(holder, "192.0.2.10")
    zone = source.zone()
    assert source.zone() is zone  # made once per shared zone: a query costs a look-up
    assert rdata(ask(zone, "netboot.netboot.lan")) == ["192.0.2.10"]
    assert rdata(ask(zone, "netboot.netboot.lan", "AAAA")) == []
    assert rdata(ask(zone, "node1.netboot.lan")) == ["10.0.0.11"]
    assert rdata(ask(zone, "netboot.lan", "NS")) == ["netboot.netboot.lan."]
    query = DNSRecord(DNSHeader(id=7), questions=[DNSQuestion("netboot.netboot.lan")])
    query = bytes(query.pack())
    plain = parse_plain_query(query)
    assert plain is not None
    fast = answer_plain(zone, query, plain, max_udp=1232, recursion=False)
    assert fast is not None and rdata(DNSRecord.parse(fast.data)) == ["192.0.2.10"]
    # The shared zone replaced (the inventory changed): the listener's is made again.
    holder.replace(build([machine(1, ipv4="10.0.0.99")], server_addrs=["127.0.0.1"]))
    assert rdata(ask(source.zone(), "node1.netboot.lan")) == ["10.0.0.99"]
    assert rdata(ask(source.zone(), "netboot.netboot.lan")) == ["192.0.2.10"]
    assert rdata(ask(shared, "netboot.netboot.lan")) == ["127.0.0.1"]  # itself unchanged
