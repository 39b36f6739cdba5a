"""Write a Triton Inference Server model repository that runs an export directory with bitdance_rt.

    write_repository("exports/digits", "triton-repo")      # bitdance-rt triton-repo --export-dir ... --out ...

gives one decoupled Python-backend model:

    triton-repo/<name>/config.pbtxt   backend "python", decoupled, the tensors of triton/requests.py,
                                      instance_group and the parameters the model loads from
    triton-repo/<name>/1/model.py     bitdance_rt/triton/model.py (a shell over bitdance_rt)

One model that runs the whole Pipeline in-process, because its scheduler already batches every
request it holds at each AR step. The export is validated first (`check_export`), and the
repository is written atomically (`_write_atomically`). How instance_group places instances, and
why `count` 1 per GPU: docs/triton.md "triton-repo options".
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import BitDanceError
from .requests import MAX_PARTIAL_IMAGES, SERVE_BACKENDS, ServeParams, input_specs, output_specs

MODEL_FILE = Path(__file__).with_name("model.py")
DEFAULT_NAME = "bitdance"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_export(export_dir) -> dict:
    """The manifest of a complete, generating export directory (sizes checked, not hashes: the model
    verifies the hashes when it loads), or a BitDanceError naming the directory or file."""
    return _checked_export(export_dir).manifest


def _checked_export(export_dir):
    """check_export's reading: the export (export/reader.py ExportInfo)."""
    from ..export.manifest import MANIFEST
    from ..export.reader import open_export

    directory = Path(export_dir)
    if not directory.is_dir():
        raise BitDanceError(
            f"export directory {directory} does not exist (make one with `bitdance-rt export --out {directory}`)"
        )
    if not (directory / MANIFEST).is_file():
        raise BitDanceError(
            f"{directory / MANIFEST} not found: {directory} is not a bitdance-rt export directory "
            f"(make one with `bitdance-rt export --out {directory}`)"
        )
    export = open_export(directory, generation=True)
    export.verify_files(hashes=False)
    return export


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    out = []
    for byte in str(text).encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor(spec, is_input: bool) -> str:
    dims = ", ".join(str(d) for d in spec.dims)
    fields = [f"name: {_quote(spec.name)}", f"data_type: {spec.data_type}", f"dims: [ {dims} ]"]
    if is_input and spec.optional:
        fields.append("optional: true")
    return "  {\n" + "".join(f"    {f}\n" for f in fields) + "  }"


def instance_groups(device: str, gpus, count: int) -> list[dict]:
    """The instance_group entries: [{"kind", "count", "gpus"?}]: with GPUs [i, j, ...], one KIND_GPU
    group per GPU with `gpus: [i]` and `count` instances each; with device cuda and no list, one
    KIND_GPU group (Triton puts `count` instances on every GPU it sees); on the CPU one KIND_CPU group
    of `count` (docs/triton.md "triton-repo options": why count 1 per GPU is the usual choice)."""
    if gpus:
        return [{"kind": "KIND_GPU", "count": count, "gpus": [int(g)]} for g in gpus]
    if device.startswith("cuda"):
        return [{"kind": "KIND_GPU", "count": count}]
    return [{"kind": "KIND_CPU", "count": count}]


def config_text(
    name: str, t2i: bool, height: int, width: int, groups: list[dict], parameters: dict, comment: str = ""
) -> str:
    """config.pbtxt of the model."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        f"name: {_quote(name)}",
        'backend: "python"',
        "max_batch_size: 0",
        "model_transaction_policy {\n  decoupled: true\n}",
    ]
    lines.append("input [\n" + ",\n".join(_tensor(s, True) for s in input_specs(t2i)) + "\n]")
    lines.append("output [\n" + ",\n".join(_tensor(s, False) for s in output_specs(height, width)) + "\n]")
    entries = []
    for g in groups:
        body = f"    count: {g['count']}\n    kind: {g['kind']}\n"
        if "gpus" in g:
            body += f"    gpus: [ {', '.join(str(i) for i in g['gpus'])} ]\n"
        entries.append("  {\n" + body + "  }")
    lines.append("instance_group [\n" + ",\n".join(entries) + "\n]")
    params = [
        f"  {{\n    key: {_quote(k)}\n    value: {{ string_value: {_quote(v)} }}\n  }}"
        for k, v in sorted(parameters.items())
    ]
    lines.append("parameters [\n" + ",\n".join(params) + "\n]")
    return "\n".join(lines) + "\n"


def write_repository(
    export_dir,
    out,
    *,
    name: str = DEFAULT_NAME,
    backend: str = "onnxruntime",
    precision: str | None = None,
    steps: int | None = None,
    max_batch: int | None = None,
    max_images: int | None = None,
    device: str | None = None,
    gpus=None,
    count: int = 1,
    threads: int | None = None,
    ort_provider: str | None = None,
    engine_dir=None,
    cache_dir=None,
    model: str | None = None,
    checkpoint=None,
    vae=None,
    export_path: str | None = None,
    force: bool = False,
) -> Path:
    """Write the Triton model repository `out` (returns its path) serving `export_dir`.

    `name`: the model's name (its directory). `backend`: onnxruntime or tensorrt (engines built, or
    taken from `engine_dir`, when the model loads: build them first with `bitdance-rt build`).
    `precision`: onnxruntime: must be the export's (default); tensorrt: the engine precision.
    `steps`: the fused sampler's S (default: the export's). `max_batch`: images one scheduler batch
    holds (default and most: the export's). `max_images`: images one request may ask for (default:
    max_batch). `device`: cpu or cuda (default: cuda when `gpus` are given or the backend is
    tensorrt, else cpu). `gpus`: GPU indices, one instance group each. `count`: instances per group.
    `threads`: CPU threads of each instance. `ort_provider`: cpu | cuda | tensorrt. `engine_dir`,
    `cache_dir`: the model's engine cache / $BITDANCE_RT_CACHE. `model` / `checkpoint` / `vae`:
    recorded for the model to resolve instead of the manifest's config; a text-to-image export
    needs `checkpoint` (its directory: the tokenizer). `export_path`: the export's path as the server
    will see it (a container mount; default: `export_dir`, absolute). `force`: replace `out`."""
    from ..t2i_config import T2IConfig

    if not _NAME.match(name or ""):
        raise BitDanceError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (it is a directory name)")
    if backend not in SERVE_BACKENDS:
        raise BitDanceError(f"backend {backend!r}: use one of {', '.join(SERVE_BACKENDS)}")
    if not isinstance(count, int) or count < 1:
        raise BitDanceError(f"count (instances per group) must be a positive integer, got {count!r}")
    gpus = [] if gpus is None else list(gpus)
    if any(not isinstance(g, int) or g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise BitDanceError(f"gpus must be distinct GPU indices >= 0, got {gpus}")
    if device is None:
        device = "cuda" if gpus or backend == "tensorrt" else "cpu"
    if device.startswith("cuda:"):
        raise BitDanceError(
            f"device {device}: give cuda and the GPU list (--gpus {device.split(':')[1]}); "
            "Triton assigns each instance its GPU"
        )
    if device not in ("cpu", "cuda"):
        raise BitDanceError(f"device {device!r}: use cpu or cuda")
    if gpus and device == "cpu":
        raise BitDanceError(f"GPUs {gpus} were given with device cpu: drop one of them")
    if backend == "tensorrt" and device == "cpu":
        raise BitDanceError("backend tensorrt runs on a GPU: give device cuda (and the GPU list)")
    if ort_provider is not None and backend != "onnxruntime":
        raise BitDanceError("ort_provider is for backend onnxruntime")
    if ort_provider in ("cuda", "tensorrt") and device == "cpu":
        raise BitDanceError(f"ONNX Runtime provider {ort_provider} needs device cuda")

    export_dir = Path(export_dir).resolve()
    export = _checked_export(export_dir)
    cfg = export.config
    t2i = isinstance(cfg, T2IConfig)
    held = export.precision
    if backend == "onnxruntime" and precision not in (None, held):
        raise BitDanceError(
            f"export {export_dir} holds {held} graphs, not {precision}: drop the precision, or "
            f"make a {precision} export (bitdance-rt export --precision {precision})"
        )
    limit = export.max_batch
    if max_batch is not None and not 1 <= max_batch <= limit:
        raise BitDanceError(f"max batch {max_batch}: {export_dir} was exported for 1..{limit} images per batch")
    if t2i and checkpoint is None:
        raise BitDanceError(
            f"{export_dir} is a text-to-image export: give its checkpoint directory too "
            "(the model encodes prompts with its tokenizer.json)"
        )
    resolve = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
    params = ServeParams(
        export_dir=export_path or str(export_dir),
        backend=backend,
        precision=precision,
        steps=steps,
        max_batch=max_batch,
        max_images=max_images,
        device=device,
        threads=threads,
        ort_provider=ort_provider,
        engine_dir=resolve(engine_dir),
        cache_dir=resolve(cache_dir),
        model=model,
        checkpoint=resolve(checkpoint),
        vae=resolve(vae),
    )
    params.check()
    if model is not None and Path(model).suffix == ".json":
        params.model = str(Path(model).resolve())
    height, width = getattr(cfg, "image_hw", None) or (cfg.image_size, cfg.image_size)
    from .. import __version__

    comment = (
        f"Written by bitdance-rt {__version__} (bitdance-rt triton-repo) for {cfg.name} from {export_dir}.\n"
        f"Inputs/outputs: bitdance_rt/triton/requests.py; partial_images 0..{MAX_PARTIAL_IMAGES}."
    )
    text = config_text(name, t2i, height, width, instance_groups(device, gpus, count), params.to_parameters(), comment)
    return _write_atomically(Path(out), name, text, force)


def _write_atomically(out: Path, name: str, config: str, force: bool) -> Path:
    """Write the repository into a temporary directory beside `out` and rename it into place, so
    `out` is either complete or absent (with `force`, the old one comes back if the rename fails)."""
    out = out.absolute()
    if out.exists() and not force:
        raise BitDanceError(f"{out} exists: choose another --out, or replace it (force / --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(config)
        shutil.copyfile(MODEL_FILE, version / "model.py")
        for path in (tmp, tmp / name, version):
            path.chmod(0o755)  # mkdtemp made it private; the server may run as another user
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():  # (force) the old repository steps aside, and comes back if the rename fails
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "repo")
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists() and (old / "repo").exists():
            os.replace(old / "repo", out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
