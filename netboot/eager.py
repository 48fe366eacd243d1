"""Run a coroutine now, up to its first real wait.

What asyncio's eager task factory does from Python 3.12, for 3.11: a decision that never
waits (answered from the in-memory view) costs no task and no loop iteration. The DHCP first
stage and the HTTP front door use it: a task per DISCOVER was a tenth of a proxy offer's
cost, and a task per request a fifth of a boot script's.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any, TypeVar, cast

_T = TypeVar("_T")


def first_step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run ``coro`` up to its first real wait: ``(True, its result)`` when it never waits,
    else ``(False, what it yielded)``, to be driven on by :func:`carry_on`. An exception it
    raises on the way is the caller's."""
    try:
        return False, coro.send(None)
    except StopIteration as done:
        return True, done.value


def eager(coro: Coroutine[Any, Any, _T]) -> asyncio.Future[_T]:
    """A future already done when ``coro`` never waits, else a task that carries on from
    its first wait. Runs in the caller's context (a task made here copies it)."""
    loop = asyncio.get_running_loop()
    try:
        done, value = first_step(coro)
    except Exception as exc:
        failed: asyncio.Future[_T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    if done:
        settled: asyncio.Future[_T] = loop.create_future()
        settled.set_result(value)
        return settled
    return loop.create_task(_carry_on(coro, value))


def carry_on(coro: Coroutine[Any, Any, _T], waiting: Any) -> asyncio.Task[_T]:
    """A task that drives ``coro`` on from ``waiting``, what :func:`first_step` gave: for a
    caller that ran that step itself, to take a coroutine's result without a future when it
    never waits (the TFTP server's content lookup)."""
    return asyncio.get_running_loop().create_task(_carry_on(coro, waiting))


async def _carry_on(coro: Coroutine[Any, Any, _T], waiting: Any) -> _T:
    """Drive ``coro`` on from the future it yielded, as a task would have."""
    while True:
        try:
            if waiting is None:  # a bare yield: asyncio.sleep(0)
                await asyncio.sleep(0)
            else:
                # Taken over from coro, as Task.__step does: the future was yielded once
                # already, and C futures refuse a second await while this flag is set.
                waiting._asyncio_future_blocking = False
                await waiting
        except BaseException as exc:  # cancelled, or the future failed: coro sees it there
            step = functools.partial(coro.throw, exc)
        else:
            step = functools.partial(coro.send, None)
        try:
            waiting = step()
        except StopIteration as done:
            return cast(_T, done.value)
