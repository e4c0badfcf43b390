"""No import cycles between dfl_tf modules and no upward import between its layers, counting
imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO, import_script

PACKAGE = REPO / "dfl_tf"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dfl_tf modules it imports (``from pkg import submodule`` counts the submodule)."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target not in (name, "dfl_tf"):
                    edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges = _edges(_modules())
    assert edges["dfl_tf.extraction.local"] >= {"dfl_tf.extraction.core", "dfl_tf.extraction.beam"}  # the scan sees lazy imports
    assert _cycles(edges) == []


def test_the_scan_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: The layers of dfl_tf, lowest first: one list for this check and for docs/architecture.md.
LAYERS = import_script("tools", "gen_architecture").LAYERS


def _layer_of(module: str) -> str:
    """``dfl_tf.heads.train`` -> ``heads``: the top-level package or module of a dfl_tf module."""
    return module.split(".")[1]


def _upward(edges: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    return sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                  if _layer_of(a) != _layer_of(b) and rank[_layer_of(b)] >= rank[_layer_of(a)])


def test_no_upward_import():
    modules = _modules()
    placed = {name for layer in LAYERS for name in layer}
    tops = {_layer_of(m) for m in modules if m != "dfl_tf"}
    assert tops <= placed, f"place {sorted(tops - placed)} in LAYERS"
    assert _upward(_edges(modules)) == []
    # the package root holds __version__ and the lazy public API: modules take only __version__ from it
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dfl_tf" and not node.level:
                assert [a.name for a in node.names] == ["__version__"], f"{name}: from dfl_tf import ..."


def test_the_layer_check_finds_an_upward_import():
    edges = {"dfl_tf.store.shards": {"dfl_tf.heads.train", "dfl_tf.store.manifest", "dfl_tf.runtime.files"},
             "dfl_tf.serve.export": {"dfl_tf.select.maps"}}
    assert _upward(edges) == ["dfl_tf.serve.export -> dfl_tf.select.maps", "dfl_tf.store.shards -> dfl_tf.heads.train"]
