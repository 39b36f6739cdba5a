"""The road to running a model: what each step of getting there needs (peak host memory, GPU memory,
disk), from the same traced weights as the runtime's plan (memory.py), and whether a machine has it.
(Over 400 lines: every measured factor of every step is kept here, in one place, with its basis.)

The steps (load, export, derive fp16, calibrate, derive int8, build, run) are those today's code
takes (backends.auto_export, `bitdance-rt export / calibrate / build`); `road` says what each does.
Every factor below is a measurement of today's code (or says it is not one), in this one place; a
change to a step's code that changes its memory should change its factor here. What the figures
come to for the 14B, and how `plan` reports them: docs/memory.md "The road: each step of getting
there".
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

from .. import stages as st
from ..export.shared_weights import EXTERNAL_DATA_BYTES
from .memory import GIB, _meta_model, activation_bytes, activation_phases, kv_cache_bytes, plan, stage_weights

# ---- the model of today's code, and its measured basis ---------------------------------------------------
# Measured 2026-12-05 on this project's build machine (AMD EPYC, 2 cores, 23.5 GiB, Linux; torch 2.13.0+cpu, onnx
# 1.23.2, onnxruntime 1.32.0): the peak RSS of one process per step (VmHWM, reset after the imports), against the
# traced float32 bytes of the stages (stage_weights) of random-weight text-to-image checkpoints at Qwen3 widths
# (tests/t2i_tiny.write_checkpoint, 512 px, S=2): "w1024" (hidden 1024, FFN 3072, 2 layers, head 1024 x 2:
# 223 MB in float32), "w2048" (hidden 2048: 872 MB), "mid" (Qwen3-14B widths, 1 layer, head 5120 x 1: head_step
# 1.95 GB), "big" (Qwen3-14B widths, 2 layers: backbone 2.66 GB).
PROCESS_BYTES = 300 << 20  # a process that imported torch, onnx and onnxruntime: 263 MB resident
# load. Text-to-image: built on the meta device, each tensor read and converted to float32, then assigned
# (t2i/loading.py): the model's float32 bytes once (w1024: 209 MB peak on 223 MB, 0.94x: its float32 head file is
# mapped, not copied; a BF16 checkpoint's weights are all converted, 1.0x). ImageNet models:
# the model is allocated, then the checkpoint's state dict is read beside it and copied in (loading.py): 2x.
LOAD_T2I, LOAD_IMAGENET = 1.0, 2.0
# export, per stage graph of S float32 bytes, on top of the loaded model (export_stage):
EXPORT_SMALL = 5.6  # S <= 1.5e9: the graph stays in memory (torch's serialised proto, onnx.load, shape
#                     inference, the checker): w1024 backbone 572 MB on 101 MB (5.6x), w2048 2058 MB on 395 (5.2x)
EXPORT_MID = 4.0  # 1.5e9 < S <= 2 GiB: torch still serialises it whole, the rest is on files: mid head_step
#                   7840 MB on 1946 MB (4.0x)
EXPORT_LARGE = 1.2  # S > 2 GiB: torch writes external data itself: big backbone 3207 MB on 2664 MB (1.2x)
# What an exported graph leaves behind in the heap for the rest of the export, by the same regimes: w1024 243 MB
# after its 101 MB backbone (2.4x); mid 2.0 GB after its 1.95 GB head_step (1.0x); big 0.1 GB of 2.66 GB (0.04x).
EXPORT_RETAINED_SMALL, EXPORT_RETAINED_MID, EXPORT_RETAINED_LARGE = 2.4, 1.0, 0.05
# Whole exports against the model below (export_step): w1024 1409 MB peak, planned 2191 (1.55x); mid 11.15 GB
# (3.3x its 3.4 GB of float32 weights), planned 17.1 GB (1.5x); big's backbone stage ~6.3 GB, planned 6.9 (1.1x).
# So the figure is an upper bound; for BitDance-14B it is ~2.1x the float32 weights (its backbone is one 49 GiB
# graph, written by the exporter itself), a regime measured only on "big".
EXAMPLE_BATCH = 3  # the export traces every stage on example inputs of 3 images, 6 rows (export/wrappers.py):
#                    the backbone's hold a full KV cache of 6 rows, and the trace runs each forward on them:
EXPORT_DECODER_MAPS = 7  # the decoder's trace holds ~7 top-resolution feature maps per image: t2i tiny decoder
#                          (ch 32, 512 px, 0.9 MB of weights) 691 MB = 6.9 maps of [3, 32, 512, 512] float32
EXPORT_PROCESS_BYTES = PROCESS_BYTES + (128 << 20)  # + torch.onnx's exporter: the embedded model's whole export
#                                                     peaks at 402 MB (bitdance-rt export, 3 MB of weights)
# export, text-to-image (export/streamed.py): no model is loaded. Each stage is traced on stride-0 stand-ins of its
# weights (a Linear on one materialises its matrix in float32 for the op), its cache inputs stride-0 and the
# autoencoder on a 2x2 latent; then each weight is read from the files, converted and written, a matrix whole
# (float32 and its transpose), other tensors in 64 MiB slices (with the FP16 rounding's temporaries). Measured
# 2026-12-05 (same machine) on a real-width checkpoint (Qwen3-14B widths and vocabulary, 1 layer, head 5120 x 1,
# 1024 px, FP16), one process per stage, VmHWM: prefix_embed 0.96 GiB, token_embed 0.76, backbone 1.23, head_step
# 1.79, head_sampler 0.46, decoder 0.46. So: a floor of 0.46 GiB (a process that imported the exporter and the
# FP16 converter), 2.34x the largest matrix in float32 (head_step: 1.37 GiB over the floor on 0.59 GiB), 0.5 GiB for
# the sliced tensors (prefix_embed), and the backbone trace's activations and inputs (its estimate, 1.99 GiB,
# bounds the 1.23 measured). The whole-export slope per layer: benchmarks/t2i_export_memory.py.
# Whole exports (benchmarks/t2i_export_memory.py, FP16, same widths, 1024 px) grow with the layer count: 1.70,
# 1.84, 1.93 GiB at 1, 2, 3 layers, +0.115 GiB per layer (least squares), +0.040 GiB per head block; the cause is
# the trace of the whole backbone graph in one process (not profiled further), so it is added to the backbone.
STREAM_PROCESS_BYTES = 500 << 20
STREAM_MATRIX = 2.34
STREAM_SLICES = 512 << 20
STREAM_PER_LAYER = 123_420_672
SMALL_GRAPH = EXTERNAL_DATA_BYTES  # (graphs above it are written with external data)
PROTOBUF = 2 * GIB
# derive fp16 (precision/fp16.convert_fp16_file): an FP16 graph of <= 1.5e9 bytes is built in memory (w1024:
# 110 MB for its 115 MB float32 head, 1.0x the FP32 graph); larger ones are converted in 64 MiB chunks.
DERIVE_FP16_INLINE = 1.0
DERIVE_FP16_STREAMED = 2 * (64 << 20)
# derive int8 (precision/int8.py): the calibration set is read whole (calibration/dataset.load_calibration), a
# backbone sample's cache expanded to full length while it is fed, and ONNX Runtime's calibrator and
# quantize_static load the quantised stage's graph more than once: graphs over 2 GiB (external data) 3.1x,
# 6.8 GB on a 2.18 GB MatMul (tests/test_large_graphs.py); smaller ones, kept in memory, 6.8x: w1024 3647 MB
# over the imports = its 2.85 GB set + a 71 MB cache + 6.8x its 101 MB backbone. (The max method: ONNX
# Runtime's MinMax calibrator keeps two scalars per tensor and feed; entropy / percentile keep every
# activation of every feed, which is not modelled.)
DERIVE_INT8_SMALL, DERIVE_INT8_LARGE = 6.8, 3.1
# calibrate: the capture holds its model (torch float32: the load; ONNX Runtime: each loaded session's FP16
# weights), the KV cache and activations of its rows, and the samples it keeps (capture_bytes: expected bytes of
# the reservoirs from the stage contract: the embedded model's set is checked in tests/test_plan.py; w1024's
# default set 2851 MB planned, 2886 MB captured, 2.7 GB on disk) about twice: safetensors serialises a stage's
# file in memory to write it, and precision/auto.calibration_for reads the set back while it still holds the
# capture. w1024's default capture on ONNX Runtime FP16: 6494 MB over the imports = 2.2x its samples + the rest.
CAPTURE_SAMPLES = 2.3
# build: NOT MEASURED (no GPU on the machine above). Assumed per stage: the ONNX graph parsed into host memory
# plus the serialised engine there (IHostMemory); on the GPU the engine's weights and the workspace.
BUILD_HOST_GRAPH, BUILD_HOST_ENGINE, BUILD_GPU_ENGINE = 1.0, 1.0, 1.0


@dataclass
class Step:
    step: str
    host_bytes: int
    gpu_bytes: int
    disk_bytes: int  # what the step writes, its temporary files included, at its peak
    what: str  # the basis, one line
    shared_bytes: int | None = None  # host + GPU at its peak on shared memory (a Jetson), where not their sum
    cpu_bytes: int | None = None  # a step that can run on the CPU instead (run on onnxruntime / torch): its host need

    @property
    def together(self) -> int:
        return self.host_bytes + self.gpu_bytes if self.shared_bytes is None else self.shared_bytes


@dataclass
class Road:
    model: str
    precision: str
    backend: str
    steps: list[Step]
    max_batch: int = 1
    guided: bool = True
    workspace_mb: int | None = None
    sampler_steps: int | None = None
    machines: dict = field(default_factory=dict)  # name -> [machines.Fit]: each step's fit there

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.step == name)

    def to_json(self) -> dict:
        return {
            "precision": self.precision,
            "backend": self.backend,
            "max_batch": self.max_batch,
            "steps": [asdict(s) for s in self.steps],
            "machines": {m: [asdict(f) for f in fits] for m, fits in self.machines.items()},
        }


def _gb(n) -> str:
    if not n:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


# ---- the figures ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def model_bytes(cfg) -> int:
    """Float32 bytes of every parameter and buffer of the torch model (what loading it holds: the
    autoencoder's encoder too, which no stage reads), from the meta device."""
    model = _meta_model(cfg)
    return sum(
        t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size()
        for t in list(model.parameters()) + list(model.buffers())
    )


def load_bytes(cfg) -> int:
    return PROCESS_BYTES + int((LOAD_T2I if st.is_t2i(cfg) else LOAD_IMAGENET) * model_bytes(cfg))


def export_factor(graph_bytes: int) -> float:
    return EXPORT_SMALL if graph_bytes <= SMALL_GRAPH else EXPORT_MID if graph_bytes <= PROTOBUF else EXPORT_LARGE


def export_retained(graph_bytes: int) -> float:
    return (
        EXPORT_RETAINED_SMALL
        if graph_bytes <= SMALL_GRAPH
        else EXPORT_RETAINED_MID
        if graph_bytes <= PROTOBUF
        else EXPORT_RETAINED_LARGE
    )


def example_input_bytes(cfg, stage: str, steps: int, caches: bool = True) -> int:
    """Bytes of the inputs the export traces `stage` on (export/wrappers.example_inputs: 3 images);
    `caches`: with the KV cache inputs (a streamed export traces on stride-0 ones)."""
    spec = st.stage_spec(stage, cfg, steps)
    values = {"batch": EXAMPLE_BATCH, "rows": 2 * EXAMPLE_BATCH, **(spec.phases.get("step", {}))}
    return sum(
        math.prod(spec.shape(t.name, **values)) * (8 if t.dtype == "int64" else 4)
        for t in spec.inputs
        if caches or not t.name.startswith("cache.")
    )


def export_transient(cfg, steps: int, stages=None) -> tuple[int, str]:
    """(bytes over the loaded model, the stage that peaks) of exporting `stages` (default all) in order."""
    s32 = {s: sum(b for _, b in w.values()) for s, w in stage_weights(cfg, "fp32", steps).items()}
    order = [s for s in st.GENERATION_STAGES if s in (stages or st.GENERATION_STAGES) and s in s32]
    peak, at, retained = 0, order[0], 0.0
    for s in order:
        need = export_factor(s32[s]) * s32[s] + retained + example_input_bytes(cfg, s, steps)
        if s == st.BACKBONE:  # tracing runs the forward of 6 rows over the full cache
            need += activation_phases(cfg, 2 * EXAMPLE_BATCH, "fp32")["backbone step"]
        if s == st.DECODER:  # ... and the decoder of 3 images at full resolution
            need += EXPORT_DECODER_MAPS * EXAMPLE_BATCH * activation_phases(cfg, 2, "fp32")["decoder"] // 3
        if need > peak:
            peak, at = int(need), s
        retained += export_retained(s32[s]) * s32[s]
    return peak, at


def capture_bytes(
    cfg, images: int, seeds: int = 1, steps: int | None = None, batch: int = 4, policy=None, guided: bool = True
) -> dict[str, int]:
    """Expected bytes of the samples a capture keeps per stage (calibration/capture.py): its candidates
    per batch of images (the backbone's prefill and kept steps, token_embed per kept step, head_step a
    `head_fraction` of the head-net evaluations, head_sampler per AR step, decoder per batch), each
    reservoir keeping at most `max_samples`, uniformly; a sample's bytes from the stage contract with a
    backbone step's cache cut at its start."""
    from ..calibration import CapturePolicy

    policy = policy or CapturePolicy()
    steps = cfg.default_steps if steps is None else int(steps)
    specs = st.stage_specs(cfg, st.CALIBRATED_STAGES, steps)
    per_row = 4 * math.prod(st.kv_shape(cfg, 1, length=1))  # float32 cache bytes per row and position
    kept = [i for i in range(1, cfg.ar_steps) if policy.keeps_step(i)]

    def call(stage, rows, images_in, **values) -> int:
        spec = specs[stage]
        v = {"rows": rows, "batch": images_in, **values}
        return sum(
            math.prod(spec.shape(t.name, **v)) * (8 if t.dtype == "int64" else 4)
            for t in spec.inputs + spec.outputs
            if not t.name.startswith("cache.")
        )

    candidates: dict[str, list[tuple[int, int]]] = {}  # reservoir -> [(count, bytes each)]
    sizes = [batch] * (images // batch) + ([images % batch] if images % batch else [])
    for n in sizes * seeds:
        rows = n * (2 if guided else 1)
        add = lambda key, count, each: candidates.setdefault(key, []).append((count, each))  # noqa: E731
        add("backbone prefill", 1, call(st.BACKBONE, rows, n, seq=cfg.prefix_len))
        for i in kept:
            start = cfg.prefix_len + (i - 1) * cfg.parallel_num
            add("backbone step", 1, call(st.BACKBONE, rows, n, seq=cfg.parallel_num) + per_row * rows * start)
        add(st.TOKEN_EMBED, len(kept), call(st.TOKEN_EMBED, rows, n))
        add(st.HEAD_STEP, max(1, round(policy.head_fraction * steps * cfg.ar_steps)), call(st.HEAD_STEP, rows, n))
        add(st.HEAD_SAMPLER, cfg.ar_steps, call(st.HEAD_SAMPLER, rows, n))
        add(st.DECODER, 1, call(st.DECODER, rows, n))
    out: dict[str, int] = {}
    for key, found in candidates.items():
        total = sum(c for c, _ in found)
        mean = sum(c * b for c, b in found) / total
        stage = key.split(" ")[0]
        out[stage] = out.get(stage, 0) + int(min(total, policy.max_samples) * mean)
    return out


def default_capture(cfg, steps: int) -> tuple[int, int, object]:
    """(images, batch, policy) of the default INT8 set (precision/auto.calibration_for)."""
    from ..precision.auto import DEFAULT_CALIBRATION_IMAGES, DEFAULT_CAPTURE_BATCH, default_labels, default_policy

    images = DEFAULT_CALIBRATION_IMAGES if st.is_t2i(cfg) else len(default_labels(cfg))
    return images, DEFAULT_CAPTURE_BATCH, default_policy(cfg, images)


def capture_choice(cfg, backend: str | None = None, precision: str | None = None) -> tuple[str, str]:
    from ..calibration import capture_choice as choice

    return choice(st.is_t2i(cfg), backend, precision)


def _sum(weights: dict) -> dict[str, int]:
    return {s: sum(b for _, b in w.values()) for s, w in weights.items()}


def load_step(cfg) -> Step:
    factor = LOAD_T2I if st.is_t2i(cfg) else LOAD_IMAGENET
    return Step(
        "load",
        load_bytes(cfg),
        0,
        0,
        f"the torch model, every weight in float32 ({_gb(model_bytes(cfg))})"
        + (": the model and the checkpoint's state dict beside it" if factor > 1 else ""),
    )


def streamed_stage_bytes(cfg, steps: int, stage: str, weights: dict) -> int:
    """Peak host memory of the streamed export of one stage (the factors above); `weights`: its
    {name: (elements, float32 bytes)}."""
    matrices = [b for name, (_, b) in weights.items() if name != "model.embed_tokens.weight"]
    need = STREAM_PROCESS_BYTES + max(int(STREAM_MATRIX * max(matrices, default=0)), STREAM_SLICES)
    if stage == st.BACKBONE:  # the trace's forward on 6 rows, against stride-0 caches, and its per-layer growth
        need += activation_phases(cfg, 2 * EXAMPLE_BATCH, "fp32")["backbone step"] + STREAM_PER_LAYER * cfg.n_layer
        need += example_input_bytes(cfg, stage, steps, caches=False)
    return need


def streamed_export_step(cfg, steps: int, stages=None, precision: str = "fp32") -> Step:
    """The text-to-image export, streamed from the weight files (export/streamed.py) as `precision` graphs."""
    s32 = stage_weights(cfg, "fp32", steps)
    written = _sum(stage_weights(cfg, precision, steps))
    chosen = [s for s in s32 if s in (stages or s32)]
    need = {s: streamed_stage_bytes(cfg, steps, s, s32[s]) for s in chosen}
    at = max(need, key=need.get)
    largest = max((b for name, (_, b) in s32[at].items() if name != "model.embed_tokens.weight"), default=0)
    return Step(
        "export",
        need[at],
        0,
        sum(written[s] for s in chosen),
        f"{precision.upper()} ONNX export streamed from the weight files, peaking at {at}: "
        f"{STREAM_MATRIX:.2f}x its largest matrix ({_gb(largest)}) + its trace; no model is loaded",
    )


def export_step(cfg, steps: int, stages=None, precision: str = "fp32") -> Step:
    """The export: text-to-image models' streamed as `precision` (fp32, fp16 or bf16); the rest FP32 from the
    loaded model."""
    if st.is_t2i(cfg):
        return streamed_export_step(cfg, steps, stages, precision)
    s32 = _sum(stage_weights(cfg, "fp32", steps))
    chosen = [s for s in s32 if s in (stages or s32)]
    transient, at = export_transient(cfg, steps, chosen)
    disk = sum(s32[s] for s in chosen) + max(s32[s] for s in chosen)
    return Step(
        "export",
        load_bytes(cfg) - PROCESS_BYTES + EXPORT_PROCESS_BYTES + transient,
        0,
        disk,
        f"FP32 ONNX export, peaking at {at}: the loaded model + {export_factor(s32[at]):.1f}x its graph "
        f"({_gb(s32[at])}) + what earlier graphs left + its trace's inputs and activations; on disk every "
        "graph + a raw export",
    )


def derive_fp16_step(cfg, steps: int, precision: str = "fp16") -> Step:
    """Deriving FP16 graphs, or BF16 ones (`precision`; the same conversion, precision/bf16.py)."""
    s32, s16 = _sum(stage_weights(cfg, "fp32", steps)), _sum(stage_weights(cfg, precision, steps))
    held = max(DERIVE_FP16_INLINE * s32[s] if s16[s] <= SMALL_GRAPH else DERIVE_FP16_STREAMED for s in s16)
    return Step(
        f"derive {precision}",
        PROCESS_BYTES + int(held),
        0,
        sum(s16.values()) + max(s16.values()),
        f"{precision.upper()} graphs from the FP32 export: graphs of <= 1.5 GB converted in memory, larger ones "
        "in chunks",
    )


def calibrate_step(
    cfg,
    steps: int,
    backend: str = "torch",
    precision: str = "fp32",
    images=None,
    seeds: int = 1,
    batch=None,
    policy=None,
) -> Step:
    d_images, d_batch, d_policy = default_capture(cfg, steps)
    images, batch = images or d_images, batch or d_batch
    policy = policy or (d_policy if images == d_images and batch == d_batch else None)
    samples = sum(capture_bytes(cfg, images, seeds, steps, batch, policy).values())
    rows = 2 * min(batch, images)
    if backend == "torch":
        model, what = load_bytes(cfg) - PROCESS_BYTES, "the torch float32 model"
        run = activation_bytes(cfg, rows, "fp32", "torch")
    else:
        held = _sum(stage_weights(cfg, precision, steps, stages=st.REQUIRED_STAGES + (st.HEAD_STEP,)))
        model, what = sum(held.values()), f"ONNX Runtime on the {precision.upper()} graphs, sampling with head_step"
        run = activation_bytes(cfg, rows, precision, "onnxruntime")
    host = PROCESS_BYTES + model + kv_cache_bytes(cfg, rows) + run + int(CAPTURE_SAMPLES * samples)
    return Step(
        "calibrate",
        host,
        0,
        samples,
        f"capture on {backend} {precision} ({what}, {_gb(model)}) + the cache of {rows} rows + "
        f"{CAPTURE_SAMPLES:.1f}x the samples kept ({_gb(samples)}, {images} images), held, written and read",
    )


def derive_int8_factor(graph_bytes: int) -> float:
    return DERIVE_INT8_SMALL if graph_bytes <= PROTOBUF else DERIVE_INT8_LARGE


def derive_int8_step(cfg, steps: int, samples: int | None = None, rows: int | None = None) -> Step:
    """`samples`: bytes of the calibration set (default: the default set's), `rows` its calls' rows."""
    from ..precision.policy import INT8_FP16_STAGES

    s32, s8 = _sum(stage_weights(cfg, "fp32", steps)), _sum(stage_weights(cfg, "int8", steps))
    if samples is None:
        images, batch, policy = default_capture(cfg, steps)
        samples = sum(capture_bytes(cfg, images, 1, steps, batch, policy).values())
        rows = 2 * min(batch, images)
    quantised = [s for s in s8 if s not in INT8_FP16_STAGES]
    at = max(quantised, key=lambda s: derive_int8_factor(s32[s]) * s32[s])
    held = max(
        derive_int8_factor(s32[at]) * s32[at] + kv_cache_bytes(cfg, rows or 8),
        max((DERIVE_FP16_INLINE * s32[s] for s in s8 if s in INT8_FP16_STAGES), default=0),
    )
    return Step(
        "derive int8",
        PROCESS_BYTES + samples + int(held),
        0,
        sum(s8.values()) + s32[at],
        f"INT8 graphs: the calibration set ({_gb(samples)}) + ONNX Runtime's quantiser holding "
        f"{derive_int8_factor(s32[at]):.1f}x {at}'s FP32 graph ({_gb(s32[at])}); on disk the INT8 graphs + "
        "its calibration graph",
    )


def ranges_step(cfg, steps: int) -> Step:
    """The activation ranges of a streamed INT8 export, measured on its FP16 graphs
    (precision/fp16_ranges.py): one stage at a time, in pieces of about PIECE_BYTES of weights
    (graph_pieces.py: a piece ends past the budget, before twice it, or after one larger tensor), an
    ONNX Runtime session of one piece, that stage's calibration samples and one call's activations."""
    from ..precision.fp16_ranges import PIECE_BYTES

    images, batch, policy = default_capture(cfg, steps)
    samples = capture_bytes(cfg, images, 1, steps, batch, policy)
    w16 = stage_weights(cfg, "fp16", steps, stages=st.INT8_STAGES)
    piece = {
        s: min(sum(b for _, b in w.values()), 2 * PIECE_BYTES + max(b for _, b in w.values())) for s, w in w16.items()
    }
    rows = 2 * min(batch, images)
    run = activation_bytes(cfg, rows, "fp16", "onnxruntime")
    need = {s: piece[s] + samples.get(s, 0) for s in piece}
    at = max(need, key=need.get)
    return Step(
        "ranges",
        PROCESS_BYTES + need[at] + kv_cache_bytes(cfg, rows) + run,
        0,
        0,
        f"activation ranges on the FP16 graphs, one stage at a time, in pieces of ~{_gb(PIECE_BYTES)} of weights, "
        f"peaking at {at}: ONNX Runtime on a piece of its FP16 graph ({_gb(piece[at])}) + its calibration samples "
        f"({_gb(samples.get(at, 0))}) (estimate, not measured)",
    )


# `bitdance-rt export --precision int4 --backend tensorrt` at the 14B's widths (1024 px, 64x, real vocabulary)
# from its FP16 export: 0.94 GiB peak at 1, 2 and 3 Qwen3 layers alike (benchmarks/t2i_export_memory.py
# --precision int4 --reuse; 2-core AVX2 EPYC, 2026-12-06): the process, the graphs' skeletons and one chunk
INT4_WRITE_BYTES = 1_012_969_472


def int4_step(cfg, steps: int) -> Step:
    """TensorRT's INT4 graphs written from the FP16 graphs (precision/int4.quantize_int4_qdq), a weight at a
    time: the FP16 weights read memory-mapped and CHUNK_VALUES of a matrix quantised at once, so the peak
    does not grow with the model (INT4_WRITE_BYTES, measured)."""
    graphs = _sum(stage_weights(cfg, "int4", steps, int4_format="qdq"))
    return Step(
        "int4",
        INT4_WRITE_BYTES,
        0,
        sum(graphs.values()),
        "INT4 graphs written from the FP16 graphs, a few rows of a matrix at a time; no FP32 graph "
        "(measured flat at the 14B's widths)",
    )


def streamed_int8_step(cfg, steps: int) -> Step:
    """The INT8 graphs written from the weight files with those ranges (precision/streamed_int8.py): the
    streamed export's trace and weights, each quantised matrix also held once as int8."""
    from ..precision.policy import INT8_FP16_STAGES

    stages = st.INT8_STAGES + INT8_FP16_STAGES
    fp16 = streamed_export_step(cfg, steps, stages, "int8")
    s32 = stage_weights(cfg, "fp32", steps)
    largest = max(b for s in st.INT8_STAGES for name, (_, b) in s32[s].items() if name != "model.embed_tokens.weight")
    return Step(
        "int8",
        fp16.host_bytes + largest // 4,
        0,
        fp16.disk_bytes,
        "INT8 graphs streamed from the weight files with those ranges: the streamed export's figure + the "
        f"largest matrix as int8 ({_gb(largest // 4)}); no FP32 graph, no quantiser over a whole graph",
    )


def build_step(cfg, precision: str, steps: int, workspace_mb: int | None) -> Step:
    # the graphs of the engine's precision (backends._trt_backend); int4: TensorRT's form (policy.INT4_FORMATS)
    graph_precision = precision
    graphs = _sum(stage_weights(cfg, graph_precision, steps, int4_format="qdq"))
    engines = _sum(stage_weights(cfg, precision, steps, int4_format="qdq"))
    workspace = (1024 if workspace_mb is None else int(workspace_mb)) << 20
    at = max(engines, key=lambda s: BUILD_HOST_GRAPH * graphs[s] + BUILD_HOST_ENGINE * engines[s])
    host = PROCESS_BYTES + int(BUILD_HOST_GRAPH * graphs[at] + BUILD_HOST_ENGINE * engines[at])
    gpu = int(BUILD_GPU_ENGINE * max(engines.values())) + workspace
    return Step(
        "build",
        host,
        gpu,
        sum(engines.values()),
        f"TensorRT engines one stage at a time: {at}'s {graph_precision.upper()} graph and engine in host "
        f"memory, the engine + workspace on the GPU (estimate, not measured)",
        shared_bytes=host + gpu,
    )


def run_step(p) -> Step:
    """The runtime (memory.plan): on the GPU its total; in host memory the process and, while an engine or
    graph is loaded, its file's bytes. On shared memory the loading peaks with the largest engine in both."""
    loaded = [s for s in p.stages if s.loaded]
    largest = max(s.bytes for s in loaded)
    host = PROCESS_BYTES + (p.distinct_bytes if p.backend == "torch" else largest)  # torch: the model, then moved
    host += p.host_weight_bytes  # (weight streaming: the streamed engine's weights stay in host memory)
    upto = 0
    peak_loading = 0
    for s in loaded:  # engines are read into host memory one at a time, then held on the GPU
        upto += s.bytes
        peak_loading = max(peak_loading, upto + s.bytes)
    shared = PROCESS_BYTES + max(p.total_bytes + p.host_weight_bytes, peak_loading)
    cpu = None if p.backend == "tensorrt" else PROCESS_BYTES + p.total_bytes
    return Step(
        "run",
        host,
        p.total_bytes,
        0,
        f"the runtime on {p.backend} (the plan above)",
        shared_bytes=shared,
        cpu_bytes=cpu,
    )


def road(
    cfg,
    precision: str = "fp32",
    backend: str = "tensorrt",
    max_batch: int = 1,
    guided: bool = True,
    workspace_mb: int | None = None,
    steps: int | None = None,
    weight_streaming_budget: int | None = None,
) -> Road:
    """The steps to running `cfg` at `precision` on `backend` (memory.plan's arguments), as today's code
    takes them:

      load         read the checkpoint into the torch model (backends.ModelSource.load); text-to-image
                   models skip it unless they run on torch
      export       the FP32 ONNX export, one stage after another, of the loaded model (export/onnx_export.py);
                   text-to-image models' streamed from the weight files (export/streamed.py), as FP16
                   graphs directly when the run is FP16 on ONNX Runtime, as BF16 ones when it is BF16
      derive fp16  FP16 graphs (precision/derive.py): for ONNX Runtime, and the graphs a text-to-image
                   INT8 capture runs on
      derive bf16  BF16 graphs (precision/bf16.py), as FP16's: for ONNX Runtime on a GPU and TensorRT
                   (not text-to-image models: their export streams them)
      calibrate    the INT8 calibration capture: torch float32 (ImageNet models) or ONNX Runtime on the
                   FP16 graphs (text-to-image models; calibration.capture_choice)
      derive int8  the INT8 Q/DQ graphs (ONNX Runtime's quantize_static per quantised stage)
      ranges       text-to-image INT8: activation ranges measured on the streamed FP16 graphs
      int8         text-to-image INT8: the Q/DQ graphs streamed from the weight files with those ranges
      int4         TensorRT INT4: FP16 graphs with INT4 weights (precision/int4.py), from the FP16 graphs
      build        TensorRT engines, one stage after another (engines/build.py)
      run          the runtime: memory.plan's figures"""
    steps = cfg.default_steps if steps is None else int(steps)
    streamed = st.is_t2i(cfg)  # text-to-image exports stream the weight files: no model is loaded
    out = [] if streamed and backend != "torch" else [load_step(cfg)]
    if backend != "torch":
        # text-to-image graphs straight from the files: FP16 for an FP16 run, a text-to-image INT8 road (its
        # capture runs them, its ranges are measured on them, then INT8 is streamed too) and TensorRT's INT4
        # (written from them); BF16 for a BF16 run. Both backends run the graphs of the precision asked.
        direct = streamed and precision in ("fp16", "bf16", "int8", "int4")
        out.append(export_step(cfg, steps, precision=("bf16" if precision == "bf16" else "fp16") if direct else "fp32"))
        capture = capture_choice(cfg) if precision == "int8" else None
        trt_int4 = precision == "int4" and backend == "tensorrt"  # (written from the FP16 graphs)
        if not direct and (precision == "fp16" or trt_int4 or capture == ("onnxruntime", "fp16")):
            out.append(derive_fp16_step(cfg, steps))
        if precision == "int4" and not trt_int4 and not streamed:  # ONNX Runtime's, from the FP32 graphs
            out.append(derive_fp16_step(cfg, steps, "int4"))
        if precision == "bf16" and not direct:  # BF16 graphs for any backend: derived from the FP32 export
            out.append(derive_fp16_step(cfg, steps, "bf16"))
        if capture:
            out.append(calibrate_step(cfg, steps, *capture))
            if streamed:
                out.extend([ranges_step(cfg, steps), streamed_int8_step(cfg, steps)])
            else:
                out.append(derive_int8_step(cfg, steps))
        if trt_int4:
            out.append(int4_step(cfg, steps))
        if backend == "tensorrt":
            out.append(build_step(cfg, precision, steps, workspace_mb))
    p = plan(cfg, precision, backend, max_batch, guided, workspace_mb, steps, weight_streaming_budget)
    out.append(run_step(p))
    return Road(cfg.name, precision, backend, out, max_batch, guided, workspace_mb, steps)
