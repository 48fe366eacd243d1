"""The registered address: the request's peer unless it is unusable, never a loopback claim."""

from __future__ import annotations

import ipaddress

import pytest

from netboot.addresses import choose, parse_peer, unusable

PEER = ipaddress.ip_address("192.0.2.60")


def test_k3os_loopback_claim_loses_to_the_peer() -> None:
    # k3OS: `hostname -i` answers 127.0.1.1; the request came from the provisioning network.
    choice = choose(PEER, ["127.0.1.1"])
    assert choice.ipv4 == PEER and choice.source == "peer"
    assert [(r.text, r.reason, r.source) for r in choice.refused] == [
        ("127.0.1.1", "loopback", "reported")]


def test_a_claim_of_127_0_0_1_from_192_0_2_60_registers_192_0_2_60() -> None:
    choice = choose(PEER, ["127.0.0.1"])
    assert str(choice.address) == "192.0.2.60"


def test_the_peer_wins_over_a_different_routable_claim() -> None:
    choice = choose(PEER, ["198.51.100.7"])
    assert choice.ipv4 == PEER and not choice.refused


def test_a_loopback_peer_takes_the_first_routable_reported_address() -> None:
    # netboot behind a reverse proxy on its own host sees every device as 127.0.0.1.
    choice = choose(ipaddress.ip_address("127.0.0.1"),
                    ["fe80::1", "2001:db8::5", "198.51.100.7", "192.0.2.9"])
    assert str(choice.ipv4) == "198.51.100.7" and str(choice.ipv6) == "2001:db8::5"
    assert choice.source == "reported"
    assert [(r.text, r.source) for r in choice.refused] == [("127.0.0.1", "peer"),
                                                            ("fe80::1", "reported")]


@pytest.mark.parametrize(("text", "reason"), [
    ("127.0.1.1", "loopback"), ("::1", "loopback"), ("169.254.3.4", "link-local"),
    ("fe80::1%eth0", "link-local"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("::", "unspecified"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast or reserved"), ("240.0.0.1", "broadcast or reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("", "not an IP address"),
    ("192.0.2.300", "not an IP address"), ("edge-1", "not an IP address"),
    (" 192.0.2", "not an IP address"),
])
def test_unusable_reported_addresses_are_refused_with_a_reason(text: str, reason: str) -> None:
    choice = choose(None, [text])
    assert choice.address is None and choice.source is None
    assert [(r.text, r.reason) for r in choice.refused] == [(text, reason)]


@pytest.mark.parametrize("text", ["10.1.2.3", "172.16.0.9", "192.168.1.20", "100.64.0.1",
                                  "2001:db8::1", "fd00::7"])
def test_private_and_global_unicast_are_usable(text: str) -> None:
    assert unusable(ipaddress.ip_address(text)) is None
    assert str(choose(None, [text]).address) == text


def test_ipv6_peer_keeps_ipv4_field_semantics() -> None:
    choice = choose(ipaddress.ip_address("2001:db8::60"), ["192.0.2.60"])
    assert str(choice.ipv6) == "2001:db8::60" and str(choice.ipv4) == "192.0.2.60"
    assert str(choice.address) == "192.0.2.60"  # nodes join the IPv4 address when there is one


def test_no_usable_address_at_all() -> None:
    choice = choose(ipaddress.ip_address("127.0.0.1"), ["127.0.1.1"])
    assert choice.address is None and len(choice.refused) == 2


def test_parse_peer_unmaps_ipv4_mapped_ipv6_and_ignores_non_addresses() -> None:
    assert parse_peer("::ffff:192.0.2.60") == PEER
    assert parse_peer("192.0.2.60") == PEER
    assert parse_peer(None) is None and parse_peer("") is None
    assert parse_peer("/run/netboot.sock") is None


@pytest.mark.parametrize(("peer", "reported"), [
    ("192.0.2.60", ["192.0.2.60"]), ("192.0.2.60", ["192.0.2.60", "2001:db8::5"]),
    ("192.0.2.60", ["2001:db8::5", "192.0.2.60", "127.0.1.1"]),
    ("2001:db8::5", ["2001:db8::5", "198.51.100.7"]),
    ("127.0.0.1", ["127.0.0.1", "198.51.100.7"]), ("127.0.0.1", ["127.0.0.1"]),
])
def test_the_peers_own_address_reported_chooses_as_any_other_report(
        peer: str, reported: list[str]) -> None:
    # choose() takes a reported text equal to a usable peer's as read (the register
    # command's usual report): the choice is the one the same address reported in another
    # spelling (parsed and checked) gives, and an unusable peer's own text is still refused.
    address = ipaddress.ip_address(peer)
    respelt = [f" {text}" if text == peer else text for text in reported]
    fast, parsed = choose(address, reported), choose(address, respelt)
    assert (fast.ipv4, fast.ipv6, fast.source) == (parsed.ipv4, parsed.ipv6, parsed.source)
    assert [(r.reason, r.source) for r in fast.refused] == [
        (r.reason, r.source) for r in parsed.refused]
    if unusable(address) is not None:
        assert (peer, "reported") in [(r.text, r.source) for r in fast.refused]


@pytest.mark.parametrize("text", [
    "192.0.2.60", "0.0.0.0", "255.255.255.255", "01.2.3.4", "00.0.0.0", "1.2.3", "1.2.3.4.5",
    "256.1.1.1", " 192.0.2.60", "192.0.2.60 ", "192.0.2.60\n", "0x1.2.3.4", "1..2.3",
    "\u0661.2.3.4", "192.0.2.60%eth0", "2001:db8::5", "::ffff:192.0.2.60", "fe80::1%eth0",
    "edge-1", "", "::"])
def test_an_address_is_read_exactly_as_ipaddress_reads_it(text: str) -> None:
    # parse_peer and choose read a dotted quad from its bytes (inet_pton), anything else
    # through ipaddress: the same address, or the same refusal, as ipaddress alone.
    try:
        expected: object = ipaddress.ip_address(text)
    except ValueError:
        expected = None
    unmapped = (expected.ipv4_mapped or expected
                if isinstance(expected, ipaddress.IPv6Address) else expected)
    got = parse_peer(text)
    assert got == unmapped and type(got) is type(unmapped)
    reported = choose(None, [text])  # a device's report: read with its spaces stripped
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        assert [r.reason for r in reported.refused] == ["not an IP address"]
        return
    why = unusable(address)
    if why is not None:
        assert [r.reason for r in reported.refused] == [why]
    else:
        assert reported.address == address and not reported.refused
