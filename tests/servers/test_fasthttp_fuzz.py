"""parse_head's kept header lines (its ``known``) against random heads: a head read with
them is the head read without, whichever request line and header lines it has, and whatever
heads were read before it (netboot.servers.fasthttp)."""

from __future__ import annotations

import random

from netboot.servers.fasthttp import Fields, RequestHead, parse_head

# Request lines and header-line pieces that parse_head tells apart: the front's GETs and
# others, usual names in each spelling and odd ones, framing, conditions, credentials,
# control characters, bare CR and LF, obs-fold, a field over aiohttp's line bound.
LINES = [b"GET /ipxe?mac=1 HTTP/1.1", b"GET /boot.ipxe HTTP/1.1", b"GET /a/./b HTTP/1.1",
         b"GET //x HTTP/1.1", b"HEAD /x HTTP/1.1", b"GET /x HTTP/1.0", b"POST /x HTTP/1.1",
         b"GET /x?a b HTTP/1.1", b"GARBAGE"]
FIELDS = [b"Host: a", b"host: b", b"HOST: c", b"User-Agent: iPXE\t1", b"user-agent: u",
          b"X-Request-Id: r", b"x-request-id:  r2 ", b"Accept-Encoding: gzip", b"Accept: */*",
          b"Connection: close", b"connection: keep-alive, Close", b"Connection: Upgrade",
          b"Cookie: a=1", b"COOKIE: b", b"Range: bytes=0-1", b"If-None-Match: e",
          b"Content-Length: 0", b"Transfer-Encoding: chunked", b"Expect: 100-continue",
          b"Authorization: Bearer t", b"authorization: Basic dTpw", b"Authorization: Bearer ",
          b"Bad Name: v", b"a:b", b" folded", b"X: a\x00", b"X: a\x7f", b"X: a\x0bb",
          b"X: a\rb", b"X: a\nb", b"Host\x01: a", b"Host : a", b"X-A:\t v\xe9\t",
          b"X: " + b"a" * 9000]


def test_a_head_read_with_kept_lines_is_the_head_read_without() -> None:
    rng = random.Random(22)
    known: dict[bytes, Fields] = {}
    heads = []
    for _ in range(4000):
        fields = [rng.choice(FIELDS) for _ in range(rng.randint(0, 4))]
        raw = b"\r\n".join([rng.choice(LINES), *fields]) + b"\r\n\r\n"
        heads.append(raw + (b"GET /next" if rng.random() < 0.2 else b""))
    for raw in heads + heads[::-1]:  # each read anew, then from what was kept
        alone = parse_head(raw)
        assert parse_head(raw, known) == alone, raw
        if isinstance(alone, RequestHead):
            assert alone.size == raw.find(b"\r\n\r\n") + 4
    assert 0 < len(known) <= 1024
