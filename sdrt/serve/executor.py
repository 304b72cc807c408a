"""The seam between the HTTP layer and whatever runs generations.

``GenRequest`` is a validated, sdrt-native request (built from A1111, OpenAI or jobs payloads);
``GenResult`` what comes back; an ``Executor`` runs one request at a time per slot (``concurrency``).
``LocalExecutor`` holds one in-process :class:`sdrt.pipeline.Pipeline`; the Ray executor
(``sdrt.serve.ray_app``) implements the same protocol over Ray Serve replicas.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from sdrt.errors import Cancelled, ImageInputError, InputError

log = logging.getLogger(__name__)

MODES = ("txt2img", "img2img", "inpaint")

# on_step(step, total) -> True (go on), False (cancel: raise Cancelled), "interrupt" (A1111 interrupt: stop and
# return the images decoded from the current latents) or "skip" (A1111 skip: end the current image run so,
# go on with the next). Steps count from 1 over every image run of the request.
StepHook = Callable[[int, int], "bool | str"]
INTERRUPT, SKIP = "interrupt", "skip"


@dataclass(frozen=True)
class GenRequest:
    """One generation, already validated against the limits. ``seeds`` has one seed per image."""

    mode: str  # "txt2img" | "img2img" | "inpaint"
    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    width: int | None
    height: int | None
    scheduler: str | None
    strength: float | None
    image_png: bytes | None  # decoded, checked and re-encoded input image (any crop done by the caller)
    mask_png: bytes | None
    # optional, with defaults (added after the first version of the seam; keep them defaulted)
    batch_size: int | None = None  # images per Pipeline call (A1111 batch_size); None: as many as the artifact takes
    sampler_label: str | None = None  # the name written into the infotext ("Euler a"); None: ``scheduler``
    infotext_extra: tuple[tuple[str, str], ...] = ()  # more "Key: value" fields for the infotext
    vae: str = "full"  # "tiny": the TAESD `sdrt export --tiny-vae` added (Pipeline's vae=)
    rng: str = "cpu"  # whose generator the seeds reproduce (Pipeline's rng=; sdrt.rng_cuda.parse_rng names)
    control_pngs: tuple[bytes, ...] = ()  # one checked control image per ControlNet (Pipeline's control_images=)
    control_scales: tuple[float, ...] = ()  # one per ControlNet; () = 1.0 each
    control_start: float = 0.0
    control_end: float = 1.0
    guess_mode: bool = False
    loras: tuple[tuple[str, float], ...] = ()  # (path, weight): run-time LoRA (Pipeline's loras=)
    lora_dir: str | None = None  # where the prompt's <lora:NAME:W> tags are (Pipeline's lora_dir=)
    prior_steps: int | None = None  # Kandinsky 2.2's prior stage; None: the pipeline's default
    prior_guidance: float | None = None

    @property
    def count(self) -> int:
        return len(self.seeds)


@dataclass
class GenResult:
    images: list[bytes]  # PNG bytes with the A1111 ``parameters`` text chunk
    infotexts: list[str]
    seeds: list[int]
    width: int
    height: int
    timings: dict  # seconds per stage (summed over the runs of the request)
    replica: str  # replica id (X-Sdrt-Replica header)


class Executor(Protocol):
    concurrency: int  # generations that may run at once (1 local; N replicas for Ray)
    manifest_info: dict  # see ``manifest_info()``: what /sd-models and /readyz need

    def ready(self) -> bool: ...

    def generate(self, req: GenRequest, on_step: StepHook) -> GenResult:
        """Blocking; called from a job worker thread. When ``on_step`` returns False, raise
        ``sdrt.errors.Cancelled``. ``SdrtError`` subclasses propagate for bad input (-> 4xx)."""

    def close(self) -> None: ...


def manifest_info(manifest, engine_dir) -> dict:
    """The artifact as the HTTP layer describes it (plain JSON types, so it crosses process boundaries)."""
    from sdrt.serve import extras
    sizes, dims = manifest.sizes, manifest.dims
    return {
        "name": os.path.basename(os.path.normpath(str(engine_dir))),
        "path": str(engine_dir),
        "family": manifest.family,
        "sizes": sizes.to_dict(),
        "vae_scale_factor": dims.vae_scale_factor,
        "inpainting_unet": dims.unet_in_channels != dims.latent_channels,
        "scheduler": manifest.scheduler_config.get("_class_name"),
        "controlnets": dims.controlnets or 0,
        "defaults": extras.family_defaults(manifest.family),
    }



def decode_png(data: bytes, what: str):
    """PNG/any bytes -> a loaded PIL image, or ImageInputError (with the decompression-bomb guard)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as handle:
            handle.load()
            return handle.copy()
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                              "refusing it as a decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageInputError(f"{what} is not an image Pillow can read ({type(exc).__name__})") from None


def encode_png(image, parameters: str | None = None) -> bytes:
    """uint8 HxWx3 array or PIL image -> PNG bytes with A1111's ``parameters`` text chunk."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if not hasattr(image, "save"):
        image = Image.fromarray(image)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def infotext(req: GenRequest, seed: int, width: int, height: int) -> str:
    """A1111's infotext for image ``seed`` of ``req``."""
    from sdrt.images import a1111_parameters

    from sdrt.generate_cli import rng_infotext
    from sdrt.lora import extract_tags, infotext as lora_infotext, lora_parameters

    tagged = extract_tags(req.prompt, req.lora_dir)[1] if req.lora_dir else []
    prompt, lora_fields = lora_infotext(req.prompt, lora_parameters(list(req.loras) + tagged))  # as the CLI's
    extra = dict(req.infotext_extra) | rng_infotext(req.rng) | lora_fields
    if req.mode != "txt2img" and req.strength is not None:
        extra.setdefault("Denoising strength", req.strength)
    sampler = req.sampler_label or req.scheduler or "default"
    return a1111_parameters(prompt, req.negative_prompt, req.steps, sampler, req.guidance, seed, width,
                            height, **extra)


def run_request(pipe, req: GenRequest, on_step: StepHook, replica: str) -> GenResult:
    """Run ``req`` on a Pipeline: images in runs of ``batch_size``, one seed per image, so image k is
    the same whichever run it falls in. Shared by LocalExecutor and the Ray replicas."""
    from sdrt.serve import extras

    if req.mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {req.mode!r}")
    if not req.seeds:
        raise InputError("a request needs at least one seed (one per image)")
    max_batch = pipe.manifest.sizes.max_batch
    per_run = max(1, min(req.batch_size or max_batch, max_batch))
    runs = [list(req.seeds[i:i + per_run]) for i in range(0, len(req.seeds), per_run)]
    extra: dict = {}
    if req.mode != "txt2img":
        extra["image"] = decode_png(req.image_png or b"", "image") if req.image_png else None
        if extra["image"] is None:
            raise ImageInputError(f"{req.mode} needs an input image")
        extra["strength"] = req.strength if req.strength is not None or req.mode == "img2img" else None
        if req.mode == "img2img" and extra["strength"] is None:
            extra["strength"] = 0.75
    if req.mode == "inpaint":
        if not req.mask_png:
            raise ImageInputError("inpaint needs a mask")
        extra["mask"] = decode_png(req.mask_png, "mask")
    state = {"done": 0, "total": None, "stop": None, "latents": None}

    def callback(i, total, t, latents):
        if state["total"] is None:  # the step count after strength is known at the first step
            state["total"] = total * len(runs)
        state["done"] += 1
        answer = on_step(state["done"], state["total"])
        if answer in (INTERRUPT, SKIP):
            state["stop"], state["latents"] = answer, latents
            return False
        return answer is not False

    images, infotexts, seeds, timings = [], [], [], {}
    width = height = None
    for run in runs:
        try:
            result = getattr(pipe, req.mode)(
                prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, guidance=req.guidance,
                seed=run, width=req.width, height=req.height, scheduler=req.scheduler, batch=len(run),
                callback=callback, vae=req.vae, **extras.pipeline_options(req), **extra)
            pixels_out = result.images
            for stage, value in result.timings.items():
                value = sum(value) if isinstance(value, list) else value
                timings[stage] = timings.get(stage, 0.0) + value
        except Cancelled:
            if state["stop"] is None:
                raise
            pixels_out = decode_latents(pipe, state["latents"])  # A1111: the partly denoised image
        height, width = pixels_out.shape[1:3]
        stop, state["stop"] = state["stop"], None
        for seed, pixels in zip(run, pixels_out):
            text = infotext(req, seed, width, height)
            images.append(encode_png(pixels, text))
            infotexts.append(text)
            seeds.append(seed)
        if stop == INTERRUPT:
            break
        if stop == SKIP and state["total"] is not None:  # the skipped steps count as done
            state["done"] = ((state["done"] - 1) // (state["total"] // len(runs)) + 1) * (state["total"] // len(runs))
    if not images:
        raise Cancelled("interrupted before any image")
    return GenResult(images, infotexts, seeds, int(width), int(height), timings, replica)


def decode_latents(pipe, latents):
    """uint8 (N, H, W, 3) from latents, as the Pipeline's last stage (VAE decoder on latents / scaling)."""
    import numpy as np

    from sdrt.arrays import to_host
    from sdrt.images import to_uint8, to_unit
    from sdrt.specs import VAE_DECODER

    latents = np.asarray(to_host(latents), np.float32)
    if getattr(pipe, "has_prior", False):  # Kandinsky 2.2: MoVQ on unscaled latents; nothing to show in the prior
        from sdrt.specs_kandinsky import MOVQ_DECODER

        if latents.ndim != 4:
            raise Cancelled("interrupted in the prior stage, before any image latents")
        decoded = pipe.engine(MOVQ_DECODER)({"latent": latents})
    else:
        decoded = pipe.engine(VAE_DECODER)({"latent": latents / float(np.float32(pipe.manifest.vae_scaling_factor))})
    return to_uint8(to_unit(np.asarray(to_host(decoded["images"]), np.float32)))


@dataclass
class LocalExecutor:
    """One Pipeline in this process; ``generate`` holds a lock, so one generation runs at a time."""

    engine_dir: str
    backend: str = "ort-cpu"
    threads: int | None = None
    concurrency: int = 1
    replica: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self):
        from sdrt.pipeline import Pipeline

        start = time.perf_counter()
        self._lock = threading.Lock()
        self._closed = self._ready = False
        self.pipe = Pipeline(self.engine_dir, backend=self.backend, threads=self.threads)
        self.manifest_info = manifest_info(self.pipe.manifest, self.engine_dir)
        self.load_seconds = time.perf_counter() - start

    def warm_up(self) -> None:
        """Open every engine now (``Pipeline`` opens them on first use), so the first request pays no load."""
        from sdrt.specs_kandinsky import IMAGE_ENCODER

        with self._lock:  # every component but Kandinsky's image encoder (txt2img needs none: a constant)
            manifest = self.pipe.manifest
            for name in [n for n in manifest.specs.components if n != IMAGE_ENCODER and manifest.has(n)]:
                self.pipe.engine(name)
            self._ready = True
        log.info("engines loaded from %s in %.1f s", self.engine_dir, self.pipe.load_seconds)

    def ready(self) -> bool:
        """True once ``warm_up`` has opened the engines (until ``close``)."""
        return self._ready and not self._closed

    def generate(self, req: GenRequest, on_step: StepHook) -> GenResult:
        with self._lock:
            if self._closed:
                raise Cancelled("the server is shutting down")
            return run_request(self.pipe, req, on_step, self.replica)

    def close(self) -> None:
        self._closed = True
