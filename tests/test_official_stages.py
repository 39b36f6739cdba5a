"""Every stage of the reference models against the official implementation's recorded outputs.

Float tensors within conftest.ORACLE_REL of the official ones' magnitude (a bound that holds on
every CPU's float32 kernels, with headroom); bits and tokens exact.
"""

from __future__ import annotations

import pytest
import torch

from bitdance_rt.models.layout import attention_mask_table, latent_to_tokens, tokens_to_latent

from conftest import assert_matches_oracle

MODELS = ["tiny_4x", "tiny_1x"]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """The 1x fixtures store per-row 2-D tensors [R, C]; our stages use [R, P=1, C]."""
    return t[:, None] if t.dim() == 2 else t


@pytest.mark.parametrize("name", MODELS)
def test_decoder(official, name):
    model, stages, _, _ = official(name)
    with torch.no_grad():
        out = model.decode(stages["decoder.input"])
    assert_matches_oracle(out, stages["decoder.output"], "decoder")


@pytest.mark.parametrize("name", MODELS)
def test_encoder(official, name):
    model, stages, _, _ = official(name)
    with torch.no_grad():
        pre = model.vae.encode_continuous(stages["encoder.input"])
        bits = model.encode(stages["encoder.input"])
    assert_matches_oracle(pre, stages["encoder.pre_quant"], "encoder")
    assert torch.equal(bits, stages["encoder.output"])


@pytest.mark.parametrize("name", MODELS)
def test_head_net(official, name):
    model, stages, _, _ = official(name)
    x, c = as_rows(stages["head_net.x"]), as_rows(stages["head_net.c"])
    with torch.no_grad():
        out = model.head_net(x, stages["head_net.t"], c)
    assert_matches_oracle(out, as_rows(stages["head_net.output"]), "head_net")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("full_cache", [False, True], ids=["written-keys", "full-static-cache"])
def test_backbone_prefill_and_steps(official, name, full_cache):
    """One KV cache across prefill -> step1 -> step2, at the official positions.

    `full_cache` reads the whole static cache, masked past the chunk (the exported form); the
    other form reads the written keys only (the official eager form).
    """
    model, stages, _, cfg = official(name)
    labels = stages["backbone.labels"]
    kv = model.new_cache(labels.shape[0])
    n = model.cfg.prefix_len
    with torch.no_grad():
        emb = model.prefix_embed(labels)
        assert torch.equal(emb, stages["backbone.prefill.input"])
        assert (int(stages["backbone.prefill.start_pos"]), int(stages["backbone.prefill.end_pos"])) == (0, n)
        hidden, new = model.backbone(emb, 0, chunk_mask=attention_mask_table(model.cfg)[:n, :n])
        assert_matches_oracle(hidden, stages["backbone.prefill.output"], "prefill hidden")
        assert new.shape == (model.cfg.n_layer, 2, labels.shape[0], model.cfg.n_head, n, model.cfg.head_dim)
        model.write_cache(kv, new, 0)
        for step in (1, 2):
            key = f"backbone.step{step}"
            start, end = int(stages[f"{key}.start_pos"]), int(stages[f"{key}.end_pos"])
            assert start == model.step_start(step) and end == start + model.cfg.parallel_num
            x = model.proj_in(as_rows(stages[f"{key}.tokens"]))
            assert_matches_oracle(x, as_rows(stages[f"{key}.input"]), f"{key} proj_in")
            hidden, new = model.backbone(x, start, kv, None if full_cache else start)
            assert_matches_oracle(hidden, as_rows(stages[f"{key}.output"]), f"{key} hidden")
            model.write_cache(kv, new, start)


@pytest.mark.parametrize("name", MODELS)
def test_token_order_and_unpatchify(official, name):
    """tokens (generation order) -> latent grid is the official unpatchify, and it inverts."""
    model, _, sample, _ = official(name)
    latent = tokens_to_latent(sample["tokens"], model.cfg)
    assert torch.equal(latent, sample["latent"])
    assert torch.equal(latent_to_tokens(latent, model.cfg), sample["tokens"])


@pytest.mark.parametrize("name", MODELS)
def test_head_conditions_of_recorded_steps(official, name):
    """head_cond = hidden + pos_for_diff rows of the step's tokens, for every AR step."""
    model, _, sample, _ = official(name)
    for i in range(model.cfg.ar_steps):
        hidden = as_rows(sample[f"steps.{i:03d}.hidden"])
        cond = model.head_condition(hidden, i)
        torch.testing.assert_close(cond, as_rows(sample[f"steps.{i:03d}.head_cond"]), atol=0, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_the_oracle_bound_catches_weights_rounded_through_bfloat16(official, name):
    """The float bound is loose enough for every CPU and still tight enough for a real defect: a
    model whose weights went through bfloat16 (a wrong cast on loading) fails it."""
    import copy

    model, stages, _, _ = official(name)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        for p in broken.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        outs = {
            "decoder": (broken.decode(stages["decoder.input"]), stages["decoder.output"]),
            "head_net": (
                broken.head_net(as_rows(stages["head_net.x"]), stages["head_net.t"], as_rows(stages["head_net.c"])),
                as_rows(stages["head_net.output"]),
            ),
        }
    for what, (got, want) in outs.items():
        with pytest.raises(AssertionError, match="max abs error"):
            assert_matches_oracle(got, want, what)


@pytest.mark.parametrize("preset", ["BitDance-B-1x", "BitDance-B-4x", "BitDance-B-16x", "tiny-4x"])
def test_one_mask_rule_gives_the_prefill_and_every_step(preset):
    """layout.chunk_visible (positions -> which keys a chunk sees, the rule the one backbone graph
    computes) equals the block-causal table of the official mask on the prefix and on every fed
    patch, also for rows at different steps in one call."""
    from bitdance_rt.config import load_config
    from bitdance_rt.models.layout import chunk_step, chunk_visible
    from bitdance_rt.stages import step_start

    cfg = load_config(preset)
    table = attention_mask_table(cfg) == 0
    n, p = cfg.prefix_len, cfg.parallel_num
    assert torch.equal(chunk_visible(cfg, 0, n), table[:n, :n]) and chunk_step(cfg, 0, n) == 0
    starts = [step_start(cfg, i) for i in range(1, cfg.ar_steps)]
    for i, s in enumerate(starts, start=1):
        assert torch.equal(chunk_visible(cfg, s, p), table[s : s + p, s : s + p]), (preset, i)
        assert chunk_step(cfg, s, p) == i
    rows = torch.tensor(starts[::7])
    got = chunk_visible(cfg, rows, p)
    assert torch.equal(got, torch.stack([table[s : s + p, s : s + p] for s in rows.tolist()]))
    assert torch.equal(chunk_step(cfg, rows, p), (rows - n) // p + 1)


def test_one_mask_rule_gives_the_text_to_image_prefix():
    """Text-to-image: causal over the prompt, the last P prefix positions (<|res_w|> and the
    queries) one block, as the official second prefill call with an all-ones mask."""
    from bitdance_rt.models.layout import chunk_visible
    from bitdance_rt.t2i_config import t2i_preset

    cfg = t2i_preset("BitDance-14B-64x", 512, 512)
    n, p = cfg.prefix_len, cfg.parallel_num
    i, j = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    assert torch.equal(chunk_visible(cfg, 0, n), (j <= i) | ((i >= n - p) & (j >= n - p)))
    assert chunk_visible(cfg, n, p).all()
