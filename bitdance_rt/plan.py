"""Memory of a model before it is loaded: what each stage's weights take at a precision, the KV
cache, an activation estimate and the TensorRT workspace, and whether that fits a GPU or a Jetson.

The weights of a stage are found, not listed: the model is built on the meta device (no memory)
and each stage's forward is run there once, recording every parameter and buffer it reads. So the
figures follow the code (a stage that stops reading a weight stops counting it) and agree with the
export (tests/test_plan.py compares them with the initialisers of real exports). Each ONNX Runtime
session and each TensorRT engine holds its own copy of the weights it reads, so a backbone read by
two stages is held twice ("held"); the torch backend runs every stage on one model ("distinct").

Bytes per weight: fp32 4; fp16 2 (GroupNorm / LayerNorm affine weights stay fp32, as the FP16
policy keeps those ops in fp32); int8: the Linear / Conv weights the INT8 policy quantises take 1
byte plus a float32 scale and an int8 zero point per output channel, the rest stays fp32
(precision/policy.py). The KV cache is float32 at every precision (runtime/core.py) and sized for
every slot: 2 rows per image with guidance, `max_batch` images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import stages as st
from .errors import BitDanceError

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
# Ops the exporter's constant folding leaves in the graph even on constant inputs (measured: a
# fused sampler keeps its time MLP's weights, and folds the sinusoidal time embeddings before it).
SHAPED = ("zeros", "ones", "full", "empty", "zeros_like", "ones_like", "full_like", "empty_like")
UNFOLDED = ("linear", "matmul", "mm", "bmm", "addmm", "conv2d", "conv1d", "embedding", "layer_norm", "group_norm",
            "rms_norm", "scaled_dot_product_attention")
PLAN_BACKENDS = ("onnxruntime", "tensorrt", "torch")
LOADED_STAGES = st.REQUIRED_STAGES + st.SAMPLER_STAGES  # what a Pipeline loads; head_step only on demand


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

    @property
    def weight_bytes(self) -> int:
        """What the backend holds: every loaded stage its own copy (ONNX Runtime, TensorRT), or each
        weight once (torch)."""
        if self.backend == "torch":
            return self.distinct_bytes
        return sum(s.bytes for s in self.stages if s.loaded)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def total_if_once(self) -> int:
        """The total with each weight held once (what a shared-weights layout of the stages gives)."""
        return self.total_bytes - self.weight_bytes + self.distinct_bytes

    def fits(self, target: str) -> tuple[bool, int]:
        """(fits, bytes left over, negative when short) on a target of TARGETS."""
        _, size, reserved = TARGETS[target]
        left = size - reserved - self.total_bytes
        return left >= 0, left


# ---- weights per stage, found on the meta device ---------------------------------------------------
def _meta_model(cfg):
    import torch

    with torch.device("meta"):
        if st.is_t2i(cfg):
            from .models.t2i import BitDanceT2I

            return BitDanceT2I(cfg).eval()
        from .models import BitDance

        return BitDance(cfg).eval()


def stage_tensors(cfg, stages=st.GENERATION_STAGES, steps: int = 2) -> dict[str, dict[str, tuple]]:
    """{stage: {tensor name: (elements, element size, leading dim, owner module type, owner name)}} of the
    tensors each stage's graph holds: its forward run once on the meta device (no memory), watched
    by a TorchFunctionMode. What a graph holds is the frontier between constants and what runs: every
    tensor no stage input flows into that an op reads together with one that does, or that a
    weight op (UNFOLDED) reads. So a weight read by a matmul counts whole, a position table indexed
    at fixed positions counts as its slice, and a sampler's unrolled time embeddings count as the
    constants they are (the exporter folds the constant side of the rest). Folded constants are
    named "<name>#N" (N: one per reading op, as the exporter folds them into each consumer), with
    owner type "constant" when no weight made them."""
    import torch
    from torch.overrides import TorchFunctionMode

    from .export.wrappers import example_inputs, stage_module

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
            else:
                source = next((self.origin[id(x)] for x in read if id(x) in self.origin), None)
                for y in made:
                    if source is not None:
                        self.origin[id(y)] = (source[0], source[1], source[2], "derived")
            return out

        def _hold(self, x) -> None:
            origin = self.origin.get(id(x))
            name, kind, owner = origin[:3] if origin is not None else ("<constant>", "constant", "")
            if origin is None or len(origin) > 3:  # a folded constant: one per op that reads it, as
                self.constants += 1  # the exporter folds it into each consumer (weights stay shared)
                name = f"{name}#{self.constants}"
            self.held[name] = (x.numel(), x.element_size(), x.shape[0] if x.dim() else 1, kind, owner)

    specs = st.stage_specs(cfg, stages, steps=steps)
    out = {}
    for name, spec in specs.items():
        inputs = tuple(x.to("meta") for x in example_inputs(spec, model, batch=1))
        frontier = Frontier(inputs)
        with torch.no_grad(), frontier:
            stage_module(name, model)(*inputs)
        out[name] = frontier.held
    return out


def _int8_float(stage: str, owner: str) -> bool:
    from .precision.policy import INT8_FLOAT_LAYERS

    dotted = "." + owner + "."
    return any(p.replace("/", ".") in dotted for p in INT8_FLOAT_LAYERS.get(stage, ()))


def tensor_bytes(precision: str, stage: str, name: str, numel: int, size: int, kind: str, owner: str,
                 shape_out: int | None = None) -> int:
    """Bytes of one weight in a graph of `precision` (the module docstring's rules)."""
    if size != 4:  # integer buffers (index tables) keep their type
        return numel * size
    if precision == "fp32":
        return numel * 4
    if precision == "fp16":
        return numel * (4 if kind in ("GroupNorm", "LayerNorm") else 2)
    if precision == "int8":
        weight = name.endswith(".weight") and kind in ("Linear", "Conv2d")
        if weight and not _int8_float(stage, owner):
            return numel + (shape_out or 0) * 5  # int8 values + a float32 scale and an int8 zero point per channel
        return numel * 4
    raise BitDanceError(f"precision {precision!r}: plan fp32, fp16 or int8")


def stage_memory(cfg, precision: str, steps: int | None = None) -> tuple[list[StageMemory], int]:
    """(per stage memory, distinct bytes) at `precision`; the fused sampler of `steps` sampler steps
    (default: the model's), whose unrolled time constants grow with it."""
    steps = cfg.default_steps if steps is None else int(steps)
    rows, seen = [], {}
    tensors = stage_tensors(cfg, steps=steps)
    for stage, reads in tensors.items():
        total, params = 0, 0
        for name, (numel, size, channels, kind, owner) in reads.items():  # (a weight's leading dim: its outputs)
            b = tensor_bytes(precision, stage, name, numel, size, kind, owner, channels)
            total += b
            params += numel
            key = (stage, name) if "#" in name else name  # a graph's own constants are its own
            seen[key] = max(seen.get(key, 0), b)
        rows.append(StageMemory(stage, params, total, stage in LOADED_STAGES))
    return rows, sum(seen.values())


# ---- cache and activations ---------------------------------------------------------------------------
def kv_cache_bytes(cfg, rows: int) -> int:
    """The runtime's cache (float32, stages.kv_shape) for `rows` slots."""
    n = 1
    for d in st.kv_shape(cfg, rows):
        n *= d
    return n * 4


def activation_bytes(cfg, rows: int, precision: str) -> int:
    """An estimate of the peak activations: the largest of prefill (the FFN of every prefix position,
    the attention scores), the step and the head, plus the decoder of one image (it may run beside the
    AR steps on a GPU): its top-resolution feature maps (input, output, residual)."""
    e = 2 if precision == "fp16" else 4
    dim = cfg.dim
    ffn = cfg.llm.intermediate_size if st.is_t2i(cfg) else 4 * dim
    heads, length, p = cfg.n_head, cfg.max_seq_len, cfg.parallel_num
    prefill = rows * cfg.prefix_len * (2 * ffn + 4 * dim) * e + rows * heads * cfg.prefix_len * length * 4
    step = rows * p * (2 * ffn + 4 * dim) * e + rows * heads * p * length * 4
    head_width = cfg.head.ch_latent if st.is_t2i(cfg) else cfg.diff_dim
    head = 8 * rows * p * head_width * e
    h, w = cfg.image_hw if st.is_t2i(cfg) else (cfg.image_size, cfg.image_size)
    decoder = 3 * cfg.vae.ch * cfg.vae.ch_mult[0] * h * w * e
    return max(prefill, step, head) + decoder


def plan(cfg, precision: str = "fp32", backend: str = "onnxruntime", max_batch: int = 1, guided: bool = True,
         workspace_mb: int | None = None, steps: int | None = None) -> MemoryPlan:
    """The memory of `cfg` on `backend` at `precision`, with cache slots for `max_batch` images."""
    if backend not in PLAN_BACKENDS:
        raise BitDanceError(f"backend {backend!r}: plan one of {', '.join(PLAN_BACKENDS)}")
    if max_batch < 1:
        raise BitDanceError(f"max batch must be >= 1, got {max_batch}")
    rows = max_batch * (2 if guided else 1)
    stages, distinct = stage_memory(cfg, precision, steps)
    workspace = (1024 if workspace_mb is None else int(workspace_mb)) * 2**20 if backend == "tensorrt" else 0
    h, w = cfg.image_hw if st.is_t2i(cfg) else (cfg.image_size, cfg.image_size)
    notes = []
    if backend != "torch":
        notes.append("each session / engine holds its own copy of the weights it reads (prefill and backbone_step "
                     "both hold the backbone)")
    return MemoryPlan(cfg.name, backend, precision, h, w, max_batch, rows, stages, distinct,
                      kv_cache_bytes(cfg, rows), activation_bytes(cfg, rows, precision), workspace, notes)


# ---- text -------------------------------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def format_plan(p: MemoryPlan, targets=None) -> str:
    lines = [f"{p.model} at {p.width}x{p.height}, {p.precision} on {p.backend}, cache for {p.max_batch} image(s) "
             f"({p.rows} rows)"]
    lines.append(f"  {'stage':<14} {'parameters':>14} {'weights':>10}  held")
    for s in p.stages:
        lines.append(f"  {s.stage:<14} {s.parameters:>14,} {_gb(s.bytes):>10}  {'yes' if s.loaded else 'on demand'}")
    lines.append(f"  weights held {_gb(p.weight_bytes)} (each weight once: {_gb(p.distinct_bytes)})")
    lines.append(f"  KV cache {_gb(p.kv_cache_bytes)}, activations ~{_gb(p.activation_bytes)}"
                 + (f", TensorRT workspace {_gb(p.workspace_bytes)}" if p.workspace_bytes else ""))
    lines.append(f"  total {_gb(p.total_bytes)}" + (f" (with each weight held once: {_gb(p.total_if_once)})"
                                                    if p.total_if_once != p.total_bytes else ""))
    for note in p.notes:
        lines.append(f"  note: {note}")
    for t in (TARGETS if targets is None else targets):
        ok, left = p.fits(t)
        what, size, reserved = TARGETS[t]
        lines.append(f"  {'fits' if ok else 'does not fit':<13} {what}: {_gb(size - reserved)} usable, "
                     f"{_gb(abs(left))} {'left' if ok else 'short'}")
    return "\n".join(lines)
