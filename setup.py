"""Ship the top-level ``templates/`` and ``boot_assets/`` inside the wheel.

They stay at the top of the repository, their one source (operators and docs point at them
there, and a checkout runs from them); at build time they are copied into
``netboot/_shipped/`` of the wheel, where :mod:`netboot.shipped` finds them once installed.
Everything else about the build is declared in pyproject.toml.

``NETBOOT_MYPYC=1`` also compiles the per-packet DHCP path (the codec and the PXE decision
logic), the TFTP codec and sender, and a first install's loop work (boot decision, content,
render, recorder, and the view, lifecycle, identity and enroller a first install and a
first config look up and advance machines with, the model's values and the HTTP front
door's codec) with mypyc, for a platform wheel that spends
~23 % less CPU per DISCOVER in process, less per TFTP block and ~17 % less loop CPU per first
install (README, "Performance"). It needs mypy, setuptools and a C compiler in the building
environment, so it is built without isolation:
``pip install mypy setuptools && NETBOOT_MYPYC=1 pip install --no-build-isolation .``.
Without it the wheel is pure Python, and the same modules run as they are.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("templates", "boot_assets")
# What mypyc compiles: the modules every DHCP packet and every TFTP block runs through, and
# which keep to what mypyc's native classes allow (no instance __dict__, argument types as
# annotated). The TFTP server's adapter (netboot/servers/tftp.py) too since session 12: its
# per-block loop with native attribute access and native calls into the compiled sender cost
# 2-6 % less CPU per lock-step block than with the adapter interpreted (benchmarks/README.md).
# Since session 17 also the modules a first `/ipxe` install's event-loop work runs through
# (the boot decision, the content and its render, the recorder's group commit): 13 % less of
# the loop's CPU per first install in process (benchmarks/README.md, branch s17-mypyc).
# Since session 19 also the inventory view, the lifecycle and identity rules and the enroller
# (a config's token check and its fetch recorded): 4-5 % less loop CPU per first install and
# ~7 % per first config beside the eight compiled alone (benchmarks/README.md, s19-mypyc).
# Since session 20 also model.py (the values every layer passes: compiled callers read their
# fields natively; MacAddress, a bytes, stays a Python class): ~6 % less loop CPU per first
# install and per first config beside the twelve; and servers/fasthttp.py (the front door's
# head parse and response join, 0.5 us less a request alone). logs.py compiled only with its
# logging subclasses kept Python classes (a native class on logging's base broke the weak
# references logging keeps to handlers: the interpreter crashed), and then saved nothing in
# process: left out (benchmarks/README.md, s20-model).
# mypyc compiles ``==``/``!=`` between two values of a Python class that a compiled module
# declares (``Machine``, ``MacAddress``) as ``is``: compiled code compares them with
# ``model.equal``, or against a plain bytes (``identity.NO_NIC_BYTES``) (session 32: a
# config fetched twice at once answered 409, s32-mypyc).
COMPILED = ("netboot/wire/dhcp.py", "netboot/pxe.py", "netboot/wire/tftp.py",
            "netboot/servers/tftp.py", "netboot/boot.py", "netboot/content.py",
            "netboot/render.py", "netboot/recorder.py", "netboot/inventory/view.py",
            "netboot/lifecycle.py", "netboot/identity.py", "netboot/enroll.py",
            "netboot/model.py", "netboot/servers/fasthttp.py")


class BuildPyWithShipped(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # An editable install runs from the checkout, which has the directories already.
            return
        for name in SHIPPED:
            target = Path(self.build_lib) / "netboot" / "_shipped" / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(ROOT / name, target)
        package = Path(self.build_lib) / "netboot"
        # build_py runs before build_ext: the extensions are not there yet, but whether the
        # wheel will carry them is known (NETBOOT_MYPYC=1 gave setup() its ext_modules).
        build = build_id(package, compiled=self.distribution.has_ext_modules())
        (package / "_shipped" / "BUILD").write_text(build + "\n", encoding="ascii")


def build_id(package: Path, *, compiled: bool) -> str:
    """What ``netboot --version`` names beside the version: a digest of the files the wheel
    carries. Every build says "0.1.0", and pip installs a wheel of an installed version
    without a word but "already installed" (exit 0): an upgrade by wheel needs
    --force-reinstall (README, "Backup, restore and upgrades"), and this tells the operator
    which build runs. A mypyc wheel (``compiled``) says so, and its digest covers it: the
    Python files are the same as a pure wheel's of the tree, and both named one build."""
    h = hashlib.sha256(b"mypyc\0" if compiled else b"")
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.name != "BUILD" and "__pycache__" not in path.parts \
                and path.suffix not in (".so", ".c", ".o"):
            h.update(f"{path.relative_to(package)}\0{path.stat().st_size}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12] + (", compiled" if compiled else "")


def compiled() -> dict[str, Any]:
    if os.environ.get("NETBOOT_MYPYC", "") in ("", "0"):
        return {}
    from mypyc.build import mypycify  # only a compiled build needs mypy

    return {"ext_modules": mypycify(list(COMPILED), opt_level="3")}


# Only when run as the build's script (setuptools' backend runs it as __main__): the tests
# import it for build_id.
if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithShipped}, **compiled())
