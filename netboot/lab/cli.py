"""``netboot lab up|boot <kind>|down|status``: the end-to-end lab for humans.

``up`` builds the artifacts (cached), the namespaces, the site DHCP server and starts netboot
in ``<prefix>-srv``; its processes outlive the command (own session) and are recorded in
``<run-dir>/state.json``, so ``boot``, ``status`` and ``down`` find them by PID later.
``boot`` runs one guest in the foreground, console on stdout, until it powers off, the
timeout, or Ctrl-C. ``down`` ends what ``up`` started, by PID, and deletes the namespaces.

Run directory: ``--run-dir`` or ``$NETBOOT_LAB_DIR``, default ``/run/netboot-lab``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

from netboot.lab.artifacts import ArtifactError, ensure_artifacts
from netboot.lab.qemu import BootTimeout, VmExited
from netboot.lab.session import DEVICES, NETBOOT, LabSession, NetbootConfig, enroll, lab_token
from netboot.lab.sitedhcp import SiteDhcpConfig
from netboot.lab.topology import LabError

IPXE_DIR = Path("/usr/lib/ipxe")
ALIASES = MappingProxyType({"uboot": "uboot-arm64"})
# Where a boot ends: the installer's result, netboot's local-boot answer (iPXE echo, or U-Boot
# running a LOCALBOOT label without `localcmd`), or SeaBIOS with nothing left to boot.
END = (
    r"NETBOOT-INSTALLER: result=\w+|netboot: booting from local disk"
    r"|missing environment variable: localcmd|No bootable device"
)


def default_run_dir() -> Path:
    return Path(os.environ.get("NETBOOT_LAB_DIR", "/run/netboot-lab"))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``lab`` to netboot's sub-commands (``args.cmd == "lab"``, ``args.lab_cmd``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lab", help="QEMU lab: real firmware booting from netboot in network namespaces"
    )
    p.add_argument("--run-dir", type=Path, default=None,
                   help="logs, configs and state (default $NETBOOT_LAB_DIR or /run/netboot-lab)")
    lab_sub = p.add_subparsers(dest="lab_cmd", required=True)

    up = lab_sub.add_parser("up", help="create the lab and start netboot in it")
    up.add_argument("--mode", choices=["proxy", "authoritative"], default="proxy",
                    help="netboot's DHCP mode; authoritative runs no site DHCP server")
    up.add_argument("--no-site-next-server", dest="site_next_server", action="store_false",
                    help="site DHCP stays plain; by default it points U-Boot clients (and only"
                         " them) at netboot, as U-Boot ignores proxyDHCP")
    up.add_argument("--no-netboot", action="store_true",
                    help="only the network and site DHCP; start your own server in <prefix>-srv")
    up.add_argument("--enroll", action="store_true",
                    help="enroll the standard test cluster, profiles, groups and devices")
    up.add_argument("--policy", default="ignore", help="discovery policy (default ignore)")

    boot = lab_sub.add_parser("boot", help="boot one guest, console on stdout")
    boot.add_argument("kind", choices=sorted([*DEVICES, *ALIASES]),
                      help="device (firmware path) to boot")
    boot.add_argument("--timeout", type=float, default=None,
                      help="seconds (default 60 x86, 90 U-Boot)")
    boot.add_argument("--mac", help="override the device's fixed MAC")

    lab_sub.add_parser("down", help="stop everything the lab started and delete it")
    lab_sub.add_parser("status", help="namespaces, processes, where the logs are")
    return p


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir or default_run_dir()
    try:
        if args.lab_cmd == "up":
            return _up(args, run_dir)
        if args.lab_cmd == "boot":
            return _boot(args, run_dir)
        if args.lab_cmd == "down":
            return _down(run_dir)
        if args.lab_cmd == "status":
            return _status(run_dir)
    except (LabError, ArtifactError) as exc:
        print(f"netboot lab: {exc}", file=sys.stderr)
        return 1
    print(f"netboot lab: unknown command {args.lab_cmd!r}", file=sys.stderr)
    return 2


def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("needs root (network namespaces, taps, ports 67/69)")


def _up(args: argparse.Namespace, run_dir: Path) -> int:
    _need_root()
    if LabSession.load(run_dir) is not None:
        raise LabError(f"a lab is already up (state in {run_dir}); run 'netboot lab down'")
    artifacts = ensure_artifacts()
    session = LabSession(run_dir=run_dir, detach=True)
    site = None
    if args.mode == "proxy":
        site = SiteDhcpConfig(next_server="192.0.2.10" if args.site_next_server else None)
    try:
        session.up(site)
        if not args.no_netboot:
            session.start_netboot(
                NetbootConfig(run_dir / "netboot-data", [artifacts.dir, IPXE_DIR],
                              mode=args.mode, discovery_policy=args.policy)
            )
            if args.enroll:
                enroll(session.api, [d for k, d in DEVICES.items() if k != "unknown"],
                       token=lab_token(run_dir))
    except Exception:
        session.down()
        raise
    topo = session.topo
    print(f"lab up: namespaces {', '.join(topo.namespaces)}; run dir {run_dir}")
    print(f"  artifacts: {artifacts.dir}")
    if not args.no_netboot:
        print(f"  netboot log: {session.netboot_log}")
        data = run_dir / "netboot-data"
        print(f"  API: ip netns exec {topo.srv} curl --cacert {data / 'tls' / 'ca.pem'} -H "
              f"\"Authorization: Bearer $(cat {data / 'admin.token'})\" "
              "https://192.0.2.10:8443/api/v1/machines")
    print("  next: netboot lab boot bios | netboot lab down")
    return 0


def _load(run_dir: Path) -> LabSession:
    session = LabSession.load(run_dir)
    if session is None:
        raise LabError(f"no lab is up (no state in {run_dir}); run 'netboot lab up'")
    return session


def _boot(args: argparse.Namespace, run_dir: Path) -> int:
    _need_root()
    session = _load(run_dir)
    spec = DEVICES[ALIASES.get(args.kind, args.kind)]
    if args.mac:
        from netboot.lab.qemu import VmSpec

        spec = VmSpec(spec.name, spec.kind, args.mac.lower(), spec.uuid, spec.serial, spec.tap)
    timeout = args.timeout or spec.kind.default_timeout
    printed = 0
    rc = 1
    with session.boot(spec) as vm:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    m = vm.wait_for(END, timeout=1.0)
                    if m.group(0).startswith("NETBOOT-INSTALLER"):
                        rc = 0 if "result=ok" in m.group(0) else 1
                        vm.wait_exit(20)
                    else:
                        rc = 0 if "No bootable" not in m.group(0) else 1
                        print(f"netboot lab: {m.group(0)!r}: stopping the guest", file=sys.stderr)
                    break
                except BootTimeout:
                    pass
                except VmExited:
                    break
                finally:
                    lines = vm.console.lines
                    for line in lines[printed:]:
                        print(line, flush=True)
                    printed = len(lines)
            else:
                print(f"netboot lab: no end of boot within {timeout:.0f} s", file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            rc = 130
    for line in vm.console.lines[printed:]:
        print(line)
    print(f"serial log: {vm.serial_log}", file=sys.stderr)
    return rc


def _down(run_dir: Path) -> int:
    _need_root()
    session = LabSession.load(run_dir)
    if session is None:
        print(f"no lab up in {run_dir}")
        return 0
    for w in session.down():
        print(f"warning: {w}", file=sys.stderr)
    print(f"lab {session.prefix} down")
    return 0


def _status(run_dir: Path) -> int:
    session = LabSession.load(run_dir)
    if session is None:
        print(f"no lab up in {run_dir}")
        return 1
    print(f"lab {session.prefix}: namespaces present: {', '.join(session.topo.exists()) or 'none'}")
    for name, t in session.procs.procs.items():
        state = "running" if t.alive() else "gone"
        print(f"  {name:<12} pid {t.pid:<7} {state}")
    if NETBOOT in session.procs.procs:
        print(f"  netboot log: {session.netboot_log}")
    print(f"  run dir: {run_dir}")
    return 0
