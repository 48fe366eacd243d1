"""Authoritative DHCP over real sockets, a real SQLite inventory and the boot path's view:
the pool never leases a machine's fixed_ipv4 to another client (dnsmasq never offers a
dynamic address a dhcp-host reserves), as machines are created, edited and deleted."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from netboot.boot import BootService, BootSettings, loader_aliases
from netboot.core import Core
from netboot.enroll import Enroller
from netboot.files import FileTree
from netboot.inventory.sqlite import SqliteStore
from netboot.model import MacAddress, Machine, MachineState
from netboot.pxe import DhcpSettings
from netboot.servers.dhcp import DhcpServer
from netboot.wire import dhcp
from netboot.wire.dhcp import MessageType, Op, Opt
from tests.servers.test_dhcp import LOOPBACK, Client
from tests.test_leases import Clock

SERVER_IP = "192.0.2.1"
SETTINGS = DhcpSettings(
    mode="authoritative", pool_start="192.0.2.100", pool_end="192.0.2.102",
    netmask="255.255.255.0", lease_seconds=3600, decline_seconds=600,
)
DEVICE = MacAddress.parse("52:54:00:00:0b:01")  # not enrolled: a dynamic client
MAC_2 = MacAddress.parse("52:54:00:00:0b:02")
MAC_3 = MacAddress.parse("52:54:00:00:0b:03")


@dataclass
class Env:
    store: SqliteStore
    boot: BootService
    server: DhcpServer
    client: Client
    clock: Clock

    async def ask(self, mtype: MessageType, requested: str | None = None,
                  mac: MacAddress = DEVICE, extra: tuple[dhcp.Option, ...] = ()
                  ) -> dhcp.Packet:
        """One datagram to the server's port, its one answer (broadcast, to loopback: the
        broadcast flag is set, never a unicast to the address offered)."""
        options = [dhcp.Option(Opt.MESSAGE_TYPE, bytes((mtype,))), *extra]
        if requested is not None:
            options.append(dhcp.Option(Opt.REQUESTED_IP, bytes(
                int(x) for x in requested.split("."))))
        raw = dhcp.encode(dhcp.Packet(op=Op.REQUEST, xid=0x5e1f, chaddr=mac.raw,
                                      flags=dhcp.BROADCAST_FLAG, options=tuple(options)),
                          pad_to=dhcp.MIN_PACKET_SIZE)
        await self.client.send(raw, self.server.ports[0])
        packet, _ = await self.client.receive()
        return packet


@contextlib.asynccontextmanager
async def started(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "netboot.db")
    await store.open()
    boot = BootService(store, FileTree([tmp_path], pinned=loader_aliases()),
                       BootSettings(policy="hold"), Enroller(store))
    client, clock = Client(), Clock()
    server = DhcpServer(SETTINGS, boot, store, interfaces=None, advertise=SERVER_IP,
                        host=LOOPBACK, port=0, pxe_port=0, broadcast_address=LOOPBACK,
                        client_port=client.port, probe=False, clock=clock)
    try:
        await server.start()
        yield Env(store, boot, server, client, clock)
    finally:
        await server.close()
        client.close()
        await boot.drain()
        await store.close()


async def test_a_machines_fixed_address_is_never_leased_to_another_client(
        tmp_path: Path) -> None:
    async with started(tmp_path) as env:
        await env.store.create_machine(Machine(
            macs=(MacAddress.parse("52:54:00:00:0a:01"),), fixed_ipv4="192.0.2.100",
            state=MachineState.INSTALLED))
        await env.boot.load_view()
        offer = await env.ask(MessageType.DISCOVER)
        assert offer.message_type == MessageType.OFFER
        assert offer.yiaddr == "192.0.2.101"  # .100 is the machine's (before: offered)
        # Asked for by a client that had it (INIT-REBOOT): not given either.
        nak = await env.ask(MessageType.REQUEST, "192.0.2.100")
        assert nak.message_type == MessageType.NAK
        ack = await env.ask(MessageType.REQUEST, "192.0.2.101")
        assert ack.message_type == MessageType.ACK and ack.yiaddr == "192.0.2.101"

        # The machine given another address: .100 is the pool's again (offered once no
        # address never handed out is left).
        one = await env.store.machine_by("mac", "52:54:00:00:0a:01")
        assert one is not None
        await env.store.update_machine(replace(one, fixed_ipv4="192.0.2.50"))
        await env.boot.resync()
        assert (await env.ask(MessageType.DISCOVER, mac=MAC_2)).yiaddr == "192.0.2.102"
        assert (await env.ask(MessageType.DISCOVER, mac=MAC_3)).yiaddr == "192.0.2.100"

        # A second machine given the device's leased address as its fixed one: the
        # device's renewal is NAKed (dnsmasq: not renewed to the other client) and it
        # is offered another address.
        await env.store.create_machine(Machine(
            macs=(MacAddress.parse("52:54:00:00:0a:02"),), fixed_ipv4="192.0.2.101",
            state=MachineState.INSTALLED))
        await env.boot.resync()
        env.clock.now += 61  # the offers above run out
        renewal = await env.ask(MessageType.REQUEST, "192.0.2.101")
        assert renewal.message_type == MessageType.NAK
        moved = await env.ask(MessageType.DISCOVER)
        assert moved.message_type == MessageType.OFFER and moved.yiaddr == "192.0.2.100"
        assert (await env.ask(MessageType.REQUEST, "192.0.2.100")).message_type == \
            MessageType.ACK

        # Deleted, the machine's address is offered again.
        two = await env.store.machine_by("mac", "52:54:00:00:0a:02")
        assert two is not None
        await env.store.delete_machine(two.id)
        await env.boot.resync()
        assert (await env.ask(MessageType.DISCOVER, mac=MAC_2)).yiaddr == "192.0.2.101"


async def test_a_fixed_address_held_by_the_machines_other_nic_is_given_from_the_view(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-NIC machine's fixed_ipv4, leased to its first NIC, is given to its second (as
    dnsmasq within one dhcp-host, config_has_mac), and to no other client. Which machine a
    NIC is, and its fixed address, come from the boot path's view (BootService.same_machine,
    .fixed_address), as every decision's does: the DHCP server reads no machine from the
    store. The inventory holds the second NIC's lease alone, as the pool does."""
    first, second = MacAddress.parse("52:54:00:00:0c:01"), MacAddress.parse("52:54:00:00:0c:02")
    async with started(tmp_path) as env:
        await env.store.create_machine(Machine(
            macs=(first, second), fixed_ipv4="192.0.2.100", state=MachineState.INSTALLED))
        await env.boot.load_view()


        async def no_read(*args: object) -> None:
            raise AssertionError(f"the DHCP server read a machine from the store: {args}")

        monkeypatch.setattr(env.store, "machine_by", no_read)
        for mac in (first, second):
            offer = await env.ask(MessageType.DISCOVER, mac=mac)
            assert offer.yiaddr == "192.0.2.100", mac
            ack = await env.ask(MessageType.REQUEST, "192.0.2.100", mac=mac)
            assert ack.message_type == MessageType.ACK and ack.yiaddr == "192.0.2.100", mac
        # A client of no machine asking for it: refused, offered a pool address.
        assert (await env.ask(MessageType.REQUEST, "192.0.2.100")).message_type == \
            MessageType.NAK
        assert (await env.ask(MessageType.DISCOVER)).yiaddr == "192.0.2.101"
        await env.server.flush_leases()
        leases = {lease.mac: lease.ipv4 for lease in await env.store.list_leases()}
        assert leases[str(second)] == "192.0.2.100" and str(first) not in leases
        # The first NIC renewing it (INIT-REBOOT): NAKed, one holder (LeasePool.moved_from).
        assert (await env.ask(MessageType.REQUEST, "192.0.2.100", mac=first)).message_type \
            == MessageType.NAK

        # Given another address (in this process, no resync asked): the next packet's
        # answer is from the view synced for it, as a decision's is.
        [machine] = await env.store.list_machines()
        await env.store.update_machine(replace(machine, fixed_ipv4="192.0.2.50"))
        assert (await env.ask(MessageType.DISCOVER, mac=first)).yiaddr == "192.0.2.50"


async def test_a_host_sending_a_machines_uuid_is_not_given_its_fixed_address(
        tmp_path: Path) -> None:
    """s46-attack #4, over real UDP with the real boot path and SQLite: a PXE DISCOVER from a
    made-up MAC with a registered machine's SMBIOS UUID (option 97: broadcast in every PXE
    DISCOVER of that machine) was attached to the machine and then offered and ACKed its
    fixed_ipv4, the real NIC's lease ended (s47: one holder, the newest): the attacker held
    the address, and with it the machine's install script (served only to that address).
    dnsmasq gives a dhcp-host address only to the MACs the operator listed. Now the NIC a
    boot attached is named in the machine's facts (``unlisted_nics``), its event says why,
    it is offered and ACKed pool addresses only, and the real NIC keeps its address; once an
    operator lists the NIC (``machines set --add-mac``: a NIC replaced, a second port), it
    is given the address as any listed NIC is, and the move is in the machine's history."""
    machine_uuid = uuid.UUID("11111111-2222-3333-4444-555555555501")
    real, spoof = MacAddress.parse("52:54:00:00:0d:01"), MacAddress.parse("02:46:00:00:0d:99")
    async with started(tmp_path) as env:
        await env.store.create_machine(Machine(
            macs=(real,), uuid=str(machine_uuid), fixed_ipv4="192.0.2.100",
            state=MachineState.REGISTERED))
        await env.boot.load_view()
        assert (await env.ask(MessageType.DISCOVER, mac=real)).yiaddr == "192.0.2.100"
        assert (await env.ask(MessageType.REQUEST, "192.0.2.100", mac=real)).message_type \
            == MessageType.ACK

        # A PXE ROM's (EFI x86-64) options, with the machine's UUID (option 97).
        as_pxe = (dhcp.Option(Opt.VENDOR_CLASS, b"PXEClient:Arch:00007:UNDI:003016"),
                  dhcp.Option(Opt.CLIENT_ARCH, b"\x00\x07"),
                  dhcp.Option(97, b"\x00" + machine_uuid.bytes_le))

        async def pxe(mtype: MessageType, requested: str | None = None) -> dhcp.Packet:
            return await env.ask(mtype, requested, mac=spoof, extra=as_pxe)

        offered = set()
        for _ in range(3):  # attached by its UUID after the first (before: then offered .100)
            offered.add((await pxe(MessageType.DISCOVER)).yiaddr)
            await env.boot.drain()
        assert "192.0.2.100" not in offered and offered <= {"192.0.2.101", "192.0.2.102"}
        took = await pxe(MessageType.REQUEST, "192.0.2.100")
        assert took.message_type == MessageType.NAK  # before: ACK
        [machine] = await env.store.list_machines()
        assert machine.macs == (real, spoof)  # attached all the same (a NIC replaced...)
        assert machine.facts["unlisted_nics"] == str(spoof)
        _, events = await env.store.events_since(0)
        [attached] = [e for e in events if e.kind == "nic-attached"]
        assert "not given its install or its fixed address 192.0.2.100 until an operator " \
            "lists it" in \
            attached.message, attached.message
        renewal = await env.ask(MessageType.REQUEST, "192.0.2.100", mac=real)
        assert (renewal.message_type, renewal.yiaddr) == (MessageType.ACK, "192.0.2.100")
        await env.server.flush_leases()
        holders = [lease.mac for lease in await env.store.list_leases()
                   if lease.ipv4 == "192.0.2.100"]
        assert holders == [str(real)]

        # The operator lists it (the CLI's machines set --add-mac, the API's PATCH macs):
        # the machine's NIC again, given its fixed address (one holder: the newest).
        core = Core(env.store, Enroller(env.store), None, None)  # type: ignore[arg-type]
        listed = await core.update_machine(str(real), {"macs": [str(real), str(spoof)]})
        assert "unlisted_nics" not in listed.facts
        env.clock.now += 61  # the spoof's offers run out
        offer = await pxe(MessageType.DISCOVER)
        assert offer.yiaddr == "192.0.2.100"
        took = await pxe(MessageType.REQUEST, "192.0.2.100")
        assert (took.message_type, took.yiaddr) == (MessageType.ACK, "192.0.2.100")
        await env.boot.drain()
        _, events = await env.store.events_since(0)
        moved = [e for e in events if e.kind == "fixed address moved"]
        assert [e.message for e in moved] == [
            f"fixed address 192.0.2.100 moved from NIC {real} to NIC {spoof}"]
