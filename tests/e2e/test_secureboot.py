"""UEFI Secure Boot and arm64 UEFI through the shim-grub chain (issue 14).

* OVMF with Secure Boot enforced (Microsoft keys enrolled) PXE-boots shim → Debian's signed
  GRUB → Debian's signed kernel → the test installer, which reports from inside the guest
  that Secure Boot is on, installs and registers; its second boot goes to the local disk.
* The same firmware is refused the unsigned iPXE (``snponly.efi``): why the chain exists.
* AAVMF (arm64 UEFI, DHCP arch 11) PXE-boots the signed arm64 GRUB directly: no iPXE arm64
  loader exists in Debian, so this used to be silence.

netboot is restarted once with the signed loaders' directories among its asset roots.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_firmware import install_and_local_boot

from netboot.lab import signed
from netboot.lab.qemu import Kind, VmSpec
from netboot.lab.session import NetbootConfig
from netboot.wire.pe import signature

if TYPE_CHECKING:
    from conftest import E2ELab

pytestmark = pytest.mark.e2e

IPXE_DIR = Path("/usr/lib/ipxe")
# MACs and UUIDs 0x61-0x63: the lab and its inventory are shared by the whole e2e session,
# and the journey tests use 0x31-0x34 (a machine found enrolled is not enrolled again, so a
# clash silently dropped the loader chain set here).
SB = VmSpec("uefi-sb-1", Kind.UEFI_SB, "52:54:00:00:00:61",
            "4e455442-4f4f-5400-0000-000000000061", "NB-UEFISB-1", "tap0")
SB_IPXE = VmSpec("uefi-sb-ipxe-1", Kind.UEFI_SB, "52:54:00:00:00:62",
                 "4e455442-4f4f-5400-0000-000000000062", "NB-UEFISB-2", "tap0")
ARM64 = VmSpec("uefi-arm64-1", Kind.UEFI_ARM64, "52:54:00:00:00:63",
               "4e455442-4f4f-5400-0000-000000000063", "NB-AAVMF-1", "tap1")
# EDK2's BdsDxe when LoadImage fails the Secure Boot check (EFI_SECURITY_VIOLATION prints as
# "Security Violation", EFI_ACCESS_DENIED as "Access Denied"), naming the PXE boot option.
REFUSED = r"failed to load Boot\w+ \"UEFI PXEv4[^\"]*\".*(Access Denied|Security Violation)"


@pytest.fixture(scope="module")
def sb(lab: E2ELab) -> E2ELab:
    """netboot, authoritative, with the signed loaders found; the three machines enrolled.

    GRUB 2.06 (Debian 12) takes its TFTP server from the firmware's cached DHCP ACK only
    (efinet reads PXE Mode.DhcpAck, not the proxy offer; captured: behind a proxyDHCP it
    asks the site server's next-server for /grub/x86_64-efi/fs.lst). So, as for U-Boot, the
    DHCP server that hands out the address must name netboot: here netboot is that server.
    """
    lab.session.site_dhcp(None)
    lab.session.start_netboot(NetbootConfig(
        lab.data_dir, [lab.assets, IPXE_DIR, *signed.asset_roots()], mode="authoritative"))
    lab.mode = "authoritative"
    for spec, loader in ((SB, "shim-grub"), (SB_IPXE, "ipxe"), (ARM64, None)):
        body: dict[str, Any] = {"mac": spec.mac, "hostname": spec.name}
        if loader:
            body["loader"] = loader
        # Enrolled here or nowhere: a machine left by another test would keep its own chain.
        assert lab.api.get(f"/api/v1/machines/{spec.mac}").status == 404, (
            f"{spec.mac} is already used by another e2e test")
        lab.api.expect("POST", "/api/v1/machines", body)
    return lab


def test_secure_boot_shim_grub_signed_kernel(sb: E2ELab, e2e: E2ELab) -> None:
    """Native PXE under enforced Secure Boot → shim → GRUB → signed kernel → installer."""
    assert signature(Path("/usr/lib/shim/shimx64.efi.signed").read_bytes()).signed
    install_and_local_boot(e2e, SB)
    consoles = [b.vm.console.text() for b in e2e.session.boots if b.vm.spec == SB]
    first = consoles[-2]
    assert "secureboot=on" in first, "the guest did not see Secure Boot enforced"
    assert "Fetching Netboot Image grubx64.efi" in first  # shim, then GRUB over TFTP
    assert "iPXE" not in first
    installed = [e for e in e2e.events(SB.mac) if e.get("kind") == "installed"]
    assert installed and "secureboot on" in installed[-1]["message"], installed
    why = e2e.api.expect("GET", f"/api/v1/machines/{SB.mac}/explain", ok=(200,))
    assert why["loader"] == "shim-grub" and why["loader_source"] == "set on the machine", why


def test_secure_boot_refuses_unsigned_ipxe(sb: E2ELab, e2e: E2ELab) -> None:
    """The same firmware, given snponly.efi (the ipxe chain), refuses to run it."""
    assert not signature((IPXE_DIR / "snponly.efi").read_bytes()).signed
    with e2e.boot(SB_IPXE) as vm:
        vm.wait_for(r"NBP filename is snponly\.efi", SB_IPXE.kind.default_timeout)
        vm.wait_for(REFUSED, SB_IPXE.kind.default_timeout)
        console = vm.console.text()
    assert "iPXE" not in console and "NETBOOT-INSTALLER" not in console
    assert e2e.machine(SB_IPXE.mac).get("state") != "registered"


def test_arm64_uefi_grub(sb: E2ELab, e2e: E2ELab) -> None:
    """AAVMF (arch 11) → signed arm64 GRUB, the default there → arm64 kernel → installer."""
    install_and_local_boot(e2e, ARM64)
    why = e2e.api.expect("GET", f"/api/v1/machines/{ARM64.mac}/explain", ok=(200,))
    assert why["loader"] == "shim-grub" and why["first_stage"] == "grubaa64.efi", why
