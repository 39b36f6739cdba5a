"""Which backend a calibration capture runs on, and what a set records about the model that made it.

A capture records the trajectories of whatever stage backend fits the machine: the float32 torch
reference (the ImageNet default, as before), or ONNX Runtime on the FP32 or FP16 export (the
text-to-image default: BitDance-14B in float32 torch is ~27 PFLOP and ~65 GB of RAM for the 16
default prompts, while its FP16 graphs run on a GPU). Later INT4 or TensorRT exports fit the same
way: any runtime/core.StageBackend (its stage observers see every stage run) that has head_step.

A set's key holds its producer, {"backend", "precision", "export_key"}: the backend's name, the
precision of the graphs (fp32 for torch) and the sha256 of the export manifest's key (None for
torch), so a set is never confused with one from another model, and INT8 variants derived from it
(whose directory digest covers the set's key) are keyed by it too. Sets written before producers
were recorded were all captured with the torch reference: `set_producer` says so.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import BitDanceError

CAPTURE_BACKENDS = ("torch", "onnxruntime")
CAPTURE_PRECISIONS = ("fp32", "fp16")
TORCH_PRODUCER = {"backend": "torch", "precision": "fp32", "export_key": None}


def capture_choice(t2i: bool, backend: str | None = None, precision: str | None = None) -> tuple[str, str]:
    """(backend, precision) of a capture: torch fp32 for ImageNet models, onnxruntime fp16 for
    text-to-image models (no float32 14B needed); onnxruntime for an ImageNet model defaults to fp32."""
    if backend is not None and backend not in CAPTURE_BACKENDS:
        raise BitDanceError(f"capture backend {backend!r}: use one of {', '.join(CAPTURE_BACKENDS)}")
    if precision is not None and precision not in CAPTURE_PRECISIONS:
        raise BitDanceError(f"capture precision {precision!r}: use one of {', '.join(CAPTURE_PRECISIONS)}")
    backend = backend or ("onnxruntime" if t2i else "torch")
    if backend == "torch":
        if precision not in (None, "fp32"):
            raise BitDanceError(
                f"capture precision {precision}: the torch backend is the float32 reference; "
                "capture with backend onnxruntime for fp16 graphs"
            )
        return backend, "fp32"
    return backend, precision or ("fp16" if t2i else "fp32")


def export_digest(manifest: dict) -> str:
    """sha256 of an export manifest's key: what identifies the graphs (model, weights, stages, precision)."""
    return hashlib.sha256(json.dumps(manifest["key"], sort_keys=True).encode()).hexdigest()


def export_producer(backend: str, manifest: dict) -> dict:
    """The producer of a capture from export `manifest` on `backend`."""
    return {"backend": backend, "precision": manifest.get("precision", "fp32"), "export_key": export_digest(manifest)}


def producer_of(backend) -> dict:
    """The producer of a capture on stage backend `backend` (its name; for exports, their precision
    (a TensorRT backend: its engines') and digest)."""
    name = str(getattr(backend, "name", type(backend).__name__))
    manifest = getattr(backend, "manifest", None)
    if manifest is None:  # the torch reference: the model's float32 weights
        return {**TORCH_PRODUCER, "backend": name}
    out = export_producer(name, manifest)
    precision = getattr(backend, "precision", None)  # (TensorRT: the engines', whatever the graphs hold)
    return {**out, "precision": precision} if isinstance(precision, str) else out


def set_producer(key: dict) -> dict:
    """The producer a set's key records (sets of older versions: the torch reference)."""
    return dict(key.get("producer") or TORCH_PRODUCER)


def describe_producer(producer: dict, export_dir=None) -> str:
    """One phrase: 'torch float32 reference' or 'onnxruntime on the fp16 export <digest> (<dir>)'."""
    if producer.get("export_key") is None:
        precision = producer["precision"]
        return f"{producer['backend']} {'float32 reference' if precision == 'fp32' else precision}"
    where = f" ({export_dir})" if export_dir else ""
    return f"{producer['backend']} on the {producer['precision']} export {producer['export_key'][:12]}{where}"


def torch_capture_backend(model, device: str = "cpu"):
    """The torch reference (see capture.RecordingBackend)."""
    from ..runtime.torch_backend import TorchBackend

    return TorchBackend(model, device)


def ort_capture_backend(
    export_dir,
    threads: int | None = None,
    providers=None,
    expect_config=None,
    expect_source: str | None = None,
    session_cache=None,
):
    """ONNX Runtime on an export directory (FP32 or FP16 graphs), sampling step by step (head_step:
    every head-net evaluation is a stage call; the fused head_sampler is one opaque graph). FP16 graphs
    on the CPU run lean (ort_backend.lean_options): a 14B's would otherwise hold FP32 copies of its weights."""
    from ..export.manifest import read_manifest
    from ..runtime.ort_backend import OrtBackend, normalize_providers

    on_cpu = all(name == "CPUExecutionProvider" for name, _ in normalize_providers(providers))
    return OrtBackend(
        export_dir,
        threads=threads,
        providers=providers,
        sampler="step",
        expect_config=expect_config,
        expect_source=expect_source,
        session_cache=session_cache,
        lean=on_cpu and read_manifest(export_dir).get("precision") == "fp16",
    )


def captured_on(cset, precision: str = "fp16"):
    """The export directory set `cset` was captured on (its origin), when it is still there, still the
    same graphs (its manifest's digest is the one the set's producer records) and of `precision`; else
    None. A text-to-image INT8 export measures its ranges on those graphs instead of making its own."""
    from pathlib import Path

    from ..export.manifest import read_manifest

    where, producer = cset.origin.get("export_dir"), set_producer(cset.key)
    if not where or producer.get("export_key") is None:
        return None
    try:
        manifest = read_manifest(Path(where))
    except BitDanceError:
        return None
    if manifest.get("precision", "fp32") != precision or export_digest(manifest) != producer["export_key"]:
        return None
    return Path(where)
