"""netboot.rrl, the pure response-rate limiter: accounts, credit, debt, prefixes, the TC slip."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode

from netboot.names import Zone, answer, parse_query, question
from netboot.rrl import DROP, SEND, SLIP, Limits, ResponseRateLimiter, answer_token, slip_reply

NAME = b"\x05node1\x07netboot\x03lan\x00\x00\x01"


def verdicts(rrl: ResponseRateLimiter, n: int, now: float, *, address: str = "192.0.2.7",
             token: bytes = NAME, rcode: int = 0) -> list[int]:
    rrl.tick(now)
    return [rrl.check(address, token, rcode) for _ in range(n)]


def test_an_account_has_its_rate_a_second_carries_its_debt_and_slips_every_nth() -> None:
    rrl = ResponseRateLimiter(Limits(responses_per_second=4, slip=2, window=5))
    assert verdicts(rrl, 6, 100.0) == [SEND] * 4 + [DROP, SLIP]
    assert verdicts(rrl, 1, 100.9) == [DROP]  # the same second
    # The next second: the 3 taken beyond the rate are owed first.
    assert verdicts(rrl, 2, 101.0) == [SEND, DROP]
    # Idle for longer than the window: a second's rate, never more.
    assert verdicts(rrl, 5, 200.0) == [SEND] * 4 + [DROP]
    assert (rrl.dropped, rrl.slipped) == (4, 1)


def test_a_flood_runs_into_debt_of_at_most_the_window() -> None:
    rrl = ResponseRateLimiter(Limits(responses_per_second=10, slip=0, window=3))
    verdicts(rrl, 10_000, 0.0)  # a flood: 9,990 limited, the debt capped at 3 s (30)
    assert verdicts(rrl, 1, 2.9) == [DROP]  # 29 earned, 31 owed (30 + that one)
    assert verdicts(rrl, 1, 6.5) == [SEND]  # quiet for a window: answered again


def test_accounts_are_per_network_and_answer_errors_and_nxdomain_per_network() -> None:
    rrl = ResponseRateLimiter(Limits(responses_per_second=1, nxdomains_per_second=1,
                                     errors_per_second=1, slip=0))
    assert verdicts(rrl, 2, 0.0) == [SEND, DROP]
    assert verdicts(rrl, 1, 0.0, address="192.0.2.200") == [DROP]  # the same /24
    assert verdicts(rrl, 1, 0.0, address="192.0.3.7") == [SEND]  # another /24
    assert verdicts(rrl, 1, 0.0, token=NAME[:-1] + b"\x1c") == [SEND]  # AAAA: its own
    # NXDOMAIN and errors: one account each per network, whatever the name.
    assert verdicts(rrl, 1, 0.0, token=b"\x01a\x00\x00\x01", rcode=3) == [SEND]
    assert verdicts(rrl, 1, 0.0, token=b"\x01b\x00\x00\x01", rcode=3) == [DROP]
    assert verdicts(rrl, 1, 0.0, rcode=5) == [SEND]
    assert verdicts(rrl, 1, 0.0, token=b"other", rcode=1) == [DROP]


def test_a_rate_of_zero_is_no_limit() -> None:
    rrl = ResponseRateLimiter(Limits(responses_per_second=0))
    assert set(verdicts(rrl, 1000, 0.0)) == {SEND}
    assert len(rrl) == 0


def test_prefixes_of_each_family() -> None:
    rrl = ResponseRateLimiter(Limits())
    assert rrl.prefix("192.0.2.77") == "192.0.2.0/24"
    assert rrl.prefix("::ffff:192.0.2.77") == "192.0.2.0/24"  # a dual-stack socket's peer
    assert rrl.prefix("2001:db8:1:2ff:a::1") == "2001:db8:1:200::/56"
    assert rrl.prefix("fe80::1%veth0") == "fe80::/56"
    assert ResponseRateLimiter(Limits(ipv4_prefix_length=32)).prefix("192.0.2.77") == \
        "192.0.2.77/32"


def test_the_accounts_are_one_seconds_and_the_debts() -> None:
    """Bounded: each second starts with the accounts in debt only (the others hold the
    same as none); the addresses and networks known are bounded by max_accounts."""
    rrl = ResponseRateLimiter(Limits(responses_per_second=1, max_accounts=100, slip=0))
    assert verdicts(rrl, 3, 0.0, address="10.200.0.1") == [SEND, DROP, DROP]
    for i in range(500):
        rrl.check(f"10.{i % 256}.{i // 256}.1", NAME, 0)
    assert len(rrl) == 500  # this second: one account a network
    assert verdicts(rrl, 1, 1.0, address="10.200.0.7") == [DROP]  # 1 owed: the same /24
    assert len(rrl) == 1
    assert len(rrl._by_address) <= 100 and len(rrl._prefixes) <= 100
    rrl.tick(2.0)
    for i in range(500):  # a second of answers to 500 networks: 500 tables, then
        rrl.check(f"11.{i % 256}.{i // 256}.1", NAME, 0)
    rrl.tick(3.0)  # the next second starts again from none
    assert len(rrl._tables) <= 100


def test_the_slip_is_the_question_with_tc_and_our_edns() -> None:
    zone = Zone.build([], [], zone="netboot.lan", server_addrs=["192.0.2.1"], serial=1)
    for edns in (False, True):
        request = question("netboot.netboot.lan", "A")
        if edns:
            request = parse_query(dns.message.make_query("NetBoot.netboot.lan", "A",
                                                         use_edns=0, payload=4096).to_wire())
        decision = answer(zone, request, max_udp=1232)
        reply = decision.data  # type: ignore[union-attr]
        slipped = dns.message.from_wire(slip_reply(reply))
        assert slipped.flags & dns.flags.TC and slipped.flags & dns.flags.AA
        assert not slipped.answer and slipped.rcode() == dns.rcode.NOERROR
        assert slipped.id == request.header.id
        assert (slipped.edns == 0) is edns
        assert str(slipped.question[0].name).lower() == "netboot.netboot.lan."
        assert answer_token(reply) == b"\x07netboot\x07netboot\x03lan\x00\x00\x01"
    formerr = b"\x12\x34\x81\x01" + bytes(8)
    assert slip_reply(formerr) == b"\x12\x34\x83\x01" + bytes(8)


def replies_of(names: list[tuple[str, str]]) -> list[bytes]:
    """The server's own replies (a zone of two names and its reverse zone), packed."""
    from tests.servers.test_dns import make_zone

    zone = make_zone(servers=2)
    found = []
    for name, qtype in names:
        decision = answer(zone, parse_query(question(name, qtype).pack()), max_udp=1232)
        found.append(decision.data)  # type: ignore[union-attr]
    return found


def test_nxdomain_is_accounted_by_its_zone_and_nodata_by_its_name_as_bind_keys_them() -> None:
    """BIND (lib/dns/rrl.c make_key, query.c): NXDOMAIN by the zone's origin, NODATA by the
    name without the type. Random names in one zone are one account (another zone's
    NXDOMAIN another), and one name asked with every type, NODATA each, one account: keyed
    by the type as on main, a flood of one name's 65,536 types went unlimited."""
    asked = [("x7f3a.netboot.lan", "A"), ("Q1.NODE1.netboot.lan", "AAAA"),
             ("99.1.0.10.in-addr.arpa", "PTR"), ("node1.netboot.lan", "TXT"),
             ("NODE1.netboot.lan", "SRV"), ("node1.netboot.lan", "A")]
    nx = replies_of(asked)
    tokens = [answer_token(r) for r in nx]
    # The answer cache's key holds the lowercased question: the same account from it.
    from netboot.servers.dns import cache_key

    for reply, (name, qtype) in zip(nx, asked, strict=True):
        shape = cache_key(question(name, qtype).pack())
        assert shape is not None
        assert answer_token(reply, shape[0][10:shape[1] - 4]) == answer_token(reply)
    assert [r[3] & 0x0F for r in nx] == [3, 3, 3, 0, 0, 0]
    assert tokens[0] == tokens[1] == b"\xfe\x07netboot\x03lan\x00"  # the zone, lowercased
    assert tokens[2] != tokens[0] and tokens[2].startswith(b"\xfe")  # the reverse zone
    assert tokens[3] == tokens[4] == b"\xff\x05node1\x07netboot\x03lan\x00"  # no type
    assert tokens[5] == NAME  # a positive answer: its name and type
    # An SOA owner written out (not a pointer into the question, as ours are): read.
    written = (b"\x00\x07\x81\x83\x00\x01\x00\x00\x00\x01\x00\x00\x01a\x01B\x00\x00\x01\x00\x01"
               b"\x01B\x00\x00\x06\x00\x01" + bytes(6))
    assert answer_token(written) == b"\xfe\x01b\x00"
    assert answer_token(written[:-12] + b"\xc0\xff") == b"\xfe"  # unreadable: the kind
    rrl = ResponseRateLimiter(Limits(nxdomains_per_second=2, nodata_per_second=3, slip=0))
    rrl.tick(0.0)
    random_names = [rrl.check("192.0.2.7", tokens[i % 2], 3) for i in range(5)]
    assert random_names == [SEND, SEND, DROP, DROP, DROP]
    assert rrl.check("192.0.2.7", tokens[2], 3) == SEND  # the reverse zone: its own
    assert [rrl.check("192.0.2.7", tokens[3 + i % 2], 0) for i in range(4)] == \
        [SEND, SEND, SEND, DROP]
    assert rrl.check("192.0.2.7", tokens[5], 0) == SEND  # the name's A: its own account
    rrl.tick(1.0)  # the debt of each, carried at its own rate: 3 over 2, 1 over 3
    assert rrl.check("192.0.2.7", tokens[0], 3) == DROP
    assert [rrl.check("192.0.2.7", tokens[3], 0) for _ in range(3)] == [SEND, SEND, DROP]


def test_all_per_second_caps_every_answer_to_a_network_and_drops_never_slips() -> None:
    """BIND's all-per-second: one more account per network, debited by every answer
    whatever its name or kind; past it the answer is dropped even with slip 1 (BIND's
    debit_rrl_entry never slips the all account). 0, the default, is no limit."""
    rrl = ResponseRateLimiter(Limits(all_per_second=5, slip=1, window=2))
    rrl.tick(0.0)
    names = [b"\x04node" + bytes([48 + i]) + b"\x00\x00\x01" for i in range(8)]
    assert [rrl.check("192.0.2.7", n, 0) for n in names] == [SEND] * 5 + [DROP] * 3
    assert rrl.check("192.0.2.9", NAME, 3) == DROP  # the same /24, any kind
    assert rrl.check("198.51.100.7", NAME, 0) == SEND  # another network
    assert (rrl.dropped, rrl.slipped) == (4, 0)
    rrl.tick(1.0)  # 4 over the rate owed, less a second's 5: answered again
    assert rrl.check("192.0.2.7", names[0], 0) == SEND
    unlimited = ResponseRateLimiter(Limits())
    unlimited.tick(0.0)
    assert {unlimited.check("192.0.2.7", bytes([4]) + i.to_bytes(4, "big") + b"\x00\x00\x01", 0)
            for i in range(20_000)} == {SEND}


def test_exempt_clients_are_never_limited_and_their_neighbours_are() -> None:
    """BIND's exempt-clients: a network (or one address) never limited, IPv4 seen through a
    dual-stack socket too; its /24 neighbours keep their accounts."""
    rrl = ResponseRateLimiter(Limits(responses_per_second=1, all_per_second=1, slip=0,
                                     exempt_clients=("192.0.2.53/32", "2001:db8:5::/48")))
    rrl.tick(0.0)
    assert {rrl.check("192.0.2.53", NAME, 0) for _ in range(100)} == {SEND}
    assert {rrl.check("::ffff:192.0.2.53", NAME, 3) for _ in range(100)} == {SEND}
    assert {rrl.check("2001:db8:5:1::9%eth0", NAME, 5) for _ in range(100)} == {SEND}
    assert [rrl.check("192.0.2.54", NAME, 0) for _ in range(2)] == [SEND, DROP]
    assert [rrl.check("2001:db8:6::9", NAME, 0) for _ in range(2)] == [SEND, DROP]
    assert rrl.exempt("192.0.2.53") and not rrl.exempt("192.0.2.54")
    assert not rrl.exempt("not an address")
