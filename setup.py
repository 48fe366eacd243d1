"""Ship the top-level ``templates/`` and ``boot_assets/`` inside the wheel.

They stay at the top of the repository, their one source (operators and docs point at them
there, and a checkout runs from them); at build time they are copied into
``netboot/_shipped/`` of the wheel, where :mod:`netboot.shipped` finds them once installed.
Everything else about the build is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("templates", "boot_assets")


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


setup(cmdclass={"build_py": BuildPyWithShipped})
