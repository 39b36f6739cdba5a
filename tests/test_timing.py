"""TimedBackend counts every stage call the loop makes, and every stage graph the backend runs
inside them (the backbone per phase, through the core's stage observers), and passes results
through unchanged."""

import torch

from bitdance_rt.loading import load_model
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.timing import STAGE_GRAPHS, TimedBackend
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise


def test_timed_backend_counts_and_passes_through():
    model = load_model("tiny-4x").model
    plain = generate(TorchBackend(model), [1, 2], 3, 2.0, "linear", SeededNoise(5))
    backend = TorchBackend(model)
    timed = TimedBackend(backend)
    result = generate(timed, [1, 2], 3, 2.0, "linear", SeededNoise(5))
    n = model.cfg.ar_steps
    assert dict(timed.calls) == {"prefill": 1, "step": n - 1, "sample_tokens": n, "decode": 1}
    assert all(s > 0 for s in timed.seconds.values())
    assert torch.equal(result.tokens, plain.tokens)
    # the graphs: prefill = prefix_embed + the backbone's prefill phase, each step = token_embed + its step phase
    calls = dict(timed.graph_calls)
    head = {k: calls.pop(k) for k in ("head_sampler", "head_step") if k in calls}
    assert calls == {
        "prefix_embed": 1,
        "backbone.prefill": 1,
        "token_embed": n - 1,
        "backbone.step": n - 1,
        "decoder": 1,
    }
    assert head and set(timed.graph_seconds) <= set(STAGE_GRAPHS)
    assert timed.graph_seconds["prefix_embed"] + timed.graph_seconds["backbone.prefill"] <= timed.seconds["prefill"]
    assert timed.graph_seconds["token_embed"] + timed.graph_seconds["backbone.step"] <= timed.seconds["step"]

    assert backend.observers == (timed._graph_ran,) and "_run" not in backend.__dict__  # nothing replaced
    again = TimedBackend(backend)  # a newer wrapper takes the graph timing over, without nesting
    generate(again, [1, 2], 3, 2.0, "linear", SeededNoise(5))
    assert again.graph_calls["backbone.step"] == n - 1 and timed.graph_calls["backbone.step"] == n - 1
    again.detach()
    assert backend.observers == ()
    assert torch.equal(generate(backend, [1, 2], 3, 2.0, "linear", SeededNoise(5)).tokens, plain.tokens)


def test_stage_observers_see_every_stage_run():
    """The core hands each stage run to its observers: stage, phase, the feeds and outputs, seconds."""
    backend = TorchBackend(load_model("tiny-4x").model)
    calls = []
    with backend.observe(calls.append):
        result = generate(backend, [1], 2, 1.0, "linear", SeededNoise(0))
    assert backend.observers == ()
    n = backend.config.ar_steps
    assert [c.graph for c in calls if c.stage == "backbone"] == ["backbone.prefill"] + ["backbone.step"] * (n - 1)
    assert all(c.seconds >= 0 and c.outputs for c in calls)
    decode = [c for c in calls if c.stage == "decoder"]
    assert len(decode) == 1 and torch.equal(decode[0].outputs["image"][:1].float().cpu(), result.image)
