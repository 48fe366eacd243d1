"""A real SQLite store whose next change-feed read, once armed, waits until its caller is
cancelled: the order of events of a sync whose first caller gives up (a DHCP decision past
its deadline) while other callers wait for that same sync (netboot.inventory.view). And a
real store's writer held: its next writes wait, for real, until the test lets them go; or
the file's write lock held, so that a write the writer has begun waits inside SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
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


async def begun(store: SqliteStore) -> None:
    """Wait until the store's writer thread has taken every write queued for it
    (:func:`writes_waiting`)."""
    for _ in range(500):
        if not writes_waiting(store):
            await asyncio.sleep(0.05)  # taken from its queue: now running on the thread
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the writer did not take its queued write within 5 s")


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

