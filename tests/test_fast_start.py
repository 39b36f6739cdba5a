"""Fast start-up: the persistent file-hash cache (fileio.cached_sha256), graph signatures read
without the weights (runtime/graph_signature.py), and the cache of ONNX Runtime's optimised graphs
(runtime/ort_session.py).
(Over 400 lines: the three caches of a fast start are one subject; the session cache checks its
entries through the file-hash cache.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitdance_rt import fileio

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

from bitdance_rt.runtime import ort_session
from bitdance_rt.runtime.ort_session import graph_signature, make_session

OLD = 1_600_000_000  # an mtime (s) well in the past: not "racy"


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache-root"))


def _file(path: Path, data: bytes, mtime: int = OLD) -> Path:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def hash_spy(monkeypatch):
    """Counts the uncached hashes cached_sha256 asks for (each one reads the whole file)."""
    calls = []
    real = fileio.file_sha256

    def spy(path, *a, **k):
        calls.append(Path(path))
        return real(path, *a, **k)

    monkeypatch.setattr(fileio, "file_sha256", spy)
    return calls


# ---- the file-hash cache ---------------------------------------------------------------------------
def test_cached_sha256_second_call_reads_nothing(tmp_path, hash_spy):
    data = os.urandom(300_000)
    f = _file(tmp_path / "ckpt.bin", data)
    want = hashlib.sha256(data).hexdigest()
    assert fileio.cached_sha256(f) == want
    assert fileio.cached_sha256(f) == want
    assert fileio.cached_sha256(str(f)) == want
    assert len(hash_spy) == 1
    # persisted on disk (a new process would find it): one entry keyed by the resolved path
    stored = json.loads(fileio.hash_cache_path().read_text())
    entry = stored["files"][str(f.resolve())]
    assert entry["sha256"] == want and entry["size"] == len(data) and entry["mtime_ns"] == OLD * 10**9
    # a symlink to the file resolves to the same entry
    link = tmp_path / "link.bin"
    link.symlink_to(f)
    assert fileio.cached_sha256(link) == want and len(hash_spy) == 1


def test_cached_sha256_persists_across_processes(tmp_path):
    f = _file(tmp_path / "w.bin", b"x" * 1000)
    code = (
        "import sys; from bitdance_rt import fileio; calls = []; real = fileio.file_sha256\n"
        "fileio.file_sha256 = lambda p, *a: calls.append(p) or real(p, *a)\n"
        "print(fileio.cached_sha256(sys.argv[1]), len(calls))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(f)], capture_output=True, text=True, check=True, env=os.environ.copy()
        ).stdout.split()
        for _ in range(2)
    ]
    want = hashlib.sha256(b"x" * 1000).hexdigest()
    assert runs == [[want, "1"], [want, "0"]]


def test_touched_or_changed_file_is_rehashed(tmp_path, hash_spy):
    f = _file(tmp_path / "a.bin", b"a" * 4096)
    first = fileio.cached_sha256(f)
    os.utime(f, (OLD + 10, OLD + 10))  # touched: same bytes, new mtime
    assert fileio.cached_sha256(f) == first and len(hash_spy) == 2
    _file(f, b"b" * 4096, OLD + 10)  # same size, same mtime as the entry... but rewritten in place:
    # the mtime restored by hand is the blind spot every (size, mtime) cache has; a real rewrite
    # moves the mtime, which is what the next lines do
    os.utime(f, (OLD + 20, OLD + 20))
    assert fileio.cached_sha256(f) == hashlib.sha256(b"b" * 4096).hexdigest() and len(hash_spy) == 3
    _file(f, b"c" * 10, OLD + 20)  # other size, same mtime
    assert fileio.cached_sha256(f) == hashlib.sha256(b"c" * 10).hexdigest() and len(hash_spy) == 4
    # replaced by another file (new inode) with the same size and mtime
    g = _file(tmp_path / "new.bin", b"d" * 10, OLD + 20)
    os.replace(g, f)
    assert fileio.cached_sha256(f) == hashlib.sha256(b"d" * 10).hexdigest() and len(hash_spy) == 5


def test_just_modified_file_is_not_remembered(tmp_path, hash_spy):
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"new")  # mtime = now: a same-size rewrite in the same timestamp tick could hide
    assert fileio.cached_sha256(f) == hashlib.sha256(b"new").hexdigest()
    assert fileio.cached_sha256(f) == hashlib.sha256(b"new").hexdigest()
    assert len(hash_spy) == 2
    assert not fileio.hash_cache_path().exists()


@pytest.mark.parametrize(
    "garbage",
    [b"{not json", b"\xff\xfe\x00", b'["a list"]', b'{"format": "bitdance-rt-file-hashes/1", "files": {"X": 3}}'],
)
def test_corrupt_cache_file_is_tolerated_and_rewritten(tmp_path, hash_spy, garbage):
    f = _file(tmp_path / "a.bin", b"payload")
    cache = fileio.hash_cache_path()
    cache.parent.mkdir(parents=True)
    cache.write_bytes(garbage)
    assert fileio.cached_sha256(f) == hashlib.sha256(b"payload").hexdigest()
    assert json.loads(cache.read_text())["format"] == fileio.HASH_CACHE_FORMAT  # rewritten, valid
    assert fileio.cached_sha256(f) == hashlib.sha256(b"payload").hexdigest() and len(hash_spy) == 1


def test_bad_entry_is_not_trusted(tmp_path, hash_spy):
    f = _file(tmp_path / "a.bin", b"payload")
    fileio.cached_sha256(f)
    cache = fileio.hash_cache_path()
    data = json.loads(cache.read_text())
    data["files"][str(f.resolve())]["sha256"] = "zz"  # malformed digest
    cache.write_text(json.dumps(data))
    assert fileio.cached_sha256(f) == hashlib.sha256(b"payload").hexdigest() and len(hash_spy) == 2


def test_unwritable_cache_location_still_hashes(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(blocker / "sub"))
    f = _file(tmp_path / "a.bin", b"payload")
    assert fileio.cached_sha256(f) == hashlib.sha256(b"payload").hexdigest()
    assert "cannot write hash cache" in capsys.readouterr().err


def test_cache_location_follows_env_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "elsewhere"))
    f = _file(tmp_path / "a.bin", b"payload")
    fileio.cached_sha256(f)
    assert (tmp_path / "elsewhere" / fileio.HASH_CACHE_FILE).is_file()
    monkeypatch.delenv("BITDANCE_RT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fileio.cache_root() == tmp_path / "home" / ".cache" / "bitdance-rt"
    fileio.cached_sha256(f)
    assert (tmp_path / "home" / ".cache" / "bitdance-rt" / fileio.HASH_CACHE_FILE).is_file()
    from bitdance_rt.paths import cache_root  # one root for every cache

    assert cache_root() == fileio.cache_root()


def test_cache_is_bounded_and_keeps_the_newest(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "HASH_CACHE_MAX_ENTRIES", 3)
    clock = iter(range(1000, 2000))
    monkeypatch.setattr(fileio.time, "time", lambda: float(next(clock)))
    files = [_file(tmp_path / f"{i}.bin", bytes([i]) * 10) for i in range(6)]
    for f in files:
        fileio.cached_sha256(f)
    stored = json.loads(fileio.hash_cache_path().read_text())["files"]
    assert sorted(stored) == sorted(str(f.resolve()) for f in files[-3:])


def test_fileio_stays_torch_free():
    code = "import sys, bitdance_rt.fileio; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_verify_files_uses_the_cache(tmp_path, hash_spy):
    from bitdance_rt.errors import BitDanceError
    from bitdance_rt.export.manifest import verify_files

    f = _file(tmp_path / "g.onnx", b"graph bytes")
    manifest = {"files": {"g.onnx": {"bytes": f.stat().st_size, "sha256": hashlib.sha256(b"graph bytes").hexdigest()}}}
    verify_files(tmp_path, manifest)
    verify_files(tmp_path, manifest)
    assert len(hash_spy) == 1
    _file(f, b"graph bytez", OLD + 5)  # same size, corrupt, new mtime: caught
    with pytest.raises(BitDanceError, match="does not match the sha256"):
        verify_files(tmp_path, manifest)


def test_checkpoint_source_uses_the_cache(tmp_path, hash_spy):
    from bitdance_rt.export.onnx_export import checkpoint_source

    ck = _file(tmp_path / "ck.pt", b"weights" * 100)
    vae = _file(tmp_path / "ae.pt", b"vae" * 100)
    first = checkpoint_source(ck, vae)
    assert first == (
        f"sha256:{hashlib.sha256(b'weights' * 100).hexdigest()} vae sha256:{hashlib.sha256(b'vae' * 100).hexdigest()}"
    )
    assert checkpoint_source(ck, vae) == first and len(hash_spy) == 2


# ---- tiny graphs -----------------------------------------------------------------------------------
D = 32


def _save(model, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def _mlp(seed: int = 0, big: int = 0, ir3: bool = False):
    """x -> MatMul -> Add -> Mul(0.5) -> Relu -> MatMul (+ an unused big initializer). ir3: the
    initializers are listed among the graph inputs too, as IR version 3 required."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("w1", (D, D)), ("b1", (D,)), ("w2", (D, D)))
    ]
    inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
    if big:
        inits.append(numpy_helper.from_array(np.zeros(big, np.float32), "unused_big"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["h2"]),
        helper.make_node("Mul", ["h2", "half"], ["h3"]),
        helper.make_node("Relu", ["h3"], ["h4"]),
        helper.make_node("MatMul", ["h4", "w2"], ["y"]),
        helper.make_node("Identity", ["h2"], ["z"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", D])]
    if ir3:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", D]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, ["rows", D]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "mlp", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def _qdq_matmul(seed: int = 0):
    """int8 Q/DQ MatMul with full-range weights and activations (ONNX Runtime fuses it into a
    QLinearMatMul / MatMulInteger; session.x64quantprecision rewrites the weights to uint8)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (D, D)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w, "wq"),
        numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
        numpy_helper.from_array(np.array(0, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.03, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.int8), "xz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", D])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weight_dtypes(entry: Path) -> set[int]:
    """Element types of the D x D weight matrices in a cached optimised graph."""
    return {t.data_type for t in onnx.load(str(entry / "model.onnx")).graph.initializer if list(t.dims) == [D, D]}


def _options(x64quant: bool = False):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    o.add_session_config_entry("session.force_spinning_stop", "1")
    if x64quant:
        o.add_session_config_entry("session.x64quantprecision", "1")
    return o


CPU = ["CPUExecutionProvider"]


def _x(rows: int = 5, scale: float = 1.0):
    return (np.random.default_rng(7).standard_normal((rows, D)) * scale).astype(np.float32)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


# ---- graph_signature -------------------------------------------------------------------------------
def _onnx_signature(path: Path):
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    return [v.name for v in g.input if v.name not in inits], [v.name for v in g.output]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("ir3", [False, True])
def test_graph_signature_matches_onnx(tmp_path, external, ir3):
    path = _save(_mlp(ir3=ir3), tmp_path / "m.onnx", external)
    assert graph_signature(path) == _onnx_signature(path) == (["x"], ["y", "z"])


def test_graph_signature_reads_no_weights(tmp_path, monkeypatch):
    path = _save(_mlp(big=2_000_000), tmp_path / "big.onnx")  # 8 MB of embedded weights
    read = []
    real_open = open

    class Counting:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            b = self.fh.read(n)
            read.append(len(b))
            return b

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    from bitdance_rt.runtime import graph_signature as signature_module

    monkeypatch.setattr(signature_module, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    assert graph_signature(path) == (["x"], ["y", "z"])
    assert path.stat().st_size > 8_000_000
    assert 0 < sum(read) < 4096, sum(read)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_graph_signature_rejects_malformed_files(tmp_path, damage):
    path = _save(_mlp(), tmp_path / "m.onnx")
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"\x0f\xff\xff\xff" + os.urandom(64), "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    with pytest.raises(ValueError):
        graph_signature(path)


# ---- make_session ----------------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True])
def test_cached_session_is_bit_identical_and_used(tmp_path, external):
    src = _save(_mlp(), tmp_path / "m.onnx", external)
    cache = tmp_path / "opt"
    x = _x()
    ref = make_session(src, _options(), CPU).run(None, {"x": x})
    first = make_session(src, _options(), CPU, cache_dir=cache, key="m sha256:1")
    [entry] = _entries(cache)
    assert {p.name for p in entry.iterdir()} == {"model.onnx", "model.onnx.data", "meta.json"}
    # the second session comes from the cache: the source may be gone
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in tmp_path.glob("m.onnx*"):
        f.rename(moved / f.name)
    second = make_session(src, _options(), CPU, cache_dir=cache, key="m sha256:1")
    assert second.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for sess in (first, second):
        out = sess.run(None, {"x": x})
        assert all(np.array_equal(a, b) for a, b in zip(ref, out))
    assert [i.name for i in second.get_inputs()] == ["x"] and [o.name for o in second.get_outputs()] == ["y", "z"]


def test_int8_exact_kernels_survive_the_cache(tmp_path):
    """session.x64quantprecision is applied by a graph optimiser: the cached graph must carry it."""
    src = _save(_qdq_matmul(), tmp_path / "q.onnx")
    cache = tmp_path / "opt"
    x = _x(scale=4.0)  # activations near full range
    ref_exact = make_session(src, _options(x64quant=True), CPU).run(None, {"x": x})[0]
    make_session(src, _options(x64quant=True), CPU, cache_dir=cache, key="q")
    cached = make_session(src, _options(x64quant=True), CPU, cache_dir=cache, key="q").run(None, {"x": x})[0]
    assert np.array_equal(cached, ref_exact)
    [entry] = _entries(cache)
    assert _weight_dtypes(entry) == {TensorProto.UINT8}  # the saved graph holds the U8U8 rewrite
    # the other kernel choice is another entry, and matches its own uncached session
    ref_fast = make_session(src, _options(), CPU).run(None, {"x": x})[0]
    make_session(src, _options(), CPU, cache_dir=cache, key="q")
    assert len(_entries(cache)) == 2
    assert sorted(min(_weight_dtypes(e)) for e in _entries(cache)) == [TensorProto.UINT8, TensorProto.INT8]
    assert np.array_equal(make_session(src, _options(), CPU, cache_dir=cache, key="q").run(None, {"x": x})[0], ref_fast)


def test_options_are_kept_and_restored(tmp_path):
    src = _save(_mlp(), tmp_path / "m.onnx")
    cache = tmp_path / "opt"
    for _ in range(2):  # miss, then hit
        opts = _options()
        sess = make_session(src, opts, CPU, cache_dir=cache, key="k")
        assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert opts.optimized_model_filepath == ""
        used = sess.get_session_options()
        assert used.get_session_config_entry("session.force_spinning_stop") == "1"
        assert used.intra_op_num_threads == 1 and used.inter_op_num_threads == 1


def test_key_change_makes_a_new_entry(tmp_path):
    cache = tmp_path / "opt"
    a = _save(_mlp(seed=0), tmp_path / "a.onnx")
    b = _save(_mlp(seed=1), tmp_path / "b.onnx")
    x = _x()
    make_session(a, _options(), CPU, cache_dir=cache, key="sha256:a")
    make_session(b, _options(), CPU, cache_dir=cache, key="sha256:b")
    assert len(_entries(cache)) == 2
    # the entry of b holds b's graph, not a's
    got = make_session(b, _options(), CPU, cache_dir=cache, key="sha256:b").run(None, {"x": x})[0]
    assert np.array_equal(got, make_session(b, _options(), CPU).run(None, {"x": x})[0])
    assert not np.array_equal(got, make_session(a, _options(), CPU).run(None, {"x": x})[0])
    # another optimisation level is another entry too
    opts = _options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    make_session(a, opts, CPU, cache_dir=cache, key="sha256:a")
    assert len(_entries(cache)) == 3


@pytest.mark.parametrize("damage", ["same-size garbage", "truncated data", "meta"])
def test_corrupt_entry_is_replaced_with_a_warning(tmp_path, capsys, damage):
    src = _save(_mlp(), tmp_path / "m.onnx")
    cache = tmp_path / "opt"
    x = _x()
    ref = make_session(src, _options(), CPU).run(None, {"x": x})[0]
    make_session(src, _options(), CPU, cache_dir=cache, key="k")
    [entry] = _entries(cache)
    optimised = [n.op_type for n in onnx.load(str(entry / "model.onnx")).graph.node]
    assert optimised != [n.op_type for n in onnx.load(str(src)).graph.node]  # ONNX Runtime changed the graph
    capsys.readouterr()
    if damage == "same-size garbage":  # passes the size check; ONNX Runtime refuses it
        f = entry / "model.onnx"
        f.write_bytes(b"\xff" * f.stat().st_size)
    elif damage == "truncated data":
        f = entry / "model.onnx.data"
        f.write_bytes(f.read_bytes()[:100])
    else:
        (entry / "meta.json").write_text("{")
    sess = make_session(src, _options(), CPU, cache_dir=cache, key="k")
    err = capsys.readouterr().err
    assert err.count("warning: discarding the cached optimised graph") == 1, err
    assert np.array_equal(sess.run(None, {"x": x})[0], ref)
    # replaced by a good entry, which the next call loads quietly
    [again] = _entries(cache)
    assert [n.op_type for n in onnx.load(str(again / "model.onnx")).graph.node] == optimised  # optimised again
    sess = make_session(src, _options(), CPU, cache_dir=cache, key="k")
    assert capsys.readouterr().err == ""
    assert sess.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert np.array_equal(sess.run(None, {"x": x})[0], ref)


def test_crashed_run_leaves_nothing_that_is_loaded(tmp_path):
    src = _save(_mlp(), tmp_path / "m.onnx")
    cache = tmp_path / "opt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = ort_session.entry_name(ort_session.full_key(_options(), CPU, "k"))
    half = cache / f"{ort_session.TMP_PREFIX}{name}-{dead.pid}-abc"
    half.mkdir(parents=True)
    (half / "model.onnx").write_bytes(b"\x08")  # a half-written optimised graph
    x = _x()
    sess = make_session(src, _options(), CPU, cache_dir=cache, key="k")
    assert not half.exists()  # the dead run's temporary directory is cleaned up
    assert [p.name for p in cache.iterdir()] == [name]
    assert np.array_equal(sess.run(None, {"x": x})[0], make_session(src, _options(), CPU).run(None, {"x": x})[0])


def test_failure_while_optimising_leaves_no_entry(tmp_path, monkeypatch):
    src = tmp_path / "bad.onnx"
    src.write_bytes(b"not onnx")
    cache = tmp_path / "opt"
    with pytest.raises(Exception):  # noqa: B017  (onnxruntime's pybind error types)
        make_session(src, _options(), CPU, cache_dir=cache, key="k")
    assert list(cache.iterdir()) == []


def test_compiling_providers_and_disabled_optimisation_bypass_the_cache(tmp_path, monkeypatch):
    seen = []

    class FakeSession:
        def __init__(self, path, options, providers):
            seen.append((path, options.optimized_model_filepath, providers))

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    src = _save(_mlp(), tmp_path / "m.onnx")
    cache = tmp_path / "opt"
    trt = [("TensorrtExecutionProvider", {"trt_fp16_enable": "1"}), "CPUExecutionProvider"]
    make_session(src, _options(), trt, cache_dir=cache, key="k")
    off = _options()
    off.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    make_session(src, off, CPU, cache_dir=cache, key="k")
    assert seen == [(str(src), "", trt), (str(src), "", CPU)]
    assert not cache.exists()


def test_bad_arguments(tmp_path):
    src = _save(_mlp(), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="needs a key"):
        make_session(src, _options(), CPU, cache_dir=tmp_path / "opt")
    opts = _options()
    opts.optimized_model_filepath = str(tmp_path / "mine.onnx")
    with pytest.raises(ValueError, match="optimized_model_filepath"):
        make_session(src, opts, CPU, cache_dir=tmp_path / "opt", key="k")


def test_cached_graph_holds_the_optimisation_work(tmp_path):
    """A graph whose optimisation is real work (constant folding of a long chain): the cached graph
    is the folded one (what a later start loads without optimising), and it computes the same bits.
    (Timings belong in benchmarks, not tests: the session-creation figures are in docs/serving.md, Start-up.)"""
    import onnx

    rng = np.random.default_rng(0)
    inits, nodes, prev = [], [], "x"
    for i in range(50):
        inits += [
            numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"a{i}"),
            numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [f"a{i}", f"b{i}"], [f"c{i}"]),  # constant: folded
            helper.make_node("MatMul", [prev, f"c{i}"], [f"h{i}"]),
            helper.make_node("Tanh", [f"h{i}"], [f"t{i}"]),
        ]
        prev = f"t{i}"
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", D])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["rows", D])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = _save(model, tmp_path / "chain.onnx")
    cache = tmp_path / "opt"
    make_session(src, _options(), CPU, cache_dir=cache, key="chain")
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    cached = onnx.load(str(entry / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMul" for n in cached.graph.node) == 50  # the 50 constant products are folded
    sess = make_session(src, _options(), CPU, cache_dir=cache, key="chain")
    x = _x() * 0.1
    assert np.array_equal(sess.run(None, {"x": x})[0], make_session(src, _options(), CPU).run(None, {"x": x})[0])


def test_cache_keeps_the_most_recently_used_entries(tmp_path):
    cache = tmp_path / "opt"
    srcs = [_save(_mlp(seed=i), tmp_path / f"m{i}.onnx") for i in range(4)]
    entry = {}
    for i, src in enumerate(srcs[:3]):
        make_session(src, _options(), CPU, cache_dir=cache, key=f"m{i}", max_entries=3)
        [entry[i]] = set(_entries(cache)) - set(entry.values())
        os.utime(entry[i] / "meta.json", (OLD + i, OLD + i))  # m0 oldest
    make_session(srcs[0], _options(), CPU, cache_dir=cache, key="m0", max_entries=3)  # a hit: m0 used now
    make_session(srcs[3], _options(), CPU, cache_dir=cache, key="m3", max_entries=3)  # installs m3, drops m1
    left = set(_entries(cache))
    assert len(left) == 3 and entry[0] in left and entry[2] in left and entry[1] not in left
    assert ort_session.default_cache_dir() == fileio.cache_root() / "ort-optimized"
