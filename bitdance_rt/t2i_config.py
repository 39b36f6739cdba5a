"""Text-to-image (BitDance-14B-16x / -64x) configuration: the architecture dataclasses.

The official layout (the official README's "Download Model Weights", modeling/t2i_pipeline.py) is
one directory: a Qwen3 causal LM (config.json, model*.safetensors, tokenizer.json),
`vision_head_config.json` (DiffHead constructor arguments), `ae_config.json` (VQModel arguments)
and the weight files; bitdance_rt.t2i.config.read_checkpoint_config reads such a directory into a
T2IConfig (one output resolution per instance: see its docstring). This module sits in the config
layer beside bitdance_rt.config (stdlib and config/errors only), so bitdance_rt.models can use it
without importing the t2i package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import TokenLayout, VAEConfig
from .errors import ConfigError

T2I_CLASS = "modeling/t2i_pipeline.py:BitDanceT2IPipeline"

# The official IMAGE_SIZE_LIST of modeling/t2i_pipeline.py, as [height, width].
SUPPORTED_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512),
    (1920, 512),
    (1536, 640),
    (1280, 768),
    (1152, 896),
    (1024, 1024),
    (896, 1152),
    (768, 1280),
    (640, 1536),
    (512, 1920),
    (512, 2048),
    (1024, 256),
    (896, 256),
    (640, 384),
    (512, 512),
    (384, 640),
    (256, 896),
    (256, 1024),
)

# The official defaults: generate(num_sampling_steps=50, guidance_scale=7.5) in the README example.
DEFAULT_STEPS = 50
DEFAULT_CFG = 7.5
DEFAULT_MAX_TEXT_TOKENS = 256
# Official build_pos_embed(max_len=4096): 4096 // vae downsample rows of the 1D sin-cos table.
POS_EMBED_PIXELS = 4096


def supported_sizes_text() -> str:
    return ", ".join(f"{h}x{w}" for h, w in SUPPORTED_SIZES)


def check_resolution(height: int, width: int) -> None:
    if (int(height), int(width)) not in SUPPORTED_SIZES:
        raise ConfigError(
            f"resolution {height}x{width} (height x width) is not supported; "
            f"the official list is: {supported_sizes_text()}"
        )


@dataclass(frozen=True)
class Qwen3Config:
    """The fields of a HF Qwen3 config.json that decide the backbone (others are ignored)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    @classmethod
    def from_json_dict(cls, data: dict, source: str) -> "Qwen3Config":
        def fail(msg):
            return ConfigError(f"{source}: {msg}")

        if not isinstance(data, dict):
            raise fail("expected a JSON object (a Qwen3 config.json)")
        mtype = data.get("model_type", "qwen3")
        if mtype != "qwen3":
            raise fail(f"model_type {mtype!r}: BitDance text-to-image needs a qwen3 LLM")
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if k not in data]
        if missing:
            raise fail(f"lacks {', '.join(missing)}")
        if data.get("rope_scaling") not in (None, {}):
            raise fail(f"rope_scaling {data['rope_scaling']!r} is not supported (BitDance-14B uses none)")
        if data.get("attention_bias", False):
            raise fail("attention_bias=true is not supported (Qwen3 has no attention biases)")
        if data.get("use_sliding_window", False):
            raise fail("use_sliding_window=true is not supported")
        if data.get("hidden_act", "silu") != "silu":
            raise fail(f"hidden_act {data['hidden_act']!r}: only silu is supported")
        # transformers >= 5 writes RoPE as rope_parameters {"rope_type", "rope_theta"} (no top-level rope_theta)
        rope = data.get("rope_parameters") or {}
        if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
            raise fail(f"rope_parameters {rope!r} are not supported (BitDance-14B uses default RoPE)")
        heads = int(data["num_attention_heads"])
        return cls(
            vocab_size=int(data["vocab_size"]),
            hidden_size=int(data["hidden_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads", heads)),
            head_dim=int(data.get("head_dim") or int(data["hidden_size"]) // heads),
            intermediate_size=int(data["intermediate_size"]),
            rope_theta=float(data.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        )

    def to_json_dict(self) -> dict:
        return {"model_type": "qwen3", **dataclasses.asdict(self)}


@dataclass(frozen=True)
class HeadConfig:
    """vision_head_config.json: the official DiffHead constructor arguments used at inference."""

    ch_target: int
    ch_cond: int
    ch_latent: int
    depth_latent: int
    depth_adanln: int
    parallel_num: int
    use_swiglu: bool = False
    time_shift: float = 1.0
    training_args: tuple = field(default=(), compare=False)

    TRAINING = ("grad_checkpointing", "time_schedule", "P_mean", "P_std", "diff_batch_mul")

    @classmethod
    def from_json_dict(cls, data: dict, source: str) -> "HeadConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of DiffHead arguments")
        need = ("ch_target", "ch_cond", "ch_latent", "depth_latent", "depth_adanln")
        missing = [k for k in need if k not in data]
        if missing:
            raise ConfigError(f"{source}: lacks {', '.join(missing)}")
        known = set(need) | {"parallel_num", "use_swiglu", "time_shift"} | set(cls.TRAINING)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown DiffHead arguments {', '.join(unknown)}")
        return cls(
            *(int(data[k]) for k in need),
            parallel_num=int(data.get("parallel_num", 4)),
            use_swiglu=bool(data.get("use_swiglu", False)),
            time_shift=float(data.get("time_shift", 1.0)),
            training_args=tuple(sorted((k, v) for k, v in data.items() if k in cls.TRAINING)),
        )

    def to_json_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "training_args"}
        d.update(dict(self.training_args))
        return d


@dataclass(frozen=True)
class T2IConfig(TokenLayout):
    """A text-to-image architecture plus ONE output resolution: the graphs have static shapes (AR
    steps, KV-cache length, position embeddings follow from the resolution), so each resolution is its
    own instance and its own export. `max_text_tokens` is the left-padded length of the chat prompt in
    the static prefix (longer prompts are refused, naming the limit). It exposes the same derived names
    as the ImageNet ModelConfig (grid, parallel_num, ar_steps, prefix_len, max_seq_len, token_dim, ...)
    so the stage contract, the loop and the layout helpers serve both families."""

    name: str
    llm: Qwen3Config
    head: HeadConfig
    vae: VAEConfig
    height: int = 1024
    width: int = 1024
    max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS
    default_cfg: float = DEFAULT_CFG
    default_steps: int = DEFAULT_STEPS

    family = "t2i"
    # The official T2I pipeline guides every AR step with the same scale (modeling/t2i_pipeline.py
    # gen_image -> vision_head.sample(..., cfg=guidance_scale)); the linear ramp is ImageNet's.
    default_cfg_schedule = "constant"
    is_parallel = True
    parallel_mode = "patch"
    patch_size = 1

    # ---- names shared with the ImageNet ModelConfig ---------------------------------------
    @property
    def dim(self) -> int:
        return self.llm.hidden_size

    @property
    def n_layer(self) -> int:
        return self.llm.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.llm.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.llm.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.llm.head_dim

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def latent_dim(self) -> int:
        return self.vae.z_channels

    @property
    def token_dim(self) -> int:
        return self.head.ch_target

    @property
    def time_shift(self) -> float:
        return self.head.time_shift

    @property
    def down_size(self) -> int:
        return self.vae.downsample

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.down_size, self.width // self.down_size

    @property
    def prefix_len(self) -> int:
        """Left-padded chat prompt, <|vision_start|>, the two resolution tokens, P-1 query tokens."""
        return self.max_text_tokens + 3 + self.parallel_num - 1

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def pos_embed_len(self) -> int:
        return POS_EMBED_PIXELS // self.down_size

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> "T2IConfig":
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"config {self.name!r}: {msg}")

        check_resolution(self.height, self.width)
        llm, head = self.llm, self.head
        need(
            llm.num_attention_heads % llm.num_key_value_heads == 0,
            f"num_attention_heads={llm.num_attention_heads} is not a multiple of num_key_value_heads="
            f"{llm.num_key_value_heads}",
        )
        need(llm.head_dim % 2 == 0, f"head_dim={llm.head_dim} must be even (RoPE)")
        need(llm.hidden_size % 4 == 0, f"hidden_size={llm.hidden_size} must be a multiple of 4 (2D sin-cos embedding)")
        need(
            head.ch_cond == llm.hidden_size,
            f"vision head ch_cond={head.ch_cond} must equal the LLM hidden_size={llm.hidden_size}",
        )
        need(
            head.ch_target == self.vae.z_channels,
            f"vision head ch_target={head.ch_target} must equal the autoencoder z_channels={self.vae.z_channels}",
        )
        p = self.patch_side
        need(
            p * p == head.parallel_num and head.parallel_num > 1,
            f"parallel_num={head.parallel_num} must be a square > 1 (16 or 64 officially)",
        )
        need(head.ch_latent % 128 == 0, f"vision head ch_latent={head.ch_latent} must be a multiple of 128 (its heads)")
        h, w = self.grid
        need(
            self.height % self.down_size == 0 and self.width % self.down_size == 0 and h % p == 0 and w % p == 0,
            f"{self.height}x{self.width} gives a {h}x{w} token grid that {p}x{p} patches do not tile",
        )
        need(max(h, w) <= self.pos_embed_len, f"a {h}x{w} grid exceeds the {self.pos_embed_len}-row position table")
        need(
            isinstance(self.max_text_tokens, int) and self.max_text_tokens >= 2,
            f"max_text_tokens must be an integer >= 2, got {self.max_text_tokens!r}",
        )
        need(self.default_steps >= 1, f"default_steps must be >= 1, got {self.default_steps}")
        return self

    def at_resolution(self, height: int, width: int) -> "T2IConfig":
        return dataclasses.replace(self, height=int(height), width=int(width)).validate()

    def replace(self, **changes) -> "T2IConfig":
        return dataclasses.replace(self, **changes).validate()

    # ---- JSON (manifests) ----------------------------------------------------------------
    def to_json_dict(self) -> dict:
        return {
            "name": self.name,
            "model_class": T2I_CLASS,
            "constructor_args": {
                "llm": self.llm.to_json_dict(),
                "vision_head": self.head.to_json_dict(),
                "height": self.height,
                "width": self.width,
                "max_text_tokens": self.max_text_tokens,
            },
            "vae": {"ddconfig": self.vae.ddconfig(), "num_codebooks": self.vae.num_codebooks},
            "sampling": {"cfg_scale": self.default_cfg, "sample_steps": self.default_steps},
        }

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "<config>") -> "T2IConfig":
        try:
            args = data["constructor_args"]
            sampling = data.get("sampling", {}) or {}
            return cls(
                name=str(data.get("name", "bitdance-t2i")),
                llm=Qwen3Config.from_json_dict(args["llm"], source),
                head=HeadConfig.from_json_dict(args["vision_head"], source),
                vae=vae_from_ddconfig(data["vae"]["ddconfig"], source),
                height=int(args["height"]),
                width=int(args["width"]),
                max_text_tokens=int(args["max_text_tokens"]),
                default_cfg=float(sampling.get("cfg_scale", DEFAULT_CFG)),
                default_steps=int(sampling.get("sample_steps", DEFAULT_STEPS)),
            ).validate()
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config {source}: not a text-to-image config ({exc!r})") from None


def vae_from_ddconfig(dd: dict, source: str) -> VAEConfig:
    if not isinstance(dd, dict):
        raise ConfigError(f"{source}: 'ddconfig' must be an object")
    if dd.get("double_z", False):
        raise ConfigError(f"{source}: ddconfig.double_z=true is not a BitDance binary autoencoder")
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k not in dd]
    if missing:
        raise ConfigError(f"{source}: ddconfig lacks {', '.join(missing)}")
    return VAEConfig(
        ch=int(dd["ch"]),
        ch_mult=tuple(int(m) for m in dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        z_channels=int(dd["z_channels"]),
        in_channels=int(dd.get("in_channels", 3)),
        out_ch=int(dd.get("out_ch", 3)),
    )


# ---- the released text-to-image models, for planning and meta-device checks -----------------------
# Checkpoints bring their own config files (t2i/config.py reads them); these are the same numbers,
# so memory can be planned and parameters counted without a download. Sources: Qwen3-14B's
# config.json (huggingface.co/Qwen/Qwen3-14B) and the official train/configs/bitdance_14b_16x.yaml /
# bitdance_14b_64x.yaml (vision head: model_dim 5120, 6 blocks, 2 adaLN, SwiGLU; autoencoder ddconfig:
# ch 256, ch_mult 1,1,2,2,4, 4 res blocks, z_channels 32).
QWEN3_14B = {
    "vocab_size": 151936,
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 17408,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
T2I_PRESETS = {"BitDance-14B-16x": 16, "BitDance-14B-64x": 64}  # name -> tokens per AR step


def t2i_preset(
    name: str, height: int = 1024, width: int = 1024, max_text_tokens: int = DEFAULT_MAX_TEXT_TOKENS
) -> T2IConfig:
    """The T2IConfig of a released text-to-image model at one resolution (no weights)."""
    if name not in T2I_PRESETS:
        raise ConfigError(f"unknown text-to-image model {name!r}: one of {', '.join(T2I_PRESETS)}")
    llm = Qwen3Config(**QWEN3_14B)
    head = HeadConfig(
        ch_target=32,
        ch_cond=llm.hidden_size,
        ch_latent=5120,
        depth_latent=6,
        depth_adanln=2,
        parallel_num=T2I_PRESETS[name],
        use_swiglu=True,
    )
    vae = VAEConfig(ch=256, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, z_channels=32)
    return T2IConfig(
        name=name,
        llm=llm,
        head=head,
        vae=vae,
        height=int(height),
        width=int(width),
        max_text_tokens=int(max_text_tokens),
    ).validate()
