"""bitdance-rt: deployment runtime for BitDance (binary-token autoregressive image generation).

from bitdance_rt import Pipeline
pipe = Pipeline.from_pretrained()          # load once (the embedded model), keep warm
out = pipe.generate(labels=[3, 7])          # generate many; submit() / stream() for concurrency
"""

from ._version import __version__

__all__ = ["Output", "Pipeline", "Progress", "__version__"]


def __getattr__(name):  # the API loads torch lazily, so `bitdance-rt build` (no torch) stays lean
    if name in ("Pipeline", "Output", "Progress"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'bitdance_rt' has no attribute {name!r}")
