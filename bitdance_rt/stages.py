"""The stage contract: every exported graph's inputs and outputs, defined once.

(Over 400 lines: it is the single place a stage's tensors are defined, and most of it is the
per-stage TensorSpec tables.)

Export (torch -> ONNX), the ONNX Runtime backend, TensorRT optimisation profiles and
calibration all read this module, so a stage's tensor names, dtypes, shapes and dynamic ranges
cannot drift apart between them. REGISTRY says what each stage is for (StageRole), the *_stage
functions give its tensors, with static sizes from the ModelConfig and symbolic dims ("rows",
"batch", "seq": TensorSpec says what they mean). Why the contract is shaped as it is (one backbone
graph for both phases, the KV cache as read-only per-layer inputs, per-row `start` and guidance so
that continuous batching works): docs/export.md "The stage contract"; the text-to-image inputs:
docs/text-to-image.md "Stages and precision".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import ModelConfig
from .errors import BitDanceError

# The largest batch (images) the graphs, engines and scheduler take by default: defined in paths (which
# imports nothing of the package, and names a non-default export directory by it); import it from here.
from .paths import DEFAULT_MAX_BATCH

PREFIX_EMBED = "prefix_embed"
TOKEN_EMBED = "token_embed"
BACKBONE = "backbone"
HEAD_STEP = "head_step"
HEAD_SAMPLER = "head_sampler"
DECODER = "decoder"
ENCODER = "encoder"


@dataclass(frozen=True)
class StageRole:
    """What the rest of the package needs to know of a stage besides its tensors: one registry row."""

    name: str
    generation: bool  # one generation runs it (the automatic exports hold these)
    required: bool  # a backend cannot generate without it
    sampler: bool  # S baked in (the fused head sampler)
    calibrated: bool  # INT8 calibration sets record its inputs
    graph_capture: bool  # TensorRT replays it as a CUDA graph (called every AR step or more)
    int8: bool  # an INT8 variant quantises it (the fused sampler is not: precision/derive.py says why)
    int4: bool = False  # an INT4 variant quantises its weight MatMuls (weight-only: no calibration)


# The one registry of stages, in pipeline order. Every stage list elsewhere is derived from it.
REGISTRY = (
    # labels / ids -> embeddings: a table lookup (kept float: a Gather has nothing to quantise)
    StageRole(
        PREFIX_EMBED, generation=True, required=True, sampler=False, calibrated=False, graph_capture=False, int8=False
    ),
    # fed-back tokens -> embeddings (the input projection)
    StageRole(
        TOKEN_EMBED, generation=True, required=True, sampler=False, calibrated=True, graph_capture=True, int8=True
    ),
    # the transformer, for the prefill and every AR step (graph capture: the step phase)
    StageRole(
        BACKBONE,
        generation=True,
        required=True,
        sampler=False,
        calibrated=True,
        graph_capture=True,
        int8=True,
        int4=True,
    ),
    # head_step serves a sampler step count other than the fused graph's S (and the step sampler mode)
    StageRole(
        HEAD_STEP,
        generation=True,
        required=False,
        sampler=False,
        calibrated=True,
        graph_capture=True,
        int8=True,
        int4=True,
    ),
    StageRole(
        HEAD_SAMPLER,
        generation=True,
        required=False,
        sampler=True,
        calibrated=True,
        graph_capture=True,
        int8=False,
        int4=True,
    ),
    StageRole(DECODER, generation=True, required=True, sampler=False, calibrated=True, graph_capture=False, int8=True),
    # only for reconstruction and calibration data
    StageRole(
        ENCODER, generation=False, required=False, sampler=False, calibrated=False, graph_capture=False, int8=False
    ),
)
ROLES = {r.name: r for r in REGISTRY}


def _names(role: str) -> tuple[str, ...]:
    return tuple(r.name for r in REGISTRY if getattr(r, role))


ALL_STAGES = tuple(ROLES)
SAMPLER_STAGES = _names("sampler")
GENERATION_STAGES = _names("generation")
REQUIRED_STAGES = _names("required")  # plus a head sampler: the fused one or head_step
CALIBRATED_STAGES = _names("calibrated")
GRAPH_CAPTURE_STAGES = _names("graph_capture")
INT8_STAGES = _names("int8")
INT4_STAGES = _names("int4")
# Version of this contract, part of every export's cache key: graphs of an older contract are
# re-exported, never run (2: per-row `start`, one head_sampler with per-row guidance; 3: one backbone
# for both phases over the embedding stages).
CONTRACT_VERSION = 3

DEFAULT_OPT_BATCH = 4  # the batch TensorRT tunes for (Limits.opt_batch), capped at the max batch

DTYPES = ("float32", "int64")
_DIM_RE = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True)
class Limits:
    """Batch range the graphs (and TensorRT profiles) are built for; opt = the tuned size."""

    max_batch: int = DEFAULT_MAX_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH

    def __post_init__(self):
        if not (isinstance(self.max_batch, int) and self.max_batch >= 1):
            raise BitDanceError(f"max batch must be a positive integer, got {self.max_batch!r}")
        if not (isinstance(self.opt_batch, int) and 1 <= self.opt_batch <= self.max_batch):
            raise BitDanceError(f"opt batch must lie in [1, max batch={self.max_batch}], got {self.opt_batch!r}")

    def dims(self) -> dict[str, "DimRange"]:
        return {
            "rows": DimRange(1, 2 * self.opt_batch, 2 * self.max_batch),
            "batch": DimRange(1, self.opt_batch, self.max_batch),
        }

    def to_json(self) -> dict:
        return {"max_batch": self.max_batch, "opt_batch": self.opt_batch}

    @classmethod
    def from_json(cls, data: dict) -> "Limits":
        return cls(int(data["max_batch"]), int(data["opt_batch"]))


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a stage. `shape` mixes static sizes (ints, fixed by the ModelConfig) and
    symbolic dims (strings):
    - "rows": backbone / head rows; with CFG that is 2B (conditional rows first, then the null
      class), without CFG it is B. Range [1, 2 * max_batch].
    - "batch": images; range [1, max_batch].
    - "seq": the chunk length of the backbone; one value per phase (see `StageSpec.phases`):
      prefix_len at the prefill, P at every AR step.
    A dim expression is a name or "k*name"; `StageSpec.shape`/`profile` evaluate it, so a
    TensorRT profile gets consistent min/opt/max shapes for tensors that share a dim."""

    name: str
    dtype: str
    shape: tuple  # of int (static) and str (symbolic dim expression)
    doc: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "doc": self.doc}

    @classmethod
    def from_json(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], data["dtype"], tuple(data["shape"]), data.get("doc", ""))


def parse_dim(expr: str) -> tuple[int, str]:
    """'rows' -> (1, 'rows'); '2*batch' -> (2, 'batch')."""
    m = _DIM_RE.match(expr)
    if not m:
        raise ValueError(f"bad dim expression {expr!r}")
    return int(m.group(1) or 1), m.group(2)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict = field(default_factory=dict)  # symbol -> DimRange
    doc: str = ""
    # phase -> {symbol: value}: calls of one graph with different fixed sizes (the backbone's prefill
    # and step); each phase is one TensorRT optimisation profile. Empty: one profile over `dims`.
    phases: dict = field(default_factory=dict)

    # ---- lookup ------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"stage {self.name} has no tensor {name!r}")

    # ---- shapes ------------------------------------------------------------------------
    def shape(self, name: str, **values: int) -> tuple[int, ...]:
        """Concrete shape of tensor `name` for dim values, e.g. shape('kv_new', rows=4, seq=16)."""
        out = []
        for d in self.tensor(name).shape:
            if isinstance(d, int):
                out.append(d)
            else:
                k, sym = parse_dim(d)
                out.append(k * int(values[sym]))
        return tuple(out)

    @property
    def profile_phases(self) -> list[str | None]:
        """One entry per TensorRT optimisation profile: the phases in order, or [None]."""
        return list(self.phases) or [None]

    def profile(self, name: str, phase: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of an input, as a TensorRT optimisation profile wants them; a phase's
        fixed sizes (`phases`) replace their symbols' ranges."""
        if self.phases and phase not in self.phases:
            raise BitDanceError(f"stage {self.name} has phases {list(self.phases)}, not {phase!r}")
        fixed = self.phases.get(phase, {}) if phase is not None else {}
        pick = lambda attr: {s: fixed.get(s, getattr(r, attr)) for s, r in self.dims.items()}  # noqa: E731
        return self.shape(name, **pick("min")), self.shape(name, **pick("opt")), self.shape(name, **pick("max"))

    def phase_of(self, values: dict) -> str | None:
        """The phase whose fixed sizes `values` (from `match`) have; None for a stage without phases."""
        for phase, fixed in self.phases.items():
            if all(values.get(s) == v for s, v in fixed.items()):
                return phase
        return None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: dim expression}} for torch.onnx.export."""
        axes = {}
        for t in self.inputs + self.outputs:
            sym = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if sym:
                axes[t.name] = sym
        return axes

    def match(self, name: str, shape, dtype: str | None = None, known: dict | None = None) -> dict[str, int]:
        """Check a concrete shape against the contract; return the dim values it implies.

        `known` carries dim values already fixed by other tensors of the same call.
        Raises BitDanceError naming the stage, tensor and the expected shape.
        """
        spec = self.tensor(name)
        values = dict(known or {})
        shape = tuple(int(s) for s in shape)

        def fail(why: str) -> BitDanceError:
            return BitDanceError(
                f"stage {self.name}: {name} has shape {list(shape)}"
                f"{'' if dtype is None else f' ({dtype})'}, the contract wants "
                f"{list(spec.shape)} {spec.dtype}: {why}"
            )

        if dtype is not None and dtype != spec.dtype:
            raise fail(f"dtype {dtype}")
        if len(shape) != len(spec.shape):
            raise fail("wrong rank")
        for got, want in zip(shape, spec.shape):
            if isinstance(want, int):
                if got != want:
                    raise fail(f"size {got} where {want} is fixed by the model config")
                continue
            k, sym = parse_dim(want)
            if got % k:
                raise fail(f"{want} must be a multiple of {k}")
            value = got // k
            if values.setdefault(sym, value) != value:
                raise fail(f"{sym}={value} disagrees with {sym}={values[sym]} of another input")
            allowed = sorted({fixed[sym] for fixed in self.phases.values() if sym in fixed})
            if allowed:
                if value not in allowed:
                    raise fail(f"{sym}={value} is none of its phases' sizes {allowed} ({', '.join(self.phases)})")
                continue
            rng = self.dims[sym]
            if not rng.min <= value <= rng.max:
                raise fail(
                    f"{sym}={value} is outside the exported range [{rng.min}, {rng.max}] "
                    f"(re-export with a larger max batch)"
                )
        return values

    # ---- JSON (manifest) ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "name": self.name,
            "doc": self.doc,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {s: {"min": r.min, "opt": r.opt, "max": r.max} for s, r in self.dims.items()},
            **({"phases": self.phases} if self.phases else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> "StageSpec":
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            dims={s: DimRange(int(r["min"]), int(r["opt"]), int(r["max"])) for s, r in data["dims"].items()},
            doc=data.get("doc", ""),
            phases={p: {s: int(v) for s, v in fixed.items()} for p, fixed in data.get("phases", {}).items()},
        )


# ---- positions ---------------------------------------------------------------------------
def step_start(cfg: ModelConfig, step: int) -> int:
    """The backbone's `start` at AR step `step` >= 1: first cache position fed."""
    if not 1 <= step < cfg.ar_steps:
        raise BitDanceError(f"AR step {step} out of range: this model feeds tokens at steps 1..{cfg.ar_steps - 1}")
    return cfg.prefix_len + (step - 1) * cfg.parallel_num


def is_t2i(cfg) -> bool:
    return getattr(cfg, "family", "imagenet") == "t2i"


def kv_shape(cfg: ModelConfig, rows: int | str = "rows", length: int | None = None) -> tuple:
    """Cache layout [n_layer, 2, rows, kv heads, length, head_dim]; length defaults to the full L.

    The runtime's cache is one static float32 tensor of this shape, preallocated at full length
    (L = cfg.max_seq_len; the position is an input): kv[i, 0] = keys and kv[i, 1] = values of layer
    i, after RoPE (keys), position-major in L. Text-to-image models (GQA) have n_kv_head heads."""
    heads = getattr(cfg, "n_kv_head", cfg.n_head)
    return (cfg.n_layer, 2, rows, heads, cfg.max_seq_len if length is None else length, cfg.head_dim)


def step_context_names(cfg) -> list[str]:
    """Per-generation inputs of the backbone between `start` and the cache (given at the prefill, kept
    per cache slot for the steps)."""
    return ["pad"] if is_t2i(cfg) else []


def _pad_spec(cfg) -> TensorSpec:
    return TensorSpec(
        "pad",
        "int64",
        ("rows",),
        f"left padding of each row's prompt, in [0, {cfg.max_text_tokens}]: cache positions [0, pad) are hidden",
    )


def cache_input_names(cfg: ModelConfig) -> list[str]:
    """The backbone's cache inputs, in order: cache.0.key, cache.0.value, cache.1.key, ...

    Each is [rows, heads, L, head_dim], the contiguous part kv[i, 0] / kv[i, 1] of the runtime's
    cache (`kv_shape`) bound by address: one stacked input would make every graph split it into
    layers, which ONNX Runtime does by copying."""
    return [f"cache.{i}.{part}" for i in range(cfg.n_layer) for part in ("key", "value")]


# ---- the stages --------------------------------------------------------------------------
def _spec(name, inputs, outputs, limits: Limits, doc: str, phases: dict | None = None) -> StageSpec:
    used = set()
    for t in inputs + outputs:
        used |= {parse_dim(d)[1] for d in t.shape if isinstance(d, str)}
    ranges = dict(limits.dims())
    for fixed in (phases or {}).values():  # a phase-fixed symbol ranges over its phases' sizes
        for sym, v in fixed.items():
            old = ranges.get(sym)
            ranges[sym] = DimRange(v, v, v) if old is None else DimRange(min(old.min, v), old.opt, max(old.max, v))
    dims = {s: r for s, r in ranges.items() if s in used}
    return StageSpec(name, tuple(inputs), tuple(outputs), dims, doc, dict(phases or {}))


def backbone_phases(cfg) -> dict[str, dict[str, int]]:
    """The backbone's calls: the prefill (seq = prefix_len), then every AR step (seq = P); the step's
    size is the one TensorRT tunes for (opt), it runs every step.

        prefill:  prefix_embed(labels | ids)  -> x [rows, prefix_len, dim], start = 0
        AR step:  token_embed(tokens)         -> x [rows, P, dim],          start = step_start(i)

    Which keys a query sees follows from positions alone (`models/layout.chunk_visible`), so one
    graph serves both phases without a phase flag; on TensorRT one engine has one optimisation
    profile per phase (static shapes per phase: CUDA graphs stay possible)."""
    return {"prefill": {"seq": cfg.prefix_len}, "step": {"seq": cfg.parallel_num}}


def prefix_embed_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    if is_t2i(cfg):
        inputs = [
            TensorSpec(
                "ids",
                "int64",
                ("rows", cfg.prefix_len),
                "left-padded chat prompt, <|vision_start|>, <|res_h|>, <|res_w|>, <|query_1..P-1|>",
            )
        ]
        doc = "token embeddings of the prompt, image-start and query tokens"
    else:
        inputs = [
            TensorSpec(
                "labels", "int64", ("rows",), f"class ids in [0, {cfg.num_classes}]; {cfg.num_classes} = null class"
            )
        ]
        doc = "class (+ query) token embeddings"
    return _spec(
        PREFIX_EMBED,
        inputs,
        [
            TensorSpec(
                "x", "float32", ("rows", cfg.prefix_len, cfg.dim), "backbone input of positions [0, prefix_len)"
            ),
        ],
        limits,
        doc,
    )


def token_embed_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    p, c = cfg.parallel_num, cfg.token_dim
    return _spec(
        TOKEN_EMBED,
        [TensorSpec("tokens", "float32", ("rows", p, c), "+/-1 tokens of AR step i-1")],
        [
            TensorSpec("x", "float32", ("rows", p, cfg.dim), "backbone input of positions [start, start+P)"),
        ],
        limits,
        "fed-back tokens -> input projection",
    )


def backbone_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    """The transformer: `x` [rows, seq, dim] at each row's positions [start, start+seq) -> the head
    conditions and the chunk's keys/values (`kv_new`), which the runtime writes at [start, start+seq).
    It attends over all L cache positions, those at or past its row's `start` masked, plus its own
    chunk; graphs only READ the cache, so no graph copies it (an earlier kv_in -> kv_out design spent
    30-40% of the ONNX Runtime step on cache copies) and no input aliases an output (TensorRT forbids
    it; CUDA graphs want fixed buffers). A per-row `start` lets rows at different AR steps share one
    call. Text-to-image models add `pad` [rows] (each row's prompt padding, hidden from every query)
    and the 2D position embedding of the fed cells (the backbone holds that table for the head
    conditions too)."""
    p, dim = cfg.parallel_num, cfg.dim
    return _spec(
        BACKBONE,
        [
            TensorSpec("x", "float32", ("rows", "seq", dim), "embeddings of the chunk (prefix_embed / token_embed)"),
            TensorSpec(
                "start",
                "int64",
                ("rows",),
                "each row's first position of the chunk: 0 at the prefill, step_start(cfg, i) at AR step i",
            ),
            *([_pad_spec(cfg)] if is_t2i(cfg) else []),
            *(
                TensorSpec(
                    name, "float32", kv_shape(cfg)[2:], "kv[layer, 0|1]: positions [0, start[row]) valid (read only)"
                )
                for name in cache_input_names(cfg)
            ),
        ],
        [
            TensorSpec("cond", "float32", ("rows", p, dim), "head conditions of the AR step the chunk completes"),
            TensorSpec("kv_new", "float32", kv_shape(cfg, length="seq"), "keys/values of positions [start[row], +seq)"),
        ],
        limits,
        "the transformer over the cache, for the prefill and every AR step",
        backbone_phases(cfg),
    )


def head_step_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    p, c, dim = cfg.parallel_num, cfg.token_dim, cfg.dim
    return _spec(
        HEAD_STEP,
        [
            TensorSpec("x", "float32", ("rows", p, c), "x_t"),
            TensorSpec("t", "float32", ("rows",), "time in [0, 1]"),
            TensorSpec("cond", "float32", ("rows", p, dim), "head conditions"),
        ],
        [
            TensorSpec("x_pred", "float32", ("rows", p, c), "predicted clean x"),
        ],
        limits,
        "one evaluation of the diffusion head net",
    )


def head_sampler_stage(cfg: ModelConfig, steps: int, limits: Limits = Limits()) -> StageSpec:
    """The whole Euler-Maruyama sampler of one AR step, with S = `steps` baked in (noise is [S+1, ...];
    the export manifest records S). Every row carries its own guidance (`cfg`, `cond_row`,
    `uncond_row`, see sampling.sample_rows), so guided and unguided rows of requests at different AR
    steps share one call. Noise is always an input, never drawn inside a graph."""
    if not (isinstance(steps, int) and steps >= 1):
        raise BitDanceError(f"sampler steps must be a positive integer, got {steps!r}")
    p, c, dim = cfg.parallel_num, cfg.token_dim, cfg.dim
    return _spec(
        HEAD_SAMPLER,
        [
            TensorSpec("cond", "float32", ("rows", p, dim), "head conditions"),
            TensorSpec(
                "noise",
                "float32",
                (steps + 1, "rows", p, c),
                "initial x, then one draw per EM step; a guided pair's two rows hold the same draws",
            ),
            TensorSpec("cfg", "float32", ("rows",), "guidance scale of each row at its AR step"),
            TensorSpec(
                "cond_row", "int64", ("rows",), "row whose velocity is the conditional one (itself if unguided)"
            ),
            TensorSpec(
                "uncond_row", "int64", ("rows",), "row whose velocity is the unconditional one (itself if unguided)"
            ),
        ],
        [
            TensorSpec("tokens", "float32", ("rows", p, c), "+/-1 tokens; a guided pair's rows identical"),
        ],
        limits,
        f"head sampler, every row with its own guidance, S={steps}",
    )


def _image_hw(cfg) -> tuple[int, int]:
    return cfg.image_hw if hasattr(cfg, "image_hw") else (cfg.image_size, cfg.image_size)


def decoder_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    h, w = cfg.grid
    ih, iw = _image_hw(cfg)
    return _spec(
        DECODER,
        [
            TensorSpec("latent", "float32", ("batch", cfg.latent_dim, h, w), "+/-1 latent grid"),
        ],
        [
            TensorSpec("image", "float32", ("batch", cfg.vae.out_ch, ih, iw), "pixels in about [-1, 1]"),
        ],
        limits,
        "tokenizer decoder",
    )


def encoder_stage(cfg: ModelConfig, limits: Limits = Limits()) -> StageSpec:
    h, w = cfg.grid
    ih, iw = _image_hw(cfg)
    return _spec(
        ENCODER,
        [
            TensorSpec("image", "float32", ("batch", cfg.vae.in_channels, ih, iw), "pixels in [-1, 1]"),
        ],
        [
            TensorSpec(
                "latent", "float32", ("batch", cfg.latent_dim, h, w), "+1 where the encoder output > 0, else -1"
            ),
        ],
        limits,
        "tokenizer encoder with sign quantisation",
    )


def stage_spec(name: str, cfg: ModelConfig, steps: int | None = None, limits: Limits = Limits()) -> StageSpec:
    """The contract of stage `name` (sampler stages need `steps`)."""
    if name in SAMPLER_STAGES:
        if steps is None:
            raise BitDanceError(f"stage {name} needs the sampler step count S")
        return head_sampler_stage(cfg, steps, limits)
    builders = {
        PREFIX_EMBED: prefix_embed_stage,
        TOKEN_EMBED: token_embed_stage,
        BACKBONE: backbone_stage,
        HEAD_STEP: head_step_stage,
        DECODER: decoder_stage,
        ENCODER: encoder_stage,
    }
    if name not in builders:
        raise BitDanceError(f"unknown stage {name!r}: use one of {', '.join(ALL_STAGES)}")
    return builders[name](cfg, limits)


def stage_specs(
    cfg: ModelConfig, stages=ALL_STAGES, steps: int | None = None, limits: Limits = Limits()
) -> dict[str, StageSpec]:
    return {name: stage_spec(name, cfg, steps, limits) for name in stages}
