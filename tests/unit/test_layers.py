"""The import graph of ``service/``, read with ``ast`` (nothing is imported): no module imports one of a
higher layer, and no import cycle joins modules.

``LAYERS`` maps a module path prefix to its layer; a module takes the layer of its longest matching prefix
(``service.api`` covers ``service.api.routes.v2``; ``service.__init__`` is the package ``service`` itself).
A module may import modules of its own layer or lower ones. Every import counts: at module level, inside a
function (deferred) and under ``if TYPE_CHECKING:``; the deferred and type-only ones are listed apart in
failure messages and by ``test_deferred_and_type_only_imports_are_listed`` (``pytest -s``), since hiding an
import in a function does not remove the dependency.

A new module: add its prefix to ``LAYERS`` (the test names the modules that have none).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT

LAYERS: dict[str, int] = {
    # L0: settings, errors, wire schemas, metrics, logging
    "service.__init__": 0,
    "service.config": 0,
    "service.errors": 0,
    "service.schemas": 0,
    "service.metrics": 0,
    "service.logs": 0,
    # L1: model runtimes, the registry, batching, caching, devices, signatures
    "service.runtime": 1,
    "service.registry": 1,
    "service.batcher": 1,
    "service.cache": 1,
    "service.gpu": 1,
    "service.budget": 1,
    "service.challenger": 1,
    "service.signature": 1,
    "service.columns": 1,
    # L2: model lifecycle and the request pipeline
    "service.lifecycle": 2,
    "service.pipeline": 2,
    "service.reloader": 2,
    "service.webhooks": 2,
    "service.swaps": 2,
    # L3: HTTP, and gRPC (the same protocols' codecs and checks)
    "service.api": 3,
    "service.grpc": 3,
    # L4: entry points
    "service.cli": 4,
    "service.workers": 4,
    "service.check": 4,
    "service.__main__": 4,
}


# ------------------------------------------------------------------------------------------ the checker
@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    kind: str  # "module" (run at import), "deferred" (inside a function) or "type-only" (TYPE_CHECKING)

    def __str__(self) -> str:
        where = "" if self.kind == "module" else f", {self.kind}"
        return f"{self.importer} -> {self.imported} (line {self.line}{where})"


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module under the package folder ``root``, by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that ``name`` (a dotted name) is or is inside of."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: Mapping[str, Path], package: str) -> list[Import]:
    """The imports of ``module`` that name a module of ``package``, each resolved to the module it loads
    (``from package.api import tensors`` is ``package.api.tensors``; ``from package.errors import X`` is
    ``package.errors``), relative ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base_parts = base_parts[: len(base_parts) - drop] if drop else base_parts
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        return [n for n in names if n == package or n.startswith(package + ".")]

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in dict.fromkeys(targets(node)):  # `from m import a, b` is one import of m
                resolved = _resolve(name, modules) or name
                if resolved != module:
                    found.append(Import(module, resolved, node.lineno, kind))
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "type-only")
            for child in node.orelse:
                visit(child, kind)
            return
        inner = "deferred" if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else kind
        if kind == "type-only":
            inner = kind
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, "module")
    return found


def import_graph(root: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    modules = modules_of(root, package)
    edges = [edge for name, path in modules.items() for edge in imports_of(name, path, modules, package)]
    return modules, edges


def layer_of(module: str, layers: Mapping[str, int], package: str) -> int | None:
    """The layer of the longest prefix of ``module`` in ``layers`` (the package itself is
    ``<package>.__init__``)."""
    name = f"{package}.__init__" if module == package else module
    best: str | None = None
    for prefix in layers:
        if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return layers[best] if best is not None else None


def unlayered(modules: Iterable[str], layers: Mapping[str, int], package: str) -> list[str]:
    return [m for m in modules if layer_of(m, layers, package) is None]


def upward_imports(edges: Iterable[Import], layers: Mapping[str, int], package: str) -> list[Import]:
    out = []
    for edge in edges:
        low, high = layer_of(edge.importer, layers, package), layer_of(edge.imported, layers, package)
        if low is not None and high is not None and high > low:
            out.append(edge)
    return out


def cycles(edges: Iterable[Import]) -> list[list[Import]]:
    """One cycle (as the imports that close it) per strongly connected group of modules (Tarjan)."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
        graph.setdefault(edge.imported, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth is bounded by the number of modules
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(group, graph) for group in sorted(groups)]


def _cycle_in(group: list[str], graph: Mapping[str, Mapping[str, Import]]) -> list[Import]:
    """A shortest cycle through the group's first module (breadth-first, inside the group)."""
    start, members = group[0], set(group)
    previous: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt, edge in sorted(graph[node].items()):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, previous[path[0].importer])
                    return path
                if nxt not in previous:
                    previous[nxt] = edge
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {group}")  # a strongly connected group has one


def describe_cycle(cycle: list[Import]) -> str:
    return (
        " -> ".join([cycle[0].importer, *(e.imported for e in cycle)])
        + "\n    "
        + "\n    ".join(map(str, cycle))
    )


# ------------------------------------------------------------------------------------------ service/
SERVICE = ROOT / "service"
MODULES, EDGES = import_graph(SERVICE, "service")


def test_every_module_has_a_layer() -> None:
    missing = unlayered(MODULES, LAYERS, "service")
    assert not missing, (
        f"module(s) without a layer: {missing}. Add each (or a prefix of it) to LAYERS at the top of "
        "tests/unit/test_layers.py, with the layer it belongs to."
    )


def test_no_upward_import() -> None:
    upward = upward_imports(EDGES, LAYERS, "service")
    assert not upward, "import(s) of a higher layer (see LAYERS in tests/unit/test_layers.py):\n" + "\n".join(
        f"  L{layer_of(e.importer, LAYERS, 'service')} {e} imports L{layer_of(e.imported, LAYERS, 'service')}"
        for e in upward
    )


def test_no_import_cycle() -> None:
    found = cycles(EDGES)
    assert not found, "import cycle(s) among service modules:\n" + "\n".join(map(describe_cycle, found))


def test_deferred_and_type_only_imports_are_listed() -> None:
    """Not a check: the imports a module-level reading would miss, for ``pytest -s``. The rules above
    apply to them too."""
    hidden = [e for e in EDGES if e.kind != "module"]
    print("\n".join(["deferred and type-only imports between service modules:", *map(str, hidden)]))
    assert EDGES, "no imports found under service/: is the path right?"


# ------------------------------------------------------------------------------------ the checker itself
def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


FAKE_LAYERS = {"pkg.__init__": 0, "pkg.low": 0, "pkg.mid": 1, "pkg.sub": 1, "pkg.high": 2}


def test_checker_finds_a_cycle_through_a_deferred_relative_import(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "X = 1\n",
            "mid.py": "from pkg.sub import helper\n",
            "sub/__init__.py": "",
            "sub/helper.py": "def f():\n    from ..mid import Y\n    return Y\n",
        },
    )
    modules, edges = import_graph(root, "pkg")
    assert set(modules) == {"pkg", "pkg.low", "pkg.mid", "pkg.sub", "pkg.sub.helper"}
    found = cycles(edges)
    assert len(found) == 1
    assert {e.importer for e in found[0]} == {"pkg.mid", "pkg.sub.helper"}
    assert "deferred" in describe_cycle(
        found[0]
    ) and "pkg.mid -> pkg.sub.helper -> pkg.mid" in describe_cycle(found[0])
    assert not upward_imports(edges, FAKE_LAYERS, "pkg")


def test_checker_finds_an_upward_import_even_when_type_only(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "VERSION = '1'\n",
            "low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import H\n",
            "mid.py": "import pkg.low\nfrom . import low\nfrom pkg import VERSION\n",
            "high.py": "from pkg import VERSION\nH = 1\n",
        },
    )
    _, edges = import_graph(root, "pkg")
    upward = upward_imports(edges, FAKE_LAYERS, "pkg")
    assert [(e.importer, e.imported, e.kind) for e in upward] == [("pkg.low", "pkg.high", "type-only")]
    assert not cycles(edges)
    assert ("pkg.mid", "pkg", "module") in {(e.importer, e.imported, e.kind) for e in edges}


def test_checker_names_a_module_missing_from_the_table(tmp_path: Path) -> None:
    root = _package(tmp_path, {"__init__.py": "", "low.py": "", "extra.py": "import pkg.low\n"})
    modules, _ = import_graph(root, "pkg")
    assert unlayered(modules, FAKE_LAYERS, "pkg") == ["pkg.extra"]
    assert layer_of("pkg", FAKE_LAYERS, "pkg") == 0 and layer_of("pkg.sub.deep", FAKE_LAYERS, "pkg") == 1
