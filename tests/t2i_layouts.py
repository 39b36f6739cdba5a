"""The tiny text-to-image checkpoint (t2i_tiny.py, official layout) rewritten in the other layouts.

diffusers: as the community port's converter does it (github.com/Bili-Sakura/BitDance,
src/bitdance_diffusers/convert.py): transformers' AutoTokenizer and Qwen3ForCausalLM.from_pretrained
read the official directory, the vision head / projector / autoencoder are diffusers ModelMixin
modules with the port's class names and constructor arguments that load the official files
strictly (so they hold the official key names), and DiffusionPipeline.save_pretrained writes it all.
The modules inside are bitdance_rt's own (same parameter names as the official ones).

ComfyUI: the node's three files (github.com/aistudynow/Comfyui-bitdance nodes.py): the main model
(vision head under diffusion_head., projector under projector.; float8_e4m3fn weights with one
.scale_weight per tensor and the scaled_fp8 marker), the text encoder (Qwen3ForCausalLM keys,
float8_e4m3fn linear weights with a .weight_scale per output channel and an ignored .input_scale),
the VAE in float16; or with `scaled=False` the weights cast to FP8 without any scale.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@lru_cache(maxsize=None)
def _diffusers_classes():
    from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin
    from diffusers.configuration_utils import register_to_config

    from bitdance_rt.config import VAEConfig
    from bitdance_rt.models.heads import TransformerHead
    from bitdance_rt.models.t2i import Projector
    from bitdance_rt.models.tokenizer import BinaryAutoencoder
    from bitdance_rt.t2i_config import SUPPORTED_SIZES

    class BitDanceAutoencoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, ddconfig: dict, gan_decoder: bool = False):
            super().__init__()
            dd = ddconfig
            vae = BinaryAutoencoder(
                VAEConfig(
                    ch=dd["ch"],
                    ch_mult=tuple(dd["ch_mult"]),
                    num_res_blocks=dd["num_res_blocks"],
                    z_channels=dd["z_channels"],
                )
            )
            self.encoder, self.decoder = vae.encoder, vae.decoder

    class BitDanceDiffusionHead(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(
            self,
            ch_target: int,
            ch_cond: int,
            ch_latent: int,
            depth_latent: int,
            depth_adanln: int,
            grad_checkpointing: bool = False,
            time_shift: float = 1.0,
            time_schedule: str = "logit_normal",
            P_mean: float = 0.0,
            P_std: float = 1.0,
            parallel_num: int = 4,
            diff_batch_mul: int = 1,
            use_swiglu: bool = False,
        ):
            super().__init__()
            self.net = TransformerHead(
                ch_target, ch_latent, ch_cond, depth_latent, depth_adanln, variant="t2i", swiglu=use_swiglu
            )

    class BitDanceProjector(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_dim: int, out_dim: int, hidden_act: str = "gelu_pytorch_tanh"):
            super().__init__()
            p = Projector(in_dim, out_dim)
            self.fc1, self.fc2 = p.fc1, p.fc2

    class BitDanceDiffusionPipeline(DiffusionPipeline):
        def __init__(self, tokenizer, text_encoder, autoencoder, diffusion_head, projector, supported_image_sizes=None):
            super().__init__()
            self.register_modules(
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                autoencoder=autoencoder,
                diffusion_head=diffusion_head,
                projector=projector,
            )
            self.register_to_config(supported_image_sizes=[list(s) for s in supported_image_sizes or SUPPORTED_SIZES])

    return BitDanceAutoencoder, BitDanceDiffusionHead, BitDanceProjector, BitDanceDiffusionPipeline


def write_diffusers(src: Path, out: Path, max_shard_size: str | None = None) -> Path:
    """`src` (official layout) converted as the port's convert.py does (bfloat16 text encoder)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    autoencoder_cls, head_cls, projector_cls, pipeline_cls = _diffusers_classes()
    tokenizer = AutoTokenizer.from_pretrained(src)
    text_encoder = Qwen3ForCausalLM.from_pretrained(src).to(torch.bfloat16).eval()  # convert.py's default dtype
    ae_config = json.loads((src / "ae_config.json").read_text())
    autoencoder = autoencoder_cls(
        ddconfig=ae_config.get("ddconfig", ae_config), gan_decoder=bool(ae_config.get("gan_decoder", False))
    ).eval()
    autoencoder.load_state_dict(load_file(str(src / "ae.safetensors")), strict=True, assign=True)
    head = head_cls(**json.loads((src / "vision_head_config.json").read_text())).eval()
    head.load_state_dict(load_file(str(src / "vision_head.safetensors")), strict=True, assign=True)
    projector = projector_cls(
        in_dim=int(ae_config["ddconfig"]["z_channels"]), out_dim=int(text_encoder.config.hidden_size)
    ).eval()
    projector.load_state_dict(load_file(str(src / "projector.safetensors")), strict=True, assign=True)
    pipe = pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        autoencoder=autoencoder,
        diffusion_head=head,
        projector=projector,
    )
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    return out


# ---- ComfyUI --------------------------------------------------------------------------------------
def _official_state(src: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{file role: state dict} of the official directory (LLM keys as Qwen3ForCausalLM has them)."""
    from safetensors.torch import load_file

    llm = {}
    for shard in sorted(src.glob("model-*.safetensors")):
        llm.update(load_file(str(shard)))
    return {
        "llm": llm,
        "head": load_file(str(src / "vision_head.safetensors")),
        "projector": load_file(str(src / "projector.safetensors")),
        "vae": load_file(str(src / "ae.safetensors")),
    }


def _fp8(w: torch.Tensor, scaled: bool, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(FP8 tensor, scale or None, what it dequantises to in float32)."""
    w = w.float()
    if not scaled:
        q = w.to(FP8)
        return q, None, q.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    s = scale[:, None] if per_channel else scale
    q = (w / s).to(FP8)
    return q, scale, q.float() * s


def write_comfyui(
    src: Path,
    out: Path,
    scaled: bool = True,
    names: tuple[str, str, str] = (
        "BitDance_14B_MainModel_FP8.safetensors",
        "BitDance_TextEncoder_FP8.safetensors",
        "BitDance_VAE_FP16.safetensors",
    ),
    folders: tuple[str, str, str] = ("", "", ""),
) -> dict:
    """The node's three files under `out` (each in its folder: e.g. diffusion_models, text_encoders,
    vae), the tokenizer at <text encoder folder>/tokenizer/tokenizer.json. Returns the paths and the
    float32 BitDanceT2I state dict the files dequantise to ("expected")."""
    from safetensors.torch import save_file

    sd = _official_state(src)
    expected = {}
    main: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=FP8)} if scaled else {}
    for part, prefix in (("head", "diffusion_head."), ("projector", "projector.")):
        for k, v in sd[part].items():
            name = {"head": "head.", "projector": "projector."}[part] + k
            if v.dim() == 2:
                q, scale, expected[name] = _fp8(v, scaled, per_channel=False)
                main[prefix + k] = q
                if scale is not None:
                    main[prefix + k[: -len(".weight")] + ".scale_weight"] = scale
            else:
                main[prefix + k] = v.to(torch.bfloat16)
                expected[name] = main[prefix + k].float()
    text: dict[str, torch.Tensor] = {}
    for k, v in sd["llm"].items():
        linear = v.dim() == 2 and "embed_tokens" not in k and not k.startswith("lm_head.")
        if linear:  # the node's FP8 text runtime quantises the Linear layers only
            q, scale, deq = _fp8(v, scaled, per_channel=True)
            text[k] = q
            if scale is not None:
                text[k[: -len(".weight")] + ".weight_scale"] = scale
                text[k[: -len(".weight")] + ".input_scale"] = torch.ones(())
        else:
            text[k] = v
            deq = v.float()
        if k.startswith("model."):
            expected["model." + k[len("model.") :]] = deq
    vae = {k: v.half() for k, v in sd["vae"].items()}
    expected.update({"vae." + k: v.float() for k, v in vae.items()})
    paths = {}
    for role, tensors, name, folder in zip(("main", "text_encoder", "vae"), (main, text, vae), names, folders):
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / name))
        paths[role] = d / name
    tok = paths["text_encoder"].parent / "tokenizer"
    tok.mkdir(exist_ok=True)
    shutil.copy(src / "tokenizer.json", tok / "tokenizer.json")
    return {"paths": paths, "expected": expected}


def write_official(src: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    """An official-layout directory with `src`'s configs and tokenizer and the BitDanceT2I state dict
    `state` (float32, one LLM file)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "ae_config.json", "vision_head_config.json"):
        shutil.copy(src / name, out / name)
    parts = {
        "model.": ("model.safetensors", "model."),
        "head.": ("vision_head.safetensors", ""),
        "projector.": ("projector.safetensors", ""),
        "vae.": ("ae.safetensors", ""),
    }
    for prefix, (name, key_prefix) in parts.items():
        save_file(
            {key_prefix + k[len(prefix) :]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
            str(out / name),
        )
    return out
