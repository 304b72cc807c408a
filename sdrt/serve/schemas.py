"""Request schemas (pydantic) of sdrt's own jobs API and of the OpenAI images API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from sdrt.serve.errors import ApiError, describe_validation

Number = StrictInt | StrictFloat


class JobIn(BaseModel):
    """``POST /v1/jobs``: sdrt's native request. Image k of a batch uses seed + k."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    prompt: StrictStr
    negative_prompt: StrictStr = ""
    steps: StrictInt | None = None  # None: the family's default (30; Kandinsky 2.2: 100)
    guidance: Number | None = None  # None: the family's default (7.5; Kandinsky 2.2: 4.0)
    seed: StrictInt | None = None  # None or -1: random
    width: StrictInt | None = None  # None: the artifact's opt size (img2img: the image's size)
    height: StrictInt | None = None
    scheduler: StrictStr | None = None  # sdrt / A1111 names ("Euler a", "DPM++ 2M Karras", ...)
    batch: StrictInt = Field(1, ge=1)
    strength: Number | None = None
    image: StrictStr | None = None  # base64 or data: URL
    mask: StrictStr | None = None
    vae: Literal["full", "tiny"] = "full"  # tiny: the TAESD `sdrt export --tiny-vae` added
    rng: StrictStr | None = None  # cpu (default), cuda, cuda:GPU: whose generator the seed reproduces
    control_images: list[StrictStr] | None = None  # base64 / data: URLs, one per ControlNet of the artifact
    control_scales: Number | list[Number] | None = None  # one for all, or one per ControlNet (default 1.0)
    control_start: Number = 0.0  # fractions of the denoising steps
    control_end: Number = 1.0
    guess_mode: StrictBool = False
    loras: list[Any] | None = None  # [[NAME, WEIGHT], ...] or [{name, weight}]: files in --lora-dir
    prior_steps: StrictInt | None = None  # Kandinsky 2.2's prior (None: 25)
    prior_guidance: Number | None = None  # (None: 4.0)


class OpenAIImagesIn(BaseModel):
    """``POST /v1/images/generations`` (openai-python's ImageGenerateParams), plus sdrt's extras."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    model: StrictStr | None = None
    n: StrictInt | None = Field(1, ge=1, le=10)
    size: StrictStr | None = None  # "WxH" or "auto"
    response_format: StrictStr | None = None  # only "b64_json"
    output_format: StrictStr | None = None  # only "png"
    quality: StrictStr | None = None  # "auto" / "standard" only
    style: StrictStr | None = None  # not supported when set
    user: StrictStr | None = None  # ignored (no effect on the image)
    background: StrictStr | None = None  # "auto" / "opaque" only
    moderation: StrictStr | None = None  # ignored
    output_compression: StrictInt | None = None  # PNG: no effect
    # sdrt extras
    negative_prompt: StrictStr = ""
    steps: StrictInt | None = None  # None: 20 (Kandinsky 2.2: its family's 100)
    guidance: Number | None = None  # None: the family's default (7.5; Kandinsky 2.2: 4.0)
    seed: StrictInt | None = None
    scheduler: StrictStr | None = None
    rng: StrictStr | None = None
    prior_steps: StrictInt | None = None
    prior_guidance: Number | None = None
    stream: StrictBool | None = None
    partial_images: StrictInt | None = None


def parse(model: type[BaseModel], payload: dict) -> BaseModel:
    """Validate or raise ApiError(422) naming the fields."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise ApiError(422, describe_validation(exc.errors()), "InvalidRequest") from None
