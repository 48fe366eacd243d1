"""Imports point down (DESIGN.md §3): wire imports nothing of ours; servers never import the
inventory; only service.py and cli.py name concrete store classes; one place decides."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "netboot"


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("netboot")}


def modules(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if sub else sorted(PKG.glob("*.py"))


def test_wire_imports_nothing_of_ours_but_errors() -> None:
    for path in modules("wire"):
        bad = {m for m in imports(path) if not m.startswith(("netboot.errors", "netboot.wire"))}
        assert not bad, f"{path.name} imports {bad}"


def test_servers_never_import_inventory_or_decisions() -> None:
    for path in modules("servers"):
        bad = {m for m in imports(path) if m.startswith(("netboot.inventory", "netboot.boot",
                                                         "netboot.enroll", "netboot.service",
                                                         "netboot.api", "netboot.cli"))}
        assert not bad, f"servers/{path.name} imports {bad}"


def test_only_wiring_names_concrete_stores() -> None:
    allowed = {"service.py", "cli.py"}
    for path in sorted(PKG.rglob("*.py")):
        if path.parent.name == "inventory" or path.name in allowed:
            continue
        bad = {m for m in imports(path) if m.startswith(("netboot.inventory.sqlite",
                                                         "netboot.inventory.memory"))}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_codecs_and_model_do_no_io() -> None:
    for path in [*modules("wire"), PKG / "model.py", PKG / "groups.py"]:
        bad = {m for m in imports(path) if m.startswith(("netboot.servers", "netboot.service"))}
        text = path.read_text(encoding="utf-8")
        assert not bad and "import socket" not in text and "asyncio" not in text, path.name


def test_nothing_imports_upwards_into_wiring() -> None:
    for path in sorted(PKG.rglob("*.py")):
        if path.name in ("service.py", "cli.py", "__main__.py") or path.parent.name == "lab":
            continue
        bad = {m for m in imports(path) if m in ("netboot.service", "netboot.cli")}
        assert not bad, f"{path.relative_to(PKG)} imports {bad}"


def test_no_module_level_mutable_globals() -> None:
    """Module state would be shared between servers in one process (and between tests)."""
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                value = node.value
                if isinstance(value, ast.List | ast.Dict | ast.Set) or (
                        isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                        and value.func.id in ("list", "dict", "set", "defaultdict")):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [t.id for t in targets if isinstance(t, ast.Name)]
                    assert all(n.isupper() or (n.startswith("_") and n[1:].isupper())
                               or (n.startswith("__") and n.endswith("__"))
                               for n in names), f"{path.relative_to(PKG)}: mutable global {names}"
