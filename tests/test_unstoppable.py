"""A caller cancelled while work it cannot stop runs: waited out, told as it ended, and its
cancel delivered once, at its next wait, while it is still asked for."""

from __future__ import annotations

import asyncio

import pytest

from netboot.unstoppable import told


async def write(ended: asyncio.Future[str], *, within: float | None = None,
                late: list[str] | None = None) -> str:
    """A caller of work whose outcome is ``ended`` (the work itself goes on whatever the
    caller does, as a store's thread or a COMMIT does)."""
    try:
        return await asyncio.shield(ended)
    except asyncio.CancelledError as exc:
        cancel = exc
    return await told(cancel, ended, within=within,
                      late=None if late is None else lambda: late.append("late"))


def ends(result: str, after: float) -> asyncio.Future[str]:
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(after, ended.set_result, result)
    return ended


async def test_a_cancelled_caller_is_told_the_work_done_and_cancelled_at_its_next_wait(
        ) -> None:
    said: list[str] = []

    async def caller() -> None:
        said.append(await write(ends("done", 0.1)))
        await asyncio.sleep(0)
        said.append("went on after its cancel")

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.02)
    assert not task.done()  # waiting for the work, not told "cancelled"
    with pytest.raises(asyncio.CancelledError):
        await task
    assert said == ["done"]


async def test_the_cancel_is_delivered_once_however_many_came_while_it_waited() -> None:
    said: list[str] = []

    async def caller() -> None:
        said.append(await write(ends("done", 0.1)))
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            said.append("cancelled")
        await asyncio.sleep(0)  # no second cancel
        said.append("went on")

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.sleep(0.02)
    task.cancel()  # someone insisting (asyncio.run's end after a runner's)
    await asyncio.wait_for(task, 5)
    assert said == ["done", "cancelled", "went on"]


async def test_a_task_that_ends_before_its_next_wait_ends_with_its_result() -> None:
    """Its work was done, and no wait was left for the cancel: the task says what it did
    (an API handler whose change was committed: its audit entry says its status, not
    "aborted")."""
    task = asyncio.ensure_future(write(ends("done", 0.1)))
    await asyncio.sleep(0.02)
    task.cancel()
    assert await asyncio.wait_for(task, 5) == "done"


async def test_work_that_failed_or_did_not_end_in_time_is_the_cancel() -> None:
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.1, failed.set_exception, OSError("refused"))
    task = asyncio.ensure_future(write(failed))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)

    late: list[str] = []
    task = asyncio.ensure_future(write(ends("too late", 5), within=0.1, late=late))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert late == ["late"]


async def test_a_timeout_whose_body_ends_with_the_work_leaves_no_cancel_behind() -> None:
    """The deadline passes during the work and the body ends right after it: the scope
    takes its cancel back (the body was done), and none reaches the task after the scope
    (Python 3.11 and 3.12 left a cancel re-armed at once there: a stray CancelledError at
    the next wait, that nobody had asked for)."""
    async with asyncio.timeout(0.05):
        got = await write(ends("done", 0.2))
    assert got == "done"
    await asyncio.sleep(0)  # no cancel left over for this task
    await asyncio.sleep(0.01)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_timeout_whose_body_waits_after_the_work_is_a_timeout() -> None:
    said: list[str] = []
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            said.append(await write(ends("done", 0.2)))
            await asyncio.sleep(5)
    assert said == ["done"]
    await asyncio.sleep(0)
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


async def test_a_cancel_from_outside_a_timeout_that_took_its_own_back_is_delivered() -> None:
    """Two cancels asked while the work ran, the scope's and another's (asyncio.run's
    end): the scope takes its own back, the other is still delivered after it."""
    said: list[str] = []

    async def caller() -> None:
        async with asyncio.timeout(0.05):
            said.append(await write(ends("done", 0.2)))
        await asyncio.sleep(5)
        said.append("went on after its cancel")

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.1)  # past the deadline: the scope's cancel came
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert said == ["done"]
