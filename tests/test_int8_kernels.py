"""INT8 on ONNX Runtime is exact on every CPU: the U8S8 saturation of x86 CPUs without VNNI.

The graphs here are built so that ONNX Runtime's U8S8 kernels saturate where they can (activations
and weights near full int8 range: pairs of products beyond 16 bits), and are compared with the
same Q/DQ graph evaluated op by op in float (optimisations off: DequantizeLinear then a float
MatMul / Conv, which no integer kernel touches). Whatever this CPU is, the kernels the backend asks
for must match that; the both branches of the switch (exact U8U8 where U8S8 saturates, U8S8 where
it is exact) run on every machine.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.runtime import int8_kernels  # noqa: E402

X86 = int8_kernels._X86


def _qdq_graph(kind: str, seed: int = 0) -> tuple[bytes, np.ndarray]:
    """A symmetric int8 Q/DQ MatMul (-> MatMulIntegerToFloat) or Conv with a quantised output
    (-> QLinearConv), the placement of precision/policy.py, with near-full-range operands."""
    rng = np.random.default_rng(seed)
    if kind == "matmul":
        k, n = 256, 64
        w = rng.normal(size=(k, n)).astype(np.float32)
        axis, x = 1, (rng.normal(size=(32, k)) * 1.5).astype(np.float32)
        w_scale = np.abs(w).max(0) / 127
        wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        body = [helper.make_node("MatMul", ["xd", "wd"], ["y"])]
        shapes = ([None, k], [None, n])
    else:
        cin, cout = 32, 16
        w = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
        axis, x = 0, (rng.normal(size=(2, cin, 8, 8)) * 1.5).astype(np.float32)
        w_scale = np.abs(w).reshape(cout, -1).max(1) / 127
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        body = [
            helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("QuantizeLinear", ["c", "cs", "az"], ["cq"]),
            helper.make_node("DequantizeLinear", ["cq", "cs", "az"], ["y"]),
        ]
        shapes = ([None, cin, 8, 8], [None, cout, 8, 8])
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
    ] + body
    inits = [
        numpy_helper.from_array(np.array(4.0 / 127, np.float32), "as"),
        numpy_helper.from_array(np.array(0, np.int8), "az"),
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(w_scale.astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(len(w_scale), np.int8), "wz"),
    ]
    if kind == "conv":  # the scale of the convolution's quantised output
        inits.append(numpy_helper.from_array(np.array(40.0 / 127, np.float32), "cs"))
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString(), x


def _run(model: bytes, x: np.ndarray, exact: bool | None, optimized_path=None) -> np.ndarray:
    opts = ort.SessionOptions()
    if exact is None:  # the float evaluation of the same Q/DQ graph
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    else:
        int8_kernels.configure(opts, exact)
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["matmul", "conv"])
@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_integer_kernels_match_the_float_evaluation_of_the_qdq_graph(kind, mode):
    """'exact' forces the U8U8 branch (the one CPUs without VNNI take) on every machine; 'auto' is what
    this machine's backend runs. Both must equal the float evaluation up to float rounding; a
    saturating U8S8 kernel is off by ~10% of the output range (measured on an AVX2 EPYC)."""
    model, x = _qdq_graph(kind)
    ref = _run(model, x, None)
    got = _run(model, x, int8_kernels.resolve(mode))
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    # tolerance: float32 reassociation of K = 256 / 288 products, ~1e-6; one int8 step of the conv's
    # quantised output (1 / 127 of its range) where the two round a borderline value differently
    bound = 1e-5 if kind == "matmul" else 1.0 / 127 + 1e-5
    assert err <= bound, f"{kind} ({mode}, {int8_kernels.cpu_summary()}): relative error {err:.3g}"
    if kind == "conv":  # borderline roundings are rare: nearly every output equals the float evaluation
        assert np.mean(np.isclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())) >= 0.99


@pytest.mark.parametrize("exact", [True, False])
def test_the_exact_setting_reaches_onnx_runtime(exact, tmp_path):
    """With the setting, ONNX Runtime rewrites int8 weights as uint8 (its `_s8_2_u8` copies) on x86,
    where its U8U8 kernels exist; elsewhere the setting is compiled out and nothing changes."""
    import platform

    model, x = _qdq_graph("matmul")
    _run(model, x, exact, tmp_path / "optimized.onnx")
    names = [t.name for t in onnx.load(str(tmp_path / "optimized.onnx")).graph.initializer]
    rewritten = any(name.endswith("_s8_2_u8") for name in names)
    assert rewritten == (exact and platform.machine().lower() in X86), names


@pytest.mark.parametrize(
    "machine, features, saturates",
    [
        ("x86_64", {"avx2": True}, True),  # Zen 3, Haswell..Coffee Lake
        ("x86_64", {"avx2": True, "avx512_vnni": False}, True),  # Skylake-SP: AVX-512, no VNNI
        ("x86_64", {"avx2": True, "avx512_vnni": True}, False),  # Cascade Lake+, Zen 4+
        ("x86_64", {"avx2": True, "avx_vnni": True}, False),  # Alder Lake+ (VEX VNNI)
        ("x86_64", {"avx2": True, "amx_int8": True, "avx512_vnni": True}, False),  # Sapphire Rapids
        ("AMD64", {"avx2": True}, True),  # Windows' name
        ("aarch64", {}, False),  # Jetson, Graviton
        ("arm64", {}, False),  # macOS
    ],
)
def test_which_cpus_need_the_exact_kernels(machine, features, saturates):
    assert int8_kernels.u8s8_saturates(machine, features) is saturates


def test_this_cpu_is_read_from_cpuid():
    f = int8_kernels.cpu_features()
    assert set(f) == {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"} and all(isinstance(v, bool) for v in f.values())
    import platform

    if platform.machine().lower() in X86:  # numpy's cpuid probe agrees with the kernel ONNX Runtime picked
        assert f["avx2"] or int8_kernels.u8s8_saturates()


def test_modes_and_their_errors(monkeypatch):
    monkeypatch.delenv(int8_kernels.ENV, raising=False)
    assert int8_kernels.resolve("exact") is True and int8_kernels.resolve("fast") is False
    assert int8_kernels.resolve() is int8_kernels.resolve("auto") is int8_kernels.u8s8_saturates()
    monkeypatch.setenv(int8_kernels.ENV, "exact")
    assert int8_kernels.resolve() is True and int8_kernels.resolve("fast") is False  # the argument wins
    monkeypatch.setenv(int8_kernels.ENV, "precise")
    with pytest.raises(BitDanceError, match=r"INT8 kernels 'precise' \(BITDANCE_RT_INT8_KERNELS.*auto, exact, fast"):
        int8_kernels.resolve()


def test_notes_say_what_runs():
    assert "U8U8" in int8_kernels.kernels_note(True)
    note = int8_kernels.kernels_note(False)
    assert ("results are wrong" in note) == int8_kernels.u8s8_saturates()
