"""Model configs: the official presets and the official constructor-argument JSON form.

A `ModelConfig` holds exactly what decides the architecture and the sampler defaults. It reads and
writes the JSON form used by the official fixtures (`model_class`, `constructor_args`,
`vae.ddconfig`), so a config written here can be compared with the official code's arguments.
Every derived quantity (grid, AR steps, sequence length, ...) is a property, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError

PARALLEL_CLASS = "imagenet_gen/src/model_parallel.py:BitDance"
SEQUENTIAL_CLASS = "imagenet_gen/src/model.py:BitDance"

# Constructor arguments of the official BitDance classes that decide the architecture (every official
# config gives them); cls_token_num, num_classes, time_shift and the parallel ones have defaults.
ARCH_ARGS = (
    "dim",
    "n_layer",
    "n_head",
    "diff_layers",
    "diff_dim",
    "diff_adanln_layers",
    "latent_dim",
    "down_size",
    "patch_size",
    "resolution",
)

# Constructor arguments of the official BitDance classes that only matter for training.
# They are accepted (and written back) so official configs round-trip, but ignored.
TRAINING_ONLY_ARGS = {
    "diff_batch_mul": 4,
    "grad_checkpointing": False,
    "class_dropout_prob": 0.1,
    "trained_vae": "",
    "drop_rate": 0.0,
    "perturb_schedule": "constant",
    "perturb_rate": 0.0,
    "perturb_rate_max": 0.3,
    "time_schedule": "logit_normal",
    "P_std": 1.0,
    "P_mean": 0.0,
}


class TokenLayout:
    """Facts that follow from a config's `grid`, `parallel_num` and `prefix_len` (ImageNet and T2I alike)."""

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def ar_steps(self) -> int:
        return self.num_tokens // self.parallel_num

    @property
    def patch_side(self) -> int:
        return math.isqrt(self.parallel_num)

    @property
    def max_seq_len(self) -> int:
        """KV-cache length: the prefix plus every token but the last patch (never fed back)."""
        return self.prefix_len + self.num_tokens - self.parallel_num


@dataclass(frozen=True)
class VAEConfig:
    """The binary autoencoder (official `qae.VQModel` ddconfig). Defaults: ae_d16c32.pt."""

    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 4
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3
    num_codebooks: int = 4

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def ddconfig(self) -> dict:
        return {
            "double_z": False,
            "z_channels": self.z_channels,
            "in_channels": self.in_channels,
            "out_ch": self.out_ch,
            "ch": self.ch,
            "ch_mult": list(self.ch_mult),
            "num_res_blocks": self.num_res_blocks,
        }


@dataclass(frozen=True)
class ModelConfig(TokenLayout):
    """A class-conditional ImageNet BitDance model (1x: next-token; 4x/16x: next-patch)."""

    name: str
    dim: int
    n_layer: int
    n_head: int
    diff_layers: int
    diff_dim: int
    diff_adanln_layers: int
    latent_dim: int = 32
    down_size: int = 16
    patch_size: int = 1
    resolution: int = 256
    cls_token_num: int = 64
    num_classes: int = 1000
    time_shift: float = 1.0
    parallel_num: int = 1
    parallel_mode: str = "patch"
    vae: VAEConfig = field(default_factory=VAEConfig)
    default_cfg: float = 4.0
    default_steps: int = 100
    # The official ImageNet sampler ramps guidance over AR steps (imagenet_gen/src/model_parallel.py)
    default_cfg_schedule: ClassVar[str] = "linear"
    # Training-only constructor args, kept to write official JSON back; not part of identity.
    training_args: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_parallel(self) -> bool:
        """True for the next-patch models (official model_parallel.py)."""
        return self.parallel_num > 1

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // (self.down_size * self.patch_size)
        return side, side

    @property
    def prefix_len(self) -> int:
        """Positions filled by the prefill: class tokens (+ P-1 query tokens for next-patch)."""
        return self.cls_token_num + self.parallel_num - 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4.0 * self.dim) / 3)
        return -(-hidden // 256) * 256

    @property
    def token_dim(self) -> int:
        return self.latent_dim * self.patch_size * self.patch_size

    @property
    def head_kind(self) -> str:
        return "transformer" if self.is_parallel else "mlp"

    @property
    def model_class(self) -> str:
        return PARALLEL_CLASS if self.is_parallel else SEQUENTIAL_CLASS

    @property
    def image_size(self) -> int:
        return self.grid[0] * self.patch_size * self.vae.downsample

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config {self.name!r}: {msg}")

        for key in (*ARCH_ARGS, "cls_token_num", "num_classes", "parallel_num"):
            value = getattr(self, key)
            need(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{key} must be a positive integer, got {value!r}",
            )
        need(self.dim % self.n_head == 0, f"dim={self.dim} is not divisible by n_head={self.n_head}")
        need(self.head_dim % 4 == 0, f"head dim dim/n_head={self.head_dim} must be a multiple of 4 (2D RoPE)")
        need(self.patch_size == 1, f"patch_size={self.patch_size}: only 1 is supported (all official models use 1)")
        need(
            self.resolution % self.down_size == 0,
            f"resolution={self.resolution} is not divisible by down_size={self.down_size}",
        )
        need(self.time_shift > 0, f"time_shift must be > 0, got {self.time_shift}")
        need(
            self.parallel_mode in ("patch", "standard"),
            f"parallel_mode must be 'patch' or 'standard', got {self.parallel_mode!r}",
        )
        if self.is_parallel:
            p = self.patch_side
            need(p * p == self.parallel_num, f"parallel_num={self.parallel_num} must be a perfect square")
            h, w = self.grid
            need(
                h % p == 0 and w % p == 0,
                f"the {h}x{w} token grid cannot be cut into {p}x{p} patches (parallel_num={self.parallel_num})",
            )
            need(
                self.diff_dim % 64 == 0,
                f"diff_dim={self.diff_dim} must be a multiple of 64 (transformer head: diff_dim//64 heads)",
            )
        switch = max(1, self.diff_layers // self.diff_adanln_layers)
        need(
            self.diff_layers % switch == 0,
            f"diff_layers={self.diff_layers} must be divisible by diff_adanln_layers={self.diff_adanln_layers}",
        )
        need(
            self.diff_adanln_layers <= self.diff_layers,
            f"diff_adanln_layers={self.diff_adanln_layers} exceeds diff_layers={self.diff_layers}",
        )
        vae = self.vae
        need(
            vae.z_channels == self.latent_dim,
            f"vae z_channels={vae.z_channels} must equal latent_dim={self.latent_dim}",
        )
        need(
            vae.downsample == self.down_size,
            f"vae ch_mult {list(vae.ch_mult)} downsamples by {vae.downsample}, but down_size={self.down_size}",
        )
        need(
            all(isinstance(m, int) and m >= 1 for m in vae.ch_mult),
            f"vae ch_mult must be positive integers, got {vae.ch_mult}",
        )
        need(
            all((vae.ch * m) % 32 == 0 for m in vae.ch_mult),
            f"vae channel counts ch*ch_mult={[vae.ch * m for m in vae.ch_mult]} must be multiples of 32 (GroupNorm 32)",
        )
        need(vae.num_res_blocks >= 1, f"vae num_res_blocks must be >= 1, got {vae.num_res_blocks}")
        need(self.default_steps >= 1, f"default_steps must be >= 1, got {self.default_steps}")
        return self

    # ---- official JSON form --------------------------------------------------------------
    def constructor_args(self) -> dict:
        args = dict(TRAINING_ONLY_ARGS)
        args.update(dict(self.training_args))
        args.update(
            {key: getattr(self, key) for key in ARCH_ARGS},
            cls_token_num=self.cls_token_num,
            num_classes=self.num_classes,
            time_shift=self.time_shift,
        )
        if self.is_parallel:
            args.update(parallel_num=self.parallel_num, parallel_mode=self.parallel_mode)
        return args

    def to_json_dict(self) -> dict:
        return {
            "name": self.name,
            "model_class": self.model_class,
            "constructor_args": self.constructor_args(),
            "vae": {"ddconfig": self.vae.ddconfig(), "num_codebooks": self.vae.num_codebooks},
            "sampling": {"cfg_scale": self.default_cfg, "sample_steps": self.default_steps},
        }

    @classmethod
    def from_json_dict(cls, data: dict, source: str = "<config>") -> "ModelConfig":
        def fail(msg: str) -> ConfigError:
            return ConfigError(f"config {source}: {msg}")

        if not isinstance(data, dict):
            raise fail("expected a JSON object with 'model_class' and 'constructor_args'")
        model_class = data.get("model_class")
        if model_class not in (PARALLEL_CLASS, SEQUENTIAL_CLASS):
            raise fail(f"model_class must be {PARALLEL_CLASS!r} or {SEQUENTIAL_CLASS!r}, got {model_class!r}")
        args = data.get("constructor_args")
        if not isinstance(args, dict):
            raise fail("'constructor_args' must be an object of BitDance constructor arguments")
        missing = [k for k in ARCH_ARGS if k not in args]
        if missing:
            raise fail(f"constructor_args lacks {', '.join(missing)}")
        known = set(ARCH_ARGS) | {"cls_token_num", "num_classes", "time_shift"} | set(TRAINING_ONLY_ARGS)
        if model_class == PARALLEL_CLASS:
            known |= {"parallel_num", "parallel_mode"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise fail(f"unknown constructor_args for {model_class}: {', '.join(unknown)}")
        vae_data = data.get("vae", {}) or {}
        dd = vae_data.get("ddconfig", {}) or {}
        if dd.get("double_z", False):
            raise fail("vae.ddconfig.double_z=true is not a BitDance autoencoder")
        try:
            vae = VAEConfig(
                ch=int(dd.get("ch", VAEConfig.ch)),
                ch_mult=tuple(int(m) for m in dd.get("ch_mult", VAEConfig.ch_mult)),
                num_res_blocks=int(dd.get("num_res_blocks", VAEConfig.num_res_blocks)),
                z_channels=int(dd.get("z_channels", args["latent_dim"])),
                in_channels=int(dd.get("in_channels", 3)),
                out_ch=int(dd.get("out_ch", 3)),
                num_codebooks=int(vae_data.get("num_codebooks", 4)),
            )
        except (TypeError, ValueError) as exc:
            raise fail(f"vae.ddconfig has a non-integer value ({exc})") from None
        sampling = data.get("sampling", {}) or {}
        parallel = model_class == PARALLEL_CLASS
        cfg = cls(
            name=str(data.get("name", Path(source).stem)),
            **{key: args[key] for key in ARCH_ARGS},
            cls_token_num=args.get("cls_token_num", 16),
            num_classes=args.get("num_classes", 1000),
            time_shift=float(args.get("time_shift", 1.0)),
            parallel_num=args.get("parallel_num", 4) if parallel else 1,
            parallel_mode=args.get("parallel_mode", "standard") if parallel else "patch",
            vae=vae,
            default_cfg=float(sampling.get("cfg_scale", 4.0)),
            default_steps=int(sampling.get("sample_steps", 100)),
            training_args=tuple(sorted((k, v) for k, v in args.items() if k in TRAINING_ONLY_ARGS)),
        )
        if parallel and cfg.parallel_num == 1:
            raise fail("model_parallel.py BitDance needs parallel_num > 1 (use model.py for next-token models)")
        return cfg.validate()

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


def _imagenet(name: str, size: str, parallel_num: int, cfg: float) -> ModelConfig:
    dims = {  # official imagenet_gen/src/model*.py: BitDance_B / _L / _H
        "B": dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2),
        "L": dict(dim=1024, n_layer=32, n_head=16, diff_layers=8, diff_dim=1024, diff_adanln_layers=2),
        "H": dict(dim=1280, n_layer=40, n_head=20, diff_layers=12, diff_dim=1280, diff_adanln_layers=3),
    }[size]
    # latent_dim 32, 256px, cls_token_num 64, 1000 classes, patch mode: the official README commands
    # and sample_ddp*.py defaults; cfg from the README's evaluation commands; 100 steps is the default.
    return ModelConfig(name=name, parallel_num=parallel_num, default_cfg=cfg, **dims)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in (
        _imagenet("BitDance-B-1x", "B", 1, 3.2),
        _imagenet("BitDance-B-4x", "B", 4, 3.9),
        _imagenet("BitDance-B-16x", "B", 16, 6.1),
        _imagenet("BitDance-L-1x", "L", 1, 4.0),
        _imagenet("BitDance-H-1x", "H", 1, 4.55),
        # A tiny next-patch model (64px, 4x4 tokens, 4 per step) with random weights: the
        # test/benchmark workhorse. Its shapes are those of the official tiny_4x fixture.
        ModelConfig(
            name="tiny-4x",
            dim=64,
            n_layer=2,
            n_head=4,
            diff_layers=2,
            diff_dim=64,
            diff_adanln_layers=1,
            resolution=64,
            cls_token_num=8,
            num_classes=10,
            parallel_num=4,
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1),
            default_cfg=3.0,
            default_steps=25,
        ),
    )
}

# The embedded default: a trained tiny digits model shipped as package data
# (recipes/train_tiny.py writes it). `--model tiny-digits` (or no --model) loads it.
EMBEDDED_MODEL = "tiny-digits"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_CONFIG = ASSETS_DIR / "tiny_digits.json"
EMBEDDED_WEIGHTS = ASSETS_DIR / "tiny_digits.safetensors"


def load_config(spec: str | Path) -> ModelConfig:
    """A preset name, or the path of a JSON config in the official constructor-argument form."""
    spec_str = str(spec)
    if spec_str == EMBEDDED_MODEL:
        spec_str = str(EMBEDDED_CONFIG)
    if spec_str in PRESETS:
        return PRESETS[spec_str].validate()
    path = Path(spec_str)
    if path.suffix.lower() != ".json" and not path.exists():
        raise ConfigError(
            f"unknown model {spec_str!r}: give {EMBEDDED_MODEL}, a preset ({', '.join(PRESETS)}) or a config .json file"
        )
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config {path}: not readable JSON ({exc})") from None
    return ModelConfig.from_json_dict(data, source=str(path))
