"""netboot.eager: a coroutine run at once up to its first real wait, then carried on by a
task exactly as a task would have run it (results, errors, cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from netboot.eager import carry_on, eager


async def test_a_coroutine_that_never_waits_is_a_done_future() -> None:
    async def now() -> int:
        return 7

    done = eager(now())
    assert done.done() and done.result() == 7


async def test_one_that_waits_finishes_in_a_task_with_its_result_and_errors() -> None:
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()

    async def later() -> int:
        first = await gate  # a real wait: the caller gets a pending future
        await asyncio.sleep(0)  # a bare yield
        return first + await loop.run_in_executor(None, lambda: 1)

    pending = eager(later())
    assert not pending.done()
    gate.set_result(41)
    assert await pending == 42

    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await eager(fails())


async def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    cleaned: list[str] = []
    blocker: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        try:
            await blocker
        finally:
            cleaned.append("finally")

    task = eager(waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"] and blocker.cancelled()


async def test_a_timeout_around_it_still_times_out() -> None:
    async def slow() -> None:
        await asyncio.sleep(3600)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await eager(slow())


async def test_carry_on_drives_a_coroutine_whose_first_step_the_caller_ran() -> None:
    """What a caller that runs the first step itself (the TFTP server's lookup, to take a
    result without a future) hands on: the task goes on from the future that step yielded
    to the coroutine's result, and its errors."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[int] = loop.create_future()

    async def later() -> int:
        first = await gate
        await asyncio.sleep(0)
        return first + 1

    coro = later()
    waiting = coro.send(None)  # the first step, here: it yields the gate
    task = carry_on(coro, waiting)
    assert not task.done()
    gate.set_result(41)
    assert await task == 42

    failing: asyncio.Future[int] = loop.create_future()

    async def fails() -> int:
        return await failing

    coro = fails()
    task = carry_on(coro, coro.send(None))
    failing.set_exception(ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        await task
