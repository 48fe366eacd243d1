"""The front door's codec (netboot.servers.fasthttp): which request heads it answers."""

from __future__ import annotations

import pytest

from netboot.servers.fasthttp import (
    Fields,
    NotMine,
    Reply,
    RequestHead,
    encode_reply,
    parse_head,
    parse_post,
    reply_parts,
)

IPXE = b"GET /ipxe?mac=52-54-00-12-34-56&product=Q35%20+%20ICH9 HTTP/1.1\r\nHost: a\r\n"


def test_a_plain_get_is_the_fronts() -> None:
    whole = IPXE + b"User-Agent: iPXE/1.21.1\r\nX-Request-Id: abc\r\n\r\n"
    head = parse_head(whole + b"GET /")
    assert head == RequestHead(path="/ipxe", query="mac=52-54-00-12-34-56&product=Q35%20+%20ICH9",
                               size=len(whole), close=False, user_agent="iPXE/1.21.1",
                               request_id="abc", accept_encoding=False)


@pytest.mark.parametrize("raw", [b"G", b"GET /ipxe", b"GET /ipxe HTTP/1.1\r\nHost: a", IPXE])
def test_an_incomplete_head_waits(raw: bytes) -> None:
    assert parse_head(raw) is None


@pytest.mark.parametrize("raw", [
    b"HEAD /boot.ipxe HTTP/1.1\r\n\r\n",  # another method
    b"GET /boot.ipxe HTTP/1.0\r\n\r\n",  # keep-alive rules of its own
    b"GET /assets/%2e%2e/x HTTP/1.1\r\n\r\n",  # to decode: as aiohttp (yarl) decodes it
    b"GET /assets/../x HTTP/1.1\r\n\r\n", b"GET //x HTTP/1.1\r\n\r\n",
    b"GET /assets/./x HTTP/1.1\r\n\r\n", b"GET http://a/x HTTP/1.1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nAuthorization: Basic dTpw\r\n\r\n",  # the plain-HTTP policy's
    b"GET /x HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n",  # no token: not a bearer's
    b"GET /x HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
    b"GET /a b HTTP/1.1\r\n\r\n", b"GET /x?a b HTTP/1.1\r\n\r\n",
    b"GET /x?a=%zz#f HTTP/1.1\r\n\r\n", b"GET /x/. HTTP/1.1\r\n\r\n",
    b"GET /x\x01 HTTP/1.1\r\n\r\n", b"GET /x HTTP/1.1 \r\n\r\n", b"GET / HTTP/1.11\r\n\r\n",
    b"GET /x HTTP/1.1\r\nCookie: s=1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n",
    b"GET /x HTTP/1.1\r\nif-none-match: \"e\"\r\n\r\n",
    b"GARBAGE\r\n\r\n",
])
def test_a_request_without_a_body_that_is_not_the_fronts_goes_whole_to_aiohttp(
        raw: bytes) -> None:
    assert parse_head(raw + b"GET /next") == NotMine(len(raw))


@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host: RFC 9112 §3.2's 400, aiohttp's
    b"GET /healthz HTTP/1.1\r\nUser-Agent: iPXE\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",  # Host twice: the same
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nUser-Agent: a\r\nuser-agent: b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nContent-Type: a\r\nHost: a\r\nContent-Type: a\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X: a\r\n" * 128 + b"\r\n",  # > max_headers
])
def test_a_head_aiohttp_refuses_is_aiohttps(raw: bytes) -> None:
    # The front answered these 200 where aiohttp answers 400 (s33-attack): a request the two
    # doors would answer apart is aiohttp's, whatever its version says of it.
    assert parse_head(raw + b"GET /next") == NotMine(len(raw))
    assert parse_head(raw, {}) == NotMine(len(raw))
    # A body's framing after such a field still leaves the rest of the stream to aiohttp.
    assert parse_head(raw[:-2] + b"Content-Length: 1\r\n\r\nx") == NotMine(None)


def test_the_most_fields_aiohttp_takes_are_the_fronts() -> None:
    raw = b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"X: a\r\n" * 127 + b"\r\n"
    assert isinstance(parse_head(raw), RequestHead)


@pytest.mark.parametrize("raw", [
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",  # no Host
    b"POST /api/v1/register HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}",
])
def test_an_installers_post_aiohttp_refuses_is_aiohttps(raw: bytes) -> None:
    assert parse_post(raw, 1024) == NotMine(None)


@pytest.mark.parametrize("raw", [
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # framing: aiohttp's from here on
    b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"GET /x HTTP/1.1\r\nContent-Length : 5\r\n\r\n",  # not a field: aiohttp says 400
    b"GET /x HTTP/1.1\r\n folded\r\n\r\n", b"GET /x HTTP/1.1\r\nUser-Agent: a\x1bb\r\n\r\n",
    b"GET /x HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",  # over aiohttp's field bound
    b"\x16\x03\x01\x00\xa5",  # a TLS hello on the plain port: refused now, not on timeout
    b"GET /" + b"a" * 20000,  # a head longer than any request's
])
def test_what_the_front_cannot_frame_leaves_the_connection_to_aiohttp(raw: bytes) -> None:
    assert parse_head(raw) == NotMine(None)


def test_header_lines_read_before_give_the_same_heads() -> None:
    heads = [IPXE + b"\r\n", b"GET /x HTTP/1.1\r\nConnection: close\r\nUser-Agent: u\r\n\r\n",
             b"GET /y?a=1 HTTP/1.1\r\nConnection: close\r\nUser-Agent: u\r\n\r\n",
             b"GET /x HTTP/1.1\r\nAuthorization: Bearer t\r\nX-Request-Id: r\r\n\r\n",
             b"GET /x HTTP/1.1\r\nCookie: s=1\r\n\r\n", b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
             b"GET /x HTTP/1.1\r\nHost: a\x01\r\n\r\n", b"GET /x HTTP/1.1\r\n\r\n",
             b"GET /x HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\nGET /next"]
    known: dict[bytes, Fields] = {}
    for _ in range(2):  # read, then from what was kept
        for raw in heads:
            assert parse_head(raw, known) == parse_head(raw), raw
    assert len(known) == 5  # the lines of the heads that are the front's or a condition's
    for n in range(1500):
        parse_head(b"GET /x HTTP/1.1\r\nHost: %d\r\n\r\n" % n, known)
    assert len(known) <= 1024


@pytest.mark.parametrize(("value", "close"), [
    (b"keep-alive", False), (b"close", True), (b" Close\t", True), (b"keep-alive, close", True),
    (b"close,keep-alive", True), (b"closed", False), (b"TE", False), (b"", False),
])
def test_connection_close_is_read_in_any_spelling(value: bytes, close: bool) -> None:
    head = parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection:" + value + b"\r\n\r\n")
    assert isinstance(head, RequestHead) and head.close is close


@pytest.mark.parametrize("value", [b"Upgrade", b" upgrade ", b"keep-alive, Upgrade"])
def test_an_upgrade_in_any_spelling_leaves_the_connection_to_aiohttp(value: bytes) -> None:
    assert parse_head(b"GET /x HTTP/1.1\r\nConnection:" + value + b"\r\n\r\n") == NotMine(None)


@pytest.mark.parametrize("field", [b"Host: a\x00b", b"host: a\rb", b"User-Agent: a\x7f",
                                   b"Hos t: a", b"Host\x01: a"])
def test_a_control_character_or_a_bad_name_in_a_usual_field_is_refused(field: bytes) -> None:
    assert parse_head(b"GET /x HTTP/1.1\r\n" + field + b"\r\n\r\n") == NotMine(None)


@pytest.mark.parametrize(("field", "token"), [
    (b"Authorization: Bearer abc.def", "abc.def"),
    (b"authorization:bearer   abc  ", "abc"),  # scheme case (RFC 9110 §11.1), spaces
    (b"Authorization: BEARER nbt_x", "nbt_x"),  # an API token: the caller's to refuse
])
def test_a_bearer_token_is_read_for_the_caller(field: bytes, token: str) -> None:
    head = parse_head(b"GET /config/x HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n")
    assert isinstance(head, RequestHead) and head.bearer == token
    assert parse_head(b"GET /config/x HTTP/1.1\r\nHost: a\r\n\r\n") == RequestHead(
        "/config/x", "", 35, False, "", "", False, "")


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /x? HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a/b.c/~d;e=f?q=%20&r=/?s HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX-A:\t v\xe9\t\r\n\r\n",  # HTAB and obs-text in a value
])
def test_the_fronts_requests(raw: bytes) -> None:
    assert isinstance(parse_head(raw), RequestHead), raw


# The request line and the header lines are read without regular expressions (s35-door):
# the edges where a hand-written reading could drift from the expressions it replaced.
@pytest.mark.parametrize("raw", [
    b"GET  /x HTTP/1.1", b"GET /x  HTTP/1.1", b"GET\t/x HTTP/1.1", b"GET /x\tHTTP/1.1",
    b"GET /x HTTP/1.10", b"GET /x HTTP/1.1\t", b"GET /x HTTP/1.2", b"GET /x http/1.1",
    b"GET HTTP/1.1", b"GET /HTTP/1.1", b"GET / HTTP/1.1 HTTP/1.1", b"GET /x\x00 HTTP/1.1",
    b"GET /x\r HTTP/1.1", b"GET /x\n HTTP/1.1", b"GET /x?a\x00 HTTP/1.1",
    b"GET /x?a\r HTTP/1.1", b"GET /\xe9 HTTP/1.1", b"GET /x?\xe9 HTTP/1.1", b"GET /% HTTP/1.1",
    b"GET /x?a#b HTTP/1.1", b"GET /x?a\x7f HTTP/1.1", b" GET /x HTTP/1.1", b"GET /x?/. HTTP/1.1x",
    b"GET /a?b//c HTTP/1.1x", b"get /x HTTP/1.1", b"GET /" + b"a" * 8100 + b" HTTP/1.0",
])
def test_a_request_line_not_the_fronts_goes_whole_to_aiohttp(raw: bytes) -> None:
    whole = raw + b"\r\nHost: a\r\n\r\n"
    assert parse_head(whole + b"GET /next") == NotMine(len(whole))
    assert parse_head(whole, {}) == NotMine(len(whole))


@pytest.mark.parametrize(("target", "path", "query"), [
    (b"/", "/", ""), (b"/?", "/", ""), (b"/x?a//b/./c??", "/x", "a//b/./c??"),
    (b"/x?%41%zz", "/x", "%41%zz"), (b"/" + b"a" * 8100, "/" + "a" * 8100, ""),
])
def test_a_request_line_that_is_the_fronts(target: bytes, path: str, query: str) -> None:
    head = parse_head(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(head, RequestHead) and (head.path, head.query) == (path, query)


@pytest.mark.parametrize("lines", [
    b"Host: a\nX: b", b"Host: a\r\r\nX: b", b"Host: a\r", b"Host: a\n", b"\rHost: a",
    b"Host: a\r\n\tfolded", b"Host: a\r\n folded", b"Host: a\x0bb", b"Host: a\x0cb",
    b"Host: a\x1fb", b"X: \x00\r\nHost: a", b"X-\x7f: a\r\nHost: a", b"Host: a\r\n\x00",
    b"Host: a\r\nX: b\r\x00\nY: c",
])
def test_a_control_character_anywhere_in_the_header_lines_is_refused(lines: bytes) -> None:
    assert parse_head(b"GET /x HTTP/1.1\r\n" + lines + b"\r\n\r\n") == NotMine(None)
    assert parse_head(b"GET /x HTTP/1.1\r\n" + lines + b"\r\n\r\n", {}) == NotMine(None)


def test_connection_close_and_header_case() -> None:
    head = parse_head(b"GET /healthz HTTP/1.1\r\nHost: a\r\nCONNECTION: keep-alive, Close\r\n"
                      b"accept-encoding: gzip\r\n\r\n")
    assert isinstance(head, RequestHead) and head.close and head.accept_encoding


def test_encoded_reply_has_aiohttps_headers_and_close() -> None:
    data = encode_reply(Reply(404, b'{"error": "x"}', "application/json; charset=utf-8",
                              (("Cache-Control", "no-store"),)),
                        date=b"Tue, 01 Dec 2026 21:00:00 GMT", server="netboot",
                        request_id="0011", close=True)
    assert data == (b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json; charset=utf-8"
                    b"\r\nContent-Length: 14\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n"
                    b"Server: netboot\r\nX-Request-Id: 0011\r\nCache-Control: no-store\r\n"
                    b"Connection: close\r\n\r\n{\"error\": \"x\"}")


@pytest.mark.parametrize("close", [False, True])
def test_a_replys_parts_are_its_encoding(close: bool) -> None:
    reply = Reply(200, b"x" * 300, "text/plain", (("ETag", '"1-2"'), ("Accept-Ranges", "bytes")))
    before, between, after = reply_parts(reply, server="netboot", close=close)
    date = b"Tue, 01 Dec 2026 21:00:00 GMT"
    assert before + date + between + b"00ff" + after == encode_reply(
        reply, date=date, server="netboot", request_id="00ff", close=close)


@pytest.mark.parametrize("query", [
    "", "mac=52-54-00-12-34-56&arch=x86_64&platform=efi", "a=1&b=", "a", "a=1&&b=2", "a=1&",
    "product=Q35%20+%20ICH9", "token=s3cret", "TOKEN=x&a=1", "q=a+b", "x=%0a", "k=v;w=1",
    "manufacturer=Dell%20Inc.&product=PowerEdge%20R650", "=v", "a==b", "a=b=c", "k%3Dx=1",
    "a=%26b", "t%6Fken=x", "a=%74oken", "x=%C3%A9", "x=%c3", "p=Q35%20+%20ICH9%2C%202009",
    "x=%7f", "a=%2B", "a=%2", "a=%zz", "a=%", "a=(b)!*'$@?/~,.:", "%41=%42&%3d=%25",
    # An installer's one token pair (the shortcut) and what it must leave to the pairs.
    "token=", "token=a=b", "token=x&", "token=a&b=1", "token=%41", "token=a+b", "tokens=x",
    "Token=x",
    # About escape()'s 1,024 characters, which the plain query's shortcut must keep.
    *("a=" + "b" * n for n in (994, 995, 996, 1014, 1015, 1016, 1017, 1030)),
])
def test_the_fronts_log_target_is_what_aiohttps_path_logs(query: str) -> None:
    from urllib.parse import parse_qsl

    from netboot.servers.http import _front_target, redacted_target

    # (Paths about escape()'s 1,024 characters with a redacted token after them, and the
    # one route whose path carries a token.)
    for path in ("/ipxe", "/config/52-54-00-12-34-56", "/nocloud/52-54-00-12-34-56/t/x",
                 *("/config/" + "m" * n for n in (997, 998, 999, 1010))):
        if path.startswith("/nocloud/") and not query:
            continue  # never the front's to answer; its target with no query is not redacted
        raw = f"GET {path}{'?' + query if query else ''} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        head = parse_head(raw)
        assert isinstance(head, RequestHead), raw
        assert _front_target(head) == redacted_target(
            path, parse_qsl(query, keep_blank_values=True))


def test_the_fronts_log_target_of_any_query_is_what_aiohttps_path_logs() -> None:
    # Queries made of the pieces the shortcuts of _front_target tell apart (escapes ASCII or
    # not, whole or cut, of "&", "=", "%", "+" and controls; empty parts and keys; a token).
    import random
    from urllib.parse import parse_qsl

    from netboot.servers.http import _front_target, redacted_target

    pieces = ["a", "Z", "=", "&", "+", "%20", "%26", "%3D", "%25", "%2B", "%0a", "%7F",
              "%C3%A9", "%c3", "%7e", "%2", "%", "token", "TOK", "%6Fken", "(", ";", "?", "~"]
    rng = random.Random(10)
    for _ in range(3000):
        query = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        head = parse_head(f"GET /ipxe?{query} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert isinstance(head, RequestHead), query
        assert _front_target(head) == redacted_target(
            "/ipxe", parse_qsl(query, keep_blank_values=True)), query


def test_an_installers_post_is_read_with_its_body() -> None:
    body = b'{"kind": "installing"}'
    head = (b"POST /api/v1/machines/52-54-00-12-34-56/events HTTP/1.1\r\nHost: a\r\n"
            b"Authorization: Bearer tok\r\nContent-Length: %d\r\nConnection: close\r\n"
            b"X-Request-Id: r1\r\n\r\n" % len(body))
    assert parse_head(head + body) == NotMine(None)  # the GET front's answer: not mine
    post = parse_post(head + body + b"GET /next", 1024)
    assert post == RequestHead("/api/v1/machines/52-54-00-12-34-56/events", "",
                               len(head) + len(body), True, "", "r1", False, "tok", "POST",
                               body)
    assert parse_post(head + body[:-1], 1024) is None  # the body is still to come
    assert parse_post(head + body, len(body) - 1) == NotMine(None)  # too large: aiohttp's 413
    register = b"POST /api/v1/register HTTP/1.1\r\nHost: a\r\ncontent-length: 2\r\n\r\n{}"
    found = parse_post(register, 1024)
    assert isinstance(found, RequestHead) and found.body == b"{}" and not found.bearer


@pytest.mark.parametrize("raw", [
    b"POST /api/v1/register HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\nCookie: s=1\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\nAuthorization: Basic x\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.1\r\n\r\n",  # no body framing: aiohttp's
    b"POST /api/v1/register?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/machines/a%2fb/events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/machines HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/machines/../events HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/register HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
    b"PUT /api/v1/register HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
])
def test_any_other_post_is_aiohttps(raw: bytes) -> None:
    assert parse_post(raw, 1024) == NotMine(None), raw
