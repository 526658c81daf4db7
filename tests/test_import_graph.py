"""The package's import structure: no import circles between modules or between subpackages, and every import
between subpackages runs down the declared layer order (no upward arrows).

Parsed with `ast` (nothing is imported or run), so lazy imports inside functions count like top-level ones.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "rfpo_megatron"

# The declared layers, bottom first: a unit (a subpackage or a top-level module of rfpo_megatron) may import
# only units of LOWER layers. Units of one layer are independent of each other.
LAYERS = [
    ["config", "aio"],
    ["algos", "kernels", "data", "logging", "convert", "rewards", "rollout"],
    ["actor", "fix", "plan", "bench_baselines"],
    ["offline", "train"],
    ["trainer", "evaluate"],
    ["bench_step"],
    ["cli"],
]


def package_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file path of every .py under rfpo_megatron/ (packages as `pkg.sub`)."""
    out = {}
    for d, dirs, files in os.walk(os.path.join(root, PKG)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), root)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(d, f)
    return out


def module_imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in the file). `from X import Y` names module X.Y when
    that is a module, else X; relative imports are resolved."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # `import a.b.c` of a package module: its longest known prefix
                    t = t.rpartition(".")[0]
                if t and t.startswith(PKG) and t != mod:
                    edges[mod].add(t)
    return edges


def unit_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if color.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(edges):
        if color.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def unit_edges(edges: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """unit -> unit -> the module imports that tie them ("a -> b")."""
    out: dict[str, dict[str, list[str]]] = {}
    for a, bs in edges.items():
        for b in bs:
            ua, ub = unit_of(a), unit_of(b)
            if ua != ub and ub != PKG and ua != PKG:
                out.setdefault(ua, {}).setdefault(ub, []).append(f"{a} -> {b}")
    return out


@pytest.fixture(scope="module")
def graph():
    mods = package_modules()
    return mods, module_imports(mods)


def test_the_parser_sees_the_package(graph):
    mods, edges = graph
    assert f"{PKG}.train.batch" in mods and f"{PKG}.trainer" in mods
    assert f"{PKG}.actor.batch" in edges[f"{PKG}.train.batch"]  # a top-level import
    assert f"{PKG}.algos.rfpo" in edges[f"{PKG}.train.batch"]  # a lazy one, inside a function


def test_no_module_import_circle(graph):
    _, edges = graph
    cycle = find_cycle(edges)
    assert cycle is None, "import circle between modules: " + " -> ".join(cycle)


def test_no_subpackage_import_circle(graph):
    _, edges = graph
    ue = unit_edges(edges)
    cycle = find_cycle({u: set(v) for u, v in ue.items()})
    assert cycle is None, "import circle between subpackages: " + " -> ".join(cycle) + "\n" + "\n".join(
        t for a, b in zip(cycle, cycle[1:]) for t in ue[a][b])


def test_every_unit_has_a_layer(graph):
    mods, _ = graph
    layered = {u for layer in LAYERS for u in layer}
    units = {unit_of(m) for m in mods} - {PKG}
    assert units == layered, f"units without a layer: {sorted(units - layered)}; layers naming no unit: {sorted(layered - units)}"


def test_imports_run_down_the_declared_layers(graph):
    _, edges = graph
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    bad = [t for a, bs in unit_edges(edges).items() for b, ties in bs.items() if level[b] >= level[a] for t in ties]
    assert not bad, "imports that do not run down the layer order (LAYERS in this file):\n" + "\n".join(sorted(bad))


def test_a_reintroduced_circle_is_caught():
    """The checks themselves: a synthetic back edge makes both a module and a subpackage circle."""
    mods = package_modules()
    edges = module_imports(mods)
    edges[f"{PKG}.convert.arch"].add(f"{PKG}.actor.model")  # convert -> actor, while actor -> convert
    assert find_cycle(edges) is not None
    assert find_cycle({u: set(v) for u, v in unit_edges(edges).items()}) is not None
