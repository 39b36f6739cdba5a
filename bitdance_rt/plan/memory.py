"""Memory of a model before it is loaded: what each stage's weights take at a precision, the KV
cache, an activation estimate per call and the TensorRT workspace, and whether that fits a GPU or a
Jetson. (Over 400 lines: the runtime's figures are one model, each measured factor beside its use.)

The weights of a stage are found, not listed: the model is built on the meta device (no memory)
and each stage's forward is run there once, recording every parameter and buffer it reads
(`stage_tensors`). So the figures follow the code (a stage that stops reading a weight stops
counting it) and agree with the export (tests/test_plan.py compares them with the initialisers of
real exports). What a backend holds ("held" against "distinct"): MemoryPlan.weight_bytes; bytes
per weight at each precision: `tensor_bytes`; the cache: `kv_cache_bytes`; what the plan says for
the 14B, and how it compares with measurements: docs/memory.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .. import stages as st
from ..errors import BitDanceError

GIB = 1024**3

# Memory a target can give the model: GPUs lose ~1 GiB to the CUDA context and the allocator's
# slack; a Jetson shares its memory with the CPU, so the OS and the CUDA context (~2 GiB) come off.
TARGETS = {
    "gpu-16gb": ("a 16 GB GPU", 16 * GIB, 1 * GIB),
    "gpu-24gb": ("a 24 GB GPU (RTX 3090 / 4090, L4, A10)", 24 * GIB, 1 * GIB),
    "gpu-40gb": ("a 40 GB GPU (A100 40GB)", 40 * GIB, 1 * GIB),
    "gpu-48gb": ("a 48 GB GPU (L40S, A6000)", 48 * GIB, 1 * GIB),
    "gpu-80gb": ("an 80 GB GPU (A100 / H100 80GB)", 80 * GIB, 1 * GIB),
    "orin-nano-8gb": ("Jetson Orin Nano 8GB (shared with the CPU)", 8 * GIB, 2 * GIB),
    "orin-nx-16gb": ("Jetson Orin NX 16GB (shared with the CPU)", 16 * GIB, 2 * GIB),
    "agx-orin-32gb": ("Jetson AGX Orin 32GB (shared with the CPU)", 32 * GIB, 2 * GIB),
    "agx-orin-64gb": ("Jetson AGX Orin 64GB (shared with the CPU)", 64 * GIB, 2 * GIB),
}


def shared_memory(target: str) -> bool:
    """Whether TARGETS' `target` is a Jetson, whose host and GPU are one memory."""
    return target.startswith(("orin", "agx"))


# Ops the exporter's constant folding leaves in the graph even on constant inputs (measured: a
# fused sampler keeps its time MLP's weights, and folds the sinusoidal time embeddings before it).
SHAPED = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like")
UNFOLDED = (
    "linear",
    "matmul",
    "mm",
    "bmm",
    "addmm",
    "conv2d",
    "conv1d",
    "embedding",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "scaled_dot_product_attention",
)
# Ops that broadcast a constant to a shape known at run time (a batch dim): the graph stores the constant.
BROADCASTS = ("expand", "expand_as", "broadcast_to")
PLAN_BACKENDS = ("onnxruntime", "tensorrt", "torch")


def export_stages(precision: str) -> tuple[str, ...]:
    """The generation stages an export of `precision` holds: INT8 exports have no fused sampler (they
    sample with the quantised head_step, precision/derive.py)."""
    if precision == "int8":
        return tuple(s for s in st.GENERATION_STAGES if s not in st.SAMPLER_STAGES)
    return st.GENERATION_STAGES


def loaded_stages(precision: str) -> tuple[str, ...]:
    """What a Pipeline loads at start-up: the required stages and one head graph; head_step beside the
    fused sampler only on demand (another sampler step count than the graph's S, or the step sampler)."""
    head = st.SAMPLER_STAGES if precision != "int8" else (st.HEAD_STEP,)
    return st.REQUIRED_STAGES + head


@dataclass
class StageMemory:
    stage: str
    parameters: int  # elements of the weights (parameters and buffers) it reads
    bytes: int  # at the plan's precision
    loaded: bool  # held from start-up (head_step: once a request asks for another step count)


@dataclass
class MemoryPlan:
    model: str
    backend: str
    precision: str
    height: int
    width: int
    max_batch: int
    rows: int
    stages: list[StageMemory]
    distinct_bytes: int  # every weight once
    kv_cache_bytes: int
    activation_bytes: int  # estimate of the peak
    workspace_bytes: int
    notes: list[str] = field(default_factory=list)
    activations: dict[str, int] = field(default_factory=dict)  # estimate per call (activation_phases)
    # TensorRT weight streaming (plan's weight_streaming_budget): the backbone's bytes left in host memory
    # and read in on each of its calls, the whole backbone's host copy, and the streaming scratch (estimate)
    streamed_bytes: int = 0
    host_weight_bytes: int = 0
    stream_scratch_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        """What the backend holds: every loaded stage its own copy of what it reads (ONNX Runtime,
        TensorRT), or each weight once (torch).

        Each ONNX Runtime session and each TensorRT engine holds its own copy of what it reads
        ("held"), even where files share weights on disk; the stages read disjoint weights (one
        backbone graph serves the prefill and every step), so held is each weight once ("distinct")
        but for what two loaded graphs really both read, which the notes name, and head_step, loaded
        on demand beside the fused sampler (`on_demand_bytes`). The torch backend runs every stage on
        one model (distinct)."""
        if self.backend == "torch":
            return self.distinct_bytes
        return sum(s.bytes for s in self.stages if s.loaded) - self.streamed_bytes

    @property
    def total_bytes(self) -> int:
        held = self.weight_bytes + self.stream_scratch_bytes
        return held + self.kv_cache_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def total_if_once(self) -> int:
        """The total with each weight held once (the torch backend's; on the others it differs by the
        weights two loaded graphs both read)."""
        return self.total_bytes - self.weight_bytes + self.distinct_bytes

    @property
    def on_demand_bytes(self) -> int:
        """Weights of the stages loaded only on demand (head_step beside the fused sampler)."""
        return 0 if self.backend == "torch" else sum(s.bytes for s in self.stages if not s.loaded)

    def fits(self, target: str) -> tuple[bool, int]:
        """(fits, bytes left over, negative when short) on a target of TARGETS. On a Jetson the host copy
        that weight streaming reads from is in the same memory: streaming saves nothing there."""
        _, size, reserved = TARGETS[target]
        left = size - reserved - self.total_bytes - (self.host_weight_bytes if shared_memory(target) else 0)
        return left >= 0, left


# ---- weights per stage, found on the meta device ---------------------------------------------------
def _meta_model(cfg):
    import torch

    with torch.device("meta"):
        if st.is_t2i(cfg):
            from ..models.t2i import BitDanceT2I

            return BitDanceT2I(cfg).eval()
        from ..models import BitDance

        return BitDance(cfg).eval()


# Step counts the fused sampler is traced at to unroll it to more: two consecutive ones give the constants
# of a step, the last checks them. Tracing every step is slow (a 14B: ~0.25 s a head-net call on the CPU).
UNROLL_FROM = (2, 3, 4)


def stage_tensors(cfg, stages=st.GENERATION_STAGES, steps: int = 2) -> dict[str, dict[str, tuple]]:
    """{stage: {tensor name: (elements, element size, leading dim, owner module type, owner name)}} of the
    tensors each stage's graph holds: its forward run once on the meta device (no memory), watched
    by a TorchFunctionMode. What a graph holds is the frontier between constants and what runs: every
    tensor no stage input flows into that an op reads together with one that does, or that a
    weight op (UNFOLDED) reads. So a weight read by a matmul counts whole, a position table indexed
    at fixed positions counts as its slice, and a sampler's unrolled time embeddings count as the
    constants they are (the exporter folds the constant side of the rest). Folded constants are
    named "<name>#N" (N: one per reading op, as the exporter folds them into each consumer), with
    owner type "constant" when no weight made them. A constant broadcast to a run-time shape (the
    query tokens expanded to the rows) counts as itself: the exporter keeps it and the Expand.
    A fused sampler of more than UNROLL_FROM[-1] steps is unrolled from short traces (`_sampler_held`)."""
    stages, steps = tuple(stages), int(steps)
    # one trace serves every precision (and the road's plans)
    traced = st.GENERATION_STAGES if set(stages) <= set(st.GENERATION_STAGES) else stages
    samplers = tuple(s for s in traced if s in st.SAMPLER_STAGES)
    if not samplers or steps <= UNROLL_FROM[-1]:
        held = _trace(cfg, traced, steps)
    else:  # the other stages do not depend on the steps
        held = {**_trace(cfg, traced, UNROLL_FROM[0]), **_sampler_held(cfg, traced, steps)}
    return {stage: dict(held[stage]) for stage in stages}


def _sampler_held(cfg, traced: tuple, steps: int) -> dict[str, dict[str, tuple]]:
    """What the sampler stages of `traced` hold at `steps`, from their traces at UNROLL_FROM (the first:
    stage_tensors' trace of `traced`); their full trace at `steps` where the third does not confirm what
    the first two give."""
    first, _, check = UNROLL_FROM
    samplers = tuple(s for s in traced if s in st.SAMPLER_STAGES)
    out = {}
    for stage in samplers:
        held = [_trace(cfg, traced if n == first else samplers, n)[stage] for n in UNROLL_FROM]
        confirmed = _unroll(held[0], held[1], check - first) == list(held[2].items())
        got = _unroll(held[0], held[1], steps - first) if confirmed else None
        out[stage] = dict(got) if got is not None else _trace(cfg, samplers, steps)[stage]
    return out


def _unroll(held: dict, held_next: dict, more: int) -> list[tuple] | None:
    """The items of a sampler's held tensors `more` steps past `held`, from `held` and `held_next` (one
    step on): the loop's steps are alike, so the second holds the first with one block of items (a
    step's folded constants) repeated; that block comes `more` more times, the constants renumbered in
    order (their N counts up through the graph). None when the two are not so."""

    def tokens(h):
        return [(k.rsplit("#", 1)[0], True, v) if "#" in k else (k, False, v) for k, v in h.items()]

    def items(ts):
        out, n = [], 0
        for base, folded, value in ts:
            n += folded
            out.append((f"{base}#{n}" if folded else base, value))
        return out

    a, b = tokens(held), tokens(held_next)
    if items(a) != list(held.items()):  # the numbering is not 1.. in order
        return None
    d = len(b) - len(a)
    for p in range(len(a) - d + 1) if d >= 0 else ():
        if a[: p + d] + a[p:] == b:
            return items(a[:p] + a[p : p + d] * (more + 1) + a[p + d :])
    return None


@functools.lru_cache(maxsize=32)
def _trace(cfg, stages: tuple, steps: int) -> dict[str, dict[str, tuple]]:
    """stage_tensors' trace, cached: a 14B model takes seconds to trace, its fused sampler ~0.25 s a step."""
    import torch
    from torch.overrides import TorchFunctionMode

    from ..export.wrappers import example_inputs, stage_module

    model = _meta_model(cfg)
    owners = {}
    for mod_name, module in model.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{mod_name}.{name}" if mod_name else name
            owners[id(t)] = (full, type(module).__name__, mod_name)

    def tensors_in(value):
        stack, found = [value], []
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                found.append(x)
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
        return found

    class Frontier(TorchFunctionMode):
        def __init__(self, inputs):
            super().__init__()
            self.keep = list(inputs)  # every tensor seen stays alive, so an id stays its tensor's
            self.dynamic = {id(x) for x in inputs}
            self.origin = dict(owners)  # constants made from a weight keep its name
            self.base = {}  # broadcast views of a constant -> the constant
            self.held: dict[str, tuple] = {}
            self.constants = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            made = tensors_in(out)
            if not made:  # metadata (.shape, .device, .dim()): nothing computed
                return out
            read = tensors_in([args, kwargs])
            self.keep.extend(made)
            op = getattr(func, "__name__", "")
            if op in SHAPED:  # zeros(shape) / ones_like(x): a ConstantOfShape at run time, nothing stored
                self.dynamic.update(id(y) for y in made)
                return out
            if op in UNFOLDED or any(id(x) in self.dynamic for x in read):
                self.dynamic.update(id(y) for y in made)
                for x in read:
                    if id(x) not in self.dynamic:
                        self._hold(x)
            elif op in BROADCASTS and read:
                base = self.base.get(id(read[0]), read[0])
                self.base.update((id(y), base) for y in made)
            else:
                source = next((self.origin[id(x)] for x in read if id(x) in self.origin), None)
                for y in made:
                    if source is not None:
                        self.origin[id(y)] = (source[0], source[1], source[2], "derived")
            return out

        def _hold(self, x) -> None:
            x = self.base.get(id(x), x)
            origin = self.origin.get(id(x))
            name, kind, owner = origin[:3] if origin is not None else ("<constant>", "constant", "")
            if origin is None or len(origin) > 3:  # a folded constant: one per op that reads it, as
                self.constants += 1  # the exporter folds it into each consumer (weights stay shared)
                name = f"{name}#{self.constants}"
            self.held[name] = (x.numel(), x.element_size(), x.shape[0] if x.dim() else 1, kind, owner)

    specs = st.stage_specs(cfg, stages, steps=steps)
    out = {}
    for name, spec in specs.items():
        inputs = example_inputs(spec, model, batch=1, meta=True)
        frontier = Frontier(inputs)
        with torch.no_grad(), frontier:
            stage_module(name, model)(*inputs)
        out[name] = frontier.held
    return out


def _kept_float(rules: dict, stage: str, owner: str) -> bool:
    """Whether a policy's float-layer `rules` ({stage: node-name substrings}) keep module `owner` float."""
    dotted = "." + owner + "."
    return any(p.replace("/", ".") in dotted for p in rules.get(stage, ()))


def tensor_bytes(
    precision: str,
    stage: str,
    name: str,
    numel: int,
    size: int,
    kind: str,
    owner: str,
    shape_out: int | None = None,
    int4_format: str = "matmulnbits",
) -> int:
    """Bytes of one weight in a graph of `precision`: fp32 4; fp16 2 (GroupNorm / LayerNorm affine
    weights stay fp32, as the FP16 policy keeps those ops in fp32); bf16 as fp16 but Conv weights fp32;
    int8: the Linear / Conv weights the
    INT8 policy quantises take 1 byte plus a float32 scale and an int8 zero point per output channel,
    the rest stays fp32, and the stages INT8 does not quantise (prefix_embed's table) take their fp16
    bytes; int4: the Linear weights of the INT4 stages take half a byte each, K padded to whole blocks,
    plus a float32 scale per block, the rest as for int8; TensorRT's INT4 (`int4_format` "qdq"): those
    weights half a byte each plus an FP16 scale per block of 128 (64 where 128 does not divide K;
    neither: FP16), the rest as for fp16 (precision/policy.py). Integer buffers keep their type."""
    from ..precision.policy import (
        INT4_BLOCK,
        INT4_FLOAT_LAYERS,
        INT4_FP16_STAGES,
        INT4_TRT_BLOCKS,
        INT8_FLOAT_LAYERS,
        INT8_FP16_STAGES,
    )

    if (precision == "int8" and stage in INT8_FP16_STAGES) or (precision == "int4" and stage in INT4_FP16_STAGES):
        precision = "fp16"
    if precision == "int4" and int4_format == "qdq" and size == 4:
        weight = name.endswith(".weight") and kind == "Linear" and shape_out
        k = numel // shape_out if weight and not _kept_float(INT4_FLOAT_LAYERS, stage, owner) else 0
        block = next((b for b in INT4_TRT_BLOCKS if k and k % b == 0), None)
        if block is not None:
            return numel // 2 + shape_out * (k // block) * 2  # nibbles + an FP16 scale per block
        precision = "fp16"
    if size != 4:  # integer buffers (index tables) keep their type
        return numel * size
    if precision == "fp32":
        return numel * 4
    if precision == "fp16":
        return numel * (4 if kind in ("GroupNorm", "LayerNorm") else 2)
    if precision == "bf16":  # FP16's bytes, but convolutions stay FP32 (policy.bf16_float_ops)
        return numel * (4 if kind in ("GroupNorm", "LayerNorm", "Conv2d") else 2)
    if precision == "int8":
        weight = name.endswith(".weight") and kind in ("Linear", "Conv2d")
        if weight and not _kept_float(INT8_FLOAT_LAYERS, stage, owner):
            return numel + (shape_out or 0) * 5  # int8 values + a float32 scale and an int8 zero point per channel
        return numel * 4
    if precision == "int4":
        weight = name.endswith(".weight") and kind == "Linear" and stage in st.INT4_STAGES
        if weight and shape_out and not _kept_float(INT4_FLOAT_LAYERS, stage, owner):
            blocks = -(-(numel // shape_out) // INT4_BLOCK)
            return shape_out * blocks * (INT4_BLOCK // 2 + 4)  # packed nibbles + a float32 scale per block
        return numel * 4
    raise BitDanceError(f"precision {precision!r}: plan fp32, fp16, bf16, int8 or int4")


def stage_weights(
    cfg, precision: str, steps: int | None = None, stages=None, int4_format: str = "matmulnbits"
) -> dict[str, dict[str, tuple]]:
    """{stage: {tensor: (elements, bytes at `precision`)}} of the stages an export of `precision`
    holds (default); the fused sampler of `steps` sampler steps (default: the model's), whose unrolled
    time constants grow with it; `int4_format`: the runtime's INT4 graphs (policy.INT4_FORMATS)."""
    steps = cfg.default_steps if steps is None else int(steps)
    out = {}
    for stage, reads in stage_tensors(cfg, export_stages(precision) if stages is None else stages, steps).items():
        # (a weight's leading dim: its output channels)
        out[stage] = {
            name: (numel, tensor_bytes(precision, stage, name, numel, size, kind, owner, channels, int4_format))
            for name, (numel, size, channels, kind, owner) in reads.items()
        }
    return out


def _is_weight(name: str) -> bool:
    """A model tensor, not a graph's own folded constant: stages that read it read the same one."""
    return "#" not in name


def distinct_bytes(weights: dict) -> int:
    """Bytes with each weight once (one model); a graph's own folded constants are its own."""
    seen = {}
    for stage, reads in weights.items():
        for name, (_, b) in reads.items():
            key = name if _is_weight(name) else (stage, name)
            seen[key] = max(seen.get(key, 0), b)
    return sum(seen.values())


def shared_weights(weights: dict, stages) -> dict[str, tuple[int, list[str]]]:
    """{weight: (bytes, the stages holding it)} for the weights more than one of `stages` reads: what
    a process of one session / engine per stage holds more than once."""
    by = {}
    for stage in stages:
        for name, (_, b) in weights.get(stage, {}).items():
            if _is_weight(name):
                by.setdefault(name, (b, []))[1].append(stage)
    return {name: (b, held) for name, (b, held) in by.items() if len(held) > 1}


def _memory(weights: dict, precision: str) -> list[StageMemory]:
    loaded = loaded_stages(precision)
    return [
        StageMemory(stage, sum(n for n, _ in reads.values()), sum(b for _, b in reads.values()), stage in loaded)
        for stage, reads in weights.items()
    ]


def stage_memory(
    cfg, precision: str, steps: int | None = None, int4_format: str = "matmulnbits"
) -> tuple[list[StageMemory], int]:
    """(per stage memory, distinct bytes) at `precision` (see stage_weights)."""
    weights = stage_weights(cfg, precision, steps, int4_format=int4_format)
    return _memory(weights, precision), distinct_bytes(weights)


# ---- cache and activations ---------------------------------------------------------------------------
def kv_cache_bytes(cfg, rows: int) -> int:
    """The runtime's cache (float32, stages.kv_shape) for `rows` slots. It is float32 at every
    precision (runtime/core.py); `plan` sizes it for every slot: 2 rows per image with guidance,
    `max_batch` images."""
    n = 1
    for d in st.kv_shape(cfg, rows):
        n *= d
    return n * 4


def activation_phases(cfg, rows: int, precision: str) -> dict[str, int]:
    """Estimated peak activations of each call: the backbone per phase (stages.backbone_phases), a
    chunk of T positions: its FFN, the attention scores over the cache and the chunk (float32, with
    their softmax) and its float32 kv_new; the head; the decoder of one image: its top-resolution
    feature maps (input, output, residual)."""
    e = 2 if precision in ("fp16", "bf16") else 4
    dim = cfg.dim
    ffn = cfg.llm.intermediate_size if st.is_t2i(cfg) else 4 * dim
    heads, length, p = cfg.n_head, cfg.max_seq_len, cfg.parallel_num
    out = {}
    for phase, fixed in st.backbone_phases(cfg).items():
        t = fixed["seq"]
        kv_new = 4
        for d in st.kv_shape(cfg, rows, length=t):
            kv_new *= d
        out[f"backbone {phase}"] = rows * t * (2 * ffn + 4 * dim) * e + 2 * rows * heads * t * (length + t) * 4 + kv_new
    head_width = cfg.head.ch_latent if st.is_t2i(cfg) else cfg.diff_dim
    out["head"] = 8 * rows * p * head_width * e
    h, w = cfg.image_hw if st.is_t2i(cfg) else (cfg.image_size, cfg.image_size)
    out["decoder"] = 3 * cfg.vae.ch * cfg.vae.ch_mult[0] * h * w * (4 if precision == "bf16" else e)  # (FP32 convs)
    return out


def activation_bytes(cfg, rows: int, precision: str, backend: str = "onnxruntime") -> int:
    """The peak. TensorRT: the largest call, decoder included (its contexts share one scratch buffer and
    run one after another on one stream, runtime/trt_backend.py; the backbone's two profiles are one
    engine). ONNX Runtime and torch: the largest AR-step call plus the decoder, which they run beside
    the AR steps on a GPU (concurrent_decode)."""
    calls = activation_phases(cfg, rows, precision)
    if backend == "tensorrt":
        return max(calls.values())
    return max(v for k, v in calls.items() if k != "decoder") + calls["decoder"]


def plan(
    cfg,
    precision: str = "fp32",
    backend: str = "onnxruntime",
    max_batch: int = 1,
    guided: bool = True,
    workspace_mb: int | None = None,
    steps: int | None = None,
    weight_streaming_budget: int | None = None,
) -> MemoryPlan:
    """The memory of `cfg` on `backend` at `precision`, with cache slots for `max_batch` images;
    `weight_streaming_budget`: bytes of the backbone's weights TensorRT keeps on the GPU (`streaming`)."""
    if backend not in PLAN_BACKENDS:
        raise BitDanceError(f"backend {backend!r}: plan one of {', '.join(PLAN_BACKENDS)}")
    if max_batch < 1:
        raise BitDanceError(f"max batch must be >= 1, got {max_batch}")
    from ..precision.policy import INT4_FORMATS

    rows = max_batch * (2 if guided else 1)
    weights = stage_weights(cfg, precision, steps, int4_format=INT4_FORMATS.get(backend, "matmulnbits"))
    stages = _memory(weights, precision)
    workspace = (1024 if workspace_mb is None else int(workspace_mb)) * 2**20 if backend == "tensorrt" else 0
    h, w = cfg.image_hw if st.is_t2i(cfg) else (cfg.image_size, cfg.image_size)
    calls = activation_phases(cfg, rows, precision)
    p = MemoryPlan(
        cfg.name,
        backend,
        precision,
        h,
        w,
        max_batch,
        rows,
        stages,
        distinct_bytes(weights),
        kv_cache_bytes(cfg, rows),
        activation_bytes(cfg, rows, precision, backend),
        workspace,
        [],
        calls,
    )
    if weight_streaming_budget is not None:
        streaming(p, weights, int(weight_streaming_budget), cfg)
    p.notes = _notes(p, weights) + p.notes
    return p


PCIE_BYTES_PER_S = 25e9  # what a PCIe 4.0 x16 link moves host to device in practice (~32 GB/s peak)


def streaming(p: MemoryPlan, weights: dict, budget: int, cfg) -> None:
    """TensorRT weight streaming of the backbone (engines/options.streamable_plan): `budget` bytes of its
    weights stay on the GPU, the rest is read from host memory on each of its calls. The engine keeps all
    its weights in host memory when it streams (NVIDIA, "Weight Streaming": deserialisation allocates a
    host buffer for them); the streaming scratch is counted as two of its largest matrices (an estimate:
    TensorRT reports its own, getWeightStreamingScratchMemorySize, only for a built engine)."""
    if p.backend != "tensorrt":
        raise BitDanceError("weight streaming is TensorRT's: plan it with --backend tensorrt")
    if budget < 0:
        raise BitDanceError(f"weight streaming budget must be >= 0 bytes, got {budget}")
    backbone = weights[st.BACKBONE]
    held = sum(b for _, b in backbone.values())
    p.streamed_bytes = max(0, held - budget)
    p.host_weight_bytes = held
    p.stream_scratch_bytes = 2 * max(b for _, b in backbone.values()) if p.streamed_bytes else 0
    calls = cfg.ar_steps  # the prefill and a call per later AR step
    per_image = p.streamed_bytes * calls
    p.notes.append(
        f"weight streaming: the backbone keeps {_gb(held - p.streamed_bytes)} of its {_gb(held)} on the GPU and "
        f"reads {_gb(p.streamed_bytes)} from host memory on each of its {calls} calls an image ({_gb(per_image)}: "
        f"~{per_image / PCIE_BYTES_PER_S:.1f} s an image at 25 GB/s, PCIe 4.0 x16); host memory holds its "
        f"{_gb(held)}; scratch ~{_gb(p.stream_scratch_bytes)} (estimate)"
    )


def _notes(p: MemoryPlan, weights: dict) -> list[str]:
    if p.backend == "torch":
        return ["one model: each weight once"]
    loaded = [s.stage for s in p.stages if s.loaded]
    twice = shared_weights(weights, loaded)
    if twice:
        notes = [
            "held twice, in two loaded graphs: "
            + "; ".join(
                f"{name} ({' and '.join(by)}) {_gb(b)}"
                for name, (b, by) in sorted(twice.items(), key=lambda kv: -kv[1][0])
            )
        ]
    else:
        notes = ["each weight held once: the stages read disjoint weights"]
    for s in p.stages:
        if not s.loaded:
            again = sum(b for name, (b, by) in shared_weights(weights, loaded + [s.stage]).items() if s.stage in by)
            notes.append(
                f"{s.stage} is loaded only on demand (a sampler step count other than head_sampler's, or "
                f"the step sampler): it holds the head's {_gb(again)} again (total "
                f"{_gb(p.total_bytes + s.bytes)}); not counted above"
            )
    return notes


# ---- text -------------------------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(p: MemoryPlan, targets=None) -> str:
    lines = [
        f"{p.model} at {p.width}x{p.height}, {p.precision} on {p.backend}, cache for {p.max_batch} image(s) "
        f"({p.rows} rows)"
    ]
    lines.append(f"  {'stage':<14} {'parameters':>14} {'weights':>10}  held")
    for s in p.stages:
        lines.append(f"  {s.stage:<14} {s.parameters:>14,} {_gb(s.bytes):>10}  {'yes' if s.loaded else 'on demand'}")
    streamed = f", {_gb(p.streamed_bytes)} more streamed from host memory" if p.streamed_bytes else ""
    lines.append(f"  weights held {_gb(p.weight_bytes)} (each weight once: {_gb(p.distinct_bytes)}){streamed}")
    calls = ", ".join(f"{k} {_gb(v)}" for k, v in p.activations.items())
    lines.append(
        f"  KV cache {_gb(p.kv_cache_bytes)}, activations ~{_gb(p.activation_bytes)}"
        + (f", TensorRT workspace {_gb(p.workspace_bytes)}" if p.workspace_bytes else "")
    )
    if calls:
        lines.append(f"  activations per call: {calls}")
    lines.append(f"  total {_gb(p.total_bytes)}")
    for note in p.notes:
        lines.append(f"  note: {note}")
    for t in TARGETS if targets is None else targets:
        ok, left = p.fits(t)
        what, size, reserved = TARGETS[t]
        lines.append(
            f"  {'fits' if ok else 'does not fit':<13} {what}: {_gb(size - reserved)} usable, "
            f"{_gb(abs(left))} {'left' if ok else 'short'}"
        )
    return "\n".join(lines)
