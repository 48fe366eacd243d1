"""A device's shell for the register command's tests: what an installed image runs it with."""

from __future__ import annotations

import shutil
from pathlib import Path

# The applets the register command names (content.register_texts), wget not curl.
APPLETS = ("sh", "[", "hostname", "cat", "mkdir", "touch", "sleep", "wget", "printf", "mv")


def device_shell(tmp: Path, shell: str = "busybox") -> tuple[list[str], dict[str, str]]:
    """The argv prefix (``... -c``) and environment of a device's shell: busybox ``sh``
    with only the applets the register command names on its PATH (a busybox-only image:
    wget, no curl), or ``dash`` with the host's tools and curl (k3OS ships curl; dash stands
    for a POSIX shell that is not busybox's)."""
    bin_dir = tmp / f"bin-{shell}"
    bin_dir.mkdir(parents=True)
    if shell == "busybox":
        busybox = shutil.which("busybox")
        assert busybox, "busybox not installed: run tests/install-deps.sh (busybox-static)"
        for applet in APPLETS:
            (bin_dir / applet).symlink_to(busybox)
        return [str(bin_dir / "sh"), "-c"], {"PATH": str(bin_dir)}
    found = shutil.which("dash"), shutil.which("curl")
    assert found[0] and found[1], "dash and curl not installed: run tests/install-deps.sh"
    return [found[0], "-c"], {"PATH": f"{bin_dir}:/usr/bin:/bin"}
