"""Packet capture on the lab bridge, decoded when a boot fails.

``tcpdump --immediate-mode``: with ``-U`` alone libpcap's TPACKET_V3 block timeout lost the
last packets of each run (lab gotcha 8). The filter drops bulk payload (TFTP DATA blocks and
HTTP bodies from :8080) and the bare 46-byte TFTP ACK per block (23 000 of them for the
arm64 kernel), which made a full capture 10-37 MB per boot; DHCP, TFTP requests, OACKs and
errors, HTTP requests, ARP and ICMPv6 stay whole.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from netboot.lab.topology import ProcessTable, Topology

log = logging.getLogger(__name__)

FILTER = (
    "not ((tcp src port 8080 and greater 600)"
    " or (udp and (greater 1000 or less 46) and not (port 67 or port 68 or port 4011)))"
)


def available() -> bool:
    return shutil.which("tcpdump") is not None


class Capture:
    def __init__(self, topo: Topology, procs: ProcessTable, pcap: Path) -> None:
        self.topo = topo
        self.procs = procs
        self.pcap = pcap
        self.name = f"tcpdump-{pcap.stem}"
        self.log_path = pcap.with_suffix(".tcpdump.log")

    def start(self, timeout: float = 5.0) -> None:
        with self.log_path.open("ab") as out:
            argv = [
                "tcpdump", "-i", "br0", "-n", "-s", "0", "-U", "--immediate-mode",
                "-w", str(self.pcap), FILTER,
            ]
            self.procs.start(
                self.name, self.topo.ns_exec(self.topo.sw, argv), stdout=out,
                stderr=subprocess.STDOUT,
            )
        # tcpdump says "listening on br0" once the socket is attached: wait for that line.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"listening on" in self.log_path.read_bytes():
                return
            t = self.procs.procs.get(self.name)
            if t is None or not t.alive():
                break
            time.sleep(0.05)
        log.warning("tcpdump not confirmed listening: %s", self.log_path.read_text()[-500:])

    def stop(self) -> None:
        # tcpdump flushes and closes the file on SIGTERM.
        self.procs.stop(self.name)


def decode(pcap: Path, limit: int = 400) -> str:
    """A readable summary of DHCP / TFTP / HTTP in ``pcap`` (tshark, else tcpdump)."""
    if not pcap.exists():
        return f"(no capture at {pcap})"
    if shutil.which("tshark"):
        summary = (
            "dhcp or (tftp and tftp.opcode != 3 and tftp.opcode != 4)"
            " or http.request or http.response or icmpv6.type == 134"
        )
        argv = ["tshark", "-n", "-r", str(pcap), "-Y", summary]
        verbose = ["tshark", "-n", "-r", str(pcap), "-Y", "dhcp", "-O", "dhcp", "-T", "text"]
    else:
        argv = ["tcpdump", "-n", "-r", str(pcap)]
        verbose = ["tcpdump", "-n", "-vv", "-r", str(pcap), "port 67 or port 68 or port 4011"]
    out = []
    for cmd in (argv, verbose):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(f"{cmd[0]} failed: {exc}")
            continue
        lines = res.stdout.splitlines()
        if len(lines) > limit:
            lines = [*lines[:limit], f"... ({len(lines) - limit} more lines)"]
        out.append("\n".join(lines))
    return "\n\n".join(out)
