"""Install tokens drawn in bulk (netboot/tokens.py): secrets.token_urlsafe's text, each
handed out once, never the parent's in a forked child."""

from __future__ import annotations

import base64
import os
import re
import secrets

import pytest

from netboot.tokens import TOKEN_BYTES, TokenSource


def test_tokens_are_token_urlsafes_text_each_handed_out_once_across_draws(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each token is the URL-safe base64 text of its own 24 random bytes, as
    ``secrets.token_urlsafe(24)`` makes it (32 characters, no padding), taken in order from
    one draw of the system's randomness per ``per_draw`` tokens; none is handed out twice,
    within a draw or across one."""
    drawn: list[bytes] = []

    def urandom(n: int) -> bytes:
        data = secrets.token_bytes(n)
        drawn.append(data)
        return data

    monkeypatch.setattr(os, "urandom", urandom)
    source = TokenSource(per_draw=5)
    tokens = [source() for _ in range(12)]
    assert [len(d) for d in drawn] == [5 * TOKEN_BYTES] * 3  # one draw per 5 tokens
    assert len(set(tokens)) == 12
    raw = b"".join(drawn)
    for i, token in enumerate(tokens):
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", token)
        assert base64.urlsafe_b64decode(token) == raw[i * TOKEN_BYTES:(i + 1) * TOKEN_BYTES]
        assert token == base64.urlsafe_b64encode(
            raw[i * TOKEN_BYTES:(i + 1) * TOKEN_BYTES]).rstrip(b"=").decode("ascii")
    with pytest.raises(ValueError):
        TokenSource(nbytes=25)  # a token of part of a base64 quantum would need padding


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_forked_child_never_hands_out_its_parents_tokens() -> None:
    """The tokens drawn and not yet handed out when the process forks are its parent's: the
    child draws its own."""
    source = TokenSource(per_draw=64)
    source()  # tokens drawn, 63 not handed out
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, source().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != source()
