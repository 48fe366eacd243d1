"""QEMU guests for each firmware path, with their serial console captured and searchable.

Kinds (lab REPORT §1/§3; all TCG, KVM does not work nested here):

=============  ============================================================================
bios           SeaBIOS + QEMU's iPXE NIC ROM (pxe-virtio.rom): the "PXE ROM" *is* iPXE
uefi           OVMF + QEMU's iPXE EFI NIC ROM (efi-virtio.rom)
uefi-pxe       OVMF's own PXE (NIC ``romfile=`` empty → VirtioNetDxe + PxeBcDxe)
uefi-http      OVMF HTTP boot: ``romfile=`` + PXE switched off through fw_cfg, so BDS goes
               straight to "UEFI HTTPv4"
uboot-arm64    U-Boot 2023.01 ``qemu_arm64`` on ``virt``/cortex-a57 with an **e1000** NIC:
               its virtio-net driver puts 52:52:52:52:52:52 on the wire (lab gotcha 6)
=============  ============================================================================

``-nographic`` is required: with ``-display none`` SeaBIOS and iPXE print nothing on the
serial port (SeaBIOS enables its serial console only then). ``-no-reboot`` turns the
installer's ``poweroff -f`` (and any reset) into a QEMU exit.

The console is read by a thread that timestamps each line into ``<name>.serial.log`` and
wakes waiters through a condition variable: :meth:`Vm.wait_for` never sleeps blindly.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from netboot.lab.topology import LabError, ProcessTable, Topology, Tracked, stop_tracked

log = logging.getLogger(__name__)

OVMF_DIRS = (Path("/usr/share/OVMF"), Path("/usr/share/ovmf"))
UBOOT_ARM64 = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
NONPRINT = re.compile(rb"[^\x20-\x7e\t]")


class Kind(enum.StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    UEFI_PXE = "uefi-pxe"
    UEFI_HTTP = "uefi-http"
    UBOOT_ARM64 = "uboot-arm64"

    @property
    def arch(self) -> str:
        """Debian arch of the kernel this guest runs."""
        return "arm64" if self is Kind.UBOOT_ARM64 else "amd64"

    @property
    def default_timeout(self) -> float:
        # A bound against a hung boot, not a speed check: TCG boots take 15-22 s on a quiet
        # host, but a UEFI kernel was seen still booting at 58 s on a loaded 2-core one.
        # Only a failing boot pays the full bound (REPORT §10).
        return 240.0 if self is Kind.UBOOT_ARM64 else 180.0


class BootTimeout(LabError):
    """A pattern did not appear on the console in time (message carries the console tail)."""


class VmExited(LabError):
    """QEMU exited before the pattern appeared (message carries the console tail)."""


@dataclass(frozen=True, slots=True)
class Nic:
    """A further NIC of a guest: its MAC and the tap (link) it is plugged into."""

    mac: str
    tap: str


@dataclass(frozen=True, slots=True)
class VmSpec:
    """One guest. ``name`` names its log files; MAC and UUID are fixed for determinism.

    ``mac``/``tap`` is the NIC the guest boots from. ``leading_nics`` come before it in PCI
    order (iPXE's net0, net1, ...) and in boot order, as on an edge box whose first ports
    see no DHCP: the firmware tries them first and falls through to ``mac``.
    """

    name: str
    kind: Kind
    mac: str
    uuid: str
    serial: str
    tap: str = "tap0"
    memory_mb: int = 0  # 0: per-kind default
    leading_nics: tuple[Nic, ...] = ()

    @property
    def mem(self) -> int:
        if self.memory_mb:
            return self.memory_mb
        return 1024 if self.kind is Kind.UBOOT_ARM64 else 512


def find_ovmf() -> tuple[Path, Path]:
    for d in OVMF_DIRS:
        code, vars_ = d / "OVMF_CODE_4M.fd", d / "OVMF_VARS_4M.fd"
        if code.exists() and vars_.exists():
            return code, vars_
    raise LabError("OVMF_CODE_4M.fd / OVMF_VARS_4M.fd not found: apt-get install ovmf")


def qemu_binary(kind: Kind) -> str:
    return "qemu-system-aarch64" if kind is Kind.UBOOT_ARM64 else "qemu-system-x86_64"


def qemu_argv(spec: VmSpec, run_dir: Path) -> list[str]:
    """The command line for ``spec``; a UEFI guest's NVRAM copy is kept in ``run_dir``."""
    kind = spec.kind
    smbios = (
        f"type=1,uuid={spec.uuid},serial={spec.serial},"
        f"manufacturer=netboot-lab,product=qemu-{kind.value}"
    )
    argv = [
        qemu_binary(kind),
        "-accel", "tcg",
        "-m", str(spec.mem),
        "-nographic", "-no-reboot", "-monitor", "none", "-serial", "stdio", "-nodefaults",
        "-smbios", smbios,
        "-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
    ]
    for i, extra in enumerate(spec.leading_nics, start=1):
        argv += ["-netdev", f"tap,id=n{i},ifname={extra.tap},script=no,downscript=no"]
    if kind is Kind.UBOOT_ARM64:
        if spec.leading_nics:
            raise LabError(f"{spec.name}: several NICs are only wired up for x86 guests")
        if not UBOOT_ARM64.exists():
            raise LabError(f"{UBOOT_ARM64} not found: apt-get install u-boot-qemu")
        argv += [
            "-M", "virt", "-cpu", "cortex-a57", "-bios", str(UBOOT_ARM64),
            "-device", f"e1000,netdev=n0,mac={spec.mac}",
        ]
        return argv
    # Device order is PCI order: the leading NICs first, each tried first at boot.
    nics = [(f"n{i}", n.mac) for i, n in enumerate(spec.leading_nics, start=1)]
    nics.append(("n0", spec.mac))
    for index, (netdev, mac) in enumerate(nics, start=1):
        nic = f"virtio-net-pci,netdev={netdev},mac={mac},bootindex={index}"
        if kind in (Kind.UEFI_PXE, Kind.UEFI_HTTP):
            # No option ROM: OVMF's own VirtioNetDxe + PxeBcDxe/HttpBootDxe do the boot.
            nic += ",romfile="
        argv += ["-device", nic]
    if kind is Kind.BIOS:
        return [*argv, "-M", "pc", "-boot", "n"]
    code, vars_template = find_ovmf()
    # A private NVRAM per device, kept across its boots like a real machine's.
    vars_copy = run_dir / f"{spec.name}.vars.fd"
    if not vars_copy.exists():
        shutil.copyfile(vars_template, vars_copy)
    argv += [
        "-M", "q35",
        "-drive", f"if=pflash,format=raw,readonly=on,file={code}",
        "-drive", f"if=pflash,format=raw,file={vars_copy}",
    ]
    if kind is Kind.UEFI_HTTP:
        argv += [
            "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
            "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
        ]
    return argv


class Console:
    """Timestamped lines of a guest's serial output, written to a log file as they come."""

    def __init__(self, log_path: Path, t0: float) -> None:
        self.log_path = log_path
        self.t0 = t0
        self.lines: list[str] = []
        self.partial = ""
        self.closed = False
        self.cond = threading.Condition()
        self._buf = b""

    def feed(self, chunk: bytes, out: IO[str]) -> None:
        self._buf += chunk
        # Firmware writes \r-only progress lines; split on either.
        parts = re.split(rb"[\r\n]+", self._buf)
        self._buf = parts.pop()
        new: list[str] = []
        for raw in parts:
            text = NONPRINT.sub(b"", ANSI.sub(b"", raw)).decode("ascii").strip()
            if text:
                new.append(text)
        stamp = time.monotonic() - self.t0
        for text in new:
            out.write(f"[{stamp:8.3f}] {text}\n")
        out.flush()
        with self.cond:
            self.lines.extend(new)
            self.partial = NONPRINT.sub(b"", ANSI.sub(b"", self._buf)).decode("ascii")
            self.cond.notify_all()

    def close(self, out: IO[str]) -> None:
        with self.cond:
            if self.partial.strip():
                out.write(f"[{time.monotonic() - self.t0:8.3f}] {self.partial.strip()}\n")
                self.lines.append(self.partial.strip())
                self.partial = ""
            self.closed = True
            self.cond.notify_all()
        out.flush()

    def text(self) -> str:
        with self.cond:
            return "\n".join([*self.lines, self.partial])

    def tail(self, n: int = 40) -> str:
        with self.cond:
            return "\n".join([*self.lines[-n:], self.partial])


class Vm:
    """A running guest. Start with :meth:`start`; always :meth:`stop` (idempotent)."""

    def __init__(
        self,
        spec: VmSpec,
        topo: Topology,
        procs: ProcessTable,
        run_dir: Path,
        run_name: str | None = None,
    ) -> None:
        self.spec = spec
        self.topo = topo
        self.procs = procs
        self.run_dir = run_dir
        # Log files are per boot (``run_name``); the NVRAM copy is per device (``spec.name``).
        self.run_name = run_name or spec.name
        self.serial_log = run_dir / f"{self.run_name}.serial.log"
        self.err_log = run_dir / f"{self.run_name}.qemu.err"
        self.cmd_file = run_dir / f"{self.run_name}.cmd"
        self.t0 = 0.0
        self.console = Console(self.serial_log, 0.0)
        self.proc: Tracked | None = None
        self._reader: threading.Thread | None = None
        self.returncode: int | None = None

    @property
    def proc_name(self) -> str:
        return f"qemu-{self.run_name}"

    def start(self) -> Vm:
        argv = qemu_argv(self.spec, self.run_dir)
        self.cmd_file.write_text(" ".join(argv) + "\n")
        self.t0 = time.monotonic()
        self.console = Console(self.serial_log, self.t0)
        err = self.err_log.open("ab")
        try:
            self.proc = self.procs.start(
                self.proc_name,
                self.topo.ns_exec(self.topo.sw, argv),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        finally:
            err.close()
        log.info("%s: started %s (pid %d)", self.run_name, self.spec.kind, self.proc.pid)
        self._reader = threading.Thread(
            target=self._read, name=f"serial-{self.run_name}", daemon=True
        )
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.popen is not None
        stdout = self.proc.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        with self.serial_log.open("a", encoding="ascii") as out:
            out.write(f"# {self.run_name} ({self.spec.kind}) mac {self.spec.mac}\n")
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                self.console.feed(chunk, out)
            self.console.close(out)

    def wait_for(
        self, pattern: str, timeout: float | None = None, *, partial: bool = False
    ) -> re.Match[str]:
        """Wait until ``pattern`` (a regex) matches a complete console line; raise with the tail.

        ``partial=True`` also matches the unterminated last line (prompts such as U-Boot's
        ``=>``); off by default because serial output arrives in chunks and a greedy pattern
        would match half a line. Wakes on every new chunk and on QEMU's exit; no fixed sleeps.
        """
        rx = re.compile(pattern)
        timeout = self.spec.kind.default_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        seen = 0
        with self.console.cond:
            while True:
                lines = self.console.lines
                for line in lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(lines)
                m = rx.search(self.console.partial) if partial else None
                if m:
                    return m
                if self.console.closed:
                    raise VmExited(
                        f"{self.run_name}: QEMU exited before {pattern!r} appeared; "
                        f"console tail:\n{self.console.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BootTimeout(
                        f"{self.run_name}: no {pattern!r} on the console within {timeout:.0f} s;"
                        f" console tail:\n{self.console.tail()}"
                    )
                self.console.cond.wait(timeout=min(left, 1.0))

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (the installer powers off); raise when it doesn't."""
        assert self.proc is not None and self.proc.popen is not None
        try:
            self.returncode = self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BootTimeout(
                f"{self.run_name}: QEMU still running {timeout:.0f} s later; console tail:\n"
                f"{self.console.tail()}"
            ) from exc
        self._join()
        return self.returncode

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def stop(self) -> None:
        """End QEMU by its PID (SIGTERM, then SIGKILL) and finish the console log."""
        if self.proc is None:
            return
        self.procs.procs.pop(self.proc_name, None)
        rc = stop_tracked(self.proc, grace=5.0)
        if self.returncode is None:
            self.returncode = rc
        self._join()

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5.0)
