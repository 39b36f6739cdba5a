"""Every stage of the reference models against the official implementation's recorded outputs.

Float tensors within conftest.ORACLE_REL of the official ones' magnitude (a bound that holds on
every CPU's float32 kernels, with headroom); bits and tokens exact.
"""

from __future__ import annotations

import pytest
import torch

from bitdance_rt.models.layout import latent_to_tokens, tokens_to_latent

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
        emb = model.prefix_embeddings(labels)
        assert torch.equal(emb, stages["backbone.prefill.input"])
        assert (int(stages["backbone.prefill.start_pos"]), int(stages["backbone.prefill.end_pos"])) == (0, n)
        hidden, new = model.backbone(emb, 0, chunk_mask=model.prefix_mask)
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
        outs = {"decoder": (broken.decode(stages["decoder.input"]), stages["decoder.output"]),
                "head_net": (broken.head_net(as_rows(stages["head_net.x"]), stages["head_net.t"],
                                             as_rows(stages["head_net.c"])), as_rows(stages["head_net.output"]))}
    for what, (got, want) in outs.items():
        with pytest.raises(AssertionError, match="max abs error"):
            assert_matches_oracle(got, want, what)
