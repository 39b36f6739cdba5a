"""Builder options decided without TensorRT: precision plan, workspace cap, optimisation level.

Precision comes from the graphs: an export directory's manifest.json may carry a top-level
"precision" (policy.PRECISIONS; absent = "fp32"); FP16 graphs hold FP16 tensors, INT8 graphs
QuantizeLinear/DequantizeLinear pairs (explicit quantization), TensorRT's INT4 graphs INT4 weights
behind DequantizeLinear (weight-only). The engine precision a user asks for
(`--precision`) defaults to the graphs' and is checked against them (`plan_precision`). Why strongly
typed for Q/DQ and FP16 graphs on 10.x too: NVIDIA's "Explicit Quantization" page
(docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html)
says to use explicit quantization with strong typing, with no precision-control build flags;
TensorRT 11 removed BuilderFlag.FP16/INT8 and calibrators altogether. FP32 engines also clear
BuilderFlag.TF32 (on by default in 10.x), so an FP32 engine computes in FP32 and can reproduce
the reference tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import BitDanceError
from ..export.reader import graph_precision  # noqa: F401  (the builder reads it from here)
from ..precision.policy import PRECISIONS

MAX_WORKSPACE_MB = 1 << 20  # 1 TiB: anything larger is a typo


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build: network creation, builder flags, and the engine precision for the cache key."""

    precision: str  # engine precision (cache key, file name)
    graph_precision: str
    strongly_typed: bool
    builder_flags: tuple = ()  # names of trt.BuilderFlag members to set, e.g. ("FP16",)
    clear_tf32: bool = False

    @property
    def key_flags(self) -> tuple:
        """What of the plan goes into the engine-cache key besides the precision."""
        flags = ["strongly_typed" if self.strongly_typed else "weakly_typed"]
        flags += [f"flag:{f}" for f in self.builder_flags]
        if self.clear_tf32:
            flags.append("no_tf32")
        return tuple(flags)


def trt_major(version: str) -> int:
    m = re.match(r"^(\d+)\.", str(version))
    if not m:
        raise BitDanceError(f"cannot read the TensorRT version {version!r}")
    return int(m.group(1))


def plan_precision(
    graph: str, requested: str | None, trt_version: str, int4_format: str | None = None
) -> PrecisionPlan:
    """How to build from `graph`-precision graphs when `requested` (None: the graphs') is asked for:
    the decision table of docs/tensorrt.md "Building" (same precision: strongly typed; FP32 graphs to
    FP16 on 10.x: the FP16 flag on a weakly typed network; anything else refused). INT4 graphs must
    be TensorRT's ("qdq": `int4_format`, the manifest's). A refusal is one BitDanceError line."""
    if graph not in PRECISIONS:
        raise BitDanceError(f"unknown graph precision {graph!r}")
    asked = graph if requested is None else requested
    if asked not in PRECISIONS:
        raise BitDanceError(f"--precision {asked!r}: use one of {', '.join(PRECISIONS)}")
    major = trt_major(trt_version)
    if major < 10:
        raise BitDanceError(
            f"TensorRT {trt_version} is too old: bitdance-rt builds with TensorRT 10.x (JetPack 6: 10.3) or 11.x"
        )
    if graph == "int4" and int4_format != "qdq":
        raise BitDanceError(
            "these INT4 graphs hold ONNX Runtime's MatMulNBits nodes, which TensorRT does not parse: "
            "export TensorRT's INT4 graphs (bitdance-rt export --precision int4 --backend tensorrt)"
        )
    if asked == "int4" and graph != "int4":
        raise BitDanceError(
            f"--precision int4 needs INT4 graphs, but this export holds {graph} graphs: export them "
            "(bitdance-rt export --precision int4 --backend tensorrt) and build from that directory"
        )
    if asked == graph:
        return PrecisionPlan(asked, graph, strongly_typed=True, clear_tf32=(asked == "fp32"))
    if asked == "int8":
        raise BitDanceError(
            f"--precision int8 needs INT8 (Q/DQ) graphs, but this export holds {graph} graphs: "
            "run the INT8 quantisation first and build from its export directory"
        )
    if graph == "fp32" and asked == "fp16":
        if major >= 11:
            raise BitDanceError(
                f"TensorRT {trt_version} builds strongly typed networks only (no FP16 builder "
                "flag): export FP16 graphs and build from that export directory"
            )
        return PrecisionPlan("fp16", graph, strongly_typed=False, builder_flags=("FP16",))
    raise BitDanceError(
        f"this export holds {graph} graphs, which cannot give a {asked} engine: build from an "
        f"export of {asked} graphs (or pass --precision {graph})"
    )


def streamable_plan(plan: PrecisionPlan) -> PrecisionPlan:
    """`plan` with TensorRT's weight streaming (BuilderFlag.WEIGHT_STREAMING: the engine can keep part
    of its weights in host memory and stream them in on each run, up to a budget set at load,
    runtime/trt_backend.py). The flag needs a strongly typed network (NVIDIA, "Weight Streaming")."""
    if not plan.strongly_typed:
        raise BitDanceError(
            "weight streaming needs a strongly typed network, and FP16 engines of FP32 graphs are weakly "
            "typed: build from FP16 graphs (bitdance-rt export --precision fp16)"
        )
    return replace(plan, builder_flags=plan.builder_flags + ("WEIGHT_STREAMING",))


def workspace_bytes(mb) -> int | None:
    """--workspace-mb N -> N MiB in bytes (None: no cap, TensorRT's default of the device memory)."""
    if mb is None:
        return None
    try:
        value = int(str(mb).strip())
    except ValueError:
        raise BitDanceError(f"--workspace-mb must be a whole number of MiB, got {mb!r}") from None
    if not 1 <= value <= MAX_WORKSPACE_MB:
        raise BitDanceError(f"--workspace-mb must lie in [1, {MAX_WORKSPACE_MB}], got {value}")
    return value << 20


def opt_level(level) -> int:
    """IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default 3."""
    try:
        value = int(level)
    except (TypeError, ValueError):
        raise BitDanceError(f"builder optimisation level must be 0..5, got {level!r}") from None
    if not 0 <= value <= 5:
        raise BitDanceError(f"builder optimisation level must be 0..5 (TensorRT's default is 3), got {value}")
    return value
