"""bitdance-rt plan: the weights it finds per stage agree with the initialisers of real exports
(FP32, FP16, INT8; ImageNet and text-to-image), its cache is the runtime's, the 14B's parameters
counted on the meta device are Qwen3-14B's published ones, and the fits arithmetic is right. The road
(each step of getting there: load, export, derive, calibrate, build, run): its figures for the tiny
models, its capture estimate against a real capture, its export figure against a measured export, the
14B's fits and fixes on three machines, and the one-line pre-flight refusal of export / calibrate /
generate.
(Over 400 lines: it is the one test module of bitdance_rt/plan/, the memory plan and the road that
`bitdance-rt plan` reports together.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitdance_rt.backends import BackendOptions, auto_export, resolve_model
from bitdance_rt.plan import GIB, TARGETS, MemoryPlan, StageMemory, kv_cache_bytes, plan, stage_memory
from bitdance_rt.t2i_config import QWEN3_14B, t2i_preset

from conftest import cached_pipeline, copy_cache, torch_threads

pytest.importorskip("onnx")

# How close the plan's bytes must be to what an export holds (initialisers and Constant nodes). On
# these tiny models a graph's own folded constants (a fused sampler's unrolled time embeddings, the
# position slices the exporter folds into each layer) are a visible share, which the plan follows
# only roughly: measured here within 7.4% per stage (the FP16 fused sampler; the rest within 5.4%)
# and 2.1% for the loaded graphs together. On BitDance-B-4x (docs/memory.md) every
# stage agrees within 0.3%.
# int4: the fused sampler's unrolled per-step constants (~29 KB on the embedded model, which the plan
# leaves out: 5% of its FP32 head_sampler) are 13% of its INT4 head_sampler
REL = {"fp32": 0.08, "fp16": 0.08, "int8": 0.08, "int4": 0.15}


def graph_tensors(path) -> list[tuple[tuple, int]]:
    """(identity, bytes) of each tensor a graph holds: its initialisers and its Constant nodes' values.
    External data is identified by where it lies (files that share weights point at one place),
    inline data by its contents."""
    import hashlib

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    out = []
    for t in list(model.graph.initializer) + constants:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out.append((("file", info["location"], info.get("offset", "0")), int(info["length"])))
        else:
            data = t.raw_data if t.HasField("raw_data") else t.SerializeToString()
            n = len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
            out.append((("data", t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest()), n))
    return out


def initializer_bytes(path) -> int:
    """Bytes of the tensors a graph holds: its initialisers and its Constant nodes' values."""
    return sum(n for _, n in graph_tensors(path))


def _check_against(cfg, directory, precision, steps, backend="onnxruntime"):
    """Each stage's bytes against its graph's; the loaded graphs' sum against the plan's weights held;
    and what the loaded graphs hold twice (the same tensor in two graphs) against the plan's
    shared weights: nothing for ImageNet models (one backbone graph for both phases), the 2D position
    table for text-to-image. `backend`: whose graphs these are (INT4's differ)."""
    from bitdance_rt.plan import shared_weights, stage_weights
    from bitdance_rt.precision.policy import INT4_FORMATS

    form = INT4_FORMATS.get(backend, "matmulnbits")
    stages, _ = stage_memory(cfg, precision, steps, form)
    compared = 0
    for s in stages:
        path = directory / f"{s.stage}.onnx"
        if not path.exists():
            continue
        got = initializer_bytes(path)
        assert abs(s.bytes - got) <= REL[precision] * got, (precision, s.stage, s.bytes, got)
        compared += 1
    assert compared >= 4, f"{directory} has too few stages to compare"
    loaded = [s.stage for s in stages if s.loaded]
    assert all((directory / f"{s}.onnx").exists() for s in loaded), (precision, loaded)  # what a Pipeline loads
    graphs = {s: graph_tensors(directory / f"{s}.onnx") for s in loaded}
    held = sum(n for tensors in graphs.values() for _, n in tensors)
    seen = {}  # tensor -> (bytes, the graphs holding it)
    for s, tensors in graphs.items():
        for key, n in tensors:
            seen.setdefault(key, (n, set()))[1].add(s)
    twice = sum(n * (len(by) - 1) for n, by in seen.values())
    p = plan(cfg, precision, backend, steps=steps)
    assert abs(p.weight_bytes - held) <= REL[precision] * held, (precision, p.weight_bytes, held)
    planned = sum(b for b, _ in shared_weights(stage_weights(cfg, precision, steps, int4_format=form), loaded).values())
    assert abs(twice - planned) <= 0.01 * held, (precision, twice, planned, held)


@pytest.fixture(scope="module")
def embedded_cache(embedded_fp16_cache_template, tmp_path_factory):
    """This module's cache root: a copy of the session's holding the embedded model's automatic FP32 export
    and its FP16 variant (conftest); the INT8 variant is derived in it here."""
    return copy_cache(embedded_fp16_cache_template, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_plan_agrees_with_the_embedded_models_exports(precision, embedded_cache, monkeypatch):
    """The automatic exports of the embedded model: the FP32 export and its FP16 variant are the
    session's (conftest embedded_fp16_cache_template), found by auto_export; INT8 is derived here."""
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(embedded_cache))
    source = resolve_model(None, None, None, None, None, None)
    with torch_threads(1):
        directory = auto_export(source, source.config.default_steps, BackendOptions(progress=False), precision)
    _check_against(source.config, directory, precision, source.config.default_steps)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_plan_agrees_with_a_text_to_image_export(precision, t2i_checkpoints, t2i_cache_template, tmp_path, monkeypatch):
    """The session's automatic exports of the tiny 64x checkpoint (conftest t2i_cache_template: what
    auto_export below would make), found by auto_export in a copy of their cache."""
    ckpt = t2i_checkpoints[64]
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(copy_cache(t2i_cache_template(64, precision), tmp_path / "cache")))
    source = resolve_model(None, str(ckpt), None, 512, 512, 48)
    with torch_threads(1):
        directory = auto_export(source, 2, BackendOptions(progress=False), precision)
    _check_against(source.config, directory, precision, 2)


def test_every_weight_but_the_encoders_is_found():
    """The generation stages together read every parameter and buffer of the model but the
    autoencoder's encoder (images are only decoded); each weight counted once is their sum."""
    from bitdance_rt.plan import _meta_model, stage_tensors

    for cfg in (resolve_model(None, None, None, None, None, None).config, t2i_preset("BitDance-14B-16x", 512, 512)):
        model = _meta_model(cfg)
        everything = dict(list(model.named_parameters()) + list(model.named_buffers()))
        wanted = {n for n in everything if not n.startswith("vae.encoder.")}
        read = {name.split("#")[0] for held in stage_tensors(cfg, steps=2).values() for name in held}
        assert read - {"<constant>"} == wanted
        weights = {
            n: (t.numel(), t.element_size())
            for n, t in everything.items()
            if n in wanted and t.dtype.is_floating_point and n.endswith("weight")
        }
        _, distinct = stage_memory(cfg, "fp32", steps=2)
        assert distinct >= sum(a * b for a, b in weights.values())


def test_unrolled_sampler_is_the_full_trace(t2i_checkpoints, monkeypatch):
    """A fused sampler of more steps than UNROLL_FROM's is unrolled from short traces: the same tensors,
    names and order as tracing every step (ImageNet and text-to-image); the full trace where the short
    ones do not confirm the unrolling."""
    from bitdance_rt import stages as st
    from bitdance_rt.plan import memory

    t2i = resolve_model(None, str(t2i_checkpoints[64]), None, 512, 512, 48).config
    steps = memory.UNROLL_FROM[-1] + 2
    for cfg in (resolve_model(None, None, None, None, None, None).config, t2i):
        full = memory._trace(cfg, st.GENERATION_STAGES, steps)
        got = memory.stage_tensors(cfg, steps=steps)
        assert [(s, list(h.items())) for s, h in got.items()] == [(s, list(h.items())) for s, h in full.items()]
    monkeypatch.setattr(memory, "_unroll", lambda *a: None)  # not confirmed: the full trace
    assert memory.stage_tensors(cfg, steps=steps) == full


def test_14b_parameters_on_the_meta_device():
    """Qwen3-14B's model card: 14.8B parameters, 13.2B without the embeddings; the LM head (as large
    as the embedding) is not needed for images. The head and autoencoder: the official 14B-64x
    configuration (docs/memory.md)."""
    from bitdance_rt.plan import stage_tensors

    cfg = t2i_preset("BitDance-14B-64x")
    held = stage_tensors(cfg, stages=("prefix_embed", "token_embed", "backbone", "head_sampler", "decoder"), steps=2)
    layers = sum(n for name, (n, *_) in held["backbone"].items() if name.startswith("model.layers."))
    embedding = held["prefix_embed"]["model.embed_tokens.weight"][0]
    assert embedding == QWEN3_14B["vocab_size"] * QWEN3_14B["hidden_size"]
    assert list(held["prefix_embed"]) == ["model.embed_tokens.weight"]  # the table, nothing else
    for stage in ("token_embed", "backbone"):  # a step embeds tokens with the projector
        assert "model.embed_tokens.weight" not in held[stage]
    assert not any(name.startswith("model.layers.") for name in held["token_embed"])
    assert 13.15e9 < layers < 13.25e9  # 13.2B non-embedding
    assert 14.7e9 < layers + 2 * embedding < 14.9e9  # + embedding and LM head: 14.8B
    head = sum(n for name, (n, *_) in held["head_sampler"].items() if name.startswith("head."))
    assert round(head / 1e9, 2) == 1.76
    decoder = sum(n for name, (n, *_) in held["decoder"].items() if name.startswith("vae."))
    assert round(decoder / 1e9, 2) == 0.26  # the decoder half of the 0.46B autoencoder


def test_each_weight_held_once():
    """One backbone graph for both phases: the loaded graphs read disjoint weights (the text-to-image
    2D position table too: only the backbone adds it); head_step, beside the fused sampler, is on
    demand and named in the notes, not counted; INT8 exports sample with it."""
    from bitdance_rt.plan import shared_weights, stage_weights

    tiny = resolve_model(None, None, None, None, None, None).config
    t2i = t2i_preset("BitDance-14B-64x", 512, 512)
    for cfg, twice in ((tiny, set()), (t2i, set())):
        for precision in ("fp32", "int8"):
            p = plan(cfg, precision, "tensorrt", steps=2)
            loaded = [s.stage for s in p.stages if s.loaded]
            head = "head_step" if precision == "int8" else "head_sampler"
            assert loaded == ["prefix_embed", "token_embed", "backbone", head, "decoder"]
            weights = stage_weights(cfg, precision, steps=2)
            shared = shared_weights(weights, loaded)
            assert set(shared) == twice
            extra = sum(b for b, _ in shared.values())
            # held = each weight once + what two graphs really hold (+ head_step's own constants, which
            # the distinct count has and no loaded graph does)
            assert 0 <= p.distinct_bytes + extra - p.weight_bytes <= 0.001 * p.weight_bytes
            if twice:
                assert any("pos2d (token_embed and backbone)" in n for n in p.notes)
            else:
                assert p.notes[0] == "each weight held once: the stages read disjoint weights"
            if precision == "int8":
                assert "head_sampler" not in [s.stage for s in p.stages] and p.on_demand_bytes == 0
            else:
                (step,) = [s for s in p.stages if not s.loaded]
                assert step.stage == "head_step" and p.on_demand_bytes == step.bytes
                assert any(n.startswith("head_step is loaded only on demand") for n in p.notes)
                head_bytes = sum(
                    b for name, (b, by) in shared_weights(weights, loaded + ["head_step"]).items() if "head_step" in by
                )
                assert 0.97 * step.bytes < head_bytes <= step.bytes  # the head's weights, again
    torch_plan = plan(tiny, "fp32", "torch", steps=2)
    assert torch_plan.weight_bytes == torch_plan.distinct_bytes and torch_plan.on_demand_bytes == 0


def test_activations_per_backbone_phase():
    """The backbone's prefill (prefix_len positions) and step (P) are one graph: the plan estimates
    each phase, and the peak from the calls as each backend runs them."""
    cfg = t2i_preset("BitDance-14B-64x")
    p = plan(cfg, "fp16", "tensorrt")
    calls = p.activations
    assert set(calls) == {"backbone prefill", "backbone step", "head", "decoder"}
    assert calls["backbone prefill"] > calls["backbone step"] > 0  # 322 positions against 64
    # TensorRT: one scratch buffer for every context, calls one after another; ONNX Runtime decodes
    # beside the AR steps on a GPU
    assert p.activation_bytes == max(calls.values())
    ort = plan(cfg, "fp16", "onnxruntime")
    assert ort.activation_bytes == max(calls["backbone prefill"], calls["head"]) + calls["decoder"]
    # the prefill's kv_new (float32) is part of it: [40, 2, 2 rows, 8, 322, 128]
    assert calls["backbone prefill"] > 40 * 2 * 2 * 8 * 322 * 128 * 4


def test_cache_is_the_runtimes(embedded_cache):
    with cached_pipeline(embedded_cache) as pipe:  # the embedded model's default Pipeline (its export: the session's)
        p = plan(pipe.config, "fp32", "onnxruntime", max_batch=pipe.max_batch)
        assert p.rows == pipe.scheduler.max_rows
        held = pipe.backend.ensure_cache(p.rows)
        assert p.kv_cache_bytes == held.numel() * held.element_size()
    cfg = t2i_preset("BitDance-14B-64x")  # docs/memory.md: 1.43 GB per row at 1024 px in float32
    assert round(kv_cache_bytes(cfg, 1) / 1e9, 2) == 1.43


def test_fits_arithmetic_and_backends():
    stages = [
        StageMemory("backbone", 0, 3 * GIB, True),
        StageMemory("head_sampler", 0, 2 * GIB, True),
        StageMemory("head_step", 0, GIB, False),
    ]
    p = MemoryPlan("m", "tensorrt", "int8", 64, 64, 1, 2, stages, 4 * GIB, GIB, GIB, GIB)
    assert p.weight_bytes == 5 * GIB and p.total_bytes == 8 * GIB and p.total_if_once == 7 * GIB
    assert p.on_demand_bytes == GIB  # head_step: named in the notes, not in the total
    _, size, reserved = TARGETS["orin-nano-8gb"]
    assert p.fits("orin-nano-8gb") == (False, size - reserved - 8 * GIB)
    assert p.fits("orin-nx-16gb")[0]
    torch_plan = MemoryPlan("m", "torch", "fp32", 64, 64, 1, 2, stages, 4 * GIB, 0, 0, 0)
    assert torch_plan.weight_bytes == 4 * GIB and torch_plan.on_demand_bytes == 0  # one model: each weight once


def test_plan_command(capsys):
    from bitdance_rt.cli import main

    assert main(["plan", "--model", "BitDance-14B-64x", "--precision", "int8", "--target", "gpu-24gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["height"] == out["width"] == 1024 and out["rows"] == 2
    # docs/memory.md: 22.41 GiB against 23.00 usable (the text embedding at FP16, each weight once)
    assert out["targets"]["gpu-24gb"]["fits"] is True and 0 < out["targets"]["gpu-24gb"]["bytes_left"] < 2 * 2**30
    assert [s["stage"] for s in out["stages"] if s["loaded"]] == [
        "prefix_embed",
        "token_embed",
        "backbone",
        "head_step",
        "decoder",
    ]
    assert set(out["activations"]) == {"backbone prefill", "backbone step", "head", "decoder"}
    assert (
        out["total_bytes"]
        == out["weight_bytes"] + out["kv_cache_bytes"] + out["activation_bytes"] + out["workspace_bytes"]
    )
    assert main(["plan", "--model", "BitDance-B-4x", "--backend", "onnxruntime", "--batch-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "BitDance-B-4x at 256x256, fp32 on onnxruntime, cache for 16 image(s) (32 rows)" in text
    assert "Jetson Orin Nano 8GB" in text
    assert "note: each weight held once" in text and "head_step is loaded only on demand" in text
    assert main(["plan", "--target", "gpu-7gb"]) == 2
    assert "unknown target 'gpu-7gb'" in capsys.readouterr().err
    assert main(["plan", "--model", "BitDance-14B-64x", "--height", "500", "--width", "500"]) == 2
    assert "not supported" in capsys.readouterr().err


# ---- the road: each step of getting there ------------------------------------------------------------------
def _s32(cfg, steps):
    from bitdance_rt.plan import stage_weights

    return {s: sum(b for _, b in w.values()) for s, w in stage_weights(cfg, "fp32", steps).items()}


def test_road_of_the_tiny_models(tmp_path):
    """Which steps each precision and backend takes, and each step's figures from the traced weights: the
    load holds every weight in float32 (the model's parameters and buffers on the meta device, x4 bytes), the
    export that plus the largest graph's transient, the capture its samples, the INT8 derivation the set and
    the quantiser's copies of its FP32 graph, the run the plan's total on the GPU."""
    from t2i_tiny import write_checkpoint

    from bitdance_rt.plan import _meta_model, distinct_bytes, machines, road as rd, stage_weights

    tiny = resolve_model(None, None, None, None, None, None).config
    t2i = resolve_model(None, str(write_checkpoint(tmp_path / "t2i")), None, 512, 512, 32).config
    steps = 2
    for cfg in (tiny, t2i):
        model = _meta_model(cfg)
        tensors = list(model.parameters()) + list(model.buffers())
        w = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)
        assert rd.model_bytes(cfg) == w

        def names(precision, backend):
            return [s.step for s in rd.road(cfg, precision, backend, steps=steps).steps]

        # text-to-image: the export streams the weight files (no load), FP16 graphs directly for an FP16 run
        load = [] if cfg is t2i else ["load"]
        assert names("fp32", "tensorrt") == [*load, "export", "build", "run"]
        assert names("fp16", "onnxruntime") == [*load, "export", *([] if cfg is t2i else ["derive fp16"]), "run"]
        assert names("fp32", "torch") == ["load", "run"]
        # t2i: the FP16 export streamed, captured on, ranges measured on; then INT8 streamed from the files
        int8 = ["calibrate", "ranges", "int8"] if cfg is t2i else ["calibrate", "derive int8"]
        assert names("int8", "tensorrt") == [*load, "export", *int8, "build", "run"]

        r = rd.road(cfg, "int8", "tensorrt", 4, steps=steps)
        s32 = _s32(cfg, steps)
        export = r.step("export")
        if cfg is t2i:  # one matrix at a time, whatever the model's size; every FP32 graph written
            weights = stage_weights(cfg, "fp32", steps)
            largest = max(
                b for s in weights.values() for name, (_, b) in s.items() if name != "model.embed_tokens.weight"
            )
            assert export.host_bytes >= rd.STREAM_PROCESS_BYTES + rd.STREAM_MATRIX * largest
            assert export.host_bytes < rd.STREAM_PROCESS_BYTES + rd.model_bytes(cfg) + (2 << 30)
            s16 = rd._sum(stage_weights(cfg, "fp16", steps))
            assert export.disk_bytes == sum(s16.values())  # (the FP16 graphs)
            assert rd.road(cfg, "fp32", "tensorrt", 4, steps=steps).step("export").disk_bytes == sum(s32.values())
            r16 = rd.road(cfg, "fp16", "onnxruntime", 4, steps=steps)
            assert r16.step("export").disk_bytes == sum(s16.values())
            # INT8 streamed: the export's trace and one matrix again, not a quantiser over the FP32 backbone
            assert export.host_bytes < r.step("int8").host_bytes < export.host_bytes + largest
            assert r.step("int8").disk_bytes == sum(rd._sum(stage_weights(cfg, "int8", steps)).values())
            assert r.step("ranges").host_bytes >= rd.PROCESS_BYTES + s16["backbone"]
        else:
            load = r.step("load")
            assert load.host_bytes == rd.PROCESS_BYTES + int(rd.LOAD_IMAGENET * w)
            loaded = load.host_bytes - rd.PROCESS_BYTES + rd.EXPORT_PROCESS_BYTES
            assert export.host_bytes >= loaded + max(rd.export_factor(b) * b for b in s32.values())
            assert export.disk_bytes >= distinct_bytes(stage_weights(cfg, "fp32", steps)) + max(s32.values())
        images, batch, policy = rd.default_capture(cfg, steps)
        samples = sum(rd.capture_bytes(cfg, images, 1, steps, batch, policy).values())
        calibrate = r.step("calibrate")
        assert calibrate.disk_bytes == samples and calibrate.host_bytes > rd.PROCESS_BYTES + samples
        if cfg is not t2i:
            derive = r.step("derive int8")
            assert derive.host_bytes >= rd.PROCESS_BYTES + samples + rd.DERIVE_INT8_LARGE * s32["backbone"]
        p = plan(cfg, "int8", "tensorrt", 4, steps=steps)
        assert r.step("build").gpu_bytes >= p.workspace_bytes + max(s.bytes for s in p.stages)
        assert r.step("run").gpu_bytes == p.total_bytes
        # a host with no GPU: every step but the GPU's fits, and those say so
        fits = {f.step: f for f in machines.check(r, cfg, machines.Machine("a 4 GiB host", 4 * GIB, None))}
        assert all(f.fits for s, f in fits.items() if s not in ("build", "run"))
        assert not fits["build"].fits and fits["build"].fix.startswith("needs a GPU")
        assert machines.check(
            rd.road(cfg, "fp32", "onnxruntime", steps=steps), cfg, machines.Machine("a 4 GiB host", 4 * GIB, None)
        )[-1].need.startswith("on the CPU")


def test_capture_estimate_is_a_real_captures():
    """The samples a capture keeps, estimated from the stage contract, against a capture of the embedded
    model: exact but for head_step, whose evaluations are kept at random (a head_fraction of them)."""
    from bitdance_rt.calibration import CapturePolicy, capture
    from bitdance_rt.plan.road import capture_bytes

    source = resolve_model(None, None, None, None, None, None)
    cfg = source.config
    with torch_threads(1):
        result = capture(
            source.load(), source.weights_source(), list(range(10)), [0], 4, cfg.default_cfg, None, CapturePolicy(), 4
        )
    got = {
        stage: sum(
            t.numel() * t.element_size() for s in samples for part in (s.inputs, s.outputs) for t in part.values()
        )
        for stage, samples in result.dataset.samples.items()
    }
    planned = capture_bytes(cfg, 10, 1, 4, 4, CapturePolicy())
    assert set(planned) == set(got)
    for stage, n in got.items():
        assert (planned[stage] == n) if stage != "head_step" else (0.5 * n <= planned[stage] <= 2 * n), stage


def test_export_figure_bounds_a_measured_export(tmp_path):
    """The peak resident memory of a real `bitdance-rt export` (a subprocess: the figure is its own
    VmHWM, so nothing of the test process counts) against the road's export figure for the same model: a
    text-to-image checkpoint at hidden 512 (2 Qwen3 layers, head 512 x 2: 59 MB in float32), 512 px. Not a
    timed or tight assertion: the plan takes the highest factor measured per graph size (road.py) and
    rounds the process up, so it must not be below what was measured; and it must stay within 3x, or it
    would refuse machines that can do it. The export is streamed from the weight files (export/streamed.py):
    measured 2026-12-05 on the AVX2 EPYC, 535 MB against a planned 1067 MB (2.0x: the plan's slices and
    matrix factors come from real widths, where they dominate)."""
    import subprocess
    import sys

    from t2i_tiny import write_checkpoint

    from bitdance_rt.plan.road import export_step

    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the peak resident memory from /proc (Linux)")
    ckpt = write_checkpoint(
        tmp_path / "ckpt",
        llm={
            "hidden_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 128,
            "intermediate_size": 1536,
        },
        head={"ch_latent": 512, "depth": 2},
    )
    args = [
        "export",
        "--checkpoint",
        str(ckpt),
        "--height",
        "512",
        "--width",
        "512",
        "--max-text-tokens",
        "32",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "out"),
    ]
    # VmHWM: the high-water mark of this process's own memory map, new at exec. (Not ru_maxrss: Linux carries
    # the forked copy of the parent's, pytest's, across exec into the child's ru_maxrss.)
    code = (
        "import re, sys; from bitdance_rt.cli import main; rc = main(sys.argv[1:]); "
        "kb = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print('maxrss', rc, int(kb) * 1024)"
    )
    env = {"BITDANCE_RT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("maxrss")]
    assert line, res.stderr[-2000:]
    _, rc, measured = line[-1].split()
    assert rc == "0", res.stderr[-2000:]
    planned = export_step(resolve_model(None, str(ckpt), None, 512, 512, 32).config, 2).host_bytes
    assert int(measured) <= planned <= 3 * int(measured), (planned, measured)


def test_road_of_the_14b_on_three_machines(capsys):
    """BitDance-14B-64x at 1024 px, INT8 on TensorRT, on a 64 GB host with a 24 GB GPU, an AGX Orin 32GB and
    a 16 GB GPU: every step's fit on each, and the option (or the place) that makes each that does not
    fit fit. The figures are checked for their arithmetic (the float32 weights), not copied from output."""
    from bitdance_rt.cli import main
    from bitdance_rt.plan import road as rd
    from bitdance_rt.t2i_config import t2i_preset

    argv = [
        "plan",
        "--model",
        "BitDance-14B-64x",
        "--precision",
        "int8",
        "--host-memory",
        "64GB",
        "--gpu",
        "24GB",
        "--target",
        "agx-orin-32gb",
        "gpu-16gb",
    ]
    assert main(argv + ["--json"]) == 0
    road = json.loads(capsys.readouterr().out)["road"]
    steps = {s["step"]: s for s in road["steps"]}
    assert list(steps) == ["export", "calibrate", "ranges", "int8", "build", "run"]  # streamed: no load, no FP32
    cfg = t2i_preset("BitDance-14B-64x")
    w = rd.model_bytes(cfg)
    assert w > 4 * 16.1e9  # 16.2B parameters (docs/memory.md), every one in float32
    backbone = _s32(cfg, cfg.default_steps)["backbone"]
    assert backbone > 4 * 13.2e9  # Qwen3-14B's 13.2B non-embedding parameters, in float32
    # the export streams the files: about one matrix (the head's 5120 x 20480, 0.39 GiB in float32) at a time
    # and the backbone's trace growing per layer (measured), not the 65 GB float32 model; on disk every FP16 graph
    assert rd.STREAM_MATRIX * 5120 * 20480 * 4 + 40 * rd.STREAM_PER_LAYER < steps["export"]["host_bytes"] < 8 * GIB
    assert steps["export"]["disk_bytes"] >= backbone / 2
    # INT8 written from the files as well (no quantiser holding 3.1x the FP32 backbone, 177 GiB); the ranges
    # hold a piece of ONNX Runtime's FP16 backbone at a time (~2 GiB of its 24.6) beside its samples
    assert steps["int8"]["host_bytes"] < 8 * GIB and backbone / 4 <= steps["int8"]["disk_bytes"] < backbone / 3
    assert 8 * GIB < steps["ranges"]["host_bytes"] < 30 * GIB
    assert steps["run"]["gpu_bytes"] == plan(cfg, "int8", "tensorrt").total_bytes
    machines = road["machines"]
    assert len(machines) == 3
    host24, orin, gpu16 = (machines[m] for m in machines)
    assert "Jetson AGX Orin 32GB" in list(machines)[1] and "16 GB GPU" in list(machines)[2]
    for fits in machines.values():
        assert [f["step"] for f in fits] == list(steps)
        assert all(f["fix"] for f in fits if not f["fits"]) and not any(f["fix"] for f in fits if f["fits"])
    by = {f["step"]: f for f in host24}
    assert by["export"]["fits"] and by["run"]["fits"] and by["build"]["fits"]
    assert by["ranges"]["fits"] and by["int8"]["fits"]  # the INT8 graphs are made on this machine
    assert not by["calibrate"]["fits"] and "--max-samples 64" in by["calibrate"]["fix"]
    by = {f["step"]: f for f in orin}  # one memory for both: every step against 30 GiB
    assert by["export"]["fits"] and by["run"]["fits"] and "shared" in by["run"]["need"]
    by = {f["step"]: f for f in gpu16}
    assert not by["run"]["fits"] and by["int8"]["fits"]
    by = {f["step"]: f for f in orin}
    assert by["ranges"]["fits"]  # (a piece of the FP16 backbone at a time)
    # the same as text: each machine, each step, its fit and fix
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "road to running it (int8 on tensorrt" in text
    for name in machines:
        assert f"  on {name}:" in text
    assert text.count("does not fit") >= sum(not f["fits"] for fits in machines.values() for f in fits)


def test_preflight_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    """A command that needs more host memory than is available stops before any work with one line naming
    the step, the need, what there is and the option that makes it fit; --ignore-memory-check goes on. A
    small machine is simulated; on this one the embedded model is never refused (nor traced)."""
    from bitdance_rt.cli import main
    from bitdance_rt.plan import preflight, road as rd
    from bitdance_rt.t2i_config import t2i_preset

    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model(None, None, None, None, None, None).config
    assert preflight.bound(tiny) < 1 * GIB  # so on a normal machine: nothing to trace, nothing refused
    preflight.check_memory("export", tiny, ["load", "export"])
    monkeypatch.setattr(preflight, "available_memory", lambda: (100 << 20, "MemAvailable"))
    for argv, step in (
        (["export", "--out", str(tmp_path / "x")], "load"),
        (["generate", "--backend", "torch", "--out", str(tmp_path / "g")], "load"),
        (["calibrate", "--out", str(tmp_path / "c"), "--steps", "2"], "calibrate"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"bitdance-rt: error: {argv[0]}: the {step} step of "), err
        assert "of host memory" in err and "this machine has 100.0 MiB (MemAvailable)" in err
        assert "--ignore-memory-check" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()
    preflight.check_memory("export", tiny, ["load", "export"], ignore=True)  # the override
    # the 14B: its streamed export fits a 64 GiB machine; on one with too little, the message says where to do it
    cfg = t2i_preset("BitDance-14B-64x")
    monkeypatch.setattr(preflight, "available_memory", lambda: (64 * GIB, "MemAvailable"))
    preflight.check_memory("export", cfg, ["export"], steps=cfg.default_steps)
    # ... and so do its INT8 graphs (export --precision int8 --calibration DIR), made from the FP16 ones
    preflight.check_memory("export", cfg, ["export", "ranges", "int8"], precision="int8", steps=cfg.default_steps)
    monkeypatch.setattr(preflight, "available_memory", lambda: (1 * GIB, "MemAvailable"))
    with pytest.raises(Exception) as info:
        preflight.check_memory("export", cfg, ["export"], steps=cfg.default_steps)
    message = str(info.value)
    assert "\n" not in message and message.startswith("export: the export step of BitDance-14B-64x needs ~")
    need = rd.export_step(cfg, cfg.default_steps).host_bytes
    assert f"~{rd._gb(need)}" in message and "export on a machine with >= " in message


def test_memory_sizes():
    from bitdance_rt.errors import BitDanceError
    from bitdance_rt.plan.machines import parse_size

    assert parse_size("64GB") == parse_size("64GiB") == parse_size("64g") == 64 * GIB
    assert parse_size("512MB") == 512 << 20 and parse_size("1.5TB") == int(1.5 * 2**40) and parse_size("100") == 100
    with pytest.raises(BitDanceError):
        parse_size("lots")
