"""The Triton model repository (bitdance_rt/triton): writing it, the request parsing, and a real
Triton server (the tritonserver binary nvidia-pytriton bundles: Triton 2.51, Python backend only,
runs on the CPU) streaming the embedded model's images over gRPC and HTTP, pixel-equal to
Pipeline.generate on the same export.
(Over 400 lines: its tests share one export, one reference Pipeline and one real Triton server, each
made once per module.)"""

from __future__ import annotations

import json
import os
import platform
import queue
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bitdance_rt.errors import BitDanceError
from bitdance_rt.runtime.request import preview_steps
from bitdance_rt.triton import write_repository
from bitdance_rt.triton.repository import MODEL_FILE
from bitdance_rt.triton.requests import (
    GenerateArgs,
    ModelInfo,
    RequestError,
    Responder,
    ServeParams,
    Stream,
    input_specs,
    instance_device,
    load_pipeline,
    parse_inputs,
)

NAME = "bitdance"
INFO = ModelInfo(t2i=False, num_classes=10, ar_steps=4, max_images=16)


# ---- shared: one export of the embedded model, one reference Pipeline on it ---------------------------
@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("BITDANCE_RT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def export(cache_root, embedded_cache_template, tmp_path_factory):
    """`bitdance-rt export --out DIR` of the embedded model. DIR starts as a copy of the session's
    automatic export of it (conftest), the same graphs, which the command finds up to date (the
    export itself is test_cli.py's and test_export_onnx.py's)."""
    from bitdance_rt.cli import main

    out = tmp_path_factory.mktemp("export") / "digits"
    (made,) = [d for d in (embedded_cache_template / "exports").iterdir() if (d / "manifest.json").is_file()]
    shutil.copytree(made, out)
    assert main(["export", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(export):
    from bitdance_rt import Pipeline

    pipe = Pipeline.from_pretrained(backend="onnxruntime", export_dir=export, progress=False)
    yield pipe
    pipe.close()


def expected_pixels(reference, labels, seed, num_images=1) -> np.ndarray:
    out = reference.generate(labels=labels, seed=seed, num_images=num_images)
    return np.stack([np.asarray(im) for im in out.images])


def parse_config(path: Path):
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# ---- writing the repository ---------------------------------------------------------------------------
def test_repository_cpu(export, tmp_path):
    repo = write_repository(export, tmp_path / "repo", count=2, threads=2)
    assert sorted(p.name for p in repo.iterdir()) == [NAME]
    assert (repo / NAME / "1" / "model.py").read_text() == MODEL_FILE.read_text()
    cfg = parse_config(repo / NAME / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == (NAME, "python", 0)
    assert cfg.model_transaction_policy.decoupled
    assert [(g.kind, g.count, list(g.gpus)) for g in cfg.instance_group] == [(cfg.instance_group[0].KIND_CPU, 2, [])]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"export_dir": str(export.resolve()), "backend": "onnxruntime", "device": "cpu", "threads": "2"}
    dtype = type(cfg).DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_number
    inputs = {i.name: (dtype[i.data_type].name, list(i.dims), i.optional) for i in cfg.input}
    assert inputs == {
        "labels": ("TYPE_INT32", [-1], False),
        "num_images": ("TYPE_INT32", [1], True),
        "seed": ("TYPE_INT64", [1], True),
        "steps": ("TYPE_INT32", [1], True),
        "guidance_scale": ("TYPE_FP32", [1], True),
        "cfg_schedule": ("TYPE_STRING", [1], True),
        "partial_images": ("TYPE_INT32", [1], True),
    }
    outputs = {o.name: (dtype[o.data_type].name, list(o.dims)) for o in cfg.output}
    assert outputs == {
        "image": ("TYPE_UINT8", [-1, 32, 32, 3]),
        "step": ("TYPE_INT32", [1]),
        "final": ("TYPE_BOOL", [1]),
    }
    assert ServeParams.from_parameters({k: {"string_value": v} for k, v in params.items()}) == ServeParams(
        export_dir=str(export.resolve()), threads=2
    )


def test_repository_gpus(export, tmp_path):
    repo = write_repository(
        export,
        tmp_path / "repo",
        gpus=[0, 2],
        count=3,
        backend="tensorrt",
        precision="fp16",
        name="digits-trt",
        export_path="/models/digits",
        steps=25,
        max_batch=8,
    )
    cfg = parse_config(repo / "digits-trt" / "config.pbtxt")
    kind = cfg.instance_group[0].KIND_GPU
    assert [(g.kind, g.count, list(g.gpus)) for g in cfg.instance_group] == [(kind, 3, [0]), (kind, 3, [2])]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {
        "export_dir": "/models/digits",
        "backend": "tensorrt",
        "precision": "fp16",
        "device": "cuda",
        "steps": "25",
        "max_batch": "8",
    }
    # device cuda without a list: one KIND_GPU group, Triton places it on every GPU
    cfg = parse_config(write_repository(export, tmp_path / "r2", device="cuda") / NAME / "config.pbtxt")
    assert [(g.kind, list(g.gpus)) for g in cfg.instance_group] == [(kind, [])]
    p = ServeParams(export_dir="x", device="cuda")
    assert instance_device(p, "GPU", 2) == "cuda:2" and instance_device(ServeParams(export_dir="x"), "CPU", 0) == "cpu"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_repository_bad_export(export, tmp_path):
    out = tmp_path / "repo"
    with pytest.raises(BitDanceError, match=f"export directory {tmp_path / 'nope'} does not exist"):
        write_repository(tmp_path / "nope", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitDanceError, match=r"empty/manifest.json not found.*not a bitdance-rt export"):
        write_repository(tmp_path / "empty", out)
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "decoder.onnx").write_bytes(b"truncated")
    with pytest.raises(BitDanceError, match=r"broken/decoder.onnx has 9 bytes"):
        write_repository(broken, out)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(BitDanceError, match=r"broken/manifest.json"):
        write_repository(broken, out)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_repository_options_and_replace(export, tmp_path):
    out = tmp_path / "repo"
    for kwargs, message in [
        ({"backend": "tensorrt", "device": "cpu"}, "tensorrt runs on a GPU"),
        ({"gpus": [0], "device": "cpu"}, "with device cpu"),
        ({"device": "cuda:1"}, "--gpus 1"),
        ({"precision": "int8"}, "holds fp32 graphs, not int8"),
        ({"max_batch": 17}, "1..16 images"),
        ({"name": "a/b"}, "model name"),
        ({"count": 0}, "count"),
        ({"backend": "torch"}, "onnxruntime, tensorrt"),
    ]:
        with pytest.raises(BitDanceError, match=message):
            write_repository(export, out, **kwargs)
    assert not out.exists()
    write_repository(export, out)
    with pytest.raises(BitDanceError, match="exists"):
        write_repository(export, out, name="other")
    write_repository(export, out, name="other", force=True)  # replaced as a whole
    assert sorted(p.name for p in out.iterdir()) == ["other"] and _leftovers(tmp_path) == []


# ---- request parsing ----------------------------------------------------------------------------------
def test_parse_defaults_and_values():
    args = parse_inputs({"labels": np.array([3, 7], np.int32)}, INFO)
    assert args == GenerateArgs(labels=[3, 7])
    assert args.pipeline_kwargs() == {
        "labels": [3, 7],
        "prompt": None,
        "num_images": 1,
        "steps": None,
        "cfg": None,
        "cfg_schedule": None,
        "seed": 0,
    }
    args = parse_inputs(
        {
            "labels": np.array([[1]], np.int32),
            "num_images": np.array([2], np.int32),
            "seed": np.array([2**40], np.int64),
            "steps": np.array([8], np.int32),
            "guidance_scale": np.array([1.5], np.float32),
            "cfg_schedule": np.array([b"constant"], object),
            "partial_images": np.array([3], np.int32),
            "prompt": None,
        },
        INFO,
    )
    assert args == GenerateArgs(
        labels=[1], num_images=2, seed=2**40, steps=8, cfg=1.5, cfg_schedule="constant", partial_images=3
    )
    t2i = ModelInfo(t2i=True, num_classes=0, ar_steps=64, max_images=4)
    assert parse_inputs({"prompt": np.array(["a red fox".encode()], object)}, t2i).prompt == "a red fox"
    assert [s.name for s in input_specs(True)][0] == "prompt"


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "input 'labels': required"),
        ({"labels": np.array([3, 12], np.int32)}, r"input 'labels': \[12\] out of range: expected class indices 0..9"),
        ({"labels": np.array([], np.int32)}, "input 'labels': expected a non-empty 1-D"),
        ({"labels": np.array([1.0], np.float32)}, "input 'labels': expected integers"),
        (
            {"labels": np.array([1], np.int32), "prompt": np.array([b"x"], object)},
            "input 'prompt': this model is class",
        ),
        ({"labels": np.array([1], np.int32), "num_images": np.array([0], np.int32)}, "input 'num_images': expected an"),
        (
            {"labels": np.array([1] * 9, np.int32), "num_images": np.array([2], np.int32)},
            "input 'num_images': 18 images",
        ),
        ({"labels": np.array([1], np.int32), "num_images": np.array([1, 2], np.int32)}, r"'num_images': expected one"),
        (
            {"labels": np.array([1], np.int32), "steps": np.array([0], np.int32)},
            "input 'steps': expected an integer in 1",
        ),
        ({"labels": np.array([1], np.int32), "guidance_scale": np.array([np.nan], np.float32)}, "'guidance_scale'"),
        (
            {"labels": np.array([1], np.int32), "cfg_schedule": np.array([b"cosine"], object)},
            "'cfg_schedule': expected",
        ),
        ({"labels": np.array([1], np.int32), "partial_images": np.array([4], np.int32)}, "'partial_images': .* 0..3"),
    ],
)
def test_parse_errors_name_the_input(inputs, message):
    with pytest.raises(RequestError, match=message):
        parse_inputs(inputs, INFO)


def test_parse_t2i_errors():
    t2i = ModelInfo(t2i=True, num_classes=0, ar_steps=64, max_images=4)
    with pytest.raises(RequestError, match="input 'prompt': required"):
        parse_inputs({}, t2i)
    with pytest.raises(RequestError, match="input 'labels': this model is text-to-image"):
        parse_inputs({"labels": np.array([1], np.int32), "prompt": np.array([b"x"], object)}, t2i)
    with pytest.raises(RequestError, match="input 'prompt': expected UTF-8"):
        parse_inputs({"prompt": np.array([b"\xff"], object)}, t2i)


def test_serve_params():
    with pytest.raises(BitDanceError, match="export_dir is missing"):
        ServeParams.from_parameters({})
    with pytest.raises(BitDanceError, match="steps: expected an integer"):
        ServeParams.from_parameters({"export_dir": "x", "steps": "many"})
    with pytest.raises(BitDanceError, match="backend 'torch'"):
        ServeParams.from_parameters({"export_dir": "x", "backend": "torch"})
    assert ServeParams.from_parameters({"export_dir": "x", "other": "y", "precision": ""}) == ServeParams("x")


def test_stream_without_triton(export, reference):
    """The model's streaming path (load_pipeline + Stream) with a stand-in sender: previews at the
    planned steps, then the final image, equal to Pipeline.generate on the same export."""
    pipe = load_pipeline(ServeParams(export_dir=str(export)))
    responder = Responder()
    got = queue.Queue()
    try:
        args = parse_inputs(
            {
                "labels": np.array([4, 2], np.int32),
                "seed": np.array([11], np.int64),
                "partial_images": np.array([2], np.int32),
            },
            ModelInfo.of(pipe),
        )
        Stream(pipe, args, lambda o, e, f: got.put((o, e, f)), responder).start()
        sent = [got.get(timeout=120) for _ in range(3)]
        bad = parse_inputs({"labels": np.array([1], np.int32), "steps": np.array([3], np.int32)}, ModelInfo.of(pipe))
        bad.cfg_schedule = "cosine"  # past the parser: the Pipeline's own check, before anything is sent
        with pytest.raises(BitDanceError, match="cosine"):
            Stream(pipe, bad, lambda *a: None, responder).start()
    finally:
        responder.close()
        pipe.close()
    assert [(o["step"][0], o["final"][0], e, f) for o, e, f in sent] == [
        (1, False, None, False),
        (3, False, None, False),
        (4, True, None, True),
    ]
    np.testing.assert_array_equal(sent[-1][0]["image"], expected_pixels(reference, [4, 2], 11))
    assert sent[0][0]["image"].shape == (2, 32, 32, 3) and sent[0][0]["image"].dtype == np.uint8


# ---- a real Triton server -------------------------------------------------------------------------------
def _server_requirements() -> list[str]:
    """The `triton-server` extra of pyproject.toml: the tritonserver binary (nvidia-pytriton) and the
    numpy < 2 its Python-backend stub needs. Kept out of the test extra, so numpy 2 is what the rest of
    the suite runs on."""
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["triton-server"]


def _stub_venv() -> Path:
    """A side virtual environment for Triton's Python-backend stub: the `triton-server` extra installed
    (no dependencies: only the binary and numpy < 2 are used), in front of this environment's packages
    (a .pth runs site.addsitedir on them), so the stub imports numpy < 2 first and bitdance_rt, torch and
    onnxruntime from here. Made once and kept inside this environment (sys.prefix)."""
    venv = Path(sys.prefix) / "triton-stub"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.is_file() and ready.read_text() == json.dumps(_server_requirements()):
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "zz_bitdance_rt_env.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    res = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", *_server_requirements()],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"installing the triton-server extra into {venv} failed:\n{res.stderr[-2000:]}"
    ready.write_text(json.dumps(_server_requirements()))
    return venv


def _triton_install():
    """(tritonserver binary, python backend dir, 3.11 stub, bundled libs, the stub's venv) or pytest.skip
    with why."""
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        pytest.skip(
            f"the tritonserver bundled with nvidia-pytriton is linux x86_64 only (this is "
            f"{sys.platform} {platform.machine()})"
        )
    for client in ("tritonclient.grpc", "tritonclient.http"):
        pytest.importorskip(client, reason=f"{client} is not installed (pip install 'tritonclient[http,grpc]')")
    venv = _stub_venv()
    found = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            # find_spec, not import: pytriton's own imports need its dependencies, which are not installed
            "import importlib.util, numpy; print(importlib.util.find_spec('pytriton').origin); "
            "print(numpy.__version__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert int(found[1].split(".")[0]) < 2, f"the stub's venv imports numpy {found[1]}"
    root = Path(found[0]).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = (
        root / "bin" / "tritonserver",
        root / "backends" / "python",
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
        root.parents[1] / "nvidia_pytriton.libs",
    )
    missing = [str(p) for p in found[:3] if not p.exists()]
    assert not missing, f"the nvidia-pytriton install lacks {', '.join(missing)}"
    return (*found, venv)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, process, log: Path, http: int, grpc: int):
        self.process, self.log, self.http, self.grpc = process, log, http, grpc

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def triton_install():
    return _triton_install()


@pytest.fixture(scope="module")
def server(triton_install, export, cache_root, tmp_path_factory):  # (skips before the export is made)
    binary, backend, stub, libs, venv = triton_install
    work = tmp_path_factory.mktemp("triton")
    backends = work / "backends" / "python"
    shutil.copytree(backend, backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / stub.name)
    from bitdance_rt.cli import main

    repo = work / "repo"  # written as a user would: bitdance-rt triton-repo --export-dir DIR --out REPO
    assert main(["triton-repo", "--export-dir", str(export), "--out", str(repo), "--name", NAME]) == 0
    http, grpc, metrics = _free_ports(3)
    env = dict(
        os.environ,
        BITDANCE_RT_CACHE=str(cache_root),
        # the stub links the system libpython and the libs pytriton bundles; and imports the first
        # python / numpy on PATH: the stub's venv (numpy < 2, then this environment's packages)
        LD_LIBRARY_PATH=os.pathsep.join(
            filter(None, [sysconfig.get_config_var("LIBDIR"), str(libs), os.environ.get("LD_LIBRARY_PATH")])
        ),
        PATH=os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")]),
    )
    log = work / "tritonserver.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [
                str(binary),
                "--model-repository",
                str(repo),
                "--backend-directory",
                str(backends.parent),
                "--http-address",
                "127.0.0.1",
                "--http-port",
                str(http),
                "--grpc-address",
                "127.0.0.1",
                "--grpc-port",
                str(grpc),
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                str(metrics),
                "--exit-timeout-secs",
                "10",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    srv = Server(process, log, http, grpc)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"tritonserver exited with {process.returncode}:\n{srv.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{NAME}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver was not ready within 90 s:\n{srv.tail()}")
            time.sleep(0.5)
        yield srv
    except BaseException:
        print(f"tritonserver log ({log}):\n{srv.tail()}")
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # unloads the model: finalize closes the Pipeline
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _grpc_inputs(labels, seed=None, partial=None, num_images=None):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value, dtype, triton in [
        ("labels", labels, np.int32, "INT32"),
        ("seed", seed, np.int64, "INT64"),
        ("partial_images", partial, np.int32, "INT32"),
        ("num_images", num_images, np.int32, "INT32"),
    ]:
        if value is None:
            continue
        array = np.atleast_1d(np.asarray(value, dtype=dtype))
        tensor = grpcclient.InferInput(name, list(array.shape), triton)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_grpc_streaming(server, reference):
    """Several requests in flight at once on one gRPC stream: each gets its previews, then its final
    image, pixel-equal to Pipeline.generate with the same labels and seed."""
    import tritonclient.grpc as grpcclient

    requests = {
        "a": dict(labels=[3], seed=5, partial=2),
        "b": dict(labels=[7, 1], seed=6, partial=3, num_images=2),
        "c": dict(labels=[0], seed=7),
        "d": dict(labels=[9], seed=8, partial=1),
    }
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for rid, r in requests.items():
            client.async_stream_infer(NAME, _grpc_inputs(**r), request_id=rid)
        responses: dict = {rid: [] for rid in requests}
        finals = 0
        while finals < len(requests):
            result, error = got.get(timeout=120)
            assert error is None, f"{error}\n{server.tail()}"
            rid = result.get_response().id
            responses[rid].append(
                (int(result.as_numpy("step")[0]), bool(result.as_numpy("final")[0]), result.as_numpy("image"))
            )
            finals += responses[rid][-1][1]
    finally:
        client.stop_stream()
        client.close()
    for rid, r in requests.items():
        steps = [s for s, _, _ in responses[rid]]
        assert steps == [*preview_steps(4, r.get("partial", 0)), 4], rid
        assert [f for _, f, _ in responses[rid]] == [False] * (len(steps) - 1) + [True]
        want = expected_pixels(reference, r["labels"], r["seed"], r.get("num_images", 1))
        assert all(image.shape == want.shape and image.dtype == np.uint8 for _, _, image in responses[rid])
        np.testing.assert_array_equal(responses[rid][-1][2], want, err_msg=rid)
    # the previews are the Pipeline's partial images of the same steps
    previews = [
        np.asarray(e.preview)
        for e in reference.stream(labels=3, seed=5, preview_every=1)
        if getattr(e, "preview", None) is not None
    ]
    for step, _, image in responses["a"][:-1]:
        np.testing.assert_array_equal(image[0], previews[step - 1])


def test_grpc_bad_input(server):
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer(NAME, _grpc_inputs(labels=[2, 10], seed=1), request_id="bad")
        result, error = got.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert result is None and "input 'labels': [10] out of range: expected class indices 0..9" in str(error)


def _sse(port: int, body: dict) -> list[dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{NAME}/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            text = response.read().decode()
    except urllib.error.HTTPError as exc:  # an error as the first response sets the status: 400
        assert exc.code == 400
        text = exc.read().decode()
    return [json.loads(line[len("data:") :]) for line in text.splitlines() if line.startswith("data:")]


def test_http(server, reference):
    """HTTP: readiness and metadata with tritonclient.http; the decoupled model's images over the
    generate extension's SSE endpoint (Triton 2.51 refuses /infer for decoupled models)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http}")
    try:
        assert client.is_server_ready() and client.is_model_ready(NAME)
        meta = client.get_model_metadata(NAME)
        config = client.get_model_config(NAME)
    finally:
        client.close()
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]][:2] == [
        ("labels", "INT32", [-1]),
        ("num_images", "INT32", [1]),
    ]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "image": ("UINT8", [-1, 32, 32, 3]),
        "step": ("INT32", [1]),
        "final": ("BOOL", [1]),
    }
    assert config["model_transaction_policy"]["decoupled"] is True

    events = _sse(server.http, {"labels": [5, 6], "seed": 3, "partial_images": 1})
    assert [(e.get("step"), e.get("final")) for e in events] == [(2, False), (4, True)], events[:1]
    image = np.asarray(events[-1]["image"], dtype=np.uint8).reshape(2, 32, 32, 3)
    np.testing.assert_array_equal(image, expected_pixels(reference, [5, 6], 3))

    events = _sse(server.http, {"labels": [1], "partial_images": 9})
    assert events == [{"error": "input 'partial_images': expected an integer in 0..3, got 9"}]
