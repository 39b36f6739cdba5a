"""Streamed text-to-image exports (export/weightless.py, export/streamed.py, precision/streamed.py).

The graphs written straight from the weight files must compute exactly what the graphs of the
loaded float32 model compute: FP32 against the classic export (which loads the model and lets the
exporter fold), FP16 against the FP16 variant derived from that export. Equality is exact (the
same ops on the same float values on the same machine), checked on ONNX Runtime for every
generation stage. And the CLI gets there without ever building the float32 model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from bitdance_rt import stages as st  # noqa: E402

HEIGHT = WIDTH = 512
S = 2  # the fused sampler's steps: its graph unrolls S head nets (the default 50 would take minutes here)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from t2i_tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("t2i") / "ckpt")


@pytest.fixture(scope="module")
def cfg(ckpt):
    from bitdance_rt.t2i.config import read_checkpoint_config

    return read_checkpoint_config(ckpt, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def classic(ckpt, cfg, tmp_path_factory):
    """The classic FP32 export (the loaded float32 model) of every generation stage."""
    from bitdance_rt.export import export_stages
    from bitdance_rt.t2i.loading import checkpoint_dir_source, load_t2i

    out = tmp_path_factory.mktemp("classic") / "fp32"
    export_stages(
        load_t2i(ckpt, HEIGHT, WIDTH, config=cfg).model,
        out,
        checkpoint_dir_source(ckpt),
        stages=st.GENERATION_STAGES,
        sampler_steps=S,
        progress=False,
    )
    return out


def _outputs(directory: Path, stage: str, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    from bitdance_rt.export import read_manifest

    files = read_manifest(directory)["stage_files"][stage]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(directory / files[0]), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _assert_same(a: Path, b: Path, stages, cfg, ckpt) -> None:
    from bitdance_rt.export import read_manifest
    from bitdance_rt.export.manifest import manifest_specs
    from bitdance_rt.export.wrappers import example_inputs
    from bitdance_rt.t2i.loading import weightless_t2i

    model, _ = weightless_t2i(ckpt, cfg)  # example inputs need the config and buffers only
    specs = manifest_specs(read_manifest(a), a)
    for stage in stages:
        spec = specs[stage]
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, example_inputs(spec, model, seed=1))}
        for name, x, y in zip(spec.output_names, _outputs(a, stage, feeds), _outputs(b, stage, feeds)):
            assert x.shape == y.shape and x.dtype == y.dtype, (stage, name)
            assert np.array_equal(x, y), f"{stage}.{name}: max |diff| {np.abs(x - y).max()}"


def _streamed(ckpt, cfg, out, precision, stages):
    from bitdance_rt.precision.streamed import export_precision_streamed
    from bitdance_rt.t2i.loading import checkpoint_dir_source, weightless_t2i

    model, weights = weightless_t2i(ckpt, cfg)
    return export_precision_streamed(
        model, weights, out, checkpoint_dir_source(ckpt), precision, stages=stages, sampler_steps=S, progress=False
    )


def test_weightless_model_holds_no_weights(ckpt, cfg):
    from bitdance_rt.t2i.loading import weightless_t2i

    model, weights = weightless_t2i(ckpt, cfg)
    params = dict(model.named_parameters())
    assert params and set(params) == set(weights.shapes)
    assert all(p.untyped_storage().nbytes() == 4 and tuple(p.shape) == weights.shapes[n] for n, p in params.items())
    # the source reads a tensor, or rows of it, as float32: the file's BF16 values, exactly
    from safetensors import safe_open

    name = "model.embed_tokens.weight"
    with safe_open(str(ckpt / "model-00001-of-00002.safetensors"), "pt") as f:
        stored = f.get_tensor(name) if name in f.keys() else None
    if stored is None:
        with safe_open(str(ckpt / "model-00002-of-00002.safetensors"), "pt") as f:
            stored = f.get_tensor(name)
    assert weights.tensor(name).dtype.is_floating_point and weights.tensor(name).equal(stored.float())
    assert weights.tensor(name, (3, 7)).equal(stored[3:7].float())


def test_streamed_fp32_equals_the_classic_export(ckpt, cfg, classic, tmp_path):
    result = _streamed(ckpt, cfg, tmp_path / "s32", "fp32", st.GENERATION_STAGES)
    assert not result.reused and result.manifest["key"]["weights"] == "streamed"
    assert "precision" not in result.manifest  # an FP32 export like any other
    _assert_same(classic, tmp_path / "s32", st.GENERATION_STAGES, cfg, ckpt)
    # the layers have the classic export's names (INT8 policies and --keep-float name them)
    import onnx

    from bitdance_rt.export import read_manifest

    for stage in st.GENERATION_STAGES:
        names = []
        for directory in (classic, tmp_path / "s32"):
            graph = onnx.load(
                str(directory / read_manifest(directory)["stage_files"][stage][0]), load_external_data=False
            ).graph
            names.append(sorted(n.name for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "Gather")))
        assert names[0] == names[1] and names[0], stage
    again = _streamed(ckpt, cfg, tmp_path / "s32", "fp32", st.GENERATION_STAGES)
    assert again.reused


def test_streamed_fp16_equals_the_derived_variant(ckpt, cfg, classic, tmp_path):
    from bitdance_rt.precision.derive import derive_export, graph_precision

    ours = _streamed(ckpt, cfg, tmp_path / "s16", "fp16", st.GENERATION_STAGES)
    assert graph_precision(ours.manifest) == "fp16" and ours.manifest["key"]["weights"] == "streamed"
    derived = derive_export(classic, tmp_path / "d16", "fp16", progress=False)
    _assert_same(derived.directory, tmp_path / "s16", st.GENERATION_STAGES, cfg, ckpt)


def test_large_tensors_are_streamed_in_row_chunks(ckpt, cfg, tmp_path, monkeypatch):
    """Above the skeleton size a tensor is read in slices of rows (never whole, unless the graph reads its
    transpose), and the data is the same as a whole read."""
    from bitdance_rt.export import weightless as wl
    from bitdance_rt.t2i.loading import weightless_t2i

    _, weights = weightless_t2i(ckpt, cfg)
    name = "model.embed_tokens.weight"
    reads = []
    read = weights.read
    weights.read = lambda n, rows=None: reads.append((n, rows)) or read(n, rows)
    import onnx

    holder = wl.placeholder(
        onnx.TensorProto(name=name, data_type=wl.FLOAT, dims=weights.shape(name)), {wl.SOURCE: name}
    )
    data = b"".join(bytes(c) for c in wl.weight_chunks(holder, weights, chunk_bytes=4096))
    rows = [r for n, r in reads if n == name]
    assert len(rows) > 1 and all(r is not None and r[1] - r[0] <= 4096 // (4 * weights.shape(name)[1]) for r in rows)
    assert data == read(name, None).numpy().tobytes()


def test_export_cli_fp16_never_builds_the_float32_model(ckpt, tmp_path, monkeypatch, capsys):
    """`bitdance-rt export --precision fp16 --max-batch 1` on a text-to-image checkpoint writes FP16
    graphs from the weight files: loading the model (load_t2i) or an FP32 export is never reached."""
    import bitdance_rt.t2i.loading as loading
    from bitdance_rt.cli import main
    from bitdance_rt.export import read_manifest

    def refuse(*a, **k):
        raise AssertionError("the float32 model was loaded")

    monkeypatch.setattr(loading, "load_t2i", refuse)
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fp16"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--height",
                str(HEIGHT),
                "--width",
                str(WIDTH),
                "--precision",
                "fp16",
                "--max-batch",
                "1",
                "--steps",
                str(S),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    manifest = read_manifest(out)
    assert manifest["precision"] == "fp16" and manifest["key"]["weights"] == "streamed"
    assert manifest["key"]["limits"]["max_batch"] == 1
    assert set(manifest["stage_files"]) == set(st.GENERATION_STAGES)
    assert not (tmp_path / "cache" / "exports").exists() or not any(
        (p / "manifest.json").is_file() and "precision" not in json.loads((p / "manifest.json").read_text())
        for p in (tmp_path / "cache" / "exports").iterdir()
    )  # no FP32 export was made on the way


@pytest.mark.parametrize("scaled", [True, False])
def test_streamed_source_reads_comfyui_fp8_as_the_loader_does(ckpt, tmp_path, scaled):
    """The ComfyUI FP8 files through the streamed export's reader (plain reads at the header's offsets,
    per-channel or per-tensor scales, row slices): every weight equals what the node's dequantisation
    gives (the layout writer's expected state), whole and in row slices."""
    from t2i_layouts import write_comfyui

    from bitdance_rt.t2i.config import read_checkpoint_config
    from bitdance_rt.t2i.loading import weightless_t2i

    written = write_comfyui(ckpt, tmp_path / "comfy", scaled=scaled)
    entry = tmp_path / "comfy"
    model, weights = weightless_t2i(entry, read_checkpoint_config(entry, HEIGHT, WIDTH))
    expected = written["expected"]
    assert set(weights.shapes) == set(expected)
    for name in weights.shapes:
        whole = weights.tensor(name)
        assert whole.dtype == expected[name].dtype and whole.equal(expected[name]), name
        if whole.dim() >= 2 and whole.shape[0] > 3:
            assert weights.tensor(name, (1, 3)).equal(expected[name][1:3]), name
