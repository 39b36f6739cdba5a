"""Weight-only INT4 (precision/int4.py): the block values are ONNX Runtime's own quantiser's, MatMulNBits
computes with exactly the weight they decode to, shared weights are quantised once, and the INT4 variant
of the embedded model holds what the policy says, generates, and is what `plan` counts."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bitdance_rt import stages as st
from bitdance_rt.errors import BitDanceError
from bitdance_rt.precision.int4 import dequantised, int4_blocks, quantize_int4, weight_matmuls

from conftest import cached_pipeline, copy_cache, torch_threads

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _matmul(k: int, n: int, weight: np.ndarray):
    return _model(
        [helper.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")],
    )


@pytest.mark.parametrize("k, n, block", [(96, 288, 16), (256, 96, 32), (100, 40, 16), (16, 64, 32)])
def test_block_values_are_onnxruntimes_quantiser(k, n, block):
    """int4_blocks gives the nibbles and scales ONNX Runtime's MatMulNBitsQuantizer (symmetric, same block)
    writes for the same weight (K not a multiple of the block included: the padding is not compared)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = np.random.default_rng(k + n).standard_normal((k, n)).astype(np.float32)
    quantizer = MatMulNBitsQuantizer(_matmul(k, n, weight), bits=4, block_size=block, is_symmetric=True)
    quantizer.process()
    graph = quantizer.model.model.graph
    (node,) = [x for x in graph.node if x.op_type == "MatMulNBits"]
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    packed, scales = int4_blocks(weight, block)
    theirs_packed, theirs_scales = values[node.input[1]].reshape(packed.shape), values[node.input[2]]
    assert np.array_equal(theirs_scales.reshape(scales.shape), scales)
    nibbles = lambda p: np.stack([p & 15, p >> 4], axis=-1).reshape(n, -1)[:, :k]  # noqa: E731
    assert np.array_equal(nibbles(theirs_packed), nibbles(packed))


def test_matmulnbits_computes_with_the_decoded_weight(tmp_path):
    """A MatMul and a Gemm (transB, bias) become MatMulNBits; ONNX Runtime's products equal the products
    with the decoded weights (to float rounding) and the FP32 ones to INT4's error; a weight read by two
    nodes through an Identity alias (the fused sampler's way) is stored once."""
    rng = np.random.default_rng(0)
    k, n = 64, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = rng.standard_normal((n, k)).astype(np.float32)  # Gemm transB: [N, K]
    bias = rng.standard_normal(n).astype(np.float32)
    model = _model(
        [
            helper.make_node("Identity", ["w"], ["w_alias"], name="alias"),
            helper.make_node("MatMul", ["a", "w"], ["y1"], name="mm1"),
            helper.make_node("MatMul", ["a", "w_alias"], ["y2"], name="mm2"),
            helper.make_node("Gemm", ["a", "g", "bias"], ["y3"], name="gemm", transB=1),
        ],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["rows", n]) for y in ("y1", "y2", "y3")],
        [numpy_helper.from_array(x, name) for x, name in ((w, "w"), (g, "g"), (bias, "bias"))],
    )
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    assert weight_matmuls(model.graph) == ["mm1", "mm2", "gemm"]
    quantize_int4(src, dst, ["mm1", "mm2", "gemm"], 16)
    graph = onnx.load(str(dst)).graph
    assert [x.op_type for x in graph.node] == ["MatMulNBits"] * 3
    assert sorted(t.name for t in graph.initializer) == ["bias", "g_int4", "g_int4_scales", "w_int4", "w_int4_scales"]
    a = rng.standard_normal((3, k)).astype(np.float32)
    y1, y2, y3 = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"a": a})
    w4, g4 = dequantised(*int4_blocks(w, 16), k), dequantised(*int4_blocks(g.T, 16), k)
    np.testing.assert_allclose(y1, a @ w4, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y3, a @ g4 + bias, rtol=1e-5, atol=1e-5)
    # INT4's error: each decoded weight within half a step (|scale| / 2) of the float one
    step = np.abs(int4_blocks(w, 16)[1]).max()
    assert np.abs(w4 - w).max() <= step / 2 + 1e-6 and np.abs(w4 - w).max() > 0
    with pytest.raises(BitDanceError, match="no weight MatMul named nope"):
        quantize_int4(src, tmp_path / "x.onnx", ["nope"], 16)


def _unpacked_int4(tensor) -> np.ndarray:
    """An ONNX INT4 initializer's values, decoded here from its raw bytes (low nibble first, two's complement)."""
    raw = np.frombuffer(tensor.raw_data, np.uint8)
    nibbles = np.stack([raw & 15, raw >> 4], axis=-1).reshape(-1)[: int(np.prod(tensor.dims))].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).reshape(tuple(tensor.dims))


def test_tensorrt_int4_graph_dequantizes_blocks_of_64_or_128(tmp_path, monkeypatch):
    """TensorRT's INT4 form of an FP16 graph: each weight as INT4 values and FP16 scales in blocks of 128
    along K (64 where 128 does not divide K; neither: the layer stays FP16) read by a DequantizeLinear at
    opset 21, a weight shared through an alias stored once; ONNX Runtime's products equal the products with
    the weights decoded here from the file's bytes, and each decoded weight lies within a step of the FP16
    one; TensorRT 11's lint passes, 10.3's refuses the opset."""
    from bitdance_rt.engines.lint import lint_graph
    from bitdance_rt.precision.int4 import quantize_int4_qdq

    rng = np.random.default_rng(1)
    f16 = TensorProto.FLOAT16
    w = rng.standard_normal((192, 40)).astype(np.float16)  # K 192: blocks of 64
    g = rng.standard_normal((24, 128)).astype(np.float16)  # Gemm transB, K 128: blocks of 128
    odd = rng.standard_normal((96, 8)).astype(np.float16)  # K 96: no TensorRT block
    bias = rng.standard_normal(24).astype(np.float16)
    model = _model(
        [
            helper.make_node("Identity", ["w"], ["w_alias"], name="alias"),
            helper.make_node("MatMul", ["a", "w"], ["y1"], name="mm1"),
            helper.make_node("MatMul", ["a", "w_alias"], ["y2"], name="mm2"),
            helper.make_node("Gemm", ["b", "g", "bias"], ["y3"], name="gemm", transB=1),
            helper.make_node("MatMul", ["c", "odd"], ["y4"], name="odd_mm"),
            helper.make_node("ReduceMean", ["y1"], ["m"], name="mean", axes=[1]),  # (an opset-18 change)
        ],
        [helper.make_tensor_value_info(x, f16, ["rows", k]) for x, k in (("a", 192), ("b", 128), ("c", 96))],
        [helper.make_tensor_value_info(y, f16, None) for y in ("y1", "y2", "y3", "y4", "m")],
        [numpy_helper.from_array(x, name) for x, name in ((w, "w"), (g, "g"), (odd, "odd"), (bias, "bias"))],
    )
    src, dst = tmp_path / "h.onnx", tmp_path / "q.onnx"
    onnx.save(model, str(src))
    assert quantize_int4_qdq(src, dst, ["mm1", "mm2", "gemm", "odd_mm"]) == (["odd_mm"], [dst.name])
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [21]
    dq = {x.output[0]: x for x in out.graph.node if x.op_type == "DequantizeLinear"}
    attrs = {x.input[0]: {a.name: a.i for a in x.attribute} for x in dq.values()}
    assert attrs == {"w_int4": {"axis": 0, "block_size": 64}, "g_int4": {"axis": 1, "block_size": 128}}
    readers = {x.name: x.input[1] for x in out.graph.node if x.op_type in ("MatMul", "Gemm")}
    assert readers["mm1"] == readers["mm2"] in dq and readers["gemm"] in dq and readers["odd_mm"] == "odd"
    inits = {t.name: t for t in out.graph.initializer}
    assert inits["w_int4"].data_type == TensorProto.INT4 and inits["w_int4_scales"].data_type == f16
    assert "w" not in inits and "g" not in inits  # (stored once, as INT4)
    q_w, s_w = _unpacked_int4(inits["w_int4"]), numpy_helper.to_array(inits["w_int4_scales"]).astype(np.float32)
    q_g, s_g = _unpacked_int4(inits["g_int4"]), numpy_helper.to_array(inits["g_int4_scales"]).astype(np.float32)
    w4 = q_w.astype(np.float32) * np.repeat(s_w, 64, axis=0)  # [K, N], scales [K/64, N]
    g4 = q_g.astype(np.float32) * np.repeat(s_g, 128, axis=1)  # [N, K], scales [N, K/128]
    # within a step of the FP16 weight (half a step, but a block's largest value of the sign opposite its
    # extreme: that one clips at +7 steps), and a block's extreme exactly
    assert np.all(np.abs(w4 - w.astype(np.float32)) <= np.abs(np.repeat(s_w, 64, axis=0)) * 1.001)
    assert np.all(np.abs(g4 - g.astype(np.float32)) <= np.abs(np.repeat(s_g, 128, axis=1)) * 1.001)
    assert np.allclose(
        np.abs(w4).reshape(3, 64, 40).max(1), np.abs(w.astype(np.float32)).reshape(3, 64, 40).max(1), rtol=1e-3
    )
    feeds = {x: rng.standard_normal((3, k)).astype(np.float16) for x, k in (("a", 192), ("b", 128), ("c", 96))}
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    y1, y2, y3, y4, _ = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    a, b = feeds["a"].astype(np.float32), feeds["b"].astype(np.float32)
    for got, want in ((y1, a @ w4), (y2, a @ w4), (y3, b @ g4.T + bias.astype(np.float32))):
        assert np.abs(got.astype(np.float32) - want).max() <= 4e-3 * np.abs(want).max()
    np.testing.assert_array_equal(y4, (feeds["c"] @ odd))
    assert lint_graph(dst, "11") == []
    assert [f.op for f in lint_graph(dst, "10.3")] == ["opset_import"]
    # from external data, a few rows at a time, into external data: the same tensors
    from bitdance_rt.precision import int4

    (tmp_path / "ext").mkdir()
    far = tmp_path / "ext" / "h.onnx"
    onnx.save_model(model, str(far), save_as_external_data=True, location="h.onnx.data", size_threshold=0)
    monkeypatch.setattr(int4, "CHUNK_VALUES", 64 * 40)  # w in 3 chunks of a block row, g in 2
    _, files = quantize_int4_qdq(far, tmp_path / "ext" / "q.onnx", ["mm1", "mm2", "gemm", "odd_mm"], external_bytes=0)
    assert files == ["q.onnx", "q.onnx.data"]
    chunked = {t.name: t.raw_data for t in onnx.load(str(tmp_path / "ext" / "q.onnx")).graph.initializer}
    assert chunked == {t.name: t.raw_data or numpy_helper.to_array(t).tobytes() for t in out.graph.initializer}


@pytest.fixture(scope="module")
def int4(embedded_fp16_cache_template, tmp_path_factory):
    """The embedded model's FP32 export and ONNX Runtime's INT4 variant of it, in a copy of the session's cache
    that also holds the FP16 variant (TensorRT's INT4 graphs are written from it)."""
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model

    cache = copy_cache(embedded_fp16_cache_template, tmp_path_factory.mktemp("int4") / "cache")
    source = resolve_model(None, None, None, None, None, None)
    with torch_threads(1), pytest.MonkeyPatch.context() as m:
        m.setenv("BITDANCE_RT_CACHE", str(cache))
        opts = BackendOptions(progress=False)
        fp32 = auto_export(source, source.config.default_steps, opts, "fp32")
        out = auto_export(source, source.config.default_steps, opts, "int4")
        yield source, cache, fp32, out


def test_the_int4_variant_holds_the_policy(int4):
    """The backbone's and the head's weight MatMuls are MatMulNBits but the time-embedding MLP's
    (policy.INT4_FLOAT_LAYERS); the other stages are the FP16 variant's graphs; --keep-float keeps a
    layer float; plan's INT4 bytes per stage are the graphs'."""
    from test_plan import _check_against

    from bitdance_rt.export.manifest import read_manifest
    from bitdance_rt.precision.auto import precision_export
    from bitdance_rt.precision.policy import INT4_FP16_STAGES

    source, _, fp32, out = int4
    manifest = read_manifest(out)
    assert manifest["precision"] == "int4" and manifest["fp16_stages"] == sorted(
        INT4_FP16_STAGES, key=list(manifest["stages"]).index
    )
    for stage in st.INT4_STAGES:
        before = onnx.load(str(fp32 / f"{stage}.onnx"), load_external_data=False).graph
        after = onnx.load(str(out / f"{stage}.onnx"), load_external_data=False).graph
        quantised = {x.name for x in after.node if x.op_type == "MatMulNBits"}
        want = {x for x in weight_matmuls(before) if "/time_embed/" not in x}
        assert quantised == want and quantised, stage
        assert any("/time_embed/" in x.name and x.op_type == "Gemm" for x in after.node) == (stage != st.BACKBONE)
    for stage in INT4_FP16_STAGES:
        graph = onnx.load(str(out / f"{stage}.onnx"), load_external_data=False).graph
        assert any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer), stage
    _check_against(source.config, out, "int4", source.config.default_steps)
    layer = "/layers.0/feed_forward/w2/MatMul"
    kept = precision_export(fp32, "int4", keep_float=[layer], progress=False).directory
    graph = onnx.load(str(kept / "backbone.onnx"), load_external_data=False).graph
    assert [x.op_type for x in graph.node if x.name == layer] == ["MatMul"] and kept != out


def test_int4_generates_and_refuses_where_it_does_not_run(int4):
    """Generation at INT4 on ONNX Runtime gives images of +/-1 tokens close to FP32's (most tokens
    agree on the same seeds); TensorRT refuses INT4 graphs in one line."""
    from bitdance_rt.engines.options import plan_precision

    _, cache, _, _ = int4
    tokens = {}
    for precision in ("fp32", "int4"):
        with cached_pipeline(cache, precision=precision) as pipe:
            tokens[precision] = pipe.generate([1, 7, 3], seed=3).tokens.numpy()
    assert set(np.unique(tokens["int4"])) <= {-1.0, 1.0}
    assert (tokens["int4"] == tokens["fp32"]).mean() > 0.6
    with pytest.raises(BitDanceError, match="INT4 graphs hold ONNX Runtime's MatMulNBits"):
        plan_precision("int4", None, "10.3.0")


def _k(graph, node_name: str) -> int:
    """K of a weight MatMul / Gemm of `graph`, from its weight's dims (through an Identity alias)."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    alias = {x.output[0]: x.input[0] for x in graph.node if x.op_type == "Identity"}
    (node,) = [x for x in graph.node if x.name == node_name]
    k, n = dims[alias.get(node.input[1], node.input[1])]
    transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return n if transposed else k


def test_int4_for_tensorrt_quantises_what_its_blocks_fit(int4):
    """TensorRT's INT4 variant (export --precision int4 --backend tensorrt) is a variant of its own, written
    from the FP16 variant: every
    weight MatMul of the INT4 stages but the time-embedding MLP's reads a DequantizeLinear of INT4 blocks,
    except exactly those whose K no TensorRT block (64, 128) divides, which the manifest lists; it lints
    clean for TensorRT 11, builds strongly typed at INT4, and generates on ONNX Runtime with tokens close
    to FP32's."""
    from test_plan import _check_against

    from bitdance_rt.backends import BackendOptions, auto_export
    from bitdance_rt.engines.lint import lint_export
    from bitdance_rt.engines.options import plan_precision
    from bitdance_rt.export.manifest import read_manifest
    from bitdance_rt.plan.preflight import auto_export_steps
    from bitdance_rt.precision.derive import _digest

    source, cache, fp32, ort_int4 = int4
    assert auto_export_steps(source, source.config.default_steps, "int4", 16) == ["derive int4"]  # (no calibration)
    with torch_threads(1):
        trt = auto_export(
            source, source.config.default_steps, BackendOptions(backend="tensorrt", progress=False), "int4"
        )
    manifest = read_manifest(trt)
    assert trt != ort_int4 and "-int4-trt-" in trt.name and manifest["int4_format"] == "qdq"
    fp16 = read_manifest(fp32.parent / f"{fp32.name}-fp16")
    assert manifest["key"]["derived_from"] == _digest(fp16["key"])
    for stage in st.INT4_STAGES:
        before = onnx.load(str(fp32 / f"{stage}.onnx"), load_external_data=False).graph
        after = onnx.load(str(trt / f"{stage}.onnx"), load_external_data=False).graph
        dequantised_weights = {x.output[0] for x in after.node if x.op_type == "DequantizeLinear"}
        quantised = {
            x.name for x in after.node if x.op_type in ("MatMul", "Gemm") and x.input[1] in dequantised_weights
        }
        want = {x for x in weight_matmuls(before) if "/time_embed/" not in x}
        left = {x for x in want if _k(before, x) % 64}
        assert quantised == want - left and quantised, stage
        assert set(manifest.get("int4_fp16_layers", {}).get(stage, [])) == left, stage
    assert lint_export(trt, "11") == []
    _check_against(source.config, trt, "int4", source.config.default_steps, "tensorrt")  # plan's TensorRT INT4 bytes
    plan = plan_precision("int4", None, "11.0.0", manifest["int4_format"])
    assert (plan.precision, plan.strongly_typed) == ("int4", True)
    with pytest.raises(BitDanceError, match="needs INT4 graphs"):
        plan_precision("fp16", "int4", "11.0.0")
    tokens = {}
    for name, where in (("fp32", fp32), ("int4", trt)):
        with cached_pipeline(cache, export_dir=str(where)) as pipe:
            tokens[name] = pipe.generate([1, 7, 3], seed=3).tokens.numpy()
    assert (tokens["int4"] == tokens["fp32"]).mean() > 0.6


def test_text_to_image_int4_for_tensorrt_from_the_streamed_fp16_graphs(t2i_checkpoints, t2i_cache_template, tmp_path):
    """A text-to-image model's INT4 graphs are TensorRT's, written from its FP16 graphs streamed from the weight
    files (derived from that FP16 export, no FP32 one): every weight MatMul of the backbone and the head
    INT4 but the time MLP's and those whose K no TensorRT block divides, lint clean for TensorRT 11, the
    plan's bytes; on ONNX Runtime they generate images of +/-1 tokens close to the FP16 graphs'; ONNX Runtime's
    own INT4 of a text-to-image model is refused in one line."""
    from test_plan import _check_against

    from bitdance_rt import Pipeline
    from bitdance_rt.backends import BackendOptions, auto_export, resolve_model
    from bitdance_rt.engines.lint import lint_export
    from bitdance_rt.export.manifest import read_manifest
    from bitdance_rt.plan.preflight import auto_export_steps
    from bitdance_rt.precision.derive import _digest

    from conftest import T2I_STEPS, T2I_TEXT_TOKENS

    ckpt = t2i_checkpoints[16]
    cache = copy_cache(t2i_cache_template(16, "fp16"), tmp_path / "cache")
    source = resolve_model(None, str(ckpt), None, 512, 512, T2I_TEXT_TOKENS)
    kw = dict(checkpoint=ckpt, height=512, width=512, max_text_tokens=T2I_TEXT_TOKENS, steps=T2I_STEPS, threads=1)
    with torch_threads(1), pytest.MonkeyPatch.context() as m:
        m.setenv("BITDANCE_RT_CACHE", str(cache))
        fp16 = auto_export(source, T2I_STEPS, BackendOptions(progress=False), "fp16")
        # the memory check before it counts the step it takes: INT4 from the FP16 graphs, no calibration
        assert auto_export_steps(source, T2I_STEPS, "int4", 16) == ["int4"]
        out = auto_export(source, T2I_STEPS, BackendOptions(backend="tensorrt", progress=False), "int4")
        with pytest.raises(BitDanceError, match="text-to-image model is TensorRT's"):
            auto_export(source, T2I_STEPS, BackendOptions(progress=False), "int4")
    manifest = read_manifest(out)
    assert manifest["int4_format"] == "qdq" and manifest["key"]["derived_from"] == _digest(read_manifest(fp16)["key"])
    for stage in st.INT4_STAGES:
        after = onnx.load(str(out / f"{stage}.onnx"), load_external_data=False).graph
        dequantised_weights = {x.output[0] for x in after.node if x.op_type == "DequantizeLinear"}
        read = {x.name for x in after.node if x.op_type in ("MatMul", "Gemm") and x.input[1] in dequantised_weights}
        half = onnx.load(str(fp16 / f"{stage}.onnx"), load_external_data=False).graph
        want = {x for x in weight_matmuls(half) if "/time_embed/" not in x}
        left = {x for x in want if _k(half, x) % 64}  # (the head's input projection: K = the token's bits)
        assert read == want - left and read and (stage != st.BACKBONE or not left), stage
        assert set(manifest.get("int4_fp16_layers", {}).get(stage, [])) == left, stage
    assert lint_export(out, "11") == []
    _check_against(source.config, out, "int4", T2I_STEPS, "tensorrt")
    tokens = {}
    for name, where in (("fp16", fp16), ("int4", out)):
        with torch_threads(1), Pipeline.from_pretrained(export_dir=where, cache_dir=cache, progress=False, **kw) as p:
            tokens[name] = p.generate(prompt="a red cat", seed=21).tokens.numpy()
    assert set(np.unique(tokens["int4"])) <= {-1.0, 1.0}
    assert (tokens["int4"] == tokens["fp16"]).mean() > 0.6
