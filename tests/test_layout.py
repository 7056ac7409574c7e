"""The package's shape, so it stays walkable: every ``aigid`` import (module level and inside
functions, ``TYPE_CHECKING`` blocks included) points down the layers, none forms a cycle, no file
grows past 600 lines, and the top of ``aigid/`` holds packages and at most 6 modules.

Layers, lowest first (a module may import its own layer or any below it):
  kernels ← errors/backends/version/ops ← data/provenance ← models
  ← training/scanning/evaluation/export/serving/demo ← aigid (the public API) ← cli
``data`` sits below ``models`` because a detector owns its preprocessing (``data.transforms``)
while no decoder or source needs a model.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aigid"
LAYERS = (
    ("aigid.kernels",),
    ("aigid.errors", "aigid.backends", "aigid.version", "aigid.ops"),
    ("aigid.data", "aigid.provenance"),
    ("aigid.models",),
    ("aigid.training", "aigid.scanning", "aigid.evaluation", "aigid.export", "aigid.serving", "aigid.demo"),
    ("aigid",),
    ("aigid.cli",),
)
MAX_LINES = 600
MAX_TOP_MODULES = 6


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name → file for every module, following the ``aigid/kernels`` link."""
    found = {}
    for path in sorted(root.rglob("*.py")) + sorted((root / "kernels").resolve().glob("*.py")):
        if path.is_relative_to(root):
            parts = list(path.relative_to(root).with_suffix("").parts)
        else:
            parts = ["kernels", path.stem]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(["aigid", *parts])] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges(modules: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """module → {(imported aigid module, line)}, from every import statement in the file."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == "aigid" or target.startswith("aigid."):
                    resolved = _resolve(target, modules)
                    if resolved and resolved != mod:
                        edges[mod].add((resolved, node.lineno))
    return edges


def layer_of(mod: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if mod == prefix or mod.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), level)
    assert best is not None, f"{mod} has no layer: add it to LAYERS"
    return best[1]


def cycles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: {t for t, _ in e} for m, e in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_imports_of_every_kind(tmp_path):
    """Catches a walker that misses function-level, relative or `from pkg import sub` imports."""
    pkg = tmp_path / "aigid"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "sub").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from aigid.sub import a\n")
    (pkg / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from aigid.sub.b import x\n")
    modules = _modules(pkg)
    edges = import_edges(modules)
    assert {t for t, _ in edges["aigid.sub.a"]} == {"aigid.sub.b"}
    assert {t for t, _ in edges["aigid.c"]} == {"aigid.sub.b"}
    assert cycles(edges) == [["aigid.sub.a", "aigid.sub.b"]]


def test_no_import_cycle():
    found = cycles(import_edges(_modules()))
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_imports_point_down_the_layers():
    modules = _modules()
    upward = [f"{modules[m].relative_to(PACKAGE.parent)}:{line} {m} → {t}"
              for m, targets in import_edges(modules).items() for t, line in targets
              if layer_of(t) > layer_of(m)]
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("mod", ["aigid.models.mirage.model", "aigid.data.transforms", "aigid.cli",
                                 "aigid.kernels.reference", "aigid.ops.packing"])
def test_every_module_has_a_layer(mod):
    assert mod in _modules() and isinstance(layer_of(mod), int)


def test_no_file_over_600_lines():
    """Python files of aigid/ (the Triton kernels in the top-level kernels/ are not counted)."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in _modules().values()
            if p.is_relative_to(PACKAGE) and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_top_of_the_package_holds_few_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
