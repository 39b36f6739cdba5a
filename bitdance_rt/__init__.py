"""bitdance-rt: deployment runtime for BitDance (binary-token autoregressive image generation)."""

__version__ = "0.1.0"
