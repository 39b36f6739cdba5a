"""The HTTP server under fault injection (each test fails on the server before these fixes): class
prompts int() cannot read, bugs (a JSON 500, counted, connection kept), clients that stall their
headers or body (timed out; SIGTERM does not wait for them), bodies too large or sent without the
key (refused before a byte is read), auth on /docs and an empty key, a bad or busy port, admission
by backlog, errors in OpenAI's shape everywhere, strict types, and Pipeline ParamErrors as 400s.
(Over 400 lines: its tests share one Pipeline, two servers on it and the raw-HTTP helpers, made once.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from bitdance_rt.runtime.params import MAX_CFG, MAX_SEED, MAX_STEPS, ParamError  # noqa: E402
from bitdance_rt.serve import ServerSettings, make_app  # noqa: E402
from bitdance_rt.serve.app import ApiError, ServerState  # noqa: E402

from conftest import cached_pipeline  # noqa: E402
from serve_util import ThreadServer, free_port, png_array, server_process  # noqa: E402

GEN = "/v1/images/generations"
KEY = "k3y"
LIMIT = 16384  # max_body_bytes of the test servers (a 4,400-digit prompt fits)
BODY_S = 1.5  # body_timeout of the test servers


@pytest.fixture(scope="module")
def pipe(warm_cache):
    with cached_pipeline(warm_cache, backend="torch") as p:
        yield p


def _settings(**kw) -> ServerSettings:
    return ServerSettings(**{"body_timeout": BODY_S, "max_body_bytes": LIMIT, **kw})


@pytest.fixture(scope="module")
def server(pipe):
    settings = _settings()
    with ThreadServer(make_app(pipe, settings), settings) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(pipe):
    settings = _settings(api_key=KEY)
    with ThreadServer(make_app(pipe, settings), settings) as s:
        yield s


def _metric(url: str, name: str, headers=None) -> float:
    text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


# ---- raw HTTP: what httpx will not send (stalls, lies in Content-Length, one kept-alive socket) ----
def _connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    head = {
        "Host": "127.0.0.1",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _response(sock: socket.socket, seconds: float = 10) -> tuple[int, dict, bytes] | None:
    """(status, headers, body) of one response, or None when the server closed without one."""
    sock.settimeout(seconds)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` within `seconds` (whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (socket.timeout, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def _openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


# ---- 1: class prompts and bugs -------------------------------------------------------------------
BAD_CLASS_PROMPTS = ["--5", "²", "①", "٣", "+3", "1" * 4400, "-" + "9" * 30, "3.0", "0x3"]


def test_class_prompts_are_parsed_strictly(server):
    """Each was a plain-text 500 (int() after str.isdigit()), dropping the keep-alive connection."""
    before = _metric(server.url, 'bitdance_errors_total{kind="bad_request"}')
    with _connect(server.port) as sock:
        for prompt in BAD_CLASS_PROMPTS:
            sock.sendall(_request("POST", GEN, json.dumps({"prompt": prompt}).encode()))
            got = _response(sock)
            assert got is not None, f"{prompt[:20]!r}: connection dropped"
            status, headers, body = got
            assert status == 400 and headers["content-type"] == "application/json", (prompt[:20], body[:200])
            error = _openai_error(body)
            assert error["param"] == "prompt" and error["type"] == "invalid_request_error", error
            assert len(error["message"]) < 300, error
        sock.sendall(_request("POST", GEN, json.dumps({"prompt": "3", "seed": 1}).encode()))
        status, _, body = _response(sock, 60)  # the same connection, still usable
        assert status == 200 and len(json.loads(body)["data"]) == 1
    after = _metric(server.url, 'bitdance_errors_total{kind="bad_request"}')
    assert after == before + len(BAD_CLASS_PROMPTS)


def test_a_bug_is_a_json_500_counted_and_the_connection_kept(server, monkeypatch):
    import bitdance_rt.serve.app as app_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "to_job", broken)
    before = _metric(server.url, 'bitdance_errors_total{kind="internal"}')
    with _connect(server.port) as sock:
        sock.sendall(_request("POST", GEN, b'{"prompt": "3"}'))
        status, headers, body = _response(sock)
        assert status == 500 and headers["content-type"] == "application/json", body
        error = _openai_error(body)
        assert error["type"] == "server_error" and "a bug" not in error["message"], error
        sock.sendall(_request("GET", "/health"))
        assert _response(sock)[0] == 200  # the connection was kept
    assert _metric(server.url, 'bitdance_errors_total{kind="internal"}') == before + 1


@pytest.mark.parametrize(
    "param,field",
    [
        ("cfg", "guidance_scale"),
        ("num_images", "n"),
        ("seed", "seed"),
        ("steps", "steps"),
        ("labels", "labels"),
        ("preview_every", "partial_images"),
    ],
)
def test_pipeline_param_errors_name_the_http_field(server, pipe, monkeypatch, param, field):
    def refuse(*args, **kwargs):
        raise ParamError(param, f"{param} is wrong")

    monkeypatch.setattr(pipe, "submit", refuse)
    r = httpx.post(server.url + GEN, json={"prompt": "3"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert r.json()["error"]["message"] == f"{param} is wrong"


# ---- 2: stalled clients, SIGTERM -------------------------------------------------------------------
def test_unfinished_headers_and_bodies_are_timed_out(server):
    """Before: never timed out (200 such connections all held after 20 s)."""
    before = _metric(server.url, 'bitdance_errors_total{kind="body_timeout"}')
    silent, headers_only, body_half = _connect(server.port), _connect(server.port), _connect(server.port)
    with silent, headers_only, body_half:
        headers_only.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Len")
        body_half.sendall(_request("POST", GEN, b'{"prompt": "3", ', headers={"Content-Length": "100"}))
        began = time.monotonic()
        got = _response(body_half, BODY_S + 5)
        assert got is not None and got[0] == 408, got
        assert _openai_error(got[2])["code"] == "request_timeout" and got[1]["connection"] == "close"
        got = _response(headers_only, BODY_S + 5)
        assert got is not None and got[0] == 408 and _openai_error(got[2])["code"] == "request_timeout", got
        assert _closed(silent, BODY_S + 5)
        assert time.monotonic() - began < BODY_S + 5
    assert _metric(server.url, 'bitdance_errors_total{kind="body_timeout"}') == before + 2


def test_sigterm_drains_real_work_but_not_a_stalled_upload(warm_cache):
    """Before: one client sending headers and no body kept the server alive for request timeout + 5 s.
    Now the stalled upload gets 503 at once (not even its body timeout is waited for) while the
    request in flight is finished and answered."""
    port = free_port()
    env = {"BITDANCE_RT_CACHE": str(warm_cache), "OMP_NUM_THREADS": "1"}
    shutdown_s = 20
    args = [
        "--backend",
        "torch",
        "--threads",
        "1",
        "--log-level",
        "warning",
        "--shutdown-timeout",
        str(shutdown_s),
        "--body-timeout",
        "60",
    ]
    with server_process(args, env, port, ready_s=120) as proc:
        url = f"http://127.0.0.1:{port}"
        result = {}

        def work():
            try:
                result["r"] = httpx.post(url + GEN, json={"prompt": "5", "seed": 3, "steps": 150}, timeout=60)
            except Exception as exc:  # reported below
                result["r"] = exc

        worker = threading.Thread(target=work)
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=5).json().get("rows_in_flight", 0) == 0 and "r" not in result:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.02)
        with _connect(port) as stalled:
            stalled.sendall(_request("POST", GEN, headers={"Content-Length": "100"}))
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            began = time.monotonic()
            got = _response(stalled, 10)
            assert got is None or got[0] == 503, got
            assert proc.wait(timeout=shutdown_s + 5) in (0, -signal.SIGTERM)
            assert time.monotonic() - began < shutdown_s
        worker.join(60)
    r = result["r"]
    assert not isinstance(r, Exception), r
    assert r.status_code == 200, r.text[:300]
    assert png_array(r.json()["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_shutdown_timeout_bounds_the_wait_for_work(pipe):
    """Work longer than --shutdown-timeout is cancelled then (its rows freed, so closing the Pipeline
    does not wait for it either); before, the wait was the request timeout + 5 s."""
    settings = _settings(shutdown_timeout=1.0)
    s = ThreadServer(make_app(pipe, settings), settings).__enter__()
    result = {}

    def work():
        try:
            result["r"] = httpx.post(s.url + GEN, json={"prompt": "", "labels": [0] * 16, "steps": 300}, timeout=60)
        except Exception as exc:  # the connection closes unanswered
            result["r"] = exc

    worker = threading.Thread(target=work)
    worker.start()
    deadline = time.monotonic() + 30
    while pipe.rows_in_flight == 0:
        assert time.monotonic() < deadline, "the request did not start"
        time.sleep(0.02)
    began = time.monotonic()
    s.server.should_exit = True
    s.thread.join(timeout=20)
    assert not s.thread.is_alive() and time.monotonic() - began < 1.0 + 5
    worker.join(30)
    assert isinstance(result["r"], Exception) or result["r"].status_code >= 500, result
    deadline = time.monotonic() + 30
    while pipe.rows_in_flight or pipe.queued:
        assert time.monotonic() < deadline, "the cancelled request's rows were not freed"
        time.sleep(0.02)


# ---- 3: the key before the body, bounded bodies, short messages ------------------------------------
def test_key_is_checked_before_the_body_is_read(keyed):
    """Before: a 50 MB body was read and parsed without the key."""
    with _connect(keyed.port) as sock:
        sock.sendall(_request("POST", GEN, headers={"Content-Length": str(50 << 20)}))  # and no body
        status, headers, body = _response(sock)  # 401, not the 408 of a body that never came
        assert status == 401 and _openai_error(body)["code"] == "invalid_api_key"
        assert headers["www-authenticate"] == "Bearer"


def test_bodies_are_bounded(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    before = _metric(keyed.url, 'bitdance_errors_total{kind="too_large"}', auth)
    with _connect(keyed.port) as sock:  # decided from Content-Length, nothing read
        sock.sendall(_request("POST", GEN, headers={**auth, "Content-Length": str(50 << 20)}))
        status, headers, body = _response(sock)
        assert status == 413 and _openai_error(body)["code"] == "request_too_large" and headers["connection"] == "close"
    with _connect(keyed.port) as sock:  # no length: decided while the chunks arrive
        sock.sendall(_request("POST", GEN, headers={**auth, "Content-Length": None, "Transfer-Encoding": "chunked"}))
        chunk = b'{"labels": [' + b"1, " * 1000
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) * 8)
        status, _, body = _response(sock)
        assert status == 413 and _openai_error(body)["code"] == "request_too_large"
    assert _metric(keyed.url, 'bitdance_errors_total{kind="too_large"}', auth) == before + 2
    r = httpx.post(keyed.url + GEN, json={"prompt": "3", "seed": 0}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "3", "n": "x" * 3000}, "n"),
        ({"prompt": "", "labels": "x" * 3000}, "labels"),
        ({"prompt": "3", "guidance_scale": ["x" * 50] * 40}, "guidance_scale"),
        ({"prompt": "3", "z" * 3000: 1}, "z" * 97 + "..."),
    ],
)
def test_messages_quote_at_most_100_characters(keyed, body, param):
    r = httpx.post(keyed.url + GEN, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text[:300]
    assert len(r.json()["error"]["message"]) < 400, r.text


# ---- 4: auth gaps --------------------------------------------------------------------------------
def test_docs_need_the_key(keyed):
    for path in ("/docs", "/redoc", "/openapi.json", "/nope"):
        r = httpx.get(keyed.url + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(keyed.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200


def test_an_empty_key_is_refused_not_no_auth(monkeypatch, capsys):
    import bitdance_rt.serve
    from bitdance_rt.cli import main

    def served(*args, **kwargs):
        raise AssertionError("it served, without auth")

    monkeypatch.setattr(bitdance_rt.serve, "serve", served)
    monkeypatch.delenv("BITDANCE_RT_API_KEY", raising=False)
    assert main(["serve", "--api-key", ""]) == 2
    err = capsys.readouterr().err
    assert "--api-key is empty" in err and err.count("\n") == 1, err
    monkeypatch.setenv("BITDANCE_RT_API_KEY", " ")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "$BITDANCE_RT_API_KEY is empty" in err and err.count("\n") == 1, err


# ---- 5: the port ---------------------------------------------------------------------------------
@pytest.mark.parametrize("port", ["-1", "65536", "http"])
def test_a_bad_port_is_a_usage_error(port, capsys):
    from bitdance_rt.cli import main

    try:
        status = main(["serve", "--port", port])
    except SystemExit as exc:  # (argparse's way, where main does not turn it into a status)
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "--port" in err and "0..65535" in err and "Traceback" not in err, err


def test_a_busy_port_is_one_line_and_status_2_before_loading(tmp_path):
    """Before: uvicorn exited while the model loaded on its thread (abort, status 134)."""
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "bitdance_rt", "serve", "--backend", "torch", "--port", str(port)],
            env={**os.environ, "BITDANCE_RT_CACHE": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "terminate called" not in res.stderr


# ---- 6: admission, errors' shape, Content-Type, strict types ---------------------------------------
def _fake_pipe(backlog: int, queued: int):
    return SimpleNamespace(
        config=SimpleNamespace(name="fake"),
        backlog=backlog,
        queued=queued,
        rows_in_flight=8,
        scheduler=SimpleNamespace(observers=[]),
    )


def test_admission_counts_the_backlog_not_the_queue():
    """Before: 32 of 40 requests refused with 8 of 32 rows busy (a burst waiting for the next AR step)."""
    state = ServerState(ServerSettings(max_queue=4))
    state.ready(_fake_pipe(backlog=0, queued=10))
    assert state.admit() is state.pipeline
    state.pipeline.backlog = 4
    with pytest.raises(ApiError) as info:
        state.admit()
    assert info.value.status == 429 and info.value.headers["Retry-After"]


def test_models_answer_whatever_the_queue_and_every_error_has_openai_shape():
    from fastapi.testclient import TestClient

    with TestClient(make_app(_fake_pipe(backlog=100, queued=100), ServerSettings(max_queue=1))) as c:
        r = c.get("/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "fake", r.text
        assert c.post(GEN, json={"prompt": "3"}).status_code == 429
        r = c.get("/nope")
        assert r.status_code == 404 and _openai_error(r.content)["code"] == "not_found", r.text
        r = c.put("/v1/models")
        assert r.status_code == 405 and r.headers["allow"] == "GET", r.text
        assert "not allowed" in _openai_error(r.content)["message"]
        r = c.post(GEN, content=b'{"prompt": ' + b"1" * 5000 + b"}")  # json.loads refuses such integers
        assert r.status_code == 400 and "not valid JSON" in _openai_error(r.content)["message"], r.text
        text = c.get("/metrics").text
        assert 'bitdance_errors_total{kind="not_found"} 1.0' in text, text
        assert 'bitdance_errors_total{kind="bad_request"} 2.0' in text, text


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_json_is_taken_whatever_the_content_type(server, pipe, content_type):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(
        server.url + GEN, content=json.dumps({"prompt": "2", "seed": 5}).encode(), headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text


STRICT = [
    ({"stream": "yes"}, "stream"),
    ({"prompt": "", "labels": "12"}, "labels"),
    ({"prompt": "", "labels": [3.7]}, "labels"),
    ({"prompt": "", "labels": [True]}, "labels"),
    ({"n": "2"}, "n"),
    ({"seed": True}, "seed"),
    ({"partial_images": 1.0}, "partial_images"),
    ({"steps": MAX_STEPS + 1}, "steps"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"guidance_scale": MAX_CFG * 2}, "guidance_scale"),
    ({"prompt": 3.0}, "prompt"),
]


@pytest.mark.parametrize("body,param", STRICT, ids=[f"{p}-{i}" for i, (_, p) in enumerate(STRICT)])
def test_types_are_strict_and_caps_are_params(server, body, param):
    r = httpx.post(server.url + GEN, json={"prompt": "3", **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_guidance_must_be_finite(server):
    r = httpx.post(server.url + GEN, content=b'{"prompt": "3", "guidance_scale": NaN}', timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guidance_scale", r.text
