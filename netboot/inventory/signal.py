"""Waking change-feed readers: a one-shot signal re-armed at every firing, and the wait loop
every store shares (``ChangeFeed.wait_for_changes``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


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
