"""Streamed INT8 exports (precision/streamed_int8.py, export_precision_streamed(precision="int8")).

An INT8 stage written straight from the weight files must be the graph quantize_static + qdq_fixups
(int8.quantize_int8) write from the FP32 graph of that stage with the same activation ranges: the
same nodes, initializer names and values (int8 weights, scales), hence bit-identical ONNX Runtime
outputs. The ranges are computed once, on the classic FP32 export, as a derivation computes them.
The tiny model's weights are small enough to be inline in a traced graph (ONNX Runtime then
quantises them itself); the export here lowers that bound so that they are placeholders, quantised
while they stream, in chunks of 7 output channels (one weight stays inline). (Over 400 lines: its
tests share the module fixtures `made` and `fp16`, exports and ranges that take ~30 s to make.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.errors import BitDanceError  # noqa: E402

HEIGHT = WIDTH = 512
KEEP = {st.HEAD_STEP: ["/head/net/res_blocks.0/w1/MatMul"]}  # a layer kept float by the caller (+ the policy's)
INLINE_BYTES = 4096  # weights below this stay inline in the traced graph: here the decoder's conv_out only


class _Feeds:
    """A calibration reader (get_next / rewind / len) over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.rewind()

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def _feeds(spec, model, seeds) -> list[dict]:
    from bitdance_rt.export.wrappers import example_inputs

    return [{t.name: x.numpy() for t, x in zip(spec.inputs, example_inputs(spec, model, seed=s))} for s in seeds]


def _graph(path: Path, data: bool = True):
    import onnx

    return onnx.load(str(path), load_external_data=data).graph


def _stage_file(directory: Path, stage: str) -> Path:
    from bitdance_rt.export import read_manifest

    return directory / read_manifest(directory)["stage_files"][stage][0]


def _outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def made(t2i_checkpoints, tmp_path_factory):
    """The classic FP32 export of the INT8 stages, their activation ranges (max, on two seeds' inputs),
    the streamed FP32 export of the same stages, quantize_int8's INT8 graphs of both, and the streamed
    INT8 export with the same ranges."""
    from bitdance_rt.export import export_stages
    from bitdance_rt.export import shared_weights, weightless
    from bitdance_rt.export.manifest import manifest_specs, read_manifest
    from bitdance_rt.precision.int8 import activation_ranges, quantize_int8
    from bitdance_rt.precision.policy import int8_float_layers, quantised_layers
    from bitdance_rt.precision.streamed import export_precision_streamed
    from bitdance_rt.t2i.config import read_checkpoint_config
    from bitdance_rt.t2i.loading import checkpoint_dir_source, load_t2i, weightless_t2i
    from conftest import torch_threads

    ckpt = t2i_checkpoints[16]
    cfg = read_checkpoint_config(ckpt, HEIGHT, WIDTH)
    root = tmp_path_factory.mktemp("int8")
    source_id = checkpoint_dir_source(ckpt)
    with torch_threads(1):
        classic = export_stages(
            load_t2i(ckpt, HEIGHT, WIDTH, config=cfg).model,
            root / "c32",
            source_id,
            stages=st.INT8_STAGES,
            progress=False,
        ).directory
        model, weights = weightless_t2i(ckpt, cfg)
        streamed32 = export_precision_streamed(
            model, weights, root / "s32", source_id, "fp32", stages=st.INT8_STAGES, progress=False
        ).directory
        specs = manifest_specs(read_manifest(classic), classic)
        ranges, derived = {}, {"classic": {}, "streamed": {}}
        for stage in st.INT8_STAGES:
            ranges[stage] = root / f"{stage}.ranges.json"
            activation_ranges(
                _stage_file(classic, stage), _Feeds(_feeds(specs[stage], model, (2, 3))), "max", ranges[stage]
            )
            for kind, directory in (("classic", classic), ("streamed", streamed32)):
                src = _stage_file(directory, stage)
                keep = set(KEEP.get(stage, [])) | set(int8_float_layers(stage, quantised_layers(src)))
                dst = derived[kind][stage] = root / f"{kind}-{stage}.int8.onnx"
                quantize_int8(src, dst, _Feeds([{}]), "max", sorted(keep), calibration_cache=ranges[stage])
        with pytest.MonkeyPatch.context() as patch:
            for module in (weightless, shared_weights):
                patch.setattr(module, "SKELETON_BYTES", INLINE_BYTES)
            patch.setattr(weightless, "_rows_per_chunk", lambda shape, chunk_bytes: 7)
            ours = export_precision_streamed(
                model,
                weights,
                root / "i8",
                source_id,
                "int8",
                ranges=ranges,
                keep_float=KEEP,
                stages=st.GENERATION_STAGES,
                progress=False,
            )
    return {
        "ckpt": ckpt,
        "cfg": cfg,
        "model": model,
        "weights": weights,
        "specs": specs,
        "classic": classic,
        "streamed32": streamed32,
        "ranges": ranges,
        "derived": derived,
        "ours": ours,
    }


def test_streamed_int8_is_the_quantize_static_graph(made):
    """Every INT8 stage: the graph quantize_int8 writes from the streamed FP32 graph, node for node and
    initializer for initializer (int8 weights and per-channel scales included), and its ONNX Runtime
    outputs equal, bit for bit, those of that graph and of the INT8 graph derived from the classic
    export (whose weights and scales it holds too)."""
    import onnx
    from onnx import numpy_helper

    from bitdance_rt.export.reader import open_export
    from bitdance_rt.precision.policy import fingerprint

    ours = made["ours"]
    info = open_export(ours.directory, generation=True)  # a backend opens it as a derived INT8 variant
    assert info.precision == "int8" and not ours.reused
    assert ours.manifest["fp16_stages"] == [st.PREFIX_EMBED] and ours.manifest["calibration_method"] == "max"
    key = ours.manifest["key"]
    assert key["weights"] == "streamed" and key["policy"] == fingerprint("int8") and key["keep_float"] == KEEP
    assert sorted(key["calibration"]["ranges"]) == sorted(st.INT8_STAGES)
    assert sorted(ours.manifest["stage_files"]) == sorted(st.INT8_STAGES + (st.PREFIX_EMBED,))
    prefix = _graph(_stage_file(ours.directory, st.PREFIX_EMBED))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in prefix.initializer)  # its FP16 graph
    streamed_in = 0
    for stage in st.INT8_STAGES:
        mine = _graph(_stage_file(ours.directory, stage))
        ref = _graph(made["derived"]["streamed"][stage])
        assert [(n.op_type, n.name) for n in mine.node] == [(n.op_type, n.name) for n in ref.node], stage
        assert [(list(n.input), list(n.output)) for n in mine.node] == [
            (list(n.input), list(n.output)) for n in ref.node
        ]
        assert [t.name for t in mine.initializer] == [t.name for t in ref.initializer], stage
        theirs = {t.name: numpy_helper.to_array(t) for t in ref.initializer}
        for t in mine.initializer:
            a, b = numpy_helper.to_array(t), theirs[t.name]
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{stage}: {t.name}"
        # the raw streamed graph held its weights as placeholders (quantised while streaming), but one
        raw = _graph(_stage_file(made["streamed32"], stage), data=False)
        streamed_in += sum(len(t.raw_data) >= INLINE_BYTES for t in raw.initializer)
        # the INT8 graph derived from the classic export: same weights and scales per quantised node, same outputs
        classic = _graph(made["derived"]["classic"][stage])
        assert _weights_by_node(mine) == _weights_by_node(classic) != {}, stage
        fp32 = [_graph(_stage_file(made[k], stage), data=False).node for k in ("classic", "streamed32")]
        if [n.op_type for n in fp32[0]] == [n.op_type for n in fp32[1]]:  # (traced alike: token_embed, head_step)
            assert [n.op_type for n in mine.node] == [n.op_type for n in classic.node], stage
        feeds = _feeds(made["specs"][stage], made["model"], (1,))[0]
        outs = [
            _outputs(p, feeds)
            for p in (_stage_file(ours.directory, stage), *[made["derived"][k][stage] for k in ("streamed", "classic")])
        ]
        for name, x, y, z in zip(made["specs"][stage].output_names, *outs):
            assert x.dtype == y.dtype == z.dtype and np.array_equal(x, y) and np.array_equal(x, z), f"{stage}.{name}"
    assert streamed_in > 50
    again = _reexport(made, made["ours"].directory)
    assert again.reused


def _weights_by_node(graph) -> dict:
    """{quantised node: [(int8 weight bytes, scale bytes)]} of a Q/DQ graph, whatever the initializers' names."""
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        for name in node.input:
            dq = made_by.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            if inits[dq.input[0]].data_type == TensorProto.INT8:
                data, scale = (numpy_helper.to_array(inits[i]) for i in dq.input[:2])
                out.setdefault(node.name, []).append((data.tobytes(), scale.tobytes()))
    return out


def _reexport(made, out, **options):
    from bitdance_rt.precision.streamed import export_precision_streamed
    from bitdance_rt.t2i.loading import checkpoint_dir_source

    return export_precision_streamed(
        made["model"],
        made["weights"],
        out,
        checkpoint_dir_source(made["ckpt"]),
        "int8",
        **{"ranges": made["ranges"], "keep_float": KEEP, "stages": st.GENERATION_STAGES, "progress": False, **options},
    )


def test_bad_activation_ranges_are_named(made, tmp_path):
    """A ranges file that is not one, or lacks a tensor the stage quantises, fails naming the file (and
    the tensor); so does an INT8 export without ranges for one of its INT8 stages."""
    import onnx

    from bitdance_rt.precision.streamed_int8 import quantize_streamed

    def graph():
        return onnx.load(str(_stage_file(made["streamed32"], st.TOKEN_EMBED)))

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BitDanceError, match=f"{bad}: not an activation-range file"):
        quantize_streamed(graph(), st.TOKEN_EMBED, bad)
    with pytest.raises(BitDanceError, match=f"{tmp_path / 'none.json'}: no activation-range file"):
        quantize_streamed(graph(), st.TOKEN_EMBED, tmp_path / "none.json")
    cache = json.loads(made["ranges"][st.TOKEN_EMBED].read_text())
    del cache["data"]["tokens"]  # the input of the first projection
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps(cache))
    with pytest.raises(BitDanceError, match=f"{lacking}: no activation range of tensor 'tokens'"):
        quantize_streamed(graph(), st.TOKEN_EMBED, lacking)
    ranges = {s: p for s, p in made["ranges"].items() if s != st.DECODER}
    with pytest.raises(BitDanceError, match="no activation ranges for INT8 stage.s. decoder"):
        _reexport(made, tmp_path / "x", ranges=ranges)


def test_int32_bias_scale_adjustment_is_streamed_too(tmp_path):
    """A channel of tiny weights under a large bias: ONNX Runtime raises that channel's scale so that the
    int32 bias fits (even with float biases). Weights streamed in chunks of 3 channels, one of them
    transposed, give the very graph and values quantize_int8 writes."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    from bitdance_rt.export import weightless as wl
    from bitdance_rt.export.shared_weights import placeholder, save_streamed
    from bitdance_rt.precision.int8 import activation_ranges, quantize_int8
    from bitdance_rt.precision.streamed_int8 import Int8Weights, quantize_streamed

    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(11, 8, generator=gen), "u": torch.randn(9, 8, generator=gen)}
    tensors["w"][3] *= 1e-20
    bias = torch.randn(11, generator=gen).numpy()
    source = wl.WeightSource(
        {k: tuple(v.shape) for k, v in tensors.items()},
        lambda name, rows: tensors[name] if rows is None else tensors[name][rows[0] : rows[1]],
    )

    def graph():
        weights = [
            placeholder(onnx.TensorProto(name="w", data_type=wl.FLOAT, dims=[11, 8]), {wl.SOURCE: "w"}),
            placeholder(
                onnx.TensorProto(name="u.T", data_type=wl.FLOAT, dims=[8, 9]), {wl.SOURCE: "u", wl.TRANSPOSED: 1}
            ),
            numpy_helper.from_array(bias, "b"),
        ]
        nodes = [
            helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/gemm/Gemm", transB=1),
            helper.make_node("MatMul", ["x", "u.T"], ["z"], name="/mm/MatMul"),
            helper.make_node("Relu", ["y"], ["y2"], name="/relu"),
        ]
        io = [helper.make_tensor_value_info(n, wl.FLOAT, ["n", d]) for n, d in (("x", 8), ("y2", 11), ("z", 9))]
        g = helper.make_graph(nodes, "g", io[:1], io[1:], weights)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    fp32 = graph()
    save_streamed(fp32, tmp_path / "fp32.onnx", [(t, wl.weight_chunks(t, source)) for t in wl.placeholders(fp32)])
    feeds = [{"x": np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)} for i in range(3)]
    activation_ranges(tmp_path / "fp32.onnx", _Feeds(feeds), "max", tmp_path / "ranges.json")
    quantize_int8(
        tmp_path / "fp32.onnx", tmp_path / "ref.onnx", _Feeds(feeds), calibration_cache=tmp_path / "ranges.json"
    )
    hook = Int8Weights()
    ours = quantize_streamed(graph(), st.HEAD_STEP, tmp_path / "ranges.json", source=source, weights=hook)
    fills = [(t, wl.weight_chunks(t, source, chunk_bytes=3 * 8 * 4, to_int8=hook)) for t in wl.placeholders(ours)]
    save_streamed(ours, tmp_path / "ours.onnx", fills)
    ref, mine = _graph(tmp_path / "ref.onnx"), _graph(tmp_path / "ours.onnx")
    assert [(n.op_type, n.name) for n in mine.node] == [(n.op_type, n.name) for n in ref.node]
    assert [t.name for t in mine.initializer] == [t.name for t in ref.initializer]
    theirs = {t.name: numpy_helper.to_array(t) for t in ref.initializer}
    for t in mine.initializer:
        assert np.array_equal(numpy_helper.to_array(t), theirs[t.name]), t.name
    natural = float(np.abs(tensors["w"][3].numpy()).max()) / 127
    assert theirs["w_scale"][3] > 1e6 * natural  # (the adjustment happened)
    for x, y in zip(_outputs(tmp_path / "ours.onnx", feeds[0]), _outputs(tmp_path / "ref.onnx", feeds[0])):
        assert np.array_equal(x, y)


@pytest.fixture(scope="module")
def fp16(made, tmp_path_factory):
    """The streamed FP16 export of the INT8 stages (what a streamed INT8 export measures its ranges on)."""
    from bitdance_rt.precision.streamed import export_precision_streamed
    from conftest import torch_threads

    with torch_threads(1):
        return export_precision_streamed(
            made["model"],
            made["weights"],
            tmp_path_factory.mktemp("s16") / "s16",
            "x",
            "fp16",
            stages=st.INT8_STAGES,
            progress=False,
        ).directory


def test_ranges_measured_on_the_fp16_graphs(made, fp16, tmp_path):
    """precision/fp16_ranges.py: the ranges of the FP16 graphs, under the FP32 graphs' tensor names (graph
    inputs and outputs the FP16 converter casts included), within FP16's error of ONNX Runtime's own
    calibration of the FP32 graphs on the same feeds; an INT8 export made with them runs, and computes
    what the export made with the FP32 ranges computes, but for the rounding moved by those differences."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data

    from bitdance_rt.precision.fp16_ranges import _calibrated, fp16_ranges
    from bitdance_rt.precision.int8 import activation_ranges
    from bitdance_rt.precision.policy import quantised_layers
    from bitdance_rt.precision.streamed import export_precision_streamed
    from conftest import torch_threads

    ranges = {}
    for stage in st.INT8_STAGES:
        graph, feeds = _stage_file(fp16, stage), _feeds(made["specs"][stage], made["model"], (2, 3))
        ranges[stage] = fp16_ranges(graph, _Feeds(feeds), "max", tmp_path / f"{stage}.json", threads=1)
        ours, theirs = load_tensors_data(ranges[stage]), load_tensors_data(made["ranges"][stage])
        assert set(ours.keys()) <= set(theirs.keys()) and len(ours.keys()) > 0, stage
        # ONNX Runtime's own MinMax calibrator on the FP16 graph finds the same, under the FP16 names, but for
        # an FP16 rounding or two (its graph, with ReduceMin / ReduceMax nodes added, is fused otherwise)
        activation_ranges(graph, _Feeds(feeds), "max", tmp_path / f"{stage}-ort.json")
        ort16 = load_tensors_data(tmp_path / f"{stage}-ort.json")
        names = _calibrated(onnx.load(str(graph), load_external_data=False).graph, quantised_layers(graph))
        for name16, name in names.items():
            got, want = ours[name].highest.item(), np.float32(ort16[name16].highest).item()
            assert abs(got - want) <= 2**-9 * want, f"{stage}: {name} {got} vs {want}"
        for name, td in ours.items():
            want = np.asarray(theirs[name].highest).item()
            assert td.lowest.item() == -td.highest.item() and td.highest.dtype == np.float32
            assert abs(td.highest.item() - want) <= 0.02 * want, f"{stage}: {name} {td.highest.item()} vs {want}"
        if stage == st.DECODER:  # its input latent and output image go through the converter's casts
            assert {"latent", "image"} <= set(ours.keys())
    compared = [st.TOKEN_EMBED, st.BACKBONE, st.HEAD_STEP]  # (the decoder's ranges are checked above)
    with torch_threads(1):
        mine = export_precision_streamed(
            made["model"],
            made["weights"],
            tmp_path / "i8",
            "x",
            "int8",
            ranges={s: ranges[s] for s in compared},
            keep_float=KEEP,
            stages=compared,
            progress=False,
        ).directory
    for stage in compared:  # each INT8 graph's error against the FP32 graph: about the same
        feeds = _feeds(made["specs"][stage], made["model"], (1,))[0]
        fp32 = _outputs(_stage_file(made["streamed32"], stage), feeds)
        errors = [
            [float(np.abs(x - r).mean() / np.abs(r).mean()) for x, r in zip(_outputs(path, feeds), fp32)]
            for path in (_stage_file(mine, stage), made["derived"]["streamed"][stage])
        ]
        for ours, theirs in zip(*errors):
            assert ours <= 1.5 * theirs + 1e-3, f"{stage}: mean relative error {ours:.4g} vs {theirs:.4g}"


def test_ranges_measured_piece_by_piece_are_the_whole_graphs(made, fp16, tmp_path):
    """graph_pieces.py: the backbone and head cut into pieces of a quarter of their weights, each run as a
    session of its own over every feed with the tensors earlier pieces handed on. On the FP32 backbone the
    ranges are those one session of the whole graph gives, bit for bit (max and entropy). On the FP16
    head they may differ by FP16 roundings: inside one graph ONNX Runtime on a CPU computes a run of
    FP16 nodes in FP32 (it drops the casts between them), a piece's carried tensors are FP16. Nothing is
    left in the carry folder."""
    import onnx
    from onnxruntime.quantization.calibrate import load_tensors_data

    from bitdance_rt.precision.fp16_ranges import _calibrated, _types, fp16_ranges
    from bitdance_rt.precision.graph_pieces import cut, tensor_bytes
    from bitdance_rt.precision.policy import quantised_layers

    for stage, export, exact in ((st.BACKBONE, made["streamed32"], True), (st.HEAD_STEP, fp16, False)):
        feeds = _feeds(made["specs"][stage], made["model"], (2, 3))
        graph = _stage_file(export, stage)
        model = onnx.load(str(graph), load_external_data=False)
        total = sum(tensor_bytes(t) for t in model.graph.initializer)
        names = sorted(_calibrated(model.graph, quantised_layers(model)))
        pieces = cut(model, names, _types(model), total // 4)
        assert len(pieces) >= 3, f"{stage}: {len(pieces)} pieces"
        assert sorted(w for p in pieces for w in p.wanted) == names
        assert any(p.carry_in for p in pieces[1:])
        largest = max(tensor_bytes(t) for t in model.graph.initializer)
        assert all(p.weight_bytes <= 2 * (total // 4) + largest for p in pieces), [p.weight_bytes for p in pieces]
        for method in ("max", "entropy") if exact else ("max",):
            out = tmp_path / f"{stage}-{exact}-{method}.json"
            whole = load_tensors_data(fp16_ranges(graph, _Feeds(feeds), method, out))
            parts_file = tmp_path / "pieces" / out.name
            parts = load_tensors_data(fp16_ranges(graph, _Feeds(feeds), method, parts_file, piece_bytes=total // 4))
            assert sorted(parts.keys()) == sorted(whole.keys())
            for name in whole.keys():
                for bound in ("lowest", "highest"):
                    got, want = getattr(parts[name], bound).item(), getattr(whole[name], bound).item()
                    close = got == want if exact else abs(got - want) <= 2**-8 * abs(want)
                    assert close, f"{stage} {method} {name}.{bound}: {got} vs {want}"
    assert {p.suffix for p in (tmp_path / "pieces").iterdir()} == {".json"}


def _widened(values: dict) -> dict:
    """The calibrator's {tensor: [arrays]} with float16 arrays as float32 ones."""
    return {k: [np.asarray(a, np.float32) if a.dtype == np.float16 else a for a in v] for k, v in values.items()}


class _OneByOne(_Feeds):
    """A reader whose groups are its feeds one by one (activation_ranges collects each group at once)."""

    def groups(self):
        return [_Feeds([feed]) for feed in self.feeds]


def test_histogram_ranges_on_the_fp16_graphs(made, fp16, tmp_path, monkeypatch):
    """entropy and percentile: ONNX Runtime's histogram collector with int8.activation_ranges' bins, fed one
    feed at a time: the ranges its own calibrator finds on the FP16 graph, given the feeds one by one, under
    the FP32 graph's names. Both histogram the activations widened to float32 (numpy 2 cannot put 2048
    float16-edged bins over these values)."""
    import onnx
    from onnxruntime.quantization.calibrate import HistogramCollector, load_tensors_data

    from bitdance_rt.precision.fp16_ranges import _calibrated, fp16_ranges
    from bitdance_rt.precision.int8 import activation_ranges
    from bitdance_rt.precision.policy import quantised_layers

    stage = st.TOKEN_EMBED
    graph = _stage_file(fp16, stage)
    names = _calibrated(onnx.load(str(graph), load_external_data=False).graph, quantised_layers(graph))
    assert "tokens" in names.values() and "tokens" not in names  # (the graph input, read through a cast)
    feeds = _feeds(made["specs"][stage], made["model"], (2, 3, 4))
    for method in ("entropy", "percentile"):
        ours = load_tensors_data(fp16_ranges(graph, _Feeds(feeds), method, tmp_path / f"{method}.json", threads=1))
        with monkeypatch.context() as m:
            collect = HistogramCollector.collect
            m.setattr(HistogramCollector, "collect", lambda c, v: collect(c, _widened(v)))
            activation_ranges(graph, _OneByOne(feeds), method, tmp_path / f"{method}-ort.json")
        theirs = load_tensors_data(tmp_path / f"{method}-ort.json")
        assert sorted(ours.keys()) == sorted(names.values())
        for name16, name in names.items():
            for bound in ("lowest", "highest"):
                got, want = getattr(ours[name], bound), np.asarray(getattr(theirs[name16], bound), np.float32)
                assert got.dtype == np.float32 and np.array_equal(got, want), f"{method} {name}.{bound}"


def test_the_plan_holds_what_a_streamed_int8_export_holds(made, tmp_path):
    """What `plan` counts for an INT8 text-to-image run (each stage's bytes, the weights held, the shared
    ones) is what the streamed INT8 export's graphs hold (test_plan's comparison, on this export)."""
    from test_plan import _check_against

    from bitdance_rt.precision.streamed import export_precision_streamed
    from conftest import torch_threads

    with torch_threads(1):
        directory = export_precision_streamed(
            made["model"], made["weights"], tmp_path / "i8", "x", "int8", ranges=made["ranges"], progress=False
        ).directory
    _check_against(made["cfg"], directory, "int8", made["cfg"].default_steps)


def test_int8_export_measures_its_ranges_on_the_graphs_the_set_was_captured_on(
    t2i_checkpoints, t2i_cache_template, tmp_path, monkeypatch, capsys
):
    """`calibrate --capture-export FP16_DIR` then `export --precision int8 --calibration SET`: the ranges are
    measured on FP16_DIR (still the graphs the set records), so the INT8 export makes no FP16 export of its
    own, and no FP32 one."""
    import shutil

    from bitdance_rt.cli import main
    from bitdance_rt.export.manifest import read_manifest
    from conftest import T2I_STEPS, T2I_TEXT_TOKENS, torch_threads

    from bitdance_rt import paths
    from bitdance_rt.backends import resolve_model

    source = resolve_model(None, str(t2i_checkpoints[64]), None, 512, 512, T2I_TEXT_TOKENS)
    with paths.using_cache_root(t2i_cache_template(64, "fp16")):  # (the template holds other checkpoints' too)
        made_fp16 = paths.variant_dir(paths.export_dir(source.config, source.weights_source(), T2I_STEPS), "fp16")
    fp16 = tmp_path / "fp16"
    shutil.copytree(made_fp16, fp16)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(cache))
    model = ["--checkpoint", str(t2i_checkpoints[64]), "--height", "512", "--width", "512"]
    model += ["--max-text-tokens", str(T2I_TEXT_TOKENS), "--steps", str(T2I_STEPS)]
    with torch_threads(1):
        calibrate = ["calibrate", *model, "--prompt", "a red cat", "--batch-size", "1", "--max-samples", "2"]
        calibrate += ["--threads", "1"]
        assert main([*calibrate, "--capture-export", str(fp16), "--out", str(tmp_path / "set")]) == 0
        out = tmp_path / "int8"
        export = ["export", *model, "--precision", "int8", "--max-batch", "1", "--calibration", str(tmp_path / "set")]
        assert main([*export, "--out", str(out)]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest["precision"] == "int8" and manifest["key"]["weights"] == "streamed"
    assert not (cache / "exports").exists() or not any((cache / "exports").iterdir())  # no FP16, no FP32 export
    (ranges,) = (cache / "ranges").iterdir()
    assert ranges.name.startswith("fp16-max-") and sorted(p.stem for p in ranges.iterdir()) == sorted(st.INT8_STAGES)
