"""The TFTP codec and the sender state machine, without sockets or clocks."""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable

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
    Packets,
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


@pytest.mark.parametrize(("wire", "packet"), GOLDEN)
def test_any_buffer_parses_as_its_bytes(wire: bytes, packet: Packet) -> None:
    """A :class:`Sender`'s datagram is often a view of its window frame, and a receive
    buffer a bytearray: both parse like the bytes they hold (compiled with mypyc, an
    argument annotated ``bytes`` refuses them)."""
    frame = bytearray(b"\xff" + wire + b"\xff")
    assert parse(memoryview(frame)[1:-1]) == packet
    assert parse(bytearray(wire)) == packet


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
    # A last option name with no value: ignored, the request kept (tftpd-hpa and dnsmasq
    # serve it); a value begun and not terminated is still an error (below).
    assert parse(b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00") == ReadRequest(
        "f", "octet", (("tsize", "0"),))
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


@pytest.mark.parametrize("asked", ["7", "0", "-1", "abc", "", " 512", "+512", "99999999999",
                                   "\u0665\u0661\u0662", "5\u0661\u0662", "512\u00b2"])
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


@pytest.mark.parametrize(("timeout", "deadlines"), [
    ("255", [5.0, 10.0, 15.0]), ("5", [5.0, 10.0, 15.0]), ("2", [2.0, 4.0, 6.0])])
def test_a_clients_long_timeout_does_not_hold_its_slot_before_it_answers(
        timeout: str, deadlines: list[float]) -> None:
    """An RRQ asking ``timeout`` 255 (RFC 2349's most) and never answering: its OACK was
    resent every 255 s, so the slot was held 255 s (the stall ends it at the first timer),
    not the ~3 s first_retries mean; 16 forged RRQs a second held all 4,096. Until the client
    answers, resends are at most max_first_interval (5 s) apart; the OACK still echoes 255,
    and a client's timeout up to 5 s (U-Boot's) is kept as it asked. Once it answered, its
    timeout is the ceiling of the timer again."""
    policy = Policy(retransmit=1.0, max_retries=6, first_retries=2)
    negotiated = negotiate((("timeout", timeout),), 5000, policy)
    assert negotiated.oack == (("timeout", timeout),)
    s = Sender(negotiated, 5000, MemorySource(b"x" * 5000), policy)
    step = s.start(0.0)
    seen = [step.deadline]
    for _ in range(2):
        assert step.deadline is not None
        step = s.timeout(step.deadline)
        seen.append(step.deadline)
    assert seen == deadlines
    assert step.deadline is not None
    step = s.timeout(step.deadline)
    assert step.outcome is Outcome.TIMED_OUT and "never answered" in step.reason
    # Answered: the client's own timeout bounds the timer (the fixed timer: its value).
    fixed = Policy(retransmit=1.0, min_rto=None)
    s = Sender(negotiate((("timeout", "255"),), 5000, fixed), 5000,
               MemorySource(b"x" * 5000), fixed)
    assert s.start(0.0).deadline == 5.0
    assert s.ack(0, 1.0).deadline == 256.0


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


def test_a_closed_port_before_any_answer_ends_the_transfer() -> None:
    # An ICMP port unreachable for the OACK: the client is gone, no ERROR sent to it.
    s, _ = sender(5000, (("tsize", "0"),))
    s.start(0.0)
    step = s.unreachable(0.01)
    assert step.outcome is Outcome.TIMED_OUT and step.send == () and "closed" in step.reason
    assert s.unreachable(0.02).outcome is Outcome.TIMED_OUT  # and stays over


def test_a_closed_port_after_an_answer_is_left_to_the_timer() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    s.ack(1, 0.1)
    step = s.unreachable(0.2)
    assert step.outcome is None and step.send == () and step.deadline == s.deadline


def test_error_later_is_a_client_abort() -> None:
    s, _ = sender(5000)
    s.start(0.0)
    s.ack(1, 0.1)
    assert s.error(0, "user abort", 0.2).outcome is Outcome.CLIENT_ERROR



def test_a_new_request_from_the_clients_port_ends_the_transfer_as_its_error_would() -> None:
    probe, _ = sender(5000, (("tsize", "0"),))
    probe.start(0.0)
    step = probe.abandoned(0.1)
    assert step.outcome is Outcome.PROBE and step.send == () and "new request" in step.reason
    later, _ = sender(5000)
    later.start(0.0)
    later.ack(1, 0.1)
    step = later.abandoned(0.2)
    assert step.outcome is Outcome.CLIENT_ERROR and step.send == ()
    assert later.abandoned(0.3).send == ()  # over already: nothing more to send

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


# ------------------------------------------------------------- loss recovery (simulated)


class LossyLink:
    """A sender and an RFC 1350 / 7440 receiver joined by a link that drops datagrams in both
    directions from a seeded RNG, on a virtual clock: the outcome is the same on every run.

    The receiver ACKs the last in-order block when its window is full, on the last block,
    on a gap (RFC 7440 §4), and on every duplicate DATA (as RFC 1350 clients do: the ACK
    that triggers the Sorcerer's Apprentice bug in a sender that answers it). It resends its
    last ACK after ``client_timeout`` without DATA.
    """

    def __init__(self, s: Sender, *, loss: float, seed: int, one_way: float = 0.0002,
                 client_timeout: float = 1.0) -> None:
        import heapq
        import random

        self.s, self.loss, self.one_way = s, loss, one_way
        self.rng = random.Random(seed)  # a drop pattern, not security-relevant
        self.client_timeout = client_timeout
        self.queue: list[tuple[float, int, str, int, bytes]] = []
        self.push = heapq.heappush
        self.pop = heapq.heappop
        self.seq = 0
        self.received = bytearray()
        self.expected = 1  # next block, counted without wrapping
        self.since_ack = 0
        self.data_sent = 0
        self.dropped = 0
        self.sends_on_duplicate_ack = 0
        self.deadline: float | None = None
        self.last_heard = 0.0

    def _at(self, when: float, kind: str, value: int, payload: bytes = b"") -> None:
        self.seq += 1
        self.push(self.queue, (when, self.seq, kind, value, payload))

    def _lost(self) -> bool:
        if self.rng.random() < self.loss:
            self.dropped += 1
            return True
        return False

    def _server_sent(self, now: float, step: Step) -> None:
        for datagram in step.send:
            pkt = parse(datagram)
            if isinstance(pkt, Data):
                self.data_sent += 1
                if not self._lost():
                    self._at(now + self.one_way, "data", pkt.block, pkt.data)
            elif isinstance(pkt, OptionAck) and not self._lost():
                self._at(now + self.one_way, "oack", 0)
        self.deadline = step.deadline

    def _client_ack(self, now: float) -> None:
        self.since_ack = 0
        self.last_heard = now
        if not self._lost():
            self._at(now + self.one_way, "ack", (self.expected - 1) & 0xFFFF)

    def run(self, limit: int = 1_000_000) -> float:
        now = 0.0
        self._server_sent(now, self.s.start(now))
        window = self.s.windowsize
        for _ in range(limit):
            if self.s.outcome is not None:
                return now
            timer = self.deadline if self.deadline is not None else float("inf")
            client_timer = self.last_heard + self.client_timeout
            nxt = self.queue[0][0] if self.queue else float("inf")
            if timer <= min(nxt, client_timer):
                now = timer
                self._server_sent(now, self.s.timeout(now))
                continue
            if client_timer < nxt:
                now = client_timer
                self._client_ack(now)
                continue
            now, _, kind, value, payload = self.pop(self.queue)
            if kind == "ack":
                duplicate = value == self.s.acked & 0xFFFF and self.s.phase is Phase.DATA
                step = self.s.ack(value, now)
                if duplicate and step.send:
                    self.sends_on_duplicate_ack += 1
                self._server_sent(now, step)
            elif kind == "oack":
                if self.expected == 1:
                    self._client_ack(now)  # ACK 0
            elif value == self.expected & 0xFFFF:
                self.received += payload
                self.expected += 1
                self.since_ack += 1
                self.last_heard = now
                if len(payload) < self.s.blksize or self.since_ack >= window:
                    self._client_ack(now)
            else:
                self._client_ack(now)  # a gap or a duplicate: ACK the last in-order block
        raise AssertionError("simulation did not finish")


@pytest.mark.parametrize(("windowsize", "loss", "seed"),
                         [(1, 0.10, 1), (1, 0.10, 2), (1, 0.01, 3), (8, 0.01, 4), (8, 0.10, 5),
                          (4, 0.25, 6)])
def test_lossy_link_completes_intact_without_a_full_timeout(
        windowsize: int, loss: float, seed: int) -> None:
    size = 400 * 1468 + 100
    options = (("blksize", "1468"), ("windowsize", str(windowsize)))
    s, data = sender(size, options, Policy(retransmit=1.0, max_retries=6))
    link = LossyLink(s, loss=loss, seed=seed)
    link.run()
    assert s.outcome is Outcome.COMPLETE
    assert bytes(link.received) == data
    # Sorcerer's Apprentice: a duplicate ACK never made the sender transmit.
    assert link.sends_on_duplicate_ack == 0
    # Every lost datagram cost at most a few resends of its window, not a storm.
    assert s.retransmissions <= 3 * link.dropped + 1
    assert link.data_sent <= s.blocks + windowsize * (s.retransmissions + link.dropped + 1)
    # The round-trip timer did the recovering: not one timeout reached the base interval
    # (which is what a lost block costs with a fixed timer, and in tftpd-hpa and dnsmasq).
    assert s.retries == 0 and s.srtt is not None and s.srtt < 0.01


def test_retransmit_timer_follows_the_round_trip() -> None:
    s, _ = sender(50 * 512, policy=Policy(retransmit=1.0, min_rto=0.005))
    s.start(0.0)
    s.ack(1, 0.001)  # the first window was not timed: DATA 1 may have waited for the RRQ
    step = s.ack(2, 0.003)  # 2 ms round trip
    assert s.srtt == pytest.approx(0.002)
    assert step.deadline == pytest.approx(0.003 + 0.002 + 4 * 0.001)  # SRTT + 4 RTTVAR
    for i in range(3, 40):
        step = s.ack(i, 0.003 + (i - 2) * 0.0001)  # a steady 0.1 ms
    assert step.deadline is not None
    assert step.deadline - s._progress == pytest.approx(0.005)  # floored at min_rto


def test_backoff_from_the_round_trip_then_the_retry_budget() -> None:
    """Timeouts double the interval from the RTT-derived one; only those at the base
    interval or above spend max_retries, so a client that went quiet is given up about
    as late as with the fixed timer."""
    policy = Policy(retransmit=1.0, backoff=2.0, max_interval=4.0, max_retries=2,
                    min_rto=0.01)
    s, _ = sender(50 * 512, policy=policy)
    s.start(0.0)
    s.ack(1, 0.0)
    step = s.ack(2, 0.0)  # a 0 s sample: the interval is the floor
    intervals = []
    now = 0.0
    for _ in range(20):
        assert step.deadline is not None
        intervals.append(round(step.deadline - now, 6))
        now = step.deadline
        step = s.timeout(now)
        if step.done:
            break
    assert intervals == [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 4.0]
    assert step.outcome is Outcome.TIMED_OUT
    assert s.retransmissions == 9


def test_a_retransmitted_window_is_not_a_round_trip_sample() -> None:
    """Karn's rule: the ACK after a resend may answer either copy, so it is not timed."""
    s, _ = sender(50 * 512, policy=Policy(retransmit=1.0, min_rto=0.005))
    s.start(0.0)
    s.ack(1, 0.0)
    s.ack(2, 0.002)
    srtt = s.srtt
    s.timeout(1.0)  # block 3 resent
    s.ack(3, 1.5)  # would be a 1.5 s sample
    assert s.srtt == srtt


def lockstep_client(s: Sender, rtt: Callable[[int], float]) -> list[float]:
    """Runs ``s`` against a lock-step client on a fake clock: each DATA is answered
    ``rtt(block)`` after it was sent, a duplicate too (RFC 1350 clients ACK every DATA),
    nothing lost. Returns the times of the timer's resends."""
    acks: list[tuple[float, int]] = []  # (arrival, block) in flight
    got = 0  # the client's last in-order block
    resends: list[float] = []

    def sent(step: Step, now: float) -> None:
        nonlocal got
        for block in blocks(step):
            got = block if block == got + 1 else got
            heapq.heappush(acks, (now + rtt(block), got))

    sent(s.start(0.0), 0.0)
    while s.outcome is None:
        deadline = s.deadline
        assert deadline is not None
        if acks and acks[0][0] <= deadline:
            now, block = heapq.heappop(acks)
            sent(s.ack(block, now), now)
        else:
            resends.append(deadline)
            sent(s.timeout(deadline), deadline)
    return resends


def test_a_client_that_became_slower_than_the_timer_is_learnt() -> None:
    """After 20 blocks at 0.2 ms the client takes 8 ms per block, above the 5 ms floor.
    Every block times out and is resent, so none is a sample by Karn's rule; without more,
    SRTT never learns and every block goes twice. The client ACKs both copies: the second
    ACK shows the timeout spurious, the first copy's round trip is a sample, the floor rises
    to it, and the resends stop after a few blocks."""
    s, _ = sender(200 * 512, policy=Policy(retransmit=1.0, min_rto=0.005))
    resends = lockstep_client(s, lambda block: 0.0002 if block <= 20 else 0.008)
    assert s.outcome is Outcome.COMPLETE
    assert 1 <= len(resends) <= 4, resends  # the base: 181, one per slow block and one more
    assert s.spurious == len(resends)
    assert s.srtt is not None and s.srtt > 0.007
    assert s._floor is not None and 0.008 <= s._floor <= 0.02


def test_a_stall_raises_the_floor_at_most_four_times_min_rto() -> None:
    """One 100 ms stall of the client: block 50 resent at the backoff (5, 10, 20, 40 ms),
    one spurious timeout found, a floor of 20 ms (not 100), and the estimate back near the
    0.2 ms round trip by the end."""
    s, _ = sender(2000 * 512, policy=Policy(retransmit=1.0, min_rto=0.005))
    resends = lockstep_client(s, lambda block: 0.1 if block == 50 else 0.0002)
    assert s.outcome is Outcome.COMPLETE
    assert len(resends) == 4 and s.spurious == 1
    assert s._floor == pytest.approx(0.02)
    assert s.srtt is not None and s.srtt < 0.001


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_lost_block_or_ack_is_not_taken_for_a_spurious_timeout(seed: int) -> None:
    """In lock-step a loss brings one ACK after the resend: the floor stays min_rto."""
    size = 400 * 1468 + 100
    s, _ = sender(size, (("blksize", "1468"),), Policy(retransmit=1.0, min_rto=0.005))
    LossyLink(s, loss=0.10, seed=seed).run()
    assert s.outcome is Outcome.COMPLETE and s.retransmissions > 50
    assert s.spurious == 0 and s._floor == 0.005


def test_a_repeated_ack_of_the_oack_after_a_resend_is_not_a_spurious_timeout() -> None:
    s, _ = sender(50 * 512, (("tsize", "0"),), Policy(retransmit=1.0, min_rto=0.005))
    s.start(0.0)
    s.ack(0, 0.001)  # DATA 1
    assert blocks(s.timeout(1.001)) == [1]  # the fixed base interval: no sample yet
    assert s.ack(0, 1.002).send == ()  # the client ACKs the OACK again
    assert s.spurious == 0 and s.srtt is None


def test_a_block_sent_again_in_a_restarted_window_is_not_a_round_trip_sample() -> None:
    """Karn's rule for RFC 7440's restart: after a partial ACK the window starts again
    after the acknowledged block, so its first blocks were sent before; an ACK of one of
    them may answer the earlier copy. Only an ACK of a block sent once is timed."""
    s, _ = sender(50 * 512, (("windowsize", "4"),), Policy(retransmit=1.0, min_rto=0.005))
    s.start(0.0)
    assert blocks(s.ack(0, 0.0)) == [1, 2, 3, 4]  # the OACK's ACK
    assert blocks(s.ack(4, 0.002)) == [5, 6, 7, 8]  # a 2 ms sample
    assert blocks(s.ack(6, 0.004)) == [7, 8, 9, 10]  # 2 ms again; 7 and 8 sent again
    assert s.srtt == pytest.approx(0.002)
    rttvar = s._rttvar
    assert blocks(s.ack(7, 0.0041)) == [8, 9, 10, 11]  # may answer the first 7: 0.1 ms?
    assert s.srtt == pytest.approx(0.002) and s._rttvar == rttvar
    s.ack(11, 0.0061)  # sent once, 2 ms ago: a sample
    assert s.srtt == pytest.approx(0.002) and s._rttvar < rttvar


def test_fixed_timer_when_min_rto_is_none() -> None:
    s, _ = sender(50 * 512, policy=Policy(retransmit=1.0, min_rto=None))
    s.start(0.0)
    s.ack(1, 0.0)
    step = s.ack(2, 0.001)
    assert step.deadline == pytest.approx(1.001)


def test_a_clients_timeout_below_min_rto_is_still_the_ceiling() -> None:
    """RFC 2349: a client that named a timeout never waits longer than it asked, also when
    the server's min_rto (valid: at most its own retransmit) is above that timeout."""
    s, _ = sender(50 * 512, (("timeout", "1"),), Policy(retransmit=3.0, min_rto=2.0))
    s.start(0.0)
    s.ack(0, 0.01)
    window = s.ack_window(1, 0.02)  # the common lock-step ACK (next_window)
    assert isinstance(window, bytes) and parse(window) == Data(2, bytes(
        (i * 7) & 0xFF for i in range(512, 1024)))
    assert s.deadline == pytest.approx(1.02)
    step = s.ack(2, 0.03)
    assert step.deadline == pytest.approx(1.03)


def test_min_rto_must_not_exceed_retransmit() -> None:
    with pytest.raises(ValueError, match="min_rto"):
        Policy(retransmit=0.5, min_rto=1.0)


# ------------------------------------------------------------- prebuilt DATA (Packets)


@pytest.mark.parametrize(("size", "blksize"), [(0, 512), (1300, 512), (1024, 512),
                                               (100_000, 1468), (7, 8)])
def test_packets_are_the_data_datagrams_of_the_payload(size: int, blksize: int) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(size))
    packets = Packets(payload, blksize)
    assert packets.blocks == size // blksize + 1 == len(packets.datagrams)
    assert packets.nbytes == sum(len(d) for d in packets.datagrams) == size + 4 * packets.blocks
    for n, datagram in enumerate(packets.datagrams, 1):
        assert parse(datagram) == Data(n, payload[(n - 1) * blksize : n * blksize])
    # An exact multiple of blksize ends with an empty DATA (RFC 1350).
    assert len(packets.datagrams[-1]) == 4 + size % blksize
    assert packets.window(1, 1) == (packets.datagrams[0],)


def test_packet_block_numbers_wrap_past_65535() -> None:
    packets = Packets(bytes(65_537 * 8), 8)
    assert [parse(packets.datagrams[i]).block for i in (65_534, 65_535, 65_536)] == [  # type: ignore[union-attr]
        65_535, 0, 1]


def test_packets_of_another_blksize_are_refused() -> None:
    negotiated = negotiate((("blksize", "1024"),), 5000, POLICY)
    with pytest.raises(ValueError, match="blksize"):
        Sender(negotiated, 5000, Packets(bytes(5000), 512), POLICY)


def test_ack_window_leaves_every_other_ack_to_ack() -> None:
    size = 20 * 1468
    options = (("blksize", "1468"), ("windowsize", "4"))
    s = Sender(negotiate(options, size, POLICY), size, Packets(bytes(size), 1468), POLICY)
    s.start(0.0)
    assert s.ack_window(0, 0.1) is None  # ACK 0 of the OACK: ack() does it
    s.ack(0, 0.1)  # blocks 1-4 sent
    before = (s.acked, s.sent, s.deadline, s.srtt, s.duplicate_acks)
    for block in (0, 2, 9):  # a duplicate, a gap in the window, a block never sent
        assert s.ack_window(block, 0.2) is None
        assert (s.acked, s.sent, s.deadline, s.srtt, s.duplicate_acks) == before
    send = s.ack_window(4, 0.2)  # the whole window: the next one
    assert send is not None and [parse(d).block for d in send] == [5, 6, 7, 8]  # type: ignore[union-attr]
    assert s.acked == 4 and s.sent == 8 and s.deadline is not None


def test_ack_window_serves_only_a_window_sent_once() -> None:
    """ack_window takes the ACK of a window that went out once and leaves the rest to ack():
    after a resend (Karn: no RTT sample) and after the end, the same block number is ack()'s,
    which re-arms it; the served ACK is a sample again."""
    size = 30 * 1468
    s = Sender(negotiate((("blksize", "1468"),), size, POLICY), size,
               Packets(bytes(size), 1468), POLICY)
    s.start(0.0)
    s.ack(0, 0.0)  # block 1 sent at 0.0
    assert s.ack_window(1, 0.002) is not None  # block 2 sent at 0.002
    srtt = s.srtt
    assert srtt == pytest.approx(0.002)
    deadline = s.deadline
    assert deadline is not None
    assert s.timeout(deadline).send  # block 2 resent
    before = (s.acked, s.sent, s.deadline, s.srtt, s.retries, s.retransmissions)
    assert s.ack_window(2, deadline + 0.5) is None  # the resent window: ack()'s
    assert (s.acked, s.sent, s.deadline, s.srtt, s.retries, s.retransmissions) == before
    step = s.ack(2, deadline + 0.5)
    assert [parse(d).block for d in step.send] == [3]  # type: ignore[union-attr]
    assert s.srtt == srtt and s.retries == 0  # no sample from a resent window
    assert s.ack_window(3, deadline + 0.501) is not None  # sent once: served, and timed
    assert s.srtt == pytest.approx(srtt + (0.001 - srtt) / 8)
    assert s.error(0, "bye", deadline + 0.6).outcome is Outcome.CLIENT_ERROR
    assert s.ack_window(4, deadline + 0.6) is None and s.acked == 3


def test_ack_window_follows_block_numbers_across_the_wrap() -> None:
    """Lock-step past block 65535: every ACK but the last is served by ack_window, by its
    16-bit number, and the last (the short block) completes through ack()."""
    size = 65_540 * 8 + 3
    s = Sender(negotiate((("blksize", "8"),), size, POLICY), size, Packets(bytes(size), 8),
               POLICY)
    s.start(0.0)
    s.ack(0, 0.0)
    for n in range(1, s.blocks - 1):
        send = s.ack_window(n & 0xFFFF, 0.0)
        # One block: the datagram itself, not a tuple of one.
        assert isinstance(send, bytes) and send[:4] == b"\x00\x03" + ((n + 1) % 65536).to_bytes(2)
    assert s.ack_window((s.blocks - 1) & 0xFFFF, 0.0) is not None  # the last block sent
    assert s.ack_window(s.blocks & 0xFFFF, 0.0) is None
    assert s.ack(s.blocks & 0xFFFF, 0.0).outcome is Outcome.COMPLETE


class WindowMemory:
    """A :class:`WindowSource` over bytes: ``read_into`` fills the buffers in order, as
    ``os.preadv`` does, and stops short at the end of the data (a file that shrank)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0  # read_into calls
        self.blocks_read = 0  # blocks they carried

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def read_into(self, offset: int, buffers: list[memoryview]) -> int:
        self.reads += 1
        self.blocks_read += len(buffers)
        at = offset
        for buf in buffers:
            chunk = self.data[at : at + len(buf)]
            buf[: len(chunk)] = chunk
            at += len(chunk)
            if len(chunk) < len(buf):
                break
        return at - offset


@pytest.mark.parametrize("windowsize", [1, 4])
def test_ack_window_streams_full_windows_and_leaves_the_last_to_ack(windowsize: int) -> None:
    """From a source (a file too big for the packet cache): ack_window sends every window
    but the last, which ends in the short block and is ack()'s; a read that comes short
    leaves the state untouched for ack() to report."""
    size = 10 * 512 + 7
    data = bytes((i * 13) & 0xFF for i in range(size))
    source = WindowMemory(data)
    s = Sender(negotiate((("windowsize", str(windowsize)),), size, POLICY), size,
               source, POLICY)
    s.start(0.0)
    got = bytearray(b"".join(parse(d).data for d in s.ack(0, 0.0).send))  # type: ignore[union-attr]
    while s.sent < s.blocks:
        before = (s.acked, s.sent)
        send = s.ack_window(s.sent, 0.1)
        if before[1] + windowsize >= s.blocks:
            assert send is None and (s.acked, s.sent) == before
            send = s.ack(s.sent, 0.1).send
        else:
            # ack_window: a window of one block is the datagram itself, not a tuple of one.
            assert isinstance(send, tuple) == (windowsize > 1)
        assert send is not None
        pkts = [parse(d) for d in (send if isinstance(send, tuple) else (send,))]
        assert [p.block for p in pkts] == list(range(s.acked + 1, s.sent + 1))  # type: ignore[union-attr]
        got += b"".join(p.data for p in pkts)  # type: ignore[union-attr]
    assert s.ack(s.sent, 0.2).outcome is Outcome.COMPLETE and bytes(got) == data
    shrunk = Sender(negotiate((("windowsize", str(windowsize)),), size, POLICY), size,
                    WindowMemory(data[:1000]), POLICY)
    shrunk.start(0.0)
    shrunk.ack(0, 0.0)
    before = (shrunk.acked, shrunk.sent, shrunk.deadline, shrunk.srtt)
    assert shrunk.ack_window(shrunk.sent, 0.1) is None
    assert (shrunk.acked, shrunk.sent, shrunk.deadline, shrunk.srtt) == before
    assert shrunk.ack(shrunk.sent, 0.1).outcome is Outcome.SOURCE_ERROR


@pytest.mark.parametrize(("windowsize", "loss", "seed"), [(1, 0.10, 1), (8, 0.10, 5),
                                                          (4, 0.25, 6)])
def test_packets_and_a_source_are_the_same_transfer(
        windowsize: int, loss: float, seed: int) -> None:
    """The prebuilt path (ack_window), the read-per-window path and the window read into its
    frame make the same decisions: over the same lossy link the same datagrams go out at the
    same times."""
    size = 300 * 1468 + 100
    options = (("blksize", "1468"), ("windowsize", str(windowsize)))
    policy = Policy(retransmit=1.0, max_retries=6)
    runs = []
    for how in ("read", "packets", "read_into"):
        s, data = sender(size, options, policy)
        if how == "packets":
            s = Sender(negotiate(options, size, policy), size, Packets(data, 1468), policy)
        elif how == "read_into":
            s = Sender(negotiate(options, size, policy), size, WindowMemory(data), policy)
        link = LossyLink(s, loss=loss, seed=seed)
        finished = link.run()
        assert s.outcome is Outcome.COMPLETE and bytes(link.received) == data
        assert link.sends_on_duplicate_ack == 0
        runs.append((finished, s.retransmissions, link.data_sent, link.dropped, s.srtt))
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("size", [10 * 512, 10 * 512 + 7, 2 * 512, 3 * 512 + 1, 0, 100])
def test_a_window_read_into_its_frame_ends_like_the_file(size: int) -> None:
    """Full windows, a short last window, a last block that is short or empty (an exact
    multiple of blksize, RFC 1350): each datagram is DATA n with the right slice."""
    data = bytes((i * 7) & 0xFF for i in range(size))
    source = WindowMemory(data)
    options = (("windowsize", "4"),)
    s = Sender(negotiate(options, size, POLICY), size, source, POLICY)
    s.start(0.0)
    step = s.ack(0, 0.0)
    got = bytearray()
    for _ in range(100):
        pkts = [parse(d) for d in step.send]
        assert all(isinstance(p, Data) for p in pkts)
        assert [p.block for p in pkts] == list(range(s.acked + 1, s.sent + 1))  # type: ignore[union-attr]
        got += b"".join(p.data for p in pkts)  # type: ignore[union-attr]
        step = s.ack(s.sent, 0.1)
        if step.done:
            break
    assert step.outcome is Outcome.COMPLETE and bytes(got) == data
    # Windows of two blocks or more came from read_into; a single block from read.
    assert source.blocks_read == s.blocks - (s.blocks % 4 == 1)


def test_a_window_frame_wraps_block_numbers_and_resends_intact() -> None:
    blocks = 65_540
    size = blocks * 8 - 3
    data = bytes((i * 7) & 0xFF for i in range(size))
    options = (("blksize", "8"), ("windowsize", "10"))
    s = Sender(negotiate(options, size, POLICY), size, WindowMemory(data), POLICY)
    s.start(0.0)
    s.ack(0, 0.0)
    while s.sent < 65_530:
        s.ack(s.sent % 65536, 0.1)
    step = s.ack(s.sent % 65536, 0.1)  # 65,531 .. 65,540 (wire 65,531 .. 65,535, 0 .. 4)
    first = [bytes(d) for d in step.send]
    assert [parse(d).block for d in first] == [  # type: ignore[union-attr]
        *range(65_531, 65_536), *range(0, 5)]
    # The timer resends the window from the same frame: the same bytes again.
    resent = s.timeout(s.deadline or 0.0)
    assert [bytes(d) for d in resent.send] == first
    assert b"".join(parse(d).data for d in first) == data[65_530 * 8 :]  # type: ignore[union-attr]


def test_a_shrunken_window_source_fails_cleanly() -> None:
    size = 20 * 512
    s = Sender(negotiate((("windowsize", "8"),), size, POLICY), size,
               WindowMemory(bytes(size // 2)), POLICY)
    s.start(0.0)
    assert s.ack(0, 0.0).send  # blocks 1-8 exist
    step = s.ack(8, 0.1)  # 9-16 do not all exist any more
    assert step.outcome is Outcome.SOURCE_ERROR
    assert parse(step.send[0]) == Error(0, "file changed")


def test_windows_past_the_iov_limit_are_read_not_read_into() -> None:
    """preadv takes at most IOV_MAX buffers: a window larger than that is read as before."""
    size = 2000 * 8
    data = bytes(size)
    source = WindowMemory(data)
    policy = Policy(max_windowsize=1000)
    s = Sender(negotiate((("blksize", "8"), ("windowsize", "1000")), size, policy), size,
               source, policy)
    s.start(0.0)
    assert len(s.ack(0, 0.0).send) == 1000
    assert source.reads == 0


class ReadAheadLink(LossyLink):
    """The adapter's order: each window the sender hands out is sent (here: parsed into
    the link's queue, a copy), then the next one is read ahead into the frame."""

    def _server_sent(self, now: float, step: Step) -> None:
        super()._server_sent(now, step)
        self.s.read_ahead()


@pytest.mark.parametrize(("windowsize", "loss", "seed"), [(8, 0.0, 1), (8, 0.05, 5),
                                                          (4, 0.25, 6), (10, 0.1, 7)])
def test_a_window_read_ahead_is_the_same_transfer(
        windowsize: int, loss: float, seed: int) -> None:
    """The next window read into the frame while the client takes the one before: over the
    same lossy link the same datagrams go out at the same times as without, the bytes
    arrive intact, and resends and partial ACKs (which rewrite the frame) are not served
    from a stale read-ahead."""
    size = 300 * 1468 + 100
    options = (("blksize", "1468"), ("windowsize", str(windowsize)))
    policy = Policy(retransmit=1.0, max_retries=6)
    runs = []
    for link_type in (LossyLink, ReadAheadLink):
        data = bytes((i * 7) & 0xFF for i in range(size))
        s = Sender(negotiate(options, size, policy), size, WindowMemory(data), policy)
        link = link_type(s, loss=loss, seed=seed)
        finished = link.run()
        assert s.outcome is Outcome.COMPLETE and bytes(link.received) == data
        runs.append((finished, s.retransmissions, link.data_sent, link.dropped, s.srtt))
    assert runs[0] == runs[1]


def test_an_ack_of_the_window_is_answered_from_the_read_ahead() -> None:
    """After read_ahead the whole window's ACK sends the next window without a read; a
    timeout before it resends the window in flight (read again), not the one read ahead."""
    size = 40 * 512
    data = bytes((i * 11) & 0xFF for i in range(size))
    source = WindowMemory(data)
    s = Sender(negotiate((("windowsize", "4"),), size, POLICY), size, source, POLICY)
    s.start(0.0)
    s.ack(0, 0.0)  # blocks 1-4
    s.read_ahead()  # 5-8
    reads = source.reads
    send = s.ack_window(4, 0.1)
    assert send is not None and source.reads == reads
    assert [parse(d) for d in send] == [Data(b, data[(b - 1) * 512 : b * 512])
                                        for b in range(5, 9)]
    s.read_ahead()  # 9-12, then the timer fires first: 5-8 again
    resent = s.timeout(s.deadline or 0.0)
    assert [parse(d) for d in resent.send] == [Data(b, data[(b - 1) * 512 : b * 512])
                                               for b in range(5, 9)]
    assert s.ack_window(8, 1.5) is None  # a resent window's ACK is ack()'s (Karn)
    step = s.ack(8, 1.5)
    assert [parse(d).block for d in step.send] == [9, 10, 11, 12]  # type: ignore[union-attr]
