"""Store a weight once on disk when several stage graphs hold it (the head: head_step and the fused
head sampler run the same net).

Each graph is exported on its own, so a weight two graphs read is in both files. This pass finds
initializers with equal contents (dtype, shape and bytes) in two or more graphs and moves them into
one external-data file, `SHARED_WEIGHTS`, that every such graph points into (the ONNX external
data fields: location, offset, length). ONNX Runtime and TensorRT's parser read it like any
external data. Offsets are page-aligned so that a runtime may map the file.

Small tensors (below `MIN_BYTES`: norms' scalars, shape constants) stay in their graphs: sharing
them saves nothing and keeps the graphs' constants where optimisers look for them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SHARED_WEIGHTS = "shared.weights"
MIN_BYTES = 1024
_ALIGN = 4096
_PROTOBUF_BYTES = 1_500_000_000  # above this a graph's own tensors go to external data (protobuf's 2 GB limit)


def _tensor_bytes(tensor, base: Path) -> bytes:
    """The raw little-endian bytes of an initializer, inline or external."""
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(tensor):
        copy = type(tensor)()
        copy.CopyFrom(tensor)
        load_external_data_for_tensor(copy, str(base))
        return copy.raw_data
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def _key(tensor, data: bytes) -> tuple:
    return tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest()


def share_weights(directory: Path, stage_files: dict[str, list[str]], min_bytes: int = MIN_BYTES) -> dict[str, list[str]]:
    """Rewrite the graphs in `directory` so that weights held by several of them are stored once, in
    directory/SHARED_WEIGHTS. Returns the stage file lists (SHARED_WEIGHTS added where a graph reads
    it). Graphs already reading a SHARED_WEIGHTS file (copied from the FP32 export into a derived
    one) are rewritten against the new one, which replaces it at the end."""
    import onnx

    directory = Path(directory)
    owners: dict[tuple, set[str]] = {}
    for stage, files in stage_files.items():  # one graph's weights in memory at a time
        graph = onnx.load(str(directory / files[0]), load_external_data=False)
        for tensor in graph.graph.initializer:
            data = _tensor_bytes(tensor, directory)
            if len(data) >= min_bytes:
                owners.setdefault(_key(tensor, data), set()).add(stage)
    shared = {key for key, stages in owners.items() if len(stages) > 1}
    readers = {stage for stage, files in stage_files.items() if SHARED_WEIGHTS in files}
    touched = readers | {stage for key in shared for stage in owners[key]}
    if not touched:
        return stage_files
    out, offsets = dict(stage_files), {}
    new = directory / (SHARED_WEIGHTS + ".new")
    with open(new, "wb") as blob:
        for stage in stage_files:
            if stage in touched:
                own, reads = _rewrite(directory, stage, stage_files[stage], shared, offsets, blob, min_bytes)
                out[stage] = own + [SHARED_WEIGHTS] if reads else own
    if offsets:
        os.replace(new, directory / SHARED_WEIGHTS)
    else:
        new.unlink()
        (directory / SHARED_WEIGHTS).unlink(missing_ok=True)
    for stage in touched:
        onnx.checker.check_model(str(directory / out[stage][0]), full_check=True)
    return out


def _rewrite(directory: Path, stage: str, files: list[str], shared: set, offsets: dict, blob,
             min_bytes: int) -> tuple[list[str], bool]:
    """Point one graph's shared initializers into `blob` (writing those not yet there). The graph is
    loaded whole first: its other external tensors (initialisers, and Constant attributes, which a
    quantiser may store externally too) are written anew, to its own data file when it had one or
    when they are too large for one protobuf. Returns (its own files, whether it reads SHARED_WEIGHTS)."""
    import onnx

    path = directory / files[0]
    graph = onnx.load(str(path))  # every tensor in memory, external data included
    reads = False
    for tensor in graph.graph.initializer:
        data = _tensor_bytes(tensor, directory)
        key = _key(tensor, data)
        if len(data) < min_bytes or key not in shared:
            continue
        if key not in offsets:
            blob.write(b"\0" * (-blob.tell() % _ALIGN))
            offsets[key] = (blob.tell(), len(data))
            blob.write(data)
        reads = True
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", SHARED_WEIGHTS), ("offset", offsets[key][0]), ("length", offsets[key][1])):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, str(v)
    own_data = [f for f in files[1:] if f != SHARED_WEIGHTS]
    for name in own_data:  # rewritten below, without the shared tensors
        os.remove(directory / name)
    if own_data or graph.ByteSize() > _PROTOBUF_BYTES:
        location = own_data[0] if own_data else f"{stage}.onnx.data"
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location)
        return [files[0], location], reads
    onnx.save_model(graph, str(path))
    return [files[0]], reads
