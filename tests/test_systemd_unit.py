"""contrib/netboot.service: restarts netboot after a fatal signal and says what a SIGBUS means.

The unit's ExecStopPost is run here as systemd would run it after the main process ended:
systemd turns ``$$`` into ``$`` and passes EXIT_CODE/EXIT_STATUS (the signal's name) in the
environment (systemd.exec(5), "Environment Variables Set or Propagated by the Service
Manager").
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "netboot.service"


def service_section() -> dict[str, list[str]]:
    """Keys of [Service], each with its values (a key may repeat in a unit file)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def stop_post(exit_code: str, exit_status: str) -> str:
    service = service_section()
    env = dict(v.split("=", 1) for v in service["Environment"])
    argv = shlex.split(service["ExecStopPost"][0].replace("$$", "$"))
    done = subprocess.run(argv, env={**env, "EXIT_CODE": exit_code,
                                     "EXIT_STATUS": exit_status},
                          capture_output=True, text=True, timeout=10, check=True)
    return done.stderr


def test_the_unit_restarts_netboot_after_a_failure() -> None:
    service = service_section()
    assert service["Restart"] == ["on-failure"]
    assert service["ExecStart"][0].split()[1:3] == ["serve", "--config"]


def test_a_sigbus_is_named_with_the_file_that_causes_it() -> None:
    line = stop_post("dumped", "BUS")
    assert line.count("\n") == 1
    assert "SIGBUS: /var/lib/netboot/netboot.db-shm" in line and "restarting" in line


@pytest.mark.parametrize(("code", "status"), [("exited", "1"), ("killed", "KILL"),
                                              ("dumped", "SEGV")])
def test_other_ends_say_nothing_more(code: str, status: str) -> None:
    assert stop_post(code, status) == ""


def test_the_readmes_service_install_is_what_the_unit_runs() -> None:
    """The README told how to run netboot in the foreground only; the unit's comment said
    to install it by name from PyPI, where "netboot" is another project (s38-user). The
    README's service command installs from the checkout into the venv the unit runs, with
    the config file the unit names."""
    import re

    readme = (UNIT.parent.parent / "README.md").read_text(encoding="utf-8")
    (command,) = [line for line in readme.splitlines() if "contrib/netboot.service" in line
                  and "systemctl enable" in line]
    (exec_start,) = service_section()["ExecStart"]
    binary, _, config = re.fullmatch(r"(\S+) (serve) --config (\S+)", exec_start).groups()  # type: ignore[union-attr]
    venv = binary.removesuffix("/bin/netboot")
    assert f"python3 -m venv {venv} " in command, command
    assert f"{venv}/bin/pip install '.[fast]'" in command, command
    assert config in command, command
    header = UNIT.read_text(encoding="utf-8").split("[Unit]")[0]
    assert f"{venv}/bin/pip install '.[fast]'" in header, header
