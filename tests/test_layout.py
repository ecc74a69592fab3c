"""The package's shape: imports run one way (lazy ones too) and names are unique (public names,
and module names within the package and against the standard library).

Read from the source with ``ast`` (nothing is imported), so an import inside a function counts
as much as one at the top of a module.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "transferlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that ``path`` imports anywhere (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            # "from pkg import mod" names a module; "from mod import name" names a value
            out |= {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            out.add(target)
    return {m for m in out if m in known and m != name and m != "transferlab"}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    # a lazy import inside a function is an arrow too: `from . import plots` in plot_probe,
    # `from ..analysis.neighbors import store_nearest` in FeatureStore.nearest
    assert "transferlab.analysis.plots" in graph["transferlab.analysis.probe_report"]
    assert "transferlab.analysis.neighbors" in graph["transferlab.store.reader"]
    assert "transferlab.store.format" in graph["transferlab.store.writer"]


def test_no_import_cycles_lazy_imports_included() -> None:
    assert cycles(import_graph()) == []


# Entry points every command module has by design; any other public top-level name has one home.
SHARED_NAMES = {"main", "command", "build_parser"}


def test_every_public_name_has_one_home() -> None:
    homes: dict[str, list[str]] = {}
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) \
                    and not node.name.startswith("_") and node.name not in SHARED_NAMES:
                homes.setdefault(node.name, []).append(name)
    assert {n: m for n, m in homes.items() if len(m) > 1} == {}


# `python -m transferlab.NAME` needs a module of that name: these only run the main of the
# command in transferlab/commands/, so they may share its name (`inspect` the stdlib's too).
ENTRY_SHIMS = {f"transferlab.{name}" for name in
               ("predict", "inspect", "probe", "search", "cluster", "export", "index", "maps")}


def basename(module: str) -> str:
    return module.rpartition(".")[2]


def test_no_two_modules_share_a_name() -> None:
    homes: dict[str, list[str]] = {}
    for name in modules():
        if name not in ENTRY_SHIMS and basename(name) != "__main__":
            homes.setdefault(basename(name), []).append(name)
    assert {b: m for b, m in homes.items() if len(m) > 1} == {}


def test_no_module_is_named_like_a_standard_library_module() -> None:
    clashes = [n for n in modules()
               if n not in ENTRY_SHIMS and basename(n) in sys.stdlib_module_names]
    assert clashes == []


def test_entry_shims_only_run_a_commands_main() -> None:
    """What the name checks let through stays a docstring, one import and the __main__ guard."""
    mods = modules()
    shims = ENTRY_SHIMS | {n for n in mods if basename(n) == "__main__"}
    for name in sorted(shims):
        body = ast.parse(mods[name].read_text()).body
        assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), name
        imp, guard = body[1:] if len(body) == 3 else (None, None)
        assert isinstance(imp, ast.ImportFrom) and [a.name for a in imp.names] == ["main"], name
        package = name.split(".")[:-1]
        target = ".".join([*package[:len(package) - imp.level + 1], imp.module or ""])
        assert target.startswith("transferlab.commands"), name
        assert isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test), name
        assert ast.unparse(guard.body[0]) == "raise SystemExit(main())", name
