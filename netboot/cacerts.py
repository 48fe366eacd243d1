"""The system CA bundle, not read while aiohttp is imported by ``serve``.

``from aiohttp import web`` runs ``aiohttp/__init__.py``, which imports aiohttp's client; its
``connector`` module makes two client TLS contexts at import time (aiohttp 3.10+, so that
no request blocks on disk reads later), and each loads the system CA bundle through
``SSLContext.set_default_verify_paths``: ~0.05 s of CPU each here, a seventh of ``serve``'s
start-up (benchmarks/README.md, issue 10). ``serve`` never makes an outgoing HTTPS request
(its aiohttp client is the CLI's: ``netboot events --follow``, in a process of its own that
reads them as always), so nothing there needs those CAs: ``serve`` leaves them unread (they
were ~2 MiB resident for good, a sixth of what a fleet's boot storm adds); a request
through them would fail its verification, never go unverified. Contexts made outside the
block keep the CAs.

:func:`deferred_system_cas` holds back those loads while a block runs in one thread (``serve``
imports aiohttp in a thread once its listeners answer, netboot.service) and hands back what
it held; :meth:`DeferredCas.load` does them, for a caller that needs them after all.
Contexts made outside the block or by another thread meanwhile (the event loop's), and a
library imported before, are untouched.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator


class DeferredCas:
    """The TLS contexts whose system CA load was held back, until :meth:`load`."""

    def __init__(self) -> None:
        self._pending: list[ssl.SSLContext] = []

    def __len__(self) -> int:
        return len(self._pending)

    def hold(self, context: ssl.SSLContext) -> None:
        self._pending.append(context)

    def load(self) -> None:
        """Load the system CAs into every held context (once; blocking disk reads: run it
        in a thread)."""
        pending, self._pending = self._pending, []
        for context in pending:
            _SET_DEFAULT_VERIFY_PATHS(context)


_SET_DEFAULT_VERIFY_PATHS = ssl.SSLContext.set_default_verify_paths


@contextlib.contextmanager
def deferred_system_cas() -> Iterator[DeferredCas]:
    """While the block runs, ``set_default_verify_paths`` (which ``load_default_certs`` and
    ``ssl.create_default_context`` call) records the context instead of reading the bundle
    when this thread calls it; other threads' calls read it as always. One block at a time
    (the class attribute is shared)."""
    deferred = DeferredCas()
    owner = threading.get_ident()

    def hold(context: ssl.SSLContext) -> None:  # a function: bound to the context called
        if threading.get_ident() == owner:
            deferred.hold(context)
        else:
            _SET_DEFAULT_VERIFY_PATHS(context)

    ssl.SSLContext.set_default_verify_paths = hold  # type: ignore[method-assign,assignment]
    try:
        yield deferred
    finally:
        ssl.SSLContext.set_default_verify_paths = _SET_DEFAULT_VERIFY_PATHS  # type: ignore[method-assign]
