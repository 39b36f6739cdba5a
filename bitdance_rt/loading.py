"""Build a ready model from a config and the user's checkpoint files (or the embedded default)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import check_fit, load_state_dict_file
from .config import EMBEDDED_MODEL, EMBEDDED_WEIGHTS, ModelConfig, load_config
from .errors import CheckpointError
from .models import BitDance
from .models.init import random_init

EMBEDDED_SEED = 0


@dataclass
class LoadedModel:
    model: BitDance
    source: str  # what the weights are, for messages and manifests
    random_weights: bool


def embedded_checkpoint(cfg: ModelConfig, checkpoint, vae):
    """The shipped weights when `cfg` is the embedded model and no weight files were given;
    otherwise `checkpoint` unchanged. Every path (torch, ONNX export and its cache key) goes
    through this, so the embedded model is always its real, trained weights."""
    if checkpoint is None and vae is None and cfg == load_config(EMBEDDED_MODEL):
        return EMBEDDED_WEIGHTS
    return checkpoint


def load_model(
    model: str | Path | ModelConfig | None = None,
    checkpoint: str | Path | None = None,
    vae: str | Path | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """The model in eval mode with the weights of `checkpoint` (+ `vae`), strictly checked.

    With no model and no checkpoint (or the model `tiny-digits`) this is the embedded trained
    digits model. Any other model without a checkpoint gets seeded random weights: useful for
    testing paths and timing, not for pictures.
    """
    cfg = model if isinstance(model, ModelConfig) else load_config(model or EMBEDDED_MODEL)
    checkpoint = embedded_checkpoint(cfg, checkpoint, vae)
    net = BitDance(cfg).eval()
    if checkpoint is None:
        if vae is not None:
            raise CheckpointError(
                "--vae needs --checkpoint: the random-weight default has no checkpoint to pair it with"
            )
        random_init(net, EMBEDDED_SEED)
        return LoadedModel(net, f"{cfg.name} with seeded random weights (seed {EMBEDDED_SEED})", True)
    sd = load_state_dict_file(checkpoint, allow_pickle)
    has_vae = any(k.startswith("vae.") for k in sd)
    if not has_vae and vae is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no vae.* weights: pass the autoencoder with --vae (e.g. ae_d16c32.pt)"
        )
    check_fit(net, sd, str(checkpoint), cfg.name, optional_prefix="vae." if vae is not None else None)
    net.load_state_dict(sd, strict=has_vae)
    if vae is not None:
        # As the official load_vae_weight: the separate autoencoder file wins over vae.* keys.
        vae_sd = load_state_dict_file(vae, allow_pickle)
        if vae_sd and all(k.startswith("vae.") for k in vae_sd):
            vae_sd = {k[len("vae.") :]: v for k, v in vae_sd.items()}
        check_fit(net.vae, vae_sd, str(vae), f"{cfg.name} autoencoder", suggest_preset=False)
        net.vae.load_state_dict(vae_sd, strict=True)
    source = f"{cfg.name} from {Path(checkpoint).name}" + (f" + {Path(vae).name}" if vae else "")
    return LoadedModel(net.eval(), source, False)
