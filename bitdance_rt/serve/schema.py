"""The request body of POST /v1/images/generations: OpenAI's Images API fields, then BitDance's.

Pydantic checks the wire format: types and the documented ranges (each error names its field).
What depends on the loaded model (sizes, class names) is read in translate.py, which builds the
request's GenerationParams: its values (labels, the prompt's length) are checked there, once. Unknown fields are
refused, so a typo ("seeds") is an error naming it, not a silent default. OpenAI fields that do
not apply to BitDance are accepted where their value changes nothing and refused otherwise.
Types are strict (as runtime/params.py's): "yes" is not true, "12" is not a list of labels, 3.7
and "2" are not integers; the caps are params.py's, so every front door refuses the same values.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..runtime.params import MAX_CFG, MAX_PARTIAL_IMAGES, MAX_SEED, MAX_STEPS


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # ---- OpenAI Images API ----
    prompt: Optional[Union[str, int]] = Field(
        None, description='text-to-image: the description; class-conditional: a class index ("3") or a class name'
    )
    n: int = Field(1, ge=1, description="images per prompt or label")
    size: Optional[str] = Field(None, description='"WxH" (text-to-image) or "auto"; the model\'s size otherwise')
    response_format: Optional[Literal["b64_json"]] = Field(None, description="b64_json (PNG); no URLs are hosted")
    model: Optional[str] = Field(None, description="omitted, or the loaded model's name")
    stream: bool = False
    partial_images: int = Field(
        0, ge=0, le=MAX_PARTIAL_IMAGES, description="streaming: partial images before the final one"
    )
    output_format: Literal["png"] = "png"
    background: Literal["auto", "opaque"] = "auto"
    quality: Optional[Literal["auto", "low", "medium", "high", "standard", "hd"]] = None  # accepted, no effect
    style: Optional[str] = None  # accepted, no effect
    moderation: Optional[str] = None  # accepted, no effect
    user: Optional[str] = None  # accepted, logged nowhere
    safety_identifier: Optional[str] = None  # accepted, logged nowhere
    # ---- BitDance extensions ----
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED, description="noise seed (default: a random one)")
    steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description="sampler steps S per AR step")
    guidance_scale: Optional[float] = Field(
        None, ge=0.0, le=MAX_CFG, allow_inf_nan=False, description="classifier-free guidance G"
    )
    cfg_schedule: Optional[Literal["linear", "constant"]] = None
    labels: Optional[list[int]] = Field(None, min_length=1, description="class labels (class-conditional models)")
