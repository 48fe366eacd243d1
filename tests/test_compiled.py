"""The mypyc build of the DHCP and TFTP paths and of a first install's and a first config's
loop work (the boot decision, the content and its render, the recorder's group commit, the
inventory view, lifecycle, identity and enroller, the model's values and the front door's
codec; setup.py with ``NETBOOT_MYPYC=1``) passes the same tests.

mypyc's native classes are stricter than CPython's (no instance ``__dict__``, argument types
checked as annotated), so a module that passes its tests as Python can still fail compiled:
the compiled modules are built in a copy of the checkout and the DHCP and TFTP tests are run
there against them, with a probe that fails unless the compiled modules are the ones imported.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# setup.py's COMPILED, as import names.
COMPILED = ("netboot.wire.dhcp", "netboot.pxe", "netboot.wire.tftp", "netboot.servers.tftp",
            "netboot.boot", "netboot.content", "netboot.render", "netboot.recorder",
            "netboot.inventory.view", "netboot.lifecycle", "netboot.identity",
            "netboot.enroll", "netboot.model", "netboot.servers.fasthttp")
TESTS = (
    "tests/wire/test_dhcp.py",
    "tests/test_pxe.py",
    "tests/test_pxe_replies.py",
    "tests/servers/test_dhcp.py",
    "tests/servers/test_dhcp_inventory.py",
    "tests/wire/test_tftp.py",
    "tests/servers/test_tftp.py",
    "tests/servers/test_tftp_modes.py",  # netascii: wire/tftp.netascii, the packet cache
    # A first install end to end (/ipxe through the front door, its commit, its script) and
    # the modules it runs through.
    "tests/test_flow.py",
    "tests/test_boot.py",
    "tests/test_boot_shared.py",
    "tests/test_recorder.py",
    "tests/test_content.py",
    "tests/test_content_config_frames.py",
    "tests/test_render.py",
    "tests/servers/test_http.py",
    "tests/servers/test_http_front.py",
    # The view a first install and a first config look their machine up in, the state
    # machine and identity rules they run through, and the enroller that checks a config's
    # token and records its fetch (compiled since session 19).
    "tests/inventory/test_view.py",
    "tests/test_lifecycle.py",
    "tests/test_identity.py",
    "tests/test_enroll.py",
    # The frozen values every layer passes around and the front door's codec (compiled since
    # session 20).
    "tests/test_model.py",
    "tests/servers/test_fasthttp.py",
)
# Tests that cannot run against native classes, whose methods cannot be replaced on an
# instance and whose constructors check their arguments' types: these replace a compiled
# object's method to count its calls (Renderer.ipxe and .yaml_config, _YamlShapes.matches)
# or build a Content with None for its store and boot service, or replace a module's
# function that compiled code calls natively (inventory/view.py's return_freed_memory, which
# the view's load calls: the replacement is never called), or replace a compiled Enroller's
# method (config_fetched, held until two fetches have read the machine), or replace a
# compiled class's classmethod to count its calls (Identity.of_request: a native classmethod
# has no __func__ to wrap). The Python build runs them.
NOT_COMPILED = (
    "tests/test_boot.py::test_a_dhcp_storms_records_use_their_decisions_memo_once_it_is_evicted",
    "tests/test_boot.py::test_a_dhcp_storms_paced_records_are_made_without_a_coroutine_each",
    "tests/test_boot.py::"
    "test_a_first_discover_is_decided_from_the_views_memory_without_a_coroutine_each",
    # Replace identity.held_lookup, which a compiled boot.py calls natively, to count calls.
    "tests/test_boot.py::"
    "test_a_paced_dhcp_record_takes_its_decisions_look_up_while_the_view_is_unchanged",
    "tests/test_boot.py::test_a_paced_dhcp_record_looks_up_again_once_the_view_changed",
    # Replaces InventoryView.held, which a compiled boot.py calls natively, to count calls.
    "tests/servers/test_dhcp_inventory.py::"
    "test_a_repeat_looks_nothing_up_while_the_view_has_not_changed",
    # Replaces BootService._tells_more, a compiled boot.py's native method, to count calls.
    "tests/servers/test_dhcp_inventory.py::"
    "test_a_repeat_asks_what_would_be_recorded_only_once_the_recorder_was_told_more",
    "tests/inventory/test_view.py::"
    "test_identifiers_only_added_are_indexed_without_taking_the_old_entries_out",
    "tests/servers/test_http.py::test_config_fetched_twice_at_once_is_served_twice",
    # Replaces identity.matches, which a compiled enroll.py calls directly.
    "tests/test_enroll.py::"
    "test_enrolling_a_device_whose_discover_is_recorded_meanwhile_takes_its_record_over",
    "tests/inventory/test_view.py::"
    "test_a_load_gives_back_what_the_stores_caches_and_the_heap_hold_after_it",
    "tests/test_content.py::test_ipxe_script_is_kept_only_while_what_it_is_made_of_is_unchanged",
    "tests/test_recorder.py::test_a_committed_event_is_remembered_once_with_its_commits_version",
    "tests/test_content.py::test_an_install_script_is_made_of_the_names_its_template_reads",
    "tests/test_content.py::test_an_install_script_is_given_the_machine_keys_it_reads",
    # Replace Renderer.ipxe_with to count an install script's renders (its frame's, s41-ipxe).
    "tests/test_content.py::"
    "test_first_install_scripts_of_one_shape_are_its_frame_filled_in_as_rendered",
    "tests/test_content.py::"
    "test_an_install_script_that_reads_a_machines_value_otherwise_is_rendered_each_time",
    "tests/test_content.py::"
    "test_a_token_that_prints_otherwise_than_itself_is_rendered_not_filled_in",
    "tests/test_content.py::"
    "test_a_hostname_that_prints_otherwise_than_itself_is_rendered_not_filled_in",
    # Replaces Content.context, to give a context name frames do not know (s41-ipxe).
    "tests/test_content.py::"
    "test_an_install_script_reading_a_name_frames_do_not_know_is_rendered_each_time",
    # Replaces Content.context, as above, for a config's frame (s42-config).
    "tests/test_content_config_frames.py::"
    "test_a_config_reading_a_name_frames_do_not_know_is_rendered_each_time",
    "tests/servers/test_http.py::"
    "test_a_config_fetched_again_is_kept_until_anything_it_is_made_of_changes",
    # A compiled InventoryView keeps its attributes in a struct (no __dict__): the
    # interpreter's shared-keys limit the test guards is not there to meet.
    "tests/inventory/test_view.py::test_the_view_keeps_under_thirty_attributes",
    *(f"tests/test_render.py::{name}" for name in (
        "test_a_config_templates_edit_is_split_anew",
        "test_a_device_or_operator_value_adds_no_ipxe_command[",
        "test_a_held_machine_with_a_fixed_address_asks_dhcp_again_each_round",
        "test_a_cloud_init_node_whose_first_boot_never_registered_retries_at_each_boot",
        "test_a_config_using_a_per_machine_value_otherwise_is_rendered_whole[",
        "test_a_servers_configs_give_k3s_the_agent_token_golden_and_valid",
        "test_a_kept_split_form_answers_at_once_and_an_edit_is_rendered_anew",
        "test_a_register_commands_plain_values_are_filled_into_places_of_the_config_skeleton",
        "test_a_split_config_is_jinjas_text_for_hostile_values",
        "test_a_split_fill_reads_tojsons_kept_texts_of_strs_and_calls_it_for_the_rest",
        "test_a_template_whose_texts_miss_their_forms_patterns_is_not_rendered_twice",
        "test_bootstrap_golden",
        "test_cmdline_must_be_one_line_and_no_hash",
        "test_config_context_has_the_command_line_only_for_a_template_that_reads_it",
        "test_configs_with_spliced_register_commands_are_the_plain_renders",
        "test_default_cmdline_for_cloud_init",
        "test_ipxe_install_is_complete",
        "test_ipxe_templates[",
        "test_k3os_cluster_init",
        "test_k3os_config_golden_and_valid",
        "test_nocloud_golden_and_valid[",
        "test_operators_configs_printing_the_register_command_their_own_ways_are_jinjas_text",
        "test_pxelinux_templates[",
        "test_shipped_configs_found_again_are_checked_without_marks",
        "test_split_render_equals_the_whole_render_for_every_shipped_template",
        "test_split_render_of_user_templates_equals_the_whole_render[",
        "test_the_form_that_matched_is_tried_first_next_time",
        "test_uboot_script_image",
        "test_values_alike_in_a_forms_texts_are_taken_verbatim_by_its_pattern",
        "test_yaml_document_of_every_shipped_config_is_parsed_once_per_shape",
        "test_yaml_shapes_found_again_check_plain_texts_as_the_parse_did[",
    )),
)
PROBE = f"""
import importlib


def test_the_compiled_modules_are_the_ones_imported() -> None:
    for name in {COMPILED!r}:
        assert importlib.import_module(name).__file__.endswith(".so"), name
"""


class Build:
    """The mypyc build of a copy of the checkout, run by its own process: started when the
    run's tests are collected (tests/conftest.py's ``pytest_collection_finish``), at the
    lowest priority, so that it compiles beside the tests before this file's (on 2 cores
    the build's ~2-4 min of one core's CPU is then mostly hidden; benchmarks/README.md,
    s36-ci); waited for, at normal priority, by the test."""

    def __init__(self, base: Path) -> None:
        self.copy = base / "checkout"
        self.copy.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
        for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
            shutil.copy2(ROOT / name, self.copy / name)
        for name in ("netboot", "templates", "boot_assets", "tests"):
            shutil.copytree(ROOT / name, self.copy / name, ignore=ignore)
        self.env = {**os.environ, "NETBOOT_MYPYC": "1", "PYTHONPATH": str(self.copy)}
        self.log = base / "build.log"
        with self.log.open("wb") as out:  # a file, not a pipe: nobody reads it meanwhile
            self.proc = subprocess.Popen(
                ["nice", "-n", "19", sys.executable, "setup.py", "build_ext", "--inplace"],
                cwd=self.copy, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> tuple[int, str]:
        """The build's exit status and the end of its output; ended (by its own handle) if
        it takes longer than ``timeout`` seconds."""
        # Waited for now: back to normal priority (root may lower a nice value; otherwise
        # it stays low, which only makes it slower).
        to_normal_priority(self.proc.pid)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            code = -1
        return code, self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        """End the build and its compilers: its own process group (start_new_session)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def to_normal_priority(group: int) -> None:
    """Nice 0 for every process of the process group ``group``: the build's compilers too,
    which it started at nice 19 (before session 40 only setup.py's own process was reniced:
    the gcc doing the work stayed at 19, and on a loaded machine the test waited minutes for
    it). Its later children inherit 0 from setup.py."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PGRP, group, 0)


BUILD = pytest.StashKey[Build]()


def start_early(session: pytest.Session) -> None:
    """Start the build when the run has this file's build test among its items."""
    wanted = f"{Path(__file__).name}::{BUILT_TEST}"
    if session.config.option.collectonly or not any(item.nodeid.endswith(wanted)
                                                    for item in session.items):
        return
    factory = session.config._tmp_path_factory  # type: ignore[attr-defined]
    session.config.stash[BUILD] = Build(factory.mktemp("compiled"))


def stop_early(config: pytest.Config) -> None:
    """End a build nobody waited for (the run stopped first)."""
    build = config.stash.get(BUILD, None)
    if build is not None:
        build.stop()


BUILT_TEST = "test_the_compiled_paths_pass_their_tests"


@pytest.mark.timeout(1500)
def test_the_compiled_paths_pass_their_tests(tmp_path: Path, request: pytest.FixtureRequest,
                                              ) -> None:
    build = request.config.stash.get(BUILD, None) or Build(tmp_path)
    code, output = build.wait(timeout=900)
    assert code == 0, output
    copy, env = build.copy, build.env
    for name in COMPILED:
        built = list((copy / Path(*name.split(".")).parent).glob(name.rsplit(".", 1)[1]
                                                                  + ".*.so"))
        assert built, f"{name} was not compiled"

    (copy / "tests" / "test_compiled_probe.py").write_text(PROBE)
    deselect = [arg for name in NOT_COMPILED for arg in ("--deselect", name)]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_compiled_probe.py", *TESTS, *deselect], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]


def test_a_waited_for_builds_compilers_run_at_normal_priority() -> None:
    """The build's processes, its compilers among them, leave nice 19 when it is waited
    for."""
    def nice(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    if os.geteuid() != 0:
        pytest.fail("needs root (to lower a nice value); run the suite as root, as CI does",
                    pytrace=False)
    # A stand-in for setup.py and the gcc it runs: a shell and its child, in a session
    # (process group) of their own, at nice 19.
    proc = subprocess.Popen(["nice", "-n", "19", "sh", "-c", "sleep 60 & echo $!; wait"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert nice(proc.pid) == nice(child) == 19
        to_normal_priority(proc.pid)
        assert nice(proc.pid) == nice(child) == 0
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# The ``async with`` context expressions compiled modules may use: each one's __aexit__ never
# suspends (asyncio.Lock's release; boot._Locked's leave is a plain call).
NON_SUSPENDING_EXITS = frozenset({
    "self._lock",  # recorder.py: an asyncio.Lock
    "self._lock(request.mac)",  # boot.py: a _Locked
    "_Locked(self._locks, machine.id)",  # boot.py
})


def test_no_compiled_coroutine_leaves_an_async_with_through_an_exit_that_may_suspend() -> None:
    """An exception leaving a compiled coroutine's ``async with`` is awaited through the
    manager's __aexit__ while it is handled: where that suspends (a PostgreSQL advisory
    lock's release, inventory.base.FixedLock) mypyc's build crashed the process (session 43:
    SIGSEGV in test_enroll's postgresql-import case, an import under ``fixed_lock`` refused
    on its version). A compiled module takes such a lock by hand and releases it after its
    handler (Enroller._import_rows); the ``async with`` it keeps are over managers whose
    exit never suspends (NON_SUSPENDING_EXITS)."""
    found = []
    for name in COMPILED:
        path = name.replace(".", "/") + ".py"
        tree = ast.parse((ROOT / path).read_text())
        found += [f"{path}:{node.lineno}: {ast.unparse(item.context_expr)}"
                  for node in ast.walk(tree) if isinstance(node, ast.AsyncWith)
                  for item in node.items
                  if ast.unparse(item.context_expr) not in NON_SUSPENDING_EXITS]
    assert not found, found


def test_no_compiled_coroutine_awaits_inside_an_except_block() -> None:
    """In mypyc's compiled coroutines an await inside an except handler can leave the handled
    exception as the thread's current one: every later exception in the process then carried
    it and its frames as __context__ (session 25: the recorder's refused group, found by
    test_identity's and test_lifecycle's no-chain tests in the compiled run). The handler
    keeps the exception; the await comes after it."""
    found = []
    for name in COMPILED:
        path = name.replace(".", "/") + ".py"
        tree = ast.parse((ROOT / path).read_text())
        for handler in ast.walk(tree):
            if isinstance(handler, ast.ExceptHandler):
                found += [f"{path}:{node.lineno}" for node in ast.walk(handler)
                          if isinstance(node, (ast.Await, ast.AsyncWith, ast.AsyncFor))]
    assert not found, found
