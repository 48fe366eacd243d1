"""Two lanes for ``pytest -n 2`` (pytest-xdist; the README's test command and CI's): the
QEMU end-to-end suite, the multiserver pairs and the compiled build's test in one worker,
every other test in the other, each lane in collection order.

The suite was one core's work on a 2-core CI machine (S39: 19 min of user CPU in 26 min of
wall). The end-to-end boots (QEMU under TCG in namespaces of their own, with random names:
netboot.lab.session's prefix), the multiserver pairs (``netboot serve`` processes on loopback
ports of their own choosing, namespaces named ``nbt-<random>``, the worker's own PostgreSQL
cluster of tests/pg.py: a temporary directory and a Unix socket, no TCP) and the mypyc build
with the compiled tests (in a copy of the checkout, on loopback ports the kernel gives)
share nothing with the other tests, so they run beside them. Everything else stays in one
worker, in the order a plain run takes it: those tests were written for one process at a
time (podman's image tag of tests/test_container.py, which removes the others; the timing
bounds of the servers' tests; the inventory tests' one PostgreSQL cluster), and no two of
them run at once (benchmarks/README.md, s40-ci). xdist's own distributions (``--dist``
given) would spread them over both workers.
"""

from __future__ import annotations

from typing import Any

import pytest

# Whose tests run beside the rest: path prefixes of their node ids. After the first three
# (s40-ci), tests that share nothing with the others either, moved to even the lanes out
# (s41-ci: the lead's first whole ``-n 2`` run had the serial lane ~4 min the longer): the
# namespace DHCP tests (namespaces of random names, ``netboot serve`` processes of their
# own), the harness's and this scheduler's own child runs, and schemathesis against a
# service of its own on a port the kernel gives.
BESIDE = ("tests/e2e/", "tests/multiserver/", "tests/test_compiled.py::",
          "tests/servers/test_dhcp_netns.py::", "tests/test_dhcp_pool_links_netns.py::",
          "tests/test_harness.py::", "tests/test_lanes.py::",
          "tests/test_openapi.py::test_schemathesis_finds_no_server_error_and_no_schema_")
BESIDE_LANE = "beside"
SERIAL_LANE = "serial"


def lane(nodeid: str) -> str:
    return BESIDE_LANE if nodeid.startswith(BESIDE) else SERIAL_LANE


def in_worker(config: pytest.Config) -> bool:
    """This process is an xdist worker (the controller and a plain run are not)."""
    return hasattr(config, "workerinput")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """The two lanes, for ``-n N`` without ``--dist``: each lane is one work unit, so each
    goes whole to one worker (a third worker gets nothing and stops)."""
    if config.getoption("dist") != "load" or _dist_given(config):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TwoLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return TwoLanes(config, log)


def _dist_given(config: pytest.Config) -> bool:
    """``--dist`` on the command line or in addopts: xdist's own distribution was asked."""
    args = [*config.invocation_params.args, *config.getini("addopts")]
    return any(a == "--dist" or a.startswith("--dist=") for a in args)
