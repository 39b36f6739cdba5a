"""Export stages with the weights streamed from their files: host memory of one tensor, not the model.

The model is traced weightless (export/weightless.py) and each stage's weights are copied from the
source (memory-mapped safetensors shards, BF16 or FP8 as stored) straight into the stage's graph or
external data file, converted chunk by chunk to the graph's precision. A `graph_pass` may rewrite
the traced FP32 graph first (the FP16 / BF16 conversion and INT8 quantisation of precision/streamed.py:
weights are then written in FP16 / BF16, or as int8 with their scales, and never exist in float32 as a
whole). The export directory, manifest and reuse are those of every export
(onnx_export.write_export); the key records that the weights were streamed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .. import stages as st
from ..errors import BitDanceError
from ..stages import ALL_STAGES, Limits, StageSpec
from .manifest import DEFAULT_OPSET
from .onnx_export import ExportResult, write_export
from .stage_graph import _register_symbolics, _stamp_io, check_graph_file, stage_work
from .shared_weights import save_streamed
from .weightless import WeightSource, attach_weights, placeholders, trace, weight_chunks
from .wrappers import example_inputs, stage_module

PREFIX = "model."  # the stage wrappers hold the model as `self.model`
# A graph's weights go to its external data file above this (not 1.5 GB as in a classic export): a graph kept
# whole is held about 4 times while it is assembled, saved, shape-inferred and checked (a 0.97 GB FP16 head
# graph peaked at 4.1 GiB); with external data a stage costs its largest matrix, whatever its size.
STREAMED_INLINE_BYTES = 1 << 28


SMALL_GRID = 2  # latent rows / columns the autoencoder stages are traced at


def trace_inputs(spec: StageSpec, args: tuple) -> tuple[tuple, dict]:
    """(example inputs, dynamic axes) to trace a stage on at little cost. The KV cache becomes stride-0
    views (at the 14B's widths six rows of a full cache are GBs per layer; a trace does not need its
    values). The autoencoder is traced on a SMALL_GRID latent with its spatial axes symbolic: at
    1024 px its feature maps are ~20 GB for three images, and the graph is the same for every size
    (the contract's sizes are stamped on it afterwards; tests compare it with the full-size trace)."""
    axes = spec.dynamic_axes()
    if spec.name not in (st.DECODER, st.ENCODER):
        return tuple(
            torch.zeros((), dtype=a.dtype).expand(a.shape) if t.name.startswith("cache.") else a
            for t, a in zip(spec.inputs, args)
        ), axes
    latent = spec.tensor("latent").shape
    scale = spec.tensor("image").shape[2] // latent[2]
    small = {"latent": SMALL_GRID, "image": SMALL_GRID * scale}
    out = []
    for t, a in zip(spec.inputs, args):
        out.append(a[..., : small[t.name], : small[t.name]].contiguous())
    for t in spec.inputs + spec.outputs:
        axes[t.name] = {**axes.get(t.name, {}), 2: f"{t.name}_height", 3: f"{t.name}_width"}
    return tuple(out), axes


def export_stage_streamed(
    model,
    spec: StageSpec,
    directory: Path,
    source: WeightSource,
    opset: int = DEFAULT_OPSET,
    graph_pass: Callable | None = None,
    to_half: Callable | None = None,
    external_data_bytes: int = STREAMED_INLINE_BYTES,
    to_int8: Callable | None = None,
) -> list[str]:
    """Export one stage of the weightless `model` into directory/<stage>.onnx (+ .onnx.data) with
    its weights from `source`; returns the file names written. `to_half` / `to_int8`: weight_chunks'
    conversions of the weights `graph_pass` made FP16 or BF16 / INT8."""
    import onnx

    _register_symbolics()
    directory = Path(directory)
    with stage_work(spec, directory) as raw:
        args, axes = trace_inputs(spec, example_inputs(spec, model))
        trace(stage_module(spec.name, model), args, spec, raw, opset, axes)
        graph = onnx.load(str(raw))
        del graph.graph.value_info[:]  # (traced shapes; the graph's checks infer them again from the contract)
        attach_weights(graph, source, spec.input_names, PREFIX)
        _stamp_io(graph, spec)
        if graph_pass is not None:
            graph = graph_pass(graph, spec)
        final = directory / f"{spec.name}.onnx"
        fills = [(t, weight_chunks(t, source, to_half, to_int8=to_int8)) for t in placeholders(graph)]
        files = save_streamed(graph, final, fills, external_data_bytes)
        del graph, fills
        check_graph_file(final)
        return files


def export_streamed(
    model,
    source: WeightSource,
    out_dir: str | Path,
    source_id: str,
    stages=ALL_STAGES,
    opset: int = DEFAULT_OPSET,
    sampler_steps: int | None = None,
    limits: Limits = Limits(),
    force: bool = False,
    progress: bool = True,
    precision: str = "fp32",
    graph_pass: Callable | None = None,
    to_half: Callable | None = None,
    key_extra: dict | None = None,
    to_int8: Callable | None = None,
    manifest_extra: dict | None = None,
) -> ExportResult:
    """Export `stages` of the weightless `model` (export/weightless.weightless) with weights from
    `source` into out_dir, or reuse a matching export there. `precision` is what the graphs hold
    after `graph_pass` (fp32 without one); `source_id` names the weights in the cache key;
    `manifest_extra`: what a variant adds to the manifest besides its precision."""
    if precision != "fp32" and graph_pass is None:
        raise BitDanceError(f"a streamed {precision} export needs its graph conversion")
    model = model.eval()
    key = {"weights": "streamed", **({"precision": precision} if precision != "fp32" else {}), **(key_extra or {})}
    with torch.no_grad():
        return write_export(
            model.cfg,
            out_dir,
            source_id,
            lambda spec, work: export_stage_streamed(
                model, spec, work, source, opset, graph_pass, to_half, to_int8=to_int8
            ),
            stages,
            opset,
            sampler_steps,
            limits,
            force,
            progress,
            key_extra=key,
            manifest_extra={"precision": precision, **(manifest_extra or {})} if precision != "fp32" else None,
            what=f"streamed {precision.upper()} export",
        )
