"""The GPU check: one script that a session lent a GPU runs as is, recording what works (issue 23).

    python benchmarks/gpu_check.py --prepare cache/gpu-check     # HERE, once: fixtures + wheels to carry
    python3 benchmarks/gpu_check.py --carried cache/gpu-check --out $OUT/gpu_check.json
    python benchmarks/gpu_check.py --dry-run --budget-s 60       # on a CPU: every part that needs no GPU

(Over 400 lines: five parts that must each survive the others failing, the deadline that bounds them
all, and the carrying of what a machine without network lacks, in the one file a session runs.)

Device time is scarce (minutes a session), so everything runs in ONE process under ONE deadline
(--budget-s; a watchdog prints what was recorded and exits if a step overruns it by --grace-s), in this
order, each part catching its own errors and recording ok / failed (first line of the error) /
skipped (the reason: "no CUDA device", "tensorrt not importable (...)", "deadline"); a part's
"failed_steps" counts its steps that failed:
  1. env: GPU, compute capability, memory, driver; torch, TensorRT, ONNX Runtime (providers); CPU flags;
     which optional packages are importable.
  2. gpu_tests: the tests marked `gpu` (tests/test_trt_gpu.py), in a subprocess with a timeout.
  3. engines: per model (the embedded default, then BitDance-B-4x with seeded random weights if time
     allows) and precision (fp32 first, the reference): engines built through the public API
     (Pipeline.from_pretrained(backend="tensorrt"), from that precision's graphs, made first to time them
     apart), fixed-seed tokens compared with ONNX Runtime on the CPU
     at that precision and at fp32; build time each. torch on CUDA (fp32, bf16) is compared too: it
     runs where TensorRT is missing.
  4. speed: batch-1 and batch-8 images/s on TensorRT fp16 with and without CUDA graphs and on torch
     CUDA, each as a ratio to ONNX Runtime CPU fp32 measured in this run.
  5. serving: `bitdance-rt serve` on TensorRT (else torch on CUDA) on a free loopback port, closed-loop
     concurrency 1 / 4 / 16, images/s and p50 / p95 latency; stopped by its PID.
Ends with ONE JSON line (keys env, gpu_tests, engines, speed, serving, wall_s, budget_s), also written
to --out. Everything it writes goes under --workdir (the cache root too), never the user's cache.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a machine with the working tree but no install of it (the lent GPU)
    sys.path.insert(1, str(REPO))

PARTS = ("env", "gpu_tests", "engines", "speed", "serving")
# Each part starts no new step after this share of the budget, so the later ones keep their time;
# a part that ends early leaves its time to the next.
PART_END = {"env": 0.05, "gpu_tests": 0.4, "engines": 0.7, "speed": 0.85, "serving": 1.0}
PRECISIONS = ("fp32", "fp16", "int8", "bf16", "int4")
B4X = "BitDance-B-4x"
B4X_LABELS = [207, 360]
# What the lent GPU machines lack (docs: the device tool's package list) and a call can carry: pure
# Python wheels plus pydantic-core, pinned to the versions this project is tested with.
# (module, wheel requirement)
CARRIED_WHEELS = (
    ("fastapi", "fastapi==0.165.0"),
    ("starlette", "starlette==1.10.0"),
    ("uvicorn", "uvicorn==0.55.0"),
    ("pydantic", "pydantic==2.14.4"),
    ("pydantic_core", "pydantic-core==2.50.5"),
    ("annotated_types", "annotated-types==0.8.0"),
    ("typing_inspection", "typing-inspection==0.4.5"),
    ("opentelemetry", "opentelemetry-api==1.45.3"),
    ("onnxconverter_common", "onnxconverter-common==1.16.0"),
    ("polygraphy", "polygraphy==0.53.6"),
)
OPTIONAL_MODULES = (
    "tensorrt",
    "polygraphy",
    "onnx",
    "onnxruntime",
    "onnxconverter_common",
    "fastapi",
    "uvicorn",
    "pydantic",
    "httpx",
    "openai",
    "tokenizers",
    "prometheus_client",
)

log = logging.getLogger("gpu_check")


# ---- bookkeeping ----------------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def count_failed(obj) -> int:
    """Steps recorded as failed anywhere inside a part's result."""
    if isinstance(obj, dict):
        return (obj.get("status") == "failed") + sum(count_failed(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(count_failed(v) for v in obj)
    return 0


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def failed(error: str) -> dict:
    return {"status": "failed", "error": error}


def clean(obj):
    """NaN / inf -> None and tuples -> lists, so the JSON line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


class Check:
    """The run's state: options, deadline, results so far, child processes (killed on every exit)."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.budget = float(args.budget_s)
        self.results: dict = {part: skipped("not selected") for part in PARTS}
        self.children: list[subprocess.Popen] = []
        self.current = None
        self.printed = threading.Lock()
        self.done = False
        self.workdir = Path(args.workdir).resolve()
        self.cache = Path(args.cache_dir).resolve() if args.cache_dir else self.workdir / "cache"
        self.cuda_reason = None  # why no CUDA part runs (None: they run)
        self.trt_reason = None  # why no TensorRT part runs
        self.installed: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self, part: str | None = None) -> float:
        """Seconds left to the part's share of the budget (the whole budget without a part)."""
        end = self.budget * PART_END.get(part, 1.0)
        return end - self.elapsed()

    def time_for(self, part: str, need_s: float) -> bool:
        return self.remaining(part) >= need_s and self.remaining() >= need_s

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def summary(self) -> dict:
        return {
            **self.results,
            "wall_s": round(self.elapsed(), 1),
            "budget_s": self.budget,
            "dry_run": bool(self.args.dry_run),
        }

    def finish(self, note: str | None = None) -> None:
        """Print the one JSON line (once) and write --out."""
        with self.printed:
            if self.done:
                return
            self.done = True
            self.kill_children()
            out = self.summary()
            if note:
                out["watchdog"] = note
            line = json.dumps(clean(out))
            if self.args.out:
                with contextlib.suppress(OSError):
                    Path(self.args.out).write_text(line + "\n")
            print(line, flush=True)

    def kill_children(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.kill()


def run_part(check: Check, part: str, fn) -> None:
    """Run one part; whatever it raises is recorded, never propagated."""
    if part not in check.args.parts:
        return
    check.current = part
    check.say(f"== {part}")
    t0 = time.monotonic()
    try:
        out = fn(check)
        out.setdefault("status", "ok")
    except Exception as exc:  # a part's failure is a result, not the end of the run
        log.exception("%s failed", part)
        out = failed(first_line(exc))
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["failed_steps"] = count_failed(out) - (out["status"] == "failed")
    check.results[part] = out
    why = "" if out["status"] == "ok" else f" ({out.get('reason') or out.get('error')})"
    check.say(f"{part}: {out['status']}{why}")


def step(check: Check, part: str, what: str, fn, need_s: float = 5.0) -> dict:
    """One step of a part: skipped at the deadline, its error recorded, its duration added."""
    if not check.time_for(part, need_s):
        return skipped("deadline")
    check.say(f"{part}: {what}")
    t0 = time.monotonic()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as exc:
        log.warning("%s: %s failed: %s", part, what, first_line(exc), exc_info=log.isEnabledFor(logging.DEBUG))
        out = failed(first_line(exc))
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def watchdog(check: Check) -> threading.Timer:
    """Print what was recorded and exit once the budget is overrun by --grace-s (a step that hangs
    or a TensorRT build that outlasts the deadline must not cost the whole device session)."""

    def fire():
        check.say(f"watchdog: the budget of {check.budget:.0f} s ran out during {check.current}")
        check.finish(note=f"budget exceeded during {check.current}")
        os._exit(0)

    timer = threading.Timer(check.budget + check.args.grace_s, fire)
    timer.daemon = True
    timer.start()
    return timer


# ---- what this machine has ------------------------------------------------------------------------
def install_carried(check: Check) -> None:
    """--carried DIR: DIR/fixtures becomes BITDANCE_FIXTURES; DIR/wheels/*.whl whose module is not
    importable here are installed into the workdir (no network: --no-index) and put on the path."""
    import importlib.util

    carried = Path(check.args.carried).resolve()
    fixtures = carried / "fixtures"
    if fixtures.is_dir() and "BITDANCE_FIXTURES" not in os.environ:
        os.environ["BITDANCE_FIXTURES"] = str(fixtures)
    wheels = []
    for module, requirement in CARRIED_WHEELS:
        name = re.split(r"[=<>]", requirement)[0].replace("-", "_").lower()
        found = sorted(p for p in (carried / "wheels").glob("*.whl") if p.name.lower().startswith(name + "-"))
        if found and importlib.util.find_spec(module) is None:
            wheels.append(found[-1])
    if not wheels:
        return
    site = check.workdir / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        check.say(f"installing the carried wheels failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return
    sys.path.insert(1, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    importlib.invalidate_caches()
    check.installed = [w.name for w in wheels]
    check.say(f"installed {len(wheels)} carried wheel(s) into {site}")


def cpu_flags() -> dict:
    info = {"model": platform.processor() or platform.machine()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if model:
            info["model"] = model.group(1).strip()
        have = set(flags.group(1).split()) if flags else set()
        info["flags"] = {f: f in have for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}
    return info


def package_versions() -> dict:
    import importlib.metadata
    import importlib.util

    dist = {"onnxconverter_common": "onnxconverter-common", "prometheus_client": "prometheus-client"}
    out = {}
    for module in OPTIONAL_MODULES:
        if importlib.util.find_spec(module) is None:
            out[module] = None
            continue
        version = "importable"
        for name in (dist.get(module, module), module):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(name)
                break
        out[module] = version
    return out


def part_env(check: Check) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_flags(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "packages": package_versions(),
        "carried_wheels": check.installed,
        "fixtures": os.environ.get("BITDANCE_FIXTURES", str(REPO.parent / "shared" / "fixtures" / "official")),
    }
    env["fixtures_present"] = Path(env["fixtures"], "tiny_4x").is_dir()
    env["missing"] = [m for m, v in env["packages"].items() if v is None]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
        if shutil.which("nvidia-smi"):
            with contextlib.suppress(Exception):
                q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
                env["gpu"]["driver"] = subprocess.run(q, capture_output=True, text=True, timeout=15).stdout.strip()
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # ImportError, or a broken install (missing libnvinfer)
        env["tensorrt"] = None
        env["tensorrt_error"] = first_line(exc)
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception as exc:
        env["onnxruntime"] = None
        env["onnxruntime_error"] = first_line(exc)
    with contextlib.suppress(Exception):
        from bitdance_rt.runtime.int8_kernels import cpu_summary

        env["cpu"]["int8"] = cpu_summary()
    # what the later parts may use
    if not env["cuda_available"]:
        check.cuda_reason = "no CUDA device"
    elif check.args.dry_run:
        check.cuda_reason = "dry run"
    check.trt_reason = check.cuda_reason
    if check.trt_reason is None and env["tensorrt"] is None:
        check.trt_reason = f"tensorrt not importable ({env['tensorrt_error']})"
    return env


# ---- 2: the GPU tests -----------------------------------------------------------------------------
def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests (found, so a new one is not missed)."""
    files = sorted(p for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())
    return [str(p.relative_to(REPO)) for p in files]


def parse_pytest(text: str) -> dict:
    """Counts, failures, skip reasons and the summary line of a `pytest -v -rfEs` log; from the
    per-test lines, so a run killed at its timeout still counts what it reported."""
    outcomes = re.findall(r"^tests/\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
    counts: dict = {}
    for outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    return {
        "counts": counts,
        "failures": [f[:300] for f in re.findall(r"^(?:FAILED|ERROR) (tests/\S+(?: - .*)?)$", text, re.M)][:12],
        "skip_reasons": sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.+)$", text, re.M)))[:8],
        "summary": (re.findall(r"^=+ (.+ in [\d.]+s.*?) =+$", text, re.M) or [""])[-1],
    }


def part_gpu_tests(check: Check) -> dict:
    import importlib.util

    if check.cuda_reason:
        return skipped(check.cuda_reason)
    cap = min(check.args.tests_timeout_s, check.remaining("gpu_tests"))
    if cap < 30:
        return skipped("deadline")
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", "--tb=line"]
    cmd += ["--basetemp", str(check.workdir / "pytest-tmp"), *files]
    if importlib.util.find_spec("xdist") is None:
        cmd[3:3] = ["-o", "addopts="]  # pyproject's addopts name an xdist option
    env = {**os.environ, "BITDANCE_RT_CACHE": str(check.workdir / "test-cache"), "PYTHONUNBUFFERED": "1"}
    logfile = check.workdir / "gpu-tests.log"
    check.say(f"gpu_tests: {' '.join(cmd[1:])} (timeout {cap:.0f} s, log {logfile})")
    timed_out = False
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        check.children.append(proc)
        try:
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc, timed_out = proc.wait(), True
    result = {"files": files, "returncode": rc, **parse_pytest(logfile.read_text(errors="replace"))}
    if timed_out:
        return {**result, **failed(f"timed out after {cap:.0f} s ({sum(result['counts'].values())} tests reported)")}
    if rc not in (0, 5):  # 5: nothing collected
        return {**result, **failed(result["summary"] or f"pytest exited with {rc}")}
    return result


# ---- pipelines ------------------------------------------------------------------------------------
def source_of(model):
    from bitdance_rt.backends import resolve_model

    return resolve_model(model, None, None, None, None, None)


def graphs_for(check: Check, model, steps: int, precision: str, backend: str) -> Path:
    """The export a precision's engines or sessions are made from (cached under the workdir)."""
    from bitdance_rt import paths
    from bitdance_rt.backends import BackendOptions, auto_export

    opts = BackendOptions(backend=backend, max_batch=check.args.max_batch, threads=check.args.threads, progress=False)
    with paths.using_cache_root(check.cache):
        return Path(auto_export(source_of(model), steps, opts, precision))


def open_pipeline(check: Check, model, backend: str, precision: str, steps: int, device: str = "cpu", **kw):
    from bitdance_rt import Pipeline

    return Pipeline.from_pretrained(
        model,
        backend=backend,
        precision=precision,
        steps=steps,
        device=device,
        cache_dir=check.cache,
        threads=check.args.threads,
        max_batch=check.args.max_batch,
        progress=False,
        **kw,
    )


def trt_pipeline(check: Check, model, precision: str, steps: int, **kw):
    """(Pipeline on TensorRT engines, {graphs_s, build_s, route}). from_pretrained(backend="tensorrt")
    builds from the graphs of the precision asked (backends._trt_backend makes them as for ONNX Runtime);
    they are made here first, in the same cache, only to time them apart from the engine build."""
    t0 = time.perf_counter()
    graphs_for(check, model, steps, precision, "tensorrt")
    t1 = time.perf_counter()
    pipe = open_pipeline(check, model, "tensorrt", precision, steps, device="cuda", **kw)
    route = f"{precision} graphs, made first, found by from_pretrained"
    return pipe, {"graphs_s": round(t1 - t0, 2), "build_s": round(time.perf_counter() - t1, 2), "route": route}


def release(pipe) -> None:
    if pipe is not None:
        pipe.close()
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sample(pipe, labels, seed: int):
    """(tokens, image) of one fixed-seed request, on the CPU."""
    out = pipe.generate(labels=labels, seed=seed)
    return out.tokens.cpu(), out.image.float().cpu()


def agreement(a, b) -> dict:
    """Token agreement of one run against a reference (tokens are +/-1: compared exactly)."""
    tokens, image = a
    ref_tokens, ref_image = b
    if tokens.shape != ref_tokens.shape:
        return {"token_agreement": None, "error": f"shapes {list(tokens.shape)} != {list(ref_tokens.shape)}"}
    return {
        "token_agreement": round(float((tokens == ref_tokens).float().mean()), 6),
        "identical_tokens": bool((tokens == ref_tokens).all()),
        "image_max_abs_diff": round(float((image - ref_image).abs().max()), 6),
    }


# ---- 3: engines and tokens ------------------------------------------------------------------------
def candidates(check: Check, precision: str) -> dict:
    """name -> None (runs) or the reason it does not, for one precision."""
    out = {"tensorrt": check.trt_reason}
    if precision in ("fp32", "bf16"):
        out["torch_cuda"] = check.cuda_reason
    if check.args.dry_run and precision == "fp32":
        out["torch_cpu"] = None  # (the dry run's stand-in: the comparison itself gets exercised)
    return out


def model_engines(check: Check, model, labels: list[int], steps: int, precisions) -> dict:
    part, seed = "engines", check.args.seed
    out: dict = {"steps": steps, "labels": labels, "seed": seed}
    refs: dict = {}

    def ort(precision: str):
        def run():
            t0 = time.perf_counter()
            pipe = open_pipeline(check, model, "onnxruntime", precision, steps)
            try:
                load = time.perf_counter() - t0
                refs[precision] = sample(pipe, labels, seed)
            finally:
                release(pipe)
            res = {"load_s": round(load, 2)}
            if precision != "fp32" and "fp32" in refs:
                res["vs_onnxruntime_fp32"] = agreement(refs[precision], refs["fp32"])
            return res

        return run

    out["onnxruntime_cpu_fp32"] = step(check, part, f"{model or 'embedded'}: ONNX Runtime CPU fp32", ort("fp32"), 10)
    if "fp32" not in refs:
        return {**out, **failed("no ONNX Runtime fp32 reference")}
    for precision in precisions:
        entry: dict = {}
        todo = candidates(check, precision)
        if any(reason is None for reason in todo.values()) and precision != "fp32":
            if precision == "bf16":
                entry["onnxruntime_cpu"] = skipped("ONNX Runtime's CPU provider has no BF16 MatMul")
            else:
                entry["onnxruntime_cpu"] = step(check, part, f"ONNX Runtime CPU {precision}", ort(precision), 10)
        for name, reason in todo.items():
            if reason is not None:
                entry[name] = skipped(reason)
                continue

            def run(name=name, precision=precision):
                t0 = time.perf_counter()
                pipe, res = None, {}
                try:
                    if name == "tensorrt":
                        pipe, res = trt_pipeline(check, model, precision, steps)
                    else:
                        device = "cuda" if name == "torch_cuda" else "cpu"
                        pipe = open_pipeline(check, model, "torch", precision, steps, device=device)
                        res = {"load_s": round(time.perf_counter() - t0, 2)}
                    res["description"] = pipe.description
                    got = sample(pipe, labels, seed)
                finally:
                    release(pipe)
                res["vs_onnxruntime_fp32"] = agreement(got, refs["fp32"])
                if precision != "fp32" and precision in refs:
                    res[f"vs_onnxruntime_{precision}"] = agreement(got, refs[precision])
                return res

            entry[name] = step(check, part, f"{model or 'embedded'}: {name} {precision}", run, 15)
        out[precision] = entry
    return out


def part_engines(check: Check) -> dict:
    out: dict = {}
    steps = check.args.check_steps
    out["embedded"] = model_engines(check, None, list(range(10)), steps, check.args.precisions)
    if not check.args.b4x:
        out[B4X] = skipped("--no-b4x")
    elif check.cuda_reason:
        out[B4X] = skipped(check.cuda_reason)
    elif not check.time_for("engines", check.args.b4x_min_s):
        out[B4X] = skipped("deadline")
    else:
        out[B4X] = model_engines(
            check, B4X, B4X_LABELS, steps, [p for p in ("fp32", "fp16") if p in check.args.precisions]
        )
    return out


# ---- 4: speed -------------------------------------------------------------------------------------
def images_per_s(check: Check, pipe, labels, part: str = "speed") -> dict:
    """Warm-up once (engines' first calls, CUDA-graph captures), then repeat until --min-seconds
    (at most --max-repeats, at least one) or the deadline."""
    pipe.generate(labels=labels, seed=1)
    runs, t0 = 0, time.perf_counter()
    while True:
        pipe.generate(labels=labels, seed=2 + runs)
        runs += 1
        wall = time.perf_counter() - t0
        if runs >= check.args.max_repeats or wall >= check.args.min_seconds or check.remaining(part) < wall / runs:
            break
    return {"images_per_s": round(len(labels) * runs / wall, 4), "s_per_call": round(wall / runs, 4), "runs": runs}


def measure(check: Check, model, steps: int, open_fn, batches) -> dict:
    """images/s of one backend at each batch size (one Pipeline, opened once)."""
    from bitdance_rt.config import load_config

    classes = load_config(model or "tiny-digits").num_classes
    t0 = time.perf_counter()
    pipe, info = None, {}
    try:
        made = open_fn()
        pipe, info = made if isinstance(made, tuple) else (made, {})
        res = {"model": model or "embedded", "steps": steps, "load_s": round(time.perf_counter() - t0, 2), **info}
        for batch in batches:
            labels = [(7 * i + 1) % classes for i in range(batch)]
            res[f"batch{batch}"] = step(check, "speed", f"batch {batch}", lambda: images_per_s(check, pipe, labels))
        return res
    finally:
        release(pipe)


def with_ratios(entry: dict, ref: dict, batches) -> dict:
    for batch in batches:
        got, base = entry.get(f"batch{batch}", {}), ref.get(f"batch{batch}", {})
        if got.get("images_per_s") and base.get("images_per_s"):
            got["vs_onnxruntime_cpu_fp32"] = round(got["images_per_s"] / base["images_per_s"], 3)
    return entry


def part_speed(check: Check) -> dict:
    batches = check.args.batches
    out: dict = {"batches": batches}
    runs = [("embedded", None, check.args.steps)]
    if check.args.b4x and not check.cuda_reason:
        runs.append((B4X, B4X, check.args.check_steps))
    for key, model, steps in runs:
        if key == B4X and not check.time_for("speed", check.args.b4x_min_s):
            out[key] = skipped("deadline")
            continue
        res: dict = {}
        name = f"{key} onnxruntime cpu fp32"
        res["onnxruntime_cpu_fp32"] = step(
            check,
            "speed",
            name,
            lambda: measure(
                check, model, steps, lambda: open_pipeline(check, model, "onnxruntime", "fp32", steps), batches
            ),
        )
        ref = res["onnxruntime_cpu_fp32"]
        gpu_runs = [
            ("tensorrt_fp16_cuda_graphs", check.trt_reason, lambda: trt_pipeline(check, model, "fp16", steps)),
            (
                "tensorrt_fp16_no_cuda_graphs",
                check.trt_reason,
                lambda: trt_pipeline(check, model, "fp16", steps, cuda_graphs=False),
            ),
            (
                "torch_cuda_fp32",
                check.cuda_reason,
                lambda: open_pipeline(check, model, "torch", "fp32", steps, device="cuda"),
            ),
            (
                "torch_cuda_bf16",
                check.cuda_reason,
                lambda: open_pipeline(check, model, "torch", "bf16", steps, device="cuda"),
            ),
        ]
        for label, reason, open_fn in gpu_runs:
            if reason is not None:
                res[label] = skipped(reason)
                continue
            res[label] = with_ratios(
                step(check, "speed", f"{key} {label}", lambda: measure(check, model, steps, open_fn, batches), 10),
                ref,
                batches,
            )
        with_ratios(ref, ref, batches)
        out[key] = res
    return out


# ---- 5: serving -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> tuple[bool, str, int]:
    """(ok, what went wrong, images) of one image request: 200 and n PNGs in b64_json."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}", 0
    except Exception as exc:  # timeouts, refused connections, bad JSON
        return False, type(exc).__name__, 0
    images = [d.get("b64_json", "") for d in answer.get("data", [])]
    if len(images) != body["n"] or not all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images):
        return False, "not n PNG images", 0
    return True, "", len(images)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else None


def sweep_level(check: Check, url: str, concurrency: int, requests: int, classes: int) -> dict:
    """Closed loop: `concurrency` workers, each sends its next request when the last is answered."""
    lock, issued, results = threading.Lock(), [0], []
    timeout = max(5.0, min(120.0, check.remaining("serving")))

    def worker():
        while True:
            with lock:
                k = issued[0]
                if k >= requests or check.remaining("serving") < 2:
                    return
                issued[0] += 1
            body = {"labels": [k % classes], "n": 1, "seed": k, "response_format": "b64_json"}
            t0 = time.perf_counter()
            ok, why, images = post(url, body, timeout)
            results.append((ok, why, images, time.perf_counter() - t0))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    latencies = [r[3] for r in results if r[0]]
    errors: dict = {}
    for ok, why, _, _ in results:
        if not ok:
            errors[why] = errors.get(why, 0) + 1
    images = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": errors,
        "images_per_s": round(images / wall, 3) if wall > 0 else None,
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
    }


def part_serving(check: Check) -> dict:
    import importlib.util

    from bitdance_rt.config import load_config

    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if check.trt_reason is None:
        backend = ["--backend", "tensorrt", "--precision", "fp16", "--device", "cuda"]  # (FP16 graphs: its own)
    elif check.cuda_reason is None:
        backend = ["--backend", "torch", "--device", "cuda"]  # (TensorRT missing: what the GPU can serve)
    elif check.args.dry_run and check.args.cpu_serving:
        backend = ["--backend", "onnxruntime"]
    else:
        return skipped(check.cuda_reason)
    if missing:
        return skipped(f"{', '.join(missing)} not importable (carry the wheels: --prepare / --carried)")
    if not check.time_for("serving", 15):
        return skipped("deadline")
    port = free_port()
    cmd = [sys.executable, "-m", "bitdance_rt", "serve", "--host", "127.0.0.1", "--port", str(port), *backend]
    cmd += ["--steps", str(check.args.steps), "--max-batch", str(check.args.max_batch)]
    if check.args.threads:
        cmd += ["--threads", str(check.args.threads)]
    env = {**os.environ, "BITDANCE_RT_CACHE": str(check.cache), "PYTHONUNBUFFERED": "1"}
    logfile = check.workdir / "serve.log"
    precision = backend[3] if backend[1] == "tensorrt" else "fp32"
    what = f"{backend[1]} {precision} ({'cuda' if '--device' in backend else 'cpu'})"
    out = {"backend": what, "steps": check.args.steps, "max_batch": check.args.max_batch}
    if check.trt_reason is not None and check.cuda_reason is None:
        out["note"] = f"TensorRT not run ({check.trt_reason}): torch on CUDA served instead"
    base = f"http://127.0.0.1:{port}"
    with open(logfile, "w") as log_out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_out, stderr=subprocess.STDOUT)
        check.children.append(proc)
        try:
            t0 = time.perf_counter()
            while True:
                if proc.poll() is not None or check.remaining("serving") < 5:
                    lines = logfile.read_text(errors="replace").strip().splitlines() or [""]
                    said = [line for line in lines if re.search(r"error|failed", line, re.I)] or lines[-1:]
                    why = f"exit status {proc.poll()}" if proc.poll() is not None else "deadline"
                    return {**out, **failed(f"the server did not become ready ({why}): {said[-1][:300]}")}
                with contextlib.suppress(OSError, urllib.error.URLError):
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                time.sleep(0.25)
            out["ready_s"] = round(time.perf_counter() - t0, 2)
            classes = load_config("tiny-digits").num_classes
            url = f"{base}/v1/images/generations"
            warm = post(url, {"labels": [0], "n": 1, "seed": 0, "response_format": "b64_json"}, 120)
            out["warm_up_ok"] = warm[0]
            levels = []
            for c in check.args.concurrency:
                if check.remaining("serving") < 5:
                    levels.append({"concurrency": c, **skipped("deadline")})
                    continue
                check.say(f"serving: concurrency {c}")
                levels.append(sweep_level(check, url, c, max(c, check.args.requests_per_level), classes))
            out["levels"] = levels
            if not any(lv.get("requests") for lv in levels):
                return {**out, **failed("no request was answered")}
            return out
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---- here, before a device run: what to carry -----------------------------------------------------
def prepare(target: Path, python_version: str) -> int:
    """Copy the official fixtures and download the wheels the lent GPU machine lacks into `target`
    (an ignored folder of the checkout, e.g. cache/gpu-check), then print the device command."""
    fixtures = Path(os.environ.get("BITDANCE_FIXTURES", REPO.parent / "shared" / "fixtures" / "official"))
    if not fixtures.is_dir():
        print(f"error: no fixtures at {fixtures} (set BITDANCE_FIXTURES)", file=sys.stderr)
        return 2
    shutil.copytree(fixtures, target / "fixtures", dirs_exist_ok=True)
    tag = python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["-d", str(target / "wheels")]
    cmd += ["--python-version", python_version, "--implementation", "cp", "--abi", f"cp{tag}"]
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", plat]
    done = subprocess.run(cmd + [req for _, req in CARRIED_WHEELS])
    if done.returncode != 0:
        print("error: pip download failed (see above)", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) / 2**20
    rel = os.path.relpath(target, REPO)
    if rel.startswith(".."):
        print(f"warning: {target} is outside the checkout, and only the checkout travels to the GPU machine")
    print(f"{target}: fixtures + {len(list((target / 'wheels').glob('*.whl')))} wheels, {size:.1f} MiB")
    print(
        f"device command (carry {rel!r}): set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py "
        f"--carried {rel} --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log"
    )
    return 0


# ---- main -----------------------------------------------------------------------------------------
def csv(kind):
    return lambda text: [kind(x) for x in text.replace(",", " ").split()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=420, help="global deadline in seconds (default 420)")
    ap.add_argument("--grace-s", type=float, default=30, help="past the budget, the watchdog prints and exits")
    ap.add_argument("--workdir", default=None, help="everything written goes here (default: a new temp dir)")
    ap.add_argument("--cache-dir", default=None, help="the bitdance-rt cache root (default WORKDIR/cache)")
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    ap.add_argument("--dry-run", action="store_true", help="CPU parts only; the GPU parts are skipped")
    ap.add_argument("--cpu-serving", action="store_true", help="dry run: exercise the serving sweep on the CPU")
    ap.add_argument("--carried", default=None, help="a folder made by --prepare: fixtures and wheels")
    ap.add_argument("--prepare", default=None, metavar="DIR", help="here: fill DIR to carry, print the command")
    ap.add_argument("--device-python", default="3.12", help="--prepare: the GPU machine's Python (wheel tags)")
    ap.add_argument("--parts", type=csv(str), default=list(PARTS), help=f"a subset of {','.join(PARTS)}")
    ap.add_argument("--precisions", type=csv(str), default=list(PRECISIONS), help="engines: precisions, in order")
    ap.add_argument("--steps", type=int, default=25, help="speed and serving: sampler steps (the model's 25)")
    ap.add_argument("--check-steps", type=int, default=4, help="engines (and B-4x speed): sampler steps")
    ap.add_argument("--max-batch", type=int, default=16, help="the graphs' and engines' max batch")
    ap.add_argument("--batches", type=csv(int), default=[1, 8])
    ap.add_argument("--concurrency", type=csv(int), default=[1, 4, 16])
    ap.add_argument("--requests-per-level", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--tests-timeout-s", type=float, default=150)
    ap.add_argument("--min-seconds", type=float, default=1.0, help="speed: repeat a call at least this long")
    ap.add_argument("--max-repeats", type=int, default=5)
    ap.add_argument("--no-b4x", dest="b4x", action="store_false", help="the embedded model only")
    ap.add_argument("--b4x-min-s", type=float, default=90, help="start B-4x only with this much time left")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.parts) - set(PARTS)) + sorted(set(args.precisions) - set(PRECISIONS))
    if unknown:
        ap.error(f"unknown part or precision: {', '.join(unknown)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(Path(args.prepare).resolve(), args.device_python)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitdance_rt").setLevel(logging.INFO)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="gpu-check-")
    check = Check(args)
    check.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["BITDANCE_RT_CACHE"] = str(check.cache)  # nothing in the user's cache, subprocesses included
    timer = watchdog(check)
    dry = ", dry run" if args.dry_run else ""
    check.say(f"gpu_check: budget {check.budget:.0f} s, workdir {check.workdir}{dry}")
    try:
        if args.carried:
            install_carried(check)
        for part, fn in (
            ("env", part_env),
            ("gpu_tests", part_gpu_tests),
            ("engines", part_engines),
            ("speed", part_speed),
            ("serving", part_serving),
        ):
            if part == "env" and part not in args.parts:
                with contextlib.suppress(Exception):
                    part_env(check)  # (not recorded: what the other parts need to know)
            elif part in args.parts and part != "env" and check.remaining() < 1:
                check.results[part] = skipped("deadline")
                continue
            run_part(check, part, fn)
    finally:
        timer.cancel()
        check.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
