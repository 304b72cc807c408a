"""Kandinsky 2.2 orchestration: the prior (``kandinsky_prior.py``), then the decoder UNet and the MoVQ.

Mirrors diffusers' ``KandinskyV22CombinedPipeline`` (txt2img), ``KandinskyV22Img2ImgCombinedPipeline`` and
``KandinskyV22InpaintCombinedPipeline`` step for step: one generator through both stages (prior latents and
its per-step noise, then the decoder's latents and its scheduler's noise), ``downscale_height_and_width``
(txt2img rounds the image up to a multiple of the MoVQ scale squared), CFG in each stage with its own scale,
the decoder's CFG on the first 4 of the UNet's 8 output channels (the conditional half's variance passed on
when the scheduler's ``variance_type`` is learned*), no ``scale_model_input`` (the Kandinsky pipelines never
call it), unscaled MoVQ latents, and the inpainting decoder's inverted, dilated mask.
"""

from __future__ import annotations

import numpy as np

from sdrt import schedulers
from sdrt.arrays import check_finite, to_host
from sdrt.errors import InputError
from sdrt.guidance import check_guidance, guide, uses_cfg
from sdrt.images import check_same_size, load_image, to_uint8, to_unit
from sdrt.pipelines.base import BasePipeline, Result, StepCallback, Timings
from sdrt.pipelines.kandinsky_prior import PriorStage
from sdrt.pipelines.loop import denoise
from sdrt.pipelines.stable_diffusion import per_image_generator
from sdrt.rng import random_seed
from sdrt.rng_cuda import RngSpec, parse_rng
from sdrt.schedulers.common import astype
from sdrt.specs_kandinsky import (DECODER_UNET, DEFAULT_GUIDANCE, DEFAULT_IMG2IMG_STRENGTH, DEFAULT_PRIOR_GUIDANCE,
                                  DEFAULT_PRIOR_STEPS, DEFAULT_STEPS, IMAGE_EMBEDS, IMAGES, LATENT, LATENTS,
                                  MOVQ_DECODER, MOVQ_ENCODER, OUT_SAMPLE, SAMPLE, TIMESTEP)
from sdrt.tokenizer import ClipTokenizer

LEARNED = ("learned", "learned_range")


def downscale_height_and_width(height: int, width: int, scale: int) -> tuple[int, int]:
    """diffusers' Kandinsky rounding: latent sides ceil(side / scale**2) * scale."""
    return -(-height // scale**2) * scale, -(-width // scale**2) * scale


def prepare_mask(mask: np.ndarray) -> np.ndarray:
    """diffusers' Kandinsky ``prepare_mask`` on (N, 1, h, w) masks (1 keep, 0 repaint): every repaint pixel
    also zeroes its neighbours above, left, above-left, below, right and below-right (not the other two)."""
    zero = mask[:, 0] != 1
    out = mask.copy()
    h, w = zero.shape[1:]
    for di, dj in ((-1, 0), (0, -1), (-1, -1), (1, 0), (0, 1), (1, 1)):
        src = zero[:, max(-di, 0):h - max(di, 0), max(-dj, 0):w - max(dj, 0)]
        dst = out[:, 0, max(di, 0):h - max(-di, 0), max(dj, 0):w - max(-dj, 0)]
        dst[src] = 0
    return out


class _Unscaled:
    """The decoder's scheduler without ``scale_model_input``: diffusers' Kandinsky pipelines never call it."""

    def __init__(self, sched):
        self._sched = sched

    def scale_model_input(self, sample, timestep):
        return sample

    def __getattr__(self, name):
        return getattr(self._sched, name)


class KandinskyTimings(Timings):
    PER_CALL = ("unet", "prior")


class KandinskyPipeline(BasePipeline):
    """A Kandinsky 2.2 artifact (family ``kandinsky22``): txt2img, img2img and inpaint as diffusers' combined
    pipelines; the prior's steps and guidance are ``prior_steps`` and ``prior_guidance``."""

    CUDA_GRAPH_COMPONENTS = (DECODER_UNET,)
    has_prior = True  # takes prior_steps / prior_guidance (the CLI's --prior-steps / --prior-guidance)
    DEFAULTS = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "prior_steps": DEFAULT_PRIOR_STEPS,
                "prior_guidance": DEFAULT_PRIOR_GUIDANCE, "img2img_strength": DEFAULT_IMG2IMG_STRENGTH}

    def __init__(self, engine_dir, backend: str = "ort-cpu", threads: int | None = None, xp=None, manifest=None):
        super().__init__(engine_dir, backend, threads, xp, manifest)
        for record in self.manifest.data.get("tokenizer", {}).get("files", []):
            self.manifest.check_file(record)
        self.tokenizer = ClipTokenizer.from_dir(self.manifest.tokenizer_dir)
        self.prior = PriorStage(self.manifest, self.engine, self.tokenizer)

    def txt2img(self, prompt: str, **options) -> Result:
        return self._generate("txt2img", prompt, **options)

    def img2img(self, image, prompt: str, strength: float = DEFAULT_IMG2IMG_STRENGTH, **options) -> Result:
        return self._generate("img2img", prompt, image=image, strength=strength, **options)

    def inpaint(self, image, mask, prompt: str, strength: float | None = None, **options) -> Result:
        """``KandinskyV22InpaintCombinedPipeline`` has no strength: every step is run (None or 1.0 only)."""
        if strength is not None and strength != 1.0:
            raise InputError(f"Kandinsky inpainting runs every step (diffusers has no strength here), got {strength!r}")
        return self._generate("inpaint", prompt, image=image, mask=mask, strength=1.0, **options)

    def _check(self, mode, steps, prior_steps, guidance, prior_guidance, batch, strength, vae):
        for name, value in (("steps", steps), ("prior_steps", prior_steps), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        guidance = check_guidance(guidance)
        try:
            prior_guidance = check_guidance(prior_guidance)
        except InputError:
            raise InputError(f"prior_guidance must be a finite number >= 0, got {prior_guidance!r}") from None
        if mode == "img2img" and not (isinstance(strength, (int, float, np.floating)) and 0 < strength <= 1):
            raise InputError(f"strength must be in (0, 1], got {strength!r}")
        if vae != "full":
            raise InputError(f"vae must be full for Kandinsky 2.2 (its MoVQ has no tiny variant), got {vae!r}")
        inpainting = self.dims.unet_in_channels != self.dims.latent_channels
        if inpainting != (mode == "inpaint"):
            raise InputError("this decoder takes 9 channels (an inpainting model): use inpaint with an image and a "
                             "mask" if inpainting else "inpaint needs an inpainting decoder (a 9-channel UNet, "
                             "kandinsky-2-2-decoder-inpaint); this one takes 4")
        return guidance, prior_guidance

    def _size(self, mode, image, width, height) -> tuple[int, int]:
        """The (width, height) the decoder runs at, checked against the artifact's range."""
        s = self.dims.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        if mode == "txt2img":
            opt = self.manifest.sizes.opt_size
            h, w = downscale_height_and_width(height or opt, width or opt, s)
            size, note = (w * s, h * s), f" (rounded up to a multiple of {s * s}, as diffusers)"
        elif mode == "img2img":  # VaeImageProcessor: the image resized to the size rounded down to the scale
            w, h = width or image.width - image.width % (s * s), height or image.height - image.height % (s * s)
            size, note = (w - w % s, h - h % s), f" (rounded down to a multiple of {s})"
            if size[0] % (s * s) or size[1] % (s * s):  # diffusers' UNet interpolates there; the graph cannot
                raise InputError(f"Kandinsky img2img needs a size whose latent sides are multiples of {s} (the "
                                 f"exported decoder UNet's), i.e. multiples of {s * s} pixels; got "
                                 f"{size[0]}x{size[1]}{note}")
        else:  # the inpaint pipeline encodes at (height, width) and draws latents at the rounded-up size
            w, h = width or image.width - image.width % (s * s), height or image.height - image.height % (s * s)
            if w % (s * s) or h % (s * s):
                raise InputError(f"Kandinsky inpainting needs width and height multiples of {s * s} "
                                 f"(diffusers' latents would not match the image's), got {w}x{h}")
            size, note = (w, h), ""
        try:
            self.manifest.sizes.check(size[0], size[1], 1, s)
        except InputError as exc:
            raise InputError(f"{exc}{note}") from None
        return size

    def _generate(self, mode, prompt, *, negative_prompt="", steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE,
                  prior_steps=DEFAULT_PRIOR_STEPS, prior_guidance=DEFAULT_PRIOR_GUIDANCE, seed=None, width=None,
                  height=None, scheduler=None, batch=1, callback: StepCallback | None = None, image=None, mask=None,
                  strength=1.0, vae="full", rng="cpu", **unsupported) -> Result:
        if unsupported:  # LoRA, ControlNet, ...: options of the Stable Diffusion pipelines
            raise InputError(f"{', '.join(sorted(unsupported))}: not supported for Kandinsky 2.2 artifacts")
        timings, m = KandinskyTimings(), self.manifest
        rng = rng if isinstance(rng, RngSpec) else parse_rng(rng)
        guidance, prior_guidance = self._check(mode, steps, prior_steps, guidance, prior_guidance, batch, strength,
                                               vae)
        if mode != "txt2img":
            image = image if hasattr(image, "convert") else load_image(image, "image")
        if mode == "inpaint":
            mask = mask if hasattr(mask, "convert") else load_image(mask, "mask")
            check_same_size(image, mask)
        width, height = self._size(mode, image, width, height)
        m.sizes.check(width, height, batch, self.dims.vae_scale_factor)
        sched = _Unscaled(schedulers.from_config(m.scheduler_config, scheduler))
        sched.set_timesteps(steps)
        timesteps = sched.timesteps
        if mode == "img2img":  # KandinskyV22Img2ImgPipeline.get_timesteps: no scheduler order, no begin index
            start = schedulers.img2img_start(steps, strength, 1)
            timesteps = timesteps[start:]
            if len(timesteps) == 0:
                raise InputError(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
            sched.set_begin_index(start)
        seed = random_seed() if seed is None else seed
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        generator = per_image_generator(seeds, batch, rng) if isinstance(seed, (list, tuple)) else rng(seed)
        total = prior_steps + len(timesteps)

        def stage_callback(offset):
            if callback is None:
                return None
            return lambda i, n, t, latents: callback(offset + i, total, t, latents)

        embeds, negative = self.prior(prompt, negative_prompt, batch, prior_steps, prior_guidance, generator,
                                      timings, stage_callback(0))
        cfg = uses_cfg(guidance)
        image_embeds = np.concatenate([negative, embeds]) if cfg else embeds
        s = self.dims.vae_scale_factor
        shape = (batch, self.dims.latent_channels, height // s, width // s)
        extra = {}
        if mode == "txt2img":
            latents = generator.randn(shape) * np.float32(sched.init_noise_sigma)
        elif mode == "img2img":
            image_latents = self._encode(preprocess(image, width, height), batch, timings)
            latents = sched.add_noise(image_latents, generator.randn(shape), timesteps[0]).astype(np.float32)
        else:
            latents, extra = self._inpaint_inputs(image, mask, width, height, shape, batch, cfg, sched, generator,
                                                  timings)
        latents = self._denoise(mode, latents, extra, image_embeds, sched, timesteps, cfg, guidance, generator,
                                timings, stage_callback(prior_steps))
        movq = self.engine(MOVQ_DECODER)  # opened outside the stage: its time is ``load``
        with timings("vae_decode"):
            decoded = movq({LATENT: latents})[IMAGES]
        unit = to_unit(check_finite(to_host(decoded), "decoded image (MoVQ)"))
        samples = timings.samples
        loop = sum(samples.pop("step", [])) + sum(samples.pop("prior_steps", []))
        samples["loop_overhead"] = [loop - sum(samples.get("unet", [])) - sum(samples.get("prior", []))]
        params = {"mode": mode, "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps,
                  "guidance": guidance, "prior_steps": prior_steps, "prior_guidance": prior_guidance, "seed": seed,
                  "width": unit.shape[2], "height": unit.shape[1], "batch": batch,
                  "scheduler": scheduler or m.scheduler_config.get("_class_name"), "strength": strength, "vae": vae,
                  "rng": rng.name}
        return Result(to_uint8(unit), unit, seeds[0], timings.summary(), params, seeds)

    def _encode(self, pixels, batch, timings) -> np.ndarray:
        """``movq.encode(x).latents``: unscaled, no distribution to sample; one image repeated per row."""
        movq = self.engine(MOVQ_ENCODER)
        with timings("vae_encode"):
            latents = to_host(movq({IMAGES: pixels})[LATENTS])
        return np.repeat(check_finite(latents, "image latents (MoVQ encoder)"), batch, axis=0)

    def _inpaint_inputs(self, image, mask, width, height, shape, batch, cfg, sched, generator, timings):
        """``prepare_mask_and_masked_image`` + the latents of ``KandinskyV22InpaintPipeline``: mask inverted
        (1 keep), nearest-downsampled to the latents, dilated, multiplying the image's latents."""
        pixels = preprocess(image, width, height, inpaint=True)
        gray = mask.resize((width, height), resample=_pil().Resampling.LANCZOS).convert("L")
        keep = 1 - (np.asarray(gray, np.float32) / np.float32(255.0) >= 0.5).astype(np.float32)
        image_latents = self._encode(pixels, batch, timings)
        s = self.dims.vae_scale_factor
        keep_latent = prepare_mask(np.ascontiguousarray(keep[None, None, ::s, ::s]))
        masked = image_latents * keep_latent
        latents = generator.randn(shape) * np.float32(sched.init_noise_sigma)
        rows = 2 if cfg else 1
        extra = {"masked_image": np.concatenate([masked] * rows), "mask": np.repeat(keep_latent, batch * rows, axis=0),
                 "image_latents": image_latents[:1], "keep": keep_latent, "noise": latents.copy()}
        return latents, extra

    def _denoise(self, mode, latents, extra, image_embeds, sched, timesteps, cfg, guidance, generator, timings,
                 callback):
        """The shared loop in ``self.xp``; the UNet gets [latents (x2 with CFG), masked-image latents, mask]."""
        xp, batch, channels = self.xp, latents.shape[0], latents.shape[1]
        rows = batch * (2 if cfg else 1)
        sample = xp.empty((rows, self.dims.unet_in_channels) + tuple(latents.shape[2:]), dtype=xp.float32)
        if mode == "inpaint":
            sample[:, channels:2 * channels, ...] = xp.asarray(extra["masked_image"])
            sample[:, 2 * channels:, ...] = xp.asarray(extra["mask"])
        feeds = {SAMPLE: sample, IMAGE_EMBEDS: xp.asarray(image_embeds)}
        timestep_rows = xp.asarray(np.repeat(np.asarray(timesteps, np.float32)[:, None], rows, axis=1))
        learned = getattr(sched.config, "variance_type", None) in LEARNED
        unet = self.engine(DECODER_UNET)

        def predict(i, t, x):
            for half in range(0, rows, batch):
                sample[half:half + batch, :channels, ...] = x
            feeds[TIMESTEP] = timestep_rows[i, ...]
            with timings("unet"):
                out = unet(feeds)[OUT_SAMPLE]
            if cfg:
                eps = guide(out[:, :channels, ...], guidance)
                return xp.concatenate([eps, out[batch:, channels:, ...]], axis=1) if learned else eps
            return out if learned else out[:, :channels, ...]

        blend = None
        if mode == "inpaint":
            keep, proper = xp.asarray(extra["keep"]), xp.asarray(extra["image_latents"])
            noise = xp.asarray(extra["noise"])

            def blend(i, stepped):
                target = proper if i == len(timesteps) - 1 else sched.add_noise(proper, noise, timesteps[i + 1])
                return astype(keep * target + (1 - keep) * stepped, stepped.dtype)

        latents = denoise(xp, xp.asarray(latents), sched, timesteps, generator, predict, timings, callback, blend)
        if mode == "inpaint":  # the pipeline's last blend with the clean image latents
            latents = astype(keep * proper + (1 - keep) * latents, latents.dtype)
        return latents


def _pil():
    from PIL import Image

    return Image


def preprocess(image, width: int, height: int, inpaint: bool = False) -> np.ndarray:
    """PIL image -> float32 (1, 3, H, W) in [-1, 1] by a bicubic resize with ``reducing_gap=1``, as both Kandinsky
    image paths: img2img's ``VaeImageProcessor(resample="bicubic", reducing_gap=1)`` (x / 255 * 2 - 1) and the
    inpaint pipeline's ``prepare_mask_and_masked_image`` (RGB after the resize, x / 127.5 - 1)."""
    resized = (image if inpaint else image.convert("RGB")).resize((width, height), resample=_pil().Resampling.BICUBIC,
                                                                  reducing_gap=1)
    array = np.asarray(resized.convert("RGB") if inpaint else resized, np.float32)
    if inpaint:
        array = array / np.float32(127.5) - np.float32(1.0)
    else:
        array = array / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])
