"""Fault injection on what bitdance-rt keeps on disk: bit rot in the optimised-graph cache, a full
disk, a read-only cache, killed exports, corrupt or unreadable checkpoints, a full disk during an
export, and the modes of the files written for the user. One export of the embedded model (a
module fixture) serves every test; the runs that need a real process (rlimits, dropped
capabilities, kill -9) are subprocesses."""

from __future__ import annotations

import collections
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from bitdance_rt import fileio  # noqa: E402
from bitdance_rt.errors import BitDanceError, CheckpointError  # noqa: E402

from conftest import copy_cache, torch_threads  # noqa: E402

ENV = "BITDANCE_RT_CACHE"
OLD = 1_600_000_000  # an mtime well in the past (not "racy" for the hash cache)
LABELS = [3, 7]


class Warm:
    """A cache root with the embedded model's default export and its optimised graphs."""

    def __init__(self, root: Path):
        self.root = root
        [self.export] = [p for p in (root / "exports").iterdir() if not p.name.startswith(".")]
        self.manifest = json.loads((self.export / "manifest.json").read_text())
        self.steps = self.manifest["key"]["sampler_steps"]

    def copy(self, dest: Path, ort: bool = True, hashes: bool = True) -> Path:
        """A private copy of the cache root (new inodes: nothing memoised carries over)."""
        shutil.copytree(self.root, dest)
        if not ort:
            shutil.rmtree(dest / "ort-optimized")
        if not hashes:
            (dest / fileio.HASH_CACHE_FILE).unlink(missing_ok=True)
        return dest


@pytest.fixture(scope="module")
def warm(tmp_path_factory, embedded_cache_template):
    """A cache root with the embedded model's export and optimised graphs (a copy of the session's)."""
    return Warm(copy_cache(embedded_cache_template, tmp_path_factory.mktemp("faults") / "cache"))


def _env(root: Path) -> dict:
    env = {**os.environ, ENV: str(root), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _run_cli(prelude: str, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`bitdance-rt generate` in a fresh process after `prelude` (rlimits, dropped capabilities)."""
    code = prelude + "\nfrom bitdance_rt.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    args = ["generate", "--out", str(out), "--quiet", "--threads", "1", "--labels", *map(str, LABELS), *extra]
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env(root), timeout=120
    )


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("bitdance-rt:")]


def _not_black(out: Path) -> None:
    from PIL import Image

    for label in LABELS:
        [png] = out.glob(f"*_class{label}.png")
        pixels = np.asarray(Image.open(png))
        assert pixels.std() > 10 and pixels.max() > 100, f"{png} is blank"


def _entry_of(cache: Path, graph: str) -> Path:
    [entry] = [
        e
        for e in cache.iterdir()
        if not e.name.startswith(".") and json.loads((e / "meta.json").read_text())["source"].endswith(f"/{graph}")
    ]
    return entry


# ---- 1. bit rot in the optimised-graph cache ---------------------------------------------------------
@pytest.mark.parametrize("graph", ["decoder.onnx", "backbone.onnx"])
def test_bit_rot_in_an_optimised_graph_is_caught_and_rebuilt(warm, tmp_path, monkeypatch, capsys, graph):
    """4 KiB of random bytes in an entry's weights (size kept) made every image black, silently and
    for ever. Entries now record sha256s checked through cached_sha256 (as exports are): a rewrite
    is caught whatever its size; a change that also restores size, mtime and inode is not (the
    hash cache's documented blind spot, shared with export checks)."""
    from bitdance_rt.runtime import generate
    from bitdance_rt.runtime.ort_backend import OrtBackend
    from bitdance_rt.sampling import SeededNoise

    root = warm.copy(tmp_path / "cache", hashes=False)
    monkeypatch.setenv(ENV, str(root))
    cache = root / "ort-optimized"
    for f in cache.glob("*/*"):
        os.utime(f, (OLD, OLD))  # old enough to be memoised: the corruption must defeat the memo too

    def images():
        with torch_threads(1):
            backend = OrtBackend(root / "exports" / warm.export.name, threads=1, session_cache=cache)
            return generate(backend, LABELS, warm.steps, 4.0, "linear", SeededNoise(0)).image

    ref = images()
    assert _warnings(capsys.readouterr().err) == []
    data = _entry_of(cache, graph) / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(os.urandom(4096))
    assert data.stat().st_size == size
    got = images()
    err = capsys.readouterr().err
    assert len(_warnings(err)) == 1 and "discarding the cached optimised graph" in err and "sha256" in err, err
    assert torch.equal(got, ref)
    assert torch.equal(images(), ref)  # the re-created entry loads quietly
    assert _warnings(capsys.readouterr().err) == []


# ---- 2. a disk with room for the export but not the optimised graphs -----------------------------------
FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, in C++ too
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # PNGs fit; most optimised graphs do not
"""


def test_full_disk_for_the_optimised_graphs_runs_without_the_cache(warm, tmp_path):
    """Was: exit 2 on every run, "head_sampler.onnx: ONNX Runtime cannot load it (... Failed to write
    external initializers ...); re-export". Now the session is made without the cache, one warning."""
    root = warm.copy(tmp_path / "cache", ort=False)
    out = tmp_path / "out"
    run = _run_cli(FULL_DISK, root, out)
    assert run.returncode == 0, run.stderr
    lines = _warnings(run.stderr)
    assert len(lines) == 1 and "cannot write the optimised-graph cache" in lines[0], run.stderr
    _not_black(out)
    assert not [p for p in (root / "ort-optimized").iterdir() if p.name.startswith(".")]  # no work dirs left


# ---- 3. a read-only warm cache: each warning once ----------------------------------------------------
DROP_DAC = """
import ctypes, os, sys
if os.geteuid() == 0:  # root ignores permission bits: drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    class Hdr(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = Hdr(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in (1, 2, 3):
        data[0].effective &= ~(1 << cap)
        data[0].permitted &= ~(1 << cap)
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
try:
    open(os.path.join(os.environ["BITDANCE_RT_CACHE"], "probe"), "w")
    sys.exit("the cache is writable after all: this test cannot make it read-only")
except PermissionError:
    pass
"""


def _set_dir_modes(root: Path, mode: int) -> None:
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        d.chmod(mode)


def test_read_only_warm_cache_warns_once_per_cause(warm, tmp_path):
    """Was 14 lines (one per session, one per hashed file). A real EACCES: directories 0555 and, for
    root, the DAC-override capabilities dropped in the child (no mount or privileges needed)."""
    root = warm.copy(tmp_path / "cache", ort=False, hashes=False)  # nothing memoised, no optimised graphs
    out = tmp_path / "out"
    _set_dir_modes(root, 0o555)
    try:
        run = _run_cli(DROP_DAC, root, out)
    finally:
        _set_dir_modes(root, 0o755)
    assert run.returncode == 0, run.stderr
    lines = _warnings(run.stderr)
    counts = collections.Counter(lines)
    assert all(n == 1 for n in counts.values()), run.stderr
    assert sum("cannot write hash cache" in line for line in lines) == 1, run.stderr
    assert sum("cannot write the optimised-graph cache" in line for line in lines) == 1, run.stderr
    assert len(lines) == 2, run.stderr
    _not_black(out)


def test_warn_once_in_process(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(ENV, str(blocker / "sub"))  # ENOTDIR for every write
    for i in range(3):
        f = tmp_path / f"{i}.bin"
        f.write_bytes(b"x" * i)
        os.utime(f, (OLD, OLD))
        fileio.cached_sha256(f)
    assert capsys.readouterr().err.count("cannot write hash cache") == 1


# ---- 4. killed exports leave no litter -----------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from bitdance_rt.fileio import make_work_dir
work = make_work_dir(sys.argv[1], sys.argv[2], sys.argv[3])
(work.path / "stage.onnx.data").write_bytes(b"w" * 4096)  # half-written weights
print(work.path, flush=True)
time.sleep(300)
"""


def _holder(parent: Path, prefix: str, suffix: str = "") -> tuple[subprocess.Popen, Path]:
    """A process holding a work directory made by the production helper (as an export does)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(parent), prefix, suffix], stdout=subprocess.PIPE, text=True, env=_env(parent)
    )
    line = proc.stdout.readline().strip()
    assert line, "the holder process made no work directory"
    return proc, Path(line)


def _killed(parent: Path, prefix: str, suffix: str = "") -> Path:
    proc, path = _holder(parent, prefix, suffix)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.is_dir()
    return path


def test_killed_export_work_dirs_are_swept_but_live_ones_kept(warm, tmp_path):
    from bitdance_rt.calibration.dataset import load_calibration
    from bitdance_rt.export.onnx_export import find_reusable
    from bitdance_rt.runtime.ort_session import TMP_PREFIX, make_session

    root = warm.copy(tmp_path / "cache")
    exports = root / "exports"
    name = warm.export.name
    dead = [_killed(exports, f".{name}.export-"), _killed(exports, f".{name}-fp16.fp16-")]
    live, live_dir = _holder(exports, ".other.export-")
    old_style = exports / f".{name}.export-abcd1234"  # an older version's (no lock), untouched for days
    old_style.mkdir()
    os.utime(old_style, (OLD, OLD))
    fresh_style = exports / f".{name}.export-efgh5678"  # unlocked and recent: maybe being created
    fresh_style.mkdir()
    try:
        # a run that only reuses the export cleans up
        assert find_reusable(exports / name, warm.manifest["key"]) is not None
        assert not any(p.exists() for p in dead) and not old_style.exists()
        assert live_dir.is_dir() and fresh_style.is_dir()
        # calibration sets and the optimised-graph cache sweep their own parents the same way
        calib = root / "calibration"
        dead_set = _killed(calib, ".tiny.", ".tmp")
        with pytest.raises(BitDanceError):
            load_calibration(calib / "tiny")
        assert not dead_set.exists()
        ort_cache = tmp_path / "ort"
        dead_opt = _killed(ort_cache, f"{TMP_PREFIX}0123abcd-{os.getpid()}-")  # its pid even lives: the lock decides
        import onnxruntime as ort

        make_session(
            exports / name / "prefix_embed.onnx",
            ort.SessionOptions(),
            ["CPUExecutionProvider"],
            cache_dir=ort_cache,
            key="k",
        )
        assert not dead_opt.exists() and len(list(ort_cache.iterdir())) == 1
        assert live_dir.is_dir()
    finally:
        live.kill()
        live.wait()
    # once its writer is gone, the next sweep takes it
    find_reusable(exports / name, warm.manifest["key"])
    assert not live_dir.exists()


# ---- 5. corrupt and unreadable checkpoints -------------------------------------------------------------
@pytest.mark.parametrize("head", [b"", b"\x80\x02"])
def test_random_bytes_checkpoint_is_not_a_pickle_hint(tmp_path, head):
    """Random bytes got "pass --unsafe-allow-pickle"; only a real pickle with classes should."""
    from bitdance_rt.loading import load_model

    bad = tmp_path / "random.pt"
    data = head + np.random.default_rng(1).bytes(8192)
    assert data[:2] not in (b"PK",) and (head or data[0] != 0x80)
    bad.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_model("tiny-digits", bad)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "not a readable checkpoint" in msg, msg
    assert "unsafe-allow-pickle" not in msg


def test_unreadable_checkpoint_is_one_line(tmp_path, monkeypatch):
    """As root chmod 000 does not stop reads: the PermissionError is injected at open()."""
    import builtins

    from bitdance_rt import checkpoint
    from bitdance_rt.export.onnx_export import checkpoint_source
    from bitdance_rt.loading import load_model

    ck = tmp_path / "locked.pt"
    ck.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    real_open = builtins.open

    def guarded(path, *a, **k):
        if Path(path) == ck:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    for call in (
        lambda: load_model("tiny-digits", ck),
        lambda: checkpoint_source(ck),
        lambda: checkpoint.read_tensor_file(ck),
    ):
        with pytest.raises(CheckpointError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and str(ck) in msg and "Permission denied" in msg, msg


def test_disk_full_during_export_is_one_line(tmp_path, monkeypatch):
    import onnx

    from bitdance_rt.export.onnx_export import export_stages, random_source
    from bitdance_rt.loading import load_model

    def full(model, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "exports" / "x"
    with torch_threads(1):
        model = load_model().model
        with pytest.raises(BitDanceError) as info:
            export_stages(model, out, random_source(0), stages=["prefix_embed"], progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "prefix_embed.onnx" in msg, msg
    assert list((tmp_path / "exports").iterdir()) == []  # the work directory is gone too


# ---- 6. files written for the user honour the umask ----------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(tmp_path, umask):
    from bitdance_rt.checkpoint import save_safetensors
    from bitdance_rt.images import save_png

    before = os.umask(umask)
    try:
        png = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
        tokens = save_safetensors({"t": torch.zeros(2)}, tmp_path / "t.safetensors")
    finally:
        os.umask(before)
    for f in (png, tokens):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, oct(f.stat().st_mode)
