"""benchmarks/gpu_check.py on the CPU: the dry run runs every part that needs no GPU (ONNX Runtime, the
torch stand-in of the token comparison, the serving sweep on ONNX Runtime) and ends with one JSON line
naming why each GPU part was skipped; a spent budget skips parts instead of overrunning. The GPU side
runs only on a lent GPU machine, so breaking the script's CPU side must fail here first. No timing is
asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO, copy_cache

pytest.importorskip("onnxruntime")

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
KEYS = {"env", "gpu_tests", "engines", "speed", "serving", "wall_s", "budget_s"}
NO_GPU = {"status": "skipped", "reason": "no CUDA device"}


def gpu_check(*args, timeout=180) -> dict:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert KEYS <= set(out), sorted(out)
    return out


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_records_every_part(embedded_cache_template, tmp_path):
    """One dry run over a copy of the session's warm cache of the embedded model (its export at the
    default S = 25 and max batch 16, which the run's options match)."""
    cache = copy_cache(embedded_cache_template, tmp_path / "cache")
    report = tmp_path / "report.json"
    serving_flag = ["--cpu-serving"] if importlib.util.find_spec("fastapi") else []
    out = gpu_check(
        "--dry-run",
        "--budget-s",
        120,
        "--workdir",
        tmp_path / "work",
        "--cache-dir",
        cache,
        "--out",
        report,
        "--check-steps",
        25,
        "--threads",
        1,
        "--concurrency",
        "1,4",
        "--requests-per-level",
        4,
        *serving_flag,
    )
    assert json.loads(report.read_text()) == out
    assert out["dry_run"] is True and out["budget_s"] == 120
    env = out["env"]
    assert env["status"] == "ok" and env["cuda_available"] is False and "avx2" in env["cpu"]["flags"]
    assert env["onnxruntime"] and "CPUExecutionProvider" in env["onnxruntime_providers"]
    assert {k: out["gpu_tests"][k] for k in NO_GPU} == NO_GPU
    assert [out[part]["failed_steps"] for part in ("env", "engines", "speed", "serving")] == [0, 0, 0, 0], out

    engines = out["engines"]["embedded"]
    assert out["engines"]["status"] == "ok" and engines["onnxruntime_cpu_fp32"]["status"] == "ok"
    fp32 = engines["fp32"]
    assert fp32["tensorrt"] == NO_GPU and fp32["torch_cuda"] == NO_GPU
    # the comparison path itself, with torch on the CPU standing in: the reference sampler's tokens
    assert fp32["torch_cpu"]["status"] == "ok" and fp32["torch_cpu"]["vs_onnxruntime_fp32"]["token_agreement"] == 1.0
    for precision in ("fp16", "int8", "bf16", "int4"):
        assert engines[precision]["tensorrt"] == NO_GPU, precision
    assert out["engines"]["BitDance-B-4x"] == NO_GPU

    speed = out["speed"]["embedded"]
    for batch in ("batch1", "batch8"):
        ref = speed["onnxruntime_cpu_fp32"][batch]
        assert ref["status"] == "ok" and ref["images_per_s"] > 0 and ref["vs_onnxruntime_cpu_fp32"] == 1.0
    for name in ("tensorrt_fp16_cuda_graphs", "tensorrt_fp16_no_cuda_graphs", "torch_cuda_fp32", "torch_cuda_bf16"):
        assert speed[name] == NO_GPU, name

    serving = out["serving"]
    if not serving_flag:  # (no fastapi here: the sweep is the GPU part it is)
        assert serving["reason"] == "no CUDA device"
        return
    assert serving["status"] == "ok" and serving["backend"] == "onnxruntime fp32 (cpu)", serving
    assert [lv["concurrency"] for lv in serving["levels"]] == [1, 4]
    for level in serving["levels"]:
        assert level["requests"] == 4 and level["errors"] == {} and level["p50_s"] <= level["p95_s"]


def test_spent_budget_skips_the_parts(tmp_path):
    out = gpu_check("--dry-run", "--budget-s", 0, "--workdir", tmp_path, timeout=120)
    assert out["env"]["status"] == "ok"
    for part in ("gpu_tests", "engines", "speed", "serving"):
        assert out[part] == {"status": "skipped", "reason": "deadline"}, part


def test_gpu_test_selection_and_pytest_log():
    """The GPU tests it runs are the `gpu`-marked ones; a log's outcomes are counted line by line."""
    check = _module()
    assert "tests/test_trt_gpu.py" in check.gpu_test_files()
    log = "\n".join(
        [
            "tests/test_trt_gpu.py::test_a[tiny_4x] PASSED                [ 50%]",
            "tests/test_trt_gpu.py::test_b[tiny_4x] FAILED                [100%]",
            "tests/test_trt_gpu.py::test_c SKIPPED (needs a second GPU)   [100%]",
            "SKIPPED [1] tests/test_trt_gpu.py:201: needs a second GPU",
            "FAILED tests/test_trt_gpu.py::test_b[tiny_4x] - AssertionError: tokens differ",
            "=================== 1 failed, 1 passed, 1 skipped in 9.87s ===================",
        ]
    )
    got = check.parse_pytest(log)
    assert got["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert got["failures"] == ["tests/test_trt_gpu.py::test_b[tiny_4x] - AssertionError: tokens differ"]
    assert got["skip_reasons"] == ["needs a second GPU"] and got["summary"] == "1 failed, 1 passed, 1 skipped in 9.87s"


def test_unknown_precisions_are_refused():
    """The precisions checked are the package's (every TensorRT engine is built from that precision's own
    graphs, as backends._trt_backend makes them); another is a usage error."""
    check = _module()
    assert set(check.PRECISIONS) <= set(__import__("bitdance_rt.precision.policy").precision.policy.PRECISIONS)
    with pytest.raises(SystemExit):
        check.parse_args(["--precisions", "fp8"])
