"""An export holds each weight once: the distinct initializer bytes of all its stage files add up to
the model's parameter bytes (before, the backbone sat in prefill.onnx and backbone_step.onnx, the
head in head_step.onnx and the fused sampler: about 1.5x), and the graphs still compute the model.

"Distinct" is counted by storage place: an initializer inline in a graph counts once per graph, one
in an external file once per (file, offset); so a weight that two graphs read from one shared file
counts once, and a weight copied into two files counts twice, whatever its name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.config import load_config  # noqa: E402
from bitdance_rt.export import export_stages, random_source  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.models import BitDance  # noqa: E402

from conftest import copy_cache, torch_threads  # noqa: E402

MIN_SHARED = 1024  # below this a repeated constant is not a weight (norm scalars, shape constants)


def _storage(directory: Path, manifest: dict):
    """(place, bytes, dtype/shape/content key) of every initializer of every stage graph."""
    import hashlib

    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for stage, files in manifest["stage_files"].items():
        graph = onnx.load(str(directory / files[0]), load_external_data=False)
        for tensor in graph.graph.initializer:
            if uses_external_data(tensor):
                info = {e.key: e.value for e in tensor.external_data}
                place = (info["location"], int(info.get("offset", 0)))
                copy = onnx.TensorProto()
                copy.CopyFrom(tensor)
                load_external_data_for_tensor(copy, str(directory))
                data = copy.raw_data
            else:
                place = (files[0], tensor.name)
                data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
            yield place, len(data), (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())


def _check_once(directory: Path, manifest: dict, param_bytes: int, buffer_bytes: int) -> dict:
    places: dict = {}
    contents: dict = {}
    for place, size, key in _storage(directory, manifest):
        places[place] = size
        if size >= MIN_SHARED:
            contents.setdefault(key, set()).add(place)
    distinct = sum(places.values())
    copies = {k: v for k, v in contents.items() if len(v) > 1}
    assert not copies, f"weights stored more than once: {list(copies.values())[:3]}"
    # graphs hold the parameters plus derived tables (RoPE, position tables, masks' constants, the
    # sampler's folded time embeddings): at most the buffers and 2% more
    assert param_bytes <= distinct <= 1.02 * param_bytes + buffer_bytes, (distinct, param_bytes, buffer_bytes)
    return distinct


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_embedded_model_export_holds_each_weight_once(tmp_path):
    with torch_threads(1):
        loaded = load_model()
        result = export_stages(loaded.model, tmp_path / "e", random_source(0), sampler_steps=4, progress=False)
    m = loaded.model
    _check_once(result.directory, result.manifest, _bytes(m.parameters()), _bytes(m.buffers()))
    # the head is read by head_step and the fused sampler, from one file
    files = result.manifest["stage_files"]
    assert "shared.weights" in files[st.HEAD_STEP] and "shared.weights" in files[st.HEAD_SAMPLER]


def test_b4x_widths_transformer_and_head_held_once(tmp_path):
    """BitDance-B-4x at its real widths (2 of its 24 layers and 2 of its head's 6 blocks, so that a
    table copied per layer or per block would show; the tokenizer left out): the stages the
    duplication was in."""
    cfg = load_config("BitDance-B-4x").replace(n_layer=2, diff_layers=2)
    torch.manual_seed(0)
    with torch_threads(2):
        with pytest.MonkeyPatch.context() as patch:  # the tokenizer's convolutions, never exported: not initialised
            patch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: None)  # (their random init: seconds)
            model = BitDance(cfg).eval()
        with torch.no_grad():  # no two parameters alike (zero-initialised ones would be stored once)
            for name, p in model.named_parameters():
                if not name.startswith("vae."):  # (the tokenizer: 82% of the parameters, none of them exported)
                    p.normal_(0, 0.02)
        stages = [st.PREFIX_EMBED, st.TOKEN_EMBED, st.BACKBONE, st.HEAD_STEP, st.HEAD_SAMPLER]
        result = export_stages(model, tmp_path / "b", random_source(0), stages=stages, sampler_steps=2, progress=False)
    params = [p for n, p in model.named_parameters() if not n.startswith("vae.")]
    buffers = [b for n, b in model.named_buffers() if not n.startswith("vae.")]
    _check_once(result.directory, result.manifest, _bytes(params), _bytes(buffers))


def test_text_to_image_export_holds_each_weight_once(tmp_path):
    from t2i_tiny import write_checkpoint

    from bitdance_rt.t2i.loading import load_t2i

    model = load_t2i(write_checkpoint(tmp_path / "ckpt", parallel_num=16), 512, 512, max_text_tokens=12).model
    with torch_threads(1):
        result = export_stages(model, tmp_path / "e", random_source(0), sampler_steps=2, progress=False)
    _check_once(result.directory, result.manifest, _bytes(model.parameters()), _bytes(model.buffers()))


def test_a_shared_weights_file_is_verified_like_every_export_file(tmp_path):
    """Corrupting the shared head weights makes the export unusable (re-exported), never half-read."""
    from bitdance_rt.export.onnx_export import find_reusable
    from bitdance_rt.export.manifest import read_manifest

    with torch_threads(1):
        model = load_model().model
        result = export_stages(
            model,
            tmp_path / "e",
            random_source(0),
            stages=[st.HEAD_STEP, st.HEAD_SAMPLER],
            sampler_steps=2,
            progress=False,
        )
    shared = result.directory / "shared.weights"
    assert result.manifest["files"]["shared.weights"]["bytes"] == shared.stat().st_size
    data = bytearray(shared.read_bytes())
    data[-1] ^= 0xFF
    shared.write_bytes(bytes(data))
    assert find_reusable(result.directory, read_manifest(result.directory)["key"]) is None
    with torch_threads(1):
        again = export_stages(
            model,
            tmp_path / "e",
            random_source(0),
            stages=[st.HEAD_STEP, st.HEAD_SAMPLER],
            sampler_steps=2,
            progress=False,
        )
    assert not again.reused and shared.read_bytes() != bytes(data)
    import numpy as np
    import onnxruntime as ort

    from bitdance_rt.export.wrappers import example_inputs

    spec = st.stage_spec(st.HEAD_STEP, model.cfg)
    args = example_inputs(spec, model, batch=2)
    session = ort.InferenceSession(str(result.directory / "head_step.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {n: a.numpy() for n, a in zip(spec.input_names, args)})
    with torch.no_grad():
        want = model.head_net(*args).numpy()
    assert np.abs(got - want).max() <= 1e-5


@pytest.fixture(scope="module")
def s4_cache(embedded_cache_template_s4, tmp_path_factory):
    """This module's cache root: a copy of the session's holding the embedded model's FP32 export at 4
    sampler steps (conftest), from which the variants below are derived."""
    return copy_cache(embedded_cache_template_s4, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_derived_variants_hold_each_weight_once(s4_cache, precision, monkeypatch):
    """The FP16 / INT8 variants of the embedded model's export: no weight stored twice (FP16: the
    converted head of head_step and the sampler shared again; INT8: the FP32 sampler next to the
    quantised head_step), and they generate."""
    from bitdance_rt import Pipeline
    from bitdance_rt.export.manifest import read_manifest

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(s4_cache))
    with (
        torch_threads(1),
        Pipeline.from_pretrained(
            backend="onnxruntime", precision=precision, steps=4, threads=1, progress=False
        ) as pipe,
    ):
        out = pipe.generate(labels=3, seed=0)
        directory = pipe.backend.dir
    assert out.tokens.abs().eq(1).all()
    manifest = read_manifest(directory)
    places, contents = {}, {}
    for place, size, key in _storage(directory, manifest):
        places[place] = size
        if size >= MIN_SHARED:
            contents.setdefault(key, set()).add(place)
    assert not [v for v in contents.values() if len(v) > 1]
    if precision == "fp16":
        files = manifest["stage_files"]
        assert "shared.weights" in files[st.HEAD_STEP] and "shared.weights" in files[st.HEAD_SAMPLER]


def test_sharing_keeps_a_graphs_other_external_tensors(tmp_path):
    """A graph whose own weights and Constant attributes are external data (as ONNX Runtime's
    quantiser writes a large graph) keeps them when a shared weight moves to shared.weights; both
    graphs still compute what they computed."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bitdance_rt.export.shared_weights import SHARED_WEIGHTS, share_weights

    rng = np.random.default_rng(0)
    w, v = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(2))
    c = rng.standard_normal(32).astype(np.float32)

    def graph(name, own):
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("MatMul", ["h", "v"], ["k"]),
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c + own, "c")),
            helper.make_node("Add", ["k", "c"], ["y"]),
        ]
        g = helper.make_graph(
            nodes,
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(v + own, "v")],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    onnx.save_model(
        graph("a", 0.0),
        str(tmp_path / "a.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="a.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
    onnx.save_model(graph("b", 1.0), str(tmp_path / "b.onnx"))
    files = share_weights(tmp_path, {"a": ["a.onnx", "a.onnx.data"], "b": ["b.onnx"]})
    assert files == {"a": ["a.onnx", "a.onnx.data", SHARED_WEIGHTS], "b": ["b.onnx", SHARED_WEIGHTS]}
    assert (tmp_path / SHARED_WEIGHTS).stat().st_size == w.nbytes  # w once; v, c differ between the graphs
    x = rng.standard_normal((4, 32)).astype(np.float32)
    for name, own in (("a", 0.0), ("b", 1.0)):
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w @ (v + own) + (c + own), rtol=1e-5, atol=1e-4)
