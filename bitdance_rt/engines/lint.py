"""Will TensorRT's ONNX parser take these graphs? A check that needs no GPU and no TensorRT.
(Over 400 lines: it is one check, lint_graph, whose kinds of finding share its graph walk and the
parser's tables.)

A graph that TensorRT cannot import fails only at engine-build time, on the GPU machine, often
deep into a long export-and-build job. This lint finds the causes we can see in the ONNX file
itself (`lint_graph` lists them), against the parser's tables for each TensorRT version (the
lists in trt_ops/, taken from onnx-tensorrt's docs/operators.md, sources in their headers).

Passing the lint does not prove that an engine builds (the parser also checks shapes and
attribute values); failing it means the build will fail or compute something else.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitDanceError

TARGETS = ("10.3", "11")
_DATA = Path(__file__).with_name("trt_ops")
_DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto element types (onnx.TensorProto.*), by number so the tables read without onnx.
_NAMES = {
    1: "FLOAT",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "STRING",
    9: "BOOL",
    10: "FLOAT16",
    11: "DOUBLE",
    12: "UINT32",
    13: "UINT64",
    14: "COMPLEX64",
    15: "COMPLEX128",
    16: "BFLOAT16",
    17: "FLOAT8E4M3FN",
    18: "FLOAT8E4M3FNUZ",
    19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ",
    21: "UINT4",
    22: "INT4",
    23: "FLOAT4E2M1",
}
_NATIVE = {"FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "BOOL"}
_QUANTIZED = {"10.3": {"INT8", "INT4", "FLOAT8E4M3FN"}, "11": {"INT8", "INT4", "FLOAT8E4M3FN", "FLOAT4E2M1"}}

# Inputs that TensorRT needs as build-time constants (per the operators.md restrictions).
_CONST_INPUTS = {
    op: 1
    for op in (
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "ReduceSumSquare",
        "Squeeze",
        "Unsqueeze",
    )
}
# Inputs that TensorRT computes on as shape tensors (their values shape other tensors).
_SHAPE_OPERANDS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Pad": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Resize": (2, 3),
}


@dataclass(frozen=True)
class Finding:
    """One reason a graph may not become a TensorRT engine; `node` names the node or tensor."""

    file: str
    node: str
    op: str
    why: str
    severity: str = "error"  # "error": the parser refuses it or changes its meaning; "warning": check it

    def __str__(self) -> str:
        return f"{self.file}: {self.severity}: node {self.node!r} ({self.op}): {self.why}"


@dataclass(frozen=True)
class OpTable:
    target: str
    ops: frozenset
    min_opset: int
    max_opset: int
    source: str  # the file's header, for messages and reports


@functools.lru_cache(maxsize=None)
def op_table(target: str) -> OpTable:
    """The parser's operator list and opset range for a TensorRT version (trt_ops/tensorrt-<target>.txt)."""
    if target not in TARGETS:
        raise BitDanceError(f"TensorRT target {target!r}: use one of {', '.join(TARGETS)}")
    path = _DATA / f"tensorrt-{target}.txt"
    ops, header, opset = set(), [], None
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#"):
            header.append(text[1:].strip())
            if text[1:].strip().startswith("opset:"):
                lo, hi = text.split(":", 1)[1].strip().split("-")
                opset = (int(lo), int(hi))
        elif text:
            ops.add(text.split()[0])
    if opset is None or not ops:
        raise BitDanceError(f"{path}: no operator list or no '# opset: MIN-MAX' line (damaged install?)")
    return OpTable(target, frozenset(ops), opset[0], opset[1], "\n".join(header))


# ---- one graph ---------------------------------------------------------------------------
def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, "<model>"
    path = Path(path_or_model)
    if not path.is_file():
        raise BitDanceError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False), str(path)
    except Exception as exc:  # protobuf DecodeError and friends
        raise BitDanceError(f"{path}: not a readable ONNX file ({type(exc).__name__}); re-export it") from None


def _types(model) -> dict[str, int]:
    """Element type of every tensor: inputs, initializers, Constant outputs, inferred values."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # lint what we can see; the exporter's own checks catch broken graphs
        pass
    types = {}
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                types[v.name] = v.type.tensor_type.elem_type
        for t in g.initializer:
            types[t.name] = t.data_type
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Constant" and a.HasField("t"):
                    types[node.output[0]] = a.t.data_type
                graphs.extend([a.g] if a.HasField("g") else list(a.graphs))
    return types


def _nodes(graph, prefix: str = ""):
    """(node, display name, graph) of a graph and its subgraphs (If/Loop/Scan bodies)."""
    for i, node in enumerate(graph.node):
        name = prefix + (node.name or f"#{i} {node.op_type}")
        yield node, name, graph
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _nodes(sub, name + "/")


def lint_graph(path_or_model, target: str = "10.3", spec=None) -> list[Finding]:
    """Findings for one ONNX file (or ModelProto) against TensorRT `target` ('10.3' or '11'); with
    `spec` (its stages.StageSpec) also its I/O dims against the contract.

    What it finds: operators the parser of that TensorRT version does not import (trt_ops/), opsets
    outside its range, tensor types TensorRT lacks (DOUBLE, which it silently casts to FLOAT; UINT8
    inside the graph; unsigned and 16-bit integers, strings), per-operator restrictions from the same
    tables (constant `axes`, ScatterND reductions, LayerNormalization's extra outputs), integer graph
    inputs that TensorRT would have to treat as shape tensors (profile values, host memory), and, for
    an export, graph I/O dims against the stage contract: a dim the contract leaves symbolic must be
    dynamic in the graph, above all the backbone's `seq` (prefix_len at the prefill, P at a step: one
    engine with a profile per phase, which a graph with `seq` baked in cannot have)."""
    table = op_table(target)
    model, file = _load(path_or_model)
    out: list[Finding] = []
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS and not table.min_opset <= imp.version <= table.max_opset:
            out.append(
                Finding(
                    file,
                    "(model)",
                    "opset_import",
                    f"default-domain opset {imp.version}; TensorRT {target} parses opsets "
                    f"{table.min_opset}..{table.max_opset}: re-export with an opset in that range",
                )
            )
    functions = {(f.domain, f.name) for f in model.functions}
    types = _types(model)
    produced_by = {}
    consumers: dict[str, list] = {}
    constants = {t.name for t in model.graph.initializer}
    graph_io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    nodes = list(_nodes(model.graph))
    for f in model.functions:
        nodes += list(_nodes(f, f"{f.name}/"))
    for node, name, g in nodes:
        constants |= {t.name for t in getattr(g, "initializer", [])}
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            constants.add(node.output[0])
        for o in node.output:
            produced_by[o] = (node, name)
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node, name, _ in nodes:
        out += _node_findings(file, node, name, target, table, functions, constants)
    out += _type_findings(file, types, produced_by, consumers, graph_io, constants, target)
    out += _shape_tensor_findings(file, model, types, consumers)
    if spec is not None:
        out += _contract_findings(file, model, spec)
    return out


def _node_findings(file, node, name, target, table, functions, constants) -> list[Finding]:
    op, out = node.op_type, []
    if (node.domain, op) in functions:
        return out  # a model-local function: its body is linted instead
    if node.domain not in _DEFAULT_DOMAINS:
        return [
            Finding(
                file,
                name,
                f"{node.domain}::{op}",
                f"operator of domain {node.domain!r}: TensorRT imports it only through a plugin of that name",
            )
        ]
    if op not in table.ops:
        return [
            Finding(
                file,
                name,
                op,
                f"TensorRT {target}'s ONNX parser has no importer for {op} "
                f"(see bitdance_rt/engines/trt_ops/tensorrt-{target}.txt)",
            )
        ]
    k = _CONST_INPUTS.get(op)
    if k is not None and len(node.input) > k and node.input[k] and node.input[k] not in constants:
        strict = op.startswith("Reduce") or target == "10.3"
        out.append(
            Finding(
                file,
                name,
                op,
                f"`axes` ({node.input[k]}) is computed, not an initializer/Constant: "
                f"TensorRT {target} needs constant axes",
                "error" if strict else "warning",
            )
        )
    attrs = {a.name: a for a in node.attribute}
    if op == "ScatterND" and "reduction" in attrs and attrs["reduction"].s not in (b"", b"none"):
        out.append(Finding(file, name, op, f"reduction={attrs['reduction'].s.decode()!r} is not supported by TensorRT"))
    if op == "LayerNormalization" and any(o for o in node.output[1:]):
        out.append(Finding(file, name, op, "uses Mean/InvStdDev outputs; TensorRT supports only the first output Y"))
    return out


def _type_findings(file, types, produced_by, consumers, graph_io, constants, target) -> list[Finding]:
    out = []
    for tensor, code in sorted(types.items()):
        if code == 0:
            continue  # undefined (optional, unused)
        dtype = _NAMES.get(code, f"type {code}")
        node, where = produced_by.get(tensor, (None, "(graph input)" if tensor in graph_io else "(initializer)"))
        op = node.op_type if node is not None else "-"
        if dtype in _NATIVE:
            continue
        if dtype == "DOUBLE":
            out.append(
                Finding(
                    file,
                    where,
                    op,
                    f"tensor {tensor!r} is float64: TensorRT has no DOUBLE math and "
                    "the parser casts it to FLOAT (clamped to +-FLT_MAX); export float32",
                )
            )
        elif dtype == "UINT8":
            if tensor not in graph_io:
                out.append(
                    Finding(
                        file,
                        where,
                        op,
                        f"tensor {tensor!r} is uint8 inside the graph; TensorRT takes "
                        "UINT8 only as a network input or output",
                    )
                )
        elif dtype in _QUANTIZED[target]:
            # an int8 constant read only by Q/DQ nodes: a quantized weight or a zero point
            quantized = op == "QuantizeLinear" or (
                tensor in constants
                and all(c.op_type in ("QuantizeLinear", "DequantizeLinear") for c in consumers.get(tensor, []))
            )
            if not quantized:
                out.append(
                    Finding(
                        file,
                        where,
                        op,
                        f"tensor {tensor!r} is {dtype} outside a QuantizeLinear/"
                        f"DequantizeLinear pair; TensorRT {target} supports {dtype} "
                        "only as a quantized type",
                        "warning",
                    )
                )
        else:
            out.append(
                Finding(
                    file, where, op, f"tensor {tensor!r} has type {dtype}, which TensorRT {target} does not support"
                )
            )
    return out


def _shape_tensor_findings(file, model, types, consumers) -> list[Finding]:
    """Integer graph inputs whose values reach a shape operand become TensorRT shape tensors."""
    out = []
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or _NAMES.get(types.get(inp.name, 0)) not in ("INT32", "INT64"):
            continue
        seen, todo, hits = {inp.name}, [inp.name], []
        while todo:
            t = todo.pop()
            for node in consumers.get(t, []):
                if node.op_type in ("Shape", "Size"):
                    continue  # only the shape of t flows on, not its values
                if any(i < len(node.input) and node.input[i] == t for i in _SHAPE_OPERANDS.get(node.op_type, ())):
                    if all(h is not node for h in hits):
                        hits.append(node)
                for o in node.output:
                    if o and o not in seen:
                        seen.add(o)
                        todo.append(o)
        for node in hits:
            out.append(
                Finding(
                    file,
                    node.name or node.op_type,
                    node.op_type,
                    f"the value of graph input {inp.name!r} reaches a shape operand, so an output shape "
                    "depends on it: TensorRT must take it as a shape tensor (min/opt/max values in the "
                    "optimisation profile, bound in host memory, shapes re-resolved per call)",
                    "warning",
                )
            )
    return out


def _sizes(spec, sym: str) -> list[int]:
    """The values a contract symbol takes: its phases' sizes, else its range's ends."""
    fixed = sorted({f[sym] for f in spec.phases.values() if sym in f})
    if fixed:
        return fixed
    rng = spec.dims[sym]
    return sorted({rng.min, rng.max})


def _contract_findings(file, model, spec) -> list[Finding]:
    """Graph inputs / outputs whose dims cannot serve the contract's shapes: a static size where the
    contract's dim varies (TensorRT then refuses the profile, or the phase, that needs another), or a
    static size other than the contract's."""
    from ..stages import parse_dim

    out = []
    inits = {t.name for t in model.graph.initializer}
    for v in list(model.graph.input) + list(model.graph.output):
        if v.name in inits or v.name not in spec.input_names + spec.output_names:
            continue  # missing / extra tensors: the manifest check and check_engine_io say so
        want = spec.tensor(v.name).shape
        if not v.type.HasField("tensor_type") or not v.type.tensor_type.HasField("shape"):
            continue
        dims = v.type.tensor_type.shape.dim
        if len(dims) != len(want):
            out.append(
                Finding(
                    file,
                    v.name,
                    "graph I/O",
                    f"rank {len(dims)}, the stage contract's {list(want)} has rank {len(want)}: re-export it",
                )
            )
            continue
        for axis, (d, w) in enumerate(zip(dims, want)):
            if not d.HasField("dim_value"):
                continue  # dynamic (dim_param or unknown): any contract size fits
            got = int(d.dim_value)
            if isinstance(w, int):
                if got != w:
                    out.append(
                        Finding(
                            file,
                            v.name,
                            "graph I/O",
                            f"axis {axis} is {got}, the stage contract's {list(want)} fixes it to {w}: re-export it",
                        )
                    )
                continue
            k, sym = parse_dim(w)
            sizes = [k * n for n in _sizes(spec, sym)]
            if sizes != [got]:
                phases = ", ".join(f"{p}: {f[sym]}" for p, f in spec.phases.items() if sym in f)
                out.append(
                    Finding(
                        file,
                        v.name,
                        "graph I/O",
                        f"axis {axis} is fixed to {got}, but the stage contract's dim {w!r} takes "
                        f"{sizes}{f' ({phases})' if phases else ''}: export it as a dynamic axis",
                    )
                )
    return out


# ---- a whole export -----------------------------------------------------------------------
def lint_export(export_dir, target: str = "10.3") -> list[Finding]:
    """Findings for every stage graph of an export directory (bitdance_rt.export), in stage order."""
    from ..export.manifest import manifest_specs, read_manifest, stage_files, verify_files
    from ..stages import ALL_STAGES

    directory = Path(export_dir)
    manifest = read_manifest(directory)
    verify_files(directory, manifest, hashes=False)
    specs = manifest_specs(manifest, directory)
    stages = sorted(manifest.get("stage_files", {}), key=lambda s: (ALL_STAGES + (s,)).index(s))
    out = []
    for stage in stages:
        out += lint_graph(directory / stage_files(manifest, directory, stage)[0], target, specs.get(stage))
    return out
