"""Presets, the official JSON form, and config validation."""

from __future__ import annotations

import json

import pytest
import torch

from bitdance_rt.config import PRESETS, ModelConfig, load_config
from bitdance_rt.errors import ConfigError
from bitdance_rt.models import BitDance

from conftest import fixture_config, fixture_dir

# Parameter counts from the official imagenet_gen/README.md, with half a unit of the digits it
# prints as tolerance (242M: +-0.5M; 1.0B: +-0.05B). Autoencoder: 460M.
OFFICIAL_PARAMS = {
    "BitDance-B-1x": (242e6, 0.5e6),
    "BitDance-B-4x": (260e6, 0.5e6),
    "BitDance-B-16x": (260e6, 0.5e6),
    "BitDance-L-1x": (527e6, 0.5e6),
    "BitDance-H-1x": (1.0e9, 0.05e9),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_full_size_presets_match_official_parameter_counts(name):
    with torch.device("meta"):  # no memory: shapes only
        model = BitDance(PRESETS[name])
    total = sum(p.numel() for p in model.parameters())
    vae = sum(p.numel() for p in model.vae.parameters())
    count, tol = OFFICIAL_PARAMS[name]
    assert abs((total - vae) - count) <= tol
    assert abs(vae - 460e6) <= 0.5e6
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("name", ["tiny_4x", "tiny_1x"])
def test_fixture_config_json_loads_and_counts(name):
    raw = fixture_config(name)
    cfg = load_config(fixture_dir(name) / "config.json")
    assert cfg.grid == (raw["derived"]["h"], raw["derived"]["w"])
    assert cfg.ar_steps == raw["derived"]["ar_steps"]
    assert cfg.parallel_num == raw["derived"]["tokens_per_step"]
    assert cfg.ffn_hidden == raw["derived"]["ffn_hidden"]
    assert cfg.max_seq_len == raw["derived"]["freqs_cis_shape"][0]
    model = BitDance(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert total == raw["param_count"]["total"]
    assert total - sum(p.numel() for p in model.vae.parameters()) == raw["param_count"]["non_vae"]


def test_json_round_trip_keeps_constructor_args(tmp_path):
    raw = fixture_config("tiny_4x")
    cfg = ModelConfig.from_json_dict(raw, "tiny_4x")
    again = cfg.to_json_dict()
    assert again["constructor_args"] == raw["constructor_args"]
    assert again["vae"]["ddconfig"] == raw["vae"]["ddconfig"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(again))
    assert load_config(path) == cfg
    for preset in PRESETS.values():
        assert ModelConfig.from_json_dict(preset.to_json_dict(), preset.name) == preset


def bad(raw_changes: dict, vae_changes: dict | None = None) -> dict:
    raw = json.loads(json.dumps(fixture_config("tiny_4x")))
    raw["constructor_args"].update(raw_changes)
    raw["vae"]["ddconfig"].update(vae_changes or {})
    return raw


@pytest.mark.parametrize(
    "changes,vae_changes,match",
    [
        ({"n_head": 5}, None, "not divisible by n_head"),
        ({"parallel_num": 3}, None, "perfect square"),
        ({"parallel_num": 64}, None, "cannot be cut"),
        ({"bogus": 1}, None, "unknown constructor_args.*bogus"),
        ({"latent_dim": 16}, None, "z_channels=32 must equal latent_dim=16"),
        ({}, {"ch_mult": [1, 1, 1, 1]}, "downsamples by 8"),
        ({"patch_size": 2}, None, "patch_size=2"),
        ({"dim": -64}, None, "dim must be a positive integer"),
    ],
)
def test_invalid_configs_name_the_problem(changes, vae_changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_json_dict(bad(changes, vae_changes), "x.json")


def test_missing_keys_and_bad_class(tmp_path):
    raw = fixture_config("tiny_4x")
    del raw["constructor_args"]["dim"]
    with pytest.raises(ConfigError, match="lacks dim"):
        ModelConfig.from_json_dict(raw, "x.json")
    with pytest.raises(ConfigError, match="model_class"):
        ModelConfig.from_json_dict({"model_class": "x.py:Y", "constructor_args": {}}, "x.json")
    with pytest.raises(ConfigError, match="unknown model 'BitDance-Q'"):
        load_config("BitDance-Q")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_config(tmp_path / "broken.json")
