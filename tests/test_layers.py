"""The layers of bitdance_rt, bottom to top, and the one direction of their imports (docs/architecture.md).

A module may import modules of its own layer and of the layers below it, never of a layer above.
The import graph comes from the AST of every module under bitdance_rt/ (nothing is imported): each
`import` / `from ... import` counts, at module level or inside a function (a lazy import is still a
dependency), with relative imports resolved. `from . import x` where x is a submodule is an edge to
the submodule, otherwise to the package (its __init__). Not seen: importlib with a computed name
(export/__init__.py's lazy names, which stay inside export/).

tests/test_imports.py checks the coarser rules (no cycles, the lowest modules never import the
upper packages, serve/triton are shells only the CLI imports); this file checks the full order.

Run as a script (python tests/test_layers.py) to print each layer with its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "bitdance_rt"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
ROOT_MODULE = "__init__"  # the name this file gives the package's own __init__ (bitdance_rt)

# The layers, bottom to top: (name, module prefixes relative to the package). A module belongs to the
# layer of its LONGEST matching prefix ("precision.policy" beats "precision"); every module must
# belong to one. Keep docs/architecture.md in step with this list.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # stdlib-only helpers every layer may use: errors, cache paths, hashing and atomic writes
    ("foundation", ("errors", "paths", "fileio", "_version")),
    # plain data every layer agrees on: model configs, the stage contract and registry, the precision
    # vocabulary (precision/policy.py: PRECISIONS, what stays float32; it imports only stages and
    # errors, and precision/__init__ imports only it), the shared manifest-file reader
    ("contracts", ("config", "t2i_config", "manifest_file", "stages", "precision.policy")),
    # the PyTorch reference: the models, the sampler math, the quality classifier / metrics
    ("models", ("models", "sampling", "quality")),
    # files in and out: checkpoint reading (+ conversion), building a model from one, image files
    ("weights", ("checkpoint", "loading", "images")),
    # torch -> per-stage ONNX graphs (classic and streamed), the manifest and its one reader
    ("export", ("export",)),
    # text-to-image checkpoint layouts and prompts; hands export a weightless model + WeightSource
    ("t2i", ("t2i",)),
    # TensorRT engines from an export: profiles, lint, build options, the engine cache
    ("engines", ("engines",)),
    # running stages: the backend core, torch / ONNX Runtime / TensorRT backends, loop, scheduler
    ("runtime", ("runtime",)),
    # INT8 calibration sets, captured by running a backend (runtime) over real trajectories
    ("calibration", ("calibration",)),
    # FP16 / INT8 variants of an export, derived from its graphs (+ calibration), and their reports
    ("precision", ("precision",)),
    # model source + options -> the right export, precision variant and backend
    ("backends", ("backends",)),
    # what stands on a backend: the Pipeline, the memory/machine planner, `check`
    ("pipeline", ("pipeline", "plan", "check")),
    # the public API: `from bitdance_rt import Pipeline`
    ("api", (ROOT_MODULE,)),
    # network entry points over the Pipeline
    ("entry points", ("serve", "triton")),
    # the command line; `python -m bitdance_rt` and `python -m bitdance_rt.engines` run it
    ("cli", ("cli", "__main__", "engines.__main__")),
]

# Known upward imports, each "importer -> imported" (names relative to the package) with why it is
# there and what should change. Empty: the code follows LAYERS. An entry that no longer occurs fails
# test_allowed_violations_still_occur, so this set only shrinks.
ALLOWED: set[str] = set()


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
        if (candidate := ".".join(parts[:i])) in modules:
            return candidate
    return None


def imports_of(module: str, source: str, is_package: bool, modules) -> dict[str, int]:
    """Modules of the package that `module` (its source text) imports -> the first line that does."""
    found: dict[str, int] = {}

    def add(target: str | None, line: int):
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(source)):
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
    return {m: imports_of(m, p.read_text(), p.name == "__init__.py", modules) for m, p in modules.items()}


def short(module: str) -> str:
    """bitdance_rt.x.y -> x.y; the package itself -> ROOT_MODULE."""
    return ROOT_MODULE if module == PACKAGE else module.removeprefix(PACKAGE + ".")


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the layer whose longest prefix matches the module (None: in no layer)."""
    name, best, index = short(module), -1, None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    return index


def violations(graph, layers=LAYERS) -> dict[str, int]:
    """'importer -> imported' -> line, for every import of a module of a higher layer."""
    out = {}
    for m, targets in graph.items():
        mine = layer_of(m, layers)
        for t, line in targets.items():
            theirs = layer_of(t, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out[f"{short(m)} -> {short(t)}"] = line
    return out


def _describe(found: dict[str, int], layers=LAYERS) -> list[str]:
    files = module_files()
    out = []
    for edge, line in sorted(found.items()):
        importer, imported = edge.split(" -> ")
        module = PACKAGE if importer == ROOT_MODULE else f"{PACKAGE}.{importer}"
        where = files[module].relative_to(ROOT.parent) if module in files else importer
        below, above = (layers[layer_of(m, layers)][0] for m in (module, f"{PACKAGE}.{imported}"))
        out.append(f"{where}:{line}: {importer} ({below}) imports {imported} ({above})")
    return out


def test_graph_sees_the_package():
    graph = import_graph()
    assert "bitdance_rt.cli" in graph and "bitdance_rt.runtime.core" in graph
    assert "bitdance_rt.stages" in graph["bitdance_rt.runtime.core"]  # `from .. import stages as st`
    assert "bitdance_rt.engines.build" in graph["bitdance_rt.runtime.trt_backend"]  # inside a function


def test_every_module_has_a_layer_and_every_prefix_a_module():
    """A new module (or package) is placed in LAYERS on purpose; a prefix that names nothing is a typo."""
    graph = import_graph()
    unplaced = sorted(short(m) for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"
    names = [short(m) for m in graph]
    dead = [p for _, prefixes in LAYERS for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    assert not dead, f"LAYERS prefixes that match no module: {dead}"
    flat = [p for _, prefixes in LAYERS for p in prefixes]
    assert len(flat) == len(set(flat)), "a prefix is listed twice in LAYERS"


def test_no_module_imports_a_higher_layer():
    found = violations(import_graph())
    new = {edge: line for edge, line in found.items() if edge not in ALLOWED}
    assert not new, (
        "imports of a higher layer (lower layers never import higher ones; see "
        "docs/architecture.md):\n  " + "\n  ".join(_describe(new))
    )


def test_allowed_violations_still_occur():
    """ALLOWED only shrinks: an exception that was fixed is taken out of it."""
    stale = sorted(ALLOWED - set(violations(import_graph())))
    assert not stale, f"ALLOWED lists imports that no longer happen (remove them): {stale}"


def test_the_checker_catches_an_upward_import(tmp_path):
    """The checker itself, on a synthetic package: a function-level relative import of a higher layer,
    a top-level absolute one and a `from . import submodule` are found; downward and same-layer
    imports are not."""
    pkg = tmp_path / PACKAGE
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "base.py").write_text("import os\n")
    (pkg / "low" / "lazy.py").write_text(
        "from . import base\n"  # same layer: fine
        "def f():\n"
        "    from ..high.top import g\n"  # line 3: upward, inside a function
        "    return g\n"
    )
    (pkg / "low" / "eager.py").write_text(f"import {PACKAGE}.high.top\n")  # line 1: upward, absolute
    (pkg / "high").mkdir()
    (pkg / "high" / "__init__.py").write_text("from . import top\n")  # same layer
    (pkg / "high" / "top.py").write_text("from ..low.base import os\ndef g():\n    pass\n")  # downward
    (pkg / "mid.py").write_text("from .high import top\n")  # line 1: upward, the submodule named

    layers = [("low", ("low",)), ("mid", ("mid",)), ("high", ("high", ROOT_MODULE))]
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.low.lazy"] == {f"{PACKAGE}.low.base": 1, f"{PACKAGE}.high.top": 3}
    assert violations(graph, layers) == {"low.lazy -> high.top": 3, "low.eager -> high.top": 1, "mid -> high.top": 1}
    # the same source text, checked directly: an upward import is caught wherever it sits
    modules = {f"{PACKAGE}.low.x", f"{PACKAGE}.high", f"{PACKAGE}.high.top"}
    src = "import json\n\nclass C:\n    def m(self):\n        if True:\n            import bitdance_rt.high\n"
    assert violations({f"{PACKAGE}.low.x": imports_of(f"{PACKAGE}.low.x", src, False, modules)}, layers) == {
        "low.x -> high": 6
    }
    # and the longest prefix decides the layer: low.x placed above high makes the same import downward
    assert violations({f"{PACKAGE}.low.x": {f"{PACKAGE}.high": 6}}, layers + [("top", ("low.x",))]) == {}


if __name__ == "__main__":
    g = import_graph()
    for i, (name, prefixes) in enumerate(LAYERS):
        members = sorted(short(m) for m in g if layer_of(m) == i)
        print(f"{i:2d} {name:12s} {', '.join(members)}")
    for line in _describe(violations(g)):
        print(line)
