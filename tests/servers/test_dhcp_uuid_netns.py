"""A host on the provisioning VLAN sending a registered machine's SMBIOS UUID, as busybox's
udhcpc across a veth pair between two network namespaces, against the authoritative DHCP
server with the real boot path and a real SQLite inventory (tests/servers/dhcp_boot_runner).

Only namespaces the fixture creates are touched (tests/servers/test_dhcp_netns.py's ``link``),
addresses are from 192.0.2.0/24, processes are ended by their own handles.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine, MachineState
from tests.servers.test_dhcp_netns import ROOT, UDHCPC, Link, bare_link, ip, link

pytestmark = [
    pytest.mark.netns,
    pytest.mark.root,
    pytest.mark.requires("ip", "iproute2"),
]

__all__ = ["bare_link", "link"]  # the fixtures, used by name

MACHINE_UUID = uuid.UUID("11111111-2222-3333-4444-555555555501")
REAL = MacAddress.parse("52:54:00:00:0d:01")
SPOOF = "02:46:00:00:0d:99"


async def _inventory(db: Path) -> None:
    store = SqliteStore(db)
    await store.open()
    try:
        await store.create_machine(Machine(
            macs=(REAL,), uuid=str(MACHINE_UUID), fixed_ipv4="192.0.2.50",
            state=MachineState.REGISTERED))
    finally:
        await store.close()


async def _machine(db: Path) -> Machine:
    store = SqliteStore(db)
    await store.open()
    try:
        [machine] = await store.list_machines()
        return machine
    finally:
        await store.close()


def _udhcpc_as_pxe(link: Link) -> str:
    """One run of udhcpc from the made-up MAC, its DISCOVER dressed as an EFI PXE ROM's
    with the machine's UUID (option 97, as every PXE DISCOVER of the machine broadcasts it);
    what it printed."""
    assert UDHCPC is not None
    cmd = [UDHCPC] if UDHCPC.endswith("udhcpc") else [UDHCPC, "udhcpc"]
    result = subprocess.run(
        ["ip", "netns", "exec", link.client_ns, *cmd, "-i", link.client_if, "-n", "-q",
         "-f", "-t", "5", "-T", "2", "-s", "/bin/true",
         "-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007",
         "-x", "0x61:00" + MACHINE_UUID.bytes_le.hex()],
        capture_output=True, timeout=60)
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.requires("busybox", "busybox-static")
def test_udhcpc_sending_a_machines_uuid_is_not_given_its_fixed_address(
        link: Link, tmp_path: Path) -> None:
    """s46-attack #4 with a real client: busybox udhcpc from a made-up MAC, sending the
    UUID of a registered machine whose fixed_ipv4 is 192.0.2.50. Its first run attaches the
    MAC to the machine (by that UUID) and leases a pool address; its second was offered and
    bound to 192.0.2.50 on main (the machine's address, its install script served to whoever
    holds it). Now it is bound to a pool address again, and the machine names the MAC as
    one no operator listed."""
    ip("-n", link.client_ns, "link", "set", link.client_if, "address", SPOOF)
    db = tmp_path / "netboot.db"
    asyncio.run(_inventory(db))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", link.server_ns, sys.executable, "-m",
         "tests.servers.dhcp_boot_runner", link.server_if, str(db)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else b""
        if not line.startswith(b"READY"):
            proc.kill()  # this process only, by its own handle
            assert proc.stderr is not None
            raise AssertionError(f"the server did not start: {line!r} "
                                 f"{proc.stderr.read().decode(errors='replace')}")
        first = _udhcpc_as_pxe(link)
        second = _udhcpc_as_pxe(link)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # the runner shuts down at EOF
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()  # this process only, by its own handle
            proc.wait(timeout=10)
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")
    assert "lease of 192.0.2.10" in first, first + log
    assert "lease of 192.0.2.10" in second and "192.0.2.50" not in second, second + log
    machine = asyncio.run(_machine(db))
    assert [str(m) for m in machine.macs] == [str(REAL), SPOOF], log
    assert machine.facts.get("unlisted_nics") == SPOOF, (machine.facts, log)
    assert f"NIC {SPOOF} of machine {REAL} is not given its fixed address 192.0.2.50" in log, \
        log
    assert "Traceback" not in log, log
