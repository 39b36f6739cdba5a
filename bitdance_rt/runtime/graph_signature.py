"""A graph's input and output names without reading its weights.

`graph_signature(path)` reads the names of a graph's inputs (initializers excluded) and outputs by
walking the protobuf wire format of the .onnx file and seeking over everything else: nodes,
initializers and their raw data are never read. `onnx.load(path, load_external_data=False)`
parses every embedded initializer (our graphs keep the weights in the .onnx itself up to 1.5 GB);
on a BitDance-B-4x backbone_step graph with embedded weights it took seconds where this takes
milliseconds (numbers in the module's report / README). ONNX Runtime's own `get_inputs()` would
cost nothing once a session exists, but the signature is checked *before* the session is made, so
that a graph of another stage gets a one-line error instead of an ONNX Runtime load.
"""

from __future__ import annotations

import os
from pathlib import Path

# ---- graph signature without the weights ----------------------------------------------------------
# Field numbers from onnx/onnx.proto3.
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_SPARSE_INITIALIZER = 5, 11, 12, 15
_VALUE_INFO_NAME = 1
_TENSOR_NAME = 8
_SPARSE_VALUES = 1


class _Reader:
    """Protobuf wire-format reader over a seekable binary file, bounded to [start, end)."""

    def __init__(self, fh, end: int):
        self.fh, self.end = fh, end

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.fh.read(1)
            if not b:
                raise ValueError("truncated varint")
            result |= (b[0] & 0x7F) << shift
            if b[0] < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def fields(self):
        """Yield (field number, wire type, payload length or None); the caller reads or skips."""
        while self.fh.tell() < self.end:
            tag = self.varint()
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise ValueError("field number 0")
            if wire == 2:
                length = self.varint()
                if self.fh.tell() + length > self.end:
                    raise ValueError(f"field {number} runs past its message ({length} bytes)")
                yield number, wire, length
            elif wire in (0, 1, 5):
                yield number, wire, None
            else:
                raise ValueError(f"unsupported wire type {wire}")
        if self.fh.tell() != self.end:
            raise ValueError("message overruns its length")

    def skip(self, wire: int, length: int | None) -> None:
        if wire == 0:
            self.varint()
        elif wire == 1:
            self.fh.seek(8, os.SEEK_CUR)
        elif wire == 5:
            self.fh.seek(4, os.SEEK_CUR)
        else:
            self.fh.seek(length, os.SEEK_CUR)

    def sub(self, length: int) -> _Reader:
        return _Reader(self.fh, self.fh.tell() + length)


def _string_field(reader: _Reader, wanted: int, nested: int | None = None) -> str | None:
    """The string field `wanted` of the message under `reader` (or of its submessage `nested`),
    every other field skipped unread; leaves the file at the message's end."""
    found = None
    for number, wire, length in reader.fields():
        if wire == 2 and nested is not None and number == nested:
            found = _string_field(reader.sub(length), wanted) or found
        elif wire == 2 and nested is None and number == wanted:
            found = reader.fh.read(length).decode("utf-8")
        else:
            reader.skip(wire, length)
    return found


def graph_signature(path: str | Path) -> tuple[list[str], list[str]]:
    """(input names without initializers, output names) of an ONNX model, in graph order.

    Reads only the small ValueInfo records and the initializers' names: node bodies, embedded
    weights (raw_data, float_data) and external data are seeked over, never read. Raises
    ValueError for a file that is not a well-formed ModelProto with a graph."""
    path = Path(path)
    inputs: list[str] = []
    outputs: list[str] = []
    initializers: set[str] = set()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        model = _Reader(fh, size)
        seen_graph = False
        for number, wire, length in model.fields():
            if number != _MODEL_GRAPH or wire != 2:
                model.skip(wire, length)
                continue
            seen_graph = True  # a repeated message field merges: lists concatenate
            graph = model.sub(length)
            for g_number, g_wire, g_length in graph.fields():
                if g_wire == 2 and g_number in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                    name = _string_field(graph.sub(g_length), _VALUE_INFO_NAME)
                    (inputs if g_number == _GRAPH_INPUT else outputs).append(name or "")
                elif g_wire == 2 and g_number == _GRAPH_INITIALIZER:
                    initializers.add(_string_field(graph.sub(g_length), _TENSOR_NAME) or "")
                elif g_wire == 2 and g_number == _GRAPH_SPARSE_INITIALIZER:
                    initializers.add(_string_field(graph.sub(g_length), _TENSOR_NAME, nested=_SPARSE_VALUES) or "")
                else:
                    graph.skip(g_wire, g_length)
    if not seen_graph:
        raise ValueError("no graph in the model")
    return [n for n in inputs if n not in initializers], outputs


# ---- TensorRT EP profiles ----------------------------------------------------------------------------
