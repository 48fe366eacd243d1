"""When the request being answered had arrived: lets a store answer "nothing was committed
since" for many requests from one probe, and stay exact.

A change committed before a device sent its request must be seen by that request (README,
"How the boot path is built"). The SQLite change feed proves "nothing committed" with a
``PRAGMA data_version`` probe; made per request, it was ~6 % of a repeated ``/ipxe``. A probe
made *after* a request had arrived sees every commit that ended before the request was sent
(the sender learnt of the commit first, then sent; the server read the bytes after that, and
probed after reading them), so requests that arrived before one probe may all use it: the
HTTP front door starts the requests of one loop iteration's reads, their tasks run in the
next iteration, and the first probe there serves them all.

The renderer's look at its template directories' inotify watch is shared alike (an event is
queued by the system call that made the change): one ``poll(2)`` per loop iteration's reads,
not one per install script (render._Freshness).

The server that reads a request says when it arrived (:func:`arrived`, a time of
``time.monotonic()`` taken after the bytes were read) for the work it starts for it; the
store compares that with the time of its last probe (:func:`arrival`). Work that says nothing
(the API, timers, other servers) probes anew, as before. A ContextVar, not a global: each
asyncio task carries its own copy, taken when the task is created.
"""

from __future__ import annotations

import contextvars

_arrival: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "netboot_arrival", default=None)


def arrival() -> float | None:
    """When the request this work answers had arrived (``time.monotonic()``), if said."""
    return _arrival.get()


def arrived(at: float) -> _Arrived:
    """Everything started inside (tasks created, coroutines run eagerly) answers a request
    that had arrived by ``at``."""
    return _Arrived(at)


def set_arrival(at: float) -> None:
    """:func:`arrived` for the rest of the current context, with no way back: for a context
    made for the work of one request (``contextvars.copy_context().run``), which ends with it."""
    _arrival.set(at)


class _Arrived:
    """arrived's manager: a class rather than a @contextmanager, entered per request."""

    __slots__ = ("_at", "_token")

    def __init__(self, at: float) -> None:
        self._at = at
        self._token: contextvars.Token[float | None] | None = None

    def __enter__(self) -> None:
        self._token = _arrival.set(self._at)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _arrival.reset(self._token)
