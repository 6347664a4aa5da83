"""The shape of the house: no import cycles, no module importing the package root, no huge modules.

Imports are read from the source (every ``import`` and ``from ... import`` of a lavise
module, at module level or inside a function), so a cycle hidden behind a lazy import
is found too. An import names the module it reads from: ``from lavise.models.target
import X`` depends on ``lavise.models.target``, not on the package ``lavise.models``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lavise

ROOT = Path(lavise.__file__).parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The lavise modules ``name`` imports."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lavise")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lavise":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or with a self-loop (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_the_import_graph_is_read():
    assert GRAPH["lavise.explain"] >= {"lavise.runs", "lavise.features", "lavise.naming"}
    assert "lavise.models.target" in GRAPH["lavise.models"]  # a package's own submodules count


def test_there_are_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"a"}}) == [["a"]]


def test_no_module_imports_the_package_root():
    importers = sorted(name for name, targets in GRAPH.items() if "lavise" in targets)
    assert importers == []


def test_every_imported_module_exists():
    missing = sorted({t for targets in GRAPH.values() for t in targets} - set(MODULES))
    assert missing == []


def test_no_module_is_huge():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in MODULES.items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_data_flows_one_way():
    """Stages never reach forward: what datasets, models and the pure mathematics import."""
    foundations = ("lavise.errors", "lavise._version", "lavise.settings", "lavise.storage", "lavise.compute",
                   "lavise.distributed", "lavise.regions", "lavise.inputs", "lavise.metrics", "lavise.stats",
                   "lavise.confidence", "lavise.retrieval")
    downstream = {"lavise.runs", "lavise.explain", "lavise.evaluate", "lavise.sweep", "lavise.groups",
                  "lavise.compare_models", "lavise.report", "lavise.demos", "lavise.cli"}
    for name, targets in GRAPH.items():
        upstream = name in foundations or name.startswith(("lavise.datasets", "lavise.models", "lavise.embeddings",
                                                           "lavise.vocabulary",
                                                           "lavise.explainer", "lavise.features", "lavise.reference",
                                                           "lavise.naming", "lavise.tallies"))
        if upstream:
            reached = {t for t in targets if t in downstream or t.startswith(("lavise.report.", "lavise.demos."))}
            assert reached == set(), f"{name} reaches forward to {sorted(reached)}"
