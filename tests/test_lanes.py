"""tests/lanes.py: under ``pytest -n 2`` the end-to-end suite, the multiserver pairs and the
compiled build's test run in one worker, every other test in the other, each lane in the
order a plain run takes it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.lanes import BESIDE_LANE, SERIAL_LANE, lane

ROOT = Path(__file__).resolve().parents[1]


def test_the_lanes_of_node_ids() -> None:
    assert lane("tests/e2e/test_firmware.py::test_bios_ipxe_rom") == BESIDE_LANE
    assert lane("tests/multiserver/test_outage.py::test_x[sqlite]") == BESIDE_LANE
    assert lane("tests/test_compiled.py::test_the_compiled_paths_pass_their_tests") \
        == BESIDE_LANE
    for nodeid in ("tests/servers/test_dhcp_netns.py::test_x",
                   "tests/test_dhcp_pool_links_netns.py::test_x[True]",
                   "tests/test_lanes.py::test_x", "tests/test_harness.py::test_x",
                   "tests/test_openapi.py::"
                   "test_schemathesis_finds_no_server_error_and_no_schema_violation"):
        assert lane(nodeid) == BESIDE_LANE, nodeid
    assert lane("tests/test_openapi.py::test_every_state_and_role_the_document_names_is_"
                "the_model_s") == SERIAL_LANE
    for nodeid in ("tests/test_compiled_probe.py::test_x", "tests/test_e2e.py::test_x",
                   "tests/inventory/test_postgres.py::test_x[tests/e2e/]",
                   "tests/servers/test_http.py::test_x", "tests/test_container.py::test_x"):
        assert lane(nodeid) == SERIAL_LANE, nodeid


def _workers(*args: str) -> dict[str, str]:
    """Each test's worker in a child ``pytest -v`` of this checkout, in the order the tests
    ended."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                          "-n", "2", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    return {nodeid: worker for worker, nodeid
            in re.findall(r"^\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)\s*$", run.stdout,
                          re.MULTILINE)}


def test_the_beside_lane_runs_in_one_worker_and_every_other_test_in_the_other() -> None:
    beside = "tests/test_compiled.py::test_no_compiled_coroutine_awaits_inside_an_except_block"
    serial = ["tests/test_tokens.py::test_a_forked_child_never_hands_out_its_parents_tokens",
              "tests/wire/test_uimage.py::test_name_and_arch_match_mkimage",
              "tests/wire/test_uimage.py::test_multi_script_padding_matches_mkimage"]
    got = _workers(beside, *serial)
    assert sorted(got) == sorted([beside, *serial]), got
    assert {got[n] for n in serial} == {"gw0", "gw1"} - {got[beside]}, got
    # The serial lane in the order a plain run takes it (one worker: ended in that order).
    assert [n for n in got if n != beside] == serial, got
