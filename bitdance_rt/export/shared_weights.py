"""Store a weight once on disk when several stage graphs hold it (the head: head_step and the fused
head sampler run the same net), and the streamed external-data helpers every graph pass uses.

Each graph is exported on its own, so a weight two graphs read is in both files. `share_weights`
finds initializers with equal contents in two or more graphs and moves them into one external-data
file, `SHARED_WEIGHTS`, that every such graph points into; ONNX Runtime and TensorRT's parser read
it like any external data. Graphs over 2 GB (the 14B model's text embedding, 3.1 GB, and its
backbone) cannot be serialised by protobuf, so no pass here loads a graph's external weights:
graphs are read with `load_external_data=False`, tensors are sized from their dims, hashed and
copied in chunks between the data files (`read_chunks`, `DataWriter`), and shape inference runs on
a skeleton (skeleton.py: large tensors' data dropped, dims and types kept).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SHARED_WEIGHTS = "shared.weights"
# Small tensors (norms' scalars, shape constants) stay in their graphs: sharing them saves nothing and
# keeps the graphs' constants where optimisers look for them.
MIN_BYTES = 1024
_ALIGN = 4096  # offsets in the shared file are page-aligned, so that a runtime may map it
# Above this a graph's own tensors go to an external data file (protobuf's 2 GB limit): every writer of
# graphs (export, FP16 / BF16 / INT8 / INT4 variants) and the plan read this one figure.
EXTERNAL_DATA_BYTES = 1_500_000_000
CHUNK_BYTES = 1 << 26  # 64 MiB: what a streamed copy, hash or conversion holds at once
SKELETON_BYTES = 1 << 20  # tensors at least this large leave a skeleton (shape constants are far smaller)
EXTERNAL = 1  # onnx.TensorProto.DataLocation
STRING = 8  # onnx.TensorProto.STRING
PACKED_4BIT = (21, 22, 23)  # onnx.TensorProto UINT4, INT4, FLOAT4E2M1


# ---- external data, streamed ---------------------------------------------------------------------
def tensor_nbytes(tensor) -> int:
    """A tensor's data size from its dims and type, without touching (or copying) its data."""
    from onnx import helper

    if tensor.data_type == STRING:
        return sum(len(s) for s in tensor.string_data)
    n = 1
    for d in tensor.dims:
        n *= d
    if tensor.data_type in PACKED_4BIT:  # two values a byte
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def is_external(tensor) -> bool:
    return tensor.data_location == EXTERNAL


def external_info(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def point_to(tensor, location: str, offset: int, length: int) -> None:
    """Make `tensor` read `length` bytes at `offset` of the external file `location` (data fields cleared)."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, str(v)


def make_inline(tensor, data: bytes) -> None:
    """Store `data` (raw little-endian bytes) in the tensor itself."""
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = data


def external_file(base: Path, tensor) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor's external data, its file beside the graph in `base`."""
    info = external_info(tensor)
    location = info.get("location", "")
    path = (Path(base) / location).resolve()
    if not location or Path(location).is_absolute() or Path(base).resolve() not in path.parents:
        raise ValueError(f"tensor {tensor.name!r}: external data location {location!r} is not a file beside its graph")
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else tensor_nbytes(tensor)
    return path, offset, length


def read_chunks(tensor, base: Path | None, chunk: int = CHUNK_BYTES):
    """The raw bytes of a tensor (inline, or external relative to `base`), in chunks of at most `chunk`
    bytes (a multiple of 8: whole elements of every numeric type). External data is read from its file
    piece by piece; inline data is the tensor's own (typed fields converted once, they are small)."""
    if is_external(tensor):
        if base is None:
            raise ValueError(f"tensor {tensor.name!r} keeps its data in an external file, and no directory was given")
        path, offset, length = external_file(base, tensor)
        buffer = bytearray(min(chunk, max(length, 1)))
        with open(path, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                view = memoryview(buffer)[: min(left, len(buffer))]
                got = 0
                while got < len(view):  # (whole chunks: a short read would split an element)
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError(
                            f"tensor {tensor.name!r}: {path.name} ends {left - got} bytes short of its data"
                        )
                    got += n
                yield view
                left -= got
        return
    if tensor.HasField("raw_data"):
        data = tensor.raw_data
    else:
        from onnx import numpy_helper

        data = numpy_helper.to_array(tensor).tobytes()
    for start in range(0, len(data), chunk):
        yield memoryview(data)[start : start + chunk]


def read_bytes(tensor, base: Path | None) -> bytes:
    """The raw bytes of a (small) tensor, inline or external."""
    return b"".join(bytes(c) for c in read_chunks(tensor, base))


def tensor_sha256(tensor, base: Path | None) -> str:
    h = hashlib.sha256()
    for piece in read_chunks(tensor, base):
        h.update(piece)
    return h.hexdigest()


class DataWriter:
    """Append tensors' data to one external-data file, each at a page-aligned offset. A chunk of zeros
    becomes a hole (a sparse file reads zeros there), so zero-filled tables cost no disk writes."""

    def __init__(self, path: Path, location: str | None = None):
        self.path, self.location = Path(path), location or Path(path).name
        self._f = open(self.path, "wb")
        self._end = 0

    def add(self, chunks) -> tuple[int, int]:
        """Write the chunks (bytes-like) as one tensor's data; returns (offset, length)."""
        import numpy as np

        offset = self._end + (-self._end % _ALIGN)
        self._f.seek(offset)
        length = 0
        for piece in chunks:
            n = len(piece)
            if n and not np.frombuffer(piece, np.uint8).any():
                self._f.seek(n, os.SEEK_CUR)
            else:
                self._f.write(piece)
            length += n
        self._end = offset + length
        return offset, length

    def put(self, tensor, chunks) -> None:
        """Write a tensor's data and point the tensor at it."""
        offset, length = self.add(chunks)
        point_to(tensor, self.location, offset, length)

    def close(self) -> None:
        if not self._f.closed:
            self._f.truncate(self._end)  # (a trailing hole still counts in the file's size)
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def save_streamed(model, dst: Path, fills, external_bytes: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Save `model` as `dst`, filling its placeholders from `fills` ([(placeholder, chunks)], the
    chunks produced one at a time); returns the files written: dst's name, plus dst.name + ".data"
    when the tensors are over `external_bytes` (then every tensor of MIN_BYTES or more goes there,
    as onnx.save_model(save_as_external_data) would put it). No ModelProto over 2 GB is serialised."""
    import onnx

    dst = Path(dst)
    if sum(tensor_nbytes(t) for t, _ in tensors(model.graph)) <= external_bytes:
        for holder, chunks in fills:  # (bytes(c): a file reader may reuse its buffer)
            make_inline(holder, b"".join(bytes(c) for c in chunks))
        onnx.save_model(model, str(dst))
        return [dst.name]
    data = dst.name + ".data"
    with DataWriter(dst.parent / data) as writer:
        for holder, chunks in fills:
            writer.put(holder, chunks)
        for t, init in tensors(model.graph):
            if init and not is_external(t) and t.data_type != STRING and tensor_nbytes(t) >= MIN_BYTES:
                writer.put(t, [read_bytes(t, None)])
    onnx.save_model(model, str(dst))
    return [dst.name, data]


def tensors(graph):
    """Every TensorProto of a graph that may hold data: initializers and node attributes (Constant
    values), subgraphs included, as (tensor, is_initializer)."""
    for t in graph.initializer:
        yield t, True
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t, False
            for t in attr.tensors:
                yield t, False
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from tensors(g)


def placeholder(tensor, marks: dict | None = None):
    """A data-less stand-in of `tensor` (name, dims, type; external data at a location no file has) for
    shape inference. `marks`: extra external_data entries that identify it later."""
    import onnx

    out = onnx.TensorProto(data_type=tensor.data_type, dims=tensor.dims, data_location=EXTERNAL)
    for field in ("name", "doc_string"):
        if tensor.HasField(field):
            setattr(out, field, getattr(tensor, field))
    for k, v in {"location": "<stripped>", **(marks or {})}.items():
        entry = out.external_data.add()
        entry.key, entry.value = k, str(v)
    return out


# ---- sharing ---------------------------------------------------------------------------------------
def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def share_weights(
    directory: Path, stage_files: dict[str, list[str]], min_bytes: int = MIN_BYTES
) -> dict[str, list[str]]:
    """Rewrite the graphs in `directory` so that weights held by several of them are stored once, in
    directory/SHARED_WEIGHTS. Returns the stage file lists (SHARED_WEIGHTS added where a graph reads
    it). Graphs already reading a SHARED_WEIGHTS file (copied from the FP32 export into a derived
    one) are rewritten against the new one, which replaces it at the end.

    Initializers are equal when dtype, shape and bytes are; each graph points into the shared file
    through the ONNX external data fields (location, offset, length). Works on graphs of any size:
    weights are never loaded whole (see the module docstring); only tensors whose dtype and shape
    another graph also has are hashed. Protobuf cannot serialise a message over 2 GB, and
    `ModelProto.ByteSize()`, `onnx.shape_inference.infer_shapes` and `onnx.save_model` without
    external data all serialise the whole message: sharing two 2.2 GB graphs this way peaked at
    0.16 GB and took 11 s, where loading them took 6.5 GB and 52 s."""
    import onnx

    directory = Path(directory)
    sizes: dict[str, dict[str, tuple]] = {}  # stage -> {initializer: (dtype, dims)}
    for stage, files in stage_files.items():  # one graph's skeleton in memory at a time
        graph = _load(directory / files[0]).graph
        sizes[stage] = {
            t.name: (t.data_type, tuple(t.dims))
            for t in graph.initializer
            if t.data_type != STRING and tensor_nbytes(t) >= min_bytes
        }
    holders: dict[tuple, set[str]] = {}
    for stage, named in sizes.items():
        for shape in named.values():
            holders.setdefault(shape, set()).add(stage)
    keys: dict[tuple[str, str], tuple] = {}  # (stage, initializer) -> (dtype, dims, sha256), candidates only
    owners: dict[tuple, set[str]] = {}
    for stage, named in sizes.items():
        wanted = {name for name, shape in named.items() if len(holders[shape]) > 1}
        if not wanted:
            continue
        for tensor in _load(directory / stage_files[stage][0]).graph.initializer:
            if tensor.name in wanted:
                key = (*named[tensor.name], tensor_sha256(tensor, directory))
                keys[(stage, tensor.name)] = key
                owners.setdefault(key, set()).add(stage)
    shared = {key for key, stages in owners.items() if len(stages) > 1}
    readers = {stage for stage, files in stage_files.items() if SHARED_WEIGHTS in files}
    touched = readers | {stage for key in shared for stage in owners[key]}
    if not touched:
        return stage_files
    out, offsets = dict(stage_files), {}
    with DataWriter(directory / (SHARED_WEIGHTS + ".new"), SHARED_WEIGHTS) as blob:
        for stage in stage_files:
            if stage in touched:
                own, reads = _rewrite(
                    directory,
                    stage,
                    stage_files[stage],
                    {n: k for (s, n), k in keys.items() if s == stage and k in shared},
                    offsets,
                    blob,
                )
                out[stage] = own + [SHARED_WEIGHTS] if reads else own
    if offsets:
        os.replace(blob.path, directory / SHARED_WEIGHTS)
    else:
        blob.path.unlink()
        (directory / SHARED_WEIGHTS).unlink(missing_ok=True)
    for stage in touched:
        onnx.checker.check_model(str(directory / out[stage][0]), full_check=True)
    return out


def _rewrite(
    directory: Path, stage: str, files: list[str], shared: dict[str, tuple], offsets: dict, blob: DataWriter
) -> tuple[list[str], bool]:
    """Point one graph's shared initializers (`shared`: name -> key) into `blob`, writing those not yet
    there. Its other external tensors (initialisers, and Constant attributes, which a quantiser may
    store externally too) are copied anew, chunk by chunk, to its own data file when it had one or
    when they are too large for one protobuf, else brought into the graph (its own data file is left
    as it is when none of its tensors moved). Returns (its own files, whether it reads SHARED_WEIGHTS)."""
    import onnx

    path = directory / files[0]
    model = _load(path)
    own_data = [f for f in files[1:] if f != SHARED_WEIGHTS]
    location = own_data[0] if own_data else f"{stage}.onnx.data"
    left_own = False  # a tensor of the graph's own data file moves to the shared one
    for tensor in model.graph.initializer:
        key = shared.get(tensor.name)
        if key is None:
            continue
        if key not in offsets:
            offsets[key] = blob.add(read_chunks(tensor, directory))
        left_own |= is_external(tensor) and external_info(tensor).get("location") in own_data
        point_to(tensor, SHARED_WEIGHTS, *offsets[key])
    rest = [t for t, init in tensors(model.graph) if not (init and t.name in shared)]
    staying = [t for t in rest if is_external(t)]  # external tensors that stay the graph's own
    if not staying or (not own_data and sum(tensor_nbytes(t) for t in rest) <= EXTERNAL_DATA_BYTES):
        for t in staying:  # small enough: the graph holds them itself
            make_inline(t, read_bytes(t, directory))
        for name in own_data:
            os.remove(directory / name)
        onnx.save_model(model, str(path))
        return [files[0]], bool(shared)
    if left_own or own_data != [location] or any(external_info(t).get("location") != location for t in staying):
        with DataWriter(directory / (location + ".new"), location) as own:  # its own data file, anew
            for t in staying:
                own.put(t, read_chunks(t, directory))
        for name in own_data:
            os.remove(directory / name)
        os.replace(own.path, directory / location)
    onnx.save_model(model, str(path))
    return [files[0], location], bool(shared)
