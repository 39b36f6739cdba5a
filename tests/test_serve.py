"""The HTTP server on the embedded model, called by real clients over loopback (the official
`openai` client and httpx): images equal the in-process Pipeline's, streaming as OpenAI's Images
API streams, every bad input a 4xx naming its field, auth, metrics, a full queue, timeouts, clients
that leave, a soak at concurrency 16, and SIGTERM with requests in flight.
(Over 400 lines: its tests share one server on the embedded model, started once per module.)"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from bitdance_rt import Pipeline  # noqa: E402
from bitdance_rt.images import to_uint8  # noqa: E402
from bitdance_rt.models.layout import tokens_to_latent  # noqa: E402
from bitdance_rt.serve import ServerSettings, make_app  # noqa: E402
from bitdance_rt.runtime.request import preview_steps  # noqa: E402

from conftest import torch_threads  # noqa: E402
from serve_util import ThreadServer, free_port, png_array, server_process, sse_events  # noqa: E402

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(pipe):
    with ThreadServer(make_app(pipe, ServerSettings(max_images=16))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _expected(pipe, labels, seed, n=1, **kw) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe.generate(labels=labels, num_images=n, seed=seed, **kw).images]


def _metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_until(condition, seconds: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---- the OpenAI client, as a user would call it ------------------------------------------------
def test_openai_client_images_equal_pipeline(client, pipe):
    size = pipe.config.image_size
    got = client.images.generate(
        prompt="7", n=2, response_format="b64_json", size=f"{size}x{size}", extra_body={"seed": 11}
    )
    assert isinstance(got.created, int) and len(got.data) == 2
    arrays = [png_array(d.b64_json, (size, size)) for d in got.data]
    for a, b in zip(arrays, _expected(pipe, 7, 11, n=2)):
        np.testing.assert_array_equal(a, b)
    # labels, steps, guidance and schedule as body extensions; the model named as loaded
    got = client.images.generate(
        prompt="",
        model=pipe.config.name,
        extra_body={"labels": [2, 5], "seed": 3, "steps": 7, "guidance_scale": 2.5, "cfg_schedule": "constant"},
    )
    want = _expected(pipe, [2, 5], 3, steps=7, cfg=2.5, cfg_schedule="constant")
    for d, b in zip(got.data, want):
        np.testing.assert_array_equal(png_array(d.b64_json), b)


def test_openai_client_streams_partial_images(client, pipe):
    cfg = pipe.config
    events = list(client.images.generate(prompt="4", stream=True, partial_images=3, extra_body={"seed": 21}))
    kinds = [e.type for e in events]
    steps = preview_steps(cfg.ar_steps, 3)
    assert kinds == ["image_generation.partial_image"] * len(steps) + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(len(steps)))
    out = pipe.generate(labels=4, seed=21)
    np.testing.assert_array_equal(png_array(events[-1].b64_json), np.asarray(out.images[0]))
    # each partial image is the latent so far (the first tokens of generation order) decoded
    per_step = cfg.parallel_num
    for event, step in zip(events[:-1], steps):
        tokens = out.tokens.clone()
        tokens[:, step * per_step :] = 0
        want = to_uint8(pipe.backend.decode(tokens_to_latent(tokens, cfg)).float())[0]
        np.testing.assert_array_equal(png_array(event.b64_json), want)


def test_stream_without_partial_images_and_with_several_images(server, pipe):
    with httpx.stream(
        "POST", server.url + GEN, json={"prompt": "1", "n": 2, "seed": 4, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert [e for e, _ in events] == ["image_generation.completed"] * 2 + [None]
    assert events[-1][1] == "[DONE]"
    for (_, data), want in zip(events, _expected(pipe, 1, 4, n=2)):
        np.testing.assert_array_equal(png_array(json.loads(data)["b64_json"]), want)


def test_preview_steps_spread_over_the_ar_steps():
    assert preview_steps(16, 3) == [4, 8, 12]
    assert preview_steps(4, 3) == [1, 2, 3]
    assert preview_steps(4, 2) == [1, 3]
    assert preview_steps(2, 3) == [1]
    assert preview_steps(8, 0) == []


# ---- bad input: 4xx JSON naming the field ------------------------------------------------------
BAD = [
    ({"prompt": "10"}, 400, "prompt", "out of range"),
    ({"prompt": "", "labels": [3, 10]}, 400, "labels", "label 10 is out of range"),
    ({"prompt": "cat"}, 400, "prompt", "class index 0..9"),
    ({"prompt": "   "}, 400, "prompt", "class-conditional"),
    ({"prompt": "3", "size": "1024x1024"}, 400, "size", "32x32"),
    ({"prompt": "3", "steps": 0}, 400, "steps", "greater than or equal to 1"),
    ({"prompt": "3", "n": 17}, 400, "n", "at most 16"),
    ({"prompt": "", "labels": [1, 2, 3], "n": 6}, 400, "n", "18 images"),
    ({"prompt": "3", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": "3", "partial_images": 4}, 400, "partial_images", "less than or equal to 3"),
    ({"prompt": "3", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": "3", "seeds": 1}, 400, "seeds", "unknown field"),
    ({"prompt": "3", "model": "dall-e-3"}, 404, "model", "tiny-digits"),
    ({"prompt": "3", "guidance_scale": -1}, 400, "guidance_scale", "greater than or equal to 0"),
    ({"prompt": "3", "cfg_schedule": "cosine"}, 400, "cfg_schedule", "linear"),
    ({"prompt": "3", "labels": [1]}, 400, "prompt", "not both"),
    ({"prompt": "x" * 40000}, 400, "prompt", "class-conditional"),
    ({"prompt": "3", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"prompt": "3", "n": "two"}, 400, "n", "integer"),
]


@pytest.mark.parametrize("body,status,param,text", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_field(server, body, status, param, text):
    r = httpx.post(server.url + GEN, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and text in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw,text", [(b'{"prompt": "3",', "not valid JSON"), (b"[1, 2]", "JSON object"), (b"", "JSON object")]
)
def test_malformed_body(server, raw, text):
    r = httpx.post(server.url + GEN, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and text in r.json()["error"]["message"], r.text


def test_openai_client_raises_on_bad_input(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="3", extra_body={"steps": 0})
    assert info.value.body["param"] == "steps"


# ---- health, metrics, auth ----------------------------------------------------------------------
def test_health_and_models(server, pipe, client):
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == pipe.config.name
    assert [m.id for m in client.models.list()] == [pipe.config.name]


def test_metrics_count_images_steps_and_errors(server):
    url = server.url
    images, ok = _metric(url, "bitdance_images_total"), _metric(url, 'bitdance_requests_total{outcome="ok"}')
    steps, bad = (
        _metric(url, "bitdance_ar_step_seconds_count"),
        _metric(url, 'bitdance_errors_total{kind="bad_request"}'),
    )
    latency = _metric(url, "bitdance_request_seconds_count")
    assert (
        httpx.post(url + GEN, json={"prompt": "", "labels": [1, 2], "n": 2, "seed": 0}, timeout=60).status_code == 200
    )
    assert httpx.post(url + GEN, json={"prompt": "1", "steps": 0}, timeout=60).status_code == 400
    assert _metric(url, "bitdance_images_total") == images + 4
    assert _metric(url, 'bitdance_requests_total{outcome="ok"}') == ok + 1
    assert _metric(url, "bitdance_request_seconds_count") == latency + 1
    assert _metric(url, 'bitdance_errors_total{kind="bad_request"}') == bad + 1
    assert _metric(url, "bitdance_ar_step_seconds_count") >= steps + 4  # 4 AR steps at least
    text = httpx.get(url + "/metrics", timeout=10).text
    for name in (
        "bitdance_queue_length",
        "bitdance_rows_in_flight",
        "bitdance_images_per_second",
        "bitdance_first_image_seconds_bucket",
        "bitdance_ar_step_rows_bucket",
        "bitdance_ready 1.0",
    ):
        assert name in text, name
    assert _metric(url, "bitdance_images_per_second") > 0


def test_bearer_token_guards_everything_but_health(pipe):
    app = make_app(pipe, ServerSettings(api_key="s3cret"))
    with ThreadServer(app) as s:
        body = {"prompt": "2", "seed": 0}
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(s.url + GEN, json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            assert httpx.get(s.url + "/metrics", headers=headers, timeout=10).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(s.url + "/metrics", headers=good, timeout=10).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="2")
        got = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0).images.generate(prompt="2")
        assert len(got.data) == 1


def test_health_is_503_until_the_model_is_loaded(pipe, warm_cache):
    from fastapi.testclient import TestClient

    release, loaded = threading.Event(), []

    def loader():  # a Pipeline of its own: the app closes what its loader made
        release.wait(30)
        loaded.append(Pipeline.from_pretrained(threads=1, cache_dir=warm_cache, progress=False))
        return loaded[0]

    with TestClient(make_app(loader=loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post(GEN, json={"prompt": "1"})
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["error"]["message"]
        release.set()
        _wait_until(lambda: c.get("/health").status_code == 200, what="the model to load")
        r = c.post(GEN, json={"prompt": "1", "seed": 0})
        assert r.status_code == 200
        np.testing.assert_array_equal(png_array(r.json()["data"][0]["b64_json"]), _expected(pipe, 1, 0)[0])
    with pytest.raises(Exception, match="closed"):  # shut down with the app
        loaded[0].submit(labels=1)


def test_a_model_that_fails_to_load_is_reported(pipe):
    from fastapi.testclient import TestClient

    failed = []

    def loader():
        raise RuntimeError("checkpoint /x/y.pt: missing key vae.decoder.conv_in.weight")

    with TestClient(make_app(loader=loader, on_load_error=failed.append)) as c:
        _wait_until(lambda: failed, what="the load to fail")
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "missing key" in r.json()["error"]


# ---- admission, time limits, clients that leave -------------------------------------------------
def _occupy_all_rows(pipe, url, steps=1000):
    """A request holding every cache row for a while (16 images with guidance: 32 rows)."""
    result = {}

    def go():
        result["r"] = httpx.post(
            url + GEN, json={"prompt": "", "labels": [0] * 16, "steps": steps, "seed": 1}, timeout=300
        )

    t = threading.Thread(target=go)
    t.start()
    _wait_until(lambda: pipe.rows_in_flight == pipe.scheduler.max_rows, what="the big request to run")
    return t, result


def test_full_queue_answers_429_with_retry_after(pipe):
    with ThreadServer(make_app(pipe, ServerSettings(max_queue=1))) as s:
        big, first = _occupy_all_rows(pipe, s.url)
        waiting = {}
        t = threading.Thread(
            target=lambda: waiting.update(r=httpx.post(s.url + GEN, json={"prompt": "3", "seed": 2}, timeout=300))
        )
        t.start()
        _wait_until(lambda: pipe.queued == 1, what="the second request to wait")
        r = httpx.post(s.url + GEN, json={"prompt": "4", "seed": 3}, timeout=30)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).images.generate(prompt="4")
        assert _metric(s.url, 'bitdance_errors_total{kind="queue_full"}') == 2
        big.join(300)
        t.join(300)
        assert first["r"].status_code == 200 and waiting["r"].status_code == 200  # the admitted ones are answered
        np.testing.assert_array_equal(png_array(waiting["r"].json()["data"][0]["b64_json"]), _expected(pipe, 3, 2)[0])


def test_request_timeout_answers_504_and_frees_rows(pipe):
    with ThreadServer(make_app(pipe, ServerSettings(request_timeout=0.3))) as s:
        body = {"prompt": "", "labels": [5] * 16, "steps": 1000, "seed": 0}
        r = httpx.post(s.url + GEN, json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        _wait_until(lambda: pipe.rows_in_flight == 0 and pipe.queued == 0, what="the rows to be freed")
        with httpx.stream("POST", s.url + GEN, json={**body, "stream": True}, timeout=60) as r:
            events = sse_events(r.iter_lines())
        assert events[-1][0] == "error" and json.loads(events[-1][1])["error"]["code"] == "timeout"
        _wait_until(lambda: pipe.rows_in_flight == 0 and pipe.queued == 0, what="the rows to be freed")
        assert _metric(s.url, 'bitdance_errors_total{kind="timeout"}') == 2


def test_client_leaving_mid_stream_frees_its_rows(server, pipe):
    before = _metric(server.url, 'bitdance_errors_total{kind="disconnected"}')
    body = {"prompt": "", "labels": [6] * 16, "steps": 1000, "seed": 0, "stream": True, "partial_images": 3}
    with httpx.stream("POST", server.url + GEN, json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # one partial image read; then the client hangs up
        assert pipe.rows_in_flight > 0
    _wait_until(lambda: pipe.rows_in_flight == 0 and pipe.queued == 0, what="the stream's rows to be freed")
    _wait_until(
        lambda: _metric(server.url, 'bitdance_errors_total{kind="disconnected"}') == before + 1,
        what="the disconnect to be counted",
    )


def test_client_leaving_a_plain_request_frees_its_rows(server, pipe):
    before = _metric(server.url, 'bitdance_errors_total{kind="disconnected"}')
    body = {"prompt": "", "labels": [8] * 16, "steps": 1000, "seed": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + GEN, json=body, timeout=httpx.Timeout(30, read=0.5))
    _wait_until(lambda: pipe.rows_in_flight == 0 and pipe.queued == 0, what="the rows to be freed")
    _wait_until(
        lambda: _metric(server.url, 'bitdance_errors_total{kind="disconnected"}') == before + 1,
        what="the disconnect to be counted",
    )


# ---- soak -------------------------------------------------------------------------------------
def test_soak_concurrency_16(server, pipe):
    """300 requests from 16 clients at once (plain and streaming, 1 or 2 images): every one answered
    once, with valid PNGs of the right size equal to the Pipeline's for its seed."""
    total, clients = 300, 16
    size = (pipe.config.image_size,) * 2
    specs = [
        {
            "prompt": str(i % 10),
            "seed": 1000 + i,
            "n": 2 if i % 7 == 0 else 1,
            "stream": i % 5 == 0,
            "partial_images": 1 if i % 10 == 0 else 0,
        }
        for i in range(total)
    ]
    work: queue.Queue = queue.Queue()
    for i in range(total):
        work.put(i)
    answers: dict[int, list] = {}
    errors: list = []
    lock = threading.Lock()
    images_before = _metric(server.url, "bitdance_images_total")

    def worker():
        with httpx.Client(base_url=server.url, timeout=120) as http:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    if specs[i]["stream"]:
                        with http.stream("POST", GEN, json=specs[i]) as r:
                            assert r.status_code == 200, r.read()
                            events = sse_events(r.iter_lines())
                        assert events[-1][1] == "[DONE]"
                        got = [json.loads(d)["b64_json"] for e, d in events if e == "image_generation.completed"]
                        partial = [e for e, _ in events if e == "image_generation.partial_image"]
                        assert len(partial) == specs[i]["partial_images"] * specs[i]["n"]
                    else:
                        r = http.post(GEN, json=specs[i])
                        assert r.status_code == 200, r.text
                        got = [d["b64_json"] for d in r.json()["data"]]
                    arrays = [png_array(b, size) for b in got]
                    with lock:
                        assert i not in answers, f"request {i} answered twice"
                        answers[i] = arrays
                except Exception as exc:  # collected: the test fails with all of them
                    with lock:
                        errors.append((i, repr(exc)))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:5]
    assert sorted(answers) == list(range(total))
    assert all(len(answers[i]) == specs[i]["n"] for i in range(total))
    assert _metric(server.url, "bitdance_images_total") == images_before + sum(s["n"] for s in specs)
    futures = [pipe.submit(labels=i % 10, num_images=specs[i]["n"], seed=1000 + i) for i in range(total)]
    for i, f in enumerate(futures):
        for a, b in zip(answers[i], f.result(timeout=300).images):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"request {i}")


# ---- the command: SIGTERM drains ------------------------------------------------------------------
def test_sigterm_answers_every_request_in_flight(warm_cache):
    port = free_port()
    env = {"BITDANCE_RT_CACHE": str(warm_cache), "OMP_NUM_THREADS": "1"}
    # (--shutdown-timeout: 12 requests of 4 images at 200 steps may take longer than the default 30 s here)
    with server_process(["--log-level", "warning", "--threads", "1", "--shutdown-timeout", "300"], env, port) as proc:
        url = f"http://127.0.0.1:{port}"
        results: dict[int, object] = {}

        def go(i):
            body = {"prompt": str(i % 10), "seed": i, "steps": 200, "n": 4, "stream": i % 2 == 1, "partial_images": 1}
            try:
                with httpx.stream("POST", url + GEN, json=body, timeout=300) as r:
                    text = r.read().decode()
                results[i] = (r.status_code, text)
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()

        def admitted() -> int:  # requests running (8 rows each: 4 images with guidance) or waiting
            health = httpx.get(url + "/health", timeout=10).json()
            return health.get("rows_in_flight", 0) // 8 + health.get("queued", 0)

        _wait_until(lambda: admitted() + len(results) == 12, what="all 12 requests to be admitted")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        # uvicorn re-raises the signal once it has shut down cleanly (the parent sees "terminated by
        # SIGTERM"); older releases exit 0
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):  # nothing is admitted any more
            httpx.get(url + "/health", timeout=5)
    assert sorted(results) == list(range(12))
    for i, res in results.items():
        assert not isinstance(res, Exception), (i, res)
        status, text = res
        assert status == 200, (i, text[:500])
        if i % 2:
            events = sse_events(text.splitlines())
            assert [e for e, _ in events].count("image_generation.completed") == 4 and events[-1][1] == "[DONE]"
            images = [json.loads(d)["b64_json"] for e, d in events if e == "image_generation.completed"]
        else:
            images = [d["b64_json"] for d in json.loads(text)["data"]]
        assert len(images) == 4 and all(png_array(b).shape == (32, 32, 3) for b in images)


def test_serve_rejects_bad_options(capsys):
    from bitdance_rt.cli import main

    assert main(["serve", "--max-queue", "-1"]) == 2
    assert "--max-queue must be >= 0" in capsys.readouterr().err
    assert main(["serve", "--request-timeout", "0"]) == 2
    assert "--request-timeout must be > 0" in capsys.readouterr().err
    assert main(["serve", "--steps", "0"]) == 2
    assert "steps must be an integer in 1..1000" in capsys.readouterr().err


def test_pipeline_callback_errors_fail_only_their_request(pipe):
    def boom(progress):
        raise RuntimeError("the caller's callback broke")

    bad = pipe.submit(labels=1, seed=0, on_progress=boom)
    good = pipe.submit(labels=2, seed=0)
    with pytest.raises(RuntimeError, match="callback broke"):
        bad.result(timeout=60)
    np.testing.assert_array_equal(np.asarray(good.result(timeout=60).images[0]), _expected(pipe, 2, 0)[0])
    _wait_until(lambda: pipe.rows_in_flight == 0, what="the failed request's rows to be freed")


def test_text_to_image_server(tmp_path, monkeypatch):
    """A text-to-image model behind the same server: the prompt is text, `size` its WxH; a wrong
    size, labels, an empty or too long prompt are 400s naming the field."""
    from fastapi.testclient import TestClient
    from t2i_tiny import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "t2i", parallel_num=64)
    monkeypatch.setenv("BITDANCE_RT_CACHE", str(tmp_path / "cache"))
    with (
        torch_threads(1),
        Pipeline.from_pretrained(
            backend="torch",
            checkpoint=ckpt,
            height=512,
            width=512,
            max_text_tokens=48,
            steps=2,
            threads=1,
            progress=False,
        ) as p,
    ):
        with TestClient(make_app(p)) as c:
            r = c.post(GEN, json={"prompt": "a red cat", "size": "512x512", "seed": 21})
            assert r.status_code == 200, r.text
            want = np.asarray(p.generate(prompt="a red cat", seed=21).images[0])
            np.testing.assert_array_equal(png_array(r.json()["data"][0]["b64_json"], (512, 512)), want)
            for body, param, text in [
                ({"prompt": "a cat", "size": "1024x1024"}, "size", "512x512"),
                ({"prompt": "", "labels": [1]}, "labels", "text-to-image"),
                ({"prompt": "  "}, "prompt", "empty"),
                ({"prompt": "a very long prompt " * 10}, "prompt", "tokens"),
            ]:
                r = c.post(GEN, json=body)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                assert text in r.json()["error"]["message"], r.text
