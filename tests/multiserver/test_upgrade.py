"""A rolling upgrade: an upgraded server running beside one still on an older version, on one
inventory (s42-ops)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from netboot.config import load
from netboot.model import MachineState
from netboot.service import open_inventory
from tests.multiserver.conftest import Inventory, server_config

MAC = "52:54:00:42:00:01"


async def test_a_running_server_warns_of_a_machine_an_older_server_registers(
        tmp_path: Path, inventory: Inventory) -> None:
    """The upgraded server (a real process) runs; the older one (a store of the same
    inventory, writing what an older register command's registration writes: registered,
    no install secret) registers a machine. The upgraded server said nothing until its next
    start (s41-ops); now its log names the machine while it runs."""
    import aiohttp

    server = server_config(tmp_path, "a", inventory)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, server.start)
    try:
        admin = (server.data_dir / "admin.token").read_text().strip()
        async with aiohttp.ClientSession() as http, http.post(
                f"{server.base}/api/v1/machines", json={"mac": MAC, "hostname": "older-1"},
                headers={"Authorization": f"Bearer {admin}"}) as resp:
            assert resp.status == 201, await resp.text()
        assert "older netboot" not in server.log()
        store, _ = await open_inventory(load(server.config, env={}))
        try:  # the older server's registration
            machine = await store.get_machine_by_hostname("older-1")
            assert machine is not None
            await store.update_machine(dataclasses.replace(
                machine, state=MachineState.REGISTERED, ipv4="192.0.2.61", secret_hash=None))
        finally:
            await store.close()
        for _ in range(120):  # bounded at 60 s (a look every OLDER_LOOK_SECONDS at most)
            said = [line for line in server.log().splitlines() if "older netboot" in line]
            if said:
                break
            await asyncio.sleep(0.5)
        assert said and "older-1" in said[0] and "just now" in said[0], server.log()
        assert "netboot machines reinstall REF" in said[0]
        await asyncio.sleep(1.5)  # named once, not at each look
        assert len([line for line in server.log().splitlines()
                    if "older netboot" in line]) == 1, server.log()
    finally:
        await loop.run_in_executor(None, server.stop)
