"""The import graph of bitdance_rt: no cycles, and the lower layers never import the upper ones.

The graph is built from the AST of every module (nothing is imported): every `import` and
`from ... import` anywhere in a file counts, at module level or inside a function, because a
lazy import inside a function is exactly how a cycle hides. Relative imports are resolved;
`from . import x` where x is a submodule is an edge to the submodule, otherwise to the package.
Importing a submodule is not counted as importing its parent packages' __init__ (Python runs
them first, but they are already initialising whenever a module inside them runs).
Not seen: importlib.import_module with a computed name (export/__init__.py's PEP 562 lazy names).

Run as a script (python tests/test_imports.py) to print every cycle.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = "bitdance_rt"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The lower layers (module, or package prefix) and what they must never import.
LOWER = ("models", "sampling", "config", "stages", "errors", "fileio", "paths", "t2i_config")
UPPER = (
    "cli",
    "check",
    "runtime",
    "t2i",
    "export",
    "engines",
    "precision",
    "calibration",
    "serve",
    "triton",
    "pipeline",
)
ENTRY_POINTS = ("serve", "triton")  # thin shells over the Pipeline: only the CLI may import them


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _known(name: str, modules) -> str | None:
    """The longest prefix of `name` that is a module of the package (import a.b.c runs a.b.c)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules) -> dict[str, int]:
    """Modules of the package that `module` imports -> the first line that does."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, int] = {}

    def add(target: str | None, line: int):
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in modules else _known(target, modules), node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    modules = module_files(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def _shortest_path(graph, start: str, goal: str, allowed: set[str]) -> list[str] | None:
    prev = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = []
            while node is not None:
                path.append(node)
                node = prev[node]
            return path[::-1]
        for nxt in sorted(graph.get(node, ())):
            if nxt in allowed and nxt not in prev:
                prev[nxt] = node
                queue.append(nxt)
    return None


def _components(graph, nodes: set[str]) -> list[set[str]]:
    """Strongly connected components of the graph restricted to `nodes` (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(n for n in graph[root] if n in nodes)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(n for n in graph[child] if n in nodes))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.add(member)
                        if member == node:
                            break
                    out.append(comp)
    return out


def cycles(graph, nodes: set[str] | None = None) -> list[list[str]]:
    """Cycles a -> b -> ... -> a within `nodes` (default: all modules): for every import edge inside
    a strongly connected component, the shortest way back, so every edge on a cycle is shown once
    or more. Each cycle starts at its smallest name; duplicates are dropped."""
    nodes = set(graph) if nodes is None else set(nodes)
    seen, out = set(), []
    for comp in _components(graph, nodes):
        if len(comp) < 2:
            continue
        for a in sorted(comp):
            for b in sorted(graph[a]):
                if b not in comp:
                    continue
                back = _shortest_path(graph, b, a, comp)
                ring = [a] + back[:-1]
                i = ring.index(min(ring))
                ring = ring[i:] + ring[:i]
                if tuple(ring) not in seen:
                    seen.add(tuple(ring))
                    out.append(ring + [ring[0]])
    return sorted(out)


def _show(cycle: list[str]) -> str:
    return " -> ".join(m.removeprefix(PACKAGE + ".") if m != PACKAGE else m for m in cycle)


def _layer(module: str, names) -> str | None:
    rest = module.removeprefix(PACKAGE + ".")
    for name in names:
        if rest == name or rest.startswith(name + "."):
            return name
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert "bitdance_rt.cli" in graph and "bitdance_rt.models.bitdance" in graph
    assert "bitdance_rt.config" in graph["bitdance_rt.models.bitdance"]  # a relative import, resolved


def test_graph_finds_lazy_cycles(tmp_path):
    """The tool itself: a cycle closed by a function-level `from . import x` is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..a import f\nfrom .. import c\n")
    (pkg / "c.py").write_text("import bitdance_rt.a\n")
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.sub.b"] == {f"{PACKAGE}.a": 1, f"{PACKAGE}.c": 2}
    a, b, c = (f"{PACKAGE}.{m}" for m in ("a", "sub.b", "c"))
    assert cycles(graph) == [[a, b, a], [a, b, c, a]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph, set(graph))
    assert not found, "import cycles:\n  " + "\n  ".join(_show(c) for c in found)


def test_lower_layers_never_import_upper_ones():
    graph = import_graph()
    files = module_files()
    bad = [
        f"{files[m].relative_to(ROOT.parent)}:{line}: {m} imports {t}"
        for m, targets in sorted(graph.items())
        if _layer(m, LOWER)
        for t, line in sorted(targets.items(), key=lambda kv: kv[1])
        if _layer(t, UPPER)
    ]
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_entry_points_are_shells_nothing_stands_on():
    """serve (HTTP) and triton (the Triton model) sit on top: nothing but the CLI imports them, and
    neither imports the other or the CLI."""
    graph = import_graph()
    files = module_files()
    bad = []
    for m, targets in sorted(graph.items()):
        mine = _layer(m, ENTRY_POINTS)
        for t, line in sorted(targets.items(), key=lambda kv: kv[1]):
            theirs = _layer(t, ENTRY_POINTS)
            if (theirs and theirs != mine and _layer(m, ("cli",)) is None) or (mine and _layer(t, ("cli",))):
                bad.append(f"{files[m].relative_to(ROOT.parent)}:{line}: {m} imports {t}")
    assert not bad, "imports of or from the entry points:\n  " + "\n  ".join(bad)


def test_paths_is_stdlib_only():
    """bitdance_rt.paths (every cache path) is imported by the torch-free TensorRT build path and may be
    imported by fileio: it imports nothing of the package and nothing outside the standard library."""
    import sys

    tree = ast.parse((ROOT / "paths.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    names |= {"." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    bad = sorted(n for n in names if n.split(".")[0] not in sys.stdlib_module_names)
    assert not bad, f"bitdance_rt/paths.py imports {', '.join(bad)}"


def test_long_files_say_why():
    """House rule: a tracked .py file over 400 lines (as `wc -l` counts) says why it stays one file,
    in its module docstring: "(Over 400 lines: <the reason>.)"."""
    import subprocess

    import pytest

    repo = ROOT.parent
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=repo, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    bad = []
    for name in listed.stdout.splitlines():
        path = repo / name
        if not path.is_file():  # deleted, not yet committed
            continue
        text = path.read_text()
        lines = text.count("\n")
        if lines > 400 and "Over 400 lines" not in (ast.get_docstring(ast.parse(text, filename=name)) or ""):
            bad.append(f"{name}: {lines} lines")
    assert not bad, "over 400 lines, with no '(Over 400 lines: ...)' in the module docstring:\n  " + "\n  ".join(bad)


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(_show(c))
