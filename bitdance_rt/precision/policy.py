"""What stays in float32 when a stage graph is converted to FP16 or quantised to INT8: the one list.

Both conversions keep the graph's inputs and outputs float32 (the stage contract does not change
with precision, so every backend and the calibration data serve every precision). INT8 is explicit
Q/DQ, the placement TensorRT's explicit quantization expects: the inputs of weight GEMMs and
convolutions are quantised (INT8_OP_TYPES, but for INT8_FLOAT_LAYERS) with symmetric int8
activations (zero point 0) and per-output-channel symmetric int8 weights; every other op has float
inputs and outputs by construction. FP16 runs everything in FP16 but FP16_KEEP_FLOAT_OPS, the
RMSNorm square (fp16.norm_squares) and a fused sampler's own arithmetic (`sampler_arithmetic`);
BF16 is the same placement in BFLOAT16 (`bf16_float_ops`: what ONNX has no BF16 form of stays FP32).
The comment at each list says why; the whole policy with its measurements: docs/precision.md
"How the variants are made".
"""

from __future__ import annotations

from .. import stages as st

# The graph precisions, and the default: the one definition (backends, the CLI, engine builds and the
# plan import them). TensorRT engine precisions are another list: engines/cache.py ENGINE_PRECISIONS.
# In order of falling precision (bf16: 8 significant bits to FP16's 11, with FP32's range; int4: of the weights).
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
DEFAULT_PRECISION = "fp32"

# INT8 quantises the inputs of these when they hold a weight (MatMul: a constant weight). Biases stay
# float (TensorRT fuses a float bias; an int32 bias only suits ONNX Runtime's integer kernels). Every
# other op (norms of the transformer stages, softmax, residual adds, the attention products of two
# activations, the sampler's update arithmetic and sign) has float inputs and outputs.
INT8_OP_TYPES = ("MatMul", "Gemm", "Conv")
# Convolution outputs are quantised too: ONNX Runtime's CPU integer convolution (QLinearConv) exists
# only with an int8 output, and without it the INT8 decoder ran slower than the FP32 one (B-4x: 7.0 s
# vs 6.2 s per image); TensorRT fuses that Q into the conv. So the decoder's norms read int8-rounded
# conv outputs.
INT8_OUTPUT_OP_TYPES = ("Conv",)

# Quantisable layers the policy keeps in float anyway, by stage (substrings of exported node names).
# The backbone's feed-forward down-projection (w2) reads SiLU(gate) * up, the most heavy-tailed
# activation of the block, where one per-tensor int8 scale loses the most. Measured on the embedded
# model (contract 2, when the AR steps had their own backbone graph), teacher forced over 4 held-out
# noise seeds: step bit agreement 98.7% all-INT8, 99.2% with w2 float (next best single family,
# attention wo: 98.8%); w2 is ~20% of the backbone's weights. One backbone graph now serves the
# prefill and the steps, so the one rule covers both.
INT8_FLOAT_LAYERS = {st.BACKBONE: ("/feed_forward/w2/",)}
if not set(INT8_FLOAT_LAYERS) <= set(st.INT8_STAGES):  # a rule for no INT8 stage would be dropped without a word
    raise RuntimeError(
        f"INT8_FLOAT_LAYERS names stages {sorted(set(INT8_FLOAT_LAYERS) - set(st.INT8_STAGES))} "
        f"that INT8 does not quantise ({', '.join(st.INT8_STAGES)})"
    )

# Stages generation needs that INT8 does not quantise: an INT8 export carries their FP16 graphs.
# (prefix_embed is a table lookup: a Gather has no weight GEMM to quantise. FP16 halves the table,
# the text-to-image models' largest after the backbone (Qwen3-14B's: 0.78B values, 2.9 GiB in FP32),
# and loses nothing of their BF16 checkpoints' values but below FP16's normal range, 6e-5, where the
# error stays under 3e-8; measured on the trained ImageNet model it keeps >= 99.5% of the tokens,
# tests/test_precision.py.)
INT8_FP16_STAGES = tuple(s for s in st.REQUIRED_STAGES if s not in st.INT8_STAGES)


# INT4 (weight-only, precision/int4.py): every weight MatMul of st.INT4_STAGES (the backbone, the head
# and its fused sampler) becomes 4-bit blocks of INT4_BLOCK values along K with one float scale each;
# activations stay float32. Measured on the embedded model, eval over 3 seeds against FP32 (2-core EPYC,
# 2026-12-06; docs/precision.md "INT4"): blocks of 16 keep the Frechet distance within 1.15x of FP32's
# on every seed (1.13 / 1.10 / 1.01x), blocks of 32 not (1.17x on seed 0), of 64 far from it (1.16-1.23x).
# Kept float: the head's time-embedding MLP (sinusoidal features of t in, the conditioning of every block
# out): with it INT4 the distance rose to 69.3 on seed 0 (64.2 without). The head's input and output
# projections in float changed nothing measurable (FD 64.2 / 60.4 / 56.2 float, 63.6 / 60.8 / 56.1 INT4),
# so they are INT4. `--keep-float` adds layers.
INT4_BLOCK = 16
# TensorRT runs INT4 as weight-only GEMMs with blocks of 64 or 128 only (NVIDIA, "Quantization Schemes",
# docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-schemes.html) and
# takes no MatMulNBits: its INT4 graphs ("qdq", int4.quantize_int4_qdq) are the FP16 graph with INT4
# weights in blocks of 128 (64 where K is no multiple of 128; neither: the layer stays FP16) and FP16
# scales. Blocks that large cost the embedded model accuracy (ONNX Runtime, blocks of 64: FD 1.16-1.23x
# FP32, above); LLMs of the 14B's widths are commonly served at 128. ONNX Runtime's graphs: "matmulnbits".
INT4_TRT_BLOCKS = (128, 64)
INT4_FORMATS = {"onnxruntime": "matmulnbits", "tensorrt": "qdq"}  # INT4 graph format by the runtime that runs it
INT4_FLOAT_LAYERS = {st.HEAD_STEP: ("/head/net/time_embed/",), st.HEAD_SAMPLER: ("/head/net/time_embed/",)}
# Stages generation needs that INT4 does not quantise: an INT4 export carries their FP16 graphs, as INT8's.
INT4_FP16_STAGES = tuple(s for s in st.REQUIRED_STAGES if s not in st.INT4_STAGES)


def int4_layers(stage: str, layers) -> list[str]:
    """The names among `layers` (weight MatMuls of `stage`) that INT4 quantises: all but
    INT4_FLOAT_LAYERS' (the caller takes out its own keep-float layers); a stage INT4 does not
    quantise: none."""
    if stage not in st.INT4_STAGES:
        return []
    patterns = INT4_FLOAT_LAYERS.get(stage, ())
    return [name for name in layers if not any(p in name for p in patterns)]


def int8_float_layers(stage: str, layers) -> list[str]:
    """The names among `layers` (quantisable nodes of `stage`) that INT8_FLOAT_LAYERS keeps float."""
    patterns = INT8_FLOAT_LAYERS.get(stage, ())
    return [name for name in layers if any(p in name for p in patterns)]


def quantised_layers(path) -> list[str]:
    """Names of the nodes of an FP32 graph (a file, or an onnx.ModelProto) our INT8 policy quantises
    (weight MatMul, Gemm, Conv)."""
    import onnx

    graph = path.graph if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return [
        n.name for n in graph.node if n.op_type in INT8_OP_TYPES and (n.op_type != "MatMul" or n.input[1] in weights)
    ]


CALIBRATION_METHODS = ("max", "entropy", "percentile")

# FP16: everything runs in FP16 except these ops, which see FP32 inputs: norm reductions and their
# statistics (LayerNormalization, InstanceNormalization, the RMSNorm's ReduceMean / Sqrt / Reciprocal,
# Pow); softmax, and the split softmax of the backbone's attention (ReduceMax, Exp, ReduceSum); Sin / Cos
# of the time and position embeddings (their arguments reach 1e3: FP16 would keep 3 digits). Kept FP32
# by node besides: the RMSNorm square (fp16.norm_squares) and, in the fused head samplers, every node
# outside the head net: the Euler-Maruyama update, the CFG mix and the final Sign (`sampler_arithmetic`).
FP16_KEEP_FLOAT_OPS = (
    "LayerNormalization",
    "InstanceNormalization",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Softmax",
    "ReduceMax",
    "Exp",
    "ReduceSum",
    "Sin",
    "Cos",
)

HEAD_NET_SCOPE = "/head/"  # TorchScript export names nodes by module path; the head net lives here


def sampler_arithmetic(nodes) -> list[str]:
    """Names of the nodes of a fused sampler graph outside the head net: the sampler's own maths.
    (Identity nodes, the exporter's aliases of shared weights, are not maths.)"""
    return [n.name for n in nodes if n.name and n.op_type != "Identity" and not n.name.startswith(HEAD_NET_SCOPE)]


# BF16 (precision/bf16.py): FP16's placement with BFLOAT16 for FLOAT16, but an op whose ONNX schema at
# the graph's opset takes float16 and not bfloat16 computes in FP32 between Casts: in BF16 it would not
# be valid ONNX (the checker and ONNX Runtime refuse the graph). At the exports' opset 17 these are Conv
# (BF16 from opset 22, and TensorRT 10.3 reads opsets up to 20), so the decoder's convolutions and
# their weights stay FP32, and ConstantOfShape (from opset 20), the attention mask's fill.
def bf16_float_ops(op_types, opset: int) -> tuple[str, ...]:
    """FP16_KEEP_FLOAT_OPS and those of `op_types` (ONNX domain) whose schema at `opset` has a type
    parameter that takes float16 but not bfloat16."""
    from onnx import defs

    def no_bf16(op):
        if not defs.has(op):
            return False
        schema = defs.get_schema(op, opset)
        return any(
            "tensor(float16)" in c.allowed_type_strs and "tensor(bfloat16)" not in c.allowed_type_strs
            for c in schema.type_constraints
        )

    return FP16_KEEP_FLOAT_OPS + tuple(op for op in sorted(set(op_types) - set(FP16_KEEP_FLOAT_OPS)) if no_bf16(op))


POLICY_VERSION = 8  # bump when a conversion setting changes: derived exports are keyed by it (7: contract 3 stages;
# 8: RMSNorm squares in FP32, INT8 exports' prefix_embed in FP16)


def fingerprint(precision: str, int4_format: str = "matmulnbits") -> dict:
    """What of the policy a derived export depends on (part of its manifest key)."""
    if precision == "int4":
        qdq = int4_format == "qdq"
        return {
            "version": POLICY_VERSION,
            "quantised": "weight MatMuls, 4-bit symmetric round-to-nearest",
            "format": int4_format,
            "block": list(INT4_TRT_BLOCKS) if qdq else INT4_BLOCK,
            "scales": "float16" if qdq else "float32",
            "float_layers": {k: list(v) for k, v in sorted(INT4_FLOAT_LAYERS.items())},
            "fp16_stages": list(INT4_FP16_STAGES),
        }
    if precision == "int8":
        return {
            "version": POLICY_VERSION,
            "quantised_ops": list(INT8_OP_TYPES),
            "quantised_outputs": list(INT8_OUTPUT_OP_TYPES),
            "float_layers": {k: list(v) for k, v in sorted(INT8_FLOAT_LAYERS.items())},
            "fp16_stages": list(INT8_FP16_STAGES),
        }
    half = {
        "version": POLICY_VERSION,
        "fp32_ops": list(FP16_KEEP_FLOAT_OPS),
        "sampler_arithmetic": "fp32",
        "fp32_nodes": "rms_norm squares",
    }
    if precision == "bf16":  # FP16's placement in BFLOAT16 (precision/bf16.py)
        half.update(type="bfloat16", fp32_without_bf16="ops with no bfloat16 at the graph's opset (bf16_float_ops)")
    return half


def check_precision(precision: str) -> str:
    from ..errors import BitDanceError

    if precision not in PRECISIONS:
        raise BitDanceError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def int4_format(runtime: str | None) -> str:
    """The INT4 graph format the backend `runtime` runs (None: ONNX Runtime's)."""
    from ..errors import BitDanceError

    if runtime not in (None, *INT4_FORMATS):
        raise BitDanceError(f"INT4 graphs for {runtime!r}: INT4 runs on {' or '.join(INT4_FORMATS)}")
    return INT4_FORMATS[runtime or "onnxruntime"]


def check_method(method: str) -> str:
    from ..errors import BitDanceError

    if method not in CALIBRATION_METHODS:
        raise BitDanceError(f"calibration method {method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    return method
