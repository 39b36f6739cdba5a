"""benchmarks/bench_http.py against a real `bitdance-rt serve` (the embedded model): the final JSON
line's structure and that its counts add up. No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from serve_util import free_port, server_process

BENCH = REPO / "benchmarks" / "bench_http.py"
KEY = "bench-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("fastapi")
    port = free_port()
    env = {"BITDANCE_RT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with server_process(["--backend", "torch", "--api-key", KEY, "--log-level", "warning"], env, port) as proc:
        yield f"http://127.0.0.1:{port}", proc


def bench(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_sweep_and_preview_cost_counts_add_up(server, tmp_path):
    url, proc = server
    plot = tmp_path / "sweep.png"
    res = bench(
        "--url",
        url,
        "--api-key",
        KEY,
        "--concurrency",
        "1,2",
        "--requests-per-level",
        4,
        "--warmup",
        1,
        "--steps",
        4,
        "--wait",
        60,
        "--plot",
        plot,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["bench"] == "http" and out["health"]["status"] == "ok"
    assert out["image_size"] == [32, 32]  # the embedded model's
    assert [s["concurrency"] for s in out["levels"]] == [1, 2]
    pc = out["preview_cost"]
    assert pc["concurrency"] == 2 and pc["without"]["partial_images"] == 0 and pc["with"]["partial_images"] == 3
    every = out["levels"] + [pc["without"], pc["with"]]
    for s in every:
        assert s["requests"] == s["ok"] + s["errors"] == 4
        assert s["errors"] == 0 and s["errors_by_status"] == {}
        assert s["images"] == s["ok"]  # n = 1
        for k in ("images_per_s", "requests_per_s", "p50_s", "p95_s", "p99_s", "first_p50_s"):
            assert s[k] > 0
        assert s["p50_s"] <= s["p95_s"] <= s["p99_s"]
    assert pc["with"]["first_kind"] == "partial_image" and pc["with"]["partials_per_image"] > 0
    assert pc["without"]["partials_per_image"] == 0
    assert out["totals"] == {"requests": 16, "ok": 16, "errors": 0, "images": 16}
    # the server's own counters saw at least this run's images (the warm-up too)
    images = {k: v for k, v in (out["server_metrics_delta"] or {}).items() if k.startswith("bitdance_images_total")}
    assert sum(images.values()) >= 16
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert any(line.startswith("preview cost at C=2") for line in lines)
    assert proc.poll() is None


def test_no_server_is_a_clear_error():
    res = bench("--url", f"http://127.0.0.1:{free_port()}", "--wait", 0.5, timeout=30)
    assert res.returncode != 0
    assert "no server at" in res.stderr and "bitdance-rt serve" in res.stderr and "Traceback" not in res.stderr


def test_wrong_key_is_a_clear_error(server):
    url, _ = server
    res = bench("--url", url, "--api-key", "wrong", "--concurrency", 1, "--requests-per-level", 1, "--wait", 60)
    assert res.returncode != 0
    assert "warm-up request failed" in res.stderr and "401" in res.stderr and "Traceback" not in res.stderr
