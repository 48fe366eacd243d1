"""A rolling upgrade: an upgraded server running beside one still on an older version, on one
inventory (s42-ops)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from netboot.config import load
from netboot.model import MachineState
from netboot.service import open_inventory
from tests.multiserver.conftest import Inventory, netboot_cli, server_config

MAC = "52:54:00:42:00:01"


async def netboot_status(config: Path, *args: str) -> tuple[int, str, str]:
    """``netboot status`` as its own process with ``config`` (the server's inventory)."""
    return await netboot_cli(config, "status", *args)


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

        # Shown where an operator looks, not only logged (s43-ops): GET /status's warnings,
        # and `netboot status` (its own process, on the database: no server asked).
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as http:
            async with http.get(f"{server.base}/api/v1/status") as resp:
                warnings = (await resp.json())["warnings"]
            assert [(w["kind"], w["refs"]) for w in warnings] == [
                ("older-registrations", ["older-1"])], warnings
            assert "netboot machines reinstall REF" in warnings[0]["message"]
            rc, out, err = await netboot_status(server.config, "--json")
            assert rc == 0, err
            assert [(w["kind"], w["refs"]) for w in json.loads(out)["warnings"]] == [
                ("older-registrations", ["older-1"])], out
            rc, out, err = await netboot_status(server.config)
            assert rc == 0 and "warning (older-registrations): 1 registered machines" in out, (
                out, err)
            # Reinstalled: no longer older, no longer shown (live, within a look or two).
            async with http.post(f"{server.base}/api/v1/machines/older-1/reinstall") as resp:
                assert resp.status == 200, await resp.text()
            for _ in range(120):  # bounded at 60 s
                async with http.get(f"{server.base}/api/v1/status") as resp:
                    warnings = (await resp.json())["warnings"]
                if not warnings:
                    break
                await asyncio.sleep(0.5)
            assert warnings == [], warnings
            rc, out, err = await netboot_status(server.config, "--json")
            assert rc == 0 and json.loads(out)["warnings"] == [], (out, err)
    finally:
        await loop.run_in_executor(None, server.stop)


async def test_start_ups_warnings_are_shown_while_they_stand_and_gone_once_fixed(
        tmp_path: Path, inventory: Inventory) -> None:
    """Clusters named alike but for case (an older netboot stored them) and a clock behind
    the inventory's newest change were said in the start-up log only, from two places of
    service.py (s42-ops' note): a real server now shows both in GET /status's warnings,
    as `netboot status` does on the database; the clusters' is looked at again while it
    runs (one removed: gone, live), the clock's stays while the clock is behind."""
    import time

    import aiohttp

    from netboot.model import Cluster, Machine

    server = server_config(tmp_path, "a", inventory)
    store, _ = await open_inventory(load(server.config, env={}))
    try:  # what an older netboot, and a server whose clock was ahead, wrote
        for name in ("edge", "Edge"):
            await store.put_cluster(Cluster(name=name), create=True)
        await store.create_machine(Machine(hostname="later-1", updated=time.time() + 86400))
    finally:
        await store.close()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, server.start)
    try:
        admin = (server.data_dir / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as http:
            kinds: list[tuple[str, list[str]]] = []
            for _ in range(120):  # bounded at 60 s: the clock's once the view is loaded
                async with http.get(f"{server.base}/api/v1/status") as resp:
                    kinds = [(w["kind"], w["refs"]) for w in (await resp.json())["warnings"]]
                if len(kinds) == 2:
                    break
                await asyncio.sleep(0.5)
            assert kinds[0] == ("clock-behind", kinds[0][1]) and kinds[0][1][0].startswith(
                "m-"), kinds
            assert kinds[1] == ("clusters-alike", ["Edge", "edge"]), kinds
            rc, out, err = await netboot_status(server.config, "--json")
            assert rc == 0, err
            assert sorted(w["kind"] for w in json.loads(out)["warnings"]) == [
                "clock-behind", "clusters-alike"], out
            store, _ = await open_inventory(load(server.config, env={}))
            try:
                await store.delete_cluster("Edge")
            finally:
                await store.close()
            for _ in range(120):  # bounded at 60 s (a look every OLDER_LOOK_SECONDS)
                async with http.get(f"{server.base}/api/v1/status") as resp:
                    kinds = [(w["kind"], w["refs"]) for w in (await resp.json())["warnings"]]
                if len(kinds) == 1:
                    break
                await asyncio.sleep(0.5)
            assert [k for k, _ in kinds] == ["clock-behind"], kinds
        assert server.log().count("are named alike but for case") == 1, server.log()
        assert server.log().count("behind the inventory's newest change") == 1, server.log()
    finally:
        await loop.run_in_executor(None, server.stop)
