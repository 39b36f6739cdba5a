"""The sampler and the loop against the official recorded sampling runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitdance_rt.models.heads import DiffusionHead, TransformerHead
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import (
    NoiseSource,
    ReplayNoise,
    SeededNoise,
    cfg_at_step,
    sample_head,
    sample_tokens,
    time_grid,
)

from conftest import ORACLE_SAMPLER_REL, assert_matches_oracle, fixture_config, fixture_dir

MODELS = ["tiny_4x", "tiny_1x"]


def noise_calls(name):
    return json.loads((fixture_dir(name) / "noise_calls.json").read_text())


@pytest.mark.parametrize("name", MODELS)
def test_time_grid_matches_recorded_t_and_dt(name):
    cfg = fixture_config(name)
    steps = cfg["sampling"]["sample_steps"]
    grid = time_grid(steps, cfg["constructor_args"]["time_shift"])
    dt = grid[1:] - grid[:-1]
    t = torch.zeros(())
    em = [c for c in noise_calls(name)["calls"] if c["role"] == "em_noise" and c["ar_step"] == 0]
    assert len(em) == steps
    for k, call in enumerate(em):
        assert call["sampler_step"] == k
        assert float(t) == call["t"] and float(dt[k]) == call["dt"]
        t = t + dt[k]


@pytest.mark.parametrize("name", MODELS)
def test_cfg_schedule_matches_recorded(name):
    cfg = fixture_config(name)
    s = cfg["sampling"]
    n_ar = cfg["derived"]["ar_steps"]
    got = [cfg_at_step(s["cfg_scale"], s["cfg_schedule"], i, n_ar) for i in range(n_ar)]
    assert got == noise_calls(name)["cfg_per_ar_step"]
    assert cfg_at_step(3.0, "constant", 0, n_ar) == 3.0
    assert cfg_at_step(0.5, "linear", 3, n_ar) == 1.0


@pytest.mark.parametrize("name", MODELS)
def test_seeded_noise_is_the_official_draw_sequence(name, official):
    _, _, sample, cfg = official(name)
    torch.manual_seed(cfg["sampling"]["seed"])  # what the official run did before sample()
    src = SeededNoise(cfg["sampling"]["seed"])
    for call in noise_calls(name)["calls"]:
        recorded = sample[f"noise_{call['index']:03d}"]
        assert list(recorded.shape) == call["shape"]
        assert torch.equal(src.draw(recorded.shape), recorded)


@pytest.mark.parametrize("name", MODELS)
def test_head_sampler_per_ar_step(official, name):
    """Recorded head conditions + recorded noise -> the recorded continuous output and tokens."""
    model, _, sample, cfg = official(name)
    calls = noise_calls(name)
    s = cfg["sampling"]
    n_ar = model.cfg.ar_steps
    draws = 0
    for i in range(n_ar):
        g = cfg_at_step(s["cfg_scale"], s["cfg_schedule"], i, n_ar)
        noise = [sample[f"noise_{draws + k:03d}"] for k in range(s["sample_steps"] + 1)]
        draws += len(noise)
        cond = sample[f"steps.{i:03d}.head_cond"]
        if cond.dim() == 2:  # 1x: [R, C] -> [R, 1, C]
            cond, noise = cond[:, None], [n[:, None] for n in noise]
        with torch.no_grad():
            x = sample_head(model.head_net, cond, noise, g, g > 1.0, model.cfg.time_shift)
            tokens = sample_tokens(model.head_net, cond, noise, g, g > 1.0, model.cfg.time_shift)
        out = torch.cat([x, x]) if g > 1.0 else x
        assert_matches_oracle(
            out.reshape(sample[f"steps.{i:03d}.head_out"].shape),
            sample[f"steps.{i:03d}.head_out"],
            f"AR step {i} head output",
            ORACLE_SAMPLER_REL,
        )
        assert torch.equal(tokens, sample[f"steps.{i:03d}.pred"])
    assert draws == len(calls["calls"])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("source", ["replay", "seed"])
def test_end_to_end_sample(official, name, source):
    model, _, sample, cfg = official(name)
    s = cfg["sampling"]
    noise = ReplayNoise(fixture_dir(name) / "sample.safetensors") if source == "replay" else SeededNoise(s["seed"])
    result = generate(TorchBackend(model), s["labels"], s["sample_steps"], s["cfg_scale"], s["cfg_schedule"], noise)
    assert torch.equal(result.tokens, sample["tokens"])
    assert torch.equal(result.latent, sample["latent"])
    torch.testing.assert_close(result.image, sample["image"], atol=2e-4, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_any_batch_size_row_independence(official, name, tmp_path):
    """Batch 1 (label 3) with its rows' share of the recorded noise gives the official row 0.

    Rows are [cond; null]: with B=2 the rows are (3, 7, null, null); with B=1 (3, null). An
    unguided step draws for every row (keep rows 0 and 2), a guided one for cond rows (keep row 0).
    """
    model, _, sample, cfg = official(name)
    s = cfg["sampling"]
    sliced = {}
    for call in noise_calls(name)["calls"]:
        t = sample[f"noise_{call['index']:03d}"]
        keep = [0, 2] if call["shape"][0] == 4 else [0]
        sliced[f"noise_{call['index']:03d}"] = t[keep].contiguous()
    path = tmp_path / "noise_b1.safetensors"
    save_file(sliced, str(path))
    result = generate(
        TorchBackend(model), [s["labels"][0]], s["sample_steps"], s["cfg_scale"], s["cfg_schedule"], ReplayNoise(path)
    )
    assert torch.equal(result.tokens, sample["tokens"][:1])


class ShapeRecorder(NoiseSource):
    def __init__(self, seed=0):
        self.inner, self.shapes = SeededNoise(seed), []

    def draw(self, shape):
        self.shapes.append(tuple(shape))
        return self.inner.draw(shape)


def test_cfg_row_doubling_rules(official):
    """No doubling without guidance; the linear schedule's step 0 samples all 2B rows unguided."""
    model, _, _, _ = official("tiny_4x")
    p, c, steps = model.cfg.parallel_num, model.cfg.token_dim, 2
    per_step = steps + 1
    for scale, schedule, first_rows, later_rows in [
        (1.0, "linear", 3, 3),
        (3.0, "linear", 6, 3),
        (3.0, "constant", 3, 3),
    ]:
        rec = ShapeRecorder()
        generate(TorchBackend(model), [1, 2, 3], steps, scale, schedule, rec)
        assert len(rec.shapes) == per_step * model.cfg.ar_steps
        assert rec.shapes[:per_step] == [(first_rows, p, c)] * per_step
        assert set(rec.shapes[per_step:]) == {(later_rows, p, c)}


def test_replay_noise_errors(tmp_path):
    from bitdance_rt.errors import BitDanceError

    with pytest.raises(BitDanceError, match="not found"):
        ReplayNoise(tmp_path / "nope.safetensors")
    save_file(
        {"noise_000": torch.zeros(2, 4, 32), "noise_002": torch.zeros(2, 4, 32)}, str(tmp_path / "gap.safetensors")
    )
    with pytest.raises(BitDanceError, match="without gaps"):
        ReplayNoise(tmp_path / "gap.safetensors")
    save_file({"noise_000": torch.zeros(2, 4, 32)}, str(tmp_path / "one.safetensors"))
    src = ReplayNoise(tmp_path / "one.safetensors")
    with pytest.raises(BitDanceError, match="expects"):
        src.draw((4, 4, 32))
    src = ReplayNoise(tmp_path / "one.safetensors")
    src.draw((2, 4, 32))
    with pytest.raises(BitDanceError, match="needs more"):
        src.draw((2, 4, 32))


def test_t2i_head_fixture():
    """The text-to-image head (ch//128 heads, SwiGLU, 2*sigmoid-1 output) and its CFG sampler."""
    d = fixture_dir("t2i_head")
    cfg = fixture_config("t2i_head")
    a = cfg["constructor_args"]
    head = DiffusionHead(
        TransformerHead(
            a["ch_target"],
            a["ch_latent"],
            a["ch_cond"],
            a["depth_latent"],
            a["depth_adanln"],
            variant="t2i",
            swiglu=a["use_swiglu"],
        )
    )
    head.load_state_dict(load_file(str(d / "vision_head.safetensors")), strict=True)
    st = load_file(str(d / "stages.safetensors"))
    with torch.no_grad():
        out = head(st["head_net.x"], st["head_net.t"], st["head_net.c"])
        assert_matches_oracle(out, st["head_net.output"], "t2i head_net")
        out64 = head(st["head_net_p64.x"], st["head_net_p64.t"], st["head_net_p64.c"])
        torch.testing.assert_close(out64, st["head_net_p64.output"], atol=1e-5, rtol=0)  # SDPA stand-in
        s = cfg["sampling"]
        noise = [st[f"head_sample.noise_{k:03d}"] for k in range(s["sample_steps"] + 1)]
        x = sample_head(head, st["head_sample.cond"], noise, s["cfg_scale"], True, a["time_shift"])
    assert_matches_oracle(torch.cat([x, x]), st["head_sample.output"], "t2i head sampler", ORACLE_SAMPLER_REL)


def test_batched_generation_equals_one_batch_with_chunked_noise(official):
    """Chunks of 2 labels drawing from one seeded source = each chunk generated on its own,
    with the generator continuing where the previous chunk stopped."""
    from bitdance_rt.runtime import generate_batched

    model, _, _, _ = official("tiny_4x")
    labels = [1, 2, 3, 4, 5]
    got = generate_batched(TorchBackend(model), labels, 3, 2.0, "linear", SeededNoise(9), batch_size=2)
    src = SeededNoise(9)
    parts = [generate(TorchBackend(model), labels[i : i + 2], 3, 2.0, "linear", src) for i in (0, 2, 4)]
    assert got.tokens.shape[0] == 5
    assert torch.equal(got.tokens, torch.cat([p.tokens for p in parts]))
    assert torch.equal(got.image, torch.cat([p.image for p in parts]))


def test_batched_replay_checks_the_whole_file(official, tmp_path):
    """A replayed file split over chunks is fully consumed, or the run is refused at the end."""
    from bitdance_rt.errors import BitDanceError
    from bitdance_rt.runtime import generate_batched

    model, _, sample, cfg = official("tiny_4x")
    s = cfg["sampling"]
    path = fixture_dir("tiny_4x") / "sample.safetensors"
    # 2 labels in chunks of 1 need other noise shapes than the recorded batch of 2: refused.
    with pytest.raises(BitDanceError, match="noise_000 has shape"):
        generate_batched(
            TorchBackend(model),
            s["labels"],
            s["sample_steps"],
            s["cfg_scale"],
            s["cfg_schedule"],
            ReplayNoise(path),
            batch_size=1,
        )
    one = generate_batched(
        TorchBackend(model),
        s["labels"],
        s["sample_steps"],
        s["cfg_scale"],
        s["cfg_schedule"],
        ReplayNoise(path),
        batch_size=2,
    )
    assert torch.equal(one.tokens, sample["tokens"])
    extra = {k: v for k, v in sample.items() if k.startswith("noise_")}
    extra[f"noise_{len(extra):03d}"] = torch.zeros(2, 4, 32)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(BitDanceError, match="used 28 of its 29 draws"):
        generate_batched(
            TorchBackend(model),
            s["labels"],
            s["sample_steps"],
            s["cfg_scale"],
            s["cfg_schedule"],
            ReplayNoise(tmp_path / "extra.safetensors"),
            batch_size=2,
        )
