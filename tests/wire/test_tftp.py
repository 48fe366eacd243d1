"""The TFTP codec and the sender state machine, without sockets or clocks."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tftpy.TftpPacketFactory import TftpPacketFactory

from netboot.errors import DecodeError
from netboot.wire.tftp import (
    Ack,
    Data,
    Error,
    ErrorCode,
    MemorySource,
    Negotiated,
    OptionAck,
    Outcome,
    Packet,
    Phase,
    Policy,
    ReadRequest,
    Sender,
    Step,
    WriteRequest,
    encode,
    negotiate,
    parse,
)

# ------------------------------------------------------------------------------- codec

GOLDEN: list[tuple[bytes, Packet]] = [
    (b"\x00\x01pxelinux.0\x00octet\x00", ReadRequest("pxelinux.0", "octet")),
    (
        # U-Boot's RRQ (net/tftp.c): timeout, tsize, blksize.
        b"\x00\x01boot.scr.uimg\x00octet\x00timeout\x005\x00tsize\x000\x00blksize\x001468\x00",
        ReadRequest(
            "boot.scr.uimg", "octet", (("timeout", "5"), ("tsize", "0"), ("blksize", "1468"))
        ),
    ),
    (b"\x00\x02up.bin\x00netascii\x00", WriteRequest("up.bin", "netascii")),
    (b"\x00\x03\x00\x07abc", Data(7, b"abc")),
    (b"\x00\x03\xff\xff", Data(65535, b"")),
    (b"\x00\x04\x00\x00", Ack(0)),
    (b"\x00\x05\x00\x01file not found\x00", Error(1, "file not found")),
    (b"\x00\x05\x00\x00\x00", Error(0, "")),
    (
        b"\x00\x06blksize\x001468\x00tsize\x00123\x00",
        OptionAck((("blksize", "1468"), ("tsize", "123"))),
    ),
]


@pytest.mark.parametrize(("wire", "packet"), GOLDEN)
def test_golden_round_trip(wire: bytes, packet: Packet) -> None:
    assert parse(wire) == packet
    assert encode(packet) == wire


# tftpy cannot decode error code 0, and its OACK parsing needs a client context.
@pytest.mark.parametrize(
    ("wire", "packet"), [g for g in GOLDEN if not isinstance(g[1], Error | OptionAck)]
)
def test_agrees_with_tftpy(wire: bytes, packet: Packet) -> None:
    # tftpy's packet classes are an independent decoder (protocols.md §6.3).
    theirs = TftpPacketFactory().parse(wire)
    if isinstance(packet, ReadRequest | WriteRequest):
        assert theirs.filename == packet.filename and theirs.mode == packet.mode.lower()
        assert theirs.options == dict(packet.options)
    elif isinstance(packet, Data):
        assert theirs.blocknumber == packet.block and theirs.data == packet.data
    elif isinstance(packet, Ack):
        assert theirs.blocknumber == packet.block


def test_trailing_nul_padding_and_lenient_endings() -> None:
    assert parse(b"\x00\x01f\x00octet\x00\x00\x00\x00") == ReadRequest("f", "octet")
    assert parse(b"\x00\x05\x00\x02no terminator") == Error(2, "no terminator")
    assert parse(b"\x00\x04\x00\x05\x00\x00") == Ack(5)  # padded ACK
    assert ReadRequest("f", options=(("BlkSize", "1"),)).option("blksize") == "1"


@pytest.mark.parametrize(
    ("wire", "field", "offset"),
    [
        (b"", "opcode", 0),
        (b"\x00", "opcode", 0),
        (b"\x00\x09", "opcode", 0),
        (b"\x00\x01name", "filename", 2),
        (b"\x00\x01name\x00octet", "mode", 7),
        (b"\x00\x01name\x00oct\xffet\x00", "mode", 10),
        (b"\x00\x01\xff\x00octet\x00", "filename", 2),
        (b"\x00\x01f\x00octet\x00blksize\x00", "option value", 18),
        (b"\x00\x01f\x00octet\x00blksize\x00512", "option value", 18),
        (b"\x00\x01f\x00octet\x00\x00junk\x00", "option name", 10),
        (b"\x00\x03\x00", "block", 2),
        (b"\x00\x04\x01", "block", 2),
        (b"\x00\x05\x00", "code", 2),
    ],
)
def test_decode_errors_name_field_and_offset(wire: bytes, field: str, offset: int) -> None:
    with pytest.raises(DecodeError) as info:
        parse(wire)
    assert info.value.field == field
    assert info.value.offset == offset


def test_encode_refuses_unencodable_values() -> None:
    with pytest.raises(ValueError):
        Ack(70000)
    with pytest.raises(ValueError):
        encode(ReadRequest("a\x00b"))
    with pytest.raises(ValueError):
        encode(OptionAck((("", "1"),)))


@settings(max_examples=2000)
@given(st.binary(max_size=600))
def test_fuzz_parse_raises_only_decode_error(data: bytes) -> None:
    try:
        packet = parse(data)
    except DecodeError:
        return
    assert parse(encode(packet)) == packet


_ascii = st.text(st.characters(min_codepoint=1, max_codepoint=127), min_size=1, max_size=20)
_options = st.lists(
    st.tuples(_ascii, st.text(st.characters(min_codepoint=1, max_codepoint=127), max_size=8)),
    max_size=5,
)


@given(
    st.sampled_from([0, 1, 2, 3]),
    st.text(st.characters(min_codepoint=1, blacklist_categories=("Cs",)), max_size=40),
    _ascii,
    _options,
    st.integers(0, 65535),
    st.binary(max_size=64),
)
def test_fuzz_round_trip(
    kind: int, name: str, mode: str, options: list[tuple[str, str]], block: int, data: bytes
) -> None:
    packets: list[Packet] = [
        ReadRequest(name, mode, tuple(options)),
        WriteRequest(name, mode, tuple(options)),
        Data(block, data),
        OptionAck(tuple(options)),
    ]
    packet = packets[kind]
    assert parse(encode(packet)) == packet


@settings(max_examples=2000)
@given(st.binary(max_size=80), st.binary(max_size=80))
def test_fuzz_mutated_requests(prefix: bytes, suffix: bytes) -> None:
    base = b"\x00\x01" + prefix + b"\x00octet\x00blksize\x001468\x00" + suffix
    with contextlib.suppress(DecodeError):
        parse(base)


# ------------------------------------------------------------------------ negotiation

POLICY = Policy(mtu=1500, retransmit=1.0, backoff=2.0, max_interval=8.0, max_retries=3)


def test_only_requested_options_case_preserved() -> None:
    n = negotiate((("BLKSIZE", "1024"), ("TSize", "0"), ("color", "blue")), 5000, POLICY)
    assert n.oack == (("BLKSIZE", "1024"), ("TSize", "5000"))
    assert (n.blksize, n.tsize, n.windowsize, n.timeout) == (1024, 5000, 1, None)


@pytest.mark.parametrize(
    ("asked", "granted"),
    [("70000", "1468"), ("65464", "1468"), ("1468", "1468"), ("8", "8"), ("1432", "1432")],
)
def test_blksize_clamped_never_above_request(asked: str, granted: str) -> None:
    n = negotiate((("blksize", asked),), 10, POLICY)
    assert n.oack == (("blksize", granted),) and n.blksize == int(granted)


def test_blksize_cap_follows_mtu_and_rfc_limit() -> None:
    assert Policy(mtu=9000).max_blksize == 8968
    assert Policy(mtu=65536).max_blksize == 65464  # RFC 2348 upper bound
    n = negotiate((("blksize", "70000"),), 10, Policy(mtu=65536))
    assert n.blksize == 65464


@pytest.mark.parametrize("asked", ["7", "0", "-1", "abc", "", " 512", "+512", "99999999999"])
def test_invalid_blksize_is_ignored(asked: str) -> None:
    n = negotiate((("blksize", asked),), 10, POLICY)
    assert n.oack == () and n.blksize == 512


@pytest.mark.parametrize(
    ("asked", "echoed"), [("5", "5"), ("1", "1"), ("255", "255"), ("05", "05")]
)
def test_timeout_echoed_exactly(asked: str, echoed: str) -> None:
    n = negotiate((("timeout", asked),), 10, POLICY)
    assert n.oack == (("timeout", echoed),)


@pytest.mark.parametrize("asked", ["0", "256", "1.5", "x"])
def test_timeout_out_of_range_is_left_out(asked: str) -> None:
    assert negotiate((("timeout", asked),), 10, POLICY).oack == ()


def test_windowsize_capped_by_policy() -> None:
    assert negotiate((("windowsize", "4"),), 10, POLICY).windowsize == 4
    n = negotiate((("windowsize", "1000"),), 10, POLICY)
    assert n.oack == (("windowsize", "64"),) and n.windowsize == 64
    assert negotiate((("windowsize", "0"),), 10, POLICY).oack == ()


def test_tsize_only_when_size_known_and_first_option_wins() -> None:
    assert negotiate((("tsize", "0"),), None, POLICY).oack == ()
    n = negotiate((("blksize", "1024"), ("BLKSIZE", "512")), 10, POLICY)
    assert n.oack == (("blksize", "1024"),)


# ---------------------------------------------------------------------- state machine


def sender(
    size: int, options: tuple[tuple[str, str], ...] = (), policy: Policy = POLICY
) -> tuple[Sender, bytes]:
    data = bytes((i * 7) & 0xFF for i in range(size))
    return Sender(negotiate(options, size, policy), size, MemorySource(data), policy), data


def blocks(step: Step) -> list[int]:
    out = []
    for datagram in step.send:
        pkt = parse(datagram)
        assert isinstance(pkt, Data)
        out.append(pkt.block)
    return out


def test_plain_transfer_without_options() -> None:
    s, data = sender(1300)
    step = s.start(0.0)
    assert blocks(step) == [1] and step.deadline == 1.0
    got = bytearray(parse(step.send[0]).data)  # type: ignore[union-attr]
    step = s.ack(1, 0.1)
    got += parse(step.send[0]).data  # type: ignore[union-attr]
    step = s.ack(2, 0.2)
    last = parse(step.send[0])
    assert isinstance(last, Data) and len(last.data) == 276
    got += last.data
    step = s.ack(3, 0.3)
    assert step.done and step.outcome is Outcome.COMPLETE and step.send == ()
    assert bytes(got) == data


def test_oack_then_ack_zero() -> None:
    s, _ = sender(3000, (("blksize", "1024"), ("tsize", "0")))
    step = s.start(0.0)
    assert parse(step.send[0]) == OptionAck((("blksize", "1024"), ("tsize", "3000")))
    assert s.phase is Phase.OACK
    assert s.ack(5, 0.1).send == ()  # a stray ACK before ACK 0
    assert blocks(s.ack(0, 0.2)) == [1]


def test_empty_file_is_one_empty_block() -> None:
    s, _ = sender(0)
    step = s.start(0.0)
    assert step.send == (b"\x00\x03\x00\x01",)
    assert s.ack(1, 0.1).outcome is Outcome.COMPLETE


def test_exact_multiple_ends_with_empty_block() -> None:
    s, _ = sender(1024)
    assert s.blocks == 3
    s.start(0.0)
    s.ack(1, 0.1)
    step = s.ack(2, 0.2)
    assert step.send == (b"\x00\x03\x00\x03",)


def test_window_of_four() -> None:
    s, _data = sender(512 * 10 + 1, (("windowsize", "4"),))
    s.start(0.0)
    step = s.ack(0, 0.0)
    assert blocks(step) == [1, 2, 3, 4]
    assert blocks(s.ack(4, 0.1)) == [5, 6, 7, 8]
    # Block 6 lost: the receiver ACKs 5 (RFC 7440 §4); the window restarts at 6.
    assert blocks(s.ack(5, 0.2)) == [6, 7, 8, 9]
    assert blocks(s.ack(9, 0.3)) == [10, 11]
    assert s.ack(11, 0.4).outcome is Outcome.COMPLETE


def test_window_payloads_are_the_right_slices() -> None:
    s, data = sender(512 * 3 + 10, (("windowsize", "8"),))
    s.start(0.0)
    step = s.ack(0, 0.0)
    payload = b"".join(parse(d).data for d in step.send)  # type: ignore[union-attr]
    assert payload == data


def test_duplicate_acks_never_resend() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    s.ack(1, 0.1)
    s.ack(2, 0.2)
    deadline = s.deadline
    for _ in range(5):
        step = s.ack(2, 0.3)
        assert step.send == () and step.deadline == deadline
    assert s.ack(1, 0.4).send == ()  # an older one
    assert s.ack(9, 0.4).send == ()  # one for a block never sent
    assert s.duplicate_acks == 5


def test_rollover_to_zero() -> None:
    size = 65_537 * 8  # blksize 8: 65,538 blocks
    s, data = sender(size, (("blksize", "8"), ("windowsize", "64")))
    s.start(0.0)
    ack, wire_blocks, got = 0, [], bytearray()
    for _ in range(2000):
        step = s.ack(ack, 0.0)
        if step.done:
            break
        for datagram in step.send:
            pkt = parse(datagram)
            assert isinstance(pkt, Data)
            wire_blocks.append(pkt.block)
            got += pkt.data
        ack = wire_blocks[-1]
    assert step.outcome is Outcome.COMPLETE
    assert wire_blocks[65_533:65_538] == [65_534, 65_535, 0, 1, 2]
    assert len(wire_blocks) == 65_538 and bytes(got) == data


def test_ack_across_the_wrap_is_progress_not_duplicate() -> None:
    s, _ = sender(8 * 70_000, (("blksize", "8"), ("windowsize", "4")))
    s.start(0.0)
    s.ack(0, 0.0)
    s.acked = s.sent = 65_534  # fast-forward (the internal counters do not wrap)
    step = s._send_window(0.0)
    assert blocks(step) == [65_535, 0, 1, 2]
    assert blocks(s.ack(0, 0.1)) == [1, 2, 3, 4]  # ACK 0 = block 65,536
    assert s.acked == 65_536


def test_timeout_backoff_then_give_up() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    step = s.ack(1, 0.0)  # the client answered: the full backoff applies from here
    deadlines = [step.deadline]
    for _ in range(3):
        assert step.deadline is not None
        step = s.timeout(step.deadline)
        assert blocks(step) == [2]
        deadlines.append(step.deadline)
    assert deadlines == [1.0, 3.0, 7.0, 15.0]  # 1, 2, 4, 8 (capped at max_interval 8)
    assert step.deadline is not None
    step = s.timeout(step.deadline)
    assert step.outcome is Outcome.TIMED_OUT
    assert parse(step.send[0]) == Error(ErrorCode.NOT_DEFINED, "timed out")
    assert s.timeout(100.0).send == ()


def test_backoff_capped_and_reset_on_progress() -> None:
    policy = Policy(retransmit=1.0, backoff=3.0, max_interval=5.0, max_retries=10)
    s, _ = sender(5000, policy=policy)
    s.start(0.0)
    s.ack(1, 0.0)
    step = s.timeout(1.0)  # retry 1 → +3
    step = s.timeout(4.0)  # retry 2 → +5 (capped)
    assert step.deadline == 9.0
    step = s.ack(2, 5.0)
    assert step.deadline == 6.0 and s.retries == 0


@pytest.mark.parametrize("options", [(), (("blksize", "1024"),)])
def test_a_client_that_never_answers_is_given_up_quickly(
        options: tuple[tuple[str, str], ...]) -> None:
    """First DATA (or OACK) unanswered: first_retries resends at the base interval, no
    backoff, then TIMED_OUT, about 3 s instead of the ~45 s a started transfer may wait."""
    policy = Policy(retransmit=1.0, max_retries=6, first_retries=2)
    s = Sender(negotiate(options, 5000, policy), 5000, MemorySource(b"x" * 5000), policy)
    step = s.start(0.0)
    deadlines = [step.deadline]
    for _ in range(2):
        assert step.deadline is not None
        step = s.timeout(step.deadline)
        assert len(step.send) == 1
        deadlines.append(step.deadline)
    assert deadlines == [1.0, 2.0, 3.0]
    step = s.timeout(3.0)
    assert step.outcome is Outcome.TIMED_OUT and "never answered" in step.reason


def test_stale_timer_is_ignored() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    step = s.timeout(0.5)
    assert step.send == () and step.deadline == 1.0


def test_stall_limit() -> None:
    policy = Policy(retransmit=50.0, max_interval=100.0, max_retries=100, stall=120.0)
    s, _ = sender(5000, policy=policy)
    s.start(0.0)
    assert blocks(s.timeout(50.0)) == [1]
    assert s.timeout(150.0).outcome is Outcome.TIMED_OUT


def test_negotiated_timeout_is_the_retransmit_interval() -> None:
    s, _ = sender(5000, (("timeout", "5"),))
    assert s.start(0.0).deadline == 5.0


@pytest.mark.parametrize("acks", [[], [0]])
def test_error_after_oack_or_first_block_is_a_probe(acks: list[int]) -> None:
    s, _ = sender(5000, (("tsize", "0"),))
    s.start(0.0)
    for a in acks:
        s.ack(a, 0.1)
    step = s.error(ErrorCode.OPTION_NEGOTIATION, "size probe", 0.2)
    assert step.outcome is Outcome.PROBE and step.send == ()


def test_error_later_is_a_client_abort() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    s.ack(1, 0.1)
    assert s.error(0, "user abort", 0.2).outcome is Outcome.CLIENT_ERROR


def test_duplicate_request_resends_only_before_progress() -> None:
    s, _ = sender(5000, (("blksize", "1024"),))
    first = s.start(0.0)
    assert s.duplicate_request(0.1).send == first.send
    s.ack(0, 0.2)
    assert blocks(s.duplicate_request(0.3)) == [1]
    s.ack(1, 0.4)
    assert s.duplicate_request(0.5).send == ()


def test_shrunken_source_fails_cleanly() -> None:
    class Short:
        def read(self, offset: int, length: int) -> bytes:
            return b"x" * (length // 2)

    s = Sender(Negotiated(), 5000, Short(), POLICY)
    step = s.start(0.0)
    assert step.outcome is Outcome.SOURCE_ERROR
    assert parse(step.send[0]) == Error(0, "file changed")


def test_events_after_done_do_nothing() -> None:
    s, _ = sender(10)
    s.start(0.0)
    assert s.ack(1, 0.1).outcome is Outcome.COMPLETE
    for step in (s.ack(1, 0.2), s.timeout(9.0), s.error(0, "", 9.0), s.duplicate_request(9.0)):
        assert step.send == () and step.deadline is None
