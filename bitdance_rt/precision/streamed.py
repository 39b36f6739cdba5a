"""FP16, BF16 and INT8 graphs straight from the weight files: no FP32 export, no float32 model, on the way.

The stage is traced weightless (export/weightless.py), converted to FP16 by the same converter and
policy as a derived FP16 variant (precision/fp16.py: FP32 norms' squares, sampler arithmetic), and
only then are the weights streamed in, each chunk rounded to FP16 as the derivation rounds it
(`to_fp16`). So a 14B checkpoint in BF16 becomes FP16 graphs with one tensor in memory at a time,
and the graphs compute what the FP16 variant of an FP32 export computes. BF16 likewise, with the
converter and retyping of a derived BF16 variant (precision/bf16.py), each chunk rounded by `to_bf16`
from the original values (a BF16 checkpoint's pass through exactly). INT8 likewise: the INT8
stages are quantised by precision/streamed_int8.py from activation ranges (one calibration cache per
stage), their weights quantised per output channel while they stream, and the stages INT8 does not
quantise (policy.INT8_FP16_STAGES) are FP16 as above; the graphs are those precision/derive.py writes
from an FP32 export, and the manifest reads the same (precision int8, fp16_stages).
"""

from __future__ import annotations

from pathlib import Path

from .. import stages as st
from .bf16 import _HALVES, _convert_bf16, to_bf16
from .fp16 import _convert, _data, _stashed, _strip, to_fp16
from .policy import INT8_FP16_STAGES, check_precision, fingerprint

STREAMED_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def export_precision_streamed(
    model, source, out_dir, source_id: str, precision: str, ranges=None, keep_float: dict | None = None, **options
):
    """Export the weightless `model` with weights from `source` (export/weightless.py) as `precision`
    graphs into out_dir, or reuse a matching export; options as export_streamed's.

    INT8: `ranges` {stage: activation-range file (int8.activation_ranges' calibration cache of that
    stage's FP32 graph)} for every INT8 stage exported; `keep_float` {stage: [node names]} kept float
    on top of the policy's INT8_FLOAT_LAYERS. The stages are the INT8 and INT8_FP16 ones among
    `stages` (head_step included: INT8 generation samples with it), as in a derived INT8 variant."""
    from ..errors import BitDanceError
    from ..export.streamed import export_streamed

    check_precision(precision)
    if precision not in STREAMED_PRECISIONS:
        raise BitDanceError(f"precision {precision}: streamed exports write {' or '.join(STREAMED_PRECISIONS)} graphs")
    if precision != "int8" and (ranges or keep_float):
        raise BitDanceError(f"activation ranges and keep-float are for precision int8, not {precision}")
    if precision == "fp32":
        return export_streamed(model, source, out_dir, source_id, **options)
    if precision == "int8":
        return _export_int8(model, source, out_dir, source_id, ranges or {}, keep_float or {}, **options)

    def convert(graph, spec):
        return convert_fp16_streamed(graph, sampler=spec.name in st.SAMPLER_STAGES, precision=precision)

    return export_streamed(
        model,
        source,
        out_dir,
        source_id,
        precision=precision,
        graph_pass=convert,
        to_half=to_bf16 if precision == "bf16" else to_fp16,
        key_extra={"policy": fingerprint(precision)},
        **options,
    )


def _export_int8(model, source, out_dir, source_id: str, ranges: dict, keep_float: dict, **options):
    """The streamed INT8 export (export_precision_streamed's precision int8)."""
    from ..errors import BitDanceError
    from ..export.streamed import export_streamed
    from ..fileio import file_sha256
    from ..runtime.int8_kernels import cpu_summary
    from .streamed_int8 import Int8Weights, quantize_streamed, read_ranges

    stages = [s for s in options.pop("stages", st.ALL_STAGES) if s in st.INT8_STAGES or s in INT8_FP16_STAGES]
    if st.HEAD_STEP not in stages:
        raise BitDanceError("an INT8 export needs the head_step stage, which INT8 generation samples with")
    quantised = [s for s in stages if s in st.INT8_STAGES]
    for what, given in (("activation ranges", ranges), ("keep_float", keep_float)):
        unknown = sorted(set(given) - set(st.INT8_STAGES))
        if unknown:
            raise BitDanceError(
                f"{what} for {', '.join(unknown)}, which INT8 does not quantise (its stages: "
                f"{', '.join(st.INT8_STAGES)})"
            )
    missing = [s for s in quantised if s not in ranges]
    if missing:
        raise BitDanceError(f"no activation ranges for INT8 stage(s) {', '.join(missing)}")
    ranges = {s: Path(ranges[s]) for s in quantised}
    methods = {s: read_ranges(path)[1] for s, path in ranges.items()}
    if len(set(methods.values())) > 1:
        raise BitDanceError(f"activation ranges of different calibration methods: {methods}")
    method = next(iter(methods.values()))
    weights = Int8Weights()

    def convert(graph, spec):
        if spec.name in quantised:
            return quantize_streamed(
                graph, spec.name, ranges[spec.name], keep_float.get(spec.name, ()), source, weights
            )
        return convert_fp16_streamed(graph, sampler=False)  # (policy.INT8_FP16_STAGES: the FP16 variant's graph)

    return export_streamed(
        model,
        source,
        out_dir,
        source_id,
        stages=stages,
        precision="int8",
        graph_pass=convert,
        to_half=to_fp16,
        to_int8=weights,
        key_extra={
            "policy": fingerprint("int8"),
            "calibration": {"method": method, "ranges": {s: file_sha256(path) for s, path in ranges.items()}},
            "keep_float": {s: sorted(v) for s, v in sorted(keep_float.items()) if v},
        },
        manifest_extra={
            "calibration_method": method,
            "fp16_stages": [s for s in stages if s not in st.INT8_STAGES],
            "derived_on": cpu_summary(),  # (provenance, as a derived variant's)
        },
        **options,
    )


def convert_fp16_streamed(graph, sampler: bool, precision: str = "fp16"):
    """The FP16 (precision "bf16": BF16, bf16.py's) conversion of a traced graph whose weights are source
    placeholders: the converter sees the same skeleton as in a derivation (fp16._strip: large constants
    stashed too); afterwards a weight's placeholder keeps its source (written later, in FP16 / BF16
    where the converter said so) and a large constant gets its converted data back."""
    from ..export.shared_weights import external_info, make_inline
    from ..export.weightless import SOURCE, TRANSPOSED

    convert, halves = (_convert_bf16, _HALVES) if precision == "bf16" else (_convert, None)
    skeleton, stash = _strip(graph, None)
    out = convert(skeleton, sampler)
    for holder, original in _stashed(out, stash):
        marks = external_info(original)
        if SOURCE in marks:
            kept = [(e.key, e.value) for e in holder.external_data if e.key == "location"]
            del holder.external_data[:]
            for key, value in kept + [(k, marks[k]) for k in (SOURCE, TRANSPOSED) if k in marks]:
                entry = holder.external_data.add()
                entry.key, entry.value = key, value
        else:
            make_inline(holder, b"".join(bytes(c) for c in _data(holder, original, None, halves)))
    return out
