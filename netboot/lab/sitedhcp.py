"""The site's own DHCP server (dnsmasq in ``<prefix>-dhcp``): addresses only, plus an RA.

This is the "existing" DHCP server netboot's proxy mode must coexist with. Its configuration
follows the lab's ``dhcp-plain.conf`` with each line there for a measured reason:

* ``no-ping``: dnsmasq's default ICMP check delays every OFFER by ~3 s (lab gotcha 2).
* ``enable-ra`` + ``dhcp-range=2001:db8:0:1::,ra-only,64``: without an IPv6 router on the link
  iPXE waits ~16 s for router solicitations to time out (lab gotcha 1).
* ``port=0``: no DNS; ``bind-interfaces`` on the namespace's eth0 only.
* ``next_server`` (case 6): U-Boot ignores proxyDHCP and TFTPs from siaddr (lab gotcha 5), so
  the site server points U-Boot clients (vendor class ``U-Boot``, arch 22) at netboot. Tagged,
  so x86 clients see the same plain offers as without it.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from netboot.lab.topology import LabError, ProcessTable, Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SiteDhcpConfig:
    range_start: str = "192.0.2.100"
    range_end: str = "192.0.2.199"
    netmask: str = "255.255.255.0"
    lease: str = "10m"
    ra: bool = True
    next_server: str | None = None  # e.g. 192.0.2.10 for U-Boot (case 6)
    boot_file: str = "boot.scr.uimg"


def render_config(cfg: SiteDhcpConfig, run_dir: Path) -> str:
    lines = [
        "# site DHCP server of the netboot lab (netboot/lab/sitedhcp.py): addresses only",
        "port=0",
        "interface=eth0",
        "bind-interfaces",
        f"dhcp-range={cfg.range_start},{cfg.range_end},{cfg.netmask},{cfg.lease}",
        f"dhcp-leasefile={run_dir / 'site-dhcp.leases'}",
        # Empty router / DNS options: the site hands out addresses, nothing else.
        "dhcp-option=option:router",
        "dhcp-option=option:dns-server",
        "log-dhcp",
        "no-ping",
    ]
    if cfg.ra:
        lines += ["enable-ra", "dhcp-range=2001:db8:0:1::,ra-only,64"]
    if cfg.next_server:
        lines += [
            "dhcp-vendorclass=set:uboot,U-Boot",
            "dhcp-match=set:uboot,option:client-arch,22",
            f"dhcp-boot=tag:uboot,{cfg.boot_file},,{cfg.next_server}",
        ]
    return "\n".join(lines) + "\n"


class SiteDhcp:
    """Start / stop the site DHCP dnsmasq; its log (``log-dhcp``) is ``site-dhcp.log``."""

    NAME = "site-dhcp"

    def __init__(
        self, topo: Topology, procs: ProcessTable, run_dir: Path, *, detach: bool = False
    ) -> None:
        self.detach = detach
        self.topo = topo
        self.procs = procs
        self.run_dir = run_dir
        self.conf_path = run_dir / "site-dhcp.conf"
        self.log_path = run_dir / "site-dhcp.log"
        self.config: SiteDhcpConfig | None = None

    def running(self) -> bool:
        t = self.procs.procs.get(self.NAME)
        return t is not None and t.alive()

    def start(self, cfg: SiteDhcpConfig) -> None:
        if self.running():
            self.stop()
        self.conf_path.write_text(render_config(cfg, self.run_dir))
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as out:
            argv = [
                "dnsmasq", "-k", f"--conf-file={self.conf_path}",
                "--user=root", "--group=root", "--log-facility=-",
                f"--pid-file={self.run_dir / 'site-dhcp.pid'}",
            ]
            self.procs.start(
                self.NAME, self.topo.ns_exec(self.topo.dhcp, argv), stdout=out,
                stderr=subprocess.STDOUT, detach=self.detach,
            )
        self.config = cfg
        self._wait_ready(start_offset)

    def _wait_ready(self, offset: int, timeout: float = 10.0) -> None:
        """dnsmasq logs its DHCP range once its socket is bound: wait for that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "DHCP, IP range" in text:
                return
            t = self.procs.procs.get(self.NAME)
            if t is None or not t.alive():
                raise LabError(f"site dnsmasq exited at start:\n{text[-2000:]}")
            time.sleep(0.05)
        raise LabError(f"site dnsmasq not ready within {timeout} s: {self.log_path}")

    def stop(self) -> None:
        self.procs.stop(self.NAME)
        self.config = None
