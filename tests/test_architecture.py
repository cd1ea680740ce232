"""The package's floor plan, read statically from its imports (ast; nothing is imported).

Five rules (issue 18):

- no module over MAX_LINES lines (one idea each: a longer one is split along its seams);
- no import cycle between gradlake modules;
- Ray is imported only in ``gradlake.distributed`` and ``gradlake.cli`` (the CLI's
  ``--address`` handling);
- ``gradlake.reduce`` and ``gradlake.grads`` hold algebra only: no dataset, checkpoint,
  store, config, training or Ray import;
- ``gradlake.stages`` (Ray-free stage modules) never import what runs them
  (``gradlake.distributed``, ``gradlake.pipeline``, ``gradlake.cli``).

Every import counts, at module level or inside a function, for the four import rules. A
function-level import still couples the two modules (and still runs, later), so deferring an
import is no way out of a cycle: the cycle check counts them too. Two exceptions:
``TYPE_CHECKING`` blocks never run, so they are skipped; and the root package's functions
(``gradlake.open_store``) are the public facade, lazy re-exports of the package's own modules,
which themselves read ``gradlake.__version__``: only the root's module-level imports count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gradlake"

# What breaks a rule today, each with the work that removes it: module -> the modules it may
# import regardless (ANY: every rule is waived for it). Delete the entry with that work;
# test_allowlist_is_still_needed fails on an entry that no longer breaks anything.
ANY = "*"
ALLOWED: dict[str, object] = {}
ROOT = "gradlake"

MAX_LINES = 420
RAY_HOMES = ("gradlake.distributed", "gradlake.cli")
ALGEBRA = ("gradlake.reduce", "gradlake.grads")
NOT_IN_ALGEBRA = ("ray", "gradlake.data", "gradlake.models.checkpoint", "gradlake.store",
                  "gradlake.config", "gradlake.train", "gradlake.distributed", "gradlake.pipeline")
STAGES = ("gradlake.stages",)
RUNNERS = ("gradlake.distributed", "gradlake.pipeline", "gradlake.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules=frozenset(), functions=True) -> set[str]:
    """Every module named by an import statement in ``tree`` (outside TYPE_CHECKING; inside
    functions too unless ``functions`` is false).

    ``from P import N`` names the module ``P.N`` when that is one of ``modules``, else ``P``.
    """
    found: set[str] = set()

    def visit(node: ast.AST):
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if not functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                found.add(sub if sub in modules else prefix)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """gradlake module -> the modules it imports (gradlake ones resolved to real modules; others as named)."""
    files = {_module_name(p): p for p in (SRC / PACKAGE).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        named = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", set(files),
                         functions=name != ROOT)
        graph[name] = {n for n in named if n in files or not n.startswith(PACKAGE)}
    return graph


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    Importing ``gradlake.data.format`` also runs ``gradlake/data/__init__.py``; that implicit
    step is not an edge (a package re-exporting its submodules is no cycle). An explicit
    ``from gradlake.data import Dataset`` is an edge to ``gradlake.data``.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                strongconnect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _allowed(module: str, imported: str) -> bool:
    allowed = ALLOWED.get(module, ())
    return allowed == ANY or imported in allowed


def _edges(graph, module_filter, import_filter):
    return sorted(f"{m} imports {i}" for m, names in graph.items() if module_filter(m)
                  for i in names if import_filter(i) and not _allowed(m, i))


def _rules_graph(graph):
    """``graph`` without the allowlisted edges."""
    return {m: {i for i in names if not _allowed(m, i)} for m, names in graph.items()}


def _broken(graph) -> list[str]:
    """Every rule broken in ``graph``, one line each."""
    return ([" <-> ".join(c) for c in cycles(graph)]
            + [f"{m} imports {i}" for m, names in graph.items() if not _within(m, RAY_HOMES)
               for i in names if _within(i, ("ray",))]
            + [f"{m} imports {i}" for m, names in graph.items() if _within(m, ALGEBRA)
               for i in names if _within(i, NOT_IN_ALGEBRA)]
            + [f"{m} imports {i}" for m, names in graph.items() if _within(m, STAGES)
               for i in names if _within(i, RUNNERS)])


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_module_is_over_max_lines():
    long = sorted((n, str(p.relative_to(SRC))) for p in (SRC / PACKAGE).rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split each into modules of one idea):\n" + "\n".join(
        f"{path}: {n} lines" for n, path in reversed(long))


def test_no_import_cycles(graph):
    found = cycles(_rules_graph(graph))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_ray_only_in_distributed_and_cli(graph):
    bad = _edges(graph, lambda m: not _within(m, RAY_HOMES), lambda i: _within(i, ("ray",)))
    assert not bad, "Ray imported outside gradlake.distributed and gradlake.cli:\n" + "\n".join(bad)


def test_reduce_and_grads_hold_algebra_only(graph):
    bad = _edges(graph, lambda m: _within(m, ALGEBRA), lambda i: _within(i, NOT_IN_ALGEBRA))
    assert not bad, "reduce/ and grads/ import I/O, settings or Ray:\n" + "\n".join(bad)


def test_stages_never_import_what_runs_them(graph):
    bad = _edges(graph, lambda m: _within(m, STAGES), lambda i: _within(i, RUNNERS))
    assert not bad, "gradlake.stages imports its runners (an upward arrow):\n" + "\n".join(bad)


def test_allowlist_is_still_needed(graph):
    """Each allowlist entry waives something that would otherwise break a rule."""
    for module, allowed in ALLOWED.items():
        assert module in graph, f"{module}: allowlisted but gone; delete its ALLOWED entry"
        without = dict(ALLOWED)
        del without[module]
        strict = {m: {i for i in names if not (m in without and (without[m] == ANY or i in without[m]))}
                  for m, names in graph.items()}
        assert len(_broken(strict)) > len(_broken(_rules_graph(graph))), \
            f"{module} no longer breaks a rule; delete its ALLOWED entry"


# The checker itself, on small made-up graphs and sources.

def test_cycles_finds_a_cycle_and_ignores_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_counts_function_level_and_relative_but_not_type_checking():
    source = ("from typing import TYPE_CHECKING\n"
              "import ray\n"
              "if TYPE_CHECKING:\n    from gradlake.store import GradientStore\n"
              "def f():\n    from gradlake.data import format\n    from .metric import whitener\n")
    found = _imports(ast.parse(source), "gradlake.reduce.work", False, {"gradlake.data.format"})
    assert {"ray", "gradlake.data.format", "gradlake.reduce.metric"} <= found
    assert "gradlake.store" not in found
