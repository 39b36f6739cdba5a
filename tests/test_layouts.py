"""Every text-to-image checkpoint layout, detected from the path, read by one loader
(bitdance_rt/t2i/layouts.py): the tiny checkpoint of t2i_tiny.py in the official layout, converted
to the community diffusers layout by transformers' / diffusers' own save_pretrained (t2i_layouts.py),
and written as the ComfyUI node's three FP8 files. The same weights give the same state dict and the
same tokens, bit for bit, through the Pipeline and the CLI, on torch and once on ONNX Runtime; FP8
files dequantise to their FP8-rounded weights; an incomplete layout names the missing file."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from conftest import torch_threads  # noqa: E402
from t2i_layouts import write_comfyui, write_diffusers, write_official  # noqa: E402
from t2i_tiny import write_checkpoint  # noqa: E402

from bitdance_rt.errors import BitDanceError  # noqa: E402
from bitdance_rt.t2i.layouts import detect_layout, is_t2i_checkpoint  # noqa: E402
from bitdance_rt.t2i.loading import checkpoint_dir_source, load_t2i  # noqa: E402

TEXT = 48  # max_text_tokens
SIZE = {"height": 512, "width": 512, "max_text_tokens": TEXT}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Official 16x / 64x checkpoints and their diffusers conversions (64x with sharded components)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for p, shard in ((16, None), (64, "200KB")):
        official = write_checkpoint(root / f"official{p}", parallel_num=p)
        out[p] = {"official": official, "diffusers": write_diffusers(official, root / f"diffusers{p}", shard)}
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def no_decode(monkeypatch):
    """Tokens are what is compared; the image is the autoencoder's function of them, and the
    autoencoder weights are compared tensor for tensor. Skipping the torch decode (1.5 s an image
    here) keeps this file short; the CLI test decodes and writes its PNG."""
    from bitdance_rt.models.t2i import BitDanceT2I

    def decode(self, latent):
        s = self.cfg.down_size
        return torch.zeros(latent.shape[0], 3, latent.shape[2] * s, latent.shape[3] * s)

    monkeypatch.setattr(BitDanceT2I, "decode", decode)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Tokens of the official layout on torch, per (parallel_num, cfg), computed once."""
    cache = {}

    def get(p, cfg):
        if (p, cfg) not in cache:
            cache[(p, cfg)] = _tokens(ckpt[p]["official"], (cfg,))[0]
        return cache[(p, cfg)]

    return get


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _tokens(checkpoint, cfgs=(4.0,), backend: str = "torch", seed: int = 3, steps: int = 1) -> list[torch.Tensor]:
    """Tokens of "a red cat" at each guidance scale in `cfgs` (1.0: unguided), from one Pipeline."""
    from bitdance_rt import Pipeline

    with (
        torch_threads(1),
        Pipeline.from_pretrained(
            checkpoint=checkpoint, backend=backend, steps=steps, threads=1, progress=False, **SIZE
        ) as pipe,
    ):
        return [pipe.generate(prompt="a red cat", cfg=cfg, seed=seed).tokens for cfg in cfgs]


def test_diffusers_layout_is_detected_and_gives_the_official_state_dict(ckpt):
    for p, c in ckpt.items():
        d = c["diffusers"]
        assert (d / "model_index.json").is_file() and (d / "text_encoder" / "config.json").is_file()
        assert detect_layout(d).kind == "diffusers" and detect_layout(c["official"]).kind == "official"
        sharded = any(f.name.startswith("diffusion_pytorch_model-0000") for f in (d / "diffusion_head").iterdir())
        assert sharded == (p == 64)
        official, converted = (load_t2i(x, 512, 512, max_text_tokens=TEXT) for x in (c["official"], d))
        for field in ("llm", "head", "vae", "height", "width", "max_text_tokens"):
            assert getattr(official.model.cfg, field) == getattr(converted.model.cfg, field), field
        _assert_same_state(official.model.state_dict(), converted.model.state_dict())
        cond = official.prompts.encode(["a red cat"]).rows(True)
        assert all(torch.equal(v, converted.prompts.encode(["a red cat"]).rows(True)[k]) for k, v in cond.items())


@pytest.mark.parametrize("p", [16, 64])
def test_same_tokens_from_official_and_diffusers_on_torch(ckpt, reference, no_decode, p):
    cfgs = (4.0, 1.0)  # guided, unguided
    for cfg, got in zip(cfgs, _tokens(ckpt[p]["diffusers"], cfgs)):
        assert torch.equal(got, reference(p, cfg)), f"{p}x cfg {cfg}"


def test_cli_generate_from_a_diffusers_directory(ckpt, reference, tmp_path):
    from safetensors.torch import load_file

    from bitdance_rt.cli import main

    out = tmp_path / "tokens.safetensors"
    with torch_threads(1):
        assert (
            main(
                [
                    "generate",
                    "--prompt",
                    "a red cat",
                    "--checkpoint",
                    str(ckpt[64]["diffusers"]),
                    "--height",
                    "512",
                    "--width",
                    "512",
                    "--max-text-tokens",
                    str(TEXT),
                    "--steps",
                    "1",
                    "--seed",
                    "3",
                    "--cfg",
                    "4",
                    "--quiet",
                    "--threads",
                    "1",
                    "--backend",
                    "torch",
                    "--out",
                    str(tmp_path / "png"),
                    "--save-tokens",
                    str(out),
                ]
            )
            == 0
        )
    assert (tmp_path / "png" / "000.png").is_file()
    assert torch.equal(load_file(str(out))["tokens"], reference(64, 4.0))


def test_onnxruntime_export_of_the_diffusers_layout_gives_the_official_torch_tokens(ckpt, no_decode):
    """One export: the diffusers weights through ONNX Runtime against the official layout on torch
    (seed 21: the reference stays 2.2e-4 from any sign flip, see test_t2i.test_cli_generate_prompt)."""
    from bitdance_rt.backends import resolve_model

    d = ckpt[64]["diffusers"]
    source = resolve_model(None, str(d), None, 512, 512, TEXT)
    assert source.t2i and source.weights_source() == checkpoint_dir_source(d)
    assert source.weights_source().startswith("t2i-diffusers sha256:")
    (ref,) = _tokens(ckpt[64]["official"], (7.5,), seed=21, steps=2)
    (got,) = _tokens(d, (7.5,), backend="onnxruntime", seed=21, steps=2)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("scaled", [True, False])
def test_comfyui_fp8_files_dequantise_to_the_fp8_rounded_weights(ckpt, tmp_path, capsys, no_decode, scaled):
    src = ckpt[64]["official"]
    if scaled:  # a ComfyUI models/ tree, entered through the main-model file; another model's text encoder beside
        written = write_comfyui(src, tmp_path / "models", folders=("diffusion_models", "text_encoders", "vae"))
        from safetensors.torch import save_file

        other = {"model.embed_tokens.weight": torch.zeros(4, 8), "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8)}
        save_file(other, str(tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors"))
        entry = written["paths"]["main"]
    else:  # the three files in one directory, cast to FP8 without scales
        written = write_comfyui(src, tmp_path / "flat", scaled=False)
        entry = tmp_path / "flat"
    layout = detect_layout(entry)
    assert layout.kind == "comfyui" and layout.files == written["paths"]
    assert is_t2i_checkpoint(written["paths"]["main"]) and not is_t2i_checkpoint(written["paths"]["vae"])
    capsys.readouterr()
    loaded = load_t2i(entry, 512, 512, max_text_tokens=TEXT)
    warning = capsys.readouterr().err
    if scaled:
        assert warning == ""
    else:
        assert warning.count("\n") == 1 and "have no scale tensors: cast to float without scales" in warning
    official = load_t2i(src, 512, 512, max_text_tokens=TEXT).model.cfg
    for field in ("llm", "head", "vae"):  # from the tensor shapes and the node's 64x defaults
        assert getattr(loaded.model.cfg, field) == getattr(official, field), field
    _assert_same_state(loaded.model.state_dict(), written["expected"])
    if scaled:  # the same (FP8-rounded) weights in the official layout: the same tokens
        same = write_official(src, tmp_path / "official_fp8", written["expected"])
        assert torch.equal(_tokens(entry)[0], _tokens(same)[0])


def test_comfyui_head_config_beside_the_main_model_overrides_the_64x_default(ckpt, tmp_path):
    """The files hold no parallel_num: 64 (the node's default) unless a vision_head_config.json says
    otherwise, as for a 16x model; the sidecar is then part of the weight identity."""
    src = ckpt[16]["official"]
    written = write_comfyui(src, tmp_path / "comfy16")
    assert detect_layout(tmp_path / "comfy16").config(512, 512, TEXT).parallel_num == 64
    without = checkpoint_dir_source(tmp_path / "comfy16")
    shutil.copy(src / "vision_head_config.json", written["paths"]["main"].parent / "vision_head_config.json")
    layout = detect_layout(written["paths"]["main"])
    official = load_t2i(src, 512, 512, max_text_tokens=TEXT).model.cfg
    cfg = layout.config(512, 512, TEXT)
    assert (cfg.llm, cfg.head, cfg.vae) == (official.llm, official.head, official.vae) and cfg.parallel_num == 16
    assert "main/vision_head_config.json" in {n for n, _ in layout.identity_files()}
    assert checkpoint_dir_source(tmp_path / "comfy16") != without


def test_weight_identity_covers_the_files_of_the_layout(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "diffusers"
    shutil.copytree(ckpt[16]["diffusers"], d)
    before = checkpoint_dir_source(d)
    assert before == checkpoint_dir_source(ckpt[16]["diffusers"]) != checkpoint_dir_source(ckpt[16]["official"])
    proj = d / "projector" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(proj))
    save_file({k: v + 1 for k, v in sd.items()}, str(proj))
    after = checkpoint_dir_source(d)
    assert after != before
    (d / "tokenizer" / "tokenizer.json").write_text((d / "tokenizer" / "tokenizer.json").read_text() + " ")
    assert checkpoint_dir_source(d) != after
    written = write_comfyui(ckpt[64]["official"], tmp_path / "comfy")
    names = {n for n, _ in detect_layout(tmp_path / "comfy").identity_files()}
    assert names == {
        "main/BitDance_14B_MainModel_FP8.safetensors",
        "text_encoder/BitDance_TextEncoder_FP8.safetensors",
        "vae/BitDance_VAE_FP16.safetensors",
        "tokenizer.json",
    }
    first = checkpoint_dir_source(tmp_path / "comfy")
    written["paths"]["vae"].write_bytes(written["paths"]["vae"].read_bytes())  # same bytes: same identity
    assert checkpoint_dir_source(tmp_path / "comfy") == first


def test_incomplete_layouts_name_the_missing_file(ckpt, tmp_path, capsys):
    from bitdance_rt.cli import main

    def broken(name, src, *remove):
        d = tmp_path / name
        shutil.copytree(src, d)
        for r in remove:
            (d / r).unlink()
        return d

    def check(path, message):
        with pytest.raises(BitDanceError, match=message) as err:
            load_t2i(path, 512, 512, max_text_tokens=TEXT)
        assert "\n" not in str(err.value)

    def shard(component, stem):  # the last shard of a sharded component of the 64x conversion
        return sorted(p.name for p in (ckpt[64]["diffusers"] / component).glob(f"{stem}-*-of-*.safetensors"))[-1]

    llm_shard, head_shard = shard("text_encoder", "model"), shard("diffusion_head", "diffusion_pytorch_model")
    cases = [
        (
            broken("no_head", ckpt[16]["diffusers"], "diffusion_head/diffusion_pytorch_model.safetensors"),
            r"no_head/diffusion_head: no vision head weights: expected diffusion_pytorch_model.safetensors.index.json "
            r"\(sharded\) or diffusion_pytorch_model.safetensors",
        ),
        (
            broken("no_shard", ckpt[64]["diffusers"], f"text_encoder/{llm_shard}"),
            rf"LLM weight shard \(listed in model.safetensors.index.json\) not found: "
            rf".*no_shard/text_encoder/{llm_shard}",
        ),
        (
            broken("no_head_shard", ckpt[64]["diffusers"], f"diffusion_head/{head_shard}"),
            rf"vision head weight shard \(listed in diffusion_pytorch_model.safetensors.index.json\) not found: "
            rf".*no_head_shard/diffusion_head/{head_shard}",
        ),
        (
            broken("no_tok", ckpt[16]["diffusers"], "tokenizer/tokenizer.json"),
            r"tokenizer file not found: .*no_tok/tokenizer/tokenizer.json",
        ),
        (
            broken("no_cfg", ckpt[16]["diffusers"], "autoencoder/config.json"),
            r"autoencoder config not found: .*no_cfg/autoencoder/config.json",
        ),
    ]
    written = write_comfyui(ckpt[64]["official"], tmp_path / "comfy_no_vae")
    written["paths"]["vae"].unlink()
    cases.append((tmp_path / "comfy_no_vae", r"comfy_no_vae: no VAE \(autoencoder\) file found"))
    for path, message in cases:
        check(path, message)
    written = write_comfyui(ckpt[64]["official"], tmp_path / "comfy_tree", folders=("diffusion_models", "te", "vae"))
    check(
        written["paths"]["main"],
        r"main model .*: no text encoder \(Qwen3\) file found \(looked in .*"
        r"comfy_tree/diffusion_models, .*comfy_tree/text_encoders",
    )
    shutil.move(tmp_path / "comfy_tree" / "te", tmp_path / "comfy_tree" / "text_encoders")
    shutil.rmtree(tmp_path / "comfy_tree" / "text_encoders" / "tokenizer")
    check(
        written["paths"]["main"],
        r"tokenizer not found for ComfyUI text encoder .*: put the BitDance tokenizer .* "
        r"at .*comfy_tree/text_encoders/tokenizer/tokenizer.json",
    )
    path, message = cases[0]
    assert (
        main(
            [
                "generate",
                "--prompt",
                "a cat",
                "--checkpoint",
                str(path),
                "--height",
                "512",
                "--width",
                "512",
                "--backend",
                "torch",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no vision head weights" in err


def test_single_file_imagenet_checkpoints_are_not_text_to_image(tmp_path):
    from bitdance_rt.backends import resolve_model
    from bitdance_rt.config import EMBEDDED_WEIGHTS

    assert not is_t2i_checkpoint(EMBEDDED_WEIGHTS) and not is_t2i_checkpoint(None)
    source = resolve_model("tiny-digits", str(EMBEDDED_WEIGHTS), None, None, None, None)
    assert not source.t2i
