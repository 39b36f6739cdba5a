"""What one request may ask for: every value checked here, once, with one cap per value.

Every front door (Pipeline.submit / generate / stream, the CLI, the HTTP server, the Triton model)
ends in `check_request_values`, so a value refused at one door is refused at all of them, with the
same words. A refusal is a ParamError naming the Pipeline argument (`param`); the HTTP and Triton
shells map that name to their own field names. Types are strict: a string is not a list of labels,
3.7 is not a label, True is not a seed, NaN and inf are not a guidance scale.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from ..errors import BitDanceError
from ..sampling import CFG_SCHEDULES

MAX_STEPS = 1000  # sampler steps S one request may ask for (the official models use 25 to 50)
MAX_CFG = 100.0  # classifier-free guidance G (the official models use 1.5 to 7.5)
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED: a signed 64-bit integer (Triton's INT64, JSON clients)
MAX_PARTIAL_IMAGES = 3  # previews one streamed request may ask for (as OpenAI's Images API)
MAX_PROMPT_CHARS = 32000  # OpenAI's limit for its image models; the tokenizer's limit comes later


class ParamError(BitDanceError):
    """A request value that is missing, of the wrong type or out of range; `param` names the
    Pipeline argument (labels, prompt, num_images, steps, cfg, cfg_schedule, seed, preview_every)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(param: str, value, lo: int, hi: int | None = None) -> int:
    """An integer (not a bool, float or string) in lo..hi."""
    if isinstance(value, bool):
        raise ParamError(param, f"{param} must be an integer, got {_shown(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ParamError(param, f"{param} must be an integer, got {type(value).__name__} {_shown(value)}") from None
    if number < lo or (hi is not None and number > hi):
        if hi is None:
            want = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        else:
            want = f"an integer in {lo}..{hi}"
        raise ParamError(param, f"{param} must be {want}, got {number}")
    return int(number)


def check_steps(value, param: str = "steps") -> int:
    return check_int(param, value, 1, MAX_STEPS)


def check_seed(value) -> int:
    return check_int("seed", value, 0, MAX_SEED)


def check_cfg(value) -> float:
    """A finite guidance scale in 0..MAX_CFG (values <= 1 mean no guidance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ParamError("cfg", f"cfg must be a number, got {type(value).__name__} {_shown(value)}")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ParamError("cfg", f"cfg must be a number, got {_shown(value)}") from None
    if not math.isfinite(scale) or not 0.0 <= scale <= MAX_CFG:
        raise ParamError("cfg", f"cfg must be a finite number in 0..{MAX_CFG:g} (1 or less: no guidance), got {scale}")
    return scale


def check_cfg_schedule(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in CFG_SCHEDULES:
        raise ParamError("cfg_schedule", f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {_shown(value)}")
    return value


def check_labels(value, num_classes: int) -> list[int]:
    """An int or a sequence of ints (numpy / torch integers too), each a class index."""
    if isinstance(value, (str, bytes)):
        raise ParamError(
            "labels", f"labels must be class indices (an integer or a list of integers), got the string {_shown(value)}"
        )
    if isinstance(value, bool):
        raise ParamError("labels", f"labels must be class indices, got {value!r}")
    try:
        items = [operator.index(value)]
    except TypeError:
        try:
            items = list(value)
        except TypeError:
            raise ParamError(
                "labels", f"labels must be an integer or a list of integers, got {type(value).__name__} {_shown(value)}"
            ) from None
    if not items:
        raise ParamError("labels", "labels is empty: give at least one class index")
    labels = []
    for item in items:
        if isinstance(item, bool):
            raise ParamError("labels", f"labels must be integers, got {item!r}")
        try:
            labels.append(int(operator.index(item)))
        except TypeError:
            raise ParamError("labels", f"labels must be integers, got {type(item).__name__} {_shown(item)}") from None
    bad = [l for l in labels if not 0 <= l < num_classes]
    if bad:
        raise ParamError("labels", f"label(s) {bad[:8]} out of range: this model has classes 0..{num_classes - 1}")
    return labels


def check_prompts(value) -> list[str]:
    """A non-empty prompt or a non-empty list of them, each at most MAX_PROMPT_CHARS characters."""
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ParamError("prompt", f"prompt must be a string or a non-empty list of strings, got {_shown(value)}")
    for i, p in enumerate(prompts):
        which = "prompt" if isinstance(value, str) else f"prompt {i}"
        if not isinstance(p, str):
            raise ParamError("prompt", f"{which} must be a string, got {type(p).__name__} {_shown(p)}")
        if not p.strip():
            raise ParamError("prompt", f"{which} is empty: give a text description of the image")
        if len(p) > MAX_PROMPT_CHARS:
            raise ParamError("prompt", f"{which} is {len(p)} characters; at most {MAX_PROMPT_CHARS}")
    return list(prompts)


@dataclass(frozen=True)
class RequestValues:
    """The checked values of one request (the condition's form is the model's: labels or prompts)."""

    labels: list | None
    prompts: list | None
    num_images: int
    steps: int
    cfg: float
    cfg_schedule: str | None
    seed: int


def check_request_values(
    config,
    t2i: bool,
    *,
    labels=None,
    prompt=None,
    num_images=1,
    steps=None,
    cfg=None,
    cfg_schedule=None,
    seed=0,
    default_steps: int | None = None,
) -> RequestValues:
    """Every value of one request checked against the model `config` (defaults filled in)."""
    name = config.name
    if t2i:
        if labels is not None:
            raise ParamError("labels", f"{name} is text-to-image: give prompt=..., not labels")
        if prompt is None:
            raise ParamError("prompt", f"{name} is text-to-image: give prompt=...")
        prompts, labels_out = check_prompts(prompt), None
    else:
        if prompt is not None:
            raise ParamError("prompt", f"{name} is class-conditional: give labels=..., not a prompt")
        if labels is None:
            raise ParamError("labels", f"give labels=... (class indices 0..{config.num_classes - 1})")
        prompts, labels_out = None, check_labels(labels, config.num_classes)
    num_images = check_int("num_images", num_images, 1)
    steps = check_steps(default_steps if steps is None else steps)
    scale = check_cfg(config.default_cfg if cfg is None else cfg)
    return RequestValues(
        labels_out, prompts, num_images, steps, scale, check_cfg_schedule(cfg_schedule), check_seed(seed)
    )
