"""netboot.wire.dns: the hot-path codec, against dnslib's path and dnspython as decoders.

Every answer the fast path gives (``names.answer_plain``) is compared with what the dnslib
path (``names.answer``) gives for the same query: the same bytes for a lowercase question,
the same message once decoded (by dnslib and by dnspython) for any question.
"""

from __future__ import annotations

import itertools
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, DNSHeader, DNSQuestion, DNSRecord, EDNSOption
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.errors import DecodeError
from netboot.model import Cluster, MacAddress, Machine, MachineState, Role
from netboot.names import Answer, Zone, answer, answer_plain, parse_query
from netboot.wire.dns import PlainQuery, Record, encode_reply, parse_plain_query

T_A, T_NS, T_SOA, T_PTR, T_TXT, T_AAAA, T_SRV, T_OPT, T_ANY = 1, 2, 6, 12, 16, 28, 33, 41, 255


def make_zone(servers: int = 3) -> Zone:
    machines = [
        Machine((MacAddress(bytes([0x52, 0x54, 0, 0, 1, i])),), hostname=f"node{i}",
                ipv4=f"10.0.1.{i}", cluster="edge", role=Role.SERVER,
                state=MachineState.REGISTERED)
        for i in range(1, servers + 1)
    ]
    machines.append(Machine((MacAddress(bytes([0x52, 0x54, 0, 0, 2, 1])),), hostname="agent",
                            ipv4="10.0.2.1", cluster="edge", role=Role.AGENT,
                            state=MachineState.REGISTERED))
    return Zone.build(machines, [Cluster("edge"), Cluster("empty")], zone="netboot.lan",
                      server_addrs=["10.0.0.1", "fd00::1"], serial=2024)


ZONE = make_zone()
BIG = make_zone(80)  # 80 cluster servers: answers beyond 512 and 1232 bytes

# (name, qtype): every record type and negative case the zone gives.
CASES = [
    ("node1.netboot.lan", T_A),  # A
    ("netboot.netboot.lan", T_AAAA),  # AAAA
    ("netboot.netboot.lan", T_A),
    ("netboot.netboot.lan", T_ANY),  # ANY: A and AAAA
    ("edge.netboot.lan", T_A),  # several answers: the cluster endpoint
    ("_k3s._tcp.edge.netboot.lan", T_SRV),  # SRV with glue in additional
    ("_kubernetes._tcp.edge.netboot.lan", T_ANY),
    ("1.1.0.10.in-addr.arpa", T_PTR),  # PTR
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", T_PTR),
    ("netboot.lan", T_SOA),
    ("netboot.lan", T_NS),  # NS with the server's A and AAAA as glue
    ("netboot.lan", T_ANY),  # SOA + NS + glue
    ("1.0.10.in-addr.arpa", T_ANY),  # a reverse apex
    ("missing.netboot.lan", T_A),  # NXDOMAIN + SOA
    ("a.b.missing.netboot.lan", T_AAAA),
    ("9.1.0.10.in-addr.arpa", T_PTR),  # NXDOMAIN in a reverse zone: its own SOA
    ("node1.netboot.lan", T_AAAA),  # NODATA + SOA
    ("node1.netboot.lan", T_TXT),  # unknown to the zone → NODATA
    ("node1.netboot.lan", 65),  # HTTPS (0x0041, "A" if lowercased as a letter)
    ("node1.netboot.lan", 4000),  # a type nobody has heard of
    ("_tcp.edge.netboot.lan", T_A),  # empty non-terminal → NODATA, not NXDOMAIN
    ("empty.netboot.lan", T_A),  # a cluster without servers → NODATA
]

EDNS = [None, 100, 512, 1232, 4096, 65535]  # 100: RFC 6891 §6.2.5 treats it as 512
MAX_UDP = [1232, 4096, None]  # None: over TCP


def query(name: str, qtype: int, *, edns: int | None = None, qid: int = 4242, rd: bool = True,
          cd: bool = False, qclass: int = 1, options: list[EDNSOption] | None = None,
          do: bool = False) -> bytes:
    header = DNSHeader(id=qid, rd=int(rd))
    header.cd = int(cd)
    record = DNSRecord(header, questions=[DNSQuestion(name, qtype, qclass)])
    if edns is not None:
        record.add_ar(EDNS0(udp_len=edns, opts=options or [], flags="do" if do else ""))
    return bytes(record.pack())


def both(zone: Zone, data: bytes, *, max_udp: int | None = 1232,
         recursion: bool = False) -> tuple[Answer, Answer]:
    plain = parse_plain_query(data)
    assert plain is not None
    fast = answer_plain(zone, data, plain, max_udp=max_udp, recursion=recursion)
    slow = answer(zone, parse_query(data), max_udp=max_udp, recursion=recursion)
    assert isinstance(fast, Answer) and isinstance(slow, Answer), (fast, slow)
    return fast, slow


def dnslib_view(data: bytes) -> str:
    """dnslib's reading of a reply, names compared without case (RFC 4343)."""
    return str(DNSRecord.parse(data)).lower()


def dnspython_view(data: bytes) -> tuple[object, ...]:
    """dnspython's reading of the same: an independent decoder of the wire format."""
    msg = dns.message.from_wire(data)
    sections = tuple(
        sorted(rrset.to_text().lower() for rrset in section)
        for section in (msg.answer, msg.authority, msg.additional)
    )
    return (msg.id, msg.flags, msg.rcode(), msg.edns, msg.payload, msg.ednsflags,
            [q.to_text().lower() for q in msg.question], *sections)


def assert_equivalent(fast: Answer, slow: Answer) -> None:
    assert (fast.rcode, fast.truncated) == (slow.rcode, slow.truncated)
    assert dnslib_view(fast.data) == dnslib_view(slow.data)
    assert dnspython_view(fast.data) == dnspython_view(slow.data)


def mixed_case(name: str) -> str:
    """0x20 randomisation, deterministically: every other letter upper case."""
    return "".join(c.upper() if i % 2 else c for i, c in enumerate(name))


# -- the same answer as the dnslib path ----------------------------------------------------


@pytest.mark.parametrize(("name", "qtype"), CASES)
def test_same_bytes_as_dnslib_for_every_case(name: str, qtype: int) -> None:
    for edns, max_udp, recursion in itertools.product(EDNS, MAX_UDP, (False, True)):
        fast, slow = both(ZONE, query(name, qtype, edns=edns), max_udp=max_udp,
                          recursion=recursion)
        assert fast.data == slow.data, (name, qtype, edns, max_udp, recursion)
        assert_equivalent(fast, slow)


@pytest.mark.parametrize(("name", "qtype"), CASES)
def test_mixed_case_is_echoed_and_decodes_the_same(name: str, qtype: int) -> None:
    asked = mixed_case(name)
    data = query(asked, qtype, edns=1232)
    fast, slow = both(ZONE, data)
    assert_equivalent(fast, slow)
    plain = parse_plain_query(data)
    assert plain is not None
    assert fast.data[12:plain.end] == data[12:plain.end]  # the question byte for byte
    # Owners point at the question (RFC 1035 §4.1.4), so they come back as asked and the
    # reply is never longer than dnslib's, which spells lowercase owners out.
    assert len(fast.data) <= len(slow.data)
    for rr in DNSRecord.parse(fast.data).rr:
        assert str(rr.rname) == asked + "."


def test_header_flags_copied_as_dnslib_does() -> None:
    for rd, cd in itertools.product((False, True), repeat=2):
        data = bytearray(query("node1.netboot.lan", T_A, rd=rd, cd=cd, qid=0xBEEF))
        data[2] |= 0x04 | 0x02  # AA and TC in a query: not echoed
        data[3] |= 0x40 | 0x20 | 0x0F  # Z, AD and an RCODE in a query: not echoed
        fast, slow = both(ZONE, bytes(data))
        assert fast.data == slow.data
        msg = dns.message.from_wire(fast.data)
        assert msg.id == 0xBEEF
        assert bool(msg.flags & dns.flags.RD) == rd and bool(msg.flags & dns.flags.CD) == cd
        assert msg.flags & dns.flags.AA and not msg.flags & dns.flags.TC


def test_class_any_question_is_answered_like_in() -> None:
    fast, slow = both(ZONE, query("node1.netboot.lan", T_A, qclass=255))
    assert fast.data == slow.data
    assert [str(rr.rdata) for rr in DNSRecord.parse(fast.data).rr] == ["10.0.1.1"]


def test_edns_options_and_do_bit_in_the_query() -> None:
    cookie = EDNSOption(10, bytes(range(8)))
    data = query("node2.netboot.lan", T_A, edns=4096, options=[cookie], do=True)
    plain = parse_plain_query(data)
    assert plain is not None and plain.payload == 4096
    fast, slow = both(ZONE, data)
    assert fast.data == slow.data
    msg = dns.message.from_wire(fast.data)
    assert msg.edns == 0 and msg.payload == 1232 and not msg.options  # our own OPT


def test_multiple_answers_and_glue() -> None:
    fast, slow = both(ZONE, query("_k3s._tcp.edge.netboot.lan", T_SRV, edns=1232))
    assert fast.data == slow.data
    msg = dns.message.from_wire(fast.data)
    (srv,) = msg.answer
    assert sorted(r.to_text() for r in srv) == [
        f"0 10 6443 node{i}.netboot.lan." for i in (1, 2, 3)]
    glue = sorted(r.to_text() for rrset in msg.additional for r in rrset)
    assert glue == ["10.0.1.1", "10.0.1.2", "10.0.1.3"]


# -- negative answers (RFC 2308) ----------------------------------------------------------


@pytest.mark.parametrize(("name", "rcode"), [
    ("missing.netboot.lan", dns.rcode.NXDOMAIN),
    ("_tcp.edge.netboot.lan", dns.rcode.NOERROR),
])
def test_negative_answer_has_the_soa_with_its_minimum_ttl(name: str, rcode: int) -> None:
    fast, _ = both(ZONE, query(name, T_A))
    msg = dns.message.from_wire(fast.data)
    assert msg.rcode() == rcode and not msg.answer
    (soa,) = msg.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "netboot.lan."
    # RFC 2308 §5: the SOA's TTL is min(its TTL, MINIMUM); both are the zone TTL here.
    assert soa.ttl == soa[0].minimum == 60
    assert soa[0].serial == 2024


# -- sizes: truncation, EDNS payload, the compression limit ----------------------------------


def test_truncation_at_512_without_edns_keeps_the_question() -> None:
    data = query("edge.netboot.lan", T_A)
    fast, slow = both(BIG, data, max_udp=4096)
    assert fast.data == slow.data and fast.truncated
    msg = dns.message.from_wire(fast.data)
    assert msg.flags & dns.flags.TC and not msg.answer and msg.edns < 0
    assert msg.question[0].name.to_text() == "edge.netboot.lan."
    assert len(fast.data) <= 512


@pytest.mark.parametrize("edns", [None, 100, 512, 1000, 1232, 1400, 4096, 65535])
@pytest.mark.parametrize("max_udp", [1232, 4096, None])
def test_payload_sizes(edns: int | None, max_udp: int | None) -> None:
    for name, qtype in (("edge.netboot.lan", T_A), ("_k3s._tcp.edge.netboot.lan", T_SRV)):
        fast, slow = both(BIG, query(name, qtype, edns=edns), max_udp=max_udp)
        assert fast.data == slow.data
        assert_equivalent(fast, slow)
        if max_udp is None:
            limit = 65535
        elif edns is None:
            limit = 512
        else:
            limit = max(512, min(edns, max_udp))
        assert len(fast.data) <= limit
        msg = dns.message.from_wire(fast.data)
        assert (msg.edns == 0) == (edns is not None)  # EDNS answered with EDNS, only then
        if not fast.truncated:
            assert len(msg.answer[0]) == 80


def test_additional_dropped_before_answers() -> None:
    # 80 SRV records fit 4096 bytes, their 80 glue records do not.
    fast, slow = both(BIG, query("_k3s._tcp.edge.netboot.lan", T_SRV, edns=4096), max_udp=4096)
    assert fast.data == slow.data and not fast.truncated
    msg = dns.message.from_wire(fast.data)
    assert len(msg.answer[0]) == 80 and not msg.additional and msg.edns == 0


def test_longest_name_is_answered_and_one_more_octet_is_not_plain() -> None:
    # 255 octets on the wire (RFC 1035 §2.3.4): 63+63+63+49 + "netboot.lan" + lengths.
    labels = ["a" * 63, "b" * 63, "c" * 63, "d" * 49, "netboot", "lan"]
    name = ".".join(labels)
    assert sum(len(x) + 1 for x in labels) + 1 == 255
    fast, slow = both(ZONE, query(name, T_A, edns=1232))
    assert fast.data == slow.data and fast.rcode == dns.rcode.NXDOMAIN
    # The SOA owner is a pointer into the question's "netboot.lan".
    msg = dns.message.from_wire(fast.data)
    assert msg.authority[0].name.to_text() == "netboot.lan."
    # 256 octets: one more "d" (dnslib refuses to build it, so the bytes are spliced in).
    too_long = query(name, T_A).replace(b"\x31" + b"d" * 49, b"\x32" + b"d" * 50)
    assert len(too_long) == 12 + 256 + 4
    assert parse_plain_query(too_long) is None
    with pytest.raises(DecodeError):
        parse_query(too_long)


def test_names_past_the_pointer_limit_are_written_out() -> None:
    """RFC 1035 §4.1.4: pointers hold 14 bits; a name first written past 16,383 cannot be
    pointed at (dnslib would emit a wrapped pointer there), later copies are spelled out."""
    data = query("big.netboot.lan", T_PTR)
    plain = parse_plain_query(data)
    assert plain is not None
    owner = plain.labels
    filler = [Record(owner, T_PTR, 60, names=((f"host{i:04d}".encode(), b"example"),))
              for i in range(1400)]  # ~20 bytes each: past 0x3FFF
    late = [Record(owner, T_PTR, 60, names=((b"late", b"example", b"org"),)) for _ in range(3)]
    reply, truncated = encode_reply(data, plain, aa=True, ra=False, rcode=0,
                                    answers=filler + late, limit=65535, opt_payload=None)
    assert not truncated and len(reply) > 0x4000
    # The late name is written in full each time: no pointer above 0x3FFF anywhere.
    assert reply.count(b"\x04late\x07example\x03org\x00") == 3
    targets = [str(rr.rdata) for rr in DNSRecord.parse(reply).rr]
    assert len(targets) == 1403 and targets[-3:] == ["late.example.org."] * 3
    msg = dns.message.from_wire(reply)  # dnspython folds equal rdata into one: count names
    assert {r.target.to_text() for r in msg.answer[0]} == {*targets}


# -- what is plain and what is not ---------------------------------------------------------


def test_plain_query_fields() -> None:
    data = query("NoDe1.NetBoot.LAN", T_AAAA, edns=1400, qid=77, cd=True)
    plain = parse_plain_query(data)
    assert plain == PlainQuery(
        id=77, rd=True, cd=True, qname=b"\x05NoDe1\x07NetBoot\x03LAN\x00",
        labels=(b"node1", b"netboot", b"lan"), qtype=T_AAAA, qclass=1,
        end=12 + 19 + 4, payload=1400)


def _not_plain() -> list[tuple[str, bytes]]:
    base = query("node1.netboot.lan", T_A)
    opt = query("node1.netboot.lan", T_A, edns=1232)
    out = [("response", bytes([*base[:2], base[2] | 0x80, *base[3:]]))]
    out.append(("notify opcode", bytes([*base[:2], base[2] | (4 << 3), *base[3:]])))
    two = DNSRecord(DNSHeader(id=1), questions=[DNSQuestion("a.netboot.lan"),
                                                 DNSQuestion("b.netboot.lan")])
    out.append(("two questions", bytes(two.pack())))
    out.append(("no question", base[:4] + b"\x00\x00" + base[6:12]))
    out.append(("answer count", base[:7] + b"\x01" + base[8:]))
    out.append(("authority count", base[:9] + b"\x01" + base[10:]))
    out.append(("two additional", opt[:11] + b"\x02" + opt[12:] + opt[-11:]))
    out.append(("pointer in question", base[:12] + b"\xc0\x0c" + base[-4:]))
    out.append(("extended label", base[:12] + b"\x41" + base[13:]))
    out.append(("cut in the name", base[:20]))
    out.append(("cut in type", base[:-2]))
    out.append(("trailing byte", base + b"\x00"))
    out.append(("OPT version 1", opt[:-5] + b"\x01" + opt[-4:]))
    out.append(("label not UTF-8", base[:13] + b"\xff" + base[14:]))
    out.append(("OPT not at root", opt[:-11] + b"\x01x" + opt[-10:]))
    out.append(("additional not OPT", opt[:-10] + struct.pack(">H", T_A) + opt[-8:]))
    out.append(("OPT rdlength too long", opt[:-2] + b"\x00\x04"))
    out.append(("OPT option cut", opt[:-2] + b"\x00\x03" + b"\x00\x0a\x00"))
    out.append(("OPT option overruns", opt[:-2] + b"\x00\x04" + b"\x00\x0a\x00\x08"))
    return out


@pytest.mark.parametrize(("why", "data"), _not_plain(), ids=[w for w, _ in _not_plain()])
def test_not_plain_goes_to_the_full_parser(why: str, data: bytes) -> None:
    assert parse_plain_query(data) is None, why


def test_fast_path_declines_what_is_not_ours_to_answer() -> None:
    for name, qtype, qclass in (("example.com", T_A, 1),  # outside the zone: forward/REFUSED
                                ("netboot.lan", 252, 1),  # AXFR: REFUSED by the full path
                                ("netboot.lan", 251, 1),  # IXFR
                                ("node1.netboot.lan", T_A, 3)):  # CHAOS: REFUSED
        data = query(name, qtype, qclass=qclass)
        plain = parse_plain_query(data)
        assert plain is not None
        assert answer_plain(ZONE, data, plain, max_udp=1232) is None


# -- any question, any case, any size --------------------------------------------------------

NAMES = sorted({".".join(p.decode() for p in key) for key in BIG.nodes}
               | {"missing.netboot.lan", "x.y.edge.netboot.lan", "_tcp.edge.netboot.lan"})


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(NAMES), case=st.lists(st.booleans(), min_size=80, max_size=80),
       qtype=st.sampled_from([T_A, T_NS, T_SOA, T_PTR, T_TXT, T_AAAA, T_SRV, T_ANY, 65, 999]),
       edns=st.sampled_from(EDNS), max_udp=st.sampled_from(MAX_UDP), recursion=st.booleans())
def test_any_zone_question_decodes_the_same(
    name: str, case: list[bool], qtype: int, edns: int | None, max_udp: int | None,
    recursion: bool,
) -> None:
    asked = "".join(c.upper() if up else c for c, up in zip(name, case, strict=False))
    asked += name[len(case):]
    fast, slow = both(BIG, query(asked, qtype, edns=edns), max_udp=max_udp,
                      recursion=recursion)
    assert_equivalent(fast, slow)
    if asked == name:
        assert fast.data == slow.data


@settings(max_examples=2000)
@given(st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([query("node1.netboot.lan", T_A),
                               query("node1.netboot.lan", T_A, edns=1232)]),
              st.lists(st.tuples(st.integers(0, 45), st.integers(0, 255)), max_size=4),
              st.integers(0, 50))
    .map(lambda t: bytes(dict(t[1]).get(i, b)
                         for i, b in enumerate(t[0]))[: t[2]]),
))
def test_fuzz_plain_parser_never_raises_and_agrees_with_dnslib(data: bytes) -> None:
    plain = parse_plain_query(data)
    if plain is None:
        return
    record = parse_query(data)  # what is plain, dnslib reads too, and reads the same
    assert record.header.id == plain.id and len(record.questions) == 1
    assert tuple(x.lower() for x in record.q.qname.label) == plain.labels
    assert (record.q.qtype, record.q.qclass) == (plain.qtype, plain.qclass)
    opts = [rr for rr in record.ar if rr.rtype == T_OPT]
    assert (opts[0].rclass if opts else None) == plain.payload
