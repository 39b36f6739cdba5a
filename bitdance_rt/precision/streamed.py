"""FP16 graphs straight from the weight files: no FP32 export, no float32 model, on the way.

The stage is traced weightless (export/weightless.py), converted to FP16 by the same converter and
policy as a derived FP16 variant (precision/fp16.py: FP32 norms' squares, sampler arithmetic), and
only then are the weights streamed in, each chunk rounded to FP16 as the derivation rounds it
(`to_fp16`). So a 14B checkpoint in BF16 becomes FP16 graphs with one tensor in memory at a time,
and the graphs compute what the FP16 variant of an FP32 export computes.
"""

from __future__ import annotations

from .. import stages as st
from .fp16 import _convert, _data, _stashed, _strip, to_fp16
from .policy import check_precision, fingerprint

STREAMED_PRECISIONS = ("fp32", "fp16")


def export_precision_streamed(model, source, out_dir, source_id: str, precision: str, **options):
    """Export the weightless `model` with weights from `source` (export/weightless.py) as `precision`
    graphs (fp32 or fp16) into out_dir, or reuse a matching export; options as export_streamed's."""
    from ..errors import BitDanceError
    from ..export.streamed import export_streamed

    check_precision(precision)
    if precision not in STREAMED_PRECISIONS:
        raise BitDanceError(
            f"precision {precision}: streamed exports write {' or '.join(STREAMED_PRECISIONS)} "
            "graphs; INT8 is derived from an export (bitdance-rt export --precision int8)"
        )
    if precision == "fp32":
        return export_streamed(model, source, out_dir, source_id, **options)

    def convert(graph, spec):
        return convert_fp16_streamed(graph, sampler=spec.name in st.SAMPLER_STAGES)

    return export_streamed(
        model,
        source,
        out_dir,
        source_id,
        precision="fp16",
        graph_pass=convert,
        to_half=to_fp16,
        key_extra={"policy": fingerprint("fp16")},
        **options,
    )


def convert_fp16_streamed(graph, sampler: bool):
    """The FP16 conversion of a traced graph whose weights are source placeholders: the converter sees
    the same skeleton as in a derivation (fp16._strip: large constants stashed too); afterwards a
    weight's placeholder keeps its source (written later, in FP16 where the converter said so) and a
    large constant gets its converted data back."""
    from ..export.shared_weights import external_info, make_inline
    from ..export.weightless import SOURCE, TRANSPOSED

    skeleton, stash = _strip(graph, None)
    out = _convert(skeleton, sampler)
    for holder, original in _stashed(out, stash):
        marks = external_info(original)
        if SOURCE in marks:
            kept = [(e.key, e.value) for e in holder.external_data if e.key == "location"]
            del holder.external_data[:]
            for key, value in kept + [(k, marks[k]) for k in (SOURCE, TRANSPOSED) if k in marks]:
                entry = holder.external_data.add()
                entry.key, entry.value = key, value
        else:
            make_inline(holder, b"".join(bytes(c) for c in _data(holder, original, None)))
    return out
