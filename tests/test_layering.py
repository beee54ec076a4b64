"""The import graph of ccm/ runs one way: vocabulary, then protocol and store, then the live
registry and sessions, then the AIP and HTTP side, then the CLI and the demo clients."""

from __future__ import annotations

import ast
from pathlib import Path

import ccm

PACKAGE = Path(ccm.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    (
        "ccm.domain",
        "ccm.clock",
        "ccm.ids",
        "ccm.errors",
        "ccm.yamlfile",
        "ccm.settings_report",
        "ccm.durations",
        "ccm.choices",
        "ccm.config",
        "ccm.version",
    ),
    ("ccm.protocol", "ccm.toolplan", "ccm.logs"),
    ("ccm.store",),
    (
        "ccm.client_info",
        "ccm.device_index",
        "ccm.device_load",
        "ccm.session_map",
        "ccm.devices",
        "ccm.registry_queries",
        "ccm.registry",
        "ccm.sessions",
        "ccm.maintenance",
        "ccm.pacing",
        "ccm.audit",
        "ccm.metrics",
        "ccm.cluster",
    ),
    ("ccm.server",),
    ("ccm.cli", "ccm.commands", "ccm.api_client", "ccm.demo", "ccm.__main__", "ccm"),
]
"""Lowest first. A module may import from its own layer or a lower one, never a higher one."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best, best_len = -1, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def _imports(path: Path) -> set[str]:
    """Every ccm module `path` imports, at any depth (functions and TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ccm" or node.module.startswith("ccm."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ccm"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    """Each module of ccm/ belongs to one of the layers (a new module must be placed)."""
    for module in _graph():
        _layer(module)


def test_no_module_imports_a_higher_layer() -> None:
    """No back edge: a lower layer never imports a higher one."""
    back_edges = [
        f"{module} -> {imported}"
        for module, imports in _graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    ]
    assert back_edges == []


def test_the_import_graph_has_no_cycle() -> None:
    """Within a layer too, imports form no cycle (packages count by their modules)."""
    graph = _graph()
    known = set(graph)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    edges = {
        m: {r for i in imports if (r := resolve(i)) and r != m} for m, imports in graph.items()
    }
    edges["ccm"] = set()  # the package facade re-exports; importing a submodule runs it first
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, path: list[str]) -> bool:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycle.extend([*path, module, target])
                return True
            if state.get(target) is None and visit(target, [*path, module]):
                return True
        state[module] = 2
        return False

    for module in sorted(edges):
        if state.get(module) is None and visit(module, []):
            break
    assert cycle == []


def test_the_demo_clients_use_only_what_a_client_would() -> None:
    """The demo clients import the protocol, the tool-plan format and the shared vocabulary,
    never the server, the store or the registry."""
    allowed = {"ccm.domain", "ccm.errors", "ccm.ids", "ccm.protocol", "ccm.toolplan"}
    for module, imports in _graph().items():
        if module.startswith("ccm.demo"):
            outside = {i for i in imports if not i.startswith("ccm.demo")} - allowed
            assert outside == set(), module


def test_no_module_of_ccm_is_over_400_lines() -> None:
    """Modules stay small enough to read in one sitting."""
    long = {
        _module_name(p): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400
    }
    assert long == {}
