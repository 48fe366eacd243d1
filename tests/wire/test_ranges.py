"""netboot.wire.ranges: Range fields read against a length (RFC 9110 §14), If-Range
(§13.1.5) and the multipart/byteranges framing (§14.6). The statuses are those nginx 1.22
gives the same fields on a 1,000-byte file but where RFC 9110 lets a server ignore what
nginx refuses (benchmarks/README.md, s46-range)."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netboot.wire.ranges import (
    MAX_RANGES,
    UNSATISFIABLE,
    Unsatisfiable,
    byte_ranges,
    if_range_holds,
    multipart,
)

SIZE = 1000


@pytest.mark.parametrize(("field", "spans"), [
    ("bytes=0-99", ((0, 100),)),
    ("bytes=0-99,200-299", ((0, 100), (200, 300))),
    ("bytes=0-9,5-14", ((0, 10), (5, 15))),  # overlapping but within the size: as asked
    ("bytes=-500", ((500, 1000),)),
    ("bytes=-2000", ((0, 1000),)),  # a suffix longer than the file: all of it
    ("bytes=900-", ((900, 1000),)),
    ("bytes=900-5000", ((900, 1000),)),  # clipped to the end
    ("bytes=1000-2000,0-1", ((0, 2),)),  # the unsatisfiable one dropped
    ("bytes=0-0,-1", ((0, 1), (999, 1000))),
    ("bytes= 0-1", ((0, 2),)),
    ("BYTES=0-1", ((0, 2),)),
    ("bytes=0-1, 3-4", ((0, 2), (3, 5))),
    ("bytes=0-1,,3-4", ((0, 2), (3, 5))),  # RFC 9110 §5.6.1: empty elements ignored
    ("bytes=0-1,", ((0, 2),)),
    ("bytes=999-999", ((999, 1000),)),
    (f"bytes=0-{'9' * 5000}", ((0, 1000),)),  # longer than int() reads: past any file
])
def test_satisfiable(field: str, spans: tuple[tuple[int, int], ...]) -> None:
    assert byte_ranges(field, SIZE) == spans


@pytest.mark.parametrize("field", [
    "bytes=-0", "bytes=1000-", "bytes=1000-2000,2000-3000", "bytes=-0,1000-",
    f"bytes={'9' * 5000}-"])
def test_unsatisfiable(field: str) -> None:
    assert byte_ranges(field, SIZE) is UNSATISFIABLE


@pytest.mark.parametrize("field", [
    # Not a bytes ranges-specifier: ignored (RFC 9110 §14.2).
    "items=0-1", "bytes", "bytes=", "bytes=-", "bytes=abc", "bytes=5-3", "bytes=5-3,0-1",
    "bytes=0-1,x", "bytes=0x1-2", "bytes=\u0661-\u0662", "bytes=+1-2", "bytes=0-1-2", "bytes=,",
    # Amplification: more bytes than the file, or more than MAX_RANGES ranges.
    "bytes=0-999,0-999", "bytes=0-500,500-999", "bytes=" + ",".join(["0-"] * 3),
    "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1)),
])
def test_ignored(field: str) -> None:
    assert byte_ranges(field, SIZE) is None


def test_as_many_ranges_as_allowed() -> None:
    field = "bytes=" + ",".join(f"{i}-{i}" for i in range(MAX_RANGES))
    assert byte_ranges(field, SIZE) == tuple((i, i + 1) for i in range(MAX_RANGES))


def test_an_empty_file_has_no_ranges() -> None:
    assert byte_ranges("bytes=0-1", 0) is None
    assert byte_ranges("bytes=-1", 0) is None


@given(st.text(max_size=200), st.integers(min_value=0, max_value=1 << 40))
def test_any_field_gives_spans_inside_the_file_and_never_more_than_it(field: str,
                                                                      size: int) -> None:
    got = byte_ranges(field, size)
    if got is None or isinstance(got, Unsatisfiable):
        return
    assert 0 < len(got) <= MAX_RANGES
    assert all(0 <= start < stop <= size for start, stop in got)
    assert sum(stop - start for start, stop in got) <= size


@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 2000) | st.none())
                | st.integers(0, 2000), min_size=1, max_size=12))
def test_fields_of_ranges(ranges: list[tuple[int, int | None] | int]) -> None:
    """Fields made of well-formed ranges: each satisfiable one in the spans, in order."""
    items = [f"-{r}" if isinstance(r, int) else f"{r[0]}-{'' if r[1] is None else r[1]}"
             for r in ranges]
    got = byte_ranges("bytes=" + ",".join(items), SIZE)
    if any(not isinstance(r, int) and r[1] is not None and r[1] < r[0] for r in ranges):
        assert got is None  # an invalid range-spec: the field is ignored
        return
    want = []
    for r in ranges:
        if isinstance(r, int):
            if r:
                want.append((max(0, SIZE - r), SIZE))
        elif r[0] < SIZE:
            want.append((r[0], SIZE if r[1] is None else min(r[1] + 1, SIZE)))
    if not want:
        assert got is UNSATISFIABLE
    elif sum(b - a for a, b in want) > SIZE:
        assert got is None
    else:
        assert got == tuple(want)


def test_if_range() -> None:
    etag, stamp = '"18ef-3e8"', 1_765_000_000
    assert if_range_holds('"18ef-3e8"', etag, stamp)
    assert if_range_holds(' "18ef-3e8" ', etag, stamp)
    assert if_range_holds(formatdate(stamp, usegmt=True), etag, stamp)
    assert if_range_holds("Saturday, 06-Dec-25 05:46:40 GMT", etag, stamp)  # RFC 850 form
    for other in ('W/"18ef-3e8"', '"other"', '"18ef-3e8', formatdate(stamp + 1, usegmt=True),
                  formatdate(stamp - 1, usegmt=True), "garbage", "", "W/"):
        assert not if_range_holds(other, etag, stamp), other


def test_multipart_is_framed_as_nginx_frames_it() -> None:
    """The body nginx 1.22 sent for ``Range: bytes=0-3,10-12`` of a text file (captured,
    its boundary 00000000000000000013), with netboot's boundary in its place."""
    data = b"0123456789" * 100
    nginx = (b"\r\n--00000000000000000013\r\nContent-Type: text/plain\r\nContent-Range: bytes "
             b"0-3/1000\r\n\r\n0123\r\n--00000000000000000013\r\nContent-Type: text/plain\r\n"
             b"Content-Range: bytes 10-12/1000\r\n\r\n012\r\n--00000000000000000013--\r\n")
    framed = multipart(((0, 4), (10, 13)), 1000, "text/plain", "00000000000000000013")
    body = b"".join(head + data[a:b] for head, a, b in framed.parts) + framed.tail
    assert body == nginx
    assert framed.length == len(nginx) == 207  # nginx's Content-Length
    assert framed.content_type == "multipart/byteranges; boundary=00000000000000000013"


def test_parts_are_read_in_batches_of_at_most_a_chunk() -> None:
    # Many small parts, one read; a part larger than a chunk, several; the heads once each,
    # in order, and the bytes of every part, nothing more (s47-attack).
    framed = multipart([(0, 1), (10, 12), (20, 45), (50, 51)], 100, "text/plain", "b")
    batches = list(framed.batches(10))
    assert [sum(stop - start for _, start, stop in b) for b in batches] == [10, 10, 9]
    pieces = [piece for batch in batches for piece in batch]
    assert [head for head, _, _ in pieces if head] == [head for head, _, _ in framed.parts]
    assert [(start, stop) for _, start, stop in pieces] == [
        (0, 1), (10, 12), (20, 27), (27, 37), (37, 45), (50, 51)]
    assert list(multipart([(0, 1)] * 3, 100, "text/plain", "b").batches(1 << 18)) == [
        [(head, 0, 1) for head, _, _ in multipart([(0, 1)] * 3, 100, "text/plain", "b").parts]]
