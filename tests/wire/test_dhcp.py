"""The DHCP codec against every DHCP datagram of the lab captures, plus error cases and fuzzing."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netboot.errors import DecodeError
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.pcap import all_captures, capture, dhcp_datagrams

P = TypeVar("P")
R = TypeVar("R")
CAPTURES = all_captures()
DATAGRAMS = [(p.stem, d) for p in CAPTURES for d in dhcp_datagrams(p)]


def find(name: str, frame: int) -> bytes:
    for d in dhcp_datagrams(capture(name)):
        if d.frame == frame:
            return d.payload
    raise LookupError(f"{name} frame {frame}")


def test_captures_are_present_and_hold_dhcp() -> None:
    assert len(CAPTURES) >= 10
    assert len(DATAGRAMS) > 150


@pytest.mark.parametrize(
    ("name", "datagram"), DATAGRAMS, ids=[f"{n}-{d.frame}" for n, d in DATAGRAMS]
)
def test_every_captured_packet_decodes_and_round_trips(name: str, datagram: object) -> None:
    payload = datagram.payload  # type: ignore[attr-defined]
    packet = dhcp.parse(payload)
    assert dhcp.encode(packet) == payload
    # Direction and message type agree with the ports the packet travelled on.
    # In the lab the servers are 192.0.2.1 (site DHCP) and 192.0.2.10 (proxy).
    if datagram.src in ("192.0.2.1", "192.0.2.10"):  # type: ignore[attr-defined]
        assert packet.op == Op.REPLY
    else:
        assert packet.op == Op.REQUEST
    assert packet.message_type is not None


def test_golden_edk2_pxe_discover() -> None:
    p = dhcp.parse(find("uefi-edk2pxe", 8))
    assert p.op == Op.REQUEST and p.xid == 0xE25CCFB3
    assert p.flags == dhcp.BROADCAST_FLAG and p.broadcast
    assert p.mac == bytes.fromhex("525400000011")
    assert p.ciaddr == p.yiaddr == p.siaddr == p.giaddr == "0.0.0.0"
    assert p.message_type == MessageType.DISCOVER
    assert [o.code for o in p.options] == [53, 57, 55, 97, 94, 93, 60]
    assert p.option(Opt.MAX_MESSAGE_SIZE) == (1472).to_bytes(2, "big")
    assert p.option(Opt.VENDOR_CLASS) == b"PXEClient:Arch:00007:UNDI:003000"
    assert p.option(Opt.CLIENT_ARCH) == b"\x00\x07"
    assert p.option(Opt.CLIENT_NDI) == b"\x01\x03\x00"
    assert p.option(Opt.CLIENT_UUID) == bytes(17)
    assert len(p.requested_options) == 35 and {43, 60, 66, 67, 97} <= p.requested_options
    assert p.file_name is None and p.server_name is None


def test_golden_ipxe_bios_discover() -> None:
    p = dhcp.parse(find("bios-ipxe", 14))
    assert [o.code for o in p.options] == [53, 57, 93, 94, 60, 77, 55, 175, 61, 97]
    assert p.option(Opt.USER_CLASS) == b"iPXE"
    assert p.option(Opt.VENDOR_CLASS) == b"PXEClient:Arch:00000:UNDI:002001"
    assert p.option(Opt.CLIENT_ID) == b"\x01" + bytes.fromhex("525400000011")
    ether = p.option(Opt.ETHERBOOT)
    assert ether is not None and ether.startswith(bytes.fromhex("b105011af41000"))


def test_golden_dnsmasq_proxy_4011_ack() -> None:
    """dnsmasq's :4011 ACK in the lab: yiaddr 0, siaddr 192.0.2.10, file set, 43 echoed."""
    p = dhcp.parse(find("uefi-edk2pxe", 20))
    assert p.op == Op.REPLY and p.message_type == MessageType.ACK
    assert p.yiaddr == "0.0.0.0" and p.siaddr == "192.0.2.10"
    assert p.file_name == "snponly.efi"
    assert p.option(Opt.VENDOR_CLASS) == b"PXEClient"
    assert len(dhcp.encode(p)) == 300


def test_golden_uboot_discover_has_file_and_no_uuid() -> None:
    p = dhcp.parse(find("uboot-arm64", 6))
    assert p.option(Opt.VENDOR_CLASS) == b"U-Boot.armv8"
    assert p.option(Opt.CLIENT_ARCH) == b"\x00\x16"
    assert p.option(Opt.CLIENT_UUID) is None
    assert p.file_name == "boot.scr.uimg"
    assert p.trailer == bytes(len(p.trailer))  # zero padding after END, kept for round trip


def test_golden_httpboot_proxy_offer() -> None:
    p = dhcp.parse(find("uefi-httpboot-viaproxy", 7))
    assert p.message_type == MessageType.OFFER
    assert p.yiaddr == "0.0.0.0" and p.siaddr == "192.0.2.10"
    assert p.option(Opt.VENDOR_CLASS) == b"HTTPClient"
    assert p.file_name == "http://192.0.2.10:8080/ipxe.efi"


# -- building -------------------------------------------------------------------------------

def _discover(**kw: object) -> dhcp.Packet:
    base: dict[str, object] = {
        "op": Op.REQUEST, "xid": 0x01020304, "chaddr": bytes.fromhex("525400000011"),
        "options": (dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"),),
    }
    base.update(kw)
    return dhcp.Packet(**base)  # type: ignore[arg-type]


def test_encode_pads_and_fixes_field_sizes() -> None:
    raw = dhcp.encode(_discover(), pad_to=300)
    assert len(raw) == 300
    assert raw[236:240] == dhcp.MAGIC_COOKIE
    assert raw[240:244] == bytes((53, 1, 1, 255))
    back = dhcp.parse(raw)
    assert back.chaddr == bytes.fromhex("525400000011") + bytes(10)
    assert len(back.sname) == 64 and len(back.file) == 128


def test_long_option_split_and_concatenated_rfc3396() -> None:
    value = bytes(range(256)) * 2  # 512 bytes
    p = _discover(options=(dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"), dhcp.Option(200, value)))
    back = dhcp.parse(dhcp.encode(p))
    assert [o.code for o in back.options] == [53, 200, 200, 200]
    assert back.option(200) == value


def test_unknown_options_and_pads_preserved_in_order() -> None:
    opts = (
        dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"), dhcp.Option(0), dhcp.Option(250, b"xyz"),
        dhcp.Option(0), dhcp.Option(224, b""),
    )
    raw = dhcp.encode(_discover(options=opts))
    assert dhcp.parse(raw).options == opts


def test_option_overload_is_read() -> None:
    file_opts = bytes((12, 3)) + b"abc" + b"\xff"
    p = _discover(
        options=(dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"), dhcp.Option(Opt.OVERLOAD, b"\x01")),
        file=file_opts,
    )
    back = dhcp.parse(dhcp.encode(p))
    assert back.option(Opt.HOSTNAME) == b"abc"
    assert back.file_name is None  # EDK2/U-Boot: an overloaded file is not a boot file name


def test_missing_end_is_accepted_and_round_trips() -> None:
    raw = dhcp.encode(_discover(end=False))
    p = dhcp.parse(raw)
    assert not p.end and dhcp.encode(p) == raw


# -- errors ---------------------------------------------------------------------------------

def _raw(**kw: object) -> bytearray:
    return bytearray(dhcp.encode(_discover(**kw)))


def test_short_packet() -> None:
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(100))
    assert err.value.offset == 100 and err.value.field == "header"


def test_bad_cookie() -> None:
    raw = _raw()
    raw[236:240] = b"\x00\x00\x00\x00"
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 236 and err.value.field == "cookie"


def test_option_past_the_end() -> None:
    raw = _raw()[:240] + bytes((53, 1, 1, 60, 20)) + b"PXE"
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 243 and "option 60" in str(err.value)


def test_option_without_length_byte() -> None:
    raw = _raw()[:240] + bytes((53, 1, 1, 60))
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 243


def test_op_and_message_type_disagree() -> None:
    raw = _raw(options=(dhcp.Option(Opt.MESSAGE_TYPE, bytes((MessageType.OFFER,))),))
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.field == "option 53" and err.value.offset == 240
    raw = _raw(op=Op.REPLY)  # a DISCOVER in a BOOTREPLY
    with pytest.raises(DecodeError):
        dhcp.parse(bytes(raw))


def test_bad_op_hlen_and_type_length() -> None:
    raw = _raw()
    raw[0] = 7
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 0
    raw = _raw()
    raw[2] = 17
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 2
    raw = _raw(options=(dhcp.Option(Opt.MESSAGE_TYPE, b"\x01\x01"),))
    with pytest.raises(DecodeError):
        dhcp.parse(bytes(raw))


def test_bad_overloaded_file_raises_decode_error() -> None:
    raw = _raw(
        options=(dhcp.Option(Opt.MESSAGE_TYPE, b"\x01"), dhcp.Option(Opt.OVERLOAD, b"\x01")),
        file=bytes((12, 200)),
    )
    with pytest.raises(DecodeError) as err:
        dhcp.parse(bytes(raw))
    assert err.value.offset == 108


# -- fuzzing --------------------------------------------------------------------------------
# Bounded runs (the profile in conftest derandomizes them): a fixed number of examples, the same
# on every landing, so that a run is reproducible and its cost known.

SEEDS = [d.payload for _, d in DATAGRAMS[:40]]


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=700))
def test_fuzz_random_bytes_only_decode_error(data: bytes) -> None:
    try:
        p = dhcp.parse(data)
    except DecodeError:
        return
    assert dhcp.encode(p) == data


def mutated(seed: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    """``seed`` with bytes replaced at ``flips`` (position, value) and cut to ``cut`` bytes."""
    data = bytearray(seed)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    return bytes(data[: max(cut, 0)] if cut < len(data) else data)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(min_value=0, max_value=699), st.integers(0, 255)),
             max_size=8),
    st.integers(min_value=0, max_value=700),
)
def test_fuzz_mutated_captures_only_decode_error(
    seed: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = mutated(seed, flips, cut)
    same_reading(data)  # and parse_request, the server's decode, reads it the same
    try:
        p = dhcp.parse(data)
    except DecodeError:
        return
    assert dhcp.encode(p) == data
    # Accessors never raise on a packet that decoded.
    p.all_options()
    _ = (p.message_type, p.requested_options, p.file_name, p.server_name, p.mac)


def test_header_struct_is_rfc2131_size() -> None:
    assert dhcp.HEADER_SIZE == 236
    assert struct.calcsize("!BBBBIHH") == 12


# -- parse_request: the server's read-only decode gives parse's answers ---------------------

ACCESSORS = ("op", "xid", "chaddr", "htype", "hlen", "hops", "secs", "flags", "ciaddr",
             "yiaddr", "siaddr", "giaddr", "mac", "message_type")


def both_read(reference: Callable[[bytes], P], read: Callable[[bytes], R], data: bytes,
              ) -> tuple[P, R] | None:
    """What ``reference`` and ``read`` make of ``data``; None where the first raises a
    DecodeError and the second one of the same field and offset."""
    try:
        expected = reference(data)
    except DecodeError as exc:
        with pytest.raises(DecodeError) as caught:
            read(data)
        assert (caught.value.field, caught.value.offset) == (exc.field, exc.offset)
        return None
    return expected, read(data)


def same_reading(data: bytes) -> None:
    """parse_request raises DecodeError exactly when parse does (with the same offset), and
    otherwise reads every header field and every option code as parse's Packet does."""
    read = both_read(dhcp.parse, dhcp.parse_request, data)
    if read is None:
        return
    packet, request = read
    for name in ACCESSORS:
        assert getattr(request, name) == getattr(packet, name), name
    for code in range(256):
        assert request.option(code) == packet.option(code), code
        assert request.has_option(code) == packet.has_option(code), code


@pytest.mark.parametrize(
    ("name", "datagram"), DATAGRAMS, ids=[f"{n}-{d.frame}" for n, d in DATAGRAMS]
)
def test_parse_request_reads_every_capture_as_parse_does(name: str, datagram: object) -> None:
    same_reading(datagram.payload)  # type: ignore[attr-defined]


def test_parse_request_errors_and_overload_as_parse() -> None:
    base = find("uefi-edk2pxe", 8)
    cut = base[:240] + b"\x35\x01\x01\x3c"  # 60 without its length byte
    same_reading(cut)
    same_reading(base[:240] + b"\x35\x02\x01\x01\xff")  # 53 of length 2
    same_reading(base[:240] + b"\x35\x01\x02\xff")  # an OFFER in a BOOTREQUEST
    same_reading(base[:240] + b"\x35\x01\x01\x35\x01\x03\xff")  # 53 twice: no type
    same_reading(base[:240] + b"\x3c\x05PXECl" + b"\x3c\x04ient\xff")  # RFC 3396 halves
    same_reading(base[:240] + b"\x35\x01\x01")  # no END
    # Option 52 hands the packet to parse: options in file and sname are read, bad ones raise.
    file_opts = b"\x43\x05a.efi\xff".ljust(128, b"\0")
    overloaded = base[:108] + file_opts + base[236:240] + b"\x35\x01\x01\x34\x01\x01\xff"
    same_reading(overloaded)
    assert dhcp.parse_request(overloaded).option(Opt.BOOTFILE_NAME) == b"a.efi"
    same_reading(base[:108] + b"\x43\x09a.efi".ljust(128, b"\0") + overloaded[236:])
    same_reading(overloaded[:-2] + b"\x04\xff")  # option 52 value out of range


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400).map(lambda tail: find("uefi-edk2pxe", 8)[:240] + tail))
def test_fuzz_parse_request_random_options_read_as_parse(data: bytes) -> None:
    same_reading(data)


# -- RequestLayouts: a request of a layout seen reads as parse_request reads it ---------------


def same_as_parse_request(layouts: dhcp.RequestLayouts, data: bytes) -> None:
    """``layouts.parse`` gives parse_request's Request (every field, the values' dict whole)
    or raises its DecodeError (same field and offset)."""
    read = both_read(dhcp.parse_request, layouts.parse, data)
    if read is None:
        return
    expected, got = read
    assert type(got) is dhcp.Request
    assert got == expected
    assert list(got.values.items()) == list(expected.values.items())  # the order too


def own_option_at(data: bytes, code: int) -> tuple[int, int]:
    """Where option ``code``'s value is in ``data`` (a request that has it once)."""
    request = dhcp.parse_request(data)
    value = request.values[code]
    start = data.index(bytes((code, len(value))) + value, dhcp.OPTIONS_OFFSET) + 2
    return start, start + len(value)


def first_flags(data: bytes) -> int:
    return int.from_bytes(data[10:12], "big")


def test_a_request_of_a_known_layout_is_read_from_it_with_its_own_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # EDK2's DISCOVER (options 53, 57, 55, 97, 93, 94, 60): a second machine's differs in
    # xid, secs, flags, chaddr and option 97's UUID.
    first = find("uefi-edk2pxe", 8)
    start, stop = own_option_at(first, Opt.CLIENT_UUID)
    other = bytearray(first)
    other[4:8] = b"\x12\x34\x56\x78"
    other[8:10] = b"\x00\x05"
    other[10:12] = b"\x00\x00" if first[10:12] != b"\x00\x00" else b"\x80\x00"
    other[28:34] = bytes.fromhex("525400abcdef")
    other[start + 1:stop] = bytes(range(1, 17))
    layouts = dhcp.RequestLayouts()
    assert layouts.parse(first) == dhcp.parse_request(first)
    expected = dhcp.parse_request(bytes(other))
    # Read from the layout, not walked again: parse_request is not called.
    monkeypatch.setattr(dhcp, "parse_request", lambda data: pytest.fail("walked again"))
    got = layouts.parse(bytes(other))
    assert got == expected
    assert got.values[Opt.CLIENT_UUID] == b"\x00" + bytes(range(1, 17))
    assert (got.xid, got.secs, got.chaddr[:6]) == (0x12345678, 5, bytes.fromhex("525400abcdef"))
    assert got.flags == int.from_bytes(other[10:12], "big") != first_flags(first)
    # The layout's values are its own: the first request's, changed by its caller, are not
    # the next one's.
    monkeypatch.undo()
    layouts.parse(first).values[Opt.VENDOR_CLASS] = b"changed"
    assert layouts.parse(bytes(other)).values[Opt.VENDOR_CLASS] == first[
        first.index(b"PXEClient"):first.index(b"PXEClient") + 32]


def test_a_request_differing_outside_its_own_bytes_is_walked_again() -> None:
    first = find("uefi-edk2pxe", 8)
    layouts = dhcp.RequestLayouts()
    layouts.parse(first)
    at = first.index(b"PXEClient:Arch:")
    for position, value in (
        (at + 15, ord("9")),  # the vendor class's arch digits: another shape
        (0, 2),  # op: a BOOTREPLY
        (2, 17),  # hlen past chaddr: a DecodeError
        (3, 1),  # hops
        (24, 198),  # giaddr: relayed
        (237, 0),  # the cookie
        (dhcp.OPTIONS_OFFSET + 2, 3),  # the message type: a REQUEST
        (dhcp.OPTIONS_OFFSET + 2, 2),  # an OFFER in a BOOTREQUEST: a DecodeError
        (dhcp.OPTIONS_OFFSET + 1, 9),  # option 53's length: walks elsewhere
        (len(first) - 1, 7),  # after END (not read, but not the layout's bytes)
    ):
        data = bytearray(first)
        data[position] = value
        same_as_parse_request(layouts, bytes(data))
    assert layouts.parse(bytes(first[:at + 15]) + b"9" + first[at + 16:]).values[
        Opt.VENDOR_CLASS].startswith(b"PXEClient:Arch:9")


def test_own_options_anywhere_and_their_lengths() -> None:
    base = find("uefi-edk2pxe", 8)[:240]
    layouts = dhcp.RequestLayouts()
    for hostname, client_id, uuid in ((b"node-1", b"\x01\x52\x54\x00\x00\x00\x01", b"\0" * 17),
                                      (b"node-2", b"\x01\x52\x54\x00\x00\x00\x02", b"\1" * 17),
                                      (b"node-10", b"\x01\x52\x54\x00\x00\x00\x03", b"\2" * 17)):
        data = (base + b"\x35\x01\x01" + bytes((12, len(hostname))) + hostname
                + b"\x3d\x07" + client_id + b"\x3c\x09PXEClient" + b"\x61\x11" + uuid
                + b"\xff").ljust(300, b"\0")
        same_as_parse_request(layouts, data)
        same_as_parse_request(layouts, data)
    # An own option twice is concatenated (RFC 3396 §7): no layout, read as parse_request.
    twice = (base + b"\x35\x01\x01\x0c\x02ab\x0c\x02cd\xff").ljust(300, b"\0")
    same_as_parse_request(layouts, twice)
    same_as_parse_request(layouts, twice[:245] + b"ef" + twice[247:])
    assert layouts.parse(twice[:245] + b"ef" + twice[247:]).values[Opt.HOSTNAME] == b"efcd"


def test_layouts_are_bounded() -> None:
    layouts = dhcp.RequestLayouts(limit=4)
    base = find("uefi-edk2pxe", 8)
    for size in range(len(base), len(base) + 10):
        layouts.parse(base.ljust(size, b"\0"))
    assert sum(len(held) for held in layouts._held.values()) <= 4


@pytest.mark.parametrize(
    ("name", "datagram"), DATAGRAMS, ids=[f"{n}-{d.frame}" for n, d in DATAGRAMS]
)
def test_every_capture_reads_the_same_through_layouts(name: str, datagram: object) -> None:
    layouts = dhcp.RequestLayouts()
    for _, other in DATAGRAMS:  # every capture's layout held first
        layouts.parse(other.payload)  # type: ignore[attr-defined]
    same_as_parse_request(layouts, datagram.payload)  # type: ignore[attr-defined]


def held_layouts() -> dhcp.RequestLayouts:
    """Every capture's layout held (each capture decodes: the tests above)."""
    layouts = dhcp.RequestLayouts()
    for _, datagram in DATAGRAMS:
        layouts.parse(datagram.payload)
    return layouts


LAYOUTS = held_layouts()


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(min_value=0, max_value=699), st.integers(0, 255)),
             max_size=4),
)
def test_fuzz_mutated_captures_read_the_same_through_layouts(
    seed: bytes, flips: list[tuple[int, int]]
) -> None:
    # The same length as a capture whose layout is held: most reach its slice compares.
    same_as_parse_request(LAYOUTS, mutated(seed, flips, len(seed)))
