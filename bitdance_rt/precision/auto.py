"""Automatic precision variants for `generate` / `eval` / `export`: cached like the FP32 exports.

Layout under the cache root (bitdance_rt.paths, which computes these paths):
    exports/<fp32 export>                       the FP32 export (paths.export_dir)
    exports/<fp32 export>-fp16                  its FP16 graphs (-bf16: BF16)
    exports/<fp32 export>-int8-<method>-<set>   its INT8 graphs for one calibration set and method
    calibration/<model>-<weights>-s<S>          the default calibration set when none is given (captured
                                                with the torch reference; -<backend>-<precision> when not)
Reuse and rebuilds follow the manifest keys, so a stale variant is re-derived, never trusted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .. import paths
from .. import stages as st
from ..errors import BitDanceError
from .derive import derive_export
from .policy import check_method, check_precision, int4_format

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_IMAGES = 16
DEFAULT_CAPTURE_BATCH = 4
# What the default set's backbone step samples may hold: each keeps the KV cache of its rows up to
# its position (BitDance-B-4x, 4 images: ~230 MB on average), and every AR step of every batch is a
# candidate, so without a budget the default B-4x set wanted ~57 GB: killed on a 24 GB machine.
# (Prefill samples hold no cache: start 0, nothing cached is read.)
BACKBONE_BUDGET_BYTES = 4 << 30


def default_policy(cfg, images: int = DEFAULT_CALIBRATION_IMAGES, batch: int = DEFAULT_CAPTURE_BATCH):
    """The capture policy of the default set: every backbone step while the samples fit in
    BACKBONE_BUDGET_BYTES, else every k-th step (k as small as fits)."""
    from ..calibration import CapturePolicy
    from ..stages import kv_shape

    per_position = 4 * math.prod(kv_shape(cfg, 2 * min(batch, images), length=1))
    mean_length = cfg.prefix_len + (cfg.max_seq_len - cfg.prefix_len) / 2
    batches = math.ceil(images / batch)
    total = per_position * mean_length * (cfg.ar_steps - 1) * batches
    return CapturePolicy(backbone_every=max(1, math.ceil(total / BACKBONE_BUDGET_BYTES)))


def variant_dir(
    fp32_dir: Path, precision: str, calibration=None, method: str = "max", keep_float=(), int4_format=None
) -> Path:
    """Where the variant of `fp32_dir` is kept (bitdance_rt.paths.variant_dir; `calibration`: its set)."""
    key = calibration.key if precision == "int8" else None
    return paths.variant_dir(fp32_dir, precision, key, method, keep_float, int4_format)


def keep_float_by_stage(fp32_dir, names, precision: str = "int8") -> dict[str, list[str]]:
    """Layer names (as the sensitivity report prints them) -> {quantised stage: the names it has}.
    Each stage whose graph has a name keeps it float. The backbone is one graph for the prefill
    and the steps, so a backbone layer kept float is float in both phases."""
    from ..export.manifest import read_manifest, stage_files
    from .derive import int8_layers, onnx_graph
    from .int4 import weight_matmuls

    fp32_dir = Path(fp32_dir)
    manifest = read_manifest(fp32_dir)
    if precision == "int4":
        layers = {
            s: set(weight_matmuls(onnx_graph(fp32_dir / stage_files(manifest, fp32_dir, s)[0])))
            for s in manifest["key"]["stages"]
            if s in st.INT4_STAGES
        }
    else:
        layers = {s: set(v) for s, v in int8_layers(fp32_dir, manifest, manifest["key"]["stages"]).items()}
    unknown = [n for n in names if not any(n in v for v in layers.values())]
    if unknown:
        example = next((sorted(v)[0] for v in layers.values() if v), "/layers.0/attention/wo/MatMul")
        raise BitDanceError(
            f"--keep-float {' '.join(unknown)}: no quantisable layer of that name in {fp32_dir} "
            f"(names look like {example}; `bitdance-rt calibrate --report --sensitivity` ranks them)"
        )
    return {s: sorted(set(names) & v) for s, v in layers.items() if set(names) & v}


def default_calibration_dir(cfg, source: str, steps: int, backend: str = "torch", precision: str = "fp32") -> Path:
    """The default set of (model, weights, S) captured on `backend` at `precision`: the torch reference's
    keeps its directory of older versions; the others get theirs (suffix -<backend>-<precision>)."""
    path = paths.calibration_dir(cfg, source, steps)
    return path if (backend, precision) == ("torch", "fp32") else path.with_name(f"{path.name}-{backend}-{precision}")


def default_labels(cfg, images: int = DEFAULT_CALIBRATION_IMAGES) -> list[int]:
    """Labels spread evenly over the classes (every class when there are at most `images`)."""
    n = min(images, cfg.num_classes)
    return [round(i * cfg.num_classes / n) % cfg.num_classes for i in range(n)]


# The default calibration prompts of text-to-image models: varied subjects, styles and lengths, so
# the captured activations span what prompts do to the backbone (the official repo's demo prompts
# are of this kind). Chosen by this project; users with their own traffic should capture from it
# (`bitdance-rt calibrate --prompt ...`).
DEFAULT_T2I_PROMPTS = (
    "a red fox in a snowy forest at dawn, photograph",
    "a city skyline at night with neon reflections on wet streets",
    "an oil painting of a bowl of lemons on a wooden table",
    "a close-up portrait of an old fisherman, dramatic light",
    "a watercolor map of an imaginary island",
    "a futuristic train crossing a desert bridge",
    "a cup of coffee with latte art, top view",
    "a cartoon robot waving, flat colors",
)


# Prompts of the text-to-image accuracy report (`calibrate --report`): none of them is a calibration
# prompt, so the report measures prompts the INT8 ranges were not fitted to.
REPORT_T2I_PROMPTS = (
    "a sailing boat on a calm lake under a pink sky",
    "a bowl of ramen with steam rising, studio photo",
    "a pencil sketch of a cat sleeping on a windowsill",
    "a medieval castle on a hill in autumn",
    "a bright abstract poster with circles and stripes",
    "a hummingbird drinking from a red flower, macro",
)


def report_prompts(images: int) -> list[str]:
    return [REPORT_T2I_PROMPTS[i % len(REPORT_T2I_PROMPTS)] for i in range(images)]


def default_prompts(images: int = DEFAULT_CALIBRATION_IMAGES) -> list[str]:
    return [DEFAULT_T2I_PROMPTS[i % len(DEFAULT_T2I_PROMPTS)] for i in range(images)]


def fitting_prompts(prompts: list[str], encoder) -> list[str]:
    """The prompts, each shortened by whole words until it fits the graphs' prompt length."""
    out = []
    for prompt in prompts:
        words = prompt.split()
        while True:
            try:
                encoder.encode([" ".join(words)])
                break
            except BitDanceError:
                if len(words) == 1:
                    raise BitDanceError(
                        f"max_text_tokens={encoder.cfg.max_text_tokens} holds no calibration "
                        "prompt (even one word is too long with the chat template)"
                    ) from None
                words = words[:-1]
        out.append(" ".join(words))
    return out


def capture_export(fp32_export, precision: str, progress: bool = True) -> Path:
    """The export an ONNX Runtime capture runs: the FP32 export itself, or its FP16 variant (derived,
    or reused when up to date)."""
    if fp32_export is None:
        raise BitDanceError(
            "an onnxruntime capture needs the model's FP32 export (to run it, or derive its FP16 "
            "graphs): pass it, or capture with the torch backend"
        )
    if precision == "fp32":
        return Path(fp32_export)
    return precision_export(fp32_export, precision, progress=progress).directory


def calibration_for(
    cfg,
    source: str,
    steps: int,
    scale: float,
    schedule: str,
    load_model,
    directory=None,
    progress: bool = True,
    prompt_encoder=None,
    fp32_export=None,
    capture_backend: str | None = None,
    capture_precision: str | None = None,
    threads: int | None = None,
    providers=None,
    ready_export=None,
):
    """The calibration set in `directory` (validated against the model and weights), or the cached
    default set, captured first when missing: DEFAULT_CALIBRATION_IMAGES images (text-to-image:
    DEFAULT_T2I_PROMPTS, encoded by `prompt_encoder`), seed 0.

    The default set is captured as `bitdance-rt calibrate` captures by default (calibration.capture_choice:
    the torch reference for ImageNet models, ONNX Runtime on the FP16 graphs of `fp32_export` for
    text-to-image models; `capture_backend` / `capture_precision` choose otherwise). A cached set is
    reused only when it was captured from that same model (its key's producer: backend, precision
    and export digest); else it is captured again. `ready_export`: capture with ONNX Runtime on that
    export as it is (a text-to-image model's streamed FP16 graphs: no FP32 export to derive them from)."""
    from ..calibration import capture, load_calibration, save_calibration
    from ..calibration.producer import (
        TORCH_PRODUCER,
        capture_choice,
        describe_producer,
        export_producer,
        ort_capture_backend,
        set_producer,
    )
    from ..export.manifest import read_manifest

    if directory is not None:
        return load_calibration(directory, config=cfg, weights=source)
    if ready_export is not None:
        export = Path(ready_export)
        backend_name, precision = "onnxruntime", read_manifest(export).get("precision", "fp32")
    else:
        backend_name, precision = capture_choice(prompt_encoder is not None, capture_backend, capture_precision)
        export = capture_export(fp32_export, precision, progress) if backend_name == "onnxruntime" else None
    want = export_producer(backend_name, read_manifest(export)) if export is not None else dict(TORCH_PRODUCER)
    path = default_calibration_dir(cfg, source, steps, backend_name, precision)
    if (path / "calibration.json").is_file():
        try:
            found = load_calibration(path, config=cfg, weights=source, steps=steps)
            if set_producer(found.key) == want:
                return found
            logger.info(
                "calibration cache %s: captured with %s, not %s; capturing it again",
                path,
                describe_producer(set_producer(found.key)),
                describe_producer(want, export),
            )
        except BitDanceError as exc:
            logger.info("calibration cache %s: %s; capturing it again", path, exc)
    if prompt_encoder is not None:
        labels, prompts = None, prompt_encoder.encode(fitting_prompts(default_prompts(), prompt_encoder))
        images = len(prompts)
    else:
        labels, prompts = default_labels(cfg), None
        images = len(labels)
    logger.info(
        "INT8 calibration: no --calibration given, capturing %d images of %s with %s into %s (once; pass "
        "--calibration DIR from `bitdance-rt calibrate` to choose the data)",
        images,
        cfg.name,
        describe_producer(want, export),
        path,
    )
    policy = default_policy(cfg, images)
    if export is not None:
        backend = ort_capture_backend(
            export, threads=threads, providers=providers, expect_config=cfg, expect_source=source
        )
        try:
            result = capture(
                None,
                source,
                labels,
                [0],
                steps,
                scale,
                schedule,
                policy,
                DEFAULT_CAPTURE_BATCH,
                progress=progress,
                prompts=prompts,
                backend=backend,
                origin={"export_dir": str(export)},
            )
        finally:
            backend.close()
    else:
        result = capture(
            load_model(),
            source,
            labels,
            [0],
            steps,
            scale,
            schedule,
            policy,
            DEFAULT_CAPTURE_BATCH,
            progress=progress,
            prompts=prompts,
        )
    save_calibration(result.dataset, path, overwrite=True)
    return load_calibration(path, config=cfg, weights=source, steps=steps)


def precision_export(
    fp32_dir,
    precision: str,
    calibration=None,
    method: str = "max",
    out_dir=None,
    progress: bool = True,
    keep_float=(),
    runtime: str | None = None,
):
    """The `precision` variant of an FP32 export (derived, or reused when up to date); `keep_float`:
    INT8 layer names kept in float on top of the policy's (see keep_float_by_stage); `runtime`: the
    backend the graphs are for (INT4's format, policy.int4_format; None: ONNX Runtime)."""
    check_precision(precision)
    if precision == "fp32":
        raise BitDanceError("fp32 needs no variant: it is the export itself")
    check_method(method)
    if keep_float and precision not in ("int8", "int4"):
        raise BitDanceError("--keep-float is for --precision int8 or int4")
    keep = keep_float_by_stage(fp32_dir, keep_float, precision) if keep_float else None
    form = int4_format(runtime)
    if out_dir is None:
        out_dir = variant_dir(fp32_dir, precision, calibration, method, keep_float, form)
    return derive_export(
        fp32_dir, Path(out_dir), precision, calibration, method, keep_float=keep, progress=progress, int4_format=form
    )
