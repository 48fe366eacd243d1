"""A real SQLite store whose next change-feed read, once armed, waits until its caller is
cancelled: the order of events of a sync whose first caller gives up (a DHCP decision past
its deadline) while other callers wait for that same sync (netboot.inventory.view). And a
real store's writer held: its next writes wait, for real, until the test lets them go; or
the file's write lock held, so that a write the writer has begun waits inside SQLite."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from netboot.inventory.base import Changes
from netboot.inventory.sqlite import SqliteStore


class HeldFeedStore(SqliteStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = False
        self.entered = asyncio.Event()  # the held read has begun

    async def changes_since(self, seq: int) -> Changes:
        if self.armed:
            self.armed = False  # only this one: the reads after it go through
            self.entered.set()
            await asyncio.Event().wait()  # until its caller is cancelled
        return await super().changes_since(seq)


def held_writer(store: SqliteStore) -> threading.Event:
    """Keep ``store``'s one writer thread busy until the returned gate is set: the writes
    asked meanwhile (real ones, on the real file) wait behind it, as behind a slow commit.
    The caller sets the gate (in a ``finally``: a test that fails must not hang the store's
    close)."""
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait(30)  # bounded: a test that forgets the gate ends anyway

    executor = store._executor
    assert executor is not None, "the store is not open"
    executor.submit(hold)
    holding.wait(5)  # taken by the thread: what is queued from now on waits behind it
    return gate


def writes_waiting(store: SqliteStore) -> int:
    """How many writes wait behind the held writer (:func:`held_writer`): a test waits for its
    request's write to be there before it cancels, not for a guessed time."""
    executor = store._executor
    assert executor is not None, "the store is not open"
    return executor._work_queue.qsize()


async def waiting(store: SqliteStore, writes: int) -> None:
    """Wait until ``writes`` writes wait behind the held writer (:func:`writes_waiting`),
    bounded by 60 s (a hang), not for a guessed time."""
    deadline = time.monotonic() + 60
    while writes_waiting(store) != writes:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{writes_waiting(store)} writes wait, not {writes}")
        await asyncio.sleep(0.005)


def _running(store: SqliteStore) -> bool:
    """Whether the store's writer thread is running a work item it took: its future is
    marked running, so a cancel of the asyncio side can no longer take it back (a
    ThreadPoolExecutor's item cancelled between its take from the queue and
    ``set_running_or_notify_cancel`` is skipped, never run)."""
    executor = store._executor
    assert executor is not None, "the store is not open"
    frames = sys._current_frames()
    for thread in executor._threads:
        frame = frames.get(thread.ident or 0)
        while frame is not None:
            item = frame.f_locals.get("self") if frame.f_code.co_name == "run" else None
            future = getattr(item, "future", None)
            if isinstance(future, concurrent.futures.Future) and future.running():
                return True
            frame = frame.f_back
    return False


async def begun(store: SqliteStore, *, left: int = 0) -> None:
    """Wait until the store's writer thread has taken every write queued for it but
    ``left`` (:func:`writes_waiting`) and runs the one it took. It waited a fixed 0.05 s
    after the take: on a loaded machine the thread could still be between its take and its
    start, and the test's cancel then skipped the write (its caller never "written")."""
    deadline = time.monotonic() + 60  # bounds a hang only
    while time.monotonic() < deadline:
        if writes_waiting(store) == left and _running(store):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the writer did not take and run its queued write within 60 s "
                         f"({writes_waiting(store)} waiting, {left} wanted)")


@contextlib.contextmanager
def write_lock(store: SqliteStore) -> Iterator[Callable[[], None]]:
    """The file's write lock, held by another connection (as by another process's commit):
    a write the store's thread begins meanwhile waits inside SQLite (busy_timeout) until the
    returned release is called, then commits."""
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")

    def release() -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    try:
        yield release
    finally:
        release()
        conn.close()

