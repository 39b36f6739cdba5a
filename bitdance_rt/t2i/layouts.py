"""Text-to-image checkpoint layouts, detected from the path; one loader (t2i/loading.py) reads them all.

Each layout maps its files, key names and configs onto what the loader builds: BitDanceT2I's state
dict (the Qwen3 backbone `model.*`, `head.*`, `projector.*`, `vae.*`), a T2IConfig, and the
tokenizer.json the prompts are encoded with. So export, backends and manifests do not know which
layout the weights came from; only the weight identity (`identity()`, for export manifests) covers
the files of the layout actually read. Weights are read tensor by tensor from memory-mapped
safetensors; headers are parsed without reading any tensor. Missing files are one CheckpointError
naming the file.

official   A directory with config.json: the BitDance-14B-16x / -64x download. config.json +
           tokenizer.json + model.safetensors (or model.safetensors.index.json and its shards),
           ae_config.json + ae.safetensors, vision_head_config.json + vision_head.safetensors,
           projector.safetensors. (ImageNet models stay single .pt / .safetensors files: loading.py.)

diffusers  A directory with model_index.json: the community port github.com/Bili-Sakura/BitDance
           (src/bitdance_diffusers, written by its convert.py through DiffusionPipeline.save_pretrained).
           text_encoder/ is a transformers Qwen3ForCausalLM (config.json, model.safetensors or
           model.safetensors.index.json + shards: the official LLM keys); tokenizer/tokenizer.json;
           autoencoder/ (config.json {"ddconfig", "gan_decoder"}), diffusion_head/ (config.json: the
           vision_head_config.json arguments) and projector/ (config.json {"in_dim", "out_dim",
           "hidden_act"}) each hold diffusion_pytorch_model.safetensors (or its .index.json + shards)
           with the keys of ae.safetensors / vision_head.safetensors / projector.safetensors, which the
           converter loads strictly. diffusers' own config entries ("_class_name", ...) are dropped.
           The port's ImageNet models are on the Hub only: no public code shows their layout, so
           they are not read here.

comfyui    The three files of the ComfyUI node github.com/aistudynow/Comfyui-bitdance (nodes.py):
           the main model (vision head + projector, FP8), the text encoder (Qwen3, FP8) and the VAE
           (FP16), e.g. BitDance_14B_MainModel_FP8.safetensors, BitDance_TextEncoder_FP8.safetensors,
           BitDance_VAE_FP16.safetensors. Point --checkpoint at a directory holding the three, or at
           the main-model file: the other two are looked for beside it, then where ComfyUI keeps them
           (../text_encoders, ../clip, ../checkpoints; ../vae). Files are told apart by their keys, as
           the node does: main model = vision head (net.*, or under diffusion_head. / vision_head. /
           model.diffusion_head. / main_model.diffusion_head.) + projector (fc1.* / fc2.*, or under
           projector. / model.projector. / main_model.projector.); text encoder = Qwen3ForCausalLM keys
           (optionally under text_encoder. / model.text_encoder.; lm_head is skipped); VAE =
           encoder.* + decoder.* (optionally under autoencoder. / vae. / model.autoencoder.).
           FP8 tensors (float8_e4m3fn / e5m2) are dequantised as q * scale with the scale the node
           looks for (<key>.scale, <name>.weight_scale, .scale_weight, .weight_scales, <key>_scale; one
           per tensor or per output channel); FP8 tensors without one are cast as stored, with one
           warning line. Activation scales (.input_scale), .comfy_quant and scaled_fp8 entries are
           ignored. The files hold no configs: tensor shapes give the architecture; what shapes cannot
           tell takes the node's BitDance-14B-64x defaults (parallel_num 64, time_shift 1.0, rope_theta
           1e6, rms_norm_eps 1e-6). A vision_head_config.json beside the main-model file overrides the
           head's (e.g. for a 16x model); a config.json with "ddconfig" beside the VAE file, the
           autoencoder's (the node's convention). The tokenizer is tokenizer/tokenizer.json beside the
           text encoder file or one folder up, or a tokenizer.json beside it (where the node looks
           before its bundled copy; copy the node's tokenizer/ folder there if needed).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..config import VAEConfig
from ..t2i_config import DEFAULT_MAX_TEXT_TOKENS, HeadConfig, Qwen3Config, T2IConfig, check_resolution, \
    vae_from_ddconfig

OFFICIAL, DIFFUSERS, COMFYUI = "official", "diffusers", "comfyui"
# part of BitDanceT2I's state dict -> what it is (messages)
PARTS = {"model.": "Qwen3 LLM", "head.": "vision head", "projector.": "projector", "vae.": "autoencoder"}

LLM_INDEX = "model.safetensors.index.json"
LLM_SINGLE = "model.safetensors"
SKIPPED_PREFIXES = ("lm_head.",)  # the LM head is not needed for images
# official file -> part of its keys
PART_FILES = {"vision_head.safetensors": "head.", "projector.safetensors": "projector.", "ae.safetensors": "vae."}

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers component folder -> part; the text encoder and tokenizer are transformers folders
DIFFUSERS_PARTS = {"diffusion_head": "head.", "projector": "projector.", "autoencoder": "vae."}
DIFFUSERS_COMPONENTS = ("text_encoder", "tokenizer", *DIFFUSERS_PARTS)

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors header names of float8_e4m3fn / float8_e5m2
# ComfyUI files: key prefixes per part (nodes.py _split_main_model_state_dict, text/VAE loaders)
COMFY_HEAD_PREFIXES = ("diffusion_head.", "model.diffusion_head.", "main_model.diffusion_head.", "vision_head.")
COMFY_PROJECTOR_PREFIXES = ("projector.", "model.projector.", "main_model.projector.")
COMFY_TEXT_PREFIXES = ("text_encoder.", "model.text_encoder.")
COMFY_VAE_PREFIXES = ("autoencoder.", "vae.", "model.autoencoder.")
COMFY_SCALE_SUFFIXES = (".weight.scale", ".weight_scale", ".scale_weight", ".weight_scales", ".input_scale")
COMFY_AUX = (".comfy_quant",)
COMFY_ROLES = {"main": "main model (vision head + projector)", "text_encoder": "text encoder (Qwen3)",
               "vae": "VAE (autoencoder)"}
# where ComfyUI keeps each file (its models/ folder names the node reads), beside the main-model folder
COMFY_FOLDERS = {"text_encoder": ("text_encoders", "clip", "checkpoints", "text_encoder"),
                 "vae": ("vae", "checkpoints")}
# what tensor shapes cannot tell: the node's BitDance-14B-64x defaults (local_model.py DEFAULT_* configs)
COMFY_DEFAULTS = {"parallel_num": 64, "time_shift": 1.0, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6}


def require_file(path: Path, what: str) -> Path:
    """checkpoint.require_file, imported when used (it imports torch; detecting a layout does not)."""
    from ..checkpoint import require_file as require

    return require(path, what)


# ---- safetensors headers ------------------------------------------------------------------------
def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a .safetensors file, from its JSON header alone (no tensor read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            meta = json.loads(fh.read(n))
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
        return {k: (str(v["dtype"]), tuple(int(s) for s in v["shape"])) for k, v in meta.items()
                if k != "__metadata__"}
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable .safetensors file ({exc})") from None


def scale_candidates(key: str) -> tuple[str, ...]:
    """Where the ComfyUI node looks for the dequantisation scale of FP8 tensor `key` (q * scale)."""
    base = key[: -len(".weight")] if key.endswith(".weight") else key
    return (f"{key}.scale", f"{base}.weight_scale", f"{base}.scale_weight", f"{base}.weight_scales", f"{key}_scale")


@dataclass
class WeightFile:
    """One weights file and the tensors it gives one part of BitDanceT2I."""

    path: Path
    name: str  # as messages and the weight identity name it
    part: str  # a PARTS key
    keys: dict[str, str] = field(default_factory=dict)  # key in the part's module -> key in the file
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key in the part's module -> shape
    scales: dict[str, str] = field(default_factory=dict)  # FP8 key in the file -> its scale's key
    unscaled: list[str] = field(default_factory=list)  # FP8 keys in the file without a scale

    @classmethod
    def mapped(cls, path: Path, name: str, part: str, header: dict, rename, fp8: bool = False) -> "WeightFile":
        """`rename(key)` gives the key in the part's module, or None to skip the tensor."""
        wf = cls(path, name, part)
        for key, (dtype, shape) in header.items():
            dst = rename(key)
            if dst is None:
                continue
            wf.keys[dst], wf.shapes[dst] = key, shape
            if fp8 and dtype in FP8_DTYPES:
                scale = next((c for c in scale_candidates(key) if c in header), None)
                if scale is None:
                    wf.unscaled.append(key)
                else:
                    wf.scales[key] = scale
        return wf


def read_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a JSON object")
    return data


def read_official_config(directory: str | Path, height: int, width: int,
                         max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> T2IConfig:
    """The T2IConfig of an official checkpoint directory (config.json, vision_head_config.json, ae_config.json)."""
    return OfficialLayout(Path(directory)).config(height, width, max_text_tokens)


def _autoencoder(path: Path) -> VAEConfig:
    """The autoencoder of an ae_config.json-like file {"ddconfig": {...}, "gan_decoder": false}."""
    ae = read_json(path, "autoencoder config")
    if ae.get("gan_decoder", False):
        raise ConfigError(f"{path}: gan_decoder=true is not supported")
    return vae_from_ddconfig(ae.get("ddconfig"), str(path))


def _without_diffusers_keys(data: dict) -> dict:
    """A diffusers config.json without diffusers' own entries (_class_name, _diffusers_version, ...)."""
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def indexed_files(directory: Path, single: str, index_name: str, what: str) -> list[tuple[Path, list[str]]]:
    """[(file, keys the index maps to it)] of one safetensors model: the shards its index names (each
    must exist), or the single file (keys: [])."""
    index = directory / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a safetensors index (expected a JSON object with "
                                  "'weight_map')") from None
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(key)
        for shard in shards:
            require_file(directory / shard, f"{what} shard (listed in {index.name})")
        return [(directory / shard, keys) for shard, keys in shards.items()]
    if (directory / single).is_file():
        return [(directory / single, [])]
    raise CheckpointError(f"{directory}: no {what}s: expected {index_name} (sharded) or {single}")


def _checked_header(path: Path, keys: list[str]) -> dict:
    header = read_header(path)
    absent = sorted(set(keys) - set(header))
    if absent:
        raise CheckpointError(f"{path}: lacks key(s) {', '.join(absent[:3])} that the index maps to it")
    return header


def _llm_key(key: str) -> str | None:
    """Qwen3ForCausalLM key -> Qwen3Model key (the backbone); None for the LM head. Other keys are kept
    as they are, so the fit check names them as unexpected."""
    if key.startswith(SKIPPED_PREFIXES):
        return None
    return key[len("model."):] if key.startswith("model.") else key


def _same(key: str) -> str:
    return key


# ---- layouts ------------------------------------------------------------------------------------
class Layout:
    """A text-to-image checkpoint: where its config, tokenizer and weights are."""

    kind = ""
    identity_prefix = ""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else (self.path.name or "bitdance-t2i")

    @property
    def tokenizer(self) -> Path:
        raise NotImplementedError

    def config(self, height: int, width: int, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS) -> T2IConfig:
        raise NotImplementedError

    def weight_files(self) -> list[WeightFile]:
        """Every weights file, LLM first; all checked to exist and be readable before any tensor is read."""
        raise NotImplementedError

    def identity_files(self) -> list[tuple[str, Path]]:
        """(name, path) of every file the model reads: configs, tokenizer, weights and their indexes."""
        raise NotImplementedError

    def identity(self) -> str:
        """Identity of the weights for export manifests: sha256 over every file the model reads (each
        file's digest memoised by (path, size, mtime) in the hash cache, fileio.cached_sha256)."""
        from ..fileio import cached_sha256

        digest = hashlib.sha256()
        for name, path in sorted(self.identity_files()):
            digest.update(f"{name}:{cached_sha256(require_file(path, name))}\n".encode())
        return f"{self.identity_prefix} sha256:{digest.hexdigest()}"

    def _t2i(self, llm, head, vae, height, width, max_text_tokens) -> T2IConfig:
        return T2IConfig(name=self.name, llm=llm, head=head, vae=vae, height=int(height), width=int(width),
                         max_text_tokens=int(max_text_tokens)).validate()


class OfficialLayout(Layout):
    kind, identity_prefix = OFFICIAL, "t2i-dir"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    def config(self, height, width, max_text_tokens=DEFAULT_MAX_TEXT_TOKENS):
        check_resolution(height, width)
        d = self.path
        llm = Qwen3Config.from_json_dict(read_json(d / "config.json", "Qwen3 LLM config"), str(d / "config.json"))
        head = HeadConfig.from_json_dict(read_json(d / "vision_head_config.json", "vision head config"),
                                         str(d / "vision_head_config.json"))
        return self._t2i(llm, head, _autoencoder(d / "ae_config.json"), height, width, max_text_tokens)

    def _llm(self):
        return indexed_files(self.path, LLM_SINGLE, LLM_INDEX, "LLM weight")

    def weight_files(self):
        plan = [WeightFile.mapped(path, path.name, "model.", _checked_header(path, keys), _llm_key)
                for path, keys in self._llm()]
        for name, part in PART_FILES.items():
            path = require_file(self.path / name, name.split(".")[0].replace("_", " ") + " weights")
            plan.append(WeightFile.mapped(path, name, part, read_header(path), _same))
        return plan

    def identity_files(self):
        names = ["config.json", "tokenizer.json", "ae_config.json", "vision_head_config.json", *PART_FILES,
                 *(p.name for p, _ in self._llm()), *([LLM_INDEX] if (self.path / LLM_INDEX).is_file() else [])]
        return [(n, self.path / n) for n in names]


class DiffusersLayout(Layout):
    kind, identity_prefix = DIFFUSERS, "t2i-diffusers"

    def __init__(self, path: Path):
        super().__init__(path)
        index = read_json(self.path / "model_index.json", "diffusers pipeline index")
        missing = [c for c in DIFFUSERS_COMPONENTS if c not in index]
        if missing:
            raise CheckpointError(f"{self.path / 'model_index.json'}: not a BitDance pipeline: no {', '.join(missing)} "
                                  f"(BitDance's has {', '.join(DIFFUSERS_COMPONENTS)})")

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer" / "tokenizer.json"

    def _config(self, component: str, what: str) -> dict:
        return read_json(self.path / component / "config.json", what)

    def config(self, height, width, max_text_tokens=DEFAULT_MAX_TEXT_TOKENS):
        check_resolution(height, width)
        d = self.path
        llm = Qwen3Config.from_json_dict(self._config("text_encoder", "Qwen3 LLM config"),
                                         str(d / "text_encoder" / "config.json"))
        head = HeadConfig.from_json_dict(_without_diffusers_keys(self._config("diffusion_head", "vision head config")),
                                         str(d / "diffusion_head" / "config.json"))
        vae = _autoencoder(d / "autoencoder" / "config.json")
        proj = self._config("projector", "projector config")
        act = proj.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"{d / 'projector' / 'config.json'}: hidden_act {act!r}: BitDance's projector uses "
                              "gelu_pytorch_tanh")
        return self._t2i(llm, head, vae, height, width, max_text_tokens)

    def _parts(self):
        yield "text_encoder", "model.", LLM_SINGLE, LLM_INDEX, "LLM weight"
        for component, part in DIFFUSERS_PARTS.items():
            yield component, part, DIFFUSERS_WEIGHTS, DIFFUSERS_WEIGHTS + ".index.json", f"{PARTS[part]} weight"

    def weight_files(self):
        plan = []
        for component, part, single, index, what in self._parts():
            rename = _llm_key if part == "model." else _same
            for path, keys in indexed_files(self.path / component, single, index, what):
                plan.append(WeightFile.mapped(path, f"{component}/{path.name}", part, _checked_header(path, keys),
                                              rename))
        return plan

    def identity_files(self):
        files = [("model_index.json", self.path / "model_index.json"), ("tokenizer/tokenizer.json", self.tokenizer)]
        for component, _, single, index, what in self._parts():
            d = self.path / component
            files.append((f"{component}/config.json", d / "config.json"))
            files += [(f"{component}/{p.name}", p) for p, _ in indexed_files(d, single, index, what)]
            if (d / index).is_file():
                files.append((f"{component}/{index}", d / index))
        return files


# ---- ComfyUI files ------------------------------------------------------------------------------
def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
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
        return {"head.": under(COMFY_HEAD_PREFIXES, lambda k: k.startswith("net.")),
                "projector.": under(COMFY_PROJECTOR_PREFIXES, lambda k: k.startswith(("fc1.", "fc2.")))}
    if role == "vae":
        return {"vae.": under(COMFY_VAE_PREFIXES, lambda k: True)}
    text = under(COMFY_TEXT_PREFIXES, lambda k: True)

    def llm(key):
        key = text(key)
        if key is None or key.startswith(SKIPPED_PREFIXES):
            return None
        if key.startswith("model."):
            return key[len("model."):]
        return key if key.startswith(("embed_tokens.", "layers.", "norm.")) else None  # the node ignores others
    return {"model.": llm}


def _mapped_keys(role: str, header: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """part -> {key in the part's module: shape} of one ComfyUI file."""
    out = {}
    for part, rename in _comfy_renames(role, header).items():
        out[part] = {dst: header[k][1] for k in header if (dst := rename(k)) is not None}
    return out


def comfy_role(header: dict) -> str | None:
    """Which of the node's three files a header is: 'main', 'text_encoder', 'vae', or None."""
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
    heads = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    idx = {int(h) for h in heads if h.isdigit()}
    return max(idx) + 1 if idx else 0


class ComfyUILayout(Layout):
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
        options = [te.parent / "tokenizer" / "tokenizer.json", te.parent.parent / "tokenizer" / "tokenizer.json",
                   te.parent / "tokenizer.json"]
        found = next((p for p in options if p.is_file()), None)
        if found is None:
            raise CheckpointError(f"tokenizer not found for ComfyUI text encoder {te}: put the BitDance tokenizer "
                                  f"(the node's tokenizer/ folder) at {options[0]}")
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
            vocab_size=vocab, hidden_size=hidden,
            num_hidden_layers=_count(self.keys["text_encoder"]["model."], "layers."),
            num_attention_heads=llm_shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
            num_key_value_heads=llm_shape("layers.0.self_attn.k_proj.weight")[0] // head_dim, head_dim=head_dim,
            intermediate_size=llm_shape("layers.0.mlp.gate_proj.weight")[0],
            rope_theta=COMFY_DEFAULTS["rope_theta"], rms_norm_eps=COMFY_DEFAULTS["rms_norm_eps"])
        if self._head_config.is_file():
            args = _without_diffusers_keys(read_json(self._head_config, "vision head config"))
            head = HeadConfig.from_json_dict(args, str(self._head_config))
        else:
            head_keys = self.keys["main"]["head."]
            latent, target = self._need("main", "head.", "net.input_proj.weight")
            head = HeadConfig(ch_target=target, ch_cond=self._need("main", "head.", "net.cond_embed.weight")[1],
                              ch_latent=latent, depth_latent=_count(head_keys, "net.res_blocks."),
                              depth_adanln=_count(head_keys, "net.ada_ln_blocks."),
                              parallel_num=COMFY_DEFAULTS["parallel_num"],
                              use_swiglu="net.res_blocks.0.w1.weight" in head_keys,
                              time_shift=COMFY_DEFAULTS["time_shift"])
        cfg_file = self._vae_config
        if cfg_file is not None:
            vae = _autoencoder(cfg_file)
        else:
            vae_keys = self.keys["vae"]["vae."]
            ch, in_channels = self._need("vae", "vae.", "encoder.conv_in.weight")[:2]
            levels = _count(vae_keys, "encoder.down.")
            ch_mult = [self._need("vae", "vae.", f"encoder.down.{i}.block.0.conv1.weight")[0] // ch
                       for i in range(levels)]
            vae = vae_from_ddconfig({
                "ch": ch, "ch_mult": ch_mult, "num_res_blocks": _count(vae_keys, "encoder.down.0.block."),
                "z_channels": self._need("vae", "vae.", "encoder.conv_out.weight")[0], "in_channels": in_channels,
                "out_ch": self._need("vae", "vae.", "decoder.conv_out.weight")[0]}, str(self.files["vae"]))
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
        files += [(f"{role}/{p.name}", p) for role, p in (("main", self._head_config), ("vae", self._vae_config))
                  if p is not None and p.is_file()]
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
        raise CheckpointError(f"{where}: {len(candidates)} BitDance {COMFY_ROLES[role]} files "
                              f"({', '.join(p.name for p in candidates)}): keep one, or point at a directory holding "
                              "just the three files")
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
        raise CheckpointError(f"ComfyUI BitDance files in {directory}: no {COMFY_ROLES[missing[0]]} file found "
                              "(a .safetensors with its keys beside the main model)")
    return ComfyUILayout(directory, {r: _pick(roles[r], r, str(directory)) for r in COMFY_ROLES})


def comfy_from_file(path: Path) -> ComfyUILayout | None:
    """The ComfyUI layout of the node's main-model file, its text encoder and VAE found beside it or
    in ComfyUI's folders for them (None when `path` is no BitDance main-model file)."""
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
            raise CheckpointError(f"ComfyUI BitDance main model {path}: no {COMFY_ROLES[role]} file found "
                                  f"(looked in {', '.join(looked)})")
    return ComfyUILayout(path, files)


# ---- detection ----------------------------------------------------------------------------------
def detect_layout(path: str | Path) -> Layout:
    """The layout of a text-to-image checkpoint path (see the module docstring)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return DiffusersLayout(p)
        # an official directory holds no main-model file (its vision head and projector are two files)
        return comfy_in_dir(p) or OfficialLayout(p)  # the official layout names the files it lacks
    if p.is_file():
        found = comfy_from_file(p)
        if found is not None:
            return found
        raise CheckpointError(f"{p}: not a text-to-image checkpoint: give an official or diffusers checkpoint "
                              "directory, or a ComfyUI BitDance main-model .safetensors file")
    raise ConfigError(f"text-to-image checkpoint not found: {p} (the BitDance-14B-16x / -64x directory, its "
                      "diffusers conversion (model_index.json), or the ComfyUI BitDance files)")


def is_t2i_checkpoint(path) -> bool:
    """Whether --checkpoint names a text-to-image model: a directory, or a ComfyUI main-model file
    (ImageNet weights are single .pt / .safetensors files)."""
    if path is None:
        return False
    p = Path(path)
    return p.is_dir() or (p.is_file() and p.suffix == ".safetensors" and _role_of(p) == "main")


def tokenizer_file(path) -> Path:
    """The tokenizer.json of a checkpoint path, whatever its layout."""
    return detect_layout(path).tokenizer


def warn_unscaled(files: list[WeightFile]) -> None:
    """One line when FP8 weights came without scale tensors (cast as stored, as the node does)."""
    bad = [wf for wf in files if wf.unscaled]
    if bad:
        n = sum(len(wf.unscaled) for wf in bad)
        print(f"bitdance-rt: warning: {n} FP8 tensor(s) in {', '.join(sorted({wf.name for wf in bad}))} have no "
              "scale tensors: cast to float without scales (quality may suffer)", file=sys.stderr)
