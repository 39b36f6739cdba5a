"""Stage-level observers of a stage backend (runtime/core.StageBackend), without changing it.

The shared core runs every stage of every backend (torch, onnxruntime, tensorrt) through one
method, `_run(stage, feeds, phase)`: the embeddings and the backbone of the prefill and the AR
steps, head_step inside the step-by-step sampler, the fused head_sampler, the decoder. So one hook
there sees every stage call of any backend. `observed(cls)` is the backend class `cls` with the
`ObservedStages` mixin, whose `_run` runs the backend's own and then hands the call to each
observer added with `add_stage_observer`:

    backend = observed(OrtBackend)(export_dir, sampler="step")
    backend.add_stage_observer(lambda stage, feeds, phase, outputs: ...)

An observer gets the contract-named feeds exactly as the core built them (the padding rows of the
call's row bucket included; the cache inputs are views of the live cache), the backbone's phase
("prefill" / "step", None for other stages) and the outputs (a backend may hand out a buffer it
reuses, such as ONNX Runtime's `kv_new`: copy what you keep). Observers must change neither.
Nothing is replaced on a backend instance: the backend is built as the observed class, which
behaves as its base in every other respect (a backend without observers runs unchanged).
"""

from __future__ import annotations

from typing import Protocol

import torch


class StageObserver(Protocol):
    def __call__(self, stage: str, feeds: dict[str, torch.Tensor], phase: str | None,
                 outputs: dict[str, torch.Tensor]) -> None:
        """Called after each stage call of the backend, in the calling thread."""


class ObservedStages:
    """Mixin over a runtime/core.StageBackend subclass (put it first in the bases; see `observed`)."""

    def add_stage_observer(self, observer: StageObserver) -> None:
        self.__dict__.setdefault("_stage_observers", []).append(observer)

    def remove_stage_observer(self, observer: StageObserver) -> None:
        self.__dict__.get("_stage_observers", []).remove(observer)

    def _run(self, stage, feeds, phase=None):
        outputs = super()._run(stage, feeds, phase)
        for observer in self.__dict__.get("_stage_observers", ()):
            observer(stage, feeds, phase, outputs)
        return outputs


_OBSERVED: dict[type, type] = {}


def observed(cls: type) -> type:
    """The stage backend class `cls` with stage observers (one class per base, made once)."""
    if issubclass(cls, ObservedStages):
        return cls
    if cls not in _OBSERVED:
        _OBSERVED[cls] = type(f"Observed{cls.__name__}", (ObservedStages, cls),
                              {"__module__": __name__, "__doc__": f"{cls.__name__} with stage observers "
                                                                  "(calibration/observe.py)."})
    return _OBSERVED[cls]


def is_observed(backend) -> bool:
    return isinstance(backend, ObservedStages)

