"""The AUTOMATIC1111 ``/sdapi/v1`` subset that A1111 clients (``webuiapi``) use, over the job queue.

txt2img / img2img (with ``mask``: inpaint with A1111's mask handling, ``inpaint.py``) answer as A1111:
``images`` raw base64 PNGs with the ``parameters`` chunk, ``parameters`` the request echoed, ``info`` a
JSON string. ``progress`` / ``interrupt`` / ``skip`` act on the running job, as A1111's global state.
"""

from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request

from sdrt.serve import a1111_fields as fields
from sdrt.serve import extras, inpaint, limits, sync
from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest, decode_png, encode_png
from sdrt.serve.jobs import INTERRUPT, RUNNING, SKIP

router = APIRouter()


def _state(request: Request):
    return request.app.state.sdrt


def get(payload: dict, name: str, kind, default=None):
    """``payload[name]`` as ``kind`` (int, float, bool, str), ``default`` when missing/null; 400 naming it."""
    value = payload.get(name)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is bool and isinstance(value, int) and value in (0, 1):
        value = bool(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ApiError(400, f"{name}: expected {getattr(kind, '__name__', 'int or bool')}, got {type(value).__name__}")
    return value


def build(payload: dict, state, mode: str) -> tuple[GenRequest, dict, object]:
    """(GenRequest, info extras, inpaint.Prepared or None) from an A1111 txt2img / img2img payload."""
    info, options = state.info, state.options
    sampler_name, scheduler = payload.get("sampler_name"), payload.get("scheduler")
    sched, label, extra = fields.resolve_sampler(sampler_name, scheduler, payload.get("sampler_index"))
    fields.refuse_unsupported(payload, label, info["name"])
    batch_size, n_iter = get(payload, "batch_size", int, 1), get(payload, "n_iter", int, 1)
    if batch_size < 1 or n_iter < 1:
        raise ApiError(400, "batch_size and n_iter: must be >= 1")
    opt = info["sizes"]["opt_size"]
    width, height = get(payload, "width", int, opt), get(payload, "height", int, opt)
    count = batch_size * n_iter
    cfg_scale = get(payload, "cfg_scale", float, 7.0)
    if not 0 <= cfg_scale <= 100:
        raise ApiError(400, f"cfg_scale: must be a number in 0..100, got {cfg_scale!r}")
    if count > options.max_images:
        raise ApiError(400, f"batch_size * n_iter: {count} images, this server allows 1..{options.max_images}")
    prompt = limits.check_text(payload.get("prompt"), "prompt", options.max_prompt_chars)
    gen = dict(prompt=prompt, **extras.loras(prompt, None, options.lora_dir),  # <lora:NAME:W>, A1111's syntax
               negative_prompt=limits.check_text(payload.get("negative_prompt"), "negative_prompt",
                                                 options.max_prompt_chars),
               steps=get(payload, "steps", int, 50), guidance=cfg_scale,
               seeds=fields.seeds_for(get(payload, "seed", int, -1), count), width=width, height=height,
               scheduler=sched, batch_size=batch_size, sampler_label=label or info.get("scheduler"),
               infotext_extra=tuple(extra.items()), strength=None, image_png=None, mask_png=None,
               rng=extras.a1111_rng(payload, getattr(state, "a1111_randn_source", None)),
               **extras.prior(get(payload, "prior_steps", int), get(payload, "prior_guidance", float), info, options))
    prepared = None
    if mode == "img2img":
        gen["strength"] = get(payload, "denoising_strength", float, 0.75)
        if not 0 < gen["strength"] <= 1:
            raise ApiError(400, f"denoising_strength: must be in (0, 1], got {gen['strength']!r}")
        images = payload.get("init_images")
        if not isinstance(images, list) or not images:
            raise ApiError(400, "init_images: img2img needs a list with one base64 image")
        if len(images) > 1:
            raise ApiError(400, "init_images: one init image is supported")
        image = limits.flatten(limits.decode_image(images[0], "init_images[0]", options.max_image_pixels))
        if payload.get("mask") is not None:
            mode = "inpaint"
            mask = limits.decode_image(payload["mask"], "mask", options.max_image_pixels)
            blur = get(payload, "mask_blur", float, None)
            blur_x = blur if blur is not None else get(payload, "mask_blur_x", float, 4.0)
            blur_y = blur if blur is not None else get(payload, "mask_blur_y", float, 4.0)
            padding = get(payload, "inpaint_full_res_padding", int, 0)
            if not (0 <= blur_x <= 64 and 0 <= blur_y <= 64 and 0 <= padding <= 4096):
                raise ApiError(400, "mask_blur / inpaint_full_res_padding: out of range (blur 0..64, padding >= 0)")
            prepared = inpaint.prepare(
                image, mask, width, height, blur_x=blur_x, blur_y=blur_y,
                invert=bool(get(payload, "inpainting_mask_invert", (int, bool), 0)),  # clients send 1 or true
                full_res=get(payload, "inpaint_full_res", bool, True), padding=padding,
                fill=get(payload, "inpainting_fill", int, 0))
            if prepared is not None:
                gen["image_png"], gen["mask_png"] = encode_png(prepared.image), encode_png(prepared.mask)
                gen["infotext_extra"] += tuple(prepared.extra.items())
            else:  # blank mask with "only masked": A1111 switches to img2img of the whole image
                mode = "img2img" if not info.get("inpainting_unet") else "inpaint"
        if prepared is None:
            from PIL import Image

            if image.size != (width, height):  # resize_mode 0, "just resize" (Lanczos, as the Pipeline)
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            gen["image_png"] = encode_png(image)
            if mode == "inpaint":  # an inpainting UNet, as A1111 conditions it without a mask: all of it repaints
                gen["mask_png"] = encode_png(Image.new("L", image.size, 255))
    req = limits.check_request(GenRequest(mode=mode, **gen), info, options)
    return req, {"batch_size": batch_size, "n_iter": n_iter}, prepared


def response(payload: dict, req: GenRequest, result, state, sizes: dict, prepared) -> dict:
    images, infotexts = result.images, result.infotexts
    if prepared is not None:  # A1111: paste back ("only masked") and composite the original outside the mask
        images = [encode_png(inpaint.composite(decode_png(png, "result"), prepared), text)
                  for png, text in zip(images, infotexts)]
    echo = dict(payload)
    if "init_images" in echo and not payload.get("include_init_images"):  # A1111 echoes them only if asked
        echo.update(init_images=None, mask=None)
    info = {"prompt": req.prompt, "all_prompts": [req.prompt] * len(images), "negative_prompt": req.negative_prompt,
            "all_negative_prompts": [req.negative_prompt] * len(images), "seed": result.seeds[0],
            "all_seeds": result.seeds, "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
            "width": result.width, "height": result.height, "sampler_name": req.sampler_label,
            "scheduler": dict(req.infotext_extra).get("Schedule type", "Automatic"), "cfg_scale": req.guidance,
            "steps": req.steps, "batch_size": sizes["batch_size"], "n_iter": sizes["n_iter"],
            "restore_faces": False, "sd_model_name": state.info["name"], "seed_resize_from_w": -1,
            "seed_resize_from_h": -1, "denoising_strength": req.strength, "extra_generation_params": dict(
                req.infotext_extra), "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
            "is_using_inpainting_conditioning": bool(state.info.get("inpainting_unet")) and req.mode == "inpaint",
            "version": "sdrt"}
    send = payload.get("send_images", True) is not False
    return {"images": [base64.b64encode(png).decode() for png in images] if send else [], "parameters": echo,
            "info": json.dumps(info)}


async def _generate(request: Request, mode: str):
    state = _state(request)
    payload = await sync.read_json(request)
    req, sizes, prepared = build(payload, state, mode)
    result = await sync.run(request, state, req, f"a1111.{mode}")
    return sync.json_response(response(payload, req, result, state, sizes, prepared), result, state)


@router.post("/txt2img")
async def txt2img(request: Request):
    return await _generate(request, "txt2img")


@router.post("/img2img")
async def img2img(request: Request):
    return await _generate(request, "img2img")


@router.get("/progress")
async def progress(request: Request):
    """A1111's progress of the running job (``current_image`` is always null)."""
    queue = _state(request).queue
    running = [queue.get(i) for i in queue.running()]
    job = next((j for j in running if j is not None and j.state == RUNNING), None)
    waiting = queue.depth()
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": waiting,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
                "current_task": None}
    runs = max(1, -(-job.request.count // (job.request.batch_size or job.request.count)))
    per_run = max(1, job.steps // runs)
    job_no = min(runs - 1, max(0, job.step - 1) // per_run)
    fraction = min(job.step / max(job.steps, 1), 0.99)
    elapsed = time.time() - (job.started or time.time())
    state.update(job=f"job {job.id}", job_count=runs + waiting, job_no=job_no, job_timestamp=time.strftime(
        "%Y%m%d%H%M%S", time.localtime(job.started or time.time())), sampling_step=job.step - job_no * per_run,
        sampling_steps=per_run, interrupted=job.control == INTERRUPT, skipped=job.control == SKIP)
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state, "current_image": None,
            "textinfo": None, "current_task": job.id}


@router.post("/interrupt")
async def interrupt(request: Request):
    _state(request).queue.control_running(INTERRUPT)
    return {}


@router.post("/skip")
async def skip(request: Request):
    _state(request).queue.control_running(SKIP)
    return {}


@router.get("/samplers")
async def samplers():
    return fields.samplers_list()


@router.get("/schedulers")
async def schedulers():
    return fields.SCHEDULES


@router.get("/sd-models")
async def sd_models(request: Request):
    info = _state(request).info
    return [{"title": info["name"], "model_name": info["name"], "hash": None, "sha256": None,
             "filename": info.get("path"), "config": None}]


@router.get("/options")
async def get_options(request: Request):
    state = _state(request)
    return {"sd_model_checkpoint": state.info["name"], "samples_format": "png", "CLIP_stop_at_last_layers": 1,
            "eta_noise_seed_delta": 0, "randn_source": state.a1111_randn_source or extras.DEFAULT_RANDN_SOURCE}


@router.post("/options")
async def set_options(request: Request):
    """``sd_model_checkpoint`` naming the loaded artifact; ``randn_source`` (CPU/GPU/NV) becomes the default of
    the A1111 endpoints' requests, as A1111's global option."""
    state, payload = _state(request), await sync.read_json(request)
    fields.refuse_overrides(payload, state.info["name"])
    if isinstance(payload, dict) and payload.get("randn_source") is not None:
        extras.randn_source(payload["randn_source"])
        state.a1111_randn_source = payload["randn_source"].strip().upper()
    return {}


@router.get("/loras")
async def list_loras(request: Request):
    """A1111's LoRA list: the ``.safetensors`` files below ``--lora-dir`` (name = file stem, as tags use it)."""
    from pathlib import Path

    folder = _state(request).options.lora_dir
    files = sorted(Path(folder).rglob("*.safetensors")) if folder and Path(folder).is_dir() else []
    return [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}} for f in files]


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.post("/png-info")
async def png_info(request: Request):
    payload = await sync.read_json(request)
    image = limits.decode_image(payload.get("image"), "image", _state(request).options.max_image_pixels)
    text = image.info.get("parameters", "") if isinstance(image.info.get("parameters"), str) else ""
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text, "items": items, "parameters": parse_infotext(text)}


def parse_infotext(text: str) -> dict:
    """A1111 infotext -> {"Prompt", "Negative prompt", key: value ...} (values kept as strings)."""
    if not text:
        return {}
    lines = text.strip().split("\n")
    out, last = {}, lines[-1] if len(lines) > 1 or ": " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt = [line for line in body if not line.startswith("Negative prompt: ")]
    negative = [line[len("Negative prompt: "):] for line in body if line.startswith("Negative prompt: ")]
    out["Prompt"] = "\n".join(prompt)
    out["Negative prompt"] = "\n".join(negative)
    for part in last.split(", "):
        key, sep, value = part.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out

