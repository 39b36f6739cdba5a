"""Text-to-image BitDance (BitDance-14B-16x / -64x): checkpoint directory, prompts, CLI.

The model itself is bitdance_rt.models.t2i (Qwen3 backbone in models/qwen3.py); it runs on the same
stage contract, loop and backends as the ImageNet models.
"""

from ..t2i_config import SUPPORTED_SIZES, T2IConfig
from .config import read_checkpoint_config

__all__ = ["SUPPORTED_SIZES", "T2IConfig", "read_checkpoint_config"]
