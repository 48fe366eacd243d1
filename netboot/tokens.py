"""Install tokens: the text ``secrets.token_urlsafe(24)`` gives, drawn from the system's
CSPRNG in bulk.

Why: each first install minted its token by ``secrets.token_urlsafe(24)``, one getrandom(2)
call per token, made on the event loop; the call gives up the GIL, which the store's writer
thread then holds while the loop waits for it back (in py-spy's samples of first installs,
session 30, ~2.8 % of the loop's wall time was under ``token_urlsafe``). Here one call draws
the bytes of many tokens and one base64 encoding makes their text: a token is then a slice.

The same tokens as before: ``token_urlsafe(n)`` is the URL-safe base64 text of ``n`` bytes of
``os.urandom``, without padding; for ``n`` a multiple of 3 each 3 bytes are 4 characters and
there is no padding, so the text of ``k`` tokens' bytes drawn at once is their ``k`` texts
one after another. A token is handed out once: the source moves past it. A process forked
while tokens are drawn and not handed out would hand out the same ones as its parent: the
child drops them (``os.register_at_fork``) and draws its own.
"""

from __future__ import annotations

import base64
import os
import weakref

# Bytes of randomness in an install token (secrets.token_urlsafe(24): 192 bits, 32 characters).
TOKEN_BYTES = 24
# Tokens drawn per getrandom(2) call: 3 KiB, one call per 128 installs.
TOKENS_PER_DRAW = 128


class TokenSource:
    """``source()``: a new install token, as ``secrets.token_urlsafe(nbytes)`` makes one.

    For one thread (the event loop's, where BootService mints): its position is read and
    moved without a lock, so two threads calling at once could be handed the same token."""

    def __init__(self, nbytes: int = TOKEN_BYTES, per_draw: int = TOKENS_PER_DRAW) -> None:
        if nbytes <= 0 or nbytes % 3 or per_draw <= 0:
            raise ValueError("a token of whole base64 quanta (a multiple of 3 bytes), and "
                             "at least one per draw")
        self._nbytes, self._per_draw = nbytes, per_draw
        self._width = nbytes // 3 * 4  # characters per token
        self._text = ""  # drawn, not handed out from self._at on
        self._at = 0
        # Held weakly: the registration outlives the source (os.register_at_fork keeps what
        # it is given for the life of the process).
        ref = weakref.ref(self)

        def forget() -> None:
            source = ref()
            if source is not None:
                source._drop()

        os.register_at_fork(after_in_child=forget)

    def __call__(self) -> str:
        at, width = self._at, self._width
        text = self._text
        if at + width > len(text):
            text = self._text = base64.urlsafe_b64encode(
                os.urandom(self._nbytes * self._per_draw)).decode("ascii")
            at = 0
        self._at = at + width
        return text[at:at + width]

    def _drop(self) -> None:
        """A forked child's copy: what its parent drew is its parent's to hand out."""
        self._text, self._at = "", 0
