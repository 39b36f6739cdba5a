"""The embedded tiny digits model (bitdance_rt/assets/tiny_digits.*) and its quality metric.

The model, the classifier and the held-out digits are trained / split by recipes/train_tiny.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitdance_rt.config import EMBEDDED_CONFIG as CONFIG
from bitdance_rt.config import EMBEDDED_WEIGHTS as WEIGHTS
from bitdance_rt.config import ModelConfig, load_config
from bitdance_rt.loading import load_model
from bitdance_rt.models import BitDance
from bitdance_rt.models.init import random_init
from bitdance_rt.quality import (
    class_accuracy,
    digits_to_images,
    frechet_distance,
    load_classifier,
    load_heldout,
    score_images,
)
from bitdance_rt.runtime import generate
from bitdance_rt.runtime.torch_backend import TorchBackend
from bitdance_rt.sampling import SeededNoise

from conftest import torch_threads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is fastest, and avoids thread oversubscription on busy CI cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(CONFIG), str(WEIGHTS))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _generate(model, labels, seed, steps=None, cfg=None):
    c = model.cfg
    return generate(
        TorchBackend(model),
        labels,
        steps or c.default_steps,
        c.default_cfg if cfg is None else cfg,
        "linear",
        SeededNoise(seed),
    )


def test_assets_are_small_and_config_is_official_form():
    assert WEIGHTS.stat().st_size <= 10 * 2**20
    data = json.loads(CONFIG.read_text())
    cfg = load_config(str(CONFIG))
    assert cfg.to_json_dict() == data  # written by ModelConfig.to_json_dict(), round-trips
    assert ModelConfig.from_json_dict(data) == cfg
    assert cfg.is_parallel and cfg.parallel_num == 4 and cfg.num_classes == 10
    assert cfg.image_size == cfg.resolution


def test_checkpoint_loads_strictly(loaded):
    from safetensors.torch import load_file

    assert not loaded.random_weights
    sd = load_file(str(WEIGHTS))
    ours = loaded.model.state_dict()
    assert set(sd) == set(ours)
    assert any(k.startswith("vae.") for k in sd)
    for k, v in sd.items():
        assert v.shape == ours[k].shape and torch.equal(v, ours[k]), k


def test_generation_is_deterministic_per_seed(loaded):
    labels = [0, 3, 7, 9]
    a = _generate(loaded.model, labels, seed=11)
    b = _generate(loaded.model, labels, seed=11)
    c = _generate(loaded.model, labels, seed=12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.image, b.image)
    assert set(a.tokens.unique().tolist()) <= {-1.0, 1.0}
    assert not torch.equal(a.tokens, c.tokens)
    assert a.image.shape == (4, 3, loaded.model.cfg.resolution, loaded.model.cfg.resolution)


def test_classifier_accuracy_on_real_heldout(classifier):
    digits, labels = load_heldout()
    assert len(labels) >= 300 and set(labels.tolist()) == set(range(10))
    assert class_accuracy(classifier, digits_to_images(digits, 32), labels) >= 0.95


def test_tokenizer_reconstructions_stay_recognisable(loaded, classifier):
    digits, labels = load_heldout()
    images = digits_to_images(digits, loaded.model.cfg.resolution)
    with torch.no_grad():
        rec = loaded.model.decode(loaded.model.encode(images)).clamp(-1, 1)
    assert class_accuracy(classifier, rec, labels) >= 0.95
    assert torch.mean(((rec - images) / 2) ** 2).item() < 0.02


def test_generated_digits_are_recognised(loaded, classifier):
    labels = [c for c in range(10) for _ in range(20)]
    result = _generate(loaded.model, labels, seed=0)
    report = score_images(result.image.clamp(-1, 1), labels, classifier)
    assert report.accuracy >= 0.90, str(report)
    assert math.isfinite(report.frechet)
    # Far closer to real digits than the images of the same architecture with random weights.
    random_model = random_init(BitDance(loaded.model.cfg).eval(), seed=0)
    noise_images = _generate(random_model, labels, seed=0, steps=2, cfg=1.0).image.clamp(-1, 1)
    real = digits_to_images(load_heldout()[0], 32)
    assert report.frechet < 0.5 * frechet_distance(classifier, noise_images, real)
