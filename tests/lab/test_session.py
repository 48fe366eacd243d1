"""The lab's enrollment (``netboot lab up --enroll``, the e2e fixtures) against a real netboot
in a namespace this test creates (tests.netns), over HTTPS with netboot's CA as the lab uses
it; then what an operator listing the lab's clusters reads."""

from __future__ import annotations

import asyncio
import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from netboot.cli import main
from netboot.config import load
from netboot.lab.client import ApiClient
from netboot.lab.session import DEVICES, enroll, lab_token
from netboot.service import build
from tests.conftest import write_config
from tests.netns import in_namespace

pytestmark = [pytest.mark.netns, pytest.mark.root, pytest.mark.requires("ip", "iproute2")]


def enrolled(namespace: str, conf: Path, run_dir: Path) -> None:
    """``netboot lab up --enroll``'s enrollment (the run dir's token), by the lab's client
    over HTTPS, into a netboot served from ``conf`` in ``namespace`` and stopped after."""
    async def up() -> None:
        cfg = load(conf, env={})
        cfg = replace(cfg, https=replace(cfg.https, listen="192.0.2.10"))
        service = await build(cfg)
        try:
            await service.start()
            admin = (cfg.data_dir / "admin.token").read_text().strip()
            api = ApiClient(namespace, "192.0.2.10", service.https_port, token=admin,
                            ca_file=cfg.data_dir / "tls" / "ca.pem")
            await asyncio.to_thread(enroll, api, [d for k, d in DEVICES.items()
                                                  if k != "unknown"], token=lab_token(run_dir))
        finally:
            await service.close()

    in_namespace(namespace, up)


def test_the_labs_cluster_has_a_token_netboot_does_not_warn_of_kept_in_its_run_dir(
        namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lab up --enroll`` made cluster edge with the token "sekret": every ``clusters ls``
    on the lab printed two warnings (the short form, the weak secret) of the lab's own test
    cluster (s47-review). Now k3s's secure form with a random secret, the same at each
    enrollment on one run directory and readable by root alone."""
    conf = write_config(tmp_path)
    run_dir = tmp_path / "run"
    enrolled(namespace, conf, run_dir)
    capsys.readouterr()
    assert main(["clusters", "ls", "--config", str(conf)]) == 0
    listed = capsys.readouterr()
    assert "edge" in listed.out and "cluster edge:" not in listed.out, listed.out
    assert main(["clusters", "show", "edge", "--config", str(conf)]) == 0
    shown = capsys.readouterr()
    assert "join token" not in shown.out + shown.err, shown
    kept = run_dir / "k3s-token"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert lab_token(run_dir) == kept.read_text().strip()  # a re-run agrees
    assert lab_token(tmp_path / "other") != lab_token(run_dir)


def test_lab_up_enroll_again_on_the_same_run_dir_keeps_the_cluster_and_its_machines(
        namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``netboot lab down`` keeps the run directory and netboot's data in it (only the
    namespaces and processes go), so the next ``lab up --enroll`` enrolled into an inventory
    that had it all: "POST /api/v1/clusters -> HTTP 409" and the lab torn down again. A
    re-run finds its cluster, profiles and groups as it made them (the same token: kept in
    the run dir) and its machines as they stand (an installed guest still installed)."""
    conf = write_config(tmp_path)
    run_dir = tmp_path / "run"
    bios = DEVICES["bios"]
    enrolled(namespace, conf, run_dir)
    capsys.readouterr()
    assert main(["machines", "mark-installed", bios.mac, "--config", str(conf)]) == 0
    enrolled(namespace, conf, run_dir)  # lab down, lab up --enroll: the same data
    capsys.readouterr()
    assert main(["machines", "show", bios.mac, "--json", "--config", str(conf)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["hostname"]) == ("installed", bios.name), shown
    assert main(["render", DEVICES["uefi"].mac, "config", "--arch", "x86_64", "--config",
                 str(conf)]) == 0
    assert f'token: "{lab_token(run_dir)}"' in capsys.readouterr().out
