"""TimedBackend counts every stage call the loop makes and passes results through unchanged."""

import torch

from bitdance_rt.loading import load_model
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.timing import TimedBackend
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise


def test_timed_backend_counts_and_passes_through():
    model = load_model("tiny-4x").model
    plain = generate(TorchBackend(model), [1, 2], 3, 2.0, "linear", SeededNoise(5))
    timed = TimedBackend(TorchBackend(model))
    result = generate(timed, [1, 2], 3, 2.0, "linear", SeededNoise(5))
    n = model.cfg.ar_steps
    assert dict(timed.calls) == {"prefill": 1, "step": n - 1, "sample_tokens": n, "decode": 1}
    assert all(s > 0 for s in timed.seconds.values())
    assert torch.equal(result.tokens, plain.tokens)
