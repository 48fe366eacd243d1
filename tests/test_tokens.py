"""Install tokens and random bytes drawn in bulk (netboot/tokens.py): secrets.token_urlsafe's
text, each handed out once, never the parent's in a forked child; sealing's nonces so drawn."""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Callable

import pytest

from netboot.sealing import NONCE_BYTES, PREFIX, Sealer
from netboot.tokens import TOKEN_BYTES, RandomBytes, TokenSource


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


def test_random_bytes_are_the_draws_bytes_in_order_each_handed_out_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``take(n)`` hands out the next ``n`` bytes of one draw of ``per_draw`` bytes, and
    draws again (never reusing the rest) where too few are left; a take larger than a draw
    is drawn whole."""
    drawn: list[bytes] = []

    def urandom(n: int) -> bytes:
        data = secrets.token_bytes(n)
        drawn.append(data)
        return data

    monkeypatch.setattr(os, "urandom", urandom)
    source = RandomBytes(per_draw=30)
    taken = [source.take(12) for _ in range(5)]
    assert [len(d) for d in drawn] == [30, 30, 30]  # 12 + 12, then 6 left: a new draw
    assert taken == [drawn[0][:12], drawn[0][12:24], drawn[1][:12], drawn[1][12:24],
                     drawn[2][:12]]
    assert source.take(40) == drawn[3] and len(drawn[3]) == 40


def test_a_seal_takes_a_nonce_of_its_own_from_the_bulk_draw(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each sealed value carries a nonce no other has (NIST SP 800-38D §8.2), taken from the
    sealer's bulk draw, and opens to its text."""
    sealer = Sealer.generate()
    drawn: list[bytes] = []

    def urandom(n: int) -> bytes:
        data = secrets.token_bytes(n)
        drawn.append(data)
        return data

    monkeypatch.setattr(os, "urandom", urandom)
    sealed = [sealer.seal(f"token-{i}", context="install") for i in range(300)]
    assert 1 <= len(drawn) <= 3  # not one draw per seal
    nonces = [base64.urlsafe_b64decode(v.rsplit(":", 1)[1] + "==")[:NONCE_BYTES]
              for v in sealed]
    assert len(set(nonces)) == 300
    assert b"".join(nonces) == b"".join(drawn)[:300 * NONCE_BYTES]
    assert all(v.startswith(PREFIX) for v in sealed)
    assert [sealer.unseal(v, context="install") for v in sealed] == [
        f"token-{i}" for i in range(300)]


def _in_a_forked_child(draw: Callable[[], bytes]) -> bytes:
    """What ``draw()`` gives in a child forked now."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, draw())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    return got


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork()")
def test_a_forked_child_never_hands_out_its_parents_tokens_or_bytes() -> None:
    """The tokens and bytes drawn and not yet handed out when the process forks are its
    parent's: the child draws its own."""
    source = TokenSource(per_draw=64)
    source()  # tokens drawn, 63 not handed out
    child = _in_a_forked_child(lambda: source().encode()).decode()
    assert len(child) == 32
    assert child != source()
    nonces = RandomBytes()
    nonces.take(NONCE_BYTES)
    child_nonce = _in_a_forked_child(lambda: nonces.take(NONCE_BYTES))
    assert len(child_nonce) == NONCE_BYTES
    assert child_nonce != nonces.take(NONCE_BYTES)
