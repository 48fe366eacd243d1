"""A device whose server dies between its install script and its kernel installs from the other.

Real iPXE (Debian's ``ipxe.lkrn``, the iPXE of QEMU's NIC ROMs, 1.0.0+git-20190125) in QEMU,
its virtio NIC on a tap in a network namespace of the test's own, bridged with two real
``netboot serve`` processes, A (192.0.2.1) and B (192.0.2.2), on one SQLite inventory (two
servers on one host). Nothing touches the host's interfaces. No site setting names the
servers: each records itself in the inventory and learns of the other from it.

The device runs what boot.ipxe runs, with a gate in the middle: its first script (iPXE's
kernel command line) fetches its install script from A (``/ipxe``, as boot.ipxe's chain
does), then asks the test's gate (192.0.2.3), which answers once A is killed (SIGKILL, its
own PID), then runs the script with ``chain --replace`` (as boot.ipxe does). The script's
kernel from A fails (refused, or reset: iPXE kept its connection to A open); the script
chains B's boot.ipxe, B answers the same install, and
the device fetches B's kernel and initrd and boots the kernel: the profile's kernel is
``ipxe.lkrn`` itself, whose command line is a script (iPXE's runtime.c), so the kernel
started prints its command line's config URL, B's, which B answers. Before session 50 the
script failed at A's kernel and the device gave up its network boot at once (SeaBIOS went on
to its disks: ``chain --replace`` had ended the script that chained it, and its retries).

Cost: two servers started (5-30 s on a loaded 2-core machine), one QEMU guest under TCG
(iPXE only: seconds).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.multiserver.conftest import Inventory
from tests.multiserver.test_register_elsewhere import (
    caller,
    heard,
    server_at,
    started,
    stopped,
)
from tests.netns import in_namespace, ip

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.e2e,
              pytest.mark.requires("ip", "iproute2"),
              pytest.mark.requires("qemu-system-x86_64", "qemu-system-x86")]

LKRN = Path("/usr/lib/ipxe/ipxe.lkrn")  # Debian's ipxe package
MAC = "52:54:00:50:0a:01"
DEVICE = "192.0.2.60"
GATE = "192.0.2.3"
# A hung boot's bound, not a pace (TCG on a loaded 2-core machine: lab REPORT §10).
BOOT_SECONDS = 180
STAGE_TWO = "netboot-stage-two"
GAVE_UP = "netboot-test-device-gave-up"
GONE_ON = "Booting from Hard Disk"  # SeaBIOS, once the iPXE it ran returned
BARE = "initrd=initrd.img: command not found"  # the kernel of two initrds, started
IP = shutil.which("ip") or "ip"


@pytest.fixture
def bridged() -> Iterator[str]:
    """A namespace with a bridge holding the servers' and the gate's addresses and the
    guest's tap (``tap0``), deleted after (with the tap: QEMU is ended first)."""
    ns = f"nbt-{secrets.token_hex(3)}-q"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "add", "br0", "type", "bridge")
        for address in ("192.0.2.1", "192.0.2.2", GATE):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "br0")
        ip("-n", ns, "tuntap", "add", "tap0", "mode", "tap")
        ip("-n", ns, "link", "set", "tap0", "master", "br0")
        for dev in ("br0", "tap0"):
            ip("-n", ns, "link", "set", dev, "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _first_script(a_base: str, gate: str, initrd: bool) -> str:
    """The device's first script (one line, iPXE's kernel command line): its address, its
    install script from A, the gate, the script run as boot.ipxe runs it (or, failing, a
    line that says so at once rather than at the bound). ``initrd``: A's boot.ipxe, as a
    device chains it (the gate is the install's first initrd)."""
    up = f"ifopen net0 && set net0/ip {DEVICE} && set net0/netmask 255.255.255.0"
    if initrd:
        return f"{up} && chain --autofree --replace {a_base}/boot.ipxe || echo {GAVE_UP}"
    return (f"{up} && imgfetch --name install {a_base}/ipxe?mac=${{net0/mac:hexhyp}}"
            f"&arch=x86_64 && imgfetch --name gate {gate}/gate && imgfree gate"
            f" && chain --autofree --replace install || echo {GAVE_UP}")


async def _console(proc: asyncio.subprocess.Process, lines: list[str],
                   seen: asyncio.Event) -> None:
    """The guest's serial lines (firmware writes \\r-only progress lines: split on either),
    without terminal escapes; ``seen`` set at each new line."""
    assert proc.stdout is not None
    left = b""
    while chunk := await proc.stdout.read(4096):
        parts = re.split(rb"[\r\n]+", left + chunk)
        left = parts.pop()
        for raw in parts:
            text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", b"", raw)
            text = re.sub(rb"[^\x20-\x7e\t]", b"", text).decode("ascii").strip()
            if text:
                lines.append(text)
        seen.set()
    lines.append(left.decode("ascii", errors="replace"))
    seen.set()


@pytest.mark.parametrize("between", ["script and kernel", "kernel and initrd"])
def test_a_device_whose_server_died_after_its_install_script_installs_from_the_other(
        tmp_path: Path, bridged: str, between: str) -> None:
    """``script and kernel``: as the module says. ``kernel and initrd``: the device runs
    A's own boot.ipxe; the profile's first initrd is the gate, so A dies after the device
    fetched A's kernel and before A's initrd: the script drops A's kernel (imgfree) and goes
    on with B. Its kernel's command line is not a script that runs there (iPXE strips the
    first ``initrd=`` only: the second is a command not found), which says the kernel
    started."""
    initrd = between == "kernel and initrd"
    if not LKRN.exists():
        pytest.fail(f"{LKRN} is missing: install the Debian package ipxe "
                    "(tests/install-deps.sh does)", pytrace=False)
    shared = Inventory("sqlite", f"  path: {tmp_path / 'shared.db'}\n")

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        loop = asyncio.get_running_loop()
        a = server_at(tmp_path, "a", "192.0.2.1", shared, bridged)
        b = server_at(tmp_path, "b", "192.0.2.2", shared, bridged)
        for server in (a, b):
            # The profile's kernel: iPXE itself (a bzImage), whose command line is a script.
            shutil.copyfile(LKRN, server.config.parent / "assets" / "vmlinuz")
        asked, opened = asyncio.Event(), asyncio.Event()

        async def gate(request: web.Request) -> web.Response:
            asked.set()
            await opened.wait()
            return web.Response(text="open\n")

        app = web.Application()
        app.router.add_get("/gate", gate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, GATE, 0)
        await site.start()
        gate_base = f"http://{GATE}:{runner.addresses[0][1]}"
        qemu: asyncio.subprocess.Process | None = None
        lines: list[str] = []
        try:
            auth = await started(a, b)
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=30)) as http:
                call = caller(http, auth)
                for path, body in (
                        ("/api/v1/profiles", {
                            "name": "lkrn", "kernel": "vmlinuz",
                            "initrds": [f"{gate_base}/gate"] * initrd + ["initrd.img"],
                            "config_template": "k3os",
                            "cmdline": f"echo {STAGE_TWO} {{{{ config_url }}}}"}),
                        ("/api/v1/machines", {"mac": MAC, "hostname": "edge-q1",
                                              "profile": "lkrn"})):
                    status, answer = await call(a, "POST", path, body)
                    assert status == 201, (path, status, answer)
                out["a knew b"] = await heard(a, b)  # then A's install scripts name B
                qemu = await asyncio.create_subprocess_exec(
                    IP, "netns", "exec", bridged, "qemu-system-x86_64", "-accel", "tcg",
                    "-m", "256", "-nographic", "-no-reboot", "-monitor", "none",
                    "-serial", "stdio", "-nodefaults", "-M", "pc",
                    "-smbios", "type=1,uuid=4e455442-4f4f-5400-0000-0000000050a1",
                    "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                    # No NIC ROM: the iPXE started is the -kernel one, with its own driver.
                    "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=",
                    "-kernel", str(LKRN), "-append", _first_script(a.base, gate_base, initrd),
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT)
                seen = asyncio.Event()
                reader = asyncio.create_task(_console(qemu, lines, seen))

                async def console_until(*needles: str) -> str | None:
                    """The first console line holding one of ``needles`` (bounded), with
                    what iPXE wrapped of it at the BIOS console's 80 columns onto the next
                    lines."""
                    deadline = time.monotonic() + BOOT_SECONDS
                    done = 0
                    while time.monotonic() < deadline:
                        for at in range(done, len(lines)):
                            if not any(n in lines[at] for n in needles):
                                continue
                            line, last, more = lines[at], lines[at], at + 1
                            while len(last) >= 80 and more < len(lines):
                                last, more = lines[more], more + 1
                                line += last
                            if len(last) < 80 or reader.done():
                                return line
                            break  # the rest of it is still to come
                        else:
                            at = len(lines)
                        done = at
                        if reader.done():
                            return None
                        seen.clear()
                        await _within(seen.wait(), min(max(0.1, deadline - time.monotonic()),
                                                       1.0))
                    return None

                # The device holds A's install script (its fetch answered), and waits.
                await _within(asked.wait(), BOOT_SECONDS)
                out["gate asked"] = asked.is_set()
                # A dies: SIGKILL to its own PID, before the device asks it for the kernel.
                assert a.proc is not None
                a.proc.kill()
                await loop.run_in_executor(None, a.proc.wait, 30)
                opened.set()
                # The kernel started, or the device's firmware going on to its disks: the
                # device gave up its network boot (iPXE returned to the BIOS).
                out["stage two"] = await console_until(BARE if initrd else STAGE_TWO,
                                                       GAVE_UP, GONE_ON)
                found = re.search(r"/config/[0-9a-f-]{17}\?token=[A-Za-z0-9_-]+",
                                  out["stage two"] or "")
                if found is not None:
                    # The config the kernel's installer would fetch: B answers it (the same
                    # install's token).
                    out["config from b"] = (await call(b, "GET", found.group(0),
                                                       admin=False))[0]
                out["machine"] = (await call(b, "GET", f"/api/v1/machines/{MAC}"))[1]
        finally:
            if qemu is not None and qemu.returncode is None:
                qemu.kill()  # by its own handle (ip netns exec execs QEMU: its PID)
                await qemu.wait()
            opened.set()
            await runner.cleanup()
            out["logs"] = await stopped(a, b)
            out["console"] = "\n".join(lines)
        return out

    out = in_namespace(bridged, scenario, seconds=BOOT_SECONDS * 2 + 180)
    console, logs = out["console"], out["logs"]
    assert out["a knew b"], logs
    assert out["gate asked"], console
    assert out["stage two"] is not None, (console, logs)
    if initrd:
        assert BARE in out["stage two"], (console, logs)
        # How: A's kernel fetched, the gate (A killed meanwhile), A's initrd failed.
        a_kernel = re.search(r"http://192\.0\.2\.1:\d+/assets/vmlinuz\.*\s*ok.*?"
                             r"/gate\.*\s*ok.*?http://192\.0\.2\.1:\d+/assets/initrd\.img\.*"
                             r"\s*Connection (refused|reset)", console, re.DOTALL)
    else:
        # The kernel started is B's, given B's command line: its config URL names B, and
        # B answers it.
        assert f"{STAGE_TWO} http://192.0.2.2:" in out["stage two"], console
        assert out.get("config from b") == 200, (out.get("config from b"), logs)
        # How: A's kernel failed, then B's boot.ipxe, script, kernel and initrd.
        a_kernel = re.search(r"http://192\.0\.2\.1:\d+/assets/vmlinuz\.*\s*"
                             r"Connection (refused|reset)", console)
    b_kernel = re.search(r"http://192\.0\.2\.2:\d+/assets/vmlinuz\.*\s*ok", console)
    assert a_kernel is not None and b_kernel is not None, console
    assert a_kernel.start() < console.index("192.0.2.2:") < b_kernel.start(), console
    assert re.search(r"http://192\.0\.2\.2:\d+/assets/initrd\.img\.*\s*ok", console), console
    assert GAVE_UP not in console, console
    assert out["machine"]["state"] in ("booting", "installing"), out["machine"]


async def _within(awaitable: Any, seconds: float) -> bool:
    """Whether ``awaitable`` ended within ``seconds`` (it is cancelled if not)."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        return False
    return True
