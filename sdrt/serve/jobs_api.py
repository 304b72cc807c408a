"""sdrt's native async jobs: submit (202), status, Server-Sent Events, images, cancel.

Events (``GET /v1/jobs/{id}/events``, ``text/event-stream``): ``queued`` {position}, ``running``,
``step`` {step, steps}, then one of ``done`` / ``error`` / ``cancelled``; each with ``id:`` its index,
so a reconnecting EventSource resumes with ``Last-Event-ID``.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sdrt.serve import extras, limits, sync
from sdrt.serve.a1111_fields import seeds_for
from sdrt.serve.errors import ApiError
from sdrt.serve.executor import GenRequest, encode_png
from sdrt.serve.jobs import QUEUED, SUCCEEDED, TERMINAL
from sdrt.serve.schemas import JobIn, parse

router = APIRouter()
KEEPALIVE_S = 15.0


def build(body: JobIn, info: dict, options) -> GenRequest:
    image_png = mask_png = None
    if body.mode != "txt2img":
        if body.image is None:
            raise ApiError(400, f"image: {body.mode} needs an image")
        image = limits.flatten(limits.decode_image(body.image, "image", options.max_image_pixels))
        image_png = encode_png(image)
        if body.mode == "inpaint":
            if body.mask is None:
                raise ApiError(400, "mask: inpaint needs a mask")
            mask = limits.decode_image(body.mask, "mask", options.max_image_pixels)
            if mask.size != image.size:
                raise ApiError(400, f"mask: size {mask.width}x{mask.height} differs from the image's "
                                    f"{image.width}x{image.height}")
            mask_png = encode_png(mask.convert("L"))
    elif body.image is not None or body.mask is not None:
        raise ApiError(400, "image: txt2img takes no image (set mode to img2img or inpaint)")
    defaults = info.get("defaults", {})
    strength = body.strength if body.mode != "txt2img" else None
    if body.mode == "img2img" and strength is None:
        strength = defaults.get("img2img_strength", 0.75)
    req = GenRequest(mode=body.mode, prompt=body.prompt, negative_prompt=body.negative_prompt,
                     steps=defaults.get("steps", 30) if body.steps is None else body.steps,
                     guidance=float(defaults.get("guidance", 7.5) if body.guidance is None else body.guidance),
                     **extras.prior(body.prior_steps, body.prior_guidance, info, options),
                     seeds=seeds_for(body.seed, body.batch), width=body.width, height=body.height,
                     scheduler=body.scheduler, strength=strength, image_png=image_png, mask_png=mask_png, vae=body.vae,
                     rng=extras.rng_name(body.rng),
                     **extras.loras(body.prompt, body.loras, options.lora_dir),
                     **extras.control(body.control_images, body.control_scales, body.control_start, body.control_end,
                                      body.guess_mode, info, options.max_image_pixels))
    return limits.check_request(req, info, options)


def _job(request: Request, job_id: str):
    queue = request.app.state.sdrt.queue
    job = queue.get(job_id)
    if job is None:
        if queue.is_expired(job_id):
            raise ApiError(410, f"job {job_id} has expired (results are kept --job-ttl seconds)")
        raise ApiError(404, f"no job {job_id}")
    request.state.job_id = job_id
    return job


def _public(request: Request, job) -> dict:
    queue = request.app.state.sdrt.queue
    out = job.public(queue.position(job.id) if job.state == QUEUED else None)
    out["status_url"] = f"/v1/jobs/{job.id}"
    out["events_url"] = f"/v1/jobs/{job.id}/events"
    out["image_urls"] = [f"/v1/jobs/{job.id}/images/{k}.png" for k in range(out["images"])]
    return out


@router.post("/jobs", status_code=202)
async def submit(request: Request):
    state = request.app.state.sdrt
    body = parse(JobIn, await sync.read_json(request))
    job = sync.submit(request, state, build(body, state.info, state.options), "jobs")
    return JSONResponse({"id": job.id, "status_url": f"/v1/jobs/{job.id}", "events_url": f"/v1/jobs/{job.id}/events",
                         "state": job.state, "position": state.queue.position(job.id),
                         "seeds": list(job.request.seeds)},
                        status_code=202, headers={"X-Sdrt-Replica": state.replica_for()})


@router.get("/jobs/{job_id}")
async def status(request: Request, job_id: str):
    return _public(request, _job(request, job_id))


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str):
    _job(request, job_id)
    job = request.app.state.sdrt.queue.cancel(job_id, "cancelled by the client")
    return _public(request, job)


@router.get("/jobs/{job_id}/images/{name}")
async def image(request: Request, job_id: str, name: str):
    job = _job(request, job_id)
    index = name[:-4] if name.endswith(".png") else name
    if not index.isdigit():
        raise ApiError(404, f"no image {name!r}; images are named 0.png, 1.png, ...")
    if job.state != SUCCEEDED:
        raise ApiError(409 if job.state not in TERMINAL else 404, f"job {job_id} is {job.state}; no images")
    k = int(index)
    if k >= len(job.result.images):
        raise ApiError(404, f"job {job_id} has {len(job.result.images)} image(s); no {name}")
    return Response(job.result.images[k], media_type="image/png",
                    headers={"X-Sdrt-Replica": request.app.state.sdrt.replica_for(job.result)})


def _sse(index: int, event: dict) -> bytes:
    return f"id: {index}\nevent: {event['event']}\ndata: {json.dumps(event['data'])}\n\n".encode()


@router.get("/jobs/{job_id}/events")
async def events(request: Request, job_id: str):
    job = _job(request, job_id)
    queue = request.app.state.sdrt.queue
    last = request.headers.get("last-event-id", "")
    start = int(last) + 1 if last.isdigit() else 0

    async def stream():
        sent, position, ping = start, None, time.monotonic()
        while True:
            current = queue.get(job.id)
            if current is None:
                yield _sse(sent, {"event": "error", "data": {"error": "Gone", "detail": "the job expired"}})
                return
            while sent < len(current.events):
                event = current.events[sent]
                if event["event"] == "done" and current.result is not None:
                    result = current.result
                    event = {"event": "done", "data": {**event["data"], "seeds": result.seeds,
                             "infotexts": result.infotexts, "width": result.width, "height": result.height,
                             "images": [f"/v1/jobs/{job.id}/images/{k}.png" for k in range(len(result.images))]}}
                if event["event"] == "queued":
                    position = event["data"].get("position")
                yield _sse(sent, event)
                sent += 1
            if current.state in TERMINAL:
                return
            if current.state == QUEUED:
                now = queue.position(job.id)
                if now is not None and now != position and sent > 0:
                    yield f"event: queued\ndata: {json.dumps({'id': job.id, 'position': now})}\n\n".encode()
                position = now
            if time.monotonic() - ping > KEEPALIVE_S:
                yield b": keep-alive\n\n"
                ping = time.monotonic()
            await queue.wait_async(job.id, sent)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
