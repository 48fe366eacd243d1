"""Runs netboot's authoritative DHCP server with the real boot path (BootService, its view)
and a real SQLite inventory, inside a network namespace, for
tests/servers/test_dhcp_uuid_netns.py.

Usage: ``ip netns exec NS python -m tests.servers.dhcp_boot_runner INTERFACE DB``: DB is the
SQLite file, made by the test beforehand with the machines it wants. Prints ``READY`` on
stdout once listening, serves until stdin closes, then shuts down cleanly. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.inventory.sqlite import SqliteStore
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer


async def main(interface: str, db: Path) -> None:
    settings = DhcpSettings(
        mode="authoritative", pool_start="192.0.2.100", pool_end="192.0.2.109",
        netmask="255.255.255.0", router="192.0.2.1", dns_servers=("192.0.2.1",),
        lease_seconds=600)
    store = SqliteStore(db)
    await store.open()
    boot = BootService(store, FileTree([db.parent], pinned=loader_aliases()),
                       BootSettings(policy="hold"), Enroller(store))
    await boot.load_view()
    server = DhcpServer(settings, boot, store, interfaces=[interface], advertise=None)
    await server.start()
    print("READY", flush=True)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, sys.stdin.read)  # returns at EOF
    finally:
        await server.close()
        await boot.drain()
        await store.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
