"""torch -> ONNX of one stage: the trace, the contract stamped on its graph, and the ONNX checks.

Uses the TorchScript exporter (`dynamo=False`): it is the predictable one for opsets <= 20,
which TensorRT 10.3 needs. Each graph's inputs/outputs are stamped with the contract's names
and shapes (symbolic dims as dim_params), then checked by onnx.checker and strict shape
inference. Every exporter uses these: the classic one (`export_stage`, of a loaded model), the
weightless trace (weightless.py) and the streamed export (streamed.py); the export directory,
its manifest and reuse are onnx_export.py's.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import BitDanceError
from ..models import BitDance
from ..stages import StageSpec
from .manifest import DEFAULT_OPSET, MIN_OPSET
from .shared_weights import EXTERNAL_DATA_BYTES
from .wrappers import example_inputs, stage_module

_ONNX_DTYPES = {"float32": 1, "int64": 7}  # onnx.TensorProto.FLOAT / INT64


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """aten::rms_norm (no ONNX op before opset 23): x * 1/sqrt(mean(x^2) + eps) * weight."""
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    eps_value = torch.finfo(torch.float32).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    square = g.op("Mul", x, x)
    if g.opset >= 18:
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    eps_const = g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))
    y = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, eps_const))))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


def _register_symbolics() -> None:
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, MIN_OPSET)


def _stamp_io(model, spec: StageSpec) -> None:
    """Give graph inputs/outputs the contract's names, dtypes and (symbolic) shapes, or fail."""
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    got_in = [v.name for v in graph.input if v.name not in init_names]
    got_out = [v.name for v in graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise BitDanceError(
            f"stage {spec.name}: the exported graph has inputs {got_in} / outputs {got_out}, "
            f"the contract wants {spec.input_names} / {spec.output_names}"
        )
    for value in list(graph.input) + list(graph.output):
        if value.name in init_names:
            continue
        want = spec.tensor(value.name)
        ttype = value.type.tensor_type
        if ttype.elem_type != _ONNX_DTYPES[want.dtype]:
            raise BitDanceError(
                f"stage {spec.name}: {value.name} exported with ONNX type {ttype.elem_type}, "
                f"the contract wants {want.dtype}"
            )
        ttype.shape.ClearField("dim")
        for d in want.shape:
            dim = ttype.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def _initializer_bytes(model) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    return total


@contextlib.contextmanager
def quiet_trace():
    """torch.no_grad and the TorchScript exporter's expected warnings silenced, for a stage trace."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        yield


def export_failed(spec: StageSpec, opset: int, exc: Exception) -> BitDanceError:
    """The exporter raises many types: one line naming the stage."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return BitDanceError(f"stage {spec.name}: torch.onnx.export failed at opset {opset}: {first}")


@contextlib.contextmanager
def stage_work(spec: StageSpec, directory: Path):
    """The raw .onnx path of one stage's trace, in a temporary directory beside `directory` (removed
    afterwards); an ONNX check failing inside the block becomes one BitDanceError naming the stage."""
    raw_dir = Path(tempfile.mkdtemp(prefix=f".{spec.name}.raw-", dir=directory))
    try:
        yield raw_dir / f"{spec.name}.onnx"
    except (BitDanceError, OSError):
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("onnx"):
            raise BitDanceError(
                f"stage {spec.name}: the exported graph fails the ONNX checks: "
                f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
            ) from exc
        raise
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)


def check_graph_file(path: Path) -> None:
    """Strict shape inference (written back) and the full checker on a graph file of any size."""
    import onnx

    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(str(path), full_check=True)


def export_stage(
    model: BitDance,
    spec: StageSpec,
    directory: Path,
    opset: int = DEFAULT_OPSET,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
) -> list[str]:
    """Export one stage to directory/<stage>.onnx (+ .onnx.data); returns the file names written."""
    import onnx

    _register_symbolics()
    directory = Path(directory)
    with stage_work(spec, directory) as raw:
        module = stage_module(spec.name, model)
        args = example_inputs(spec, model)
        with quiet_trace():
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    dynamic_axes=spec.dynamic_axes(),
                    do_constant_folding=True,
                )
            except OSError:  # a full disk is not the exporter's fault (export_stages says which file)
                raise
            except Exception as exc:
                raise export_failed(spec, opset, exc) from exc
        graph = onnx.load(str(raw))
        _stamp_io(graph, spec)
        final = directory / f"{spec.name}.onnx"
        if _initializer_bytes(graph) <= external_data_bytes:
            graph = onnx.shape_inference.infer_shapes(graph, check_type=True, strict_mode=True, data_prop=True)
            onnx.checker.check_model(graph, full_check=True)
            onnx.save_model(graph, str(final))
            return [final.name]
        data = f"{spec.name}.onnx.data"
        onnx.save_model(graph, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        del graph
        check_graph_file(final)
        return [final.name, data]
