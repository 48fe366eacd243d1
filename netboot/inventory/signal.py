"""Waking change-feed readers: a one-shot signal re-armed at every firing, and the wait loop
every store shares (``ChangeFeed.wait_for_changes``); and waking the event loop with a worker
thread's answers (:class:`Answers`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

_R = TypeVar("_R")


class Signal:
    """Wakes everyone waiting when it fires. A waiter takes :meth:`armed` *before* it checks
    for news, so a firing between its check and its wait is never lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    def armed(self) -> asyncio.Event:
        return self._event


async def wait_until(news: Callable[[], Awaitable[bool]], signal: Signal, timeout: float,
                     *, poll: Callable[[], float | None] = lambda: None) -> bool:
    """True as soon as ``news()`` is, checked at start and at each firing of ``signal`` (and
    every ``poll()`` seconds when that is not None: a store that cannot be woken); False once
    ``timeout`` seconds passed without."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        armed = signal.armed()
        if await news():
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        every = poll()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(armed.wait(), remaining if every is None
                                   else min(every, remaining))


class Answers:
    """Calls run on worker threads, their answers handed to one event loop, which a write to
    an eventfd wakes: a write made without the GIL.

    Why: ``loop.run_in_executor`` wakes the loop with each answer by
    ``call_soon_threadsafe``, whose write to the loop's wake-up descriptor (uvloop's
    ``uv_async_send``) is made holding the GIL, so that the loop thread it wakes waited for
    the GIL of a worker still in, or descheduled by, that system call: 24 % of the SQLite
    writer's GIL samples in a storm of first installs (benchmarks/README.md, s20-writer).
    ``os.eventfd_write`` releases the GIL for the system call.

    A call cancelled before its thread takes it is not run (as ``run_in_executor``); one
    cancelled after, runs and its answer is dropped. :meth:`close` only once the workers are
    shut down (an answer after it would write to a closed, or reused, descriptor).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # Appended on the workers' threads, taken on the loop's (a deque is thread-safe).
        self._ready: collections.deque[
            tuple[asyncio.Future[Any], Any, BaseException | None]] = collections.deque()
        loop.add_reader(self._fd, self._deliver)

    def run(self, pool: Executor, fn: Callable[..., _R], *args: Any) -> asyncio.Future[_R]:
        """``fn(*args)`` on ``pool``, its value or exception in the future returned."""
        future: asyncio.Future[_R] = self.loop.create_future()
        job = pool.submit(self._answer, future, fn, args)
        future.add_done_callback(lambda done: job.cancel() if done.cancelled() else None)
        return future

    def _answer(self, future: asyncio.Future[Any], fn: Callable[..., Any],
                args: tuple[Any, ...]) -> None:
        outcome: tuple[asyncio.Future[Any], Any, BaseException | None]
        try:
            outcome = (future, fn(*args), None)
        except BaseException as exc:  # handed to the caller, as run_in_executor does
            outcome = (future, None, exc)
        self._ready.append(outcome)
        os.eventfd_write(self._fd, 1)

    def _deliver(self) -> None:
        with contextlib.suppress(BlockingIOError):  # woken for answers already taken
            os.eventfd_read(self._fd)
        ready = self._ready
        while ready:
            future, value, exc = ready.popleft()
            if future.cancelled():
                continue
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
        os.close(self._fd)
