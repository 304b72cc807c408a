"""OpenAI images: ``POST /v1/images/generations`` -> ``{created, data: [{b64_json}]}``, so the official
``openai`` client works with ``base_url`` pointed at sdrt (and a ``--token-file`` token as ``api_key``)."""

from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, Request

from sdrt.serve import extras, limits, sync
from sdrt.serve.a1111_fields import seeds_for
from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest
from sdrt.serve.schemas import OpenAIImagesIn, parse

router = APIRouter()
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


def build(body: OpenAIImagesIn, info: dict, options) -> GenRequest:
    if body.model not in (None, "", info["name"], "sdrt"):
        raise ApiError(400, f"model: {body.model!r} is not served here; the loaded model is {info['name']!r}")
    if body.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format: {body.response_format!r} is not supported; use b64_json")
    if body.output_format not in (None, "png"):
        raise ApiError(400, f"output_format: {body.output_format!r} is not supported; sdrt returns png")
    if body.quality not in (None, "auto", "standard"):
        raise ApiError(400, f"quality: {body.quality!r} is not supported")
    if body.style is not None:
        raise ApiError(400, f"style: {body.style!r} is not supported")
    if body.background not in (None, "auto", "opaque"):
        raise ApiError(400, f"background: {body.background!r} is not supported")
    if body.stream or body.partial_images:
        raise ApiError(400, "stream: streaming images is not supported; use the jobs API (/v1/jobs) for progress")
    if body.size in (None, "", "auto"):
        width = height = info["sizes"]["opt_size"]
    else:
        match = SIZE.match(body.size)
        if not match:
            raise ApiError(400, f"size: expected 'WIDTHxHEIGHT' or 'auto', got {body.size!r}")
        width, height = int(match[1]), int(match[2])
    n = body.n or 1
    defaults = info.get("defaults", {})  # the family's (extras.family_defaults)
    prompt = limits.check_text(body.prompt, "prompt", options.max_prompt_chars)
    req = GenRequest(mode="txt2img", prompt=prompt, **extras.loras(prompt, None, options.lora_dir),
                     **extras.prior(body.prior_steps, body.prior_guidance, info, options),
                     negative_prompt=body.negative_prompt,
                     steps=defaults.get("openai_steps", 20) if body.steps is None else body.steps,
                     guidance=float(defaults.get("guidance", 7.5) if body.guidance is None else body.guidance),
                     seeds=seeds_for(body.seed, n), width=width, height=height, scheduler=body.scheduler,
                     strength=None, image_png=None, mask_png=None, rng=extras.rng_name(body.rng))
    try:
        return limits.check_request(req, info, options)
    except ApiError as exc:  # name the field the client sent
        if exc.detail.startswith(("width:", "height:")):
            raise ApiError(400, f"size: {body.size!r}: {exc.detail}") from None
        raise


@router.post("/images/generations")
async def generations(request: Request):
    state = request.app.state.sdrt
    body = parse(OpenAIImagesIn, await sync.read_json(request))
    req = build(body, state.info, state.options)
    result = await sync.run(request, state, req, "openai.images")
    data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": req.prompt} for png in result.images]
    payload = {"created": int(time.time()), "data": data, "output_format": "png",
               "size": f"{result.width}x{result.height}"}
    return sync.json_response(payload, result, state)
