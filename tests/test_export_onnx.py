"""Per-stage ONNX export: every stage exports, passes the ONNX checks, matches torch, and the
export directory's manifest and cache behave."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.export import MANIFEST, checkpoint_source, export_files, export_stage, export_stages  # noqa: E402
from bitdance_rt.export.wrappers import example_inputs, stage_module  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.sampling import guidance_rows, sample_tokens  # noqa: E402

from conftest import FIXTURE_STEPS, FIXTURES, copy_export, torch_threads  # noqa: E402

S = 6  # sampler steps of the official fixtures
TOL = 1e-5


def _fixture(name: str) -> Path:
    d = FIXTURES / name
    if not d.is_dir():
        pytest.fail(f"official fixtures not found at {d}")
    return d


class Export:
    def __init__(self, name: str, root: Path, exported):
        """`exported`: conftest's fixture_exports (the session's export_stages(model, dir, source,
        sampler_steps=S) of this fixture); the module tests a copy of it, with that export's result."""
        from safetensors.torch import load_file

        self.name = name
        self.fixture = _fixture(name)
        self.model = load_model(f"{self.fixture}/config.json", f"{self.fixture}/checkpoint.pt").model
        self.cfg = self.model.cfg
        self.stages = load_file(str(self.fixture / "stages.safetensors"))
        self.source = checkpoint_source(self.fixture / "checkpoint.pt")
        self.dir = root / name
        assert S == FIXTURE_STEPS
        self.result = copy_export(exported(name), self.dir)
        assert not self.result.reused  # a fresh export's result
        self.specs = st.stage_specs(self.cfg, st.ALL_STAGES, S)

    def session(self, stage: str):
        return _session(self.dir / f"{stage}.onnx")

    def run(self, stage: str, *args) -> list[np.ndarray]:
        names = self.specs[stage].input_names
        return self.session(stage).run(None, {n: a.numpy() for n, a in zip(names, args)})


@pytest.fixture(scope="module", params=["tiny_4x", "tiny_1x"])
def ex(request, tmp_path_factory, fixture_exports):
    with torch_threads(1):
        yield Export(request.param, tmp_path_factory.mktemp("onnx"), fixture_exports)


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _close(got: np.ndarray, want: torch.Tensor, tol: float = TOL) -> None:
    assert got.shape == tuple(want.shape)
    diff = float(np.abs(got - want.numpy()).max()) if got.size else 0.0
    assert diff <= tol, f"max abs diff {diff}"


# ---- graphs --------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", st.ALL_STAGES)
def test_stage_exports_and_passes_checks(ex, stage):
    path = ex.dir / f"{stage}.onnx"
    assert path.is_file()
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    spec = ex.specs[stage]
    for value in list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert tuple(dims) == spec.tensor(value.name).shape
    assert [v.name for v in model.graph.input] == spec.input_names
    assert [v.name for v in model.graph.output] == spec.output_names


def test_manifest_records_everything(ex):
    m = json.loads((ex.dir / MANIFEST).read_text())
    key = m["key"]
    assert key["checkpoint"] == ex.source and key["checkpoint"].startswith("sha256:")
    assert key["config"] == ex.cfg.to_json_dict()
    assert key["opset"] == 17 and key["sampler_steps"] == S
    assert key["stages"] == sorted(st.ALL_STAGES)
    assert set(m["versions"]) >= {"torch", "onnx", "bitdance_rt"}
    assert m["stages"] == {n: s.to_json() for n, s in ex.specs.items()}
    from bitdance_rt.checkpoint import file_sha256

    # the head's weights once, read by head_step and the fused sampler (export/shared_weights.py)
    assert set(m["files"]) == {f"{s}.onnx" for s in st.ALL_STAGES} | {"shared.weights"}
    assert {s for s, files in m["stage_files"].items() if "shared.weights" in files} == {st.HEAD_STEP, st.HEAD_SAMPLER}
    for f, info in m["files"].items():
        assert file_sha256(ex.dir / f) == info["sha256"]


# ---- numerics against torch ------------------------------------------------------------------
def cache_feed(cfg, kv) -> dict:
    """The backbone's per-layer cache inputs from a stacked [n_layer, 2, ...] cache."""
    kv = np.asarray(kv)
    return {name: np.ascontiguousarray(kv[i // 2, i % 2]) for i, name in enumerate(st.cache_input_names(cfg))}


def _prefilled(ex: Export, rows: int):
    """labels, head conditions, the prefix keys/values, and the full cache holding them."""
    labels = torch.arange(rows) % (ex.cfg.num_classes + 1)
    kv = ex.model.new_cache(rows)
    with torch.no_grad():
        cond, new = ex.model.prefill(labels)
    ex.model.write_cache(kv, new, 0)
    return labels, cond, new, kv


def _graph_prefill(ex: Export, labels, kv=None, backbone=None):
    """prefix_embed -> backbone at start 0 (the graphs' prefill) over cache `kv` (default zeros)."""
    rows = labels.shape[0]
    kv = np.zeros(st.kv_shape(ex.cfg, rows), dtype=np.float32) if kv is None else np.asarray(kv)
    (x,) = ex.run(st.PREFIX_EMBED, labels)
    assert x.shape == (rows, ex.cfg.prefix_len, ex.cfg.dim)
    return (backbone or ex.session(st.BACKBONE)).run(
        None, {"x": x, "start": np.zeros(rows, dtype=np.int64), **cache_feed(ex.cfg, kv)}
    )


def _graph_step(ex: Export, tokens, starts, kv):
    (x,) = ex.run(st.TOKEN_EMBED, tokens)
    return ex.session(st.BACKBONE).run(
        None, {"x": x, "start": np.asarray(starts, dtype=np.int64), **cache_feed(ex.cfg, kv)}
    )


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_prefill_matches_torch(ex, rows):
    """The one backbone graph at the prefill: whatever the cache holds, start 0 hides all of it."""
    labels, cond, new, _ = _prefilled(ex, rows)
    noisy = torch.randn(st.kv_shape(ex.cfg, rows), generator=torch.Generator().manual_seed(rows))
    for kv in (None, noisy):
        got_cond, got_new = _graph_prefill(ex, labels, kv)
        _close(got_cond, cond)
        _close(got_new, new)


def test_prefill_and_steps_match_official_fixture(ex):
    """The fixture's backbone chain (prefill -> step1 -> step2, one cache) through the graphs."""
    s, p = ex.stages, ex.cfg.parallel_num
    pos = ex.model.pos_for_diff.weight.detach()
    (x,) = ex.run(st.PREFIX_EMBED, s["backbone.labels"])
    assert np.array_equal(x, s["backbone.prefill.input"].numpy())
    cond, new = _graph_prefill(ex, s["backbone.labels"])
    _close(cond, s["backbone.prefill.output"][:, -p:] + pos[:p])
    kv = np.zeros(st.kv_shape(ex.cfg, 4), dtype=np.float32)
    kv[..., : new.shape[4], :] = new
    for i in (1, 2):
        start = int(s[f"backbone.step{i}.start_pos"])
        assert start == st.step_start(ex.cfg, i)
        tokens = s[f"backbone.step{i}.tokens"].reshape(4, p, -1)
        (x,) = ex.run(st.TOKEN_EMBED, tokens)
        _close(x, s[f"backbone.step{i}.input"].reshape(4, p, -1))
        cond, new = _graph_step(ex, tokens, np.full(4, start), kv)
        _close(cond, s[f"backbone.step{i}.output"].reshape(4, p, -1) + pos[i * p : (i + 1) * p])
        kv[..., start : start + p, :] = new


@pytest.mark.parametrize("rows", [2, 5])
def test_backbone_step_matches_torch_at_every_step(ex, rows):
    _, _, _, kv = _prefilled(ex, rows)
    gen = torch.Generator().manual_seed(rows)
    for i in range(1, ex.cfg.ar_steps):
        tokens = torch.where(torch.rand(rows, ex.cfg.parallel_num, ex.cfg.token_dim, generator=gen) > 0.5, 1.0, -1.0)
        start = st.step_start(ex.cfg, i)
        with torch.no_grad():
            cond, new = ex.model.step(tokens, i, kv)  # full static cache, masked past start
        got, got_new = _graph_step(ex, tokens, np.full(rows, start), kv.numpy())
        _close(got, cond)
        _close(got_new, new)
        ex.model.write_cache(kv, new, start)


def test_the_backbone_graph_refuses_sizes_of_no_phase(ex):
    """seq is prefix_len (prefill) or P (step): the contract refuses any other chunk length."""
    spec = ex.specs[st.BACKBONE]
    assert spec.phases == {"prefill": {"seq": ex.cfg.prefix_len}, "step": {"seq": ex.cfg.parallel_num}}
    assert spec.match("x", (4, ex.cfg.prefix_len, ex.cfg.dim)) == {"rows": 4, "seq": ex.cfg.prefix_len}
    assert spec.phase_of({"rows": 4, "seq": ex.cfg.prefix_len}) == "prefill"
    if ex.cfg.prefix_len != ex.cfg.parallel_num:
        assert spec.phase_of({"rows": 2, "seq": ex.cfg.parallel_num}) == "step"
    with pytest.raises(BitDanceError, match="none of its phases"):
        spec.match("x", (4, ex.cfg.prefix_len + 1, ex.cfg.dim))


def test_head_step_matches_fixture_and_torch(ex):
    s = ex.stages
    x, t, c = s["head_net.x"], s["head_net.t"], s["head_net.c"]
    if x.dim() == 2:  # 1x fixture: [rows, C]; the contract is [rows, 1, C]
        x, c = x.unsqueeze(1), c.unsqueeze(1)
    (got,) = ex.run(st.HEAD_STEP, x, t, c)
    _close(got, s["head_net.output"].reshape(got.shape))
    args = example_inputs(ex.specs[st.HEAD_STEP], ex.model, batch=2)
    with torch.no_grad():
        want = ex.model.head_net(*args)
    _close(ex.run(st.HEAD_STEP, *args)[0], want)


def test_backbone_step_rows_at_different_positions(ex):
    """Per-row `start`: rows at different AR steps in one call get what each gets in a call alone."""
    rows = 4
    _, _, _, kv = _prefilled(ex, rows)
    gen = torch.Generator().manual_seed(7)
    kv = kv + torch.randn(kv.shape, generator=gen) * 0.1  # every cache position holds something
    tokens = torch.where(torch.rand(rows, ex.cfg.parallel_num, ex.cfg.token_dim, generator=gen) > 0.5, 1.0, -1.0)
    steps = [1, ex.cfg.ar_steps - 1, 2, ex.cfg.ar_steps // 2]
    starts = np.array([st.step_start(ex.cfg, i) for i in steps])
    got, got_new = _graph_step(ex, tokens, starts, kv.numpy())
    for r, i in enumerate(steps):
        with torch.no_grad():
            cond, new = ex.model.step(tokens[r : r + 1], i, kv[:, :, r : r + 1])
        _close(got[r : r + 1], cond)
        _close(got_new[:, :, r : r + 1], new)


@pytest.mark.parametrize("batch", [1, 3])
def test_head_sampler_tokens_equal_torch(ex, batch):
    """The per-row sampler graph: guided pairs in the official layout give sample_tokens' guided
    tokens, unguided rows its unguided ones, bit for bit, also mixed in one call."""
    spec = ex.specs[st.HEAD_SAMPLER]
    cond, noise = example_inputs(spec, ex.model, batch=batch, seed=batch)[:2]
    rows = cond.shape[0]  # 2 * batch
    with torch.no_grad():
        guided = sample_tokens(ex.model.head_net, cond, noise[:, :batch], 2.5, True, ex.cfg.time_shift)
        unguided = sample_tokens(ex.model.head_net, cond, noise, 1.0, False, ex.cfg.time_shift)
    scale, c, u = guidance_rows(rows, 2.5, True)
    doubled = torch.cat([noise[:, :batch], noise[:, :batch]], dim=1)
    (got,) = ex.run(st.HEAD_SAMPLER, cond, doubled, scale, c, u)
    assert np.array_equal(got, guided.numpy()) and np.array_equal(got[:batch], got[batch:])
    scale, c, u = guidance_rows(rows, 1.0, False)
    (got,) = ex.run(st.HEAD_SAMPLER, cond, noise, scale, c, u)
    assert np.array_equal(got, unguided.numpy())
    assert set(np.unique(got)) <= {-1.0, 1.0}
    # one call: a guided request (rows 0..2b-1) next to an unguided one (its rows 2b..4b-1)
    both = torch.cat([cond, cond]), torch.cat([doubled, noise], dim=1)
    scale = torch.cat([torch.full((rows,), 2.5), torch.ones(rows)])
    c = torch.cat([guidance_rows(rows, 2.5, True)[1], torch.arange(rows, 2 * rows)])
    u = torch.cat([guidance_rows(rows, 2.5, True)[2], torch.arange(rows, 2 * rows)])
    (got,) = ex.run(st.HEAD_SAMPLER, *both, scale, c, u)
    assert np.array_equal(got[:rows], guided.numpy()) and np.array_equal(got[rows:], unguided.numpy())


def test_decoder_and_encoder_match_fixture(ex):
    s = ex.stages
    (image,) = ex.run(st.DECODER, s["decoder.input"])
    _close(image, s["decoder.output"])
    (image1,) = ex.run(st.DECODER, s["decoder.input"][:1])
    _close(image1, s["decoder.output"][:1])
    (latent,) = ex.run(st.ENCODER, s["encoder.input"])
    assert np.array_equal(latent, s["encoder.output"].numpy())


# ---- cache, options, errors ----------------------------------------------------------------
def test_export_is_reused_and_redone_when_stale(ex, tmp_path):
    again = export_stages(ex.model, ex.dir, ex.source, sampler_steps=S)
    assert again.reused and again.manifest == ex.result.manifest
    via_files = export_files(ex.fixture / "config.json", ex.fixture / "checkpoint.pt", ex.dir, sampler_steps=S)
    assert via_files.reused

    d = tmp_path / "small"
    first = export_stages(ex.model, d, ex.source, stages=[st.HEAD_STEP, st.HEAD_SAMPLER], sampler_steps=S)
    assert not first.reused
    path = d / "head_step.onnx"
    path.write_bytes(path.read_bytes()[:100])  # corrupt: hash no longer verifies
    redo = export_stages(ex.model, d, ex.source, stages=[st.HEAD_STEP, st.HEAD_SAMPLER], sampler_steps=S)
    assert not redo.reused
    onnx.checker.check_model(str(path))
    assert export_stages(ex.model, d, ex.source, stages=[st.HEAD_STEP, st.HEAD_SAMPLER], sampler_steps=S).reused
    # an export whose stored contract is not the one this version derives (an older bitdance-rt) is redone
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["stages"][st.HEAD_STEP]["dims"]["rows"]["max"] += 1
    (d / MANIFEST).write_text(json.dumps(manifest))
    assert not export_stages(ex.model, d, ex.source, stages=[st.HEAD_STEP, st.HEAD_SAMPLER], sampler_steps=S).reused
    other_s = export_stages(ex.model, d, ex.source, stages=[st.HEAD_STEP, st.HEAD_SAMPLER], sampler_steps=3)
    assert not other_s.reused and other_s.manifest["key"]["sampler_steps"] == 3
    other_ckpt = export_stages(ex.model, d, "random-init seed 1", stages=[st.HEAD_STEP])
    assert not other_ckpt.reused
    assert sorted(p.name for p in d.iterdir()) == ["head_step.onnx", MANIFEST]  # stale sampler file removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_external_data_for_large_models(ex, tmp_path):
    spec = ex.specs[st.HEAD_STEP]
    files = export_stage(ex.model, spec, tmp_path, external_data_bytes=0)
    assert files == ["head_step.onnx", "head_step.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "head_step.onnx"), full_check=True)
    args = example_inputs(spec, ex.model, batch=2)
    sess = _session(tmp_path / "head_step.onnx")
    with torch.no_grad():
        want = ex.model.head_net(*args)
    _close(sess.run(None, dict(zip(spec.input_names, (a.numpy() for a in args))))[0], want)


@pytest.mark.parametrize("opset", [18, 20])
def test_other_opsets(ex, tmp_path, opset):
    spec = ex.specs[st.BACKBONE]
    export_stage(ex.model, spec, tmp_path, opset=opset)
    model = onnx.load(str(tmp_path / "backbone.onnx"))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    labels, cond, new, _ = _prefilled(ex, 3)
    got_cond, got_new = _graph_prefill(ex, labels, backbone=_session(tmp_path / "backbone.onnx"))
    _close(got_cond, cond)
    _close(got_new, new)


@pytest.mark.parametrize("opset", [16, 21])
def test_opset_out_of_range_is_refused(ex, tmp_path, opset):
    with pytest.raises(BitDanceError, match="opset"):
        export_stages(ex.model, tmp_path / "x", ex.source, opset=opset)


def test_unknown_stage_is_refused(ex, tmp_path):
    with pytest.raises(BitDanceError, match="unknown stage"):
        export_stages(ex.model, tmp_path / "x", ex.source, stages=["backbone", "nope"])
    assert not (tmp_path / "x").exists()


# ---- the contract itself -------------------------------------------------------------------
def test_contract_shapes_profiles_and_json(ex):
    cfg = ex.cfg
    lim = st.Limits(max_batch=16, opt_batch=4)
    p, c, dim = cfg.parallel_num, cfg.token_dim, cfg.dim
    kv = (cfg.n_layer, 2, "rows", cfg.n_head, cfg.max_seq_len, cfg.head_dim)
    step = st.backbone_stage(cfg, lim)
    names = st.cache_input_names(cfg)
    assert step.input_names == ["x", "start", *names] and len(names) == 2 * cfg.n_layer
    assert names[:2] == ["cache.0.key", "cache.0.value"]
    assert all(step.tensor(n).shape == kv[2:] for n in names)
    assert step.tensor("kv_new").shape == kv[:4] + ("seq", cfg.head_dim)
    assert step.profile_phases == ["prefill", "step"]
    assert step.profile("cache.1.value", "step")[2][0] == 32
    assert step.profile("x", "step") == ((1, p, dim), (8, p, dim), (32, p, dim))
    n = cfg.prefix_len
    assert step.profile("x", "prefill") == ((1, n, dim), (8, n, dim), (32, n, dim))
    assert step.profile("start", "prefill") == ((1,), (8,), (32,))
    with pytest.raises(BitDanceError, match="phases"):
        step.profile("x")
    assert st.prefix_embed_stage(cfg, lim).profile("labels") == ((1,), (8,), (32,))
    assert st.prefix_embed_stage(cfg, lim).tensor("x").shape == ("rows", n, dim)
    embed = st.token_embed_stage(cfg, lim)
    assert embed.input_names == ["tokens"] and embed.profile("tokens") == ((1, p, c), (8, p, c), (32, p, c))
    g = st.head_sampler_stage(cfg, S, lim)
    assert g.input_names == ["cond", "noise", "cfg", "cond_row", "uncond_row"]
    assert g.profile("cond") == ((1, p, dim), (8, p, dim), (32, p, dim))
    assert g.profile("noise") == ((S + 1, 1, p, c), (S + 1, 8, p, c), (S + 1, 32, p, c))
    assert g.profile("cfg") == ((1,), (8,), (32,))
    assert g.match("cond", (6, p, dim)) == {"rows": 6}
    with pytest.raises(BitDanceError, match="disagrees"):
        g.match("noise", (S + 1, 2, p, c), known={"rows": 3})
    pair = st.StageSpec("pairs", (st.TensorSpec("x", "float32", ("2*batch",)),), (), {"batch": st.DimRange(1, 2, 4)})
    with pytest.raises(BitDanceError, match="multiple of 2"):
        pair.match("x", (5,))
    with pytest.raises(BitDanceError, match="outside the exported range"):
        embed.match("tokens", (33, p, c))
    with pytest.raises(BitDanceError, match="fixed by the model config"):
        embed.match("tokens", (2, p + 1, c))
    for spec in st.stage_specs(cfg, st.ALL_STAGES, S, lim).values():
        assert st.StageSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert st.step_start(cfg, 1) == cfg.prefix_len
    with pytest.raises(BitDanceError):
        st.step_start(cfg, cfg.ar_steps)
    assert stage_module(st.DECODER, ex.model) is not None


def test_export_dir_is_left_alone_on_failure(ex, tmp_path, monkeypatch):
    d = tmp_path / "exp"
    shutil.copytree(ex.dir, d)
    import bitdance_rt.export.onnx_export as oe

    def boom(*a, **k):
        raise BitDanceError("stage x: simulated exporter failure")

    monkeypatch.setattr(oe, "export_stage", boom)
    with pytest.raises(BitDanceError, match="simulated"):
        export_stages(ex.model, d, ex.source, sampler_steps=S, force=True)
    assert export_stages(ex.model, d, ex.source, sampler_steps=S).reused  # old export intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
