"""An HTTP request body (schema.ImageRequest) as the request's GenerationParams, checked against the
loaded model once (runtime/params.py: GenerationParams.create); every refusal is a FieldError
naming the body field and what was expected.

What is decided here is the HTTP API's own: the `model` and `size` fields, a class given as the
prompt ("3" or a class name), which of prompt / labels the model takes, the server's limit of
images per request and the random seed. Every value check is GenerationParams.create's, its
ParamError named as the body names it."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ..runtime.params import GenerationParams, ParamError
from ..runtime.request import preview_steps
from .schema import ImageRequest

# Pipeline argument (ParamError.param) -> the body field that carries it
HTTP_FIELDS = {"cfg": "guidance_scale", "num_images": "n", "preview_every": "partial_images"}

# A class index as a prompt: ASCII digits only (str.isdigit also takes "²" and "①", which int() refuses),
# one optional '-'; longer than MAX_INDEX_DIGITS it is out of range without int() (which refuses 4,300+ digits).
_INDEX = re.compile(r"-?[0-9]+")
MAX_INDEX_DIGITS = 9


class FieldError(ValueError):
    """A request the loaded model cannot serve: `param` is the body field, the message says why."""

    def __init__(self, param: str | None, message: str, status: int = 400, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Job:
    """What one HTTP request asks the Pipeline for."""

    submit: dict  # keyword arguments of Pipeline.submit: {"params": the checked GenerationParams}
    images: int
    size: str  # "WxH"
    seed: int
    previews: list  # AR steps with a partial image (streaming)


def model_size(pipe) -> tuple[int, int]:
    """(width, height) of the loaded model's images."""
    cfg = pipe.config
    if pipe.model.t2i:
        return int(cfg.width), int(cfg.height)
    return int(cfg.image_size), int(cfg.image_size)


def to_job(body: ImageRequest, pipe, max_images: int) -> Job:
    cfg = pipe.config
    if body.model is not None and body.model != cfg.name:
        raise FieldError(
            "model",
            f"model {body.model!r} is not served here; this server runs {cfg.name!r} (or omit the field)",
            status=404,
            code="model_not_found",
        )
    width, height = model_size(pipe)
    size = f"{width}x{height}"
    if body.size not in (None, "auto", size):
        raise FieldError(
            "size",
            f"size {body.size!r} is not available: this server's {cfg.name} makes {size} "
            'images (give "auto" or omit it)',
        )
    if pipe.model.t2i:
        condition = {"prompt": _text_prompt(body, pipe)}
        count = 1
    else:
        labels = _labels(body, cfg)
        condition, count = {"labels": labels}, len(labels)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**63)
    try:
        params = GenerationParams.create(
            pipe.limits,
            **condition,
            num_images=body.n,
            steps=body.steps,
            cfg=body.guidance_scale,
            cfg_schedule=body.cfg_schedule,
            seed=seed,
        )
    except ParamError as exc:
        raise _field_error(exc, cfg) from None
    images = body.n * count
    if images > max_images:
        raise FieldError("n", f"{images} images asked for (n={body.n} x {count}); at most {max_images} per request")
    previews = preview_steps(cfg.ar_steps, body.partial_images) if body.stream else []
    return Job({"params": params}, images, size, seed, previews)


def _field_error(exc: ParamError, cfg) -> FieldError:
    """A refusal of GenerationParams.create, named by its body field (and worded as this API words
    a label out of range)."""
    if exc.param == "labels" and exc.value:
        return FieldError(
            "labels", f"label {exc.value[0]} is out of range: {cfg.name} has classes 0..{cfg.num_classes - 1}"
        )
    return FieldError(HTTP_FIELDS.get(exc.param, exc.param), str(exc))


def _text_prompt(body: ImageRequest, pipe) -> str:
    """Text-to-image: the prompt field, as text (its value is checked by GenerationParams.create)."""
    if body.labels is not None:
        raise FieldError("labels", f"{pipe.config.name} is text-to-image: give a prompt, not labels")
    if not isinstance(body.prompt, str):
        raise FieldError("prompt", "give the prompt as text: a description of the image")
    return body.prompt


def _labels(body: ImageRequest, cfg) -> list[int]:
    """Class-conditional: the labels field, or the class the prompt names (by index or name)."""
    classes = cfg.num_classes
    names = list(getattr(cfg, "class_names", None) or [])
    expected = f"a class index 0..{classes - 1}" + (" or a class name" if names else "")
    has_prompt = isinstance(body.prompt, int) or isinstance(body.prompt, str) and body.prompt.strip() != ""
    if body.labels is not None:
        if has_prompt:
            raise FieldError("prompt", 'give the class as prompt or as labels, not both (prompt may be "")')
        return list(body.labels)  # (their range: GenerationParams.create)
    if not has_prompt:
        raise FieldError("prompt", f"{cfg.name} is class-conditional: the prompt is {expected} (or give labels)")
    if isinstance(body.prompt, int):  # (the schema takes 3 as well as "3")
        return [_class_index(body.prompt, body.prompt, cfg)]
    text = body.prompt.strip()
    if _INDEX.fullmatch(text):
        label = int(text) if len(text.lstrip("-")) <= MAX_INDEX_DIGITS else None
        return [_class_index(label, text, cfg)]
    lowered = [n.lower() for n in names]
    if text.lower() in lowered:
        return [lowered.index(text.lower())]
    raise FieldError("prompt", f"{cfg.name} is class-conditional: the prompt must be {expected}, got {text[:80]!r}")


def _class_index(label: int | None, given, cfg) -> int:
    """`label` if it is one of the model's classes (None: too many digits to be one). Reading a
    class out of the prompt: a prompt that names no class is refused as the prompt."""
    if label is None or not 0 <= label < cfg.num_classes:
        shown = str(given) if len(str(given)) <= 24 else str(given)[:21] + "..."
        raise FieldError("prompt", f"class {shown} is out of range: {cfg.name} has classes 0..{cfg.num_classes - 1}")
    return label
