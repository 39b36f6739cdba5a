"""Export a stage without holding its weights: trace on weightless parameters, stream the weights in.

A model built on the meta device gets, for each parameter, a stride-0 view of one float (no memory
for any size), so tracing a 14B stage costs its activations, not 60 GB of float32. The stage is
traced with its weights as named graph inputs (swapped in for the call), so the exporter's constant
folding folds what a classic export folds but never a weight. The graph is then made an ordinary
one: each weight input becomes an initializer placeholder naming its source tensor, a Transpose of
a weight (every Linear's W^T, which a classic export folds) becomes a placeholder of the transposed
tensor, and `weight_chunks` fills the placeholders one tensor at a time from a `WeightSource`,
converting each chunk to the precision the graph declares (an INT8 weight and its per-channel scales:
quantised per output channel, a row of the source). Peak host memory is about one matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..errors import BitDanceError
from ..stages import StageSpec
from .stage_graph import export_failed, quiet_trace
from .shared_weights import SKELETON_BYTES, external_info, is_external, make_inline, placeholder

SOURCE = "bitdance_rt_source"  # external_data key of a placeholder: the source tensor's name
TRANSPOSED = "bitdance_rt_transposed"  # ... and "1" when the graph reads its transpose
CHANNELS = "bitdance_rt_channels"  # ... and "1" when it holds one value per row (output channel): INT8 scales
FLOAT, INT8, FLOAT16, BFLOAT16 = 1, 3, 10, 16  # onnx.TensorProto
# the numpy type `to_half` gives for each 16-bit float type (bfloat16: its bits, numpy has no bfloat16)
HALF_DTYPES = {FLOAT16: "float16", BFLOAT16: "uint16"}


@dataclass
class WeightSource:
    """Named float tensors read one at a time: `shapes` for every name, `read(name, rows)` the rows
    [start, stop) of a tensor as float32 (the whole tensor with rows None)."""

    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str, tuple[int, int] | None], torch.Tensor]
    describe: str = "the weights"
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors held in memory (buffers)

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.extra:
            t = self.extra[name]
            return t if rows is None else t[rows[0] : rows[1]]
        return self.read(name, rows)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.extra[name].shape) if name in self.extra else tuple(self.shapes[name])


def weightless(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter of `module` (built on the meta device) a stride-0 float32 view of its
    shape, in place: traceable, and no memory for its size."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            sub._parameters[name] = torch.nn.Parameter(
                torch.zeros((), dtype=torch.float32).expand(p.shape), requires_grad=False
            )
    return module


class _Functional(torch.nn.Module):
    """A stage wrapper's forward with the weights as trailing arguments, swapped into the model for
    the call (as torch.func.functional_call does, which cannot be traced), so that the exporter only
    meets the weights as graph inputs. (Met as parameters its shape inference serialises them, even
    with export_params=False: 9 GB to trace the 14B's 3.1 GB text embedding.) The model is this
    module's child `model`, as in the stage wrappers, so nodes get the same scope names as in a
    classic export (which INT8 policies and --keep-float name)."""

    def __init__(self, stage: torch.nn.Module, names: list[str], inputs: int):
        super().__init__()
        self.model = stage.model
        self._forward = type(stage).forward
        self.names, self.inputs = names, inputs

    def forward(self, *args):
        saved = []
        try:
            for name, value in zip(self.names, args[self.inputs :]):
                owner, _, leaf = name.rpartition(".")
                sub = self.get_submodule(owner)
                table = sub._parameters if leaf in sub._parameters else sub._buffers
                saved.append((table, leaf, table[leaf]))
                table[leaf] = value
            return self._forward(self, *args[: self.inputs])
        finally:
            for table, leaf, value in reversed(saved):
                table[leaf] = value


def trace(
    module: torch.nn.Module, args: tuple, spec: StageSpec, path: Path, opset: int, dynamic_axes: dict | None = None
) -> None:
    """torch.onnx.export of a weightless stage module to `path`, its weights (parameters and buffers,
    named as in the module's state dict) as graph inputs after the contract's inputs; `dynamic_axes`:
    default the contract's."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    names = list(tensors)
    wrapped = _Functional(module, names, len(args))
    with quiet_trace():
        try:
            torch.onnx.export(
                wrapped,
                (*args, *tensors.values()),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=spec.input_names + names,
                output_names=spec.output_names,
                dynamic_axes=dynamic_axes or spec.dynamic_axes(),
                do_constant_folding=True,
            )
        except OSError:
            raise
        except Exception as exc:
            raise export_failed(spec, opset, exc) from exc


def _source_name(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def attach_weights(model, source: WeightSource, inputs: list[str], prefix: str = "") -> None:
    """Turn the weight inputs of a traced graph (`model`, an onnx.ModelProto) into initializers:
    placeholders naming their source tensor (`prefix` stripped from the graph's names), tensors under
    SKELETON_BYTES read in at once (shape inference sees them), and a Transpose(perm=[1, 0]) of a
    weight into a placeholder of the transposed tensor. `inputs`: the contract's inputs (kept).
    Fails naming any weight the source lacks or holds with another shape."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    unused = [v for v in graph.input if v.name not in inputs and v.name not in consumers]
    for v in unused:  # (a weight of the model that this stage does not read)
        graph.input.remove(v)
    weights = {}
    for v in graph.input:
        name = _source_name(v.name, prefix)
        if name not in source.shapes and name not in source.extra:
            continue
        dims = tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
        if dims != source.shape(name):
            raise BitDanceError(
                f"{source.describe}: {name} has shape {list(source.shape(name))}, the graph reads {list(dims)}"
            )
        weights[v.name] = (name, dims)
    unknown = [v.name for v in graph.input if v.name not in weights and v.name not in inputs]
    if unknown:
        raise BitDanceError(
            f"{source.describe}: no tensor {_source_name(unknown[0], prefix)!r}, which the graph "
            f"reads ({len(unknown)} missing)"
        )
    kept = [v for v in graph.input if v.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)

    def tensor(graph_name: str, name: str, dims: tuple, transposed: bool):
        t = onnx.TensorProto(name=graph_name, data_type=FLOAT, dims=dims)
        size = 4
        for d in dims:
            size *= d
        if size < SKELETON_BYTES:
            data = source.tensor(name).float()
            make_inline(t, numpy_helper.from_array((data.t() if transposed else data).contiguous().numpy()).raw_data)
            return t
        return placeholder(t, {SOURCE: name, **({TRANSPOSED: 1} if transposed else {})})

    transposes = []
    for graph_name, (name, dims) in weights.items():
        users = consumers.get(graph_name, [])
        folded = [
            n
            for n in users
            if n.op_type == "Transpose"
            and len(dims) == 2
            and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([[1, 0]], [])
        ]
        if folded:
            new = f"{graph_name}.T"
            graph.initializer.append(tensor(new, name, (dims[1], dims[0]), True))
            for node in folded:
                transposes.append((node, new))
        if len(folded) < len(users):
            graph.initializer.append(tensor(graph_name, name, dims, False))
    renamed = {node.output[0]: new for node, new in transposes}
    dropped = {id(node) for node, _ in transposes}
    keep = [n for n in graph.node if id(n) not in dropped]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for out in graph.output:
        if out.name in renamed:
            raise BitDanceError(f"graph output {out.name} is a transposed weight")
    del graph.node[:]
    graph.node.extend(keep)


def placeholders(model) -> Iterator:
    """The initializers `attach_weights` left as placeholders (to be filled by write_weights)."""
    for t in model.graph.initializer:
        if is_external(t) and SOURCE in external_info(t):
            yield t


def _rows_per_chunk(shape: tuple[int, ...], chunk_bytes: int) -> int:
    row = 4
    for d in shape[1:]:
        row *= d
    return max(1, chunk_bytes // max(row, 1))


def weight_chunks(
    t,
    source: WeightSource,
    to_half: Callable | None = None,
    chunk_bytes: int = 1 << 26,
    to_int8: Callable | None = None,
) -> Iterator[memoryview]:
    """The data of placeholder `t`, from its source, in the type the graph declares: FLOAT, or FLOAT16 /
    BFLOAT16 through `to_half` (float32 numpy -> HALF_DTYPES' numpy: the precision layer's rounding; a
    graph holds one of the two, and a mismatched `to_half` is refused), in chunks of
    whole rows of at most ~`chunk_bytes` float32 bytes. An INT8 placeholder (a weight quantised per
    output channel, one row of its source) or one marked CHANNELS (that weight's per-channel scales)
    goes through `to_int8(t, rows, first)`: float32 numpy rows [first, first + len(rows)) of the
    source, whole output channels -> their int8 values, or their scales (the precision layer's
    quantisation); the rows of a transposed one are quantised before the transpose."""
    info = external_info(t)
    name, channels = info[SOURCE], info.get(CHANNELS) == "1"
    transposed = info.get(TRANSPOSED) == "1" and not channels
    quantised = t.data_type == INT8 or channels
    half = t.data_type in HALF_DTYPES
    hook = to_int8 if quantised else to_half if half else None
    if t.data_type not in (FLOAT, INT8, *HALF_DTYPES) or (hook is None and (quantised or half)):
        raise BitDanceError(f"weight {name}: no conversion to ONNX type {t.data_type}")
    shape = source.shape(name)
    if transposed:  # (a Linear's matrix: read whole, at most the largest matrix in float32)
        whole = source.tensor(name).float()
        if quantised:  # (its output channels are the source's rows)
            whole = torch.from_numpy(to_int8(t, whole.contiguous().numpy(), 0))
        whole = whole.t().contiguous()
        step = _rows_per_chunk(tuple(whole.shape), chunk_bytes)
        parts = ((whole[i : i + step], None) for i in range(0, whole.shape[0], step))
    elif not shape:
        parts = iter([(source.tensor(name).float(), 0)])
    else:
        step = _rows_per_chunk(shape, chunk_bytes)
        parts = ((source.tensor(name, (i, min(i + step, shape[0]))).float(), i) for i in range(0, shape[0], step))
    for part, first in parts:
        values = part.contiguous().numpy()
        if quantised and first is not None:
            values = to_int8(t, values, first)
        elif half:
            values = to_half(values)
            if values.dtype != HALF_DTYPES[t.data_type]:
                raise BitDanceError(f"weight {name}: to_half gave {values.dtype} values for ONNX type {t.data_type}")
        yield memoryview(values).cast("B")
