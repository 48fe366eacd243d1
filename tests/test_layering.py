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


def _module_imports(path: Path) -> set[str]:
    """The modules of ours ``path`` imports, at its top or inside a function (a late import
    is a tie all the same), but not those for the type checker only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:  # ``from netboot import lifecycle`` names a module
                sub = f"{node.module}.{a.name}"
                out.add(sub if _path(sub) is not None else node.module)
    return {m for m in out if m.split(".")[0] == "netboot"}


def _path(module: str) -> Path | None:
    base = PKG.parent.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_no_module_imports_itself_back() -> None:
    """No circle of imports (DESIGN.md §7: "0 cycles"): servers/http.py, the front door,
    used to import servers/aio.py's keys and responses inside its functions while aio.py
    imports it; what needs them moved to aio.py."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in _module_imports(path) if m != name and _path(m) is not None}
    # Depth-first search; a module met again while still on the path closes a circle.
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                circles.append([*path[path.index(other):], other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, f"import circles: {circles}"
