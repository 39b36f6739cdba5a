"""The ComfyUI layout: the three files of the node github.com/aistudynow/Comfyui-bitdance (nodes.py).

The main model (vision head + projector, FP8), the text encoder (Qwen3, FP8) and the VAE (FP16), e.g.
BitDance_14B_MainModel_FP8.safetensors, BitDance_TextEncoder_FP8.safetensors, BitDance_VAE_FP16.safetensors.
Point --checkpoint at a directory holding the three (`comfy_in_dir`), or at the main-model file
(`comfy_from_file`: the other two are looked for beside it, then where ComfyUI keeps them). Files
are told apart by their keys, as the node does (`comfy_role`), and FP8 tensors are dequantised with
the scales the node looks for (the comment at COMFY_SCALE_SUFFIXES). Configs: ComfyUILayout's
docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, HeadConfig, Qwen3Config, check_resolution, vae_from_ddconfig
from .layout_base import COMFYUI, SKIPPED_PREFIXES, Layout, _autoencoder, _without_diffusers_keys, read_json
from .safetensors_header import WeightFile, read_header

# ComfyUI files: key prefixes per part (nodes.py _split_main_model_state_dict, text/VAE loaders)
COMFY_HEAD_PREFIXES = ("diffusion_head.", "model.diffusion_head.", "main_model.diffusion_head.", "vision_head.")
COMFY_PROJECTOR_PREFIXES = ("projector.", "model.projector.", "main_model.projector.")
COMFY_TEXT_PREFIXES = ("text_encoder.", "model.text_encoder.")
COMFY_VAE_PREFIXES = ("autoencoder.", "vae.", "model.autoencoder.")
# FP8 tensors (float8_e4m3fn / e5m2) are dequantised as q * scale with the scale the node looks for
# (<key>.scale, <name>.weight_scale, .scale_weight, .weight_scales, <key>_scale; one per tensor or per
# output channel: safetensors_header.scale_candidates, loading.py); FP8 tensors without one are cast as
# stored, with one warning line. Activation scales (.input_scale), .comfy_quant and scaled_fp8 entries
# are ignored. None of these keys is a weight of the model (`_comfy_skipped`).
COMFY_SCALE_SUFFIXES = (".weight.scale", ".weight_scale", ".scale_weight", ".weight_scales", ".input_scale")
COMFY_AUX = (".comfy_quant",)
COMFY_ROLES = {
    "main": "main model (vision head + projector)",
    "text_encoder": "text encoder (Qwen3)",
    "vae": "VAE (autoencoder)",
}
# where ComfyUI keeps each file (its models/ folder names the node reads), beside the main-model folder
COMFY_FOLDERS = {
    "text_encoder": ("text_encoders", "clip", "checkpoints", "text_encoder"),
    "vae": ("vae", "checkpoints"),
}
# what tensor shapes cannot tell: the node's BitDance-14B-64x defaults (local_model.py DEFAULT_* configs)
COMFY_DEFAULTS = {"parallel_num": 64, "time_shift": 1.0, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}


def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p) :]
    return None


def _comfy_skipped(key: str) -> bool:
    return key.endswith(COMFY_SCALE_SUFFIXES + COMFY_AUX) or key == "scaled_fp8" or key.endswith("_scale")


def _comfy_renames(role: str, header: dict) -> dict:
    """part -> rename(key) for one ComfyUI file, following the node's key conventions."""
    keys = [k for k in header if not _comfy_skipped(k)]

    def under(prefixes, bare):
        prefixed = any(_strip(k, prefixes) is not None for k in keys)

        def rename(key):
            if _comfy_skipped(key):
                return None
            if prefixed:
                return _strip(key, prefixes)
            return key if bare(key) else None

        return rename

    if role == "main":
        return {
            "head.": under(COMFY_HEAD_PREFIXES, lambda k: k.startswith("net.")),
            "projector.": under(COMFY_PROJECTOR_PREFIXES, lambda k: k.startswith(("fc1.", "fc2."))),
        }
    if role == "vae":
        return {"vae.": under(COMFY_VAE_PREFIXES, lambda k: True)}
    text = under(COMFY_TEXT_PREFIXES, lambda k: True)

    def llm(key):
        key = text(key)
        if key is None or key.startswith(SKIPPED_PREFIXES):
            return None
        if key.startswith("model."):
            return key[len("model.") :]
        return key if key.startswith(("embed_tokens.", "layers.", "norm.")) else None  # the node ignores others

    return {"model.": llm}


def _mapped_keys(role: str, header: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """part -> {key in the part's module: shape} of one ComfyUI file."""
    out = {}
    for part, rename in _comfy_renames(role, header).items():
        out[part] = {dst: header[k][1] for k in header if (dst := rename(k)) is not None}
    return out


def comfy_role(header: dict) -> str | None:
    """Which of the node's three files a header is: 'main', 'text_encoder', 'vae', or None.

    Told apart by their keys, as the node does: main model = vision head (net.*, or under
    diffusion_head. / vision_head. / model.diffusion_head. / main_model.diffusion_head.) + projector
    (fc1.* / fc2.*, or under projector. / model.projector. / main_model.projector.); text encoder =
    Qwen3ForCausalLM keys (optionally under text_encoder. / model.text_encoder.; lm_head is skipped);
    VAE = encoder.* + decoder.* (optionally under autoencoder. / vae. / model.autoencoder.)."""
    main = _mapped_keys("main", header)
    if "net.input_proj.weight" in main["head."] and "fc1.weight" in main["projector."]:
        return "main"
    llm = _mapped_keys("text_encoder", header)["model."]
    if "embed_tokens.weight" in llm and any(k.startswith("layers.") for k in llm):
        return "text_encoder"
    vae = _mapped_keys("vae", header)["vae."]
    if "encoder.conv_in.weight" in vae and "decoder.conv_in.weight" in vae:
        return "vae"
    return None


def _role_of(path: Path) -> str | None:
    try:
        return comfy_role(read_header(path))
    except CheckpointError:
        return None


def _count(keys, prefix: str) -> int:
    """How many numbered children `prefix<i>.` the keys have (max index + 1)."""
    heads = (k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix))
    idx = {int(h) for h in heads if h.isdigit()}
    return max(idx) + 1 if idx else 0


class ComfyUILayout(Layout):
    """The files hold no configs: tensor shapes give the architecture; what shapes cannot tell takes
    the node's BitDance-14B-64x defaults (parallel_num 64, time_shift 1.0, rope_theta 1e6,
    rms_norm_eps 1e-6). A vision_head_config.json beside the main-model file overrides the head's
    (e.g. for a 16x model); a config.json with "ddconfig" beside the VAE file, the autoencoder's (the
    node's convention). The tokenizer is tokenizer/tokenizer.json beside the text encoder file or one
    folder up, or a tokenizer.json beside it (where the node looks before its bundled copy; copy the
    node's tokenizer/ folder there if needed)."""

    kind, identity_prefix = COMFYUI, "t2i-comfyui"

    def __init__(self, path: Path, files: dict[str, Path]):
        super().__init__(path)
        self.files = files
        self._headers = {role: read_header(p) for role, p in files.items()}
        self.keys = {role: _mapped_keys(role, h) for role, h in self._headers.items()}

    # sidecar configs (the node's conventions, plus vision_head_config.json for a non-64x head)
    @property
    def _head_config(self) -> Path:
        return self.files["main"].parent / "vision_head_config.json"

    @property
    def _vae_config(self) -> Path | None:
        p = self.files["vae"].parent / "config.json"
        try:
            return p if p.is_file() and "ddconfig" in json.loads(p.read_text()) else None
        except (OSError, ValueError, TypeError):
            return None

    @property
    def tokenizer(self) -> Path:
        te = self.files["text_encoder"]
        options = [
            te.parent / "tokenizer" / "tokenizer.json",
            te.parent.parent / "tokenizer" / "tokenizer.json",
            te.parent / "tokenizer.json",
        ]
        found = next((p for p in options if p.is_file()), None)
        if found is None:
            raise CheckpointError(
                f"tokenizer not found for ComfyUI text encoder {te}: put the BitDance tokenizer "
                f"(the node's tokenizer/ folder) at {options[0]}"
            )
        return found

    def _need(self, role: str, part: str, key: str) -> tuple[int, ...]:
        shape = self.keys[role][part].get(key)
        if shape is None:
            raise CheckpointError(f"{self.files[role]}: lacks {key} (a BitDance {COMFY_ROLES[role]} has it)")
        return shape

    def config(self, height, width, max_text_tokens=DEFAULT_MAX_TEXT_TOKENS):
        check_resolution(height, width)

        # Qwen3 backbone: widths from the shapes, RoPE / norm constants the 14B model's
        def llm_shape(key):
            return self._need("text_encoder", "model.", key)

        vocab, hidden = llm_shape("embed_tokens.weight")
        head_dim = llm_shape("layers.0.self_attn.q_norm.weight")[0]
        llm = Qwen3Config(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=_count(self.keys["text_encoder"]["model."], "layers."),
            num_attention_heads=llm_shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
            num_key_value_heads=llm_shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
            head_dim=head_dim,
            intermediate_size=llm_shape("layers.0.mlp.gate_proj.weight")[0],
            rope_theta=COMFY_DEFAULTS["rope_theta"],
            rms_norm_eps=COMFY_DEFAULTS["rms_norm_eps"],
        )
        if self._head_config.is_file():
            args = _without_diffusers_keys(read_json(self._head_config, "vision head config"))
            head = HeadConfig.from_json_dict(args, str(self._head_config))
        else:
            head_keys = self.keys["main"]["head."]
            latent, target = self._need("main", "head.", "net.input_proj.weight")
            head = HeadConfig(
                ch_target=target,
                ch_cond=self._need("main", "head.", "net.cond_embed.weight")[1],
                ch_latent=latent,
                depth_latent=_count(head_keys, "net.res_blocks."),
                depth_adanln=_count(head_keys, "net.ada_ln_blocks."),
                parallel_num=COMFY_DEFAULTS["parallel_num"],
                use_swiglu="net.res_blocks.0.w1.weight" in head_keys,
                time_shift=COMFY_DEFAULTS["time_shift"],
            )
        cfg_file = self._vae_config
        if cfg_file is not None:
            vae = _autoencoder(cfg_file)
        else:
            vae_keys = self.keys["vae"]["vae."]
            ch, in_channels = self._need("vae", "vae.", "encoder.conv_in.weight")[:2]
            levels = _count(vae_keys, "encoder.down.")
            ch_mult = [
                self._need("vae", "vae.", f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)
            ]
            vae = vae_from_ddconfig(
                {
                    "ch": ch,
                    "ch_mult": ch_mult,
                    "num_res_blocks": _count(vae_keys, "encoder.down.0.block."),
                    "z_channels": self._need("vae", "vae.", "encoder.conv_out.weight")[0],
                    "in_channels": in_channels,
                    "out_ch": self._need("vae", "vae.", "decoder.conv_out.weight")[0],
                },
                str(self.files["vae"]),
            )
        return self._t2i(llm, head, vae, height, width, max_text_tokens)

    def weight_files(self):
        plan = []
        for role in ("text_encoder", "main", "vae"):
            path, header = self.files[role], self._headers[role]
            for part, rename in _comfy_renames(role, header).items():
                plan.append(WeightFile.mapped(path, f"{role}/{path.name}", part, header, rename, fp8=True))
        return plan

    def identity_files(self):
        files = [(f"{role}/{p.name}", p) for role, p in self.files.items()]
        files.append(("tokenizer.json", self.tokenizer))
        files += [
            (f"{role}/{p.name}", p)
            for role, p in (("main", self._head_config), ("vae", self._vae_config))
            if p is not None and p.is_file()
        ]
        return files


def _safetensors_in(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors" and p.is_file())
    except OSError:
        return []


def _pick(candidates: list[Path], role: str, where: str) -> Path:
    if len(candidates) > 1:  # e.g. other models' text encoders in a shared ComfyUI folder
        named = [p for p in candidates if "bitdance" in p.name.lower()]
        candidates = named if len(named) == 1 else candidates
    if len(candidates) > 1:
        raise CheckpointError(
            f"{where}: {len(candidates)} BitDance {COMFY_ROLES[role]} files "
            f"({', '.join(p.name for p in candidates)}): keep one, or point at a directory holding "
            "just the three files"
        )
    return candidates[0]


def comfy_in_dir(directory: Path) -> ComfyUILayout | None:
    """The ComfyUI layout of a directory holding the node's three files (None when it holds no main model)."""
    roles: dict[str, list[Path]] = {}
    for p in _safetensors_in(directory):
        role = _role_of(p)
        if role is not None:
            roles.setdefault(role, []).append(p)
    if "main" not in roles:
        return None
    missing = [r for r in COMFY_ROLES if r not in roles]
    if missing:
        raise CheckpointError(
            f"ComfyUI BitDance files in {directory}: no {COMFY_ROLES[missing[0]]} file found "
            "(a .safetensors with its keys beside the main model)"
        )
    return ComfyUILayout(directory, {r: _pick(roles[r], r, str(directory)) for r in COMFY_ROLES})


def comfy_from_file(path: Path) -> ComfyUILayout | None:
    """The ComfyUI layout of the node's main-model file, its text encoder and VAE found beside it or
    in ComfyUI's folders for them (COMFY_FOLDERS, beside the main model's folder: ../text_encoders,
    ../clip, ../checkpoints, ../text_encoder; ../vae, ../checkpoints), None when `path` is no
    BitDance main-model file."""
    if path.suffix != ".safetensors" or _role_of(path) != "main":
        return None
    files = {"main": path}
    for role in ("text_encoder", "vae"):
        tiers = [[path.parent], [path.parent.parent / f for f in COMFY_FOLDERS[role]]]
        for dirs in tiers:
            found = [p for d in dirs if d.is_dir() for p in _safetensors_in(d) if p != path and _role_of(p) == role]
            if found:
                files[role] = _pick(found, role, ", ".join(str(d) for d in dirs))
                break
        else:
            looked = [str(path.parent)] + [str(path.parent.parent / f) for f in COMFY_FOLDERS[role]]
            raise CheckpointError(
                f"ComfyUI BitDance main model {path}: no {COMFY_ROLES[role]} file found (looked in {', '.join(looked)})"
            )
    return ComfyUILayout(path, files)
