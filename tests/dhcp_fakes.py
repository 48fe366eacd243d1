"""Small real implementations of the DHCP collaborators, for tests.

``TableDecider`` picks a first stage by firmware and architecture the way netboot/boot.py is
expected to:

==============  ==========================================================================
BIOS            ``undionly.kpxe`` (TFTP; iPXE over the ROM's UNDI driver)
UEFI x86-64     ``snponly.efi`` (TFTP)
UEFI ia32       ``ipxe-i386.efi`` (TFTP)
UEFI arm64      ``snponly-arm64.efi`` (TFTP). Assumed name: Debian ships no arm64 iPXE, so
                the asset has to come from elsewhere; boot.py owns the real name.
iPXE            ``/boot.ipxe`` (HTTP script)
UEFI HTTP       ``/assets/ipxe.efi`` (HTTP)
U-Boot          ``boot.scr.uimg`` (TFTP, a script doing ``pxe get; pxe boot``)
Raspberry Pi    ``""``: the Pi bootloader fetches its own files (bootcode.bin, start4.elf)
                from siaddr; only option 43 and the server address matter
unknown         ``None`` (stay silent)
==============  ==========================================================================
"""

from __future__ import annotations

import asyncio

from netboot.model import Arch, BootRequest, Firmware, FirstStage, Lease


class TableDecider:
    def __init__(self, *, deny: frozenset[str] = frozenset(), delay: float = 0.0,
                 fixed: dict[str, str] | None = None,
                 machines: tuple[tuple[str, ...], ...] = ()) -> None:
        self.deny = deny
        self.delay = delay
        self.fixed = dict(fixed or {})  # MAC -> its machine's fixed_ipv4
        self.machines = machines  # the MACs of one machine each (others: one MAC each)
        self.requests: list[BootRequest] = []
        self.moves: list[tuple[str, str, str]] = []  # fixed_moved's (old, new, ipv4)

    async def fixed_address(self, mac: str) -> str | None:
        return self.fixed.get(mac)

    async def same_machine(self, mac: str, other: str) -> bool:
        return any(mac in macs and other in macs for macs in self.machines)

    async def fixed_moved(self, old: str, new: str, ipv4: str) -> None:
        self.moves.append((old, new, ipv4))

    async def first_stage(self, request: BootRequest) -> FirstStage | None:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)  # simulates a slow decision, not readiness
        if str(request.mac) in self.deny:
            return None
        fw = request.firmware
        if fw == Firmware.IPXE:
            return FirstStage("/boot.ipxe", http=True, reason="ipxe script")
        if fw == Firmware.UEFI_HTTP:
            return FirstStage("/assets/ipxe.efi", http=True, reason="uefi http")
        if fw == Firmware.BIOS:
            return FirstStage("undionly.kpxe", reason="bios")
        if fw == Firmware.UEFI:
            name = {
                Arch.X86_64: "snponly.efi",
                Arch.X86: "ipxe-i386.efi",
                Arch.ARM64: "snponly-arm64.efi",
            }.get(request.arch)
            return FirstStage(name, reason="uefi") if name else None
        if fw == Firmware.UBOOT:
            return FirstStage("boot.scr.uimg", reason="u-boot")
        if fw == Firmware.RPI:
            return FirstStage("", reason="raspberry pi")
        return None


class MemoryLeaseStore:
    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.writes = 0

    async def list_leases(self) -> list[Lease]:
        return list(self.leases.values())

    async def put_lease(self, lease: Lease, *, now: float | None = None,
                        ending: str | None = None) -> None:
        self.writes += 1
        if ending is not None and (old := self.leases.get(ending)) is not None \
                and old.ipv4 == lease.ipv4:
            del self.leases[ending]
        self.leases[lease.mac] = lease

    async def delete_lease(self, mac: str) -> None:
        self.writes += 1
        self.leases.pop(mac, None)
