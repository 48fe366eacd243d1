"""Work a cancel cannot stop, told as it ended.

A caller cancelled while work it handed off cannot be stopped any more (a write the SQLite
writer thread has begun, the group commit that carries its batch, a PostgreSQL COMMIT sent)
must not be told "cancelled", nothing done as far as it knows, of what is then done all the
same: a client told "not written" of what is durable, an audit entry "aborted" beside it
(session 26: asyncio.run's end cancelled a group commit the writer thread then committed).
So the work's end is waited for, whatever cancels the caller meanwhile, and told as it was:
done, its result is returned and the cancel comes at the caller's next wait; failed, or not
ended within the caller's bound, the cancel is raised (nothing was done, or nobody can say,
and the caller asked to stop). One rule for every store and the recorder.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


async def told(cancel: asyncio.CancelledError, ended: asyncio.Future[_T], *,
               within: float | None = None, late: Callable[[], object] | None = None) -> _T:
    """What the work whose outcome is ``ended`` did, told to a caller cancelled (``cancel``,
    caught outside its ``except`` block: tests/test_compiled.py) while it ran: its result
    returned with the cancel delivered at the caller's next wait, or the cancel raised
    (:func:`waited`)."""
    result = await waited(cancel, ended, within=within, late=late)
    deliver(cancel)
    return result


async def waited(cancel: asyncio.CancelledError, ended: asyncio.Future[_T], *,
                 within: float | None = None, late: Callable[[], object] | None = None,
                 ) -> _T:
    """``ended``'s result once it is done, waited for whatever cancels the caller meanwhile
    (at most ``within`` seconds; past it ``late`` is called and ``cancel`` raised); failed
    or cancelled itself, ``cancel`` raised. For a caller that has more to finish before
    the cancel is delivered (:func:`deliver`)."""
    deadline = None if within is None else time.monotonic() + within
    while not ended.done():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            if late is not None:
                late()
            raise cancel
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait((ended,), timeout=left)
    if ended.cancelled() or ended.exception() is not None:
        raise cancel  # nothing was done, and the caller asked to stop
    return ended.result()


def deliver(cancel: asyncio.CancelledError) -> None:
    """``cancel``, caught by a caller whose work was done all the same, delivered at its next
    wait if it is still asked for then: not if the scope that asked took it back meanwhile.

    An asyncio.timeout whose deadline passed during the work and whose body then ends with
    no other wait takes its cancel back (``uncancel``) without a TimeoutError: the body was
    done. Re-armed at once (``Task.cancel``), the cancel stayed armed on Python 3.11 and
    3.12 after that scope (their ``uncancel`` does not rescind it; 3.13's does): a stray
    CancelledError at the task's next wait, outside any scope, that nobody asked for. So it
    is delivered when the task next waits, as the same cancel counted once, only while the
    cancels asked of the task (``cancelling``) are still as many, or fewer but some: one
    that a scope took back is not, one asked since is delivered by itself. A task that ends
    before its next wait ends with its result: its work was done."""
    me = asyncio.current_task()
    assert me is not None
    asyncio.get_running_loop().call_soon(_redeliver, me, me.cancelling(), cancel.args)


def _redeliver(task: asyncio.Task[object], asked: int, args: tuple[object, ...]) -> None:
    if not task.done() and 0 < task.cancelling() <= asked:
        task.uncancel()  # the same cancel, counted once (asyncio.timeout counts them)
        task.cancel(*args)
