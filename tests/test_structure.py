"""The package's shape: no module of mlc/ imports, even lazily inside a function, one that imports it back.

A cycle is what makes a newcomer read two modules to understand one, and what turns a moved name into an
ImportError at a distance; the check reads the source (every Import / ImportFrom node, wherever it sits),
so it runs nothing and sees the imports that only run on some paths (Ray, the GPU decoder) as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mlc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def imports_of(path: Path, modules: set) -> set:
    """The modules of the package that ``path`` imports anywhere in its text (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from . import storage`` imports the module mlc.storage; ``from .x import y`` imports mlc.x.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path = ROOT) -> dict:
    files = sorted(root.glob("*.py"))
    modules = {_module_name(f) for f in files}
    # The package's __init__ is imported by every ``import mlc.x``; it is a node like the others, so a module
    # that the API in __init__ imports must not import ``mlc`` itself.
    return {_module_name(f): imports_of(f, modules) for f in files}


def find_cycle(graph: dict) -> list | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict = {}
    stack: list = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_in_mlc():
    graph = import_graph()
    assert len(graph) > 10 and "mlc.storage" in graph["mlc.fetch"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in mlc/: " + " -> ".join(cycle)


def test_cycle_finder_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import mlc.a\n")
    (pkg / "d.py").write_text("from mlc import c\n")
    graph = import_graph(pkg)
    assert graph["mlc.b"] == {"mlc.c"} and graph["mlc.d"] == {"mlc.c"}
    assert find_cycle(graph) == ["mlc.a", "mlc.b", "mlc.c", "mlc.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None


def test_every_config_field_carries_its_help():
    """The flags' help is read from the config classes (mlc.cli); a field without it would have no --help line."""
    import dataclasses

    from mlc.config import ScaleConfig, SweepConfig, TrainConfig
    for cls in (TrainConfig, ScaleConfig, SweepConfig):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help text"
