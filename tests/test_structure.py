"""The package's shape: subpackages by concern whose imports point down, Ray in one place, no cycle, no
module over 400 lines.

The layers, lowest first (each subpackage's ``__init__`` says the same in words)::

    io            bytes: storage, fetch, images, config.json    the bottom floor only
    data          tables, labels, sources, loaders, ...         io
    model, eval   the networks, checkpoints; metrics            io, data (never each other)
    prediction    scores, submissions, export                   io, data, model, eval
    report        report.html of a run or a prediction          io, data, model, eval
    train         the loop, the run driver, outputs             everything below
    distributed   Ray Train, Tune, Ray Data, the cluster        everything below
    bench         speed and accuracy, side by side              everything below but distributed

``mlc.config`` (with ``mlc.fields``, its fields' rules), ``mlc.errors``, ``mlc.logs`` and ``mlc.migrate`` are the bottom floor, beside io (any module
may import them; they import only each other); ``mlc.cli`` and the package's ``__init__`` (the API) sit on top.

The checks read the source (every Import / ImportFrom node, wherever it sits, even inside a function), so
they run nothing and see the imports that only run on some paths (Ray, the GPU decoder) as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "mlc"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Subpackage -> its layer; a module may import a subpackage of a lower layer, or its own.
LAYERS = {"io": 0, "data": 1, "model": 2, "eval": 2, "prediction": 3, "report": 3, "train": 4, "distributed": 5,
          "bench": 5}
BASE = {"mlc.config", "mlc.fields", "mlc.errors", "mlc.logs", "mlc.migrate"}  # the bottom floor beside io
TOP = {"mlc", "mlc.cli"}  # the API and the jobs' command-line helpers
# Exceptions to "a lower layer", each a decision: bench measures the pieces of a run, never a Ray run.
FORBIDDEN = {("bench", "distributed")}
MAX_LINES = 400


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE] + parts)


def _files(root: Path) -> list:
    return sorted(root.rglob("*.py"))


def imports_of(path: Path, modules: set, root: Path = ROOT, *, external: bool = False) -> set:
    """The modules of the package that ``path`` imports anywhere in its text (relative imports resolved);
    with ``external`` the top-level names of everything else it imports (``ray``, ``torch``, ...)."""
    name = _module_name(path, root)
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
            if external:
                if t.split(".")[0] != PACKAGE:
                    found.add(t.split(".")[0])
                continue
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path = ROOT) -> dict:
    files = _files(root)
    modules = {_module_name(f, root) for f in files}
    # A package's __init__ is imported by every ``import mlc.x``; it is a node like the others, so a module
    # that the API in __init__ imports must not import ``mlc`` itself.
    return {_module_name(f, root): imports_of(f, modules, root) for f in files}


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


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def wrong_way(graph: dict) -> list:
    """Every import that runs against the layers, as ``"a -> b (why)"``."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            pa, pb = subpackage(a), subpackage(b)
            if a in TOP or b in BASE or pa is not None and pa == pb:
                continue
            if b in TOP:
                # mlc's __init__ (the API) imports from the layers; only its __version__ may go the other way.
                if b == "mlc" and a != "mlc.cli":
                    continue
                bad.append(f"{a} -> {b} (the API and the cli are on top)")
            elif a in BASE or pa == "io":
                bad.append(f"{a} -> {b} ({a} is at the bottom: it imports nothing of mlc)")
            elif (pa, pb) in FORBIDDEN:
                bad.append(f"{a} -> {b} ({pa} never imports {pb})")
            elif LAYERS[pb] >= LAYERS[pa]:
                bad.append(f"{a} -> {b} ({pb} is not below {pa})")
    return bad


def test_the_tree_is_the_plan():
    subpackages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == {"__init__", "config", "fields", "cli", "errors", "logs", "migrate"}
    for name in LAYERS:
        doc = ast.get_docstring(ast.parse((ROOT / name / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"mlc/{name}/__init__.py does not say what it may import"


def test_no_import_cycle_in_mlc():
    graph = import_graph()
    assert len(graph) > 40 and "mlc.io.storage" in graph["mlc.io.fetch"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in mlc/: " + " -> ".join(cycle)


def test_imports_point_down():
    graph = import_graph()
    assert "mlc.train.engine" in graph["mlc.train.loop"]  # the walk sees nested modules
    assert wrong_way(graph) == []


def test_ray_is_imported_only_in_distributed():
    files = _files(ROOT)
    modules = {_module_name(f, ROOT) for f in files}
    users = {_module_name(f, ROOT) for f in files if "ray" in imports_of(f, modules, external=True)}
    assert users and all(subpackage(m) == "distributed" for m in users), sorted(users)


def test_no_module_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for f in _files(ROOT) if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_checks_see_function_level_relative_and_wrong_way_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "io").mkdir(parents=True)
    (pkg / "train").mkdir()
    for f in ("__init__.py", "io/__init__.py", "train/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "io" / "a.py").write_text("def f():\n    from ..train import b\n")
    (pkg / "train" / "b.py").write_text("from . import c\nimport ray\n")
    (pkg / "train" / "c.py").write_text("from mlc.io.a import f\n")
    graph = import_graph(pkg)
    assert graph["mlc.io.a"] == {"mlc.train.b"} and graph["mlc.train.b"] == {"mlc.train.c"}
    assert find_cycle(graph) == ["mlc.io.a", "mlc.train.b", "mlc.train.c", "mlc.io.a"]
    assert wrong_way(graph) == ["mlc.io.a -> mlc.train.b (mlc.io.a is at the bottom: it imports nothing of mlc)"]
    assert "ray" in imports_of(pkg / "train" / "b.py", set(graph), pkg, external=True)
    (pkg / "io" / "a.py").write_text("import os\n")
    graph = import_graph(pkg)
    assert find_cycle(graph) is None and wrong_way(graph) == []


def test_every_config_field_carries_its_help():
    """The flags' help is read from the config classes (mlc.cli); a field without it would have no --help line."""
    import dataclasses

    from mlc.config import ScaleConfig, SweepConfig, TrainConfig
    for cls in (TrainConfig, ScaleConfig, SweepConfig):
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help text"


# The floors a newcomer reads first, from jobs/train.py to the optimizer step: no function there may be longer
# than a screen.
SHORT_FUNCTIONS = ("data", "model", "train")
MAX_FUNCTION_LINES = 60


def long_functions(root: Path = ROOT, subpackages=SHORT_FUNCTIONS, limit: int = MAX_FUNCTION_LINES) -> dict:
    """``{"path:function": lines}`` for every function (or method) over ``limit`` lines, docstring included."""
    out = {}
    for sub in subpackages:
        for f in _files(root / sub):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > limit:
                        out[f"{f.relative_to(root)}:{node.name}"] = n
    return out


def test_no_function_over_60_lines_in_data_model_train():
    assert long_functions() == {}


def test_the_loop_and_the_engine_probe_nothing_they_are_given():
    """No getattr/hasattr in the training loop, its set-up and the step: what they need is a named field of the
    run, the group (a Protocol) or the batch."""
    for name in ("engine", "loop", "setup"):
        tree = ast.parse((ROOT / "train" / f"{name}.py").read_text())
        probes = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("getattr", "hasattr")]
        assert probes == [], f"mlc/train/{name}.py probes with {probes}"


def test_module_names_say_what_they_hold():
    names = {f.stem for f in _files(ROOT)}
    assert not names & {"feed", "replay", "placement", "runs", "gpu_decode", "local", "inference", "compare"}
