"""The ONNX Runtime backend under the shared loop: official fixtures bit for bit, agreement
with the torch backend, both sampler paths, the IO-bound cache, and clear errors for bad exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from safetensors.torch import load_file  # noqa: E402

from bitdance_rt import stages as st  # noqa: E402
from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.export import MANIFEST, checkpoint_source, export_stages  # noqa: E402
from bitdance_rt.loading import load_model  # noqa: E402
from bitdance_rt.runtime import generate  # noqa: E402
from bitdance_rt.runtime.ort_backend import OrtBackend  # noqa: E402
from bitdance_rt.runtime.torch_backend import TorchBackend  # noqa: E402
from bitdance_rt.sampling import ReplayNoise, SeededNoise  # noqa: E402

from conftest import FIXTURE_STEPS, FIXTURES, copy_export, torch_threads  # noqa: E402

S = 6


class Exported:
    def __init__(self, name: str, root: Path, exported):
        """`exported`: conftest's fixture_exports (the session's export_stages(model, dir, source,
        sampler_steps=S) of this fixture); the module runs a copy of it."""
        self.name = name
        self.fixture = FIXTURES / name
        if not self.fixture.is_dir():
            pytest.fail(f"official fixtures not found at {self.fixture}")
        self.model = load_model(f"{self.fixture}/config.json", f"{self.fixture}/checkpoint.pt").model
        self.source = checkpoint_source(self.fixture / "checkpoint.pt")
        self.dir = root / name
        assert S == FIXTURE_STEPS
        copy_export(exported(name), self.dir)
        self.sample = load_file(str(self.fixture / "sample.safetensors"))
        self.labels = [int(x) for x in self.sample["labels"]]
        self._backends: dict = {}

    def backend(self, **kw) -> OrtBackend:
        kw.setdefault("threads", 1)  # tiny graphs: one thread is fastest and immune to busy cores
        key = tuple(sorted(kw.items()))
        if key not in self._backends:
            self._backends[key] = OrtBackend(self.dir, **kw)
        return self._backends[key]

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.dir, dest)
        return dest


@pytest.fixture(scope="module", params=["tiny_4x", "tiny_1x"])
def ex(request, tmp_path_factory, fixture_exports):
    with torch_threads(1):
        yield Exported(request.param, tmp_path_factory.mktemp("ort"), fixture_exports)


# ---- the official sample, bit for bit -------------------------------------------------------
@pytest.mark.parametrize("sampler", ["fused", "step", "auto"])
def test_official_sample_replayed_bit_identical(ex, sampler):
    backend = ex.backend(sampler=sampler)
    result = generate(backend, ex.labels, S, 3.0, "linear", ReplayNoise(ex.fixture / "sample.safetensors"))
    assert torch.equal(result.tokens, ex.sample["tokens"])
    assert torch.equal(result.latent, ex.sample["latent"])
    assert (result.image - ex.sample["image"]).abs().max().item() <= 2e-4


def test_the_two_sampler_paths_are_really_taken(ex):
    calls = []
    backend = OrtBackend(ex.dir, threads=1)
    assert st.HEAD_STEP not in backend.sessions  # built only when a step count without fused graph asks
    backend.add_observer(lambda call: calls.append(call.stage))
    cond = torch.zeros(2, ex.model.cfg.parallel_num, ex.model.cfg.dim)
    backend.sample_tokens(cond, torch.zeros(S + 1, 2, ex.model.cfg.parallel_num, ex.model.cfg.token_dim), 1.0, False)
    assert calls == [st.HEAD_SAMPLER]
    calls.clear()
    backend.sample_tokens(cond, torch.zeros(3 + 1, 2, ex.model.cfg.parallel_num, ex.model.cfg.token_dim), 1.0, False)
    assert calls == [st.HEAD_STEP] * 4 and st.HEAD_STEP in backend.sessions  # S+1 net evaluations


# ---- agreement with the torch backend --------------------------------------------------------
@pytest.mark.parametrize(
    "steps,cfg,schedule,labels,seed",
    [
        (S, 2.0, "constant", [1, 2, 5], 0),  # fused, guided at every step
        (3, 3.0, "linear", [0, 9], 1),  # head_step fallback (exported S=6), unguided step 0
        (S, 1.0, "linear", [4], 2),  # no CFG: rows = batch, unguided only
    ],
)
def test_seeded_generation_equals_torch_backend(ex, steps, cfg, schedule, labels, seed):
    want = generate(TorchBackend(ex.model), labels, steps, cfg, schedule, SeededNoise(seed))
    got = generate(ex.backend(), labels, steps, cfg, schedule, SeededNoise(seed))
    assert torch.equal(got.tokens, want.tokens)
    assert torch.equal(got.latent, want.latent)
    assert (got.image - want.image).abs().max().item() <= 2e-4


def test_cache_is_one_static_buffer_written_in_place(ex):
    cfg = ex.model.cfg
    backend, ref = ex.backend(), TorchBackend(ex.model)
    labels = torch.tensor([1, 2, cfg.num_classes, cfg.num_classes])
    torch.testing.assert_close(backend.prefill(labels), ref.prefill(labels), rtol=0, atol=1e-5)
    ptrs = {backend.kv_cache.data_ptr()}
    gen = torch.Generator().manual_seed(0)
    for i in range(1, cfg.ar_steps):
        tokens = torch.where(torch.rand(4, cfg.parallel_num, cfg.token_dim, generator=gen) > 0.5, 1.0, -1.0)
        torch.testing.assert_close(backend.step(tokens, i), ref.step(tokens, i), rtol=0, atol=1e-5)
        ptrs.add(backend.kv_cache.data_ptr())
    assert len(ptrs) == 1  # the graphs read the same preallocated buffer every step
    cache = backend.kv_cache.numpy()
    end = st.step_start(cfg, cfg.ar_steps - 1) + cfg.parallel_num
    np.testing.assert_allclose(cache[..., :end, :], ref.kv_cache[..., :end, :].numpy(), rtol=0, atol=1e-5)
    assert not cache[..., end:, :].any()


def test_session_options(ex, tmp_path):
    opt_dir = tmp_path / "opt"
    backend = OrtBackend(ex.dir, threads=1, opt_level="basic", optimized_model_dir=opt_dir, providers=["cpu"])
    assert (opt_dir / "backbone.basic.onnx").is_file()
    # thread pools stop spinning at the end of a run (the next stage's session needs the cores)
    assert {
        s.get_session_options().get_session_config_entry("session.force_spinning_stop")
        for s in backend.sessions.values()
    } == {"1"}
    # the decoder (once per image, the largest activations) frees them after each call: no arena keeps them
    arena = {name: s.get_session_options().enable_cpu_mem_arena for name, s in backend.sessions.items()}
    assert arena.pop(st.DECODER) is False and set(arena.values()) == {True}
    got = generate(backend, ex.labels, S, 3.0, "linear", ReplayNoise(ex.fixture / "sample.safetensors"))
    assert torch.equal(got.tokens, ex.sample["tokens"])
    plain = OrtBackend(ex.dir, opt_level="disable", threads=1)
    image = load_file(str(ex.fixture / "stages.safetensors"))
    assert torch.equal(plain.encode(image["encoder.input"]), image["encoder.output"])


# ---- bad exports and bad calls --------------------------------------------------------------
def test_truncated_onnx_file(ex, tmp_path):
    d = ex.copy(tmp_path / "exp")
    path = d / "backbone.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BitDanceError, match=r"backbone\.onnx.*re-export"):
        OrtBackend(d)
    with pytest.raises(BitDanceError, match=r"backbone\.onnx"):
        OrtBackend(d, verify_hashes=False)


def test_corrupt_onnx_file_of_the_same_size_without_hash_check(ex, tmp_path):
    d = ex.copy(tmp_path / "exp")
    path = d / "head_step.onnx"
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(BitDanceError, match=r"head_step\.onnx.*sha256"):
        OrtBackend(d)
    # head_step is opened when a step count without fused graph first needs it: the error comes then
    backend = OrtBackend(d, verify_hashes=False)
    with pytest.raises(BitDanceError, match=r"head_step\.onnx.*not a readable ONNX file"):
        generate(backend, [1], 3, 2.0, "linear", SeededNoise(0))
    with pytest.raises(BitDanceError, match=r"head_step\.onnx.*not a readable ONNX file"):
        OrtBackend(d, verify_hashes=False, sampler="step")


def test_missing_stage_file(ex, tmp_path):
    d = ex.copy(tmp_path / "exp")
    (d / "decoder.onnx").unlink()
    with pytest.raises(BitDanceError, match=r"decoder\.onnx is missing"):
        OrtBackend(d)


def test_manifest_of_another_checkpoint(ex, tmp_path):
    other = "tiny_1x" if ex.name == "tiny_4x" else "tiny_4x"
    other_model = load_model(FIXTURES / other / "config.json", FIXTURES / other / "checkpoint.pt").model
    other_dir = tmp_path / "other"
    export_stages(
        other_model,
        other_dir,
        checkpoint_source(FIXTURES / other / "checkpoint.pt"),
        stages=[*st.REQUIRED_STAGES, st.HEAD_STEP],
    )
    d = ex.copy(tmp_path / "exp")
    shutil.copy(other_dir / MANIFEST, d / MANIFEST)
    with pytest.raises(BitDanceError, match=r"\.onnx does not match the sha256|\.onnx has \d+ bytes"):
        OrtBackend(d)
    with pytest.raises(BitDanceError, match="another checkpoint"):
        OrtBackend(ex.dir, expect_source="sha256:" + "0" * 64)
    with pytest.raises(BitDanceError, match="another config"):
        OrtBackend(ex.dir, expect_config=other_model.cfg)
    assert OrtBackend(ex.dir, expect_config=ex.model.cfg, expect_source=ex.source).config == ex.model.cfg


def test_missing_or_foreign_manifest(ex, tmp_path):
    with pytest.raises(BitDanceError, match="not found"):
        OrtBackend(tmp_path / "nowhere")
    d = ex.copy(tmp_path / "exp")
    (d / MANIFEST).unlink()
    with pytest.raises(BitDanceError, match="manifest.json is missing"):
        OrtBackend(d)
    (d / MANIFEST).write_text(json.dumps({"hello": 1}))
    with pytest.raises(BitDanceError, match="re-export"):
        OrtBackend(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(BitDanceError, match="unreadable manifest"):
        OrtBackend(d)


def test_export_without_needed_stages(ex, tmp_path):
    d = tmp_path / "partial"
    export_stages(ex.model, d, ex.source, stages=[*st.REQUIRED_STAGES, *st.SAMPLER_STAGES], sampler_steps=S)
    backend = OrtBackend(d, threads=1)
    with pytest.raises(BitDanceError, match=r"S=6.*S=4.*no head_step"):
        generate(backend, [1], 4, 2.0, "linear", SeededNoise(0))
    with pytest.raises(BitDanceError, match="no encoder stage"):
        backend.encode(torch.zeros(1, 3, ex.model.cfg.image_size, ex.model.cfg.image_size))
    only_head = tmp_path / "head"
    export_stages(ex.model, only_head, ex.source, stages=[st.HEAD_STEP])
    with pytest.raises(BitDanceError, match="lacks stage"):
        OrtBackend(only_head)


def test_bad_calls_and_options(ex):
    cfg = ex.model.cfg
    backend = OrtBackend(ex.dir, threads=1)
    with pytest.raises(BitDanceError, match="before prefill"):
        backend.step(torch.ones(2, cfg.parallel_num, cfg.token_dim), 1)
    backend.prefill(torch.tensor([1, 2]))
    with pytest.raises(BitDanceError, match="prefilled with 2"):
        backend.step(torch.ones(3, cfg.parallel_num, cfg.token_dim), 1)
    with pytest.raises(BitDanceError, match="AR step"):
        backend.step(torch.ones(2, cfg.parallel_num, cfg.token_dim), cfg.ar_steps)
    with pytest.raises(BitDanceError, match="labels must lie"):
        backend.prefill(torch.tensor([cfg.num_classes + 1]))
    with pytest.raises(BitDanceError, match="outside the exported range"):
        backend.prefill(torch.zeros(33, dtype=torch.int64))
    with pytest.raises(BitDanceError, match="contract wants"):
        backend.decode(torch.ones(1, cfg.latent_dim, 3, 3))
    with pytest.raises(BitDanceError, match="not available"):
        OrtBackend(ex.dir, providers=["NoSuchExecutionProvider"])
    with pytest.raises(BitDanceError, match="optimisation level"):
        OrtBackend(ex.dir, opt_level="max")
    with pytest.raises(BitDanceError, match="sampler mode"):
        OrtBackend(ex.dir, sampler="magic")


def test_external_data_export_runs_end_to_end(ex, tmp_path):
    """The >1.5 GB layout (weights in <stage>.onnx.data), forced on the tiny model."""
    d = tmp_path / "ext"
    result = export_stages(ex.model, d, ex.source, stages=[*st.REQUIRED_STAGES, st.HEAD_STEP], external_data_bytes=0)
    assert "backbone.onnx.data" in result.manifest["files"]
    backend = OrtBackend(d, threads=1, optimized_model_dir=tmp_path / "opt")
    got = generate(backend, ex.labels, S, 3.0, "linear", ReplayNoise(ex.fixture / "sample.safetensors"))
    assert torch.equal(got.tokens, ex.sample["tokens"])
    (d / "decoder.onnx.data").unlink()
    with pytest.raises(BitDanceError, match=r"decoder\.onnx\.data is missing"):
        OrtBackend(d)


def test_tensorrt_profiles_come_from_the_contract(ex):
    from bitdance_rt.runtime.ort_session import trt_profile_options

    cfg = ex.model.cfg
    spec = st.stage_spec(st.HEAD_SAMPLER, cfg, S, st.Limits(max_batch=8, opt_batch=2))
    opts = trt_profile_options(spec)
    p, c, dim = cfg.parallel_num, cfg.token_dim, cfg.dim
    assert opts["trt_profile_min_shapes"] == (f"cond:1x{p}x{dim},noise:{S + 1}x1x{p}x{c},cfg:1,cond_row:1,uncond_row:1")
    assert opts["trt_profile_max_shapes"] == (
        f"cond:16x{p}x{dim},noise:{S + 1}x16x{p}x{c},cfg:16,cond_row:16,uncond_row:16"
    )
    step = trt_profile_options(st.stage_spec(st.BACKBONE, cfg))
    assert "start:8," in step["trt_profile_opt_shapes"] and "cache.0.key:" in step["trt_profile_opt_shapes"]


def test_noise_that_does_not_fit_is_refused(ex):
    cfg = ex.model.cfg
    backend = ex.backend()
    cond = torch.zeros(4, cfg.parallel_num, cfg.dim)
    with pytest.raises(BitDanceError, match="does not fit"):
        backend.sample_tokens(cond, torch.zeros(S + 1, 4, cfg.parallel_num, cfg.token_dim), 2.0, True)
    with pytest.raises(BitDanceError, match="does not fit"):
        backend.sample_tokens(cond, torch.zeros(1, 4, cfg.parallel_num, cfg.token_dim), 1.0, False)


def test_ort_providers_put_the_gpu_providers_on_the_device_index():
    from bitdance_rt.backends import BackendOptions, ort_providers

    assert ort_providers(BackendOptions(device="cpu")) == ["cpu"]
    assert ort_providers(BackendOptions(device="cuda")) == ["cuda"]
    assert ort_providers(BackendOptions(device="cuda:1")) == [("cuda", {"device_id": 1})]
    assert ort_providers(BackendOptions(device="cuda:2", ort_provider="tensorrt")) == [
        ("tensorrt", {"device_id": 2}),
        ("cuda", {"device_id": 2}),
    ]
    with pytest.raises(BitDanceError, match="cuda:N"):
        ort_providers(BackendOptions(device="cuda:x"))
