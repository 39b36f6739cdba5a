"""A tiny official-layout text-to-image checkpoint directory, built in the test run.

Random Qwen3-architecture weights (HF key names, sharded with model.safetensors.index.json),
a byte-level BPE tokenizer.json without merges (so every byte is one token and expected ids
can be written by hand) plus the chat and BitDance special tokens, the vision head / projector /
autoencoder files and their JSON configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN = 64
LLM_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
}
AE_CONFIG = {
    "ddconfig": {
        "double_z": False,
        "z_channels": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1, 1, 1],
        "num_res_blocks": 1,
    }
}
RES_TOKENS = list(range(8, 129, 8))
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>"]


def head_config(parallel_num: int, hidden: int = HIDDEN, ch_latent: int = 128, depth: int = 2) -> dict:
    return {
        "ch_target": 32,
        "ch_cond": hidden,
        "ch_latent": ch_latent,
        "depth_latent": depth,
        "depth_adanln": 1,
        "grad_checkpointing": False,
        "time_shift": 1.0,
        "time_schedule": "logit_normal",
        "P_mean": -0.8,
        "P_std": 0.8,
        "parallel_num": parallel_num,
        "diff_batch_mul": 1,
        "use_swiglu": True,
    }


def special_tokens() -> list[str]:
    return CHAT_TOKENS + [f"<|res_{n}|>" for n in RES_TOKENS] + [f"<|query_{i}|>" for i in range(1, 64)]


def byte_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def write_tokenizer(path: Path, specials: list[str] | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=byte_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(special_tokens() if specials is None else specials)
    tok.save(str(path))


def _randomize(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if v.dim() >= 2:
            w = torch.randn(v.shape, generator=gen) / v[0].numel() ** 0.5
        elif "norm" in k and k.endswith("weight"):
            w = 1.0 + 0.1 * torch.randn(v.shape, generator=gen)
        else:
            w = 0.1 * torch.randn(v.shape, generator=gen)
        out[k] = w.contiguous()
    return out


def write_checkpoint(
    directory: Path,
    parallel_num: int = 16,
    seed: int = 0,
    shards: int = 2,
    llm: dict | None = None,
    head: dict | None = None,
) -> Path:
    """The official file layout in `directory` (random float32 weights; bf16 for the LLM).

    `llm` overrides LLM_CONFIG fields (e.g. Qwen3-14B's widths with a few layers), `head` the vision
    head's ch_latent / depth."""
    from safetensors.torch import save_file

    from bitdance_rt.config import VAEConfig
    from bitdance_rt.models.heads import DiffusionHead, TransformerHead
    from bitdance_rt.models.qwen3 import Qwen3Model
    from bitdance_rt.models.t2i import Projector
    from bitdance_rt.models.tokenizer import BinaryAutoencoder
    from bitdance_rt.t2i.config import Qwen3Config

    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = len(byte_vocab()) + len(special_tokens()) + 4
    llm_cfg = {**LLM_CONFIG, "vocab_size": vocab_size, **(llm or {})}  # (llm may set the real vocabulary)
    vocab_size = llm_cfg["vocab_size"]
    hidden = llm_cfg["hidden_size"]
    (directory / "config.json").write_text(json.dumps(llm_cfg))
    (directory / "ae_config.json").write_text(json.dumps(AE_CONFIG))
    h = head_config(parallel_num, hidden, **(head or {}))
    (directory / "vision_head_config.json").write_text(json.dumps(h))
    write_tokenizer(directory / "tokenizer.json")

    llm = _randomize(Qwen3Model(Qwen3Config.from_json_dict(llm_cfg, "test")), seed)
    llm = {f"model.{k}": v.to(torch.bfloat16) for k, v in llm.items()}
    llm["lm_head.weight"] = torch.zeros(vocab_size, hidden, dtype=torch.bfloat16)
    keys = sorted(llm)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: llm[k] for k in part}, str(directory / name))
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    net = DiffusionHead(TransformerHead(32, h["ch_latent"], hidden, h["depth_latent"], 1, variant="t2i", swiglu=True))
    save_file(_randomize(net, seed + 1), str(directory / "vision_head.safetensors"))
    save_file(_randomize(Projector(32, hidden), seed + 2), str(directory / "projector.safetensors"))
    dd = AE_CONFIG["ddconfig"]
    vae = BinaryAutoencoder(VAEConfig(ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]), num_res_blocks=1, z_channels=32))
    save_file(_randomize(vae, seed + 3), str(directory / "ae.safetensors"))
    return directory
