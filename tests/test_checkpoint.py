"""Checkpoint loading through the user path: strict fit, clear errors, safe loading, conversion."""

from __future__ import annotations

import os

import pytest
import torch

from bitdance_rt.checkpoint import fitting_presets, load_state_dict_file, save_safetensors
from bitdance_rt.config import PRESETS
from bitdance_rt.errors import CheckpointError
from bitdance_rt.loading import load_model
from bitdance_rt.models import BitDance

from conftest import fixture_dir


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny_4x", "tiny_1x"])
def test_fixture_checkpoint_loads_with_and_without_vae_file(name):
    d = fixture_dir(name)
    with_vae = load_model(d / "config.json", d / "checkpoint.pt", d / "vae.pt").model
    alone = load_model(d / "config.json", d / "checkpoint.pt").model
    assert same_weights(with_vae, alone)
    raw = torch.load(d / "checkpoint.pt", weights_only=True)["ema"]
    assert torch.equal(alone.state_dict()["norm.weight"], raw["norm.weight"])


def test_model_wrapper_key_and_flat_dicts(tmp_path):
    d = fixture_dir("tiny_4x")
    sd = torch.load(d / "checkpoint.pt", weights_only=True)["ema"]
    ref = load_model(d / "config.json", d / "checkpoint.pt").model
    torch.save({"model": sd}, tmp_path / "ddp.pt")
    torch.save(sd, tmp_path / "flat.pt")
    for f in ("ddp.pt", "flat.pt"):
        assert same_weights(load_model(d / "config.json", tmp_path / f).model, ref)


def test_checkpoint_of_another_model_names_keys_shapes_and_fitting_preset():
    d4, d1 = fixture_dir("tiny_4x"), fixture_dir("tiny_1x")
    with pytest.raises(CheckpointError) as err:
        load_model(d1 / "config.json", d4 / "checkpoint.pt")
    msg = str(err.value)
    assert "does not fit model tiny_1x" in msg
    assert "4 missing key(s): head.net.res_blocks.0.norm.weight" in msg
    assert "17 unexpected key(s): query_token" in msg
    assert "shape mismatch" in msg and "head.net.ada_ln_blocks.0.weight [384, 64] vs [192, 64]" in msg
    assert "use --model tiny-4x" in msg  # the tiny_4x fixture has the shapes of the tiny-4x preset
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="missing key.*query_token.*no built-in preset fits"):
        load_model("tiny-4x", d1 / "checkpoint.pt")


def test_fitting_presets_on_full_size_shapes():
    for name in ("BitDance-B-4x", "BitDance-H-1x"):
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in BitDance(PRESETS[name]).state_dict().items()}
        assert fitting_presets(shapes) == [name]


def test_missing_unreadable_and_truncated_files(tmp_path):
    d = fixture_dir("tiny_4x")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_model(d / "config.json", tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*(unreadable|not a PyTorch)"):
        load_model(d / "config.json", tmp_path / "junk.pt")
    data = (d / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*unreadable"):
        load_model(d / "config.json", tmp_path / "cut.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(d / "config.json", tmp_path / "junk.safetensors")


class Opaque:  # not a tensor: refused by weights_only loading
    pass


def test_pickle_needs_explicit_opt_in(tmp_path):
    d = fixture_dir("tiny_4x")
    sd = torch.load(d / "checkpoint.pt", weights_only=True)["ema"]
    torch.save({"ema": sd, "args": Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="--unsafe-allow-pickle"):
        load_model(d / "config.json", tmp_path / "pickled.pt")
    loaded = load_model(d / "config.json", tmp_path / "pickled.pt", allow_pickle=True)
    assert not loaded.random_weights


def test_vae_less_checkpoint_needs_vae_file(tmp_path):
    d = fixture_dir("tiny_4x")
    sd = torch.load(d / "checkpoint.pt", weights_only=True)["ema"]
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("vae.")}, tmp_path / "novae.safetensors")
    with pytest.raises(CheckpointError, match="no vae.* weights: pass the autoencoder with --vae"):
        load_model(d / "config.json", tmp_path / "novae.safetensors")
    model = load_model(d / "config.json", tmp_path / "novae.safetensors", d / "vae.pt").model
    assert same_weights(model, load_model(d / "config.json", d / "checkpoint.pt").model)
    bad_vae = {k: v for k, v in torch.load(d / "vae.pt", weights_only=True)["state_dict"].items()}
    bad_vae["decoder.conv_in.weight"] = bad_vae["decoder.conv_in.weight"][:, :16]
    torch.save({"state_dict": bad_vae}, tmp_path / "bad_vae.pt")
    with pytest.raises(
        CheckpointError, match=r"bad_vae.pt does not fit .*decoder.conv_in.weight \[32, 16, 3, 3\] vs \[32, 32, 3, 3\]"
    ):
        load_model(d / "config.json", tmp_path / "novae.safetensors", tmp_path / "bad_vae.pt")


def test_safetensors_round_trip_and_atomic_write(tmp_path, monkeypatch):
    d = fixture_dir("tiny_4x")
    sd = load_state_dict_file(d / "checkpoint.pt")
    out = save_safetensors(sd, tmp_path / "m.safetensors")
    back = load_state_dict_file(out)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)

    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_safetensors(sd, tmp_path / "fail.safetensors")
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no partial or temp file left
