"""One request type, checked once: GenerationParams.create refuses each bad value with a ParamError
naming it, and every front door (Pipeline.submit / generate / stream, the HTTP server, the Triton
model, the CLI, the batch entry points) builds one and hands that very object down to the scheduler;
nothing behind the doors checks it again. A stand-in backend: nothing is exported or generated."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bitdance_rt import Pipeline
from bitdance_rt.backends import ModelSource
from bitdance_rt.config import load_config
from bitdance_rt.errors import BitDanceError
from bitdance_rt.runtime import params as params_module
from bitdance_rt.runtime.params import (
    MAX_CFG,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    GenerationParams,
    ModelLimits,
    ParamError,
    check_previews,
)
from bitdance_rt.runtime.request import Event, GenerationResult, Request
from bitdance_rt.sampling import SeededNoise

CLASSES = ModelLimits("m", t2i=False, num_classes=10)
TEXT = ModelLimits("t", t2i=True)


# ---- the one validator ------------------------------------------------------------------------
BAD = [
    (CLASSES, dict(labels=[3, 10]), "labels", "out of range"),
    (CLASSES, dict(labels=[-1]), "labels", "out of range"),
    (CLASSES, dict(labels="12"), "labels", "got the string '12'"),
    (CLASSES, dict(labels=[]), "labels", "labels is empty"),
    (CLASSES, dict(labels=[3.7]), "labels", "labels must be integers, got float 3.7"),
    (CLASSES, dict(labels=[True]), "labels", "labels must be integers"),
    (CLASSES, dict(), "labels", "give labels"),
    (CLASSES, dict(labels=1, prompt="a cat"), "prompt", "class-conditional"),
    (TEXT, dict(labels=[1], prompt="a cat"), "labels", "text-to-image"),
    (TEXT, dict(), "prompt", "text-to-image: give prompt"),
    (TEXT, dict(prompt="  "), "prompt", "prompt is empty"),
    (TEXT, dict(prompt=["a cat", ""]), "prompt", "prompt 1 is empty"),
    (TEXT, dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt", f"at most {MAX_PROMPT_CHARS}"),
    (TEXT, dict(prompt=3), "prompt", "prompt must be a string"),
    (CLASSES, dict(labels=1, num_images=0), "num_images", "num_images must be a positive integer"),
    (CLASSES, dict(labels=1, num_images=True), "num_images", "num_images must be an integer"),
    (CLASSES, dict(labels=1, steps=0), "steps", f"steps must be an integer in 1..{MAX_STEPS}"),
    (CLASSES, dict(labels=1, steps=MAX_STEPS + 1), "steps", f"1..{MAX_STEPS}"),
    (CLASSES, dict(labels=1, steps=2.5), "steps", "steps must be an integer"),
    (CLASSES, dict(labels=1, cfg=float("nan")), "cfg", "finite number"),
    (CLASSES, dict(labels=1, cfg=MAX_CFG * 2), "cfg", "finite number in 0..100"),
    (CLASSES, dict(labels=1, cfg="4"), "cfg", "must be a number"),
    (CLASSES, dict(labels=1, cfg_schedule="cosine"), "cfg_schedule", "cfg_schedule must be one of linear, constant"),
    (CLASSES, dict(labels=1, seed=-1), "seed", "seed must be an integer in 0.."),
    (CLASSES, dict(labels=1, seed=MAX_SEED + 1), "seed", "seed must be an integer in 0.."),
    (CLASSES, dict(labels=1, seed=True), "seed", "seed must be an integer"),
    (CLASSES, dict(labels=1, noise=7), "noise", "NoiseSource"),
    (CLASSES, dict(labels=1, condition=[1]), "condition", "not several"),
    (CLASSES, dict(condition=[1]), "condition", "runtime condition"),
]


@pytest.mark.parametrize("limits,kwargs,param,needle", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_the_validator_refuses_each_bad_value_naming_it(limits, kwargs, param, needle):
    with pytest.raises(ParamError, match=needle) as err:
        GenerationParams.create(limits, **kwargs)
    assert err.value.param == param


def test_refusals_carry_what_a_door_words_them_with():
    with pytest.raises(ParamError) as err:
        GenerationParams.create(CLASSES, labels=[3, 12, 10])
    assert err.value.value == [12, 10]
    with pytest.raises(ParamError) as err:
        GenerationParams.create(CLASSES, labels=1, num_images=0)
    assert (err.value.value, err.value.bounds) == (0, (1, None))
    with pytest.raises(ParamError) as err:
        GenerationParams.create(CLASSES, labels=1, steps=0)
    assert (err.value.value, err.value.bounds) == (0, (1, MAX_STEPS))


def test_prompt_tokens_are_the_encoders_check():
    class Encoder:
        def encode(self, prompts):
            if any(len(p) > 5 for p in prompts):
                raise BitDanceError("prompt 0 is 9 tokens with the chat template; the limit is 5")

    limits = ModelLimits("t", t2i=True, prompt_encoder=Encoder)
    with pytest.raises(ParamError, match="limit is 5") as err:
        GenerationParams.create(limits, prompt="a long prompt")
    assert err.value.param == "prompt"
    assert GenerationParams.create(limits, prompt="cat").prompts == ("cat",)


def test_checked_params_are_frozen_and_carry_the_model_they_were_checked_for():
    p = GenerationParams.create(CLASSES, labels=np.array([3, 4]), num_images=2, seed=np.int64(5))
    assert p == GenerationParams(labels=(3, 4), num_images=2, seed=5)
    assert p.per_image == [3, 3, 4, 4] and p.images == 4
    assert (p.steps, p.cfg, p.cfg_schedule) == (None, None, None)  # the model's defaults, filled in later
    assert p.checked_for == CLASSES.kind
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 6
    # what the constructor or replace() make was not checked: it carries no model
    assert GenerationParams(labels=(99,)).checked_for is None
    assert dataclasses.replace(p, seed=-1).checked_for is None


def test_preview_every_is_checked_once_too():
    assert check_previews(2, 8) == {2, 4, 6} and check_previews([1, 7], 8) == {1, 7}
    assert check_previews(0, 8) == frozenset()
    for bad, needle in [(-2, "preview_every must be"), ([8], "preview step 8 is out of range"), ("x", "preview_every")]:
        with pytest.raises(ParamError, match=needle) as err:
            check_previews(bad, 8)
        assert err.value.param == "preview_every"


# ---- every door hands the one object down -----------------------------------------------------
@pytest.fixture
def created(monkeypatch):
    """Counts GenerationParams.create calls (what the one validator checked)."""
    calls = []
    real = GenerationParams.create.__func__

    def counting(cls, *args, **kwargs):
        made = real(cls, *args, **kwargs)
        calls.append(made)
        return made

    monkeypatch.setattr(GenerationParams, "create", classmethod(counting))
    return calls


@pytest.fixture
def pipe(monkeypatch):
    """A Pipeline of the embedded digits model's config on a stand-in backend; its scheduler's
    submit records each Request and answers it at once."""
    cfg = load_config("tiny-digits")
    backend = SimpleNamespace(config=cfg, max_rows=None, name="stand-in")
    p = Pipeline(backend, ModelSource(cfg), steps=2, max_batch=4)
    p.arrived = []

    def submit(request: Request) -> Request:
        p.arrived.append(request)
        n, size = sum(len(part) for part in request.parts), cfg.image_size
        result = GenerationResult(torch.zeros(n, 1, 1), torch.zeros(n, 1, 1, 1), torch.zeros(n, 3, size, size), 1.0)
        request.future.set_running_or_notify_cancel()
        request.future.set_result(result)
        request.emit(Event("done", result=result))
        return request

    monkeypatch.setattr(p.scheduler, "submit", submit)
    yield p
    p.close()


def _arrived_once(pipe, created, params=None):
    """One Request reached the scheduler, carrying the one GenerationParams made for it."""
    assert len(pipe.arrived) == 1 and len(created) == 1
    request = pipe.arrived[0]
    assert isinstance(request.params, GenerationParams) and request.params is created[0]
    if params is not None:
        assert request.params is params
    return request


@pytest.mark.parametrize("call", ["submit", "generate", "stream"])
def test_pipeline_methods_build_it_once(pipe, created, call):
    if call == "submit":
        pipe.submit(labels=[3, 4], seed=2, cfg=2.0).result()
    elif call == "generate":
        pipe.generate(labels=[3, 4], seed=2, cfg=2.0)
    else:
        list(pipe.stream(labels=[3, 4], seed=2, cfg=2.0))
    request = _arrived_once(pipe, created)
    assert request.params.labels == (3, 4) and request.params.seed == 2
    assert (request.steps, request.cfg_scale, request.cfg_schedule) == (2, 2.0, "linear")  # defaults filled in
    assert isinstance(request.noise, SeededNoise) and request.noise.seed == 2


def test_params_made_once_are_handed_down_as_they_are(pipe, created):
    params = pipe.params(labels=7, num_images=3, steps=3)
    out = pipe.generate(params=params)
    assert out.labels == [7, 7, 7]
    _arrived_once(pipe, created, params)
    pipe.submit(params=params, preview_every=1).result()  # the same object again: nothing re-checked
    assert len(created) == 1 and pipe.arrived[1].params is params
    assert pipe.arrived[1].preview_steps == frozenset(range(1, pipe.config.ar_steps))


def test_the_pipeline_takes_only_params_checked_for_its_model(pipe, created):
    other = GenerationParams.create(ModelLimits("big", t2i=False, num_classes=1000), labels=[999])
    for bad in [
        other,
        GenerationParams(labels=(3,)),
        dataclasses.replace(pipe.params(labels=3), labels=(99,)),
        {"labels": 3},
    ]:
        with pytest.raises(ParamError, match="GenerationParams") as err:
            pipe.submit(params=bad)
        assert err.value.param == "params"
    with pytest.raises(ParamError, match="not both") as err:
        pipe.submit(params=pipe.params(labels=3), seed=4)
    assert err.value.param == "params" and pipe.arrived == []


def test_http_door_builds_it_once(pipe, created):
    from bitdance_rt.serve.schema import ImageRequest
    from bitdance_rt.serve.translate import FieldError, to_job

    job = to_job(ImageRequest(prompt="3", n=2, seed=5, guidance_scale=2.0), pipe, max_images=16)
    assert list(job.submit) == ["params"] and len(created) == 1
    pipe.submit(**job.submit).result()  # as serve/app.py submits it
    request = _arrived_once(pipe, created, job.submit["params"])
    assert request.params == GenerationParams(labels=(3,), num_images=2, cfg=2.0, seed=5)
    # a refusal of the validator, named and worded as the body names it
    with pytest.raises(FieldError, match="label 10 is out of range") as err:
        to_job(ImageRequest(prompt="", labels=[3, 10]), pipe, max_images=16)
    assert err.value.param == "labels" and err.value.status == 400


def test_triton_door_builds_it_once(pipe, created):
    from bitdance_rt.triton.requests import ModelInfo, RequestError, Responder, Stream, parse_inputs

    info = ModelInfo.of(pipe)
    args = parse_inputs({"labels": np.array([4, 2], np.int32), "seed": np.array([11], np.int64)}, info)
    assert len(created) == 1
    sent = []
    responder = Responder()
    try:
        Stream(pipe, args, lambda *a: sent.append(a), responder).start()
    finally:
        responder.close()
    request = _arrived_once(pipe, created)
    assert request.params.labels == (4, 2) and request.params.seed == 11
    assert sent and sent[-1][2] is True  # the final response
    with pytest.raises(RequestError, match=r"input 'steps': expected an integer in 1\.\.1000, got 0"):
        parse_inputs({"labels": np.array([1], np.int32), "steps": np.array([0], np.int32)}, info)


def test_cli_door_builds_it_once_before_loading(pipe, created, tmp_path, monkeypatch, capsys):
    import bitdance_rt.cli.generate as generate_module
    import bitdance_rt.plan.preflight as preflight
    from bitdance_rt.cli import main

    loads = []

    def load(args, source, steps):
        loads.append(len(created))  # how many params existed when the model was loaded
        return pipe

    monkeypatch.setattr(generate_module, "_pipeline", load)
    monkeypatch.setattr(preflight, "for_generate", lambda *a: None)
    assert (
        main(["generate", "--labels", "3", "5", "--seed", "9", "--steps", "2", "--quiet", "--out", str(tmp_path / "o")])
        == 0
    )
    assert loads == [1]
    request = _arrived_once(pipe, created)
    assert request.params.labels == (3, 5) and request.params.seed == 9 and request.params.steps == 2
    # a refused request: one line, nothing loaded
    assert main(["generate", "--labels", "10", "--out", str(tmp_path / "p")]) == 2
    assert "out of range" in capsys.readouterr().err and loads == [1]


def test_batch_entry_points_build_it_once(created, monkeypatch):
    from bitdance_rt.runtime import loop

    arrived = []
    monkeypatch.setattr(loop, "_run_alone", lambda backend, request, progress: arrived.append(request))
    backend = SimpleNamespace(config=load_config("tiny-digits"), max_batch=2)
    loop.generate_batched(backend, [1, 2, 3], 2, 3.0, None, SeededNoise(0))
    assert len(created) == 1 and arrived[0].params is created[0]
    assert [len(p) for p in arrived[0].parts] == [2, 1]
    with pytest.raises(ParamError, match="out of range"):
        loop.generate(backend, [10], 2, 3.0, None, SeededNoise(0))


def test_nothing_behind_the_doors_checks_again(created):
    """make_request (and the conditions it makes) trust their values: no validator call."""
    from bitdance_rt.runtime.loop import make_request

    cfg = load_config("tiny-digits")
    request = make_request(cfg, [1, 2], 2, 3.0, "constant", SeededNoise(0), None)
    assert created == [] and request.rows == 4
    assert params_module.GenerationParams is GenerationParams
