"""How flagagg's modules depend on each other: no import cycles, and the layers kept apart.

The graph is read from the source with :mod:`ast` (nothing is imported), one
node per module of the installed package, one edge per import of another
flagagg module. An edge is *deferred* when the import sits inside a function
(it runs when the function does) and *module-level* otherwise.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import flagagg

ROOT = pathlib.Path(flagagg.__file__).parent
LAYERS = ("flagagg.sim", "flagagg.distributed", "flagagg.training")


def _modules(root=ROOT):
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _imports(tree):
    """Yield (import node, deferred) for every import, deferred when inside a function."""
    stack = [(tree, False)]
    while stack:
        node, deferred = stack.pop()
        for child in ast.iter_child_nodes(node):
            inside = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, inside
            stack.append((child, inside))


def import_graph(root=ROOT, *, deferred=True):
    """Module -> the flagagg modules it imports (with ``deferred``, also inside functions)."""
    mods = _modules(root)
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        deps = set()
        for node, late in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if late and not deferred:
                continue
            if isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from pkg import name` imports pkg.name when that is a module
                deps.update(t for t in [target, *(f"{target}.{a.name}" for a in node.names)]
                            if t in mods)
            else:
                deps.update(a.name for a in node.names if a.name in mods)
        # a module importing its own parent package is the ordinary relative import
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _layer(mod):
    return next((layer for layer in LAYERS if mod == layer or mod.startswith(layer + ".")), None)


def crossings(graph, source, target):
    """Edges from modules of layer ``source`` to modules of layer ``target``."""
    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if _layer(a) == source and _layer(b) == target)


def test_no_import_cycles():
    # deferred imports count too: they hide a cycle from the interpreter, not
    # from the design (and a cycle of module-level imports is one of these)
    assert cycles(import_graph()) == []
    assert cycles(import_graph(deferred=False)) == []


def test_the_graph_sees_module_level_and_deferred_imports():
    # a graph that lost its edges would pass every other test here
    eager, every = import_graph(deferred=False), import_graph()
    assert "flagagg.training._step" in eager["flagagg.sim._cluster"]
    assert "flagagg.training._step" in eager["flagagg.distributed._server"]
    # _config checks rules with build_rule from inside a function
    assert "flagagg.training._step" not in eager["flagagg.training._config"]
    assert "flagagg.training._step" in every["flagagg.training._config"]
    assert {"flagagg.rules", "flagagg._config"} <= every["flagagg"]


def test_cycle_finder_finds_planted_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert cycles(graph) == [("a", "b", "c"), ("d", "e")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_sim_and_distributed_do_not_import_each_other():
    graph = import_graph()
    assert crossings(graph, "flagagg.distributed", "flagagg.sim") == []
    assert crossings(graph, "flagagg.sim", "flagagg.distributed") == []


def test_the_training_core_imports_neither_trainer():
    graph = import_graph()
    assert crossings(graph, "flagagg.training", "flagagg.sim") == []
    assert crossings(graph, "flagagg.training", "flagagg.distributed") == []
    # both trainers build on it
    assert crossings(graph, "flagagg.sim", "flagagg.training")
    assert crossings(graph, "flagagg.distributed", "flagagg.training")


def test_crossings_are_found_in_a_tree_that_has_them(tmp_path):
    pkg = tmp_path / "flagagg"
    for folder in ("sim", "distributed", "training"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "sim" / "_a.py").write_text("def f():\n    from ..distributed import _b\n")
    (pkg / "distributed" / "_b.py").write_text("from ..sim._a import f\n")
    graph = import_graph(pkg)
    # `from ..distributed import _b` runs the package and then the module
    assert crossings(graph, "flagagg.sim", "flagagg.distributed") == [
        ("flagagg.sim._a", "flagagg.distributed"), ("flagagg.sim._a", "flagagg.distributed._b")]
    assert cycles(graph) == [("flagagg.distributed._b", "flagagg.sim._a")]
    assert cycles(import_graph(pkg, deferred=False)) == []


def test_reading_a_config_and_importing_distributed_load_no_simulator():
    pytest.importorskip("torch")
    code = ("import sys\n"
            "from flagagg.training._config import load_config\n"
            "load_config('demo')\n"
            "import flagagg.distributed\n"
            "print(sorted(m for m in sys.modules if m.startswith('flagagg.sim')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
