"""BF16 graphs (precision/bf16.py): the FP16 variant's placement in BFLOAT16, values rounded from the
FP32 ones, what they compute, where they run (TensorRT and torch on a GPU; refused on ONNX Runtime's
CPU provider), the TensorRT lint and plan, `bitdance-rt export --precision bf16`, and text-to-image
BF16 graphs streamed from the weight files (precision/streamed.py), equal to the derived ones.

ONNX Runtime's CPU provider has no BF16 MatMul, so the numerics are checked with ONNX's reference
evaluator. The embedded model's graphs are the session's 4-step export (conftest
embedded_cache_template_s4): a small fused sampler converts in about a second.
(Over 400 lines: one test per place BF16 reaches, from the placement to the streamed export, sharing
this module's fixtures.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from bitdance_rt import paths  # noqa: E402
from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.backends import BackendOptions, auto_export, make_backend, resolve_model  # noqa: E402
from bitdance_rt.engines.options import PrecisionPlan, plan_precision  # noqa: E402
from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.export import read_manifest  # noqa: E402
from bitdance_rt.precision.bf16 import convert_bf16, convert_bf16_file, to_bf16  # noqa: E402
from bitdance_rt.precision.fp16 import convert_fp16  # noqa: E402
from bitdance_rt.precision.policy import FP16_KEEP_FLOAT_OPS, bf16_float_ops  # noqa: E402

from conftest import REPO, T2I_STEPS, T2I_TEXT_TOKENS, copy_cache, torch_threads  # noqa: E402

S = 4  # sampler steps of the session's export used here
FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
NO_BF16 = {"Conv", "ConstantOfShape"}  # what ONNX opset 17 (the exports') has no bfloat16 type for


@pytest.fixture(scope="module")
def cache(embedded_cache_template_s4, tmp_path_factory):
    """This module's cache root: a copy of the session's, holding the embedded model's FP32 export (S=4)."""
    return copy_cache(embedded_cache_template_s4, tmp_path_factory.mktemp("bf16") / "cache")


@pytest.fixture(scope="module")
def fp32_dir(cache):
    source = resolve_model(None, None, None, None, None, None)
    with paths.using_cache_root(cache):
        return paths.export_dir(source.config, source.weights_source(), S)


@pytest.fixture(scope="module")
def pairs(fp32_dir):
    """{stage: (FP16 graph, BF16 graph)}, each converted in memory from the FP32 export's graph."""
    out = {}
    for stage in read_manifest(fp32_dir)["key"]["stages"]:
        model = onnx.load(str(fp32_dir / f"{stage}.onnx"), load_external_data=False)
        sampler = stage in st.SAMPLER_STAGES
        out[stage] = (convert_fp16(model, sampler, fp32_dir), convert_bf16(model, sampler, fp32_dir))
    return out


@pytest.fixture(scope="module")
def exported(cache, tmp_path_factory):
    """(`bitdance-rt export --precision bf16 --steps 4 --out DIR`'s completed process, DIR), on this CPU."""
    out = tmp_path_factory.mktemp("bf16-export") / "bf16"
    res = subprocess.run(
        [sys.executable, "-m", "bitdance_rt", "export", "--precision", "bf16", "--steps", str(S), "--out", str(out)],
        env={**os.environ, "BITDANCE_RT_CACHE": str(cache)},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    return res, out


def _types(graph) -> dict[str, int]:
    """The element type of every named tensor: inputs, outputs, value_info, initialisers, Constant outputs."""
    out = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    out.update({t.name: t.data_type for t in graph.initializer})
    out.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant" for a in n.attribute})
    return out


def _wiring(node) -> tuple:
    return node.name, node.op_type, list(node.input), list(node.output)


def _bits(t) -> np.ndarray:
    """The raw 16-bit words of an inline BFLOAT16 tensor."""
    assert t.data_type == BFLOAT16 and t.HasField("raw_data"), t.name
    return np.frombuffer(t.raw_data, np.uint16)


def _torch_bf16(values) -> np.ndarray:
    """torch's float32 -> bfloat16 rounding, as raw 16-bit words: the expectation."""
    return torch.from_numpy(np.array(values, np.float32)).to(torch.bfloat16).view(torch.int16).numpy()


# ---- (a) placement -----------------------------------------------------------------------------------------
def test_what_stays_fp32_beyond_fp16s_list_is_what_onnx_has_no_bf16_for():
    ops = ["Conv", "ConstantOfShape", "MatMul", "Gemm", "Add", "Where", "Gather", "Sigmoid", "Sin", "Softmax"]
    assert set(bf16_float_ops(ops, 17)) - set(FP16_KEEP_FLOAT_OPS) == NO_BF16
    assert bf16_float_ops(ops, 22) == FP16_KEEP_FLOAT_OPS  # (Conv takes bfloat16 from opset 22, ConstantOfShape 20)


def test_bf16_placement_is_the_fp16_placement(pairs):
    """Every tensor FLOAT16 in the FP16 graph is BFLOAT16 in the BF16 one and every other type is kept,
    node for node; the exceptions: graph outputs are float32 in both (fp16._float_outputs), and the ops
    ONNX has no BF16 form of (NO_BF16) read their weights in FP32, between Casts the BF16 graph adds."""
    for stage, (fp16, bf16) in pairs.items():
        g16, gb = fp16.graph, bf16.graph
        t16, tb = _types(g16), _types(gb)
        assert FLOAT16 not in tb.values(), stage
        outputs = {v.name for v in g16.output}
        assert [v.type.tensor_type.elem_type for v in (*gb.input, *gb.output)] == [
            FLOAT if v.type.tensor_type.elem_type == FLOAT16 else v.type.tensor_type.elem_type
            for v in (*g16.input, *g16.output)
        ], stage
        kept = {n.op_type for n in gb.node} & NO_BF16
        if not kept:  # node for node: same names, ops, wiring, attributes but the Cast targets
            assert len(gb.node) == len(g16.node), stage
            for a, b in zip(g16.node, gb.node):
                assert _wiring(a) == _wiring(b), stage
                if a.op_type == "Cast":
                    to = (
                        FLOAT if a.output[0] in outputs else {FLOAT16: BFLOAT16}.get(a.attribute[0].i, a.attribute[0].i)
                    )
                    assert b.attribute[0].i == to, (stage, a.name)
            assert t16.keys() == tb.keys(), stage
        fp32_weights = {i for n in gb.node if n.op_type in kept for i in n.input} & {t.name for t in gb.initializer}
        for name, t in t16.items():
            if name in outputs:
                assert tb[name] == (FLOAT if t == FLOAT16 else t), (stage, name)
            elif name in fp32_weights:
                assert (t, tb[name]) == (FLOAT16, FLOAT), (stage, name)
            elif name in tb:
                assert tb[name] == (BFLOAT16 if t == FLOAT16 else t), (stage, name, t, tb[name])
            else:  # by a Cast of the FP16 graph around a kept op, not needed where the op reads FP32 itself
                casts = [n for n in g16.node if n.op_type == "Cast" and name in (*n.input, *n.output)]
                assert kept and casts, (stage, name)
        nodes16 = {(n.name, n.op_type) for n in g16.node}
        extra = [n for n in gb.node if (n.name, n.op_type) not in nodes16]
        assert all(n.op_type == "Cast" for n in extra), (stage, extra)
        assert {(n.name, n.op_type) for n in gb.node} >= {x for x in nodes16 if x[1] != "Cast"}, stage
    assert {n.op_type for _, bf16 in pairs.values() for n in bf16.graph.node} & NO_BF16 == NO_BF16


# ---- (b) values ----------------------------------------------------------------------------------------------
def test_bf16_values_are_torchs_rounding_of_the_fp32_values(fp32_dir, pairs):
    """Every BFLOAT16 initialiser and Constant is torch's `.to(torch.bfloat16)` of the FP32 export's
    tensor of that name (Constant: of that node), bit for bit."""
    for stage, (_, bf16) in pairs.items():
        fp32 = onnx.load(str(fp32_dir / f"{stage}.onnx")).graph  # (with its external data)
        weights = {t.name: numpy_helper.to_array(t) for t in fp32.initializer}
        constants = {
            n.name: numpy_helper.to_array(a.t) for n in fp32.node if n.op_type == "Constant" for a in n.attribute
        }
        got = [(t.name, _bits(t), weights[t.name]) for t in bf16.graph.initializer if t.data_type == BFLOAT16]
        got += [
            (n.name, _bits(a.t), constants[n.name])
            for n in bf16.graph.node
            if n.op_type == "Constant"
            for a in n.attribute
            if a.t.data_type == BFLOAT16
        ]
        assert got, stage
        for name, bits, values in got:
            assert np.array_equal(bits, _torch_bf16(values).view(np.uint16).ravel()), (stage, name)


def test_to_bf16_rounds_as_torch_and_keeps_fp32s_range():
    """Round to nearest even as torch does, on random bit patterns and the edges; no FP16-style clamp."""
    words = np.random.default_rng(0).integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00000001, 0x80000000, 0x7F800000], np.uint32)
    values = np.concatenate([words, edges]).view(np.float32)
    finite = ~np.isnan(values)
    got = to_bf16(values)
    assert np.array_equal(got[finite], _torch_bf16(values).view(np.uint16)[finite])
    assert np.isnan(torch.from_numpy(got[~finite].view(np.int16)).view(torch.bfloat16).float().numpy()).all()
    big_small = np.array([1e5, -3e38, 1e-9, -1e-30], np.float32)  # FP16's converter clamps these to 1e4 / 1e-7
    back = torch.from_numpy(to_bf16(big_small).view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(back, big_small, rtol=2**-8)


def test_a_large_external_tensor_streams_to_bf16(tmp_path):
    """The chunked path of graphs over 2 GB (fp16.convert_fp16_file's): a tensor of 1 MiB or more is
    converted from the source's external data into the output's, a small one inline; both bit for bit
    torch's rounding of the float32 values, which FP16's converter would have clamped."""
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((512, 1024)) * 3e4).astype(np.float32)  # 2 MiB, past FP16's 1e4 clamp
    scale = np.array([1e5, 2.5e-9, -7.0, 0.1], np.float32)
    (tmp_path / "src.onnx.data").write_bytes(table.tobytes())
    t = TensorProto(name="table", data_type=FLOAT, dims=table.shape, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "src.onnx.data"), ("offset", "0"), ("length", str(table.nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="gather"),
            helper.make_node("Reshape", ["rows", "shape"], ["parts"], name="reshape"),
            helper.make_node("Mul", ["parts", "scale"], ["x"], name="mul"),
        ],
        "big",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("x", FLOAT, ["n", 256, 4])],
        [t, numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(np.array([-1, 256, 4]), "shape")],
    )
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "src.onnx"))
    files = convert_bf16_file(tmp_path / "src.onnx", tmp_path / "dst.onnx", external_bytes=1 << 20)
    assert files == ["dst.onnx", "dst.onnx.data"]
    out = onnx.load(str(tmp_path / "dst.onnx"), load_external_data=False).graph
    held = {t.name: t for t in out.initializer}
    assert held["table"].data_location == TensorProto.EXTERNAL and held["scale"].data_location != TensorProto.EXTERNAL
    info = {e.key: e.value for e in held["table"].external_data}
    raw = (tmp_path / info["location"]).read_bytes()[int(info.get("offset", 0)) :][: int(info["length"])]
    assert np.array_equal(np.frombuffer(raw, np.uint16), _torch_bf16(table).view(np.uint16).ravel())
    assert np.array_equal(_bits(held["scale"]), _torch_bf16(scale).view(np.uint16))
    ids = np.array([0, 255, 511], np.int64)
    got = ReferenceEvaluator(str(tmp_path / "dst.onnx")).run(None, {"ids": ids})[0]
    want = (table[ids].reshape(-1, 256, 4) * scale).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2**-6)


# ---- (c) numerics ---------------------------------------------------------------------------------------------
def _emulated(bf16) -> onnx.ModelProto:
    """An FP32 copy of a BF16 graph in which every BF16 tensor is rounded to BF16 where it is made (a
    Cast to BFLOAT16 and back): what the BF16 graph computes, runnable on ONNX Runtime's CPU provider."""
    model = onnx.ModelProto()
    model.CopyFrom(bf16)
    g = model.graph
    rounded = {v.name for v in g.value_info if v.type.tensor_type.elem_type == BFLOAT16}
    for t in g.initializer:
        if t.data_type == BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.HasField("t") and a.t.data_type == BFLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
            if n.op_type == "Cast" and a.name == "to" and a.i == BFLOAT16:
                a.i = FLOAT
        nodes.append(n)
        for i, name in enumerate(n.output):
            if name in rounded:
                n.output[i] = f"{name}/exact"
                nodes.append(helper.make_node("Cast", [f"{name}/exact"], [f"{name}/bf16"], to=BFLOAT16))
                nodes.append(helper.make_node("Cast", [f"{name}/bf16"], [name], to=FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


def test_bf16_head_step_computes_fp32s_function_in_bf16(fp32_dir, pairs):
    """ONNX's reference evaluator runs the BF16 head_step. It agrees with the same graph in FP32 with
    every BF16 tensor rounded where it is made (on ONNX Runtime) to within 2^-5 of the output's scale:
    each rounding is 2^-9 relative, and the evaluator rounds inside some ops too (Gemm's product before
    its bias), so the two drift by a few units over the net's layers (measured 1.5%). Against the FP32
    graph it is off by more than the FP16 graph and by at most 8% (measured 2.8%, FP16 0.2%)."""
    fp16, bf16 = pairs[st.HEAD_STEP]
    rng = np.random.default_rng(2)
    feeds = {  # 6 rows of noise x, time t in [0, 1), condition
        v.name: rng.standard_normal([d.dim_value or 6 for d in v.type.tensor_type.shape.dim]).astype(np.float32)
        for v in bf16.graph.input
    }
    feeds["t"] = rng.uniform(0, 1, feeds["t"].shape).astype(np.float32)
    got = ReferenceEvaluator(bf16).run(None, feeds)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # (keep every rounding)
    want, half, exact = (
        ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for graph in (_emulated(bf16).SerializeToString(), fp16.SerializeToString(), str(fp32_dir / "head_step.onnx"))
    )
    assert got.dtype == np.float32 and got.shape == exact.shape
    scale = float(np.abs(exact).max())
    assert float(np.abs(got - want).max()) <= 2**-5 * scale
    assert float(np.abs(half - exact).max()) < float(np.abs(got - exact).max()) <= 0.08 * scale


# ---- (d) where it runs ------------------------------------------------------------------------------------------
def test_bf16_on_the_cpu_is_refused_in_one_line_before_anything_is_exported(exported, tmp_path):
    source = resolve_model(None, None, None, None, None, None)
    with paths.using_cache_root(tmp_path):
        for opts, where in (
            (BackendOptions(backend="onnxruntime", precision="bf16"), "ONNX Runtime's CPU provider"),
            (BackendOptions(backend="torch", precision="bf16"), "runs on a CUDA GPU"),
        ):
            with pytest.raises(BitDanceError) as refused:
                make_backend(source, S, opts)
            message = str(refused.value)
            assert "\n" not in message and where in message and "tensorrt" in message, message
    assert not any(tmp_path.iterdir())  # refused before exporting anything
    _, directory = exported
    with pytest.raises(BitDanceError, match="ONNX Runtime's CPU provider"):  # a BF16 export directory given
        make_backend(source, S, BackendOptions(backend="onnxruntime", export_dir=str(directory)))


# ---- (e) TensorRT: the precision plan and the build ----------------------------------------------------------------
@pytest.mark.parametrize("trt", ["10.3.0", "11.0.0"])
def test_bf16_graphs_build_strongly_typed_bf16_engines(trt):
    for asked in (None, "bf16"):
        assert plan_precision("bf16", asked, trt) == PrecisionPlan("bf16", "bf16", strongly_typed=True)
    for graph in ("fp32", "fp16"):
        with pytest.raises(BitDanceError, match=f"holds {graph} graphs, which cannot give a bf16 engine"):
            plan_precision(graph, "bf16", trt)
    with pytest.raises(BitDanceError, match="holds bf16 graphs, which cannot give a fp16 engine"):
        plan_precision("bf16", "fp16", trt)


class _Toolkit:
    """engines.build's TensorRT as far as build_engines uses it: records the plans, returns bytes."""

    version = "10.3.0"

    def __init__(self, gpu):
        from bitdance_rt.engines.build import GpuInfo

        self.gpu, self.plans = GpuInfo(*gpu), []

    def build(self, onnx_path, plan, profiles, workspace, level, timing_cache):
        self.plans.append(plan)
        return b"engine"


def test_bf16_engines_build_on_ampere_and_later_only(exported, tmp_path):
    from bitdance_rt.engines.build import build_engines

    _, directory = exported
    orin = _Toolkit(("Orin", "8.7"))  # JetPack 6: TensorRT 10.3 on an Ampere GPU
    built = build_engines(directory, root=tmp_path, toolkit=orin)  # (linted first)
    assert built and len(orin.plans) == len(built)
    assert {(p.precision, p.strongly_typed, p.builder_flags) for p in orin.plans} == {("bf16", True, ())}
    with pytest.raises(BitDanceError, match=r"Ampere or later GPU .*Tesla T4 is 7\.5: use --precision fp16"):
        build_engines(directory, root=tmp_path, toolkit=_Toolkit(("Tesla T4", "7.5")))


# ---- (f) the TensorRT lint --------------------------------------------------------------------------------------
def test_bf16_graphs_of_the_embedded_model_pass_the_tensorrt_lint(exported):
    from bitdance_rt.engines.lint import TARGETS, lint_export

    _, directory = exported
    for target in TARGETS:
        assert [str(f) for f in lint_export(directory, target)] == [], target


def test_bf16_graphs_of_a_text_to_image_model_pass_the_tensorrt_lint(t2i_streamed):
    """The tiny text-to-image model's BF16 graphs, auto_export's: streamed from the weight files ((h))."""
    from bitdance_rt.engines.lint import TARGETS, lint_export

    _, _, directory, fp32, _, _ = t2i_streamed
    assert directory.name == f"{fp32.name}-bf16" and read_manifest(directory)["precision"] == "bf16"
    for target in TARGETS:
        assert [str(f) for f in lint_export(directory, target)] == [], target


# ---- (g) the export command ----------------------------------------------------------------------------------------
def test_export_precision_bf16_writes_a_bf16_export_on_the_cpu(exported, fp32_dir):
    """The command writes BF16 graphs of every stage of the FP32 export, with a manifest saying bf16; each
    stage holds the bytes `plan` counts for it at bf16 (FP16's, convolutions FP32) within 8%, as
    tests/test_plan.py allows the other precisions."""
    from bitdance_rt.export.shared_weights import tensor_nbytes, tensors
    from bitdance_rt.plan.memory import stage_memory

    res, directory = exported
    assert res.returncode == 0, res.stderr
    assert f"{directory}: bf16 export ready" in res.stdout
    manifest, fp32 = read_manifest(directory), read_manifest(fp32_dir)
    assert manifest["precision"] == "bf16" and "fp16_stages" not in manifest
    assert manifest["key"]["stages"] == fp32["key"]["stages"] and manifest["key"]["policy"]["type"] == "bfloat16"
    held = {}
    for stage in manifest["key"]["stages"]:
        graph = onnx.load(str(directory / f"{stage}.onnx"), load_external_data=False).graph
        assert BFLOAT16 in set(_types(graph).values()), stage
        held[stage] = sum(tensor_nbytes(t) for t, _ in tensors(graph))
    planned = {
        s.stage: s.bytes for s in stage_memory(resolve_model(None, None, None, None, None, None).config, "bf16", S)[0]
    }
    for stage, n in held.items():
        assert abs(planned[stage] - n) <= 0.08 * n, (stage, planned[stage], n)


# ---- (h) text-to-image BF16 streamed from the weight files --------------------------------------------------------
@pytest.fixture(scope="module")
def t2i_streamed(t2i_checkpoints, tmp_path_factory):
    """auto_export(..., "bf16") of the tiny text-to-image model into an empty cache, loading the float32
    model refused, with the skeleton size and chunk rows lowered (as tests/test_streamed_int8.py does)
    so that its weights are streamed in, chunk by chunk, not inlined by the trace. Returns (source,
    cache root, the BF16 directory, the FP32 export's directory, auto_export_steps before and after)."""
    import bitdance_rt.t2i.loading as loading
    from bitdance_rt.export import shared_weights, weightless
    from bitdance_rt.plan.preflight import auto_export_steps

    def refuse(*a, **k):
        raise AssertionError("the float32 model was loaded")

    source = resolve_model(None, str(t2i_checkpoints[16]), None, 512, 512, T2I_TEXT_TOKENS)
    cache = tmp_path_factory.mktemp("t2i-bf16") / "cache"
    opts = BackendOptions(progress=False, threads=1)
    with paths.using_cache_root(cache), torch_threads(1), pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "load_t2i", refuse)
        for module in (weightless, shared_weights):
            patch.setattr(module, "SKELETON_BYTES", 4096)
        patch.setattr(weightless, "_rows_per_chunk", lambda shape, chunk_bytes: 7)
        before = auto_export_steps(source, T2I_STEPS, "bf16", opts.max_batch)
        directory = auto_export(source, T2I_STEPS, opts, "bf16")
        after = auto_export_steps(source, T2I_STEPS, "bf16", opts.max_batch)
        fp32 = paths.export_dir(source.config, source.weights_source(), T2I_STEPS, opts.max_batch)
    return source, cache, directory, fp32, before, after


def _graph_contents(directory, stage):
    """(nodes, inputs, outputs as bytes; {initializer: (type, dims, data bytes)}) of a stage graph."""
    graph = onnx.load(str(directory / read_manifest(directory)["stage_files"][stage][0])).graph
    io = [[v.SerializeToString() for v in vs] for vs in (graph.node, graph.input, graph.output)]
    inits = {t.name: (t.data_type, list(t.dims), numpy_helper.to_array(t).tobytes()) for t in graph.initializer}
    return io, inits


def test_text_to_image_bf16_is_streamed_from_the_weight_files_with_no_fp32_export(t2i_streamed):
    """auto_export's BF16 of a text-to-image model writes the BF16 variant's directory straight from the
    weight files: no FP32 export in the cache, no float32 model (the fixture refuses it); the preflight
    counts one step, "export", and nothing once it is there; `plan` counts a BF16 streamed export, no
    FP32 export and derivation."""
    from bitdance_rt.plan.road import road
    from bitdance_rt.precision.policy import fingerprint

    source, cache, directory, fp32, before, after = t2i_streamed
    assert directory == paths.variant_dir(fp32, "bf16") and before == ["export"] and after == []
    assert [p.parent for p in cache.rglob("manifest.json")] == [directory] and not fp32.exists()
    manifest = read_manifest(directory)
    assert manifest["precision"] == "bf16" and manifest["key"]["weights"] == "streamed"
    assert manifest["key"]["policy"] == fingerprint("bf16")
    for backend, names in (("tensorrt", ["export", "build", "run"]), ("onnxruntime", ["export", "run"])):
        steps = road(source.config, "bf16", backend, steps=T2I_STEPS).steps
        assert [s.step for s in steps] == names, backend
        assert steps[0].what.startswith("BF16 ONNX export streamed from the weight files"), steps[0].what


def test_streamed_text_to_image_bf16_equals_the_variant_derived_from_its_fp32_export(
    t2i_streamed, t2i_cache_template, tmp_path
):
    """Same nodes, graph inputs and outputs, and initializer bytes per tensor name as the BF16 variant
    derive_export writes from the session's FP32 export (whose weights went through the FP32 graphs
    and were rounded whole), and the same key but for what it was derived from."""
    from bitdance_rt.precision.derive import derive_export

    source, _, directory, _, _, _ = t2i_streamed
    cache = copy_cache(t2i_cache_template(16), tmp_path / "cache")
    with paths.using_cache_root(cache):
        fp32 = paths.export_dir(source.config, source.weights_source(), T2I_STEPS)
    derived = derive_export(fp32, tmp_path / "derived", "bf16", progress=False)
    key = {k: v for k, v in derived.manifest["key"].items() if k != "derived_from"}
    assert read_manifest(directory)["key"] == key
    for stage in key["stages"]:
        ours_io, ours = _graph_contents(directory, stage)
        their_io, theirs = _graph_contents(derived.directory, stage)
        assert ours_io == their_io, stage
        assert sorted(ours) == sorted(theirs), stage
        assert [n for n in ours if ours[n] != theirs[n]] == [], stage
        assert BFLOAT16 in {t for t, _, _ in ours.values()}, stage


def test_streamed_text_to_image_bf16_holds_the_bf16_checkpoints_values_exactly(t2i_streamed, t2i_checkpoints):
    """The language model's weights are BF16 in the checkpoint: the BF16 graphs hold every one of them (but
    the unused lm_head) as the file's bits (a Linear's transposed), nothing rounded on the way."""
    from safetensors.torch import load_file

    stored = {}
    for path in sorted(t2i_checkpoints[16].glob("model-*.safetensors")):
        stored.update(load_file(str(path)))
    _, _, directory, _, _, _ = t2i_streamed
    seen = set()
    for stage in (st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE):
        for name, (kind, dims, data) in _graph_contents(directory, stage)[1].items():
            weight = name.removeprefix("model.").removesuffix(".T")
            if weight not in stored:
                continue
            bits = stored[weight].view(torch.int16)
            bits = bits.t() if name.endswith(".T") else bits
            assert kind == BFLOAT16 and dims == list(bits.shape), name
            assert data == bits.contiguous().numpy().tobytes(), name
            seen.add(weight)
    assert seen == set(stored) - {"lm_head.weight"}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_streamed_text_to_image_exports_refuse_a_calibration_set(t2i_checkpoints, tmp_path, precision):
    """A calibration set is INT8's: a text-to-image FP16 / BF16 run (streamed from the weight files) given one
    says so in one line before any graph is written, as the derived variants do."""
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model

    source = resolve_model(None, str(t2i_checkpoints[16]), None, 512, 512, 48)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
        with pytest.raises(BitDanceError, match=f"a calibration set is for precision int8 \\({precision} graphs"):
            auto_export(source, 2, BackendOptions(calibration=str(tmp_path / "set"), progress=False), precision)
    assert not (tmp_path / "cache" / "exports").exists()
