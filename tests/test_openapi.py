"""Schemathesis against the served OpenAPI document, on a real server on 127.0.0.1.

Every operation is called with data generated from the document (bounded: a few examples per
operation, a fixed seed, one worker) under an admin token; the run must see no 5xx and no
response that breaks the document's schemas. The document is also what a 400 is judged by: a
constraint the server enforces but the document does not name shows up as rejected data.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
import schemathesis

from netboot.config import load
from netboot.errors import ValidationError
from netboot.model import MachineState, Role
from netboot.openapi import document
from netboot.service import build
from tests.conftest import write_config

# Revoking the run's own token would end the run (every later call a 401), which is the
# right answer and no test of the rest; the revoke route has its own tests in test_api.py.
# The event stream answers with a never-ending text/event-stream (tests/web/test_auth.py
# reads it); a generated request would only wait for its timeout.
EXCLUDED = ("/api/v1/tokens/{name}", "/api/v1/events/stream")
METHODS = ("get", "put", "post", "patch", "delete")


async def test_schemathesis_finds_no_server_error_and_no_schema_violation(
        tmp_path: Path) -> None:
    assert schemathesis.__version__  # the test extra provides it; never skipped
    cfg = load(write_config(tmp_path), env={})
    service = await build(cfg)
    await service.start()
    try:
        token = (cfg.data_dir / "admin.token").read_text().strip()
        report = tmp_path / "report.json"
        argv = [sys.executable, "-m", "schemathesis.cli", "run",
                f"http://127.0.0.1:{service.http_port}/api/v1/openapi.json",
                "--header", f"Authorization: Bearer {token}",
                # A drawn If-Match names a version no object has: its 412 is right, and it
                # is not a body refused (the bodies' checks below); "*" (any version) lets
                # every draw reach the body's checks. tests/test_api.py's If-Match tests
                # hold the 412s.
                "--header", "If-Match: *",
                "--checks", "not_a_server_error,response_schema_conformance,"
                            "status_code_conformance,content_type_conformance",
                "--max-examples", "5", "--seed", "1", "--mode", "positive", "--workers", "1",
                "--request-timeout", "10", "--report", "json",
                "--report-json-path", str(report), "--output-sanitize", "true",
                *(arg for path in EXCLUDED for arg in ("--exclude-path", path))]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
        text = out.decode("utf-8", "replace")
        assert proc.returncode == 0, text[-6000:]
        run = json.loads(report.read_text())
        assert run["complete"] and run["failures"] == [] and run["errors"] == [], run
        # Every documented operation was called, but the excluded ones and the document
        # itself (schemathesis leaves out the URL it loaded the schema from).
        paths = document()["paths"]
        total = sum(1 for item in paths.values() for m in item if m in METHODS)
        excluded = sum(1 for p in EXCLUDED for m in paths[p] if m in METHODS)
        ops = run["operations"]
        assert ops["tested"] == ops["selected"] == total - excluded - 1, ops
        assert run["test_cases"]["generated"] >= 5 * ops["tested"], run["test_cases"]
        # The bodies of profiles, clusters, groups and register are declared as strictly as
        # the server checks them, so generated data is not mostly refused (schemathesis's
        # "schema validation mismatch" warning, which names the operations)...
        bodies = [f"{method} /api/v1/{kind}" for kind in ("profiles", "clusters", "groups")
                  for method in ("POST", "PUT")]
        bodies = [op if op.startswith("POST") else f"{op}/{{name}}" for op in bodies]
        mismatch = run["warnings"]["validation_mismatch"]
        assert not set(mismatch) & {*bodies, "POST /api/v1/register"}, mismatch
        # ... and none at all for profiles and clusters, whose every check the document names
        # (a group also names existing profiles and clusters, which no schema can say).
        rates = run["valid_rates"]
        refused = {op: phase["rejected"] for op in bodies if "groups" not in op
                   for phase in rates[op].values() if phase["rejected"]}
        assert not refused, refused
    finally:
        await service.close()


def test_every_state_and_role_the_document_names_is_the_model_s() -> None:
    # The Machine schema's states and the roles were lists written beside MachineState and
    # Role (the ?state= filter read the enum): a state or role added to the model would have
    # been missing from the document, and a client validating against it would refuse it.
    states = [s.value for s in MachineState]
    roles = [*(r.value for r in Role), None]
    found: dict[str, list[object]] = {}

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            if path.endswith(("/state", "/role")) and "enum" in node:
                found[path] = node["enum"]
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(document(), "")
    assert found["/components/schemas/Machine/properties/state"] == states
    assert found["/components/schemas/Error/properties/state"] == states
    for path in ("Machine", "MachineInput", "MachinePatch", "Approve", "Group", "GroupReplace"):
        assert found[f"/components/schemas/{path}/properties/role"] == roles, path


@pytest.mark.parametrize("ref", [
    "vmlinuz", "k3os/vmlinuz", "a..b/x", "a b/x", "", "http://192.0.2.10/x", "https://[::1]/x",
    "../x", "a/../x", "a\\..\\x", "..", "/x", "//x", "tftp://h/x", "file:/x", "x:y", "http://",
    "http:///x", "http://h/a b", "x\n", "x\ny", "x\x00", "x\x7f", "http://h/\u2003",
])
def test_the_documents_boot_file_pattern_is_what_the_server_takes(ref: str) -> None:
    # The server refuses what the document declares otherwise (core.check_asset_ref):
    # schemathesis generates from the pattern, and a client validates against it.
    import re

    from netboot import openapi
    from netboot.core import check_asset_ref
    from netboot.errors import ValidationError

    for url, schema in ((True, openapi._BOOT_FILE), (False, openapi._ASSET_FILE)):
        try:
            check_asset_ref("kernel", ref, url=url)
            taken = True
        except ValidationError:
            taken = False
        assert (re.search(schema["pattern"], ref) is not None) == taken, (ref, url)


@pytest.mark.parametrize(("endpoint", "taken"), [
    ("k3s.dc1.example.com", True), ("api.k3s.dc1.edge.example.com", True),
    ("https://k3s-api.site-7.corp.example.net:6443", True), ("K3S.Example.COM", True),
    ("k3s.example.com.", True), ("k3s.example.com.:6443", True), ("vip", True),
    ("192.0.2.10:6443", True), ("[2001:db8::10]", True), ("https://[2001:db8::10]:6443", True),
    (".".join(["a" * 63] * 3 + ["b" * 61]), True), (".".join(["a" * 63] * 3 + ["b" * 62]), False),
    ("127.0.1.1", False), ("169.254.0.1", False), ("1.2.3.4.5", False), ("-a.example", False),
    ("a-.example", False), ("under_score.example", False), ("vip.example/k8s", False),
    ("http://vip.example", False), ("vip.example:0", False), ("vip.example:65536", False),
])
def test_the_documents_endpoint_pattern_holds_the_endpoints_the_server_answers(
        endpoint: str, taken: bool) -> None:
    # The Cluster schema is the body and the answer: a client validating an answered cluster
    # against it refused a VIP's name of four labels (the pattern held three at most), and
    # one validating its request refused a name the server takes (openapi.ENDPOINT_PATTERN).
    import re

    from netboot.model import check_endpoint
    from netboot.openapi import ENDPOINT_PATTERN

    try:
        canonical = check_endpoint(endpoint)
    except ValidationError:
        canonical = None
    assert (canonical is not None) == taken, endpoint
    assert (re.search(ENDPOINT_PATTERN, endpoint) is not None) == taken, endpoint
    if canonical is not None:
        assert re.search(ENDPOINT_PATTERN, canonical) is not None, canonical
