"""The lab's network: three namespaces joined by one bridge, and the processes started in them.

::

  netns <p>-dhcp                  netns <p>-sw ("switch")                 netns <p>-srv
  eth0 192.0.2.1/24  ---veth---  sw-dhcp ┐                  ┌ sw-srv ---veth--- eth0 192.0.2.10/24
  2001:db8:0:1::1/64                     ├── br0 (no addr) ─┤                   netboot
  site DHCP (dnsmasq) + IPv6 RA          │   tap0..tapN     │
                                         └ QEMU + tcpdump run here
                                           tapdead: up, on no bridge (a port where
                                           nothing answers DHCP)

The host namespace gets nothing but the namespace names: the veths are created inside the
switch namespace and one end is moved, the taps are created there too, and QEMU runs under
``ip netns exec <p>-sw``. Every run picks a fresh prefix, so two runs (or a leftover from a
crashed run) never collide. Teardown is idempotent.

Processes are tracked by PID together with their kernel start time (``/proc/<pid>/stat``
field 22), so a PID recycled after the process died is never signalled by mistake.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SUBNET_PREFIX = 24
DHCP_IP = "192.0.2.1"
SRV_IP = "192.0.2.10"
RA_ADDR = "2001:db8:0:1::1/64"
DEAD_TAP = "tapdead"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """The lab could not be built, a command in it failed, or a wait ran out."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    """Run a short command; on failure raise LabError carrying its stderr."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)}: rc {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def new_prefix() -> str:
    """``nb`` + 6 hex digits: short enough for any name derived from it."""
    return "nb" + secrets.token_hex(3)


def _start_time(pid: int) -> int | None:
    """Kernel start time of ``pid`` in clock ticks, or None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] == "Z":  # a zombie has already exited
        return None
    return int(rest[19])


@dataclass(slots=True)
class Tracked:
    """A process the lab started. ``popen`` is set only in the process that started it."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _start_time(self.pid) == self.start_time

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "argv": self.argv,
        }


@dataclass
class ProcessTable:
    """Processes started in lab namespaces, ended by PID only (never by name)."""

    procs: dict[str, Tracked] = field(default_factory=dict)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        detach: bool = False,
    ) -> Tracked:
        if name in self.procs and self.procs[name].alive():
            raise LabError(f"process {name} is already running (pid {self.procs[name].pid})")
        popen = subprocess.Popen(
            list(argv), stdout=stdout, stderr=stderr, stdin=stdin, start_new_session=detach
        )
        st = _start_time(popen.pid)
        t = Tracked(name, popen.pid, st if st is not None else -1, list(argv), popen)
        self.procs[name] = t
        log.debug("started %s pid %d: %s", name, popen.pid, " ".join(argv))
        return t

    def stop(self, name: str, *, grace: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the exit code when known."""
        t = self.procs.pop(name, None)
        if t is None:
            return None
        return stop_tracked(t, grace=grace)

    def stop_all(self) -> None:
        # Reverse start order: VMs and captures before the servers they talk to.
        for name in reversed(list(self.procs)):
            try:
                self.stop(name)
            except OSError as exc:  # keep tearing down the rest
                log.warning("stopping %s: %s", name, exc)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.procs.values()]

    @classmethod
    def from_json(cls, items: list[dict[str, Any]]) -> ProcessTable:
        table = cls()
        for it in items:
            table.procs[it["name"]] = Tracked(
                it["name"], int(it["pid"]), int(it["start_time"]), list(it["argv"])
            )
        return table


def stop_tracked(t: Tracked, *, grace: float = 5.0) -> int | None:
    if not t.alive():
        return t.popen.wait() if t.popen is not None else None
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Re-check identity right before signalling: the PID must still be our process.
        if t.popen is None and _start_time(t.pid) != t.start_time:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if t.popen is not None:
                try:
                    return t.popen.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    continue
            if not t.alive():
                return None
            time.sleep(0.05)
        log.warning("%s (pid %d) ignored %s", t.name, t.pid, sig.name)
    return None


@dataclass
class Topology:
    """The namespaces and links of one lab; ``up()`` builds, ``down()`` removes (idempotent)."""

    prefix: str
    taps: int = 4
    ra: bool = True

    @property
    def sw(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def dhcp(self) -> str:
        return f"{self.prefix}-dhcp"

    @property
    def srv(self) -> str:
        return f"{self.prefix}-srv"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.sw, self.dhcp, self.srv)

    def tap(self, index: int) -> str:
        if not 0 <= index < self.taps:
            raise LabError(f"tap{index}: this lab has taps 0..{self.taps - 1}")
        return f"tap{index}"

    @staticmethod
    def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
        # `ip netns exec` setns()es and then execs argv: the PID we get is argv's own PID.
        return ["ip", "netns", "exec", ns, *argv]

    def run_in(self, ns: str, argv: Sequence[str], *, check: bool = True) -> str:
        return run(self.ns_exec(ns, argv), check=check)

    def exists(self) -> list[str]:
        return [ns for ns in self.namespaces if (NETNS_DIR / ns).exists()]

    def up(self) -> None:
        present = self.exists()
        if present:
            raise LabError(f"namespaces already exist: {', '.join(present)}")
        try:
            self._up()
        except Exception:
            self.down()
            raise

    def _up(self) -> None:
        for ns in self.namespaces:
            run(["ip", "netns", "add", ns])
            self.run_in(ns, ["ip", "link", "set", "lo", "up"])
        sw = self.sw
        # No STP and no forwarding delay: a port must forward the firmware's first DISCOVER.
        self.run_in(
            sw, ["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0"]
        )
        self.run_in(sw, ["ip", "link", "set", "br0", "up"])
        for short, ns, addr in (("dhcp", self.dhcp, DHCP_IP), ("srv", self.srv, SRV_IP)):
            # Created inside the switch namespace, one end moved: nothing appears on the host.
            self.run_in(
                sw, ["ip", "link", "add", f"sw-{short}", "type", "veth", "peer", "name",
                     "eth0", "netns", ns]
            )
            self.run_in(sw, ["ip", "link", "set", f"sw-{short}", "master", "br0", "up"])
            self.run_in(ns, ["ip", "addr", "add", f"{addr}/{SUBNET_PREFIX}", "dev", "eth0"])
            self.run_in(ns, ["ip", "link", "set", "eth0", "up"])
        if self.ra:
            # The site DHCP host sends IPv6 RAs: without a router on the link iPXE's IPv6
            # autoconfiguration blocks ~16 s per boot (lab gotcha 1). nodad: usable at once.
            self.run_in(
                self.dhcp, ["ip", "-6", "addr", "add", RA_ADDR, "dev", "eth0", "nodad"]
            )
        for i in range(self.taps):
            tap = self.tap(i)
            self.run_in(sw, ["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
            self.run_in(sw, ["ip", "link", "set", tap, "master", "br0", "up"])
        # A NIC plugged in here has link but no DHCP server, no router, nothing.
        self.run_in(sw, ["ip", "tuntap", "add", "dev", DEAD_TAP, "mode", "tap"])
        self.run_in(sw, ["ip", "link", "set", DEAD_TAP, "up"])

    def down(self, procs: ProcessTable | None = None) -> list[str]:
        """Stop ``procs``, then anything else left in our namespaces, then delete them.

        Returns warnings (leftover processes that had to be ended). Safe to call twice.
        """
        warnings: list[str] = []
        if procs is not None:
            procs.stop_all()
        for ns in self.exists():
            pids = run(["ip", "netns", "pids", ns], check=False).split()
            for p in pids:
                # Only processes inside a namespace this lab created, each by its own PID.
                st = _start_time(int(p))
                if st is None:
                    continue
                warnings.append(f"pid {p} still running in {ns}; ending it")
                stop_tracked(Tracked(f"leftover-{p}", int(p), st, []), grace=2.0)
            run(["ip", "netns", "del", ns], check=False)
        for w in warnings:
            log.warning("%s", w)
        return warnings


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Run the body with the *calling thread* inside network namespace ``ns``.

    setns(CLONE_NEWNET) is per thread and allowed in a threaded process; sockets keep the
    namespace they were created in, so a socket made here can be used after the block.
    Python 3.11 has no os.setns, hence ctypes.
    """
    libc = _libc()
    with (
        open("/proc/thread-self/ns/net", "rb") as orig,
        open(NETNS_DIR / ns, "rb") as target,
    ):
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns({ns}): {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(orig.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                # Continuing in the wrong namespace would be worse than dying loudly.
                raise SystemExit(f"cannot return to the original netns: {os.strerror(err)}")


def connect_in_netns(ns: str, host: str, port: int, timeout: float) -> socket.socket:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def save_state(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data
