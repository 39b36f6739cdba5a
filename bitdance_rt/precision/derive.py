"""An FP32 export directory -> an FP16, BF16, INT8 or INT4 export directory of the same stages and contract.

A precision variant is an ordinary export directory (same stage files, same manifest format, same
float32 inputs/outputs), so every backend loads it unchanged; its manifest adds a top-level
"precision" and, in its key, what it was derived from: the FP32 export's key and, for INT8, the
calibration set's identity and the method. Reuse follows the key, as for FP32 exports. Which
stages INT8 quantises, and why not the fused head samplers: the comment at INT8_STAGES.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from .. import stages as st
from ..errors import BitDanceError
from ..export.shared_weights import EXTERNAL_DATA_BYTES, share_weights
from ..export.manifest import MANIFEST, manifest_config, read_manifest, stage_files, verify_files
from .policy import (
    INT4_BLOCK,
    INT4_FORMATS,
    INT4_FP16_STAGES,
    INT8_FP16_STAGES,
    check_method,
    check_precision,
    fingerprint,
    int4_layers,
    int8_float_layers,
    quantised_layers,
)

# INT8 covers the stages a calibration set has data for and that carry weight GEMMs: token_embed, the
# backbone (calibrated on both its phases, see calibration/reader.py), head_step, decoder. prefix_embed,
# a table lookup, is carried as its FP16 graph (policy.INT8_FP16_STAGES), so that an INT8 export
# generates on its own. The fused head samplers are not quantised: calibrating one means recording every
# intermediate of S+1 unrolled head nets (minutes for the tiny model, far more for real ones), so INT8
# generation samples with head_step (the ONNX Runtime backend falls back to it by itself; measured ~10%
# slower than the fused graph in FP32). The encoder, which generation does not use and calibration does
# not record, is left out.
INT8_STAGES = st.INT8_STAGES  # (stages.REGISTRY)
FP16_STAGES = st.ALL_STAGES


def graph_precision(manifest: dict) -> str:
    return manifest.get("precision", "fp32")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def derived_key(
    fp32_manifest: dict,
    precision: str,
    stages,
    calibration=None,
    method: str | None = None,
    keep_float: dict | None = None,
    int4_format: str = "matmulnbits",
) -> dict:
    key = {
        **fp32_manifest["key"],
        "stages": sorted(stages),
        "precision": precision,
        "derived_from": _digest(fp32_manifest["key"]),
        "policy": fingerprint(precision, int4_format),
    }
    if precision == "int8":
        key["calibration"] = {
            "set": _digest(calibration.key),
            "method": method,
            "samples": {s: len(v) for s, v in sorted(calibration.samples.items())},
        }
    if precision in ("int8", "int4"):
        key["keep_float"] = {s: sorted(v) for s, v in sorted((keep_float or {}).items()) if v}
    return key


def int8_layers(fp32_dir: Path, manifest: dict, stages) -> dict[str, list[str]]:
    """{stage: names of its quantisable layers} for the INT8 stages among `stages` of an FP32 export."""
    return {
        s: quantised_layers(Path(fp32_dir) / stage_files(manifest, fp32_dir, s)[0]) for s in stages if s in INT8_STAGES
    }


def _load_source(fp32_dir: Path, precision: str, int4_format: str) -> dict:
    """The manifest of the export a variant is derived from, its files verified: an FP32 export, or for
    TensorRT's INT4 (FP16 graphs with INT4 weights) an FP16 one (the FP16 variant; text-to-image: streamed
    from the weight files, with no FP32 export on the way)."""
    manifest = read_manifest(fp32_dir)
    held = graph_precision(manifest)
    qdq = precision == "int4" and int4_format == "qdq"
    if held != ("fp16" if qdq else "fp32"):
        raise BitDanceError(
            f"{fp32_dir / MANIFEST}: holds {held} graphs; derive precision variants from an FP32 export "
            "(bitdance-rt export), TensorRT's INT4 graphs from an FP16 one (export --precision fp16)"
        )
    verify_files(fp32_dir, manifest, hashes=True)
    return manifest


def _check_calibration(calibration, fp32_dir: Path, manifest: dict) -> None:
    from ..calibration.dataset import check_identity

    if calibration is None:
        raise BitDanceError("INT8 needs a calibration set (bitdance-rt calibrate --out DIR)")
    where = Path(getattr(calibration, "directory", None) or "the calibration set")
    check_identity(calibration.key, where, manifest_config(manifest, fp32_dir), manifest["key"]["checkpoint"])
    # a graph that serves several phases is calibrated on all of them (ranges of one would clip the other)
    for stage in (s for s in manifest["key"]["stages"] if s in INT8_STAGES):
        empty = [p for p, n in calibration.phase_counts(stage).items() if n == 0]
        if empty:
            raise BitDanceError(
                f"{where}: no {stage} samples of its {' / '.join(empty)} phase; capture the set "
                "again (bitdance-rt calibrate)"
            )


def onnx_graph(path):
    """The graph of ONNX file `path`, read without its weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False).graph


def _work_order(stages, precision: str) -> list[str]:
    """The order stages are converted in: the quick ones first, so that a failure of any kind
    surfaces before hours of work. INT8 calibrates and quantises its stages (the backbone: hours for
    the large models) after converting the stages it carries in FP16 (minutes, even for the 14B
    model's 3.1 GB text embedding); within each group, the export's order."""
    if precision != "int8":
        return list(stages)
    return [s for s in stages if s not in INT8_STAGES] + [s for s in stages if s in INT8_STAGES]


def _check(path: Path, stage: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BitDanceError(f"stage {stage}: the converted graph fails the ONNX checks: {first}") from exc


def derive_export(
    fp32_dir,
    out_dir,
    precision: str,
    calibration=None,
    method: str = "max",
    keep_float: dict | None = None,
    force: bool = False,
    progress: bool = True,
    int4_format: str = "matmulnbits",
):
    """Write the `precision` variant of the FP32 export `fp32_dir` into `out_dir` (or reuse it).

    `calibration`: a CalibrationSet (INT8). `keep_float`: {stage: [node names]} kept out of
    quantisation (the sensitivity sweep's lever), on top of the policy's INT8_FLOAT_LAYERS.
    `int4_format`: "matmulnbits" (ONNX Runtime) or "qdq" (TensorRT; policy.INT4_FORMATS).

    Graphs of any size: every pass streams weights through external data (graphs over 1.5 GB keep
    theirs in <stage>.onnx.data, as exports do) and never serialises a graph over protobuf's 2 GB;
    stages are done cheapest first (`_work_order`)."""
    from ..export.onnx_export import ExportResult, export_work_dir, find_reusable, install_export, write_error
    from .fp16 import convert_fp16_file
    from .int8 import quantize_int8

    fp32_dir, out_dir = Path(fp32_dir), Path(out_dir)
    check_precision(precision)
    if precision == "fp32":
        raise BitDanceError("fp32 is the export itself: use the FP32 export directory")
    manifest = _load_source(fp32_dir, precision, int4_format)
    available = list(manifest["key"]["stages"])
    if precision == "int8":
        check_method(method)
        _check_calibration(calibration, fp32_dir, manifest)
        stages = [s for s in available if s in INT8_STAGES or s in INT8_FP16_STAGES]
        if st.HEAD_STEP not in stages:
            raise BitDanceError(
                f"{fp32_dir} has no head_step graph, which INT8 generation samples with; "
                "re-export with it (bitdance-rt export, all stages)"
            )
    elif precision == "int4":
        if calibration is not None:
            raise BitDanceError("INT4 is weight-only (round to nearest): it takes no calibration set")
        stages = [s for s in available if s in st.INT4_STAGES or s in INT4_FP16_STAGES]
    else:  # fp16, bf16
        stages = [s for s in available if s in FP16_STAGES]
    quantised = [s for s in stages if s in {"int8": INT8_STAGES, "int4": st.INT4_STAGES}.get(precision, ())]
    unknown = sorted(set(keep_float or {}) - set(quantised))
    if unknown:  # (a keep-float list for another stage would be dropped without a word)
        raise BitDanceError(
            f"keep_float names {', '.join(unknown)}, which this {precision} variant does not quantise "
            f"(its INT8 stages: {', '.join(quantised) or 'none'})"
        )
    keep_float = {s: list(v) for s, v in (keep_float or {}).items()}
    if precision == "int8":  # the policy's float layers join the caller's
        for stage, layers in int8_layers(fp32_dir, manifest, stages).items():
            policy = int8_float_layers(stage, layers)
            if policy:
                keep_float[stage] = sorted(set(keep_float.get(stage, [])) | set(policy))
    if int4_format not in INT4_FORMATS.values():
        raise BitDanceError(f"INT4 format {int4_format!r}: use one of {', '.join(INT4_FORMATS.values())}")
    key = derived_key(manifest, precision, stages, calibration, method, keep_float, int4_format)
    if not force and (found := find_reusable(out_dir, key)) is not None:
        return ExportResult(out_dir, found, True)
    try:  # locked: a killed derivation's directory is swept by the next export or reuse here
        workdir = export_work_dir(out_dir.parent, f".{out_dir.name}.{precision}-")
    except OSError as exc:
        raise write_error(exc, f"the {precision} graphs", out_dir.parent) from None
    work = workdir.path
    left: dict[str, list[str]] = {}
    try:
        files: dict[str, list[str]] = {}
        bar = tqdm(
            _work_order(stages, precision),
            desc=f"{precision.upper()} graphs",
            unit="stage",
            leave=False,
            disable=not progress,
        )
        for stage in bar:
            bar.set_postfix_str(stage)
            held = stage_files(manifest, fp32_dir, stage)
            src, big = fp32_dir / held[0], len(held) > 1  # (big: weights in an external file)
            dst = work / f"{stage}.onnx"
            if stage in quantised and precision == "int4":
                from .int4 import quantize_int4, quantize_int4_qdq, weight_matmuls

                graph = onnx_graph(src)
                nodes = [n for n in int4_layers(stage, weight_matmuls(graph)) if n not in keep_float.get(stage, ())]
                if int4_format == "qdq":  # (weights kept external as the FP16 graph's are: streamed, never inline)
                    left[stage], files[stage] = quantize_int4_qdq(src, dst, nodes, 0 if big else EXTERNAL_DATA_BYTES)
                else:
                    quantize_int4(src, dst, nodes, INT4_BLOCK, external_data=big)
                    files[stage] = [dst.name] + ([f"{dst.name}.data"] if big else [])
            elif precision == "int4" and int4_format == "qdq":  # (from FP16 graphs: the FP16 stages as they are)
                from .int4 import quantize_int4_qdq

                _, files[stage] = quantize_int4_qdq(src, dst, [], 0 if big else EXTERNAL_DATA_BYTES, opset=None)
            elif precision == "bf16":  # (the FP16 placement in BFLOAT16: bf16.py)
                from .bf16 import convert_bf16_file

                files[stage] = convert_bf16_file(
                    src, dst, sampler=stage in st.SAMPLER_STAGES, external_bytes=EXTERNAL_DATA_BYTES
                )
            elif precision == "fp16" or stage not in quantised:  # (INT8/INT4_FP16_STAGES: the FP16 variant's)
                files[stage] = convert_fp16_file(
                    src,
                    dst,
                    sampler=precision == "fp16" and stage in st.SAMPLER_STAGES,
                    external_bytes=EXTERNAL_DATA_BYTES,
                )
            else:
                quantize_int8(src, dst, calibration.reader(stage), method, keep_float.get(stage, ()), external_data=big)
                files[stage] = [dst.name] + sorted(
                    p.name for p in work.iterdir() if p.name.startswith(dst.name + ".") or p.name == f"{stage}.data"
                )
            _check(dst, stage)
        files = {s: files[s] for s in stages}  # (the manifest lists them in the export's order)
        files = share_weights(work, files)  # FP16: the head of head_step and the sampler once again
        new = {
            "key": key,
            "precision": precision,
            "stages": {s: manifest["stages"][s] for s in stages},
            "versions": {**manifest.get("versions", {}), **_versions()},
        }
        if precision in ("int8", "int4"):
            new["fp16_stages"] = [s for s in stages if s not in quantised]
        if precision == "int4":
            new["int4_format"] = int4_format
            if any(left.values()):  # (qdq: layers no TensorRT block size fits)
                new["int4_fp16_layers"] = {s: v for s, v in left.items() if v}
        if precision == "int8":
            new["calibration_method"] = method
            # one graph for every runtime: ONNX Runtime picks exact kernels for the CPU it runs on
            # (runtime/int8_kernels.py), so this is provenance, not a condition of use
            from ..runtime.int8_kernels import cpu_summary

            new["derived_on"] = cpu_summary()
        return ExportResult(out_dir, install_export(work, out_dir, new, files), False)
    except OSError as exc:
        raise write_error(exc, f"the {precision} graphs", out_dir) from None
    finally:
        workdir.remove()


def _versions() -> dict:
    import onnx

    out = {"onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import onnxconverter_common

        out["onnxconverter_common"] = onnxconverter_common.__version__
    except (ImportError, AttributeError):
        pass
    return out
