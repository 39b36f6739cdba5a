"""What one request may ask for: one request type, `GenerationParams`, checked once, with one cap per value.

Every front door builds it with `GenerationParams.create(limits, ...)`: Pipeline.submit / generate /
stream (from their keywords, or `Pipeline.params`), the HTTP server (serve/translate.py), the Triton
model (triton/requests.py), the CLI (cli/generate.py) and the batch entry points (runtime/loop.py).
So a value refused at one door is refused at all of them, with the same words, and nothing behind
the doors (the Pipeline's request building, runtime/loop.py, runtime/conditions.py, the scheduler)
checks it again. A refusal is a ParamError naming the Pipeline argument (`param`); the HTTP and
Triton shells map that name to their own field names (and may word it their way from `value` /
`bounds`). Types are strict: a string is not a list of labels, 3.7 is not a label, True is not a
seed, NaN and inf are not a guidance scale.

What stays at a door is its wire format: JSON types and the documented ranges (serve/schema.py),
tensor shapes and dtypes (triton/requests.py), argparse number parsing (cli/arguments.py), a class
given by name or as a prompt "3" (serve/translate.py), and the door's own limits (images per request,
partial images).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import BitDanceError
from ..sampling import CFG_SCHEDULES, NoiseSource

MAX_STEPS = 1000  # sampler steps S one request may ask for (the official models use 25 to 50)
MAX_CFG = 100.0  # classifier-free guidance G (the official models use 1.5 to 7.5)
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED: a signed 64-bit integer (Triton's INT64, JSON clients)
MAX_PARTIAL_IMAGES = 3  # previews one streamed request may ask for (as OpenAI's Images API)
MAX_PROMPT_CHARS = 32000  # OpenAI's limit for its image models; the tokenizer's limit comes later


class ParamError(BitDanceError):
    """A request value that is missing, of the wrong type or out of range; `param` names the
    Pipeline argument (labels, prompt, num_images, steps, cfg, cfg_schedule, seed, preview_every)."""

    def __init__(self, param: str, message: str, *, value=None, bounds: tuple | None = None):
        super().__init__(message)
        self.param = param
        self.value = value  # what was refused (labels: the out-of-range ones), for a door's own words
        self.bounds = bounds  # an integer out of range: (lo, hi), hi None for no upper bound


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
        raise ParamError(param, f"{param} must be {want}, got {number}", value=int(number), bounds=(lo, hi))
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
        raise ParamError(
            "cfg_schedule", f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, got {_shown(value)}", value=value
        )
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
        raise ParamError(
            "labels", f"label(s) {bad[:8]} out of range: this model has classes 0..{num_classes - 1}", value=bad
        )
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


def check_previews(every, ar_steps: int) -> frozenset:
    """`preview_every` of Pipeline.submit / stream: k (a preview every k AR steps) or the AR steps
    themselves (1..ar_steps-1). How the caller watches a request, not what it generates, so it is
    not a GenerationParams field (as a stream flag is not a sampling parameter); checked here, once,
    by the Pipeline that turns it into the request's preview steps."""
    if isinstance(every, int) and not isinstance(every, bool):
        if every < 0:
            raise ParamError(
                "preview_every", f"preview_every must be an integer >= 0 or a list of AR steps, got {every!r}"
            )
        return frozenset(range(every, ar_steps, every)) if every else frozenset()
    try:
        steps = frozenset(int(s) for s in every)
    except (TypeError, ValueError):
        raise ParamError(
            "preview_every", f"preview_every must be an integer >= 0 or a list of AR steps, got {every!r}"
        ) from None
    bad = sorted(s for s in steps if not 1 <= s < ar_steps)
    if bad:
        raise ParamError(
            "preview_every", f"preview step {bad[0]} is out of range: previews come after AR steps 1..{ar_steps - 1}"
        )
    return steps


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the model's name (for messages), its kind (class labels or
    text prompts), its classes and, for text-to-image, a callable giving its prompt encoder (whose
    token limit is the graphs'; None: the prompts' tokens are checked when the Pipeline encodes them).
    `Pipeline.limits` gives a loaded model's; `ModelLimits.of(config)` one from a config alone."""

    name: str
    t2i: bool
    num_classes: int = 0  # class-conditional: labels 0..num_classes-1 (num_classes itself is the null class)
    prompt_encoder: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, config, t2i: bool | None = None, prompt_encoder=None) -> "ModelLimits":
        """From a model config (`t2i` None: text-to-image when the config has no classes)."""
        t2i = not hasattr(config, "num_classes") if t2i is None else bool(t2i)
        return cls(str(config.name), t2i, 0 if t2i else int(config.num_classes), prompt_encoder)

    @property
    def kind(self) -> tuple:
        """What GenerationParams checked against these limits record: a Pipeline takes only its own kind."""
        return (self.t2i, self.num_classes)


@dataclass(frozen=True)
class GenerationParams:
    """One request, checked: what to generate (class labels, text prompts, or a condition the batch
    entry points made) and how (images per label or prompt, sampler steps S, guidance G and its
    schedule over the AR steps, the seed of its one noise generator, or a noise source).

    Make it with `create` (or `Pipeline.params`): the constructor and `dataclasses.replace` check
    nothing, and what they make is refused by the Pipeline (it carries no `checked_for`). None for
    steps / cfg / cfg_schedule means the model's default (the Pipeline's sampler steps, the config's
    guidance, the model family's schedule), filled in when the request is built; frozen, so what was
    checked is what runs. One object may be submitted many times; a `noise` source is consumed by
    each request it runs in (None: a fresh SeededNoise(seed) per request)."""

    labels: tuple | None = None  # class-conditional: class indices (each `num_images` times)
    prompts: tuple | None = None  # text-to-image: the prompts (each `num_images` times)
    num_images: int = 1
    steps: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    seed: int = 0
    noise: NoiseSource | None = field(default=None, compare=False)
    condition: Any = field(default=None, compare=False, repr=False)  # batch entry points: a made condition
    checked_for: tuple | None = field(default=None, init=False, compare=False, repr=False)  # ModelLimits.kind

    @classmethod
    def create(
        cls,
        model: ModelLimits,
        *,
        labels=None,
        prompt=None,
        condition=None,
        num_images=1,
        steps=None,
        cfg=None,
        cfg_schedule=None,
        seed=0,
        noise=None,
    ) -> "GenerationParams":
        """Every value of one request checked against `model` (ModelLimits), once; a ParamError
        naming the first bad one. Exactly one of `labels` (class-conditional), `prompt` (text-to-image:
        a string or a list) or `condition` (runtime/conditions.py: rows already made by their encoder,
        the batch entry points' way; its rows are its maker's)."""
        name = model.name
        labels_out = prompts_out = None
        if condition is not None:
            if labels is not None or prompt is not None:
                raise ParamError("condition", "give labels, a prompt or a condition, not several")
            if not hasattr(condition, "rows") or not hasattr(condition, "__len__"):
                raise ParamError("condition", f"condition must be a runtime condition, got {type(condition).__name__}")
            if len(condition) == 0:
                raise ParamError("condition", "nothing to generate: give at least one label or prompt")
        elif model.t2i:
            if labels is not None:
                raise ParamError("labels", f"{name} is text-to-image: give prompt=..., not labels")
            if prompt is None:
                raise ParamError("prompt", f"{name} is text-to-image: give prompt=...")
            prompts_out = tuple(check_prompts(prompt))
        else:
            if prompt is not None:
                raise ParamError("prompt", f"{name} is class-conditional: give labels=..., not a prompt")
            if labels is None:
                raise ParamError("labels", f"give labels=... (class indices 0..{model.num_classes - 1})")
            labels_out = tuple(check_labels(labels, model.num_classes))
        num_images = check_int("num_images", num_images, 1)
        if condition is not None and num_images != 1:
            raise ParamError("num_images", "num_images must be 1 with a condition (it holds one row per image)")
        steps = None if steps is None else check_steps(steps)
        scale = None if cfg is None else check_cfg(cfg)
        schedule = check_cfg_schedule(cfg_schedule)
        seed = check_seed(seed)
        if noise is not None and not _is_noise_source(noise):
            raise ParamError("noise", "noise must be a bitdance_rt.sampling NoiseSource (SeededNoise, ReplayNoise)")
        if prompts_out is not None and model.prompt_encoder is not None:
            _check_tokens(model.prompt_encoder(), prompts_out)  # last: the tokenizer is the dearest check
        params = cls(labels_out, prompts_out, num_images, steps, scale, schedule, seed, noise, condition)
        object.__setattr__(params, "checked_for", model.kind)
        return params

    @property
    def per_image(self) -> list | None:
        """The labels or prompts of each image, `num_images` of each, in order (None: a condition)."""
        given = self.labels if self.labels is not None else self.prompts
        return None if given is None else [g for g in given for _ in range(self.num_images)]

    @property
    def images(self) -> int:
        return len(self.condition) if self.condition is not None else len(self.per_image)


def _is_noise_source(noise) -> bool:
    """A NoiseSource, or what the loop takes as one (tests and tools record draws): draw() and finish()."""
    return isinstance(noise, NoiseSource) or all(callable(getattr(noise, m, None)) for m in ("draw", "finish"))


def _check_tokens(encoder, prompts) -> None:
    """The prompts' length in tokens with the chat template, against the graphs' limit (the encoder's check)."""
    try:
        encoder.encode(list(prompts))
    except ParamError:
        raise
    except BitDanceError as exc:
        raise ParamError("prompt", str(exc)) from None
