"""Dependencies point one way: every ``ptd`` import, function-local ones included, read with ast.

The layers are README.md's ("Library": cli -> pipeline -> method packages -> train ->
models/data -> leaves), from the top down; a module may import its own package, any package
of a lower layer, and another package of its own layer only if the package graph stays acyclic.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ptd"

LAYERS = [
    {"__main__"},
    {"cli"},
    {"pipeline", "sweep", "preflight", "evaluate"},
    {"students", "pruning", "distill", "report", "measure", "export"},
    {"train"},
    {"models", "data"},
    {"config", "registry", "errors", "io", "paths", "seeding", "machine", "jobs"},  # core leaves (io: run-directory readers)
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ptd"


def imports(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> ['file:line', ...] for every import of another ptd package."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        src = package_of(".".join(parts))
        for node in ast.walk(ast.parse(f.read_text(), str(f))):  # walk: function bodies too
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
            else:
                continue
            for t in targets:
                if t == "ptd" or t.startswith("ptd."):
                    dst = package_of(t)
                    if dst != src and dst != "ptd":
                        edges[(src, dst)].append(f"{f.relative_to(root.parent)}:{node.lineno}")
    return edges


def test_every_package_has_a_layer():
    pkgs = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    pkgs.discard("__init__")
    assert pkgs - set(RANK) == set(), "add the new package to LAYERS (and to README.md's package table)"


def test_nothing_imports_upwards():
    up = {k: v for k, v in imports().items() if RANK[k[1]] < RANK[k[0]]}
    assert not up, "\n".join(f"{a} -> {b}: {', '.join(w)}" for (a, b), w in sorted(up.items()))


def test_package_graph_is_acyclic():
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in imports():
        graph[a].add(b)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                where = imports()[(n, m)]
                raise AssertionError(f"import cycle {' -> '.join(cycle)} (closing edge at {', '.join(where)})")
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


# ptd.pipeline's modules, in the order they may import each other (each only those before it; its
# __init__ re-exports them all): the same rule inside the package, so it cannot grow a cycle either.
PIPELINE = ["lineage", "rundir", "reuse", "context", "plugins", "stages", "parallel", "run"]


def test_pipeline_modules_import_only_earlier_ones():
    pkg = ROOT / "pipeline"
    assert {f.stem for f in pkg.glob("*.py")} - {"__init__"} == set(PIPELINE), "add the new module to PIPELINE, in its place"
    wrong = []
    for f in sorted(pkg.glob("*.py")):
        if f.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.level:
                targets = [f"ptd.pipeline.{node.module}" if node.module else "ptd.pipeline"]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                if parts[:2] != ["ptd", "pipeline"]:
                    continue
                # The package itself (its __init__ imports every module) or a later module: a cycle.
                if len(parts) < 3 or PIPELINE.index(parts[2]) >= PIPELINE.index(f.stem):
                    wrong.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} imports {t}")
    assert not wrong, "\n".join(wrong)


def test_config_imports_no_plugin():
    # The error base class is the only ptd module config may use: it is a leaf that imports nothing.
    assert not [k for k in imports() if k[0] == "config" and k[1] != "errors"]


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "ptd"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("def f():\n    from ptd.students.surgery import apply_widths\n")
    (pkg / "models" / "vgg.py").write_text("from ..train import loop\nfrom . import other\n")
    assert imports(pkg) == {("models", "students"): ["ptd/models/__init__.py:2"], ("models", "train"): ["ptd/models/vgg.py:1"]}
