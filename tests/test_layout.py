"""The shape of the source tree: ``dpo.core`` is four sub-packages, each importing only those
below it, and no module of ``src/`` imports another in a circle.

The import graph is read from the source (``ast``), every import counted: at module level, inside
functions and under ``TYPE_CHECKING``, since a lazy import hides a circle rather than removing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Lower first: a sub-package may import its own modules and those of the sub-packages before it.
LAYERS = ("interfaces", "data", "model", "training")


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "dpo").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)  # from package import module
                elif base in known:
                    out.add(base)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in edges[v]:
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


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] == ["dpo", "core"] and len(parts) > 2:
        return LAYERS.index(parts[2]) if parts[2] in LAYERS else -1
    return None


def test_no_module_imports_another_in_a_circle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    """The check above can fail: a -> b -> c -> a is one circle; d hangs off it."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]


def test_the_graph_sees_lazy_and_type_only_imports(tmp_path):
    """An import inside a function or under TYPE_CHECKING is an edge like any other."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from dpo.core.data import batching\n"
                      "def f():\n    from dpo.core.model.logps import batch_logps\n")
    known = {"dpo.core.data.batching": source, "dpo.core.model.logps": source, "m": source}
    assert imports("m", source, known) == {"dpo.core.data.batching", "dpo.core.model.logps"}


def test_core_is_its_four_sub_packages():
    """Every module of dpo.core lives in one of its sub-packages, named by its concern."""
    loose = [p.name for p in (SRC / "dpo" / "core").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    packages = sorted(p.name for p in (SRC / "dpo" / "core").iterdir()
                      if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)


@pytest.mark.parametrize("module", [m for m in sorted(modules()) if layer(m) is not None])
def test_sub_packages_import_only_those_below(module):
    """interfaces < data < model < training: the plugin interfaces know no machinery, the data
    side no model, the model side no training."""
    above = [other for other in graph()[module]
             if layer(other) is not None and layer(other) > layer(module)]
    assert above == [], f"{module} imports {above}, above its own layer"
