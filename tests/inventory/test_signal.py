"""Answers: worker threads' answers handed to the event loop through an eventfd."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from netboot.inventory.signal import Answers


async def test_answers_come_back_to_the_loop_values_and_exceptions() -> None:
    answers = Answers(asyncio.get_running_loop())
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        threads: list[str] = []

        def work(x: int) -> int:
            threads.append(threading.current_thread().name)
            return x * 2

        def fail() -> None:
            raise KeyError("nope")

        assert await answers.run(pool, work, 21) == 42
        assert threads and threads[0] != threading.current_thread().name
        with pytest.raises(KeyError, match="nope"):
            await answers.run(pool, fail)
        # Many at once, from one thread, each to its own caller.
        assert await asyncio.gather(*(answers.run(pool, work, i) for i in range(200))) == [
            2 * i for i in range(200)]
    finally:
        pool.shutdown(wait=True)
        answers.close()


async def test_a_call_cancelled_before_its_thread_takes_it_is_not_run() -> None:
    answers = Answers(asyncio.get_running_loop())
    pool = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    ran: list[str] = []
    try:
        busy = answers.run(pool, gate.wait, 5)
        queued = answers.run(pool, ran.append, "queued")
        queued.cancel()
        await asyncio.sleep(0)  # a future's callbacks run at the loop's next turn
        gate.set()
        assert await busy is True
        assert await answers.run(pool, ran.append, "after") is None
        assert ran == ["after"]
        # Cancelled while running: it runs, its answer is dropped, the next one comes.
        gate.clear()
        running = answers.run(pool, gate.wait, 5)
        await asyncio.sleep(0.05)
        running.cancel()
        gate.set()
        assert await answers.run(pool, lambda: "next") == "next"
        assert running.cancelled()
    finally:
        pool.shutdown(wait=True)
        answers.close()
