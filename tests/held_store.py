"""A real SQLite store whose next change-feed read, once armed, waits until its caller is
cancelled: the order of events of a sync whose first caller gives up (a DHCP decision past
its deadline) while other callers wait for that same sync (netboot.inventory.view)."""

from __future__ import annotations

import asyncio
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
