"""The system CA bundle, loaded after ``serve`` answers rather than while it imports aiohttp.

``from aiohttp import web`` runs ``aiohttp/__init__.py``, which imports aiohttp's client; its
``connector`` module makes two client TLS contexts at import time (aiohttp 3.10+, so that
no request blocks on disk reads later), and each loads the system CA bundle through
``SSLContext.set_default_verify_paths``: ~0.05 s of CPU each here, a seventh of ``serve``'s
start-up (benchmarks/README.md, issue 10). ``serve`` never makes an outgoing HTTPS request
(its aiohttp client is the CLI's: ``netboot events --follow``), so nothing needs those CAs
before it answers; yet they are loaded all the same, once it does, so that the process ends
up exactly as without this module.

:func:`deferred_system_cas` holds back those loads while a block runs (the import of the
wiring, in ``netboot serve`` only, before any other thread exists) and hands back what it
held; :meth:`DeferredCas.load` does them. Contexts made outside the block, and a library
imported before it, are untouched.
"""

from __future__ import annotations

import contextlib
import ssl
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
    ``ssl.create_default_context`` call) records the context instead of reading the bundle.
    Only for a block that runs before other threads start: the class attribute is shared."""
    deferred = DeferredCas()

    def hold(context: ssl.SSLContext) -> None:  # a function: bound to the context called
        deferred.hold(context)

    ssl.SSLContext.set_default_verify_paths = hold  # type: ignore[method-assign,assignment]
    try:
        yield deferred
    finally:
        ssl.SSLContext.set_default_verify_paths = _SET_DEFAULT_VERIFY_PATHS  # type: ignore[method-assign]
