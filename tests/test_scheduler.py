"""Continuous batching: requests at different AR steps share backbone and head calls, and each
request's tokens are bit-identical to the same request run alone (torch and ONNX Runtime, on the
official fixture models); slots are reused, cancelled and failing requests leave the others alone."""

from __future__ import annotations

import pytest
import torch

from bitdance_rt.errors import BitDanceError
from bitdance_rt.export import checkpoint_source, export_stages
from bitdance_rt.loading import load_model
from bitdance_rt.runtime import Scheduler, generate
from bitdance_rt.runtime.core import MIN_ROWS, row_bucket
from bitdance_rt.runtime.loop import make_request
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import ReplayNoise, SeededNoise

from conftest import FIXTURES, torch_threads

S = 4
# (labels, seed, cfg, schedule, steps): guided from step 1 (linear), guided throughout (constant),
# no guidance (rows = images), another sampler step count (head_step path on ONNX Runtime), 3 images
REQUESTS = [
    ([1, 2], 0, 3.0, "linear", S),
    ([5], 1, 2.0, "constant", S),
    ([7, 0, 3], 2, 1.0, "linear", S),
    ([4], 3, 2.5, "linear", 2),
    ([9, 8, 6], 4, 4.0, "linear", S),
]


class Model:
    def __init__(self, name, root):
        d = FIXTURES / name
        self.model = load_model(f"{d}/config.json", f"{d}/checkpoint.pt").model
        self.cfg = self.model.cfg
        self.dir = root / name
        export_stages(self.model, self.dir, checkpoint_source(d / "checkpoint.pt"), sampler_steps=S, progress=False)

    def backend(self, kind):
        if kind == "torch":
            return TorchBackend(self.model, max_batch=8)
        from bitdance_rt.runtime.ort_backend import OrtBackend

        return OrtBackend(self.dir, threads=1)


@pytest.fixture(scope="module", params=["tiny_4x", "tiny_1x"])
def fixture_model(request, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    with torch_threads(1):
        yield Model(request.param, tmp_path_factory.mktemp("sched"))


def _request(cfg, labels, seed, scale, schedule, steps, **kw):
    return make_request(cfg, labels, steps, scale, schedule, SeededNoise(seed), None, **kw)


def _mixed(backend, cfg, specs, arrivals, max_rows=None):
    """Run the requests through one scheduler, request k submitted before iteration arrivals[k]."""
    sched = Scheduler(backend, max_rows=max_rows)
    reqs = [_request(cfg, *spec) for spec in specs]
    pending = sorted(zip(arrivals, range(len(reqs))))
    it = 0
    while pending or sched.queued or sched.rows_in_flight:
        while pending and pending[0][0] <= it:
            sched.submit(reqs[pending.pop(0)[1]])
        sched.iteration()
        it += 1
    return [r.future.result() for r in reqs], sched


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_mixed_requests_are_bit_identical_to_alone(fixture_model, kind):
    m = fixture_model
    with torch_threads(1):
        backend = m.backend(kind)
        alone = [
            generate(backend, labels, steps, scale, schedule, SeededNoise(seed))
            for labels, seed, scale, schedule, steps in REQUESTS
        ]
        # staggered arrivals: requests join while others are mid-generation
        mixed, sched = _mixed(backend, m.cfg, REQUESTS, arrivals=[0, 0, 1, 2, 3])
    for a, b in zip(alone, mixed):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.latent, b.latent)
        assert torch.equal(a.image, b.image)  # each request is decoded alone
    # they really shared calls: more rows per iteration than any request has, fewer iterations than alone
    biggest = max(len(spec[0]) * (2 if spec[2] > 1 else 1) for spec in REQUESTS)
    assert max(sched.rows_per_iteration) > biggest
    assert sched.iterations < m.cfg.ar_steps * len(REQUESTS)


def test_one_request_alone_is_the_official_sampler(fixture_model):
    """The scheduler with one request and the recorded official noise gives the official tokens."""
    from safetensors.torch import load_file

    d = FIXTURES / fixture_model.dir.name
    sample = load_file(str(d / "sample.safetensors"))
    labels = [int(x) for x in sample["labels"]]
    with torch_threads(1):
        sched = Scheduler(fixture_model.backend("onnxruntime"))
        req = sched.submit(
            make_request(fixture_model.cfg, labels, 6, 3.0, "linear", ReplayNoise(d / "sample.safetensors"), None)
        )
        sched.run_until_idle()
    assert torch.equal(req.future.result().tokens, sample["tokens"])


def test_slots_are_reused_when_requests_outnumber_them(fixture_model):
    """8 cache rows: requests wait for free slots, are admitted as others finish, and still match."""
    m = fixture_model
    specs = [([i % m.cfg.num_classes], 10 + i, 3.0, "linear", S) for i in range(6)]  # 2 rows each
    with torch_threads(1):
        backend = m.backend("onnxruntime")
        mixed, sched = _mixed(backend, m.cfg, specs, arrivals=[0] * 6, max_rows=8)
        alone = [generate(backend, *_args(s)) for s in specs]
    assert max(sched.rows_per_iteration) == 8  # 4 requests at once, the others queued
    for a, b in zip(alone, mixed):
        assert torch.equal(a.tokens, b.tokens)


def _args(spec):
    labels, seed, scale, schedule, steps = spec
    return labels, steps, scale, schedule, SeededNoise(seed)


def test_cancel_and_failure_leave_the_others_alone(fixture_model, tmp_path):
    m = fixture_model
    with torch_threads(1):
        backend = m.backend("torch")
        sched = Scheduler(backend)
        keep = sched.submit(_request(m.cfg, [1], 0, 3.0, "linear", S))
        drop = sched.submit(_request(m.cfg, [2], 1, 3.0, "linear", S))
        from safetensors.torch import save_file

        short = tmp_path / "short.safetensors"  # one draw only: fails at its first AR step
        save_file({"noise_000": torch.zeros(2, m.cfg.parallel_num, m.cfg.token_dim)}, str(short))
        bad = sched.submit(make_request(m.cfg, [3], S, 3.0, "linear", ReplayNoise(short), None))
        sched.iteration()
        sched.cancel(drop)
        sched.run_until_idle()
        want = generate(backend, [1], S, 3.0, "linear", SeededNoise(0))
    assert torch.equal(keep.future.result().tokens, want.tokens)
    with pytest.raises(Exception, match="cancelled"):
        drop.future.result()
    with pytest.raises(BitDanceError, match="holds 1 draws"):
        bad.future.result()
    assert sched.rows_in_flight == 0 and sorted(sched._free) == list(range(sched.max_rows))  # every slot back


def test_row_buckets():
    assert [row_bucket(n, 32) for n in (1, 2, 4, 5, 8, 9, 13, 17, 25, 32)] == [4, 4, 4, 8, 8, 12, 16, 24, 32, 32]
    assert row_bucket(2, 2) == 2 and row_bucket(40, None) == 48 and row_bucket(40, 64) == 48 and MIN_ROWS == 4
    with pytest.raises(BitDanceError, match="outside the exported range"):
        row_bucket(33, 32)


def test_rows_are_independent_of_their_neighbours_in_torch_gemm():
    """Why the buckets: torch's CPU GEMM (MKL) gives the rows of some small products other bits than the
    same rows inside a larger product (measured: M = 1-3 on AVX-512; M = 1-3 and 5-7 with AVX2 kernels,
    under an emulated EPYC-Milan). Every bucket size gives the bits of the large product."""
    from bitdance_rt.runtime.core import BUCKETS

    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(768, 256, generator=gen), torch.randn(64, 256, generator=gen)
    full = torch.nn.functional.linear(x, w)
    for m in BUCKETS:
        assert torch.equal(torch.nn.functional.linear(x[:m], w), full[:m])
